"""Cloud-to-device messages and commands, and proxied requests, end to end: a real server on
127.0.0.1, real SQLite files, a real local HTTP target for routes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crdtsync import AdminClient, Device, RouteFailed, TransportError
from crdtsync._inbox import Message
from crdtsync.transport import HttpTransport
from crdtsync_server import Server, ServerConfig
from crdtsync_server.notify import DeviceNotifier, Watch

from .conftest import ADMIN_TOKEN, DeviceFactory, LoseResponses, SteppedClock, local_app


async def post(admin: AdminClient, path: str, body: Any) -> dict[str, Any]:
    return await admin.request("POST", path, json=body)  # type: ignore[no-any-return]


async def get(admin: AdminClient, path: str) -> dict[str, Any]:
    return await admin.request("GET", path)  # type: ignore[no-any-return]


# --- messages ----------------------------------------------------------------------------------

async def test_messages_arrive_in_order_once_across_restarts(make_device: DeviceFactory,
                                                             admin: AdminClient) -> None:
    dev = await make_device("d1")
    await dev.sync()
    await dev.aclose()  # offline from here
    for n in range(3):
        await post(admin, "/v1/devices/d1/messages", {"topic": "cfg", "body": {"n": n}})
    listed = await get(admin, "/v1/devices/d1/messages")
    assert [i["status"] for i in listed["items"]] == ["queued"] * 3

    dev = await make_device("d1")  # restarted
    seen: list[Message] = []
    dev.on("cfg")(seen.append)
    report = await dev.sync()
    assert [m.body["n"] for m in seen] == [0, 1, 2] and report.downlink == 3
    await dev.sync()  # acknowledges
    await dev.sync()
    assert [m.body["n"] for m in seen] == [0, 1, 2]  # never twice
    listed = await get(admin, "/v1/devices/d1/messages")
    assert [i["status"] for i in listed["items"]] == ["delivered"] * 3
    one = await get(admin, f"/v1/messages/{listed['items'][0]['id']}")
    assert one["body"] == {"n": 0}


async def test_expired_message_is_never_delivered(make_device: DeviceFactory,
                                                  admin: AdminClient,
                                                  server_clock: SteppedClock) -> None:
    dev = await make_device("d1")
    await post(admin, "/v1/devices/d1/messages", {"topic": "t", "body": 1, "ttl": 0.05})
    await post(admin, "/v1/devices/d1/messages", {"topic": "t", "body": 2})
    server_clock.advance(100)  # queued and expired on the server's clock: no sleep
    seen: list[Any] = []
    dev.on("t")(lambda m: seen.append(m.body))
    await dev.sync()
    await dev.sync()
    assert seen == [2]
    items = (await get(admin, "/v1/devices/d1/messages"))["items"]
    assert [i["status"] for i in items] == ["expired", "delivered"]


async def test_failing_or_missing_handler_holds_the_message(make_device: DeviceFactory,
                                                            admin: AdminClient) -> None:
    dev = await make_device("d1")
    await post(admin, "/v1/devices/d1/messages", {"topic": "a", "body": 1})
    await post(admin, "/v1/devices/d1/messages", {"topic": "b", "body": 2})
    await dev.sync()  # no handler for "a": both wait
    calls: list[int] = []

    def flaky(message: Message) -> None:
        calls.append(message.body)
        if len(calls) == 1:
            raise RuntimeError("not now")

    dev.on("a")(flaky)
    dev.on("*")(lambda m: calls.append(m.body))
    await dev.sync()  # "a" fails once: held
    await dev.sync()
    await dev.sync()
    assert calls == [1, 1, 2]
    items = (await get(admin, "/v1/devices/d1/messages"))["items"]
    assert [i["status"] for i in items] == ["delivered", "delivered"]


# --- commands ----------------------------------------------------------------------------------

async def test_command_round_trip_for_an_online_device(make_device: DeviceFactory,
                                                       admin: AdminClient) -> None:
    dev = await make_device("d1", interval=30.0, min_spacing=0.01)
    runs: list[Any] = []

    @dev.command("reboot")
    async def reboot(params: Any) -> dict[str, Any]:
        runs.append(params)
        return {"rebooted": True, "delay": params["delay"]}

    command = await post(admin, "/v1/devices/d1/commands",
                         {"method": "reboot", "params": {"delay": 3}, "deadline": 60})
    dev.request_sync()  # what a push channel would do; the loop also syncs every interval
    done = await get(admin, f"/v1/commands/{command['id']}?wait=10")
    assert done["status"] == "succeeded"
    assert done["result"] == {"rebooted": True, "delay": 3}
    assert runs == [{"delay": 3}]


async def test_command_for_an_offline_device_survives_restarts(
        make_device: DeviceFactory, admin: AdminClient, server_config: ServerConfig,
        server: Server) -> None:
    dev = await make_device("d1")
    await dev.aclose()
    command = await post(admin, "/v1/devices/d1/commands",
                         {"method": "blink", "params": {"n": 2}})
    assert (await get(admin, f"/v1/commands/{command['id']}"))["status"] == "queued"
    dev = await make_device("d1")
    runs: list[Any] = []
    dev.command("blink")(lambda p: runs.append(p) or "ok")
    report = await dev.sync()
    assert report.rounds >= 2  # the result went out at once, in an extra round
    state = await get(admin, f"/v1/commands/{command['id']}")
    assert (state["status"], state["result"]) == ("succeeded", "ok")
    await dev.sync()
    assert runs == [{"n": 2}]


async def test_command_runs_at_most_once_even_after_a_crash(make_device: DeviceFactory,
                                                            admin: AdminClient) -> None:
    dev = await make_device("d1")
    command = await post(admin, "/v1/devices/d1/commands", {"method": "pump", "params": 1})
    item = await get(admin, f"/v1/commands/{command['id']}")
    # The device crashed after marking the command started, before recording its result.
    await dev._store.set_meta(down_started=item["seq"])
    runs: list[Any] = []
    dev.command("pump")(runs.append)
    await dev.sync()
    state = await get(admin, f"/v1/commands/{command['id']}")
    assert state["status"] == "failed" and state["error"]["code"] == "interrupted"
    assert runs == []


async def test_command_errors_and_unknown_methods_fail_with_a_code(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")

    @dev.command("explode")
    def explode(params: Any) -> None:
        raise ValueError("no fuse")

    a = await post(admin, "/v1/devices/d1/commands", {"method": "explode"})
    b = await post(admin, "/v1/devices/d1/commands", {"method": "nosuch"})
    await dev.sync()
    fa = await get(admin, f"/v1/commands/{a['id']}")
    fb = await get(admin, f"/v1/commands/{b['id']}")
    assert (fa["status"], fa["error"]["code"], fa["error"]["message"]) == (
        "failed", "ValueError", "no fuse")
    assert (fb["status"], fb["error"]["code"]) == ("failed", "unknown_method")


async def test_command_past_its_deadline_expires_and_never_runs(
        make_device: DeviceFactory, admin: AdminClient, server_clock: SteppedClock) -> None:
    dev = await make_device("d1")
    runs: list[Any] = []
    dev.command("late")(runs.append)
    command = await post(admin, "/v1/devices/d1/commands",
                         {"method": "late", "deadline": 0.05})
    server_clock.advance(100)  # past its deadline on the server's clock: no sleep
    await dev.sync()
    assert (await get(admin, f"/v1/commands/{command['id']}"))["status"] == "expired"
    assert runs == []


def count_store_calls(store: object) -> Counter[str]:
    """Count every call of ``store``'s public coroutine methods (the instance's attributes
    are replaced by counting wrappers; every user of the store sees them)."""
    calls: Counter[str] = Counter()

    def counting(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return await method(*args, **kwargs)
        return wrapper

    for name in dir(store):
        method = getattr(store, name)
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(store, name, counting(name, method))
    return calls


WAITERS = 200


def when_all_wait(notifier: DeviceNotifier, n: int) -> asyncio.Event:
    """An event set once ``n`` long polls started watching ``notifier`` (set as the last
    one starts; a coroutine awaiting it resumes after that one went to sleep)."""
    entered = asyncio.Event()
    original = notifier.watch
    count = 0

    def watch(device: str) -> contextlib.AbstractContextManager[Watch]:
        nonlocal count
        count += 1
        if count == n:
            entered.set()
        return original(device)

    notifier.watch = watch  # type: ignore[method-assign]
    return entered


async def test_command_waiters_read_nothing_until_the_result_commits(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """200 long polls cost one read each to start and one when the result commits, nothing
    while they wait (the fallback poll is set to an hour here)."""
    config = replace(server_config, command_poll=3600.0)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        command = await post(admin, "/v1/devices/d1/commands",
                             {"method": "add", "params": {"x": 1}})
        reads = count_store_calls(server.services.store)
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                connector=aiohttp.TCPConnector(limit=0)) as http:

            async def wait_for_result() -> Any:
                async with http.get(f"{server.url}/v1/commands/{command['id']}?wait=60") \
                        as resp:
                    return await resp.json()

            all_waiting = when_all_wait(server.services.results, WAITERS)
            waiters = [asyncio.create_task(wait_for_result()) for _ in range(WAITERS)]
            await all_waiting.wait()
            assert server.services.results.waiting("d1") == WAITERS
            assert dict(reads) == {"get_downlink": WAITERS}  # each waiter's first read only
            async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                              interval=None) as dev:
                dev.command("add")(lambda params: {"x": params["x"] + 1})
                await dev.sync()  # runs the command; the result commits in its second round
                answers = await asyncio.gather(*waiters)
    assert all(a["status"] == "succeeded" and a["result"] == {"x": 2} for a in answers)
    assert reads["get_downlink"] == 2 * WAITERS  # one re-read each, after the commit


async def test_a_wake_up_while_the_watcher_reads_is_not_lost() -> None:
    notifier = DeviceNotifier(poll=3600.0)
    with notifier.watch("d1") as watch, notifier.watch("d2") as other:
        assert notifier.waiting("d1") == 1
        notifier.notify("d1")  # while the watcher is busy elsewhere (reading the store)
        assert await asyncio.wait_for(watch.wait(3600.0), 5) is True
        assert await watch.wait(0) is False  # consumed: the next wait sleeps again
        assert await other.wait(0) is False  # another device's watch was not woken
        notifier.close()
        assert await asyncio.wait_for(other.wait(3600.0), 5) is True
    assert notifier.waiting("d1") == 0 and notifier.notified == 1


async def test_server_shutdown_answers_waiting_command_polls(
        server_config: ServerConfig) -> None:
    """Stopping the server releases long polls at once, with the command as it is."""
    server = Server(replace(server_config, command_poll=3600.0))
    await server.start()
    try:
        async with AdminClient(server.url, ADMIN_TOKEN) as admin:
            await admin.add_device("d1")
            command = await post(admin, "/v1/devices/d1/commands", {"method": "m"})
            all_waiting = when_all_wait(server.services.results, 1)
            waiting = asyncio.create_task(get(admin, f"/v1/commands/{command['id']}?wait=60"))
            await all_waiting.wait()
            await server.aclose()
            assert (await waiting)["status"] == "queued"
    finally:
        await server.aclose()


async def test_command_waiter_sees_a_result_committed_by_another_process(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """Two servers on one database: the long poll on the first sees the result the device
    committed through the second, at its fallback poll."""
    async with Server(replace(server_config, command_poll=0.05)) as first, \
            Server(server_config) as second, \
            AdminClient(first.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        command = await post(admin, "/v1/devices/d1/commands", {"method": "ping"})
        waiting = asyncio.create_task(get(admin, f"/v1/commands/{command['id']}?wait=60"))
        async with Device("d1", second.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            dev.command("ping")(lambda params: "pong")
            await dev.sync()
        done = await waiting
    assert (done["status"], done["result"]) == ("succeeded", "pong")


async def test_lost_responses_do_not_repeat_commands_or_messages(
        admin: AdminClient, server: Server, tmp_path: Path) -> None:
    token = (await admin.add_device("d1"))["token"]
    await post(admin, "/v1/devices/d1/messages", {"topic": "t", "body": "m"})
    command = await post(admin, "/v1/devices/d1/commands", {"method": "c"})
    transport = LoseResponses(HttpTransport(server.url, token), n=2)
    seen: list[Any] = []
    async with Device("d1", transport=transport, path=tmp_path / "d.db", interval=None) as dev:
        dev.on("t")(lambda m: seen.append(m.body))
        dev.command("c")(lambda p: seen.append("ran") or 7)
        with pytest.raises(TransportError):
            await dev.sync()  # the response carrying the items is lost
        with pytest.raises(TransportError):
            await dev.sync()  # this one delivered them; its response is lost too
        for _ in range(3):
            await dev.sync()
    assert seen == ["m", "ran"]
    assert (await get(admin, f"/v1/commands/{command['id']}"))["result"] == 7


# --- proxied requests --------------------------------------------------------------------------

@pytest.fixture
async def target() -> AsyncIterator[dict[str, Any]]:
    """A local HTTP service the routes point at; counts its calls. It answers once
    ``state["gate"]`` is set (it is, unless a test clears it to hold the answers)."""
    gate = asyncio.Event()
    gate.set()
    state: dict[str, Any] = {"calls": [], "gate": gate}

    async def weather(request: web.Request) -> web.Response:
        body = await request.json()
        state["calls"].append({"body": body, "key": request.headers.get("X-Api-Key")})
        await gate.wait()
        return web.json_response({"city": body["city"], "temp": 21.5})

    app = web.Application()
    app.router.add_post("/weather", weather)
    async with local_app(app) as url:
        state["url"] = url
        yield state


async def put_route(admin: AdminClient, alias: str, body: dict[str, Any]) -> dict[str, Any]:
    return await admin.request("PUT", f"/v1/routes/{alias}", json=body)  # type: ignore[no-any-return]


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds (polling every 10 ms); fail after 20 s."""
    async with asyncio.timeout(20):
        for delay in itertools.repeat(0.01):
            if await check():
                return
            await asyncio.sleep(delay)


