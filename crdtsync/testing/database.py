"""The simulation's server database, on either backend, and the store every instance uses.

:class:`SimDatabase`: where the simulated server instances keep their shared data: one
SQLite file in the simulation's folder (``"sqlite"``, the default), or a fresh PostgreSQL
schema of its own (a ``postgresql://`` URL; the schema is named at random, created by the
first instance and dropped at the end). Each instance opens its own store object on it
(:meth:`SimDatabase.open_store`): its own connection or pool, its own instance id.

:class:`SimStore`: that store wrapped for the simulation, whatever its backend: crash points
just before and after a commit and a rebuild, the live channel's record of every request
outcome and interrupted request, and :meth:`SimStore.die`, the close of a killed process
(it never says goodbye: its heartbeat ages until another instance takes it for gone).
Every other attribute is the wrapped store's.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from crdtsync_server.store import CommitResult, SQLiteStore, Store, SyncWrite, store_parameters

from .invariants import check_interrupted

if TYPE_CHECKING:
    from .simulation import Simulation

SQLITE = "sqlite"
"""``Simulation(database=...)`` for one SQLite file in the simulation's folder."""

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class SimDatabase:
    """The shared database of a simulation: ``"sqlite"`` or a ``postgresql://`` URL (its
    ``schema`` parameter, if any, is replaced by a fresh random schema; the other store
    parameters are kept). ``ValueError`` for anything else.

    Like the SQLite file (``synchronous="OFF"``), PostgreSQL does not wait for its disk at
    commit (``synchronous_commit=off`` unless the URL sets it): a simulated crash is a
    process's, never the database server's, so what a commit made visible stays."""

    def __init__(self, database: str = SQLITE) -> None:
        self.database = database
        self._options: dict[str, Any] = {}
        self.schema: str | None = None
        """The PostgreSQL schema of this run (``None`` on SQLite)."""
        if database == SQLITE:
            self._url = ""
        elif database.startswith(_POSTGRES_SCHEMES):
            self._url, self._options = store_parameters(database)
            if "synchronous_commit=" not in self._url:
                self._url += ("&" if "?" in self._url else "?") + "synchronous_commit=off"
            self.schema = "sim_" + secrets.token_hex(6)
        else:
            raise ValueError(f"database must be {SQLITE!r} or a postgresql:// URL, "
                             f"not {database!r}")
        self._path = Path("cloud.db")

    @property
    def postgres(self) -> bool:
        return self.schema is not None

    def place(self, workdir: Path) -> None:
        """Put the SQLite file in ``workdir`` (the simulation's folder)."""
        self._path = workdir / "cloud.db"

    @property
    def url(self) -> str:
        """The store URL of the shared database (``ServerConfig.db``)."""
        if self.schema is None:
            return str(self._path)
        separator = "&" if "?" in self._url else "?"
        return f"{self._url}{separator}schema={self.schema}"

    def open_store(self) -> Store:
        """A new, not yet opened store object on the shared database: one more instance."""
        if self.schema is None:
            return SQLiteStore(self._path, synchronous="OFF")
        from crdtsync_server.store.postgres import PostgresStore

        return PostgresStore(self._url, **{**self._options, "schema": self.schema})

    async def drop(self) -> None:
        """Drop this run's PostgreSQL schema (nothing on SQLite: the folder goes)."""
        if self.schema is None:
            return
        import asyncpg

        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()

    def __repr__(self) -> str:
        if self.schema is None:
            return f"<SimDatabase sqlite {str(self._path)!r}>"
        return f"<SimDatabase {self._url.rsplit('@', 1)[-1]!r} schema={self.schema!r}>"


class SimStore:
    """The store of server instance ``index`` of ``sim``, wrapping ``inner`` (any
    :class:`Store`); use :meth:`as_store` where a :class:`Store` is expected."""

    def __init__(self, sim: Simulation, index: int, inner: Store) -> None:
        self.sim = sim
        self.index = index
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def as_store(self) -> Store:
        return cast(Store, self)

    async def die(self) -> None:
        """Close like a killed process: nothing more is written, and the instance is not
        forgotten (``aclose`` runs under a throwaway instance id, so ``leave`` deletes
        nothing): its running proxied requests stay its own until its last heartbeat is
        older than ``instance_ttl`` (``DownlinkStore.instance``: a new id is a new
        instance)."""
        self.inner.instance = "dead-" + secrets.token_hex(6)
        await self.inner.aclose()

    async def commit(self, write: SyncWrite) -> CommitResult:
        self.sim.maybe_crash_server(self.index, "before commit")
        result = await self.inner.commit(write)
        if write.device is not None:
            self.sim.writes.committed()
        self.sim.maybe_crash_server(self.index, "after commit")
        return result

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        self.sim.maybe_crash_server(self.index, "before rebuild")
        done = await self.inner.rebuild(key, gen, upto_id, snapshot)
        self.sim.maybe_crash_server(self.index, "after rebuild")
        return done

    async def finish_request(self, device: str, request_id: str, outcome: Any, now: int
                             ) -> None:
        before = await self.inner.wake_head()
        await self.inner.finish_request(device, request_id, outcome, now)
        self.sim.model.running.discard((device, request_id))
        await self.sim.live.recorded(self.inner, [device], "request outcome", before)

    async def interrupt_running(self, outcome: Any, now: int, stale_ms: int = 0) -> int:
        """The store's, then the checks: only requests the simulation saw running (their
        route was called, their outcome never stored) may be interrupted (``recovery``,
        :func:`~.invariants.check_interrupted`), and each device whose request was
        interrupted must be named in the wake log (``wake-log``)."""
        running = sorted(self.sim.model.running)
        if not running:
            count = await self.inner.interrupt_running(outcome, now, stale_ms)
            if count:
                self.sim.model.recovery.append(
                    f"recovery: step {self.sim.network.step}: {count} requests interrupted, "
                    f"none was running")
            return count
        before = await self.inner.wake_head()
        count = await self.inner.interrupt_running(outcome, now, stale_ms)
        if count:
            await self._interrupted(running, count, before)
        return count

    async def _interrupted(self, running: list[tuple[str, str]], count: int, before: int
                           ) -> None:
        """Find which of the ``running`` requests the last call finished, check them."""
        finished: dict[str, list[str]] = {}
        for device, request_id in running:
            stored = await self.inner.get_request(device, request_id)
            if stored is not None and stored.status != "running":
                finished.setdefault(device, []).append(request_id)
                self.sim.model.running.discard((device, request_id))
        if sum(map(len, finished.values())) != count:
            self.sim.model.recovery.append(
                f"recovery: step {self.sim.network.step}: {count} requests interrupted, "
                f"of the running ones {finished}")
        for device, ids in finished.items():
            check_interrupted(self.sim, device, ids)
        await self.sim.live.recorded(self.inner, list(finished), "interrupted request", before)
