"""Retries that keep their promise, against real `loraforge serve` processes on a real SQLite
file: a trainer killed with SIGKILL (what the OOM killer sends) resumes from its checkpoint,
server crashes do not use up a job that keeps making progress, a resumed job reports each step's
metrics once, and a clean stop queues a job again without using an attempt."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from mlx_core.train.config import TrainConfig
from mlx_core.train.events import (
    CheckpointEvent,
    StartEvent,
    TrainerEvent,
    TrainEvent,
    encode_event,
)
from server.db import Database, FineTuningJob, JobEvent, now, upgrade_database
from server.jobs.events import ingest_dead_run
from server.jobs.queue import RetryPolicy, claim_next_job, recover_lost_jobs
from server.settings import Settings, SettingsError
from tests.jobs.test_jobs import messages, process_running, wait_for_job, wikisql_file
from tests.jobs.test_jobs_crash import job_row, serve, trainer_pid, wait_until

pytestmark = pytest.mark.timeout(300)
FAST_RETRY = ("--job-retry-backoff-s", "0")


def start_job(client: openai.OpenAI, tmp_path: Path, n_epochs: int) -> str:
    """A job of 8 examples x `n_epochs` at batch 1: 8 x n_epochs steps, a checkpoint every tenth."""
    train = client.files.create(file=wikisql_file(tmp_path, "train", 8), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        suffix="retry",
        hyperparameters={"n_epochs": n_epochs, "batch_size": 1},
    )
    return job.id


def newest_checkpoint(client: openai.OpenAI, job_id: str) -> int:
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id).data]
    return max(steps, default=0)


def wait_for_checkpoint_after(client: openai.OpenAI, job_id: str, step: int) -> int:
    wait_until(
        lambda: newest_checkpoint(client, job_id) > step, 90, f"a checkpoint after step {step}"
    )
    return newest_checkpoint(client, job_id)


def metric_steps(client: openai.OpenAI, job_id: str) -> tuple[list[int], list[int]]:
    """The steps of the job's training and validation metrics events, oldest first."""
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))[::-1]  # every page
    metrics = [e.data for e in events if e.type == "metrics"]
    train = [d["step"] for d in metrics if "train_loss" in d]
    valid = [d["step"] for d in metrics if "valid_loss" in d]
    return train, valid


def assert_each_step_once(client: openai.OpenAI, job_id: str, total: int) -> None:
    train, _valid = metric_steps(client, job_id)
    assert train == list(range(1, total + 1)), train  # none repeated after a resume, in order


