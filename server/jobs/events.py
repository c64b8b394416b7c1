"""The trainer's JSON-lines events (jobs/<id>/events.jsonl) turned into job events and checkpoints.

The worker reads new complete lines every tick (`read_events`: each decoded into one of the
`mlx_core.train.events` Structs), turns each event into `job_events` rows and `job_checkpoints`
rows (`ingest_event`), and writes how many bytes it has ingested to events.offset after the
commit, so a crash replays a few events rather than losing any. A run whose worker died is read
by `ingest_dead_run` when its job is recovered.

A resumed run trains again the steps between its checkpoint and the crash, and a replay repeats
a few events: metrics for a step the job already reported are not added again
(`RunProgress.reported_train_step` / `reported_valid_step`, from `reported_steps`), so a job's
metrics have one event per step, in step order; nor is a run's start message
(`RunProgress.reported_starts`, from `reported_starts`), so each run says it started once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from mlx_core.train.events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    StartEvent,
    TrainerEvent,
    TrainEvent,
    WarningEvent,
    decode_event,
)
from server.db import FineTuningJob, JobCheckpoint, JobEvent, new_id, now
from server.jobs.queue import add_event

EVENTS_FILE = "events.jsonl"  # the trainer's JSON-lines events, in jobs/<id>/
OFFSET_FILE = "events.offset"  # bytes of EVENTS_FILE already ingested as job events


@dataclass
class RunProgress:
    """What the events of the current run said so far."""

    iters: int
    tokens_before: int = 0  # trained by earlier runs, up to the checkpoint this one resumed
    trained_tokens: int = 0
    train_loss: float | None = None
    valid_loss: float | None = None
    succeeded: bool = False
    error: ErrorEvent | None = None  # the trainer's last word, if it failed
    last_step: int = 0
    starts: int = 0  # trainer runs of this job that reached training, as far as ingested
    # The last step whose training / validation metrics the job reported (-1: none).
    reported_train_step: int = -1
    reported_valid_step: int = -1
    reported_starts: int = 0  # runs whose start message the job has (a replay must not repeat it)


def reported_steps(session: Session, job_id: str) -> tuple[int, int]:
    """The last steps with a training and with a validation metrics event for the job (-1: none).

    Read back from the rows rather than kept alongside: whatever ingested them (a run, a replay
    after a crash, a recovery), the rows are what the API shows.
    """
    train, valid = -1, -1
    rows = session.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
    )
    for data in rows:
        step = int((data or {}).get("step", -1))
        if "train_loss" in (data or {}):
            train = max(train, step)
        if "valid_loss" in (data or {}):
            valid = max(valid, step)
    return train, valid


def reported_starts(session: Session, job_id: str) -> int:
    """How many runs of the job have their start message ("started", "restarted", "resumed"):
    the rows that carry a run's `train_examples`. Read back from the rows like `reported_steps`:
    a worker killed between its commit and its offset write replays the run's start event."""
    rows = session.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "message")
    )
    return sum(1 for data in rows if "train_examples" in (data or {}))


def _checkpoint_at(session: Session, job_id: str, step: int) -> JobCheckpoint | None:
    return session.scalars(
        select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.step == step)
    ).first()


def _checkpoint_row(session: Session, job_id: str, step: int, path: str) -> JobCheckpoint:
    """The job's checkpoint row for `step`, added if missing (a resumed run may save a step
    again, and a checkpoint saved just before a crash may never have been reported)."""
    row = _checkpoint_at(session, job_id, step)
    if row is None:
        row = JobCheckpoint(
            id=new_id("ftckpt"), job_id=job_id, step=step, path=path, metrics={}, created_at=now()
        )
        session.add(row)
    row.path = path
    return row


def read_events(path: Path, offset: int, end: int = -1) -> tuple[list[TrainerEvent], int]:
    """The events on complete lines from byte `offset` (to `end`) and the offset after the last
    of them (a line still being written waits for the next tick; lines that are not events this
    version knows are skipped)."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read(end - offset if end >= 0 else -1)
    end = chunk.rfind(b"\n") + 1
    events = (decode_event(line) for line in chunk[:end].splitlines() if line.strip())
    return [e for e in events if e is not None], offset + end


def ingested_bytes(offset_file: Path) -> int:
    """Bytes of events.jsonl already turned into job events (what OFFSET_FILE holds)."""
    return int(offset_file.read_text()) if offset_file.exists() else 0


def tokens_at(session: Session, job_id: str, step: int) -> int:
    """Tokens trained up to the job's checkpoint at `step` (where a resumed run counts from)."""
    row = _checkpoint_at(session, job_id, step)
    return int(row.metrics.get("trained_tokens", 0)) if row else 0


