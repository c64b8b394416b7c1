"""Training settings (`TrainConfig`, validated up front) and the data they read.

`TrainConfig` has every knob of a run with the seed lora.py's defaults; `validate` refuses
combinations that cannot work before anything is loaded. `load_train_data` turns a folder of
JSONL splits into tokenized examples, reporting truncation instead of hiding it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_core.data.batches import TokenizedExample, tokenize_examples
from mlx_core.data.formats import TextExample, find_split_files, read_jsonl
from mlx_core.errors import LoraforgeError
from mlx_core.lora.layers import DEFAULT_TARGETS, TARGETS
from mlx_core.tokenizer import Tokenizer
from mlx_core.train.optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:  # events import TrainConfig (a start event carries the run's settings)
    from mlx_core.train.events import TrainLog


DEFAULT_LORA_LAYERS = 16  # mlx-examples lora.py's default


class TrainingConfigError(LoraforgeError, ValueError):
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
    lora_layers: int = DEFAULT_LORA_LAYERS  # the last N layers (all of a smaller model); -1 = all
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps_per_report: int = 10
    steps_per_eval: int = 200  # 0 = only at the end
    val_batches: int = 25  # -1 = the whole validation set
    save_every: int = 100  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 0  # 0 = keep all
    adapter_path: str = "adapters"
    adapter_file: str | None = None  # also write the final adapter as X.npz + X.json
    resume: bool | str = False  # True: latest checkpoint under adapter_path; or a checkpoint dir
    init_adapter: str | None = (
        None  # start from these adapter weights (the seed's --resume-adapter-file)
    )
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
            bad(
                f"--warmup-steps {self.warmup_steps} is not below --iters {self.iters}: "
                "warm up for a fraction of the run (e.g. 5%)"
            )
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
            raise TrainingConfigError(
                f"unknown training settings {unknown}; known: {sorted(known)}"
            )
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


@dataclass
class TrainSpec:
    """One run as a file (`spec.json`): what `python -m mlx_core.train` reads, and what the
    fine-tune worker writes for each job."""

    model: str  # model folder
    data: str  # folder with train.jsonl (valid.jsonl, test.jsonl)
    config: TrainConfig

    def write(self, path: Path) -> None:
        doc = {"model": self.model, "data": self.data, "config": self.config.to_dict()}
        path.write_text(json.dumps(doc, indent=2))

    @classmethod
    def read(cls, path: Path) -> TrainSpec:
        """The spec in `path`; TrainingConfigError says what is wrong with a bad one."""
        try:
            doc = json.loads(path.read_text())
            return cls(
                str(doc["model"]), str(doc["data"]), TrainConfig.from_dict(doc.get("config", {}))
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, TrainingConfigError):
                raise
            raise TrainingConfigError(
                f"cannot use spec {path}: {e}; write "
                '{"model": ..., "data": ..., "config": {TrainConfig fields}}'
            ) from e


@dataclass
class TrainData:
    """Tokenized splits (what `load_train_data` makes from a folder of JSONL files)."""

    train: list[TokenizedExample]
    valid: list[TokenizedExample] = field(default_factory=list)
    test: list[TokenizedExample] = field(default_factory=list)


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
                log.warning(
                    0,
                    "no_validation_data",
                    f"no valid.jsonl in {folder}: training without a validation loss",
                )
            continue
        examples = read_jsonl(files[split])
        if (
            config.mask_prompt
            and isinstance(examples[0], TextExample)
            and not config.completion_after
        ):
            raise TrainingConfigError(
                f'--mask-prompt with {{"text": ...}} examples ({files[split]}) needs '
                "--completion-after MARKER (e.g. 'A:') to know where the answer starts; or use "
                "prompt/completion or chat examples"
            )
        tokenized, report = tokenize_examples(
            examples, tokenizer, config.max_seq_len, config.mask_prompt, config.completion_after
        )
        if (warning := report.warning()) and log is not None:
            log.warning(0, "examples_too_long", f"{split}.jsonl: {warning}")
        setattr(out, split, tokenized)
    return out


def data_fingerprint(examples: Iterable[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.tokens, e.loss_mask)).encode())
    return h.hexdigest()[:16]
