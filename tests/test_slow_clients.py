"""Clients that do not deserve memory: no valid token, or too slow (issue 11, finding 5).

The server authenticates a sync from its headers alone, so a request without a valid token is
answered before its body is read, let alone decompressed; a head or a body that does not
arrive in time ends the connection. Every test talks raw HTTP/1.1 over a socket to a real
server on 127.0.0.1, so it controls exactly which bytes were sent when the answer came.
"""

from __future__ import annotations

import asyncio
import gc
import re
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard

from crdtsync import AdminClient, Device
from crdtsync.errors import RequestTimeout
from crdtsync.protocol import BATCH_PATH, SYNC_PATH, SyncRequest, decode_error, encode_request
from crdtsync_server import Server, ServerConfig
from crdtsync_server.api.keys import HEADS

from .conftest import ADMIN_TOKEN, until

BOUND = 30.0
"""Seconds a test waits for an answer that must come at once: only there so that a server
that waits for a body the client never sends fails the test instead of hanging it."""


@pytest.fixture
async def quick(tmp_path: Path) -> AsyncIterator[Server]:
    """A server with short slow-client deadlines."""
    config = ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                          header_timeout=1.0, body_timeout=1.0)
    async with Server(config) as srv:
        yield srv


class Raw:
    """One raw HTTP/1.1 connection to a server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: Server) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, method: str, path: str, headers: dict[str, str]) -> None:
        """Send a request line and headers (no body)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(
            f"{k}: {v}" for k, v in headers.items())]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        async with asyncio.timeout(BOUND):
            status_line = await self.reader.readline()
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed_by_server(self) -> bool:
        """Read until the server closes the connection; True if it sent nothing more."""
        async with asyncio.timeout(BOUND):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def provision(server: Server, device_id: str = "d1") -> str:
    async with AdminClient(server.url, ADMIN_TOKEN) as admin:
        token: str = (await admin.add_device(device_id))["token"]
    return token


# --- authentication comes before the body --------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic ZDE6eA=="])
async def test_without_a_valid_token_the_answer_comes_before_the_body(
        server: Server, authorization: str | None) -> None:
    """Many connections declare a 4 MiB - 1 body and never send a byte of it: each gets its
    401 at once, with ``Connection: close``. The server did not wait for (or buffer) any body:
    there was none to read."""
    await provision(server)
    headers = {"Content-Length": str(4 * 1024 * 1024 - 1), "Content-Encoding": "zstd"}
    if authorization:
        headers["Authorization"] = authorization
    conns = [await Raw.open(server) for _ in range(100)]
    try:
        await asyncio.gather(*(c.head("POST", SYNC_PATH, headers) for c in conns))
        answers = await asyncio.gather(*(c.response() for c in conns))
        for status, response_headers, body in answers:
            assert status == 401
            assert decode_error(body, status).code == "unauthorized"
            assert response_headers["connection"].lower() == "close"
    finally:
        for conn in conns:
            await conn.close()


async def test_a_compressed_body_with_a_wrong_token_is_not_decompressed(
        server: Server) -> None:
    """A zstd bomb (it declares 10 MB) with a wrong token: were it decompressed, the answer
    would be ``413 body_too_large``; it is ``401`` because the body was never looked at. The
    same bomb with the right token is refused by its size, so the bomb is a real one."""
    token = await provision(server)
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * 10_000_000)
    answers = {}
    for name, credential in (("wrong", "Bearer wrong-token"), ("right", f"Bearer {token}")):
        conn = await Raw.open(server)
        await conn.head("POST", SYNC_PATH, {"Authorization": credential,
                                            "Content-Encoding": "zstd",
                                            "Content-Length": str(len(bomb))})
        await conn.send(bomb)
        status, _, body = await conn.response()
        answers[name] = (status, decode_error(body, status).code)
        await conn.close()
    assert answers == {"wrong": (401, "unauthorized"), "right": (413, "body_too_large")}


async def test_a_disabled_device_is_refused_before_its_body(server: Server) -> None:
    token = await provision(server)
    async with AdminClient(server.url, ADMIN_TOKEN) as admin:
        await admin.set_disabled("d1", True)
    conn = await Raw.open(server)
    await conn.head("POST", SYNC_PATH, {"Authorization": f"Bearer {token}",
                                        "Content-Length": "1000000"})
    status, headers, body = await conn.response()
    error = decode_error(body, status)
    assert (status, error.code, error.detail["disabled"]) == (403, "forbidden", True)
    assert headers["connection"].lower() == "close"
    await conn.close()


def body_routes(server: Server) -> list[tuple[str, str]]:
    """(method, path) of every management route that takes a body, path parameters filled
    in with valid names."""
    found = []
    for route in server.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method in ("POST", "PUT", "PATCH") and path != SYNC_PATH:
            found.append((route.method, re.sub(r"\{[^}]+\}", "x1", path)))
    return sorted(found)


