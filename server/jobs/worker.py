"""Trains claimed fine-tune jobs: `JobWorker`, and a thread per running job.

- **Run** (`JobWorker`): claims jobs with `server.jobs.queue.claim_next_job`; each claimed job gets a
  thread that writes `jobs/<id>/spec.json` (a `TrainSpec` whose config is
  `server.jobs.spec.train_config`) and starts the trainer as a child process
  (`python -m mlx_core.train`), which dies with its parent.
- **Follow**: every TICK_S the thread ingests the trainer's new events (`mlx_core.train.events`
  Structs, read by `server.jobs.events`), renews the job's lease, and learns of a cancel or of
  losing the job (the heartbeat finds the row no longer running under this worker) -> SIGTERM,
  then SIGKILL.
- **Finish**: the adapter is registered as `ft:<base>:<suffix>:<job id>` through the server's
  AdapterRegistry, or, in a standalone `loraforge worker` (no engine), through a registry that
  validates against the base model's config.json alone; either way it is a row in `adapters`, and
  a server reads those per request, so it serves the model at once. The adapter is also packed as
  a `fine-tune-results` file (`GET /v1/files/{id}/content`).
- **Retry**: a trainer killed by a signal (the OOM killer's SIGKILL, a crash) is retried from its
  checkpoint as a lost worker's job is: `server.jobs.queue.retry_stopped_run`, which counts the
  run as a failed attempt only if it saved no new checkpoint. Every RECOVER_EVERY_S the worker
  runs `server.jobs.queue.recover_lost_jobs` for jobs whose worker is gone.
- **Stop**: a worker shutting down stops its trainers and queues their jobs again without using
  an attempt (`server.jobs.queue.requeue_stopped_job`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.orm import Session

from mlx_core.train.config import TrainSpec
from mlx_core.train.events import DoneEvent, StartEvent
from mlx_core.train.launch import launch_command
from server.db import Database, FineTuningJob, UploadedFile, new_id, now
from server.errors import APIError
from server.jobs.events import (
    EVENTS_FILE,
    OFFSET_FILE,
    RunProgress,
    ingest_dead_run,
    ingest_event,
    ingested_bytes,
    read_events,
    reported_starts,
    reported_steps,
    tokens_at,
)
from server.jobs.queue import (
    LEASE_S,
    RESULTS_PURPOSE,
    RetryPolicy,
    add_event,
    claim_next_job,
    fine_tuned_model_name,
    recover_lost_jobs,
    requeue_stopped_job,
    retry_stopped_run,
)
from server.jobs.spec import train_config, training_steps
from server.replicas.storage import publish_file, temp_name, write_text_atomic
from server.settings import Settings

if TYPE_CHECKING:  # the engine side, loaded only by the worker
    from server.adapters import AdapterRegistry

log = logging.getLogger("loraforge.jobs")

MEMORY_LIMIT_ENV = "LORAFORGE_JOB_MEMORY_LIMIT_GB"  # preflight budget for every job's trainer

# The worker's clock.
TICK_S = 0.5  # events, heartbeat and cancel checks of a running job
POLL_S = 1.0  # an idle worker looks for queued jobs this often
RECOVER_EVERY_S = 10
STOP_GRACE_S = 5  # SIGTERM, then SIGKILL after this long


def _model_path(settings: Settings) -> str:
    from mlx_core.demo import resolve_model_path

    return resolve_model_path(settings.model)


# -- the worker ---------------------------------------------------------------------------------
class JobWorker:
    """Trains queued jobs, up to `settings.max_concurrent_jobs` at once, each in a child process.

    A service of the server (`start`/`stop`) or the body of `loraforge worker` (`run`).
    `registry` is the server's AdapterRegistry; without one (standalone) the worker makes one that
    validates adapters against the base model's config.json.
    """

    def __init__(
        self, settings: Settings, registry: AdapterRegistry | None = None, *, poll_s: float = POLL_S
    ) -> None:
        from server.adapters import AdapterRegistry, ConfigOnlyHost

        self.settings, self.poll_s = settings, poll_s
        self.retry = RetryPolicy.from_settings(settings)
        self.db = Database.open(settings.database_url)
        self.base_model = settings.base_model_id()
        if registry is None:
            # Fails now if the model is missing: a worker that cannot register its results
            # should not claim jobs.
            host = ConfigOnlyHost.read(self.base_model, Path(_model_path(settings)))
            registry = AdapterRegistry(settings, self.db, host)
        self.registry = registry
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: list[_JobRun] = []

    async def start(self) -> None:
        self.stopping.clear()
        self._thread = threading.Thread(target=self.run, name="loraforge-jobs", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, STOP_GRACE_S + 10)
        self.db.close()

    def run(self) -> None:
        """Claim and train jobs until `stopping` is set; then stop the trainers and queue their
        jobs again (they resume from their checkpoints on the next start)."""
        log.info(
            "job worker %s: training jobs for %s, %d at a time",
            self.worker_id,
            self.base_model,
            self.settings.max_concurrent_jobs,
        )
        # In the server, wait for the model: a job finishing meanwhile could not be registered
        # (and its lease would lapse while it waited).
        host = self.registry.host
        while host is not None and not host.ready and not self.stopping.wait(self.poll_s):
            pass
        next_recovery = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_recovery:
                    for job_id in self._recover():
                        log.warning("job %s lost its worker: queued again (or failed)", job_id)
                    next_recovery = time.monotonic() + RECOVER_EVERY_S
                self._runs = [r for r in self._runs if r.is_alive()]
                while len(self._runs) < self.settings.max_concurrent_jobs:
                    job = self.db.run_sync(
                        lambda s: claim_next_job(s, self.worker_id, self.base_model)
                    )
                    if job is None:
                        break
                    log.info("job %s: claimed (run %d)", job.id, job.attempts)
                    run = _JobRun(self, job)
                    self._runs.append(run)
                    run.start()
            except Exception:  # a database hiccup must not end the worker: log, retry later
                log.exception("job worker loop failed; retrying")
            self.stopping.wait(self.poll_s)
        for run in self._runs:
            run.join(STOP_GRACE_S + 5)

    def _recover(self) -> list[str]:
        """`recover_lost_jobs`, with each lost run's un-ingested events ingested first: the
        job's events then read in the order things happened (started, trained, stopped)."""
        offsets: list[tuple[Path, int]] = []

        def ingest(session: Session, job: FineTuningJob) -> None:
            folder = self.settings.jobs_dir / job.id
            end = ingest_dead_run(session, job, folder)
            if end is not None:
                offsets.append((folder / OFFSET_FILE, end))

        recovered = self.db.run_sync(lambda s: recover_lost_jobs(s, self.retry, ingest))
        for path, end in offsets:  # after the commit, as in _JobRun._follow
            write_text_atomic(path, str(end))
        return recovered

    def memory_limit_gb(self) -> float | None:
        text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"{MEMORY_LIMIT_ENV}={text!r} is not a number of GB: fix or unset "
                "it in the worker's environment"
            ) from None

    async def register(self, name: str, path: Path, job_id: str) -> None:
        """Register the trained adapter as `name` (idempotent for the same job)."""
        existing = await self.registry.get(name)
        if existing is not None and existing.fine_tuning_job_id == job_id:
            return  # registered before a crash, not yet marked succeeded
        await self.registry.register_path(name, str(path), job_id)


