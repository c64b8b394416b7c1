"""OpenAI completion and chat requests -> engine requests -> OpenAI responses and SSE chunks.

The routes stay thin: they call `complete()` / `chat()` here with the decoded request body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.to_thread
import msgspec
from litestar.response import Stream

from mlx_core.engine import GenerationOutput, GenerationRequest, TokenLogprob
from mlx_core.sampling import MAX_SEED, SamplingParams
from mlx_core.tokenizer import ChatMessage as EngineChatMessage
from mlx_core.tokenizer import Tokenizer
from server.adapters import AdapterRegistry
from server.engine_client import EngineClient
from server.errors import APIError, BadRequestError
from server.schemas.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
)
from server.schemas.common import ErrorBody, ErrorDetail, PromptTokensDetails, RequestBody, Usage
from server.schemas.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.structured_outputs import requested_constraint

log = logging.getLogger("loraforge.serving")

MAX_N = 128
MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
_encoder = msgspec.json.Encoder()
# Tokenizing a large prompt takes seconds: it runs in worker threads, a few at a time, so the
# event loop (and /health) keeps answering and the other thread users keep their threads.
_TOKENIZERS = anyio.CapacityLimiter(4)
FinishReason = Literal["stop", "length", "error"]
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "error": "error"}


def _finish_reason(reason: str | None) -> FinishReason | None:
    """OpenAI's finish_reason for an engine row's ("abort" only reaches a client that left)."""
    return _FINISH_REASONS.get(reason) if reason else None


def reject_unsupported(body: RequestBody) -> None:
    """400 naming the first OpenAI field set that loraforge cannot honour."""
    for name in body.unsupported:
        value = getattr(body, name)
        if value is None or value is False or value == []:
            continue
        if name == "best_of" and value == getattr(body, "n", 1):
            continue
        if name == "response_format" and value == {"type": "text"}:
            continue
        if name == "modalities" and value == ["text"]:
            continue
        raise BadRequestError(
            f"`{name}` is not supported by loraforge: remove it from the request",
            param=name,
            code="unsupported_parameter",
        )


def _check_common(
    n: int,
    temperature: float,
    top_p: float,
    stop,
    presence: float,
    frequency: float,
    logit_bias: dict[str, float] | None,
    vocab: int,
    seed: int | None,
) -> tuple[tuple[str, ...], tuple]:
    if not 1 <= n <= MAX_N:
        raise BadRequestError(f"n must be between 1 and {MAX_N}", param="n")
    # Choice j is sampled with seed + j: every one of them must be a valid 64-bit seed.
    if seed is not None and not 0 <= seed <= MAX_SEED - (n - 1):
        raise BadRequestError(
            f"seed must be between 0 and {MAX_SEED - (n - 1)} (with n={n}, choice j uses seed + j)",
            param="seed",
        )
    if not 0 <= temperature <= 2:
        raise BadRequestError("temperature must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise BadRequestError("top_p must be greater than 0 and at most 1", param="top_p")
    for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2 <= v <= 2:
            raise BadRequestError(f"{name} must be between -2 and 2", param=name)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS:
        raise BadRequestError(f"at most {MAX_STOPS} stop sequences are allowed", param="stop")
    bias = []
    for key, value in (logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise BadRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not 0 <= token < vocab:
            raise BadRequestError(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise BadRequestError(
                "logit_bias values must be between -100 and 100", param="logit_bias"
            )
        bias.append((token, float(value)))
    return stops, tuple(bias)


def _max_tokens(requested: int | None, prompt_len: int, limit: int, param: str) -> int:
    if requested is None:
        return max(1, limit - prompt_len)
    if requested < 1:
        raise BadRequestError(f"{param} must be at least 1", param=param)
    return requested


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


# -- completions ----------------------------------------------------------------------------------
def _prompts(req: CompletionRequest, tok: Tokenizer) -> list[tuple[list[int], str]]:
    """Each prompt as (token ids, text to echo)."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    elif all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
        items = list(p)
    else:
        raise BadRequestError(
            "prompt mixes strings, token ids and lists: send a string, a list of strings, a "
            "list of token ids or a list of token-id lists",
            param="prompt",
        )
    if not items:
        raise BadRequestError(
            "prompt is empty: send a string, a list of strings or token ids", param="prompt"
        )
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((tok.encode(item), item))
        else:
            ids = list(item)
            if not ids:
                raise BadRequestError("a token-id prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < tok.vocab_size]
            if bad:
                raise BadRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})",
                    param="prompt",
                )
            out.append((ids, tok.decode(ids)))
    return out


