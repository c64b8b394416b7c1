"""Prompts that reuse stored prefixes give the same tokens as prompts computed from nothing."""

from __future__ import annotations

import numpy as np

from mlx_core.engine import Engine
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
