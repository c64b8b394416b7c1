"""The model's own log-likelihoods, computed in process: what served scores must equal."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlx_core.weights import LoadedModel


def logprob_sum(loaded: LoadedModel, ids: Sequence[int], start: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= start: one forward pass of the model, no cache."""
    logits = loaded.model(mx.array([list(ids)]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def continuation_logprob(loaded: LoadedModel, context: str, continuation: str) -> float:
    """log p(continuation | context) for a model that reads BOS first, with the continuation's
    tokens taken from the joint encoding (as lm-eval splits them: a word the two texts share a
    token of is scored with the continuation)."""
    tok = loaded.tokenizer
    whole = tok.encode(context + continuation)
    n_context = len(tok.encode(context))
    return logprob_sum(loaded, whole, n_context)
