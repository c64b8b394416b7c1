"""Jobs survive what kills processes: `kill -9` of a real `loraforge serve` mid-training (the job
resumes from its checkpoint after a restart, and its trainer dies with the server), several
workers on one database (each job runs exactly once), and a killed standalone worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from mlx_core.train.config import TrainConfig
from mlx_core.train.events import (
    CheckpointEvent,
    StartEvent,
    TrainerEvent,
    TrainEvent,
    encode_event,
)
from server.db import (
    Adapter,
    Database,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    now,
    upgrade_database,
)
from server.jobs.queue import RetryPolicy, claim_next_job, recover_lost_jobs, retry_stopped_run
from server.jobs.worker import JobWorker
from server.settings import Settings
from tests.jobs.test_jobs import PROMPT, messages, process_running, wait_for_job, wikisql_file
from tests.serving import start_model_server, start_server

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # starts servers and workers as processes
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loraforge(*args: str, log: Path) -> subprocess.Popen:
    """`loraforge ARGS` as its own process (output to `log`), importable from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )


@contextmanager
def serve(model: Path, data_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `loraforge serve` (with `args`) on a free port, once it is ready."""
    port = free_port()
    proc = loraforge(
        "serve",
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        *args,
        log=data_dir.parent / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (data_dir.parent / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "loraforge serve was not ready in 60 s"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(60)


def job_row(db: Database, job_id: str) -> FineTuningJob:
    job = db.run_sync(lambda s: s.get(FineTuningJob, job_id))
    assert job is not None, job_id
    return job


def trainer_pid(db: Database, job_id: str) -> int:
    pid = job_row(db, job_id).pid
    assert pid is not None, f"{job_id} has no trainer"
    return pid


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.1)


def test_kill_9_server_mid_job_then_restart_resumes_from_checkpoint(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    db = Database.open(Settings(data_dir=data).database_url)
    with serve(tiny_hf_model, data) as (server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        train = client.files.create(file=wikisql_file(tmp_path, "train", 8), purpose="fine-tune")
        # 8 examples x 3 epochs / batch 2 = 12 steps, a checkpoint every 2.
        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=train.id,
            suffix="crash",
            hyperparameters={"n_epochs": 3, "batch_size": 2},
        )
        wait_until(
            lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 90, "a first checkpoint"
        )
        seen = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
        trainer = trainer_pid(db, job.id)
        assert process_running(trainer)

        server.send_signal(signal.SIGKILL)
        server.wait()
        # The trainer dies with its server: no orphan keeps writing into the job folder.
        wait_until(lambda: not process_running(trainer), 5, "the orphaned trainer's exit")
        events = data / "jobs" / job.id / "events.jsonl"
        size = events.stat().st_size
        time.sleep(1.5)
        assert events.stat().st_size == size
    assert job_row(db, job.id).status == "running"  # as it died

    with serve(tiny_hf_model, data) as (_server, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        done = wait_for_job(client, job.id, timeout_s=120)
        assert done.status == "succeeded", done.error
        log = messages(client, job.id)
        resumed = [m for m in log if m.startswith("Resumed from checkpoint at step ")]
        assert len(resumed) == 1, log
        step = int(resumed[0].split()[5])
        assert seen <= step < 12  # the newest checkpoint on disk, at least the last one reported
        assert any("The worker running this job stopped" in m for m in log)
        assert log.count("Fine-tuning job started") == 1
        assert log[-1] == "The job has successfully completed"
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [
            12,
            10,
            8,
            6,
            4,
            2,
        ]
        assert job_row(db, job.id).attempts == 2
        r = client.completions.create(model=done.fine_tuned_model, prompt=PROMPT, max_tokens=4)
        assert r.model == f"ft:tiny:crash:{job.id}"
    db.close()


def test_two_workers_on_one_database_run_each_job_exactly_once(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    settings = Settings(
        model=str(tiny_hf_model), served_model_name="tiny", data_dir=data, start_worker=False
    )
    with start_server(settings) as url:  # no engine: the API only queues the jobs
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        train = client.files.create(file=wikisql_file(tmp_path, "train", 4), purpose="fine-tune")
        ids = [
            client.fine_tuning.jobs.create(
                model="tiny",
                training_file=train.id,
                suffix=f"w{i}",
                hyperparameters={"n_epochs": 1, "batch_size": 4},
            ).id
            for i in range(6)
        ]
    workers = [
        loraforge(*worker_args(tiny_hf_model, data), log=tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    db = Database.open(settings.database_url)
    try:

        def all_finished() -> bool:
            rows = db.run_sync(lambda s: s.scalars(select(FineTuningJob.status)).all())
            return all(status in ("succeeded", "failed") for status in rows)

        wait_until(all_finished, 150, "all six jobs finishing")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(30)
    jobs = db.run_sync(lambda s: s.scalars(select(FineTuningJob)).all())
    assert {j.status for j in jobs} == {"succeeded"}, [j.error for j in jobs]
    assert all(j.attempts == 1 for j in jobs)
    assert len({j.worker_id for j in jobs}) == 2  # both workers took jobs...
    for job_id in ids:  # ...and no job was started twice
        assert [e["type"] for e in _events(data, job_id)].count("start") == 1
    registered = db.run_sync(
        lambda s: s.execute(
            select(Adapter.fine_tuning_job_id, func.count()).group_by(Adapter.fine_tuning_job_id)
        ).all()
    )
    assert sorted(registered) == sorted((job_id, 1) for job_id in ids)  # nor registered twice
    db.close()

    # A server started afterwards serves what the standalone workers registered.
    with start_model_server(settings) as (url, _engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        model = f"ft:tiny:w0:{ids[0]}"
        assert client.completions.create(model=model, prompt=PROMPT, max_tokens=4).model == model


def _events(data: Path, job_id: str) -> list[dict]:
    """The trainer's events for the job so far (complete lines only)."""
    path = data / "jobs" / job_id / "events.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def worker_args(model: Path, data: Path) -> tuple[str, ...]:
    """`loraforge worker` on the tiny model, served as "tiny", over the data dir `data`."""
    return ("worker", "--model", str(model), "--served-model-name", "tiny", "--data-dir", str(data))


CLAIMER = """
import sys, threading
from server.db import Database
from server.jobs.queue import claim_next_job
db = Database.open(sys.argv[1])
claimed = []
def claim(name):
    while (job := db.run_sync(lambda s: claim_next_job(s, name, "tiny"))) is not None:
        claimed.append(job.id)
threads = [threading.Thread(target=claim, args=(f"{sys.argv[2]}-{i}",)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print("\\n".join(claimed))
"""


def assert_claims_never_collide(url: str, env: dict[str, str]) -> None:
    """200 queued jobs claimed by 2 processes x 4 threads on the database at `url`: each job is
    handed out once, none twice (the SQLite and the PostgreSQL queue tests share this)."""
    upgrade_database(url)
    db = Database.open(url)
    jobs = [
        FineTuningJob(model="tiny", training_file="file-x", hyperparameters={}, lora={}, seed=0)
        for _ in range(200)
    ]
    db.run_sync(lambda s: s.add_all(jobs))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, url, f"p{i}"],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
        )
        for i in range(2)
    ]
    claimed = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(claimed) == sorted(j.id for j in jobs)  # every job once, none twice
    assert db.run_sync(lambda s: claim_next_job(s, "late", "tiny")) is None
    rows = db.run_sync(lambda s: s.scalars(select(FineTuningJob)).all())
    assert {(r.status, r.attempts) for r in rows} == {("running", 1)}
    db.close()


