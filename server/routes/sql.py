"""POST /v1/sql: a question and a schema in, SQLite SQL out (logic in server/text_to_sql.py)."""

from __future__ import annotations

from litestar import post
from litestar.params import JSONBody

from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.errors import ServiceUnavailableError
from server.routes.dependencies import Injected
from server.routes.openapi import JSON_BODY, api_errors
from server.schemas.sql import SqlRequest, SqlResponse
from server.text_to_sql import answer_sql


@post("/v1/sql", status_code=200, tags=["sql"], responses=api_errors(*JSON_BODY, 404, 429, 503))
async def create_sql(
    data: JSONBody[SqlRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> SqlResponse:
    """Text-to-SQL for a RAG app: `{model, question, schema}` -> `{sql}` that SQLite runs as it
    is (identifiers quoted, checked to parse). With `constrained` (default) the answer names only
    the schema's tables and columns."""
    if engine is None:
        raise ServiceUnavailableError(
            "this server runs without a model: start it with `loraforge serve`"
        )
    return await answer_sql(data, engine, adapter_registry)


route_handlers = [create_sql]
