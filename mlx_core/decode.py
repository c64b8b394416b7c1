"""One compiled graph for the single-token decode step of the whole batch.

At batch 1 with 4-bit weights the GPU streams a token's weights in ~1.5 ms, while building the
step's ~800 lazy operations in Python and encoding them costs the host several ms: decode is
host-bound. `mx.compile` traces the step once per (batch, cache capacity) and replays it without
Python, fusing the elementwise operations on the way.

A compiled graph needs fixed shapes, and the eager step's keys grow by one column a token. Here the
step writes its new column into the cache's preallocated buffer at an index passed as an array and
attends over the whole buffer, with a mask that hides the columns not written yet (and padding, and
keys outside the sliding window). Shapes change only when the buffer grows (every `step` tokens) or
the batch changes; each such shape is traced once.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import KVCache
from .model import Mistral


class _BufferView:
    """Stands in for KVCache inside the traced step: writes at an array index, returns the whole
    buffers, and hands out the mask and RoPE offsets computed outside."""

    def __init__(self, keys, values, col: mx.array, mask: mx.array, offsets: mx.array) -> None:
        self.keys, self.values = list(keys), list(values)
        self.col, self.mask, self.offsets = col, mask, offsets

    def prepare(self, n_new: int) -> mx.array:
        return self.mask

    def rope_offsets(self) -> mx.array:
        return self.offsets

    def update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys[layer] = mx.slice_update(self.keys[layer], keys, self.col, axes=(2,))
        self.values[layer] = mx.slice_update(self.values[layer], values, self.col, axes=(2,))
        return self.keys[layer], self.values[layer]

    def advance(self, n_new: int) -> None:
        pass


class CompiledDecode:
    """`decode(tokens, cache)` gives the same logits (B, vocab) as `model(tokens, cache)[:, -1]`
    for one token per row, and advances the cache the same way."""

    def __init__(self, model: Mistral) -> None:
        self.model = model

        def step(tokens, keys, values, col, mask, offsets):
            view = _BufferView(keys, values, col, mask, offsets)
            logits = model(tokens, cache=view)  # type: ignore[arg-type]  # duck-typed cache
            return logits[:, -1, :], view.keys, view.values

        # The weights are inputs, not constants: a graph never keeps stale parameters.
        self._step = mx.compile(step, inputs=model.state)

    def __call__(self, tokens: mx.array, cache: KVCache) -> mx.array:
        cache._drop_outside_window()
        col = cache.offset - cache.start
        capacity = cache.keys[0].shape[2]
        if col + 1 > capacity:
            for layer in range(cache.n_layers):
                cache._grow(layer, cache.keys[layer], col + 1)
            capacity = cache.keys[0].shape[2]
        mask = _mask(cache, capacity, col)
        offsets = mx.array([cache.offset - p for p in cache.pad], dtype=mx.int32)
        logits, keys, values = self._step(
            tokens, cache.keys, cache.values, mx.array([col], dtype=mx.int32), mask, offsets
        )
        cache.keys, cache.values = list(keys), list(values)
        cache.advance(1)
        return logits


def _mask(cache: KVCache, capacity: int, col: int) -> mx.array:
    """(B, 1, 1, capacity) bool: which buffer columns the new token of each row may see."""
    k = np.arange(capacity) + cache.start  # aligned index of every buffer column
    q = cache.offset  # aligned index of the new token
    seen = k <= q
    if cache.window is not None:
        seen &= q - k < cache.window
    pad = np.array(cache.pad)[:, None]
    rows = seen[None, :] & ((k[None, :] >= pad) | (k[None, :] == q))
    return mx.array(rows[:, None, None, :])
