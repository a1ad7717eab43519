"""The live channel's server side, ``GET /v1/wake`` (docs/protocol.md section 14a), against a
real server on a real SQLite file: every kind of cloud write wakes the device it concerns
and nobody else, a cursor kept across a server restart still finds what happened meanwhile,
a full server answers ``429`` with ``Retry-After``, fleet-wide wake-ups are spread, shutdown
answers held requests, and a second server process on the same database wakes devices
waiting on the first.

Held requests are started as tasks; "not woken" is asserted with a short hold answered
``wake: false`` (the server's own timer), never with a client-side sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crdtsync import AdminClient, Device
from crdtsync.protocol import WAKE_PATH
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store import (
    DeviceRecord,
    MemoryStore,
    SQLiteStore,
    wake_device,
    wake_fleet,
)
from crdtsync_server.wake import WakeHub

from .conftest import ADMIN_TOKEN, DeviceFactory, local_app
from .scrape import parse, value
from .test_downlink import put_route, until

HELD = 30.0
"""How long a test lets the server hold a request that must be woken (an upper bound that
only a failing test reaches)."""


@dataclasses.dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class Channel:
    """Raw wake requests of one device over their own session."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url + WAKE_PATH
        self.token = token
        self.session = aiohttp.ClientSession()

    async def get(self, after: int | str | None = None, wait: float | str | None = None,
                  token: str | None = None) -> Answer:
        params = {k: str(v) for k, v in (("after", after), ("wait", wait)) if v is not None}
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with self.session.get(self.url, params=params, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=HELD + 30)) as resp:
            return Answer(resp.status, await resp.json(), dict(resp.headers))

    async def start(self) -> int:
        """The cursor to wait from (the request without ``after``)."""
        answer = await self.get()
        assert answer.status == 200 and answer.body["wake"] is False
        return int(answer.body["w"])

    def hold(self, after: int, wait: float = HELD) -> asyncio.Task[Answer]:
        return asyncio.create_task(self.get(after, wait))

    async def aclose(self) -> None:
        await self.session.close()


@pytest.fixture
async def channel(server: Server, admin: AdminClient) -> AsyncIterator[Any]:
    opened: list[Channel] = []

    async def open_channel(device_id: str, url: str | None = None) -> Channel:
        token = (await admin.add_device(device_id))["token"]
        chan = Channel(url or server.url, token)
        opened.append(chan)
        return chan

    yield open_channel
    for chan in opened:
        await chan.aclose()


async def held(server: Server, count: int) -> None:
    """Wait until the server holds ``count`` requests (so a write comes after they wait)."""
    async def holding() -> bool:
        return server.services.wakes.waiting >= count

    await until(holding)


async def woken(task: asyncio.Task[Answer]) -> Answer:
    answer = await asyncio.wait_for(task, HELD + 10)
    assert answer.status == 200 and answer.body["wake"] is True, answer
    return answer


async def test_start_answers_at_once_and_a_quiet_hold_ends_unwoken(
        server: Server, channel: Any) -> None:
    chan = await channel("d1")
    start = await chan.start()
    answer = await chan.get(start, wait=0.2)
    assert answer.body == {"wake": False, "w": start, "in": 0}
    assert answer.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("kind", ["state", "device_env", "message", "command", "fleet_move"])
async def test_each_device_write_wakes_the_device_and_nobody_else(
        server: Server, admin: AdminClient, channel: Any, kind: str) -> None:
    await admin.add_fleet("west")
    chan, other = await channel("d1"), await channel("d2")
    start = await chan.start()
    task = chan.hold(start)
    await held(server, 1)
    if kind == "state":
        await admin.patch_state("d1", {"led": "on"})
    elif kind == "device_env":
        await admin.request("PATCH", "/v1/devices/d1/env", json={"mode": "eco"})
    elif kind == "message":
        await admin.request("POST", "/v1/devices/d1/messages",
                            json={"topic": "hello", "body": {}})
    elif kind == "command":
        await admin.request("POST", "/v1/devices/d1/commands",
                            json={"method": "reboot", "params": {}})
    else:
        await admin.set_fleet("d1", "west")
    answer = await woken(task)
    assert answer.body["w"] > start and answer.body["in"] == 0
    assert (await other.get(start, wait=0.2)).body["wake"] is False
    # nothing new since: the next hold is quiet
    assert (await chan.get(answer.body["w"], wait=0.2)).body["wake"] is False


