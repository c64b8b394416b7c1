"""Continuous-batching generation: requests join and leave one running batch between decode steps.

One thread owns an Engine and calls `step()` in a loop; other threads only `add_request`, `abort`
and `call` (all thread-safe). A step launches the next batched decode before it reads back the
tokens of the previous one, so Python's work overlaps the accelerator's (MLX evaluates lazily).
Rows that finished in the meantime are dropped afterwards; their extra token is discarded.
While a row has an active output constraint (mlx_core/structured) the step splits instead: it
builds the forward, reads back the previous tokens to advance the matchers, hands the next masks
to the mask thread, then queues the forward and detokenizes while they are computed, and samples
in a small graph of its own; batches without one keep the pipelined path.

A failure that belongs to one row (its sampler, its adapter, its constraint) ends that row alone
with finish_reason "error" and the exception in `GenerationOutput.error`; a failing prefill ends
its group, a failing batched decode the running rows. Queued requests and the engine go on.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import mlx.core as mx
import numpy as np

from mlx_core.cache import KVCache
from mlx_core.errors import EngineError
from mlx_core.kernels import use_fast_kernels
from mlx_core.model import Mistral
from mlx_core.prefix_cache import PrefixCache
from mlx_core.sampling import RowSampler, SampleResult, SamplingParams, StopMatcher, sample
from mlx_core.structured import (
    Constraint,
    HealingMatcher,
    MaskBatch,
    MaskComputer,
    PrefixStripper,
    RowMatcher,
    TokenConstraint,
    TokenMasks,
    Vocabulary,
    compile_grammar,
    heal_prompt,
    vocabulary,
    with_prefix,
)
from mlx_core.tokenizer import StreamingDetokenizer, Tokenizer


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter id resident in the engine's slots (None: base model)
    chat: bool = False  # a chat reply starts a new turn: no leading space carried from the prompt
    constraint: Constraint | None = None  # what the generated text must match
    # Back off a trailing prompt token that a longer token extends ("A: " ends in a lone space)
    # and make the answer spell it again; completions only, chat prompts are never healed.
    token_healing: bool = False


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationOutput:
    """What happened to one request during one step (new text, and maybe its end)."""

    request_id: str
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: Exception | None = None  # why the row ended, with finish_reason "error"


@dataclass
class ConstrainedStepTimes:
    """Where the host time of constrained decode steps goes, summed since the last reset
    (benchmarks/structured.py reports it per step; nothing else reads it)."""

    steps: int = 0
    step_s: float = 0.0  # whole constrained steps, engine thread
    forward_s: float = 0.0  # building the forward's graph and queueing it (encoding it on a GPU)
    read_s: float = 0.0  # waiting for the previous step's tokens (the device)
    advance_s: float = 0.0  # turning them into row state: advancing the matchers
    wait_s: float = 0.0  # blocked on the mask thread after the text was done
    mask_s: float = 0.0  # computing masks (mask thread, or inline for a lone row)


@dataclass
class _Row:
    """What a request runs as, built on the caller's thread so a bad constraint fails there."""

    prompt: list[int]  # the tokens to prefill: the request's prompt, less what healing backed off
    constraint: TokenConstraint | None = None
    strip: PrefixStripper | None = None  # drops the healed text from what the row returns


@dataclass(frozen=True)
class PreparedRequest:
    """A request the engine has checked, with the row it will run as (see Engine.prepare)."""

    req: GenerationRequest
    row: _Row


@dataclass
class _Sequence:
    req: GenerationRequest
    sampler: RowSampler
    detok: StreamingDetokenizer
    stop: StopMatcher
    prompt: list[int]
    constraint: TokenConstraint | None = None
    strip: PrefixStripper | None = None
    slot: int = 0
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def constrained(self) -> bool:
        return self.constraint is not None and self.constraint.active and not self.finish


