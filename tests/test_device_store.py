"""The device's SQLite store: outbox bound and policies, renumbering, dirty keys, schema and
migrations from golden databases, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import msgpack
import pytest

from crdtsync import AdminClient, Device, OutboxFull, OutboxLimits, StoreError
from crdtsync._device_store import MIGRATIONS, SCHEMA_VERSION, DeviceStore, DirtyWrite
from crdtsync._sqlite_worker import statements, transaction, user_version
from crdtsync.errors import InvalidValue
from crdtsync_server import Server

from .conftest import DeviceFactory


async def test_events_and_meta_survive_reopen(tmp_path: Path) -> None:
    async with DeviceStore(tmp_path / "d.db") as store:
        assert await store.push_event("t", 1, b"\x01", OutboxLimits()) == 1
        assert await store.push_event("t", 2, b"\x02", OutboxLimits()) == 2
        await store.set_meta(client_id=7, server_sv=b"\x00")
        store.append_update("state", b"update")
    async with DeviceStore(tmp_path / "d.db") as store:
        assert store.outbox_count == 2 and store.outbox_bytes == 2
        assert store.meta["client_id"] == 7 and store.meta["server_sv"] == b"\x00"
        assert [e.seq for e in await store.pending(10, 1 << 20)] == [1, 2]
        assert (await store.load_doc("state")).updates[0][1] == b"update"
        assert await store.push_event("t", 3, b"\x03", OutboxLimits()) == 3


async def test_seqs_continue_across_reopen_after_acks_and_drops(tmp_path: Path) -> None:
    """An emit stores only its row; the next seq comes back from the outbox at open, and
    from the meta row once acknowledgements or drops emptied the outbox."""
    path = tmp_path / "d.db"
    async with DeviceStore(path) as store:
        for n in range(3):
            await store.push_event("t", n, b"x", OutboxLimits())
    with sqlite3.connect(path) as db:  # the emits wrote no meta row
        assert db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone() is None
    async with DeviceStore(path) as store:
        assert await store.push_event("t", 3, b"x", OutboxLimits()) == 4
        assert await store.ack(4) == 4 and store.outbox_count == 0
    async with DeviceStore(path) as store:
        assert await store.push_event("t", 4, b"x", OutboxLimits()) == 5
        limits = OutboxLimits(max_events=1, policy="drop_oldest")
        assert await store.push_event("t", 5, b"x", limits) == 6  # drops 5
        assert await store.ack(6) == 1
    async with DeviceStore(path) as store:
        assert await store.push_event("t", 6, b"x", OutboxLimits()) == 7


async def test_reject_policy_raises_and_queues_nothing(tmp_path: Path) -> None:
    limits = OutboxLimits(max_events=2, policy="reject")
    async with DeviceStore(tmp_path / "d.db") as store:
        await store.push_event("t", 1, b"a", limits)
        await store.push_event("t", 2, b"b", limits)
        with pytest.raises(OutboxFull):
            await store.push_event("t", 3, b"c", limits)
        assert store.outbox_count == 2
        assert [e.body for e in await store.pending(10, 1 << 20)] == [b"a", b"b"]
        assert await store.push_event("t", 3, b"c", OutboxLimits()) == 3  # seq not burnt


async def test_drop_oldest_by_bytes_records_the_purged_seq(tmp_path: Path) -> None:
    limits = OutboxLimits(max_bytes=10, policy="drop_oldest")
    async with DeviceStore(tmp_path / "d.db") as store:
        for n in range(4):
            await store.push_event("t", n, bytes(4), limits)  # 4 bytes each
        assert store.outbox_bytes <= 10
        assert [e.seq for e in await store.pending(10, 1 << 20)] == [3, 4]
        assert store.meta["purged"] == 2


async def test_ack_and_renumber(tmp_path: Path) -> None:
    async with DeviceStore(tmp_path / "d.db") as store:
        for n in range(5):
            await store.push_event("t", n, bytes([n]), OutboxLimits())
        assert await store.ack(2) == 2
        assert store.meta["purged"] == 2 and store.outbox_count == 3
        await store.renumber(4, 100)
        assert [(e.seq, e.body) for e in await store.pending(10, 1 << 20)] == [
            (3, b"\x02"), (100, b"\x03"), (101, b"\x04")]
        assert await store.push_event("t", 9, b"x", OutboxLimits()) == 102


async def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        await DeviceStore(path).open()
    assert path.read_bytes() == before


async def test_emits_and_state_writes_racing_the_sync_loop(make_device: DeviceFactory,
                                                           admin: AdminClient) -> None:
    """Regression: transactions of the sync loop and of emit() once interleaved on one
    connection ("cannot start a transaction within a transaction", then a stuck next_seq)."""
    dev = await make_device("d1", interval=0.01, min_spacing=0.0)
    for i in range(300):
        dev.state["n"] = i
        assert await dev.emit("t", {"i": i}) == i + 1
        if i % 7 == 0:
            await asyncio.sleep(0)
    for _ in range(500):
        if dev.pending_events == 0 and dev.last_error is None:
            break
        await asyncio.sleep(0.02)
    await dev.sync()
    events = [e async for e in admin.iter_events(device="d1")]
    assert [e["body"]["i"] for e in events] == list(range(300))
    assert (await admin.state("d1"))["state"] == {"n": 299}


async def test_push_events_is_all_or_none(tmp_path: Path) -> None:
    limits = OutboxLimits(max_events=3, policy="reject")
    async with DeviceStore(tmp_path / "d.db") as store:
        assert await store.push_events([("t", 1, b"a", None), ("t", 2, b"b", None)],
                                       limits) == [1, 2]
        with pytest.raises(OutboxFull):
            await store.push_events([("t", 3, b"c", None), ("t", 4, b"d", None)], limits)
        assert store.outbox_count == 2 and store.outbox_bytes == 2
        assert await store.push_events([("t", 3, b"c", None)], limits) == [3]
    async with DeviceStore(tmp_path / "d.db") as store:
        assert [e.body for e in await store.pending(10, 1 << 20)] == [b"a", b"b", b"c"]


async def test_emit_many_queues_a_batch_durably_in_order(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")
    assert await dev.emit("t", {"n": 0}) == 1
    seqs = await dev.emit_many([("t", {"n": n}) for n in range(1, 101)])
    assert seqs == list(range(2, 102)) and dev.pending_events == 101
    with pytest.raises(InvalidValue):  # one bad body: nothing of the batch is queued
        await dev.emit_many([("t", {"n": 101}), ("t", {"n": 2**64})])
    assert dev.pending_events == 101
    report = await dev.sync()
    assert report.events_acked == 101
    stored = [e["body"]["n"] async for e in admin.iter_events(device="d1")]
    assert stored == list(range(101))


# --- schema migrations from golden device databases -----------------------------------
#
# ``tests/data/schema/device_v3.db`` is a device database of schema v3 (the last one before
# dirty keys), written by :func:`write_device_v3_fixture` with ``MIGRATIONS[:3]`` alone (never
# edited), so regenerating it with ``CRDTSYNC_REGEN_FIXTURES=1`` yields the same content.
# Never regenerate it to make a failing migration test pass: it stands for databases
# already in the field.

FIXTURES = Path(__file__).parent / "data" / "schema"
# Frozen Yjs v1 updates made with pycrdt 0.14.13, client id 7: the snapshot holds
# state["x"] = 1, state["y"] = "hi"; the logged update after it state["z"] = True.
V3_SNAPSHOT = bytes.fromhex(
    "0102070028010573746174650178017c3f80000028010573746174650179017702686900")
V3_UPDATE = bytes.fromhex("010107022801057374617465017a017800")
V3_SERVER_SV = bytes.fromhex("010702")  # the cloud holds x and y, not z
V3_EVENT = ("temp", 1_700_000_000_000, msgpack.packb({"c": 21.5}))


def write_device_v3_fixture(path: Path = FIXTURES / "device_v3.db") -> None:
    """Write ``device_v3.db``: schemas v1 to v3 only; a state document (snapshot and one
    logged update not yet sent), its diff base, one queued event, one command result and
    one pending proxied request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with transaction(conn):
            for script in MIGRATIONS[:3]:
                for statement in statements(script):
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 3")
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [("client_id", 7), ("server_sv", V3_SERVER_SV),
                              ("down_done", 1)])
            conn.execute("INSERT INTO snapshots (doc, data, upto) VALUES ('state', ?, 1)",
                         (V3_SNAPSHOT,))
            conn.execute("INSERT INTO updates (id, doc, data) VALUES (2, 'state', ?)",
                         (V3_UPDATE,))
            conn.execute("INSERT INTO outbox (seq, topic, time, body) VALUES (1, ?, ?, ?)",
                         V3_EVENT)
            conn.execute("INSERT INTO results (seq, ok, body) VALUES (1, 1, ?)",
                         (msgpack.packb({"up": True}),))
            conn.execute("INSERT INTO calls (id, route, body, created) VALUES "
                         "('r1', 'weather', ?, 5)", (msgpack.packb({}),))
        conn.execute("VACUUM")


