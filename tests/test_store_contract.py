"""The contract every :class:`Store` backend passes.

The ``store`` fixture is parametrized over :data:`BACKENDS`; adding a backend (PostgreSQL)
means adding one factory there. Backend-specific tests live in ``test_store_<backend>.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map

from crdtsync.errors import (
    AlreadyExists,
    ClosedError,
    NotFound,
    SeqConflict,
    SeqGap,
    Unavailable,
)
from crdtsync.hlc import MAX_STAMP
from crdtsync.protocol import Conflict, Event, WriteInfo
from crdtsync_server.store import (
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Downlink,
    FleetRecord,
    KeyStamp,
    MemoryStore,
    ProxyRequest,
    SQLiteStore,
    Store,
    SyncWrite,
)
from crdtsync_server.store.feed import (
    ConflictRecord,
    FeedFilter,
    FeedItem,
    ProjectionRow,
    StateChange,
)
from crdtsync_server.store.sinks import SinkConfig

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "memory": lambda tmp_path: MemoryStore(),
    "sqlite": lambda tmp_path: SQLiteStore(tmp_path / "store.db"),
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = BACKENDS[request.param](tmp_path)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


# --- helpers -----------------------------------------------------------------------------


def ev(seq: int, topic: str = "temp", body: Any = None, time: int | None = None) -> Event:
    return Event(
        seq=seq, topic=topic, time=1000 + seq if time is None else time,
        body={"seq": seq} if body is None else body,
    )


def evs(first: int, last: int, topic: str = "temp") -> tuple[Event, ...]:
    return tuple(ev(s, topic) for s in range(first, last + 1))


async def add_device(store: Store, device_id: str = "dev-1", **kw: Any) -> DeviceRecord:
    record = DeviceRecord(id=device_id, token_hash=f"hash-{device_id}", created=1, **kw)
    await store.add_device(record)
    return record


async def write_docs(store: Store, key: str, *updates: bytes, gen: int = 0) -> CommitResult:
    docs = [DocWrite(key, u, gen) for u in updates]
    return await store.commit(SyncWrite(device=None, time=5, docs=docs))


async def all_events(store: Store, **kw: Any) -> list[tuple[str, int]]:
    return [(e.device, e.seq) for e in await store.read_events(limit=10_000, **kw)]


# --- documents ---------------------------------------------------------------------------


async def test_unknown_doc_is_empty(store: Store) -> None:
    log = await store.load_doc("nothing")
    assert log == DocLog()
    assert log.last_id == 0
    assert await store.read_since("nothing", 0) == ()


async def test_commit_appends_updates_in_id_order(store: Store) -> None:
    first = await write_docs(store, "a", b"u1", b"u2", gen=3)
    second = await store.commit(
        SyncWrite(None, 6, docs=[DocWrite("b", b"x1"), DocWrite("a", b"u3", 3)])
    )
    ids = [*first.update_ids, *second.update_ids]
    assert len(ids) == 4
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert first.stored == 0 and first.last_seq == 0

    log = await store.load_doc("a")
    assert log.gen == 3
    assert log.snapshot == b"" and log.snapshot_id == 0
    assert log.updates == ((ids[0], b"u1"), (ids[1], b"u2"), (ids[3], b"u3"))
    assert log.last_id == ids[3]
    assert (await store.load_doc("b")).updates == ((ids[2], b"x1"),)


async def test_doc_gen_is_set_by_first_write(store: Store) -> None:
    await write_docs(store, "a", b"u1", gen=2)
    await write_docs(store, "a", b"u2", gen=2)
    assert (await store.load_doc("a")).gen == 2


async def test_read_since(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2", b"u3")).update_ids
    await write_docs(store, "other", b"o1")
    assert await store.read_since("a", ids[0]) == ((ids[1], b"u2"), (ids[2], b"u3"))
    assert await store.read_since("a", 0) == tuple(zip(ids, (b"u1", b"u2", b"u3"), strict=True))
    assert await store.read_since("a", ids[2]) == ()


async def test_compact_deletes_exactly_rows_up_to_id(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2")).update_ids
    other = (await write_docs(store, "other", b"o1")).update_ids
    # The snapshot is built from the log as read; a row appended meanwhile must survive.
    late = (await write_docs(store, "a", b"u3")).update_ids[0]
    await store.compact("a", ids[1], b"snap12")

    log = await store.load_doc("a")
    assert log.snapshot == b"snap12"
    assert log.snapshot_id == ids[1]
    assert log.updates == ((late, b"u3"),)
    assert await store.read_since("a", 0) is None  # rows 1..2 are only in the snapshot now
    assert await store.read_since("a", ids[1]) == ((late, b"u3"),)
    assert (await store.load_doc("other")).updates == ((other[0], b"o1"),)


async def test_compact_never_goes_back(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2", b"u3")).update_ids
    await store.compact("a", ids[1], b"snap12")
    await store.compact("a", ids[0], b"stale")
    await store.compact("a", ids[1], b"same-id")
    log = await store.load_doc("a")
    assert (log.snapshot, log.snapshot_id) == (b"snap12", ids[1])
    assert log.updates == ((ids[2], b"u3"),)


async def test_ids_never_reused_after_compaction(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2")).update_ids
    await store.compact("a", ids[1], b"snap")
    assert (await store.load_doc("a")).updates == ()
    new = (await write_docs(store, "a", b"u3")).update_ids[0]
    assert new > ids[1]
    assert (await store.load_doc("a")).last_id == new


def _edit(doc: Doc[Any], **changes: Any) -> bytes:
    before = doc.get_state()
    state = doc.get("state", type=Map)
    with doc.transaction():
        for key, value in changes.items():
            state[key] = value
    return doc.get_update(before)


def _merge(snapshot: bytes, updates: list[bytes]) -> bytes:
    doc: Doc[Any] = Doc(client_id=99)
    for update in ([snapshot] if snapshot else []) + updates:
        doc.apply_update(update)
    return doc.get_update()


def _replay(log: DocLog) -> dict[str, Any]:
    doc: Doc[Any] = Doc(client_id=98)
    if log.snapshot:
        doc.apply_update(log.snapshot)
    for _, update in log.updates:
        doc.apply_update(update)
    return dict(doc.get("state", type=Map).to_py() or {})


async def test_snapshot_plus_updates_rebuild_the_document(store: Store) -> None:
    source: Doc[Any] = Doc(client_id=7)
    updates = [_edit(source, a=1, b="x"), _edit(source, b="y"), _edit(source, c=[1, 2])]
    ids = (await write_docs(store, "d", *updates)).update_ids
    await store.compact("d", ids[1], _merge(b"", updates[:2]))
    late = _edit(source, a=2, d={"k": True})
    await write_docs(store, "d", late)

    log = await store.load_doc("d")
    assert len(log.updates) == 2
    expected = source.get("state", type=Map).to_py()
    assert _replay(log) == expected == {"a": 2.0, "b": "y", "c": [1.0, 2.0], "d": {"k": True}}

    await store.compact("d", log.last_id, _merge(log.snapshot, [u for _, u in log.updates]))
    compacted = await store.load_doc("d")
    assert compacted.updates == ()
    assert _replay(compacted) == expected


# --- generations (rebuild) ----------------------------------------------------------------


async def test_rebuild_replaces_the_log_by_the_next_generation(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2")).update_ids
    other = (await write_docs(store, "other", b"o1")).update_ids
    assert await store.rebuild("a", 0, ids[1], b"fresh")

    log = await store.load_doc("a")
    assert (log.gen, log.snapshot, log.updates) == (1, b"fresh", ())
    assert log.snapshot_id > other[0]  # fresh: above every id any cached copy can hold
    assert await store.read_since("a", ids[1]) is None  # a copy of generation 0 reloads
    assert (await store.load_doc("other")).updates == ((other[0], b"o1"),)

    late = (await write_docs(store, "a", b"u3", gen=1)).update_ids[0]
    assert late > log.snapshot_id
    assert await store.read_since("a", log.snapshot_id) == ((late, b"u3"),)
    assert await store.rebuild("a", 1, late, b"fresh2")
    again = await store.load_doc("a")
    assert (again.gen, again.snapshot, again.updates) == (2, b"fresh2", ())


async def test_rebuild_of_an_unknown_document_starts_generation_one(store: Store) -> None:
    assert await store.rebuild("new", 0, 0, b"fresh")
    log = await store.load_doc("new")
    assert (log.gen, log.snapshot, log.updates) == (1, b"fresh", ())


async def test_rebuild_racing_an_append_changes_nothing(store: Store) -> None:
    """The rebuilder read the document up to ``read.last_id``; another writer (another
    process) appended since: the compare-and-set refuses, and nothing is lost."""
    first = (await write_docs(store, "a", b"u1")).update_ids[0]
    read = await store.load_doc("a")
    late = (await write_docs(store, "a", b"u2")).update_ids[0]
    assert not await store.rebuild("a", read.gen, read.last_id, b"fresh")
    log = await store.load_doc("a")
    assert (log.gen, log.snapshot, log.updates) == (0, b"", ((first, b"u1"), (late, b"u2")))


async def test_rebuild_of_a_stale_generation_changes_nothing(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1")).update_ids
    assert await store.rebuild("a", 0, ids[0], b"fresh")
    fresh = await store.load_doc("a")
    assert not await store.rebuild("a", 0, fresh.last_id, b"stale")  # rebuilt meanwhile
    assert not await store.rebuild("a", 5, fresh.last_id, b"future")
    assert await store.load_doc("a") == fresh


async def test_rebuild_after_a_compaction_past_its_read_changes_nothing(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2")).update_ids
    await store.compact("a", ids[1], b"snap")  # another process compacted what it had read
    assert not await store.rebuild("a", 0, ids[0], b"fresh")
    assert await store.rebuild("a", 0, ids[1], b"fresh")


async def test_a_stale_compaction_never_replaces_a_rebuilt_generation(store: Store) -> None:
    ids = (await write_docs(store, "a", b"u1", b"u2")).update_ids
    assert await store.rebuild("a", 0, ids[1], b"fresh")
    await store.compact("a", ids[1], b"old generation")
    log = await store.load_doc("a")
    assert (log.gen, log.snapshot) == (1, b"fresh")


async def test_commit_refuses_a_write_of_a_stale_generation(store: Store) -> None:
    """A process that has not noticed a rebuild must not append an update built on the old
    generation: the whole commit is refused, retryable, with nothing stored."""
    await add_device(store)
    ids = (await write_docs(store, "dev-1/state", b"u1")).update_ids
    assert await store.rebuild("dev-1/state", 0, ids[0], b"fresh")
    rebuilt = await store.load_doc("dev-1/state")
    stale = SyncWrite("dev-1", 9, docs=[DocWrite("other", b"o1"), DocWrite("dev-1/state", b"x")],
                      events=evs(1, 2))
    with pytest.raises(Unavailable) as info:
        await store.commit(stale)
    assert info.value.retryable and info.value.detail == {"doc": "dev-1/state", "gen": 1}
    assert await store.load_doc("dev-1/state") == rebuilt
    assert await store.load_doc("other") == DocLog()
    assert await store.read_events() == []
    device = await store.get_device("dev-1")
    assert device is not None and (device.last_seq, device.last_sync) == (0, None)
    with pytest.raises(Unavailable):
        await write_docs(store, "dev-1/state", b"x", gen=0)  # a cloud write alike
    # The same write into the stored generation goes through.
    done = await store.commit(dataclasses.replace(stale, docs=[DocWrite("dev-1/state", b"x", 1)]))
    assert done.stored == 2
    assert (await store.load_doc("dev-1/state")).updates == ((done.update_ids[0], b"x"),)


# --- stamps (the latest-write-wins decision per key) --------------------------------------


def stamp_row(key: str, stamp: int, writer: str = "device", raw: int = 0,
              doc: str = "dev-1/state", name: str = "state") -> KeyStamp:
    return KeyStamp(doc, name, key, stamp, writer, raw)


async def test_stamps_are_written_with_the_update_and_replaced_per_key(store: Store) -> None:
    await add_device(store)
    assert await store.read_stamps("dev-1/state") == []
    first = [stamp_row("b", 5, raw=4), stamp_row("a", 0, "cloud"),
             stamp_row("mode", MAX_STAMP, raw=MAX_STAMP, name="config")]
    await store.commit(SyncWrite("dev-1", 10, docs=[DocWrite("dev-1/state", b"u1")],
                                 stamps=first))
    assert await store.read_stamps("dev-1/state") == sorted(
        first, key=lambda r: (r.map, r.key))  # uint64 extremes come back exactly
    # A cloud write replaces one row, adds another, and may carry no update at all (a
    # delete of an absent key is still a write with a time).
    await store.commit(SyncWrite(None, 11, stamps=[stamp_row("b", 9, "cloud", 4),
                                                   stamp_row("c", 2**63, "cloud")]))
    assert [(r.map, r.key, r.stamp, r.writer, r.raw)
            for r in await store.read_stamps("dev-1/state")] == [
        ("config", "mode", MAX_STAMP, "device", MAX_STAMP), ("state", "a", 0, "cloud", 0),
        ("state", "b", 9, "cloud", 4), ("state", "c", 2**63, "cloud", 0)]
    assert await store.read_stamps("dev-1/other") == []


async def test_stamps_survive_compaction_and_rebuilds(store: Store) -> None:
    """Rows are per key, not per generation: a rebuilt document keeps its keys' stamps."""
    await add_device(store)
    rows = [stamp_row("k", 7, raw=3)]
    done = await store.commit(SyncWrite("dev-1", 10, docs=[DocWrite("dev-1/state", b"u1")],
                                        stamps=rows))
    await store.compact("dev-1/state", done.update_ids[0], b"snap")
    assert await store.rebuild("dev-1/state", 0, done.update_ids[0], b"fresh")
    assert (await store.load_doc("dev-1/state")).gen == 1
    assert await store.read_stamps("dev-1/state") == rows


