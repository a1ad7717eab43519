"""The contract of :class:`Store` as a whole: the sync transaction (``commit``: events
deduplicated by ``(device, seq)``, gaps, and every role's part of one sync stored together or
not at all), ``delete_device`` (which deletes a device from every role) and the lifecycle.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture).
"""

from __future__ import annotations

import asyncio

import pytest

from crdtsync.errors import ClosedError, NotFound, SeqConflict, SeqGap
from crdtsync_server.store import (
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Store,
    SyncWrite,
)
from crdtsync_server.store.feed import FeedFilter

from .store_backends import (
    add_device,
    all_events,
    change,
    ev,
    evs,
    finished,
    queue,
    req,
    stamp_row,
    statuses,
    write_docs,
)

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


# --- delete_device: a device out of every role -------------------------------------------


async def test_delete_device_deletes_the_stamps_of_its_documents(store: Store) -> None:
    """Stamps written with an update of their document (which a backend may keep with the
    update) and without one go alike."""
    for device in ("dev-1", "dev-2"):
        await add_device(store, device)
        await store.commit(SyncWrite(device, 10, stamps=[
            stamp_row("k", 1, doc=f"{device}/state")]))
        await store.commit(SyncWrite(device, 11, docs=[DocWrite(f"{device}/state", b"u")],
                                     stamps=[stamp_row("j", 2, doc=f"{device}/state")]))
    await store.delete_device("dev-1", ["dev-1/state"])
    assert await store.read_stamps("dev-1/state") == []
    assert await store.read_stamps("dev-2/state") == [stamp_row("j", 2, doc="dev-2/state"),
                                                      stamp_row("k", 1, doc="dev-2/state")]
    await add_device(store, "dev-1")  # a device created again with the id starts afresh
    assert await store.read_stamps("dev-1/state") == []


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


# --- lifecycle ---------------------------------------------------------------------------


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
