"""POST /v1/completions and /v1/chat/completions (logic in server/openai_serving.py)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.params import JSONBody
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.openai_serving import chat, complete
from server.routes.dependencies import Injected
from server.routes.openapi import JSON_BODY, StreamingOperation, api_errors
from server.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from server.schemas.completions import CompletionRequest, CompletionResponse

# Both routes answer 404 for an unknown model, 429 when the queue is full, 503 without a model.
COMPLETION_ERRORS = api_errors(*JSON_BODY, 404, 429, 503)


# The handlers return a Stream for `stream: true`: Litestar sends a returned Response as it is,
# so the annotation only has to describe the JSON answer (StreamingOperation adds the SSE one).
@post(
    "/v1/completions",
    status_code=200,
    tags=["completions"],
    responses=COMPLETION_ERRORS,
    operation_class=StreamingOperation,
)
async def create_completion(
    data: JSONBody[CompletionRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> CompletionResponse:
    """OpenAI's legacy completions; `stream: true` answers with server-sent events."""
    return _keep_media_type(await complete(data, _require(engine), adapter_registry))


@post(
    "/v1/chat/completions",
    status_code=200,
    tags=["completions"],
    responses=COMPLETION_ERRORS,
    operation_class=StreamingOperation,
)
async def create_chat_completion(
    data: JSONBody[ChatCompletionRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> ChatCompletionResponse:
    """Chat completions with the Mistral instruct template; `stream: true` answers with SSE."""
    return _keep_media_type(await chat(data, _require(engine), adapter_registry))


class EventStream(Stream):
    """A Stream sent with its own media type. Litestar's Stream lets the route's media type win,
    and these routes' is JSON (for the answer without `stream`), so the server-sent events went
    out as `Content-Type: application/json`, which SSE clients and schema checks refuse."""

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **kwargs: Any
    ) -> ASGIResponse:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(app, request, **kwargs)


def _keep_media_type(answer: Any) -> Any:
    if isinstance(answer, Stream) and not isinstance(answer, EventStream):
        return EventStream(
            answer.iterator,
            background=answer.background,
            cookies=answer.cookies,
            headers=answer.headers,
            media_type=answer.media_type,
            status_code=answer.status_code,
        )
    return answer


def _require(engine: EngineClient | None) -> EngineClient:
    from server.errors import ServiceUnavailableError

    if engine is None:
        raise ServiceUnavailableError(
            "this server runs without a model: start it with `loraforge serve`"
        )
    engine.require_ready()
    return engine


route_handlers = [create_completion, create_chat_completion]
