"""What a training run tells the world: typed JSON-lines events and a console view.

Every event is one of the msgspec Structs below (`TrainerEvent`, tagged by `type`), each with the
`step` it happened at and a unix `time`. `TrainLog` writes them one per line to `events_jsonl`
(flushed at once: the fine-tune worker tails the file from another process, and reads the lines
back with `decode_event`) and hands them to `on_event`. The console shows a progress bar on a
terminal and the seed lora.py's plain lines otherwise (`Iter 10: Train loss 1.234, ...`).
Only rank 0 of a distributed run reports; the other ranks' logs are silent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TextIO

import msgspec
from msgspec import UNSET, UnsetType

from mlx_core.train.config import TrainConfig

_BAR_WIDTH = 24


# -- the events ---------------------------------------------------------------------------------
def _now() -> float:
    return round(time.time(), 3)


class _Event(msgspec.Struct, tag_field="type", kw_only=True, frozen=True):
    step: int
    time: float = msgspec.field(default_factory=_now)


# kw_only on every event keeps the JSON keys in the order they are declared, `step` and `time`
# first (msgspec puts keyword-only fields after the others).
class StartEvent(_Event, tag="start", kw_only=True, frozen=True):
    """Training begins (again, after a resume: `resumed_from` is the checkpoint folder)."""

    iters: int
    trainable_parameters: int
    world_size: int
    train_examples: int
    valid_examples: int
    resumed_from: str | None
    config: TrainConfig  # the settings in effect (after --auto-fit)


class TrainEvent(_Event, tag="train", kw_only=True, frozen=True):
    """The numbers since the last report."""

    loss: float
    learning_rate: float
    it_per_sec: float
    tokens_per_sec: float
    target_tokens_per_sec: float
    peak_memory_gb: float
    trained_tokens: int  # by this process's run, from its first step


class EvalEvent(_Event, tag="eval", kw_only=True, frozen=True):
    val_loss: float
    val_time: float  # seconds


class CheckpointEvent(_Event, tag="checkpoint", kw_only=True, frozen=True):
    path: str  # the checkpoint folder (a loadable adapter)


WarningCode = Literal[
    "no_validation_data",  # no valid.jsonl: no validation loss
    "examples_too_long",  # examples over --max-seq-len were cut or dropped
    "dtype_ignored",  # --dtype with an already loaded model
    "lora_layers_clamped",  # --lora-layers above the model's layer count
    "no_checkpoint_to_resume",  # --resume found nothing: training from step 0
    "auto_fit_changed",  # --auto-fit changed the run's settings to fit in memory
    "unspecified",  # only in events.jsonl files written before warnings had codes
]


class WarningEvent(_Event, tag="warning", kw_only=True, frozen=True):
    """Something the user should know; `code` says which (readers never parse `message`)."""

    code: WarningCode = "unspecified"
    message: str


class DoneEvent(_Event, tag="done", kw_only=True, frozen=True):
    """The run ended. A success carries its numbers; a failure only its `reason`. Fields left
    UNSET are not written, so each kind of line keeps exactly the keys it always had."""

    status: Literal["succeeded", "failed"]
    reason: str | UnsetType = UNSET  # failed
    adapter_path: str | UnsetType = UNSET  # succeeded, from here on
    train_loss: float | UnsetType = UNSET
    val_loss: float | None | UnsetType = UNSET  # None: no validation data
    peak_memory_gb: float | UnsetType = UNSET
    trained_tokens: int | UnsetType = UNSET


ErrorCode = Literal["training_failed", "insufficient_memory"]


class ErrorEvent(_Event, tag="error", kw_only=True, frozen=True):
    """The trainer process failed (written by `python -m mlx_core.train`); the worker makes it
    the job's `error`."""

    code: ErrorCode
    message: str


TrainerEvent = (
    StartEvent | TrainEvent | EvalEvent | CheckpointEvent | WarningEvent | DoneEvent | ErrorEvent
)
EventHandler = Callable[[TrainerEvent], None]