class _JobRun(threading.Thread):
    """One run of one job: prepare the folder, start the trainer, follow it, finish the job."""

    def __init__(self, worker: JobWorker, job: FineTuningJob) -> None:
        super().__init__(name=f"loraforge-job-{job.id}", daemon=True)
        self.worker, self.job, self.db = worker, job, worker.db
        self.dir = worker.settings.jobs_dir / job.id
        self.events = self.dir / EVENTS_FILE
        self.offset_file = self.dir / OFFSET_FILE

    def run(self) -> None:
        try:
            self._run()
        except APIError as e:
            self._fail("registration_failed", e.message)
        except Exception as e:
            log.exception("job %s failed in the worker", self.job.id)
            self._fail(
                "worker_error",
                f"The worker failed while running this job ({e}). The "
                "worker's log has the details; create the job again once it is fixed.",
            )

    def _run(self) -> None:
        from mlx_core.train.checkpoints import latest_checkpoint

        job, settings = self.job, self.worker.settings
        n_examples = self._prepare_data()
        progress = RunProgress(iters=training_steps(job, n_examples))
        adapter = self.dir / "adapter"
        # Earlier runs' starts, as far as ingested (lines past the offset are a dead run's that
        # were never ingested: they are ingested first, and count their own start).
        ingested = read_events(self.events, 0, self._offset())[0]
        progress.starts = sum(isinstance(e, StartEvent) for e in ingested)
        done = [e for e in read_events(self.events, 0)[0] if isinstance(e, DoneEvent)]
        if done and done[-1].status == "succeeded":
            self._finish(progress)  # trained before the worker stopped; only registration is left
            return
        checkpoint = latest_checkpoint(adapter)
        step = int(checkpoint.name.removeprefix("step-")) if checkpoint else 0
        if checkpoint and step >= progress.iters:
            # Stopped between the last checkpoint and the final save: the checkpoint is the result.
            for name in ("adapters.safetensors", "adapter_config.json"):
                shutil.copyfile(checkpoint / name, adapter / name)
            self._finish(progress)
            return
        if checkpoint:
            progress.tokens_before = self.db.run_sync(lambda s: tokens_at(s, job.id, step))
        progress.reported_train_step, progress.reported_valid_step = self.db.run_sync(
            lambda s: reported_steps(s, job.id)
        )
        progress.reported_starts = self.db.run_sync(lambda s: reported_starts(s, job.id))
        config = train_config(job, n_examples, self.dir, checkpoint, self.worker.memory_limit_gb())
        spec = TrainSpec(_model_path(settings), str(self.dir / "data"), config)
        spec.write(self.dir / "spec.json")
        returncode = self._train(progress)
        if returncode is None:
            return  # cancelled, taken over, or the worker is stopping
        if progress.succeeded:
            self._finish(progress)
            return
        if progress.error is not None:  # the trainer's own verdict: the same run would fail again
            self._fail(progress.error.code, progress.error.message)
            return
        if returncode < 0:
            # Killed from outside (the OOM killer's SIGKILL, a segfault): like a lost worker, the
            # job resumes from its checkpoint, and fails only after runs without progress.
            self._retry(_signal_text(-returncode))
            return
        self._fail(
            "training_failed",
            f"The trainer exited with code {returncode} before finishing. See "
            f"{self.dir / 'train.log'}, then create the job again.",
        )

    def _prepare_data(self) -> int:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        job = self.job
        files = self.db.run_sync(
            lambda s: {
                f.id: f
                for f in s.scalars(
                    select(UploadedFile).where(
                        UploadedFile.id.in_([job.training_file, job.validation_file or ""])
                    )
                )
            }
        )
        pairs = [("train.jsonl", job.training_file), ("valid.jsonl", job.validation_file)]
        for name, file_id in pairs:
            target = data / name
            if file_id is None or target.exists():
                continue
            if file_id not in files:
                raise ValueError(f"{file_id} was deleted before the job could use it")
            try:  # a hard link costs nothing and outlives a later delete of the file
                os.link(files[file_id].path, target)
            except OSError:
                shutil.copyfile(files[file_id].path, target)
        if job.training_file in files:
            return files[job.training_file].n_examples or 1
        with (data / "train.jsonl").open("rb") as f:  # resumed after the file was deleted
            return sum(1 for line in f if line.strip())

    # -- the child process ----------------------------------------------------------------------
    def _train(self, progress: RunProgress) -> int | None:
        """Run the trainer: its exit code, or None when this worker stopped it first."""
        cmd = trainer_command(self.dir / "spec.json", os.getpid(), self.worker.settings.job_devices)
        with (self.dir / "train.log").open("ab") as out:
            # Own session: a Ctrl-C in the server's terminal reaches the worker, which decides.
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        log.info("job %s: trainer pid %d (log %s)", self.job.id, proc.pid, self.dir / "train.log")
        try:
            while True:
                exited = proc.poll() is not None
                ours = self._follow(progress, proc.pid)
                if not ours:
                    _stop(proc)
                    self._note_lost()
                    return None
                if self.worker.stopping.is_set():
                    _stop(proc)
                    # What the trainer wrote before it stopped, so the next run's progress is
                    # measured from the newest checkpoint.
                    self._follow(progress, None)
                    self._requeue(progress)
                    return None
                if exited:
                    _reap(proc)  # ranks of a launched run outlive a launcher that was killed
                    return proc.returncode
                time.sleep(TICK_S)
        finally:
            if proc.poll() is None:  # an exception above: never leave the trainer behind
                _stop(proc)

    def _follow(self, progress: RunProgress, pid: int | None) -> bool:
        """Ingest new events, renew the lease; False when the job is no longer ours."""
        events, offset = read_events(self.events, self._offset())

        def tick(session: Session) -> bool:
            job = self._ours(session)
            if job is None:
                return False
            job.lease_expires_at, job.pid = now() + LEASE_S, pid
            for event in events:
                ingest_event(session, job, event, progress)
            return True

        ours = self.db.run_sync(tick)
        if ours:
            # After the commit: a crash in between replays these events, never loses them.
            write_text_atomic(self.offset_file, str(offset))
        return ours

    def _offset(self) -> int:
        return ingested_bytes(self.offset_file)

    def _note_lost(self) -> None:
        def read_status(session: Session) -> str | None:
            job = session.get(FineTuningJob, self.job.id)
            return job.status if job else None  # None: the job was deleted

        status = self.db.run_sync(read_status)
        if status == "cancelled":
            self.db.run_sync(lambda s: add_event(s, self.job.id, "Trainer stopped"))
            log.info("job %s: cancelled, trainer stopped", self.job.id)
        else:
            log.warning(
                "job %s: taken over by another worker (status %s); trainer stopped",
                self.job.id,
                status,
            )

    def _requeue(self, progress: RunProgress) -> None:
        def requeue(session: Session) -> None:
            job = self._ours(session)
            if job is not None:  # a shutdown is not a failed run: no attempt is used
                requeue_stopped_job(session, job, progress.last_step)

        self.db.run_sync(requeue)

    def _retry(self, how: str) -> None:
        def retry(session: Session) -> bool | None:
            job = self._ours(session)
            if job is None:
                return None
            what = f"The trainer {how}"
            return retry_stopped_run(session, job, self.worker.retry, what, "trainer_killed")

        queued = self.db.run_sync(retry)
        if queued is not None:
            log.warning(
                "job %s: the trainer %s; %s",
                self.job.id,
                how,
                "queued again" if queued else "failed",
            )

    def _ours(self, session: Session) -> FineTuningJob | None:
        """The job, locked for this transaction, while it is still running under this worker."""
        job = session.get(FineTuningJob, self.job.id, with_for_update=True)
        ours = job and job.status == "running" and job.worker_id == self.worker.worker_id
        return job if ours else None

    # -- the outcome ----------------------------------------------------------------------------
    def _fail(self, code: str, message: str) -> None:
        def fail(session: Session) -> None:
            job = self._ours(session)
            if job is None:
                return
            job.status, job.finished_at = "failed", now()
            job.error = {"code": code, "message": message, "param": None}
            job.lease_expires_at, job.pid, job.estimated_finish = None, None, None
            add_event(session, job.id, message, level="error")

        self.db.run_sync(fail)
        log.warning("job %s failed: %s", self.job.id, message)

    def _finish(self, progress: RunProgress) -> None:
        job = self.job
        name = fine_tuned_model_name(job)
        asyncio.run(self.worker.register(name, self.dir / "adapter", job.id))
        result = self._result_file()

        def succeed(session: Session) -> bool:
            row = self._ours(session)
            if row is None:
                return False
            row.status, row.fine_tuned_model, row.result_files = "succeeded", name, [result.id]
            row.finished_at, row.lease_expires_at, row.pid, row.estimated_finish = (
                now(),
                None,
                None,
                None,
            )
            if progress.trained_tokens:
                row.trained_tokens = progress.trained_tokens
            add_event(
                session,
                job.id,
                f"New fine-tuned model created: {name}",
                data={"fine_tuned_model": name},
            )
            add_event(session, job.id, "The job has successfully completed")
            return True

        if not self.db.run_sync(succeed):  # cancelled while registering: undo the registration
            asyncio.run(self.worker.registry.unregister(name))
            self.db.run_sync(lambda s: s.delete(s.get(UploadedFile, result.id)))
            Path(result.path).unlink(missing_ok=True)
            return
        log.info("job %s succeeded: %s", job.id, name)

    def _result_file(self) -> UploadedFile:
        """The adapter as a .tar.gz in files/ (purpose fine-tune-results); made once per job."""
        filename = f"{self.job.id}-adapter.tar.gz"
        existing = self.db.run_sync(
            lambda s: s.scalars(
                select(UploadedFile).where(
                    UploadedFile.filename == filename, UploadedFile.purpose == RESULTS_PURPOSE
                )
            ).first()
        )
        if existing is not None:  # made before a crash, not yet recorded on the job
            return existing
        file_id = new_id("file")
        path = self.worker.settings.files_dir / f"{file_id}.tar.gz"
        # Packed before the transaction, which then holds the database's write lock only briefly;
        # under a temporary name, so a replica serving the file never sends half of it.
        tmp = temp_name(path)
        with tarfile.open(tmp, "w:gz") as tar:  # the layout POST /v1/adapters accepts back
            for name in ("adapters.safetensors", "adapter_config.json"):
                tar.add(self.dir / "adapter" / name, arcname=name)
        publish_file(tmp, path)
        row = UploadedFile(
            id=file_id,
            filename=filename,
            purpose=RESULTS_PURPOSE,
            bytes=path.stat().st_size,
            path=str(path),
            status="processed",
        )
        self.db.run_sync(lambda s: s.add(row))
        return row


def _signal_text(number: int) -> str:
    """How a trainer killed by signal `number` ended, for the job's events."""
    try:
        notes = [signal.Signals(number).name]
    except ValueError:
        notes = []
    if number == signal.SIGKILL:
        notes.append("often the system running out of memory")
    return f"was killed by signal {number}" + (f" ({', '.join(notes)})" if notes else "")


def trainer_command(spec: Path, parent_pid: int, devices: int) -> list[str]:
    """How a job's trainer is started: one process, or `devices` data-parallel ranks under MLX's
    launcher (mlx_core.train.launch). Every rank watches `parent_pid` (the worker) and exits with
    it; only rank 0 writes events."""
    trainer = [sys.executable, "-m", "mlx_core.train", str(spec), "--parent-pid", str(parent_pid)]
    return launch_command(devices, trainer)


def _reap(proc: subprocess.Popen) -> None:
    # The trainer runs in its own process group (start_new_session): whatever of it is left once
    # its leader exited (a launched run's ranks) goes too, so no orphan keeps training.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the trainer's process group, SIGKILL it after STOP_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
