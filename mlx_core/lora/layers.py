"""LoRA: trainable low-rank updates over frozen (dense or quantized) projections.

Adapters are described in Hugging Face's module names (q_proj ... down_proj), whatever the file
format they came from (see adapter_io.py). Our model fuses q/k/v and gate/up, so a LoRA target is
a slice of a fused projection's output; one wrapper per projection carries every target inside it.

Two wrappers:
- `LoRALinear` trains one adapter (a frozen base plus A/B per target, dropout, scale).
- `MultiLoRALinear` serves many adapters in one batch: the base matmul runs once for the whole
  batch, and each row adds its own adapter's low-rank term from stacked slots (slot 0 is all
  zeros: the base model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_core.config import ModelArgs
from mlx_core.errors import LoraforgeError
from mlx_core.model import Mistral

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")


class AdapterError(LoraforgeError, ValueError):
    """An adapter that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Part:
    """Where a Hugging Face projection lives in our model: module path and output slice."""

    target: str
    module: str  # e.g. "self_attn.qkv_proj", relative to a layer
    start: int
    end: int
    in_dims: int


def projection_parts(args: ModelArgs) -> dict[str, Part]:
    q, kv, h = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    return {
        "q_proj": Part("q_proj", "self_attn.qkv_proj", 0, q, args.dim),
        "k_proj": Part("k_proj", "self_attn.qkv_proj", q, q + kv, args.dim),
        "v_proj": Part("v_proj", "self_attn.qkv_proj", q + kv, q + 2 * kv, args.dim),
        "o_proj": Part("o_proj", "self_attn.o_proj", 0, args.dim, q),
        "gate_proj": Part("gate_proj", "mlp.gate_up_proj", 0, h, args.dim),
        "up_proj": Part("up_proj", "mlp.gate_up_proj", h, 2 * h, args.dim),
        "down_proj": Part("down_proj", "mlp.down_proj", 0, args.dim, h),
    }


def module_out_dims(args: ModelArgs) -> dict[str, int]:
    parts = projection_parts(args).values()
    return {p.module: max(q.end for q in parts if q.module == p.module) for p in parts}


@dataclass
class Adapter:
    """An adapter in canonical form: per (layer, target) A (in, r) and B (r, out) in HF layout.

    `scale` multiplies B @ A (alpha / rank for ours and PEFT, a fixed number for mlx-lm/the seed).
    """

    rank: int
    scale: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    weights: dict[tuple[int, str], tuple[mx.array, mx.array]] = field(default_factory=dict)
    alpha: float | None = None
    dropout: float = 0.0
    base_model: str | None = None
    fingerprint: str | None = None
    source_format: str | None = None  # "loraforge", "mlx-lm", "peft" or "mlx-examples-npz"

    def check_fits(self, args: ModelArgs) -> None:
        """Raise AdapterError unless every tensor fits the base model's shapes."""
        if self.fingerprint and self.fingerprint != args.shape_fingerprint():
            raise AdapterError(
                f"this adapter was trained on a model shaped {self.fingerprint}, but the base model "
                f"is {args.shape_fingerprint()}: use an adapter trained on this base model"
            )
        parts = projection_parts(args)
        for (layer, target), (a, b) in self.weights.items():
            if not 0 <= layer < args.n_layers:
                raise AdapterError(
                    f"adapter has layer {layer}, the base model has {args.n_layers} layers"
                )
            p = parts.get(target)
            if p is None:
                raise AdapterError(
                    f"adapter targets {target!r}; supported targets: {', '.join(TARGETS)}"
                )
            want_a, want_b = (p.in_dims, a.shape[1]), (a.shape[1], p.end - p.start)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(
                    f"adapter tensor for layer {layer} {target} has shapes {tuple(a.shape)} and "
                    f"{tuple(b.shape)}, the base model needs {want_a} and {want_b}: "
                    "it was trained on a different base model"
                )


