"""Training examples from JSONL files: three formats, parsed and validated line by line.

One JSON object per line, in exactly one of these formats (the same one on every line):

    {"text": "table: ...\\nQ: ...\\nA: SELECT ..."}
    {"prompt": "Q: ...\\nA:", "completion": " SELECT ..."}
    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

The trainer reads files with `read_jsonl`, which stops at the first problem. The HTTP server
validates uploads with `check_jsonl_file`, which collects the first few problems so the user can
fix them all in one go. Both report problems as "<where>: <what is wrong> — <what to do>".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlx_core.errors import LoraforgeError
from mlx_core.tokenizer import ChatMessage

SPLITS = ("train", "valid", "test")
CHAT_ROLES = ("system", "user", "assistant")

_TEXT_KEYS = frozenset({"text"})
_PROMPT_COMPLETION_KEYS = frozenset({"prompt", "completion"})
_CHAT_KEYS = frozenset({"messages"})
_MESSAGE_KEYS = frozenset({"role", "content"})
_FORMATS_HINT = (
    'use one of {"text": ...}, {"prompt": ..., "completion": ...} or '
    '{"messages": [{"role": ..., "content": ...}, ...]}'
)


class DataFormatError(LoraforgeError, ValueError):
    """A training file (or one example in it) is not usable; the message says where and why."""


@dataclass(frozen=True)
class TextExample:
    text: str


@dataclass(frozen=True)
class PromptCompletionExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[ChatMessage, ...]


Example = TextExample | PromptCompletionExample | ChatExample


def format_name(example: Example) -> str:
    """The user-facing name of an example's format: "text", "prompt/completion" or "chat"."""
    if isinstance(example, TextExample):
        return "text"
    if isinstance(example, PromptCompletionExample):
        return "prompt/completion"
    return "chat"


def _type_name(value: object) -> str:
    # JSON names, since that is what the user wrote.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _string_field(obj: dict, key: str, where: str, *, allow_blank: bool) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(
            f'{where}: "{key}" is {_type_name(value)}, not a string — '
            f'write it as a JSON string, e.g. "{key}": "..."'
        )
    if not allow_blank and not value.strip():
        raise DataFormatError(
            f'{where}: "{key}" is empty — give it the text the model should learn, '
            "or delete this line"
        )
    return value


def _parse_messages(value: object, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise DataFormatError(
            f'{where}: "messages" is {got} — give a list of {{"role": ..., "content": ...}} '
            "objects with at least one user and one assistant message"
        )
    messages: list[ChatMessage] = []
    for i, message in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(
                f"{at} is {_type_name(message)} — write each message as "
                '{"role": "user", "content": "..."}'
            )
        unknown = sorted(set(message) - _MESSAGE_KEYS)
        if unknown:
            raise DataFormatError(
                f"{at} has unknown keys {', '.join(map(repr, unknown))} — "
                'a message has only "role" and "content"; remove the others'
            )
        missing = sorted(_MESSAGE_KEYS - set(message))
        if missing:
            raise DataFormatError(
                f"{at} is missing {' and '.join(map(repr, missing))} — "
                'write each message as {"role": "user", "content": "..."}'
            )
        role = message["role"]
        if role not in CHAT_ROLES:
            raise DataFormatError(f"{at} has role {role!r} — use one of {', '.join(CHAT_ROLES)}")
        content = _string_field(message, "content", at, allow_blank=role != "assistant")
        messages.append(ChatMessage(role=role, content=content))

    # The Mistral instruct template has a fixed shape: an optional system message, then
    # user/assistant turns strictly alternating, ending with the reply the model learns.
    start = 1 if messages[0].role == "system" else 0
    for i, message in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message.role != expected:
            where_system = (
                "only the first message may be a system message"
                if message.role == "system"
                else "after an optional first system message, roles must alternate "
                "user, assistant, user, assistant, ..."
            )
            raise DataFormatError(
                f"{where}: messages[{i}] is {message.role!r} where {expected!r} was expected — "
                f"{where_system}"
            )
    if not any(m.role == "assistant" for m in messages):
        raise DataFormatError(
            f"{where}: the conversation has no assistant message — add the reply the model "
            "should learn to give"
        )
    if messages[-1].role != "assistant":
        raise DataFormatError(
            f"{where}: the conversation ends with a {messages[-1].role} message — end it with "
            "the assistant reply the model should learn, or drop the trailing message"
        )
    return tuple(messages)


def parse_example(obj: object, where: str) -> Example:
    """One decoded JSON value -> an Example, or DataFormatError("<where>: ... — ...").

    `where` prefixes every message, e.g. "train.jsonl:12" or "line 12".
    """
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{where}: expected a JSON object, got {_type_name(obj)} — {_FORMATS_HINT}"
        )
    keys = set(obj)
    unknown = sorted(keys - _TEXT_KEYS - _PROMPT_COMPLETION_KEYS - _CHAT_KEYS)
    if unknown:
        raise DataFormatError(
            f"{where}: unknown keys {', '.join(map(repr, unknown))} — remove them; {_FORMATS_HINT}"
        )
    formats = [
        name
        for name, format_keys in (
            ("text", _TEXT_KEYS),
            ("prompt/completion", _PROMPT_COMPLETION_KEYS),
            ("chat", _CHAT_KEYS),
        )
        if keys & format_keys
    ]
    if not formats:
        raise DataFormatError(f"{where}: the object is empty — {_FORMATS_HINT}")
    if len(formats) > 1:
        raise DataFormatError(
            f"{where}: keys {', '.join(map(repr, sorted(keys)))} mix the "
            f"{' and '.join(formats)} formats — keep one format per example; {_FORMATS_HINT}"
        )
    if formats[0] == "text":
        return TextExample(text=_string_field(obj, "text", where, allow_blank=False))
    if formats[0] == "prompt/completion":
        missing = sorted(_PROMPT_COMPLETION_KEYS - keys)
        if missing:
            raise DataFormatError(
                f'{where}: "{missing[0]}" is missing — a prompt/completion example needs both '
                '"prompt" and "completion" (use {"text": ...} for plain text)'
            )
        # An empty prompt is a legitimate unconditional example; an empty completion
        # leaves nothing to learn.
        prompt = _string_field(obj, "prompt", where, allow_blank=True)
        completion = _string_field(obj, "completion", where, allow_blank=False)
        return PromptCompletionExample(prompt=prompt, completion=completion)
    return ChatExample(messages=_parse_messages(obj["messages"], where))


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, decoded line or None if it is not UTF-8), blank lines skipped."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # editors on Windows like to add a byte-order mark
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
                continue
            if line.strip():
                yield number, line


