"""The service's database: typed SQLAlchemy 2 models, the engine, sessions and migrations.

Decision — sync SQLAlchemy everywhere. SQLite is a local file, each query takes microseconds, and
the job worker and the CLI are plain sync code; one sync `Session` type serves all three.
Async routes never call it on the event loop: they go through `Database.run(fn)`, which runs
`fn(session)` in a worker thread (anyio) inside one transaction and returns its result. Rows
come back detached but fully loaded (`expire_on_commit=False`), so routes can read them.

SQLite specifics (set on every connection in `make_engine`):
- WAL journal, so readers never wait for the writer (the server reads while the worker writes);
- busy_timeout 30 s, so a writer waits for the lock instead of failing at once;
- foreign keys on (SQLite leaves them off by default);
- every transaction starts with BEGIN IMMEDIATE. A deferred transaction that reads and then
  writes fails with "database is locked" *without waiting* when another connection wrote in
  between; taking the write lock up front makes such transactions queue on busy_timeout
  instead. It also makes DDL transactional, so a migration applies whole or not at all.

Timestamps are integer unix seconds, as in OpenAI's `created_at`. Ids are `<prefix>-<24 hex>`
whose first 12 hex digits are the creation time in ms, so ordering by id is ordering by age.
The schema changes only through the Alembic migrations in `migrations/` (`upgrade_database`).
"""

from __future__ import annotations

import importlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

T = TypeVar("T")
log = logging.getLogger("loraforge.db")

SQLITE_BUSY_TIMEOUT_S = 30
PSYCOPG_CONNECT_ARGS = {
    # A database that went away must fail /ready in seconds, not hang it (libpq's default is to
    # wait forever).
    "connect_timeout": 10,
    # psycopg hands back bytes, not str, for text from a SQL_ASCII database (what initdb makes
    # under the C locale unless told -E UTF8): ask for UTF-8 and every value is a str.
    "client_encoding": "utf8",
}
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
JOB_APIS = ("fine_tuning", "fine-tunes")
EVENT_LEVELS = ("info", "warn", "error")
# Byte and token counts: 64 bits on PostgreSQL (INTEGER there stops at 2 GiB); SQLite's INTEGER
# already has 64 (and the migrations leave it as it is).
BigCount = BigInteger().with_variant(Integer(), "sqlite")


def now() -> int:
    """Current time as integer unix seconds (the unit of every timestamp column)."""
    return int(time.time())


def new_id(prefix: str) -> str:
    """A fresh id like `file-0193c2a4f1b2a9e3c41d07f5`: creation ms (12 hex) + 48 random bits."""
    return f"{prefix}-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Named constraints: Alembic can only alter or drop constraints that have names, and the
    # names stay the same on SQLite and PostgreSQL.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, list[dict[str, Any]]: JSON}


class UploadedFile(Base):
    """A complete, validated upload; its bytes are at `path` (files/<id>.jsonl)."""

    __tablename__ = "files"
    __table_args__ = (Index(None, "purpose"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("file"))
    filename: Mapped[str]
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigCount)
    path: Mapped[str]
    created_at: Mapped[int] = mapped_column(default=now)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    # Examples that parsed (the trainer and the job estimate read this without reopening it).
    n_examples: Mapped[int | None]


class FineTuningJob(Base):
    """One fine-tune, from either API; the worker claims `queued` rows and heartbeats a lease."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(_in("api", JOB_APIS), name="api"),
        Index(None, "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftjob"))
    model: Mapped[str]
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]]
    lora: Mapped[dict[str, Any]]
    suffix: Mapped[str | None]
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(String(32), default="queued")
    fine_tuned_model: Mapped[str | None]
    trained_tokens: Mapped[int | None] = mapped_column(BigCount)
    # {"code", "message", "param"} as in OpenAI's job.error; None while nothing failed.
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[int] = mapped_column(default=now)
    updated_at: Mapped[int] = mapped_column(default=now, onupdate=now)
    started_at: Mapped[int | None]
    finished_at: Mapped[int | None]
    estimated_finish: Mapped[int | None]
    result_files: Mapped[list[str]] = mapped_column(default=list)
    # Heartbeat lease: a `running` job whose lease expired has lost its worker and may be
    # resumed by another one from its last checkpoint.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[int | None]
    pid: Mapped[int | None]
    attempts: Mapped[int] = mapped_column(default=0)  # runs started (a clean stop gives one back)
    # Retries (server.jobs.queue.end_run): a run that stopped (lost worker, killed trainer) counts
    # as failed only if it saved no checkpoint newer than `attempt_from_step`, where it started;
    # `failed_attempts` such runs in a row fail the job, and a retried job waits for `retry_at`.
    failed_attempts: Mapped[int] = mapped_column(default=0)
    attempt_from_step: Mapped[int] = mapped_column(default=0)
    retry_at: Mapped[int | None]
    api: Mapped[str] = mapped_column(String(16), default="fine_tuning")
    cancel_requested: Mapped[bool] = mapped_column(default=False)


class JobEvent(Base):
    """A line in a job's log: messages for people, `metrics` events with numbers in `data`."""

    __tablename__ = "job_events"
    __table_args__ = (
        CheckConstraint(_in("level", EVENT_LEVELS), name="level"),
        Index(None, "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str]
    data: Mapped[dict[str, Any] | None]


class JobCheckpoint(Base):
    """Adapter weights saved at `step` of a job, at `path` under jobs/<job id>/."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    path: Mapped[str]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[int] = mapped_column(default=now)


class Adapter(Base):
    """A registered LoRA adapter, servable as `model=<name>`; its weights are at `path`."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("lora"))
    name: Mapped[str] = mapped_column(String(256), unique=True)
    path: Mapped[str]
    # What the weights were read from: "mlx", "peft", "mlx-lm", ... (for messages and export).
    source_format: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str]
    rank: Mapped[int]
    alpha: Mapped[float]
    targets: Mapped[list[str]]
    # sha256 of the weights: re-registering identical weights is a no-op, changed ones are not.
    fingerprint: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigCount)
    created_at: Mapped[int] = mapped_column(default=now)
    fine_tuning_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="SET NULL")
    )


