"""/v1/models shapes."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraforge"
    root: str | None = None  # the base model's id (vLLM's field)
    parent: str | None = None  # for an adapter or fine-tune: the model it adapts
    max_model_len: int | None = None


class ModelList(Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"
