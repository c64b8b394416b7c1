"""Reuse the keys/values of prompt prefixes seen before.

A RAG app resends the same `table/columns` header with every question; its KV is computed once.
Prompts are cut into blocks of `block` tokens; a block is stored once, keyed by its parent block
and its own tokens (and the adapter, since LoRA on k/v changes the keys), so two prompts that share
a header share its blocks. Least recently used blocks are evicted past `max_tokens`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import mlx.core as mx

from mlx_core.cache import KVCache

BlockKey = tuple[int, str, tuple[int, ...]]  # (parent block id, adapter id, tokens)
Layers = list[tuple[mx.array, mx.array]]


class PrefixCache:
    def __init__(self, max_tokens: int, block: int = 16) -> None:
        self.block = block
        self.max_blocks = max(0, max_tokens // block)
        self._ids: dict[BlockKey, int] = {}
        self._blocks: OrderedDict[int, tuple[BlockKey, Layers, int, int]] = OrderedDict()
        self._next_id = 1
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, adapter: str, tokens: Sequence[int], n_blocks: int) -> list[int]:
        """Ids of the stored blocks that start `tokens`, in order (stops at the first miss)."""
        ids, parent = [], 0
        for j in range(n_blocks):
            key = (parent, adapter, tuple(tokens[j * self.block : (j + 1) * self.block]))
            bid = self._ids.get(key)
            if bid is None:
                break
            ids.append(bid)
            parent = bid
        return ids

    def lookup(self, adapter: str, tokens: Sequence[int], window: int | None) -> KVCache | None:
        """A one-row cache holding the longest stored prefix of `tokens` (leaving at least one
        token to compute, whose logits start generation), or None."""
        if not self.max_blocks:
            return None
        ids = self._chain(adapter, tokens, (len(tokens) - 1) // self.block)
        if not ids:
            return None
        for bid in reversed(ids):  # parents end up most recent: they are evicted last
            self._blocks.move_to_end(bid)
        # Blocks stored by one prompt are adjacent slices of one copy per layer: a run of them is
        # one slice, so a repeated prompt costs no copy here (concatenating block by block was
        # ~2,000 small copies on CUDA for a 512-token prompt of a 32-layer model).
        runs: list[list] = []  # [copies, start, end]
        for bid in ids:
            _, copies, a, b = self._blocks[bid]
            if runs and runs[-1][0] is copies and runs[-1][2] == a:
                runs[-1][2] = b
            else:
                runs.append([copies, a, b])
        layers = []
        for i in range(len(runs[0][0])):
            ks = [c[i][0][:, :, a:b, :] for c, a, b in runs]
            vs = [c[i][1][:, :, a:b, :] for c, a, b in runs]
            if len(runs) == 1:
                layers.append((ks[0], vs[0]))
            else:
                layers.append((mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)))
        self.hits += 1
        self.hit_tokens += len(ids) * self.block
        return KVCache.from_prefix(layers, window)

    def store(self, adapter: str, tokens: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the full blocks of a prefilled prompt (row `row` of `cache`)."""
        n_blocks = (len(tokens) - 1) // self.block
        if not self.max_blocks or n_blocks == 0:
            return
        known = self._chain(adapter, tokens, n_blocks)
        if len(known) == n_blocks:
            return
        held = cache.row_prefix(row, n_blocks * self.block)
        if held is None:  # part of the prompt already left the sliding window
            return
        parent = known[-1] if known else 0
        a0, b0 = len(known) * self.block, n_blocks * self.block
        # One copy per layer for all new blocks (a handful of kernels, not one per block and
        # layer); the blocks are views of it. Copies, so no block keeps the batch buffer alive.
        copies = [
            (mx.contiguous(k[:, :, a0:b0, :]), mx.contiguous(v[:, :, a0:b0, :])) for k, v in held
        ]
        mx.async_eval(copies)
        for j in range(len(known), n_blocks):
            a, b = j * self.block - a0, (j + 1) * self.block - a0
            key = (parent, adapter, tuple(tokens[a + a0 : b + a0]))
            bid = self._next_id
            self._next_id += 1
            self._ids[key] = bid
            self._blocks[bid] = (key, copies, a, b)  # block = columns a:b of every copy
            parent = bid
        while len(self._blocks) > self.max_blocks:
            _, (key, *_) = self._blocks.popitem(last=False)
            del self._ids[key]

    def clear(self, adapter: str | None = None) -> None:
        """Forget every block (or those of one adapter, when it is unloaded or replaced)."""
        for bid, (key, *_) in list(self._blocks.items()):
            if adapter is None or key[1] == adapter:
                del self._blocks[bid]
                del self._ids[key]
