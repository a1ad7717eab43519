"""The store backends every contract suite (``tests/test_store_<role>.py``) runs against, the
``store`` fixture that opens each of them in turn (imported by ``conftest.py``), and the
helpers the suites share.

Adding a backend means adding one factory to :data:`BACKENDS`; it then runs every suite,
and ``tests/test_store_roles.py`` lists the members it still misses, role by role.
Backend-specific tests live in ``test_store_<backend>.py``. The PostgreSQL backend needs
the test database (``tests/services.py``): each store gets a schema of its own, dropped
after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from crdtsync.protocol import Conflict, Event, WriteInfo
from crdtsync_server.store import (
    CommitResult,
    DeviceRecord,
    DeviceStore,
    DocWrite,
    Downlink,
    DownlinkStore,
    FeedStore,
    KeyStamp,
    MemoryStore,
    ProxyRequest,
    SQLiteStore,
    Store,
    SyncWrite,
)
from crdtsync_server.store.feed import ConflictRecord, StateChange
from crdtsync_server.store.postgres import PostgresStore

from .services import POSTGRES_URL, drop_schema, new_schema, require_postgres


def postgres_store(tmp_path: Path | None = None) -> PostgresStore:
    """A :class:`PostgresStore` in a schema of its own (random name) on the test database,
    not opened (building one needs no database: ``test_store_roles.py`` runs without it).
    Drop its schema afterwards with :func:`drop_schema`."""
    return PostgresStore(POSTGRES_URL, schema=new_schema())


BACKENDS: dict[str, Callable[[Path], Store]] = {
    "memory": lambda tmp_path: MemoryStore(),
    "sqlite": lambda tmp_path: SQLiteStore(tmp_path / "store.db"),
    "postgres": postgres_store,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = BACKENDS[request.param](tmp_path)
    if isinstance(backend, PostgresStore):
        require_postgres()  # skipped without the database (failed under CI=true)
    try:
        await backend.open()
        yield backend
    finally:
        await backend.aclose()
        if isinstance(backend, PostgresStore) and backend.schema is not None:
            await drop_schema(backend.schema)



# --- helpers shared by the suites ----------------------------------------------------------


def ev(seq: int, topic: str = "temp", body: Any = None, time: int | None = None) -> Event:
    return Event(
        seq=seq, topic=topic, time=1000 + seq if time is None else time,
        body={"seq": seq} if body is None else body,
    )


def evs(first: int, last: int, topic: str = "temp") -> tuple[Event, ...]:
    return tuple(ev(s, topic) for s in range(first, last + 1))


async def add_device(store: DeviceStore, device_id: str = "dev-1", **kw: Any) -> DeviceRecord:
    record = DeviceRecord(id=device_id, token_hash=f"hash-{device_id}", created=1, **kw)
    await store.add_device(record)
    return record


async def write_docs(store: Store, key: str, *updates: bytes, gen: int = 0) -> CommitResult:
    docs = [DocWrite(key, u, gen) for u in updates]
    return await store.commit(SyncWrite(device=None, time=5, docs=docs))


async def all_events(store: FeedStore, **kw: Any) -> list[tuple[str, int]]:
    return [(e.device, e.seq) for e in await store.read_events(limit=10_000, **kw)]


def stamp_row(key: str, stamp: int, writer: str = "device", raw: int = 0,
              doc: str = "dev-1/state", name: str = "state") -> KeyStamp:
    return KeyStamp(doc, name, key, stamp, writer, raw)


async def queue(store: DownlinkStore, kind: str = "message", name: str = "note", body: Any = None,
                now: int = 10, expires: int | None = None, device: str = "dev-1") -> Downlink:
    return await store.queue_downlink(device, kind, name, {} if body is None else body,
                                      now=now, expires=expires)


async def statuses(store: DownlinkStore, device: str = "dev-1") -> dict[int, str]:
    return {d.seq: d.status for d in await store.list_downlink(device, limit=1000)}


def req(request_id: str, body: Any = None, device: str = "dev-1") -> ProxyRequest:
    return ProxyRequest(device=device, id=request_id, route="weather",
                        body={"id": request_id} if body is None else body, created=7)


async def finished(store: DownlinkStore, request_id: str, now: int, device: str = "dev-1") -> None:
    assert await store.claim_request(device, request_id, now) is not None
    await store.finish_request(device, request_id, {"ok": True, "at": now}, now)


def change(device: str, changes: dict[str, dict[str, Any]], source: str = "device"
           ) -> StateChange:
    return StateChange(device, "state", changes, source)


def conflict_record(device: str, key: str = "k") -> ConflictRecord:
    return ConflictRecord(device, "state", Conflict(
        "state", key, WriteInfo("cloud", 1_000, {"on": [1, 2.5]}),
        WriteInfo("device", 900, None, True)))
