"""LoRA fine-tuning: the loop, evaluation, checkpoints and resume, events, data parallelism.

Read `train()` top to bottom: config -> data -> memory preflight -> model -> LoRA -> (resume) ->
steps -> final adapter. The loss is the mean cross-entropy over target tokens (the loss mask:
EOS always, the prompt only without --mask-prompt). One *step* is one optimizer update over
`batch_size * grad_accumulation` examples; a step's micro-batches are slices of one planned
batch, so `--batch-size 1 --grad-accumulation 4` trains exactly like `--batch-size 4` in a
quarter of the activation memory. Gradients are summed over micro-batches (and over processes,
with `mx.distributed`) and divided once by the total number of target tokens, so neither
accumulation nor the number of processes changes the update.

Run by hand with `loraforge train`/`loraforge lora`; the fine-tune worker runs
`python -m mlx_core.train SPEC.json` (see `main`), over several processes with
`mlx.launch -n N --backend ring|nccl python -m mlx_core.train SPEC.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .checkpoints import (
    CheckpointError,
    TrainerState,
    identity_differences,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .checkpoints import fingerprint as identity_fingerprint
from .config import ModelArgs, Quantization, load_config
from .data import Batch, BatchStream, TokenizedExample, eval_batches, tokenize_examples
from .examples import TextExample, find_split_files, read_jsonl
from .lora import (
    DEFAULT_TARGETS,
    TARGETS,
    LoRALinear,
    apply_lora,
    extract_adapter,
    load_adapter_into,
    lora_layer_indices,
    trainable_parameters_count,
)
from .model import Mistral
from .optim import (
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    optimizer_state_tensors,
    restore_optimizer_state,
)
from .tokenizer import Tokenizer
from .train_log import EventHandler, TrainLog
from .weights import LoadedModel, load_model


class TrainingConfigError(ValueError):
    """Training settings that cannot work together (or a checkpoint of another run)."""


@dataclass
class TrainConfig:
    """Every knob of a run; defaults are mlx-examples' lora.py's, with its bugs fixed."""

    iters: int = 1000  # optimizer steps
    batch_size: int = 4  # examples per micro-batch, over all processes
    learning_rate: float = 1e-5
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0  # adamw only
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate * min_lr_ratio
    grad_accumulation: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    grad_checkpoint: bool = False
    seed: int = 0
    max_seq_len: int = 2048
    mask_prompt: bool = False
    completion_after: str | None = None
    pack: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0  # scale = alpha / rank (2.0 at the defaults, as in the seed)
    lora_dropout: float = 0.0
    lora_layers: int = 16  # the last N layers; -1 = all
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps_per_report: int = 10
    steps_per_eval: int = 200  # 0 = only at the end
    val_batches: int = 25  # -1 = the whole validation set
    save_every: int = 100  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 0  # 0 = keep all
    adapter_path: str = "adapters"
    adapter_file: str | None = None  # also write the final adapter as X.npz + X.json
    resume: bool | str = False  # True: latest checkpoint under adapter_path; or a checkpoint dir
    events_jsonl: str | None = None
    quantize: int | None = None  # 4 | 8: QLoRA over a quantized base
    quantize_group_size: int = 64
    dtype: str | None = None  # cast float weights at load (bf16 | f16 | f32)
    compile: bool = True
    memory_limit_gb: float | None = None  # preflight against this instead of the machine
    auto_fit: bool = False  # change batch/checkpointing/quantization until the run fits
    progress: str = "auto"  # auto | bar | lines | none

    def validate(self) -> None:
        """Raise TrainingConfigError naming the flag to change."""

        def bad(msg: str) -> None:
            raise TrainingConfigError(msg)

        for name in ("iters", "batch_size", "grad_accumulation", "lora_rank", "steps_per_report"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} {getattr(self, name)}: use 1 or more")
        for name in ("steps_per_eval", "save_every", "warmup_steps", "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(f"--{name.replace('_', '-')} {getattr(self, name)}: use 0 or more")
        if self.learning_rate <= 0:
            bad(f"--learning-rate {self.learning_rate}: use a positive number such as 1e-5")
        if self.optimizer not in OPTIMIZERS:
            bad(f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.weight_decay and self.optimizer != "adamw":
            bad(f"--weight-decay {self.weight_decay} needs --optimizer adamw (Adam has no decay)")
        if self.lr_schedule not in SCHEDULES:
            bad(f"--lr-schedule {self.lr_schedule!r}: choose {' or '.join(SCHEDULES)}")
        if self.warmup_steps >= self.iters and self.warmup_steps:
            bad(f"--warmup-steps {self.warmup_steps} is not below --iters {self.iters}: "
                "warm up for a fraction of the run (e.g. 5%)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad(f"--min-lr-ratio {self.min_lr_ratio}: use a value between 0 and 1")
        if self.grad_clip < 0:
            bad(f"--grad-clip {self.grad_clip}: use a positive norm, or 0 for no clipping")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad(f"--lora-dropout {self.lora_dropout}: use a value in [0, 1)")
        if self.lora_alpha <= 0:
            bad(f"--lora-alpha {self.lora_alpha}: use a positive number (scale = alpha / rank)")
        if self.lora_layers == 0 or self.lora_layers < -1:
            bad(f"--lora-layers {self.lora_layers}: use a positive count, or -1 for all layers")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            bad(f"--targets {','.join(self.targets) or '(none)'}: choose from {', '.join(TARGETS)}")
        if self.quantize not in (None, 4, 8):
            bad(f"--quantize {self.quantize}: use 4 or 8 (bits), or leave it out")
        if self.max_seq_len < 3:
            bad(f"--max-seq-len {self.max_seq_len}: an example needs room for BOS, a token and EOS")
        if self.completion_after == "":
            bad("--completion-after is empty: give the marker that starts the answer, e.g. 'A:'")
        if self.val_batches < -1:
            bad(f"--val-batches {self.val_batches}: use a count, or -1 for the whole set")
        if self.progress not in ("auto", "bar", "lines", "none"):
            bad(f"progress {self.progress!r}: use auto, bar, lines or none")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingConfigError(f"unknown training settings {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


@dataclass
class TrainData:
    """Tokenized splits (what `load_train_data` makes from a folder of JSONL files)."""

    train: list[TokenizedExample]
    valid: list[TokenizedExample] = field(default_factory=list)
    test: list[TokenizedExample] = field(default_factory=list)


@dataclass
class TrainResult:
    adapter_path: Path
    step: int  # optimizer steps done, counting those before a resume
    losses: list[tuple[int, float]]  # (step, train loss) for every step this call ran
    val_losses: list[tuple[int, float]]
    trainable_parameters: int
    peak_memory_gb: float
    checkpoints: list[Path]
    resumed_from: Path | None = None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


# -- data ---------------------------------------------------------------------------------------
def load_train_data(
    folder: str | Path,
    tokenizer: Tokenizer,
    config: TrainConfig,
    log: TrainLog | None = None,
    splits: Sequence[str] = ("train", "valid"),
) -> TrainData:
    """Read and tokenize `splits` of a data folder (train.jsonl, valid.jsonl, test.jsonl).

    Truncation and dropped examples are reported as warnings, never silently.
    """
    files = find_split_files(Path(folder))
    out = TrainData([])
    for split in splits:
        if split not in files:
            if split == "train":
                raise FileNotFoundError(
                    f"no train.jsonl in {folder}: put one JSON example per line in "
                    f"{Path(folder) / 'train.jsonl'}"
                )
            if log is not None and split == "valid":
                log.warning(0, f"no valid.jsonl in {folder}: training without a validation loss")
            continue
        examples = read_jsonl(files[split])
        if config.mask_prompt and isinstance(examples[0], TextExample) and not config.completion_after:
            raise TrainingConfigError(
                f"--mask-prompt with {{\"text\": ...}} examples ({files[split]}) needs "
                "--completion-after MARKER (e.g. 'A:') to know where the answer starts; or use "
                "prompt/completion or chat examples"
            )
        tokenized, report = tokenize_examples(
            examples, tokenizer, config.max_seq_len, config.mask_prompt, config.completion_after
        )
        if (warning := report.warning()) and log is not None:
            log.warning(0, f"{split}.jsonl: {warning}")
        setattr(out, split, tokenized)
    return out


def data_fingerprint(examples: Iterable[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.tokens, e.loss_mask)).encode())
    return h.hexdigest()[:16]


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


def remove_lora(model: Mistral) -> None:
    """Undo `apply_lora`: put every wrapped projection's base back (e.g. before serving)."""
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.children().items()):
                if isinstance(child, LoRALinear):
                    setattr(owner, name, child.base)


