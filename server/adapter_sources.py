"""Where a registered adapter's files come from, made safe to read.

A folder named by path must resolve inside the data dir without passing through a link, and
hold only regular files and folders: a symbolic or hard link would let it reach (or pin) files
anywhere. An uploaded archive is unpacked member by member, refusing unsafe names, links and
special files as their headers are read, within a budget of entries and bytes checked against
the declared sizes before any data is written and against the real ones while it is. What goes
wrong is a 400 naming the request field, with file names relative to the data dir or the
archive. Everything here blocks on the filesystem: callers run it in a worker thread.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from server.errors import BadRequestError

# Archives may not unpack to more than this many times their own size (on top of the settings'
# --max-adapter-unpacked-mb and --max-adapter-files).
MAX_EXPANSION = 20
# A client's path is checked for these before anything touches the filesystem: resolving a
# 50,000-segment path took seconds.
MAX_PATH_CHARS = 1024
MAX_PATH_SEGMENTS = 32
# What a damaged or truncated archive raises while it is read (gzip/xz streams, tar, zip CRCs).
_DAMAGED = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)
# Two members that cannot both exist (a file `a`, then `a/b`).
_CONFLICT = (FileExistsError, NotADirectoryError, IsADirectoryError)
# MLX prefixes its messages with the C++ function ("[load_safetensors] ..."): not for clients.
MLX_PREFIX = re.compile(r"\[\w+\]\s*")


def adapter_folder(path: str, data: Path, param: str) -> Path:
    """The adapter file or folder `path` names inside the data dir `data` (resolved), checked
    to hold only regular files and folders; 400 naming `param` for anything else. Blocking: it
    resolves and walks the filesystem, so call it in a worker thread."""
    segments = len(Path(path).parts) if len(path) <= MAX_PATH_CHARS else 0
    if "\x00" in path or len(path) > MAX_PATH_CHARS or segments > MAX_PATH_SEGMENTS:
        raise BadRequestError(
            f"this path is not usable (a NUL byte, or more than {MAX_PATH_CHARS} characters "
            f"or {MAX_PATH_SEGMENTS} segments): name the adapter folder relative to the "
            "server's data dir, e.g. incoming/my-adapter",
            param=param,
            code="path_not_allowed",
        )
    p = Path(path)
    shown = path if not p.is_absolute() else "this path"
    lexical = Path(os.path.normpath(p if p.is_absolute() else data / p))
    candidate = lexical.resolve()
    if candidate != data and data not in candidate.parents:
        raise BadRequestError(
            f"{shown} is outside the server's data dir: copy the adapter there (and name it "
            "relative to it), or upload it as an archive (POST /v1/adapters, multipart)",
            param=param,
            code="path_not_allowed",
        )
    if not candidate.exists():
        raise BadRequestError(
            f"{relative(candidate, data)} does not exist in the server's data dir: check "
            "the path (relative to the data dir)",
            param=param,
            code="path_not_found",
        )
    if candidate != lexical:
        raise BadRequestError(
            f"{relative(lexical, data)} goes through a symbolic link: name the real "
            "folder, or copy the adapter files there",
            param=param,
            code="path_not_allowed",
        )
    for entry in _walk(candidate):
        _check_plain(entry, data, param)
    return candidate


def relative(path: Path, base: Path) -> str:
    """`path` as clients may see it: relative to `base` (the data dir), never absolute."""
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return path.name


def client_message(e: BaseException, base: Path) -> str:
    """What a failure to read an adapter says to a client: its first line, with paths relative
    to `base` and without MLX's function names or signatures."""
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror or 'cannot read'}: {relative(Path(str(e.filename)), base)}"
    else:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "incompatible function arguments" in text:
        text = "the adapter's weights could not be read"
    text = MLX_PREFIX.sub("", text)
    return text.replace(f"{base}{os.sep}", "").replace(str(base), ".")


def _walk(root: Path) -> Iterator[Path]:
    """`root` and everything under it, links not followed."""
    yield root
    if root.is_dir() and not root.is_symlink():
        for folder, dirs, files in os.walk(root):
            for entry in (*dirs, *files):
                yield Path(folder) / entry


