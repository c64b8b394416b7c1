"""POST /v1/completions and /v1/chat/completions (logic in server/openai_serving.py)."""

from __future__ import annotations

from typing import Any

from litestar import post
from litestar.params import JSONBody

from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.openai_serving import chat, complete
from server.routes.dependencies import Injected
from server.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from server.schemas.completions import CompletionRequest, CompletionResponse


@post("/v1/completions", status_code=200, tags=["completions"])
async def create_completion(
    data: JSONBody[CompletionRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> CompletionResponse | Any:
    """OpenAI's legacy completions; `stream: true` answers with server-sent events."""
    return await complete(data, _require(engine), adapter_registry)


@post("/v1/chat/completions", status_code=200, tags=["completions"])
async def create_chat_completion(
    data: JSONBody[ChatCompletionRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> ChatCompletionResponse | Any:
    """Chat completions with the Mistral instruct template; `stream: true` answers with SSE."""
    return await chat(data, _require(engine), adapter_registry)


def _require(engine: EngineClient | None) -> EngineClient:
    from server.errors import ServiceUnavailableError

    if engine is None:
        raise ServiceUnavailableError(
            "this server runs without a model: start it with `loraforge serve`"
        )
    engine.require_ready()
    return engine


route_handlers = [create_completion, create_chat_completion]
