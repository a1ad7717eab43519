"""The server's document cache: LRU capacity, idle eviction, catch-up only after another
writer committed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from crdtsync import crdt
from crdtsync.errors import Unavailable
from crdtsync_server.documents import RETIRE_GRACE, DocumentCache
from crdtsync_server.store import DocWrite, MemoryStore, SQLiteStore, SyncWrite


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_idle_documents_leave_memory_and_come_back_from_the_store() -> None:
    clock = Clock()
    async with MemoryStore() as store:
        cache = DocumentCache(store, 1, capacity=10, clock=clock)
        for key in ("a", "b", "c"):
            async with cache.lock(key):
                live = await cache.get(key)
                crdt.write(live.doc, "state", {"k": key})
                stored = await store.commit(SyncWrite(None, 1, docs=[
                    DocWrite(key, live.capture())]))
                live.committed(stored.update_ids[0], stored.prev_ids[0])
        clock.now += 50
        await cache.get("b")  # used again: stays
        clock.now += 20
        assert cache.evict_idle(60) == 2 and len(cache) == 1
        assert cache.evict_idle(60) == 0
        again = await cache.get("a")  # reloaded from the store
        assert crdt.to_json(again.doc) == {"state": {"k": "a"}}
        assert len(cache) == 2


async def test_capacity_evicts_the_least_recently_used() -> None:
    async with MemoryStore() as store:
        cache = DocumentCache(store, 1, capacity=2)
        first = await cache.get("a")
        await cache.get("b")
        await cache.get("a")
        await cache.get("c")  # evicts b, the least recently used
        assert len(cache) == 2 and await cache.get("a") is first


async def test_a_cached_document_reads_the_store_only_after_another_writer(
        tmp_path: Path) -> None:
    """In one process a cached document is not read again; a commit by another connection
    (``PRAGMA data_version``) makes the next use catch up with it."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as ours, SQLiteStore(path) as theirs:
        cache = DocumentCache(ours, 1)
        live = await cache.get("d/state")
        reads = 0
        read_since = ours.read_since

        async def counting(key: str, after: int) -> tuple[tuple[int, bytes], ...] | None:
            nonlocal reads
            reads += 1
            return await read_since(key, after)

        ours.read_since = counting  # type: ignore[method-assign]
        await ours.get_setting("x")
        assert await cache.get("d/state") is live and reads == 0
        other = crdt.new_doc(2)
        crdt.write(other, "state", {"from": "them"})
        await theirs.commit(SyncWrite(None, 1, docs=[DocWrite("d/state", other.get_update())]))
        await ours.get_setting("x")  # any call notices the other connection's commit
        live = await cache.get("d/state")
        assert reads == 1 and crdt.to_json(live.doc) == {"state": {"from": "them"}}


async def test_evicted_documents_are_freed() -> None:
    """pycrdt observers keep a document alive until removed: documents leaving the cache
    (capacity, idleness, a failed commit) are closed and garbage-collected."""
    clock = Clock()
    async with MemoryStore() as store:
        cache = DocumentCache(store, 1, capacity=3, clock=clock)
        refs = []
        for n in range(10):
            live = await cache.get(f"d{n}")
            crdt.write(live.doc, "state", {"n": n})
            live.capture()
            live.changes.take()
            refs.append(weakref.ref(live.doc))
        cache.evict("d9")
        del live
        clock.now += RETIRE_GRACE + 1
        cache.evict_idle(3600)  # closes what left by capacity or failure a while ago
        gc.collect()
        assert sum(r() is not None for r in refs) == 2  # d7 and d8, still cached
        clock.now += 3601
        cache.evict_idle(3600)
        gc.collect()
        assert all(r() is None for r in refs) and len(cache) == 0


async def test_a_document_closed_while_in_use_refuses_to_capture() -> None:
    """A sync still holding a document that was evicted and closed gets a retryable error
    instead of acknowledging a write it could not capture."""
    async with MemoryStore() as store:
        cache = DocumentCache(store, 1, capacity=1)
        live = await cache.get("a")
        live.close()
        crdt.write(live.doc, "state", {"k": 1})
        with pytest.raises(Unavailable):
            live.capture()
