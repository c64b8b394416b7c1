"""The database layer on a real PostgreSQL: migrations from empty (one history for SQLite and
PostgreSQL), several processes migrating at once, and the job queue's claim under contention
(`FOR UPDATE SKIP LOCKED`), cancel and lease recovery."""

from __future__ import annotations

import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from server.db import (
    Base,
    Database,
    FineTuningJob,
    JobEvent,
    UploadedFile,
    now,
    upgrade_database,
)
from server.jobs.queue import RetryPolicy, cancel_job, claim_next_job, recover_lost_jobs
from tests.jobs.test_jobs_crash import REPO, assert_claims_never_collide

MIGRATE = "import sys; from server.db import upgrade_database; upgrade_database(sys.argv[1])"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_migrations_from_empty_give_the_models_schema(pg_url):
    upgrade_database(pg_url)
    upgrade_database(pg_url)  # the second run finds nothing to do
    db = Database.open(pg_url)
    try:
        with db.engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            drift = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert tables == {*Base.metadata.tables, "alembic_version"}
        assert drift == []  # the migrations build exactly what the models declare
        assert db.dialect == "postgresql"
        big = UploadedFile(filename="big.jsonl", purpose="fine-tune", bytes=3 * 2**30, path="x")
        db.run_sync(lambda s: s.add(big))  # past PostgreSQL's INTEGER: byte counts are BIGINT
        assert db.run_sync(lambda s: s.get(UploadedFile, big.id)).bytes == 3 * 2**30
    finally:
        db.close()


def test_a_sql_ascii_database_works_too(postgres):
    """initdb under the C locale makes SQL_ASCII databases, whose text psycopg would return as
    bytes: the service asks for UTF-8, so they work like any other."""
    url = postgres.create_database("sql_ascii", encoding="SQL_ASCII")
    upgrade_database(url)
    db = Database.open(url)
    row = UploadedFile(filename="données.jsonl", purpose="fine-tune", bytes=1, path="x")
    db.run_sync(lambda s: s.add(row))
    assert db.run_sync(lambda s: s.get(UploadedFile, row.id)).filename == "données.jsonl"
    db.close()


def test_replicas_starting_together_migrate_once(pg_url):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, pg_url], env=_env(), stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    db = Database.open(pg_url)
    assert db.run_sync(lambda s: s.execute(select(FineTuningJob.id)).all()) == []
    db.close()


def _queued(n: int) -> list[FineTuningJob]:
    return [
        FineTuningJob(model="tiny", training_file="file-x", hyperparameters={}, lora={}, seed=0)
        for _ in range(n)
    ]


def test_claims_under_contention_never_hand_out_a_job_twice(pg_url):
    assert_claims_never_collide(pg_url, _env())


def test_a_locked_job_is_skipped_not_waited_for(pg_url):
    """Two replicas claiming at once: the second takes the next job instead of waiting on the
    first one's row lock (SKIP LOCKED)."""
    upgrade_database(pg_url)
    db = Database.open(pg_url)
    first, second = _queued(2)
    db.run_sync(lambda s: s.add(first))
    db.run_sync(lambda s: s.add(second))
    with db.sessions.begin() as holding:  # replica A is mid-claim: the oldest row is locked
        assert claim_next_job(holding, "a", "tiny").id == first.id
        other = db.run_sync(lambda s: claim_next_job(s, "b", "tiny"))
        assert other is not None and other.id == second.id
    db.close()


def test_lost_jobs_are_recovered_once_and_cancel_wins_over_a_stale_worker(pg_url):
    upgrade_database(pg_url)
    db = Database.open(pg_url)
    lost, cancelled = _queued(2)
    db.run_sync(lambda s: s.add_all([lost, cancelled]))
    for _ in range(2):
        db.run_sync(lambda s: claim_next_job(s, "elsewhere:1:x", "tiny"))

    def expire(s) -> None:
        for job in s.scalars(select(FineTuningJob)):
            job.lease_expires_at = now() - 1

    db.run_sync(expire)
    db.run_sync(lambda s: cancel_job(s, cancelled.id))
    policy = RetryPolicy()
    # Two replicas recovering in the same round: the job is queued again once.
    with db.sessions.begin() as a:
        assert recover_lost_jobs(a, policy) == [lost.id]
        assert db.run_sync(lambda s: recover_lost_jobs(s, policy)) == []
    rows = {j.id: j for j in db.run_sync(lambda s: s.scalars(select(FineTuningJob)).all())}
    assert rows[lost.id].status == "queued" and rows[lost.id].failed_attempts == 1
    assert rows[cancelled.id].status == "cancelled"
    requeued = db.run_sync(
        lambda s: s.scalars(
            select(JobEvent.message).where(JobEvent.job_id == lost.id, JobEvent.level == "warn")
        ).all()
    )
    assert len(requeued) == 1, requeued
    db.close()