def test_claims_under_contention_never_hand_out_a_job_twice(tmp_path):
    assert_claims_never_collide(
        f"sqlite:///{tmp_path / 'loraforge.db'}", {**os.environ, "PYTHONPATH": str(REPO)}
    )


def test_standalone_worker_killed_or_stopped_leaves_no_trainer(tiny_hf_model, tmp_path):
    data = tmp_path / "data"
    settings = Settings(model=str(tiny_hf_model), served_model_name="tiny", data_dir=data)
    db = Database.open(settings.database_url)
    with start_server(settings) as url:  # the API only: the standalone workers train
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        train = client.files.create(file=wikisql_file(tmp_path, "train", 8), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
        )

        def training_in_run(n: int) -> int:
            """The trainer's pid once run `n` of the job has trained a step."""

            def trained() -> bool:
                events = _events(data, job.id)
                return [e["type"] for e in events].count("start") == n and events[-1][
                    "type"
                ] == "train"

            wait_until(trained, 60, f"a training step in run {n}")
            wait_until(lambda: job_row(db, job.id).pid, 5, "pid")
            return trainer_pid(db, job.id)

        workers = [loraforge(*worker_args(tiny_hf_model, data), log=tmp_path / "worker1.log")]
        try:
            # kill -9: the trainer goes with its worker.
            trainer = training_in_run(1)
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait()
            wait_until(lambda: not process_running(trainer), 5, "the orphaned trainer's exit")

            # The next worker takes the job over; SIGTERM stops it cleanly and queues the job
            # again without counting the run as a failure.
            workers.append(
                loraforge(*worker_args(tiny_hf_model, data), log=tmp_path / "worker2.log")
            )
            trainer = training_in_run(2)
            workers[1].send_signal(signal.SIGTERM)
            assert workers[1].wait(30) == 0
            assert not process_running(trainer)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        row = job_row(db, job.id)
        assert (row.status, row.attempts, row.worker_id, row.pid) == ("queued", 1, None, None)
        log = messages(client, job.id)
        lost = next(i for i, m in enumerate(log) if "The worker running this job stopped" in m)
        assert (
            log.count("Fine-tuning job started") == 1
            and log.index("Fine-tuning job started") < lost
        )
        assert [m for m in log[lost:] if m.startswith("Fine-tuning restarted from step 0 (run 2)")]
        assert log[-1].startswith("The worker stopped at step ")
        assert log[-1].endswith("the job is queued again and resumes from its last checkpoint.")
        client.fine_tuning.jobs.cancel(job.id)
    db.close()