def _check_plain(path: Path, data: Path, param: str) -> None:
    """400 unless `path` is a folder or a regular file with one name: a symbolic or hard link
    would let an adapter folder read (or pin) files from anywhere."""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return
    what = (
        "a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "a hard link"
        if stat.S_ISREG(st.st_mode)
        else "not a regular file"
    )
    raise BadRequestError(
        f"{relative(path, data)} is {what}: adapter folders may hold only regular files "
        "(copy the files in instead of linking them)",
        param=param,
        code="unsafe_adapter",
    )


@dataclass
class _Budget:
    """What an archive may still unpack to; every member is charged as it is met."""

    max_bytes: int
    max_members: int
    bytes: int = 0
    members: int = 0

    def charge(self, name: str, kind: str, size: int) -> None:
        """Refuse an unsafe name, a link or special file, or one member too many or too large
        (by its declared size, before any of it is read)."""
        self.members += 1
        if self.members > self.max_members:
            raise _unsafe(
                f"the archive holds more than {self.max_members} entries (--max-adapter-files): "
                "pack only the adapter's files"
            )
        p = Path(name)
        if "\x00" in name or p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")):
            raise _unsafe(
                f"archive member {name!r} has an unsafe path: archives may only hold relative "
                "paths inside one folder"
            )
        if kind == "other":
            raise _unsafe(
                f"archive member {name!r} is a link or special file: pack the files themselves"
            )
        self.grow(size)

    def grow(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise _unsafe(
                f"the archive unpacks to more than {self.max_bytes // 2**20} MB (at most "
                f"{MAX_EXPANSION}x its size and --max-adapter-unpacked-mb): refused as a "
                "possible decompression bomb"
            )


def _unsafe(message: str) -> BadRequestError:
    return BadRequestError(message, param="file", code="unsafe_archive")


def safe_extract(archive: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    """Unpack an archive refusing absolute paths, '..', links, devices and decompression bombs
    (declared sizes checked before reading, actual sizes while writing); return the folder that
    holds the adapter files. Damaged or conflicting archives are a 400. Runs in a worker thread."""
    budget = _Budget(max_bytes, max_members)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise BadRequestError(
                "the upload is neither a .tar(.gz) nor a .zip archive: pack the adapter "
                "folder with `tar czf adapter.tgz -C folder .`",
                param="file",
                code="invalid_archive",
            )
    except _DAMAGED as e:
        raise BadRequestError(
            f"the archive is damaged or truncated ({MLX_PREFIX.sub('', str(e)) or type(e).__name__}): "
            "pack and upload it again",
            param="file",
            code="invalid_archive",
        ) from e
    except _CONFLICT as e:
        raise BadRequestError(
            "the archive holds conflicting entries (a file and a folder of the same name): pack "
            "the adapter folder again",
            param="file",
            code="invalid_archive",
        ) from e
    # The adapter is the archive root or its single top-level folder.
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for m in members:  # the central directory lists every size: refuse before writing
            budget.charge(m.filename, _zip_kind(m), m.file_size)
        for m in members:
            target = dest / m.filename
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, target.open("xb") as out:
                _copy_limited(src, out, m.file_size)


def _zip_kind(m: zipfile.ZipInfo) -> str:
    if (m.external_attr >> 16) & 0o170000 == 0o120000:
        return "other"  # a symlink stored in the zip
    return "dir" if m.is_dir() else "file"


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    # Stream mode: members are met (and refused) one header at a time, so a bomb is refused at
    # its first oversized header rather than after decompressing the whole stream to list it.
    with tarfile.open(archive, mode="r|*") as t:
        for m in t:
            kind = "file" if m.isfile() else "dir" if m.isdir() else "other"
            budget.charge(m.name, kind, m.size)
            target = dest / m.name
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = t.extractfile(m)
            assert src is not None  # a regular file always has data
            with src, target.open("xb") as out:
                _copy_limited(src, out, m.size)


def _copy_limited(src: IO[bytes], out: IO[bytes], declared: int) -> None:
    # Trust no header: stop if a member yields more bytes than it declared (the declared sizes
    # are what the budget was charged).
    written = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        written += len(chunk)
        if written > declared:
            raise _unsafe("archive member is larger than its header says: refused")
        out.write(chunk)
