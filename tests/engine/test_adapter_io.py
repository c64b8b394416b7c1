"""Adapter files: every imported adapter changes the logits exactly as the tool that trained it
does (PEFT in torch, mlx-lm in MLX, mlx-examples' lora.py layout), ours round-trip and load in
mlx-lm, and fusing an adapter into the base gives the adapted model's logits."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_core.config import ModelArgs, Quantization
from mlx_core.lora.formats import AdapterFormatError, load_adapter, save_adapter, save_adapter_npz
from mlx_core.lora.fuse import fuse_adapter
from mlx_core.lora.layers import TARGETS, Adapter, AdapterError
from mlx_core.weights import convert, load_model
from server.cli import adapters as cli_adapters
from server.cli import main as cli
from tests.engine.test_lora import lora_logits, random_adapter
from tests.models import hf_reference

TOKENS = np.random.RandomState(0).randint(3, 32000, size=(1, 12))
TOL = 2e-4


def base_logits(model_dir: Path) -> np.ndarray:
    return np.array(load_model(model_dir).model(mx.array(TOKENS)))


def assert_changes_logits(adapted: np.ndarray, model_dir: Path) -> None:
    # Guards every comparison: an adapter that did nothing would match trivially.
    assert np.abs(adapted - base_logits(model_dir)).max() > 0.05


# -- Hugging Face PEFT --------------------------------------------------------------------------
def save_peft(model_dir: Path, out: Path, **lora_config) -> np.ndarray:
    """Train-free PEFT LoRA with random B, saved by save_pretrained; returns PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        hf_reference(model_dir), LoraConfig(lora_dropout=0.0, **lora_config)
    ).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapter would be a no-op
                p.normal_(0.0, 0.3)
        logits = peft_model(torch.tensor(TOKENS)).logits.numpy()
    peft_model.save_pretrained(out)
    return logits


@pytest.mark.parametrize(
    "lora_config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules=list(TARGETS), use_rslora=True),
        # per-module ranks and alphas: padded to one rank, alphas folded into B
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"k_proj": 2},
            alpha_pattern={"layers.1.mlp.down_proj": 3},
        ),
    ],
)
def test_peft_adapter_gives_peft_logits(tiny_hf_model, tmp_path, lora_config):
    want = save_peft(tiny_hf_model, tmp_path / "peft", **lora_config)
    adapter = load_adapter(tmp_path / "peft")
    assert set(adapter.targets) == set(lora_config["target_modules"]) and adapter.layers == (0, 1)
    alpha, r = lora_config["lora_alpha"], lora_config["r"]
    assert adapter.scale == pytest.approx(alpha / (r**0.5 if lora_config.get("use_rslora") else r))
    ours = lora_logits(tiny_hf_model, adapter, TOKENS)
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=TOL)
    assert_changes_logits(ours, tiny_hf_model)


# -- mlx-lm -------------------------------------------------------------------------------------
def mlx_lm_model(model_dir: Path):
    from mlx_lm.utils import load_model as mlx_lm_load

    # mlx-lm 0.32 reads rope_theta only at the top level of config.json, transformers 5 writes
    # it under rope_parameters: pass it, or mlx-lm runs a different model than the checkpoint.
    theta = json.loads((model_dir / "config.json").read_text())["rope_parameters"]["rope_theta"]
    model, _ = mlx_lm_load(model_dir, model_config={"rope_theta": theta})
    return model


