"""SQLite-only behaviour of the store: persistence, schema versions, migrations from old
golden databases, pragmas, lifecycle, and :func:`open_store` URL parsing. The shared
contract is in the role suites ``test_store_<role>.py`` (backends in ``store_backends.py``).

Golden databases live in ``tests/data/schema/server_v<n>.db``, one per released schema, each
holding a device, an event and a document update written with that schema alone (v2 adds a
downlink item and a request; v4 a feed item, a projection row and a second device; v5 a
device that was deleted and one with a document, which v6 leaves without stamps; v6 a
document with stamp rows and a request running, whose interruption v7 announces).
:func:`write_v1_fixture` made ``server_v1.db`` and :func:`write_v2_fixture` ``server_v2.db``;
they only ever run ``MIGRATIONS[0]`` and ``MIGRATIONS[1]`` (never edited), so regenerating
them with ``CRDTSYNC_REGEN_FIXTURES=1 pytest tests/test_store_sqlite.py`` yields the same
content. Never regenerate one to make a failing
migration test pass: the files stand for databases already in the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from crdtsync._sqlite_worker import statements, transaction
from crdtsync.errors import ClosedError, StoreError, Unavailable
from crdtsync.protocol import Event
from crdtsync_server.auth import hash_token
from crdtsync_server.store import (
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocWrite,
    FleetRecord,
    KeyStamp,
    MemoryStore,
    ProxyRequest,
    SQLiteStore,
    SyncWrite,
    WakeEntry,
    open_store,
)
from crdtsync_server.store.feed import event_json
from crdtsync_server.store.rules import event_digest
from crdtsync_server.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from crdtsync_server.store.sqlite import documents as sqlite_documents
from crdtsync_server.store.sqlite import feed as sqlite_feed
from crdtsync_server.store.sqlite.connection import insert_values

FIXTURES = Path(__file__).parent / "data" / "schema"
REGEN = os.environ.get("CRDTSYNC_REGEN_FIXTURES") == "1"

# What server_v1.db holds. The update is a frozen Yjs v1 update made with pycrdt 0.14.13:
#   Doc(client_id=7): state["x"] = 1; state["y"] = "hi"
V1_UPDATE = bytes.fromhex(
    "0102070028010573746174650178017c3f80000028010573746174650179017702686900")
V1_EVENT = Event(1, "temp", 1_700_000_000_000, {"c": 21.5, "tags": ["a"]})
V1_DEVICE = DeviceRecord(
    "dev-old", "hash-old", created=1_699_000_000_000, last_sync=1_700_000_000_500,
    last_seq=1, meta={"site": "north"},
)


def write_v1_fixture(path: Path = FIXTURES / "server_v1.db") -> None:
    """Write ``server_v1.db``: schema v1 only, one device, one event, one doc update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with transaction(conn):
            for statement in statements(MIGRATIONS[0]):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 1")
            d = V1_DEVICE
            conn.execute(
                "INSERT INTO devices (id, token_hash, created, last_sync, last_seq,"
                " events_lost, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (d.id, d.token_hash, d.created, d.last_sync, d.last_seq, d.events_lost,
                 '{"site":"north"}'),
            )
            e = V1_EVENT
            conn.execute(
                "INSERT INTO events (device, seq, topic, time, received, body, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (d.id, e.seq, e.topic, e.time, d.last_sync, event_json(e), event_digest(e)),
            )
            conn.execute("INSERT INTO docs (key, gen) VALUES ('state', 0)")
            conn.execute(
                "INSERT INTO updates (key, gen, data) VALUES ('state', 0, ?)", (V1_UPDATE,))
        conn.execute("VACUUM")  # a compact single file, no journal left behind


# What server_v2.db holds besides V1's rows (device "dev-v2"): a delivered command and a
# pending request; the device processed nothing yet.
V2_DEVICE = DeviceRecord(
    "dev-v2", "hash-v2", created=1_710_000_000_000, last_sync=1_710_000_000_500,
    last_seq=1, meta={"site": "south"}, down_seq=1, down_done=0,
)
V2_EVENT = Event(1, "hum", 1_710_000_000_000, {"rh": 40})


@contextmanager
def migrated_fixture(path: Path, version: int, migrations: Sequence[str] = MIGRATIONS
                     ) -> Iterator[sqlite3.Connection]:
    """A new golden file at ``path`` with ``migrations`` (the server's by default) up to
    ``version`` applied; the block fills it in the same transaction; compacted to a single
    file at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with transaction(conn):
            for script in migrations[:version]:
                for statement in statements(script):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            yield conn
        conn.execute("VACUUM")


def write_v3_fixture(path: Path = FIXTURES / "server_v3.db") -> None:
    """Write ``server_v3.db``: schemas v1 to v3 only, a fleet with one device and its
    event, and the device's document."""
    e = V1_EVENT
    with migrated_fixture(path, 3) as conn:
        conn.execute("INSERT INTO fleets (id, created) VALUES ('west', 1)")
        conn.execute(
            "INSERT INTO devices (id, token_hash, created, last_seq, fleet, fleet_gen)"
            " VALUES ('dev-v3', 'h', 1, 1, 'west', 1)")
        conn.execute(
            "INSERT INTO events (device, seq, topic, time, received, body, digest)"
            " VALUES ('dev-v3', ?, ?, ?, 5, ?, ?)",
            (e.seq, e.topic, e.time, event_json(e), event_digest(e)))
        conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES ('dev-v3/state', 0, ?)",
            (V1_UPDATE,))


