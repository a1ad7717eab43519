"""Device databases of schemas v1 and v2 opened by today's :class:`DeviceStore`: every row
survives, the migrated schema is a fresh database's, and a device started on one syncs with a
real server. (v3 and v4 have their own tests in ``test_device_store.py``.)

Recipe: ``tests/data/schema/device_v1.db`` and ``device_v2.db`` were written by
:func:`write_device_v1_fixture` and :func:`write_device_v2_fixture`, which run
``MIGRATIONS[:1]`` and ``MIGRATIONS[:2]`` alone (never edited) and insert the rows below;
regenerating them with ``CRDTSYNC_REGEN_FIXTURES=1 pytest tests/test_device_migrations.py``
yields the same content (a test checks it). Never regenerate one to make a failing migration
test pass: the files stand for devices already in the field.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from crdtsync import AdminClient, Device
from crdtsync._device_store import MIGRATIONS, SCHEMA_VERSION, DeviceStore, StoredCall
from crdtsync_server import Server

from .test_device_store import FIXTURES, _dump
from .test_store_sqlite import migrated_fixture

# device_v1.db: frozen Yjs v1 updates made with pycrdt 0.14.13, client id 9, logged without a
# snapshot: update 1 sets state a = 1 (the cloud holds it, V1_SERVER_SV), update 2 b = "two".
V1_UPDATES = (bytes.fromhex("0101090028010573746174650161017c3f80000000"),
              bytes.fromhex("010109012801057374617465016201770374776f00"))
V1_SERVER_SV = bytes.fromhex("010901")
V1_META = {"client_id": 9, "server_sv": V1_SERVER_SV, "next_seq": 3}
V1_EVENTS = [(1, "temp", 1_690_000_000_000, msgpack.packb({"c": 19.0})),
             (2, "door", 1_690_000_001_000, msgpack.packb({"open": True, "by": ["k"]}))]
V1_STATE = {"a": 1, "b": "two"}

# device_v2.db: client id 11; the snapshot (the cloud's copy, V2_SERVER_SV) holds state
# label = "v2", n = 1; the logged update deletes label and sets n = 2.5. One queued event,
# one command result not yet acknowledged, a pending proxied request and an answered one.
V2_SNAPSHOT = bytes.fromhex(
    "01020b002801057374617465056c6162656c01770276322801057374617465016e017c3f80000000")
V2_UPDATE = bytes.fromhex("01010b02a80b01017c40200000010b010002")
V2_SERVER_SV = bytes.fromhex("010b02")
V2_META = {"client_id": 11, "server_sv": V2_SERVER_SV, "next_seq": 2, "down_done": 1}
V2_EVENTS = [(1, "hum", 1_710_000_000_000, msgpack.packb({"rh": 40}))]
V2_RESULT = (1, True, msgpack.packb({"reboot": "ok"}))
V2_CALLS = [StoredCall("r1", "weather", msgpack.packb({"city": "Oslo"}), 1_710_000_000_100,
                       "pending", None),
            StoredCall("r0", "weather", msgpack.packb({}), 1_710_000_000_050, "done",
                       msgpack.packb({"status": 200, "body": {"t": 4}}))]
V2_STATE = {"n": 2.5}


def migrated_device_fixture(path: Path, version: int
                            ) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    """A new golden device file at ``path`` with the device migrations up to ``version``
    applied (the block fills in its rows in the same transaction)."""
    return migrated_fixture(path, version, MIGRATIONS)


def _insert_common(conn: sqlite3.Connection, meta: dict[str, Any],
                   events: list[tuple[int, str, int, bytes]]) -> None:
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
    conn.executemany("INSERT INTO outbox (seq, topic, time, body) VALUES (?, ?, ?, ?)",
                     events)


def write_device_v1_fixture(path: Path = FIXTURES / "device_v1.db") -> None:
    """Write ``device_v1.db``: schema v1 only; two logged state updates, two queued
    events, the client id, the cloud's state vector and the next event seq."""
    with migrated_device_fixture(path, 1) as conn:
        _insert_common(conn, V1_META, V1_EVENTS)
        conn.executemany("INSERT INTO updates (id, doc, data) VALUES (?, 'state', ?)",
                         list(enumerate(V1_UPDATES, start=1)))