@pytest.mark.parametrize("kind", ["fleet_env", "template", "schema"])
async def test_a_fleet_write_wakes_its_devices_only(
        server: Server, admin: AdminClient, channel: Any, kind: str) -> None:
    await admin.add_fleet("west")
    inside, outside = await channel("d1"), await channel("d2")
    await admin.set_fleet("d1", "west")
    start = await inside.start()
    task = inside.hold(start)
    await held(server, 1)
    if kind == "fleet_env":
        await admin.request("PATCH", "/v1/fleets/west/env", json={"mode": "eco"})
    elif kind == "template":
        await admin.request("PUT", "/v1/fleets/west/templates/temp", json={"t": "float32"})
    else:
        await admin.put_schema("west", {"unknown": "refuse"})
    assert (await woken(task)).body["w"] > start
    assert (await outside.get(start, wait=0.2)).body["wake"] is False


async def test_a_project_write_wakes_everyone(server: Server, admin: AdminClient,
                                             channel: Any) -> None:
    chans = [await channel(f"d{i}") for i in range(3)]
    start = await chans[0].start()
    tasks = [chan.hold(start) for chan in chans]
    await held(server, 3)
    await admin.request("PATCH", "/v1/env", json={"tz": "UTC"})
    answers = [await woken(task) for task in tasks]
    assert {a.body["w"] for a in answers} == {start + 1}


async def test_a_proxied_request_outcome_wakes_its_device(
        server: Server, admin: AdminClient, make_device: DeviceFactory) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"temp": 21})

    app = web.Application()
    app.router.add_post("/weather", slow)
    async with local_app(app) as url:
        await put_route(admin, "weather", {"url": url + "/weather", "timeout": 30})
        server.services.sync.proxy_budget = 0.01
        dev = await make_device("d1")
        chan = Channel(server.url, make_device.tokens["d1"])  # type: ignore[attr-defined]
        try:
            start = await chan.start()
            request_id = await dev.queue_request("weather", {})
            assert (await dev.sync()).outcomes == 0  # the budget ran out first
            task = chan.hold(start)
            await held(server, 1)
            gate.set()
            await woken(task)
            await dev.sync()
            assert (await dev.wait_request(request_id))["body"] == {"temp": 21}
        finally:
            await chan.aclose()


async def test_a_write_before_the_hold_wakes_at_once(server: Server, admin: AdminClient,
                                                     channel: Any) -> None:
    """Written between the device's start and its next request: answered without holding."""
    chan = await channel("d1")
    start = await chan.start()
    await admin.patch_state("d1", {"led": "on"})
    answer = await chan.get(start, wait=HELD)
    assert answer.body["wake"] is True and answer.body["w"] == start + 1


