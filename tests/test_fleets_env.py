"""Fleets' shared documents and environment variables, end to end."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient
from crdtsync.errors import Forbidden
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    DocSync,
    SyncRequest,
    decode_error,
    encode_request,
)
from crdtsync_server import Server

from .conftest import DeviceFactory


async def patch(admin: AdminClient, path: str, body: dict[str, Any]) -> Any:
    return await admin.request("PATCH", path, json=body)


async def test_env_precedence_and_fleet_variables_reach_every_device(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    await admin.add_fleet("pumps")
    devices = []
    for i in range(3):
        dev = await make_device(f"p{i}")
        await admin.set_fleet(f"p{i}", "pumps")
        devices.append(dev)
    await patch(admin, "/v1/env", {"SAMPLE_SECONDS": 60, "UNIT": "C"})
    await patch(admin, "/v1/fleets/pumps/env", {"SAMPLE_SECONDS": 30})
    await patch(admin, "/v1/devices/p1/env", {"SAMPLE_SECONDS": 5})
    seen: list[tuple[str, Any, Any]] = []
    devices[0].env.on_change(lambda key, old, new: seen.append((key, old, new)))
    for dev in devices:
        await dev.sync()
    assert [d.env["SAMPLE_SECONDS"] for d in devices] == [30, 5, 30]
    assert all(d.env["UNIT"] == "C" for d in devices)
    assert devices[1].env.source("SAMPLE_SECONDS") == "device"
    assert sorted(seen) == [("SAMPLE_SECONDS", None, 30), ("UNIT", None, "C")]

    await patch(admin, "/v1/fleets/pumps/env", {"SAMPLE_SECONDS": 10})
    for dev in devices:
        report = await dev.sync()
    assert [d.env["SAMPLE_SECONDS"] for d in devices] == [10, 5, 10]
    assert report.env_changes == 1
    merged = await admin.request("GET", "/v1/devices/p1/env")
    assert merged == {"env": {"SAMPLE_SECONDS": 5, "UNIT": "C"},
                      "source": {"SAMPLE_SECONDS": "device", "UNIT": "project"}}


async def test_a_device_cannot_write_its_fleet_document(
        make_device: DeviceFactory, admin: AdminClient, server: Server) -> None:
    await admin.add_fleet("f")
    dev = await make_device("d1")
    await admin.set_fleet("d1", "f")
    await patch(admin, "/v1/fleets/f/env", {"MODE": "eco"})
    await dev.sync()
    with pytest.raises(Forbidden):
        dev.fleet("env")["MODE"] = "boost"  # type: ignore[index]

    # A client that sends an update for the fleet document anyway is refused, whole.
    from pycrdt import Doc, Map

    evil: Doc[Any] = Doc()
    evil.get("env", type=Map)["MODE"] = "boost"
    dev.state["innocent"] = 1
    body = encode_request(SyncRequest("d1", docs=(
        DocSync("state", dev.doc.get_state(), dev.doc.get_update()),
        DocSync("fleet", evil.get_state(), evil.get_update(), 1))))
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session, session.post(
            server.url + SYNC_PATH, data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}) as resp:
        error = decode_error(await resp.read(), resp.status)
    assert (resp.status, error.code) == (403, "forbidden")
    assert await admin.request("GET", "/v1/fleets/f/env") == {"MODE": "eco"}
    assert (await admin.state("d1"))["state"] == {}  # nothing of that request applied
    await dev.sync()
    assert dev.env["MODE"] == "eco"


async def test_moving_to_another_fleet_replaces_the_fleet_document(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    await admin.add_fleet("a")
    await admin.add_fleet("b")
    await patch(admin, "/v1/fleets/a/env", {"ONLY_A": 1, "LEVEL": "a"})
    await patch(admin, "/v1/fleets/b/env", {"LEVEL": "b"})
    dev = await make_device("d1")
    await admin.set_fleet("d1", "a")
    await dev.sync()
    assert dict(dev.env) == {"ONLY_A": 1, "LEVEL": "a"}
    await admin.set_fleet("d1", "b")
    await dev.sync()
    assert dict(dev.env) == {"LEVEL": "b"}  # nothing of fleet a survives
    await dev.aclose()
    dev = await make_device("d1")  # the replaced copy is what was stored
    assert dict(dev.env) == {"LEVEL": "b"}
    await admin.set_fleet("d1", None)
    await dev.sync()
    assert dict(dev.env) == {}


async def test_unknown_fleet_env_is_not_found(admin: AdminClient) -> None:
    from crdtsync.errors import NotFound

    with pytest.raises(NotFound):
        await patch(admin, "/v1/fleets/nope/env", {"A": 1})
