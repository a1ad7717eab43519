"""What the real-process tests share: a device's :class:`Ledger` of what the cloud must end
up holding and :func:`check_invariants` against it, ``crdtsync serve`` as a subprocess
(:class:`ServeProcess`, killable with ``kill -9``), and the write-emit-sync
:func:`device_loop` with its :class:`Progress`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from crdtsync import AdminClient, CrdtsyncError, Device, crdt

from .conftest import ADMIN_TOKEN


@dataclass
class Ledger:
    """What one device did that the cloud must end up holding."""

    device: str
    emitted: list[dict[str, Any]] = field(default_factory=list)
    owned: str | None = None
    """The last value written to the device-owned key ``own``."""
    cloud: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The last value of each cloud-owned key written by PATCH, per map."""

    async def emit(self, dev: Device, body: dict[str, Any]) -> None:
        seq = await dev.emit("t", body)
        self.emitted.append(body)
        assert seq == len(self.emitted)

    def own(self, dev: Device, value: str) -> None:
        dev.state["own"] = value
        self.owned = value


async def events_of(admin: AdminClient, device: str) -> list[dict[str, Any]]:
    return [e async for e in admin.iter_events(device=device)]


def outbox_rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


async def check_invariants(admin: AdminClient, dev: Device, ledger: Ledger) -> None:
    """After a fault-free sync: replicas equal, events exactly once in order, outbox empty,
    acknowledged writes present."""
    cloud = await admin.state(dev.id)
    assert crdt.to_json(dev.doc) == cloud
    assert cloud["state"].get("own") == ledger.owned
    for map_name, keys in ledger.cloud.items():
        for key, value in keys.items():
            assert cloud[map_name][key] == value, (map_name, key)
    events = await events_of(admin, dev.id)
    assert [e["seq"] for e in events] == list(range(1, len(ledger.emitted) + 1))
    assert [e["body"] for e in events] == ledger.emitted
    assert dev.pending_events == 0


def log_file(path: Path) -> BinaryIO:
    """A local log file for a subprocess's output (opening it does not block noticeably)."""
    return path.open("ab")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``crdtsync serve`` as a subprocess on a fixed port and database: start, kill -9."""

    def __init__(self, db: Path | str, port: int, logs: Path, *,
                 args: Sequence[str] = (), name: str = "serve") -> None:
        self.db, self.port, self.logs = db, port, logs
        self.args = tuple(args)
        """More ``crdtsync serve`` options."""
        self.name = name
        """Prefix of the log files (one per start)."""
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start the server and wait until ``GET /v1/health`` answers."""
        self.starts += 1
        with log_file(self.logs / f"{self.name}-{self.starts}.log") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "crdtsync.cli", "serve", "--db", str(self.db),
                "--port", str(self.port), "--admin-token", ADMIN_TOKEN, *self.args,
                stdout=log, stderr=asyncio.subprocess.STDOUT)
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        async with asyncio.timeout(20), aiohttp.ClientSession() as http:
            while True:
                assert self.proc is not None and self.proc.returncode is None, self.log()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(self.url + "/v1/health",
                                        timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """``kill -9``, then reap the process."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self, start: int | None = None) -> str:
        """What the server printed in its ``start``-th run (default: the latest)."""
        path = self.logs / f"{self.name}-{start or self.starts}.log"
        return path.read_text(errors="replace")


class Progress:
    """How many syncs succeeded and failed; :meth:`wait_ok` waits for successes."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        """Failed syncs by error code."""
        self._changed = asyncio.Event()

    def record(self, error: CrdtsyncError | None = None) -> None:
        if error is None:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[error.code] += 1
        self._changed.set()

    async def wait_ok(self, target: int) -> None:
        try:
            async with asyncio.timeout(20):
                while self.ok < target:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{self.ok} syncs of {target} succeeded; failures:"
                                 f" {dict(self.errors)}") from None


async def device_loop(dev: Device, ledger: Ledger, stop: asyncio.Event,
                      progress: Progress) -> None:
    """Write, emit and sync until ``stop``; a sync may fail with a retryable error while
    the server (or one of several) is down; any other error ends the loop."""
    step = 0
    while not stop.is_set():
        step += 1
        ledger.own(dev, f"{dev.id}-{step}")
        await ledger.emit(dev, {"id": f"{dev.id}-{step}"})
        try:
            await dev.sync()
            progress.record()
        except CrdtsyncError as exc:
            if not exc.retryable:
                raise
            progress.record(exc)
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def device_loops(devices: Mapping[str, Device], ledgers: Mapping[str, Ledger],
                       progress: Progress) -> AsyncIterator[None]:
    """Run :func:`device_loop` for every device while the block runs; when it ends, stop
    the loops and wait for them (a loop's own failure is raised then)."""
    stop = asyncio.Event()
    loops = [asyncio.create_task(device_loop(dev, ledgers[d], stop, progress))
             for d, dev in devices.items()]
    try:
        yield
        stop.set()
        await asyncio.gather(*loops)
    finally:
        stop.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


class TcpLink:
    """A byte-for-byte TCP proxy on loopback to ``host:port`` that can be cut: put it
    between the server and its database. :meth:`cut` resets every open connection and
    refuses new ones (the database is gone, or the network to it); :meth:`restore` lets
    connections through again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> TcpLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
