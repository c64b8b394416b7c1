"""The fine-tune job queue: create, claim, cancel, recover (training itself: server.jobs.worker).

- **Create** (`create_job`, called by both APIs' routes): every input is checked before the row is
  written, in the caller's one transaction, so a refused request leaves nothing behind. "auto"
  hyperparameters are resolved at once and stored (`server.jobs.spec`, which also turns a job
  into the trainer's `TrainConfig`), so the job object shows the numbers that will be used.
- **Claim** (`claim_next_job`): one `UPDATE ... WHERE id = (oldest queued) AND status = 'queued'
  RETURNING id`. Two workers can never both win: the second UPDATE finds the row no longer queued.
  On PostgreSQL the subquery is `SELECT ... FOR UPDATE SKIP LOCKED`, so workers on several
  replicas claiming at once each take a different job instead of queueing on the same row (on
  SQLite, BEGIN IMMEDIATE already runs claims one after another; the clause renders as nothing).
- **Row locks**: everything that reads a job and then changes it (cancel, recovery, and the
  worker's heartbeat and finish) reads it `FOR UPDATE`, so on PostgreSQL's READ COMMITTED a cancel
  on one replica and a success on another cannot both win.
- **Run**: `server.jobs.worker.JobWorker` trains each claimed job in a child process and renews
  its lease while it trains.
- **Cancel** (`cancel_job`): the row is marked cancelled at once; the worker sees it at its next
  heartbeat and stops the trainer.
- **Retry** (`retry_stopped_run`, through `recover_lost_jobs` for `running` jobs whose lease
  expired or whose worker process on this host is gone, and from the worker for a trainer killed
  by a signal): the job is queued again and resumes from its last checkpoint. The run counts as
  a failed attempt only if it saved no new checkpoint; `RetryPolicy.max_attempts` failed
  attempts in a row fail the job, and each one in a row doubles the wait before the retry.
- **Stop** (`requeue_stopped_job`): a worker shutting down queues its jobs again at once, without
  using an attempt.

Ids: a job's id is `ftjob-<24 hex>`; the legacy API shows the same job as `ft-<24 hex>`, and every
lookup accepts either (`job_id_from`).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from mlx_core.config import load_config
from mlx_core.demo import resolve_model_path
from server.db import FineTuningJob, JobCheckpoint, JobEvent, UploadedFile, new_id, now
from server.errors import ConflictError, NotFoundError
from server.jobs.spec import (
    JobRequest,
    check_trainer_accepts,
    invalid_value,
    resolve_hyperparameters,
    resolve_lora,
    training_steps,
)
from server.settings import DEMO_MODEL_ID, Settings

FINISHED = ("succeeded", "failed", "cancelled")
RESULTS_PURPOSE = "fine-tune-results"

MAX_SUFFIX, MAX_SEED = 64, 2**31 - 1
SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]*$")  # ":" separates the parts of ft:<base>:<suffix>:<id>

# Leases (the worker's own clock is in server.jobs.worker).
LEASE_S = 30  # a running job whose lease is this stale has lost its worker
MAX_RETRY_DELAY_S = 3600  # the doubling backoff stops growing here: a retry at least hourly


class RetryPolicy(msgspec.Struct, frozen=True):
    """How often a job whose runs keep stopping is retried (`--job-max-attempts`,
    `--job-retry-backoff-s`)."""

    max_attempts: int = 3  # failed attempts (runs without a new checkpoint) in a row
    backoff_s: float = 5.0  # wait after the first failed attempt, doubling with each in a row

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.job_max_attempts, settings.job_retry_backoff_s)

    def delay_s(self, failed_attempts: int) -> int:
        """Seconds before a job with `failed_attempts` in a row is retried (0: at once)."""
        if failed_attempts < 1:
            return 0
        return min(math.ceil(self.backoff_s * 2 ** (failed_attempts - 1)), MAX_RETRY_DELAY_S)


# -- ids and names ------------------------------------------------------------------------------
def job_id_from(any_id: str) -> str:
    """The stored id for a job id in either API's form (`ft-<hex>` -> `ftjob-<hex>`)."""
    return "ftjob-" + any_id.removeprefix("ft-") if any_id.startswith("ft-") else any_id