def write_v4_fixture(path: Path = FIXTURES / "server_v4.db") -> None:
    """Write ``server_v4.db``: schemas v1 to v4 only, two devices (one with an event, a
    document, its projection row, a queued message and a request) and a state change."""
    e = V1_EVENT
    with migrated_fixture(path, 4) as conn:
        conn.execute(
            "INSERT INTO devices (id, token_hash, created, last_seq, down_seq)"
            " VALUES ('dev-v4', 'hash-v4', 1, 1, 1), ('other', 'hash-other', 2, 0, 0)")
        conn.execute(
            "INSERT INTO feed (kind, device, seq, topic, time, received, body, digest)"
            " VALUES ('event', 'dev-v4', ?, ?, ?, 5, ?, ?)",
            (e.seq, e.topic, e.time, event_json(e), event_digest(e)))
        conn.execute(
            "INSERT INTO feed (kind, device, doc, time, received, body, source)"
            " VALUES ('state', 'dev-v4', 'state', 6, 6, '{\"state\":{\"x\":1}}', 'device')")
        conn.execute("INSERT INTO docs (key, gen) VALUES ('dev-v4/state', 0)")
        conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES ('dev-v4/state', 0, ?)",
            (V1_UPDATE,))
        conn.execute(
            "INSERT INTO projection (device, doc, map, key, value, updated)"
            " VALUES ('dev-v4', 'state', 'state', 'x', '1', 6)")
        conn.execute(
            "INSERT INTO downlink (device, seq, kind, name, body, created, updated)"
            " VALUES ('dev-v4', 1, 'message', 'hello', '{}', 7, 7)")
        conn.execute(
            "INSERT INTO requests (device, id, route, body, created, updated)"
            " VALUES ('dev-v4', 'r1', 'weather', '{}', 8, 8)")


def write_v5_fixture(path: Path = FIXTURES / "server_v5.db") -> None:
    """Write ``server_v5.db``: schemas v1 to v5 only, a device with a document, its state
    change and projection row, and a deleted device's remembered ``last_seq``."""
    with migrated_fixture(path, 5) as conn:
        conn.execute(
            "INSERT INTO devices (id, token_hash, created, last_sync, last_seq)"
            " VALUES ('dev-v5', 'hash-v5', 1, 6, 0)")
        conn.execute("INSERT INTO deleted_devices (id, last_seq) VALUES ('gone', 3)")
        conn.execute("INSERT INTO docs (key, gen) VALUES ('dev-v5/state', 0)")
        conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES ('dev-v5/state', 0, ?)",
            (V1_UPDATE,))
        conn.execute(
            "INSERT INTO feed (kind, device, doc, time, received, body, source) VALUES"
            " ('state', 'dev-v5', 'state', 6, 6, '{\"state\":{\"x\":1,\"y\":\"hi\"}}',"
            " 'device')")
        conn.execute(
            "INSERT INTO projection (device, doc, map, key, value, updated)"
            " VALUES ('dev-v5', 'state', 'state', 'x', '1', 6),"
            " ('dev-v5', 'state', 'state', 'y', '\"hi\"', 6)")


def write_v6_fixture(path: Path = FIXTURES / "server_v6.db") -> None:
    """Write ``server_v6.db``: schemas v1 to v6 only, a device with a document, one stamp
    row and a proxied request left ``running``."""
    with migrated_fixture(path, 6) as conn:
        conn.execute(
            "INSERT INTO devices (id, token_hash, created, last_sync, last_seq)"
            " VALUES ('dev-v6', 'hash-v6', 1, 6, 0)")
        conn.execute("INSERT INTO docs (key, gen) VALUES ('dev-v6/state', 0)")
        conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES ('dev-v6/state', 0, ?)",
            (V1_UPDATE,))
        conn.execute(
            "INSERT INTO stamps (doc, map, key, stamp, writer, raw)"
            " VALUES ('dev-v6/state', 'state', 'x', 123, 'device', 120)")
        conn.execute(
            "INSERT INTO requests (device, id, route, body, created, status, updated)"
            " VALUES ('dev-v6', 'r1', 'weather', '{}', 8, 'running', 8)")


def write_v7_fixture(path: Path = FIXTURES / "server_v7.db") -> None:
    """Write ``server_v7.db``: schemas v1 to v7 only, a device with one wake entry and a
    proxied request left ``running`` (by a process of its time: no runner recorded)."""
    with migrated_fixture(path, 7) as conn:
        conn.execute(
            "INSERT INTO devices (id, token_hash, created, last_sync, last_seq)"
            " VALUES ('dev-v7', 'hash-v7', 1, 7, 0)")
        conn.execute("INSERT INTO wakes (target, at) VALUES ('d:dev-v7', 7)")
        conn.execute(
            "INSERT INTO requests (device, id, route, body, created, status, updated)"
            " VALUES ('dev-v7', 'r1', 'weather', '{}', 8, 'running', 8)")


def write_v2_fixture(path: Path = FIXTURES / "server_v2.db") -> None:
    """Write ``server_v2.db``: schemas v1 and v2 only, one device with one event, one doc
    update, one delivered command and one pending request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    d, e, t = V2_DEVICE, V2_EVENT, V2_DEVICE.last_sync
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with transaction(conn):
            for statement in (*statements(MIGRATIONS[0]), *statements(MIGRATIONS[1])):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 2")
            conn.execute(
                "INSERT INTO devices (id, token_hash, created, last_sync, last_seq,"
                " events_lost, meta, down_seq, down_done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.id, d.token_hash, d.created, d.last_sync, d.last_seq, d.events_lost,
                 '{"site":"south"}', d.down_seq, d.down_done),
            )
            conn.execute(
                "INSERT INTO events (device, seq, topic, time, received, body, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (d.id, e.seq, e.topic, e.time, t, event_json(e), event_digest(e)),
            )
            conn.execute("INSERT INTO docs (key, gen) VALUES ('state', 0)")
            conn.execute(
                "INSERT INTO updates (key, gen, data) VALUES ('state', 0, ?)", (V1_UPDATE,))
            conn.execute(
                "INSERT INTO downlink (device, seq, kind, name, body, created, status, updated)"
                " VALUES (?, 1, 'command', 'reboot', '{\"delay\":5}', ?, 'delivered', ?)",
                (d.id, t, t),
            )
            conn.execute(
                "INSERT INTO requests (device, id, route, body, created, updated)"
                " VALUES (?, 'r1', 'weather', '{}', ?, ?)", (d.id, t, t),
            )
        conn.execute("VACUUM")


@pytest.fixture(scope="module", autouse=True)
def _regenerate_fixtures() -> None:
    if REGEN:
        write_v1_fixture()
        write_v2_fixture()
        write_v3_fixture()
        write_v4_fixture()
        write_v5_fixture()
        write_v6_fixture()
        write_v7_fixture()


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


async def test_a_purged_feed_survives_reopen_in_chunks(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor is stored, cursors keep climbing after the whole feed went, and a purge
    runs as several transactions of ``PURGE_CHUNK`` items."""
    monkeypatch.setattr(sqlite_feed, "PURGE_CHUNK", 2)
    path = tmp_path / "sync.db"
    async with SQLiteStore(path) as store:
        await store.add_device(DeviceRecord("dev-1", "h", created=1))
        await store.commit(SyncWrite("dev-1", time=5, events=[
            Event(seq, "t", 100, {"n": seq}) for seq in range(1, 6)]))
        assert await store.purge_feed(before=6, keep_after=5) == 5
    async with SQLiteStore(path) as store:
        assert (await store.feed_floor(), await store.feed_head()) == (5, 5)
        assert await store.read_feed() == []
        await store.commit(SyncWrite("dev-1", time=7, events=[Event(6, "t", 100, {})]))
        assert [i.cursor for i in await store.read_feed()] == [6]


