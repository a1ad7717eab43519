"""The live channel, client side (docs/protocol.md 14a): the wake codec, ``HttpTransport.wake``
against an aiohttp fake of ``GET /v1/wake`` on 127.0.0.1, and the Device's wake loop, whose
syncs go to the real server.

The fakes implement the wire contract; end-to-end tests against the server's own endpoint
live with it. Pauses are observed by replacing ``crdtsync._live._sleep``, never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp import ClientSession, TCPConnector, web

from crdtsync import AdminClient, Device, TransportError
from crdtsync import _live as live_module
from crdtsync import transport as transport_module
from crdtsync.errors import (
    MalformedRequest,
    NotFound,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    error_from_code,
)
from crdtsync.protocol import (
    MAX_SEQ,
    MAX_WAKE_DELAY_MS,
    SYNC_PATH,
    WAKE_PATH,
    WakeSignal,
    decode_error,
    decode_wake,
    encode_error,
    encode_wake,
    wake_query,
)
from crdtsync.transport import HttpTransport, LiveTransport, Transport
from crdtsync_server import Server

from .conftest import local_app, until

UPPER_BOUND = 20.0
"""Seconds after which a waiting test gives up (a hang guard, not the property tested)."""


# --- the codec ------------------------------------------------------------------------------


@pytest.mark.parametrize("signal", [WakeSignal(True, 0, 0), WakeSignal(False, MAX_SEQ, 60_000),
                                    WakeSignal(True, 5, 1500)])
def test_encode_then_decode_is_identity(signal: WakeSignal) -> None:
    body = encode_wake(signal)
    assert json.loads(body) == {"wake": signal.wake, "w": signal.cursor, "in": signal.delay_ms}
    assert decode_wake(body) == signal


@pytest.mark.parametrize(("sent", "taken"), [(-5, 0), (0, 0), (60_000, 60_000),
                                             (10**12, MAX_WAKE_DELAY_MS)])
def test_decode_clamps_the_delay(sent: int, taken: int) -> None:
    body = json.dumps({"wake": True, "w": 1, "in": sent}).encode()
    assert decode_wake(body).delay_ms == taken


def test_decode_ignores_unknown_keys() -> None:
    body = b'{"wake": false, "w": 9, "in": 0, "later": {"x": [1, 2]}}'
    assert decode_wake(body) == WakeSignal(False, 9, 0)


def _answer(**fields: Any) -> bytes:
    return json.dumps({"wake": True, "w": 1, "in": 0, **fields}).encode()


MALFORMED = {
    "empty": b"",
    "not-json": b"wake",
    "array": b"[true, 1, 0]",
    "null": b"null",
    "string": b'"wake"',
    "no-wake": b'{"w": 1, "in": 0}',
    "no-w": b'{"wake": true, "in": 0}',
    "no-in": b'{"wake": true, "w": 1}',
    "wake-int": _answer(wake=1),
    "wake-string": _answer(wake="true"),
    "wake-null": _answer(wake=None),
    "w-negative": _answer(w=-1),
    "w-too-big": _answer(w=2**63),
    "w-float": _answer(w=1.0),
    "w-bool": _answer(w=True),
    "w-string": _answer(w="1"),
    "in-float": _answer(**{"in": 1.5}),
    "in-bool": _answer(**{"in": True}),
    "in-string": _answer(**{"in": "5"}),
    "nan": b'{"wake": true, "w": NaN, "in": 0}',
    "infinity": b'{"wake": true, "w": 1, "in": Infinity}',
    "not-utf8": b'{"wake": true, "w": 1, "in": 0, "x": "\xff"}',
    "too-deep": b"[" * 100_000 + b"]" * 100_000,
    "over-4k": _answer(pad="x" * 4096),
    "trailing": _answer() + b" {}",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_refuses_every_malformed_answer(body: bytes) -> None:
    with pytest.raises(MalformedRequest, match="wake answer"):
        decode_wake(body)


def test_wake_query() -> None:
    assert wake_query(None, 50.0) == {"wait": "50"}
    assert wake_query(0, 0.25) == {"after": "0", "wait": "0.25"}
    assert wake_query(MAX_SEQ, 3600) == {"after": str(MAX_SEQ), "wait": "3600"}
    assert wake_query(7, 1e-9) == {"after": "7", "wait": "0"}  # decimal, never "1e-09"


@pytest.mark.parametrize(("after", "wait"), [(-1, 50.0), (MAX_SEQ + 1, 50.0), (True, 50.0),
                                             (1, -0.5), (1, 3600.5), (1, float("nan")),
                                             (1, float("inf"))])
def test_wake_query_refuses_out_of_range(after: Any, wait: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        wake_query(after, wait)


@pytest.mark.parametrize("signal", [WakeSignal(True, -1, 0), WakeSignal(True, MAX_SEQ + 1, 0),
                                    WakeSignal(True, 1, -1), WakeSignal(True, 1, 60_001)])
def test_encode_refuses_out_of_range(signal: WakeSignal) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_wake(signal)


# --- too_many_requests and the JSON error body ---------------------------------------------


def _json_error(code: str, detail: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"error": {"code": code, "message": "m", "detail": detail or {},
                                 "retryable": True}}).encode()


def test_too_many_requests_crosses_the_wire_both_ways() -> None:
    original = TooManyRequests("too many live channels", {"retry_after": 12})
    assert (original.status, original.retryable) == (429, True)
    for body in (encode_error(original), _json_error("too_many_requests", {"retry_after": 12})):
        back = decode_error(body, 429)
        assert isinstance(back, TooManyRequests)
        assert back.retry_after == 12.0
    assert isinstance(error_from_code("too_many_requests"), TooManyRequests)


@pytest.mark.parametrize("value", [None, "12", True, -1, 3601, float("nan"), [5]])
def test_retry_after_ignores_what_is_not_seconds(value: Any) -> None:
    assert TooManyRequests("x", {"retry_after": value}).retry_after is None


def test_decode_error_reads_the_json_error_body() -> None:
    assert isinstance(decode_error(_json_error("not_found", {"http": 404}), 404), NotFound)
    assert isinstance(decode_error(_json_error("unauthorized"), 401), Unauthorized)
    # still: a body that is neither frame nor JSON error is judged by its status
    assert decode_error(b'{"detail": "nginx"}', 502).code == "internal"
    assert decode_error(b"[1, 2]", 400).code == "bad_request"


# --- HttpTransport.wake against a fake server ------------------------------------------------


TOKEN = "t0k"


class FakeCloud:
    """An aiohttp app with ``POST /v1/sync`` (answers ``b"synced"``) and ``GET /v1/wake``
    (answers what :attr:`answer` returns; :attr:`hold` delays it), recording each request's
    query, Authorization header and client port."""

    def __init__(self, *, with_wake: bool = True) -> None:
        self.wakes: list[dict[str, str]] = []
        self.auth: list[str] = []
        self.ports: dict[str, set[int]] = {"sync": set(), "wake": set()}
        self.wake_arrived = asyncio.Event()
        self.synced = asyncio.Event()
        self.hold: Callable[[], Any] | None = None
        self.answer: Callable[[], web.Response] = lambda: web.Response(
            body=encode_wake(WakeSignal(True, 7, 250)), content_type="application/json")
        self.app = web.Application()
        self.app.router.add_post(SYNC_PATH, self.sync)
        if with_wake:
            self.app.router.add_get(WAKE_PATH, self.wake)

    def _record(self, request: web.Request, kind: str) -> None:
        self.auth.append(request.headers.get("Authorization", ""))
        self.ports[kind].add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]

    async def sync(self, request: web.Request) -> web.Response:
        self._record(request, "sync")
        await request.read()
        self.synced.set()
        return web.Response(body=b"synced")

    async def wake(self, request: web.Request) -> web.Response:
        self._record(request, "wake")
        self.wakes.append(dict(request.query))
        self.wake_arrived.set()
        if self.hold is not None:
            await self.hold()
        return self.answer()


@contextlib.asynccontextmanager
async def fake_cloud(cloud: FakeCloud) -> AsyncIterator[str]:
    async with local_app(cloud.app, shutdown_timeout=0.1) as url:
        yield url


async def test_wake_sends_its_query_and_the_device_token() -> None:
    cloud = FakeCloud()
    async with fake_cloud(cloud) as url:
        transport = HttpTransport(url, TOKEN)
        try:
            assert await transport.wake(None, 50.0) == WakeSignal(True, 7, 250)
            assert await transport.wake(3, 12.5) == WakeSignal(True, 7, 250)
        finally:
            await transport.aclose()
    assert cloud.wakes == [{"wait": "50"}, {"after": "3", "wait": "12.5"}]
    assert cloud.auth == [f"Bearer {TOKEN}"] * 2
    assert isinstance(transport, LiveTransport)


async def test_a_held_wake_does_not_block_a_sync_of_the_same_transport() -> None:
    """The fake answers the wake only once a sync was answered. The sync session has a
    single connection too: had the wake taken it, the sync could not go out (deadlock,
    caught by the upper bound)."""
    cloud = FakeCloud()
    cloud.hold = cloud.synced.wait
    async with fake_cloud(cloud) as url, ClientSession(connector=TCPConnector(limit=1)) as one:
        transport = HttpTransport(url, TOKEN, session=one)
        try:
            async with asyncio.timeout(UPPER_BOUND):
                waking = asyncio.create_task(transport.wake(1, 50.0))
                await cloud.wake_arrived.wait()
                assert await transport.exchange(b"request") == b"synced"
                assert (await waking).wake
        finally:
            await transport.aclose()
    assert cloud.ports["sync"] and cloud.ports["wake"]
    assert not cloud.ports["sync"] & cloud.ports["wake"]  # two connections


def _error_response(status: int, code: str, detail: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_json_error(code, detail),
                        content_type="application/json", headers=headers)


@pytest.mark.parametrize(("response", "expected", "retry_after"), [
    (lambda: _error_response(401, "unauthorized"), Unauthorized, None),
    (lambda: _error_response(503, "unavailable"), Unavailable, None),
    (lambda: _error_response(429, "too_many_requests", headers={"Retry-After": "12"}),
     TooManyRequests, 12.0),
    (lambda: _error_response(429, "too_many_requests", {"retry_after": 7},
                             headers={"Retry-After": "12"}), TooManyRequests, 7.0),
    (lambda: web.Response(body=b'{"wake": "yes"}'), MalformedRequest, None),
], ids=["401", "503", "429-header", "429-detail", "malformed"])
async def test_wake_raises_the_error_of_its_answer(response: Callable[[], web.Response],
                                                   expected: type[Exception],
                                                   retry_after: float | None) -> None:
    cloud = FakeCloud()
    cloud.answer = response
    async with fake_cloud(cloud) as url:
        transport = HttpTransport(url, TOKEN)
        try:
            with pytest.raises(expected) as caught:
                await transport.wake(1, 50.0)
        finally:
            await transport.aclose()
    if retry_after is not None:
        assert isinstance(caught.value, TooManyRequests)
        assert caught.value.retry_after == retry_after


@pytest.mark.parametrize("with_body", [True, False], ids=["not-found-body", "bare-404"])
async def test_a_server_without_the_channel_answers_not_found(with_body: bool) -> None:
    """A 404 on the wake path is :class:`NotFound`, with the JSON error body (the crdtsync
    server's unknown route) or without one (aiohttp's page, a proxy's page)."""
    cloud = FakeCloud(with_wake=with_body)
    cloud.answer = lambda: _error_response(404, "not_found", {"http": 404})
    async with fake_cloud(cloud) as url:
        transport = HttpTransport(url, TOKEN)
        try:
            with pytest.raises(NotFound):
                await transport.wake(None, 50.0)
        finally:
            await transport.aclose()
    assert len(cloud.wakes) == (1 if with_body else 0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_failures_are_transport_errors_with_a_short_reason() -> None:
    transport = HttpTransport(f"http://127.0.0.1:{_closed_port()}", TOKEN)
    try:
        with pytest.raises(TransportError) as caught:
            await transport.wake(None, 50.0)
    finally:
        await transport.aclose()
    assert caught.value.message == "wake request failed: connection refused"


async def test_a_wake_gives_up_after_wait_plus_the_grace(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(transport_module, "WAKE_GRACE", 0.2)
    cloud = FakeCloud()
    cloud.hold = asyncio.Event().wait  # never answers
    async with fake_cloud(cloud) as url:
        transport = HttpTransport(url, TOKEN)
        try:
            with pytest.raises(TransportError, match="timed out"):
                await transport.wake(1, 0.0)
        finally:
            await transport.aclose()


# --- the Device's wake loop ------------------------------------------------------------------


class ScriptedLive:
    """A LiveTransport: ``exchange`` goes to the real server (and is counted); each ``wake``
    waits for the answer (or error) the test puts in :attr:`answers`, like a held request."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.syncs = 0
        self.calls: list[tuple[int | None, float]] = []
        """``(after, wait)`` of each wake request."""
        self.answers: asyncio.Queue[WakeSignal | Exception] = asyncio.Queue()

    async def exchange(self, body: bytes) -> bytes:
        self.syncs += 1
        return await self.inner.exchange(body)

    async def wake(self, after: int | None, wait: float) -> WakeSignal:
        self.calls.append((after, wait))
        answer = await self.answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def aclose(self) -> None:
        await self.inner.aclose()


class SyncOnly:
    """A Transport without ``wake``."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.syncs = 0

    async def exchange(self, body: bytes) -> bytes:
        self.syncs += 1
        return await self.inner.exchange(body)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Pauses:
    """Replaces ``crdtsync._live._sleep``: records each pause, waits none."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> Pauses:
    recorder = Pauses()
    monkeypatch.setattr(live_module, "_sleep", recorder)
    return recorder


@pytest.fixture
async def scripted(server: Server, admin: AdminClient) -> ScriptedLive:
    token = (await admin.add_device("d1"))["token"]
    return ScriptedLive(HttpTransport(server.url, token))


def live_device(transport: Transport, tmp_path: Path, **kwargs: Any) -> Device:
    """A device whose only syncs are the first and those its live channel asks for: the
    interval and min_spacing are far beyond any test's upper bound."""
    kwargs = {"interval": 3600.0, "min_spacing": 300.0, "wake_wait": 30.0, **kwargs}
    return Device("d1", transport=transport, path=tmp_path / "d1.db", **kwargs)


async def first_answer(dev: Device, t: ScriptedLive, cursor: int = 10) -> None:
    """Let the start-up sync finish, answer the first wake request (no ``after``) and wait
    until the device holds the next one, after the sync that answer asks for."""
    await until(lambda: t.syncs >= 1 and dev.last_report is not None and len(t.calls) == 1)
    assert t.calls[0] == (None, 30.0)
    await t.answers.put(WakeSignal(False, cursor, 0))
    await until(lambda: len(t.calls) == 2)
    assert t.calls[1][0] == cursor
    await until(lambda: t.syncs == 2)
    assert dev.wake_cursor == cursor and dev.live


async def test_a_wake_brings_a_cloud_write_with_exactly_one_sync(
        scripted: ScriptedLive, admin: AdminClient, tmp_path: Path) -> None:
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        await admin.patch_state("d1", {"mode": "eco"})
        await t.answers.put(WakeSignal(True, 11, 0))
        await until(lambda: dev.state.get("mode") == "eco")  # min_spacing (300 s) skipped
        await until(lambda: len(t.calls) == 3)
        assert t.calls[2][0] == 11 and t.syncs == 3
        await t.answers.put(WakeSignal(False, 11, 0))  # the hold ended: no sync
        await until(lambda: len(t.calls) == 4)
        assert t.calls[3][0] == 11
        # A sync the wake:false had asked for would have started before request 4, and
        # would be counted before this one (the lock orders them): 5, not 4.
        await dev.sync()
        assert t.syncs == 4


async def test_each_wake_waits_the_delay_the_server_asks(
        scripted: ScriptedLive, pauses: Pauses, tmp_path: Path) -> None:
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        await t.answers.put(WakeSignal(True, 11, 1500))
        await until(lambda: t.syncs == 3)
    assert pauses.seen == [1.5]


async def test_failures_back_off_and_keep_the_cursor(
        scripted: ScriptedLive, pauses: Pauses, tmp_path: Path) -> None:
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        for _ in range(4):
            await t.answers.put(TransportError("wake request failed: connection refused"))
        await t.answers.put(TooManyRequests("busy", {"retry_after": 10}))
        await t.answers.put(Unavailable("stopping"))
        await until(lambda: len(t.calls) == 8)
        assert dev.live  # failing, not off
    assert [call[0] for call in t.calls[1:]] == [10] * 7  # never dropped after a failure
    exponential, retry_after, after_it = pauses.seen[:4], pauses.seen[4], pauses.seen[5]
    assert all(0 <= pause <= 2**i for i, pause in enumerate(exponential))
    assert 10 <= retry_after <= 12
    assert 0 <= after_it <= 32  # the 6th failure in a row: up to 2**5 s
    assert t.syncs == 2  # a failure never syncs


async def test_a_success_resets_the_backoff(scripted: ScriptedLive, pauses: Pauses,
                                            tmp_path: Path) -> None:
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        for _ in range(5):
            await t.answers.put(Unavailable("stopping"))
        await t.answers.put(WakeSignal(False, 10, 0))
        await t.answers.put(Unavailable("stopping"))
        await until(lambda: len(t.calls) == 9)
    assert len(pauses.seen) == 6 and pauses.seen[5] <= 1.0


async def test_a_repeated_failure_is_warned_once_and_the_recovery_told(
        scripted: ScriptedLive, pauses: Pauses, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    t = scripted
    caplog.set_level(logging.DEBUG, "crdtsync.device")
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        for error in (Unavailable("stopping"), Unavailable("stopping"),
                      TransportError("wake request failed: timed out")):
            await t.answers.put(error)
        await t.answers.put(WakeSignal(False, 10, 0))
        await until(lambda: len(t.calls) == 6)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if "live channel" in r.getMessage()]
    assert [level for level, _ in lines] == [logging.WARNING, logging.DEBUG, logging.WARNING,
                                             logging.INFO]
    assert lines[3][1] == "device d1: live channel recovered after 3 failed requests"


async def test_failures_are_logged_one_short_line_each(
        tmp_path: Path, pauses: Pauses, caplog: pytest.LogCaptureFixture) -> None:
    """A real HttpTransport to a closed port: one line per failure, without a repr; a
    warning for the first, debug for its repeats."""
    caplog.set_level(logging.DEBUG, "crdtsync.device")
    dev = Device("d1", f"http://127.0.0.1:{_closed_port()}", token=TOKEN,
                 path=tmp_path / "d1.db", interval=3600.0)
    async with dev:
        await until(lambda: len(pauses.seen) >= 2)
    records = [r for r in caplog.records if "live channel" in r.getMessage()]
    lines = [r.getMessage() for r in records]
    assert len(lines) >= 2
    assert [r.levelno for r in records] == [logging.WARNING] + [logging.DEBUG] * (len(lines) - 1)
    assert lines[0].startswith("device d1: live channel down (transport: wake request "
                               "failed: connection refused); retry in ")
    assert all(len(line) < 120 for line in lines)


async def test_a_server_without_the_channel_is_asked_again_every_300s(
        server: Server, admin: AdminClient, tmp_path: Path, pauses: Pauses,
        caplog: pytest.LogCaptureFixture) -> None:
    """Against a server without /v1/wake (404) the device logs once, syncs as before, and
    asks again every 300 s."""
    caplog.set_level(logging.INFO, "crdtsync.device")
    token = (await admin.add_device("d1"))["token"]
    async with local_app(forwarding_app(server.url), shutdown_timeout=0.1) as url, \
            Device("d1", url, token=token, path=tmp_path / "d1.db", interval=3600.0) as dev:
        await until(lambda: len(pauses.seen) >= 3 and dev.last_report is not None)
        assert not dev.live and dev.wake_cursor is None
        await admin.patch_state("d1", {"mode": "eco"})
        await dev.sync()  # the device still syncs
        assert dev.state["mode"] == "eco"
    assert set(pauses.seen) == {300.0}
    noted = [r for r in caplog.records if "no live channel" in r.getMessage()]
    assert len(noted) == 1


async def test_not_found_then_a_channel_turns_live_on(scripted: ScriptedLive, pauses: Pauses,
                                                      tmp_path: Path) -> None:
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await until(lambda: len(t.calls) == 1)
        await t.answers.put(NotFound("no route", {"http": 404}))
        await until(lambda: len(t.calls) == 2)
        assert not dev.live and pauses.seen == [300.0]
        await t.answers.put(WakeSignal(False, 4, 0))
        await until(lambda: len(t.calls) == 3)
        assert dev.live and t.calls[2][0] == 4


async def test_a_reset_syncs_once_and_resets_in_a_row_back_off(
        scripted: ScriptedLive, pauses: Pauses, tmp_path: Path) -> None:
    """A wake whose cursor did not move past ``after`` (the server lost track): one sync,
    then on with the new cursor; a second one in a row waits a backoff first."""
    t = scripted
    async with live_device(t, tmp_path) as dev:
        await first_answer(dev, t)
        await t.answers.put(WakeSignal(True, 10, 0))  # did not move: a reset
        await until(lambda: len(t.calls) == 3 and t.syncs == 3)
        assert pauses.seen == []
        await t.answers.put(WakeSignal(True, 3, 0))  # went back: a reset again, in a row
        await until(lambda: len(t.calls) == 4 and t.syncs == 4)
        assert len(pauses.seen) == 1 and 0 < pauses.seen[0] <= 1.0
        await t.answers.put(WakeSignal(True, 4, 0))  # moved on: a plain wake, no backoff
        await until(lambda: len(t.calls) == 5 and t.syncs == 5)
        assert len(pauses.seen) == 1
    assert [call[0] for call in t.calls] == [None, 10, 10, 3, 4]


@pytest.mark.parametrize("options", [{"live": False}, {"interval": None}],
                         ids=["live-false", "interval-none"])
async def test_no_wake_request_without_live_or_loop(scripted: ScriptedLive, tmp_path: Path,
                                                    options: dict[str, Any]) -> None:
    t = scripted
    async with live_device(t, tmp_path, **options) as dev:
        await dev.sync()
        await until(lambda: dev.last_report is not None)
        assert not dev.live and dev.wake_cursor is None
        await asyncio.sleep(0.1)  # a chance for a wrongly started channel to ask
    assert t.calls == [] and t.syncs >= 1


async def test_no_wake_request_on_a_transport_without_wake(server: Server, admin: AdminClient,
                                                           tmp_path: Path) -> None:
    token = (await admin.add_device("d1"))["token"]
    t = SyncOnly(HttpTransport(server.url, token))
    assert not isinstance(t, LiveTransport)
    async with live_device(t, tmp_path) as dev:
        await until(lambda: dev.last_report is not None)
        assert not dev.live
    assert t.syncs == 1


def test_wake_wait_is_checked(tmp_path: Path) -> None:
    for wait in (0.0, 0.5, 3601.0):
        with pytest.raises(ValueError, match="wake_wait"):
            Device("d1", "http://127.0.0.1:9", token=TOKEN, path=tmp_path / "d.db",
                   wake_wait=wait)


# --- a Device with its HttpTransport, through a fake wake endpoint ----------------------------


def forwarding_app(server_url: str, wake: Any = None,
                   synced: Callable[[], None] = lambda: None) -> web.Application:
    """Syncs forwarded to the real server at ``server_url`` (``synced`` called for each);
    ``GET /v1/wake`` served by ``wake``, or absent (a 404, as on a server without it)."""

    async def sync(request: web.Request) -> web.Response:
        synced()
        async with ClientSession() as session, session.post(
                server_url + SYNC_PATH, data=await request.read(),
                headers={k: v for k, v in request.headers.items()
                         if k in ("Authorization", "Content-Encoding")},
                skip_auto_headers=("Content-Type",)) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type)

    app = web.Application()
    app.router.add_post(SYNC_PATH, sync)
    if wake is not None:
        app.router.add_get(WAKE_PATH, wake)
    return app


async def test_live_delivery_through_http(server: Server, admin: AdminClient,
                                          tmp_path: Path) -> None:
    """A fake cloud that forwards syncs to the real server and scripts ``/v1/wake``: the
    first request gets the cursor, the next is held until the test wakes it, the one after
    is held until the device closes. The cloud's write reaches the device at once (its
    min_spacing and interval are far beyond the upper bound), in one sync."""
    token = (await admin.add_device("d1"))["token"]
    woken = asyncio.Event()
    seen: list[dict[str, str]] = []
    syncs = 0

    def synced() -> None:
        nonlocal syncs
        syncs += 1

    async def wake(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        if request.headers.get("Authorization") != f"Bearer {token}":
            return _error_response(401, "unauthorized")
        after = request.query.get("after")
        if after == "1":
            await woken.wait()
        elif after is not None:
            await asyncio.Event().wait()  # held until the device goes away
        cursor = 2 if after == "1" else 1
        return web.json_response({"wake": after == "1", "w": cursor, "in": 0})

    app = forwarding_app(server.url, wake, synced)
    async with local_app(app, shutdown_timeout=0.1) as url, \
            Device("d1", url, token=token, path=tmp_path / "d1.db", interval=3600.0,
                   min_spacing=300.0) as dev:
        await until(lambda: len(seen) == 2)  # the cursor learnt, the second one held
        await dev.sync()  # after any sync in flight: the count is settled
        before = syncs
        await admin.patch_state("d1", {"mode": "eco"})
        woken.set()
        await until(lambda: dev.state.get("mode") == "eco")
        await until(lambda: len(seen) == 3)
        assert dev.wake_cursor == 2 and dev.live
        assert syncs == before + 1
    assert [q.get("after") for q in seen] == [None, "1", "2"]
    assert {q["wait"] for q in seen} == {"50"}


def test_wire_error_frame_of_too_many_requests_is_msgpack_on_sync() -> None:
    """The msgpack frame carries ``retry``: a client that only reads frames retries."""
    frame = msgpack.unpackb(encode_error(TooManyRequests("busy", {"retry_after": 5})))
    assert frame["code"] == "too_many_requests" and frame["retry"] is True