def legacy_id(job_id: str) -> str:
    """The legacy API's id of a job (`ftjob-<hex>` -> `ft-<hex>`)."""
    return "ft-" + job_id.removeprefix("ftjob-")


def fine_tuned_model_name(job: FineTuningJob) -> str:
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


# -- creating a job -----------------------------------------------------------------------------
def _check_model(model: str | None, settings: Settings) -> str:
    base = settings.base_model_id()
    names = {base, DEMO_MODEL_ID if not settings.model else Path(settings.model).resolve().name}
    if model is None or model in names:
        return base
    raise NotFoundError(
        f"The model `{model}` does not exist or cannot be fine-tuned here: this server fine-tunes "
        f'`{base}` (GET /v1/models lists the models). Send model="{base}".',
        param="model",
        code="model_not_found",
    )


def _check_file(session: Session, file_id: str, param: str) -> UploadedFile:
    row = session.get(UploadedFile, file_id)
    if row is None:
        raise invalid_value(
            f"No such File object: {file_id} ({param}). Upload the data with POST /v1/files "
            "(purpose=fine-tune) and pass the id it returns.",
            param,
            f"invalid_{param}",
        )
    if row.purpose != "fine-tune":
        raise invalid_value(
            f"{file_id} was uploaded with purpose '{row.purpose}', not 'fine-tune': upload "
            "the training data again with purpose=fine-tune.",
            param,
            f"invalid_{param}",
        )
    return row


def _is_text_format(path: Path) -> bool:
    """Whether a (validated) JSONL file holds {"text": ...} examples: they have no prompt to mask."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return set(json.loads(raw.decode("utf-8-sig"))) == {"text"}
    return False


def _model_dim(settings: Settings) -> int:
    """The base model's hidden size, which sets the "auto" learning rate (config.json only)."""
    return load_config(Path(resolve_model_path(settings.model))).dim


def create_job(session: Session, settings: Settings, request: JobRequest) -> FineTuningJob:
    """Validate `request` and add a queued job (with its first events) to `session`.

    Raises an APIError naming the bad parameter before anything is added, so the caller's
    transaction writes either the whole job or nothing.
    """
    model = _check_model(request.model, settings)
    train = _check_file(session, request.training_file, "training_file")
    if request.validation_file is not None:
        _check_file(session, request.validation_file, "validation_file")
    n = train.n_examples or 0
    if n < 1:
        raise invalid_value(
            f"{train.id} has no training examples: upload a file with at least one.",
            "training_file",
            "invalid_training_file",
        )
    hyperparameters = resolve_hyperparameters(request, n, _model_dim(settings))
    suffix = request.suffix or None
    if suffix is not None and (len(suffix) > MAX_SUFFIX or not SUFFIX_RE.match(suffix)):
        raise invalid_value(
            f"suffix {suffix!r} is not allowed: use up to {MAX_SUFFIX} characters from "
            "A-Z a-z 0-9 . _ - (it becomes part of the model name ft:<base>:<suffix>:<id>).",
            "suffix",
        )
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise invalid_value(f"seed {request.seed} must be between 0 and {MAX_SEED}.", "seed")
    lora = resolve_lora(request, settings, _is_text_format(Path(train.path)))
    job = FineTuningJob(
        id=new_id("ftjob"),
        model=model,
        training_file=train.id,
        validation_file=request.validation_file,
        hyperparameters=msgspec.to_builtins(hyperparameters),
        lora=msgspec.to_builtins(lora),
        suffix=suffix,
        api=request.api,
        # Queued at once: the files were validated line by line when they were uploaded.
        status="queued",
        seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
        result_files=[],
        attempts=0,
        cancel_requested=False,
    )
    check_trainer_accepts(job, n)
    session.add(job)
    add_event(session, job.id, f"Validating training file: {train.id}")
    if job.validation_file:
        add_event(session, job.id, f"Validating validation file: {job.validation_file}")
    iters = training_steps(job, n)
    add_event(
        session,
        job.id,
        f"Files validated, moving job to queued state ({iters} steps: {n} "
        f"examples x {hyperparameters.n_epochs} epochs / batch {hyperparameters.batch_size})",
        data={"total_steps": iters},
    )
    session.flush()
    return job


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        JobEvent(
            job_id=job_id, message=message, level=level, type=type, data=data, created_at=now()
        )
    )


