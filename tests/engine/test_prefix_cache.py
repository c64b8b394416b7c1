"""Prompts that reuse stored prefixes give the same tokens as prompts computed from nothing, and
the attention path such prompts take computes what mx.fast's does."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_core.engine import Engine, GenerationRequest
from mlx_core.model import attention_short_query
from mlx_core.sampling import SamplingParams


def test_reused_prefixes_give_the_same_tokens(tiny_model):
    rng = np.random.RandomState(3)
    a = rng.randint(3, 32000, size=60).tolist()
    b = a[:32] + rng.randint(3, 32000, size=30).tolist()  # shares two blocks with a
    c = b[:50] + [7, 8, 9]  # its blocks come from a's copy and from b's
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cold = Engine(tiny_model.model, tiny_model.tokenizer, prefix_cache_tokens=0)
    warm = Engine(tiny_model.model, tiny_model.tokenizer)
    for i, prompt in enumerate([a, a, b, c]):
        want = [t for out in cold.generate(prompt, params, request_id=f"c{i}") for t in out.tokens]
        got = [t for out in warm.generate(prompt, params, request_id=f"w{i}") for t in out.tokens]
        assert got == want
    assert warm.prefix_cache.hits == 3


def test_prefix_hits_admitted_together_prefill_as_one_batch(tiny_model):
    """Rows whose prompts start with cached prefixes of different lengths, arriving together,
    are prefilled in one job (one forward per chunk, not one per row) and still give the tokens
    each prompt gives when computed from nothing."""
    rng = np.random.RandomState(5)
    a = rng.randint(3, 32000, size=70).tolist()
    b = rng.randint(3, 32000, size=40).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    warm = Engine(tiny_model.model, tiny_model.tokenizer, prefill_budget=8)
    for i, prompt in enumerate([a, b]):  # stores their blocks
        list(warm.generate(prompt, params, request_id=f"seed{i}"))
    prompts = [a, a + [5, 6, 7], b + rng.randint(3, 32000, size=20).tolist(), b[:35]]
    for i, prompt in enumerate(prompts):
        warm.add_request(GenerationRequest(f"r{i}", prompt, params))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for out in warm.step():
        got[out.request_id] += out.tokens
    assert sorted(len(job.seqs) for job in warm.prefilling) == [4]
    while warm.has_work():
        for out in warm.step():
            got[out.request_id] += out.tokens
    assert warm.prefix_cache.hits == len(prompts)  # the seeds were misses; all four hit
    cold = Engine(tiny_model.model, tiny_model.tokenizer, prefix_cache_tokens=0)
    for i, prompt in enumerate(prompts):
        want = [t for out in cold.generate(prompt, params, request_id=f"c{i}") for t in out.tokens]
        assert got[f"r{i}"] == want, i


@pytest.mark.parametrize("mask_kind", ["padded", "window", "causal", "none"])
def test_short_query_attention_matches_mx_fast(mask_kind):
    """The path prefix-hit groups take (a few queries over longer cached keys) computes what
    mx.fast's attention computes, with grouped-query heads and every kind of mask the cache
    hands it."""
    B, H, Hkv, L, K, D = 3, 4, 2, 5, 19, 16
    q, k, v = (
        mx.random.normal(shape, key=mx.random.key(i))
        for i, shape in enumerate([(B, H, L, D), (B, Hkv, K, D), (B, Hkv, K, D)])
    )
    query_at = mx.arange(K - L, K)[:, None]
    key_at = mx.arange(K)[None, :]
    masks = {
        "padded": ((key_at <= query_at)[None] & (key_at >= mx.array([0, 2, 7])[:, None, None]))[
            :, None
        ],
        "window": (key_at <= query_at) & (query_at - key_at < 8),
        "causal": "causal",
        "none": None,
    }
    mask = masks[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = attention_short_query(q, k, v, 0.25, mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5).item()
