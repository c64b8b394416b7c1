"""Serving many adapters in one batch: stacked adapter slots and the layers that read them.

Each projection gets `MultiLoRALinear`: the base matmul once for the batch plus a low-rank term
per row, masked by the row's slot (slot 0 = no adapter). `AdapterSlots` loads adapters into free
slots lazily and evicts the least recently used idle one."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_core.errors import EngineError
from mlx_core.lora.layers import (
    Adapter,
    AdapterError,
    Part,
    block_rows,
    module_out_dims,
    projection_parts,
    resolve_target,
)
from mlx_core.model import Mistral


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
        assert self.ids is not None, "mask() is only asked for while some row uses an adapter"
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
        if self._ctx.ids is None or self._a is None or self._b is None:
            return y
        # Both products on 2-D operands, (B*L, in) rows: a decode step's x is (B, 1, in), which a
        # batched product may treat as B matrix-vector products each reading all of A and B.
        rows = x.reshape(-1, x.shape[-1])
        z = (rows @ self._a).reshape(*x.shape[:-1], -1) * self._ctx.mask(self._width, x.dtype)
        # addmm: the second product and the sum in one kernel (one launch of four per projection
        # fewer each step, where launches bound a GPU decode; and the sum is rounded once)
        out = mx.addmm(y.reshape(rows.shape[0], -1), z.reshape(rows.shape[0], -1), self._b)
        return out.reshape(y.shape)

    def set_slot(self, slot: int, ab: tuple[mx.array, mx.array] | None, dtype: mx.Dtype) -> None:
        """Write one slot's A (in, r) and B (r, out) (None clears the slot)."""
        if ab is None and self._a is None:
            return
        r = 0 if ab is None else ab[0].shape[1]
        if r > self._width:
            self._grow(-(-r // 16) * 16, dtype)
        assert self._a is not None and self._b is not None, "a rank-0 adapter has no slot columns"
        R = self._width
        block_a = mx.zeros((self.in_dims, R), dtype=dtype)
        block_b = mx.zeros((R, self.out_dims), dtype=dtype)
        if ab is not None:
            block_a[:, :r] = ab[0].astype(dtype)
            block_b[:r, :] = ab[1].astype(dtype)
        self._a[:, slot * R : (slot + 1) * R] = block_a
        self._b[slot * R : (slot + 1) * R, :] = block_b

    def _grow(self, width: int, dtype: mx.Dtype) -> None:
        S, old = self.n_slots, self._width
        a = mx.zeros((self.in_dims, S, width), dtype=dtype)
        b = mx.zeros((S, width, self.out_dims), dtype=dtype)
        if self._a is not None and self._b is not None:
            a[:, :, :old] = self._a.reshape(self.in_dims, S, old)
            b[:, :old, :] = self._b.reshape(S, old, self.out_dims)
        self._a, self._b = a.reshape(self.in_dims, S * width), b.reshape(S * width, self.out_dims)
        self._width = width


class AdapterSlots:
    """Adapters resident in the model, one per slot, least recently used evicted first.

    `acquire` pins a slot for a request, `release` unpins it: a pinned slot is never evicted, so
    requests in flight keep their adapter through an unload or a replacement (reference counted:
    the slot is freed at the last release), while new requests for an unloaded one are refused.
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
                parent, attr = resolve_target(layer, module)
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
        """The adapter's slot, pinned until `release`; None while every slot is pinned. Raises
        EngineError (not_found) for an adapter unloaded while others still use it."""
        if adapter_id in self._doomed:
            raise EngineError(
                "this adapter was deleted while the request waited: GET /v1/models lists "
                "the models you can use",
                kind="not_found",
                param="model",
            )
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
                ps = [p for p in parts.values() if p.module == module]
                ab = None if adapter is None else _slot_block(adapter, i, ps, outs[module])
                _resolve_module(layer, module).set_slot(slot, ab, self.dtype)
        mx.eval([w for layer in self.model.model.layers for w in _slot_arrays(layer)])


def _slot_block(
    adapter: Adapter, layer: int, parts: Sequence[Part], out_dims: int
) -> tuple[mx.array, mx.array] | None:
    """A (in, r) side by side and B (r, out) with the scale folded in, for the adapter's targets
    among one projection's `parts` in `layer`; None when it targets none of them."""
    held = [
        (p, adapter.weights[(layer, p.target)])
        for p in parts
        if (layer, p.target) in adapter.weights
    ]
    if not held:
        return None
    a = mx.concatenate([w[0] for _, w in held], axis=1)
    b = block_rows([p for p, _ in held], [w[1] * adapter.scale for _, w in held], out_dims)
    return a, b


def _resolve_module(layer: nn.Module, module: str) -> MultiLoRALinear:
    parent, attr = resolve_target(layer, module)
    return getattr(parent, attr)


def _slot_arrays(layer: nn.Module) -> list[mx.array]:
    out = []
    for owner in (layer.self_attn, layer.mlp):
        for m in owner.children().values():
            if isinstance(m, MultiLoRALinear) and m._a is not None and m._b is not None:
                out += [m._a, m._b]
    return out
