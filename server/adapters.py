"""The adapter registry: rows in the database, weights on disk, residency in the engine's slots.

An adapter is registered from a folder inside the data dir or from an uploaded archive; either
way it is read with `mlx_core.lora.formats.load_adapter` (ours, mlx-lm, PEFT, the seed's npz),
checked against the base model's shapes and stored once, in our format, under
`<data_dir>/adapters/<id>/`. Requests name adapters only by registered name: a path in a
completion request is never read.

The registry reaches the base model through a `BaseModelHost`: the server's `EngineClient`
(MLX work on the engine thread, eviction from its slots), or in a standalone job worker a
`ConfigOnlyHost` that knows the model's id and shapes from its config.json alone.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from mlx_core.config import load_config
from mlx_core.lora.formats import load_adapter, save_adapter
from mlx_core.lora.layers import Adapter, AdapterError
from server import db as dbm
from server.db import Database
from server.engine_client import ModelInfo
from server.errors import BadRequestError, ConflictError, NotFoundError
from server.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Archives may not unpack to more than this many times their own size, nor hold too many files.
MAX_EXPANSION = 20
MAX_MEMBERS = 1000

T = TypeVar("T")


class BaseModelHost(Protocol):
    """What the registry needs of the base model: its id and shapes (to check adapters against),
    a place to run MLX work, and a way to evict an adapter from the engine, if there is one."""

    @property
    def ready(self) -> bool:
        """True once `model` is known and adapters can be registered."""
        ...

    @property
    def model(self) -> ModelInfo | None:
        """The base model's id and shapes; None until it is loaded."""
        ...

    async def run_mlx(self, fn: Callable[[], T]) -> T:
        """Run `fn` (MLX work) where the model's MLX work runs and return its result."""
        ...

    async def unload_adapter(self, adapter_id: str) -> None:
        """Drop the adapter from the engine's slots (a no-op without an engine)."""
        ...


@dataclass(frozen=True)
class ConfigOnlyHost:
    """The base model as a standalone job worker knows it, from its config.json alone: it has
    no engine, yet registers fine-tunes validated against the same shapes as the server."""

    model: ModelInfo
    ready: bool = True

    @classmethod
    def read(cls, model_id: str, path: Path) -> ConfigOnlyHost:
        """The host for the model folder at `path` (raises if its config.json is missing)."""
        args = load_config(path)
        return cls(ModelInfo(model_id, args, args.max_context))

    async def run_mlx(self, fn: Callable[[], T]) -> T:
        return fn()  # no engine thread to share MLX with: run it here

    async def unload_adapter(self, adapter_id: str) -> None:
        return None  # nothing is ever resident without an engine


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    name: str
    path: str
    base_model: str
    rank: int
    alpha: float
    targets: list[str]
    created_at: int
    source_format: str
    size_bytes: int
    fingerprint: str
    fine_tuning_job_id: str | None = None

    @classmethod
    def of(cls, row: dbm.Adapter) -> AdapterInfo:
        return cls(
            row.id,
            row.name,
            row.path,
            row.base_model,
            row.rank,
            row.alpha,
            list(row.targets),
            row.created_at,
            row.source_format,
            row.size_bytes,
            row.fingerprint,
            row.fine_tuning_job_id,
        )


