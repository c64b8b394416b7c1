"""The request fields that constrain an answer's text: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` aliases. No logic: server/structured_outputs.py
turns them into the engine's Constraint."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from server.schemas.common import RequestBody


class JsonSchemaFormat(RequestBody):
    name: str = "response"
    description: str | None = None
    # `schema` is the wire name; the attribute avoids shadowing anything a Struct might define.
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SqlSchema(RequestBody):
    """loraforge's SQL constraint: WikiSQL notation over one table (`table`, `columns`), or
    SQLite over several (`dialect: "sqlite"`, `tables`)."""

    table: str | None = None
    columns: list[str] | None = None
    dialect: Literal["wikisql", "sqlite"] = "wikisql"
    tables: dict[str, list[str]] | None = None
    # "from_question": string values only as spans of the question's words (WikiSQL's rule).
    values: Literal["any", "from_question"] = "any"


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs`: exactly one of these (`sql` is loraforge's own)."""

    json: str | dict[str, Any] | None = None  # a JSON schema, or a string holding one
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: bool | None = None
    # SQL over the request's schema; "from_prompt" reads the prompt's `table:`/`columns:` lines.
    sql: SqlSchema | Literal["from_prompt"] | None = None
    # JSON without free whitespace (vLLM's name); also applies to response_format's JSON.
    disable_any_whitespace: bool = False


class StructuredOutputFields(RequestBody, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions (at most one may be set)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names, still what many clients send:
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
