"""Device credentials have a lifecycle (issue 11, finding 10): a token can be replaced, a
device disabled and enabled, and deleted, over the management API, each checked end to end
with a real :class:`~crdtsync.Device` against real servers sharing one SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient, Device
from crdtsync.errors import Forbidden, MalformedRequest, NotFound, Unauthorized
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory

T0 = 1_700_000_000_000


@asynccontextmanager
async def second_server(config: ServerConfig) -> AsyncIterator[tuple[Server, AdminClient]]:
    """Another server process's worth of state (its own document cache) on the same
    database, with an admin client."""
    other = ServerConfig(db=config.db, port=0, admin_token=ADMIN_TOKEN)
    async with Server(other) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        yield srv, admin


@asynccontextmanager
async def device_at(url: str, token: str, path: Path) -> AsyncIterator[Device]:
    async with Device("d1", url, token=token, path=path, interval=None) as device:
        yield device


async def seqs(admin: AdminClient, device: str = "d1") -> list[tuple[int, Any]]:
    return [(e["seq"], e["body"]) async for e in admin.iter_events(device=device)]


# --- a new token ---------------------------------------------------------------------------


async def test_a_new_token_revokes_the_old_one_and_the_device_keeps_its_outbox(
        make_device: DeviceFactory, admin: AdminClient, server: Server, tmp_path: Path
) -> None:
    dev = await make_device("d1")
    old = make_device.tokens["d1"]  # type: ignore[attr-defined]
    dev.state["v"] = 1
    await dev.emit("t", {"n": 1}, time_ms=T0)
    assert (await dev.sync()).events_acked == 1
    await dev.emit("t", {"n": 2}, time_ms=T0 + 1)
    await dev.emit("t", {"n": 3}, time_ms=T0 + 2)

    rotated = await admin.rotate_token("d1")
    assert rotated["id"] == "d1" and rotated["token"] != old and len(rotated["token"]) == 22
    assert "token" not in await admin.device("d1")  # shown once
    with pytest.raises(Unauthorized) as info:
        await dev.sync()
    assert not info.value.retryable
    assert dev.pending_events == 2  # kept for the new credential
    await dev.aclose()

    async with device_at(server.url, rotated["token"], tmp_path / "d1.db") as again:
        again.state["w"] = 2
        report = await again.sync()
    assert report.events_acked == 2
    assert await seqs(admin) == [(1, {"n": 1}), (2, {"n": 2}), (3, {"n": 3})]
    assert await admin.state("d1") == {"state": {"v": 1, "w": 2}}


async def test_a_rotated_token_stops_working_on_every_server_process(
        make_device: DeviceFactory, admin: AdminClient, server_config: ServerConfig,
        tmp_path: Path) -> None:
    """Nothing caches a credential: another process sharing the database refuses the old
    token from the next request on."""
    dev = await make_device("d1")
    old = make_device.tokens["d1"]  # type: ignore[attr-defined]
    await dev.aclose()
    async with second_server(server_config) as (other, _):
        async with device_at(other.url, old, tmp_path / "d1.db") as device:
            await device.sync()  # the other process has served this token once
            new = (await admin.rotate_token("d1"))["token"]
            with pytest.raises(Unauthorized):
                await device.sync()
        async with device_at(other.url, new, tmp_path / "d1.db") as device:
            await device.emit("t", {"n": 1})
            assert (await device.sync()).events_acked == 1


# --- disabled ------------------------------------------------------------------------------


async def test_a_disabled_device_loses_nothing_and_resumes_when_enabled(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")
    await dev.emit("t", {"n": 1}, time_ms=T0)
    await dev.sync()

    disabled = await admin.set_disabled("d1", True)
    assert disabled["disabled"] is True and (await admin.device("d1"))["disabled"] is True
    dev.state["while_disabled"] = True
    for n in (2, 3, 4):
        await dev.emit("t", {"n": n}, time_ms=T0 + n)
    with pytest.raises(Forbidden) as info:
        await dev.sync()
    assert (info.value.status, info.value.retryable) == (403, False)
    assert info.value.detail == {"device": "d1", "disabled": True}
    assert dev.pending_events == 3
    assert await seqs(admin) == [(1, {"n": 1})]
    # The rest of the device keeps working: a cloud write is stored and waits for it.
    await admin.patch_state("d1", {"from_cloud": 1})

    assert (await admin.set_disabled("d1", False))["disabled"] is False
    report = await dev.sync()
    assert report.events_acked == 3 and dev.pending_events == 0
    assert await seqs(admin) == [(n, {"n": n}) for n in (1, 2, 3, 4)]
    assert await admin.state("d1") == {"state": {"while_disabled": True, "from_cloud": 1}}
    assert dev.state["from_cloud"] == 1


# --- deleted -------------------------------------------------------------------------------


async def test_a_deleted_device_is_forgotten_by_every_server_process(
        make_device: DeviceFactory, admin: AdminClient, server: Server,
        server_config: ServerConfig, tmp_path: Path) -> None:
    """Delete: the token stops working, the document, projection and queues go (also from
    the document cache of another process that had read it), the events stay in the feed. A
    device created again with the id starts from an empty document, gets none of the old
    queue, and numbers its events above the old ones, so nothing in the feed is ambiguous."""
    dev = await make_device("d1")
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    dev.state["owner"] = "old"
    for n in (1, 2):
        await dev.emit("t", {"old": n}, time_ms=T0 + n)
    await dev.sync()
    await admin.request("POST", "/v1/devices/d1/messages", json={"topic": "hi", "body": 1})
    async with second_server(server_config) as (_, other_admin):
        assert await other_admin.state("d1") == {"state": {"owner": "old"}}  # now cached

        await admin.delete_device("d1")
        with pytest.raises(Unauthorized):
            await dev.sync()
        for client in (admin, other_admin):
            with pytest.raises(NotFound):
                await client.device("d1")
            with pytest.raises(NotFound):
                await client.state("d1")
        assert await admin.projection(device="d1") == []
        assert await seqs(admin) == [(1, {"old": 1}), (2, {"old": 2})]  # the feed keeps them

        new_token = (await admin.add_device("d1"))["token"]
        assert new_token != token
        for client in (admin, other_admin):
            assert await client.state("d1") == {"state": {}}
        async with device_at(server.url, new_token, tmp_path / "new.db") as fresh:
            fresh.state["owner"] = "new"
            for n in (1, 2):
                await fresh.emit("t", {"new": n}, time_ms=T0 + 10 + n)
            report = await fresh.sync()
            assert report.events_acked == 2 and report.downlink == 0
            assert fresh.state.get("owner") == "new"
        assert await other_admin.state("d1") == {"state": {"owner": "new"}}
    assert await seqs(admin) == [(1, {"old": 1}), (2, {"old": 2}), (3, {"new": 1}),
                                 (4, {"new": 2})]
    messages = await admin.request("GET", "/v1/devices/d1/messages")
    assert messages["items"] == []  # the old queue went with the old device


async def test_deleting_with_events_empties_the_device_feed(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    for device_id in ("d1", "d2"):
        dev = await make_device(device_id)
        dev.state["k"] = device_id
        await dev.emit("t", {"from": device_id})
        await dev.sync()
    await admin.delete_device("d1", events=True)
    items, _ = await admin.feed()
    assert {item["device"] for item in items} == {"d2"}
    assert await seqs(admin, "d1") == []
    assert await seqs(admin, "d2") == [(1, {"from": "d2"})]
    assert [d["id"] for d in (await admin.list_devices())["devices"]] == ["d2"]


# --- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"disabled": "yes"}, {"disabled": 1}, [True],
                                  {"disabled": True, "meta": {}}, None])
async def test_patch_device_takes_only_a_disabled_flag(
        make_device: DeviceFactory, admin: AdminClient, body: Any) -> None:
    await make_device("d1")
    with pytest.raises(MalformedRequest):
        await admin.request("PATCH", "/v1/devices/d1", json=body)
    assert (await admin.device("d1"))["disabled"] is False


async def test_lifecycle_calls_on_an_unknown_device_are_not_found(
        admin: AdminClient, server: Server) -> None:
    for call in (admin.rotate_token("ghost"), admin.set_disabled("ghost", True),
                 admin.delete_device("ghost")):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.detail == {"device": "ghost"}
    async with aiohttp.ClientSession() as http, http.delete(
            server.url + "/v1/devices/ghost?events=maybe",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (400, "malformed_request")
