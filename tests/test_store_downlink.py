"""The :class:`DownlinkStore` contract: messages and commands to devices, proxied requests, and
purging what is finished.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs a device (``add_device``) and ``commit`` (which carries a device's
acknowledgements, results and requests) to set up what it checks.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from crdtsync.errors import NotFound
from crdtsync_server.store import (
    CommandResult,
    DeviceStore,
    Downlink,
    ProxyRequest,
    Store,
    SyncWrite,
)

from .store_backends import add_device, finished, queue, req, statuses

# --- downlink ----------------------------------------------------------------------------


async def down_done(store: DeviceStore, device: str = "dev-1") -> int:
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
    assert await store.interrupt_running(outcome, now=40) == 0  # its own: still running
    store.instance = "restarted"  # the runner sent no heartbeat: it is gone
    assert await store.interrupt_running(outcome, now=40) == 2
    for device in ["dev-1", "dev-2"]:
        r = await store.get_request(device, "a")
        assert r is not None and (r.status, r.outcome, r.updated) == ("done", outcome, 40)
    b, c = await store.get_request("dev-1", "b"), await store.get_request("dev-1", "c")
    assert b is not None and (b.outcome, b.updated) == ({"ok": True, "at": 35}, 35)
    assert c is not None and c.status == "pending"
    assert await store.claim_request("dev-1", "a", now=50) is None  # never run twice
    assert await store.interrupt_running(outcome, now=60) == 0


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


async def test_a_live_instances_requests_are_not_interrupted(store: Store) -> None:
    """A runner is alive while its heartbeat is at most ``stale_ms`` old; once it is older,
    another instance finishes its requests, once; its own requests never."""
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=20, requests=[req("a"), req("b")]))
    store.instance = "first"
    await store.heartbeat(25)
    assert await store.claim_request("dev-1", "a", now=30) is not None
    store.instance = "second"
    await store.heartbeat(31)
    assert await store.claim_request("dev-1", "b", now=32) is not None
    outcome = {"error": "interrupted"}
    assert await store.interrupt_running(outcome, now=40, stale_ms=15) == 0  # 25 >= 25
    assert await store.interrupt_running(outcome, now=41, stale_ms=15) == 1
    assert await store.interrupt_running(outcome, now=500, stale_ms=15) == 0  # b is its own
    a, b = await store.get_request("dev-1", "a"), await store.get_request("dev-1", "b")
    assert a is not None and (a.status, a.outcome, a.updated) == ("done", outcome, 41)
    assert b is not None and b.status == "running"
    store.instance = "first"
    await store.heartbeat(600)  # back: a heartbeat never revives an interrupted request
    assert await store.interrupt_running(outcome, now=601, stale_ms=1000) == 0
    assert await store.interrupt_running(outcome, now=601, stale_ms=15) == 1  # "second"'s
    assert {r.status for r in [await store.get_request("dev-1", i) for i in "ab"]
            if r is not None} == {"done"}


async def test_a_heartbeat_never_moves_back(store: Store) -> None:
    """A heartbeat older than the last one (a clock stepped back) leaves the newer one."""
    await add_device(store)
    await store.commit(SyncWrite("dev-1", time=20, requests=[req("a")]))
    store.instance = "runner"
    await store.heartbeat(100)
    await store.heartbeat(50)
    assert await store.claim_request("dev-1", "a", now=101) is not None
    store.instance = "other"
    assert await store.interrupt_running({"error": "x"}, now=120, stale_ms=30) == 0
    assert await store.interrupt_running({"error": "x"}, now=131, stale_ms=30) == 1
