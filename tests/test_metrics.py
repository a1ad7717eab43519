"""``GET /v1/metrics``, ``/healthz`` and ``/readyz`` of a real server on 127.0.0.1: a scraper
parses the exposition with ``prometheus_client``'s parser, and the series move with real
traffic (syncs, a refused sync, a cloud write, a queued message, a long poll, a stream)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from crdtsync import AdminClient, Device
from crdtsync.errors import StoreError
from crdtsync.protocol import SYNC_PATH
from crdtsync_server import Server, ServerConfig
from crdtsync_server.api.keys import METRICS
from crdtsync_server.store import MemoryStore

from .conftest import ADMIN_TOKEN, DeviceFactory, local_app
from .scrape import Samples, scrape, value
from .test_sinks_e2e import eventually

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPERATIONS_DOC = Path(__file__).parent.parent / "docs" / "operations.md"


def count(samples: Samples, name: str, **labels: str) -> float:
    """A sample that may be absent yet (a label pair not seen): 0 then."""
    try:
        return value(samples, name, **labels)
    except KeyError:
        return 0.0


async def test_metrics_need_the_admin_token(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with session.get(server.url + "/v1/metrics", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_every_family_is_documented_and_named_once(server: Server) -> None:
    samples = await scrape(server)  # parse() fails on a family named twice
    names = {name for name, _ in samples}
    for name in ("crdtsync_sync_requests_total", "crdtsync_sync_duration_seconds_count",
                 "crdtsync_store_commit_duration_seconds_bucket", "crdtsync_docs_cached",
                 "crdtsync_devices_active", "crdtsync_downlink_pending",
                 "crdtsync_feed_head", "crdtsync_wake_waiting", "process_cpu_seconds_total",
                 "python_gc_collections_total"):
        assert name in names, name
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    for name in names:
        if name.startswith("crdtsync_"):
            family = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
            assert f"`{family}" in text, f"{family} is not in docs/operations.md"


async def test_the_garbage_collectors_runs_are_counted_per_process(server: Server) -> None:
    """``python_gc_collections_total{generation}``: how often the collector ran in this process
    (``--gc-young`` spaces the young ones out); the server runs in this test's process."""
    before = value(await scrape(server), "python_gc_collections_total", generation="0")
    gc.collect(0)
    gc.collect(0)
    after = value(await scrape(server), "python_gc_collections_total", generation="0")
    assert after >= before + 2


async def test_syncs_move_the_sync_series(server: Server, admin: AdminClient,
                                          make_device: DeviceFactory) -> None:
    before = await scrape(server)
    dev = await make_device("d1")
    dev.state["mode"] = "on"
    await dev.emit("temp", {"c": 21})
    await dev.emit("temp", {"c": 22})
    await dev.sync()
    await dev.sync()  # nothing new: an answered sync all the same
    await admin.patch_state("d1", {"target": 19})  # a cloud write
    after = await scrape(server)

    def grew(name: str, **labels: str) -> float:
        return count(after, name, **labels) - count(before, name, **labels)

    syncs = grew("crdtsync_sync_requests_total", outcome="ok", code="none")
    assert syncs >= 2
    assert grew("crdtsync_sync_duration_seconds_count") == syncs
    assert grew("crdtsync_sync_duration_seconds_bucket", le="+Inf") == syncs
    assert grew("crdtsync_sync_duration_seconds_sum") > 0
    assert grew("crdtsync_sync_request_bytes_total") > 0
    assert grew("crdtsync_sync_response_bytes_total") > 0
    assert grew("crdtsync_events_ingested_total") == 2
    assert grew("crdtsync_state_changes_total", writer="device") == 1
    assert grew("crdtsync_state_changes_total", writer="cloud") == 1
    assert grew("crdtsync_store_commit_duration_seconds_count") >= 2  # the sync, the write
    assert value(after, "crdtsync_docs_cached") >= 1
    assert value(after, "crdtsync_devices") == 1
    assert value(after, "crdtsync_devices_active") == 1
    assert value(after, "crdtsync_feed_head") >= 3  # two events, two state changes


async def test_a_refused_sync_is_counted_by_its_code(server: Server,
                                                     make_device: DeviceFactory) -> None:
    await make_device("d1")
    before = await scrape(server)
    async with aiohttp.ClientSession() as session, session.post(
            server.url + SYNC_PATH, data=b"\x80",
            headers={"Authorization": "Bearer not-a-token"}) as resp:
        assert resp.status == 401
    after = await scrape(server)
    labels = {"outcome": "client_error", "code": "unauthorized"}
    assert (count(after, "crdtsync_sync_requests_total", **labels)
            - count(before, "crdtsync_sync_requests_total", **labels)) == 1
    assert (value(after, "crdtsync_sync_requests_total", outcome="ok", code="none")
            == value(before, "crdtsync_sync_requests_total", outcome="ok", code="none"))
    assert (value(after, "crdtsync_sync_duration_seconds_count")
            == value(before, "crdtsync_sync_duration_seconds_count"))  # successes only