def ingest_dead_run(session: Session, job: FineTuningJob, folder: Path) -> int | None:
    """Ingest the events a stopped run wrote after its worker's last ingest; return the new
    offset into events.jsonl (to be written once the session commits), or None if none."""
    events_path = folder / EVENTS_FILE
    offset = ingested_bytes(folder / OFFSET_FILE)
    events, end = read_events(events_path, offset)
    if not events:
        return None
    earlier = read_events(events_path, 0, offset)[0]
    starts = [e for e in earlier + events if isinstance(e, StartEvent)]
    p = RunProgress(
        iters=starts[-1].iters if starts else 0,
        starts=sum(isinstance(e, StartEvent) for e in earlier),
    )
    p.reported_train_step, p.reported_valid_step = reported_steps(session, job.id)
    p.reported_starts = reported_starts(session, job.id)
    if starts and starts[-1].resumed_from:
        p.tokens_before = tokens_at(session, job.id, starts[-1].step)
    for event in events:
        ingest_event(session, job, event, p)
    return end


def ingest_event(session: Session, job: FineTuningJob, event: TrainerEvent, p: RunProgress) -> None:
    step = event.step
    at = f"Step {step}/{p.iters}"
    if isinstance(event, StartEvent):
        p.iters, p.starts = event.iters, p.starts + 1
        if p.starts <= p.reported_starts:
            return  # replayed after a crash: this run's start is reported already
        p.reported_starts = p.starts
        info = {
            "train_examples": event.train_examples,
            "valid_examples": event.valid_examples,
            "trainable_parameters": event.trainable_parameters,
        }
        if event.resumed_from:
            _checkpoint_row(session, job.id, step, event.resumed_from)  # if never reported
            # This run starts here: only a checkpoint after it is progress (one the last run
            # saved without reporting it was that run's).
            job.attempt_from_step = max(job.attempt_from_step, step)
            add_event(
                session,
                job.id,
                f"Resumed from checkpoint at step {step} (run {p.starts})",
                data={"step": step, "total_steps": p.iters, **info},
            )
        elif p.starts > 1:
            add_event(
                session,
                job.id,
                f"Fine-tuning restarted from step 0 (run {p.starts}): "
                "no checkpoint was saved before the last run stopped",
                data={"step": 0, "total_steps": p.iters, **info},
            )
        else:
            add_event(
                session, job.id, "Fine-tuning job started", data={"total_steps": p.iters, **info}
            )
    elif isinstance(event, TrainEvent):
        p.last_step, p.train_loss = step, event.loss
        p.trained_tokens = p.tokens_before + event.trained_tokens
        job.trained_tokens = p.trained_tokens
        if event.it_per_sec > 0:
            job.estimated_finish = now() + math.ceil((p.iters - step) / event.it_per_sec)
        if step <= p.reported_train_step:
            return  # trained again after a resume (or replayed): reported already
        p.reported_train_step = step
        add_event(
            session,
            job.id,
            f"{at}: training loss={p.train_loss:.4f}",
            type="metrics",
            data={
                "step": step,
                "total_steps": p.iters,
                "train_loss": p.train_loss,
                "learning_rate": event.learning_rate,
                "tokens_per_sec": event.tokens_per_sec,
                "peak_memory_gb": event.peak_memory_gb,
                "trained_tokens": p.trained_tokens,
            },
        )
    elif isinstance(event, EvalEvent):
        p.valid_loss = event.val_loss
        if step <= p.reported_valid_step:
            return
        p.reported_valid_step = step
        add_event(
            session,
            job.id,
            f"{at}: validation loss={p.valid_loss:.4f}",
            type="metrics",
            data={"step": step, "total_steps": p.iters, "valid_loss": p.valid_loss},
        )
    elif isinstance(event, CheckpointEvent):
        row = _checkpoint_row(session, job.id, step, event.path)
        row.metrics = {"step": step, "train_loss": p.train_loss, "trained_tokens": p.trained_tokens}
        if p.valid_loss is not None:
            row.metrics["valid_loss"] = p.valid_loss
        add_event(session, job.id, f"Checkpoint created at step {step}", data={"step": step})
    elif isinstance(event, WarningEvent):
        # A job without a validation file asked for no validation loss: nothing to warn about.
        if job.validation_file or event.code != "no_validation_data":
            add_event(session, job.id, event.message, level="warn")
    elif isinstance(event, DoneEvent) and event.status == "succeeded":
        p.succeeded = True
        peak = event.peak_memory_gb or 0.0
        add_event(
            session,
            job.id,
            f"Training finished at step {step}: training loss "
            f"{p.train_loss or 0:.4f}, peak memory {peak:.2f} GB",
            data={"step": step, "peak_memory_gb": peak},
        )
    elif isinstance(event, ErrorEvent):
        p.error = event
