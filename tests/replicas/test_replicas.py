"""Several replicas on one PostgreSQL, as a team runs them: two real `loraforge serve` processes
and one standalone `loraforge worker`, all on one database and one data dir, talked to over real
HTTP. An adapter registered on one replica is served by the other; jobs created through either
run exactly once, on whichever process claims them; a replica killed mid-job has its job finished
by another from its last checkpoint. First, two replicas on one SQLite file (polling, no
notices), before the PostgreSQL fleet starts."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from mlx_core.lora.formats import save_adapter
from server.db import Adapter, Database, FineTuningJob, JobCheckpoint
from tests.engine.test_lora import random_adapter
from tests.jobs.test_jobs import PROMPT, messages, process_running, wait_for_job, wikisql_file
from tests.jobs.test_jobs_crash import _events, free_port, loraforge, wait_until
from tests.postgres import Cluster

# Not `slow`: each test takes well under 30 s on a 2-core machine (the fleet starts once, ~6 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SYNC_S = 2.0  # the promise: a change on one replica reaches the others this fast


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str | None = None  # the replicas'; the standalone worker has none

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@dataclass
class Fleet:
    a: Process
    b: Process
    worker: Process
    data: Path
    db: Database

    def by_worker_id(self, worker_id: str | None) -> Process:
        pid = int((worker_id or "::").split(":")[1] or 0)
        return next(p for p in (self.a, self.b, self.worker) if p.proc.pid == pid)


def _wait_ready(p: Process, timeout_s: float = 90, dialect: str = "postgresql") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert p.proc.poll() is None, f"{p.name} exited:\n{p.log.read_text()[-3000:]}"
        try:
            r = httpx.get(f"{p.url}/ready")
            if r.status_code == 200:
                body = r.json()
                assert body["database"] == {"dialect": dialect, "reachable": True}, body
                assert body["storage"] == {"writable": True}, body
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{p.name} was not ready in {timeout_s} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(postgres: Cluster, tiny_hf_model, tmp_path_factory) -> Iterator[Fleet]:
    url = postgres.create_database("replicas")
    root = tmp_path_factory.mktemp("fleet")
    data = root / "shared-data"  # what would be an NFS mount or a volume on separate hosts
    common = ["--model", str(tiny_hf_model), "--served-model-name", "tiny"]
    common += ["--data-dir", str(data), "--database-url", url]
    procs: list[Process] = []
    try:
        for name in ("a", "b"):  # started together: they migrate the empty database at once
            port, log = free_port(), root / f"replica-{name}.log"
            # One adapter resident per replica, so evictions and reloads happen.
            args = ["serve", *common, "--port", str(port), "--max-loaded-adapters", "1"]
            procs.append(Process(name, loraforge(*args, log=log), log, f"http://127.0.0.1:{port}"))
        log = root / "worker.log"
        procs.append(Process("worker", loraforge("worker", *common, log=log), log))
        for p in procs[:2]:
            _wait_ready(p)
        db = Database.open(url)
        yield Fleet(procs[0], procs[1], procs[2], data, db)
        db.close()
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)  # in case a test paused it
                p.proc.terminate()
        for p in procs:
            p.proc.wait(60)


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)
    return buf.getvalue()


def _upload_adapter(p: Process, name: str, archive: bytes) -> httpx.Response:
    return httpx.post(
        f"{p.url}/v1/adapters",
        data={"name": name},
        files={"file": (f"{name}.tar.gz", archive, "application/gzip")},
        timeout=60,
    )


def _complete(p: Process, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{p.url}/v1/completions", json=body, timeout=60)


def _text(p: Process, model: str) -> str:
    r = _complete(p, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_replicas_sharing_one_sqlite_file_keep_in_step_by_polling(
    tiny_hf_model, tiny_model, tmp_path
):
    """SQLite has no notices: two processes on one machine sharing its file still drop an
    adapter deleted by the other within SYNC_S, by polling."""
    data = tmp_path / "data"
    common = ["--model", str(tiny_hf_model), "--served-model-name", "tiny", "--data-dir", str(data)]
    procs = []
    try:
        for name in ("a", "b"):
            port, log = free_port(), tmp_path / f"sqlite-{name}.log"
            args = ["serve", *common, "--port", str(port), "--max-concurrent-jobs", "0"]
            procs.append(Process(name, loraforge(*args, log=log), log, f"http://127.0.0.1:{port}"))
        for p in procs:
            _wait_ready(p, dialect="sqlite")
        a, b = procs
        save_adapter(tmp_path / "x", random_adapter(tiny_model.args, ("v_proj",), (1,), seed=5))
        assert _upload_adapter(a, "x", _archive(tmp_path / "x")).status_code == 201
        assert _text(b, "x") == _text(a, "x")  # registered on A, served by B at once
        assert httpx.delete(f"{a.url}/v1/adapters/x").status_code == 200
        assert _complete(b, "x").status_code == 404
        wait_until(
            lambda: "was removed on another replica: unloaded here" in b.log.read_text(),
            SYNC_S,
            "replica B unloading the adapter A deleted",
        )
    finally:
        for p in procs:
            p.proc.terminate()
        for p in procs:
            p.proc.wait(60)


def test_an_adapter_registered_on_one_replica_is_served_by_the_other(fleet, tiny_model, tmp_path):
    args = tiny_model.args
    for name, seed in (("sql-a", 1), ("sql-b", 2)):
        adapter = random_adapter(args, ("q_proj", "v_proj"), (0, 1), rank=4, seed=seed)
        save_adapter(tmp_path / name, adapter)
    base_b = _text(fleet.b, "tiny")

    r = _upload_adapter(fleet.a, "sql-a", _archive(tmp_path / "sql-a"))
    assert r.status_code == 201, r.text
    registered = time.monotonic()
    while (r := _complete(fleet.b, "sql-a")).status_code != 200:
        assert r.status_code == 404, r.text
        assert time.monotonic() - registered < SYNC_S, "replica B does not serve sql-a yet"
        time.sleep(0.05)
    on_b = r.json()["choices"][0]["text"]
    assert on_b != base_b  # the adapter's weights, not the base model's
    assert _text(fleet.a, "sql-a") == on_b  # the same weights on both replicas
    assert "sql-a" in {m.id for m in fleet.b.client().models.list()}

    # B evicts sql-a for sql-b (one slot each) and loads it again: A never notices.
    assert _upload_adapter(fleet.b, "sql-b", _archive(tmp_path / "sql-b")).status_code == 201
    with_b = _text(fleet.b, "sql-b")
    assert _text(fleet.a, "sql-a") == on_b
    assert _text(fleet.a, "sql-b") == with_b
    assert _text(fleet.b, "sql-a") == on_b

    # Deleted on A: B answers 404 at once, and drops its resident copy within SYNC_S.
    assert httpx.delete(f"{fleet.a.url}/v1/adapters/sql-a").status_code == 200
    deleted = time.monotonic()
    r = _complete(fleet.b, "sql-a")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    wait_until(
        lambda: "was removed on another replica: unloaded here" in fleet.b.log.read_text(),
        SYNC_S,
        "replica B unloading the deleted adapter",
    )
    assert time.monotonic() - deleted < SYNC_S
    assert _text(fleet.b, "sql-b") == with_b


def test_replicas_uploading_at_once_never_see_half_an_upload(fleet, tiny_model, tmp_path):
    adapter = random_adapter(tiny_model.args, ("q_proj",), (0,), rank=2, seed=7)
    save_adapter(tmp_path / "same", adapter)
    archive = _archive(tmp_path / "same")
    lines = "".join(f'{{"text": "example {i} {"x" * 2000}"}}\n' for i in range(200)).encode()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        adapters = [
            pool.submit(_upload_adapter, p, "same-name", archive) for p in (fleet.a, fleet.b)
        ]
        files = [
            pool.submit(
                httpx.post,
                f"{p.url}/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": ("big.jsonl", lines)},
                timeout=60,
            )
            for p in (fleet.a, fleet.b)
        ]
        statuses = sorted(f.result().status_code for f in adapters)
        uploaded = [f.result() for f in files]
    assert statuses == [201, 409]  # one replica won the name; the other said so
    rows = fleet.db.run_sync(lambda s: s.scalars(select(Adapter.path)).all())
    # No temporary folder is left behind, and every registered adapter is complete.
    assert sorted(p.name for p in (fleet.data / "adapters").iterdir()) == sorted(
        Path(p).name for p in rows
    )
    assert all((Path(p) / "adapters.safetensors").is_file() for p in rows)
    for r in uploaded:
        assert r.status_code == 200, r.text
        other = fleet.b if r.request.url.port == httpx.URL(fleet.a.url).port else fleet.a
        content = httpx.get(f"{other.url}/v1/files/{r.json()['id']}/content")
        assert content.content == lines  # read back whole through the other replica
    assert not [p for p in (fleet.data / "files").iterdir() if p.name.startswith(".")]


def _finished(db: Database, ids: list[str]) -> bool:
    rows = db.run_sync(
        lambda s: s.scalars(select(FineTuningJob.status).where(FineTuningJob.id.in_(ids))).all()
    )
    return all(status in ("succeeded", "failed", "cancelled") for status in rows)


def test_jobs_created_through_both_replicas_each_run_exactly_once(fleet, tmp_path):
    clients = [fleet.a.client(), fleet.b.client()]
    train = clients[0].files.create(file=wikisql_file(tmp_path, "train", 4), purpose="fine-tune")
    ids = [
        clients[i % 2]
        .fine_tuning.jobs.create(
            model="tiny",
            training_file=train.id,  # uploaded through A, visible to B
            suffix=f"r{i}",
            hyperparameters={"n_epochs": 2, "batch_size": 4},
        )
        .id
        for i in range(7)
    ]
    # The eighth through the legacy API (the same job table, shown as ft-<hex>).
    r = httpx.post(
        f"{fleet.b.url}/v1/fine-tunes",
        json={"training_file": train.id, "n_epochs": 2, "batch_size": 4, "suffix": "legacy"},
    )
    assert r.status_code == 200, r.text
    legacy = r.json()["id"]
    ids.append("ftjob-" + legacy.removeprefix("ft-"))
    wait_until(lambda: _finished(fleet.db, ids), 240, "all eight jobs finishing")
    jobs = fleet.db.run_sync(
        lambda s: s.scalars(select(FineTuningJob).where(FineTuningJob.id.in_(ids))).all()
    )
    assert {j.status for j in jobs} == {"succeeded"}, [j.error for j in jobs]
    assert all(j.attempts == 1 for j in jobs)
    assert len({j.worker_id for j in jobs}) >= 2  # several processes took jobs
    for job_id in ids:
        events = _events(fleet.data, job_id)
        assert [e["type"] for e in events].count("start") == 1  # trained once...
        steps = [e["step"] for e in events if e["type"] == "train"]
        assert steps == sorted(set(steps))  # ...with no step trained twice
        saved = [e["step"] for e in events if e["type"] == "checkpoint"]
        assert saved and len(saved) == len(set(saved))
    checkpoints = fleet.db.run_sync(
        lambda s: s.execute(
            select(JobCheckpoint.job_id, JobCheckpoint.step, func.count())
            .where(JobCheckpoint.job_id.in_(ids))
            .group_by(JobCheckpoint.job_id, JobCheckpoint.step)
        ).all()
    )
    assert checkpoints and {n for _job, _step, n in checkpoints} == {1}
    registered = fleet.db.run_sync(
        lambda s: s.execute(
            select(Adapter.fine_tuning_job_id, func.count())
            .where(Adapter.fine_tuning_job_id.in_(ids))
            .group_by(Adapter.fine_tuning_job_id)
        ).all()
    )
    assert sorted(registered) == sorted((job_id, 1) for job_id in ids)  # nor registered twice
    shown = httpx.get(f"{fleet.a.url}/fine-tunes/{legacy}").json()  # created on B, read on A
    assert shown["status"] == "succeeded" and shown["fine_tuned_model"].startswith(
        "ft:tiny:legacy:"
    )
    assert legacy in [f["id"] for f in httpx.get(f"{fleet.a.url}/v1/fine-tunes").json()["data"]]
    events = httpx.get(f"{fleet.a.url}/v1/fine-tunes/{legacy}/events").json()["data"]
    assert events[-1]["message"] == "The job has successfully completed"
    for job in jobs[:2]:  # whoever trained it, both replicas serve the result
        for p in (fleet.a, fleet.b):
            assert _complete(p, job.fine_tuned_model or "").status_code == 200


def test_kill_9_of_the_replica_running_a_job_lets_another_finish_it(fleet, tmp_path):
    client = fleet.b.client()
    train = client.files.create(file=wikisql_file(tmp_path, "train", 8), purpose="fine-tune")
    # Pause the standalone worker, so that a replica claims this job (it resumes right after).
    fleet.worker.proc.send_signal(signal.SIGSTOP)
    try:
        # 8 examples x 3 epochs / batch 2 = 12 steps, a checkpoint every 2.
        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=train.id,
            suffix="survivor",
            hyperparameters={"n_epochs": 3, "batch_size": 2},
        )
        wait_until(
            lambda: fleet.db.run_sync(lambda s: s.get(FineTuningJob, job.id)).status == "running",
            30,
            "a replica claiming the job",
        )
    finally:
        fleet.worker.proc.send_signal(signal.SIGCONT)
    row = fleet.db.run_sync(lambda s: s.get(FineTuningJob, job.id))
    owner = fleet.by_worker_id(row.worker_id)
    assert owner.name in ("a", "b")
    wait_until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 90, "a checkpoint")
    trainer = fleet.db.run_sync(lambda s: s.get(FineTuningJob, job.id)).pid
    assert trainer is not None and process_running(trainer)

    os.kill(owner.proc.pid, signal.SIGKILL)
    owner.proc.wait()
    wait_until(lambda: not process_running(trainer), 5, "the killed replica's trainer exiting")

    survivor = fleet.b if owner is fleet.a else fleet.a
    done = wait_for_job(survivor.client(), job.id, timeout_s=180)
    assert done.status == "succeeded", done.error
    row = fleet.db.run_sync(lambda s: s.get(FineTuningJob, job.id))
    assert fleet.by_worker_id(row.worker_id) is not owner
    assert row.attempts == 2
    log = messages(survivor.client(), job.id)
    assert len([m for m in log if m.startswith("Resumed from checkpoint at step ")]) == 1, log
    assert log.count("Fine-tuning job started") == 1
    steps = sorted(
        c.step_number for c in survivor.client().fine_tuning.jobs.checkpoints.list(job.id)
    )
    assert steps == [2, 4, 6, 8, 10, 12]  # each checkpoint once, though two runs trained
    r = survivor.client().completions.create(
        model=done.fine_tuned_model, prompt=PROMPT, max_tokens=4
    )
    assert r.model == f"ft:tiny:survivor:{job.id}"
