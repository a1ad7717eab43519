"""The server's document cache: LRU capacity, idle eviction, catch-up only after another
writer committed, and the rebuild policy (when a document becomes its next generation)."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc

from crdtsync import crdt
from crdtsync.errors import StoreError, Unavailable
from crdtsync.protocol import DocSync
from crdtsync_server.documents import ANSWER_MEMO_BYTES, RETIRE_GRACE, DocumentCache, LiveDoc
from crdtsync_server.store import DocLog, DocWrite, MemoryStore, SQLiteStore, Store, SyncWrite
from crdtsync_server.sync import answer_entry


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


# --- rebuild policy (issue 12) ---------------------------------------------------------------

KEY = "d/state"


@dataclass
class Replica:
    """The device side of :func:`round_trip`: its document and the generation it holds."""

    doc: Doc[Any] = field(default_factory=lambda: crdt.new_doc(crdt.random_client_id()))
    gen: int = 0


async def round_trip(cache: DocumentCache, store: Store, device: Replica, i: int,
                     *, adopts: bool = True) -> None:
    """One round of a device and the cloud overwriting the same ten keys (alternating
    writers: tombstones Yjs cannot collect), each write committed as a sync would, then the
    cache's maintenance. The device first adopts a new generation if there is one."""
    async with cache.lock("d"):
        live = await cache.get(KEY)
        if device.gen != live.gen:
            device.doc = crdt.new_doc(crdt.random_client_id(), live.doc.get_update())
            device.gen = live.gen
        live.adopts = adopts  # what a sync with (or without) `a` records
        before = device.doc.get_state()
        crdt.write(device.doc, "state", {f"k{i % 10}": i})
        crdt.apply_remote(live.doc, device.doc.get_update(before))
        crdt.write(live.doc, "state", {f"k{(i + 5) % 10}": -i})
        stored = await store.commit(SyncWrite(None, i, docs=[
            DocWrite(KEY, live.capture(), live.gen)]))
        live.committed(stored.update_ids[0], stored.prev_ids[0])
        device.doc.apply_update(live.doc.get_update(device.doc.get_state()))
        await cache.after_commit(live)


async def overwrite(cache: DocumentCache, store: Store, rounds: int, *, start: int = 0,
                    adopts: bool = True) -> dict[str, Any]:
    """``rounds`` rounds of :func:`round_trip`; returns the document as JSON."""
    device = Replica()
    for i in range(start, start + rounds):
        await round_trip(cache, store, device, i, adopts=adopts)
    return crdt.to_json((await cache.get(KEY)).doc)


async def stored_size(store: Store) -> int:
    """Bytes of the stored log of ``KEY``: snapshot and rows."""
    log = await store.load_doc(KEY)
    return len(log.snapshot) + sum(len(u) for _, u in log.updates)


async def test_a_document_is_rebuilt_once_its_history_outweighs_its_content(
        tmp_path: Path) -> None:
    """The same 400 rounds with and without rebuilds: the same content, a bounded document
    in memory and in the store instead of one that grows with every write."""
    async with SQLiteStore(tmp_path / "on.db") as store, \
            SQLiteStore(tmp_path / "off.db") as unbounded:
        cache = DocumentCache(store, 1, rebuild_slack=256)
        await overwrite(cache, store, 5)
        assert cache.rebuilds == 0 and (await store.load_doc(KEY)).gen == 0  # still small
        content = await overwrite(cache, store, 395, start=5)
        assert cache.rebuilds >= 1
        live = await cache.get(KEY)
        log = await store.load_doc(KEY)
        assert live.gen == log.gen == cache.rebuilds
        assert crdt.to_json(crdt.new_doc(9, log.snapshot, (u for _, u in log.updates))) \
            == content == crdt.to_json(live.doc)

        off = DocumentCache(unbounded, 1, rebuild_factor=0)
        assert await overwrite(off, unbounded, 400) == content
        history = len((await off.get(KEY)).doc.get_update())
        # At most factor * fresh + slack, plus what one check interval adds.
        fresh = len(crdt.rebuilt(live.doc, 5).get_update())
        assert len(live.doc.get_update()) <= 3 * fresh + 2 * 256 < history / 4
        assert await stored_size(store) < await stored_size(unbounded) / 2


