"""Change notices between the processes that share one database.

A process that changes something others keep in memory (today: the adapters resident in each
replica's engine) calls `notify(session, channel)` in the transaction that makes the change.
On PostgreSQL that is `pg_notify`, delivered to every listener when (and only if) the
transaction commits; `ChangeListener.wait` returns as soon as one arrives (`LISTEN` on a
connection of its own). SQLite has no notices, so there `wait` simply sleeps its timeout and
the caller re-reads the database: polling, which also covers several processes sharing one
SQLite file on one machine. On PostgreSQL the caller polls too, at the same interval, so a
notice lost while the listening connection was down only delays the change by one interval.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

from server.db import PSYCOPG_CONNECT_ARGS

if TYPE_CHECKING:  # the postgres extra: imported only when a PostgreSQL URL is used
    import psycopg

log = logging.getLogger("loraforge.replicas")

ADAPTERS_CHANNEL = "loraforge_adapters"  # an adapter was registered, replaced or deleted
RECONNECT_S = 5.0  # after losing the listening connection, try again this often


def notify(session: Session, channel: str, payload: str = "") -> None:
    """Tell every process listening on `channel` once this transaction commits (PostgreSQL);
    nothing on SQLite, whose listeners poll."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
        )


class ChangeListener:
    """Waits for notices on `channels` (PostgreSQL), or for the timeout (any database).

    Used from one thread at a time; `close` from another thread is safe once `wait` returned.
    """

    def __init__(self, database_url: str, channels: Sequence[str]) -> None:
        url = make_url(database_url)
        self.channels = tuple(channels)
        # libpq's own URI (no "+psycopg"), with the same user, password, host and options as
        # the service's connections.
        options = {name: str(value) for name, value in PSYCOPG_CONNECT_ARGS.items()}
        self._dsn = (
            url.set(drivername="postgresql")
            .update_query_dict(options)
            .render_as_string(hide_password=False)
            if url.get_backend_name() == "postgresql"
            else None
        )
        self._conn: psycopg.Connection | None = None  # connected on the first wait
        self._retry_at = 0.0
        self._stopped = threading.Event()

    @property
    def listens(self) -> bool:
        """True on PostgreSQL: changes arrive as notices; otherwise only by polling."""
        return self._dsn is not None

    def wait(self, timeout_s: float) -> bool:
        """Block until a notice arrives (True) or `timeout_s` passes (False)."""
        conn = self._connect() if self._dsn is not None else None
        if conn is None:
            self._stopped.wait(timeout_s)
            return False
        try:
            got = False
            for _notice in conn.notifies(timeout=timeout_s, stop_after=1):
                got = True
            return got
        except Exception as e:  # the database went away: poll until it is back
            log.warning("lost the connection listening for changes (%s); polling meanwhile", e)
            self._drop()
            return False

    def _connect(self) -> psycopg.Connection | None:
        if self._conn is not None or time.monotonic() < self._retry_at:
            return self._conn
        import psycopg  # an optional dependency (the postgres extra): only PostgreSQL needs it

        try:
            conn = psycopg.connect(self._dsn or "", autocommit=True)
            for channel in self.channels:
                conn.execute(f'LISTEN "{channel}"')
        except psycopg.Error as e:
            log.warning("cannot listen for changes (%s); polling until it works", e)
            self._retry_at = time.monotonic() + RECONNECT_S
            return None
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is gone either way
                conn.close()

    def close(self) -> None:
        self._stopped.set()
        self._drop()