@pytest.mark.slow  # starts servers as processes
def test_a_trainer_killed_with_sigkill_resumes_from_its_checkpoint(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    db = Database.open(Settings(data_dir=data).database_url)
    with serve(tiny_hf_model, data, *FAST_RETRY) as (_server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        job_id = start_job(client, tmp_path, n_epochs=5)  # 40 steps, a checkpoint every 4
        seen = wait_for_checkpoint_after(client, job_id, 0)
        trainer = trainer_pid(db, job_id)
        os.kill(trainer, signal.SIGKILL)  # as the OOM killer does

        done = wait_for_job(client, job_id, timeout_s=120)
        assert done.status == "succeeded", done.error
        log = messages(client, job_id)
        killed = [m for m in log if m.startswith("The trainer was killed by signal 9 (SIGKILL")]
        assert len(killed) == 1, log
        assert "so this run is not counted as failed" in killed[0]
        resumed = [m for m in log if m.startswith("Resumed from checkpoint at step ")]
        assert len(resumed) == 1 and int(resumed[0].split()[5]) >= seen, log
        assert_each_step_once(client, job_id, 40)
        row = job_row(db, job_id)
        assert (row.attempts, row.failed_attempts) == (2, 0)
        assert not process_running(trainer)
    db.close()


@pytest.mark.slow  # starts servers as processes
def test_three_server_crashes_in_one_job_do_not_fail_it(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    db = Database.open(Settings(data_dir=data).database_url)
    step = 0
    job_id = ""
    for crash in range(3):  # --job-max-attempts is 3: each run saves a checkpoint, so none counts
        with serve(tiny_hf_model, data, *FAST_RETRY) as (server, url):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            if not job_id:
                job_id = start_job(client, tmp_path, n_epochs=10)  # 80 steps, a checkpoint every 8
            step = wait_for_checkpoint_after(client, job_id, step)
            assert client.fine_tuning.jobs.retrieve(job_id).status == "running", crash
            server.send_signal(signal.SIGKILL)
            server.wait()

    with serve(tiny_hf_model, data, *FAST_RETRY) as (_server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        done = wait_for_job(client, job_id, timeout_s=120)
        assert done.status == "succeeded", done.error
        log = messages(client, job_id)
        assert len([m for m in log if m.startswith("Resumed from checkpoint at step ")]) == 3
        assert_each_step_once(client, job_id, 80)
        _train, valid = metric_steps(client, job_id)
        assert valid == sorted(set(valid))
    row = job_row(db, job_id)
    assert (row.attempts, row.failed_attempts) == (4, 0)
    db.close()


@pytest.mark.slow  # starts servers as processes
def test_a_clean_stop_queues_the_job_again_without_using_an_attempt(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    db = Database.open(Settings(data_dir=data).database_url)
    with serve(tiny_hf_model, data) as (server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        job_id = start_job(client, tmp_path, n_epochs=5)
        wait_for_checkpoint_after(client, job_id, 0)
        trainer = trainer_pid(db, job_id)
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 or 0.
        assert server.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
        assert not process_running(trainer)
    row = job_row(db, job_id)
    assert (row.status, row.attempts, row.failed_attempts) == ("queued", 0, 0)
    assert (row.worker_id, row.pid, row.retry_at) == (None, None, None)

    with serve(tiny_hf_model, data) as (_server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        done = wait_for_job(client, job_id, timeout_s=120)
        assert done.status == "succeeded", done.error
        log = messages(client, job_id)
        stopped = next(i for i, m in enumerate(log) if m.startswith("The worker stopped at step"))
        assert log[stopped + 1].startswith("Resumed from checkpoint at step "), log
        assert_each_step_once(client, job_id, 40)
    assert job_row(db, job_id).attempts == 1
    db.close()


def _start(step: int) -> StartEvent:
    return StartEvent(
        step=step,
        iters=8,
        trainable_parameters=64,
        world_size=1,
        train_examples=8,
        valid_examples=0,
        resumed_from=f"adapter/checkpoints/step-{step}" if step else None,
        config=TrainConfig(iters=8),
    )


def _train(step: int) -> TrainEvent:
    return TrainEvent(
        step=step,
        loss=2.0 - step / 10,
        learning_rate=1e-4,
        it_per_sec=2.0,
        tokens_per_sec=20.0,
        target_tokens_per_sec=10.0,
        peak_memory_gb=0.1,
        trained_tokens=10 * step,
    )


def lose(db: Database, job_id: str) -> None:
    """The job's worker goes silent: its lease has run out."""

    def expire(s) -> None:
        s.get(FineTuningJob, job_id).lease_expires_at = now() - 1

    db.run_sync(expire)


def recover(db: Database, policy: RetryPolicy, folder: Path) -> list[str]:
    """What a worker's recovery does: ingest each lost run's events, then write the offset."""

    def run(s) -> list[str]:
        def ingest(s, lost) -> None:
            end = ingest_dead_run(s, lost, folder)
            if end is not None:
                (folder / "events.offset").write_text(str(end))

        return recover_lost_jobs(s, policy, ingest)

    return db.run_sync(run)


def test_runs_lost_after_a_resume_report_each_step_once_and_count_only_without_progress(tmp_path):
    # Three runs of one job, each lost (its worker went silent) and recovered from what it wrote.
    url = f"sqlite:///{tmp_path / 'loraforge.db'}"
    upgrade_database(url)
    db = Database.open(url)
    policy = RetryPolicy(max_attempts=3, backoff_s=10)
    job = FineTuningJob(model="tiny", training_file="file-x", hyperparameters={}, lora={}, seed=0)
    db.run_sync(lambda s: s.add(job))
    folder = tmp_path / "jobs" / job.id
    folder.mkdir(parents=True)

    def run(lines: list[TrainerEvent]) -> FineTuningJob:
        """Claim the job, write the run's events, lose its worker, recover it."""
        claimed = db.run_sync(lambda s: claim_next_job(s, "elsewhere:1:a", "tiny"))
        assert claimed is not None and claimed.id == job.id

        lose(db, job.id)
        with (folder / "events.jsonl").open("a") as f:
            f.write("".join(encode_event(e) + "\n" for e in lines))

        assert recover(db, policy, folder) == [job.id]
        row = db.run_sync(lambda s: s.get(FineTuningJob, job.id))
        assert row is not None
        return row

    def train_steps() -> list[int]:
        rows = db.run_sync(
            lambda s: list(
                s.scalars(
                    select(JobEvent.data)
                    .where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
                    .order_by(JobEvent.id)
                )
            )
        )
        return [d["step"] for d in rows]

    ckpt = CheckpointEvent
    first = run([_start(0), _train(1), _train(2), ckpt(step=2, path="c2"), _train(3)])
    assert (first.status, first.failed_attempts, first.retry_at) == ("queued", 0, None)
    # Resumed at 2: step 3 is trained (and reported by the trainer) again.
    second = run([_start(2), _train(3), _train(4), ckpt(step=4, path="c4")])
    assert (second.status, second.failed_attempts, second.retry_at) == ("queued", 0, None)
    assert train_steps() == [1, 2, 3, 4]
    third = run([_start(4), _train(5)])  # lost before its first checkpoint
    assert (third.status, third.failed_attempts) == ("queued", 1)
    assert third.retry_at is not None and third.retry_at >= now() + 9  # the backoff
    assert train_steps() == [1, 2, 3, 4, 5]
    assert third.attempts == 3
    db.close()


def test_retry_settings_come_from_flags_or_env_and_are_checked(tmp_path):
    env = {"LORAFORGE_JOB_MAX_ATTEMPTS": "5", "LORAFORGE_JOB_RETRY_BACKOFF_S": "0.5"}
    settings = Settings.from_env(env, data_dir=tmp_path)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(max_attempts=5, backoff_s=0.5)
    assert Settings.from_env(env, data_dir=tmp_path, job_max_attempts=2).job_max_attempts == 2
    with pytest.raises(SettingsError, match="--job-max-attempts / LORAFORGE_JOB_MAX_ATTEMPTS = 0"):
        Settings(data_dir=tmp_path, job_max_attempts=0)
    with pytest.raises(SettingsError, match="--job-retry-backoff-s"):
        Settings(data_dir=tmp_path, job_retry_backoff_s=-1)


def test_a_start_replayed_after_a_crash_is_reported_once(tmp_path):
    # The worker committed run 1's events but was killed before writing events.offset: the
    # recovery reads them again. Run 1 still says it started once, and run 2 that it restarted.
    url = f"sqlite:///{tmp_path / 'loraforge.db'}"
    upgrade_database(url)
    db = Database.open(url)
    policy = RetryPolicy(max_attempts=3, backoff_s=0)  # run 2 at once
    job = FineTuningJob(model="tiny", training_file="file-x", hyperparameters={}, lora={}, seed=0)
    db.run_sync(lambda s: s.add(job))
    folder = tmp_path / "jobs" / job.id
    folder.mkdir(parents=True)

    def run(lines: list[TrainerEvent], ingested_before_the_crash: bool) -> None:
        assert db.run_sync(lambda s: claim_next_job(s, "elsewhere:1:a", "tiny")) is not None
        with (folder / "events.jsonl").open("a") as f:
            f.write("".join(encode_event(e) + "\n" for e in lines))
        if ingested_before_the_crash:  # the live worker's tick, its offset write lost
            db.run_sync(lambda s: ingest_dead_run(s, s.get(FineTuningJob, job.id), folder))

        lose(db, job.id)

        assert recover(db, policy, folder) == [job.id]

    run([_start(0), _train(1)], ingested_before_the_crash=True)
    run([_start(0), _train(1)], ingested_before_the_crash=False)
    log = db.run_sync(
        lambda s: list(
            s.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
            )
        )
    )
    assert log.count("Fine-tuning job started") == 1
    assert len([m for m in log if m.startswith("Fine-tuning restarted from step 0 (run 2)")]) == 1
    db.close()