async def test_the_fresh_size_is_measured_again_only_past_the_bound_it_gave(
        tmp_path: Path) -> None:
    """A check under the bound of the fresh size last measured does not build the fresh
    document again: after the content shrank (a 3 KB value deleted), checks keep the old
    measure until the document passes its bound, then measure again and rebuild."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        cache = DocumentCache(store, 1, rebuild_slack=256)
        async with cache.lock("d"):
            live = await cache.get(KEY)
            live.adopts = True
            crdt.write(live.doc, "state", {"big": "x" * 3000})
            stored = await store.commit(SyncWrite(None, 1, docs=[
                DocWrite(KEY, live.capture(), live.gen)]))
            live.committed(stored.update_ids[0], stored.prev_ids[0])
            await cache.after_commit(live)  # the first check measures
            measured = live.fresh_size
            assert measured is not None and measured > 3000 and cache.rebuilds == 0
            crdt.write(live.doc, "state", {"big": None})
            stored = await store.commit(SyncWrite(None, 2, docs=[
                DocWrite(KEY, live.capture(), live.gen)]))
            live.committed(stored.update_ids[0], stored.prev_ids[0])
        rounds = 0
        while cache.rebuilds == 0:
            await overwrite(cache, store, 1, start=rounds)
            rounds += 1
            if cache.rebuilds == 0:  # not rebuilt: not measured again
                assert live.fresh_size == measured
        # rebuilt once past the old bound, far later than the new content's bound
        assert rounds > 40 and len(live.doc.get_update()) > 2 * measured + 256
        rebuilt = await cache.get(KEY)
        assert rebuilt.gen == 1 and rebuilt.fresh_size is not None
        assert rebuilt.fresh_size < 400 and "big" not in crdt.to_json(rebuilt.doc)["state"]


async def test_only_documents_of_devices_that_adopt_are_rebuilt(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        cache = DocumentCache(store, 1, rebuild_slack=256)
        await overwrite(cache, store, 150, adopts=False)
        assert cache.rebuilds == 0 and (await store.load_doc(KEY)).gen == 0
        cache.rebuild_factor = 0  # off
        await overwrite(cache, store, 5, start=150)
        assert cache.rebuilds == 0
        cache.rebuild_factor = 2
        await overwrite(cache, store, 1, start=155)  # due at once: never checked before
        assert cache.rebuilds == 1 and (await store.load_doc(KEY)).gen == 1


def test_a_rebuild_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        DocumentCache(MemoryStore(), 1, rebuild_factor=0.5)
    with pytest.raises(ValueError):
        DocumentCache(MemoryStore(), 1, rebuild_slack=-1)


async def test_a_rebuild_racing_another_process_changes_nothing_and_is_retried(
        tmp_path: Path) -> None:
    """Another process appends after this one committed and before its rebuild: the
    compare-and-set refuses, both rows stay, and a later write rebuilds with both."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as ours, SQLiteStore(path) as theirs:
        cache = DocumentCache(ours, 1, rebuild_factor=0, rebuild_slack=256)
        await overwrite(cache, ours, 150)
        other = DocumentCache(theirs, 2)
        async with other.lock("d"):
            copy = await other.get(KEY)
            crdt.write(copy.doc, "state", {"theirs": True})
            await theirs.commit(SyncWrite(None, 1, docs=[DocWrite(KEY, copy.capture())]))
        before = await ours.load_doc(KEY)
        cache.rebuild_factor = 2
        live = cache._docs[KEY]  # what a sync of ours holds after its commit
        assert not await cache.maybe_rebuild(live)
        assert await ours.load_doc(KEY) == before and cache.rebuilds == 0
        content = await overwrite(cache, ours, 20, start=150)  # catches up, retries
        assert cache.rebuilds >= 1 and content["state"]["theirs"] is True
        log = await ours.load_doc(KEY)
        assert log.gen == cache.rebuilds and content == crdt.to_json(
            crdt.new_doc(9, log.snapshot, (u for _, u in log.updates)))
        await theirs.get_setting("x")  # any call notices the other connection's commit
        async with other.lock("d"):  # the other process reloads the new generation
            assert (await other.get(KEY)).gen == log.gen


