"""/v1/fine_tuning/jobs shapes, and loraforge's LoRA settings appended to OpenAI's."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from server.schemas.common import RequestBody

Auto = Literal["auto"]


class Hyperparameters(RequestBody):
    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"


class LoraSettings(RequestBody):
    """loraforge's extension (`extra_body={"lora": {...}}` from the openai SDK)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # None: the engine's default projections
    num_layers: int | None = None  # adapt the last N layers; None: all


class SupervisedMethod(RequestBody):
    hyperparameters: Hyperparameters | None = None


class FineTuneMethod(RequestBody):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None

    unsupported = ("dpo", "reinforcement")


class FineTuningJobCreateRequest(RequestBody):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = None
    seed: int | None = None
    lora: LoraSettings | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None

    unsupported = ("integrations",)
    accepted_and_ignored = ("metadata",)


class FineTuningJobError(Struct):
    code: str
    message: str
    param: str | None = None


class FineTuningJobObject(Struct, kw_only=True):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningJobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str = "loraforge"
    result_files: list[str] = msgspec.field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = None
    lora: LoraOptions | None = None  # as the job runs: every option, defaults filled in


class FineTuningJobList(Struct):
    data: list[FineTuningJobObject]
    has_more: bool = False
    object: Literal["list"] = "list"


class FineTuningJobEvent(Struct, kw_only=True):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] | None = "message"


class FineTuningJobEventList(Struct):
    data: list[FineTuningJobEvent]
    has_more: bool = False
    object: Literal["list"] = "list"


class CheckpointMetrics(Struct, omit_defaults=True):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(Struct, kw_only=True):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(Struct, kw_only=True):
    data: list[FineTuningJobCheckpoint]
    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class LoraOptions(LoraSettings):
    """A job's `lora` object: the adapter's shape plus how examples are read. Everything has a
    default, so `{"rank": 16}` alone is a complete request."""

    max_seq_len: int = 2048  # longest example in tokens; longer prompts are cut from the left
    quantize: Literal[4, 8] | None = None  # QLoRA: train over a 4- or 8-bit copy of the base
    # Learn only completions / assistant replies. Unset: yes for prompt/completion and chat
    # data, and for text data with `completion_after`; no for other text data.
    mask_prompt: bool | None = None
    completion_after: str | None = None  # where a {"text": ...} example's answer starts, e.g. "A:"


class FineTuningJobCreateBody(FineTuningJobCreateRequest):
    """POST /v1/fine_tuning/jobs as loraforge decodes it: `lora` takes every LoraOptions field."""

    lora: LoraOptions | None = None