async def complete(req: CompletionRequest, engine: EngineClient, registry: AdapterRegistry):
    reject_unsupported(req)
    structured = requested_constraint(req)
    model = engine.require_ready()
    tok = engine.tokenizer
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise BadRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
    stops, bias = _check_common(
        req.n,
        req.temperature,
        req.top_p,
        req.stop,
        req.presence_penalty,
        req.frequency_penalty,
        req.logit_bias,
        tok.vocab_size,
        req.seed,
    )
    adapter = await registry.resolve(req.model, model.id)
    adapter_id = adapter.id if adapter else None
    prompts = await anyio.to_thread.run_sync(_prompts, req, tok, limiter=_TOKENIZERS)
    limit = model.max_model_len
    requests, echoes = [], []
    rid = engine.new_request_id("cmpl")
    for i, (ids, text) in enumerate(prompts):
        for j in range(req.n):
            params = SamplingParams(
                max_tokens=_max_tokens(req.max_tokens, len(ids), limit, "max_tokens"),
                temperature=req.temperature,
                top_p=req.top_p,
                seed=None if req.seed is None else req.seed + j,
                stop=stops,
                logprobs=req.logprobs,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias=bias,
                ignore_eos=req.ignore_eos,
            )
            requests.append(
                GenerationRequest(
                    f"{rid}-{i}-{j}",
                    ids,
                    params,
                    adapter_id,
                    constraint=structured.constraint,
                    token_healing=req.token_healing,
                )
            )
            echoes.append(text if req.echo else "")
    prompt_scores: dict[int, tuple[list[int], list[TokenLogprob | None]]] = {}
    if req.echo and req.logprobs is not None:
        for i, (ids, _) in enumerate(prompts):
            prompt_scores[i] = (ids, await engine.score_prompt(ids, req.logprobs, adapter_id))
    with structured.errors():
        outputs = engine.generate(requests)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(
            _completion_chunks(
                outputs, rid, created, req, tok, echoes, prompt_scores, include_usage, len(prompts)
            )
        )
    choices = [_Choice() for _ in requests]
    async for idx, out in outputs:
        _collect(choices[idx], out)
    result = []
    for idx, c in enumerate(choices):
        lp = None
        if req.logprobs is not None:
            ids, scored = prompt_scores.get(idx // req.n, ([], []))
            lp = _completion_logprobs(tok, ids, scored, c.logprobs, req.logprobs)
        result.append(
            CompletionChoice(idx, echoes[idx] + "".join(c.text), lp, _finish_reason(c.finish))
        )
    return CompletionResponse(
        id=rid, created=created, model=req.model, choices=result, usage=_usage(choices, req.n)
    )


def _collect(c: _Choice, out: GenerationOutput) -> None:
    c.text.append(out.text)
    if out.logprobs:
        c.logprobs.extend(out.logprobs)
    c.finish = out.finish_reason or c.finish
    c.completion_tokens = out.completion_tokens
    c.prompt_tokens = out.prompt_tokens
    c.cached_tokens = out.cached_tokens


def _usage(choices: Sequence[_Choice], n: int) -> Usage:
    # The prompt is counted once per prompt, not once per choice (as OpenAI bills it).
    prompt = sum(c.prompt_tokens for i, c in enumerate(choices) if i % n == 0)
    cached = sum(c.cached_tokens for i, c in enumerate(choices) if i % n == 0)
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def _completion_logprobs(
    tok: Tokenizer,
    prompt: Sequence[int],
    scored: Sequence[TokenLogprob | None],
    generated: Sequence[TokenLogprob],
    k: int,
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object; with echo, the prompt's tokens come first (BOS left out:
    it is not part of the echoed text)."""
    entries: list[tuple[int, float | None, list]] = []
    for tid, lp in zip(prompt, scored):
        if tid == tok.bos_id:
            continue
        entries.append((tid, lp.logprob if lp else None, lp.top if lp else []))
    entries += [(lp.token, lp.logprob, lp.top) for lp in generated]
    tokens, values, tops, offsets = [], [], [], []
    offset = 0
    for tid, value, top in entries:
        text = tok.token_text(tid)
        tokens.append(text)
        values.append(value)
        tops.append({tok.token_text(t): v for t, v in top[:k]} if k else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens, values, tops, offsets)


async def _completion_chunks(
    outputs: AsyncIterator,
    rid: str,
    created: int,
    req: CompletionRequest,
    tok: Tokenizer,
    echoes: list[str],
    prompt_scores,
    include_usage: bool,
    n_prompts: int,
) -> AsyncGenerator[bytes, None]:
    choices = [_Choice() for _ in echoes]
    started = [False] * len(echoes)
    async for idx, out in outputs:
        c = choices[idx]
        _collect(c, out)
        text = out.text
        lp = None
        if not started[idx]:
            started[idx] = True
            text = echoes[idx] + text
        if req.logprobs is not None and (out.logprobs or text):
            # The prompt's logprobs go out once, with the first chunk of the choice.
            first = len(c.logprobs) == len(out.logprobs or [])
            ids, scored = prompt_scores.get(idx // req.n, ([], [])) if first else ([], [])
            lp = _completion_logprobs(tok, ids, scored, out.logprobs or [], req.logprobs)
        if not text and lp is None and not out.finish_reason:
            continue
        chunk = CompletionChunk(
            id=rid,
            created=created,
            model=req.model,
            choices=[CompletionChoice(idx, text, lp, _finish_reason(out.finish_reason))],
        )
        yield _event(chunk)
    if include_usage:
        yield _event(
            CompletionChunk(
                id=rid, created=created, model=req.model, choices=[], usage=_usage(choices, req.n)
            )
        )


# -- chat -----------------------------------------------------------------------------------------
def _chat_messages(req: ChatCompletionRequest) -> list[EngineChatMessage]:
    out = []
    for i, m in enumerate(req.messages):
        reject_unsupported(m)
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise BadRequestError(
                f"messages[{i}]: role {m.role!r} is not supported (tools are not): "
                "use system, user or assistant",
                param=f"messages[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise BadRequestError(
                        f"messages[{i}]: content of type {part.type!r} is not supported: send text",
                        param=f"messages[{i}].content",
                    )
                parts.append(part.text)
            content = "".join(parts)
        if content is None:
            raise BadRequestError(f"messages[{i}] has no content", param=f"messages[{i}].content")
        out.append(EngineChatMessage(role, content))
    return out


async def chat(req: ChatCompletionRequest, engine: EngineClient, registry: AdapterRegistry):
    reject_unsupported(req)
    structured = requested_constraint(req)
    model = engine.require_ready()
    tok = engine.tokenizer
    top = None
    if req.logprobs:
        top = req.top_logprobs or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequestError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
            )
    elif req.top_logprobs is not None:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    stops, bias = _check_common(
        req.n,
        req.temperature,
        req.top_p,
        req.stop,
        req.presence_penalty,
        req.frequency_penalty,
        req.logit_bias,
        tok.vocab_size,
        req.seed,
    )
    if not req.messages:
        raise BadRequestError("messages is empty: send at least one user message", param="messages")
    try:
        messages = _chat_messages(req)
        ids = await anyio.to_thread.run_sync(tok.encode_chat, messages, limiter=_TOKENIZERS)
    except ValueError as e:
        raise BadRequestError(str(e), param="messages") from e
    adapter = await registry.resolve(req.model, model.id)
    adapter_id = adapter.id if adapter else None
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(requested, len(ids), model.max_model_len, param)
    rid = engine.new_request_id("chatcmpl")
    requests = [
        GenerationRequest(
            f"{rid}-{j}",
            ids,
            SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=None if req.seed is None else req.seed + j,
                stop=stops,
                logprobs=top,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias=bias,
            ),
            adapter_id,
            chat=True,
            constraint=structured.constraint,
        )
        for j in range(req.n)
    ]
    with structured.errors():
        outputs = engine.generate(requests)
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_chat_chunks(outputs, rid, created, req, tok, include_usage))
    choices = [_Choice() for _ in requests]
    async for idx, out in outputs:
        _collect(choices[idx], out)
    result = [
        ChatChoice(
            i,
            ChatResponseMessage("".join(c.text)),
            _chat_logprobs(tok, c.logprobs, top) if top is not None else None,
            _finish_reason(c.finish),
        )
        for i, c in enumerate(choices)
    ]
    usage = _usage(choices[:1], 1)
    usage.completion_tokens = sum(c.completion_tokens for c in choices)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return ChatCompletionResponse(
        id=rid, created=created, model=req.model, choices=result, usage=usage
    )


def _chat_logprobs(tok: Tokenizer, lps: Sequence[TokenLogprob], k: int) -> ChatLogprobs:
    content = []
    for lp in lps:
        top = [TopLogprob(tok.token_text(t), v, list(tok.token_bytes(t))) for t, v in lp.top[:k]]
        content.append(
            ChatTokenLogprob(
                tok.token_text(lp.token), lp.logprob, list(tok.token_bytes(lp.token)), top
            )
        )
    return ChatLogprobs(content=content)


async def _chat_chunks(
    outputs: AsyncIterator,
    rid: str,
    created: int,
    req: ChatCompletionRequest,
    tok: Tokenizer,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    n = req.n
    for j in range(n):  # OpenAI opens every choice with the role
        yield _event(
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=req.model,
                choices=[ChatChunkChoice(j, ChatDelta(role="assistant", content=""))],
            )
        )
    choices = [_Choice() for _ in range(n)]
    top = (req.top_logprobs or 0) if req.logprobs else None
    async for idx, out in outputs:
        _collect(choices[idx], out)
        lp = _chat_logprobs(tok, out.logprobs, top) if top is not None and out.logprobs else None
        if not out.text and not out.finish_reason and lp is None:
            continue
        delta = ChatDelta(content=out.text) if out.text else ChatDelta()
        yield _event(
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=req.model,
                choices=[ChatChunkChoice(idx, delta, lp, _finish_reason(out.finish_reason))],
            )
        )
    if include_usage:
        usage = _usage(choices[:1], 1)
        usage.completion_tokens = sum(c.completion_tokens for c in choices)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield _event(
            ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage)
        )


# -- server-sent events ---------------------------------------------------------------------------
def _event(obj) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


def _sse(chunks: AsyncGenerator[bytes, None]) -> Stream:
    """The stream's events, then `data: [DONE]`. A failure after the headers went out (a row
    the engine ended with an error, or the shutdown grace running out) becomes an OpenAI error
    event before [DONE], so a client can tell a cut answer from a finished one."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            err = e if isinstance(e, APIError) else None
            if err is None:  # the client gets a generic message; the log keeps the traceback
                log.exception("a stream failed after its headers were sent")
            detail = ErrorDetail(
                err.message if err else "generation failed; retry the request",
                err.type if err else "server_error",
                err.param if err else None,
                err.code if err else None,
            )
            yield _event(ErrorBody(detail))
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"

    return Stream(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
