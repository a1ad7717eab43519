"""SQLite-only behaviour of the store: persistence, schema versions, pragmas, lifecycle,
and :func:`open_store` URL parsing. The shared contract is in ``test_store_contract.py``."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from crdtsync.errors import ClosedError, StoreError
from crdtsync.protocol import Event
from crdtsync_server.store import (
    DeviceRecord,
    DocWrite,
    MemoryStore,
    SQLiteStore,
    SyncWrite,
    open_store,
)
from crdtsync_server.store.sqlite import SCHEMA_VERSION


def _user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _databases(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".db" in p.name)


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    async with SQLiteStore(path) as store:
        await store.add_device(DeviceRecord("dev-1", "h", created=1, meta={"k": "v"}))
        result = await store.commit(SyncWrite(
            "dev-1", time=5, docs=[DocWrite("a", b"u1"), DocWrite("a", b"u2")],
            events=[Event(1, "temp", 100, {"c": 21.5})],
        ))
        await store.compact("a", result.update_ids[1], b"snap")
        await store.set_setting("s", "v")

    async with SQLiteStore(path) as store:
        log = await store.load_doc("a")
        assert (log.snapshot, log.snapshot_id, log.updates) == (b"snap", result.update_ids[1], ())
        device = await store.get_device("dev-1")
        assert device is not None
        assert (device.last_seq, device.last_sync, device.meta) == (1, 5, {"k": "v"})
        assert [e.body for e in await store.read_events()] == [{"c": 21.5}]
        assert await store.get_setting("s") == "v"
        # AUTOINCREMENT: every row was deleted by compaction, yet ids keep climbing.
        new = await store.commit(SyncWrite(None, time=6, docs=[DocWrite("a", b"u3")]))
        assert new.update_ids[0] > result.update_ids[1]


async def test_fresh_database_gets_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    async with SQLiteStore(path):
        pass
    assert SCHEMA_VERSION >= 1
    assert _user_version(path) == SCHEMA_VERSION
    with closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"docs", "updates", "devices", "events", "settings"} <= tables


async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript("CREATE TABLE future (x); INSERT INTO future VALUES (1);")
        conn.execute("PRAGMA user_version = 99")
    before = path.read_bytes()

    store = SQLiteStore(path)
    newer = rf"database schema v99 is newer than this crdtsync \(v{SCHEMA_VERSION}\)"
    with pytest.raises(StoreError, match=newer):
        await store.open()
    assert path.read_bytes() == before
    assert _databases(tmp_path) == ["future.db"]  # nothing moved aside
    with pytest.raises(ClosedError):
        await store.get_setting("x")  # a failed open leaves the store unopened
    await store.aclose()


async def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        await SQLiteStore(path).open()
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert path.read_bytes() == b"this is not sqlite" * 100


async def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await SQLiteStore(tmp_path / "missing-dir" / "x.db").open()


@pytest.mark.parametrize(("mode", "level"), [(None, 2), ("FULL", 2), ("normal", 1), ("EXTRA", 3)])
async def test_pragmas(tmp_path: Path, mode: str | None, level: int) -> None:
    path = tmp_path / "p.db"
    store = SQLiteStore(path) if mode is None else SQLiteStore(path, synchronous=mode)
    async with store:
        pragmas = await store.pragmas()
    assert pragmas == {
        "journal_mode": "wal", "synchronous": level, "busy_timeout": 5000,
        "foreign_keys": 1, "user_version": SCHEMA_VERSION,
    }


def test_bad_synchronous_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.db", synchronous="FULL; DROP TABLE docs")


async def test_unopened_and_closed_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(ClosedError):
        await store.load_doc("a")
    async with store:
        await store.open()  # already open: no-op
        assert await store.load_doc("a") is not None
    with pytest.raises(ClosedError):
        await store.load_doc("a")
    await store.aclose()


async def test_aclose_waits_for_queued_calls(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "x.db")
    await store.open()
    pending = [
        store.commit(SyncWrite(None, time=1, docs=[DocWrite("a", bytes([i]))])) for i in range(20)
    ]
    tasks = [asyncio.ensure_future(c) for c in pending]
    await asyncio.sleep(0)
    await store.aclose()
    assert len({(await t).update_ids[0] for t in tasks}) == 20
    async with SQLiteStore(tmp_path / "x.db") as reopened:
        assert len((await reopened.load_doc("a")).updates) == 20


# --- open_store --------------------------------------------------------------------------


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_store("memory:"), MemoryStore)
    cases = {
        f"sqlite:///{tmp_path}/abs.db": f"{tmp_path}/abs.db",  # sqlite:////abs/path
        "sqlite:///rel/x.db": "rel/x.db",
        "plain.db": "plain.db",
        str(tmp_path / "p.db"): str(tmp_path / "p.db"),
    }
    for url, path in cases.items():
        store = open_store(url)
        assert isinstance(store, SQLiteStore)
        assert store.path == path
    for bad in ["", "sqlite:///", "sqlite://host/x.db", "postgresql://u@h/db", "memory://"]:
        with pytest.raises(ValueError, match="unsupported store URL"):
            open_store(bad)