async def test_request_result_comes_back_in_the_same_sync(
        make_device: DeviceFactory, admin: AdminClient, target: dict[str, Any],
        server: Server) -> None:
    shown = await put_route(admin, "weather", {"url": target["url"] + "/weather",
                                               "headers": {"X-Api-Key": "s3cret"}})
    assert shown["headers"] == {"X-Api-Key": "***"}  # secrets never leave the server
    server.services.sync.proxy_budget = 30.0  # the sync waits for the answer, however slow
    dev = await make_device("d1")
    request_id = await dev.queue_request("weather", {"city": "Oslo"})
    report = await dev.sync()
    outcome = await asyncio.wait_for(dev.wait_request(request_id), 5)
    assert report.outcomes == 1 and outcome["ok"] and outcome["body"]["city"] == "Oslo"
    assert target["calls"] == [{"body": {"city": "Oslo"}, "key": "s3cret"}]
    assert await dev.pending_requests() == []


async def test_request_made_offline_survives_a_restart_and_runs_once(
        make_device: DeviceFactory, admin: AdminClient, target: dict[str, Any],
        server: Server, tmp_path: Path) -> None:
    await put_route(admin, "weather", {"url": target["url"] + "/weather"})
    dev = await make_device("d1")
    waiting = asyncio.create_task(dev.request("weather", {"city": "Bergen"},
                                              request_id="req-1"))

    async def queued() -> bool:
        return await dev.pending_requests() == ["req-1"]

    await until(queued)
    waiting.cancel()  # the app stops waiting; the request stays queued
    await dev.aclose()
    dev = await make_device("d1")
    assert await dev.pending_requests() == ["req-1"]
    # the first sync's response is lost after the cloud accepted and performed the request
    dev._transport = LoseResponses(dev._transport, n=1)  # type: ignore[arg-type]
    with pytest.raises(TransportError):
        await dev.sync()
    await dev.sync()
    outcome = await dev.wait_request("req-1")
    assert outcome["body"] == {"city": "Bergen", "temp": 21.5}
    assert len(target["calls"]) == 1  # performed once although sent twice
    await dev.sync()  # acknowledges the outcome
    assert (await server.services.store.get_request("d1", "req-1")).status == "acked"  # type: ignore[union-attr]


