"""Items too large for a device never wedge it (docs/protocol.md 14, 15): the server refuses
to queue them, turns an oversized route answer into a failed outcome, and a device that still
meets one (from an older server: injected here below the API, through the store) skips that
item alone, keeps syncing and acknowledges its events. A real server on 127.0.0.1, real
SQLite files, a real local HTTP target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from crdtsync import AdminClient, CrdtsyncError, InvalidValue, RouteFailed
from crdtsync._inbox import Message
from crdtsync.hlc import wall_ms
from crdtsync.protocol import DEFAULT_LIMITS
from crdtsync_server import Server

from .conftest import DeviceFactory, local_app

LIMIT = DEFAULT_LIMITS.max_item_body
BIG = "x" * 70_000
"""A string whose msgpack encoding is over the 64 KiB a device takes."""


async def refused(admin: AdminClient, path: str, body: dict[str, Any]) -> CrdtsyncError:
    with pytest.raises(CrdtsyncError) as info:
        await admin.request("POST", path, json=body)
    return info.value


@pytest.fixture
async def target() -> AsyncIterator[dict[str, Any]]:
    """A route target: ``/big`` answers 100 KB of JSON, ``/hold`` answers once released."""
    state: dict[str, Any] = {"release": asyncio.Event()}

    async def big(request: web.Request) -> web.Response:
        return web.json_response({"blob": "y" * 100_000})

    async def hold(request: web.Request) -> web.Response:
        await state["release"].wait()
        return web.json_response({"late": True})

    app = web.Application()
    app.router.add_post("/big", big)
    app.router.add_post("/hold", hold)
    async with local_app(app) as url:
        state["url"] = url
        yield state
        state["release"].set()


async def test_oversized_message_and_params_are_refused_when_queued(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")
    message = await refused(admin, "/v1/devices/d1/messages", {"topic": "t", "body": BIG})
    command = await refused(admin, "/v1/devices/d1/commands",
                            {"method": "m", "params": {"blob": BIG}})
    for error in (message, command):
        assert (error.code, type(error).status) == ("body_too_large", 413)
        assert error.detail["max_item_body"] == LIMIT and error.detail["size"] > LIMIT
    assert (await admin.request("GET", "/v1/devices/d1/messages"))["items"] == []
    assert (await admin.request("GET", "/v1/devices/d1/commands"))["items"] == []
    # Just under the limit is queued and taken by the device.
    seen: list[Message] = []
    dev.on("t")(seen.append)
    fits = "z" * (LIMIT - 16)
    await admin.request("POST", "/v1/devices/d1/messages", json={"topic": "t", "body": fits})
    report = await dev.sync()
    assert [m.body for m in seen] == [fits] and report.skipped == []


async def test_oversized_route_answer_becomes_a_failed_outcome(
        make_device: DeviceFactory, admin: AdminClient, target: dict[str, Any]) -> None:
    await admin.request("PUT", "/v1/routes/big", json={"url": target["url"] + "/big"})
    dev = await make_device("d1")
    call_id = await dev.queue_request("big", {})
    await dev.emit("t", {"n": 1})
    report = await dev.sync()  # the target answers within the budget: the outcome rides along
    assert report.outcomes == 1 and report.skipped == []
    with pytest.raises(RouteFailed) as info:
        await dev.wait_request(call_id)
    assert info.value.reason == "route_response_too_large"
    assert info.value.detail["status"] == 200 and info.value.detail["body"] is None
    assert dev.pending_events == 0
    await dev.sync()  # acknowledges the outcome; later syncs work
    stored = await admin.request("GET", "/v1/events", params={"device": "d1"})
    assert [e["seq"] for e in stored["events"]] == [1]


async def test_device_skips_items_it_cannot_take_and_keeps_syncing(
        make_device: DeviceFactory, admin: AdminClient, server: Server,
        target: dict[str, Any]) -> None:
    """What an older server (no limit at queue time) sends: the device skips each oversized
    item alone and reports it; everything else of the same syncs goes through."""
    store = server.services.store
    await admin.request("PUT", "/v1/routes/hold", json={"url": target["url"] + "/hold"})
    dev = await make_device("d1")
    seen: list[Any] = []
    dev.on("t")(lambda m: seen.append(m.body))
    runs: list[Any] = []
    dev.command("c")(runs.append)
    call_id = await dev.queue_request("hold", {})
    await dev.sync()  # the request is accepted; the target holds its answer
    # Below the API, as an older server would have queued and stored them:
    big_message = await store.queue_downlink("d1", "message", "t", {"blob": BIG}, wall_ms(),
                                             None)
    big_command = await store.queue_downlink("d1", "command", "c", {"blob": BIG}, wall_ms(),
                                             None)
    await store.finish_request("d1", call_id, {"ok": True, "status": 200, "body": BIG,
                                               "error": None, "message": "", "attempts": 1},
                               wall_ms())
    await admin.request("POST", "/v1/devices/d1/messages", json={"topic": "t", "body": "after"})
    for n in range(3):
        await dev.emit("t", {"n": n})

    report = await dev.sync()

    assert {(s.kind, s.ref, s.code) for s in report.skipped} == {
        ("message", str(big_message.seq), "item_too_large"),
        ("command", str(big_command.seq), "item_too_large"),
        ("outcome", call_id, "item_too_large")}
    assert seen == ["after"] and runs == []  # the item after the skipped ones was handled
    assert report.events_acked == 3 and dev.pending_events == 0
    events = await admin.request("GET", "/v1/events", params={"device": "d1"})
    assert [e["body"]["n"] for e in events["events"]] == [0, 1, 2]
    command = await admin.request("GET", f"/v1/commands/{big_command.id}")
    assert (command["status"], command["error"]["code"]) == ("failed", "item_too_large")
    message = await admin.request("GET", f"/v1/messages/{big_message.id}")
    assert message["status"] == "delivered"  # acknowledged: dn moved past it
    with pytest.raises(RouteFailed) as info:
        await dev.wait_request(call_id)
    assert info.value.reason == "item_too_large"
    report = await dev.sync()  # nothing is left that fails a sync
    assert report.skipped == []
    assert (await store.get_request("d1", call_id)).status == "acked"  # type: ignore[union-attr]


async def test_device_refuses_to_send_what_the_cloud_would_refuse(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    """The other direction: a request body or a command result over the limit would make
    the cloud refuse every later sync; the device refuses the request at once and answers
    the command with an error."""
    dev = await make_device("d1")
    with pytest.raises(InvalidValue):
        await dev.queue_request("any", {"blob": BIG})
    assert await dev.pending_requests() == []
    dev.command("dump")(lambda params: BIG)
    command = await admin.request("POST", "/v1/devices/d1/commands", json={"method": "dump"})
    await dev.emit("t", {"n": 1})
    report = await dev.sync()
    assert report.events_acked == 1
    state = await admin.request("GET", f"/v1/commands/{command['id']}")
    assert (state["status"], state["error"]["code"]) == ("failed", "invalid_result")
    assert str(LIMIT) in state["error"]["message"]
