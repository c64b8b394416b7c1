"""POST /v1/sql (loraforge's own): a question and a schema in, SQL that SQLite runs out."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from server.schemas.common import RequestBody, Usage


class SqlRequest(RequestBody):
    model: str
    question: str
    # {table: [columns]}, or the `table: ...` / `columns: ...` lines of a text-to-SQL prompt.
    schema: dict[str, list[str]] | str
    dialect: Literal["sqlite", "wikisql"] = "sqlite"
    constrained: bool = True  # answers held to the schema's tables and columns
    # With `constrained`, a one-table answer's string values are spans of the question's words
    # ("from_question", WikiSQL's rule: values are copied from the question) or any text.
    values: Literal["from_question", "any"] = "from_question"
    max_tokens: int = 128


class SqlResponse(Struct, kw_only=True):
    object: Literal["sql"] = "sql"
    model: str
    # SQLite SQL, checked to parse before it is returned; None when the model's answer is not SQL
    # over this schema (possible only with constrained: false, or when it ran out of tokens).
    sql: str | None
    wikisql: str | None  # the model's own WikiSQL-notation answer (single-table schemas)
    finish_reason: Literal["stop", "length"]
    error: str | None = None  # why `sql` is None
    usage: Usage
