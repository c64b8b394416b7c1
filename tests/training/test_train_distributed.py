"""Data-parallel training: two processes started by MLX's launcher (ring backend, this machine)
train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_core.lora.formats import load_adapter
from mlx_core.train.launch import free_ports
from tests.training.test_train import _data_dir

pytestmark = pytest.mark.slow  # starts other processes

REPO = Path(__file__).resolve().parents[2]


def _launcher() -> list[str]:
    """`mlx.launch` as installed beside this Python (the console script of the mlx wheel)."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    # The console script's target: mlx has no `python -m mlx.launch`.
    return [sys.executable, "-m", "mlx._distributed_utils.launch"]


def _spec(tmp: Path, model: Path, data: Path, name: str) -> tuple[Path, Path]:
    out = tmp / name
    config = {
        "iters": 3,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "steps_per_report": 1,
        "steps_per_eval": 0,
        "val_batches": -1,
        "save_every": 0,
        "lora_layers": -1,
        "adapter_path": str(out),
        "events_jsonl": str(out / "events.jsonl"),
        "progress": "lines",
    }
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"model": str(model), "data": str(data), "config": config}))
    return spec, out


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tiny_hf_model, tmp_path):
    data = _data_dir(tmp_path / "data", 8, 4, short=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    spec1, one = _spec(tmp_path, tiny_hf_model, data, "one")
    single = subprocess.run(
        [sys.executable, "-m", "mlx_core.train", str(spec1)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr

    spec2, two = _spec(tmp_path, tiny_hf_model, data, "two")
    launch = [
        *_launcher(),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(2)),
        sys.executable,
        "-m",
        "mlx_core.train",
        str(spec2),
    ]
    double = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stdout + double.stderr

    a, b = _events(one), _events(two)
    # Only rank 0 reports: one start, one done, one line per step.
    assert [e["type"] for e in b].count("start") == 1 and b[0]["world_size"] == 2
    assert a[0]["world_size"] == 1
    train_a = [e["loss"] for e in a if e["type"] == "train"]
    train_b = [e["loss"] for e in b if e["type"] == "train"]
    assert len(train_a) == len(train_b) == 3
    np.testing.assert_allclose(train_b, train_a, rtol=1e-5)
    # Token counts are summed over both ranks: the same throughput numerator as one process.
    assert [e["trained_tokens"] for e in b if e["type"] == "train"] == [
        e["trained_tokens"] for e in a if e["type"] == "train"
    ]
    val_a = [e["val_loss"] for e in a if e["type"] == "eval"]
    val_b = [e["val_loss"] for e in b if e["type"] == "eval"]
    assert val_b == pytest.approx(val_a, rel=1e-5)

    adapter_a, adapter_b = load_adapter(one), load_adapter(two)
    # Two ranks sum their halves' gradients in another order than one process does, and a
    # multi-threaded BLAS (OpenBLAS) orders its sums freely: float32 noise of a few 1e-6 after
    # three Adam steps, far below the weights' own scale (~0.1).
    for key, (wa, wb) in adapter_a.weights.items():
        np.testing.assert_allclose(
            np.array(adapter_b.weights[key][0]), np.array(wa), rtol=1e-4, atol=2e-5
        )
        np.testing.assert_allclose(
            np.array(adapter_b.weights[key][1]), np.array(wb), rtol=1e-4, atol=2e-5
        )