def _batch_arrays(batch: Batch) -> list[mx.array]:
    arrays = [batch.inputs, batch.targets, batch.loss_mask]
    if batch.positions is not None:
        arrays += [batch.positions, batch.segment_ids]
    return arrays


def loss_sum(model: Mistral, arrays: list[mx.array]) -> mx.array:
    """Sum of cross-entropy over the target tokens of a batch (fp32 logits)."""
    inputs, targets, mask = arrays[:3]
    positions, segments = (arrays[3], arrays[4]) if len(arrays) == 5 else (None, None)
    logits = model(inputs, positions=positions, segment_ids=segments)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    return (ce * mask).sum()


def evaluate_loss(model: Mistral, batches: Iterable[Batch],
                  group: mx.distributed.Group | None = None) -> tuple[float, float]:
    """(mean cross-entropy per target token, perplexity) over the batches.

    With a group of several processes each evaluates every size-th batch and the sums are
    combined, so every rank gets the same numbers.
    """
    was_training = model.training
    model.eval()
    total, n = mx.array(0.0), 0
    distributed = group is not None and group.size() > 1
    for i, batch in enumerate(batches):
        if distributed and i % group.size() != group.rank():
            continue
        total = total + loss_sum(model, _batch_arrays(batch))
        n += batch.n_target_tokens
        mx.eval(total)
    sums = mx.stack([total, mx.array(float(n))])
    if distributed:
        sums = mx.distributed.all_sum(sums, group=group)
    total, n = sums.tolist()
    if was_training:
        model.train()
    if n == 0:
        return math.nan, math.nan
    loss = total / n
    return loss, math.exp(min(loss, 700.0))


