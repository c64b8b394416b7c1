"""The database: Alembic builds the schema the ORM expects, on a real SQLite file."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from server.db import (
    Base,
    Database,
    FineTuningJob,
    JobEvent,
    UploadedFile,
    make_engine,
    new_id,
    upgrade_database,
)

TABLES = {"files", "fine_tuning_jobs", "job_events", "job_checkpoints", "adapters"}


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'loraforge.db'}"


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_creates_the_orm_schema(url):
    upgrade_database(url)
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    engine.dispose()
    assert schema_diff(url) == []


def test_upgrade_is_idempotent(url):
    upgrade_database(url)
    upgrade_database(url)
    assert schema_diff(url) == []


@pytest.mark.slow
def test_concurrent_upgrades_from_several_processes_do_not_collide(url):
    # The server and workers may start at the same moment on a fresh data dir. The race (on
    # switching the fresh file to WAL) is timing-dependent: this catches it some of the time only.
    code = f"from server.db import upgrade_database; upgrade_database({url!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert schema_diff(url) == []


def test_jobs_from_before_retry_counting_upgrade_with_no_failed_attempts(url):
    # 0002 adds the retry columns: a job queued or running under 0001 keeps going, none counted.
    upgrade_database(url, "0001")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO fine_tuning_jobs (id, model, training_file, hyperparameters, lora, seed, "
            "status, created_at, updated_at, result_files, attempts, api, cancel_requested) "
            "VALUES ('ftjob-old', 'm', 'file-a', '{}', '{}', 0, 'running', 0, 0, '[]', 2, "
            "'fine_tuning', 0)"
        )
    engine.dispose()
    upgrade_database(url)
    assert schema_diff(url) == []
    db = Database.open(url)
    job = db.run_sync(lambda s: s.get(FineTuningJob, "ftjob-old"))
    assert job is not None
    assert (job.attempts, job.failed_attempts, job.attempt_from_step, job.retry_at) == (
        2,
        0,
        0,
        None,
    )
    db.close()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(url):
    upgrade_database(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_rows_round_trip_and_constraints_hold(url):
    upgrade_database(url)
    db = Database.open(url)
    job_id = new_id("ftjob")

    def add(session) -> None:
        session.add(
            UploadedFile(id="file-a", filename="t.jsonl", purpose="fine-tune", bytes=3, path="/x")
        )
        session.add(
            FineTuningJob(
                id=job_id,
                model="m",
                training_file="file-a",
                hyperparameters={"n_epochs": 2},
                lora={"rank": 8},
                seed=1,
            )
        )
        session.flush()
        session.add(JobEvent(job_id=job_id, message="queued", data={"step": 0}))

    db.run_sync(add)
    job = db.run_sync(lambda s: s.get(FineTuningJob, job_id))
    assert (job.status, job.api, job.attempts, job.cancel_requested) == (
        "queued",
        "fine_tuning",
        0,
        False,
    )
    assert job.hyperparameters == {"n_epochs": 2} and job.result_files == []
    assert isinstance(job.created_at, int)

    # Foreign keys are enforced: an event for a job that does not exist is refused...
    with pytest.raises(IntegrityError):
        db.run_sync(lambda s: s.add(JobEvent(job_id="ftjob-nope", message="x")) or s.flush())
    # ...and so is a status outside the documented set.
    with pytest.raises(IntegrityError):
        db.run_sync(lambda s: setattr(s.get(FineTuningJob, job_id), "status", "done") or s.flush())

    # Deleting a job deletes its events (ON DELETE CASCADE).
    db.run_sync(lambda s: s.delete(s.get(FineTuningJob, job_id)))
    assert db.run_sync(lambda s: list(s.scalars(select(JobEvent)))) == []
    db.close()


def test_ids_sort_by_creation_time():
    ids = [new_id("file") for _ in range(3)]
    assert all(i.startswith("file-") and len(i) == len("file-") + 24 for i in ids)
    # Same millisecond is possible, so compare the time prefix, not the random tail.
    assert [i[:17] for i in ids] == sorted(i[:17] for i in ids)
