"""Sinks end to end: real devices, a real server over SQLite, and a real webhook receiver on
127.0.0.1 that fails on purpose, refuses items, hangs in the middle of a delivery while the
server restarts. Every event and state change must arrive, once per key after
deduplication, in each device's order."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from crdtsync import AdminClient, Device
from crdtsync.errors import AlreadyExists, MalformedRequest, NotFound
from crdtsync_server import Server, ServerConfig
from crdtsync_server.sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from crdtsync_server.store import Store

from .cli_process import admin_env, cli
from .conftest import ADMIN_TOKEN, DeviceFactory, local_app
from .scrape import scrape, value

SECRET = "webhook-shared-secret"
WAIT_S = 60.0
"""How long a test waits for deliveries before failing (a hang guard, not a timing check)."""


class Receiver:
    """A webhook receiver that checks signatures, answers 500 to its first ``fail_first``
    requests, 400 to batches holding an item ``reject`` refuses, and keeps each item once
    by key (``order`` is the order of first arrival). With ``hold_at = n`` its n-th
    accepted request stores its items, then waits for ``release`` before answering."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.reject: Callable[[dict[str, Any]], bool] = lambda item: False
        self.hold_at: int | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.requests = self.accepted = self.duplicates = self.bad_signatures = 0
        self.items: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self._changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if not verify_signature(SECRET, body, request.headers.get(SIGNATURE_HEADER),
                                request.headers.get(TIMESTAMP_HEADER)):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.requests <= self.fail_first:
            return web.Response(status=500, text="failing on purpose")
        items = json.loads(body)["items"]
        if any(self.reject(item) for item in items):
            return web.Response(status=400, text="refused on purpose")
        self.accepted += 1
        for item in items:
            if item["key"] in self.items:
                self.duplicates += 1
            else:
                self.items[item["key"]] = item
                self.order.append(item["key"])
        self._changed.set()
        if self.accepted == self.hold_at:
            self.holding.set()
            await self.release.wait()
        return web.Response(status=200)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rx.handle)
    async with local_app(app) as url:
        yield rx, f"{url}/hook"
        rx.release.set()


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """Readers re-poll the feed often: a notification missed at a restart costs little."""
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        feed_poll=0.05)


def webhook_sink(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "webhook", "options": {"url": url, "secret": SECRET, "timeout": 10},
            "batch": 4, "max_attempts": 1000, "backoff": 0.02, "max_backoff": 0.2, **fields}


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds (polling); fail after ``WAIT_S`` seconds."""
    async with asyncio.timeout(WAIT_S):
        for delay in iter(lambda: 0.05, None):
            if await check():
                return
            await asyncio.sleep(delay)


async def sink_status(admin: AdminClient, name: str = "hook") -> dict[str, Any]:
    status: dict[str, Any] = (await admin.sink(name))["status"]
    return status


async def caught_up(admin: AdminClient, name: str = "hook") -> bool:
    status = await sink_status(admin, name)
    return bool(status["lag"] == 0 and status["state"] == "idle")


async def feed_keys(admin: AdminClient) -> list[str]:
    items, _ = await admin.feed(limit=1000)
    return [item["key"] for item in items]


def assert_device_order(payloads: Sequence[dict[str, Any]]) -> None:
    """In arrival order, each device's items have growing cursors and events count 1, 2..."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        by_device.setdefault(payload["device"], []).append(payload)
    for items in by_device.values():
        cursors = [int(item["cursor"]) for item in items]
        assert cursors == sorted(cursors)
        seqs = [item["seq"] for item in items if item["kind"] == "event"]
        assert seqs == list(range(1, len(seqs) + 1))


def first_arrivals(rx: Receiver) -> list[dict[str, Any]]:
    return [rx.items[key] for key in rx.order]


async def start_pinned(config: ServerConfig) -> Server:
    """A started server whose port ``config`` then keeps: a server restarted with ``config``
    listens where the devices connect."""
    server = Server(config)
    await server.start()
    config.port = server.port
    return server