def _split_micro(batch: Batch, parts: int) -> list[list[mx.array]]:
    arrays = _batch_arrays(batch)
    rows = arrays[0].shape[0] // parts
    return [[a[i * rows:(i + 1) * rows] for a in arrays] for i in range(parts)]


def _all_sum_flat(leaves: list[mx.array], group: mx.distributed.Group) -> list[mx.array]:
    """One all_sum for many arrays: concatenate, reduce, split back."""
    flat = mx.concatenate([x.reshape(-1).astype(mx.float32) for x in leaves])
    flat = mx.distributed.all_sum(flat, group=group)
    out, at = [], 0
    for x in leaves:
        out.append(flat[at:at + x.size].reshape(x.shape).astype(x.dtype))
        at += x.size
    return out


@dataclass
class _Steps:
    first: Callable  # arrays -> (ce_sum, grads)
    more: Callable  # arrays, ce_sum, grads -> (ce_sum, grads)
    update: Callable  # ce_sum, grads, counts -> (loss, global counts)
    state: list


def _build_steps(model: Mistral, optimizer: optim.Optimizer, config: TrainConfig,
                 group: mx.distributed.Group | None) -> _Steps:
    value_and_grad = nn.value_and_grad(model, loss_sum)

    def first(arrays):
        return value_and_grad(model, arrays)

    def more(arrays, ce, grads):
        ce2, grads2 = value_and_grad(model, arrays)
        return ce + ce2, tree_map(mx.add, grads, grads2)

    def update(ce, grads, counts):
        if group is not None and group.size() > 1:
            flat = tree_flatten(grads)
            summed = _all_sum_flat([v for _, v in flat] + [ce, counts], group)
            grads = tree_unflatten([(k, v) for (k, _), v in zip(flat, summed)])
            ce, counts = summed[-2], summed[-1]
        n = mx.maximum(counts[0], 1.0)
        grads = tree_map(lambda g: g / n, grads)
        if config.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(model, grads)
        return ce / n, counts

    state = [model.state, optimizer.state, mx.random.state]
    if config.compile:
        first = partial(mx.compile, inputs=state, outputs=state)(first)
        more = partial(mx.compile, inputs=state, outputs=state)(more)
        update = partial(mx.compile, inputs=state, outputs=state)(update)
    return _Steps(first, more, update, state)


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout noise depends only on (seed, step, rank): a resumed run draws the same masks.
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**32)