async def test_fresh_database_gets_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    async with SQLiteStore(path):
        pass
    assert SCHEMA_VERSION >= 1
    assert _user_version(path) == SCHEMA_VERSION
    with closing(sqlite3.connect(path)) as conn:
        kinds = dict(conn.execute("SELECT name, type FROM sqlite_master"))
    assert {name for name, kind in kinds.items() if kind == "table"} >= {
        "docs", "updates", "devices", "feed", "projection", "settings", "downlink", "requests",
        "fleets", "sinks", "dead_letters"}
    assert kinds["events"] == "view"  # since v4 the events live in the feed, written once


# --- migrations from golden databases ----------------------------------------------------


def _dump(path: Path) -> tuple[int, list[str]]:
    with closing(sqlite3.connect(path)) as conn:
        return _user_version(path), list(conn.iterdump())


def test_v1_fixture_is_what_the_v1_script_makes(tmp_path: Path) -> None:
    # Content, not bytes: the file header records the SQLite version that wrote it.
    write_v1_fixture(tmp_path / "v1.db")
    assert _dump(FIXTURES / "server_v1.db") == _dump(tmp_path / "v1.db")


def test_v2_fixture_is_what_the_v2_scripts_make(tmp_path: Path) -> None:
    write_v2_fixture(tmp_path / "v2.db")
    assert _dump(FIXTURES / "server_v2.db") == _dump(tmp_path / "v2.db")