def write_device_v2_fixture(path: Path = FIXTURES / "device_v2.db") -> None:
    """Write ``device_v2.db``: schemas v1 and v2 only; a state snapshot and one logged
    update, one queued event, one command result and two proxied requests."""
    with migrated_device_fixture(path, 2) as conn:
        _insert_common(conn, V2_META, V2_EVENTS)
        conn.execute("INSERT INTO snapshots (doc, data, upto) VALUES ('state', ?, 1)",
                      (V2_SNAPSHOT,))
        conn.execute("INSERT INTO updates (id, doc, data) VALUES (2, 'state', ?)",
                     (V2_UPDATE,))
        conn.execute("INSERT INTO results (seq, ok, body) VALUES (?, ?, ?)", V2_RESULT)
        conn.executemany(
            "INSERT INTO calls (id, route, body, created, status, outcome)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(c.id, c.route, c.body, c.created, c.status, c.outcome) for c in V2_CALLS])


WRITERS: dict[int, Callable[[Path], None]] = {1: write_device_v1_fixture,
                                              2: write_device_v2_fixture}


@pytest.fixture(scope="module", autouse=True)
def _regenerate_fixtures() -> None:
    if os.environ.get("CRDTSYNC_REGEN_FIXTURES") == "1":
        for version, write in WRITERS.items():
            write(FIXTURES / f"device_v{version}.db")


def _copy(version: int, tmp_path: Path) -> Path:
    path = tmp_path / f"v{version}.db"
    shutil.copyfile(FIXTURES / f"device_v{version}.db", path)
    return path


def _schema(path: Path) -> list[tuple[str, str, str, str | None]]:
    """Every table, index and trigger of ``path`` with its SQL, in a stable order."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


def _rows(path: Path, tables: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of ``tables`` (name: the columns to read) in ``path``, in rowid order."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {t: conn.execute(f"SELECT {', '.join(cols)} FROM {t} ORDER BY rowid").fetchall()
                for t, cols in tables.items()}


def _columns(path: Path) -> dict[str, list[str]]:
    """The tables of ``path`` (sqlite's own excluded) and their columns."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in names}


@pytest.mark.parametrize("version", sorted(WRITERS))
def test_device_fixture_is_what_the_old_scripts_make(version: int, tmp_path: Path) -> None:
    WRITERS[version](tmp_path / "made.db")
    assert _dump(FIXTURES / f"device_v{version}.db") == _dump(tmp_path / "made.db")
    assert _dump(tmp_path / "made.db")[0] == version


@pytest.mark.parametrize("version", [1, 2, 3, 4])
async def test_a_migrated_device_database_has_a_fresh_ones_schema(
        version: int, tmp_path: Path) -> None:
    """Migrating in place yields exactly the tables, columns (as SQL) and indexes of a
    database created today, and keeps every row of every table it had."""
    path = _copy(version, tmp_path)
    old_columns = _columns(path)
    before = _rows(path, old_columns)
    async with DeviceStore(tmp_path / "fresh.db"):
        pass
    async with DeviceStore(path):
        pass
    assert _schema(path) == _schema(tmp_path / "fresh.db")
    assert _rows(path, old_columns) == before
    assert sum(map(len, before.values())) >= 5  # the fixture is not empty
    assert _dump(path)[0] == SCHEMA_VERSION


async def test_device_v1_database_migrates_in_place(tmp_path: Path) -> None:
    """v1 had no results, calls, templates or dirty keys: all of them start empty, and
    what v1 stored reads as before."""
    path = _copy(1, tmp_path)
    async with DeviceStore(path) as store:
        assert store.meta == V1_META
        local = await store.load_doc("state")
        assert (local.snapshot, local.upto, local.updates) == (
            b"", 0, tuple(enumerate(V1_UPDATES, start=1)))
        assert [(e.seq, e.topic, e.time, e.body, e.template)
                for e in await store.pending(10, 1 << 20)] == [(*e, None) for e in V1_EVENTS]
        assert (store.outbox_count, store.result_count, store.call_count("pending")) == (2, 0, 0)
        assert (store.dirty_count, await store.dirty_keys()) == (0, [])
    assert _dump(FIXTURES / "device_v1.db")[0] == 1  # the golden file was not touched


async def test_device_v2_database_migrates_in_place(tmp_path: Path) -> None:
    path = _copy(2, tmp_path)
    async with DeviceStore(path) as store:
        assert store.meta == V2_META
        local = await store.load_doc("state")
        assert (local.snapshot, local.upto, local.updates) == (V2_SNAPSHOT, 1,
                                                               ((2, V2_UPDATE),))
        assert [(e.seq, e.topic, e.time, e.body, e.template)
                for e in await store.pending(10, 1 << 20)] == [(*e, None) for e in V2_EVENTS]
        assert await store.results(10) == [V2_RESULT]
        assert await store.calls("pending") == [V2_CALLS[0]]
        assert await store.calls("done") == [V2_CALLS[1]]
        assert (store.dirty_count, await store.dirty_keys()) == (0, [])
    assert _dump(FIXTURES / "device_v2.db")[0] == 2


@pytest.mark.parametrize(("version", "state", "events"),
                         [(1, V1_STATE, V1_EVENTS), (2, V2_STATE, V2_EVENTS)])
async def test_a_device_on_an_old_database_syncs(
        version: int, state: dict[str, Any], events: list[tuple[int, str, int, bytes]],
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    """A device started on a v1 or v2 file sends its queued events and the document its
    cloud lacks, and its new writes are tracked as dirty keys and acknowledged."""
    path = _copy(version, tmp_path)
    token = (await admin.add_device("dev-old"))["token"]
    async with Device("dev-old", server.url, token=token, path=path, interval=None) as dev:
        assert dev.state.to_dict() == state
        dev.state["w"] = version
        report = await dev.sync()
        assert report.events_acked == len(events)
        assert dev.pending_events == 0
    assert (await admin.state("dev-old"))["state"] == {**state, "w": version}
    stored = [(e["seq"], e["topic"], e["body"]) async for e in admin.iter_events(device="dev-old")]
    assert stored == [(seq, topic, msgpack.unpackb(body)) for seq, topic, _, body in events]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM dirty").fetchone() == (0,)
