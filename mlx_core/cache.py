"""KV cache for a batch of sequences, with a sliding attention window.

Every row of the batch ends at the same *aligned* index: a row whose sequence is shorter is
left-padded. That keeps one decode step a single write at one column for all rows, which is what
makes continuous batching cheap (rows join by `merge`, leave by `filter`). A row's real token
position is `aligned index - pad[row]`.

With a sliding window the cache drops the columns that have left every row's window, in steps of
`step` columns, so memory stays within `window + step` columns however long generation runs (a
rotating buffer that compacts instead of wrapping, so batched rows never need re-ordering).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlx_core.config import ModelArgs

Mask = mx.array | str | None


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int) -> int:
    """Bytes the keys and values of one token take in the cache, all layers together."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype_bytes


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int = 1,
        window: int | None = None,
        pad: Sequence[int] | None = None,
        step: int = 256,
    ) -> None:
        self.keys: list[mx.array | None] = [None] * n_layers
        self.values: list[mx.array | None] = [None] * n_layers
        self.window = window
        self.step = step
        self.offset = 0  # aligned positions written so far
        self.start = 0  # aligned index of buffer column 0
        self.pad = list(pad) if pad is not None else [0] * batch_size
        if len(self.pad) != batch_size and pad is not None:
            raise ValueError("pad must have one entry per row")

    # -- queries -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.pad)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def lengths(self) -> list[int]:
        """Tokens held per row (prompt + generated so far)."""
        return [self.offset - p for p in self.pad]

    def rope_offsets(self) -> int | mx.array:
        """Position of the next token of each row (an int when every row agrees)."""
        if all(p == 0 for p in self.pad):
            return self.offset
        return mx.array([self.offset - p for p in self.pad], dtype=mx.int32)

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._held())

    def _held(self) -> list[tuple[mx.array, mx.array]]:
        """The (keys, values) buffers of every layer that holds tokens."""
        return [(k, v) for k, v in zip(self.keys, self.values) if k is not None and v is not None]

    def _buffers(self, layer: int) -> tuple[mx.array, mx.array]:
        k, v = self.keys[layer], self.values[layer]
        assert k is not None and v is not None  # written by _grow before any read
        return k, v

    # -- one forward pass ----------------------------------------------------------------------
    def prepare(self, n_new: int) -> Mask:
        """Called once before a forward of `n_new` tokens per row; returns the attention mask."""
        self._drop_outside_window()
        end = self.offset + n_new  # aligned index after this forward
        padded = any(p > self.start for p in self.pad)
        inside = self.window is None or end - 1 - self.start < self.window
        if not padded and inside:
            return None if n_new == 1 else "causal"
        q = mx.arange(self.offset, end)[:, None]
        k = mx.arange(self.start, end)[None, :]
        mask = k <= q
        if self.window is not None:
            mask = mask & (q - k < self.window)
        if padded:
            pad = mx.array(self.pad)[:, None, None]
            # A padding query attends to itself only: a row of all -inf would give NaNs that reach
            # real rows through the values of padding columns.
            mask = mask[None] & ((k[None] >= pad) | (k == q)[None])
            return mask[:, None]
        return mask

    def update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store this layer's new keys/values (B, n_kv, L, D); return all held so far."""
        n_new = keys.shape[2]
        col = self.offset - self.start
        buf = self.keys[layer]
        if buf is None or col + n_new > buf.shape[2]:
            self._grow(layer, keys, col + n_new)
        k_buf, v_buf = self._buffers(layer)
        k_buf[..., col : col + n_new, :] = keys
        v_buf[..., col : col + n_new, :] = values
        return k_buf[..., : col + n_new, :], v_buf[..., : col + n_new, :]

    def advance(self, n_new: int) -> None:
        self.offset += n_new

    def _grow(self, layer: int, like: mx.array, needed: int) -> None:
        B, H, _, D = like.shape
        capacity = -(-needed // self.step) * self.step
        old_k, old_v = self.keys[layer], self.values[layer]
        extra = capacity - (0 if old_k is None else old_k.shape[2])
        # Separate arrays for keys and values: slice assignment updates an array object in place.
        zk = mx.zeros((B, H, extra, D), dtype=like.dtype)
        zv = mx.zeros((B, H, extra, D), dtype=like.dtype)
        if old_k is None or old_v is None:
            self.keys[layer], self.values[layer] = zk, zv
        else:
            self.keys[layer] = mx.concatenate([old_k, zk], axis=2)
            self.values[layer] = mx.concatenate([old_v, zv], axis=2)

    def _drop_outside_window(self) -> None:
        if self.window is None:
            return
        # The next query (aligned index `offset`) sees keys after offset - window.
        drop = self.offset - self.window + 1 - self.start
        if drop >= self.step:
            self._drop_columns(drop)

    def _drop_columns(self, n: int) -> None:
        for i in range(self.n_layers):
            k, v = self.keys[i], self.values[i]
            if k is not None and v is not None:
                self.keys[i], self.values[i] = k[..., n:, :], v[..., n:, :]
        self.start += n

    # -- batch membership ----------------------------------------------------------------------
    def filter(self, rows: Sequence[int]) -> None:
        """Keep only these rows (finished sequences leave the batch)."""
        idx = mx.array(list(rows), dtype=mx.int32)
        for i in range(self.n_layers):
            k, v = self.keys[i], self.values[i]
            if k is not None and v is not None:
                self.keys[i], self.values[i] = k[idx], v[idx]
        self.pad = [self.pad[r] for r in rows]
        # Columns that are padding for every remaining row are dead weight.
        dead = min(self.pad, default=0) - self.start
        if dead > 0 and self.keys[0] is not None:
            self._drop_columns(min(dead, self.offset - self.start))

    @classmethod
    def merge(cls, caches: Sequence[KVCache]) -> KVCache:
        """One batch holding the rows of all `caches`, right-aligned on the longest."""
        first = caches[0]
        offset = max(c.offset for c in caches)
        start = min(c.start + offset - c.offset for c in caches)
        out = cls(first.n_layers, batch_size=0, window=first.window, step=first.step)
        out.offset, out.start = offset, start
        out.pad = [p + offset - c.offset for c in caches for p in c.pad]
        for i in range(first.n_layers):
            ks, vs = [], []
            for c in caches:
                k, v = c.keys[i], c.values[i]
                if k is None or v is None:
                    raise ValueError("cannot merge a cache that holds no tokens yet")
                lead = c.start + offset - c.offset - start
                held = c.offset - c.start
                k, v = k[..., :held, :], v[..., :held, :]
                if lead:
                    z = mx.zeros((k.shape[0], k.shape[1], lead, k.shape[3]), dtype=k.dtype)
                    k, v = mx.concatenate([z, k], axis=2), mx.concatenate([z, v], axis=2)
                ks.append(k)
                vs.append(v)
            out.keys[i] = mx.concatenate(ks, axis=0)
            out.values[i] = mx.concatenate(vs, axis=0)
        return out

    # -- prefix reuse --------------------------------------------------------------------------
    def row_prefix(self, row: int, length: int) -> list[tuple[mx.array, mx.array]] | None:
        """Keys/values of the first `length` tokens of one row, or None if they were dropped."""
        first = self.pad[row]
        if first < self.start or length > self.offset - first:
            return None
        a = first - self.start
        return [
            (k[row : row + 1, :, a : a + length, :], v[row : row + 1, :, a : a + length, :])
            for k, v in self._held()
        ]

    def truncated(self, length: int) -> KVCache:
        """The first `length` positions of a one-row cache made by `from_prefix` (views, no
        copy)."""
        if self.batch_size != 1 or self.pad != [0] or self.start != 0:
            raise ValueError("only a one-row cache that starts at its first token can be truncated")
        if not 0 < length <= self.offset:
            raise ValueError(f"cannot keep {length} of the {self.offset} positions held")
        layers = [(k[..., :length, :], v[..., :length, :]) for k, v in self._held()]
        return KVCache.from_prefix(layers, self.window, self.step)

    @classmethod
    def from_prefix(
        cls, layers: Sequence[tuple[mx.array, mx.array]], window: int | None, step: int = 256
    ) -> KVCache:
        """A one-row cache that starts with a stored prefix's keys/values."""
        cache = cls(len(layers), batch_size=1, window=window, step=step)
        for i, (k, v) in enumerate(layers):
            cache.keys[i], cache.values[i] = k, v
        cache.offset = layers[0][0].shape[2]
        return cache