async def test_v1_database_migrates_to_current(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v1.db", path)
    assert _user_version(path) == 1
    async with SQLiteStore(path) as store:
        # down_seq = down_done = 0, fleet = None, fleet_gen = 0
        assert await store.get_device("dev-old") == V1_DEVICE
        assert [(e.cursor, e.device, e.seq, e.topic, e.time, e.received, e.body)
                for e in await store.read_events()] == [
            (1, "dev-old", 1, "temp", V1_EVENT.time, V1_DEVICE.last_sync, V1_EVENT.body)]
        assert (await store.load_doc("state")).updates == ((1, V1_UPDATE),)
        # v4 backfilled the feed with the stored event
        assert [(i.cursor, i.kind, i.device, i.seq, i.topic, i.body)
                for i in await store.read_feed()] == [
            (1, "event", "dev-old", 1, "temp", V1_EVENT.body)]

        # The old event's digest still tells a replay from a conflict.
        replay = await store.commit(SyncWrite(
            "dev-old", time=1_700_000_001_000, docs=[DocWrite("state", b"u2")],
            events=[V1_EVENT, Event(2, "temp", 1_700_000_000_900, {"c": 22})],
        ))
        assert (replay.stored, replay.last_seq, replay.update_ids) == (1, 2, (2,))
        assert [i.seq for i in await store.read_feed()] == [1, 2]  # the replay is not fed

        item = await store.queue_downlink("dev-old", "command", "reboot", {"delay": 5},
                                          now=1_700_000_002_000, expires=None)
        assert item.seq == 1
        sent = await store.pending_downlink("dev-old", now=1_700_000_002_001, limit=10)
        assert [(d.id, d.status) for d in sent] == [(item.id, "delivered")]
        done = await store.commit(SyncWrite(
            "dev-old", time=1_700_000_003_000, down_done=1,
            results=[CommandResult(1, True, {"up": True})],
            requests=[ProxyRequest("dev-old", "r1", "weather", {}, created=1)],
        ))
        assert (done.down_done, done.new_requests) == (1, ("r1",))
        stored = await store.get_downlink(item.id)
        assert stored is not None and (stored.status, stored.result) == ("succeeded", {"up": True})
        device = await store.get_device("dev-old")
        assert device is not None and (device.down_seq, device.down_done) == (1, 1)
        assert (device.meta, device.last_seq) == ({"site": "north"}, 2)

        await store.add_fleet(FleetRecord("north", created=1_700_000_004_000))
        moved = await store.set_device_fleet("dev-old", "north", now=1_700_000_004_001)
        assert (moved.fleet, moved.fleet_gen, moved.down_done) == ("north", 1, 1)
    assert _user_version(path) == 10 == SCHEMA_VERSION

    with closing(sqlite3.connect(path)) as conn:
        columns = {row[1]: row[4] for row in conn.execute("PRAGMA table_info(devices)")}
    assert (columns["down_seq"], columns["down_done"]) == ("0", "0")
    assert (columns["fleet"], columns["fleet_gen"]) == (None, "0")
    assert _user_version(FIXTURES / "server_v1.db") == 1  # the golden file was not touched


async def test_v2_database_migrates_to_current(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v2.db", path)
    assert _user_version(path) == 2
    async with SQLiteStore(path) as store:
        assert await store.get_device("dev-v2") == V2_DEVICE  # fleet = None, fleet_gen = 0
        assert await store.list_fleets() == []
        assert [(e.device, e.seq, e.body) for e in await store.read_events()] == [
            ("dev-v2", 1, V2_EVENT.body)]
        assert (await store.load_doc("state")).updates == ((1, V1_UPDATE),)
        command = await store.get_downlink(1)
        assert command is not None
        assert (command.seq, command.status, command.body) == (1, "delivered", {"delay": 5})

        await store.add_fleet(FleetRecord("south", created=1_710_000_001_000, meta={"n": 1}))
        moved = await store.set_device_fleet("dev-v2", "south", now=1_710_000_001_001)
        assert (moved.fleet, moved.fleet_gen, moved.down_seq) == ("south", 1, 1)
        assert [d.id for d in await store.devices_in_fleet("south")] == ["dev-v2"]

        # The v2 rows still work: the command's result lands, the request is claimed once.
        done = await store.commit(SyncWrite(
            "dev-v2", time=1_710_000_002_000, down_done=1,
            results=[CommandResult(1, True, {"up": True})],
            events=[V2_EVENT, Event(2, "hum", 1_710_000_001_500, {"rh": 41})],
        ))
        assert (done.down_done, done.stored, done.last_seq) == (1, 1, 2)
        command = await store.get_downlink(1)
        assert command is not None and command.status == "succeeded"
        claimed = await store.claim_request("dev-v2", "r1", now=1_710_000_002_001)
        assert claimed is not None and claimed.route == "weather"
        device = await store.get_device("dev-v2")
        assert device is not None and (device.fleet, device.down_done) == ("south", 1)
    assert _user_version(path) == 10 == SCHEMA_VERSION

    with closing(sqlite3.connect(path)) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "devices_fleet_id" in indexes
    assert _user_version(FIXTURES / "server_v2.db") == 2  # the golden file was not touched


def test_v3_fixture_is_what_the_v3_scripts_make(tmp_path: Path) -> None:
    write_v3_fixture(tmp_path / "v3.db")
    assert _dump(FIXTURES / "server_v3.db") == _dump(tmp_path / "v3.db")


async def test_v3_database_migrates_to_current(tmp_path: Path) -> None:
    """v4 adds the feed, backfilled with the stored events (with the device's fleet), and
    an empty projection (the server rebuilds it from the documents)."""
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v3.db", path)
    async with SQLiteStore(path) as store:
        assert [(i.cursor, i.kind, i.device, i.fleet, i.seq, i.time, i.received, i.body)
                for i in await store.read_feed()] == [
            (1, "event", "dev-v3", "west", 1, V1_EVENT.time, 5, V1_EVENT.body)]
        assert await store.read_projection() == []
        assert await store.feed_head() == 1
    assert _user_version(path) == SCHEMA_VERSION == 10
    assert _user_version(FIXTURES / "server_v3.db") == 3


def test_v4_fixture_is_what_the_v4_scripts_make(tmp_path: Path) -> None:
    write_v4_fixture(tmp_path / "v4.db")
    assert _dump(FIXTURES / "server_v4.db") == _dump(tmp_path / "v4.db")


async def test_v4_database_migrates_to_current(tmp_path: Path) -> None:
    """v5 indexes devices by token hash and adds ``disabled`` and ``seq_floor`` (both off);
    a migrated device can be found by its token, disabled, and deleted with what it owns."""
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v4.db", path)
    async with SQLiteStore(path) as store:
        device = await store.device_by_token("hash-v4")
        assert device is not None and (device.id, device.last_seq, device.down_seq) == (
            "dev-v4", 1, 1)
        assert (device.disabled, device.seq_floor) == (False, 0)
        assert await store.device_by_token("hash-nobody") is None
        disabled = await store.update_device("dev-v4", disabled=True)
        assert disabled == dataclasses.replace(device, disabled=True)

        await store.delete_device("dev-v4", ["dev-v4/state"])
        assert await store.get_device("dev-v4") is None
        assert (await store.load_doc("dev-v4/state")).updates == ()
        assert await store.read_projection() == []
        assert await store.list_downlink("dev-v4") == []
        assert await store.get_request("dev-v4", "r1") is None
        assert [(i.kind, i.device) for i in await store.read_feed()] == [
            ("event", "dev-v4"), ("state", "dev-v4")]  # the feed keeps its history
        assert await store.get_device("other") is not None

        await store.add_device(DeviceRecord("dev-v4", "new-hash", created=9))
        again = await store.get_device("dev-v4")
        assert again is not None and (again.seq_floor, again.last_seq) == (1, 1)
    assert _user_version(path) == SCHEMA_VERSION == 10
    with closing(sqlite3.connect(path)) as conn:
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM devices WHERE token_hash = 'x'"))
    assert "devices_token_hash" in plan  # found through the index, not a scan
    assert _user_version(FIXTURES / "server_v4.db") == 4


def test_v5_fixture_is_what_the_v5_scripts_make(tmp_path: Path) -> None:
    write_v5_fixture(tmp_path / "v5.db")
    assert _dump(FIXTURES / "server_v5.db") == _dump(tmp_path / "v5.db")


async def test_v5_database_migrates_to_current(tmp_path: Path) -> None:
    """v6 adds the per-key stamps, empty: a document written before has no stamp rows (its
    keys count as never stamped); rows are then written with commits, keyed by document,
    and deleted with the device; everything v5 held is untouched."""
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v5.db", path)
    async with SQLiteStore(path) as store:
        assert await store.read_stamps("dev-v5/state") == []
        assert (await store.load_doc("dev-v5/state")).updates == ((1, V1_UPDATE),)
        assert [(r.key, r.value) for r in await store.read_projection()] == [
            ("x", 1), ("y", "hi")]
        row = KeyStamp("dev-v5/state", "state", "x", 2**64 - 1, "device", 2**63)
        done = await store.commit(SyncWrite("dev-v5", 7, docs=[DocWrite("dev-v5/state",
                                                                         b"u2")],
                                            stamps=[row]))
        assert done.update_ids == (2,)
        assert await store.read_stamps("dev-v5/state") == [row]
        await store.delete_device("dev-v5", ["dev-v5/state"])
        assert await store.read_stamps("dev-v5/state") == []
        await store.add_device(DeviceRecord("gone", "h", created=9))
        again = await store.get_device("gone")
        assert again is not None and again.seq_floor == 3
    assert _user_version(path) == SCHEMA_VERSION == 10
    with closing(sqlite3.connect(path)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(stamps)")]
    assert columns == ["doc", "map", "key", "stamp", "writer", "raw", "upto"]
    assert _user_version(FIXTURES / "server_v5.db") == 5


def test_v6_fixture_is_what_the_v6_scripts_make(tmp_path: Path) -> None:
    write_v6_fixture(tmp_path / "v6.db")
    assert _dump(FIXTURES / "server_v6.db") == _dump(tmp_path / "v6.db")


async def test_v6_database_migrates_to_current(tmp_path: Path) -> None:
    """v7 adds the wake log, empty, with its head at 0: a device that reconnects with no
    cursor starts from there; the running request interrupted at start wakes its device;
    everything v6 held is untouched."""
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v6.db", path)
    async with SQLiteStore(path) as store:
        assert await store.wake_head() == 0
        assert await store.wake_pending(["d:dev-v6"], 0) is False
        assert await store.interrupt_running({"error": "restart"}, 9) == 1
        assert await store.read_wakes(0, 10) == [WakeEntry(1, "d:dev-v6", 9)]
        assert [r.key for r in await store.read_stamps("dev-v6/state")] == ["x"]
        assert (await store.load_doc("dev-v6/state")).updates == ((1, V1_UPDATE),)
        # v10: the v6 row (upto 0) gives way to a stamp logged with a later update, and
        # stays what it was until then.
        newer = KeyStamp("dev-v6/state", "state", "x", 124, "cloud", 0)
        await store.commit(SyncWrite(None, 10, docs=[DocWrite("dev-v6/state", b"u2")],
                                     stamps=[newer]))
        assert await store.read_stamps("dev-v6/state") == [newer]
    assert _user_version(path) == SCHEMA_VERSION == 10
    with closing(sqlite3.connect(path)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(wakes)")]
        plan = " ".join(str(row) for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM wakes WHERE target IN ('a', 'b') AND cursor > 5"))
    assert columns == ["cursor", "target", "at"]
    assert "wakes_target_cursor" in plan  # a pending check reads the index, not the log
    assert _user_version(FIXTURES / "server_v6.db") == 6


def test_v7_fixture_is_what_the_v7_scripts_make(tmp_path: Path) -> None:
    write_v7_fixture(tmp_path / "v7.db")
    assert _dump(FIXTURES / "server_v7.db") == _dump(tmp_path / "v7.db")


async def test_v7_database_migrates_to_current(tmp_path: Path) -> None:
    """v8 adds the instances and each running request's runner: a request v7 left running
    has none, so it counts as a gone instance's and is interrupted at once, even by a
    store that heartbeats; the wake log keeps its head."""
    path = tmp_path / "sync.db"
    shutil.copyfile(FIXTURES / "server_v7.db", path)
    async with SQLiteStore(path, instance="new") as store:
        await store.heartbeat(9)
        assert await store.wake_head() == 1
        assert await store.interrupt_running({"error": "restart"}, 9, stale_ms=60_000) == 1
        request = await store.get_request("dev-v7", "r1")
        assert request is not None and request.status == "done"
        assert await store.read_wakes(1, 10) == [WakeEntry(2, "d:dev-v7", 9)]
    assert _user_version(path) == SCHEMA_VERSION == 10
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0  # it left
        columns = [row[1] for row in conn.execute("PRAGMA table_info(requests)")]
    assert columns[-1] == "runner"
    assert _user_version(FIXTURES / "server_v7.db") == 7


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
        "journal_size_limit": 64 * 1024 * 1024,  # above a checkpoint's log: never regrown
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
    for bad in ["", "sqlite:///", "sqlite://host/x.db", "mysql://u@h/db", "memory://"]:
        with pytest.raises(ValueError, match="unsupported store URL"):
            open_store(bad)


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 40])
def test_insert_values_is_executemany_in_fewer_statements(count: int) -> None:
    """Multi-row inserts store what one-row ``executemany`` stores, in order, an upsert
    of a key repeated within one statement included; at most 16 rows per statement."""
    rows = [(f"k{i % 7}", i) for i in range(count)]
    results = []
    for many in (True, False):
        with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT UNIQUE,"
                         " v INTEGER, n INTEGER DEFAULT 0)")
            conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, v INTEGER)")
            upsert = " ON CONFLICT (k) DO UPDATE SET v = excluded.v, n = n + 1"
            traced: list[str] = []
            conn.set_trace_callback(traced.append)
            if many:
                conn.executemany(f"INSERT INTO t (k, v) VALUES (?, ?){upsert}", rows)
                conn.executemany("INSERT INTO log (v) VALUES (?)", [(v,) for _, v in rows])
            else:
                insert_values(conn, "INSERT INTO t (k, v)", rows, upsert)
                insert_values(conn, "INSERT INTO log (v)", [(v,) for _, v in rows])
                assert len(traced) == 2 * -(-count // 16)
            results.append((conn.execute("SELECT * FROM t ORDER BY id").fetchall(),
                            conn.execute("SELECT * FROM log ORDER BY id").fetchall()))
    assert results[0] == results[1]
    assert [v for _, v in results[1][1]] == [v for _, v in rows]


async def test_concurrent_commits_share_transactions_and_fail_alone(tmp_path: Path) -> None:
    """Group commit: 40 devices committing at once take fewer transactions than writes; a
    write refused in the middle of a group (a seq gap) fails alone, the rest are stored."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        for i in range(40):
            await store.add_device(DeviceRecord(f"d{i}", "h", created=1))
        writes = [SyncWrite(f"d{i}", 10, docs=[DocWrite(f"d{i}/state", V1_UPDATE)],
                            events=[Event(5 if i == 17 else 1, "t", 1, {"i": i})])
                  for i in range(40)]
        outcomes = await asyncio.gather(*(store.commit(w) for w in writes),
                                        return_exceptions=True)
        assert store.group_commit.groups < store.group_commit.writes == 40
        refused = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        assert refused == [17]
        assert type(outcomes[17]).__name__ == "SeqGap"
        stored = await store.read_events(limit=100)
        assert sorted(e.device for e in stored) == sorted(f"d{i}" for i in range(40) if i != 17)
        assert (await store.load_doc("d17/state")).updates == ()
        assert len((await store.load_doc("d3/state")).updates) == 1
        assert (await store.get_device("d17")).last_seq == 0  # type: ignore[union-attr]


async def test_a_rebuild_rides_the_group_commit_of_concurrent_syncs(tmp_path: Path) -> None:
    """A rebuild submitted while syncs are committing shares their transaction: fewer
    transactions than writes. Its compare-and-set holds inside the group: the rebuild of a
    document still at its generation and id lands (a new snapshot id, the log emptied), a
    second one of the same old generation in the same group is refused (``None``), and a
    rebuild refused does not refuse the syncs beside it."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        for i in range(20):
            await store.add_device(DeviceRecord(f"d{i}", "h", created=1))
        first = await store.commit(SyncWrite("d0", 10, docs=[DocWrite("d0/state", V1_UPDATE)]))
        upto = first.update_ids[0]
        groups, writes = store.group_commit.groups, store.group_commit.writes
        commits: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(
            lambda sql: commits.append(sql) if sql.startswith("COMMIT") else None))
        syncs = [store.commit(SyncWrite(f"d{i}", 10, events=[Event(1, "t", 1, {"i": i})]))
                 for i in range(1, 20)]
        rebuilds = [store.rebuild("d0/state", 0, upto, V1_UPDATE),
                    store.rebuild("d0/state", 0, upto, b"\x00\x00")]
        outcomes = await asyncio.gather(*syncs[:10], *rebuilds, *syncs[10:])
        await store._run(lambda conn: conn.set_trace_callback(None))
        assert store.group_commit.writes - writes == len(outcomes) == 21
        assert len(commits) == store.group_commit.groups - groups < len(outcomes)
        snapshot_id, refused = outcomes[10:12]
        assert isinstance(snapshot_id, int) and snapshot_id > upto and refused is None
        assert all(isinstance(o, CommitResult) and o.last_seq == 1
                   for o in outcomes[:10] + outcomes[12:])
        stored = await store.load_doc("d0/state")
        assert (stored.gen, stored.snapshot, stored.snapshot_id, stored.updates) == (
            1, V1_UPDATE, snapshot_id, ())
        assert len(await store.read_events(limit=100)) == 19


async def test_failed_group_transaction_fails_every_write(tmp_path: Path) -> None:
    """When the transaction itself fails, every caller of the group gets the error and
    nothing of the group is stored."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        for i in range(5):
            await store.add_device(DeviceRecord(f"d{i}", "h", created=1))
        await store._run(lambda conn: conn.execute("PRAGMA busy_timeout = 50"))
        blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=0)
        with closing(blocker):
            blocker.execute("BEGIN EXCLUSIVE")  # holds the write lock past busy_timeout
            writes = [SyncWrite(f"d{i}", 10, events=[Event(1, "t", 1, {})]) for i in range(5)]
            outcomes = await asyncio.gather(*(store.commit(w) for w in writes),
                                            return_exceptions=True)
            blocker.execute("ROLLBACK")
        assert all(isinstance(o, StoreError) for o in outcomes), outcomes
        assert await store.read_events() == []
        # and the store keeps working afterwards
        await store.commit(SyncWrite("d0", 11, events=[Event(1, "t", 1, {})]))
        assert len(await store.read_events()) == 1


# --- generations: two processes on one file -----------------------------------------------


async def test_a_rebuild_and_another_process_on_the_same_file(tmp_path: Path) -> None:
    """Two stores on one file stand for two server processes. A rebuild compared against
    what one process read loses to the other's append (nothing lost); once it happens, the
    other process's copy reloads (``read_since`` answers None) and its writes of the old
    generation are refused."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as one, SQLiteStore(path) as two:
        first = (await one.commit(SyncWrite(None, 1, docs=[DocWrite("k", b"u1")]))).update_ids
        read = await one.load_doc("k")
        held = await two.load_doc("k")
        late = (await two.commit(SyncWrite(None, 2, docs=[DocWrite("k", b"u2")]))).update_ids
        assert not await one.rebuild("k", read.gen, read.last_id, b"fresh")
        assert (await two.load_doc("k")).updates == ((first[0], b"u1"), (late[0], b"u2"))

        assert await one.rebuild("k", 0, late[0], b"fresh")
        assert await two.read_since("k", held.last_id) is None
        assert await two.read_since("k", late[0]) is None
        with pytest.raises(Unavailable):
            await two.commit(SyncWrite(None, 3, docs=[DocWrite("k", b"u3", held.gen)]))
        log = await two.load_doc("k")
        assert (log.gen, log.snapshot, log.updates) == (1, b"fresh", ())


async def test_a_failure_inside_a_rebuild_leaves_the_old_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuild is one transaction: an I/O error after it deleted the rows rolls it all
    back, and the next attempt succeeds."""
    real = sqlite_documents.replace_doc

    def fail_after(conn: sqlite3.Connection, *args: Any) -> None:
        real(conn, *args)
        raise sqlite3.OperationalError("disk I/O error (injected)")

    async with SQLiteStore(tmp_path / "s.db") as store:
        ids = (await store.commit(SyncWrite(None, 1, docs=[DocWrite("k", b"u1"),
                                                           DocWrite("k", b"u2")]))).update_ids
        before = await store.load_doc("k")
        monkeypatch.setattr(sqlite_documents, "replace_doc", fail_after)
        with pytest.raises(StoreError):
            await store.rebuild("k", 0, ids[1], b"fresh")
        assert await store.load_doc("k") == before
        assert await store.read_since("k", ids[1]) == ()
        monkeypatch.setattr(sqlite_documents, "replace_doc", real)
        assert await store.rebuild("k", 0, ids[1], b"fresh")
        assert (await store.load_doc("k")).gen == 1


# --- group commits on the event loop's thread ---------------------------------------------


def _threads_of_commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each write of a group commit runs in, from now on."""
    from crdtsync_server.store.sqlite import store as sqlite_store

    names: list[str] = []
    real = sqlite_store._commit

    def recorded(conn: sqlite3.Connection, write: SyncWrite, *rest: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(conn, write, *rest)

    monkeypatch.setattr(sqlite_store, "_commit", recorded)
    return names


def _event_write(device: str, seq: int) -> SyncWrite:
    return SyncWrite(device, 10, docs=[DocWrite(f"{device}/state", V1_UPDATE)] if seq == 1
                     else [], events=[Event(seq, "t", seq, {"n": seq, "pad": "x" * 400})])


async def test_a_group_commits_on_the_loop_when_the_store_thread_is_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle store thread: the group runs in the event loop's thread. A busy one: the
    group waits in its queue behind the call already there (calls keep their order)."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        names = _threads_of_commits(monkeypatch)
        await store.commit(_event_write("d", 1))
        assert names == [threading.current_thread().name]

        release = threading.Event()
        blocking = asyncio.ensure_future(store._run(lambda conn: release.wait(10)))
        await asyncio.sleep(0.01)
        commit = asyncio.ensure_future(store.commit(_event_write("d", 2)))
        await asyncio.sleep(0.05)
        assert not commit.done() and names == [threading.current_thread().name]
        release.set()
        await blocking
        assert (await commit).last_seq == 2
        assert names[1] == "crdtsync-store"
        assert [e.seq for e in await store.read_events()] == [1, 2]


async def test_a_large_group_is_written_in_the_store_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group over ``HERE_MAX_ROWS`` rows would hold the event loop: the thread writes it."""
    from crdtsync_server.store.sqlite import store as sqlite_store

    monkeypatch.setattr(sqlite_store, "HERE_MAX_ROWS", 5)
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        names = _threads_of_commits(monkeypatch)
        small = await store.commit(_event_write("d", 1))
        large = await store.commit(SyncWrite("d", 10, events=[
            Event(seq, "t", seq, {"n": seq}) for seq in range(2, 12)]))
        assert (small.stored, large.stored, large.last_seq) == (1, 10, 11)
        assert names == [threading.current_thread().name, "crdtsync-store"]


async def test_a_locked_file_sends_the_group_to_the_thread_without_blocking_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection holds the write lock: the loop does not wait for it (busy timeout
    0 there); the group goes to the store thread, which waits, and commits once the lock is
    free. The pragmas come back as they were, a busy timeout set by hand included."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        await store._run(lambda conn: conn.execute("PRAGMA busy_timeout = 3000"))
        names = _threads_of_commits(monkeypatch)
        with closing(sqlite3.connect(path, isolation_level=None, timeout=0)) as blocker:
            blocker.execute("BEGIN IMMEDIATE")
            commit = asyncio.ensure_future(store.commit(_event_write("d", 1)))
            ticks = 0
            while ticks < 5:  # the loop keeps running while the group waits for the lock
                await asyncio.sleep(0.01)
                ticks += 1
            assert not commit.done()
            blocker.execute("COMMIT")
        assert (await commit).stored == 1
        assert names == ["crdtsync-store"]
        pragmas = await store.pragmas()
        assert (pragmas["synchronous"], pragmas["busy_timeout"]) == (2, 3000)
        assert await store._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 1000


async def test_pragmas_stay_as_configured_after_commits_on_the_loop(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db", synchronous="EXTRA") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        for seq in range(1, 4):
            await store.commit(_event_write("d", seq))
        pragmas = await store.pragmas()
        assert (pragmas["synchronous"], pragmas["busy_timeout"]) == (3, 5000)
        assert await store._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 1000


async def test_commits_on_the_loop_set_the_pragmas_once_and_the_thread_restores_them(
        tmp_path: Path) -> None:
    """The first group on the loop reads and changes the pragmas; the next groups find them
    changed and run no ``PRAGMA`` at all; a call in the store's thread finds them as
    configured again, and a group on the loop after it changes them again."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        traced: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(traced.append))

        def pragmas() -> list[str]:
            found = [s for s in traced if s.startswith("PRAGMA") and "data_version" not in s]
            traced.clear()
            return found

        await store.commit(_event_write("d", 1))
        assert pragmas() == [
            "PRAGMA busy_timeout", "PRAGMA wal_autocheckpoint", "PRAGMA synchronous",
            "PRAGMA synchronous = NORMAL", "PRAGMA wal_autocheckpoint = 0",
            "PRAGMA busy_timeout = 0"]
        for seq in range(2, 5):
            await store.commit(_event_write("d", seq))
        assert pragmas() == []
        assert await store._run(lambda conn: [
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("synchronous", "busy_timeout", "wal_autocheckpoint")]) == [2, 5000,
                                                                                   1000]
        assert pragmas()[:3] == ["PRAGMA busy_timeout = 5000",
                                 "PRAGMA wal_autocheckpoint = 1000", "PRAGMA synchronous = 2"]
        await store.commit(_event_write("d", 5))
        assert pragmas()[-3:] == ["PRAGMA synchronous = NORMAL",
                                  "PRAGMA wal_autocheckpoint = 0", "PRAGMA busy_timeout = 0"]
        assert (await store.pragmas())["synchronous"] == 2


@pytest.mark.parametrize(("mode", "synced"), [("FULL", True), ("EXTRA", True),
                                              ("NORMAL", False), ("OFF", False)])
async def test_a_commit_on_the_loop_returns_after_its_log_is_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, synced: bool) -> None:
    """``FULL`` (and ``EXTRA``): the write-ahead log is synced, in the log's own thread,
    before the commit returns; ``NORMAL`` and ``OFF`` promise no such thing and pay none."""
    from crdtsync import _sqlite_worker

    steps: list[str] = []

    def fdatasync(fd: int) -> None:
        steps.append(f"sync {os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))} in "
                     f"{threading.current_thread().name}")

    monkeypatch.setattr(_sqlite_worker, "_fdatasync", fdatasync)
    monkeypatch.setattr(_sqlite_worker._LogSync, "NATIVE", False)  # the Python thread's syncs
    async with SQLiteStore(tmp_path / "s.db", synchronous=mode) as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        for seq in (1, 2):
            await store.commit(_event_write("d", seq))
            steps.append("returned")
    synced_step = "sync s.db-wal in crdtsync-sqlite-log"
    assert steps == ([synced_step, "returned"] * 2 if synced else ["returned"] * 2)


async def test_a_failed_log_sync_fails_the_group_and_its_retry_stores_nothing_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transaction committed but its log could not be synced: every write of the group
    gets a typed ``StoreError`` (not acknowledged); the device's retry is a replay and
    stores nothing twice, and the store keeps serving."""
    from crdtsync import _sqlite_worker

    failures: list[OSError] = []

    def fdatasync(fd: int) -> None:
        if failures:
            raise failures.pop()

    monkeypatch.setattr(_sqlite_worker, "_fdatasync", fdatasync)
    monkeypatch.setattr(_sqlite_worker._LogSync, "NATIVE", False)  # the Python thread's syncs
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        for seq in (1, 3):  # the device's row read from the file, then kept as written
            failures.append(OSError(5, "Input/output error (injected)"))
            with pytest.raises(StoreError, match="cannot sync the write-ahead log"):
                await store.commit(_event_write("d", seq))
            retried = await store.commit(_event_write("d", seq))
            assert (retried.last_seq, retried.stored) == (seq, 0)
            assert await store.commit(_event_write("d", seq + 1))
        assert [e.seq for e in await store.read_events()] == [1, 2, 3, 4]
        assert len((await store.load_doc("d/state")).updates) == 2  # the update, replayed


@pytest.mark.parametrize("every", [0.0, 3600.0])
async def test_commits_on_the_loop_are_checkpointed_by_the_log_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: float) -> None:
    """The commits on the loop run no automatic checkpoint; the log's thread checkpoints
    at most every ``CHECKPOINT_SECONDS``: with 0, the database file takes the rows at once;
    with an hour, they stay in the log."""
    from crdtsync import _sqlite_worker

    monkeypatch.setattr(_sqlite_worker, "CHECKPOINT_SECONDS", every)
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        await store._run(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        before = path.stat().st_size
        for seq in range(1, 200):
            await store.commit(_event_write("d", seq))
        grown = path.stat().st_size - before
        assert (grown > 50_000) if every == 0 else (grown == 0), grown
        assert len(await store.read_events(limit=500)) == 199


async def test_a_commit_takes_its_device_row_from_memory_only_while_the_store_is_alone(
        tmp_path: Path) -> None:
    """Alone on its file, a store's commit on the loop uses the device row it kept (no read
    of the row); once another store wrote the row, the commit reads it: the second store's
    events 2-5 make seq 6 the next one, not a gap."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as one:
        await one.add_device(DeviceRecord("d", hash_token("t"), created=1))
        for _ in range(2):  # the first lookup finds out the store is alone, the second keeps
            assert await one.device_by_token(hash_token("t")) is not None
        traced: list[str] = []
        await one._run(lambda conn: conn.set_trace_callback(traced.append))
        assert (await one.commit(_event_write("d", 1))).last_seq == 1
        assert not [s for s in traced if "FROM devices WHERE id" in s]
        async with SQLiteStore(path) as two:
            for seq in range(2, 6):
                await two.commit(_event_write("d", seq))
            traced.clear()
            assert (await one.commit(_event_write("d", 6))).last_seq == 6
            assert [s for s in traced if "FROM devices WHERE id" in s]
        assert [e.seq for e in await one.read_events()] == [1, 2, 3, 4, 5, 6]
        assert (await one.get_device("d")).last_seq == 6  # type: ignore[union-attr]