async def test_slow_target_result_arrives_on_a_later_sync(
        make_device: DeviceFactory, admin: AdminClient, target: dict[str, Any],
        server: Server) -> None:
    await put_route(admin, "weather", {"url": target["url"] + "/weather", "timeout": 30})
    target["gate"].clear()  # the target answers only once released: after the 1 s budget
    dev = await make_device("d1")
    request_id = await dev.queue_request("weather", {"city": "Tromsø"})
    report = await dev.sync()
    assert report.outcomes == 0 and target["calls"]
    target["gate"].set()

    async def answered() -> bool:
        stored = await server.services.store.get_request("d1", request_id)
        return stored is not None and stored.status == "done"

    await until(answered)
    report = await dev.sync()
    assert report.outcomes == 1
    assert (await asyncio.wait_for(dev.wait_request(request_id), 5))["body"]["temp"] == 21.5


async def test_routes_that_are_unknown_or_not_allowed_fail_typed(
        make_device: DeviceFactory, admin: AdminClient, target: dict[str, Any]) -> None:
    await put_route(admin, "weather", {"url": target["url"] + "/weather",
                                       "devices": ["someone-else"]})
    dev = await make_device("d1")
    results = []
    for route in ("weather", "nowhere"):
        request_id = await dev.queue_request(route, {"city": "X"})
        await dev.sync()
        with pytest.raises(RouteFailed) as info:
            await asyncio.wait_for(dev.wait_request(request_id), 5)
        results.append(info.value.reason)
    assert results == ["route_not_allowed", "unknown_route"]
    assert target["calls"] == []  # never an address that is not a configured, allowed route


