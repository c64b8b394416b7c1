"""The memory preflight: its estimate against peaks measured on MLX's CPU backend, its refusal
message, and --auto-fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_core.config import ModelArgs, Quantization
from mlx_core.train.memory import (
    MemoryPreflightError,
    TrainingShape,
    auto_fit,
    available_memory,
    estimate_training_memory,
    plan_training_memory,
    preflight,
)

REPO = Path(__file__).resolve().parents[2]
MISTRAL_7B = ModelArgs(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    hidden_dim=14336,
    vocab_size=32000,
    sliding_window=4096,
)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _probe(spec_json: str) -> None:
    """Run in a fresh process: build a random model, train 2 steps, print measured vs estimated."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_core.data.batches import TokenizedExample
    from mlx_core.model import Mistral
    from mlx_core.train.config import TrainConfig, TrainData
    from mlx_core.train.loop import train
    from mlx_core.weights import LoadedModel

    c = json.loads(spec_json)
    args = ModelArgs(
        dim=c["dim"],
        n_layers=c["layers"],
        n_heads=c["heads"],
        n_kv_heads=c["kv"],
        hidden_dim=c["hidden"],
        vocab_size=c["vocab"],
    )
    dtype = {"f32": mx.float32, "bf16": mx.bfloat16}[c["dtype"]]
    mx.random.seed(0)
    model = Mistral(args)
    model.set_dtype(dtype)
    quant = None
    if c.get("quantize"):
        quant = Quantization(64, c["quantize"])
        nn.quantize(model, quant.group_size, quant.bits)
        args = replace(args, quantization=quant)
        model.args = args
    mx.eval(model.parameters())
    B, L = c["batch"], c["seq"]
    rng = np.random.default_rng(0)
    rows = [
        TokenizedExample(
            tuple(rng.integers(3, args.vocab_size, L + 1).tolist()), (False,) + (True,) * L
        )
        for _ in range(2 * B)
    ]
    config = TrainConfig(
        iters=2,
        batch_size=B,
        lora_layers=c["lora_layers"],
        targets=tuple(c["targets"]),
        grad_checkpoint=c["ckpt"],
        max_seq_len=L + 1,
        steps_per_eval=0,
        save_every=0,
        progress="none",
        adapter_path=c["out"],
    )
    # Pre-tokenized rows: the trainer never asks this model for its tokenizer.
    loaded = LoadedModel(model, args, None, Path("random"), "random")  # type: ignore[arg-type]
    result = train(loaded, TrainData(rows), config)
    estimate = estimate_training_memory(
        args, dtype.size, quant, B, L, c["lora_layers"], 8, c["targets"], c["ckpt"]
    )
    print(
        "PROBE " + json.dumps({"measured": result.peak_memory_gb * 1e9, "estimate": estimate.total})
    )


def _measure(tmp_path: Path, **spec) -> tuple[float, float]:
    spec.setdefault("out", str(tmp_path / "adapter"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = f"from tests.training.test_memory import _probe; _probe({json.dumps(json.dumps(spec))})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE "))
    got = json.loads(line[len("PROBE ") :])
    return got["measured"], got["estimate"]