async def test_a_refused_commit_writes_no_stamps_and_no_conflicts(store: Store) -> None:
    await add_device(store)
    with pytest.raises(SeqGap):
        await store.commit(SyncWrite("dev-1", 10, events=evs(5, 5), stamps=[stamp_row("k", 1)],
                                     conflicts=[conflict_record("dev-1")]))
    assert await store.read_stamps("dev-1/state") == []
    assert await store.read_feed() == []


@pytest.mark.parametrize("rows", [
    [stamp_row("k", 1), stamp_row("k", 2)],
    [stamp_row("k", 1, "somebody")],
    [stamp_row("k", MAX_STAMP + 1)],
    [stamp_row("k", 1, raw=-1)],
], ids=["twice", "writer", "stamp", "raw"])
async def test_bad_stamp_rows_are_refused_with_nothing_written(
        store: Store, rows: list[KeyStamp]) -> None:
    await add_device(store)
    with pytest.raises(ValueError):
        await store.commit(SyncWrite("dev-1", 10, docs=[DocWrite("dev-1/state", b"u1")],
                                     stamps=rows))
    assert await store.read_stamps("dev-1/state") == []
    assert (await store.load_doc("dev-1/state")).updates == ()


async def test_delete_device_deletes_the_stamps_of_its_documents(store: Store) -> None:
    for device in ("dev-1", "dev-2"):
        await add_device(store, device)
        await store.commit(SyncWrite(device, 10, stamps=[
            stamp_row("k", 1, doc=f"{device}/state")]))
    await store.delete_device("dev-1", ["dev-1/state"])
    assert await store.read_stamps("dev-1/state") == []
    assert await store.read_stamps("dev-2/state") == [stamp_row("k", 1, doc="dev-2/state")]
    await add_device(store, "dev-1")  # a device created again with the id starts afresh
    assert await store.read_stamps("dev-1/state") == []


# --- events ------------------------------------------------------------------------------


async def test_first_events_are_stored(store: Store) -> None:
    await add_device(store)
    result = await store.commit(SyncWrite("dev-1", time=500, events=evs(1, 3)))
    assert result == CommitResult((), last_seq=3, stored=3)

    stored = await store.read_events()
    assert [(e.seq, e.topic, e.time, e.received, e.body) for e in stored] == [
        (1, "temp", 1001, 500, {"seq": 1}),
        (2, "temp", 1002, 500, {"seq": 2}),
        (3, "temp", 1003, 500, {"seq": 3}),
    ]
    assert all(e.device == "dev-1" for e in stored)
    device = await store.get_device("dev-1")
    assert device is not None and device.last_seq == 3 and device.last_sync == 500


async def test_event_body_roundtrips_as_json(store: Store) -> None:
    await add_device(store)
    body = {"nested": {"list": [1, 2.5, None, True, "é"]}, "n": 2**60}
    await store.commit(SyncWrite("dev-1", time=1, events=[ev(1, body=body)]))
    assert (await store.read_events())[0].body == body


async def test_replay_stores_nothing_new(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 3)))
    replay = await store.commit(SyncWrite("dev-1", time=2, events=evs(1, 3)))
    assert (replay.stored, replay.last_seq) == (0, 3)
    assert await all_events(store) == [("dev-1", 1), ("dev-1", 2), ("dev-1", 3)]

    overlap = await store.commit(SyncWrite("dev-1", time=3, events=evs(2, 5)))
    assert (overlap.stored, overlap.last_seq) == (2, 5)
    assert [s for _, s in await all_events(store)] == [1, 2, 3, 4, 5]


async def test_reused_seq_is_a_conflict_and_writes_nothing(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 3)))
    batch = [ev(2), ev(3, body={"other": True}), ev(4)]
    with pytest.raises(SeqConflict) as info:
        await store.commit(
            SyncWrite("dev-1", time=9, docs=[DocWrite("a", b"u1")], events=batch)
        )
    assert info.value.detail == {"seq": 3, "last_seq": 3}
    assert await store.load_doc("a") == DocLog()
    assert await all_events(store) == [("dev-1", 1), ("dev-1", 2), ("dev-1", 3)]
    device = await store.get_device("dev-1")
    assert device is not None and (device.last_seq, device.last_sync) == (3, 1)


async def test_gap_is_refused_and_writes_nothing(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 3)))
    with pytest.raises(SeqGap):
        await store.commit(
            SyncWrite("dev-1", time=9, docs=[DocWrite("a", b"u1")], events=evs(5, 6), purged=3)
        )
    assert await store.load_doc("a") == DocLog()
    assert len(await all_events(store)) == 3
    device = await store.get_device("dev-1")
    assert device is not None
    assert (device.last_seq, device.events_lost, device.last_sync) == (3, 0, 1)


async def test_gap_below_purged_is_counted_as_lost(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 3)))
    result = await store.commit(SyncWrite("dev-1", time=2, events=evs(6, 7), purged=5))
    assert (result.stored, result.last_seq) == (2, 7)
    device = await store.get_device("dev-1")
    assert device is not None and (device.last_seq, device.events_lost) == (7, 2)
    assert [s for _, s in await all_events(store)] == [1, 2, 3, 6, 7]

    # The counter adds up across commits, and counts from the very first one too.
    await store.commit(SyncWrite("dev-1", time=3, events=evs(10, 10), purged=9))
    device = await store.get_device("dev-1")
    assert device is not None and (device.last_seq, device.events_lost) == (10, 4)
    await add_device(store, "dev-2")
    await store.commit(SyncWrite("dev-2", time=3, events=evs(4, 4), purged=3))
    dev2 = await store.get_device("dev-2")
    assert dev2 is not None and (dev2.last_seq, dev2.events_lost) == (4, 3)


