"""What a fine-tune job trains: its request's settings resolved, and each run as a `TrainConfig`.

- **Resolve** (`resolve_hyperparameters`, `resolve_lora`, called by `server.jobs.queue.create_job`):
  "auto" hyperparameters become numbers from the training file's example count, every bound is
  checked (a 400 naming the parameter), and the result is what the job row stores, so the job
  object shows the numbers that will be used.
- **Read** (`job_hyperparameters`, `job_lora`): the row's `hyperparameters` and `lora` JSON
  columns decoded into Structs, the one place they are read.
- **Run** (`training_steps`, `train_config`): the trainer's settings for one run of a job; the
  worker writes them to jobs/<id>/spec.json as a `mlx_core.train.config.TrainSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mlx_core.lora.layers import DEFAULT_TARGETS, TARGETS
from mlx_core.train.config import TrainConfig, TrainingConfigError
from server.db import FineTuningJob
from server.errors import BadRequestError
from server.schemas.fine_tuning import LoraOptions
from server.settings import Settings

# Hyperparameters ("auto" rules and bounds).
BASE_LEARNING_RATE = 1e-5  # learning rate = BASE_LEARNING_RATE x learning_rate_multiplier
# "auto" learning rate: LoRA's usual 2e-4 for a model as wide as Mistral-7B (dim 4096), more for
# narrower ones, which need larger steps (rate ~ 1/sqrt(width), between 1e-4 and 1e-3). Measured
# on the embedded model (dim 256, 2,000 examples, 750 steps of batch 8): 1e-4 left execution
# accuracy at 2.5 % (base 1 %), 8e-4 (this rule) reached 35 % unmasked (docs/fine-tuning.md).
AUTO_LR_AT_7B_WIDTH = 2e-4
MIN_AUTO_LR, MAX_AUTO_LR = 1e-4, 1e-3
MAX_EPOCHS, MAX_BATCH_SIZE = 50, 256
CHECKPOINTS_PER_JOB = 10  # resume points (and checkpoint rows) per job


@dataclass(frozen=True)
class JobRequest:
    """A create request from either API in one shape (the routes build it from their Struct)."""

    model: str | None  # None: the served base model (the legacy API's default)
    training_file: str
    validation_file: str | None
    n_epochs: int | str  # a number or "auto"
    batch_size: int | str
    learning_rate_multiplier: float | str
    lora: LoraOptions
    suffix: str | None
    seed: int | None
    api: str = "fine_tuning"  # or "fine-tunes"
    prompt_loss_weight: float | None = None  # legacy only


class JobHyperparameters(msgspec.Struct, frozen=True):
    """A job's `hyperparameters` column: the numbers in effect, "auto" already resolved."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def invalid_value(message: str, param: str, code: str = "invalid_value") -> BadRequestError:
    return BadRequestError(message, param=param, code=code)


