"""PostgreSQL: proxied requests and sink leases shared by several server instances.

Each test opens several :class:`PostgresStore` objects (different ``instance``) on one
fresh PostgreSQL schema, as several servers share one database. Liveness is decided by the
``now`` each call is given, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from crdtsync_server.store import SyncWrite
from crdtsync_server.store.postgres import PostgresStore
from crdtsync_server.store.sinks import SinkConfig

from .services import drop_schema, new_schema, require_postgres
from .store_backends import add_device, req

pytestmark = pytest.mark.service

Stores = Callable[[str], Awaitable[PostgresStore]]
"""``await stores("a")``: one more open store on the test's schema, its instance ``a``."""

INTERRUPTED = {"ok": False, "code": "interrupted"}


@pytest.fixture
async def schema() -> AsyncIterator[tuple[str, str]]:
    """``(url, schema)``: a fresh schema, dropped afterwards."""
    url, name = require_postgres(), new_schema()
    try:
        yield url, name
    finally:
        await drop_schema(name)


@pytest.fixture
async def stores(schema: tuple[str, str]) -> AsyncIterator[Stores]:
    """Opens the test's stores (:data:`Stores`) and closes them afterwards."""
    url, name = schema
    opened: list[PostgresStore] = []

    async def open_store(instance: str) -> PostgresStore:
        store = PostgresStore(url, schema=name, instance=instance, max_size=4)
        await store.open()
        opened.append(store)
        return store

    try:
        yield open_store
    finally:
        for store in opened:
            await store.aclose()


async def runners(store: PostgresStore) -> dict[str, str | None]:
    """``{request id: runner}`` as stored (the runner is not part of ``ProxyRequest``)."""
    conn = await asyncpg.connect(store.url, server_settings={"search_path": store.schema or ""})
    try:
        rows = await conn.fetch("SELECT id, runner FROM requests")
    finally:
        await conn.close()
    return {row["id"]: row["runner"] for row in rows}


async def with_requests(store: PostgresStore, *ids: str, device: str = "dev-1") -> None:
    await add_device(store, device)
    await store.commit(SyncWrite(device, 10, requests=[req(i, device=device) for i in ids]))


async def status(store: PostgresStore, request_id: str, device: str = "dev-1"
                 ) -> tuple[str, Any]:
    request = await store.get_request(device, request_id)
    assert request is not None
    return request.status, request.outcome


# --- runners and interrupt_running -----------------------------------------------------------


