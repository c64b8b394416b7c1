"""GET /v1/models, GET /v1/models/{id}, DELETE /v1/models/{id} (fine-tuned models)."""

from __future__ import annotations

from litestar import delete, get
from litestar.params import FromPath

from server.adapters import AdapterInfo, AdapterRegistry
from server.engine_client import EngineClient
from server.errors import BadRequestError, NotFoundError
from server.routes.dependencies import Injected
from server.routes.openapi import api_errors
from server.schemas.files import DeletedObject
from server.schemas.models import ModelCard, ModelList


def _base_card(engine: EngineClient) -> ModelCard:
    model = engine.model  # None while loading: the id is known, the context length not yet
    return ModelCard(
        id=engine.model_id,
        created=engine.started_at,
        root=engine.model_id,
        max_model_len=model.max_model_len if model else None,
    )


def _adapter_card(info: AdapterInfo, engine: EngineClient) -> ModelCard:
    return ModelCard(
        id=info.name,
        created=info.created_at,
        root=engine.model_id,
        parent=engine.model_id,
        owned_by="loraforge",
    )


@get("/v1/models", tags=["models"], responses=api_errors())
async def list_models(
    engine: Injected[EngineClient], adapter_registry: Injected[AdapterRegistry]
) -> ModelList:
    """The base model and every registered adapter (fine-tunes included)."""
    cards = [_base_card(engine)]
    cards += [_adapter_card(a, engine) for a in await adapter_registry.list()]
    return ModelList(cards)


@get("/v1/models/{model_id:path}", tags=["models"], responses=api_errors(404))
async def retrieve_model(
    model_id: FromPath[str],
    engine: Injected[EngineClient],
    adapter_registry: Injected[AdapterRegistry],
) -> ModelCard:
    model_id = model_id.lstrip("/")
    if model_id == engine.model_id:
        return _base_card(engine)
    info = await adapter_registry.get(model_id)
    if info is None:
        raise NotFoundError(
            f"The model `{model_id}` does not exist: GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )
    return _adapter_card(info, engine)


@delete(
    "/v1/models/{model_id:path}", status_code=200, tags=["models"], responses=api_errors(400, 404)
)
async def delete_model(
    model_id: FromPath[str],
    engine: Injected[EngineClient],
    adapter_registry: Injected[AdapterRegistry],
) -> DeletedObject:
    """Delete a fine-tuned model (its adapter); the base model cannot be deleted."""
    model_id = model_id.lstrip("/")
    if model_id == engine.model_id:
        raise BadRequestError("the base model cannot be deleted", param="model")
    info = await adapter_registry.unregister(model_id)
    return DeletedObject(id=info.name, object="model", deleted=True)


route_handlers = [list_models, retrieve_model, delete_model]
