"""Keeps this replica's engine in step with the adapters every replica shares.

Requests already resolve adapter names in the database (`AdapterRegistry.resolve`) and load
weights from the shared data dir, so an adapter registered on any replica, or by a fine-tune on
any worker, is served here from the next request on. What a replica keeps for itself is what it
has resident: adapter weights in the engine's slots and their prompts in the prefix cache. When
an adapter is deleted or replaced on another replica, `AdapterSync` drops this replica's copy:
at once on a PostgreSQL notice, else at its next poll (every POLL_S). Evictions stay local: a
replica that evicts (LRU) or reloads an adapter changes only its own slots, and tells no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import anyio.to_thread
from sqlalchemy import select

from server.db import Adapter, Database
from server.replicas.notices import ADAPTERS_CHANNEL, ChangeListener

log = logging.getLogger("loraforge.replicas")

POLL_S = 1.0  # without a notice, look again this often: a change reaches every replica in ~1 s


class ResidentAdapters(Protocol):
    """What the sync needs of the engine (server.engine_client.EngineClient)."""

    def resident_adapters(self) -> list[str]: ...

    async def unload_adapter(self, adapter_id: str) -> None: ...


class AdapterSync:
    """A service of `loraforge serve`: unloads resident adapters that no longer exist."""

    def __init__(
        self, db: Database, database_url: str, engine: ResidentAdapters, poll_s: float = POLL_S
    ) -> None:
        self.db, self.engine, self.poll_s = db, engine, poll_s
        self.listener = ChangeListener(database_url, [ADAPTERS_CHANNEL])
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="loraforge-adapter-sync")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # The listener's wait ends within poll_s; closing its connection only after that.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.poll_s + 5)
        self.listener.close()

    async def _loop(self) -> None:
        while not self._stopping:
            await anyio.to_thread.run_sync(self.listener.wait, self.poll_s)
            try:
                for adapter_id in await self.sync_once():
                    log.info("adapter %s was removed on another replica: unloaded here", adapter_id)
            except Exception:  # a database hiccup must not end the sync: log, try again later
                log.exception("adapter sync failed; retrying")

    async def sync_once(self) -> list[str]:
        """Unload the resident adapters whose rows are gone; their ids."""
        resident = self.engine.resident_adapters()
        if not resident:
            return []
        present = set(
            await self.db.run(
                lambda s: s.scalars(select(Adapter.id).where(Adapter.id.in_(resident))).all()
            )
        )
        gone = [adapter_id for adapter_id in resident if adapter_id not in present]
        for adapter_id in gone:
            await self.engine.unload_adapter(adapter_id)
        return gone
