"""The optimizer side of training: Adam/AdamW with a warmup + constant/cosine learning rate, and
its state as flat named tensors (what a checkpoint stores and a resume puts back).

The schedule is a function of the optimizer's own step counter (one per update), so a resumed run
that restores the counter continues on exactly the same learning-rate curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(
    learning_rate: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> Callable[[mx.array], mx.array]:
    """lr(step) for step = 0, 1, ... (the number of updates already applied).

    Warmup rises linearly to `learning_rate` over `warmup_steps` updates, starting at
    lr / warmup_steps rather than 0 so the first update is never wasted. Cosine then decays to
    `min_lr_ratio * learning_rate` at the last update.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    floor = learning_rate * min_lr_ratio

    def lr(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        if schedule == "cosine":
            t = mx.clip((s - warmup_steps) / max(decay_steps - 1, 1), 0.0, 1.0)
            value = floor + (learning_rate - floor) * 0.5 * (1.0 + mx.cos(math.pi * t))
        else:
            value = mx.array(learning_rate, dtype=mx.float32)
        if warmup_steps > 0:
            ramp = learning_rate * (s + 1.0) / warmup_steps
            value = mx.where(s < warmup_steps, ramp, value)
        return value

    return lr


def build_optimizer(
    name: str,
    learning_rate: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> optim.Optimizer:
    """Adam or AdamW (mlx.optimizers) driven by `learning_rate_schedule`."""
    lr = learning_rate_schedule(learning_rate, schedule, warmup_steps, total_steps, min_lr_ratio)
    if name == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(learning_rate=lr)
    raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def optimizer_state_tensors(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    """The optimizer's whole state (moments, step counter, current lr) as flat named tensors."""
    return dict(tree_flatten(optimizer.state))


def restore_optimizer_state(
    optimizer: optim.Optimizer, parameters: dict, tensors: dict[str, mx.array], source: str
) -> None:
    """Put saved state back, after checking it belongs to these trainable parameters.

    Must run before the training step is compiled: the compiled step holds on to the state
    dict it was built with.
    """
    optimizer.init(parameters)
    flat = tree_flatten(optimizer.state)
    assert isinstance(flat, list)  # annotated list | dict; without `destination` it is a list
    expected: dict[str, mx.array] = dict(flat)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}"
        raise ValueError(
            f"{source}: the optimizer state does not match the trainable parameters ({what}); "
            "the checkpoint is from another LoRA setup — resume with its settings or start afresh"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: optimizer tensor {k} has shape {tuple(v.shape)}, the model needs "
                f"{tuple(expected[k].shape)}; resume with the checkpoint's LoRA settings"
            )
    state = tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in tensors.items()])
    optimizer.state = state
    optimizer.init(parameters)  # marks it initialised; keeps every restored entry