BASE = dict(
    dim=256,
    layers=6,
    heads=4,
    kv=2,
    hidden=704,
    vocab=8192,
    dtype="f32",
    batch=2,
    seq=256,
    lora_layers=-1,
    targets=["q_proj", "v_proj"],
    ckpt=False,
)
CONFIGS = {
    # The seed's shape of run: vocab 32000, weights dominate, LoRA on the last 2 of 4 layers.
    "weights": dict(
        BASE, dim=512, layers=4, heads=8, hidden=1408, vocab=32000, batch=1, seq=32, lora_layers=2
    ),
    # QLoRA: 4-bit base, activations dominate.
    "qlora-4bit": dict(BASE, vocab=1024, quantize=4),
    # bf16 weights, every projection adapted.
    "bf16-all-targets": dict(
        BASE,
        dim=512,
        layers=4,
        heads=8,
        hidden=1408,
        vocab=32000,
        dtype="bf16",
        batch=1,
        seq=64,
        lora_layers=4,
        targets=ALL,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.slow
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, name):
    measured, estimate = _measure(tmp_path, **CONFIGS[name])
    assert measured > 100e6  # big enough that fixed overheads do not decide the comparison
    assert abs(estimate - measured) <= 0.25 * measured, (
        f"{name}: estimate {estimate:.3e}, measured {measured:.3e}"
    )


@pytest.mark.slow
def test_checkpointing_cuts_the_peak_as_estimated(tmp_path):
    # Long rows, so activations and logits dominate; the same run with and without checkpointing.
    measured_plain, estimate_plain = _measure(tmp_path / "a", **BASE)
    measured, estimate = _measure(tmp_path / "b", **dict(BASE, ckpt=True))
    assert measured_plain > 100e6 and measured > 100e6
    assert abs(estimate_plain - measured_plain) <= 0.25 * measured_plain
    assert abs(estimate - measured) <= 0.25 * measured
    assert measured < 0.8 * measured_plain


def test_refusal_says_what_would_fit():
    est = estimate_training_memory(MISTRAL_7B, 2, None, 4, 512, 16, 8, ("q_proj", "v_proj"), False)
    assert 15e9 < est.total < 40e9  # fp16 weights alone are 14.5 GB
    shape = TrainingShape(
        batch_size=4,
        grad_accumulation=1,
        lora_layers=16,
        rank=8,
        targets=("q_proj", "v_proj"),
        grad_checkpoint=False,
        quantize=None,
        seq_len=512,
    )
    available = int(est.total * 0.8)
    from mlx_core.train.memory import _suggestions

    hints = _suggestions(MISTRAL_7B, 2, shape, available)
    with pytest.raises(MemoryPreflightError) as err:
        preflight(est, available, shape.flags(32), hints)
    message = str(err.value)
    assert message.startswith("batch 4 with 16 LoRA layers needs ~")
    assert f"{available / 1e9:.1f} GB free: try " in message
    assert hints and all(h in message for h in hints)
    assert "--grad-checkpoint" in hints  # the change that costs the fine-tune nothing comes first
    preflight(est, est.total)  # fits exactly: no error


def test_auto_fit_picks_the_least_costly_change_that_fits():
    shape = TrainingShape(
        batch_size=4,
        grad_accumulation=1,
        lora_layers=16,
        rank=8,
        targets=("q_proj", "v_proj"),
        grad_checkpoint=False,
        quantize=None,
        seq_len=512,
    )
    # Room for bf16 weights plus checkpointed activations, not plain ones.
    plain = shape.estimate(MISTRAL_7B, 2).total
    ckpt = replace(shape, grad_checkpoint=True).estimate(MISTRAL_7B, 2).total
    fitted, changed, est = auto_fit(MISTRAL_7B, 2, shape, (plain + ckpt) // 2)
    assert changed == ["--grad-checkpoint"] and fitted.grad_checkpoint and fitted.batch_size == 4
    # A 12 GB machine: the bf16 weights alone (14.5 GB) do not fit, so the base gets quantized.
    fitted, changed, est = auto_fit(MISTRAL_7B, 2, shape, 12 * 10**9)
    assert "--quantize 4" in changed and fitted.quantize == 4 and est.total <= 12 * 10**9
    assert fitted.batch_size * fitted.grad_accumulation == 4  # the same effective batch
    with pytest.raises(MemoryPreflightError, match="smaller model"):
        auto_fit(MISTRAL_7B, 2, shape, 10**9)


def test_available_memory_is_the_machines():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory() <= total


def test_auto_fit_changes_the_run_and_says_so(tiny_model):
    from mlx_core.data.batches import TokenizedExample
    from mlx_core.train.config import TrainConfig
    from mlx_core.train.events import TrainerEvent, TrainLog, WarningEvent

    rows = [TokenizedExample(tuple(range(3, 3 + 97)), (False,) + (True,) * 96)] * 4
    config = TrainConfig(batch_size=4, lora_layers=-1, auto_fit=True, progress="none")
    args = tiny_model.args
    plain = estimate_training_memory(args, 4, None, 4, 96, -1, 8, config.targets, False).total
    ckpt = estimate_training_memory(args, 4, None, 4, 96, -1, 8, config.targets, True).total
    events: list[TrainerEvent] = []
    log = TrainLog(None, events.append, active=True, progress="none")
    limited = replace(config, memory_limit_gb=(plain + ckpt) / 2 / 1e9)
    fitted = plan_training_memory(tiny_model, args, rows, limited, 1, log)
    assert fitted.grad_checkpoint and fitted.batch_size == 4
    warning = events[-1]
    assert isinstance(warning, WarningEvent) and warning.code == "auto_fit_changed"
    assert "--grad-checkpoint" in warning.message
