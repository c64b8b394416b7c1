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

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .model import Mistral

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")


class AdapterError(ValueError):
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
        z = (x @ a.astype(x.dtype)) @ _block_rows(
            self.parts, [self.lora_b[n] for n in names], self.out_dims
        ).astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)


def _block_rows(parts: Sequence[Part], bs: Sequence[mx.array], out_dims: int) -> mx.array:
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
            parent, attr = _resolve(layer, module)
            setattr(
                parent,
                attr,
                LoRALinear(getattr(parent, attr), ps, outs[module], rank, scale, dropout),
            )


def _resolve(layer: nn.Module, module: str) -> tuple[nn.Module, str]:
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

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# -- serving: many adapters in one batch ----------------------------------------------------------
class SlotContext:
    """The adapter slot of every batch row for the next forward, shared by all wrappers."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.ids: mx.array | None = None  # (B,) slot per row; None: no row uses an adapter
        self._masks: dict[tuple[int, mx.Dtype], mx.array] = {}

    def set(self, ids: mx.array | None) -> None:
        self.ids = ids
        self._masks.clear()

    def mask(self, width: int, dtype: mx.Dtype) -> mx.array:
        """(B, 1, S*width): 1 over the columns of each row's own slot, 0 elsewhere."""
        key = (width, dtype)
        if key not in self._masks:
            cols = mx.arange(self.n_slots * width) // width
            self._masks[key] = (cols[None, :] == self.ids[:, None]).astype(dtype)[:, None, :]
        return self._masks[key]