async def test_downlink_pending_counts_queued_items_until_processed(
        server: Server, admin: AdminClient, make_device: DeviceFactory) -> None:
    dev = await make_device("d1")
    received: list[object] = []
    dev.on("hello")(received.append)
    await admin.request("POST", "/v1/devices/d1/messages",
                        json={"topic": "hello", "body": {"n": 1}})
    assert value(await scrape(server), "crdtsync_downlink_pending") == 1
    await dev.sync()  # receives and handles it
    await dev.sync()  # acknowledges it
    assert len(received) == 1
    assert value(await scrape(server), "crdtsync_downlink_pending") == 0


async def _held(server: Server, name: str, expected: float, **labels: str) -> None:
    async def check() -> bool:
        return value(await scrape(server), name, **labels) == expected
    await eventually(check)


async def test_open_long_polls_and_streams_are_gauged(server: Server) -> None:
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        poll = asyncio.create_task(session.get(server.url + "/v1/feed?wait=30"))
        await _held(server, "crdtsync_long_polls", 1, endpoint="feed")
        async with session.get(server.url + "/v1/feed/stream") as stream:
            assert stream.status == 200
            await _held(server, "crdtsync_feed_streams", 1)
        await _held(server, "crdtsync_feed_streams", 0)  # the client left
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
        await _held(server, "crdtsync_long_polls", 0, endpoint="feed")


async def test_a_live_channel_is_gauged(server: Server, make_device: DeviceFactory) -> None:
    await make_device("d1")
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.get(server.url + "/v1/wake") as first:
            after = (await first.json())["w"]
        hold = asyncio.create_task(session.get(server.url + f"/v1/wake?after={after}&wait=30"))
        await _held(server, "crdtsync_wake_waiting", 1)
        hold.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hold
    await _held(server, "crdtsync_wake_waiting", 0)


async def test_the_hot_path_tallies_are_plain_numbers(server: Server,
                                                      make_device: DeviceFactory) -> None:
    """The sync handler counts into the process's own tallies, not a global registry: a
    second server in this process starts from zero."""
    dev = await make_device("d1")
    await dev.sync()
    assert server.app[METRICS].syncs.ok >= 1
    config = ServerConfig(db=server.config.db, port=0, admin_token=ADMIN_TOKEN)
    async with Server(config) as other:
        samples = await scrape(other)
        assert value(samples, "crdtsync_sync_requests_total", outcome="ok", code="none") == 0
        assert value(samples, "crdtsync_devices") == 1  # the store's part is shared


# --- health ----------------------------------------------------------------------------------

async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_health_and_readiness_need_no_token_and_tell_nothing(server: Server) -> None:
    assert await _get(server.url + "/healthz") == (200, '{"status":"ok"}')
    assert await _get(server.url + "/readyz") == (200, '{"status":"ready"}')


async def test_readyz_fails_once_the_store_is_closed(server: Server) -> None:
    await server.services.store.aclose()
    status, body = await _get(server.url + "/readyz")
    assert status == 503
    error = json.loads(body)["error"]
    assert error["code"] == "unavailable" and error["retryable"] is True
    assert "server.db" not in body and "/" not in error["message"]  # no path leaks
    assert (await _get(server.url + "/healthz"))[0] == 200  # alive all the same


class BrokenStore(MemoryStore):
    """A memory store whose settings reads fail while ``broken`` (a database that stopped
    answering)."""

    broken = False

    async def get_setting(self, key: str) -> str | None:
        if self.broken:
            raise StoreError("database /secret/path/db is locked")
        return await super().get_setting(key)


@pytest.fixture
async def broken_server(server_config: ServerConfig) -> AsyncIterator[tuple[Server, BrokenStore]]:
    store = BrokenStore()
    async with Server(server_config, store=store) as srv:
        yield srv, store


async def test_readyz_follows_the_database(broken_server: tuple[Server, BrokenStore]) -> None:
    server, store = broken_server
    assert (await _get(server.url + "/readyz"))[0] == 200
    store.broken = True
    status, body = await _get(server.url + "/readyz")
    assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"
    assert "secret" not in body and "locked" not in body
    store.broken = False
    assert (await _get(server.url + "/readyz"))[0] == 200


# --- documents and proxied requests ------------------------------------------------------------

async def test_compactions_are_counted(server_config: ServerConfig, tmp_path: Path) -> None:
    config = dataclasses.replace(server_config, compact_every=2)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            for n in range(4):
                dev.state["n"] = n
                await dev.sync()
        samples = await scrape(server)
    assert value(samples, "crdtsync_doc_compactions_total") >= 1
    assert value(samples, "crdtsync_doc_compaction_failures_total") == 0


async def test_proxied_requests_are_counted_by_outcome(
        server: Server, admin: AdminClient, make_device: DeviceFactory) -> None:
    async def target(request: web.Request) -> web.Response:
        return web.json_response({"fine": True})

    app = web.Application()
    app.router.add_post("/x", target)
    async with local_app(app) as url:
        await admin.request("PUT", "/v1/routes/ok", json={"url": url + "/x"})
        await admin.request("PUT", "/v1/routes/down", json={"url": url + "/missing"})
        dev = await make_device("d1")
        await dev.queue_request("ok", {"n": 1})
        await dev.queue_request("down", {"n": 2})

        async def finished() -> bool:
            await dev.sync()
            samples = await scrape(server)
            return (count(samples, "crdtsync_proxied_requests_total", outcome="ok") == 1
                    and count(samples, "crdtsync_proxied_requests_total",
                              outcome="route_http_error") == 1)
        await eventually(finished)
