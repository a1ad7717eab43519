"""PostgreSQL: the change feed shared by several server instances (store objects on one
schema): readers following cursors while instances append, purges in chunks and from two
instances at once, and a head and floor that outlive the store object. The shared contract
is in ``test_store_feed.py``; the fixtures come from ``test_store_postgres.py`` (a random
schema per test, dropped afterwards).
"""

from __future__ import annotations

import asyncio

import pytest

from crdtsync_server.store import DeviceRecord, Store, SyncWrite
from crdtsync_server.store.postgres import PostgresStore
from crdtsync_server.store.postgres import feed as postgres_feed

from . import test_store_postgres as postgres_tests
from .store_backends import change, conflict_record, evs
from .test_store_postgres import OpenStore, follow

pytestmark = pytest.mark.service

schema = postgres_tests.schema
instance = postgres_tests.instance
"""The fixtures of ``test_store_postgres.py``: a random schema, and store objects on it."""


async def test_feed_readers_following_cursors_see_every_item_once(instance: OpenStore
                                                                 ) -> None:
    """Three instances commit events, state changes and conflicts of their devices at once
    while a reader on a fourth follows ``read_feed``: it sees every item once, in cursor
    order, and the head is the last cursor."""
    writers = [await instance(max_size=4) for _ in range(3)]
    reader = await instance()
    for n in range(9):
        await reader.add_device(DeviceRecord(f"d{n}", "h", created=1))
    stop = asyncio.Event()

    async def items_after(after: int) -> list[int]:
        return [item.cursor for item in await reader.read_feed(after, limit=50)]

    async def write(store: PostgresStore, n: int) -> None:
        device = f"d{n}"
        for seq in range(1, 16):
            await store.commit(SyncWrite(device, seq, events=evs(seq, seq),
                                         changes=[change(device, {"state": {"k": seq}})],
                                         conflicts=[conflict_record(device)]))

    following = asyncio.create_task(follow(items_after, stop))
    try:
        await asyncio.gather(*(write(store, n) for n, store in enumerate(writers * 3)))
    finally:
        stop.set()
        seen = await following
    stored = [item.cursor for item in await reader.read_feed(limit=10_000)]
    assert len(stored) == 9 * 15 * 3
    assert seen == stored
    assert await reader.feed_head() == stored[-1]
    assert len(await reader.read_projection()) == 9


async def test_a_purge_in_chunks_leaves_a_floor_and_head_that_outlive_the_store(
        instance: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_feed, "PURGE_CHUNK", 2)
    store = await instance()
    await store.add_device(DeviceRecord("d1", "h", created=1))
    await store.commit(SyncWrite("d1", 5, events=evs(1, 5)))
    assert await store.purge_feed(before=6, keep_after=4) == 4
    assert await store.purge_feed(before=6, keep_after=5) == 1
    await store.aclose()
    again = await instance()
    assert (await again.feed_floor(), await again.feed_head()) == (5, 5)
    assert await again.read_feed() == []
    await again.commit(SyncWrite("d1", 7, events=evs(6, 6)))
    assert [(i.cursor, i.seq) for i in await again.read_feed()] == [(6, 6)]


async def test_instances_purging_at_once_count_each_item_once(
        instance: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_feed, "PURGE_CHUNK", 7)
    stores = [await instance() for _ in range(3)]
    await stores[0].add_device(DeviceRecord("d1", "h", created=1))
    await stores[0].commit(SyncWrite("d1", 5, events=evs(1, 100)))
    counts = await asyncio.gather(*(s.purge_feed(before=6, keep_after=90)
                                    for s in stores for _ in range(2)))
    assert sum(counts) == 90
    assert [i.seq for i in await stores[1].read_feed()] == list(range(91, 101))
    assert (await stores[2].feed_floor(), await stores[2].feed_head()) == (90, 100)


async def test_changes_of_one_key_in_one_write_apply_in_order(store: Store) -> None:
    """The projection ends as if a write's changes were applied one by one (the PostgreSQL
    backend folds them into one delete and one upsert); runs on every backend."""
    await store.add_device(DeviceRecord("a", "h", created=1))
    await store.commit(SyncWrite("a", 10, changes=[
        change("a", {"state": {"set": 1, "gone": 1, "back": 1}}),
        change("a", {"state": {"set": 2, "gone": None, "back": None}}),
        change("a", {"state": {"back": 3}})]))
    assert [(r.key, r.value) for r in await store.read_projection()] == [
        ("back", 3), ("set", 2)]
    assert [i.body for i in await store.read_feed()] == [
        {"state": {"set": 1, "gone": 1, "back": 1}},
        {"state": {"set": 2, "gone": None, "back": None}}, {"state": {"back": 3}}]
