"""Sampling rules and stop sequences, on the engine with the tiny model."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_core.engine import Engine
from mlx_core.sampling import RowSampler, SamplingParams, StopMatcher, sample


def generate(model, prompt, **kw):
    engine = Engine(model.model, model.tokenizer)
    outs = list(engine.generate(model.tokenizer.encode(prompt), SamplingParams(**kw)))
    return (
        "".join(o.text for o in outs),
        [t for o in outs for t in o.tokens],
        outs[-1].finish_reason,
    )


def test_same_seed_same_text(tiny_model):
    a = generate(tiny_model, "Once upon", max_tokens=20, temperature=1.0, seed=3)
    b = generate(tiny_model, "Once upon", max_tokens=20, temperature=1.0, seed=3)
    c = generate(tiny_model, "Once upon", max_tokens=20, temperature=1.0, seed=4)
    assert a == b and a[1] != c[1]


def test_tiny_top_p_is_greedy(tiny_model):
    greedy = generate(tiny_model, "Hello", max_tokens=15, temperature=0.0)
    nucleus = generate(tiny_model, "Hello", max_tokens=15, temperature=1.5, top_p=1e-6, seed=1)
    assert greedy[1] == nucleus[1]


def test_max_tokens_and_finish_reasons(tiny_model):
    _, tokens, finish = generate(tiny_model, "Hi", max_tokens=7, temperature=0.0, ignore_eos=True)
    assert len(tokens) == 7 and finish == "length"


def test_stop_string_spanning_tokens(tiny_model):
    text, _, _ = generate(tiny_model, "Hi", max_tokens=30, temperature=0.0, ignore_eos=True)
    stop = text[6:12]
    cut, _, finish = generate(
        tiny_model, "Hi", max_tokens=30, temperature=0.0, stop=(stop,), ignore_eos=True
    )
    assert finish == "stop" and cut == text[: text.index(stop)]


def test_eos_ends_generation(tiny_model):
    eos = tiny_model.tokenizer.eos_id
    _, tokens, finish = generate(
        tiny_model, "Hi", max_tokens=10, temperature=0.0, logit_bias=((eos, 100.0),)
    )
    assert tokens == [eos] and finish == "stop"


def test_logprobs_are_log_probabilities(tiny_model):
    logits = mx.random.normal((2, 50))
    rows = [
        RowSampler(SamplingParams(temperature=0.0, logprobs=3)),
        RowSampler(SamplingParams(temperature=0.0, logprobs=3)),
    ]
    r = sample(logits, rows)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert r.tokens.tolist() == mx.argmax(logits, axis=-1).tolist()
    assert r.logprobs.tolist() == pytest.approx(mx.max(lp, axis=-1).tolist(), abs=1e-5)
    assert r.top_ids[:, 0].tolist() == r.tokens.tolist()


def test_penalties_discourage_repeats(tiny_model):
    _, plain, _ = generate(tiny_model, "a", max_tokens=30, temperature=0.0, ignore_eos=True)
    _, penalised, _ = generate(
        tiny_model,
        "a",
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize(
    "pieces, stops, emitted, hit",
    [
        (["SELECT a", " FROM t", "\nQ: next"], ["\n"], "SELECT a FROM t", True),
        (["ab", "c<", "/s", "> tail"], ["</s>"], "abc", True),
        (["ab", "c<", "/x"], ["</s>"], "abc</x", False),
        (["no stop here"], ["STOP"], "no stop here", False),
    ],
)
def test_stop_matcher(pieces, stops, emitted, hit):
    m = StopMatcher(stops)
    out, reached = "", False
    for p in pieces:
        text, reached = m.feed(p)
        out += text
        if reached:
            break
    if not reached:
        out += m.flush()
    assert out == emitted and reached == hit


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=5).validate(100)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate(100)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1000, 1.0),)).validate(100)
