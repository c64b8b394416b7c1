"""Choosing the next token for every row of a batch, each row with its own settings.

Rows may differ in temperature, top-p, seed, penalties and logit bias; the common case (all greedy,
or all plain sampling) stays a handful of batched ops. Seeded rows draw their noise from their own
key, split once per token, so a seeded request alone gives the same text every time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_core.errors import EngineError
from mlx_core.structured.matcher import TokenMasks, apply_masks

# A row's RNG key is made from its seed as an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's plus the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        """Raise EngineError (a ValueError) naming the setting; the service maps it to a 400."""

        def bad(message: str, param: str) -> EngineError:
            return EngineError(message, kind="invalid_request", param=param)

        if self.max_tokens < 1:
            raise bad("max_tokens must be at least 1", "max_tokens")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise bad(f"seed must be between 0 and {MAX_SEED}", "seed")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p must be in (0, 1]", "top_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be between -2 and 2", name)
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise bad(
                    f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                    "logit_bias",
                )
            if not -100 <= bias <= 100:
                raise bad("logit_bias values must be between -100 and 100", "logit_bias")


@dataclass
class RowSampler:
    """Per-sequence sampling state: the settings plus the RNG key and the generated-token counts."""

    params: SamplingParams
    key: mx.array | None = None
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.key is None:
            self.key = mx.random.key(self.params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0

    def next_key(self) -> mx.array:
        if self.key is None:
            raise ValueError("next_key needs a seeded row (SamplingParams.seed)")
        self.key, sub = mx.random.split(self.key)
        return sub

    def observe(self, token: int) -> None:
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] += 1


@dataclass
class SampleResult:
    tokens: mx.array  # (B,) uint32
    logprobs: mx.array | None = None  # (B,) log-probability of the chosen token
    top_ids: mx.array | None = None  # (B, k)
    top_logprobs: mx.array | None = None  # (B, k)


def sample(
    logits: mx.array, rows: Sequence[RowSampler], masks: TokenMasks | None = None
) -> SampleResult:
    """Next tokens for logits (B, V), each constrained row drawn only from what its mask allows;
    lazy arrays, evaluated by the caller.

    Logprobs come from the raw logits, before bias, penalties and masks (as vLLM reports them by
    default): a masked token keeps a finite logprob, so no -inf reaches a JSON response.
    """
    logits = logits.astype(mx.float32)
    B, V = logits.shape
    want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    raw = logits
    # The mask goes last: a logit bias must not lift a disallowed token back above -inf.
    logits = apply_masks(_apply_bias_and_penalties(logits, rows, V), masks)
    greedy = [r.greedy for r in rows]
    if all(greedy):
        tokens = mx.argmax(logits, axis=-1)
    else:
        temps = mx.array([r.params.temperature or 1.0 for r in rows])[:, None]
        scaled = logits / temps
        top_p = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            scaled = _top_p_filter(scaled, mx.array(top_p)[:, None])
        sampled = mx.argmax(scaled + _gumbel(rows, V), axis=-1)
        tokens = (
            mx.where(mx.array(greedy), mx.argmax(logits, axis=-1), sampled)
            if any(greedy)
            else sampled
        )
    tokens = tokens.astype(mx.uint32)
    if not want:
        return SampleResult(tokens)
    logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
    k = max(want)
    if k == 0:
        return SampleResult(tokens, chosen)
    top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    top_vals = mx.take_along_axis(logprobs, top_ids, axis=-1)
    order = mx.argsort(-top_vals, axis=-1)
    return SampleResult(
        tokens,
        chosen,
        mx.take_along_axis(top_ids, order, axis=-1),
        mx.take_along_axis(top_vals, order, axis=-1),
    )


def _apply_bias_and_penalties(logits: mx.array, rows: Sequence[RowSampler], V: int) -> mx.array:
    if not any(r.params.logit_bias or r.counts for r in rows):
        return logits
    adjust = np.zeros((len(rows), V), dtype=np.float32)
    for i, r in enumerate(rows):
        for token, bias in r.params.logit_bias:
            adjust[i, token] += bias
        if r.counts:
            ids = np.fromiter(r.counts.keys(), dtype=np.int64)
            n = np.fromiter(r.counts.values(), dtype=np.float32)
            adjust[i, ids] -= r.params.presence_penalty + r.params.frequency_penalty * n
    return logits + mx.array(adjust)


def _top_p_filter(scaled: mx.array, top_p: mx.array) -> mx.array:
    probs = mx.softmax(scaled, axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    # Keep a token while the mass before it is below top_p (the most likely token always stays).
    keep_sorted = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
    keep = mx.put_along_axis(mx.zeros(scaled.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, scaled, -mx.inf)


def _gumbel(rows: Sequence[RowSampler], V: int) -> mx.array:
    unseeded = [i for i, r in enumerate(rows) if r.key is None]
    if len(unseeded) == len(rows):
        return mx.random.gumbel((len(rows), V))
    shared = mx.random.gumbel((len(unseeded), V)) if unseeded else None
    noise, j = [], 0
    for r in rows:
        if r.key is None and shared is not None:
            noise.append(shared[j])
            j += 1
        else:
            noise.append(mx.random.gumbel((V,), key=r.next_key()))
    return mx.stack(noise)


class StopMatcher:
    """Cuts generated text at the first stop string, even one that spans several tokens.

    Text that might be the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text in; (text safe to emit, whether a stop string was reached)."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