async def test_unknown_device_is_not_found_and_writes_nothing(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.commit(
            SyncWrite("ghost", time=1, docs=[DocWrite("a", b"u1")], events=evs(1, 1))
        )
    assert await store.load_doc("a") == DocLog()
    assert await store.read_events() == []
    assert await store.get_device("ghost") is None


async def test_device_write_without_events_updates_last_sync(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 2)))
    result = await store.commit(SyncWrite("dev-1", time=77, docs=[DocWrite("a", b"u1")]))
    assert (result.last_seq, result.stored, len(result.update_ids)) == (2, 0, 1)
    device = await store.get_device("dev-1")
    assert device is not None and (device.last_sync, device.last_seq) == (77, 2)


async def test_cloud_write_leaves_devices_alone(store: Store) -> None:
    await add_device(store)
    await write_docs(store, "a", b"u1")
    device = await store.get_device("dev-1")
    assert device is not None and device.last_sync is None


async def test_events_without_device_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.commit(SyncWrite(None, time=1, events=evs(1, 1)))
    assert await store.read_events() == []


async def test_read_events_filters_and_pages_in_arrival_order(store: Store) -> None:
    await add_device(store, "dev-a")
    await add_device(store, "dev-b")
    await store.commit(SyncWrite("dev-b", time=1, events=[ev(1, "temp"), ev(2, "door")]))
    await store.commit(SyncWrite("dev-a", time=2, events=[ev(1, "door")]))
    await store.commit(SyncWrite("dev-b", time=3, events=[ev(3, "temp")]))
    await store.commit(SyncWrite("dev-a", time=4, events=[ev(2, "temp"), ev(3, "temp")]))

    arrival = [("dev-b", 1), ("dev-b", 2), ("dev-a", 1), ("dev-b", 3), ("dev-a", 2), ("dev-a", 3)]
    assert await all_events(store) == arrival
    assert await all_events(store, device="dev-a") == [("dev-a", 1), ("dev-a", 2), ("dev-a", 3)]
    assert await all_events(store, topic="door") == [("dev-b", 2), ("dev-a", 1)]
    assert await all_events(store, device="dev-b", topic="temp") == [("dev-b", 1), ("dev-b", 3)]

    pages: list[list[tuple[str, int]]] = []
    after = 0
    while page := await store.read_events(after=after, limit=4):
        cursors = [e.cursor for e in page]
        assert cursors == sorted(cursors) and cursors[0] > after
        pages.append([(e.device, e.seq) for e in page])
        after = cursors[-1]
    assert pages == [arrival[:4], arrival[4:]]

    temps = await store.read_events(limit=2, topic="temp")
    rest = await store.read_events(after=temps[-1].cursor, topic="temp")
    assert [(e.device, e.seq) for e in temps + rest] == [
        ("dev-b", 1), ("dev-b", 3), ("dev-a", 2), ("dev-a", 3),
    ]
    assert await store.read_events(limit=0) == []
    with pytest.raises(ValueError):
        await store.read_events(limit=-1)


async def test_concurrent_commits_are_serialised(store: Store) -> None:
    names = [f"dev-{i}" for i in range(5)]
    for name in names:
        await add_device(store, name)
    results = await asyncio.gather(*(
        store.commit(SyncWrite(name, time=1, docs=[DocWrite("shared", name.encode())],
                               events=evs(1, 4)))
        for name in names
    ))
    ids = [r.update_ids[0] for r in results]
    assert len(set(ids)) == 5
    assert all(r.stored == 4 for r in results)
    assert len((await store.load_doc("shared")).updates) == 5
    cursors = [e.cursor for e in await store.read_events(limit=100)]
    assert len(cursors) == 20 and len(set(cursors)) == 20


# --- downlink ----------------------------------------------------------------------------


async def queue(store: Store, kind: str = "message", name: str = "note", body: Any = None,
                now: int = 10, expires: int | None = None, device: str = "dev-1") -> Downlink:
    return await store.queue_downlink(device, kind, name, {} if body is None else body,
                                      now=now, expires=expires)


async def statuses(store: Store, device: str = "dev-1") -> dict[int, str]:
    return {d.seq: d.status for d in await store.list_downlink(device, limit=1000)}


async def down_done(store: Store, device: str = "dev-1") -> int:
    record = await store.get_device(device)
    assert record is not None
    return record.down_done


async def test_queue_downlink_numbers_each_device_from_one(store: Store) -> None:
    await add_device(store, "dev-1")
    await add_device(store, "dev-2")
    body = {"nested": [1, 2.5, None, "é"], "n": 2**60}
    first = await queue(store, "message", "alerts", body, now=10, expires=99)
    assert first == Downlink(first.id, "dev-1", 1, "message", "alerts", body, created=10,
                             expires=99, status="queued", updated=10)
    assert (await queue(store, "command", "reboot")).seq == 2
    assert (await queue(store, device="dev-2")).seq == 1
    assert (await queue(store)).seq == 3
    assert await store.get_downlink(first.id) == first
    assert await store.get_downlink(first.id + 1000) is None
    dev1, dev2 = await store.get_device("dev-1"), await store.get_device("dev-2")
    assert dev1 is not None and (dev1.down_seq, dev1.down_done) == (3, 0)
    assert dev2 is not None and dev2.down_seq == 1

    first.body["nested"].append("mutated")  # a returned record shares nothing with the store
    stored = await store.get_downlink(first.id)
    assert stored is not None and stored.body == {"nested": [1, 2.5, None, "é"], "n": 2**60}


async def test_queue_downlink_refuses_unknown_device_and_kind(store: Store) -> None:
    await add_device(store)
    with pytest.raises(NotFound):
        await queue(store, device="ghost")
    with pytest.raises(ValueError, match="kind"):
        await queue(store, kind="event")
    assert await store.list_downlink("dev-1") == []
    assert await store.list_downlink("ghost") == []
    device = await store.get_device("dev-1")
    assert device is not None and device.down_seq == 0
    assert (await queue(store)).seq == 1


async def test_list_downlink_filters_and_pages(store: Store) -> None:
    await add_device(store)
    kinds = ["message", "command", "command", "message", "command"]
    for kind in kinds:
        await queue(store, kind)
    assert [d.seq for d in await store.list_downlink("dev-1")] == [1, 2, 3, 4, 5]
    assert [d.seq for d in await store.list_downlink("dev-1", kind="command")] == [2, 3, 5]
    assert [d.seq for d in await store.list_downlink("dev-1", after=2, limit=2)] == [3, 4]
    assert [d.seq for d in await store.list_downlink("dev-1", "command", 3, 1)] == [5]
    assert await store.list_downlink("dev-1", limit=0) == []
    with pytest.raises(ValueError):
        await store.list_downlink("dev-1", limit=-1)
    with pytest.raises(ValueError):
        await store.list_downlink("dev-1", kind="other")


async def test_pending_downlink_order_limit_and_delivery(store: Store) -> None:
    await add_device(store)
    for kind in ["message", "command", "message", "command"]:
        await queue(store, kind, now=10)
    sent = await store.pending_downlink("dev-1", now=20, limit=3)
    assert [(d.seq, d.kind, d.status) for d in sent] == [
        (1, "message", "queued"), (2, "command", "delivered"), (3, "message", "queued"),
    ]
    assert [d.updated for d in sent] == [10, 20, 10]
    for item in sent:  # returned as stored after the call
        assert await store.get_downlink(item.id) == item
    assert await statuses(store) == {1: "queued", 2: "delivered", 3: "queued", 4: "queued"}

    # Not acknowledged yet: everything above down_done is sent again, nothing is lost.
    again = await store.pending_downlink("dev-1", now=30, limit=10)
    assert [(d.seq, d.status) for d in again] == [
        (1, "queued"), (2, "delivered"), (3, "queued"), (4, "delivered"),
    ]
    assert again[1].updated == 20  # an already delivered command is not touched
    assert await store.pending_downlink("dev-1", now=30, limit=0) == []
    assert await down_done(store) == 0
    with pytest.raises(NotFound):
        await store.pending_downlink("ghost", now=30, limit=10)
    with pytest.raises(ValueError):
        await store.pending_downlink("dev-1", now=30, limit=-1)


async def test_pending_downlink_skips_and_marks_expired(store: Store) -> None:
    await add_device(store)
    await queue(store, "message", expires=100)  # expires exactly at now: expired
    await queue(store, "command", expires=50)
    await queue(store, "message")  # no expiry
    await queue(store, "command", expires=1000)
    await queue(store, "message", expires=99)  # beyond the limit: left for the next call
    sent = await store.pending_downlink("dev-1", now=100, limit=2)
    assert [d.seq for d in sent] == [3, 4]
    assert await statuses(store) == {
        1: "expired", 2: "expired", 3: "queued", 4: "delivered", 5: "queued",
    }
    expired = await store.list_downlink("dev-1", limit=2)
    assert [d.updated for d in expired] == [100, 100]

    # Only a queued (never sent) item expires: the delivered command is still sent.
    later = await store.pending_downlink("dev-1", now=2000, limit=10)
    assert [(d.seq, d.status) for d in later] == [(3, "queued"), (4, "delivered")]
    assert (await statuses(store))[5] == "expired"
    assert await down_done(store) == 0