async def test_a_commit_takes_its_documents_last_id_from_the_writer_only_while_alone(
        tmp_path: Path) -> None:
    """Alone, a document write that says which update id its copy reflects is appended
    without reading the document's generation and highest id, and that id is its
    ``prev_ids``; once another store appended, the hint is ignored and the stored highest id
    answered (the writer's copy must catch up)."""
    path = tmp_path / "s.db"
    check = "LEFT JOIN docs"
    async with SQLiteStore(path) as one:
        await one.add_device(DeviceRecord("d", hash_token("t"), created=1))
        for _ in range(2):
            await one.device_by_token(hash_token("t"))
        traced: list[str] = []
        await one._run(lambda conn: conn.set_trace_callback(traced.append))
        first = await one.commit(SyncWrite("d", 10, docs=[DocWrite("d/state", V1_UPDATE)]))
        assert [s for s in traced if check in s]  # never stored: read (and its row made)
        traced.clear()
        second = await one.commit(SyncWrite("d", 11, docs=[
            DocWrite("d/state", b"u2", 0, last_id=first.update_ids[0])]))
        assert not [s for s in traced if check in s]
        assert second.prev_ids == first.update_ids
        async with SQLiteStore(path) as two:
            other = await two.commit(SyncWrite(None, 12, docs=[DocWrite("d/state", b"u3")]))
            traced.clear()
            third = await one.commit(SyncWrite("d", 13, docs=[
                DocWrite("d/state", b"u4", 0, last_id=second.update_ids[0])]))
            assert [s for s in traced if check in s]
            assert third.prev_ids == other.update_ids  # not the stale hint


