"""/v1/completions: request, response and stream-chunk shapes."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from server.schemas.common import StreamOptions, Usage
from server.schemas.structured import StructuredOutputFields

# msgspec allows one array type per union, so token-id prompts share the list: the route checks
# that a list holds only strings, only ints, or only lists of ints.
Prompt = str | list[str | int | list[int]]


Stop = str | list[str] | None


class CompletionRequest(StructuredOutputFields):
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
    # loraforge's own: heal a prompt that ends inside a token, e.g. "A: " (docs/structured-outputs.md)
    token_healing: bool = True

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
    finish_reason: Literal["stop", "length", "error"] | None = None


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
