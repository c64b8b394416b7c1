"""Memory preflight: estimate a LoRA run's peak memory before loading anything, refuse runs that
cannot fit with a message that says what would, and pick settings that fit (`--auto-fit`).

The estimate follows what MLX keeps alive at the peak of a training step (the start of the
backward pass), per token of a micro-batch (T = batch x row width):
- weights: every tensor of the base model (quantized ones at bits/8 + a scale and bias per group);
- LoRA: its parameters, gradients (two copies while accumulating) and Adam's two moments, fp32;
- activations: what the backward pass needs, only for layers at or above the lowest LoRA layer
  (nothing below it needs a gradient). Per layer: the residual input, the normed input of a
  LoRA'd projection, q/k after RoPE plus the fused qkv buffer, the attention probabilities
  (B x heads x L x L; the CPU's attention keeps them), the MLP's gate/up buffer and silu(gate).
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at
  a time;
- logits: B x L x vocab in fp32 (the loss is computed in fp32) and its gradient — for short rows
  of a small model this is the largest term;
- workspace: the largest short-lived buffers of one layer's forward/backward.
tests/training/test_memory.py holds the estimate to within 25% of measured peaks on the CPU backend.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_core.config import ModelArgs, Quantization
from mlx_core.data.batches import PAD_MULTIPLE, TokenizedExample
from mlx_core.errors import LoraforgeError
from mlx_core.lora.layers import projection_parts

if TYPE_CHECKING:
    from mlx_core.train.config import TrainConfig
    from mlx_core.train.events import TrainLog
    from mlx_core.weights import LoadedModel

GB = 1e9
_DTYPE_BYTES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "f32": 4,
    "f16": 2,
    "bf16": 2,
}
# Settings the message suggests, in the order auto_fit tries them.
_FIT_LAYERS = (8, 4, 2, 1)


class MemoryPreflightError(LoraforgeError, RuntimeError):
    """The run would not fit in memory; the message lists settings that would."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora: int  # parameters + gradients + optimizer state
    activations: int
    logits: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.workspace

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GB:.2f}"
            for name in ("weights", "lora", "activations", "logits", "workspace")
        )
        return f"~{self.total / GB:.2f} GB ({parts} GB)"


# -- the estimate -------------------------------------------------------------------------------
def count_parameters(args: ModelArgs) -> int:
    """Parameters of the base model (logical elements, whatever their storage)."""
    return sum(n for n, _ in _tensors(args))


def _tensors(args: ModelArgs) -> list[tuple[int, bool]]:
    """(elements, quantizable) for every base-model tensor."""
    D, hd, F, V = args.dim, args.head_dim, args.hidden_dim, args.vocab_size
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    layer = [
        (D * (q + 2 * kv), True),
        (q * D, True),
        (D * 2 * F, True),
        (F * D, True),
        (D, False),
        (D, False),
    ]
    out = [(V * D, True), (D, False)] + layer * args.n_layers
    if not args.tie_word_embeddings:
        out.append((V * D, True))
    return out


def weight_bytes(args: ModelArgs, dtype_bytes: int, quantization: Quantization | None) -> int:
    total = 0
    for n, quantizable in _tensors(args):
        if quantization is not None and quantizable:
            groups = n // quantization.group_size
            total += n * quantization.bits // 8 + 2 * groups * dtype_bytes
        else:
            total += n * dtype_bytes
    return total


