"""The device's SQLite store: outbox bound and policies, renumbering, schema, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from crdtsync import AdminClient, OutboxFull, OutboxLimits, StoreError
from crdtsync.device_store import SCHEMA_VERSION, DeviceStore
from crdtsync.errors import InvalidValue

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
