"""Plain syncs served on the connection's own protocol (issue 17, ``api/fastsync.py``).

A plain ``POST /v1/sync`` (head and body together, nothing unusual in its head) is answered
without aiohttp's request machinery; everything else, and every failure of a plain sync, is
served by aiohttp from the bytes as received. These tests talk raw HTTP/1.1 to a real server:
the answers must be those of the aiohttp path, byte for byte but the date, with nothing lost
or stored twice, and the connection must keep the deadlines and the shutdown of the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from crdtsync import AdminClient, Device
from crdtsync.protocol import (
    SYNC_PATH,
    Event,
    SyncRequest,
    decode_error,
    decode_response,
    encode_request,
)
from crdtsync_server import Server, ServerConfig
from crdtsync_server.api import deadlines
from crdtsync_server.api import sync as handler
from crdtsync_server.api.fastsync import MORE, PlainSync, plain_sync
from crdtsync_server.api.keys import HEADS, METRICS

from .conftest import ADMIN_TOKEN, until

BOUND = 30.0
"""Seconds a test waits for an answer that must come (a hang fails instead)."""


def request(token: str, body: bytes, *extra: str, close: bool = False) -> bytes:
    lines = [f"POST {SYNC_PATH} HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {token}", f"Content-Length: {len(body)}", *extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sync_body(device: str = "d1", *events: int) -> bytes:
    return encode_request(SyncRequest(device=device, events=tuple(
        Event(seq, "t", 1000 + seq, {"n": seq}) for seq in events), purged=0))


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The next answer on a connection: status, headers (lower-case names), body."""
    async with asyncio.timeout(BOUND):
        status = int((await reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def exchange(server: Server, *requests: bytes, eof: bool = False
                   ) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``requests`` in one write on a new connection; read one answer for each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"".join(requests))
        if eof:
            writer.write_eof()
        return [await answer(reader) for _ in requests]
    finally:
        writer.close()


def aiohttp_made(server: Server) -> list[bool]:
    """For each open connection: whether aiohttp's protocol serves it."""
    return [guard._inner is not None for guard in server.app[HEADS]._guards.values()]


async def serve(tmp_path: Path, name: str, **options: Any) -> Server:
    config = ServerConfig(db=str(tmp_path / f"{name}.db"), port=0, admin_token=ADMIN_TOKEN,
                          **options)
    return Server(config)


async def provision(server: Server, device: str = "d1") -> str:
    async with AdminClient(server.url, ADMIN_TOKEN) as admin:
        token: str = (await admin.add_device(device))["token"]
    return token


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with await serve(tmp_path, "server") as srv:
        yield srv


# --- the parser ---------------------------------------------------------------------------


PLAIN = request("tok", b"\x81\xa1v\x01")


def test_a_plain_sync_is_read_from_the_buffer() -> None:
    found = plain_sync(PLAIN + b"POST /next", 1000)
    assert found == PlainSync(len(PLAIN), "tok", "identity", 4, False)
    assert plain_sync(PLAIN + b"x" * 9000, 1000) == found  # what follows: served later
    compressed = request("tok", b"abc", "Content-Encoding: ZSTD", "Content-Type: "
                         "application/msgpack", close=True)
    assert plain_sync(compressed, 1000) == PlainSync(len(compressed), "tok", "zstd", 3, True)


@pytest.mark.parametrize("cut", [0, 1, 5, len(f"POST {SYNC_PATH} HTTP/1.1\r\nHost"),
                                 PLAIN.index(b"\r\n\r\n") + 2])
def test_a_head_still_coming_is_waited_for(cut: int) -> None:
    assert plain_sync(PLAIN[:cut], 1000) == MORE


@pytest.mark.parametrize("raw", [
    b"GET /v1/health HTTP/1.1\r\n\r\n",
    b"POST /v1/sync/batch HTTP/1.1\r\n",
    b"POST /v1/sync HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    PLAIN[:-1],  # the body has not all arrived
    request("tok", b"1234", "Transfer-Encoding: chunked"),
    request("tok", b"1234", "Expect: 100-continue"),
    request("tok", b"1234", "Upgrade: websocket"),
    request("tok", b"1234", "Content-Length: 4"),  # twice
    request("tok", b"1234", "authorization: Bearer other"),  # twice, in another case
    request("tok", b"1234", "Content-Encoding: br"),
    request("tok", b"1234", "Content-Type: text/plain"),
    request("tok", b"1234", "Connection: upgrade"),
    request("tok", b"1234", "Bad Name: x"),
    request("tok", b"1234", " folded"),
    request("tok", b"1234", "no colon"),
    request("", b"1234"),
    PLAIN.replace(b"Bearer", b"Basic"),
    PLAIN.replace(b"Content-Length: 4", b"Content-Length: +4"),
    PLAIN.replace(b"Content-Length: 4", b"Content-Length: 0x4"),
    f"POST {SYNC_PATH} HTTP/1.1\r\n".encode() + b"X-Long: " + b"a" * 9000,
], ids=lambda raw: raw[:60].decode(errors="replace"))
def test_anything_unusual_goes_to_aiohttp(raw: bytes) -> None:
    assert plain_sync(raw, 1000) is None


def test_a_body_over_the_limit_goes_to_aiohttp() -> None:
    assert isinstance(plain_sync(PLAIN, 4), PlainSync)
    assert plain_sync(PLAIN, 3) is None


# --- served on a real server --------------------------------------------------------------


async def test_the_answer_is_the_aiohttp_answer(tmp_path: Path) -> None:
    """The same requests to a server serving plain syncs and to one where aiohttp serves
    everything: the same status, headers (but the date) and body; the plain ones were
    served without aiohttp's protocol."""
    answers = []
    for plain in (True, False):
        async with await serve(tmp_path, f"p{plain}", plain_syncs=plain) as srv:
            token = await provision(srv)
            packed = zstandard.ZstdCompressor().compress(sync_body("d1", 3))
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(request(token, sync_body("d1", 1, 2))
                         + request(token, packed, "Content-Encoding: zstd"))
            got = [await answer(reader), await answer(reader)]
            assert aiohttp_made(srv) == [not plain]
            writer.write(request(token, sync_body(), "Content-Type: application/msgpack",
                                 close=True))
            got.append(await answer(reader))
            writer.close()
            for _, headers, _ in got:
                headers.pop("date")
            answers.append([(s, h, decode_response(b).acked) for s, h, b in got])
            metrics = srv.app[METRICS].syncs
            assert (metrics.ok, metrics.refused) == (3, {})
    assert answers[0] == answers[1]
    assert [a[2] for a in answers[0]] == [2, 3, 3]
    assert answers[0][2][1]["connection"] == "close"


async def test_the_connection_stays_with_the_fast_path_until_another_request(
        server: Server) -> None:
    token = await provision(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for seq in (1, 2):
            writer.write(request(token, sync_body("d1", seq)))
            status, _, body = await answer(reader)
            assert (status, decode_response(body).acked) == (200, seq)
            assert aiohttp_made(server) == [False]
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
                     + request(token, sync_body("d1", 3)))
        assert (await answer(reader))[0] == 200
        status, _, body = await answer(reader)
        assert (status, decode_response(body).acked) == (200, 3)
        assert aiohttp_made(server) == [True]
    finally:
        writer.close()


async def test_the_reference_client_s_syncs_are_plain(server: Server, tmp_path: Path) -> None:
    """``Device`` over its ``HttpTransport`` (compressed bodies, kept-alive connections) is
    served by the fast path: a change of the client's headers or writes that sent it to
    aiohttp would lose the lever without failing anything else."""
    token = await provision(server)
    async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                      interval=None) as device:
        for round_ in range(3):
            device.state[f"k{round_}"] = "x" * (300 * round_)
            for n in range(10):
                await device.emit("t", {"n": n, "pad": "y" * 100})
            assert (await device.sync()).events_acked == 10  # this sync's
            assert aiohttp_made(server) == [False]
    assert server.app[METRICS].syncs.ok == 3


