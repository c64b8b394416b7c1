"""Writes to the shared data dir that no other process ever sees half done.

Every replica and worker points `--data-dir` at one folder (a local disk, NFS, a mounted
volume), so another process may open a file the moment its name exists. Files and folders are
therefore written under a temporary name that is unique to this process (`.<name>.<pid>-<hex>`),
flushed to disk (fsync), and only then renamed to their real name: a rename within one folder is
atomic on POSIX filesystems and on NFS, and after a crash the real name holds the whole old or
the whole new content, never a torn one. The folder is fsynced too, so the rename itself
survives power loss. Readers never need a lock.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

PROBE_PREFIX = ".ready-probe"


def temp_name(dest: Path) -> Path:
    """A hidden sibling of `dest` that no other process or thread will pick."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace the file `dest` with what `write(f)` writes to a fresh binary file."""
    tmp = temp_name(dest)
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    write_atomic(dest, lambda f: f.write(data))


def write_text_atomic(dest: Path, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def publish_file(tmp: Path, dest: Path) -> None:
    """Give the complete file `tmp` (same folder) its real name `dest`, durably."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def publish_folder(tmp: Path, dest: Path) -> None:
    """Give the complete folder `tmp` (same parent) its real name `dest`, durably: every file
    in it is fsynced first, so whoever sees `dest` sees all of it. `dest` must not exist."""
    for folder, _dirs, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))
    os.rename(tmp, dest)
    fsync_dir(dest.parent)


def remove_folder(path: Path) -> None:
    """Delete a folder without leaving a half-deleted one under its real name: it is renamed
    away first (atomic), so another replica finds either all of it or nothing."""
    if not path.exists():
        return
    doomed = temp_name(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return  # another replica removed it first
    shutil.rmtree(doomed, ignore_errors=True)


def check_writable(folder: Path) -> str | None:
    """None when a file can be written, flushed and deleted in `folder`; else what failed, with
    what to do (for /ready)."""
    probe = folder / f"{PROBE_PREFIX}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with probe.open("xb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return (
            f"the data dir cannot be written ({e.strerror or e}): check that the shared folder "
            "is mounted and writable by this process, or point --data-dir at one that is"
        )
    return None