# -- the run ------------------------------------------------------------------------------------
def train(
    model: str | Path | LoadedModel,
    data: str | Path | TrainData,
    config: TrainConfig,
    on_event: EventHandler | None = None,
) -> TrainResult:
    """Fine-tune LoRA adapters on `data` and save them to `config.adapter_path`.

    `model` is a model folder (loaded after the memory preflight) or an already loaded model,
    which is changed in place (LoRA layers stay applied). `data` is a folder with train.jsonl
    (+ valid.jsonl) or pre-tokenized `TrainData`. Events go to `config.events_jsonl` and
    `on_event`; the console gets a progress bar or plain lines.
    """
    from .memory import MemoryPreflightError, plan_training_memory

    config.validate()
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    if config.batch_size % world:
        raise TrainingConfigError(
            f"--batch-size {config.batch_size} does not split over {world} processes: "
            f"use a multiple of {world}"
        )
    log = TrainLog(config.events_jsonl, on_event, active=rank == 0, progress=config.progress)
    try:
        # 1. data (the tokenizer is all it needs, so the preflight can see real row widths)
        if isinstance(model, LoadedModel):
            tokenizer, args = model.tokenizer, model.args
        else:
            tokenizer, args = Tokenizer.from_folder(Path(model)), load_config(Path(model))
        if not isinstance(data, TrainData):
            log.say("Loading datasets")
            data = load_train_data(data, tokenizer, config, log)
        if not data.train:
            raise TrainingConfigError(
                "no training examples left after tokenizing: check train.jsonl, and raise "
                "--max-seq-len if the warnings say examples were dropped"
            )

        # 2. memory preflight before a byte of the model is allocated
        try:
            config = plan_training_memory(model, args, data.train, config, world, log)
        except MemoryPreflightError:
            log.event("done", 0, status="failed", reason="memory preflight")
            raise

        # 3. model + LoRA
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            log.say("Loading pretrained model")
            quant = Quantization(config.quantize_group_size, config.quantize) if config.quantize else None
            loaded = load_model(model, dtype=config.dtype, quantize=quant)
        net, args = loaded.model, loaded.args
        layers = lora_layer_indices(args.n_layers, config.lora_layers)
        if config.lora_layers > args.n_layers:
            log.warning(0, f"--lora-layers {config.lora_layers} is more than the model's "
                        f"{args.n_layers} layers: training all of them")
        mx.random.seed(config.seed)  # the same LoRA init on every rank
        apply_lora(net, config.lora_rank, config.lora_scale, config.targets, layers, config.lora_dropout)
        if config.grad_checkpoint:
            enable_grad_checkpoint(net, layers)
        n_trainable = trainable_parameters_count(net)
        n_total = sum(v.size for _, v in tree_flatten(net.parameters()))
        log.say(f"Total parameters {_logical_params(args, n_total) / 1e6:.3f}M")
        log.say(f"Trainable parameters {n_trainable / 1e6:.3f}M")

        return _run(loaded, net, args, layers, data, config, group, log, n_trainable)
    finally:
        log.close()


def _logical_params(args: ModelArgs, stored: int) -> int:
    from .memory import count_parameters

    return count_parameters(args) if args.quantization else stored