async def start_devices(admin: AdminClient, url: str, names: Sequence[str], tmp_path: Path,
                        into: list[Device]) -> None:
    """Provision and start a device per name against ``url``, each appended to ``into`` as
    soon as it exists (so the caller closes every one, even after a failure)."""
    for name in names:
        token = (await admin.add_device(name))["token"]
        into.append(Device(name, url, token=token, interval=None, path=tmp_path / f"{name}.db"))
        await into[-1].start()


async def produce(devices: list[Device], rounds: range) -> None:
    for n in rounds:
        for dev in devices:
            await dev.emit("reading", {"n": n})
            dev.state["n"] = n
            await dev.sync()


async def test_every_item_arrives_once_in_order_across_failures_and_a_restart(
        server_config: ServerConfig, receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    rx, url = receiver
    rx.fail_first, rx.hold_at = 3, 2
    first = await start_pinned(server_config)
    devices: list[Device] = []
    try:
        async with AdminClient(first.url, ADMIN_TOKEN) as admin:
            assert (await admin.put_sink("hook", webhook_sink(url)))["status"]["cursor"] == "0"
            await start_devices(admin, first.url, ("d0", "d1"), tmp_path, devices)
            await produce(devices, range(4))
            await admin.patch_state("d0", {"mode": "eco"})  # a cloud write
            # The receiver stored its second accepted batch and has not answered yet.
            await asyncio.wait_for(rx.holding.wait(), WAIT_S)
            await first.aclose()  # the sink's cursor is not past that batch
            rx.release.set()
        async with Server(server_config) as second, \
                AdminClient(second.url, ADMIN_TOKEN) as admin:
            await produce(devices, range(4, 7))
            await admin.patch_state("d1", {"mode": "off"})
            expected = await feed_keys(admin)
            await rx.wait_for(lambda: set(rx.items) >= set(expected))
            await eventually(lambda: caught_up(admin))
            status = await sink_status(admin)
            metrics = await scrape(second)
    finally:
        for dev in devices:
            await dev.aclose()
        await first.aclose()

    assert sorted(rx.items) == sorted(expected)  # every item, each key once after dedup
    assert rx.duplicates > 0  # the batch in flight at the restart came again
    assert rx.bad_signatures == 0
    assert_device_order(first_arrivals(rx))
    kinds = {(item["device"], item["kind"], item.get("source")) for item in rx.items.values()}
    assert {("d0", "event", None), ("d0", "state", "device"), ("d0", "state", "cloud"),
            ("d1", "state", "cloud")} <= kinds
    assert [rx.items[f"ev:d1:{seq}"]["body"]["n"] for seq in range(1, 8)] == list(range(7))
    assert status["lag"] == 0 and status["cursor"] == status["head"]
    assert status["failures"] >= 3 and "answered 500" in status["last_error"]
    assert status["dead_letters"] == 0 and status["consecutive_failures"] == 0
    assert status["delivered"] >= len(expected)
    assert value(metrics, "crdtsync_sink_lag", sink="hook") == 0
    assert value(metrics, "crdtsync_feed_head") == int(status["head"])


async def test_two_processes_on_one_database_deliver_each_sink_once_and_fail_over(
        server_config: ServerConfig, receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    """Only the lease holder delivers: no key arrives twice while both run; when the holder
    stops, the other takes over and nothing is lost."""
    rx, url = receiver
    server_config.sink_lease_ttl = 0.6
    first = Server(server_config)
    await first.start()
    devices: list[Device] = []
    try:
        async with AdminClient(first.url, ADMIN_TOKEN) as admin_a:
            await admin_a.put_sink("hook", webhook_sink(url, batch=2))
            async with Server(dataclasses.replace(server_config)) as second, \
                    AdminClient(second.url, ADMIN_TOKEN) as admin_b:
                for name, srv in (("d0", first), ("d1", second)):  # one device per process
                    token = (await admin_a.add_device(name))["token"]
                    devices.append(Device(name, srv.url, token=token, interval=None,
                                          path=tmp_path / f"{name}.db"))
                    await devices[-1].start()
                await produce(devices, range(5))
                expected_a = await feed_keys(admin_b)
                await rx.wait_for(lambda: set(rx.items) >= set(expected_a))
                await eventually(lambda: caught_up(admin_a))
                owner = (await sink_status(admin_b))["owner"]
                assert owner == first.services.sinks.owner
                assert (await sink_status(admin_b))["state"] == "standby"
                assert rx.duplicates == 0  # one process delivered, each key once

                await devices[0].aclose()
                await first.aclose()  # the owner stops: the other takes over
                await produce(devices[1:], range(5, 9))
                expected = await feed_keys(admin_b)
                await rx.wait_for(lambda: set(rx.items) >= set(expected))
                await eventually(lambda: caught_up(admin_b))
                status = await sink_status(admin_b)
    finally:
        for dev in devices:
            await dev.aclose()
        await first.aclose()

    assert status["owner"] == second.services.sinks.owner != owner
    assert sorted(rx.items) == sorted(expected)  # nothing lost
    assert status["lag"] == 0 and rx.bad_signatures == 0
    assert_device_order(first_arrivals(rx))


# --- dead letters ------------------------------------------------------------------------------

async def test_refused_items_are_dead_lettered_then_retried(
        server: Server, admin: AdminClient, make_device: DeviceFactory,
        receiver: tuple[Receiver, str]) -> None:
    rx, url = receiver
    rx.reject = lambda item: item.get("topic") == "poison"
    await admin.put_sink("hook", webhook_sink(url, batch=10, filter={"kind": "event"}))
    dev = await make_device("d1")
    for topic in ("ok", "poison", "poison", "ok"):
        await dev.emit(topic, {"topic": topic})
    dev.state["skipped"] = True  # not an event: filtered out
    await dev.sync()
    await rx.wait_for(lambda: {"ev:d1:1", "ev:d1:4"} <= set(rx.items))
    await eventually(lambda: caught_up(admin))
    page = await admin.dead_letters("hook")
    assert [(d["key"], d["attempts"], d["item"]["body"]) for d in page["dead_letters"]] == [
        ("ev:d1:2", 1, {"topic": "poison"}), ("ev:d1:3", 1, {"topic": "poison"})]
    assert "answered 400" in page["dead_letters"][0]["error"] and page["next"] is None
    status = await sink_status(admin)
    assert (status["delivered"], status["dead_letters"], status["dead_lettered"]) == (2, 2, 2)
    assert value(await scrape(server), "crdtsync_sink_dead_letters_total", sink="hook") == 2

    rx.reject = lambda item: False  # the receiver is fixed
    assert await admin.retry_dead_letters("hook") == 2
    await rx.wait_for(lambda: {"ev:d1:2", "ev:d1:3"} <= set(rx.items))
    await eventually(lambda: _no_dead_letters(admin))
    status = await sink_status(admin)
    assert (status["delivered"], status["dead_letters"], status["dead_lettered"]) == (4, 0, 2)
    assert all(rx.items[key]["kind"] == "event" for key in rx.items)


async def _no_dead_letters(admin: AdminClient) -> bool:
    return not (await admin.dead_letters("hook"))["dead_letters"]


async def test_a_receiver_that_stays_down_fills_the_dead_letters(
        admin: AdminClient, make_device: DeviceFactory,
        receiver: tuple[Receiver, str]) -> None:
    rx, url = receiver
    rx.fail_first = 10**6
    await admin.put_sink("hook", webhook_sink(url, max_attempts=3, batch=2))
    dev = await make_device("d1")
    for n in range(3):
        await dev.emit("t", {"n": n})
    await dev.sync()
    await eventually(lambda: caught_up(admin))
    letters = (await admin.dead_letters("hook", limit=2))
    assert [d["key"] for d in letters["dead_letters"]] == ["ev:d1:1", "ev:d1:2"]
    assert letters["next"] is not None
    rest = await admin.dead_letters("hook", after=int(letters["next"]))
    assert [(d["key"], d["attempts"]) for d in rest["dead_letters"]] == [("ev:d1:3", 3)]
    status = await sink_status(admin)
    assert (status["failures"], status["delivered"], status["dead_lettered"]) == (6, 0, 3)
    assert rx.requests == 6 and not rx.items


# --- configuration through the API -------------------------------------------------------------

async def test_sink_api_validates_redacts_and_deletes(
        server: Server, admin: AdminClient, receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    with pytest.raises(MalformedRequest) as info:
        await admin.put_sink("hook", {"type": "carrier-pigeon"})
    assert info.value.detail == {"sink": "hook", "field": "type"}
    with pytest.raises(MalformedRequest) as info:
        await admin.put_sink("hook", {"type": "webhook", "options": {"url": "ftp://x"}})
    assert info.value.detail["field"] == "options.url"
    with pytest.raises(MalformedRequest):
        await admin.put_sink("bad name!", webhook_sink(url))
    with pytest.raises(NotFound):
        await admin.sink("hook")

    body = webhook_sink(url, paused=True)
    body["options"]["headers"] = {"Authorization": "Bearer very-secret"}
    created = await admin.request("PUT", "/v1/sinks/hook", json=body)
    assert created["options"] == {"url": url, "secret": "***", "timeout": 10,
                                  "headers": {"Authorization": "***"}}
    assert created["status"]["state"] == "paused" and created["origin"] == "api"
    # Sending the redacted form back keeps the secrets.
    again = {**body, "options": created["options"], "batch": 9}
    updated = await admin.put_sink("hook", again)
    assert updated["batch"] == 9 and updated["created"] == created["created"]
    stored = await server.services.store.get_sink("hook")
    assert stored is not None and stored.config.options["secret"] == SECRET
    assert stored.config.options["headers"] == {"Authorization": "Bearer very-secret"}
    assert [s["name"] for s in await admin.sinks()] == ["hook"]
    assert "very-secret" not in json.dumps(await admin.sinks())

    await admin.delete_sink("hook")
    with pytest.raises(NotFound):
        await admin.sink("hook")
    with pytest.raises(NotFound):
        await admin.delete_sink("hook")
    with pytest.raises(NotFound):
        await admin.dead_letters("hook")


async def test_secrets_in_a_webhook_url_never_leave_the_server(
        server: Server, admin: AdminClient) -> None:
    """Query values and the path after its first segment read ``***`` in every answer; the
    configuration read back and sent again keeps the real URL."""
    url = "https://hooks.example.com/services/T0A1/B2C3/s3cr3t-path?token=s3cr3t-query&v=2"
    body = webhook_sink(url, paused=True)
    created = await admin.request("PUT", "/v1/sinks/hook", json=body)
    shown = "https://hooks.example.com/services/***?token=***&v=***"
    assert created["options"]["url"] == shown
    listed = await admin.request("GET", "/v1/sinks")
    assert listed["sinks"][0]["options"]["url"] == shown
    assert "s3cr3t" not in json.dumps(listed) + json.dumps(await admin.sink("hook"))
    await admin.put_sink("hook", {**body, "options": created["options"]})  # read, sent back
    stored = await server.services.store.get_sink("hook")
    assert stored is not None and stored.config.options["url"] == url


async def test_a_new_sink_may_start_at_the_feed_head(
        admin: AdminClient, make_device: DeviceFactory, receiver: tuple[Receiver, str]) -> None:
    rx, url = receiver
    dev = await make_device("d1")
    await dev.emit("old", {})
    await dev.sync()
    created = await admin.put_sink("hook", webhook_sink(url, start="head"))
    assert created["status"]["cursor"] == created["status"]["head"] != "0"
    await dev.emit("new", {})
    await dev.sync()
    await rx.wait_for(lambda: "ev:d1:2" in rx.items)
    await eventually(lambda: caught_up(admin))
    assert list(rx.items) == ["ev:d1:2"]


# --- the sinks file ----------------------------------------------------------------------------

async def test_sinks_file_keeps_secrets_out_of_the_database(
        tmp_path: Path, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch) -> None:
    rx, url = receiver
    monkeypatch.setenv("CRDTSYNC_TEST_HOOK_SECRET", SECRET)
    sink = webhook_sink(url)
    sink["options"]["secret"] = "${CRDTSYNC_TEST_HOOK_SECRET}"
    path = tmp_path / "sinks.json"
    path.write_text(json.dumps({"sinks": {"filed": sink}}))
    config = ServerConfig(db=str(tmp_path / "file.db"), port=0, admin_token=ADMIN_TOKEN,
                          feed_poll=0.05, sinks_file=str(path))
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        await admin.add_device("d1")
        await admin.patch_state("d1", {"k": 1})
        await rx.wait_for(lambda: len(rx.items) == 1)
        shown = await admin.sink("filed")
        assert shown["origin"] == "file" and shown["options"]["secret"] == "***"
        with pytest.raises(AlreadyExists):
            await admin.put_sink("filed", webhook_sink(url))
        with pytest.raises(AlreadyExists):
            await admin.delete_sink("filed")
    assert rx.bad_signatures == 0
    for db_file in tmp_path.glob("file.db*"):
        assert SECRET.encode() not in db_file.read_bytes()


# --- the command line --------------------------------------------------------------------------

async def test_sink_commands(server: Server, receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    env = admin_env(server.url, ADMIN_TOKEN)

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(cli, *args, env=env)

    added = await run("sink", "add", "hook", json.dumps(webhook_sink(url)))
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["options"]["secret"] == "***"
    listing = await run("sink", "list")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split()[:3] == ["NAME", "TYPE", "STATE"]
    assert listing.stdout.splitlines()[1].split()[:2] == ["hook", "webhook"]
    retry = await run("sink", "retry", "hook")
    assert (retry.returncode, retry.stdout.strip()) == (0, "retrying 0 dead letter(s) of sink hook")
    assert (await run("sink", "delete", "hook")).returncode == 0
    missing = await run("sink", "dead-letters", "hook")
    assert missing.returncode == 1 and "not_found" in missing.stderr


def record_feed_purges(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """A list that gets ``(before, purged)`` for each ``store.purge_feed`` call from now on
    (one per round of the server's purge loop): what a test waits for instead of sleeping."""
    purges: list[tuple[int, int]] = []
    original = store.purge_feed

    async def purge_feed(before: int, keep_after: int) -> int:
        gone = await original(before, keep_after)
        purges.append((before, gone))
        return gone

    monkeypatch.setattr(store, "purge_feed", purge_feed)
    return purges


async def test_the_feed_retention_purges_only_what_every_sink_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused sink holds the feed back; once it is gone the purge loop of a server with
    a feed retention deletes the old items (events included), and devices sync on."""
    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN,
                          feed_retention_ms=1, purge_every=0.05)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        purges = record_feed_purges(server.services.store, monkeypatch)
        await admin.put_sink("held", webhook_sink("http://127.0.0.1:9/x", paused=True))
        token = (await admin.add_device("d0"))["token"]
        async with Device("d0", server.url, token=token, interval=None,
                          path=tmp_path / "d0.db") as dev:
            await produce([dev], range(3))
            items, _ = await admin.feed(limit=1000)
            newest = max(item["received"] for item in items)

            async def held_twice() -> bool:  # two rounds that could purge every item
                return len([gone for before, gone in purges if before > newest]) >= 2

            await eventually(held_twice)
            assert len(await feed_keys(admin)) == 6  # the paused sink held them
            await admin.delete_sink("held")

            async def purged() -> bool:
                return await feed_keys(admin) == []

            await eventually(purged)
            assert await server.services.store.feed_floor() == 6
            assert value(await scrape(server), "crdtsync_feed_floor") == 6
            # A sink from the end on holds what comes next (the purge loop goes on).
            await admin.put_sink("next", webhook_sink("http://127.0.0.1:9/x", paused=True,
                                                      start="head"))
            await produce([dev], range(3, 4))
            items, _ = await admin.feed(after=6)
            events = (await admin.events(device="d0"))["events"]
    assert [(i["kind"], i.get("seq")) for i in items] == [("event", 4), ("state", None)]
    assert [e["seq"] for e in events] == [4]