async def test_claim_records_this_instance_as_runner(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    await with_requests(a, "r1", "r2", "r3")
    assert await a.claim_request("dev-1", "r1", 20) is not None
    assert await b.claim_request("dev-1", "r2", 20) is not None
    assert await b.claim_request("dev-1", "r1", 21) is None  # a's already
    assert await runners(a) == {"r1": "a", "r2": "b", "r3": None}


async def test_a_live_runner_keeps_its_requests(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    await with_requests(a, "r1", "r2")
    await a.heartbeat(100)
    assert await a.claim_request("dev-1", "r1", 100) is not None
    assert await b.interrupt_running(INTERRUPTED, 140, stale_ms=50) == 0
    assert await a.interrupt_running(INTERRUPTED, 140, stale_ms=50) == 0  # its own: never
    await a.heartbeat(180)
    assert await b.interrupt_running(INTERRUPTED, 230, stale_ms=50) == 0  # seen at 180
    assert await status(a, "r1") == ("running", None)

    # a's heartbeat is stale: b finishes a's request, once; a's late outcome is ignored.
    assert await b.interrupt_running(INTERRUPTED, 231, stale_ms=50) == 1
    assert await status(a, "r1") == ("done", INTERRUPTED)
    assert await b.interrupt_running(INTERRUPTED, 300, stale_ms=50) == 0
    await a.finish_request("dev-1", "r1", {"ok": True}, 301)
    assert await status(a, "r1") == ("done", INTERRUPTED)
    assert await status(a, "r2") == ("pending", None)  # never claimed: left for a runner


async def test_stale_ms_zero_counts_every_older_heartbeat_as_gone(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    await with_requests(a, "r1")
    await a.heartbeat(500)
    assert await a.claim_request("dev-1", "r1", 500) is not None
    assert await b.interrupt_running(INTERRUPTED, 500) == 0  # seen at now: alive
    assert await b.interrupt_running(INTERRUPTED, 501) == 1
    assert await status(a, "r1") == ("done", INTERRUPTED)


async def test_a_runner_without_heartbeat_or_gone_is_interrupted(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    c = await stores("c")
    await with_requests(a, "r1", "r2")
    await b.heartbeat(100)
    await c.heartbeat(100)
    assert await a.claim_request("dev-1", "r1", 100) is not None  # a never heartbeat
    assert await b.claim_request("dev-1", "r2", 100) is not None
    head = await c.wake_head()
    assert await c.interrupt_running(INTERRUPTED, 110, stale_ms=1000) == 1  # only a's
    assert [w.target for w in await c.read_wakes(head, 10)] == ["d:dev-1"]
    assert await status(a, "r2") == ("running", None)

    await b.leave()  # b closed: its requests are orphans at once
    assert await c.interrupt_running(INTERRUPTED, 110, stale_ms=1000) == 1
    assert await status(a, "r2") == ("done", INTERRUPTED)


async def test_interrupt_wakes_each_device_once(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    await with_requests(a, "x1", "x2", device="dev-1")
    await with_requests(a, "y1", device="dev-2")
    for device, request_id in [("dev-1", "x1"), ("dev-1", "x2"), ("dev-2", "y1")]:
        assert await a.claim_request(device, request_id, 20) is not None
    head = await b.wake_head()
    assert await b.interrupt_running(INTERRUPTED, 30) == 3
    assert sorted(w.target for w in await b.read_wakes(head, 10)) == ["d:dev-1", "d:dev-2"]


async def test_concurrent_recoveries_finish_each_request_once(stores: Stores) -> None:
    dead = await stores("dead")
    b = await stores("b")
    c = await stores("c")
    await add_device(dead)
    for round_ in range(5):
        ids = [f"r{round_}-{i}" for i in range(40)]
        await dead.commit(SyncWrite("dev-1", 10, requests=[req(i) for i in ids]))
        for request_id in ids:
            assert await dead.claim_request("dev-1", request_id, 20) is not None
        counts = await asyncio.gather(
            b.interrupt_running({"by": "b"}, 100), c.interrupt_running({"by": "c"}, 100))
        assert sum(counts) == len(ids)  # each request finished by exactly one of them
        outcomes = [await status(b, i) for i in ids]
        assert all(s == "done" and o in ({"by": "b"}, {"by": "c"}) for s, o in outcomes)
        by_b = sum(1 for _, o in outcomes if o == {"by": "b"})
        assert [by_b, len(ids) - by_b] == list(counts)


async def test_claim_race_across_instances_has_one_winner(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    ids = [f"r{i}" for i in range(50)]
    await with_requests(a, *ids)
    for request_id in ids:
        won = await asyncio.gather(a.claim_request("dev-1", request_id, 20),
                                   b.claim_request("dev-1", request_id, 20))
        winners = [name for name, r in zip("ab", won, strict=True) if r is not None]
        assert len(winners) == 1, (request_id, won)
        assert (await runners(a))[request_id] == winners[0]


async def test_pending_downlink_served_by_two_instances_at_once(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    await add_device(a)
    for i in range(20):
        await a.queue_downlink("dev-1", "command" if i % 2 else "message", "n", {"i": i}, 10,
                               15 if i % 3 == 0 else None)
    sent_a, sent_b = await asyncio.gather(a.pending_downlink("dev-1", 20, 100),
                                          b.pending_downlink("dev-1", 21, 100))
    assert [d.seq for d in sent_a] == [i + 1 for i in range(20) if i % 3]
    items = await a.list_downlink("dev-1", limit=100)
    assert [d.status for d in items] == [
        "expired" if i % 3 == 0 else "delivered" if i % 2 else "queued" for i in range(20)]
    # One call ran after the other: the first marked the items, the second found them marked
    # and left them alone, so both returned the items exactly as stored.
    assert sent_a == sent_b == [d for d in items if d.status != "expired"]
    assert len({d.updated for d in items if d.status != "queued"}) == 1


# --- sink leases -----------------------------------------------------------------------------


def hook(name: str = "hook") -> SinkConfig:
    return SinkConfig(name, "webhook", {"url": "http://127.0.0.1:9/x", "secret": "s"})


async def test_sink_lease_race_has_one_winner(stores: Stores) -> None:
    a = await stores("a")
    b = await stores("b")
    for i in range(50):
        name = f"hook{i}"
        await a.put_sink(hook(name), 1)
        won = await asyncio.gather(a.acquire_sink_lease(name, "a", 100, 30),
                                   b.acquire_sink_lease(name, "b", 100, 30))
        assert sorted(won) == [False, True], (name, won)
        record = await b.get_sink(name)
        assert record is not None and record.owner == ("a" if won[0] else "b")

        # expired: both race to take it over; one does, and only it moves the cursor
        again = await asyncio.gather(a.acquire_sink_lease(name, "a", 200, 30),
                                     b.acquire_sink_lease(name, "b", 200, 30))
        assert sorted(again) == [False, True], (name, again)
        moved = await asyncio.gather(a.sink_delivered(name, 5, 1, 201, owner="a"),
                                     b.sink_delivered(name, 7, 1, 201, owner="b"))
        assert moved == again  # only the holder of the lease moved the cursor
        record = await a.get_sink(name)
        assert record is not None
        assert (record.owner, record.cursor, record.delivered) == (
            "a" if again[0] else "b", 5 if again[0] else 7, 1)