async def test_commit_advances_down_done_and_delivers_messages(store: Store) -> None:
    await add_device(store)
    for kind in ["message", "message", "command", "message"]:
        await queue(store, kind, now=10)
    await store.pending_downlink("dev-1", now=20, limit=10)

    result = await store.commit(SyncWrite("dev-1", time=30, down_done=2))
    assert result.down_done == 2 and await down_done(store) == 2
    items = await store.list_downlink("dev-1")
    assert [(d.status, d.updated) for d in items] == [
        ("delivered", 30), ("delivered", 30), ("delivered", 20), ("queued", 10),
    ]
    assert [d.seq for d in await store.pending_downlink("dev-1", now=40, limit=10)] == [3, 4]

    # Never back; a write without down_done reports the stored value.
    assert (await store.commit(SyncWrite("dev-1", time=50, down_done=1))).down_done == 2
    assert (await store.commit(SyncWrite("dev-1", time=51))).down_done == 2

    # A command acknowledged without its result keeps waiting for it.
    result = await store.commit(SyncWrite("dev-1", time=60, down_done=99))
    assert result.down_done == 4  # clamped: nothing above down_seq was ever sent
    assert await statuses(store) == {1: "delivered", 2: "delivered", 3: "delivered",
                                     4: "delivered"}
    assert await store.pending_downlink("dev-1", now=70, limit=10) == []
    assert (await queue(store)).seq == 5
    assert [d.seq for d in await store.pending_downlink("dev-1", now=70, limit=10)] == [5]


async def test_expired_items_below_down_done_stay_expired(store: Store) -> None:
    await add_device(store)
    await queue(store, expires=5)
    await queue(store)
    assert [d.seq for d in await store.pending_downlink("dev-1", now=10, limit=10)] == [2]
    assert (await store.commit(SyncWrite("dev-1", time=20, down_done=2))).down_done == 2
    assert await statuses(store) == {1: "expired", 2: "delivered"}


async def test_command_results_are_stored_once(store: Store) -> None:
    await add_device(store)
    for kind in ["command", "command", "message", "command"]:
        await queue(store, kind)
    await store.pending_downlink("dev-1", now=20, limit=10)
    error = {"code": "busy", "message": "try later"}
    await store.commit(SyncWrite("dev-1", time=30, down_done=3, results=[
        CommandResult(1, True, {"rebooted": [1, 2]}),
        CommandResult(2, False, error=error),
        CommandResult(3, True, "a message has no result"),
        CommandResult(4, True, "above down_done"),
    ]))
    items = await store.list_downlink("dev-1")
    assert [(d.status, d.result, d.error, d.updated) for d in items] == [
        ("succeeded", {"rebooted": [1, 2]}, None, 30),
        ("failed", None, error, 30),
        ("delivered", None, None, 30),
        ("delivered", None, None, 20),
    ]

    # A replayed result changes nothing; a late one for an acknowledged command is stored
    # even by a write that does not move down_done.
    await store.commit(SyncWrite("dev-1", time=40, down_done=3, results=[
        CommandResult(1, False, error=error), CommandResult(2, True, "second try"),
    ]))
    await store.commit(SyncWrite("dev-1", time=50, down_done=4))
    assert (await statuses(store))[4] == "delivered"
    await store.commit(SyncWrite("dev-1", time=60, results=[CommandResult(4, True, None)]))
    assert await store.list_downlink("dev-1") == [
        *items[:3], dataclasses.replace(items[3], status="succeeded", updated=60),
    ]


async def test_result_for_a_command_never_sent_is_ignored(store: Store) -> None:
    await add_device(store)
    await queue(store, "command")
    await store.commit(SyncWrite("dev-1", time=30, down_done=1,
                                 results=[CommandResult(2, True, "no such seq")]))
    assert await statuses(store) == {1: "queued"}  # acknowledged, still no result


# --- proxied requests --------------------------------------------------------------------


def req(request_id: str, body: Any = None, device: str = "dev-1") -> ProxyRequest:
    return ProxyRequest(device=device, id=request_id, route="weather",
                        body={"id": request_id} if body is None else body, created=7)


async def finished(store: Store, request_id: str, now: int, device: str = "dev-1") -> None:
    assert await store.claim_request(device, request_id, now) is not None
    await store.finish_request(device, request_id, {"ok": True, "at": now}, now)


async def test_requests_are_inserted_once(store: Store) -> None:
    await add_device(store)
    await add_device(store, "dev-2")
    result = await store.commit(SyncWrite("dev-1", time=20, requests=[req("a"), req("b")]))
    assert result.new_requests == ("a", "b")
    assert await store.get_request("dev-1", "a") == ProxyRequest(
        "dev-1", "a", "weather", {"id": "a"}, created=7, status="pending", updated=20)

    replay = await store.commit(SyncWrite("dev-1", time=30, requests=[
        req("b", body="changed"), req("c"), req("c", body="twice"),
    ]))
    assert replay.new_requests == ("c",)
    b, c = await store.get_request("dev-1", "b"), await store.get_request("dev-1", "c")
    assert b is not None and (b.body, b.updated) == ({"id": "b"}, 20)
    assert c is not None and c.body == {"id": "c"}

    other = await store.commit(SyncWrite("dev-2", time=40, requests=[req("a", device="dev-2")]))
    assert other.new_requests == ("a",)
    assert await store.get_request("dev-2", "b") is None
    assert await store.get_request("ghost", "a") is None


async def test_requests_must_belong_to_the_writing_device(store: Store) -> None:
    await add_device(store)
    with pytest.raises(ValueError):
        await store.commit(SyncWrite("dev-1", time=1, requests=[req("a", device="dev-2")]))
    with pytest.raises(ValueError):
        await store.commit(SyncWrite(None, time=1, requests=[req("a")]))
    with pytest.raises(ValueError):
        await store.commit(SyncWrite(None, time=1, down_done=1))
    assert await store.get_request("dev-1", "a") is None


async def test_claim_request_at_most_once(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=20, requests=[req("a"), req("b")]))
    claimed = await store.claim_request("dev-1", "a", now=30)
    assert claimed == ProxyRequest("dev-1", "a", "weather", {"id": "a"}, created=7,
                                   status="running", updated=30)
    assert await store.claim_request("dev-1", "a", now=31) is None
    assert await store.claim_request("dev-1", "missing", now=31) is None
    assert await store.get_request("dev-1", "a") == claimed

    racers = await asyncio.gather(*(store.claim_request("dev-1", "b", now=40 + i)
                                    for i in range(8)))
    winners = [r for r in racers if r is not None]
    assert len(winners) == 1 and winners[0].status == "running"
    await store.commit(SyncWrite("dev-1", time=50, requests=[req("b")]))  # replay
    assert await store.claim_request("dev-1", "b", now=60) is None


async def test_finish_request_and_undelivered_outcomes(store: Store) -> None:
    await add_device(store)
    await add_device(store, "dev-2")
    ids = ["a", "b", "c", "d", "e"]
    await store.commit(SyncWrite("dev-1", time=20, requests=[req(i) for i in ids]))
    await store.commit(SyncWrite("dev-2", time=20, requests=[req("x", device="dev-2")]))
    await finished(store, "c", now=30)
    await finished(store, "b", now=40)
    await finished(store, "a", now=40)
    await finished(store, "x", now=10, device="dev-2")
    assert await store.claim_request("dev-1", "d", now=50) is not None

    # Only a running request finishes: neither a pending one nor a second outcome.
    await store.finish_request("dev-1", "e", {"ok": False}, now=60)
    await store.finish_request("dev-1", "c", {"ok": False}, now=60)
    await store.finish_request("dev-1", "missing", {"ok": False}, now=60)
    e, c = await store.get_request("dev-1", "e"), await store.get_request("dev-1", "c")
    assert e is not None and (e.status, e.outcome) == ("pending", None)
    assert c is not None and (c.status, c.outcome, c.updated) == (
        "done", {"ok": True, "at": 30}, 30)

    outcomes = await store.undelivered_outcomes("dev-1", limit=10)
    assert [(r.id, r.updated) for r in outcomes] == [("c", 30), ("a", 40), ("b", 40)]
    assert [r.id for r in await store.undelivered_outcomes("dev-1", limit=2)] == ["c", "a"]
    assert await store.undelivered_outcomes("dev-1", limit=0) == []
    with pytest.raises(ValueError):
        await store.undelivered_outcomes("dev-1", limit=-1)

    await store.commit(SyncWrite("dev-1", time=70, outcomes_acked=["a", "d", "e", "zz"]))
    records = {i: await store.get_request("dev-1", i) for i in ids}
    assert {i: r.status for i, r in records.items() if r is not None} == {
        "a": "acked", "b": "done", "c": "done", "d": "running", "e": "pending",
    }
    a = records["a"]
    assert a is not None and (a.outcome, a.updated) == ({"ok": True, "at": 40}, 70)
    assert [r.id for r in await store.undelivered_outcomes("dev-1", limit=10)] == ["c", "b"]
    assert [r.id for r in await store.undelivered_outcomes("dev-2", limit=10)] == ["x"]


async def test_interrupt_running_finishes_orphans(store: Store) -> None:
    await add_device(store)
    await add_device(store, "dev-2")
    await store.commit(SyncWrite("dev-1", time=20, requests=[req("a"), req("b"), req("c")]))
    await store.commit(SyncWrite("dev-2", time=20, requests=[req("a", device="dev-2")]))
    await store.claim_request("dev-1", "a", now=30)
    await store.claim_request("dev-2", "a", now=30)
    await finished(store, "b", now=35)
    outcome = {"ok": False, "code": "interrupted"}
    assert await store.interrupt_running(outcome, now=40) == 2
    for device in ["dev-1", "dev-2"]:
        r = await store.get_request(device, "a")
        assert r is not None and (r.status, r.outcome, r.updated) == ("done", outcome, 40)
    b, c = await store.get_request("dev-1", "b"), await store.get_request("dev-1", "c")
    assert b is not None and (b.outcome, b.updated) == ({"ok": True, "at": 35}, 35)
    assert c is not None and c.status == "pending"
    assert await store.claim_request("dev-1", "a", now=50) is None  # never run twice
    assert await store.interrupt_running(outcome, now=60) == 0