def get_job(session: Session, any_id: str, *, for_update: bool = False) -> FineTuningJob:
    """The job `any_id` (either API's id form); 404 naming the id when there is none. With
    `for_update` the row stays locked until the transaction ends (callers about to change it)."""
    job = session.get(FineTuningJob, job_id_from(any_id), with_for_update=for_update)
    if job is None:
        raise NotFoundError(
            f"No such fine-tuning job: {any_id}. List jobs with GET /v1/fine_tuning/jobs.",
            param="fine_tuning_job_id",
            code="fine_tuning_job_not_found",
        )
    return job


def cancel_job(session: Session, any_id: str) -> FineTuningJob:
    """Mark a job cancelled at once; a worker training it sees that at its next heartbeat and
    stops the trainer. A finished job is a 409."""
    job = get_job(session, any_id, for_update=True)
    if job.status in FINISHED:
        done = "been cancelled" if job.status == "cancelled" else job.status
        raise ConflictError(
            f"Job {job.id} has already {done}, so it cannot be cancelled. "
            "Create a new job to train again.",
            param="fine_tuning_job_id",
            code="job_already_finished",
        )
    job.status, job.cancel_requested = "cancelled", True
    job.finished_at, job.estimated_finish, job.lease_expires_at = now(), None, None
    add_event(session, job.id, "Job cancelled")
    return job


