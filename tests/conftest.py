"""Shared fixtures: a real sync server on 127.0.0.1 over a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from crdtsync import AdminClient, Device, TransportError, hlc
from crdtsync.transport import Transport
from crdtsync_server import Server, ServerConfig

from .store_backends import store  # noqa: F401  (the store contract suites' fixture)

ADMIN_TOKEN = "test-admin-token"


class SteppedClock:
    """The system clock (ms) plus the steps a test adds with :meth:`advance`: give it to
    the server (``ServerConfig.clock``) and the devices (``Device(clock=)``) so that "one
    second later" is exact, without sleeping."""

    def __init__(self) -> None:
        self.ahead = 0

    def __call__(self) -> int:
        return hlc.wall_ms() + self.ahead

    def advance(self, ms: int) -> None:
        self.ahead += ms


@pytest.fixture
def server_clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
def server_config(tmp_path: Path, server_clock: SteppedClock) -> ServerConfig:
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        clock=server_clock)


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[Server]:
    async with Server(server_config) as srv:
        yield srv


@pytest.fixture
async def admin(server: Server) -> AsyncIterator[AdminClient]:
    async with AdminClient(server.url, ADMIN_TOKEN) as client:
        yield client


UNTIL_BOUND = 20.0
"""Seconds :func:`until` waits: only there so that a condition that never holds fails the
test instead of hanging it."""


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (polled); fail the test after :data:`UNTIL_BOUND`
    seconds."""
    async with asyncio.timeout(UNTIL_BOUND):
        for delay in itertools.repeat(0.01):
            if condition():
                return
            await asyncio.sleep(delay)


DeviceFactory = Callable[..., Awaitable[Device]]


@contextlib.asynccontextmanager
async def local_app(app: web.Application, shutdown_timeout: float = 0.5
                    ) -> AsyncIterator[str]:
    """``app`` served on a free port of 127.0.0.1 (a receiver, a proxied-request target);
    yields its base URL, ``http://127.0.0.1:<port>``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class LoseResponses:
    """A transport whose next ``n`` responses are lost after the server committed."""

    def __init__(self, inner: Transport, n: int) -> None:
        self.inner = inner
        self.n = n

    async def exchange(self, body: bytes) -> bytes:
        response = await self.inner.exchange(body)
        if self.n > 0:
            self.n -= 1
            raise TransportError("response lost (test)")
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def make_device(server: Server, admin: AdminClient, tmp_path: Path
                      ) -> AsyncIterator[DeviceFactory]:
    """``await make_device("d1")`` provisions (once) and starts a device with a manual sync
    (no background loop); every device is closed at the end of the test."""
    tokens: dict[str, str] = {}
    opened: list[Device] = []

    async def factory(device_id: str, **kwargs: object) -> Device:
        if device_id not in tokens:
            tokens[device_id] = (await admin.add_device(device_id))["token"]
        kwargs.setdefault("interval", None)
        kwargs.setdefault("path", tmp_path / f"{device_id}.db")
        dev = Device(device_id, server.url, token=tokens[device_id], **kwargs)  # type: ignore[arg-type]
        await dev.start()
        opened.append(dev)
        return dev

    factory.tokens = tokens  # type: ignore[attr-defined]
    yield factory
    for dev in opened:
        await dev.aclose()