async def test_routes_api_and_config_file(server_config: ServerConfig, tmp_path: Path,
                                          target: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHER_KEY", "from-env")
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps({"routes": {"weather": {
        "url": target["url"] + "/weather", "headers": {"X-Api-Key": "${WEATHER_KEY}"}}}}))
    config = replace(server_config, routes_file=str(routes_file))
    async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        assert [r["alias"] for r in (await get(admin, "/v1/routes"))["routes"]] == ["weather"]
        await put_route(admin, "echo", {"url": target["url"] + "/weather", "method": "POST"})
        await admin.request("DELETE", "/v1/routes/echo")
        with pytest.raises(Exception) as info:
            await get(admin, "/v1/routes/echo")
        assert getattr(info.value, "code", "") == "not_found"
        with pytest.raises(Exception) as bad:
            await put_route(admin, "evil", {"url": "file:///etc/passwd"})
        assert getattr(bad.value, "code", "") == "malformed_request"
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", srv.url, token=token, path=tmp_path / "d.db",
                          interval=None) as dev:
            request_id = await dev.queue_request("weather", {"city": "Oslo"})
            await dev.sync()
            assert (await asyncio.wait_for(dev.wait_request(request_id), 5))["ok"]
    assert target["calls"][-1]["key"] == "from-env"


