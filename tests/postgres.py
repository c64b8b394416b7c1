"""A private PostgreSQL cluster for tests: `initdb` and `pg_ctl` in a temp folder, on a free port.

    with postgres_cluster() as cluster:
        url = cluster.create_database("t1")   # postgresql+psycopg://loraforge@127.0.0.1:PORT/t1

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<version>/bin), which
`.ci/run` installs when it is missing. PostgreSQL refuses to run as root, so under root the
cluster belongs to `nobody` (started through `runuser`) in a temp folder that user owns. Nothing
is skipped: a cluster that cannot start fails the test with what to install or fix.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

SUPERUSER = "loraforge"
INSTALL_HINT = (
    "install Debian's PostgreSQL (as root: apt-get install -y postgresql; .ci/run does it), "
    "which puts initdb and pg_ctl under /usr/lib/postgresql/<version>/bin"
)


@dataclass(frozen=True)
class Cluster:
    port: int
    folder: Path

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` in this cluster (trust auth: no password)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, encoding: str = "UTF8") -> str:
        """A fresh, empty database `name` (dropped first if a test left one); its URL."""
        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(
                f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' TEMPLATE template0 "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        return self.url(name)


def pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb; AssertionError if none."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    assert found, f"PostgreSQL is not installed: {INSTALL_HINT}"
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse root: run them as `nobody`, which owns the cluster's folder.
    return ["runuser", "-u", "nobody", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_owner(cmd), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        extra = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        raise AssertionError(
            f"{what} failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            f"\n{extra}\nCheck that PostgreSQL works here: {INSTALL_HINT}"
        )


@contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    """Start a throwaway cluster (fsync off: a test database need not survive power loss);
    stop it and delete its folder on exit."""
    bin_dir = pg_bin_dir()
    # Not pytest's tmp_path: its parents are private to root, and the cluster runs as nobody.
    folder = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    data, log, port = folder / "data", folder / "postgres.log", _free_port()
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8"],
            "initdb",
        )  # fmt: skip
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "start",
            ],
            f"pg_ctl start on port {port}",
            log,
        )
        try:
            yield Cluster(port, folder)
        finally:
            _run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], "pg_ctl stop"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