def test_only_runs_without_a_new_checkpoint_count_as_failed_attempts(tmp_path):
    url = f"sqlite:///{tmp_path / 'loraforge.db'}"
    upgrade_database(url)
    db = Database.open(url)
    expired = now() - 1

    def running(failed: int, from_step: int = 0) -> FineTuningJob:  # on another host, silent
        return FineTuningJob(
            model="tiny",
            training_file="file-x",
            hyperparameters={},
            lora={},
            seed=0,
            status="running",
            attempts=failed + 1,
            failed_attempts=failed,
            attempt_from_step=from_step,
            worker_id="elsewhere:1:a",
            lease_expires_at=expired,
        )

    second, third, alive = running(1), running(2), running(0)
    progressed = running(2, from_step=4)  # two failed runs, then this one saved step 6
    alive.lease_expires_at = now() + 60
    db.run_sync(lambda s: s.add_all([second, third, alive, progressed]))
    db.run_sync(
        lambda s: s.add(JobCheckpoint(job_id=progressed.id, step=6, path="x", created_at=now()))
    )
    policy = RetryPolicy(max_attempts=3, backoff_s=10)
    recovered = db.run_sync(lambda s: recover_lost_jobs(s, policy))
    assert sorted(recovered) == sorted([second.id, third.id, progressed.id])
    rows = {r.id: r for r in db.run_sync(lambda s: s.scalars(select(FineTuningJob)).all())}
    assert rows[alive.id].status == "running"
    # A second run without progress waits 2 x the backoff; one with progress resumes at once.
    assert (rows[second.id].status, rows[second.id].failed_attempts) == ("queued", 2)
    assert rows[second.id].retry_at is not None and rows[second.id].retry_at >= now() + 19
    assert (rows[progressed.id].status, rows[progressed.id].failed_attempts) == ("queued", 0)
    assert rows[progressed.id].retry_at is None
    error = rows[third.id].error
    assert rows[third.id].status == "failed" and error is not None
    assert error["code"] == "worker_lost" and "3 times in a row" in error["message"]
    assert "create the job again" in error["message"]
    # A job waiting out its backoff is not claimed; the one that made progress is.
    claimed = db.run_sync(lambda s: claim_next_job(s, "w", "tiny"))
    assert claimed is not None and claimed.id == progressed.id
    assert claimed.attempt_from_step == 6  # its next run must save a checkpoint past step 6
    assert db.run_sync(lambda s: claim_next_job(s, "w", "tiny")) is None

    # The worker's own retry, for a trainer killed by a signal, counts the same way.
    killed = running(2)
    db.run_sync(lambda s: s.add(killed))
    what = "The trainer was killed by signal 9 (SIGKILL)"
    assert not db.run_sync(
        lambda s: retry_stopped_run(
            s, s.get(FineTuningJob, killed.id), policy, what, "trainer_killed"
        )
    )
    row = job_row(db, killed.id)
    assert row.status == "failed" and row.error is not None
    assert row.error["code"] == "trainer_killed" and row.error["message"].startswith(what)
    assert [policy.delay_s(n) for n in (0, 1, 2, 3, 20)] == [0, 10, 20, 40, 3600]
    db.close()