async def test_the_management_api_checks_the_admin_token_before_any_body(
        server: Server) -> None:
    """Every route of the management API that takes a body answers a wrong admin token
    before the body is sent (a new route that reads first fails here)."""
    routes = body_routes(server)
    assert ("POST", "/v1/devices") in routes and len(routes) >= 10
    for method, path in routes:
        conn = await Raw.open(server)
        await conn.head(method, path, {"Authorization": "Bearer not-the-admin-token",
                                       "Content-Type": "application/json",
                                       "Content-Length": "1000000"})
        status, headers, body = await conn.response()
        assert (status, headers["connection"].lower()) == (401, "close"), (method, path)
        # The gateway batch speaks msgpack frames like /v1/sync; the rest JSON.
        assert (b"\xacunauthorized" if path == BATCH_PATH else b'"unauthorized"') in body
        await conn.close()


# --- deadlines: slow heads and slow bodies -------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"POST /v1/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
                         ids=["nothing", "half-a-head"])
async def test_a_slow_first_head_is_cut_off(quick: Server, sent: bytes) -> None:
    conn = await Raw.open(quick)
    await conn.send(sent)
    assert await conn.closed_by_server()  # closed, no answer: there is no request yet
    await conn.close()


async def test_a_slow_later_head_is_cut_off(quick: Server) -> None:
    """On a kept-alive connection, a later head is held to the same deadline from its first
    byte."""
    conn = await Raw.open(quick)
    await conn.head("GET", "/v1/health", {})
    assert (await conn.response())[0] == 200
    await conn.send(b"GET /v1/health HTTP/1.1\r\nHost: 127.0")
    assert await conn.closed_by_server()
    await conn.close()


async def test_a_slow_body_is_cut_off_with_a_typed_408(quick: Server, tmp_path: Path) -> None:
    """A device's body that stalls halfway is refused with ``408 request_timeout``
    (retryable), nothing of it applied, and the connection closed; the server serves on."""
    token = await provision(quick)
    body = encode_request(SyncRequest(device="d1", docs=()))
    conn = await Raw.open(quick)
    await conn.head("POST", SYNC_PATH, {"Authorization": f"Bearer {token}",
                                        "Content-Length": str(len(body) + 100)})
    await conn.send(body)  # and the 100 bytes it announced more never come
    status, headers, frame = await conn.response()
    error = decode_error(frame, status)
    assert (status, error.code, error.retryable) == (408, "request_timeout", True)
    assert isinstance(error, RequestTimeout) and error.detail == {"body_timeout": 1.0}
    assert headers["connection"].lower() == "close"
    await conn.close()
    async with Device("d1", quick.url, token=token, path=tmp_path / "d1.db",
                      interval=None) as device:
        device.state["after"] = 1
        await device.emit("t", {"n": 1})
        assert (await device.sync()).events_acked == 1


async def test_the_head_deadline_spares_requests_being_handled(quick: Server) -> None:
    """A long poll outlives the head deadline (the clock stops once the head is in), and a
    kept-alive connection that stays idle is not the head deadline's business."""
    conn = await Raw.open(quick)
    await conn.head("GET", "/v1/feed?wait=2", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    status, _, body = await conn.response()
    assert (status, body) == (200, b'{"items":[],"next":"0"}')
    await asyncio.sleep(1.5)  # idle between requests, longer than the head deadline
    await conn.head("GET", "/v1/health", {})
    assert (await conn.response())[0] == 200
    await conn.close()


async def test_a_closed_connection_is_freed_without_the_garbage_collector(
        quick: Server) -> None:
    """Once a connection is lost, its transport (with its socket) is freed by reference
    counting. asyncio's transport holds a bound method of itself; left as it is, every
    closed connection waited for a collection, and a storm of short connections filled the
    young generation with them (issue 17). With the collector off, the transport must go."""
    heads = quick.app[HEADS]
    gc.disable()
    try:
        conn = await Raw.open(quick)
        await until(lambda: bool(heads._guards))  # the server accepted it
        (transport,) = heads._guards  # the connection's server side
        gone = weakref.ref(transport)
        del transport
        await conn.head("GET", "/v1/health", {"Connection": "close"})
        assert (await conn.response())[0] == 200
        assert await conn.closed_by_server()
        await conn.close()
        await until(lambda: not heads._guards)  # the server saw the connection lost
        await asyncio.sleep(0)  # the loop drops the handle that reported it
        assert gone() is None
    finally:
        gc.enable()


def test_the_server_serves_on_uvloop(tmp_path: Path) -> None:
    """Embedded in an app on uvloop's event loop, whose transports are not
    ``asyncio.Transport`` subclasses, the server accepts connections (each one used to fail
    an assertion of the head deadline's guard), serves a sync and still cuts off a head
    that does not come."""
    import uvloop

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        config = ServerConfig(db=str(tmp_path / "server.db"), port=0,
                              admin_token=ADMIN_TOKEN, header_timeout=1.0)
        async with Server(config) as server:
            token = await provision(server)
            async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                              interval=None) as device:
                device.state["mode"] = "eco"
                await device.emit("t", {"n": 1})
                assert (await device.sync()).events_acked == 1
            async with AdminClient(server.url, ADMIN_TOKEN) as admin:
                assert (await admin.state("d1"))["state"]["mode"] == "eco"
            conn = await Raw.open(server)
            assert await conn.closed_by_server()
            await conn.close()

    uvloop.run(main())
