"""Adapters at runtime: GET/POST /v1/adapters, DELETE /v1/adapters/{name}, and vLLM's
POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from litestar import Request, Response, delete, get, post
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, JSONBody

from server.adapters import AdapterInfo, AdapterRegistry
from server.bodies import JSON, MULTIPART, accepts
from server.engine_client import EngineClient
from server.errors import BadRequestError, decode_body
from server.routes.dependencies import Injected
from server.routes.openapi import JSON_BODY, api_errors
from server.schemas.adapters import (
    AdapterList,
    AdapterObject,
    LoadLoraAdapterRequest,
    RegisterAdapterRequest,
    UnloadLoraAdapterRequest,
)
from server.schemas.files import DeletedObject
from server.settings import Settings
from server.uploads import receive_upload


def adapter_object(info: AdapterInfo, engine: EngineClient | None) -> AdapterObject:
    loaded = engine is not None and engine.is_resident(info.id)
    return AdapterObject(
        id=info.name,
        created_at=info.created_at,
        base_model=info.base_model,
        path=info.path,
        source_format=info.source_format,
        rank=info.rank,
        alpha=info.alpha,
        targets=info.targets,
        size_bytes=info.size_bytes,
        fingerprint=info.fingerprint,
        fine_tuning_job_id=info.fine_tuning_job_id,
        loaded=loaded,
    )


@dataclass
class RegisterAdapterOperation(Operation):
    # The handler reads the body itself (JSON or a multipart upload): describe both.
    def __post_init__(self) -> None:
        text = Schema(type=OpenAPIType.STRING)
        folder = Schema(
            type=OpenAPIType.OBJECT,
            properties={"name": text, "path": text},
            required=["name", "path"],
            additional_properties=False,
        )
        upload = Schema(
            type=OpenAPIType.OBJECT,
            properties={
                "name": text,
                "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
            },
            required=["name", "file"],
        )
        self.request_body = RequestBody(
            content={
                JSON: OpenAPIMediaType(schema=folder),
                MULTIPART: OpenAPIMediaType(schema=upload),
            },
            required=True,
        )


@get("/v1/adapters", tags=["adapters"], responses=api_errors())
async def list_adapters(
    adapter_registry: Injected[AdapterRegistry], engine: Injected[EngineClient | None]
) -> AdapterList:
    return AdapterList([adapter_object(a, engine) for a in await adapter_registry.list()])


@post(
    "/v1/adapters",
    status_code=201,
    tags=["adapters"],
    responses=api_errors(*JSON_BODY, 409),
    opt=accepts(JSON, MULTIPART),
    operation_class=RegisterAdapterOperation,
)
async def register_adapter(
    request: Request,
    settings: Injected[Settings],
    adapter_registry: Injected[AdapterRegistry],
    engine: Injected[EngineClient | None],
) -> AdapterObject:
    """Register an adapter: JSON `{"name", "path"}` (a folder inside the data dir) or a
    multipart upload with fields `name` and `file` (a .tar.gz or .zip of the adapter folder)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        part = settings.adapters_dir / f".upload-{secrets.token_hex(8)}.part"
        try:
            upload = await receive_upload(
                request, part, settings.max_upload_bytes, settings, text_fields=("name",)
            )
            name = upload.fields.get("name")
            if not name:
                raise BadRequestError(
                    "missing form field `name`: the name clients will send as `model`", param="name"
                )
            if upload.filename is None:
                raise BadRequestError(
                    "missing form field `file`: the adapter folder as .tar.gz or .zip", param="file"
                )
            info = await adapter_registry.register_archive(name, part)
        finally:
            part.unlink(missing_ok=True)
    else:
        body = decode_body(await request.body(), RegisterAdapterRequest)
        info = await adapter_registry.register_path(body.name, body.path)
    return adapter_object(info, engine)


@delete("/v1/adapters/{name:str}", status_code=200, tags=["adapters"], responses=api_errors(404))
async def delete_adapter(
    name: FromPath[str], adapter_registry: Injected[AdapterRegistry]
) -> DeletedObject:
    info = await adapter_registry.unregister(name)
    return DeletedObject(id=info.name, object="adapter", deleted=True)


@post(
    "/v1/load_lora_adapter",
    status_code=200,
    tags=["adapters"],
    responses=api_errors(*JSON_BODY, 409),
)
async def load_lora_adapter(
    data: JSONBody[LoadLoraAdapterRequest], adapter_registry: Injected[AdapterRegistry]
) -> Response[str]:
    """vLLM's shape: plain-text success message."""
    await adapter_registry.register_path(
        data.lora_name, data.lora_path, replace=data.load_inplace, param="lora_path"
    )
    return Response(
        f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain"
    )


@post(
    "/v1/unload_lora_adapter",
    status_code=200,
    tags=["adapters"],
    responses=api_errors(*JSON_BODY, 404),
)
async def unload_lora_adapter(
    data: JSONBody[UnloadLoraAdapterRequest], adapter_registry: Injected[AdapterRegistry]
) -> Response[str]:
    await adapter_registry.unregister(data.lora_name)
    return Response(
        f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain"
    )


route_handlers = [
    list_adapters,
    register_adapter,
    delete_adapter,
    load_lora_adapter,
    unload_lora_adapter,
]
