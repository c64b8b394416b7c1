"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info (logic in
server/tokenization.py).

Each is served at the root, where vLLM has them and lm-eval's remote tokenizer calls them (it
strips /v1/completions from its base URL), and under /v1/ with the rest of the API.
"""

from __future__ import annotations

from litestar import get, post
from litestar.params import JSONBody

from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.errors import ServiceUnavailableError
from server.routes.dependencies import Injected
from server.routes.openapi import JSON_BODY, api_errors
from server.schemas.tokenizer import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.tokenization import detokenize, tokenize, tokenizer_info


@post(
    ["/tokenize", "/v1/tokenize"],
    status_code=200,
    tags=["tokenizer"],
    responses=api_errors(*JSON_BODY, 503),
)
async def tokenize_text(
    data: JSONBody[TokenizeRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> TokenizeResponse:
    """Token ids of `prompt` (BOS first unless `add_special_tokens: false`) or of a chat's
    `messages`; the ids /v1/completions and /v1/chat/completions run for them."""
    return await tokenize(data, _require(engine), adapter_registry)


@post(
    ["/detokenize", "/v1/detokenize"],
    status_code=200,
    tags=["tokenizer"],
    responses=api_errors(*JSON_BODY, 503),
)
async def detokenize_tokens(
    data: JSONBody[DetokenizeRequest],
    engine: Injected[EngineClient | None],
    adapter_registry: Injected[AdapterRegistry],
) -> DetokenizeResponse:
    """The text of `tokens`."""
    return await detokenize(data, _require(engine), adapter_registry)


@get(["/tokenizer_info", "/v1/tokenizer_info"], tags=["tokenizer"], responses=api_errors(503))
async def get_tokenizer_info(engine: Injected[EngineClient | None]) -> TokenizerInfo:
    """Special tokens, context length and chat template, as a tokenizer_config.json holds them."""
    return tokenizer_info(_require(engine))


def _require(engine: EngineClient | None) -> EngineClient:
    if engine is None:
        raise ServiceUnavailableError(
            "this server runs without a model, so it has no tokenizer: start it with "
            "`loraforge serve`"
        )
    return engine


route_handlers = [tokenize_text, detokenize_tokens, get_tokenizer_info]
