"""The OpenAI API's request, response, stream-chunk and error shapes as msgspec Structs. No logic.

Requests forbid unknown fields, so a typo or a field loraforge does not know is a 400 naming it
rather than silently ignored. Fields the OpenAI API defines but loraforge cannot honour are still
declared (else the client would get "unrecognized argument" for a real OpenAI field); each
request lists them in `unsupported`, and the route answers "X is not supported by loraforge:
remove it" when one is set. `accepted_and_ignored` lists fields that change nothing here (e.g.
`store`, `metadata`) and are accepted so existing clients keep working.

Nullable fields default to None; a JSON null for a non-nullable field such as `temperature` is a
400 naming the field (OpenAI's meaning of null for those is "the default": omit the field).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec
from msgspec import Struct

# -- shared -------------------------------------------------------------------------------------


class RequestBody(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are refused by name (msgspec reports the field)."""

    unsupported: ClassVar[tuple[str, ...]] = ()
    accepted_and_ignored: ClassVar[tuple[str, ...]] = ()


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Struct):
    error: ErrorDetail


class PromptTokensDetails(Struct):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(RequestBody):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels; moot on localhost
    accepted_and_ignored = ("include_obfuscation",)


class HealthStatus(Struct):
    status: str


# -- /v1/completions ----------------------------------------------------------------------------

# msgspec allows one array type per union, so token-id prompts share the list: the route checks
# that a list holds only strings, only ints, or only lists of ints.
Prompt = str | list[str | int | list[int]]
Stop = str | list[str] | None


class CompletionRequest(RequestBody):
    model: str
    prompt: Prompt
    max_tokens: int | None = 16  # None: up to the model's context limit
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None  # only None or the same as n is meaningful here
    # vLLM's extension: keep generating past EOS (benchmarks with random weights use it).
    ignore_eos: bool = False

    unsupported = ("suffix", "best_of")
    accepted_and_ignored = ("user",)


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(Struct, kw_only=True):
    """One SSE `data:` line of a streamed completion (OpenAI uses the same object name)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- /v1/chat/completions -----------------------------------------------------------------------


class ChatContentPart(RequestBody):
    """A part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None
    image_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    refusal: str | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None

    unsupported = ("tool_calls", "tool_call_id", "function_call", "audio")
    accepted_and_ignored = ("name", "refusal")


class ChatCompletionRequest(RequestBody):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: up to the model's context limit
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    user: str | None = None
    # Declared so they are refused with a clear message rather than "unrecognized":
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted; they change nothing on a local server:
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    verbosity: str | None = None

    unsupported = (
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
    )
    accepted_and_ignored = (
        "user",
        "store",
        "metadata",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "verbosity",
    )


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(Struct):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: str | None = None


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    # omit_defaults: a delta carries only what is new (role once, then content pieces).
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- /v1/models and adapters --------------------------------------------------------------------


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


# -- /v1/files ----------------------------------------------------------------------------------


class FileObject(Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(Struct, kw_only=True):
    data: list[FileObject]
    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedObject(Struct):
    """OpenAI's answer to a DELETE: `{"id", "object": "file" | "model" | ..., "deleted"}`."""

    id: str
    object: str
    deleted: bool = True


# -- /v1/fine_tuning/jobs -----------------------------------------------------------------------

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
    lora: LoraSettings | None = None


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


# -- legacy /v1/fine-tunes ----------------------------------------------------------------------


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


# -- fine-tuning: loraforge's LoRA settings (appended: the Structs above stay as OpenAI has them) --


class LoraOptions(LoraSettings):
    """A job's `lora` object: the adapter's shape plus how examples are read. Everything has a
    default, so `{"rank": 16}` alone is a complete request."""

    max_seq_len: int = 2048  # longest example in tokens; longer prompts are cut from the left
    quantize: Literal[4, 8] | None = None  # QLoRA: train over a 4- or 8-bit copy of the base
    mask_prompt: bool = False  # learn only completions / assistant replies
    completion_after: str | None = None  # where a {"text": ...} example's answer starts, e.g. "A:"


class FineTuningJobCreateBody(FineTuningJobCreateRequest):
    """POST /v1/fine_tuning/jobs as loraforge decodes it: `lora` takes every LoraOptions field."""

    lora: LoraOptions | None = None


class FineTuneCreateBody(FineTuneCreateRequest):
    """POST /v1/fine-tunes (legacy) as loraforge decodes it: `lora` takes every LoraOptions field."""

    lora: LoraOptions | None = None
