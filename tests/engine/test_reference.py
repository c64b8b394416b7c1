"""Our Mistral against transformers' MistralForCausalLM on the same random checkpoint.

Window convention: transformers 5.x (`sliding_window_overlay`) lets a query at position q see keys
k with q - sliding_window < k <= q, i.e. `sliding_window` keys including itself; ours is the same.
The tiny model's window (24) is shorter than the 60-token prompts, so the window matters.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_core.engine import Engine
from mlx_core.sampling import SamplingParams
from mlx_core.weights import load_model
from tests.models import hf_reference, hf_state_dict_to_mistral_pth

TOL = 2e-4


@pytest.fixture(scope="module")
def reference(tiny_hf_model):
    return hf_reference(tiny_hf_model)


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(3, 32000, size=(2, 60))


def hf_logits(ref, tokens) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor(tokens)).logits.numpy()


def test_window_is_shorter_than_the_prompt(tiny_model, tokens):
    assert tiny_model.args.sliding_window < tokens.shape[1]


def test_logits_match_transformers(tiny_model, reference, tokens):
    ours = np.array(tiny_model.model(mx.array(tokens)))
    np.testing.assert_allclose(ours, hf_logits(reference, tokens), atol=TOL, rtol=TOL)


def test_cached_decode_matches_across_the_window(tiny_model, reference, tokens):
    ref = hf_logits(reference, tokens)
    cache = tiny_model.model.new_cache(batch_size=2)
    cache.step = 8  # drop columns early so the compaction path runs inside 60 tokens
    steps = [np.array(tiny_model.model(mx.array(tokens[:, :5]), cache=cache))]
    for t in range(5, tokens.shape[1]):
        steps.append(np.array(tiny_model.model(mx.array(tokens[:, t : t + 1]), cache=cache)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=TOL, rtol=TOL)
    assert cache.start > 0  # columns outside the window were dropped


def test_left_padded_batch_matches_single_rows(tiny_model, reference, tokens):
    short = tokens[1, :35]
    batch = np.zeros((2, 60), dtype=np.int64)
    batch[0] = tokens[0]
    batch[1, 25:] = short
    cache = tiny_model.model.new_cache(batch_size=2, pad=[0, 25])
    out = np.array(tiny_model.model(mx.array(batch), cache=cache))
    np.testing.assert_allclose(out[0], hf_logits(reference, tokens[:1])[0], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(
        out[1, 25:], hf_logits(reference, short[None])[0], atol=TOL, rtol=TOL
    )


def test_greedy_generation_matches_transformers(tiny_model, reference, tokens):
    prompt = tokens[0, :10].tolist()
    with torch.no_grad():
        ref = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 10:].tolist()
    engine = Engine(tiny_model.model, tiny_model.tokenizer)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    ours = [t for out in engine.generate(prompt, params) for t in out.tokens]
    assert ours == ref


def test_no_cache_generation_matches_cached(tiny_model, tokens):
    seq = tokens[0, :10].tolist()
    for _ in range(30):  # recompute everything each time: no cache involved
        logits = tiny_model.model(mx.array([seq]))[0, -1]
        seq.append(int(mx.argmax(logits).item()))
    engine = Engine(tiny_model.model, tiny_model.tokenizer)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    cached = [t for out in engine.generate(tokens[0, :10].tolist(), params) for t in out.tokens]
    assert cached == seq[10:]


def test_mistral_pth_checkpoint_gives_the_same_logits(tiny_hf_model, reference, tokens, tmp_path):
    folder = hf_state_dict_to_mistral_pth(tiny_hf_model, tmp_path / "mistral")
    loaded = load_model(folder)
    assert loaded.source_format == "mistral-pth"
    ours = np.array(loaded.model(mx.array(tokens)))
    np.testing.assert_allclose(ours, hf_logits(reference, tokens), atol=TOL, rtol=TOL)