def _run(loaded: LoadedModel, net: Mistral, args: ModelArgs, layers: tuple[int, ...],
         data: TrainData, config: TrainConfig, group: mx.distributed.Group, log: TrainLog,
         n_trainable: int) -> TrainResult:
    rank, world = group.rank(), group.size()
    adapter_path = Path(config.adapter_path)
    identity = _identity(config, args, layers, data)
    optimizer = build_optimizer(config.optimizer, config.learning_rate, config.lr_schedule,
                                config.warmup_steps, config.iters, config.weight_decay,
                                config.min_lr_ratio)

    # Resume: everything is restored before the step is compiled (it captures the state).
    start, resumed_from = 0, None
    ckpt_dir = _resume_dir(config, adapter_path, log)
    if ckpt_dir is not None:
        start = _restore(ckpt_dir, net, optimizer, identity, args)
        resumed_from = ckpt_dir
        log.say(f"Resuming from {ckpt_dir} at step {start}")
    else:
        optimizer.init(net.trainable_parameters())
    if start >= config.iters:
        raise TrainingConfigError(
            f"the checkpoint is at step {start} and --iters is {config.iters}: nothing left to "
            "train; raise --iters to train further"
        )

    steps = _build_steps(net, optimizer, config, group)
    stream = BatchStream(data.train, config.batch_size * config.grad_accumulation, config.seed,
                         config.pack, config.max_seq_len, rank, world, start_step=start)
    log.start(start, config.iters, trainable_parameters=n_trainable, world_size=world,
              train_examples=len(data.train), valid_examples=len(data.valid),
              resumed_from=str(resumed_from) if resumed_from else None, config=config.to_dict())
    log.say("Training")

    def validate(step: int) -> None:
        if not data.valid:
            return
        tic = time.perf_counter()
        batches = eval_batches(data.valid, config.batch_size, config.val_batches, config.max_seq_len)
        val_loss, _ = evaluate_loss(net, batches, group)
        val_losses.append((step, val_loss))
        log.eval_report(step, val_loss, time.perf_counter() - tic)

    def checkpoint(step: int) -> None:
        if rank == 0:
            adapter = _adapter(net, config, layers, loaded)
            state = TrainerState(
                step, {"step": stream.step, "epoch": stream.epoch, "step_in_epoch": stream.step_in_epoch},
                {"seed": config.seed, "per_step": "mx.random.seed(_step_seed(seed, step, rank))"},
                identity, identity_fingerprint(identity))
            path = save_checkpoint(adapter_path, state, adapter, optimizer_state_tensors(optimizer),
                                   loaded.name, config.keep_checkpoints)
            checkpoints.append(path)
            log.checkpoint(step, path)

    losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []
    checkpoints: list[Path] = []
    net.train()
    if start == 0 and config.steps_per_eval:
        validate(0)  # the base model's loss: the number every later one is compared with
    window = _Window()
    trained_tokens = 0
    mx.reset_peak_memory()
    for step in range(start + 1, config.iters + 1):
        tic = time.perf_counter()
        batch = next(stream)
        mx.random.seed(_step_seed(config.seed, step, rank))
        micro = _split_micro(batch, config.grad_accumulation)
        ce, grads = steps.first(micro[0])
        for arrays in micro[1:]:
            mx.eval(ce, grads)  # one micro-batch's activations alive at a time
            ce, grads = steps.more(arrays, ce, grads)
        counts = mx.array([batch.n_target_tokens, batch.n_tokens], dtype=mx.float32)
        loss, counts = steps.update(ce, grads, counts)
        mx.eval(steps.state, loss, counts)
        loss_value = loss.item()
        n_targets, n_tokens = (int(c) for c in counts.tolist())
        window.add(loss_value, n_targets, n_tokens, time.perf_counter() - tic)
        trained_tokens += n_tokens
        losses.append((step, loss_value))
        log.progress(step, loss_value)
        if not math.isfinite(loss_value):
            log.event("done", step, status="failed", reason="loss is not finite")
            raise TrainingConfigError(
                f"step {step}: the loss is {loss_value}: lower --learning-rate, or set --grad-clip 1.0"
            )

        if step % config.steps_per_report == 0 or step == config.iters:
            log.train_report(step, window.loss, _current_lr(optimizer), window.it_per_sec,
                             window.tokens_per_sec, window.targets_per_sec,
                             mx.get_peak_memory() / 1e9, trained_tokens)
            window = _Window()
        if (config.steps_per_eval and step % config.steps_per_eval == 0) or step == config.iters:
            validate(step)
        if config.save_every and step % config.save_every == 0:
            checkpoint(step)

    final = _adapter(net, config, layers, loaded)
    if rank == 0:
        from .adapter_io import save_adapter, save_adapter_npz

        save_adapter(adapter_path, final, loaded.name)
        log.say(f"Saved final adapter to {adapter_path}")
        if config.adapter_file:
            save_adapter_npz(Path(config.adapter_file), final, loaded.name)
            log.say(f"Saved final adapter to {config.adapter_file}")
    peak = mx.get_peak_memory() / 1e9
    log.event("done", config.iters, status="succeeded", adapter_path=str(adapter_path),
              train_loss=losses[-1][1], val_loss=val_losses[-1][1] if val_losses else None,
              peak_memory_gb=peak, trained_tokens=trained_tokens)
    return TrainResult(adapter_path, config.iters, losses, val_losses, n_trainable, peak,
                       checkpoints, resumed_from)


