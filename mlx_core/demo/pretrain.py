"""Full-parameter pretraining of the demo model from scratch: init, loop, checkpoints, resume.

Unlike `mlx_core.train` (LoRA on a frozen base), every weight trains here, from a GPT-2-style
random init. One step is one AdamW update over `batch_size` examples; the learning rate warms up
linearly and then follows a cosine to `min_lr_ratio` of its peak. Batches come from
`mlx_core.data.batches.BatchStream`, whose step s depends only on (examples, seed, s), so a resumed run
sees exactly the batches the interrupted one would have.

Checkpoints are `<work>/checkpoints/step-<n>/` holding the fp32 weights, the optimizer state and
`state.json` (step, config); they are written to a hidden folder and renamed, so a killed build
never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_core.config import ModelArgs
from mlx_core.data.batches import Batch, BatchStream, TokenizedExample, eval_batches
from mlx_core.model import Mistral
from mlx_core.train.events import format_duration
from mlx_core.train.optim import build_optimizer, optimizer_state_tensors, restore_optimizer_state

CHECKPOINTS = "checkpoints"
_STEP_PREFIX = "step-"


class PretrainError(RuntimeError):
    """A checkpoint that cannot be resumed, or a run that diverged; the message says what to do."""


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 5000
    batch_size: int = 32  # examples per step (unpacked rows, grouped by length)
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    max_seq_len: int = 384  # every corpus example fits (the longest are ~170 tokens)
    parallel_streams: int = 2  # device streams a step's rows are split over (CPU: one core each)
    init_std: float = 0.02
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2


@dataclass
class PretrainResult:
    steps: int
    train_loss: float | None  # mean over the last log interval; None if nothing was trained
    valid_loss: float
    seconds: float  # training time of this process (a resumed run counts from its resume)
    tokens: int  # input tokens (padding excluded) of this process


def init_weights(model: Mistral, std: float, seed: int) -> None:
    """GPT-2's init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2L).

    MLX's defaults (uniform by fan-in, N(0, 1) embeddings) start a deep stack far from unit
    scale; this keeps the residual stream's variance flat through the layers from step 0.
    """
    mx.random.seed(seed)
    residual_std = std / math.sqrt(2 * model.args.n_layers)

    def draw(path: str, w: mx.array) -> mx.array:
        if w.ndim == 1:  # RMSNorm scales start at 1
            return mx.ones_like(w)
        s = residual_std if path.endswith(("o_proj.weight", "down_proj.weight")) else std
        return mx.random.normal(w.shape, scale=s)

    model.update(_map_with_path(model.parameters(), draw))
    mx.eval(model.parameters())


def _map_with_path(tree: dict | list, fn: Callable[[str, mx.array], mx.array], prefix: str = ""):
    if isinstance(tree, dict):
        return {k: _map_with_path(v, fn, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_with_path(v, fn, f"{prefix}{i}.") for i, v in enumerate(tree)]
    return fn(prefix[:-1], tree)


def answer_loss(
    model: Mistral,
    inputs: mx.array,
    positions: mx.array,
    targets: mx.array,
    mask: mx.array,
    denominator: mx.array,
) -> mx.array:
    """Summed cross-entropy of the answer tokens / `denominator`, in fp32.

    Only the answers are targets, so only the rows at `positions` (B, A), about a quarter of
    them, are projected onto the vocabulary: the lm_head matmul and the softmax shrink alike.
    A sum over a batch's answer tokens (not per-row means) lets a step's rows be split over
    several streams whose gradients add up to exactly the whole batch's.
    """
    logits = model(inputs, output_positions=positions)
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return (losses * mask).sum() / denominator


def evaluate_loss(
    model: Mistral,
    examples: Sequence[TokenizedExample],
    config: PretrainConfig,
    max_batches: int | None = None,
) -> float:
    """Target-token-weighted mean loss over `examples` (unpacked, in file order)."""
    total, count = 0.0, 0
    for batch in eval_batches(examples, config.batch_size, max_batches, config.max_seq_len):
        b = AnswerBatch.of(batch)
        total += _value(answer_loss(model, b.inputs, b.positions, b.targets, b.mask, mx.array(1.0)))
        count += b.n_targets
    return total / max(count, 1)


def _value(scalar: mx.array) -> float:
    """A real scalar array's value (`mx.array.item()` is typed for every dtype, complex too)."""
    value = scalar.item()
    assert not isinstance(value, complex)
    return float(value)


# -- checkpoints ---------------------------------------------------------------------------------
def latest_checkpoint(work: Path) -> Path | None:
    root = work / CHECKPOINTS
    steps = (
        [
            (int(p.name[len(_STEP_PREFIX) :]), p)
            for p in root.glob(f"{_STEP_PREFIX}*")
            if p.is_dir() and p.name[len(_STEP_PREFIX) :].isdigit()
        ]
        if root.is_dir()
        else []
    )
    return max(steps)[1] if steps else None