def make_engine(url: str) -> Engine:
    """An Engine for `url`; SQLite files get WAL, busy_timeout, foreign keys, BEGIN IMMEDIATE."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        return create_engine(url, pool_pre_ping=True, connect_args=PSYCOPG_CONNECT_ARGS)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        # `loraforge db upgrade --database-url sqlite:///new/place.db` should just work.
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # Transactions queue on the SQLite lock (busy_timeout), not on the pool: allow as many
    # connections as anyio has worker threads (40).
    engine = create_engine(url, pool_size=5, max_overflow=35)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not issue its own BEGINs; SQLAlchemy's "begin" event below does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        # In WAL mode NORMAL loses no data on a process crash, only maybe the last commit on
        # power loss, and avoids an fsync per commit (the trainer writes an event per step).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor: Any) -> None:
    # Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database is
    # locked" at once, without the busy handler, when another process is mid-migration on it
    # (its deadlock rule). Retry for as long as busy_timeout would have waited.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


_UPGRADE_LOCK = threading.Lock()


def _migrations_dir() -> Path:
    # pyproject maps the top-level migrations/ folder to the package server.migrations (installed
    # or editable); a source tree on PYTHONPATH without an install has it beside server/. The
    # checkout this `server` was imported from comes first: an editable install of another
    # checkout (a git worktree's shared venv) would otherwise apply that checkout's migrations.
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "migrations" / "env.py").is_file():
        return checkout / "migrations"
    try:
        module = importlib.import_module("server.migrations")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "migrations"
    return Path(module.__file__ or "").parent


def alembic_config(url: str) -> Config:
    """An Alembic Config for `url` built in code (no alembic.ini): env.py reads the URL from
    `config.attributes["database_url"]`."""
    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()).replace("%", "%%"))
    config.attributes["database_url"] = url
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply every migration up to `revision` to the database at `url`; a no-op when current.

    Safe when the server and a worker start together: on SQLite the migration runs in one
    BEGIN IMMEDIATE transaction, so the second process waits and then finds nothing to do.
    """
    with _UPGRADE_LOCK:  # Alembic's context is process-global: one upgrade at a time here
        command.upgrade(alembic_config(url), revision)


@dataclass(frozen=True)
class Database:
    """The engine plus its session factory; what routes get injected as `db`."""

    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def open(cls, url: str) -> Database:
        engine = make_engine(url)
        return cls(engine, sessionmaker(engine, expire_on_commit=False))

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql" (the two databases the migrations are tested on)."""
        return self.engine.dialect.name

    def ping(self) -> str | None:
        """None when a query reaches the database; else what failed and what to check (for
        /ready). Blocking: call it in a worker thread."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except Exception as e:
            log.warning("the database cannot be reached: %s", e)
            return (
                f"the {self.dialect} database cannot be reached ({type(e).__name__}): check "
                "that it is running and that --database-url points at it (the server log has "
                "the details)"
            )
        return None

    def run_sync(self, fn: Callable[[Session], T]) -> T:
        """`fn(session)` in one transaction: committed if it returns, rolled back if it raises."""
        with self.sessions.begin() as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T]) -> T:
        """`run_sync(fn)` in a worker thread, so the event loop never waits on SQLite."""
        return await anyio.to_thread.run_sync(self.run_sync, fn)

    def close(self) -> None:
        self.engine.dispose()
