"""JSONL training files: the three formats, and the messages a user sees when a line is wrong."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mlx_core.data.formats import (
    ChatExample,
    DataFormatError,
    PromptCompletionExample,
    TextExample,
    check_jsonl_file,
    find_split_files,
    parse_example,
    read_jsonl,
)
from mlx_core.tokenizer import ChatMessage

WIKISQL = Path("/work/shared/data/wikisql")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


def parse_error(obj: object) -> str:
    with pytest.raises(DataFormatError) as info:
        parse_example(obj, "train.jsonl:7")
    message = str(info.value)
    assert message.startswith("train.jsonl:7: "), message
    assert " — " in message, f"no advice in: {message}"
    return message


def test_each_format_parses() -> None:
    assert parse_example({"text": "hi"}, "x") == TextExample("hi")
    assert parse_example({"prompt": "Q:", "completion": " A"}, "x") == PromptCompletionExample(
        "Q:", " A"
    )
    assert parse_example({"prompt": "", "completion": "A"}, "x") == PromptCompletionExample("", "A")
    parsed = parse_example(
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")), "x"
    )
    assert parsed == ChatExample(
        (
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello"),
        )
    )


def test_unknown_keys_are_named() -> None:
    message = parse_error({"text": "hi", "label": 1, "id": 3})
    assert "'id'" in message and "'label'" in message
    message = parse_error(chat(("user", "a"), ("assistant", "b")) | {"tools": []})
    assert "'tools'" in message
    message = parse_error({"messages": [{"role": "user", "content": "a", "name": "bob"}]})
    assert "messages[0]" in message and "'name'" in message


def test_object_must_hold_exactly_one_format() -> None:
    assert "mix the text and prompt/completion formats" in parse_error(
        {"text": "a", "prompt": "b", "completion": "c"}
    )
    assert "empty" in parse_error({})
    assert "got a list" in parse_error(["text", "hi"])
    assert '"completion" is missing' in parse_error({"prompt": "Q"})
    assert '"prompt" is missing' in parse_error({"completion": "A"})


def test_wrong_types_and_empty_text() -> None:
    assert '"text" is a number, not a string' in parse_error({"text": 3})
    assert '"completion" is null' in parse_error({"prompt": "a", "completion": None})
    assert '"text" is empty' in parse_error({"text": "  \n"})
    assert '"completion" is empty' in parse_error({"prompt": "Q", "completion": ""})
    assert '"messages" is an empty list' in parse_error({"messages": []})
    assert '"messages" is a string' in parse_error({"messages": "hi"})
    assert "messages[1] is a string" in parse_error(
        {"messages": [{"role": "user", "content": "a"}, "b"]}
    )
    assert "missing 'content'" in parse_error({"messages": [{"role": "user"}]})


def test_chat_roles_and_turn_order() -> None:
    assert "role 'tool'" in parse_error(chat(("user", "a"), ("tool", "b")))
    assert "no assistant message" in parse_error(chat(("system", "s"), ("user", "a")))
    message = parse_error(chat(("user", "a"), ("user", "b"), ("assistant", "c")))
    assert "messages[1] is 'user' where 'assistant' was expected" in message
    message = parse_error(chat(("assistant", "a"), ("user", "b"), ("assistant", "c")))
    assert "messages[0] is 'assistant' where 'user'" in message
    message = parse_error(chat(("user", "a"), ("system", "b"), ("assistant", "c")))
    assert "only the first message may be a system message" in message
    assert "ends with a user message" in parse_error(
        chat(("user", "a"), ("assistant", "b"), ("user", "c"))
    )
    assert '"content" is empty' in parse_error(chat(("user", "a"), ("assistant", " ")))
    # A user turn may be empty (e.g. "continue"); only the reply must say something.
    assert isinstance(parse_example(chat(("user", ""), ("assistant", "b")), "x"), ChatExample)


def test_read_wikisql_splits() -> None:
    splits = find_split_files(WIKISQL)
    assert set(splits) == {"train", "valid", "test"}
    train = read_jsonl(splits["train"])
    assert len(train) == 1000
    assert all(isinstance(e, TextExample) and "\nA: SELECT" in e.text for e in train)


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", ['{"text": "a"}', "", "   ", '{"text": "b"}'])
    assert read_jsonl(path) == [TextExample("a"), TextExample("b")]


def test_read_jsonl_reports_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", ['{"text": "a"}', "", '{"text": "b",}'])
    with pytest.raises(DataFormatError, match=rf"^{path}:3: invalid JSON .* — each line must"):
        read_jsonl(path)

    path = write_lines(tmp_path / "t.jsonl", ['{"text": "a"}', '{"text": 1}'])
    with pytest.raises(DataFormatError, match=rf"^{path}:2: \"text\" is a number"):
        read_jsonl(path)


def test_read_jsonl_names_the_line_that_switched_format(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            "",
            '{"prompt": "a", "completion": "b"}',
            '{"prompt": "c", "completion": "d"}',
            '{"text": "e"}',
        ],
    )
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(
        f"{path}:4: this example uses the text format but line 2 uses prompt/completion — "
    )


def test_read_jsonl_empty_and_undecodable_files(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataFormatError, match="the file has no examples — write one JSON"):
        read_jsonl(empty)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"^{latin1}:2: the line is not valid UTF-8"):
        read_jsonl(latin1)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert read_jsonl(bom) == [TextExample("a")]


def test_check_jsonl_file_collects_problems_without_raising(tmp_path: Path) -> None:
    lines = (
        ['{"text": "ok"}'] * 3
        + ["not json"]
        + ['{"text": ""}'] * 10
        + ['{"prompt": "p", "completion": "c"}']
    )
    path = write_lines(tmp_path / "upload.jsonl", lines)
    n_valid, errors = check_jsonl_file(path, max_errors=3)
    assert n_valid == 3
    assert len(errors) == 3
    assert errors[0].startswith("line 4: invalid JSON")
    assert errors[1].startswith('line 5: "text" is empty')
    assert errors[2].startswith("line 6: ")

    n_valid, errors = check_jsonl_file(path, max_errors=20)
    assert n_valid == 3 and len(errors) == 12
    assert errors[-1].startswith("line 15: this example uses the prompt/completion format")

    assert check_jsonl_file(WIKISQL / "valid.jsonl") == (100, [])
    n_valid, errors = check_jsonl_file(write_lines(tmp_path / "empty.jsonl", [""]))
    assert n_valid == 0 and "no examples" in errors[0]


def test_check_jsonl_file_is_fast_on_a_few_megabytes(tmp_path: Path) -> None:
    lines = (WIKISQL / "train.jsonl").read_text(encoding="utf-8").splitlines()
    big = tmp_path / "big.jsonl"
    write_lines(big, lines * 12 + [json.dumps({"text": 5})])
    assert big.stat().st_size > 2_000_000
    start = time.perf_counter()
    n_valid, errors = check_jsonl_file(big)
    elapsed = time.perf_counter() - start
    assert n_valid == 12_000 and errors == [
        'line 12001: "text" is a number, not a string — '
        'write it as a JSON string, e.g. "text": "..."'
    ]
    assert elapsed < 3.0, f"validating {big.stat().st_size} bytes took {elapsed:.2f} s"


def test_find_split_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no train.jsonl, valid.jsonl, test.jsonl in"):
        find_split_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist — pass a folder"):
        find_split_files(tmp_path / "missing")
    write_lines(tmp_path / "train.jsonl", ['{"text": "a"}'])
    write_lines(tmp_path / "test.jsonl", ['{"text": "a"}'])
    (tmp_path / "valid.json").write_text("{}")  # wrong extension: not a split
    assert find_split_files(tmp_path) == {
        "train": tmp_path / "train.jsonl",
        "test": tmp_path / "test.jsonl",
    }
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        find_split_files(tmp_path / "train.jsonl")
