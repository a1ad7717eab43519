"""The :class:`FeedStore` contract: events, the change feed, its purge, and the projection.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs a device and ``commit`` (the only writer of the feed) to set up what
it checks.
"""

from __future__ import annotations

import base64

import pytest

from crdtsync.errors import SeqConflict, SeqGap
from crdtsync_server.store import FleetRecord, Store, SyncWrite
from crdtsync_server.store.feed import FeedFilter, ProjectionRow

from .store_backends import (
    add_device,
    all_events,
    change,
    conflict_record,
    ev,
    evs,
    stamp_row,
)

# --- events ------------------------------------------------------------------------------


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


# --- the change feed and the state projection ---------------------------------------------


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
    assert await cursors(kind="state,event") == [1, 2, 3, 4]
    assert await cursors(kind="state,conflict", device="a") == [3]
    assert await cursors(device="nobody") == []
    for bad in ("nope", "event,nope", ",", ""):
        with pytest.raises(ValueError):
            FeedFilter(kind=bad)


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


async def test_a_large_sync_keeps_every_row_in_order(store: Store) -> None:
    """More rows than one SQL statement carries (SQLite inserts 16 per statement): events,
    changes, conflicts, projection keys and stamps all land, in cursor order, and a replay
    of every event is still recognised by its digest."""
    await add_device(store, "a")
    events = [ev(s, body={"seq": s, "raw": bytes([s]), "f": s / 3}) for s in range(1, 41)]
    keys = {f"k{i:02d}": i * 1.5 for i in range(35)}
    changes = [change("a", {"state": keys}), change("a", {"state": {"k00": None, "k01": 7}})]
    stamps = [stamp_row(key, 2**63 + i, doc="a/state") for i, key in enumerate(keys)]
    conflicts = [conflict_record("a", f"c{i}") for i in range(20)]
    await store.commit(SyncWrite("a", 10, events=events, changes=changes, conflicts=conflicts,
                                 stamps=stamps))
    items = await store.read_feed(limit=1000)
    assert [(i.kind, i.seq) for i in items] == (
        [("event", s) for s in range(1, 41)] + [("state", None)] * 2
        + [("conflict", None)] * 20)
    assert [i.cursor for i in items] == list(range(1, 63))
    assert [i.body for i in items[:40]] == [
        {"seq": s, "raw": base64.b64encode(bytes([s])).decode(), "f": s / 3}
        for s in range(1, 41)]
    assert [i.body["key"] for i in items[42:]] == [f"c{i}" for i in range(20)]
    assert {(r.key, r.value) for r in await store.read_projection()} == {
        *((k, v) for k, v in keys.items() if k not in ("k00", "k01")), ("k01", 7)}
    assert await store.read_stamps("a/state") == sorted(stamps, key=lambda r: r.key)
    replay = await store.commit(SyncWrite("a", 11, events=events))
    assert (replay.stored, replay.last_seq) == (0, 40)
    with pytest.raises(SeqConflict):
        await store.commit(SyncWrite("a", 12, events=[ev(40, body={"seq": 40})]))


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