def test_mlx_lm_adapter_gives_mlx_lm_logits(tiny_hf_model, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    model = mlx_lm_model(tiny_hf_model)
    # What `mlx_lm.lora --train --num-layers 1` sets up: all linear layers of the last block.
    lora_parameters = {"rank": 4, "dropout": 0.0, "scale": 10.0}
    model.freeze()
    linear_to_lora_layers(model, 1, lora_parameters)
    rng = np.random.RandomState(2)
    for name, w in tree_flatten(model.trainable_parameters()):
        model.load_weights(
            [(name, mx.array(rng.normal(0, 0.3, w.shape).astype(np.float32)))], strict=False
        )
    want = np.array(model(mx.array(TOKENS)))
    # ...and what its trainer writes at the end
    folder = tmp_path / "adapters"
    folder.mkdir()
    mx.save_safetensors(
        str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    save_config(
        {
            **CONFIG_DEFAULTS,
            "num_layers": 1,
            "lora_parameters": lora_parameters,
            "adapter_path": str(folder),
        },
        folder / "adapter_config.json",
    )

    adapter = load_adapter(folder)
    assert adapter.layers == (1,) and adapter.targets == TARGETS and adapter.scale == 10.0
    ours = lora_logits(tiny_hf_model, adapter, TOKENS)
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=TOL)
    assert_changes_logits(ours, tiny_hf_model)


# -- mlx-examples' lora.py adapters.npz -----------------------------------------------------------
_SEED_NAMES = {
    "q_proj": "attention.wq",
    "k_proj": "attention.wk",
    "v_proj": "attention.wv",
    "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1",
    "down_proj": "feed_forward.w2",
    "up_proj": "feed_forward.w3",
}


def to_interleaved(b: mx.array, heads: int) -> mx.array:
    """HF RoPE order -> Mistral's interleaved pairs, on B's output columns (the inverse of
    weights.unpermute_rope_rows)."""
    bt = b.T
    out = bt.shape[0]
    return bt.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(out, -1).T


def write_seed_npz(path: Path, adapter: Adapter, args: ModelArgs, interleave: bool = True) -> Path:
    tensors = {}
    for (layer, target), (a, b) in adapter.weights.items():
        heads = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}.get(target)
        if heads and interleave:
            b = to_interleaved(b, heads)
        name = f"layers.{layer}.{_SEED_NAMES[target]}"
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
    mx.savez(str(path), **tensors)
    return path


def test_seed_npz_rows_are_reordered_for_rope(tiny_hf_model, tiny_model, tmp_path):
    args = tiny_model.args
    canonical = random_adapter(args, TARGETS, (0, 1), rank=8, seed=3, scale=2.0)
    path = write_seed_npz(tmp_path / "adapters.npz", canonical, args)

    loaded = load_adapter(path, args)
    assert loaded.scale == 2.0 and loaded.rank == 8 and loaded.targets == TARGETS
    want = lora_logits(tiny_hf_model, canonical, TOKENS)
    np.testing.assert_allclose(lora_logits(tiny_hf_model, loaded, TOKENS), want, atol=1e-4)
    assert_changes_logits(want, tiny_hf_model)

    # The same file read without the reordering is a different (wrong) adapter.
    tensors = mx.load(str(path))
    raw = Adapter(
        8,
        2.0,
        TARGETS,
        (0, 1),
        {
            (layer, t): (
                tensors[f"layers.{layer}.{_SEED_NAMES[t]}.lora_a"],
                tensors[f"layers.{layer}.{_SEED_NAMES[t]}.lora_b"],
            )
            for layer, t in canonical.weights
        },
    )
    assert np.abs(lora_logits(tiny_hf_model, raw, TOKENS) - want).max() > 1e-2

    with pytest.raises(AdapterFormatError, match="base model's args"):
        load_adapter(path)


def test_seed_npz_without_q_or_k_needs_no_model(tiny_hf_model, tiny_model, tmp_path):
    canonical = random_adapter(tiny_model.args, ("v_proj", "down_proj"), (1,), rank=8, seed=4)
    write_seed_npz(tmp_path / "adapters.npz", canonical, tiny_model.args)
    # a folder holding adapters.npz reads as the file
    np.testing.assert_allclose(
        lora_logits(tiny_hf_model, load_adapter(tmp_path), TOKENS),
        lora_logits(tiny_hf_model, canonical, TOKENS),
        atol=1e-4,
    )


# -- ours -----------------------------------------------------------------------------------------
def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    assert (got.rank, got.scale, got.targets, got.layers) == (
        want.rank,
        want.scale,
        want.targets,
        want.layers,
    )
    assert (got.alpha, got.dropout, got.fingerprint) == (want.alpha, want.dropout, want.fingerprint)
    assert set(got.weights) == set(want.weights)
    for key, (a, b) in want.weights.items():
        np.testing.assert_array_equal(np.array(got.weights[key][0]), np.array(a))
        np.testing.assert_array_equal(np.array(got.weights[key][1]), np.array(b))


