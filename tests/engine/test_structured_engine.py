"""Constrained rows in the Engine's running batch: they leave the other rows' text alone, heal
prompts, and refuse a bad constraint before anything is queued."""

from __future__ import annotations

import json
import re

import pytest

from mlx_core.engine import Engine, GenerationRequest
from mlx_core.errors import LoraforgeError
from mlx_core.sampling import SamplingParams
from mlx_core.structured import Constraint, ConstraintError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, tuple[str, str, int]]:
    """(text, finish_reason, prompt_tokens) per request id, all run in one batch."""
    for r in requests:
        engine.add_request(r)
    text: dict[str, list[str]] = {r.request_id: [] for r in requests}
    done: dict[str, tuple[str, str, int]] = {}
    while engine.has_work():
        for out in engine.step():
            text[out.request_id].append(out.text)
            if out.finish_reason:
                done[out.request_id] = (
                    "".join(text[out.request_id]),
                    out.finish_reason,
                    out.prompt_tokens,
                )
    return done


def test_free_rows_read_the_same_beside_constrained_ones(tiny_model):
    tok = tiny_model.tokenizer
    engine = Engine(tiny_model.model, tok, prefix_cache_tokens=0)
    prompts = {"a": tok.encode("Hello there"), "b": tok.encode("Once upon a time")}
    alone = {k: run(engine, [GenerationRequest(k, p, GREEDY)])[k] for k, p in prompts.items()}
    # Constrained rows join, one ends after its first tokens (the choice), one runs to the limit:
    # the batch switches between the split and the pipelined step while "a" and "b" decode.
    mixed = run(
        engine,
        [
            GenerationRequest("a", prompts["a"], GREEDY),
            GenerationRequest(
                "c", tok.encode("Pick:"), GREEDY, constraint=Constraint("choice", ["x", "yy"])
            ),
            GenerationRequest("b", prompts["b"], GREEDY),
            GenerationRequest(
                "r", tok.encode("Digits:"), GREEDY, constraint=Constraint("regex", "[0-9]{30}")
            ),
        ],
    )
    assert mixed["a"] == alone["a"] and mixed["b"] == alone["b"]
    assert mixed["c"][:2] in (("x", "stop"), ("yy", "stop"))
    assert re.fullmatch("[0-9]{1,12}", mixed["r"][0]) and mixed["r"][1] == "length"


def test_healing_runs_the_shorter_prompt_and_reports_the_sent_one(tiny_model):
    tok = tiny_model.tokenizer
    engine = Engine(tiny_model.model, tok, prefix_cache_tokens=0)
    prompt = tok.encode("Q: What is it?\nA: ")
    healed = run(engine, [GenerationRequest("h", prompt, GREEDY, token_healing=True)])["h"]
    assert healed[2] == len(prompt)  # usage counts the prompt as sent
    # The first token had to start with the backed-off space, which the text does not repeat.
    # (That the answer then equals the unhealed prompt's needs a trained model: tests/server.)
    assert healed[0] and not healed[0].startswith(" ")


def test_a_bad_constraint_fails_on_the_callers_thread(tiny_model):
    engine = Engine(tiny_model.model, tiny_model.tokenizer)
    req = GenerationRequest("x", [1, 2, 3], GREEDY, constraint=Constraint("regex", "(("))
    with pytest.raises(ConstraintError) as e:
        engine.add_request(req)
    assert isinstance(e.value, LoraforgeError) and "regex" in str(e.value)
    assert not engine.has_work()


def tokens_of(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """The generated token ids per request id, all run in one batch."""
    for r in requests:
        engine.add_request(r)
    ids: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            ids[out.request_id] += out.tokens
    return ids


PICK = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["colour", "ok"],
    "additionalProperties": False,
}


def test_free_rows_get_their_own_tokens_beside_sampled_constrained_rows(tiny_model):
    tok = tiny_model.tokenizer
    engine = Engine(tiny_model.model, tok, prefix_cache_tokens=0)
    free = SamplingParams(max_tokens=24, temperature=0.0, logprobs=2)
    prompts = [tok.encode(t) for t in ("Hello there", "Once upon a time", "A list:", "Q: 2+2?")]
    alone = [tokens_of(engine, [GenerationRequest("x", p, free)])["x"] for p in prompts]
    constraints = [
        Constraint("json", PICK),
        Constraint("regex", "[a-z]{3,40}"),
        Constraint("grammar", 'start: N ("," N)*\nN: /[0-9]{1,3}/\n'),
    ]
    hot = SamplingParams(max_tokens=16, temperature=1.0)
    # Free and constrained rows interleaved, constrained ones ending at different steps, so the
    # batch runs constrained steps, pipelined ones and the change between them.
    mixed = []
    for i, p in enumerate(prompts):
        mixed.append(GenerationRequest(f"free{i}", p, free))
        c = constraints[i % len(constraints)]
        mixed.append(GenerationRequest(f"c{i}", tok.encode("Go:"), hot, constraint=c))
    got = tokens_of(engine, mixed)
    for i in range(len(prompts)):
        assert got[f"free{i}"] == alone[i]


def test_many_sampled_constrained_requests_all_match(tiny_model):
    tok = tiny_model.tokenizer
    engine = Engine(tiny_model.model, tok, prefix_cache_tokens=0)
    kinds = [
        (Constraint("json", PICK, compact=True), None),
        (Constraint("regex", "(yes|no)-[0-9]{2,4}"), re.compile("(yes|no)-[0-9]{2,4}")),
        (Constraint("choice", ["alpha", "beta gamma"]), re.compile("alpha|beta gamma")),
    ]
    requests, want = [], {}
    for i in range(30):
        c, pattern = kinds[i % len(kinds)]
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=i, top_p=0.95 if i % 2 else 1)
        requests.append(GenerationRequest(f"r{i}", tok.encode(f"Item {i}:"), params, constraint=c))
        want[f"r{i}"] = pattern
    requests.insert(7, GenerationRequest("free", tok.encode("Hi"), SamplingParams(max_tokens=40)))
    done = run(engine, requests)
    for rid, pattern in want.items():
        text, finish, _ = done[rid]
        assert finish == "stop", (rid, text)
        if pattern is None:
            value = json.loads(text)
            assert value["colour"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
        else:
            assert pattern.fullmatch(text), (rid, text)
    assert done["free"][1] == "length"