@dataclass
class _Window:
    """Numbers since the last report."""

    steps: int = 0
    loss_sum: float = 0.0
    targets: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, targets: int, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.targets += targets
        self.tokens += tokens
        self.seconds += seconds

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def it_per_sec(self) -> float:
        return self.steps / max(self.seconds, 1e-9)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def targets_per_sec(self) -> float:
        return self.targets / max(self.seconds, 1e-9)


def _current_lr(optimizer: optim.Optimizer) -> float:
    # The optimizer stores the lr it used for the last update.
    return float(optimizer.learning_rate.item())


def _adapter(net: Mistral, config: TrainConfig, layers: tuple[int, ...], loaded: LoadedModel):
    return extract_adapter(net, config.lora_rank, config.lora_scale, config.targets, layers,
                           alpha=config.lora_alpha, dropout=config.lora_dropout,
                           base_model=loaded.name)


def _identity(config: TrainConfig, args: ModelArgs, layers: tuple[int, ...], data: TrainData) -> dict:
    """The settings a checkpoint's tensors and data position mean something under.

    `iters` and the reporting/eval/save cadence may change between runs (e.g. to train longer).
    """
    return {
        "model": args.shape_fingerprint(),
        "quantization": [args.quantization.bits, args.quantization.group_size] if args.quantization else None,
        "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "lora_layers": list(layers),
        "targets": list(config.targets), "batch_size": config.batch_size,
        "grad_accumulation": config.grad_accumulation, "pack": config.pack,
        "max_seq_len": config.max_seq_len, "mask_prompt": config.mask_prompt,
        "completion_after": config.completion_after, "seed": config.seed,
        "optimizer": config.optimizer, "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule, "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay, "data": data_fingerprint(data.train),
    }


def _resume_dir(config: TrainConfig, adapter_path: Path, log: TrainLog) -> Path | None:
    if not config.resume:
        return None
    if config.resume is True or config.resume == "latest":
        found = latest_checkpoint(adapter_path)
        if found is None:
            log.warning(0, f"--resume: no checkpoint under {adapter_path / 'checkpoints'}; "
                        "starting from step 0")
        return found
    return Path(config.resume)


def _restore(ckpt_dir: Path, net: Mistral, optimizer: optim.Optimizer, identity: dict,
             args: ModelArgs) -> int:
    try:
        ckpt = load_checkpoint(ckpt_dir)
    except CheckpointError as e:
        raise TrainingConfigError(str(e)) from e
    diffs = identity_differences(ckpt.state.identity, identity)
    if diffs:
        raise TrainingConfigError(
            f"{ckpt_dir} is from a run with other settings ({'; '.join(diffs)}): resume with the "
            "checkpoint's settings, or train into a new --adapter-path"
        )
    ckpt.adapter.check_fits(args)
    load_adapter_into(net, ckpt.adapter)
    try:
        restore_optimizer_state(optimizer, net.trainable_parameters(), ckpt.optimizer_tensors,
                                str(ckpt_dir))
    except ValueError as e:
        raise TrainingConfigError(str(e)) from e
    # No RNG key to restore: every step reseeds from (seed, step, rank), see _step_seed.
    return ckpt.state.step


# -- `python -m mlx_core.train SPEC.json` -------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run one fine-tune from a JSON spec: {"model": PATH, "data": DIR, "config": {...}}.

    This is how the job worker starts training (also under `mlx.launch` for several processes);
    people use `loraforge train`.
    """
    from .errors import USER_ERRORS

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlx_core.train SPEC.json  (spec: {\"model\": ..., \"data\": ..., "
              "\"config\": {TrainConfig fields}})", file=sys.stderr)
        return 2
    try:
        spec = json.loads(Path(argv[0]).read_text())
        config = TrainConfig.from_dict(spec.get("config", {}))
        train(spec["model"], spec["data"], config)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        print(f"mlx_core.train: cannot use spec {argv[0]}: {e}; write "
              "{\"model\": ..., \"data\": ..., \"config\": {...}}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"mlx_core.train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TrainConfig", "TrainData", "TrainResult", "TrainingConfigError", "evaluate_loss",
           "enable_grad_checkpoint", "load_train_data", "remove_lora", "train"]