async def test_pipelined_plain_syncs_are_answered_in_order(server: Server) -> None:
    token = await provision(server)
    got = await exchange(server, *(request(token, sync_body("d1", seq)) for seq in (1, 2, 3)))
    assert [(s, decode_response(b).acked) for s, _, b in got] == [(200, 1), (200, 2), (200, 3)]


FAILURES = {
    "wrong-token": (lambda token: request("wrong", sync_body("d1", 1)), 401, "unauthorized"),
    "corrupt-body": (lambda token: request(token, b"\x93\x01\x02"), 400, "malformed_request"),
    "bad-zstd": (lambda token: request(token, b"not zstd", "Content-Encoding: zstd",
                                       "X-Request-Id: mine-1"), 400, "malformed_request"),
    "other-device": (lambda token: request(token, sync_body("d2", 1)), 401, "unauthorized"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_a_failed_plain_sync_is_answered_as_aiohttp_answers_it(
        tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    """The same typed error, status and headers (but the date and a random request id) from
    both paths, logged once, counted once; the connection serves on."""
    make, status, code = FAILURES[case]
    answers = []
    for plain in (True, False):
        caplog.clear()
        async with await serve(tmp_path, f"f{plain}", plain_syncs=plain) as srv:
            token = await provision(srv)
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(make(token))
            got_status, headers, frame = await answer(reader)
            assert aiohttp_made(srv) == [not plain]
            writer.write(request(token, sync_body("d1", 1)))
            after, _, body = await answer(reader)
            writer.close()
            assert (after, decode_response(body).acked) == (200, 1)
            syncs = srv.app[METRICS].syncs
            assert syncs.ok == 1 and sum(syncs.refused.values()) == 1
        error = decode_error(frame, got_status)
        records = [r for r in caplog.records if r.name == "crdtsync.server"]
        assert [(r.status, r.code, r.request_id) for r in records] == [  # type: ignore[attr-defined]
            (status, code, headers["x-request-id"])]
        headers.pop("date")
        if case != "bad-zstd":
            assert len(headers.pop("x-request-id")) == 12
        answers.append((got_status, headers, error.code, error.message, error.detail))
    assert answers[0] == answers[1]
    assert answers[0][:1] == (status,) and answers[0][2] == code


async def test_a_sync_that_failed_after_its_commit_is_replayed_not_stored_twice(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the commit (the answer lost) is answered ``500 internal``; the
    device's retry is a replay: its events are acknowledged and stored once."""
    real = handler.run_sync
    calls = 0

    async def commits_then_fails(*args: Any) -> bytes:
        nonlocal calls
        calls += 1
        await real(*args)
        if calls == 1:
            raise RuntimeError("the answer was lost")
        return await real(*args)

    monkeypatch.setattr(handler, "run_sync", commits_then_fails)
    token = await provision(server)
    sent = request(token, sync_body("d1", 1, 2))
    [(status, _, frame)] = await exchange(server, sent)
    assert (status, decode_error(frame, status).code) == (500, "internal")
    [(status, _, body)] = await exchange(server, sent)
    assert (status, decode_response(body).acked) == (200, 2)
    events = await server.services.store.read_events(device="d1")
    assert [e.seq for e in events] == [1, 2]


async def test_a_half_closed_connection_gets_its_answer(server: Server) -> None:
    token = await provision(server)
    [(status, _, body)] = await exchange(server, request(token, sync_body("d1", 1)), eof=True)
    assert (status, decode_response(body).acked) == (200, 1)


async def test_an_idle_connection_is_closed_after_the_keepalive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadlines, "KEEPALIVE", 0.3)
    async with await serve(tmp_path, "quick", header_timeout=0.4) as srv:
        token = await provision(srv)
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(request(token, sync_body("d1", 1)))
        assert (await answer(reader))[0] == 200
        async with asyncio.timeout(BOUND):
            assert await reader.read() == b""  # closed by the server, nothing more sent
        writer.close()


async def test_a_head_that_stalls_is_still_cut_off(tmp_path: Path) -> None:
    async with await serve(tmp_path, "quick", header_timeout=0.4) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(PLAIN[:40])
        async with asyncio.timeout(BOUND):
            assert await reader.read() == b""
        writer.close()


async def test_bytes_pipelined_behind_a_plain_sync_pause_reading_until_its_answer(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than ``MAX_WAITING`` bytes behind a sync being served: the connection stops
    reading (the buffer stays bounded), answers the sync, reads on, and serves the rest."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = handler.run_sync

    async def held(*args: Any) -> bytes:
        entered.set()
        await release.wait()
        return await real(*args)

    monkeypatch.setattr(handler, "run_sync", held)
    token = await provision(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request(token, sync_body("d1", 1)))
    await until(entered.is_set)
    [guard] = server.app[HEADS]._guards.values()
    filler = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n"
    writer.write(filler * (deadlines.MAX_WAITING // len(filler) + 40))
    await until(lambda: guard._paused)
    assert len(guard.buffer) < deadlines.MAX_WAITING + 300_000  # one more read at most
    release.set()
    status, _, body = await answer(reader)
    assert (status, decode_response(body).acked) == (200, 1)
    assert (await answer(reader))[0] == 200  # the first health check, from aiohttp
    assert not guard._paused and aiohttp_made(server) == [True]
    writer.close()


async def test_shutdown_answers_the_plain_syncs_being_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain sync still running when the server stops is finished and answered before the
    store closes."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = handler.run_sync

    async def held(*args: Any) -> bytes:
        entered.set()
        await release.wait()
        return await real(*args)

    monkeypatch.setattr(handler, "run_sync", held)
    srv = await serve(tmp_path, "s")
    await srv.start()
    token = await provision(srv)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(request(token, sync_body("d1", 1)))
    await until(entered.is_set)
    stopping = asyncio.create_task(srv.aclose())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waits for the sync
    release.set()
    status, _, body = await answer(reader)
    assert (status, decode_response(body).acked) == (200, 1)
    async with asyncio.timeout(BOUND):
        await stopping
    writer.close()