@dataclass
class _Prefill:
    """Sequences being prefilled together (left-padded), possibly over several steps."""

    seqs: list[_Sequence]
    cache: KVCache
    tokens: np.ndarray  # (B, L) left-padded token ids still to feed, from `pos`
    pos: int = 0


class SlotProvider(Protocol):
    """What the engine needs from the multi-LoRA layers (`mlx_core.lora.slots.AdapterSlots`)."""

    def acquire(self, adapter_id: str) -> int | None:
        """The adapter's slot index, loading it if needed; None while every slot is pinned."""
        ...

    def release(self, slot: int) -> None: ...

    def activate(self, slots: Sequence[int]) -> None:
        """The slot of each batch row for the next forward."""
        ...


class Engine:
    def __init__(
        self,
        model: Mistral,
        tokenizer: Tokenizer,
        *,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
        prefill_budget: int = 4096,
        kv_budget_tokens: int | None = None,
        prefix_cache_tokens: int = 32768,
        adapter_slots: SlotProvider | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len or model.args.max_context, model.args.max_context)
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.kv_budget_tokens = kv_budget_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.adapter_slots = adapter_slots
        use_fast_kernels(model)
        tokenizer.appended_texts()  # the detokenizer's table (~0.2 s), not the first request's
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[_Sequence] = deque()
        self.prefilling: list[_Prefill] = []
        self.running: list[_Sequence] = []
        self.cache: KVCache | None = None
        self._pending: list[tuple[SampleResult, list[_Sequence]]] = []
        self._aborted: set[str] = set()
        self._masks: MaskComputer | None = None  # built with the first constrained row
        self.constrained_times = ConstrainedStepTimes()

    @property
    def vocab(self) -> Vocabulary:
        """The tokenizer's exact-bytes vocabulary for matchers and healing (built on first use,
        ~0.2 s; thread-safe)."""
        return vocabulary(self.tokenizer)

    # -- thread-safe entry points ----------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> None:
        """Queue `req`. Raises EngineError, or ConstraintError for a constraint that cannot be
        used, on the caller's thread before anything is queued."""
        self.submit(self.prepare(req))

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Check `req` once (EngineError, ConstraintError) and build its row, queueing nothing:
        callers that submit several requests together prepare them all first, so a bad one
        leaves the engine untouched."""
        self._check_limits(req)
        return PreparedRequest(req, self._row(req))

    def submit(self, prepared: PreparedRequest) -> None:
        """Queue a request `prepare` checked."""
        self._inbox.put(("add", prepared.req, prepared.row))

    def _check_limits(self, req: GenerationRequest) -> None:
        n = len(req.prompt)
        if n == 0:
            raise EngineError(
                "the prompt is empty: send at least one token",
                kind="invalid_prompt",
                param="prompt",
            )
        if n + req.params.max_tokens > self.max_model_len:  # first: it is cheap for any prompt
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + req.params.max_tokens} tokens ({n} in the prompt, "
                f"{req.params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                kind="context_length",
                param="max_tokens",
            )
        vocab = self.model.args.vocab_size
        bad = [t for t in req.prompt if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise EngineError(
                f"prompt token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})",
                kind="invalid_prompt",
                param="prompt",
            )
        req.params.validate(vocab)

    def _row(self, req: GenerationRequest) -> _Row:
        """The row's prompt and constraint; raises ConstraintError for one that cannot be used."""
        grammar = compile_grammar(req.constraint) if req.constraint is not None else None
        if not (grammar is not None or (req.token_healing and not req.chat)):
            return _Row(req.prompt)  # nothing to build: no vocabulary needed
        vocab = self.vocab
        row = _Row(req.prompt)
        if req.token_healing and not req.chat:
            healing = heal_prompt(req.prompt, vocab)
            if healing.backed_off:
                row.prompt, row.strip = healing.prompt, PrefixStripper(healing.text)
                if grammar is None:
                    row.constraint = HealingMatcher(healing.prefix, vocab)
                else:
                    grammar = with_prefix(grammar, healing.text)
        if grammar is not None and req.constraint is not None:
            if req.chat:
                # Mistral starts an answer with a "▁" token, which the chat detokenizer drops.
                grammar = with_prefix(grammar, " ", optional=True)
            row.constraint = RowMatcher(grammar, vocab, req.constraint.kind)
        return row

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps (it owns all MLX state)."""
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return fut

    # -- the loop --------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or not self._inbox.empty())

    @property
    def num_running(self) -> int:
        return len(self.running) + sum(len(p.seqs) for p in self.prefilling)

    def step(self) -> list[GenerationOutput]:
        outs: list[GenerationOutput] = []
        self._drain_inbox(outs)
        try:
            self._decode(outs)
        except Exception as e:  # the batched forward: every running row shares its fate
            self._fail_running(e, outs)
        self._drop_finished(outs)
        self._admit(outs)
        self._advance_prefills(outs)
        return outs

    def _decode(self, outs: list[GenerationOutput]) -> None:
        if any(s.constrained for s in self.running):
            launched = self._constrained_decode(outs)
        else:
            launched = self._launch_decode() if self.running and not self._all_done() else None
            for result, seqs in self._pending:
                outs.extend(self._resolve(result, seqs))
        self._pending = [launched] if launched else []

    def _fail_running(self, error: Exception, outs: list[GenerationOutput]) -> None:
        """End every running row with `error` (a failed decode leaves their cache unusable);
        rows still prefilling or queued are not part of that batch and go on."""
        for seq in self.running:
            if not seq.finish:
                outs.append(self._fail(seq, error))
            self._release(seq)
        self.running, self.cache, self._pending = [], None, []

    def fail_in_flight(self, error: Exception) -> list[GenerationOutput]:
        """End every running and prefilling row with `error`, keeping queued requests: the last
        resort after a step raised outside the guarded phases. Engine thread only."""
        outs: list[GenerationOutput] = []
        self._fail_running(error, outs)
        for job in self.prefilling:
            for seq in job.seqs:
                if not seq.finish:
                    outs.append(self._fail(seq, error))
                self._release(seq)
        self.prefilling = []
        return outs

    def _fail(self, seq: _Sequence, error: Exception) -> GenerationOutput:
        seq.finish = "error"
        return self._output(seq, "", [], None, "error", error)

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        request_id: str = "gen",
        chat: bool = False,
        constraint: Constraint | None = None,
        token_healing: bool = False,
    ) -> Iterator[GenerationOutput]:
        """Run one request to the end (used by the CLI and benchmarks)."""
        self.add_request(
            GenerationRequest(request_id, prompt, params, adapter, chat, constraint, token_healing)
        )
        while self.has_work():
            for out in self.step():
                if out.request_id == request_id:
                    yield out

    def reset(self) -> None:
        """Forget every request (after a failed step); adapter pins are released."""
        for seq in [*self.waiting, *self.running, *(s for p in self.prefilling for s in p.seqs)]:
            self._release(seq)
        self.waiting.clear()
        self.prefilling, self.running, self.cache, self._pending = [], [], None, []

    def score_prompt(
        self, tokens: list[int], top: int, adapter: str | None = None
    ) -> list[TokenLogprob | None]:
        """Log-probability of each prompt token given the ones before it (None for the first),
        with the `top` most likely alternatives: OpenAI's `echo` with `logprobs`. Engine thread only."""
        slot = 0
        if adapter is not None and self.adapter_slots is not None:
            acquired = self.adapter_slots.acquire(adapter)
            if acquired is None:
                raise EngineError(
                    "every adapter slot is busy: retry shortly", kind="busy", param="model"
                )
            slot = acquired
        try:
            if self.adapter_slots is not None:
                self.adapter_slots.activate([slot])
            logits = self.model(mx.array([tokens]))[0, :-1].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nxt = mx.array(tokens[1:])[:, None]
            chosen = mx.take_along_axis(logprobs, nxt, axis=-1)[:, 0]
            out: list[TokenLogprob | None] = [None]
            if top:
                ids = mx.argsort(-logprobs, axis=-1)[:, :top]
                vals = mx.take_along_axis(logprobs, ids, axis=-1)
                ids_l, vals_l = _host(ids), _host(vals)
            for i, lp in enumerate(_host(chosen)):
                alts = list(zip(ids_l[i], vals_l[i])) if top else []
                out.append(TokenLogprob(tokens[i + 1], lp, alts))
            return out
        finally:
            if slot and self.adapter_slots is not None:
                self.adapter_slots.release(slot)

    # -- internals -------------------------------------------------------------------------------
    def _drain_inbox(self, outs: list[GenerationOutput]) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                req = msg[1]
                try:
                    self.waiting.append(self._new_sequence(req, msg[2]))
                except Exception as e:  # e.g. its sampler: this request's fault alone
                    outs.append(
                        GenerationOutput(
                            req.request_id, "", [], None, "error", len(req.prompt), 0, error=e
                        )
                    )
            elif msg[0] == "abort":
                self._abort(msg[1], outs)
            else:
                _, fn, fut = msg
                try:
                    fut.set_result(fn())
                except Exception as e:  # the caller's future carries it
                    fut.set_exception(e)

    def _new_sequence(self, req: GenerationRequest, row: _Row) -> _Sequence:
        # The generated tokens follow the prefilled prompt: it gives the first one its space.
        detok = self.tokenizer.detokenizer(() if req.chat else row.prompt)
        return _Sequence(
            req,
            RowSampler(req.params),
            detok,
            StopMatcher(req.params.stop),
            row.prompt,
            row.constraint,
            row.strip,
        )

    def _abort(self, request_id: str, outs: list[GenerationOutput]) -> None:
        for seq in list(self.waiting):
            if seq.req.request_id == request_id:
                self.waiting.remove(seq)
                outs.append(self._output(seq, "", [], None, "abort"))
        for seq in self.running + [s for p in self.prefilling for s in p.seqs]:
            if seq.req.request_id == request_id and seq.finish is None:
                seq.finish = "abort"
                outs.append(self._output(seq, "", [], None, "abort"))

    def _all_done(self) -> bool:
        return all(s.finish for s in self.running)

    def _activate(self, seqs: Sequence[_Sequence]) -> None:
        if self.adapter_slots is not None:
            self.adapter_slots.activate([s.slot for s in seqs])

    def _launch_decode(self) -> tuple[SampleResult, list[_Sequence]]:
        logits = self._forward_pending()
        result = sample(logits, [s.sampler for s in self.running])
        mx.async_eval(_arrays(result))
        return result, list(self.running)

    def _forward_pending(self) -> mx.array:
        """The next logits (B, V) of the running rows, from their pending (lazy) tokens."""
        inputs = mx.concatenate([r.tokens for r, _ in self._pending])[:, None]
        self._activate(self.running)
        return self.model(inputs, cache=self.cache)[:, -1, :]

    def _constrained_decode(
        self, outs: list[GenerationOutput]
    ) -> tuple[SampleResult, list[_Sequence]] | None:
        """A decode step whose sampling needs masks from the previous tokens. The forward's graph
        is built first (on the previous tokens, still lazy on the device); then the host reads
        those tokens, advances the matchers and hands the next masks to the mask thread before
        it queues the forward, so the masks are computed while MLX encodes and runs the forward
        (eval drops the GIL) and while the host turns the tokens into text; the masked sampling
        is a small graph of its own."""
        times, started = self.constrained_times, time.perf_counter()
        logits, pending = None, None
        if not self._all_done():
            logits = self._forward_pending()  # Python builds the graph; nothing runs yet
        built = time.perf_counter()
        mx.eval([result.tokens for result, _ in self._pending])  # the wait for the device
        read = time.perf_counter()
        taken = [t for result, seqs in self._pending for t in self._take(result, seqs, outs)]
        times.forward_s += built - started
        times.read_s += read - built
        times.advance_s += time.perf_counter() - read
        if not self._all_done():
            pending = self._submit_masks(self.running)
            # Queued only now: encoding a 7B forward takes milliseconds of host time (computing
            # it, on MLX's CPU backend), which is when the masks are computed beside it. Queued
            # before the masks, its encoding and the masks would take their sum, not their max.
            queued = time.perf_counter()
            mx.async_eval(logits)
            times.forward_s += time.perf_counter() - queued
        outs.extend(self._emit(*t) for t in taken)
        # (No future: the constrained rows just ended, the others still sample.)
        waited = time.perf_counter()
        batch = pending.result() if pending else None
        times.wait_s += time.perf_counter() - waited
        if batch is not None:
            times.mask_s += batch.seconds
        masks = self._collect_masks(self.running, batch, outs)
        if logits is None or self._all_done():  # stop strings, failed matchers ended every row
            return None
        result = sample(logits, [s.sampler for s in self.running], masks)
        mx.async_eval(_arrays(result))
        times.steps += 1
        times.step_s += time.perf_counter() - started
        return result, list(self.running)

    def _submit_masks(self, seqs: Sequence[_Sequence]) -> Future[MaskBatch] | None:
        """The next masks of `seqs`, computed on the mask thread; None when none is constrained.
        Their constraints must not be touched until the future is done."""
        rows = [s.constraint if s.constrained else None for s in seqs]
        if not any(rows):
            return None
        if self._masks is None:
            self._masks = MaskComputer(self.vocab)
        if sum(r is not None for r in rows) > 1:
            return self._masks.submit(rows)
        # One row's mask takes ~0.1 ms, less than handing it to the mask thread and back.
        done: Future[MaskBatch] = Future()
        done.set_result(self._masks.compute_isolated(rows))
        return done

    def _collect_masks(
        self, seqs: Sequence[_Sequence], batch: MaskBatch | None, outs: list[GenerationOutput]
    ) -> TokenMasks | None:
        """The masks of `batch`, ending the rows whose matcher failed (they are sampled unmasked
        this once; the token is discarded)."""
        if batch is None:
            return None
        for i, error in batch.failed.items():
            if not seqs[i].finish:
                outs.append(self._fail(seqs[i], error))
        return batch.masks

    def _resolve(self, result: SampleResult, seqs: list[_Sequence]) -> list[GenerationOutput]:
        outs: list[GenerationOutput] = []
        taken = self._take(result, seqs, outs)
        outs.extend(self._emit(*t) for t in taken)
        return outs

    def _take(
        self, result: SampleResult, seqs: list[_Sequence], outs: list[GenerationOutput]
    ) -> list[tuple[_Sequence, int, list[TokenLogprob] | None, str | None]]:
        """Read a step's tokens (waits for the device) and advance each live row by its token:
        (row, token, logprobs, why it ends) for `_emit`. A row whose constraint raises ends here."""
        tokens = _host(result.tokens)
        chosen = _host(result.logprobs) if result.logprobs is not None else None
        top_ids = _host(result.top_ids) if result.top_ids is not None else None
        top_vals = _host(result.top_logprobs) if result.top_logprobs is not None else None
        taken = []
        for i, seq in enumerate(seqs):
            if seq.finish:
                continue
            tok = tokens[i]
            lp = None
            if seq.req.params.logprobs is not None and chosen is not None:
                k = seq.req.params.logprobs
                top = (
                    list(zip(top_ids[i][:k], top_vals[i][:k])) if top_ids and top_vals and k else []
                )
                lp = [TokenLogprob(tok, chosen[i], top)]
            try:
                taken.append((seq, tok, lp, self._advance(seq, tok)))
            except Exception as e:  # its constraint: end this row only
                outs.append(self._fail(seq, e))
        return taken

    def _advance(self, seq: _Sequence, tok: int) -> str | None:
        """Take `tok` into the row's state: "eos", "stop" (its matcher is done), "length", or None
        while it goes on. A row that ends is marked finished now, so no mask is computed for it."""
        seq.generated.append(tok)
        seq.sampler.observe(tok)
        p = seq.req.params
        if tok == self.tokenizer.eos_id and not p.ignore_eos:
            seq.finish = "stop"
            return "eos"
        # A matcher that allows nothing but EOS next has nothing more to say: end now. (It cannot
        # refuse a token sampled under its mask; if it ever did, ending beats emitting bad text.)
        end = None
        if seq.constraint is not None:
            if not seq.constraint.advance(tok) or seq.constraint.is_stopped():
                end = "stop"
            elif not seq.constraint.active:
                seq.constraint = None  # a spelled-out healing prefix: the row is free again
        if end is None and (len(seq.generated) >= p.max_tokens or seq.length >= self.max_model_len):
            end = "length"
        seq.finish = end
        return end

    def _emit(
        self, seq: _Sequence, tok: int, lp: list[TokenLogprob] | None, end: str | None
    ) -> GenerationOutput:
        """The text `tok` adds to the row (detokenized, cut at a stop string), as an output."""
        try:
            if end == "eos":
                text = seq.stop.feed(self._text(seq, seq.detok.flush()))[0] + seq.stop.flush()
                return self._output(seq, text, [tok], lp, "stop")
            text, hit = seq.stop.feed(self._text(seq, seq.detok.add(tok)))
            if hit:
                seq.finish = "stop"
            elif end is not None:
                text += seq.stop.feed(self._text(seq, seq.detok.flush()))[0] + seq.stop.flush()
            return self._output(seq, text, [tok], lp, seq.finish)
        except Exception as e:  # its stop rules or detokenizer: end this row only
            return self._fail(seq, e)

    @staticmethod
    def _text(seq: _Sequence, text: str) -> str:
        return seq.strip.feed(text) if seq.strip is not None else text

    def _output(
        self,
        seq: _Sequence,
        text: str,
        tokens: list[int],
        lp: list[TokenLogprob] | None,
        finish: str | None,
        error: Exception | None = None,
    ) -> GenerationOutput:
        return GenerationOutput(
            seq.req.request_id,
            text,
            tokens,
            lp,
            finish,
            len(seq.req.prompt),
            len(seq.generated),
            seq.cached_tokens,
            error,
        )

    def _drop_finished(self, outs: list[GenerationOutput]) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.finish]
        if len(keep) == len(self.running):
            return
        for s in self.running:
            if s.finish:
                self._release(s)
        if not keep:
            self.running, self.cache, self._pending = [], None, []
            return
        if self.cache is not None:
            self.cache.filter(keep)
        idx = mx.array(keep, dtype=mx.int32)
        self._pending = [(_take_rows(r, idx), [seqs[i] for i in keep]) for r, seqs in self._pending]
        self.running = [self.running[i] for i in keep]

    def _release(self, seq: _Sequence) -> None:
        if self.adapter_slots is not None and seq.slot:
            self.adapter_slots.release(seq.slot)
            seq.slot = 0

    # -- admission and prefill -------------------------------------------------------------------
    def _kv_tokens_in_use(self) -> int:
        seqs = self.running + [s for p in self.prefilling for s in p.seqs]
        return sum(len(s.prompt) + s.req.params.max_tokens for s in seqs)

    def _admit(self, outs: list[GenerationOutput]) -> None:
        group: list[_Sequence] = []  # rows with nothing cached: prefilled together
        hits: list[tuple[_Sequence, KVCache]] = []  # rows with a cached prefix
        used = self._kv_tokens_in_use()
        while self.waiting and self.num_running + len(group) < self.max_num_seqs:
            seq = self.waiting[0]
            need = len(seq.prompt) + seq.req.params.max_tokens
            if (
                self.kv_budget_tokens
                and used + need > self.kv_budget_tokens
                and (self.num_running or group)
            ):
                break  # wait for memory; a lone request is always admitted (it fit the limits)
            if seq.req.adapter is not None:
                try:
                    slot = (
                        self.adapter_slots.acquire(seq.req.adapter) if self.adapter_slots else None
                    )
                except Exception as e:  # deleted meanwhile, or unreadable: this request's fault
                    self.waiting.popleft()
                    outs.append(self._fail(seq, e))
                    continue
                if slot is None:
                    break  # every adapter slot is pinned by running work: wait in the queue
                seq.slot = slot
            self.waiting.popleft()
            used += need
            try:
                prefix = self.prefix_cache.lookup(
                    seq.req.adapter or "", seq.prompt, self.model.args.sliding_window
                )
            except Exception as e:  # a row between the queue and a prefill must still end
                outs.append(self._fail(seq, e))
                self._release(seq)
                continue
            if prefix is not None:
                hits.append((seq, prefix))
            else:
                group.append(seq)
        for hit_group in _hit_groups(hits):
            self._queue_hits(hit_group, outs)
        if group:
            longest = max(len(s.prompt) for s in group)
            pad = [longest - len(s.prompt) for s in group]
            tokens = np.zeros((len(group), longest), dtype=np.int32)
            for i, s in enumerate(group):
                tokens[i, pad[i] :] = s.prompt
            try:
                cache = self.model.new_cache(len(group), pad)
            except Exception as e:  # no memory for this group's cache: it alone ends
                self._end_rows(group, e, outs)
                return
            self.prefilling.append(_Prefill(group, cache, tokens))

    def _queue_hits(
        self, hits: list[tuple[_Sequence, KVCache]], outs: list[GenerationOutput]
    ) -> None:
        """One prefill job for rows whose prompts start with cached prefixes: every row feeds the
        group's longest remainder, recomputing a few cached tokens where its own is shorter, so
        no row has a hole between its prefix and the rest (the cache knows only left padding)."""
        feed = max(len(seq.prompt) - prefix.offset for seq, prefix in hits)
        seqs = [seq for seq, _ in hits]
        caches = [prefix.truncated(len(seq.prompt) - feed) for seq, prefix in hits]
        try:  # a lone hit keeps its prefix's views: nothing to copy
            cache = caches[0] if len(caches) == 1 else KVCache.merge(caches)
        except Exception as e:  # no memory for this group's cache: it alone ends
            self._end_rows(seqs, e, outs)
            return
        for s in seqs:
            s.cached_tokens = len(s.prompt) - feed
        tokens = np.array([s.prompt[len(s.prompt) - feed :] for s in seqs], dtype=np.int32)
        self.prefilling.append(_Prefill(seqs, cache, tokens))

    def _advance_prefills(self, outs: list[GenerationOutput]) -> None:
        budget = self.prefill_budget
        while self.prefilling and budget > 0:
            job = self.prefilling[0]
            if all(s.finish for s in job.seqs):  # everyone aborted meanwhile
                self.prefilling.pop(0)
                for s in job.seqs:
                    self._release(s)
                continue
            try:
                budget = self._prefill_chunk(job, budget, outs)
            except Exception as e:  # this group's prompts: the running batch is untouched
                if job in self.prefilling:
                    self.prefilling.remove(job)
                self._end_rows(job.seqs, e, outs)

    def _end_rows(
        self, seqs: Sequence[_Sequence], error: Exception, outs: list[GenerationOutput]
    ) -> None:
        """End rows that never joined the running batch with `error` (those aborted meanwhile
        have had their output) and free their slots."""
        for s in seqs:
            if not s.finish:
                outs.append(self._fail(s, error))
            self._release(s)

    def _prefill_chunk(self, job: _Prefill, budget: int, outs: list[GenerationOutput]) -> int:
        """Feed `job` its next chunk (joining the batch after its last); the budget left."""
        B, L = job.tokens.shape
        n = min(self.prefill_chunk, L - job.pos, max(1, budget // B))
        chunk = mx.array(job.tokens[:, job.pos : job.pos + n])
        self._activate(job.seqs)
        # Only the last position's logits are ever needed; earlier chunks just fill the cache.
        logits = self.model(chunk, cache=job.cache, last_only=True)
        job.pos += n
        budget -= B * n
        if job.pos < L:
            mx.eval(job.cache.keys + job.cache.values)
            return budget
        self.prefilling.pop(0)
        pending = self._submit_masks(job.seqs)
        if pending is not None:
            mx.async_eval(logits)  # the prompt's last chunk is encoded and run beside the masks
        masks = self._collect_masks(job.seqs, pending.result() if pending else None, outs)
        result = sample(logits[:, -1, :], [s.sampler for s in job.seqs], masks)
        mx.async_eval(_arrays(result))
        for row, seq in enumerate(job.seqs):
            self.prefix_cache.store(seq.req.adapter or "", seq.prompt, job.cache, row)
        self._join(job, result)
        return budget

    def _join(self, job: _Prefill, result: SampleResult) -> None:
        if self.cache is None:
            self.cache = job.cache
        else:
            self.cache = KVCache.merge([self.cache, job.cache])
        self.running += job.seqs
        self._pending.append((result, list(job.seqs)))


# How many cached tokens a row may recompute to join a group of prefix hits. One forward for
# many rows instead of one each is the point: on a GPU a batch-1 forward of a 7B model costs as
# much as ~200 tokens of a batched one, and 32 hits were 32 forwards before the first token of
# the last (0.35-0.42 s of TTFT at 32 clients on the H200). Measured: a third less TTFT on the
# CPU; on the H200 hits stay slow for another reason (benchmarks/NOTES.md section 10).
HIT_GROUP_SLACK = 64


def _hit_groups(
    hits: list[tuple[_Sequence, KVCache]],
) -> list[list[tuple[_Sequence, KVCache]]]:
    """Prefix hits grouped so that each row of a group feeds at most HIT_GROUP_SLACK tokens more
    than its own remainder, and keeps at least one cached token (a cache holds some)."""
    groups: list[list[tuple[_Sequence, KVCache]]] = []
    first_rest = shortest = 0
    for seq, prefix in sorted(hits, key=lambda h: len(h[0].prompt) - h[1].offset):
        rest = len(seq.prompt) - prefix.offset
        if (
            groups
            and rest - first_rest <= HIT_GROUP_SLACK
            and min(shortest, len(seq.prompt)) > rest
        ):
            groups[-1].append((seq, prefix))
            shortest = min(shortest, len(seq.prompt))
        else:
            groups.append([(seq, prefix)])
            first_rest, shortest = rest, len(seq.prompt)
    return groups


def _arrays(r: SampleResult) -> list[mx.array]:
    return [a for a in (r.tokens, r.logprobs, r.top_ids, r.top_logprobs) if a is not None]


def _take_rows(r: SampleResult, idx: mx.array) -> SampleResult:
    def take(a: mx.array | None) -> mx.array | None:
        return None if a is None else a[idx]

    return SampleResult(r.tokens[idx], take(r.logprobs), take(r.top_ids), take(r.top_logprobs))


def _host(a: mx.array) -> list[Any]:
    """A batch's values as Python lists (waits for the device)."""
    return cast(list[Any], a.tolist())


def timed_generate(
    engine: Engine,
    prompt: list[int],
    params: SamplingParams,
    adapter: str | None = None,
    chat: bool = False,
) -> tuple[str, dict[str, float]]:
    """Generate one completion; return the text and prompt/generation tokens per second."""
    start = time.perf_counter()
    first = None
    text, n = [], 0
    for out in engine.generate(prompt, params, adapter, chat=chat):
        if first is None:
            first = time.perf_counter()
        text.append(out.text)
        n = out.completion_tokens
    end = time.perf_counter()
    first = first or end
    stats = {
        "prompt_tokens": len(prompt),
        "generation_tokens": n,
        "prompt_tps": len(prompt) / max(first - start, 1e-9),
        "generation_tps": (n - 1) / max(end - first, 1e-9) if n > 1 else 0.0,
    }
    return "".join(text), stats