def test_our_folder_round_trips_and_mlx_lm_reads_it(tiny_hf_model, tiny_model, tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    # Layer 0 only: mlx-lm counts layers from the end, so this checks num_layers is written right.
    adapter = random_adapter(
        tiny_model.args, ("q_proj", "v_proj", "gate_proj"), (0,), rank=4, seed=5, scale=1.5
    )
    adapter.alpha, adapter.dropout = 6.0, 0.05
    folder = save_adapter(tmp_path / "mine", adapter, base_model="tiny")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model"] == "tiny"

    loaded = load_adapter(folder)
    assert_same_adapter(loaded, adapter)
    assert loaded.base_model == "tiny"
    want = lora_logits(tiny_hf_model, adapter, TOKENS)
    assert_changes_logits(want, tiny_hf_model)

    model = mlx_lm_model(tiny_hf_model)
    load_adapters(model, str(folder))
    model.eval()  # no dropout
    np.testing.assert_allclose(np.array(model(mx.array(TOKENS))), want, atol=TOL, rtol=TOL)


def test_npz_and_json_pair_round_trips(tiny_model, tmp_path):
    adapter = random_adapter(
        tiny_model.args, ("k_proj", "o_proj", "up_proj", "down_proj"), (0, 1), rank=2, seed=6
    )
    path = save_adapter_npz(tmp_path / "run" / "adapters.npz", adapter)
    assert path.with_suffix(".json").exists()
    assert_same_adapter(load_adapter(path), adapter)
    assert_same_adapter(load_adapter(path.with_suffix(".json")), adapter)


# -- fuse -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4_model(tiny_hf_model, tmp_path_factory) -> Path:
    return convert(tiny_hf_model, tmp_path_factory.mktemp("q4"), quantize=Quantization(32, 4))


def test_fused_dense_model_gives_the_adapted_logits(tiny_hf_model):
    adapter = random_adapter(load_model(tiny_hf_model).args, TARGETS, (0, 1), rank=4, seed=7)
    loaded = load_model(tiny_hf_model)
    fuse_adapter(loaded.model, adapter)
    want = lora_logits(tiny_hf_model, adapter, TOKENS)
    np.testing.assert_allclose(np.array(loaded.model(mx.array(TOKENS))), want, atol=1e-4, rtol=1e-4)
    assert_changes_logits(want, tiny_hf_model)


def test_fused_quantized_model(tiny_hf_model, q4_model):
    import mlx.nn as nn

    args = load_model(q4_model).args
    adapter = random_adapter(args, TARGETS, (0, 1), rank=4, seed=8, scale=0.5)
    want = lora_logits(q4_model, adapter, TOKENS)
    base_error = np.abs(base_logits(q4_model) - want).mean()
    quantization_error = np.abs(base_logits(q4_model) - base_logits(tiny_hf_model)).mean()

    requantized = load_model(q4_model)
    fuse_adapter(requantized.model, adapter)
    assert isinstance(requantized.model.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    assert requantized.model.args.quantization == Quantization(32, 4)
    # Re-quantizing rounds the merged weights once more: the fused model is off by about what
    # 4-bit quantization costs the dense model, well below what the adapter changes.
    error = np.abs(np.array(requantized.model(mx.array(TOKENS))) - want).mean()
    assert error < 1.5 * quantization_error and error < 0.5 * base_error, (
        error,
        quantization_error,
        base_error,
    )

    dense = load_model(q4_model)
    fuse_adapter(dense.model, adapter, dequantize=True)
    assert dense.model.args.quantization is None
    assert not any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
        for _, m in dense.model.named_modules()
    )
    np.testing.assert_allclose(np.array(dense.model(mx.array(TOKENS))), want, atol=1e-4, rtol=1e-4)


def fuse_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_adapters.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["fuse", *argv])
    return ns.run(ns)