# Through the json module rather than msgspec.json: a diverging run's inf/NaN losses stay
# numbers in the file (msgspec would write null), and lines written that way read back.
def encode_event(event: TrainerEvent) -> str:
    """One JSON line (without the newline) for `event`."""
    return json.dumps(msgspec.to_builtins(event))


def decode_event(line: bytes | str) -> TrainerEvent | None:
    """The event on one line of events.jsonl; None for a torn line or anything that is not an
    event this version knows (readers skip those lines)."""
    try:
        return msgspec.convert(json.loads(line), TrainerEvent)
    except (ValueError, msgspec.ValidationError):
        return None


def append_event(path: str | Path, event: TrainerEvent) -> None:
    """Append one event to an events.jsonl file (for a writer without a TrainLog)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(encode_event(event) + "\n")


# -- the log ------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """A short human duration: "42s", "3m05s", "1h02m"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TrainLog:
    def __init__(
        self,
        events_jsonl: str | Path | None,
        on_event: EventHandler | None,
        active: bool,
        progress: str = "auto",
        stream: TextIO | None = None,
    ) -> None:
        self.active = active
        self.on_event = on_event if active else None
        self.stream = stream or sys.stdout
        mode = progress
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode if active else "none"
        self._file: TextIO | None = None
        if active and events_jsonl:
            path = Path(events_jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append: a resumed job keeps one event history across its processes.
            self._file = path.open("a", encoding="utf-8")
        self._iters = 0
        self._clock = (0, time.perf_counter())  # (step, time) the step rate is measured from
        self._bar_shown = False

    def close(self) -> None:
        self._end_bar()
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- events -------------------------------------------------------------------------------------
    def event(self, event: TrainerEvent) -> None:
        """Write `event` to the events file and hand it to `on_event`."""
        if self._file is not None:
            self._file.write(encode_event(event) + "\n")
            self._file.flush()
        if self.on_event is not None:
            self.on_event(event)

    # -- console ------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        """A plain line for people (model loading, parameter counts, saved files)."""
        if self.mode == "none":
            return
        self._end_bar()
        print(line, file=self.stream, flush=True)

    def warning(self, step: int, code: WarningCode, message: str) -> None:
        self.event(WarningEvent(step=step, code=code, message=message))
        self.say(f"[WARNING] {message}")

    def start(self, event: StartEvent) -> None:
        self._iters = event.iters
        self._clock = (event.step, time.perf_counter())
        self.event(event)

    def eta(self, step: int) -> str:
        """Time left at the step rate measured since `start` ("?" before the first step)."""
        first, since = self._clock
        done = step - first
        if done <= 0:
            return "?"
        return format_duration((self._iters - step) * (time.perf_counter() - since) / done)

    def progress(self, step: int, loss: float) -> None:
        """Called after every step: redraws the bar (terminal only)."""
        if self.mode != "bar":
            return
        done = int(_BAR_WIDTH * step / max(self._iters, 1))
        bar = "#" * done + "." * (_BAR_WIDTH - done)
        self.stream.write(
            f"\r[{bar}] {step}/{self._iters} loss {loss:.3f} ETA {self.eta(step)}\033[K"
        )
        self.stream.flush()
        self._bar_shown = True

    def train_report(self, event: TrainEvent) -> None:
        self.event(event)
        e = event
        self.say(
            f"Iter {e.step}: Train loss {e.loss:.3f}, Learning rate {e.learning_rate:.3e}, "
            f"It/sec {e.it_per_sec:.3f}, Tokens/sec {e.tokens_per_sec:.1f} "
            f"({e.target_tokens_per_sec:.1f} in the loss), Peak mem {e.peak_memory_gb:.3f} GB, "
            f"ETA {self.eta(e.step)}"
        )

    def eval_report(self, step: int, val_loss: float, seconds: float) -> None:
        self.event(EvalEvent(step=step, val_loss=val_loss, val_time=seconds))
        self.say(f"Iter {step}: Val loss {val_loss:.3f}, Val took {seconds:.3f}s")

    def checkpoint(self, step: int, path: Path) -> None:
        self.event(CheckpointEvent(step=step, path=str(path)))
        self.say(f"Iter {step}: Saved checkpoint to {path}")

    def _end_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