class MultiLoRALinear(nn.Module):
    """A projection serving every resident adapter at once.

    All slots' A matrices sit side by side, (in, S*R), and their B matrices stacked, (S*R, out),
    so the low-rank term is two small dense matmuls for the whole batch; a per-row mask keeps
    only the row's own slot. Dense rather than `mx.gather_mm`: gather_mm is float32-only on the
    CPU backend, and this costs two small GEMMs per projection (S*R is a few hundred columns).
    Slot 0 stays zero: the base model.
    """

    def __init__(
        self, base: nn.Module, in_dims: int, out_dims: int, n_slots: int, ctx: SlotContext
    ) -> None:
        super().__init__()
        self.base = base
        self.in_dims, self.out_dims, self.n_slots = in_dims, out_dims, n_slots
        self._ctx = ctx
        self._width = 0  # R: columns per slot (the largest rank seen, rounded up to 16)
        self._a: mx.array | None = None  # (in, S*R)
        self._b: mx.array | None = None  # (S*R, out), scale folded in

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self._ctx.ids is None or self._a is None:
            return y
        z = (x @ self._a) * self._ctx.mask(self._width, x.dtype)
        return y + z @ self._b

    def set_slot(self, slot: int, a: mx.array | None, b: mx.array | None, dtype: mx.Dtype) -> None:
        """Write one slot's A (in, r) and B (r, out) (None clears the slot)."""
        if a is None and self._a is None:
            return
        r = 0 if a is None else a.shape[1]
        if r > self._width:
            self._grow(-(-r // 16) * 16, dtype)
        R = self._width
        block_a = mx.zeros((self.in_dims, R), dtype=dtype)
        block_b = mx.zeros((R, self.out_dims), dtype=dtype)
        if a is not None:
            block_a[:, :r] = a.astype(dtype)
            block_b[:r, :] = b.astype(dtype)
        self._a[:, slot * R : (slot + 1) * R] = block_a
        self._b[slot * R : (slot + 1) * R, :] = block_b

    def _grow(self, width: int, dtype: mx.Dtype) -> None:
        S, old = self.n_slots, self._width
        a = mx.zeros((self.in_dims, S, width), dtype=dtype)
        b = mx.zeros((S, width, self.out_dims), dtype=dtype)
        if self._a is not None:
            a[:, :, :old] = self._a.reshape(self.in_dims, S, old)
            b[:, :old, :] = self._b.reshape(S, old, self.out_dims)
        self._a, self._b = a.reshape(self.in_dims, S * width), b.reshape(S * width, self.out_dims)
        self._width = width


class AdapterSlots:
    """Adapters resident in the model, one per slot, least recently used evicted first.

    `acquire` pins a slot for a request, `release` unpins it: a pinned slot is never evicted, so
    requests in flight keep their adapter through an unload or a replacement.
    """

    def __init__(
        self, model: Mistral, max_loaded: int, max_rank: int, loader: Callable[[str], Adapter]
    ) -> None:
        self.model, self.max_rank, self.loader = model, max_rank, loader
        self.n_slots = max_loaded + 1  # slot 0: no adapter
        self.ctx = SlotContext(self.n_slots)
        self.dtype = model.model.norm.weight.dtype
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, LRU order
        self._pins = [0] * self.n_slots
        self._doomed: set[str] = set()  # unloaded while pinned: freed at the last release
        self._wrap()

    def _wrap(self) -> None:
        parts = projection_parts(self.model.args)
        outs = module_out_dims(self.model.args)
        ins = {p.module: p.in_dims for p in parts.values()}
        for layer in self.model.model.layers:
            for module in outs:
                parent, attr = _resolve(layer, module)
                setattr(
                    parent,
                    attr,
                    MultiLoRALinear(
                        getattr(parent, attr), ins[module], outs[module], self.n_slots, self.ctx
                    ),
                )

    def resident(self) -> list[str]:
        return list(self._resident)

    def acquire(self, adapter_id: str) -> int | None:
        slot = self._resident.get(adapter_id)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._install(slot, self.loader(adapter_id))
            self._resident[adapter_id] = slot
        self._resident.move_to_end(adapter_id)
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            for adapter_id in [a for a in self._doomed if self._resident.get(a) == slot]:
                self._evict(adapter_id)

    def unload(self, adapter_id: str) -> None:
        """Forget an adapter; requests still using it finish with it first."""
        slot = self._resident.get(adapter_id)
        if slot is None:
            return
        if self._pins[slot]:
            self._doomed.add(adapter_id)
        else:
            self._evict(adapter_id)

    def activate(self, slots: Sequence[int]) -> None:
        self.ctx.set(mx.array(list(slots), dtype=mx.int32) if any(slots) else None)

    def _free_slot(self) -> int | None:
        used = set(self._resident.values())
        for s in range(1, self.n_slots):
            if s not in used:
                return s
        for adapter_id, s in self._resident.items():  # least recently used first
            if self._pins[s] == 0:
                self._evict(adapter_id)
                return s
        return None

    def _evict(self, adapter_id: str) -> None:
        slot = self._resident.pop(adapter_id)
        self._doomed.discard(adapter_id)
        self._install(slot, None)

    def _install(self, slot: int, adapter: Adapter | None) -> None:
        if adapter is not None and adapter.rank > self.max_rank:
            raise AdapterError(
                f"adapter rank {adapter.rank} is above --max-lora-rank {self.max_rank}: "
                "restart the server with a larger --max-lora-rank"
            )
        parts = projection_parts(self.model.args)
        outs = module_out_dims(self.model.args)
        for i, layer in enumerate(self.model.model.layers):
            for module in outs:
                wrapper = _resolve_module(layer, module)
                ps = [p for p in parts.values() if p.module == module]
                held = [
                    (p, adapter.weights[(i, p.target)])
                    for p in ps
                    if adapter is not None and (i, p.target) in adapter.weights
                ]
                if not held:
                    wrapper.set_slot(slot, None, None, self.dtype)
                    continue
                a = mx.concatenate([w[0] for _, w in held], axis=1)
                b = _block_rows(
                    [p for p, _ in held], [w[1] * adapter.scale for _, w in held], outs[module]
                )
                wrapper.set_slot(slot, a, b, self.dtype)
        mx.eval([w for layer in self.model.model.layers for w in _slot_arrays(layer)])


def _resolve_module(layer: nn.Module, module: str) -> MultiLoRALinear:
    parent, attr = _resolve(layer, module)
    return getattr(parent, attr)


def _slot_arrays(layer: nn.Module) -> list[mx.array]:
    out = []
    for owner in (layer.self_attn, layer.mlp):
        for m in owner.children().values():
            if isinstance(m, MultiLoRALinear) and m._a is not None:
                out += [m._a, m._b]
    return out