class AdapterRegistry:
    """Registered adapters: validated against `host`'s base model, stored in our format.

    `host` may be set after construction: the server's EngineClient needs the registry's
    `load_for_engine` before it exists. Without a host nothing can be registered."""

    def __init__(self, settings: Settings, db: Database, host: BaseModelHost | None = None) -> None:
        self.settings, self.db = settings, db
        self.host = host

    # -- lookups ----------------------------------------------------------------------------------
    def path_of(self, adapter_id: str) -> Path:
        row = self.db.run_sync(lambda s: s.get(dbm.Adapter, adapter_id))
        if row is None:
            raise AdapterError(f"adapter {adapter_id} is no longer registered")
        return Path(row.path)

    def load_for_engine(self, adapter_id: str) -> Adapter:
        """The engine's loader (engine thread): weights of a registered adapter."""
        return load_adapter(self.path_of(adapter_id))

    async def list(self) -> list[AdapterInfo]:
        rows = await self.db.run(
            lambda s: s.scalars(select(dbm.Adapter).order_by(dbm.Adapter.created_at)).all()
        )
        return [AdapterInfo.of(r) for r in rows]

    async def get(self, name: str) -> AdapterInfo | None:
        row = await self.db.run(lambda s: _by_name(s, name))
        return AdapterInfo.of(row) if row else None

    async def resolve(self, model: str, base_id: str) -> AdapterInfo | None:
        """None for the base model, the adapter for an adapter name; 404 otherwise."""
        if model == base_id:
            return None
        info = await self.get(model)
        if info is None:
            raise NotFoundError(
                f"The model `{model}` does not exist. Use `{base_id}` or a registered adapter "
                "(GET /v1/models lists them).",
                param="model",
                code="model_not_found",
            )
        return info

    # -- changes ----------------------------------------------------------------------------------
    async def register_path(
        self, name: str, path: str, job_id: str | None = None, replace: bool = False
    ) -> AdapterInfo:
        """Register an adapter from a folder or file inside the data dir. With `replace`, an
        adapter of the same name is swapped out only once the new one has been validated."""
        src = self._inside_data_dir(path)
        return await self._register(name, src, job_id, replace)

    async def register_archive(self, name: str, archive: Path) -> AdapterInfo:
        """Register an uploaded .tar(.gz) or .zip holding one adapter folder."""
        with tempfile.TemporaryDirectory(dir=self.settings.adapters_dir, prefix=".upload-") as tmp:
            root = _safe_extract(archive, Path(tmp), archive.stat().st_size * MAX_EXPANSION)
            return await self._register(name, root, None)

    async def _register(
        self, name: str, src: Path, job_id: str | None, replace: bool = False
    ) -> AdapterInfo:
        _check_name(name, allow_ft=job_id is not None)
        if not replace and await self.get(name) is not None:
            raise ConflictError(
                f"an adapter named {name!r} is already registered: delete it first "
                "(DELETE /v1/adapters/{name}) or pick another name",
                param="name",
                code="adapter_exists",
            )
        host = self.host
        model = host.model if host is not None else None
        if host is None or model is None:
            raise BadRequestError("the base model is not loaded yet: retry shortly")
        adapter_id = dbm.new_id("lora")
        dest = self.settings.adapters_dir / adapter_id
        # MLX work (reading, checking, writing the weights) runs where the model's other MLX
        # work runs: on the engine thread, when this process has one.
        adapter = await host.run_mlx(lambda: self._store(src, dest, model))
        row = dbm.Adapter(
            id=adapter_id,
            name=name,
            path=str(dest),
            source_format=adapter.source_format or "loraforge",
            base_model=model.id,
            rank=adapter.rank,
            targets=list(adapter.targets),
            alpha=float(
                adapter.alpha if adapter.alpha is not None else adapter.scale * adapter.rank
            ),
            fingerprint=_sha256(dest / "adapters.safetensors"),
            size_bytes=sum(f.stat().st_size for f in dest.iterdir()),
            fine_tuning_job_id=job_id,
        )
        replaced: list[dbm.Adapter] = []

        def swap(s: Session) -> None:
            if replace and (old := _delete_by_name(s, name)) is not None:
                replaced.append(old)
                s.flush()
            s.add(row)

        try:
            await self.db.run(swap)
        except Exception:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        for old in replaced:
            await self._forget(old)
        return AdapterInfo.of(row)

    def _store(self, src: Path, dest: Path, model: ModelInfo) -> Adapter:
        args = model.args
        try:
            adapter = load_adapter(src, args)
            adapter.check_fits(args)
        except (AdapterError, ValueError, OSError) as e:
            raise BadRequestError(
                f"cannot use this adapter: {e}", param="lora_path", code="invalid_adapter"
            ) from e
        if adapter.rank > self.settings.max_lora_rank:
            raise BadRequestError(
                f"adapter rank {adapter.rank} is above this server's --max-lora-rank "
                f"{self.settings.max_lora_rank}: restart with a larger --max-lora-rank",
                param="lora_path",
                code="invalid_adapter",
            )
        save_adapter(dest, adapter, base_model=model.id)
        return adapter

    async def unregister(self, name: str) -> AdapterInfo:
        row = await self.db.run(lambda s: _delete_by_name(s, name))
        if row is None:
            raise NotFoundError(
                f"no adapter named {name!r}: GET /v1/adapters lists them",
                param="name",
                code="adapter_not_found",
            )
        await self._forget(row)
        return AdapterInfo.of(row)

    async def _forget(self, row: dbm.Adapter) -> None:
        if self.host is not None:
            # Requests in flight keep the resident copy until they finish.
            await self.host.unload_adapter(row.id)
        shutil.rmtree(row.path, ignore_errors=True)

    def _inside_data_dir(self, path: str) -> Path:
        data = self.settings.data_dir.resolve()
        p = Path(path)
        candidate = (p if p.is_absolute() else data / p).resolve()
        if candidate != data and data not in candidate.parents:
            raise BadRequestError(
                f"{path} is outside the server's data dir {data}: copy the adapter "
                "there, or upload it as an archive (POST /v1/adapters, multipart)",
                param="lora_path",
                code="path_not_allowed",
            )
        if not candidate.exists():
            raise BadRequestError(
                f"{path} does not exist under {data}", param="lora_path", code="path_not_found"
            )
        return candidate