def test_fuse_command_writes_a_model_that_loads_and_generates(q4_model, tmp_path, capsys):
    adapter = random_adapter(
        load_model(q4_model).args, ("q_proj", "v_proj", "down_proj"), (1,), rank=4, seed=9
    )
    npz = save_adapter_npz(tmp_path / "adapters.npz", adapter)
    out = tmp_path / "fused"
    assert (
        fuse_cli("--model", str(q4_model), "--adapter-file", str(npz), "--save-path", str(out)) == 0
    )

    in_memory = load_model(q4_model)
    fuse_adapter(in_memory.model, adapter)
    saved = load_model(out)
    assert saved.args.quantization == Quantization(32, 4)
    np.testing.assert_array_equal(
        np.array(saved.model(mx.array(TOKENS))), np.array(in_memory.model(mx.array(TOKENS)))
    )

    capsys.readouterr()
    assert (
        cli.main(
            ["generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "5", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["generation_tokens"] == 5

    dense_out = tmp_path / "dense"
    assert (
        fuse_cli(
            "--model",
            str(q4_model),
            "--adapter-path",
            str(npz),
            "--save-path",
            str(dense_out),
            "--de-quantize",
        )
        == 0
    )
    assert "quantization" not in json.loads((dense_out / "config.json").read_text())


# -- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_folder(tiny_hf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft") / "adapter"
    save_peft(tiny_hf_model, out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return out


def test_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such adapter file or folder"):
        load_adapter(tmp_path / "nope")


def test_peft_bin_only_asks_for_safetensors(peft_folder, tmp_path):
    folder = shutil.copytree(peft_folder, tmp_path / "bin")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="safe_serialization=True"):
        load_adapter(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bias": "lora_only"}, "bias='none'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA"),
    ],
)
def test_peft_options_without_an_equivalent_are_refused(peft_folder, tmp_path, change, message):
    folder = shutil.copytree(peft_folder, tmp_path / "edited")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(folder)


def test_dora_is_refused(tiny_hf_model, tmp_path):
    save_peft(
        tiny_hf_model,
        tmp_path / "dora",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        use_dora=True,
    )
    with pytest.raises(AdapterFormatError, match="DoRA.*merge_and_unload"):
        load_adapter(tmp_path / "dora")
    mlx_lm_dora = tmp_path / "mlx-lm-dora"
    mlx_lm_dora.mkdir()
    (mlx_lm_dora / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "dora",
                "num_layers": 2,
                "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0},
            }
        )
    )
    with pytest.raises(AdapterFormatError, match="mlx_lm.fuse"):
        load_adapter(mlx_lm_dora)


def test_unknown_layouts_list_what_was_found_and_what_is_accepted(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(
        AdapterFormatError, match=r"pytorch_model\.bin.*accepted: a loraforge adapter folder"
    ):
        load_adapter(folder)
    mx.savez(str(tmp_path / "other.npz"), **{"encoder.w": mx.zeros((2, 2))})
    with pytest.raises(AdapterFormatError, match=r"encoder\.w.*accepted"):
        load_adapter(tmp_path / "other.npz")
    (folder / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(AdapterFormatError, match="match no known adapter config"):
        load_adapter(folder)


def test_adapter_for_another_model_is_refused(tiny_hf_model, tiny_model, tmp_path):
    from dataclasses import replace

    bigger = replace(tiny_model.args, dim=128, hidden_dim=256)
    folder = save_adapter(tmp_path / "big", random_adapter(bigger, ("q_proj",), (0,)))
    with pytest.raises(AdapterError, match="use an adapter trained on this base model"):
        load_adapter(folder).check_fits(tiny_model.args)
    # no fingerprint (mlx-examples npz): the shapes still tell
    npz = write_seed_npz(
        tmp_path / "adapters.npz", random_adapter(bigger, ("v_proj",), (0,)), bigger
    )
    with pytest.raises(AdapterError, match="different base model"):
        load_adapter(npz).check_fits(tiny_model.args)
    with pytest.raises(AdapterError, match="different base model"):
        fuse_cli(
            "--model",
            str(tiny_hf_model),
            "--adapter-path",
            str(npz),
            "--save-path",
            str(tmp_path / "x"),
        )
