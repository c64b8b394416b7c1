"""One request's fault stays its own: the engine ends that row alone and keeps serving the rest."""

from __future__ import annotations

import pytest

from mlx_core.engine import Engine, GenerationOutput, GenerationRequest
from mlx_core.errors import EngineError
from mlx_core.lora.slots import AdapterSlots
from mlx_core.sampling import SamplingParams
from mlx_core.structured import Constraint
from mlx_core.weights import load_model
from tests.engine.test_lora import random_adapter

PROMPT = [1, 415, 2936, 9060, 285, 1142]


def run(engine: Engine, max_steps: int = 500) -> dict[str, list[GenerationOutput]]:
    """Step until idle; every request's outputs, by id."""
    outs: dict[str, list[GenerationOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not go idle")


def good(rid: str, n: int = 12) -> GenerationRequest:
    return GenerationRequest(
        rid, PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    )


def finished(outs: list[GenerationOutput]) -> GenerationOutput:
    assert outs[-1].finish_reason is not None
    return outs[-1]


@pytest.fixture
def loaded(tiny_hf_model):
    return load_model(tiny_hf_model)


def test_a_seed_the_sampler_refuses_ends_only_its_row(loaded):
    engine = Engine(loaded.model, loaded.tokenizer)
    with pytest.raises(EngineError) as e:  # the edge refuses it...
        engine.add_request(GenerationRequest("bad", PROMPT, SamplingParams(seed=-1)))
    assert e.value.param == "seed"
    for i in range(3):
        engine.add_request(good(f"g{i}"))
    # ...and a row that got past it anyway fails alone, at the step that builds its sampler.
    engine._inbox.put(("add", GenerationRequest("bad", PROMPT, SamplingParams(seed=2**64)), None))
    engine._inbox.put(("add", good("g3"), engine._row(good("g3"))))
    outs = run(engine)
    bad = finished(outs["bad"])
    assert bad.finish_reason == "error" and bad.error is not None
    for i in range(4):
        assert finished(outs[f"g{i}"]).finish_reason == "length"
        assert finished(outs[f"g{i}"]).completion_tokens == 12


def test_a_failing_forward_fails_the_running_rows_and_the_engine_goes_on(loaded, monkeypatch):
    engine = Engine(loaded.model, loaded.tokenizer, max_num_seqs=2)
    for i in range(4):  # two run, two wait for a slot
        engine.add_request(good(f"r{i}", n=20))
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    real = engine._forward_pending
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real()

    monkeypatch.setattr(engine, "_forward_pending", broken)
    outs = run(engine)
    for i in (0, 1):
        assert finished(outs[f"r{i}"]).finish_reason == "error"
    for i in (2, 3):  # queued, not part of the failed batch
        assert finished(outs[f"r{i}"]).finish_reason == "length"
    engine.add_request(good("after"))
    assert finished(run(engine)["after"]).finish_reason == "length"


def test_a_failing_prefill_fails_its_group_only(loaded, monkeypatch):
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.add_request(good("running", n=30))
    for _ in range(3):
        engine.step()
    engine.add_request(good("new"))
    real = engine._prefill_chunk

    def broken(job, budget, outs):
        raise MemoryError("no memory for this prompt")

    monkeypatch.setattr(engine, "_prefill_chunk", broken)
    first = engine.step()  # admits "new", whose prefill fails
    monkeypatch.setattr(engine, "_prefill_chunk", real)
    outs = run(engine)
    new = [o for o in first if o.request_id == "new"]
    assert new and new[-1].finish_reason == "error" and "new" not in outs
    assert finished(outs["running"]).finish_reason == "length"


def test_a_constraint_that_fails_ends_only_its_row(loaded):
    engine = Engine(loaded.model, loaded.tokenizer)
    digits = Constraint("regex", "[0-9]{8}")
    for rid in ("ok", "broken"):
        engine.add_request(GenerationRequest(rid, PROMPT, good(rid, 20).params, constraint=digits))
    engine.add_request(good("free"))
    outs: dict[str, list[GenerationOutput]] = {}
    while not any(s.req.request_id == "broken" for s in engine.running):
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    seq = next(s for s in engine.running if s.req.request_id == "broken")
    assert seq.constraint is not None

    def advance(token: int) -> bool:
        raise RuntimeError("matcher state lost")

    seq.constraint.advance = advance  # type: ignore[method-assign]
    for rid, more in run(engine).items():
        outs.setdefault(rid, []).extend(more)
    assert finished(outs["broken"]).finish_reason == "error"
    ok = finished(outs["ok"])
    assert ok.finish_reason == "stop"
    assert "".join(o.text for o in outs["ok"]).isdigit()
    assert finished(outs["free"]).finish_reason == "length"


def test_an_adapter_deleted_while_queued_is_a_not_found_for_its_request(loaded):
    a = random_adapter(loaded.args, ("q_proj",), (0,))
    registered = {"x": a}

    def loader(adapter_id: str):
        if adapter_id not in registered:
            raise EngineError("deleted", kind="not_found", param="model")
        return registered[adapter_id]

    slots = AdapterSlots(loaded.model, max_loaded=2, max_rank=8, loader=loader)
    engine = Engine(loaded.model, loaded.tokenizer, adapter_slots=slots)
    engine.add_request(GenerationRequest("using", PROMPT, good("using", 20).params, adapter="x"))
    for _ in range(3):
        engine.step()
    # Deleted while one request uses it: that one keeps it, a queued one for it is refused.
    del registered["x"]
    slots.unload("x")
    engine.add_request(GenerationRequest("late", PROMPT, good("late").params, adapter="x"))
    engine.add_request(GenerationRequest("gone", PROMPT, good("gone").params, adapter="y"))
    engine.add_request(good("base"))
    outs = run(engine)
    assert finished(outs["using"]).finish_reason == "length"
    for rid in ("late", "gone"):
        out = finished(outs[rid])
        assert out.finish_reason == "error"
        assert isinstance(out.error, EngineError) and out.error.kind == "not_found"
    assert finished(outs["base"]).finish_reason == "length"
    assert slots.resident() == []  # freed at the last release