# -- "auto" and bounds ------------------------------------------------------------------------
def auto_epochs(n_examples: int) -> int:
    """OpenAI's rule: 3 epochs, more for small files (until ~100 examples are seen, at most 25),
    fewer for big ones (about 25,000 examples seen, at least 1)."""
    if n_examples * 3 < 100:
        return min(25, math.ceil(100 / n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def auto_lr_multiplier(model_dim: int) -> float:
    """The "auto" learning_rate_multiplier for a model of hidden size `model_dim`."""
    lr = AUTO_LR_AT_7B_WIDTH * math.sqrt(4096 / model_dim)
    return round(min(MAX_AUTO_LR, max(MIN_AUTO_LR, lr)) / BASE_LEARNING_RATE, 1)


def auto_batch_size(n_examples: int) -> int:
    """One example per 100, between 1 and 8 (LoRA on one machine: small batches, more steps)."""
    return min(8, max(1, round(n_examples / 100)))


def _resolve(value: Any, auto: Any, kind: type, low: float, high: float, name: str) -> Any:
    param = f"hyperparameters.{name}"
    if value == "auto":
        return auto
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid_value(f'{name} must be a whole number or "auto", got {value!r}.', param)
    if not low <= value <= high:
        raise invalid_value(
            f'{name} must be between {low:g} and {high:g} (or "auto"), got {value!r}.', param
        )
    return kind(value)


def resolve_hyperparameters(
    request: JobRequest, n_examples: int, model_dim: int
) -> JobHyperparameters:
    """The request's hyperparameters with "auto" resolved for a file of `n_examples` examples
    and a base model of hidden size `model_dim`; a BadRequestError names the one out of bounds."""
    n = n_examples
    n_epochs = _resolve(request.n_epochs, auto_epochs(n), int, 1, MAX_EPOCHS, "n_epochs")
    batch_size = _resolve(
        request.batch_size, auto_batch_size(n), int, 1, MAX_BATCH_SIZE, "batch_size"
    )
    if batch_size > n:
        raise invalid_value(
            f"batch_size {batch_size} is larger than the {n} examples in "
            f'{request.training_file}: use {n} or fewer, or "auto".',
            "hyperparameters.batch_size",
        )
    multiplier = request.learning_rate_multiplier
    if multiplier == "auto":
        multiplier = auto_lr_multiplier(model_dim)
    elif isinstance(multiplier, bool) or isinstance(multiplier, str) or not multiplier > 0:
        raise invalid_value(
            f'learning_rate_multiplier must be a number above 0 (or "auto"), got {multiplier!r}.',
            "hyperparameters.learning_rate_multiplier",
        )
    return JobHyperparameters(n_epochs, batch_size, float(multiplier))


def resolve_lora(request: JobRequest, settings: Settings, text_examples: bool) -> LoraOptions:
    """The request's `lora` as the job stores it (targets filled in, the legacy prompt weight
    mapped to mask_prompt); a BadRequestError names a setting that cannot work."""
    lora = request.lora
    if lora.targets is None:  # stored resolved, so the job shows what is trained
        lora = msgspec.structs.replace(lora, targets=list(DEFAULT_TARGETS))
    if lora.mask_prompt is None:  # unset: learn the answers wherever the data says what they are
        masked = not text_examples or lora.completion_after is not None
        lora = msgspec.structs.replace(lora, mask_prompt=masked)
    if request.prompt_loss_weight is not None and not text_examples:
        # The legacy weight scaled the prompt's loss; the trainer learns the prompt fully or not
        # at all, so the nearer of the two is used (the legacy default 0.01 masks it).
        lora = msgspec.structs.replace(lora, mask_prompt=request.prompt_loss_weight < 0.5)
    _check_lora(lora, settings, text_examples)
    return lora


def _check_lora(lora: LoraOptions, settings: Settings, text_examples: bool) -> None:
    if not 1 <= lora.rank <= settings.max_lora_rank:
        raise invalid_value(
            f"lora.rank {lora.rank} is outside 1..{settings.max_lora_rank} (this server's "
            "--max-lora-rank, the largest it can serve): pick a rank in that range.",
            "lora.rank",
        )
    if lora.alpha <= 0:
        raise invalid_value(
            f"lora.alpha {lora.alpha} must be positive (scale = alpha / rank), e.g. 16.",
            "lora.alpha",
        )
    if not 0 <= lora.dropout < 1:
        raise invalid_value(
            f"lora.dropout {lora.dropout} must be in [0, 1), e.g. 0.05.", "lora.dropout"
        )
    unknown = [t for t in lora.targets or () if t not in TARGETS]
    if unknown or lora.targets == []:
        raise invalid_value(
            f"lora.targets {lora.targets}: choose from {', '.join(TARGETS)}.", "lora.targets"
        )
    if lora.num_layers is not None and lora.num_layers < 1:
        raise invalid_value(
            f"lora.num_layers {lora.num_layers}: use 1 or more, or leave it out for all layers.",
            "lora.num_layers",
        )
    if lora.max_seq_len < 3:
        raise invalid_value(
            f"lora.max_seq_len {lora.max_seq_len}: an example needs room for BOS, a token "
            "and EOS; use e.g. 2048.",
            "lora.max_seq_len",
        )
    if lora.mask_prompt and text_examples and not lora.completion_after:
        raise invalid_value(
            'lora.mask_prompt with {"text": ...} examples needs lora.completion_after '
            '(the marker where the answer starts, e.g. "A:"), or use prompt/completion '
            "or chat examples.",
            "lora.completion_after",
        )


def check_trainer_accepts(job: FineTuningJob, n_examples: int) -> None:
    """The trainer's own validation, on the exact config the job will run with: nothing it
    would refuse at start-up gets queued."""
    try:
        train_config(job, n_examples, Path("."), None, None).validate()
    except TrainingConfigError as e:
        raise invalid_value(
            f"These settings cannot train: {e}. Change the job's hyperparameters or lora settings.",
            "lora",
        ) from None


# -- the row's JSON columns -------------------------------------------------------------------
def job_hyperparameters(job: FineTuningJob) -> JobHyperparameters:
    return msgspec.convert(job.hyperparameters, JobHyperparameters)


def job_lora(job: FineTuningJob) -> LoraOptions:
    """The job's `lora` column (its `targets` are always filled in)."""
    return msgspec.convert(job.lora, LoraOptions)


# -- the training run a job asks for ----------------------------------------------------------
def training_steps(job: FineTuningJob, n_examples: int) -> int:
    hp = job_hyperparameters(job)
    return max(1, math.ceil(n_examples * hp.n_epochs / hp.batch_size))


def train_config(
    job: FineTuningJob,
    n_examples: int,
    job_dir: Path,
    resume: Path | None,
    memory_limit_gb: float | None,
) -> TrainConfig:
    """The trainer's settings for one run of `job` (its files under `job_dir`), resuming from
    the checkpoint folder `resume` if given."""
    iters = training_steps(job, n_examples)
    save_every = max(1, math.ceil(iters / CHECKPOINTS_PER_JOB))
    hp, lora = job_hyperparameters(job), job_lora(job)
    return TrainConfig(
        iters=iters,
        batch_size=hp.batch_size,
        learning_rate=BASE_LEARNING_RATE * hp.learning_rate_multiplier,
        seed=job.seed,
        max_seq_len=lora.max_seq_len,
        mask_prompt=bool(lora.mask_prompt),  # stored resolved: never None here
        completion_after=lora.completion_after,
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_layers=lora.num_layers or -1,
        targets=tuple(lora.targets if lora.targets is not None else DEFAULT_TARGETS),
        quantize=lora.quantize,
        steps_per_report=1,
        # With validation data every checkpoint gets a validation loss.
        steps_per_eval=save_every if job.validation_file else 0,
        save_every=save_every,
        adapter_path=str(job_dir / "adapter"),
        events_jsonl=str(job_dir / "events.jsonl"),
        resume=str(resume) if resume else False,
        memory_limit_gb=memory_limit_gb,
        progress="lines",
    )