async def test_a_failing_writers_check_fails_the_group_and_leaves_no_transaction_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writers' check runs inside the group's transaction: when it fails, the group
    fails with nothing stored, and the next commit begins a transaction of its own."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))

        def broken() -> bool:
            raise OSError(5, "Input/output error (injected)")

        with monkeypatch.context() as patch:
            patch.setattr(store.writers, "alone", broken)
            with pytest.raises(OSError):
                await store.commit(_event_write("d", 1))
        assert await store.read_events() == []
        assert (await store.commit(_event_write("d", 1))).last_seq == 1
        assert [e.seq for e in await store.read_events()] == [1]


async def test_reading_stamps_sees_one_snapshot_while_another_process_compacts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v10 keeps a stamp in its update row until compaction moves it into ``stamps``, so
    reading a document's stamps takes two queries (the table, then the logged ones). Another
    process compacting between the two (injected here, on a connection of its own, right
    before the second query) must not make a stamp vanish: both queries read one snapshot."""
    path = tmp_path / "s.db"
    row = KeyStamp("d/state", "state", "k", 7, "device", 3)
    original = sqlite_documents._logged
    compacted: list[int] = []

    def compact_first(conn: sqlite3.Connection, doc: str, upto_id: int | None) -> Any:
        if not compacted:  # once (the compaction's own fold comes through here too)
            compacted.append(done.update_ids[0])
            with closing(sqlite3.connect(path, isolation_level=None)) as other:
                sqlite_documents._compact(other, doc, done.update_ids[0], b"snap")
        return original(conn, doc, upto_id)

    async with SQLiteStore(path) as store:
        done = await store.commit(SyncWrite(None, 10, docs=[DocWrite("d/state", b"u1")],
                                            stamps=[row]))
        monkeypatch.setattr(sqlite_documents, "_logged", compact_first)
        assert await store.read_stamps("d/state") == [row]
        assert compacted  # the compaction did run between the two queries
        assert (await store.load_doc("d/state")).snapshot_id == done.update_ids[0]
        assert await store.read_stamps("d/state") == [row]  # now from the table
