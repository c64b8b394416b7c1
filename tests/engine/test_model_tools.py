"""`loraforge convert` / `generate` on a tiny HF checkpoint, model formats, and bad model folders."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_core.weights as weights
from mlx_core.weights import WeightsError, load_model
from server.cli.main import main


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_then_generate(tiny_hf_model, tmp_path, capsys):
    out = tmp_path / "mlx"
    code, stdout, _ = run(
        ["convert", "--model", str(tiny_hf_model), "--out", str(out), "--dtype", "f32"], capsys
    )
    assert code == 0 and (out / "model.safetensors").exists() and (out / "tokenizer.model").exists()
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6
    tokens = mx.array([[1, 22557, 1526, 28747]])
    a = np.array(load_model(tiny_hf_model).model(tokens))
    b = np.array(load_model(out).model(tokens))
    np.testing.assert_array_equal(a, b)
    code, stdout, stderr = run(
        ["generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "8", "--json"],
        capsys,
    )
    result = json.loads(stdout)
    assert code == 0 and result["generation_tokens"] == 8 and result["generation_tps"] > 0
    code, stdout, stderr = run(
        ["generate", "--model", str(out), "--prompt", "Hello", "--max-tokens", "5"], capsys
    )
    assert stdout.startswith("Hello") and "Generation: 5 tokens" in stderr and "tokens/s" in stderr


def test_quantized_model_loads_and_generates(tiny_hf_model, tmp_path, capsys):
    out = tmp_path / "q4"
    code, _, _ = run(
        [
            "convert",
            "--model",
            str(tiny_hf_model),
            "--out",
            str(out),
            "-q",
            "4",
            "--group-size",
            "32",
        ],
        capsys,
    )
    assert code == 0
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 32,
        "bits": 4,
    }
    q = load_model(out)
    dense = load_model(tiny_hf_model)
    tokens = mx.array([[1, 22557, 1526, 28747, 354]])
    got, want = np.array(q.model(tokens)), np.array(dense.model(tokens))
    # 4-bit weights move the logits a little, not a lot
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
    code, stdout, _ = run(
        ["generate", "--model", str(out), "--prompt", "Hi", "--max-tokens", "4", "--json"], capsys
    )
    assert code == 0 and json.loads(stdout)["generation_tokens"] == 4


def test_quantize_at_load_matches_a_quantized_checkpoint(tiny_hf_model, tmp_path):
    from mlx_core.config import Quantization

    weights.convert(tiny_hf_model, tmp_path / "q", quantize=Quantization(32, 4))
    a = load_model(tmp_path / "q")
    b = load_model(tiny_hf_model, quantize=Quantization(32, 4))
    tokens = mx.array([[1, 22557, 1526]])
    np.testing.assert_allclose(np.array(a.model(tokens)), np.array(b.model(tokens)), atol=1e-5)


def test_sharded_checkpoint(tiny_hf_model, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_SHARD_BYTES", 2_000_000)
    out = weights.convert(tiny_hf_model, tmp_path / "sharded")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    tokens = mx.array([[1, 22557, 1526]])
    np.testing.assert_array_equal(
        np.array(load_model(out).model(tokens)), np.array(load_model(tiny_hf_model).model(tokens))
    )
    (out / shards[-1]).unlink()
    with pytest.raises(WeightsError, match=f"{shards[-1]} is missing"):
        load_model(out)


def test_seed_convert_folder_loads(tiny_hf_model, tmp_path):
    """mlx-examples' Dec-2023 convert.py output: weights.npz (Mistral names, fp16) + params.json."""
    import torch

    from tests.models import hf_state_dict_to_mistral_pth

    pth = hf_state_dict_to_mistral_pth(tiny_hf_model, tmp_path / "pth")
    state = torch.load(pth / "consolidated.00.pth")
    seed = tmp_path / "seed"
    seed.mkdir()
    np.savez(seed / "weights.npz", **{k: v.to(torch.float16).numpy() for k, v in state.items()})
    params = json.loads((pth / "params.json").read_text())
    params.pop("sliding_window")  # the seed's convert.py dropped it
    (seed / "params.json").write_text(json.dumps(params))
    shutil.copyfile(pth / "tokenizer.model", seed / "tokenizer.model")
    loaded = load_model(seed)
    assert loaded.source_format == "mlx-examples-npz"
    tokens = mx.array([[1, 22557, 1526, 28747]])
    ref = np.array(load_model(tiny_hf_model).model(tokens))
    np.testing.assert_allclose(np.array(loaded.model(tokens)), ref, atol=0.05, rtol=0.05)  # fp16


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights found"),
        (lambda d: (d / "config.json").unlink(), "no config.json or params.json"),
        (
            lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
            "not supported",
        ),
        (lambda d: _edit_config(d, hidden_size=128), "does not match|shape"),
        (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"), "safetensors"),
    ],
)
def test_bad_model_folders_give_one_line_errors(model_copy, capsys, breakage, message):
    breakage(model_copy)
    code, stdout, stderr = run(
        ["generate", "--model", str(model_copy), "--prompt", "x", "--max-tokens", "1"], capsys
    )
    assert code == 2
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    import re

    assert re.search(message, stderr), stderr


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_torch_for_pth_is_explained(tiny_hf_model, tmp_path, monkeypatch):
    import builtins

    from tests.models import hf_state_dict_to_mistral_pth

    folder = hf_state_dict_to_mistral_pth(tiny_hf_model, tmp_path / "pth")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(WeightsError, match=r"loraforge\[convert\]"):
        load_model(folder)
