"""What a training run tells the world: JSON-lines events and a console view.

Events are dicts `{"type": "start"|"train"|"eval"|"checkpoint"|"warning"|"done", "step": n, ...}`
written one per line to `events_jsonl` (flushed at once: the fine-tune worker tails the file from
another process) and handed to `on_event`. The console shows a progress bar on a terminal and the
seed lora.py's plain lines otherwise (`Iter 10: Train loss 1.234, It/sec 2.3, ...`).
Only rank 0 of a distributed run reports; the other ranks' logs are silent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

EventHandler = Callable[[dict], None]
_BAR_WIDTH = 24


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
        self._bar_shown = False

    def close(self) -> None:
        self._end_bar()
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- events -------------------------------------------------------------------------------------
    def event(self, kind: str, step: int, **fields: object) -> dict:
        event = {"type": kind, "step": step, "time": round(time.time(), 3), **fields}
        if self._file is not None:
            self._file.write(json.dumps(event) + "\n")
            self._file.flush()
        if self.on_event is not None:
            self.on_event(event)
        return event

    # -- console ------------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        """A plain line for people (model loading, parameter counts, saved files)."""
        if self.mode == "none":
            return
        self._end_bar()
        print(line, file=self.stream, flush=True)

    def warning(self, step: int, message: str) -> None:
        self.event("warning", step, message=message)
        self.say(f"[WARNING] {message}")

    def start(self, step: int, iters: int, **fields: object) -> None:
        self._iters = iters
        self.event("start", step, iters=iters, **fields)

    def progress(self, step: int, loss: float) -> None:
        """Called after every step: redraws the bar (terminal only)."""
        if self.mode != "bar":
            return
        done = int(_BAR_WIDTH * step / max(self._iters, 1))
        bar = "#" * done + "." * (_BAR_WIDTH - done)
        self.stream.write(f"\r[{bar}] {step}/{self._iters} loss {loss:.3f}")
        self.stream.flush()
        self._bar_shown = True

    def train_report(
        self,
        step: int,
        loss: float,
        learning_rate: float,
        it_per_sec: float,
        tokens_per_sec: float,
        target_tokens_per_sec: float,
        peak_memory_gb: float,
        trained_tokens: int,
    ) -> None:
        self.event(
            "train",
            step,
            loss=loss,
            learning_rate=learning_rate,
            it_per_sec=it_per_sec,
            tokens_per_sec=tokens_per_sec,
            target_tokens_per_sec=target_tokens_per_sec,
            peak_memory_gb=peak_memory_gb,
            trained_tokens=trained_tokens,
        )
        self.say(
            f"Iter {step}: Train loss {loss:.3f}, Learning rate {learning_rate:.3e}, "
            f"It/sec {it_per_sec:.3f}, Tokens/sec {tokens_per_sec:.1f} "
            f"(target {target_tokens_per_sec:.1f}), Peak mem {peak_memory_gb:.3f} GB"
        )

    def eval_report(self, step: int, val_loss: float, seconds: float) -> None:
        self.event("eval", step, val_loss=val_loss, val_time=seconds)
        self.say(f"Iter {step}: Val loss {val_loss:.3f}, Val took {seconds:.3f}s")

    def checkpoint(self, step: int, path: Path) -> None:
        self.event("checkpoint", step, path=str(path))
        self.say(f"Iter {step}: Saved checkpoint to {path}")

    def _end_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False
