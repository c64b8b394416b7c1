"""The compiled decode step (used on CUDA) against the eager one, on the CPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_core.decode import CompiledDecode
from mlx_core.engine import Engine
from mlx_core.sampling import SamplingParams

TOL = 1e-5


def test_compiled_step_matches_eager_across_padding_and_the_window(tiny_model):
    model = tiny_model.model
    rng = np.random.RandomState(1)
    prompt = rng.randint(3, 32000, size=(2, 12))
    eager, compiled = model.new_cache(2, pad=[0, 5]), model.new_cache(2, pad=[0, 5])
    for c in (eager, compiled):
        c.step = 8  # grow and drop columns often: the window (24) is passed within 40 tokens
    mx.eval(model(mx.array(prompt), cache=eager), model(mx.array(prompt), cache=compiled))
    decode = CompiledDecode(model)
    for _ in range(40):
        tok = mx.array(rng.randint(3, 32000, size=(2, 1)))
        want = model(tok, cache=eager)[:, -1, :]
        got = decode(tok, compiled)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=TOL, rtol=TOL)
    assert compiled.start > 0 and compiled.offset == eager.offset


def test_engine_gives_the_same_tokens_with_the_compiled_step(tiny_model):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompt = np.random.RandomState(2).randint(3, 32000, size=20).tolist()
    texts = []
    for flag in (False, True):
        engine = Engine(tiny_model.model, tiny_model.tokenizer, compiled_decode=flag)
        texts.append([t for out in engine.generate(prompt, params) for t in out.tokens])
    assert texts[0] == texts[1]
