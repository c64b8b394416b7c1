"""Training checkpoints: `<adapter_path>/checkpoints/step-<n>/`, written atomically.

A checkpoint folder is a loadable adapter folder (adapters.safetensors + adapter_config.json,
via adapter_io) plus what a resume needs to continue bit for bit:
- optimizer.safetensors: the optimizer's flattened state (moments, step counter, lr);
- trainer_state.json: the step, the data stream's position, the RNG scheme, and the run's
  identity (the settings that give the saved state its meaning) with a fingerprint of it.

Atomic: everything is written into a hidden temporary folder that is renamed into place, so a
crash (or a cancelled job) never leaves a half-written `step-<n>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_core.lora.formats import load_adapter, save_adapter
from mlx_core.lora.layers import Adapter
from mlx_core.weights import load_tensors

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; the message says why."""


@dataclass
class TrainerState:
    step: int  # optimizer updates done
    data: dict  # the BatchStream position: {"step", "epoch", "step_in_epoch"}
    rng: dict  # how the run draws random numbers from here on (see train._step_seed)
    identity: dict  # run settings the saved tensors depend on
    fingerprint: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "data": self.data,
                "rng": self.rng,
                "identity": self.identity,
                "fingerprint": self.fingerprint,
            },
            indent=2,
        )


def fingerprint(identity: dict) -> str:
    """A short stable hash of a run's identity settings."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable "name: checkpoint X, this run Y" for each setting that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}")
    return out


def checkpoint_dir(adapter_path: Path, step: int) -> Path:
    return Path(adapter_path) / CHECKPOINTS / f"step-{step}"


def latest_checkpoint(adapter_path: Path) -> Path | None:
    """The complete checkpoint with the highest step under `adapter_path`, or None."""
    root = Path(adapter_path) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m[1]), d))
    return max(found)[1] if found else None


def save_checkpoint(
    adapter_path: Path,
    state: TrainerState,
    adapter: Adapter,
    optimizer_tensors: dict[str, mx.array],
    base_model: str | None,
    keep: int = 0,
) -> Path:
    """Write step-<n>/ atomically; with keep > 0 delete all but the newest `keep` checkpoints."""
    final = checkpoint_dir(adapter_path, state.step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(tmp, adapter, base_model)
    mx.save_safetensors(str(tmp / OPTIMIZER_FILE), optimizer_tensors)
    # The state file goes last: latest_checkpoint only trusts folders that have it.
    (tmp / STATE_FILE).write_text(state.to_json())
    if final.exists():  # a re-run over an old run's folder: replace it whole
        old = root / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep > 0:
        _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m[1]), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)))
    for _, d in steps[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    state: TrainerState
    adapter: Adapter
    optimizer_tensors: dict[str, mx.array]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by save_checkpoint."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a training checkpoint (no {STATE_FILE}); pass a "
            f"{CHECKPOINTS}/step-<n> folder, or --resume alone for the latest one"
        )
    try:
        raw = json.loads(state_file.read_text())
        state = TrainerState(
            int(raw["step"]),
            dict(raw["data"]),
            dict(raw["rng"]),
            dict(raw["identity"]),
            str(raw["fingerprint"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{state_file}: unreadable ({e}); resume from an earlier checkpoint or start afresh"
        ) from e
    opt_file = path / OPTIMIZER_FILE
    if not opt_file.is_file():
        raise CheckpointError(f"{opt_file} is missing; resume from an earlier checkpoint")
    try:
        optimizer_state = load_tensors(opt_file)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{opt_file}: unreadable ({e}); resume from an earlier checkpoint or start afresh"
        ) from e
    return Checkpoint(path, state, load_adapter(path), optimizer_state)
