"""The :class:`DocumentStore` contract: update logs, compaction, generations (rebuild) and per-key
stamps.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs ``commit`` (the only writer of documents) to set up what it checks.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from pycrdt import Doc, Map

from crdtsync.errors import SeqGap, Unavailable
from crdtsync.hlc import MAX_STAMP
from crdtsync_server.store import DocLog, DocumentStore, DocWrite, KeyStamp, Store, SyncWrite

from .store_backends import add_device, conflict_record, evs, stamp_row, write_docs

# --- documents ---------------------------------------------------------------------------


async def test_unknown_doc_is_empty(store: DocumentStore) -> None:
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


async def test_rebuild_of_an_unknown_document_starts_generation_one(store: DocumentStore) -> None:
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


async def test_load_doc_with_stamps_reads_log_and_rows_in_one_call(store: Store) -> None:
    """``load_doc(key, stamps=True)``: the log as ``load_doc`` gives it and the rows as
    ``read_stamps`` gives them; without ``stamps`` (and for a document never written) no
    rows."""
    await add_device(store)
    assert (await store.load_doc("dev-1/state", stamps=True)).stamps == ()
    rows = [stamp_row("b", 5, raw=4), stamp_row("a", 3, "cloud")]
    await store.commit(SyncWrite("dev-1", 10, docs=[DocWrite("dev-1/state", b"u1")],
                                 stamps=rows))
    both = await store.load_doc("dev-1/state", stamps=True)
    plain = await store.load_doc("dev-1/state")
    assert both.stamps == tuple(await store.read_stamps("dev-1/state"))
    assert [r.key for r in both.stamps] == ["a", "b"]
    assert plain.stamps == ()
    assert (both.gen, both.snapshot, both.updates) == (plain.gen, plain.snapshot, plain.updates)
    assert [u for _, u in both.updates] == [b"u1"]


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


async def test_stamps_read_as_last_written_through_any_mix_of_writes(store: Store) -> None:
    """Whatever path a stamp takes in a backend (a row of its own, or logged with its update
    row and moved aside when compaction or a rebuild deletes that row), a key reads as the
    stamp written last. A seeded mix of the ways a stamp arrives (with an update of its
    document, possibly written twice in one commit; alone; beside an update of another
    document) with compactions and rebuilds at any point, checked after each step against
    a dict of the last write per key."""
    rng = random.Random(17)
    await add_device(store)
    doc, other = "dev-1/state", "dev-1/other"
    model: dict[tuple[str, str], KeyStamp] = {}
    gen, ids, tick = 0, [0], 0

    def stamps() -> list[KeyStamp]:
        nonlocal tick
        keys = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
        rows = []
        for key in keys:
            tick += 1
            rows.append(stamp_row(key, tick, rng.choice(["device", "cloud"]), rng.randint(0, 9),
                                  name=rng.choice(["state", "config"])))
        return rows

    for step in range(80):
        op = rng.choice(["logged", "logged", "twice", "alone", "beside", "compact", "rebuild"])
        rows = stamps()
        if op == "logged":
            done = await store.commit(SyncWrite(None, step, docs=[DocWrite(doc, b"u", gen)],
                                                stamps=rows))
        elif op == "twice":
            done = await store.commit(SyncWrite(None, step, docs=[
                DocWrite(doc, b"u", gen), DocWrite(doc, b"v", gen)], stamps=rows))
        elif op == "alone":
            done = await store.commit(SyncWrite(None, step, stamps=rows))
        elif op == "beside":
            done = await store.commit(SyncWrite(None, step, docs=[DocWrite(other, b"o")],
                                                stamps=rows))
        elif op == "compact":
            await store.compact(doc, rng.choice(ids), b"snap")
            rows = []
        else:
            last = (await store.load_doc(doc)).last_id
            assert await store.rebuild(doc, gen, last, b"fresh")
            gen, ids, rows = gen + 1, [0], []
        if op in ("logged", "twice"):
            ids.extend(done.update_ids)
        model.update({(r.map, r.key): r for r in rows})
        assert await store.read_stamps(doc) == [model[k] for k in sorted(model)], (step, op)
        assert (await store.load_doc(doc, stamps=True)).stamps == tuple(
            model[k] for k in sorted(model))
    assert await store.read_stamps(other) == []


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