# --- downlink and requests commit with the events, or not at all -------------------------


async def test_seq_conflict_stores_no_downlink_or_request_change(store: Store) -> None:
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=1, events=evs(1, 2),
                                 requests=[req("done"), req("pending")]))
    await finished(store, "done", now=2)
    await queue(store, "message")
    await queue(store, "command")
    await store.pending_downlink("dev-1", now=3, limit=10)
    before = (await store.list_downlink("dev-1"), await store.get_device("dev-1"),
              await store.get_request("dev-1", "done"))

    with pytest.raises(SeqConflict):
        await store.commit(SyncWrite(
            "dev-1", time=9, docs=[DocWrite("a", b"u1")],
            events=[ev(2, body={"other": True}), ev(3)],
            down_done=2, results=[CommandResult(2, True, "ran")],
            requests=[req("new")], outcomes_acked=["done"],
        ))
    after = (await store.list_downlink("dev-1"), await store.get_device("dev-1"),
             await store.get_request("dev-1", "done"))
    assert after == before
    assert await store.get_request("dev-1", "new") is None
    assert await store.load_doc("a") == DocLog()

    # The same write without the conflict stores all of it.
    result = await store.commit(SyncWrite(
        "dev-1", time=10, events=[ev(3)], down_done=2,
        results=[CommandResult(2, True, "ran")], requests=[req("new")],
        outcomes_acked=["done"],
    ))
    assert (result.last_seq, result.down_done, result.new_requests) == (3, 2, ("new",))
    assert await statuses(store) == {1: "delivered", 2: "succeeded"}
    acked = await store.get_request("dev-1", "done")
    assert acked is not None and acked.status == "acked"


# --- devices -----------------------------------------------------------------------------


async def test_device_roundtrip(store: Store) -> None:
    record = DeviceRecord(
        id="dev-1", token_hash="h", created=10, last_sync=20, last_seq=5, events_lost=1,
        meta={"site": "north", "tags": ["a", "b"], "n": 3}, down_seq=7, down_done=4,
    )
    await store.add_device(record)
    assert await store.get_device("dev-1") == record
    assert await store.get_device("dev-2") is None


async def test_duplicate_device_is_refused(store: Store) -> None:
    await add_device(store)
    with pytest.raises(AlreadyExists):
        await store.add_device(DeviceRecord(id="dev-1", token_hash="other", created=99))
    device = await store.get_device("dev-1")
    assert device is not None and (device.token_hash, device.created) == ("hash-dev-1", 1)


async def test_list_devices_pages_by_id(store: Store) -> None:
    for name in ["dev-c", "dev-a", "dev-e", "dev-b", "dev-d"]:
        await add_device(store, name)
    first = await store.list_devices(limit=2)
    assert [d.id for d in first] == ["dev-a", "dev-b"]
    second = await store.list_devices(after=first[-1].id, limit=2)
    assert [d.id for d in second] == ["dev-c", "dev-d"]
    assert [d.id for d in await store.list_devices(after="dev-d")] == ["dev-e"]
    assert await store.list_devices(after="dev-e") == []
    assert await store.list_devices(limit=0) == []
    assert [d.id for d in await store.list_devices()] == [f"dev-{c}" for c in "abcde"]


async def test_device_by_token_finds_the_device_of_a_hash(store: Store) -> None:
    one = await add_device(store, "dev-1", meta={"k": 1})
    await add_device(store, "dev-2")
    assert await store.device_by_token("hash-dev-1") == one
    found = await store.device_by_token("hash-dev-2")
    assert found is not None and found.id == "dev-2"
    assert await store.device_by_token("hash-dev-3") is None
    assert await store.device_by_token("") is None
    # Hashes of random tokens never collide; shared ones (tests, benches) find the lowest id.
    for device in ("dev-9", "dev-0"):
        await store.add_device(DeviceRecord(device, "shared", created=1))
    assert (await store.device_by_token("shared")).id == "dev-0"  # type: ignore[union-attr]
    await store.delete_device("dev-0", [])
    assert (await store.device_by_token("shared")).id == "dev-9"  # type: ignore[union-attr]
    await store.update_device("dev-9", token_hash="own")
    assert await store.device_by_token("shared") is None


async def test_update_device_replaces_the_token_hash_at_once(store: Store) -> None:
    record = await add_device(store, last_seq=4, meta={"site": "north"})
    rotated = await store.update_device("dev-1", token_hash="new-hash")
    assert rotated == dataclasses.replace(record, token_hash="new-hash")
    assert await store.get_device("dev-1") == rotated
    assert await store.device_by_token("hash-dev-1") is None  # the old hash finds nothing
    assert await store.device_by_token("new-hash") == rotated


async def test_update_device_disables_and_enables(store: Store) -> None:
    record = await add_device(store)
    assert not record.disabled
    disabled = await store.update_device("dev-1", disabled=True)
    assert disabled == dataclasses.replace(record, disabled=True)
    assert await store.device_by_token("hash-dev-1") == disabled  # still found: refused later
    assert await store.update_device("dev-1") == disabled  # nothing given: nothing changes
    assert await store.update_device("dev-1", disabled=False) == record
    assert await store.get_device("dev-1") == record


