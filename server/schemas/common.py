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

from typing import ClassVar

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


class BlasStatus(Struct):
    """What fp32 matmuls run on; `slow`: MLX's reference BLAS (a CPU run several times slower)."""

    device: str  # "cpu" or "gpu"
    library: str  # "OpenBLAS", "MLX's reference BLAS", "Accelerate" or "GPU"
    gflops: float  # measured by a small fp32 matmul at startup; 0 on a GPU
    slow: bool


class DatabaseStatus(Struct):
    """The database every replica shares (/ready): "sqlite" or "postgresql", and whether this
    server just reached it."""

    dialect: str
    reachable: bool


class StorageStatus(Struct):
    """The data dir every replica shares (/ready): whether this server just wrote a file there."""

    writable: bool


class HealthStatus(Struct, omit_defaults=True):
    status: str
    blas: BlasStatus | None = None  # /ready: measured when the model loaded
    database: DatabaseStatus | None = None  # /ready
    storage: StorageStatus | None = None  # /ready


# -- /v1/completions ----------------------------------------------------------------------------


# -- /v1/chat/completions -----------------------------------------------------------------------


# -- /v1/models and adapters --------------------------------------------------------------------


# -- /v1/files ----------------------------------------------------------------------------------


# -- /v1/fine_tuning/jobs -----------------------------------------------------------------------


# -- legacy /v1/fine-tunes ----------------------------------------------------------------------


# -- fine-tuning: loraforge's LoRA settings (appended: the Structs above stay as OpenAI has them) --
