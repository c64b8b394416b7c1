"""One training step and the loss: cross-entropy over target tokens, gradient accumulation over
micro-batches, gradient all-reduce across processes, gradient checkpointing, evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_core.data.batches import Batch
from mlx_core.model import Mistral
from mlx_core.train.config import TrainConfig


# -- model pieces -------------------------------------------------------------------------------
def enable_grad_checkpoint(model: Mistral, layers: Iterable[int]) -> None:
    """Recompute each given transformer layer in the backward pass instead of storing its
    activations (only the layer's input is kept).

    The layer's class is swapped for a subclass (per instance, so other models in the process
    are untouched) whose call runs under `mx.checkpoint` with the layer's trainable parameters as
    explicit inputs: gradients must reach the LoRA weights through the recomputation.
    """
    for i in layers:
        layer = model.model.layers[i]
        if not getattr(layer, "_checkpointed", False):
            layer.__class__ = _checkpointed(type(layer))


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if cls in _CHECKPOINTED:
        return _CHECKPOINTED[cls]

    def __call__(self, x, mask, cache, layer, rope_offset, positions):
        # mx.checkpoint takes arrays only: the string mask, ints and None stay in the closure.
        arrays = [a for a in (mask, positions) if isinstance(a, mx.array)]

        def inner(params, x, *arrs):
            self.update(params)
            it = iter(arrs)
            m = next(it) if isinstance(mask, mx.array) else mask
            p = next(it) if isinstance(positions, mx.array) else positions
            return cls.__call__(self, x, m, cache, layer, rope_offset, p)

        return mx.checkpoint(inner)(self.trainable_parameters(), x, *arrays)

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_checkpointed": True})
    _CHECKPOINTED[cls] = sub
    return sub


def _batch_arrays(batch: Batch) -> list[mx.array]:
    arrays = [batch.inputs, batch.targets, batch.loss_mask]
    if batch.positions is not None and batch.segment_ids is not None:  # packed rows
        arrays += [batch.positions, batch.segment_ids]
    return arrays


def loss_sum(model: Mistral, arrays: list[mx.array]) -> mx.array:
    """Sum of cross-entropy over the target tokens of a batch (fp32 logits)."""
    inputs, targets, mask = arrays[:3]
    positions, segments = (arrays[3], arrays[4]) if len(arrays) == 5 else (None, None)
    logits = model(inputs, positions=positions, segment_ids=segments)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return (ce * mask).sum()


def evaluate_loss(
    model: Mistral, batches: Iterable[Batch], group: mx.distributed.Group | None = None
) -> tuple[float, float]:
    """(mean cross-entropy per target token, perplexity) over the batches.

    With a group of several processes each evaluates every size-th batch and the sums are
    combined, so every rank gets the same numbers.
    """
    was_training = model.training
    model.eval()
    total, n = mx.array(0.0), 0
    shared = group if group is not None and group.size() > 1 else None
    for i, batch in enumerate(batches):
        if shared is not None and i % shared.size() != shared.rank():
            continue
        total = total + loss_sum(model, _batch_arrays(batch))
        n += batch.n_target_tokens
        mx.eval(total)
    sums = mx.stack([total, mx.array(float(n))])
    if shared is not None:
        sums = mx.distributed.all_sum(sums, group=shared)
    summed, count = (float(v) for v in np.array(sums))
    if was_training:
        model.train()
    if count == 0:
        return math.nan, math.nan
    loss = summed / count
    return loss, math.exp(min(loss, 700.0))


def _split_micro(batch: Batch, parts: int) -> list[list[mx.array]]:
    arrays = _batch_arrays(batch)
    rows = arrays[0].shape[0] // parts
    return [[a[i * rows : (i + 1) * rows] for a in arrays] for i in range(parts)]


def _all_sum_flat(leaves: list[mx.array], group: mx.distributed.Group) -> list[mx.array]:
    """One all_sum for many arrays: concatenate, reduce, split back."""
    flat = mx.concatenate([x.reshape(-1).astype(mx.float32) for x in leaves])
    flat = mx.distributed.all_sum(flat, group=group)
    out, at = [], 0
    for x in leaves:
        out.append(flat[at : at + x.size].reshape(x.shape).astype(x.dtype))
        at += x.size
    return out


class TrainStep:
    """One optimizer step over a planned batch: its micro-batches' gradients are summed, then
    (across processes too) divided by the step's total target tokens and applied.

    The three pieces are compiled separately (`config.compile`): the first micro-batch, each
    further one (adding to the running sums), and the update. The compiled functions capture
    the model's and optimizer's state, so restore a checkpoint before building a TrainStep.
    """

    def __init__(
        self,
        model: Mistral,
        optimizer: optim.Optimizer,
        config: TrainConfig,
        group: mx.distributed.Group | None = None,
    ) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.group = group if group is not None and group.size() > 1 else None
        value_and_grad = nn.value_and_grad(model, loss_sum)

        def first(arrays):
            return value_and_grad(model, arrays)

        def more(arrays, ce, grads):
            ce2, grads2 = value_and_grad(model, arrays)
            return ce + ce2, tree_map(mx.add, grads, grads2)

        def update(ce, grads, counts):
            loss, grads, counts = self._normalize(ce, grads, counts)
            if config.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
            optimizer.update(model, grads)
            return loss, counts

        self.state = [model.state, optimizer.state, mx.random.state]
        if config.compile:
            first, more, update = (
                partial(mx.compile, inputs=self.state, outputs=self.state)(f)
                for f in (first, more, update)
            )
        self._first, self._more, self._update = first, more, update

    def _normalize(self, ce, grads, counts):
        if self.group is not None:
            flat = tree_flatten(grads)
            assert isinstance(flat, list)  # annotated list | dict; without `destination`, a list
            summed = _all_sum_flat([v for _, v in flat] + [ce, counts], self.group)
            grads = tree_unflatten([(k, v) for (k, _), v in zip(flat, summed)])
            ce, counts = summed[-2], summed[-1]
        n = mx.maximum(counts[0], 1.0)
        return ce / n, tree_map(lambda g: g / n, grads), counts

    def _sums(self, batch: Batch) -> tuple[mx.array, dict, mx.array]:
        micro = _split_micro(batch, self.config.grad_accumulation)
        ce, grads = self._first(micro[0])
        for arrays in micro[1:]:
            mx.eval(ce, grads)  # one micro-batch's activations alive at a time
            ce, grads = self._more(arrays, ce, grads)
        counts = mx.array([batch.n_target_tokens, batch.n_tokens], dtype=mx.float32)
        return ce, grads, counts

    def loss_and_grads(self, batch: Batch) -> tuple[float, dict]:
        """The step's loss and gradients (mean over target tokens) without updating anything."""
        loss, grads, _ = self._normalize(*self._sums(batch))
        mx.eval(loss, grads)
        return loss.item(), grads

    def __call__(self, batch: Batch) -> tuple[float, int, int]:
        """Update the model; returns (loss, target tokens, tokens) over all processes."""
        loss, counts = self._update(*self._sums(batch))
        mx.eval(self.state, loss, counts)
        n_targets, n_tokens = (int(c) for c in counts.tolist())
        return loss.item(), n_targets, n_tokens
