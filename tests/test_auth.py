"""Credentials end to end: device tokens on /v1/sync, the admin token on the management API,
and how tokens are kept (hashed, shown once)."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from pycrdt import Doc, Map

from crdtsync import AdminClient, Device
from crdtsync.errors import Unauthorized
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, decode_error
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory

T0 = 1_700_000_000_000


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def evil_request(device: str) -> bytes:
    """A valid sync request for ``device`` that would set ``evil`` and store event seq 2."""
    doc: Doc[Any] = Doc(client_id=31337)
    doc.get("state", type=Map)["evil"] = 1
    update = doc.get_update()
    return msgpack.packb({  # type: ignore[no-any-return]
        "v": 1, "t": "sync", "dev": device,
        "docs": [{"d": "state", "g": 0, "sv": b"\x00", "u": update, "c": zlib.crc32(update)}],
        "ev": [[2, "t", T0, msgpack.packb({"evil": True})]],
    })


async def post_sync(http: aiohttp.ClientSession, server: Server, body: bytes,
                    headers: dict[str, str]) -> tuple[int, bytes]:
    async with http.post(server.url + SYNC_PATH, data=body,
                         headers={"Content-Type": MEDIA_TYPE, **headers}) as resp:
        return resp.status, await resp.read()


async def baseline(make_device: DeviceFactory, device_id: str) -> Device:
    dev = await make_device(device_id)
    dev.state["owner"] = device_id
    await dev.emit("t", {"from": device_id}, time_ms=T0)
    assert (await dev.sync()).events_acked == 1
    return dev


async def assert_untouched(admin: AdminClient, device_id: str) -> None:
    assert await admin.state(device_id) == {"state": {"owner": device_id}}
    page = await admin.events(device=device_id)
    assert [(e["seq"], e["body"]) for e in page["events"]] == [(1, {"from": device_id})]
    assert (await admin.device(device_id))["last_seq"] == 1


# --- /v1/sync ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-authorization"),
    pytest.param({"Authorization": "Bearer wrong-token"}, id="wrong-token"),
    pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
    pytest.param({"Authorization": "Basic ZDE6eA=="}, id="basic-scheme"),
    pytest.param({"Authorization": "{token}"}, id="token-without-scheme"),
    pytest.param({"Authorization": "Bearer {token}x"}, id="token-plus-one-char"),
    pytest.param({"Authorization": "Bearer {admin}"}, id="admin-token"),
])
async def test_sync_needs_the_device_token(make_device: DeviceFactory, admin: AdminClient,
                                           server: Server, http: aiohttp.ClientSession,
                                           headers: dict[str, str]) -> None:
    dev = await baseline(make_device, "d1")
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    headers = {k: v.format(token=token, admin=ADMIN_TOKEN) for k, v in headers.items()}
    status, body = await post_sync(http, server, evil_request("d1"), headers)
    assert (status, decode_error(body, status).code) == (401, "unauthorized")
    await assert_untouched(admin, "d1")
    # The real device, with its real token, is still served.
    dev.state["later"] = 1
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"owner": "d1", "later": 1}


async def test_no_credential_comes_before_decoding(server: Server,
                                                   http: aiohttp.ClientSession) -> None:
    status, body = await post_sync(http, server, b"\xc1 not msgpack", {})
    assert (status, decode_error(body, status).code) == (401, "unauthorized")


async def test_token_of_another_device(make_device: DeviceFactory, admin: AdminClient,
                                       server: Server, http: aiohttp.ClientSession) -> None:
    await baseline(make_device, "a")
    await baseline(make_device, "b")
    token_a = make_device.tokens["a"]  # type: ignore[attr-defined]
    status, body = await post_sync(http, server, evil_request("b"),
                                   {"Authorization": f"Bearer {token_a}"})
    assert (status, decode_error(body, status).code) == (401, "unauthorized")
    await assert_untouched(admin, "b")
    await assert_untouched(admin, "a")


async def test_unknown_device_answers_like_a_wrong_token(
        make_device: DeviceFactory, server: Server, http: aiohttp.ClientSession) -> None:
    await baseline(make_device, "d1")
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    unknown = await post_sync(http, server, evil_request("ghost"),
                              {"Authorization": f"Bearer {token}"})
    wrong = await post_sync(http, server, evil_request("d1"),
                            {"Authorization": "Bearer not-the-token"})
    assert unknown[0] == wrong[0] == 401
    # Byte-identical frames: the answer does not tell which device ids exist.
    assert unknown[1] == wrong[1]
    assert decode_error(unknown[1], 401).code == "unauthorized"


async def test_device_with_wrong_token_fails_without_retry(
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    await admin.add_device("d1")
    async with Device("d1", server.url, token="wrong", path=tmp_path / "d1.db",
                      interval=None) as dev:
        dev.state["x"] = 1
        await dev.emit("t", {})
        with pytest.raises(Unauthorized) as info:
            await dev.sync()
        assert not info.value.retryable
        assert dev.pending_events == 1  # kept for when the credential is fixed
    assert await admin.state("d1") == {"state": {}}


# --- the management API --------------------------------------------------------------------

MANAGEMENT: list[tuple[str, str, Any, int]] = [
    ("GET", "/v1/devices", None, 200),
    ("POST", "/v1/devices", {"id": "new-device"}, 201),
    ("GET", "/v1/devices/d1", None, 200),
    ("GET", "/v1/devices/d1/state", None, 200),
    ("PATCH", "/v1/devices/d1/state/state", {"owner": "mallory"}, 200),
    ("GET", "/v1/events", None, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "ok"), MANAGEMENT)
@pytest.mark.parametrize("who", ["nobody", "wrong", "device", "admin"])
async def test_management_needs_the_admin_token(
        make_device: DeviceFactory, admin: AdminClient, server: Server,
        http: aiohttp.ClientSession, method: str, path: str, body: Any, ok: int,
        who: str) -> None:
    await baseline(make_device, "d1")
    token = {"nobody": None, "wrong": ADMIN_TOKEN + "x",
             "device": make_device.tokens["d1"],  # type: ignore[attr-defined]
             "admin": ADMIN_TOKEN}[who]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, server.url + path, json=body, headers=headers) as resp:
        status, data = resp.status, await resp.json()
    if who == "admin":
        assert status == ok
        return
    assert (status, data["error"]["code"]) == (401, "unauthorized")
    await assert_untouched(admin, "d1")
    assert [d["id"] for d in (await admin.list_devices())["devices"]] == ["d1"]


async def test_health_needs_no_token(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/v1/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}


async def test_duplicate_device_id(make_device: DeviceFactory, admin: AdminClient,
                                   server: Server, http: aiohttp.ClientSession) -> None:
    dev = await baseline(make_device, "d1")
    async with http.post(server.url + "/v1/devices", json={"id": "d1"},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        status, data = resp.status, await resp.json()
    assert (status, data["error"]["code"]) == (409, "already_exists")
    assert "token" not in data and "token" not in data["error"]["detail"]
    # The first token still works: nothing was replaced.
    dev.state["after"] = 1
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"owner": "d1", "after": 1}


@pytest.mark.parametrize("body", [
    pytest.param({"id": ""}, id="empty"),
    pytest.param({"id": "a/b"}, id="slash"),
    pytest.param({"id": "a b"}, id="space"),
    pytest.param({"id": "-lead"}, id="leading-dash"),
    pytest.param({"id": "x" * 65}, id="too-long"),
    pytest.param({"id": "dé"}, id="non-ascii"),
    pytest.param({"id": 5}, id="not-a-string"),
    pytest.param({}, id="missing"),
    pytest.param(["d1"], id="not-an-object"),
    pytest.param({"id": "d2", "meta": [1]}, id="meta-not-an-object"),
    pytest.param({"id": "d1\n"}, id="trailing-newline"),
])
async def test_invalid_device_id(server: Server, admin: AdminClient,
                                 http: aiohttp.ClientSession, body: Any) -> None:
    async with http.post(server.url + "/v1/devices", json=body,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        status, data = resp.status, await resp.json()
    assert (status, data["error"]["code"]) == (400, "malformed_request")
    assert (await admin.list_devices())["devices"] == []


async def test_invalid_device_id_in_path(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/v1/devices/a%20b",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        status, data = resp.status, await resp.json()
    assert (status, data["error"]["code"]) == (400, "malformed_request")


# --- how tokens are kept -------------------------------------------------------------------


def database_bytes(config: ServerConfig) -> bytes:
    """The SQLite file and its WAL: a committed row may still live only in the WAL."""
    paths = [Path(config.db), Path(config.db + "-wal")]
    return b"".join(p.read_bytes() for p in paths if p.exists())


async def test_tokens_are_stored_hashed(server: Server, server_config: ServerConfig,
                                        admin: AdminClient) -> None:
    tokens = [(await admin.add_device(f"d{i}"))["token"] for i in range(3)]
    assert len(set(tokens)) == 3 and all(len(t) == 22 for t in tokens)  # 128 bits each
    # Close the server so everything it wrote is on disk, then read the raw files.
    await server.aclose()
    raw = database_bytes(server_config)
    assert raw
    for token in tokens:
        assert token.encode() not in raw
        assert hashlib.sha256(token.encode()).hexdigest().encode() in raw
    assert ADMIN_TOKEN.encode() not in raw


async def test_generated_admin_token_is_stored_hashed(tmp_path: Path) -> None:
    shown: list[str] = []
    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, on_admin_token=shown.append)
    async with Server(config):
        assert len(shown) == 1
    async with Server(config) as srv, AdminClient(srv.url, shown[0]) as client:
        assert len(shown) == 1  # printed once, on first start only
        await client.add_device("d1")
    raw = database_bytes(config)
    assert shown[0].encode() not in raw
    assert hashlib.sha256(shown[0].encode()).hexdigest().encode() in raw


async def test_token_is_returned_once(admin: AdminClient, server: Server) -> None:
    created = await admin.add_device("d1", meta={"site": "north"})
    assert isinstance(created["token"], str)
    fetched = await admin.device("d1")
    listed = (await admin.list_devices())["devices"]
    for record in (fetched, *listed):
        assert "token" not in record and "token_hash" not in record
        text = json.dumps(record)
        assert created["token"] not in text
        assert hashlib.sha256(created["token"].encode()).hexdigest() not in text
    assert fetched["meta"] == {"site": "north"}