def _save_checkpoint(
    work: Path, step: int, model: Mistral, optimizer: optim.Optimizer, identity: dict, keep: int
) -> Path:
    root = work / CHECKPOINTS
    final = root / f"{_STEP_PREFIX}{step}"
    tmp = root / f".tmp-{_STEP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state_tensors(optimizer))
    (tmp / "state.json").write_text(json.dumps({"step": step, "identity": identity}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    old = sorted(
        (int(p.name[len(_STEP_PREFIX) :]), p) for p in root.glob(f"{_STEP_PREFIX}*") if p != final
    )
    for _, p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _resume(path: Path, model: Mistral, optimizer: optim.Optimizer, identity: dict) -> int:
    state = json.loads((path / "state.json").read_text())
    saved = state.get("identity", {})
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        raise PretrainError(
            f"{path} was made with other settings ({', '.join(differ)} differ): resume with the "
            "settings it was started with, or start afresh without --resume (or another --work-dir)"
        )
    model.load_weights(str(path / "model.safetensors"))
    tensors = mx.load(str(path / "optimizer.safetensors"))
    assert isinstance(tensors, dict)  # a .safetensors file loads as a dict of named arrays
    restore_optimizer_state(optimizer, model.trainable_parameters(), tensors, str(path))
    mx.eval(model.parameters(), optimizer.state)
    return int(state["step"])


# -- batches -------------------------------------------------------------------------------------
TRIM_MULTIPLE = 16  # widths rounded up to this: little padding, a few dozen compiled shapes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class AnswerBatch:
    """A `Batch` cut down to what the answer loss needs."""

    inputs: mx.array  # (B, W) int32: the rows, trimmed to the longest (rounded to TRIM_MULTIPLE)
    positions: mx.array  # (B, A) int32: the positions whose next token is an answer token
    targets: mx.array  # (B, A) int32: those answer tokens (the last one EOS)
    mask: mx.array  # (B, A) float32: 1 where a row has an answer token, 0 past its end
    n_tokens: int  # non-padding input tokens
    n_targets: int

    @classmethod
    def of(cls, batch: Batch) -> AnswerBatch:
        """Trim a `Batch` whose loss mask marks one contiguous answer per row (or none)."""
        mask = np.asarray(batch.loss_mask) > 0
        B, L = mask.shape
        has = mask.any(axis=1)
        first = np.where(has, mask.argmax(axis=1), 0)
        end = np.where(has, L - mask[:, ::-1].argmax(axis=1), 0)  # one past the last target
        width = min(_round_up(max(int(end.max()), 1), TRIM_MULTIPLE), L)
        span = _round_up(max(int((end - first).max()), 1), TRIM_MULTIPLE)
        offsets = np.arange(span)
        positions = np.minimum(first[:, None] + offsets, width - 1).astype(np.int32)
        targets = np.take_along_axis(np.asarray(batch.targets), positions, axis=1)
        answer = (offsets < (end - first)[:, None]).astype(np.float32)
        return cls(
            batch.inputs[:, :width],
            mx.array(positions),
            mx.array(targets),
            mx.array(answer),
            batch.n_tokens,
            int(answer.sum()),
        )


# -- the loop ------------------------------------------------------------------------------------
def pretrain(
    args: ModelArgs,
    train_set: Sequence[TokenizedExample],
    valid_set: Sequence[TokenizedExample],
    config: PretrainConfig,
    work: Path,
    identity: dict,
    resume: bool = False,
    log: Callable[[str], None] = print,
    probe: Callable[[Mistral], str] | None = None,
    init: Path | None = None,
) -> tuple[Mistral, PretrainResult]:
    """Train a fresh model (or continue the latest checkpoint with `resume`); return it trained.

    `init`, a model.safetensors of the same shape, replaces the random initialisation (a later
    stage of training starting where an earlier one ended; the caller's `identity` names it).

    `train_set` and `valid_set` are tokenized with the prompt masked: each example's answer
    (and its EOS) is the target. `identity` names what the checkpoints' meaning depends on
    (corpus, tokenizer; this adds the config and model shape); a resume with a different
    identity is refused rather than silently mixing two runs. `probe`, if given, runs at every
    evaluation (say, generation on a few prompts) and its line is logged.
    """
    identity = {**identity, "pretrain": asdict(config), "model": asdict(args)}
    identity["pretrain"].pop("parallel_streams")  # only where the work runs, not what it computes
    model = Mistral(args)
    init_weights(model, config.init_std, config.seed)
    if init is not None:
        model.load_weights(str(init))
    optimizer = build_optimizer(
        "adamw",
        config.learning_rate,
        "cosine",
        config.warmup_steps,
        config.steps,
        weight_decay=config.weight_decay,
        min_lr_ratio=config.min_lr_ratio,
    )
    optimizer.init(model.trainable_parameters())
    start = 0
    if resume and (ckpt := latest_checkpoint(work)) is not None:
        start = _resume(ckpt, model, optimizer, identity)
        log(f"resumed from {ckpt} at step {start}")
    elif resume:
        log(f"no checkpoint under {work / CHECKPOINTS}: starting from step 0")
    flat = tree_flatten(model.parameters())
    assert isinstance(flat, list)  # annotated list | dict; without `destination` it is a list
    n_params = sum(v.size for _, v in flat)
    log(
        f"model: {n_params / 1e6:.2f}M parameters; {len(train_set)} training examples; "
        f"steps {start}..{config.steps} of batch {config.batch_size}"
    )

    # MLX's CPU backend runs elementwise ops (exp in softmax, SiLU, cross-entropy: most of the
    # time of a model this small) on one thread per stream. Splitting each batch's rows over
    # several streams runs them side by side; the gradients of the parts add up to the batch's.
    loss_and_grad = nn.value_and_grad(model, answer_loss)
    part_grads = mx.compile(
        partial(loss_and_grad, model), inputs=[model.state], outputs=[model.state]
    )
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grads: list[dict]) -> mx.array:
        total = grads[0]
        for g in grads[1:]:
            total = tree_map(mx.add, total, g)
        total, norm = optim.clip_grad_norm(total, config.grad_clip)
        optimizer.update(model, total)
        return norm

    n_parts = max(1, min(config.parallel_streams, config.batch_size))
    streams = [mx.default_stream(mx.default_device())]
    streams += [mx.new_stream(mx.default_device()) for _ in range(n_parts - 1)]
    cuts = [round(i * config.batch_size / n_parts) for i in range(n_parts + 1)]

    def step(b: AnswerBatch) -> tuple[mx.array, mx.array]:
        denominator = mx.array(max(b.n_targets, 1), dtype=mx.float32)
        losses, grads = [], []
        for stream, lo, hi in zip(streams, cuts, cuts[1:]):
            with mx.stream(stream):
                loss, g = part_grads(
                    b.inputs[lo:hi],
                    b.positions[lo:hi],
                    b.targets[lo:hi],
                    b.mask[lo:hi],
                    denominator,
                )
            losses.append(loss)
            grads.append(g)
        return sum(losses), apply(grads)

    batches = BatchStream(
        train_set,
        config.batch_size,
        config.seed,
        pack=False,
        max_seq_len=config.max_seq_len,
        start_step=start,
    )
    model.train()
    t0 = last = time.perf_counter()
    tokens = interval_tokens = 0
    losses: list[float] = []
    train_loss: float | None = None
    valid_loss = float("nan")
    for s in range(start, config.steps):
        batch = AnswerBatch.of(next(batches))
        loss, norm = step(batch)
        mx.eval(state, loss, norm)
        losses.append(_value(loss))
        tokens += batch.n_tokens
        interval_tokens += batch.n_tokens
        done = s + 1
        if not math.isfinite(losses[-1]):
            raise PretrainError(
                f"loss became {losses[-1]} at step {done}: lower the learning rate (now "
                f"{config.learning_rate}) and start afresh"
            )
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            train_loss = sum(losses) / len(losses)
            eta = (now - t0) / (done - start) * (config.steps - done)
            log(
                f"step {done}/{config.steps} answer loss {train_loss:.4f} "
                f"lr {optimizer.learning_rate.item():.2e} grad {norm.item():.2f} "
                f"tok/s {interval_tokens / (now - last):.0f} "
                f"peak {mx.get_peak_memory() / 2**30:.2f} GB ETA {format_duration(eta)}"
            )
            losses, interval_tokens, last = [], 0, now
        if done % config.eval_every == 0 or done == config.steps:
            model.eval()
            valid_loss = evaluate_loss(model, valid_set, config)
            log(f"step {done} valid answer loss {valid_loss:.4f}")
            if probe is not None and done < config.steps:
                log(f"step {done} {probe(model)}")
            model.train()
        if done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(work, done, model, optimizer, identity, config.keep_checkpoints)
    model.eval()
    if start >= config.steps:  # resumed a finished run: nothing trained, just report
        valid_loss = evaluate_loss(model, valid_set, config)
    # A final checkpoint lets `--resume` of a finished build skip straight to evaluation.
    _save_checkpoint(work, config.steps, model, optimizer, identity, config.keep_checkpoints)
    elapsed = time.perf_counter() - t0
    return model, PretrainResult(config.steps, train_loss, valid_loss, elapsed, tokens)


def cast_parameters(model: Mistral, dtype: mx.Dtype) -> None:
    """Cast every floating-point weight to `dtype` (the shipped precision)."""
    model.update(
        tree_map(
            lambda w: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