async def test_update_device_refuses_an_unknown_device(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        await store.update_device("ghost", token_hash="h", disabled=True)
    assert info.value.detail == {"device": "ghost"}
    assert await store.device_by_token("h") is None


async def owned_by(store: Store, device: str) -> None:
    """Give ``device`` a document, a projection row, events, a state change, a queued
    message and a proxied request."""
    await store.commit(SyncWrite(device, 10, docs=[DocWrite(f"{device}/state", b"u1")],
                                 events=evs(1, 2), requests=[req("r1", device=device)],
                                 changes=[change(device, {"state": {"k": 1}})]))
    await queue(store, device=device)


async def test_delete_device_removes_what_it_owns_and_keeps_its_feed(store: Store) -> None:
    for device in ("dev-1", "dev-2"):
        await add_device(store, device)
        await owned_by(store, device)
    held = (await store.load_doc("dev-1/state")).last_id
    feed_before = await store.read_feed()

    await store.delete_device("dev-1", ["dev-1/state"])
    assert await store.get_device("dev-1") is None
    assert await store.device_by_token("hash-dev-1") is None
    log = await store.load_doc("dev-1/state")
    assert (log.gen, log.snapshot, log.updates) == (0, b"", ())
    assert log.snapshot_id > held  # every copy read before is out of date:
    assert await store.read_since("dev-1/state", held) is None  # its holder reloads
    assert [r.device for r in await store.read_projection()] == ["dev-2"]
    assert await store.list_downlink("dev-1") == []
    assert await store.get_request("dev-1", "r1") is None
    assert await store.undelivered_outcomes("dev-1", 10) == []
    assert await store.read_feed() == feed_before  # events and state changes stay
    assert await all_events(store) == [("dev-1", 1), ("dev-1", 2), ("dev-2", 1), ("dev-2", 2)]
    # The other device is untouched.
    assert (await store.load_doc("dev-2/state")).updates != ()
    assert len(await store.list_downlink("dev-2")) == 1
    assert await store.get_request("dev-2", "r1") is not None
    later = await queue(store, device="dev-2")
    assert len({d.id for d in await store.list_downlink("dev-2")}) == 2 == later.seq


async def test_delete_device_with_its_events_empties_its_feed(store: Store) -> None:
    for device in ("dev-1", "dev-2"):
        await add_device(store, device)
        await owned_by(store, device)
    await store.delete_device("dev-1", ["dev-1/state"], events=True)
    assert {i.device for i in await store.read_feed()} == {"dev-2"}
    assert await all_events(store) == [("dev-2", 1), ("dev-2", 2)]
    assert len(await store.read_feed(where=FeedFilter(device="dev-2"))) == 3


async def test_delete_device_refuses_an_unknown_device(store: Store) -> None:
    await add_device(store)
    await owned_by(store, "dev-1")
    with pytest.raises(NotFound) as info:
        await store.delete_device("ghost", ["dev-1/state"], events=True)
    assert info.value.detail == {"device": "ghost"}
    assert (await store.load_doc("dev-1/state")).updates != ()
    assert len(await store.read_feed()) == 3


async def test_a_recreated_device_starts_above_the_seqs_of_the_deleted_one(
        store: Store) -> None:
    await add_device(store)
    await owned_by(store, "dev-1")
    await store.delete_device("dev-1", ["dev-1/state"], events=True)
    await store.add_device(DeviceRecord("dev-1", "hash-new", created=2))
    device = await store.get_device("dev-1")
    assert device is not None and (device.seq_floor, device.last_seq) == (2, 2)
    assert (device.down_seq, device.events_lost) == (0, 0)
    assert (await store.load_doc("dev-1/state")).updates == ()
    # A fresh outbox numbers from 1: never a replay of the old device's events (they are
    # gone here, so no digest would tell), always a conflict to renumber past.
    with pytest.raises(SeqConflict) as info:
        await store.commit(SyncWrite("dev-1", 20, events=evs(1, 2)))
    assert info.value.detail == {"seq": 1, "last_seq": 2}
    result = await store.commit(SyncWrite("dev-1", 21, events=evs(3, 4)))
    assert (result.stored, result.last_seq) == (2, 4)
    assert [i.key for i in await store.read_feed()] == ["ev:dev-1:3", "ev:dev-1:4"]
    # Deleted again, then created again: the floor only moves up.
    await store.delete_device("dev-1", ["dev-1/state"])
    await store.add_device(DeviceRecord("dev-1", "hash-3", created=3))
    again = await store.get_device("dev-1")
    assert again is not None and (again.seq_floor, again.last_seq) == (4, 4)


# --- fleets ------------------------------------------------------------------------------


async def add_fleet(store: Store, fleet_id: str = "north", **kw: Any) -> FleetRecord:
    record = FleetRecord(id=fleet_id, created=5, **kw)
    await store.add_fleet(record)
    return record


async def test_fleet_roundtrip(store: Store) -> None:
    record = await add_fleet(store, meta={"region": "eu", "tags": ["a"], "n": 2})
    assert await store.get_fleet("north") == record
    assert record.to_json() == {"id": "north", "created": 5,
                                "meta": {"region": "eu", "tags": ["a"], "n": 2}}
    assert await store.get_fleet("south") is None


async def test_fleet_meta_is_a_copy(store: Store) -> None:
    meta: dict[str, Any] = {"tags": ["a"]}
    await add_fleet(store, meta=meta)
    meta["tags"].append("b")
    fleet = await store.get_fleet("north")
    assert fleet is not None and fleet.meta == {"tags": ["a"]}


async def test_duplicate_fleet_is_refused(store: Store) -> None:
    await add_fleet(store, meta={"v": 1})
    with pytest.raises(AlreadyExists) as info:
        await store.add_fleet(FleetRecord(id="north", created=99, meta={"v": 2}))
    assert info.value.detail == {"fleet": "north"}
    assert await store.get_fleet("north") == FleetRecord("north", 5, {"v": 1})


async def test_list_fleets_pages_by_id(store: Store) -> None:
    for name in ["f-c", "f-a", "f-d", "f-b"]:
        await add_fleet(store, name)
    first = await store.list_fleets(limit=3)
    assert [f.id for f in first] == ["f-a", "f-b", "f-c"]
    assert [f.id for f in await store.list_fleets(after=first[-1].id)] == ["f-d"]
    assert await store.list_fleets(after="f-d") == []
    assert await store.list_fleets(limit=0) == []
    with pytest.raises(ValueError):
        await store.list_fleets(limit=-1)


async def test_new_device_has_no_fleet(store: Store) -> None:
    await add_device(store)
    device = await store.get_device("dev-1")
    assert device is not None and (device.fleet, device.fleet_gen) == (None, 0)


async def test_add_device_in_a_fleet(store: Store) -> None:
    await add_fleet(store)
    record = await add_device(store, fleet="north", fleet_gen=3)
    assert await store.get_device("dev-1") == record
    assert await store.devices_in_fleet("north") == [record]


async def test_add_device_in_unknown_fleet_is_refused(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        await add_device(store, fleet="nowhere")
    assert info.value.detail == {"fleet": "nowhere"}
    assert await store.get_device("dev-1") is None


async def test_set_device_fleet_bumps_gen_on_change_only(store: Store) -> None:
    await add_fleet(store, "north")
    await add_fleet(store, "south")
    await add_device(store, meta={"k": "v"}, last_seq=4)
    steps = [("north", 1), ("north", 1), ("south", 2), (None, 3), (None, 3), ("north", 4)]
    for fleet, gen in steps:
        returned = await store.set_device_fleet("dev-1", fleet, now=100)
        assert (returned.fleet, returned.fleet_gen) == (fleet, gen)
        assert await store.get_device("dev-1") == returned
    assert (returned.meta, returned.last_seq, returned.token_hash) == ({"k": "v"}, 4,
                                                                       "hash-dev-1")


async def test_set_device_fleet_refuses_unknown_device_or_fleet(store: Store) -> None:
    await add_fleet(store)
    await add_device(store)
    await store.set_device_fleet("dev-1", "north", now=1)
    with pytest.raises(NotFound) as info:
        await store.set_device_fleet("dev-1", "nowhere", now=2)
    assert info.value.detail == {"fleet": "nowhere"}
    with pytest.raises(NotFound) as info:
        await store.set_device_fleet("ghost", "north", now=2)
    assert info.value.detail == {"device": "ghost"}
    with pytest.raises(NotFound):
        await store.set_device_fleet("ghost", None, now=2)
    device = await store.get_device("dev-1")
    assert device is not None and (device.fleet, device.fleet_gen) == ("north", 1)
    assert await store.get_device("ghost") is None


async def test_devices_in_fleet_pages_by_id(store: Store) -> None:
    await add_fleet(store, "north")
    await add_fleet(store, "south")
    for name in ["dev-c", "dev-a", "dev-e", "dev-b", "dev-d", "dev-x"]:
        await add_device(store, name)
    for name in ["dev-c", "dev-a", "dev-e", "dev-d"]:
        await store.set_device_fleet(name, "north", now=1)
    await store.set_device_fleet("dev-b", "south", now=1)
    first = await store.devices_in_fleet("north", limit=2)
    assert [d.id for d in first] == ["dev-a", "dev-c"]
    assert all((d.fleet, d.fleet_gen) == ("north", 1) for d in first)
    assert [d.id for d in await store.devices_in_fleet("north", after="dev-c")] == [
        "dev-d", "dev-e"]
    assert [d.id for d in await store.devices_in_fleet("south")] == ["dev-b"]
    assert await store.devices_in_fleet("north", limit=0) == []
    assert await store.devices_in_fleet("nowhere") == []
    await store.set_device_fleet("dev-c", None, now=2)
    assert [d.id for d in await store.devices_in_fleet("north")] == ["dev-a", "dev-d", "dev-e"]


async def test_sync_commit_keeps_the_fleet(store: Store) -> None:
    await add_fleet(store)
    await add_device(store)
    await store.set_device_fleet("dev-1", "north", now=1)
    await store.commit(SyncWrite("dev-1", time=10, events=evs(1, 2)))
    await queue(store, now=11)
    device = await store.get_device("dev-1")
    assert device is not None
    assert (device.fleet, device.fleet_gen, device.last_seq, device.down_seq) == (
        "north", 1, 2, 1)


# --- settings and lifecycle --------------------------------------------------------------


async def test_settings_roundtrip(store: Store) -> None:
    assert await store.get_setting("admin_token_hash") is None
    await store.set_setting("admin_token_hash", "abc")
    await store.set_setting("other", "1")
    assert await store.get_setting("admin_token_hash") == "abc"
    await store.set_setting("admin_token_hash", "def")
    assert await store.get_setting("admin_token_hash") == "def"
    assert await store.get_setting("other") == "1"


async def test_closed_store_refuses_calls(store: Store) -> None:
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await store.load_doc("a")
    with pytest.raises(ClosedError):
        await store.commit(SyncWrite(None, time=1, docs=[DocWrite("a", b"u")]))
    with pytest.raises(ClosedError):
        await store.queue_downlink("dev-1", "message", "t", {}, now=1, expires=None)
    with pytest.raises(ClosedError):
        await store.claim_request("dev-1", "r1", now=1)
    with pytest.raises(ClosedError):
        await store.set_device_fleet("dev-1", None, now=1)
    with pytest.raises(ClosedError):
        await store.open()


async def test_purge_finished_keeps_open_and_recent_items(store: Store) -> None:
    await add_device(store, "dev-1")
    delivered = await queue(store, now=10)
    open_command = await queue(store, "command", "reboot", now=10)
    await store.commit(SyncWrite("dev-1", time=20, down_done=1,
                                 requests=[req("a"), req("b")]))
    assert (await store.claim_request("dev-1", "a", 21)) is not None
    await store.finish_request("dev-1", "a", {"ok": True}, 22)
    await store.commit(SyncWrite("dev-1", time=23, outcomes_acked=["a"]))
    recent = await queue(store, now=1000)
    await store.commit(SyncWrite("dev-1", time=1000, down_done=recent.seq - 1))

    assert await store.purge_finished(before=500) == 2  # the delivered message, request "a"
    assert await store.get_downlink(delivered.id) is None
    assert await store.get_downlink(open_command.id) is not None  # never finished
    assert await store.get_downlink(recent.id) is not None  # not yet acknowledged
    assert await store.get_request("dev-1", "a") is None
    assert (await store.get_request("dev-1", "b")) is not None  # still pending
    assert await store.purge_finished(before=500) == 0


async def test_touch_devices_moves_last_sync_forward_only(store: Store) -> None:
    await add_device(store, "dev-1")
    await add_device(store, "dev-2")
    await store.touch_devices({"dev-1": 100, "dev-2": 50, "nobody": 10})
    await store.touch_devices({"dev-1": 90})  # older: ignored
    one, two = await store.get_device("dev-1"), await store.get_device("dev-2")
    assert one is not None and one.last_sync == 100
    assert two is not None and two.last_sync == 50
    assert await store.get_device("nobody") is None


# --- the change feed and the state projection ---------------------------------------------


def change(device: str, changes: dict[str, dict[str, Any]], source: str = "device"
           ) -> StateChange:
    return StateChange(device, "state", changes, source)


async def test_feed_holds_events_and_changes_in_commit_order(store: Store) -> None:
    await store.add_fleet(FleetRecord("north", created=1))
    await add_device(store, "a", fleet="north")
    await add_device(store, "b")
    await store.commit(SyncWrite("a", 10, events=evs(1, 2),
                                 changes=[change("a", {"state": {"v": 3.7, "gone": None}})]))
    await store.commit(SyncWrite("b", 11, events=evs(1, 1, "hum")))
    await store.commit(SyncWrite(None, 12, changes=[change("b", {"state": {"x": 1}}, "cloud")]))
    items = await store.read_feed()
    assert [(i.cursor, i.kind, i.device, i.fleet, i.seq, i.topic) for i in items] == [
        (1, "event", "a", "north", 1, "temp"), (2, "event", "a", "north", 2, "temp"),
        (3, "state", "a", "north", None, None), (4, "event", "b", None, 1, "hum"),
        (5, "state", "b", None, None, None)]
    assert items[0].body == {"seq": 1} and items[0].time == 1001 and items[0].received == 10
    assert (items[2].doc, items[2].body, items[2].source, items[2].time) == (
        "state", {"state": {"v": 3.7, "gone": None}}, "device", 10)
    assert (items[4].source, items[4].received) == ("cloud", 12)
    assert [i.key for i in items] == ["ev:a:1", "ev:a:2", "st:3", "ev:b:1", "st:5"]
    assert await store.feed_head() == 5
    assert [i.cursor for i in await store.read_feed(after=2, limit=2)] == [3, 4]


async def test_feed_filters(store: Store) -> None:
    await store.add_fleet(FleetRecord("north", created=1))
    await add_device(store, "a", fleet="north")
    await add_device(store, "b")
    await store.commit(SyncWrite("a", 10, events=[ev(1, "temp"), ev(2, "hum")],
                                 changes=[change("a", {"state": {"k": 1}})]))
    await store.commit(SyncWrite("b", 11, events=[ev(1, "temp")]))

    async def cursors(**kw: str) -> list[int]:
        return [i.cursor for i in await store.read_feed(where=FeedFilter(**kw))]

    assert await cursors(device="b") == [4]
    assert await cursors(fleet="north") == [1, 2, 3]
    assert await cursors(topic="temp") == [1, 4]
    assert await cursors(kind="state") == [3]
    assert await cursors(kind="event", device="a") == [1, 2]
    assert await cursors(device="nobody") == []
    with pytest.raises(ValueError):
        FeedFilter(kind="nope")


async def test_replayed_and_refused_writes_add_nothing_to_the_feed(store: Store) -> None:
    await add_device(store, "a")
    await store.commit(SyncWrite("a", 10, events=evs(1, 2)))
    await store.commit(SyncWrite("a", 11, events=evs(1, 2)))  # a replay
    with pytest.raises(SeqGap):
        await store.commit(SyncWrite("a", 12, events=evs(9, 9),
                                     changes=[change("a", {"state": {"k": 1}})]))
    assert [i.seq for i in await store.read_feed()] == [1, 2]
    assert await store.read_projection() == []


async def test_projection_follows_changes(store: Store) -> None:
    await add_device(store, "a")
    await add_device(store, "b")
    await store.commit(SyncWrite("a", 10, changes=[
        change("a", {"state": {"v": 3.7, "on": True}, "config": {"mode": {"x": [1]}}})]))
    await store.commit(SyncWrite("b", 11, changes=[change("b", {"state": {"v": 1}})]))
    await store.commit(SyncWrite(None, 12, changes=[
        change("a", {"state": {"v": 3.8, "on": None}}, "cloud")]))
    rows = await store.read_projection()
    assert [(r.device, r.doc, r.map, r.key, r.value, r.updated) for r in rows] == [
        ("a", "state", "config", "mode", {"x": [1]}, 10),
        ("a", "state", "state", "v", 3.8, 12),
        ("b", "state", "state", "v", 1, 11)]
    assert [r.key for r in await store.read_projection(device="b")] == ["v"]
    assert [r.device for r in await store.read_projection(
        after=("a", "state", "state", "v"))] == ["b"]
    assert len(await store.read_projection(limit=1)) == 1

    await store.replace_projection("a", "state", {"state": {"w": 2, "z": None}}, 20)
    assert [(r.device, r.map, r.key, r.value, r.updated)
            for r in await store.read_projection()] == [
        ("a", "state", "w", 2, 20), ("b", "state", "v", 1, 11)]


async def test_a_change_must_belong_to_the_writing_device(store: Store) -> None:
    await add_device(store, "a")
    with pytest.raises(ValueError):
        await store.commit(SyncWrite("a", 10, changes=[change("b", {"state": {"k": 1}})]))
    with pytest.raises(ValueError):
        await store.commit(SyncWrite("a", 10, conflicts=[conflict_record("b")]))
    assert await store.read_feed() == []


def conflict_record(device: str, key: str = "k") -> ConflictRecord:
    return ConflictRecord(device, "state", Conflict(
        "state", key, WriteInfo("cloud", 1_000, {"on": [1, 2.5]}),
        WriteInfo("device", 900, None, True)))


async def test_conflicts_are_feed_items_after_the_changes(store: Store) -> None:
    await store.add_fleet(FleetRecord("north", created=1))
    await add_device(store, "a", fleet="north")
    await store.commit(SyncWrite("a", 10, events=evs(1, 1),
                                 changes=[change("a", {"state": {"v": 1}})],
                                 conflicts=[conflict_record("a", "x"), conflict_record("a")]))
    await store.commit(SyncWrite(None, 11, conflicts=[conflict_record("a", "y")]))
    items = await store.read_feed()
    assert [(i.kind, i.key, i.device, i.fleet, i.doc, i.time, i.received) for i in items] == [
        ("event", "ev:a:1", "a", "north", None, 1001, 10),
        ("state", "st:2", "a", "north", "state", 10, 10),
        ("conflict", "cf:3", "a", "north", "state", 10, 10),
        ("conflict", "cf:4", "a", "north", "state", 10, 10),
        ("conflict", "cf:5", "a", "north", "state", 11, 11)]
    body = {"map": "state", "key": "k",
            "winner": {"writer": "cloud", "time": 1_000, "value": {"on": [1, 2.5]}},
            "loser": {"writer": "device", "time": 900, "deleted": True}}
    assert items[3].body == body
    assert items[3].to_json() == {
        "cursor": "4", "key": "cf:4", "kind": "conflict", "device": "a", "fleet": "north",
        "time": 10, "received": 10, "doc": "state", "conflict": body}
    assert [i.cursor for i in await store.read_feed(where=FeedFilter(kind="conflict"))] == [
        3, 4, 5]
    assert await store.read_projection() == [  # a conflict changes no value by itself
        ProjectionRow("a", "state", "state", "v", 1, 10)]


async def test_commit_reports_what_each_document_reflected_before(store: Store) -> None:
    """``prev_ids``: the highest id a document reflected before the write (rows or
    snapshot), so a cache knows whether someone else wrote it in between."""
    first = await store.commit(SyncWrite(None, 1, docs=[DocWrite("a", b"1"), DocWrite("b", b"1")]))
    assert first.prev_ids == (0, 0)
    second = await store.commit(SyncWrite(None, 2, docs=[DocWrite("a", b"2")]))
    assert second.prev_ids == (first.update_ids[0],)
    await store.compact("a", second.update_ids[0], b"snap")
    third = await store.commit(SyncWrite(None, 3, docs=[DocWrite("a", b"3"), DocWrite("b", b"2")]))
    assert third.prev_ids == (second.update_ids[0], first.update_ids[1])


async def test_purge_feed_cuts_the_oldest_items_as_a_prefix(store: Store) -> None:
    await add_device(store, "a")
    await store.commit(SyncWrite("a", 10, events=evs(1, 2)))  # cursors 1, 2
    await store.commit(SyncWrite("a", 20, changes=[change("a", {"state": {"k": 1}})]))  # 3
    await store.commit(SyncWrite("a", 12, events=evs(3, 3)))  # 4: received earlier than 3
    await store.commit(SyncWrite("a", 30, events=evs(4, 4)))  # 5
    assert await store.feed_floor() == 0
    assert await store.purge_feed(before=10, keep_after=5) == 0  # nothing received before 10
    # Received before 25: 1, 2, 3 and 4, but a sink still needs what follows cursor 2.
    assert await store.purge_feed(before=25, keep_after=2) == 2
    assert await store.feed_floor() == 2
    assert [i.cursor for i in await store.read_feed()] == [3, 4, 5]
    # The cut stops at the first young item (5), even if later ones were old.
    assert await store.purge_feed(before=25, keep_after=5) == 2
    assert [i.cursor for i in await store.read_feed()] == [5]
    assert (await store.feed_floor(), await store.feed_head()) == (4, 5)
    assert [e.seq for e in await store.read_events()] == [4]  # the events view follows


async def test_a_purged_feed_keeps_its_head_and_never_reuses_a_cursor(store: Store) -> None:
    await add_device(store, "a")
    await store.commit(SyncWrite("a", 10, events=evs(1, 3)))
    assert await store.purge_feed(before=11, keep_after=3) == 3
    assert await store.read_feed() == []
    assert (await store.feed_head(), await store.feed_floor()) == (3, 3)
    await store.commit(SyncWrite("a", 20, events=evs(4, 4)))
    assert [(i.cursor, i.seq) for i in await store.read_feed()] == [(4, 4)]
    assert (await store.get_device("a")).last_seq == 4  # type: ignore[union-attr]


async def test_a_replay_of_purged_events_stores_nothing_twice(store: Store) -> None:
    """Dedup rests on the device's ``last_seq``, not on the purged rows."""
    await add_device(store, "a")
    await store.commit(SyncWrite("a", 10, events=evs(1, 3)))
    await store.purge_feed(before=11, keep_after=2)
    result = await store.commit(SyncWrite("a", 20, events=evs(1, 4)))  # 1-3 replayed, 4 new
    assert (result.last_seq, result.stored) == (4, 1)
    assert [i.seq for i in await store.read_feed()] == [3, 4]


# --- downstream sinks: configuration, progress, dead letters -------------------------------


def sink_config(name: str = "hook", **kw: Any) -> SinkConfig:
    return SinkConfig(name, "webhook", {"url": "http://127.0.0.1:9/x", "secret": "s"}, **kw)


async def feed_items(store: Store, count: int) -> list[FeedItem]:
    await add_device(store, "sinker")
    await store.commit(SyncWrite("sinker", 10, events=evs(1, count)))
    return await store.read_feed(limit=count)


async def test_put_sink_creates_and_reconfigures_keeping_progress(store: Store) -> None:
    config = sink_config(where=FeedFilter(device="a"), batch=5, max_attempts=3, backoff=0.1,
                         max_backoff=2.0)
    created = await store.put_sink(config, 100, start=7)
    assert created.config == config
    assert (created.origin, created.paused, created.cursor, created.created,
            created.updated) == ("api", False, 7, 100, 100)
    assert (created.delivered, created.failures, created.dead_letters) == (0, 0, 0)
    await store.sink_delivered("hook", 9, 2, 110)
    changed = sink_config(where=FeedFilter(kind="event"), batch=50)
    again = await store.put_sink(changed, 120, origin="file", paused=True, start=0)
    assert again.config == changed
    assert (again.origin, again.paused, again.cursor, again.delivered, again.created,
            again.updated) == ("file", True, 9, 2, 100, 120)
    assert await store.get_sink("hook") == again
    assert await store.get_sink("nothing") is None
    with pytest.raises(ValueError):
        await store.put_sink(sink_config("other"), 1, origin="nowhere")


async def test_sink_options_are_a_copy(store: Store) -> None:
    options: dict[str, Any] = {"url": "http://x", "headers": {"A": "1"}}
    await store.put_sink(SinkConfig("hook", "webhook", options), 1)
    options["headers"]["A"] = "2"
    stored = await store.get_sink("hook")
    assert stored is not None and stored.config.options == {"url": "http://x",
                                                            "headers": {"A": "1"}}
    stored.config.options["url"] = "changed"  # type: ignore[index]
    again = await store.get_sink("hook")
    assert again is not None and again.config.options["url"] == "http://x"


async def test_list_and_delete_sinks(store: Store) -> None:
    for name in ("b", "a", "c"):
        await store.put_sink(sink_config(name), 1)
    assert [s.name for s in await store.list_sinks()] == ["a", "b", "c"]
    await store.delete_sink("b")
    assert [s.name for s in await store.list_sinks()] == ["a", "c"]
    with pytest.raises(NotFound):
        await store.delete_sink("b")


async def test_sink_cursor_only_moves_forward(store: Store) -> None:
    await store.put_sink(sink_config(), 1)
    await store.sink_failed("hook", "boom", 5)
    await store.sink_delivered("hook", 10, 4, 20)
    await store.sink_delivered("hook", 6, 1, 21)  # an older page: counted, cursor stays
    await store.sink_delivered("hook", 12, 0, 22)  # skipped items only
    record = await store.get_sink("hook")
    assert record is not None
    assert (record.cursor, record.delivered, record.last_delivered_at) == (12, 5, 21)
    await store.sink_delivered("nobody", 5, 1, 1)  # unknown: nothing happens
    assert await store.get_sink("nobody") is None


async def test_sink_failures_are_counted_until_a_delivery(store: Store) -> None:
    await store.put_sink(sink_config(), 1)
    await store.sink_failed("hook", "first", 5)
    await store.sink_failed("hook", "second", 6)
    record = await store.get_sink("hook")
    assert record is not None
    assert (record.failures, record.consecutive_failures, record.last_error,
            record.last_error_at) == (2, 2, "second", 6)
    await store.sink_delivered("hook", 3, 0, 7)  # moving past skipped items is no success
    record = await store.get_sink("hook")
    assert record is not None and record.consecutive_failures == 2
    await store.sink_delivered("hook", 4, 1, 8)
    record = await store.get_sink("hook")
    assert record is not None
    assert (record.failures, record.consecutive_failures, record.last_error) == (2, 0, "second")


async def test_dead_letters_move_the_cursor_with_them(store: Store) -> None:
    items = await feed_items(store, 5)
    await store.put_sink(sink_config(), 1)
    await store.sink_failed("hook", "down", 2)
    await store.add_dead_letters("hook", items[1:3], "down", 4, 30)
    record = await store.get_sink("hook")
    assert record is not None
    assert (record.cursor, record.dead_lettered, record.dead_letters,
            record.consecutive_failures) == (items[2].cursor, 2, 2, 0)
    letters = await store.list_dead_letters("hook")
    assert [d.item for d in letters] == items[1:3]
    assert [(d.sink, d.error, d.attempts, d.created, d.retrying) for d in letters] == [
        ("hook", "down", 4, 30, False)] * 2
    assert letters[0].id < letters[1].id
    assert letters[0].to_json()["key"] == items[1].key
    assert letters[0].to_json()["item"] == items[1].to_json()
    await store.add_dead_letters("hook", items[3:4], "again", 1, 31)
    assert [d.item.seq for d in await store.list_dead_letters("hook", after=letters[0].id,
                                                               limit=1)] == [3]
    await store.add_dead_letters("nobody", items[4:], "x", 1, 32)  # unknown: nothing kept
    assert await store.list_dead_letters("nobody") == []


async def test_state_changes_round_trip_through_dead_letters(store: Store) -> None:
    await add_device(store, "a")
    await store.commit(SyncWrite("a", 10, changes=[change("a", {"state": {"k": [1]}})]))
    items = await store.read_feed()
    await store.put_sink(sink_config(), 1)
    await store.add_dead_letters("hook", items, "no", 1, 2)
    assert [d.item for d in await store.list_dead_letters("hook")] == items


async def test_retried_dead_letters_go_when_delivered(store: Store) -> None:
    items = await feed_items(store, 4)
    await store.put_sink(sink_config(), 1)
    await store.add_dead_letters("hook", items, "down", 3, 30)
    ids = [d.id for d in await store.list_dead_letters("hook")]
    assert await store.retry_dead_letters("hook", [ids[0], ids[2], 999_999]) == 2
    assert [d.id for d in await store.list_dead_letters("hook", retrying=True)] == [
        ids[0], ids[2]]
    assert [d.id for d in await store.list_dead_letters("hook", retrying=False)] == [
        ids[1], ids[3]]
    await store.finish_dead_letters("hook", [ids[0]], 40)
    await store.finish_dead_letters("hook", [ids[2]], 41, "still down", 2)
    letters = await store.list_dead_letters("hook")
    assert [(d.id, d.error, d.attempts, d.retrying) for d in letters] == [
        (ids[1], "down", 3, False), (ids[2], "still down", 5, False),
        (ids[3], "down", 3, False)]
    record = await store.get_sink("hook")
    assert record is not None
    assert (record.delivered, record.dead_letters, record.dead_lettered,
            record.last_delivered_at) == (1, 3, 4, 40)
    assert await store.retry_dead_letters("hook") == 3
    assert await store.retry_dead_letters("nobody") == 0


async def test_deleting_a_sink_deletes_its_dead_letters(store: Store) -> None:
    items = await feed_items(store, 2)
    await store.put_sink(sink_config(), 1)
    await store.put_sink(sink_config("other"), 1)
    await store.add_dead_letters("hook", items, "down", 1, 2)
    await store.add_dead_letters("other", items[:1], "down", 1, 2)
    await store.delete_sink("hook")
    await store.put_sink(sink_config(), 3)  # a new sink of the same name starts clean
    record = await store.get_sink("hook")
    assert record is not None and (record.cursor, record.dead_letters) == (0, 0)
    assert await store.list_dead_letters("hook") == []
    assert len(await store.list_dead_letters("other")) == 1


async def test_a_sink_lease_has_one_owner_at_a_time(store: Store) -> None:
    await store.put_sink(sink_config(), 1)
    assert await store.acquire_sink_lease("hook", "a", 100, 30)
    assert not await store.acquire_sink_lease("hook", "b", 110, 30)
    record = await store.get_sink("hook")
    assert record is not None and (record.owner, record.lease_until) == ("a", 130)
    assert await store.acquire_sink_lease("hook", "a", 120, 30)  # renewed
    assert not await store.acquire_sink_lease("hook", "b", 140, 30)  # not expired yet
    assert await store.acquire_sink_lease("hook", "b", 150, 30)  # expired: taken over
    record = await store.get_sink("hook")
    assert record is not None and (record.owner, record.lease_until) == ("b", 180)
    assert not await store.acquire_sink_lease("nobody", "a", 100, 30)


async def test_a_released_sink_lease_is_free_and_survives_reconfiguring(store: Store) -> None:
    await store.put_sink(sink_config(), 1)
    assert await store.acquire_sink_lease("hook", "a", 100, 30)
    await store.put_sink(sink_config(batch=7), 2)
    record = await store.get_sink("hook")
    assert record is not None and record.owner == "a"
    await store.release_sink_lease("hook", "b")  # not b's: nothing happens
    assert not await store.acquire_sink_lease("hook", "b", 110, 30)
    await store.release_sink_lease("hook", "a")
    record = await store.get_sink("hook")
    assert record is not None and (record.owner, record.lease_until) == (None, 0)
    assert await store.acquire_sink_lease("hook", "b", 111, 30)


async def test_only_the_lease_owner_moves_a_cursor(store: Store) -> None:
    items = await feed_items(store, 3)
    await store.put_sink(sink_config(), 1)
    assert await store.acquire_sink_lease("hook", "a", 100, 30)
    assert not await store.sink_delivered("hook", 5, 2, 101, owner="b")
    assert not await store.add_dead_letters("hook", items[:1], "x", 1, 101, owner="b")
    record = await store.get_sink("hook")
    assert record is not None and (record.cursor, record.delivered, record.dead_letters) == (
        0, 0, 0)
    assert await store.sink_delivered("hook", 2, 2, 102, owner="a")
    assert await store.add_dead_letters("hook", items[2:], "x", 1, 103, owner="a")
    record = await store.get_sink("hook")
    assert record is not None and (record.cursor, record.delivered, record.dead_letters) == (
        items[2].cursor, 2, 1)
    assert await store.sink_delivered("hook", 2, 0, 104)  # no owner given: unconditional
    assert not await store.sink_delivered("nobody", 2, 0, 104)