async def test_a_failed_rebuild_is_logged_and_retried(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        cache = DocumentCache(store, 1, rebuild_factor=0, rebuild_slack=256)
        await overwrite(cache, store, 150)
        before = await store.load_doc(KEY)
        rebuild = store.rebuild

        async def failing(*args: Any) -> bool:
            raise StoreError("disk I/O error (test)")

        store.rebuild = failing  # type: ignore[method-assign]
        cache.rebuild_factor = 2
        content = await overwrite(cache, store, 1, start=150)  # never raises
        assert cache.rebuild_failures == 1 and cache.rebuilds == 0
        assert "rebuild of d/state failed, will retry" in caplog.text
        assert (await store.load_doc(KEY)).gen == 0
        assert len((await store.load_doc(KEY)).updates) == len(before.updates) + 1
        live = await cache.get(KEY)
        assert live.grown == 0 and live.fresh_size is not None
        await overwrite(cache, store, 1, start=151)  # ~50 bytes, below the interval
        assert cache.rebuild_failures == 1  # not at every write: at the next check
        store.rebuild = rebuild  # type: ignore[method-assign]
        assert await overwrite(cache, store, 20, start=152) != content
        assert cache.rebuilds >= 1 and (await store.load_doc(KEY)).gen == cache.rebuilds


async def test_the_rebuilt_generation_is_cached_as_stored_without_reading_it_back(
        tmp_path: Path) -> None:
    """The cache keeps generation ``gen + 1`` as the store now holds it (the content, the
    snapshot's update id, the stamps) without reading it back: with every read of the store
    failing, the rebuild still leaves it cached, and a second cache that loads it from the
    store holds the same."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        cache = DocumentCache(store, 1, rebuild_factor=0, rebuild_slack=256)
        content = await overwrite(cache, store, 150)
        load_doc = store.load_doc

        async def failing(key: str, *, stamps: bool = False) -> DocLog:
            raise StoreError("disk I/O error (test)")

        store.load_doc = failing  # type: ignore[method-assign]
        cache.rebuild_factor = 2
        live = cache._docs[KEY]
        assert await cache.maybe_rebuild(live)
        cached = cache._docs[KEY]
        assert cached is not live and live.closed is False  # retired: a sync may hold it
        assert (cached.gen, cached.rows, cached.adopts) == (1, 0, True)
        assert crdt.to_json(cached.doc) == content
        store.load_doc = load_doc  # type: ignore[method-assign]
        loaded = await DocumentCache(store, 2).get(KEY)
        assert (loaded.gen, loaded.last_id, loaded.rows, loaded.stamps) == (
            cached.gen, cached.last_id, cached.rows, cached.stamps)
        assert loaded.doc.get_state() == cached.doc.get_state()
        assert await cache.get(KEY) is cached  # nothing to catch up


async def test_a_key_lock_serialises_its_holders_and_goes_when_the_last_leaves() -> None:
    """``cache.lock(key)``: one holder at a time per key, other keys free; the key's lock
    is forgotten once nobody holds or awaits it: after a normal exit, an error inside, and
    a waiter cancelled before it got the lock."""
    import asyncio

    async with MemoryStore() as store:
        cache = DocumentCache(store, 1)
        order: list[str] = []
        entered = asyncio.Event()

        async def holder(name: str, hold: asyncio.Event) -> None:
            async with cache.lock("k"):
                order.append(f"{name} in")
                entered.set()
                await hold.wait()
                order.append(f"{name} out")

        release = asyncio.Event()
        first = asyncio.create_task(holder("a", release))
        await entered.wait()
        second = asyncio.create_task(holder("b", asyncio.Event()))
        cancelled = asyncio.create_task(holder("c", asyncio.Event()))
        async with cache.lock("other"):  # another key is not held up
            order.append("other")
        await asyncio.sleep(0)
        cancelled.cancel()
        second.cancel()
        release.set()
        await first
        for task in (second, cancelled):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert order == ["a in", "other", "a out"]
        assert cache._locks == {}
        with pytest.raises(RuntimeError):
            async with cache.lock("k"):
                raise RuntimeError("inside")
        assert cache._locks == {}
        async with cache.lock("k"):  # usable again
            assert list(cache._locks) == ["k"]


def test_an_answer_is_kept_only_while_the_document_is_unchanged() -> None:
    """A device that sends the state vector the last answer was computed for gets that
    answer again, until the document changes. A delete does not move the state vector:
    the next answer for the same state vector must carry it."""
    doc: Doc[Any] = Doc()
    crdt.write(doc, "env", {"UNIT": "C", "LEVEL": 3})
    live = LiveDoc("project", doc, 0, 0, 0)
    try:
        part = DocSync("project", doc.get_state(), b"", 0)
        first = answer_entry(part, live, 0)
        assert live.answered is not None and live.answered[0] == part.sv
        assert answer_entry(part, live, 0) == first  # from the memo
        held = doc.get_update()  # what a device holds
        crdt.write(doc, "env", {"LEVEL": None})  # a delete: the state vector stays
        assert live.answered is None and doc.get_state() == part.sv
        after = answer_entry(part, live, 0)
        assert after.update == doc.get_update(part.sv) != first.update
        copy: Doc[Any] = Doc()
        copy.apply_update(held)
        copy.apply_update(after.update)  # the answer's delete set
        assert crdt.to_json(copy)["env"] == {"UNIT": "C"}
        whole = answer_entry(DocSync("project", part.sv, b"", 7), live, 0)  # another gen
        assert whole.update == doc.get_update()  # the diff against an empty document
        big = b"x" * ANSWER_MEMO_BYTES
        crdt.write(doc, "env", {"BLOB": big.decode()})
        answer_entry(DocSync("project", b"\x00", b"", 0), live, 0)
        assert live.answered is None  # a large diff is not kept
    finally:
        live.close()