def estimate_training_memory(
    args: ModelArgs,
    dtype_bytes: int,
    quantization: Quantization | None,
    batch_size: int,
    max_seq_len: int,
    lora_layers: int,
    rank: int,
    targets: Sequence[str],
    grad_checkpoint: bool,
    grad_accumulation: int = 1,
    packed: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one training step of micro-batch `batch_size` x `max_seq_len` tokens.

    `lora_layers` counts the last layers (-1 = all); `max_seq_len` is the widest row the data
    will produce (see `widest_row`), not necessarily the flag.
    """
    e = dtype_bytes
    n_lora = args.n_layers if lora_layers < 0 else min(lora_layers, args.n_layers)
    B, L = batch_size, max_seq_len
    T = B * L
    D, hd, F, V = args.dim, args.head_dim, args.hidden_dim, args.vocab_size
    H, Hkv = args.n_heads, args.n_kv_heads
    q, kv = H * hd, Hkv * hd

    parts = projection_parts(args)
    lora_params = n_lora * sum(
        rank * (parts[t].in_dims + parts[t].end - parts[t].start) for t in targets
    )
    grad_copies = 2 if grad_accumulation > 1 else 1
    lora = lora_params * 4 * (3 + grad_copies)

    # Elements per token, fitted to measured peaks on MLX's CPU backend (mlx 0.32, fp32 and
    # bf16; tests/training/test_memory.py checks them). `stream` is what the q/k/v side of a layer keeps
    # (residual input, normed input, h; the fused qkv buffer, q and k after RoPE), `mlp` the
    # gate/up buffer and silu(gate) (plus its sigmoid), `attn` the attention probabilities.
    stream = 3 * D + 2 * q + 3 * kv
    targeted = set(targets)
    if "o_proj" in targeted:
        stream += q  # the attention output, for the LoRA A gradient
    if targeted & {"gate_proj", "up_proj"}:
        stream += D  # the normed h
    down = F if "down_proj" in targeted else 0  # silu(gate) * up, for the LoRA A gradient
    attn = H * L  # the CPU's attention materializes B x H x L x L probabilities
    per_layer = 1.15 * stream + 3.8 * F + down + 1.4 * attn
    # Short-lived buffers at the peak: the top layer's backward (gradients of the MLP and
    # attention) and the residual stream's gradient.
    transient = 2.1 * stream + 6.4 * F + 0.9 * attn
    if grad_checkpoint:
        # Each layer keeps its input; one layer at a time is recomputed for its backward pass.
        activations = n_lora * T * D * e + T * per_layer * e
    else:
        activations = n_lora * T * per_layer * e
    window = args.sliding_window or L
    if packed or L > window:
        activations += B * L * L  # the boolean (segment / window) mask, shared by all layers

    # fp32 logits, their gradient, and (for 16-bit models) the 16-bit copies on both sides.
    logits = T * V * (32 - 4 * e)
    workspace = T * transient * e
    return MemoryEstimate(
        weight_bytes(args, e, quantization), lora, int(activations), int(logits), int(workspace)
    )


def widest_row(examples: Sequence[TokenizedExample], max_seq_len: int, pack: bool) -> int:
    """The widest micro-batch row the data pipeline will build (padding included)."""
    if pack or not examples:
        return max_seq_len
    longest = max(len(e.tokens) for e in examples) - 1
    return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_seq_len)


def checkpoint_dtype_bytes(folder: Path) -> int:
    """Bytes per float weight as stored in a model folder (safetensors header; else 2)."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for name, meta in header.items():
            if name != "__metadata__" and "norm" in name:
                return _DTYPE_BYTES.get(meta.get("dtype"), 2)
    return 2  # Mistral's .pth and the seed's weights.npz are 16-bit


# -- what the machine has -----------------------------------------------------------------------
def available_memory() -> int:
    """Bytes a training run may use on the default device.

    Metal: the recommended working set; CUDA: free device memory (else total); CPU: the OS's
    available RAM, capped by a container's cgroup limit (mx.device_info() has no size there).
    """
    if mx.default_device().type == mx.DeviceType.gpu:
        info = mx.device_info()
        for key in (
            "max_recommended_working_set_size",
            "free_memory",
            "total_memory",
            "memory_size",
        ):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return _system_available()


def _system_available() -> int:
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = _cgroup_room()
    return min(avail, limit) if limit else avail


def _cgroup_room() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


# -- deciding -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingShape:
    """The settings the estimate depends on (a subset of TrainConfig, per process)."""

    batch_size: int
    grad_accumulation: int
    lora_layers: int
    rank: int
    targets: tuple[str, ...]
    grad_checkpoint: bool
    quantize: int | None  # bits, or None for the dtype as loaded
    seq_len: int
    packed: bool = False
    group_size: int = 64

    def estimate(self, args: ModelArgs, dtype_bytes: int) -> MemoryEstimate:
        q = args.quantization or (
            Quantization(self.group_size, self.quantize) if self.quantize else None
        )
        return estimate_training_memory(
            args,
            dtype_bytes,
            q,
            self.batch_size,
            self.seq_len,
            self.lora_layers,
            self.rank,
            self.targets,
            self.grad_checkpoint,
            self.grad_accumulation,
            self.packed,
        )

    def flags(self, n_layers: int) -> str:
        layers = n_layers if self.lora_layers < 0 else min(self.lora_layers, n_layers)
        return f"batch {self.batch_size} with {layers} LoRA layers"


def preflight(
    estimate: MemoryEstimate,
    available: int,
    what: str = "this run",
    suggestions: Sequence[str] = (),
) -> None:
    """Raise MemoryPreflightError when the estimate exceeds the available bytes."""
    if estimate.total <= available:
        return
    hint = (
        ", ".join(suggestions) if suggestions else "a smaller model or a machine with more memory"
    )
    raise MemoryPreflightError(
        f"{what} needs ~{estimate.total / GB:.1f} GB, {available / GB:.1f} GB free: try {hint} "
        f"(estimate: {estimate.describe()}; --auto-fit picks settings that fit, "
        "--memory-limit-gb overrides the free memory seen)"
    )


def candidates(shape: TrainingShape, already_quantized: bool) -> list[tuple[str, TrainingShape]]:
    """Ever cheaper variants of `shape`, in the order they cost the fine-tune least:
    checkpointing (slower, same result), smaller micro-batches with more accumulation (same
    result), 4-bit base weights (QLoRA), then fewer LoRA layers (a smaller fine-tune)."""
    out: list[tuple[str, TrainingShape]] = []
    s = shape
    if not s.grad_checkpoint:
        s = replace(s, grad_checkpoint=True)
        out.append(("--grad-checkpoint", s))
    while s.batch_size > 1 and s.batch_size % 2 == 0:
        s = replace(s, batch_size=s.batch_size // 2, grad_accumulation=s.grad_accumulation * 2)
        out.append((f"--batch-size {s.batch_size} --grad-accumulation {s.grad_accumulation}", s))
    if s.quantize is None and not already_quantized:
        s = replace(s, quantize=4)
        out.append(("--quantize 4", s))
    for n in _FIT_LAYERS:
        if s.lora_layers < 0 or n < s.lora_layers:
            s = replace(s, lora_layers=n)
            out.append((f"--lora-layers {n}", s))
    return out


def auto_fit(
    args: ModelArgs, dtype_bytes: int, shape: TrainingShape, available: int
) -> tuple[TrainingShape, list[str], MemoryEstimate]:
    """The first variant of `shape` (see `candidates`) that fits: (shape, flags changed, estimate).

    Raises MemoryPreflightError when even the cheapest does not fit.
    """
    est = shape.estimate(args, dtype_bytes)
    if est.total <= available:
        return shape, [], est
    changed: list[str] = []
    for flag, s in candidates(shape, args.quantization is not None):
        changed.append(flag)
        est = s.estimate(args, dtype_bytes)
        if est.total <= available:
            return s, changed, est
    raise MemoryPreflightError(
        f"even {' '.join(changed)} needs ~{est.total / GB:.1f} GB, {available / GB:.1f} GB free: "
        "use a smaller model, shorter rows (--max-seq-len) or a machine with more memory"
    )


def _suggestions(
    args: ModelArgs, dtype_bytes: int, shape: TrainingShape, available: int
) -> list[str]:
    """Single changes that would fit on their own; else the first combination that fits."""

    def fits(s: TrainingShape) -> bool:
        return s.estimate(args, dtype_bytes).total <= available

    singles: list[str] = []
    if not shape.grad_checkpoint and fits(replace(shape, grad_checkpoint=True)):
        singles.append("--grad-checkpoint")
    b, acc = shape.batch_size, shape.grad_accumulation
    while b > 1 and b % 2 == 0:
        b, acc = b // 2, acc * 2
        if fits(replace(shape, batch_size=b, grad_accumulation=acc)):
            singles.append(f"--batch-size {b} --grad-accumulation {acc}")
            break
    if shape.quantize is None and args.quantization is None and fits(replace(shape, quantize=4)):
        singles.append("--quantize 4")
    for n in _FIT_LAYERS:
        if (shape.lora_layers < 0 or n < shape.lora_layers) and fits(replace(shape, lora_layers=n)):
            singles.append(f"--lora-layers {n}")
            break
    if singles:
        return singles
    flags: list[str] = []
    for flag, s in candidates(shape, args.quantization is not None):
        flags.append(flag)
        if fits(s):
            return [" ".join(flags)]
    return []


def plan_training_memory(
    model: str | Path | LoadedModel,
    args: ModelArgs,
    examples: Sequence[TokenizedExample],
    config: TrainConfig,
    world: int,
    log: TrainLog,
) -> TrainConfig:
    """The trainer's preflight: returns `config` (changed by --auto-fit) or raises
    MemoryPreflightError. Runs before the model is loaded when `model` is a path."""
    from mlx_core.weights import LoadedModel

    loaded = isinstance(model, LoadedModel)
    if isinstance(model, LoadedModel):
        dtype_bytes = model.model.model.norm.weight.dtype.size
    else:
        dtype_bytes = (
            _DTYPE_BYTES[config.dtype] if config.dtype else checkpoint_dtype_bytes(Path(model))
        )
    shape = TrainingShape(
        batch_size=config.batch_size // world,
        grad_accumulation=config.grad_accumulation,
        lora_layers=config.lora_layers,
        rank=config.lora_rank,
        targets=tuple(config.targets),
        grad_checkpoint=config.grad_checkpoint,
        quantize=config.quantize,
        seq_len=widest_row(examples, config.max_seq_len, config.pack),
        packed=config.pack,
        group_size=config.quantize_group_size,
    )
    if config.memory_limit_gb is not None:
        available = int(config.memory_limit_gb * GB)
    else:
        # A model already in memory is part of the estimate, so count its bytes as available
        # (free RAM / free CUDA memory no longer include them; Metal's working set is a budget).
        already = mx.get_active_memory() if loaded and not mx.metal.is_available() else 0
        available = available_memory() + already
    est = shape.estimate(args, dtype_bytes)
    if config.auto_fit:
        fitted, changed, est = auto_fit(args, dtype_bytes, shape, available)
        if changed:
            if loaded and fitted.quantize != shape.quantize:
                raise MemoryPreflightError(
                    "--auto-fit wants --quantize 4 but the model is already loaded: pass a model "
                    "path so it can be quantized at load"
                )
            log.warning(
                0,
                "auto_fit_changed",
                f"--auto-fit: {' '.join(changed)} (estimate {est.describe()}, "
                f"{available / GB:.1f} GB free)",
            )
            config = replace(
                config,
                batch_size=fitted.batch_size * world,
                grad_accumulation=fitted.grad_accumulation,
                grad_checkpoint=fitted.grad_checkpoint,
                quantize=fitted.quantize,
                lora_layers=fitted.lora_layers,
            )
    else:
        preflight(
            est,
            available,
            shape.flags(args.n_layers),
            _suggestions(args, dtype_bytes, shape, available),
        )
    log.say(f"Memory estimate {est.describe()}; {available / GB:.1f} GB available")
    return config
