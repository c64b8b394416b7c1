"""The legacy /v1/fine-tunes API's shapes (old clients still call it)."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from server.schemas.common import RequestBody
from server.schemas.files import FileObject
from server.schemas.fine_tuning import LoraOptions, LoraSettings


class FineTuneCreateRequest(RequestBody):
    training_file: str
    validation_file: str | None = None
    model: str | None = None  # None: the served base model (OpenAI defaulted to "curie")
    n_epochs: int = 4
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    prompt_loss_weight: float = 0.01
    compute_classification_metrics: bool = False
    classification_n_classes: int | None = None
    classification_positive_class: str | None = None
    classification_betas: list[float] | None = None
    suffix: str | None = None
    lora: LoraSettings | None = None

    unsupported = (
        "compute_classification_metrics",
        "classification_n_classes",
        "classification_positive_class",
        "classification_betas",
    )


class FineTuneEvent(Struct, kw_only=True):
    object: Literal["fine-tune-event"] = "fine-tune-event"
    created_at: int
    level: str
    message: str


class FineTuneHyperparams(Struct, kw_only=True):
    n_epochs: int
    batch_size: int | None
    prompt_loss_weight: float
    learning_rate_multiplier: float | None


class FineTune(Struct, kw_only=True):
    id: str  # "ft-..."
    object: Literal["fine-tune"] = "fine-tune"
    model: str
    created_at: int
    updated_at: int
    events: list[FineTuneEvent] = msgspec.field(default_factory=list)
    fine_tuned_model: str | None = None
    hyperparams: FineTuneHyperparams
    organization_id: str = "loraforge"
    result_files: list[FileObject] = msgspec.field(default_factory=list)
    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    validation_files: list[FileObject] = msgspec.field(default_factory=list)
    training_files: list[FileObject]


class FineTuneList(Struct):
    data: list[FineTune]
    object: Literal["list"] = "list"


class FineTuneEventList(Struct):
    data: list[FineTuneEvent]
    object: Literal["list"] = "list"


class FineTuneCreateBody(FineTuneCreateRequest):
    """POST /v1/fine-tunes (legacy) as loraforge decodes it: `lora` takes every LoraOptions field."""

    lora: LoraOptions | None = None
