"""A request's output constraint, and the llguidance grammar it compiles to (cached by text).

Five kinds, as OpenAI's `response_format` and vLLM's `structured_outputs` name them: a JSON schema,
any JSON object, a regular expression, a choice among strings, and a grammar (Lark, or GBNF as
llama.cpp writes it). Each compiles to a grammar string that `RowMatcher` runs; a spec that cannot
be compiled raises ConstraintError saying what to fix, which the server turns into a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from ..errors import LoraforgeError

if TYPE_CHECKING:  # a TypedDict of the stubs only
    from llguidance._lib import JsonCompileOptions

ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[ConstraintKind, ...] = ("json", "json_object", "regex", "choice", "grammar")

# JSON may be pretty-printed, but only so much blank space fits between two tokens: with unbounded
# whitespace a model can emit newlines until max_tokens (a failure vLLM users hit). 24 characters
# are a newline and the indent of ten nesting levels.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,24}"}
# vLLM's disable_any_whitespace: one layout only, as json.dumps writes it. A model that never saw
# JSON (the demo model) otherwise fills the allowed blank space instead of writing values.
COMPACT_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
COMPILE_CACHE_SIZE = 256  # distinct (kind, text) grammars kept compiled
_MESSAGE_LIMIT = 1500  # characters of llguidance's diagnostics quoted back to the user


class ConstraintError(LoraforgeError, ValueError):
    """A constraint that cannot be compiled; `kind` says which one, the message what to fix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Constraint:
    """What a generated text must match.

    value by kind: "json": a JSON schema (a dict, or a string holding one); "json_object": None;
    "regex": the pattern the whole text must match (Rust regex syntax; \\d means [0-9]);
    "choice": the allowed strings; "grammar": a Lark grammar with a `start` rule (or GBNF).
    compact: JSON kinds only, no free whitespace: `{"a": 1, "b": [1, 2]}` exactly.
    """

    kind: ConstraintKind
    value: str | Mapping[str, Any] | Sequence[str] | None = None
    compact: bool = False

    def key(self) -> tuple[ConstraintKind, str]:
        """(kind, canonical text): equal constraints have equal keys. Raises ConstraintError."""
        kind, value = self.kind, self.value
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ConstraintError(
                        kind, f"the JSON schema is not valid JSON ({err}): send a schema object"
                    ) from None
            if not isinstance(value, Mapping):
                raise ConstraintError(
                    kind, f"a JSON schema must be an object, got {type(value).__name__}"
                )
            return kind, json.dumps(value, sort_keys=True, ensure_ascii=False)
        if kind == "json_object":
            return kind, ""
        if kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value.strip():
                raise ConstraintError(kind, f"the {kind} must be a non-empty string")
            return kind, value
        if kind == "choice":
            if isinstance(value, (str, Mapping)) or value is None:
                raise ConstraintError(kind, "choice must be a list of strings")
            choices = list(value)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise ConstraintError(kind, "choice must be a non-empty list of strings")
            return kind, json.dumps(choices, ensure_ascii=False)
        raise ConstraintError(str(kind), f"unknown constraint kind {kind!r}: use one of {KINDS}")


def compile_grammar(constraint: Constraint) -> str:
    """The llguidance grammar for `constraint`, compiled once per (kind, text) and cached.

    Raises ConstraintError when the schema, regex, choice list or grammar cannot be used.
    """
    return _compile(*constraint.key(), compact=constraint.compact)


def lark_grammar(text: str) -> str:
    """The grammar for a Lark text in llguidance's dialect (cached by text).

    The text needs a `start` rule; it can use "literals", /regexes/, rules with | ? * +, and
    `%json {schema}` for an embedded JSON value (https://github.com/guidance-ai/llguidance,
    docs/syntax.md). The text-to-SQL constraint builds its SQL grammar with this. Raises
    ConstraintError quoting the parser's message (line and column) when the grammar is invalid.
    """
    return _compile("grammar", text, convert=False)


def with_prefix(grammar: str, prefix: str, optional: bool = False) -> str:
    """`grammar` with `prefix` in front: the text must start with prefix (or may, if optional).

    For chat replies pass " ", optional: Mistral writes an answer's first token with a leading
    space, which the chat detokenizer drops. For token healing pass the backed-off text.
    """
    if not prefix:
        return grammar
    return _with_prefix(grammar, prefix, optional)


@lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _with_prefix(grammar: str, prefix: str, optional: bool) -> str:
    try:
        spec = json.loads(grammar)
    except json.JSONDecodeError:  # grammar_from_lark returns the Lark text itself
        spec = {"grammars": [{"lark_grammar": grammar}]}
    body = spec["grammars"][0]
    name = body.setdefault("name", "body")
    literal = json.dumps(prefix, ensure_ascii=False) + ("?" if optional else "")
    top = {"lark_grammar": f"start: {literal} @{name}\n"}
    return json.dumps({**spec, "grammars": [top, *spec["grammars"]]})


@lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _compile(kind: ConstraintKind, text: str, convert: bool = True, compact: bool = False) -> str:
    options = COMPACT_JSON_OPTIONS if compact else JSON_OPTIONS
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=options)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', defaults=options
            )
        elif kind == "regex":
            # \d as [0-9]: llguidance's \d admits every Unicode digit, which int() and older
            # Pythons' re do not all know, and which nobody asking for \d{3} means.
            grammar = llguidance.LLMatcher.grammar_from_lark(
                f"start: /{llguidance.regex_to_lark(text, 'd')}/\n"
            )
        elif kind == "choice":
            choices = json.loads(text)
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
            grammar = llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
        else:
            # "grammar" also takes GBNF (llama.cpp's format), as vLLM's guidance backend does.
            grammar = llguidance.grammar_from("grammar" if convert else "lark", text)
    except ValueError as err:  # not JSON, or GBNF that does not convert
        raise ConstraintError(kind, _message(kind, str(err))) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConstraintError(kind, _message(kind, messages[0]))
    return grammar


def _message(kind: str, detail: str) -> str:
    detail = detail.strip()
    if len(detail) > _MESSAGE_LIMIT:
        detail = detail[:_MESSAGE_LIMIT] + " ..."
    fix = {
        "json": "fix the schema (llguidance supports most of JSON Schema draft 2020-12; "
        "unsupported keywords such as uniqueItems are named above)",
        "json_object": "this is a bug in the server, please report it",
        "regex": "fix the pattern (Rust regex syntax: no look-around, no backreferences)",
        "choice": "send plain strings",
        "grammar": "fix the grammar (Lark syntax with a start rule, or GBNF with a root rule)",
    }[kind]
    what = {
        "json": "the JSON schema",
        "json_object": "the JSON object grammar",
        "regex": "the regex",
        "choice": "the choice list",
        "grammar": "the grammar",
    }[kind]
    return f"{what} cannot be used: {detail}\n{fix}"