async def test_server_restart_mid_request_answers_interrupted_not_twice(
        server_config: ServerConfig, tmp_path: Path, target: dict[str, Any]) -> None:
    """The server stops while the target is still answering: after the restart the request
    is answered ``interrupted``; the target is never called a second time."""
    config = replace(server_config, proxy_budget=0.1, proxy_grace=0.1)
    target["gate"].clear()  # the target never answers while the first server runs
    async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        await put_route(admin, "weather", {"url": target["url"] + "/weather", "timeout": 30})
        port = srv.port
        async with Device("d1", srv.url, token=token, path=tmp_path / "d.db",
                          interval=None) as dev:
            await dev.queue_request("weather", {"city": "Oslo"}, request_id="r1")
            await dev.sync()  # accepted; the target is still answering when we stop
    async with Server(replace(config, port=port)) as srv, Device(
            "d1", srv.url, token=token, path=tmp_path / "d.db", interval=None) as dev:
        await dev.sync()
        with pytest.raises(RouteFailed) as info:
            await asyncio.wait_for(dev.wait_request("r1"), 5)
    assert info.value.reason == "interrupted"
    assert len(target["calls"]) == 1
    target["gate"].set()  # let the first call end before the target stops


async def test_finished_messages_are_purged_after_the_retention(
        server_config: ServerConfig, tmp_path: Path) -> None:
    config = replace(server_config, retention_ms=0, purge_every=0.05)
    async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        kept = await post(admin, "/v1/devices/d1/messages", {"topic": "later", "body": 1})
        async with Device("d1", srv.url, token=token, path=tmp_path / "d.db",
                          interval=None) as dev:
            dev.on("now")(lambda m: None)
            gone = await post(admin, "/v1/devices/d1/messages", {"topic": "now", "body": 2})
            await dev.sync()  # "later" has no handler: it stays queued, "now" waits behind it
            dev.on("later")(lambda m: None)
            await dev.sync()
            await dev.sync()

        async def purged() -> bool:
            return (await get(admin, "/v1/devices/d1/messages"))["items"] == []

        await until(purged)  # both delivered, then purged
        with pytest.raises(Exception) as info:
            await get(admin, f"/v1/messages/{gone['id']}")
        assert getattr(info.value, "code", "") == "not_found"
        assert kept["id"] != gone["id"]


async def test_api_routes_persist_and_file_secrets_stay_in_the_file(
        server_config: ServerConfig, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILE_SECRET", "file-secret-value")
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps({"routes": {"from-file": {
        "url": "http://127.0.0.1:9/x", "headers": {"X-Key": "${FILE_SECRET}"}}}}))
    async with Server(replace(server_config, routes_file=str(routes_file))) as srv, \
            AdminClient(srv.url, ADMIN_TOKEN) as admin:
        await put_route(admin, "api", {"url": "http://127.0.0.1:9/y",
                                       "headers": {"X-Key": "api-secret"}})
        port = srv.port
    async with Server(replace(server_config, port=port)) as srv, \
            AdminClient(srv.url, ADMIN_TOKEN) as admin:
        aliases = [r["alias"] for r in (await get(admin, "/v1/routes"))["routes"]]
    assert aliases == ["api"]  # the API route survived; the file route lives in the file
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("server.db*"))
    assert b"file-secret-value" not in raw
