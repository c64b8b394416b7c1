"""The adapter registry: rows in the database, weights on disk, residency in the engine's slots.

An adapter is registered from a folder inside the data dir or from an uploaded archive; either
way it is read with `mlx_core.lora.formats.load_adapter` (ours, mlx-lm, PEFT, the seed's npz),
checked against the base model's shapes and stored once, in our format, under
`<data_dir>/adapters/<id>/`: written under a temporary name and renamed once complete
(`server.replicas.storage`), so a replica sharing the data dir never reads half an adapter.
Requests name adapters only by registered name: a path in a completion request is never read.
Every change notifies the other replicas (`server.replicas.notices`), whose `AdapterSync` drops
their resident copy of an adapter deleted or replaced here. `server.adapter_sources` makes both sources safe to read (no
links, no escaping the data dir, no decompression bombs), in worker threads.

The registry reaches the base model through a `BaseModelHost`: the server's `EngineClient`
(MLX work on the engine thread, eviction from its slots), or in a standalone job worker a
`ConfigOnlyHost` that knows the model's id and shapes from its config.json alone.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mlx_core.config import load_config
from mlx_core.errors import EngineError
from mlx_core.lora.formats import load_adapter, save_adapter
from mlx_core.lora.layers import Adapter, AdapterError
from server import db as dbm
from server.adapter_sources import MAX_EXPANSION, adapter_folder, client_message, safe_extract
from server.db import Database
from server.engine_client import ModelInfo
from server.errors import BadRequestError, ConflictError, NotFoundError
from server.replicas.notices import ADAPTERS_CHANNEL, notify
from server.replicas.storage import publish_folder, remove_folder, temp_name
from server.settings import Settings

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Unpacking is disk- and CPU-bound: two at a time, so uploads cannot take every worker thread.
_UNPACKERS = anyio.CapacityLimiter(2)
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
            raise _deleted()
        return Path(row.path)

    def load_for_engine(self, adapter_id: str) -> Adapter:
        """The engine's loader (engine thread): weights of a registered adapter. Raises
        EngineError (not_found, a 404 for that request alone) for one deleted meanwhile."""
        path = self.path_of(adapter_id)
        try:
            return load_adapter(path)
        except (OSError, AdapterError) as e:
            if not path.exists():  # deleted between the lookup and the read
                raise _deleted() from None
            # Stored weights that no longer read are the server's fault, not the request's: a
            # 500 for that request (the log has the path), never the client's 400.
            raise RuntimeError(f"stored adapter {adapter_id} at {path} cannot be read: {e}") from e

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
        self,
        name: str,
        path: str,
        job_id: str | None = None,
        replace: bool = False,
        param: str = "path",
    ) -> AdapterInfo:
        """Register an adapter from a folder or file inside the data dir. With `replace`, an
        adapter of the same name is swapped out only once the new one has been validated.
        `param` is the request field that holds `path` (errors name it)."""
        _check_name(name, allow_ft=job_id is not None)  # first: it needs no filesystem
        src = await anyio.to_thread.run_sync(
            adapter_folder, path, self.settings.data_dir.resolve(), param
        )
        return await self._register(name, src, job_id, replace, param)

    async def register_archive(self, name: str, archive: Path) -> AdapterInfo:
        """Register an uploaded .tar(.gz) or .zip holding one adapter folder. Unpacking runs in
        a worker thread within the --max-adapter-unpacked-mb and --max-adapter-files caps."""
        s = self.settings
        limit = min(s.max_adapter_unpacked_bytes, archive.stat().st_size * MAX_EXPANSION)
        tmp = Path(tempfile.mkdtemp(dir=s.adapters_dir, prefix=".upload-"))
        try:
            root = await anyio.to_thread.run_sync(
                safe_extract, archive, tmp, limit, s.max_adapter_files, limiter=_UNPACKERS
            )
            return await self._register(name, root, None, param="file", shown=tmp)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)

    async def _register(
        self,
        name: str,
        src: Path,
        job_id: str | None,
        replace: bool = False,
        param: str = "path",
        shown: Path | None = None,
    ) -> AdapterInfo:
        _check_name(name, allow_ft=job_id is not None)
        if not replace and await self.get(name) is not None:
            raise _name_taken(name)
        host = self.host
        model = host.model if host is not None else None
        if host is None or model is None:
            raise BadRequestError("the base model is not loaded yet: retry shortly")
        adapter_id = dbm.new_id("lora")
        dest = self.settings.adapters_dir / adapter_id
        # MLX work (reading, checking, writing the weights) runs where the model's other MLX
        # work runs: on the engine thread, when this process has one.
        base = shown or self.settings.data_dir
        # Written under a temporary name, then renamed: whoever sees adapters/<id> sees it whole.
        tmp = temp_name(dest)
        try:
            adapter = await host.run_mlx(lambda: self._store(src, tmp, model, param, base))
            await anyio.to_thread.run_sync(publish_folder, tmp, dest)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
        fingerprint, size = await anyio.to_thread.run_sync(_fingerprint, dest)
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
            fingerprint=fingerprint,
            size_bytes=size,
            fine_tuning_job_id=job_id,
        )
        replaced: list[dbm.Adapter] = []

        def swap(s: Session) -> None:
            if replace and (old := _delete_by_name(s, name)) is not None:
                replaced.append(old)
                s.flush()
            s.add(row)
            notify(s, ADAPTERS_CHANNEL, name)

        try:
            await self.db.run(swap)
        except Exception as e:
            await anyio.to_thread.run_sync(remove_folder, dest)
            if isinstance(e, IntegrityError):  # another replica registered the name meanwhile
                raise _name_taken(name) from None
            raise
        for old in replaced:
            await self._forget(old)
        return AdapterInfo.of(row)

    def _store(self, src: Path, dest: Path, model: ModelInfo, param: str, base: Path) -> Adapter:
        args = model.args
        try:
            adapter = load_adapter(src, args)
            adapter.check_fits(args)
        except (AdapterError, ValueError, OSError, RuntimeError) as e:
            raise BadRequestError(
                f"cannot use this adapter: {client_message(e, base)}",
                param=param,
                code="invalid_adapter",
            ) from e
        if adapter.rank > self.settings.max_lora_rank:
            raise BadRequestError(
                f"adapter rank {adapter.rank} is above this server's --max-lora-rank "
                f"{self.settings.max_lora_rank}: restart with a larger --max-lora-rank",
                param=param,
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
            # Requests in flight keep the resident copy until they finish (the slots count
            # them); requests that name it from now on get 404.
            await self.host.unload_adapter(row.id)
        await anyio.to_thread.run_sync(remove_folder, Path(row.path))


def _name_taken(name: str) -> ConflictError:
    return ConflictError(
        f"an adapter named {name!r} is already registered: delete it first "
        "(DELETE /v1/adapters/{name}) or pick another name",
        param="name",
        code="adapter_exists",
    )


def _deleted() -> EngineError:
    return EngineError(
        "this adapter was deleted while the request waited: GET /v1/models lists the models "
        "you can use",
        kind="not_found",
        param="model",
    )


def _by_name(s: Session, name: str) -> dbm.Adapter | None:
    return s.scalars(select(dbm.Adapter).where(dbm.Adapter.name == name)).first()


def _delete_by_name(s: Session, name: str) -> dbm.Adapter | None:
    row = _by_name(s, name)
    if row is not None:
        s.delete(row)
        notify(s, ADAPTERS_CHANNEL, name)
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


def _fingerprint(dest: Path) -> tuple[str, int]:
    """The stored adapter's weights hash and its folder's size (worker thread: it reads it all)."""
    return _sha256(dest / "adapters.safetensors"), sum(f.stat().st_size for f in dest.iterdir())