def _by_name(s: Session, name: str) -> dbm.Adapter | None:
    return s.scalars(select(dbm.Adapter).where(dbm.Adapter.name == name)).first()


def _delete_by_name(s: Session, name: str) -> dbm.Adapter | None:
    row = _by_name(s, name)
    if row is not None:
        s.delete(row)
    return row


def _check_name(name: str, allow_ft: bool) -> None:
    if allow_ft and name.startswith("ft:"):
        return
    if not NAME_RE.match(name):
        raise BadRequestError(
            f"adapter name {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -",
            param="name",
            code="invalid_name",
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class _Member:
    """One archive entry, whichever the archive format."""

    name: str
    size: int
    kind: str  # "file" | "dir" | "other" (links, devices: refused)
    open: Callable[[], IO[bytes]]


def _members(archive: Path, stack: ExitStack) -> list[_Member]:
    if zipfile.is_zipfile(archive):
        z = stack.enter_context(zipfile.ZipFile(archive))

        def zip_kind(m: zipfile.ZipInfo) -> str:
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                return "other"  # a symlink stored in the zip
            return "dir" if m.is_dir() else "file"

        def zip_opener(m: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
            return lambda: z.open(m)

        return [_Member(m.filename, m.file_size, zip_kind(m), zip_opener(m)) for m in z.infolist()]
    if tarfile.is_tarfile(archive):
        t = stack.enter_context(tarfile.open(archive))

        def tar_opener(m: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
            def open_member() -> IO[bytes]:
                f = t.extractfile(m)
                assert f is not None  # only regular files ("file") are ever opened
                return f

            return open_member

        return [
            _Member(
                m.name,
                m.size,
                "file" if m.isfile() else "dir" if m.isdir() else "other",
                tar_opener(m),
            )
            for m in t.getmembers()
        ]
    raise BadRequestError(
        "the upload is neither a .tar(.gz) nor a .zip archive: pack the adapter "
        "folder with `tar czf adapter.tgz -C folder .`",
        param="file",
        code="invalid_archive",
    )


def _safe_extract(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack an archive refusing absolute paths, '..', links, devices and decompression bombs;
    return the folder that holds the adapter files."""
    with ExitStack() as stack:
        members = _members(archive, stack)
        if len(members) > MAX_MEMBERS:
            raise BadRequestError(
                f"archive has {len(members)} entries (max {MAX_MEMBERS})", param="file"
            )
        total = 0
        for m in members:  # check everything before writing anything
            p = Path(m.name)
            if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
                raise BadRequestError(
                    f"archive member {m.name!r} has an unsafe path: archives may only "
                    "hold relative paths inside one folder",
                    param="file",
                    code="unsafe_archive",
                )
            if m.kind == "other":
                raise BadRequestError(
                    f"archive member {m.name!r} is a link or special file: not allowed",
                    param="file",
                    code="unsafe_archive",
                )
            total += m.size
            if total > max_bytes:
                raise BadRequestError(
                    f"archive unpacks to more than {MAX_EXPANSION}x its size: refused as "
                    "a possible decompression bomb",
                    param="file",
                    code="unsafe_archive",
                )
        for m in members:
            target = dest / m.name
            if m.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with m.open() as src, target.open("wb") as out:
                _copy_limited(src, out, m.size)
    # The adapter is the archive root or its single top-level folder.
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _copy_limited(src, out, declared: int) -> None:
    # Trust no header: stop if a member yields more bytes than it declared.
    written = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        written += len(chunk)
        if written > declared:
            raise BadRequestError(
                "archive member is larger than its header says: refused",
                param="file",
                code="unsafe_archive",
            )
        out.write(chunk)
