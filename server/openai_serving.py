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
    ChatMessage,
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


def _max_tokens(
    requested: int | None, prompt_len: int, limit: int, param: str, echo: bool = False
) -> int:
    if requested is None:
        return max(1, limit - prompt_len)
    if requested == 0 and echo:  # scoring the prompt (lm-eval's loglikelihood, as vLLM allows)
        return 0
    if requested < 1:
        hint = " (0 only with echo: true, to score the prompt)" if param == "max_tokens" else ""
        raise BadRequestError(f"{param} must be at least 1{hint}", param=param)
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
@dataclass
class _Prompt:
    """One prompt as the model runs it and as the client sent it."""

    ids: list[int]  # what the model runs: BOS first, always
    # ids[sent_from:] are the client's tokens, the ones echo returns: 1 where BOS was added here
    # (text, or token ids without it), 0 where the client's ids start with it.
    sent_from: int
    text: str  # what echo returns: the string as sent, or the text of the token ids


def _prompts(req: CompletionRequest, tok: Tokenizer) -> list[_Prompt]:
    """Each prompt with BOS in front: a text prompt is encoded as the model was trained (BOS,
    then the text's tokens); a token-id prompt gets BOS unless its first id is BOS, so the same
    text scores the same sent either way (lm-eval's tokenized_requests True or False)."""
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
            if not item:
                raise BadRequestError(
                    "a prompt is the empty string: send some text, or the token ids [1] (BOS "
                    "alone) to generate from nothing",
                    param="prompt",
                )
            out.append(_Prompt(tok.encode(item), 1, item))
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
            if ids[0] == tok.bos_id:
                out.append(_Prompt(ids, 0, tok.decode(ids)))
            else:
                out.append(_Prompt([tok.bos_id, *ids], 1, tok.decode(ids)))
    return out


async def complete(req: CompletionRequest, engine: EngineClient, registry: AdapterRegistry):
    reject_unsupported(req)
    structured = requested_constraint(req, req.prompt if isinstance(req.prompt, str) else None)
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
    for i, prompt in enumerate(prompts):
        max_tokens = _max_tokens(req.max_tokens, len(prompt.ids), limit, "max_tokens", req.echo)
        if len(prompt.ids) > limit:  # the engine checks this, but max_tokens 0 never reaches it
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {len(prompt.ids)} tokens. Please reduce the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        for j in range(req.n):
            params = SamplingParams(
                max_tokens=max_tokens,
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
                    prompt.ids,
                    params,
                    adapter_id,
                    constraint=structured.constraint,
                    token_healing=req.token_healing,
                )
            )
            echoes.append(prompt.text if req.echo else "")
    scored: list[list[TokenLogprob | None]] = []
    if req.echo and req.logprobs is not None:
        for prompt in prompts:
            scored.append(await engine.score_prompt(prompt.ids, req.logprobs, adapter_id))
    outputs: AsyncIterator[tuple[int, GenerationOutput]]
    if req.max_tokens == 0:  # echo only (checked above): nothing to generate
        outputs = _prompt_only(requests)
    else:
        with structured.errors():
            outputs = engine.generate(requests)
    logprobs = []
    if req.logprobs is not None:
        for idx in range(len(requests)):
            prompt = prompts[idx // req.n]
            prompt_lps = scored[idx // req.n] if scored else None
            logprobs.append(_LogprobsBuilder(tok, req.logprobs, prompt, prompt_lps, echoes[idx]))
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_completion_chunks(outputs, rid, created, req, echoes, logprobs, include_usage))
    choices = [_Choice() for _ in requests]
    async for idx, out in outputs:
        _collect(choices[idx], out)
    result = []
    for idx, c in enumerate(choices):
        lp = logprobs[idx].take(c.logprobs) if logprobs else None
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


async def _prompt_only(
    requests: Sequence[GenerationRequest],
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """What the engine would report for max_tokens 0: each request ends at once, "length"."""
    for idx, r in enumerate(requests):
        yield idx, GenerationOutput(r.request_id, "", [], None, "length", len(r.prompt), 0)


class _TextOffsets:
    """Where each token's text starts in a choice's text (OpenAI's `text_offset`): the tokens
    are detokenized in order, so a leading "▁" dropped at the start of the text counts nothing."""

    def __init__(self, tok: Tokenizer, context: Sequence[int] = (), start: int = 0) -> None:
        self._detok = tok.detokenizer(context)
        self._start = start

    def next(self, token: int) -> int:
        at = self._start + len(self._detok.text)
        self._detok.add(token)
        return at


class _LogprobsBuilder:
    """OpenAI's legacy logprobs object of one choice, taken whole or chunk by chunk (streaming).

    With echo the prompt's tokens come first, exactly the ones the client sent (BOS only where
    its token ids start with it), so a client indexing them by its own token count (lm-eval's
    `[ctxlen:]`) reads the right ones; the first has no logprob, as in OpenAI's and vLLM's answers.
    """

    def __init__(
        self,
        tok: Tokenizer,
        k: int,
        prompt: _Prompt,
        scored: Sequence[TokenLogprob | None] | None,
        echo: str,
    ) -> None:
        self._tok, self._k = tok, k
        self._entries: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        self._prompt_offsets: list[int] = []
        if scored is not None:
            offsets = _TextOffsets(tok)
            sent = zip(prompt.ids[prompt.sent_from :], scored[prompt.sent_from :])
            for i, (tid, lp) in enumerate(sent):
                known = lp is not None and i > 0
                self._entries.append(
                    (tid, lp.logprob, lp.top) if lp and known else (tid, None, None)
                )
                self._prompt_offsets.append(offsets.next(tid))
        self._generated = _TextOffsets(tok, prompt.ids, start=len(echo))

    def take(self, generated: Sequence[TokenLogprob]) -> CompletionLogprobs:
        """The entries not taken yet: the prompt's (first time only), then `generated`."""
        tok, k = self._tok, self._k
        entries = self._entries + [(lp.token, lp.logprob, lp.top) for lp in generated]
        offsets = self._prompt_offsets + [self._generated.next(lp.token) for lp in generated]
        self._entries, self._prompt_offsets = [], []
        tops: list[dict[str, float] | None] = [
            {tok.token_text(t): v for t, v in top[:k]} if k and top is not None else None
            for _, _, top in entries
        ]
        return CompletionLogprobs(
            [tok.token_text(tid) for tid, _, _ in entries],
            [value for _, value, _ in entries],
            tops,
            offsets,
        )


async def _completion_chunks(
    outputs: AsyncIterator,
    rid: str,
    created: int,
    req: CompletionRequest,
    echoes: list[str],
    logprobs: list[_LogprobsBuilder],
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    choices = [_Choice() for _ in echoes]
    started = [False] * len(echoes)
    async for idx, out in outputs:
        c = choices[idx]
        _collect(c, out)
        text = out.text
        lp = None
        first = not started[idx]
        if first:
            started[idx] = True
            text = echoes[idx] + text
        if logprobs and (first or out.logprobs):
            # The prompt's logprobs go out once, with the first chunk of the choice.
            lp = logprobs[idx].take(out.logprobs or [])
            if not lp.tokens and not text:
                lp = None
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
def chat_messages(messages: Sequence[ChatMessage]) -> list[EngineChatMessage]:
    """The request's messages as the tokenizer's; 400 naming the first it cannot format."""
    out = []
    for i, m in enumerate(messages):
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
    messages = chat_messages(req.messages)
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), None)
    structured = requested_constraint(req, last_user)
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