def _parse_line(line: str | None, where: str) -> Example:
    if line is None:
        raise DataFormatError(f"{where}: the line is not valid UTF-8 — save the file as UTF-8 text")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}) — each line must be one "
            "complete JSON object (no pretty-printing across lines); check quotes and escapes"
        ) from None
    return parse_example(obj, where)


def _switch_error(where: str, example: Example, first: Example, first_line: int) -> str:
    return (
        f"{where}: this example uses the {format_name(example)} format but line {first_line} "
        f"uses {format_name(first)} — use one format for the whole file (convert the lines, "
        "or split them into separate files)"
    )


def _empty_file_error(where: str) -> str:
    return (
        f"{where}: the file has no examples — write one JSON object per line, "
        'e.g. {"text": "..."}'
    )


def read_jsonl(path: Path) -> list[Example]:
    """All examples of a JSONL file, or DataFormatError("<file>:<line>: ...") at the first problem.

    Blank lines are skipped; every other line must be an example in the same format as the first.
    """
    path = Path(path)
    examples: list[Example] = []
    first_line = 0
    for number, line in _lines(path):
        where = f"{path}:{number}"
        example = _parse_line(line, where)
        if not examples:
            first_line = number
        elif type(example) is not type(examples[0]):
            raise DataFormatError(_switch_error(where, example, examples[0], first_line))
        examples.append(example)
    if not examples:
        raise DataFormatError(_empty_file_error(str(path)))
    return examples


def check_jsonl_file(path: Path, max_errors: int = 5) -> tuple[int, list[str]]:
    """Validate an uploaded JSONL file without raising for what is in it.

    Returns (number of valid examples, the first `max_errors` problems as "line N: ...").
    The file's format is set by its first valid line; lines in another format count as problems.
    Reading the whole file even after `max_errors` keeps the count of valid examples exact.
    """
    n_valid = 0
    errors: list[str] = []
    first: Example | None = None
    first_line = 0
    n_lines = 0
    for number, line in _lines(Path(path)):
        n_lines += 1
        where = f"line {number}"
        try:
            example = _parse_line(line, where)
            if first is None:
                first, first_line = example, number
            elif type(example) is not type(first):
                raise DataFormatError(_switch_error(where, example, first, first_line))
        except DataFormatError as e:
            if len(errors) < max_errors:
                errors.append(str(e))
            continue
        n_valid += 1
    if n_lines == 0:
        errors.append(_empty_file_error("line 1"))
    return n_valid, errors


def find_split_files(data: Path) -> dict[str, Path]:
    """{"train": .../train.jsonl, ...} for the splits present in folder `data` (any subset).

    Raises FileNotFoundError naming the expected files when the folder or all of them are missing.
    """
    data = Path(data)
    expected = ", ".join(f"{split}.jsonl" for split in SPLITS)
    if not data.is_dir():
        what = "is a file, not a folder" if data.exists() else "does not exist"
        raise FileNotFoundError(
            f"data folder {data} {what} — pass a folder holding {expected} (any of them)"
        )
    found = {split: data / f"{split}.jsonl" for split in SPLITS}
    found = {split: path for split, path in found.items() if path.is_file()}
    if not found:
        raise FileNotFoundError(
            f"no {expected} in {data} — put your training examples in {data / 'train.jsonl'} "
            "(one JSON object per line), and optionally valid.jsonl and test.jsonl next to it"
        )
    return found