# ``device_v4.db``: schema v4 (dirty keys without stamps), written by
# :func:`write_device_v4_fixture` with ``MIGRATIONS[:4]``. Frozen Yjs v1 updates (pycrdt
# 0.14.13, client id 7): the snapshot holds state x = 1, y = "hi", gone = "soon" (the cloud's
# copy, V4_SERVER_SV); update 2 sets z = True, deletes gone and sets cfg to a Y.Map
# {"mode": "eco"} in one transaction (version 1); update 3 sets config.level = 3 (version 2).
V4_SNAPSHOT = bytes.fromhex(
    "0103070028010573746174650178017c3f800000280105737461746501790177026869280105737461746504"
    "676f6e65017704736f6f6e00")
V4_UPDATES = (
    bytes.fromhex("010307032801057374617465017a01782701057374617465036366670128000704046d"
                  "6f646501770365636f0107010201"),
    bytes.fromhex("01010706280106636f6e666967056c6576656c017c404000000107010201"),
)
V4_SERVER_SV = bytes.fromhex("010703")
V4_DIRTY = [("config", "level", 2), ("state", "cfg", 1), ("state", "gone", 1),
            ("state", "z", 1)]


def write_device_v4_fixture(path: Path = FIXTURES / "device_v4.db") -> None:
    """Write ``device_v4.db``: schemas v1 to v4 only; a state document (a snapshot the cloud
    holds and two logged updates it lacks) and the dirty keys of those two updates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        with transaction(conn):
            for script in MIGRATIONS[:4]:
                for statement in statements(script):
                    conn.execute(statement)
            conn.execute("PRAGMA user_version = 4")
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [("client_id", 7), ("server_sv", V4_SERVER_SV)])
            conn.execute("INSERT INTO snapshots (doc, data, upto) VALUES ('state', ?, 1)",
                         (V4_SNAPSHOT,))
            conn.executemany("INSERT INTO updates (id, doc, data) VALUES (?, 'state', ?)",
                             list(enumerate(V4_UPDATES, start=2)))
            conn.executemany("INSERT INTO dirty (map, key, version) VALUES (?, ?, ?)",
                             V4_DIRTY)
        conn.execute("VACUUM")


@pytest.fixture(scope="module", autouse=True)
def _regenerate_fixtures() -> None:
    if os.environ.get("CRDTSYNC_REGEN_FIXTURES") == "1":
        write_device_v3_fixture()
        write_device_v4_fixture()


def _dump(path: Path) -> tuple[int, list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return user_version(conn), list(conn.iterdump())


def test_device_v3_fixture_is_what_the_v3_scripts_make(tmp_path: Path) -> None:
    write_device_v3_fixture(tmp_path / "v3.db")
    assert _dump(FIXTURES / "device_v3.db") == _dump(tmp_path / "v3.db")


async def test_device_v3_database_migrates_in_place(tmp_path: Path) -> None:
    """v4 adds the empty ``dirty`` table; everything else is read as before."""
    path = tmp_path / "d.db"
    shutil.copyfile(FIXTURES / "device_v3.db", path)
    async with DeviceStore(path) as store:
        assert store.meta == {"client_id": 7, "server_sv": V3_SERVER_SV, "down_done": 1,
                              "next_seq": 2}
        local = await store.load_doc("state")
        assert (local.snapshot, local.upto, local.updates) == (V3_SNAPSHOT, 1,
                                                               ((2, V3_UPDATE),))
        assert [(e.seq, e.topic, e.time, e.body, e.template)
                for e in await store.pending(10, 1 << 20)] == [(1, *V3_EVENT, None)]
        assert await store.results(10) == [(1, True, msgpack.packb({"up": True}))]
        assert [c.id for c in await store.calls("pending")] == ["r1"]
        assert (store.dirty_count, store.dirty_version, await store.dirty_keys()) == (0, 0, [])
        store.append_update("state", b"u", [DirtyWrite("state", "z", 5, b"\xc3")], 1)
        assert await store.dirty_keys() == [("state", "z")]
    assert _dump(path)[0] == SCHEMA_VERSION == 6
    assert _dump(FIXTURES / "device_v3.db")[0] == 3  # the golden file was not touched


def test_device_v4_fixture_is_what_the_v4_scripts_make(tmp_path: Path) -> None:
    write_device_v4_fixture(tmp_path / "v4.db")
    assert _dump(FIXTURES / "device_v4.db") == _dump(tmp_path / "v4.db")


async def test_device_v4_database_migrates_in_place(tmp_path: Path) -> None:
    """v5 gives dirty keys a stamp, a value and a shared-type flag: rows from v4 keep their
    versions and have no stamp yet (the device stamps them when it starts)."""
    path = tmp_path / "d.db"
    shutil.copyfile(FIXTURES / "device_v4.db", path)
    async with DeviceStore(path) as store:
        assert store.meta == {"client_id": 7, "server_sv": V4_SERVER_SV}
        local = await store.load_doc("state")
        assert (local.snapshot, [u for _, u in local.updates]) == (V4_SNAPSHOT,
                                                                   list(V4_UPDATES))
        assert (store.dirty_count, store.dirty_version, store.dirty_stamp) == (4, 2, 0)
        assert await store.unstamped_keys() == [(m, k) for m, k, _ in V4_DIRTY]
        assert await store.dirty_writes() == []
        await store.mark_dirty([DirtyWrite("state", "z", 9, b"\xc3")], 2)
        assert await store.unstamped_keys() == [("config", "level"), ("state", "cfg"),
                                                ("state", "gone")]
        assert await store.dirty_writes() == [DirtyWrite("state", "z", 9, b"\xc3")]
        assert store.dirty_stamp == 9
    assert _dump(path)[0] == SCHEMA_VERSION == 6
    assert _dump(FIXTURES / "device_v4.db")[0] == 4  # the golden file was not touched


async def test_a_migrated_device_syncs_and_tracks_dirty_keys(
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    """A device whose database predates dirty keys starts on it, sends what its cloud
    lacks (z), and tracks its new writes."""
    path = tmp_path / "d.db"
    shutil.copyfile(FIXTURES / "device_v3.db", path)
    token = (await admin.add_device("dev-v3"))["token"]
    async with Device("dev-v3", server.url, token=token, path=path, interval=None) as dev:
        assert dev.state.to_dict() == {"x": 1, "y": "hi", "z": True}
        dev.state["w"] = 4
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT map, key FROM dirty").fetchall() == [("state", "w")]
        report = await dev.sync()
        assert report.events_acked == 1
    assert (await admin.state("dev-v3"))["state"] == {"w": 4, "x": 1, "y": "hi", "z": True}
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM dirty").fetchone() == (0,)


async def test_the_write_ahead_log_stays_small(tmp_path: Path) -> None:
    """Bursts of writes must not leave a device with a 4 MB -wal file for ever: the store
    checkpoints its log every 1 MB and cuts it back to 1 MB (issue 12: a long-lived device's
    files stay under 2 MB; bench/growth.py section iv)."""
    path = tmp_path / "dev.db"
    async with Device("w", "http://127.0.0.1:9", token="t", path=path, interval=None) as dev:
        for i in range(500):  # about 4 MB of updates, one transaction each
            dev.state["blob"] = f"{i:04d}" + "x" * 8000
        await dev.emit("t", {"i": 1})  # one more transaction through the store's thread
        assert os.path.getsize(f"{path}-wal") <= 1024 * 1024 + 64 * 1024
