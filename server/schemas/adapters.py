"""/v1/adapters and vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter shapes."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from server.schemas.common import RequestBody


class AdapterObject(Struct, kw_only=True):
    id: str  # the name clients send as `model`
    object: Literal["adapter"] = "adapter"
    created_at: int
    base_model: str
    path: str
    source_format: str
    rank: int
    alpha: float
    targets: list[str]
    size_bytes: int
    fingerprint: str
    fine_tuning_job_id: str | None = None
    loaded: bool = False


class AdapterList(Struct):
    data: list[AdapterObject]
    object: Literal["list"] = "list"


class RegisterAdapterRequest(RequestBody):
    """POST /v1/adapters with JSON: register the adapter folder at `path` as `name`."""

    name: str
    path: str


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter of the same name


class UnloadLoraAdapterRequest(RequestBody):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: str
    lora_int_id: int | None = None

    accepted_and_ignored = ("lora_int_id",)