# -- claiming and recovering --------------------------------------------------------------------
def claim_next_job(session: Session, worker_id: str, base_model: str) -> FineTuningJob | None:
    """Atomically take the oldest queued job for `base_model`; None when there is none."""
    t = now()
    oldest = (
        select(FineTuningJob.id)
        .where(
            FineTuningJob.status == "queued",
            FineTuningJob.model == base_model,
            or_(FineTuningJob.retry_at.is_(None), FineTuningJob.retry_at <= t),
        )
        .order_by(FineTuningJob.created_at, FineTuningJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == oldest, FineTuningJob.status == "queued")
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=t + LEASE_S,
            pid=None,
            attempts=FineTuningJob.attempts + 1,
            # Where this run starts: it made progress if it saves a checkpoint past this step.
            attempt_from_step=func.coalesce(
                select(func.max(JobCheckpoint.step))
                .where(JobCheckpoint.job_id == FineTuningJob.id)
                .scalar_subquery(),
                0,
            ),
            retry_at=None,
            updated_at=t,
            started_at=func.coalesce(FineTuningJob.started_at, t),
        )
        .returning(FineTuningJob.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return session.get(FineTuningJob, claimed) if claimed else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_gone(worker_id: str | None) -> bool:
    """True only when the worker certainly died: it ran on this host and its pid is gone. A
    worker elsewhere (or in this very process) is judged by its lease alone."""
    host, _, rest = (worker_id or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not _process_alive(int(pid))


def newest_checkpoint_step(session: Session, job_id: str) -> int:
    """The step of the job's newest reported checkpoint (0: none yet)."""
    step = session.scalar(
        select(func.max(JobCheckpoint.step)).where(JobCheckpoint.job_id == job_id)
    )
    return step or 0


def _resume_point(step: int) -> str:
    return f"checkpoint step {step}" if step else "the start (no checkpoint yet)"


def retry_stopped_run(
    session: Session, job: FineTuningJob, policy: RetryPolicy, what: str, code: str
) -> bool:
    """Queue `job` again after its run stopped without finishing (`what` says how, e.g. "The
    worker running this job stopped (host:1:a)"), or fail it with error `code` once
    `policy.max_attempts` runs in a row stopped without saving a new checkpoint. True when it was
    queued again.

    Call with the stopped run's events already ingested: its checkpoints are its progress.
    """
    t = now()
    step = newest_checkpoint_step(session, job.id)
    progressed = step > job.attempt_from_step
    job.failed_attempts = 0 if progressed else job.failed_attempts + 1
    job.lease_expires_at, job.pid, job.estimated_finish = None, None, None
    if job.failed_attempts >= policy.max_attempts:
        job.status, job.finished_at, job.retry_at = "failed", t, None
        message = (
            f"{what}; it stopped {job.failed_attempts} times in a row without saving a new "
            f"checkpoint (--job-max-attempts {policy.max_attempts}), so the job failed. Check "
            f"the worker's log and {job.id}/train.log in the jobs folder, then create the job "
            "again."
        )
        job.error = {"code": code, "param": None, "message": message}
        add_event(session, job.id, message, level="error")
        return False
    delay = policy.delay_s(job.failed_attempts)
    job.status, job.worker_id, job.retry_at = "queued", None, t + delay if delay else None
    if progressed:
        counted = f"it saved checkpoints up to step {step}, so this run is not counted as failed"
    else:
        since = f"since step {job.attempt_from_step}" if job.attempt_from_step else "saved yet"
        counted = (
            f"no new checkpoint {since}: failed attempt {job.failed_attempts} of "
            f"{policy.max_attempts} in a row"
        )
    when = f" in {delay} s" if delay else ""
    add_event(
        session,
        job.id,
        f"{what}; queued again to resume from {_resume_point(step)}{when} ({counted}).",
        level="warn",
    )
    return True


def requeue_stopped_job(session: Session, job: FineTuningJob, last_step: int) -> None:
    """Queue `job` again because its worker is shutting down: not a failed attempt, and no wait."""
    if newest_checkpoint_step(session, job.id) > job.attempt_from_step:
        job.failed_attempts = 0  # the run made progress: the failures before it are behind it
    job.status, job.attempts, job.worker_id, job.retry_at = "queued", job.attempts - 1, None, None
    job.lease_expires_at, job.pid, job.estimated_finish = None, None, None
    add_event(
        session,
        job.id,
        f"The worker stopped at step {last_step}; the job is queued again and resumes from "
        "its last checkpoint.",
        level="warn",
    )


def recover_lost_jobs(
    session: Session,
    policy: RetryPolicy,
    before_requeue: Callable[[Session, FineTuningJob], None] | None = None,
) -> list[str]:
    """Queue again (`retry_stopped_run`: or fail) running jobs whose worker is gone.

    `before_requeue(session, job)` runs first for each such job (the worker ingests what the
    lost run wrote but never reported).
    """
    t = now()
    recovered = []
    # SKIP LOCKED (PostgreSQL): a job another replica is recovering, or whose worker is renewing
    # its lease right now, is left to that transaction; the next round looks again.
    running = select(FineTuningJob).where(FineTuningJob.status == "running")
    for job in session.scalars(running.with_for_update(skip_locked=True)):
        expired = job.lease_expires_at is None or job.lease_expires_at < t
        if not (expired or _worker_gone(job.worker_id)):
            continue
        if before_requeue is not None:
            before_requeue(session, job)
        what = f"The worker running this job stopped ({job.worker_id})"
        retry_stopped_run(session, job, policy, what, "worker_lost")
        recovered.append(job.id)
    return recovered