def test_a_lost_runs_unreported_events_come_before_its_recovery(tiny_hf_model, tmp_path):
    # The worker died after its trainer wrote these lines and before it ingested them: the
    # recovering worker ingests them first, so the job's events read in the order they happened.
    settings = Settings(
        model=str(tiny_hf_model), served_model_name="tiny", data_dir=tmp_path / "data"
    )
    settings.data_dir.mkdir()
    upgrade_database(settings.database_url)
    worker = JobWorker(settings)
    job = FineTuningJob(
        model="tiny",
        training_file="file-x",
        hyperparameters={},
        lora={},
        seed=0,
        status="running",
        attempts=1,
        worker_id="elsewhere:1:a",
        lease_expires_at=now() - 1,
    )
    worker.db.run_sync(lambda s: s.add(job))
    folder = settings.jobs_dir / job.id
    folder.mkdir(parents=True)
    lines: list[TrainerEvent] = [
        StartEvent(
            step=0,
            iters=4,
            trainable_parameters=64,
            world_size=1,
            train_examples=8,
            valid_examples=0,
            resumed_from=None,
            config=TrainConfig(iters=4),
        ),
        TrainEvent(
            step=1,
            loss=2.5,
            learning_rate=1e-4,
            it_per_sec=2.0,
            tokens_per_sec=20.0,
            target_tokens_per_sec=10.0,
            peak_memory_gb=0.1,
            trained_tokens=10,
        ),
        CheckpointEvent(step=2, path=str(folder / "adapter" / "step-2")),
    ]
    events = folder / "events.jsonl"
    events.write_text("".join(encode_event(e) + "\n" for e in lines) + '{"type": "tr')

    assert worker._recover() == [job.id]
    messages = worker.db.run_sync(
        lambda s: list(
            s.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
            )
        )
    )
    assert messages == [
        "Fine-tuning job started",
        "Step 1/4: training loss=2.5000",
        "Checkpoint created at step 2",
        "The worker running this job stopped (elsewhere:1:a); queued again to resume from "
        "checkpoint step 2 (it saved checkpoints up to step 2, so this run is not counted as "
        "failed).",
    ]
    # Ingested up to the last complete line; the torn one is left for whoever reads on.
    assert int((folder / "events.offset").read_text()) == events.read_text().rfind("\n") + 1
    assert worker._recover() == []
