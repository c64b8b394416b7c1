"""POST /v1/sql: one question over a schema -> SQL a RAG app can run as it is.

The default model (and a fine-tune of it) writes WikiSQL notation after a
`table: / columns: / Q: / A:` prompt; this turns that answer into SQLite with quoted identifiers
(`mlx_core.eval.wikisql.to_sqlite`) and checks it parses (sqlglot) before returning it. With
`constrained` (the default) the answer is held to the schema by the SQL grammar of
`mlx_core.structured.sql`, so it always names real tables and columns. Several tables ask for
SQLite directly, under the multi-table grammar.
"""

from __future__ import annotations

import sqlglot
from sqlglot.errors import ParseError

from mlx_core.engine import GenerationRequest
from mlx_core.eval.wikisql import SqlParseError, parse_query, to_sqlite
from mlx_core.sampling import SamplingParams
from mlx_core.structured import ConstraintError
from mlx_core.structured.sql import TableSchema, schema_from_prompt
from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.errors import BadRequestError
from server.schemas.common import PromptTokensDetails, Usage
from server.schemas.sql import SqlRequest, SqlResponse
from server.schemas.structured import SqlSchema
from server.structured_outputs import sql_constraint

MAX_SQL_TOKENS = 512


def _tables(req: SqlRequest) -> dict[str, list[str]]:
    if isinstance(req.schema, str):
        try:
            found = schema_from_prompt(req.schema)
        except ValueError as e:
            raise BadRequestError(str(e), param="schema") from None
        return {found.table: list(found.columns)}
    if not req.schema:
        raise BadRequestError('schema is empty: send {"table": ["column", ...]}', param="schema")
    for table, columns in req.schema.items():
        if not table.strip() or not columns or not all(c.strip() for c in columns):
            raise BadRequestError(
                f"schema table {table!r} needs a name and at least one non-empty column",
                param="schema",
            )
        if any("\n" in name or "," in name for name in [table, *columns]):
            raise BadRequestError(
                f"schema table {table!r}: names may not hold line breaks or commas (they "
                "separate the prompt's lines and columns)",
                param="schema",
            )
    return req.schema


def _prompt(tables: dict[str, list[str]], question: str) -> str:
    """The prompt the default model was trained on (one table), or its multi-table cousin."""
    if len(tables) == 1:
        ((table, columns),) = tables.items()
        return f"table: {table}\ncolumns: {', '.join(columns)}\nQ: {question}\nA:"
    lines = [f"table: {t}\ncolumns: {', '.join(cs)}" for t, cs in tables.items()]
    return "\n".join(lines) + f"\nQ: {question}\nA:"


async def answer_sql(
    req: SqlRequest, engine: EngineClient, registry: AdapterRegistry
) -> SqlResponse:
    """Generate (greedy) and convert; a 400 for a bad schema, never for a bad answer."""
    if not req.question.strip() or "\n" in req.question:
        raise BadRequestError("question must be one non-empty line", param="question")
    if not 1 <= req.max_tokens <= MAX_SQL_TOKENS:
        raise BadRequestError(
            f"max_tokens must be between 1 and {MAX_SQL_TOKENS}", param="max_tokens"
        )
    tables = _tables(req)
    single = len(tables) == 1
    if req.dialect == "wikisql" and not single:
        raise BadRequestError(
            'dialect "wikisql" describes one table: send one, or dialect "sqlite"',
            param="dialect",
        )
    model = engine.require_ready()
    adapter = await registry.resolve(req.model, model.id)
    prompt = _prompt(tables, req.question)
    constraint = None
    if req.constrained:  # the same grammar as `structured_outputs.sql` builds for this schema
        if single:
            table, columns = next(iter(tables.items()))
            spec = SqlSchema(table=table, columns=columns, values=req.values)
        else:
            spec = SqlSchema(dialect="sqlite", tables=tables)
        try:
            constraint = sql_constraint(spec, prompt)
        except ConstraintError as e:
            raise BadRequestError(str(e), param="schema") from None
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, stop=("\n",))
    request = GenerationRequest(
        engine.new_request_id("sql"),
        ids,
        params,
        adapter.id if adapter else None,
        constraint=constraint,
        token_healing=True,
    )
    text: list[str] = []
    finish, prompt_tokens, completion_tokens, cached = "length", len(ids), 0, 0
    async for _, out in engine.generate([request]):
        text.append(out.text)
        finish = out.finish_reason or finish
        prompt_tokens, completion_tokens = out.prompt_tokens, out.completion_tokens
        cached = out.cached_tokens
    raw = "".join(text).strip()
    usage = Usage(
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
        PromptTokensDetails(cached),
    )
    sql, wikisql, error = _convert(raw, tables, single)
    return SqlResponse(
        model=req.model,
        sql=sql,
        wikisql=wikisql,
        finish_reason="stop" if finish == "stop" else "length",
        error=error,
        usage=usage,
    )


def _convert(
    raw: str, tables: dict[str, list[str]], single: bool
) -> tuple[str | None, str | None, str | None]:
    """(SQLite SQL, WikiSQL notation, error): the SQL only once it parses as SQLite."""
    wikisql = None
    if single:
        table, columns = next(iter(tables.items()))
        schema = TableSchema(table, tuple(columns))
        wikisql = raw
        try:
            sql = to_sqlite(parse_query(raw, schema.columns, schema.table))
        except SqlParseError as e:
            return None, wikisql, f"the model's answer is not SQL over this table: {e}"
    else:
        sql = raw.rstrip(";")
    try:
        sqlglot.parse_one(sql, read="sqlite")
    except ParseError as e:
        return None, wikisql, f"the model's answer does not parse as SQLite: {e}"
    return sql, wikisql, None
