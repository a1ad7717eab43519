"""The :class:`SinkStore` contract: sink configuration, progress, leases and dead letters.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs feed items to deliver (a device and ``commit``) to set up what it
checks.
"""

from __future__ import annotations

from typing import Any

import pytest

from crdtsync.errors import NotFound
from crdtsync_server.store import SinkStore, Store, SyncWrite
from crdtsync_server.store.feed import FeedFilter, FeedItem
from crdtsync_server.store.sinks import SinkConfig

from .store_backends import add_device, change, evs


def sink_config(name: str = "hook", **kw: Any) -> SinkConfig:
    return SinkConfig(name, "webhook", {"url": "http://127.0.0.1:9/x", "secret": "s"}, **kw)


async def feed_items(store: Store, count: int) -> list[FeedItem]:
    await add_device(store, "sinker")
    await store.commit(SyncWrite("sinker", 10, events=evs(1, count)))
    return await store.read_feed(limit=count)


async def test_put_sink_creates_and_reconfigures_keeping_progress(store: SinkStore) -> None:
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


async def test_sink_options_are_a_copy(store: SinkStore) -> None:
    options: dict[str, Any] = {"url": "http://x", "headers": {"A": "1"}}
    await store.put_sink(SinkConfig("hook", "webhook", options), 1)
    options["headers"]["A"] = "2"
    stored = await store.get_sink("hook")
    assert stored is not None and stored.config.options == {"url": "http://x",
                                                            "headers": {"A": "1"}}
    stored.config.options["url"] = "changed"  # type: ignore[index]
    again = await store.get_sink("hook")
    assert again is not None and again.config.options["url"] == "http://x"


async def test_list_and_delete_sinks(store: SinkStore) -> None:
    for name in ("b", "a", "c"):
        await store.put_sink(sink_config(name), 1)
    assert [s.name for s in await store.list_sinks()] == ["a", "b", "c"]
    await store.delete_sink("b")
    assert [s.name for s in await store.list_sinks()] == ["a", "c"]
    with pytest.raises(NotFound):
        await store.delete_sink("b")


async def test_sink_cursor_only_moves_forward(store: SinkStore) -> None:
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


async def test_sink_failures_are_counted_until_a_delivery(store: SinkStore) -> None:
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


async def test_a_sink_lease_has_one_owner_at_a_time(store: SinkStore) -> None:
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


async def test_a_released_sink_lease_is_free_and_survives_reconfiguring(store: SinkStore) -> None:
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