# -- training: one adapter ----------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen projection plus trainable low-rank updates on slices of its output."""

    def __init__(
        self,
        base: nn.Module,
        parts: Sequence[Part],
        out_dims: int,
        rank: int,
        scale: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.out_dims = out_dims
        self.parts = list(parts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        bound = 1.0 / (parts[0].in_dims ** 0.5)
        # A random, B zero: the adapter starts as the identity update (as in the LoRA paper).
        self.lora_a = {p.target: mx.random.uniform(-bound, bound, (p.in_dims, rank)) for p in parts}
        self.lora_b = {p.target: mx.zeros((rank, p.end - p.start)) for p in parts}

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.dropout is not None:
            x = self.dropout(x)
        names = [p.target for p in self.parts]
        a = (
            mx.concatenate([self.lora_a[n] for n in names], axis=1)
            if len(names) > 1
            else self.lora_a[names[0]]
        )
        z = (x @ a.astype(x.dtype)) @ block_rows(
            self.parts, [self.lora_b[n] for n in names], self.out_dims
        ).astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)


def block_rows(parts: Sequence[Part], bs: Sequence[mx.array], out_dims: int) -> mx.array:
    """Stack B matrices into one (sum r, out) matrix, each placed over its output slice."""
    rows = []
    for p, b in zip(parts, bs):
        if p.start == 0 and p.end == out_dims:
            rows.append(b)
            continue
        pieces = [b]
        if p.start:
            pieces.insert(0, mx.zeros((b.shape[0], p.start), dtype=b.dtype))
        if p.end < out_dims:
            pieces.append(mx.zeros((b.shape[0], out_dims - p.end), dtype=b.dtype))
        rows.append(mx.concatenate(pieces, axis=1))
    return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)


def lora_layer_indices(n_layers: int, lora_layers: int | None) -> tuple[int, ...]:
    """The last `lora_layers` layers (the seed's --lora-layers), or all when None/-1."""
    if lora_layers is None or lora_layers < 0 or lora_layers >= n_layers:
        return tuple(range(n_layers))
    return tuple(range(n_layers - lora_layers, n_layers))


def apply_lora(
    model: Mistral,
    rank: int,
    scale: float,
    targets: Iterable[str],
    layers: Sequence[int],
    dropout: float = 0.0,
) -> None:
    """Freeze the model and wrap the targeted projections of `layers` with LoRALinear."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise AdapterError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    model.freeze()
    parts = projection_parts(model.args)
    outs = module_out_dims(model.args)
    for i in layers:
        layer = model.model.layers[i]
        by_module: dict[str, list[Part]] = {}
        for t in targets:
            by_module.setdefault(parts[t].module, []).append(parts[t])
        for module, ps in by_module.items():
            parent, attr = resolve_target(layer, module)
            setattr(
                parent,
                attr,
                LoRALinear(getattr(parent, attr), ps, outs[module], rank, scale, dropout),
            )


def resolve_target(layer: nn.Module, module: str) -> tuple[nn.Module, str]:
    owner, attr = module.split(".")
    return getattr(layer, owner), attr


def lora_modules(model: Mistral) -> Iterable[tuple[int, LoRALinear]]:
    for i, layer in enumerate(model.model.layers):
        for owner in (layer.self_attn, layer.mlp):
            for value in owner.children().values():
                if isinstance(value, LoRALinear):
                    yield i, value


def extract_adapter(
    model: Mistral, rank: int, scale: float, targets: Sequence[str], layers: Sequence[int], **meta
) -> Adapter:
    weights = {}
    for i, m in lora_modules(model):
        for p in m.parts:
            weights[(i, p.target)] = (m.lora_a[p.target], m.lora_b[p.target])
    return Adapter(
        rank,
        scale,
        tuple(targets),
        tuple(layers),
        weights,
        fingerprint=model.args.shape_fingerprint(),
        **meta,
    )


def load_adapter_into(model: Mistral, adapter: Adapter) -> None:
    """Put an adapter's tensors into LoRALinear wrappers made by `apply_lora` (resume, import)."""
    found = set()
    for i, m in lora_modules(model):
        for p in m.parts:
            if (i, p.target) in adapter.weights:
                a, b = adapter.weights[(i, p.target)]
                m.lora_a[p.target], m.lora_b[p.target] = a, b
                found.add((i, p.target))
    missing = set(adapter.weights) - found
    if missing:
        raise AdapterError(
            f"the model has no LoRA layer for {sorted(missing)[:3]}: apply_lora first with the adapter's targets and layers"
        )


def trainable_parameters_count(model: Mistral) -> int:
    from mlx.utils import tree_flatten

    flat = tree_flatten(model.trainable_parameters())
    assert isinstance(flat, list)  # annotated list | dict; without `destination` it is a list
    return sum(v.size for _, v in flat)


# -- serving: many adapters in one batch ----------------------------------------------------------
