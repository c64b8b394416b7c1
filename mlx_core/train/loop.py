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
`python -m mlx_core.train SPEC.json` (`mlx_core/train/__main__.py`), over several processes with
`mlx.launch -n N --backend ring|nccl python -m mlx_core.train SPEC.json`.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_core.config import ModelArgs, Quantization, load_config
from mlx_core.data.batches import BatchStream, eval_batches
from mlx_core.lora.layers import (
    apply_lora,
    extract_adapter,
    load_adapter_into,
    lora_layer_indices,
    trainable_parameters_count,
)
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer
from mlx_core.train.checkpoints import (
    CheckpointError,
    TrainerState,
    identity_differences,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mlx_core.train.checkpoints import fingerprint as identity_fingerprint
from mlx_core.train.config import (
    DEFAULT_LORA_LAYERS,
    TrainConfig,
    TrainData,
    TrainingConfigError,
    data_fingerprint,
    load_train_data,
)
from mlx_core.train.events import (
    DoneEvent,
    EventHandler,
    StartEvent,
    TrainEvent,
    TrainLog,
)
from mlx_core.train.optim import build_optimizer, optimizer_state_tensors, restore_optimizer_state
from mlx_core.train.step import TrainStep, enable_grad_checkpoint, evaluate_loss
from mlx_core.weights import LoadedModel, load_model, quantize_model


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
    model: LoadedModel | None = field(default=None, repr=False)  # with the LoRA layers applied

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1][1] if self.val_losses else None


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
    (+ valid.jsonl) or pre-tokenized `TrainData`. Events (`mlx_core.train.events.TrainerEvent`
    Structs) go to `config.events_jsonl` and `on_event`; the console gets a progress bar or plain
    lines.
    """
    from mlx_core.train.memory import MemoryPreflightError, plan_training_memory

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
            log.event(DoneEvent(step=0, status="failed", reason="memory preflight"))
            raise

        # 3. model + LoRA
        if isinstance(model, LoadedModel):
            loaded = model
            if config.quantize and not loaded.args.quantization:
                quantize_model(
                    loaded.model, Quantization(config.quantize_group_size, config.quantize)
                )
                loaded.args = loaded.model.args
            if config.dtype:
                log.warning(
                    0,
                    "dtype_ignored",
                    "--dtype applies when the model is loaded from a path; "
                    "the already loaded model keeps its dtype",
                )
        else:
            log.say("Loading pretrained model")
            quant = (
                Quantization(config.quantize_group_size, config.quantize)
                if config.quantize
                else None
            )
            loaded = load_model(model, dtype=config.dtype, quantize=quant)
        net, args = loaded.model, loaded.args
        layers = lora_layer_indices(args.n_layers, config.lora_layers)
        # The default (16, the seed's) quietly means "all" on a smaller model; an explicit
        # larger count is worth a word.
        if config.lora_layers > args.n_layers and config.lora_layers != DEFAULT_LORA_LAYERS:
            log.warning(
                0,
                "lora_layers_clamped",
                f"--lora-layers {config.lora_layers} is more than the model's "
                f"{args.n_layers} layers: training all of them",
            )
        mx.random.seed(config.seed)  # the same LoRA init on every rank
        apply_lora(
            net, config.lora_rank, config.lora_scale, config.targets, layers, config.lora_dropout
        )
        if config.grad_checkpoint:
            enable_grad_checkpoint(net, layers)
        n_trainable = trainable_parameters_count(net)
        # mlx annotates tree_flatten as list | dict; without `destination` it is the list.
        flat: list[tuple[str, mx.array]] = tree_flatten(net.parameters())  # type: ignore[assignment]
        n_total = sum(v.size for _, v in flat)
        log.say(f"Total parameters {_logical_params(args, n_total) / 1e6:.3f}M")
        log.say(f"Trainable parameters {n_trainable / 1e6:.3f}M")

        return _run(loaded, net, args, layers, data, config, group, log, n_trainable)
    finally:
        log.close()


def _logical_params(args: ModelArgs, stored: int) -> int:
    from mlx_core.train.memory import count_parameters

    return count_parameters(args) if args.quantization else stored


def _run(
    loaded: LoadedModel,
    net: Mistral,
    args: ModelArgs,
    layers: tuple[int, ...],
    data: TrainData,
    config: TrainConfig,
    group: mx.distributed.Group,
    log: TrainLog,
    n_trainable: int,
) -> TrainResult:
    rank, world = group.rank(), group.size()
    adapter_path = Path(config.adapter_path)
    identity = _identity(config, args, layers, data)
    optimizer = build_optimizer(
        config.optimizer,
        config.learning_rate,
        config.lr_schedule,
        config.warmup_steps,
        config.iters,
        config.weight_decay,
        config.min_lr_ratio,
    )

    # Resume: everything is restored before the step is compiled (it captures the state).
    start, resumed_from = 0, None
    ckpt_dir = _resume_dir(config, adapter_path, log)
    if ckpt_dir is not None:
        start = _restore(ckpt_dir, net, optimizer, identity, args)
        resumed_from = ckpt_dir
        log.say(f"Resuming from {ckpt_dir} at step {start}")
    else:
        if config.init_adapter:
            _load_init_adapter(config, net, args, layers)
            log.say(f"Loading pretrained adapters from {config.init_adapter}")
        optimizer.init(net.trainable_parameters())
    if start >= config.iters:
        raise TrainingConfigError(
            f"the checkpoint is at step {start} and --iters is {config.iters}: nothing left to "
            "train; raise --iters to train further"
        )

    step_fn = TrainStep(net, optimizer, config, group)
    stream = BatchStream(
        data.train,
        config.batch_size * config.grad_accumulation,
        config.seed,
        config.pack,
        config.max_seq_len,
        rank,
        world,
        start_step=start,
    )
    log.start(
        StartEvent(
            step=start,
            iters=config.iters,
            trainable_parameters=n_trainable,
            world_size=world,
            train_examples=len(data.train),
            valid_examples=len(data.valid),
            resumed_from=str(resumed_from) if resumed_from else None,
            config=config,
        )
    )
    log.say("Training")

    def validate(step: int) -> None:
        if not data.valid or config.val_batches == 0:
            return
        tic = time.perf_counter()
        batches = eval_batches(
            data.valid, config.batch_size, config.val_batches, config.max_seq_len
        )
        val_loss, _ = evaluate_loss(net, batches, group)
        val_losses.append((step, val_loss))
        log.eval_report(step, val_loss, time.perf_counter() - tic)

    def checkpoint(step: int) -> None:
        if rank == 0:
            adapter = _adapter(net, config, layers, loaded)
            state = TrainerState(
                step,
                {"step": stream.step, "epoch": stream.epoch, "step_in_epoch": stream.step_in_epoch},
                {"seed": config.seed, "per_step": "mx.random.seed(_step_seed(seed, step, rank))"},
                identity,
                identity_fingerprint(identity),
            )
            path = save_checkpoint(
                adapter_path,
                state,
                adapter,
                optimizer_state_tensors(optimizer),
                loaded.name,
                config.keep_checkpoints,
            )
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
    interrupt = _Interrupt()
    for step in interrupt.guard(range(start + 1, config.iters + 1)):
        tic = time.perf_counter()
        batch = next(stream)
        mx.random.seed(_step_seed(config.seed, step, rank))
        loss_value, n_targets, n_tokens = step_fn(batch)
        window.add(loss_value, n_targets, n_tokens, time.perf_counter() - tic)
        trained_tokens += n_tokens
        losses.append((step, loss_value))
        log.progress(step, loss_value)
        if not math.isfinite(loss_value):
            log.event(DoneEvent(step=step, status="failed", reason="loss is not finite"))
            raise TrainingConfigError(
                f"step {step}: the loss is {loss_value}: lower --learning-rate, or set --grad-clip 1.0"
            )

        if step % config.steps_per_report == 0 or step == config.iters:
            log.train_report(
                TrainEvent(
                    step=step,
                    loss=window.loss,
                    learning_rate=_current_lr(optimizer),
                    it_per_sec=window.it_per_sec,
                    tokens_per_sec=window.tokens_per_sec,
                    target_tokens_per_sec=window.targets_per_sec,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    trained_tokens=trained_tokens,
                )
            )
            window = _Window()
        if (config.steps_per_eval and step % config.steps_per_eval == 0) or step == config.iters:
            validate(step)
        if config.save_every and step % config.save_every == 0:
            checkpoint(step)
        if interrupt.requested:
            if not (config.save_every and step % config.save_every == 0):
                checkpoint(step)
            log.say(
                f"Interrupted at step {step} of {config.iters}: the checkpoint saved under "
                f"{adapter_path / 'checkpoints'} resumes it (the same command with --resume)"
            )
            raise TrainingInterrupted(step)

    final = _adapter(net, config, layers, loaded)
    if rank == 0:
        from mlx_core.lora.formats import save_adapter, save_adapter_npz

        save_adapter(adapter_path, final, loaded.name)
        log.say(f"Saved final adapter to {adapter_path}")
        if config.adapter_file:
            save_adapter_npz(Path(config.adapter_file), final, loaded.name)
            log.say(f"Saved final adapter to {config.adapter_file}")
    peak = mx.get_peak_memory() / 1e9
    log.event(
        DoneEvent(
            step=config.iters,
            status="succeeded",
            adapter_path=str(adapter_path),
            train_loss=losses[-1][1],
            val_loss=val_losses[-1][1] if val_losses else None,
            peak_memory_gb=peak,
            trained_tokens=trained_tokens,
        )
    )
    return TrainResult(
        adapter_path,
        config.iters,
        losses,
        val_losses,
        n_trainable,
        peak,
        checkpoints,
        resumed_from,
        loaded,
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary, after saving a checkpoint of that step."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


class _Interrupt:
    """Ctrl-C during training finishes the step, checkpoints it and stops; a second Ctrl-C
    stops at once. Only in the main thread (where Python delivers signals)."""

    def __init__(self) -> None:
        self.requested = False

    def guard(self, steps: range) -> Iterator[int]:
        if threading.current_thread() is not threading.main_thread():
            yield from steps
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield from steps
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C is immediate


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
    return extract_adapter(
        net,
        config.lora_rank,
        config.lora_scale,
        config.targets,
        layers,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        base_model=loaded.name,
    )


def _identity(
    config: TrainConfig, args: ModelArgs, layers: tuple[int, ...], data: TrainData
) -> dict:
    """The settings a checkpoint's tensors and data position mean something under.

    `iters` and the reporting/eval/save cadence may change between runs (e.g. to train longer).
    """
    return {
        "model": args.shape_fingerprint(),
        "quantization": [args.quantization.bits, args.quantization.group_size]
        if args.quantization
        else None,
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "lora_layers": list(layers),
        "targets": list(config.targets),
        "batch_size": config.batch_size,
        "grad_accumulation": config.grad_accumulation,
        "pack": config.pack,
        "max_seq_len": config.max_seq_len,
        "mask_prompt": config.mask_prompt,
        "completion_after": config.completion_after,
        "seed": config.seed,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "data": data_fingerprint(data.train),
    }


def _resume_dir(config: TrainConfig, adapter_path: Path, log: TrainLog) -> Path | None:
    if not config.resume:
        return None
    if config.resume is True or config.resume == "latest":
        found = latest_checkpoint(adapter_path)
        if found is None:
            log.warning(
                0,
                "no_checkpoint_to_resume",
                f"--resume: no checkpoint under {adapter_path / 'checkpoints'}; "
                "starting from step 0",
            )
        return found
    return Path(config.resume)


def _load_init_adapter(
    config: TrainConfig, net: Mistral, args: ModelArgs, layers: tuple[int, ...]
) -> None:
    from mlx_core.lora.formats import load_adapter

    assert config.init_adapter is not None  # only called for a run that starts from one
    adapter = load_adapter(config.init_adapter, args)
    adapter.check_fits(args)
    if adapter.rank != config.lora_rank:
        raise TrainingConfigError(
            f"{config.init_adapter} has rank {adapter.rank}, this run trains rank "
            f"{config.lora_rank}: pass --lora-rank {adapter.rank}"
        )
    outside: list[str] | list[int] = sorted(
        {t for _, t in adapter.weights} - set(config.targets)
    ) or sorted({i for i, _ in adapter.weights} - set(layers))
    if outside:
        raise TrainingConfigError(
            f"{config.init_adapter} adapts {outside} outside this run's --targets/--lora-layers: "
            f"train with --targets {','.join(adapter.targets)} and enough --lora-layers"
        )
    if abs(adapter.scale - config.lora_scale) > 1e-9:
        raise TrainingConfigError(
            f"{config.init_adapter} has scale {adapter.scale}, this run {config.lora_scale}: pass "
            f"--lora-alpha {adapter.scale * config.lora_rank:g}"
        )
    load_adapter_into(net, adapter)


def _restore(
    ckpt_dir: Path, net: Mistral, optimizer: optim.Optimizer, identity: dict, args: ModelArgs
) -> int:
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
        restore_optimizer_state(
            optimizer, net.trainable_parameters(), ckpt.optimizer_tensors, str(ckpt_dir)
        )
    except ValueError as e:
        raise TrainingConfigError(str(e)) from e
    # No RNG key to restore: every step reseeds from (seed, step, rank), see _step_seed.
    return ckpt.state.step
