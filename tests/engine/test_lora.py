"""LoRA layers: training wrappers and the multi-adapter serving slots agree exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_core.lora.layers import (
    Adapter,
    AdapterError,
    apply_lora,
    extract_adapter,
    lora_layer_indices,
    trainable_parameters_count,
)
from mlx_core.lora.slots import AdapterSlots
from mlx_core.weights import load_model


def random_adapter(args, targets, layers, rank=4, seed=0, scale=2.0) -> Adapter:
    from mlx_core.lora.layers import projection_parts

    parts = projection_parts(args)
    rng = np.random.RandomState(seed)
    weights = {}
    for i in layers:
        for t in targets:
            p = parts[t]
            a = rng.normal(0, 0.3, (p.in_dims, rank)).astype(np.float32)
            b = rng.normal(0, 0.3, (rank, p.end - p.start)).astype(np.float32)
            weights[(i, t)] = (mx.array(a), mx.array(b))
    return Adapter(
        rank, scale, tuple(targets), tuple(layers), weights, fingerprint=args.shape_fingerprint()
    )


def lora_logits(model_dir, adapter, tokens):
    loaded = load_model(model_dir)
    apply_lora(loaded.model, adapter.rank, adapter.scale, adapter.targets, adapter.layers)
    from mlx_core.lora.layers import load_adapter_into

    load_adapter_into(loaded.model, adapter)
    return np.array(loaded.model(mx.array(tokens)))


def test_only_adapters_train(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    layers = lora_layer_indices(loaded.args.n_layers, 1)
    assert layers == (1,)
    apply_lora(loaded.model, 8, 2.0, ("q_proj", "v_proj"), layers)
    # q: 64 -> 64, v: 64 -> 32 (2 KV heads of 16), rank 8, one layer
    assert trainable_parameters_count(loaded.model) == 8 * (64 + 64) + 8 * (64 + 32)


def test_fresh_adapter_is_the_identity(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    tokens = mx.array([[1, 330, 4123, 28705, 12]])
    before = np.array(loaded.model(tokens))
    apply_lora(
        loaded.model,
        8,
        2.0,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        (0, 1),
    )
    np.testing.assert_allclose(np.array(loaded.model(tokens)), before, atol=1e-6)


def test_batched_slots_match_each_adapter_alone(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    args = loaded.args
    adapters = {
        "qv": random_adapter(args, ("q_proj", "v_proj"), (0, 1), rank=4, seed=1),
        "mlp": random_adapter(args, ("gate_proj", "down_proj", "o_proj"), (1,), rank=8, seed=2),
        "k": random_adapter(args, ("k_proj", "up_proj"), (0,), rank=2, seed=3, scale=0.5),
    }
    tokens = np.random.RandomState(0).randint(3, 32000, size=(1, 12))
    alone = {name: lora_logits(tiny_hf_model, a, tokens)[0] for name, a in adapters.items()}
    base = np.array(loaded.model(mx.array(tokens)))[0]
    slots = AdapterSlots(loaded.model, max_loaded=2, max_rank=16, loader=adapters.__getitem__)
    s_qv, s_mlp = slots.acquire("qv"), slots.acquire("mlp")
    slots.activate([s_mlp, 0, s_qv])
    out = np.array(loaded.model(mx.array(np.repeat(tokens, 3, axis=0))))
    np.testing.assert_allclose(out[0], alone["mlp"], atol=1e-4)
    np.testing.assert_allclose(out[1], base, atol=1e-4)
    np.testing.assert_allclose(out[2], alone["qv"], atol=1e-4)
    # Both slots pinned: a third adapter must wait...
    assert slots.acquire("k") is None
    # ...until one is released; the least recently used idle slot is reused.
    slots.release(s_qv)
    s_k = slots.acquire("k")
    assert s_k == s_qv and slots.resident() == ["mlp", "k"]
    slots.activate([s_k])
    np.testing.assert_allclose(np.array(loaded.model(mx.array(tokens)))[0], alone["k"], atol=1e-4)


def test_unload_waits_for_requests_in_flight(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    a = random_adapter(loaded.args, ("q_proj",), (0,))
    slots = AdapterSlots(loaded.model, max_loaded=1, max_rank=8, loader=lambda _: a)
    s = slots.acquire("x")
    slots.unload("x")
    assert slots.resident() == ["x"]  # still pinned by the request in flight
    slots.release(s)
    assert slots.resident() == []


def test_adapter_shape_mismatch_is_refused(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    a = random_adapter(loaded.args, ("q_proj",), (0,))
    a.weights[(0, "q_proj")] = (mx.zeros((32, 4)), mx.zeros((4, 64)))
    a.fingerprint = None
    with pytest.raises(AdapterError, match="different base model"):
        a.check_fits(loaded.args)
    slots = AdapterSlots(
        loaded.model,
        max_loaded=1,
        max_rank=2,
        loader=lambda _: random_adapter(loaded.args, ("q_proj",), (0,)),
    )
    with pytest.raises(AdapterError, match="max-lora-rank"):
        slots.acquire("big")


def test_extract_round_trip(tiny_hf_model):
    loaded = load_model(tiny_hf_model)
    apply_lora(loaded.model, 4, 2.0, ("q_proj", "v_proj"), (1,))
    ad = extract_adapter(loaded.model, 4, 2.0, ("q_proj", "v_proj"), (1,))
    assert set(ad.weights) == {(1, "q_proj"), (1, "v_proj")}
    ad.check_fits(loaded.args)


def test_slots_serve_a_bf16_model(tiny_hf_model):
    """Half-precision models (what real checkpoints are) work with adapter slots on every backend."""
    loaded = load_model(tiny_hf_model, dtype="bf16")
    adapter = random_adapter(loaded.args, ("q_proj", "v_proj"), (0, 1), rank=4, seed=5)
    tokens = mx.array(np.random.RandomState(1).randint(3, 32000, size=(1, 10)))
    reference = load_model(tiny_hf_model, dtype="bf16")
    from mlx_core.lora.layers import load_adapter_into

    apply_lora(reference.model, adapter.rank, adapter.scale, adapter.targets, adapter.layers)
    load_adapter_into(reference.model, adapter)
    want = np.array(reference.model(tokens).astype(mx.float32))
    slots = AdapterSlots(loaded.model, max_loaded=1, max_rank=8, loader=lambda _: adapter)
    slots.activate([slots.acquire("a")])
    got = np.array(loaded.model(tokens).astype(mx.float32))
    base = np.array(load_model(tiny_hf_model, dtype="bf16").model(tokens).astype(mx.float32))
    assert np.abs(want - base).max() > 1.0  # the adapter matters
    np.testing.assert_allclose(got, want, atol=0.25, rtol=0.05)  # bf16 rounding only
