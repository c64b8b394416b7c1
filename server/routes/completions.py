"""POST /v1/completions and /v1/chat/completions (logic in server/generation.py)."""

from __future__ import annotations

from typing import Any

from litestar import post
from litestar.params import JSONBody

from server import generation
from server.adapters import AdapterRegistry
from server.routes import Injected
from server.scheduler import EngineService
from server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)


@post("/v1/completions", status_code=200, tags=["completions"])
async def create_completion(
    data: JSONBody[CompletionRequest],
    engine_service: Injected[EngineService],
    adapter_registry: Injected[AdapterRegistry],
) -> CompletionResponse | Any:
    """OpenAI's legacy completions; `stream: true` answers with server-sent events."""
    return await generation.complete(data, _require(engine_service), adapter_registry)


@post("/v1/chat/completions", status_code=200, tags=["completions"])
async def create_chat_completion(
    data: JSONBody[ChatCompletionRequest],
    engine_service: Injected[EngineService],
    adapter_registry: Injected[AdapterRegistry],
) -> ChatCompletionResponse | Any:
    """Chat completions with the Mistral instruct template; `stream: true` answers with SSE."""
    return await generation.chat(data, _require(engine_service), adapter_registry)


def _require(service: EngineService | None) -> EngineService:
    from server.errors import ServiceUnavailableError

    if service is None:
        raise ServiceUnavailableError(
            "this server runs without a model: start it with `loraforge serve`"
        )
    service.require_ready()
    return service


route_handlers = [create_completion, create_chat_completion]