async def test_a_cursor_kept_across_a_restart_finds_what_happened(
        server_config: ServerConfig) -> None:
    """The device keeps its cursor while the server is down; a command queued meanwhile
    (by another process on the database) is found in the store when it comes back."""
    async with Server(server_config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        await admin.add_device("d2")
        chan = Channel(srv.url, token)
        start = await chan.start()
        await chan.aclose()
    async with SQLiteStore(server_config.db) as store:
        await store.queue_downlink("d2", "command", "reboot", {}, 1, None)
        await store.queue_downlink("d1", "command", "reboot", {}, 1, None)
    async with Server(server_config) as srv:
        assert srv.services.wakes.cursor == start + 2  # the hub starts after both
        chan = Channel(srv.url, token)
        try:
            answer = await chan.get(start, wait=HELD)
            assert answer.body["wake"] is True
            assert (await chan.get(answer.body["w"], wait=0.2)).body["wake"] is False
        finally:
            await chan.aclose()


async def test_a_cursor_the_server_never_gave_is_a_wake(server: Server, channel: Any) -> None:
    """A database restored from a backup or replaced: the device syncs once, then follows
    the new cursor."""
    chan = await channel("d1")
    start = await chan.start()
    answer = await chan.get(start + 1000, wait=HELD)
    assert answer.body == {"wake": True, "w": start, "in": 0}


async def test_a_full_server_answers_429_with_retry_after(server: Server,
                                                          channel: Any) -> None:
    server.services.wakes.max_waiters = 1
    first, second = await channel("d1"), await channel("d2")
    start = await first.start()
    task = first.hold(start, wait=HELD)
    await held(server, 1)
    async with second.session.get(server.url + "/v1/metrics", headers={
            "Authorization": f"Bearer {ADMIN_TOKEN}"}) as metrics:
        assert value(parse(await metrics.text()), "crdtsync_wake_waiting") == 1
    refused = await second.get(start, wait=HELD)
    assert refused.status == 429
    assert refused.body["error"]["code"] == "too_many_requests"
    assert refused.body["error"]["retryable"] is True
    retry = int(refused.headers["Retry-After"])
    assert 5 <= retry <= 30 and refused.body["error"]["detail"]["retry_after"] == retry
    server.services.wakes.release()
    assert (await asyncio.wait_for(task, HELD)).body["wake"] is False


@pytest.mark.parametrize("query", [
    {"after": "-1"}, {"after": "x"}, {"after": "1" * 20}, {"wait": "-1"}, {"wait": "3601"},
    {"wait": "1e3"}, {"wait": "nan"}, {"wait": "0.0001"},
])
async def test_bad_queries_are_refused(server: Server, channel: Any,
                                       query: dict[str, str]) -> None:
    chan = await channel("d1")
    answer = await chan.get(query.get("after", "0"), query.get("wait", "0"))
    assert answer.status == 400 and answer.body["error"]["code"] == "malformed_request"
    assert (await chan.get(0, 0)).status == 200  # and the server keeps serving


async def test_credentials_are_checked_first(server: Server, admin: AdminClient,
                                             channel: Any) -> None:
    chan = await channel("d1")
    answer = await chan.get(0, 0, token="wrong")
    assert answer.status == 401 and answer.body["error"]["code"] == "unauthorized"
    await admin.set_disabled("d1", True)
    answer = await chan.get(0, 0)
    assert answer.status == 403 and answer.body["error"]["code"] == "forbidden"


async def test_shutdown_answers_held_requests(server_config: ServerConfig) -> None:
    srv = Server(server_config)
    await srv.start()
    try:
        async with AdminClient(srv.url, ADMIN_TOKEN) as admin:
            token = (await admin.add_device("d1"))["token"]
        chan = Channel(srv.url, token)
        start = await chan.start()
        task = chan.hold(start, wait=HELD)
        await held(srv, 1)
    finally:
        await srv.aclose()
    try:
        answer = await asyncio.wait_for(task, HELD)
        assert answer.status == 200 and answer.body["wake"] is False
    finally:
        await chan.aclose()


async def test_another_process_on_the_same_database_wakes_the_device(
        server: Server, server_config: ServerConfig, channel: Any) -> None:
    """A second server on the same SQLite file takes the write; the first, holding the
    device's request, finds the entry by following the log (its ``wake_poll``)."""
    chan = await channel("d1")
    start = await chan.start()
    task = chan.hold(start)
    await held(server, 1)
    async with Server(dataclasses.replace(server_config, port=0)) as other, \
            AdminClient(other.url, ADMIN_TOKEN) as admin:
        await admin.patch_state("d1", {"led": "on"})
    assert (await woken(task)).body["w"] > start


async def test_maintenance_purges_old_entries(server: Server, admin: AdminClient,
                                              channel: Any, server_clock: Any) -> None:
    chan = await channel("d1")
    start = await chan.start()
    await admin.patch_state("d1", {"led": "on"})
    server_clock.advance(server.services.config.wake_retention_ms + 1)
    await server.services.maintenance.purge()
    assert await server.services.store.read_wakes(0, 10) == []
    # purged, yet a device still behind it is told to sync
    assert (await chan.get(start, wait=HELD)).body["wake"] is True


# --- the hub alone, on a memory store and a stepped clock ------------------------------------

class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_fleet_wakeups_are_spread_at_the_rate() -> None:
    store, ticks = MemoryStore(), Ticks()
    hub = WakeHub(store, rate=10, clock=ticks)
    await hub.start()
    try:
        devices = [DeviceRecord(f"d{i}", "h", created=1, fleet="west") for i in range(3)]
        own = DeviceRecord("solo", "h", created=1)
        tasks = [asyncio.create_task(hub.wait(d, 0, HELD)) for d in [*devices, own]]
        async def holding() -> bool:
            return hub.waiting == 4

        await until(holding)
        await store.add_wakes([wake_fleet("west"), wake_device("solo")], 1)
        signals = [await asyncio.wait_for(t, HELD) for t in tasks]
    finally:
        await hub.aclose()
    assert all(s.wake and s.cursor == 2 for s in signals)
    assert sorted(s.delay_ms for s in signals[:3]) == [0, 100, 200]
    assert signals[3].delay_ms == 0  # a device's own wake-up is never delayed


async def test_the_spread_is_capped_at_a_minute() -> None:
    store, ticks = MemoryStore(), Ticks()
    hub = WakeHub(store, rate=0.01, clock=ticks)
    device = DeviceRecord("d1", "h", created=1, fleet="west")
    await hub.start()
    try:
        await store.add_wakes([wake_fleet("west")], 1)
        await hub.catch_up()
        delays = [(await hub.wait(device, 0, 1)).delay_ms for _ in range(3)]
    finally:
        await hub.aclose()
    assert delays == [0, 60_000, 60_000]


async def test_the_hub_forgets_targets_beyond_its_bound(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Memory stays bounded: past ``REMEMBERED_TARGETS`` the hub forgets and asks the store
    about older cursors, with the same answers."""
    from crdtsync_server import wake as wake_module
    monkeypatch.setattr(wake_module, "REMEMBERED_TARGETS", 2)
    store = MemoryStore()
    hub = WakeHub(store)
    await hub.start()
    try:
        await store.add_wakes([wake_device(f"d{i}") for i in range(3)], 1)
        await hub.catch_up()
        assert hub._last == {} and hub._since == 3
        signal = await hub.wait(DeviceRecord("d1", "h", created=1), 0, 0)
        assert signal.wake is True
        assert (await hub.wait(DeviceRecord("d1", "h", created=1), 3, 0)).wake is False
    finally:
        await hub.aclose()


# --- end to end: real devices with their live channel ----------------------------------------

LONG_INTERVAL = 600.0
"""The devices' interval sync: far beyond every wait below, so only the channel can have
delivered what they received."""


async def test_an_online_device_gets_cloud_writes_messages_and_commands_at_once(
        server: Server, admin: AdminClient, make_device: DeviceFactory) -> None:
    dev = await make_device("d1", interval=LONG_INTERVAL)
    got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    dev.on_change(lambda name, key, old, new: got.put_nowait(("state", new)))

    @dev.on("hello")
    async def on_hello(message: Any) -> None:
        got.put_nowait(("message", message.body["n"]))

    @dev.command("blink")
    async def on_blink(params: Any) -> Any:
        got.put_nowait(("command", params["n"]))
        return "ok"

    async def channel_open() -> bool:
        return dev.wake_cursor is not None and server.services.wakes.waiting == 1

    await until(channel_open)
    assert dev.live
    await admin.patch_state("d1", {"led": 1})
    assert await asyncio.wait_for(got.get(), HELD) == ("state", 1)
    await admin.request("POST", "/v1/devices/d1/messages", json={"topic": "hello",
                                                                 "body": {"n": 2}})
    assert await asyncio.wait_for(got.get(), HELD) == ("message", 2)
    command = await admin.request("POST", "/v1/devices/d1/commands",
                                  json={"method": "blink", "params": {"n": 3}})
    assert await asyncio.wait_for(got.get(), HELD) == ("command", 3)
    done = await admin.request("GET", f"/v1/commands/{command['id']}?wait=30")
    assert done["status"] == "succeeded" and done["result"] == "ok"


async def test_a_live_device_rides_out_a_server_restart(
        server_config: ServerConfig, tmp_path: Any) -> None:
    """The server goes away and comes back on the same port; a command queued while it was
    down reaches the device through its channel, which reconnected by itself."""
    first = Server(server_config)
    await first.start()
    port = int(first.url.rsplit(":", 1)[1])
    async with AdminClient(first.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
    ran: asyncio.Queue[Any] = asyncio.Queue()
    dev = Device("d1", first.url, token=token, path=tmp_path / "d1.db",
                 interval=LONG_INTERVAL)

    @dev.command("blink")
    async def on_blink(params: Any) -> Any:
        ran.put_nowait(params["n"])
        return "ok"

    await dev.start()
    try:
        async def channel_open() -> bool:
            return first.services.wakes.waiting == 1

        await until(channel_open)
        await first.aclose()
        async with SQLiteStore(server_config.db) as store:  # queued while the server is down
            await store.queue_downlink("d1", "command", "blink", {"n": 1}, 1, None)
        async with Server(dataclasses.replace(server_config, port=port)) as again:
            assert await asyncio.wait_for(ran.get(), 60) == 1
            async with AdminClient(again.url, ADMIN_TOKEN) as admin:
                await admin.request("POST", "/v1/devices/d1/commands",
                                    json={"method": "blink", "params": {"n": 2}})
            assert await asyncio.wait_for(ran.get(), 60) == 2
    finally:
        await dev.aclose()
