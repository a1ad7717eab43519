"""Files through real faults (docs/protocol.md section 19): 20 MB each way through a
:class:`~crdtsync.testing.FaultProxy` that cuts the connection every 2 MB, and ``kill -9`` of
the device process and of a ``crdtsync serve`` process in the middle of a transfer. After
each, the transfer resumes (never from 0 once past a cut) and completes: the bytes are
verified, the upload is in the feed exactly once, the download ran its handler once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from crdtsync import AdminClient, Device, FileTransfer, TransportError
from crdtsync.testing import FaultProxy
from crdtsync.transport import HttpTransport
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN
from .filehttp import cloud_bytes, feed_files, put_down
from .realworld import ServeProcess, free_port, log_file

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
SIZE = 20 * MB


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def server_config(server_config: ServerConfig) -> ServerConfig:
    server_config.file_chunk = MB  # below the proxy's 2 MB between cuts
    return server_config


async def until_done(dev: Device, done: Callable[[], bool], *, sync: bool = False,
                     tries: int = 200) -> int:
    """Run the device's transfers until ``done()``, retrying after each cut; returns how
    many attempts failed."""
    failures = 0
    for _ in range(tries):
        try:
            if sync:
                await dev.sync()
            await dev.sync_files()
        except TransportError:
            failures += 1
            await asyncio.sleep(0.05)  # a restarting server takes a moment
        if done():
            return failures
    raise AssertionError(f"not done after {tries} attempts: {dev.file_errors}")


class Starts:
    """A progress callback recording where each attempt of a transfer started, by
    direction (each attempt reports through a new :class:`FileTransfer`)."""

    def __init__(self, reached: int | None = None) -> None:
        self.starts: dict[str, list[int]] = {"up": [], "down": []}
        self.reached = {"up": asyncio.Event(), "down": asyncio.Event()}
        self._threshold = reached
        self._current: dict[str, FileTransfer | None] = {"up": None, "down": None}

    def __call__(self, transfer: FileTransfer) -> None:
        if transfer is not self._current[transfer.direction]:
            self._current[transfer.direction] = transfer
            self.starts[transfer.direction].append(transfer.done)
        if self._threshold is not None and transfer.done >= self._threshold:
            self.reached[transfer.direction].set()


# --- cuts every 2 MB -------------------------------------------------------------------------


async def test_20mb_up_through_cuts_every_2mb(server: Server, admin: AdminClient,
                                              payload: bytes, tmp_path: Path) -> None:
    token = (await admin.add_device("cam"))["token"]
    async with FaultProxy(server.port, cut_every=2 * MB) as proxy, Device(
            "cam", proxy.url, token=token, path=tmp_path / "cam.db", interval=None) as dev:
        await dev.send_file("video.bin", payload, meta={"seconds": 60})
        await until_done(dev, lambda: not dev.pending_files)
        assert proxy.stats["cut_every"] >= 10  # (aiohttp itself resends some cut PUTs)
    files = await feed_files(server.url)
    assert len(files) == 1 and files[0]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert await cloud_bytes(server.url, files[0]["url"]) == payload


async def test_20mb_down_through_cuts_every_2mb(server: Server, admin: AdminClient,
                                                payload: bytes, tmp_path: Path) -> None:
    token = (await admin.add_device("gw"))["token"]
    await put_down(server.url, "/v1/devices/gw/files/fw.bin", payload)
    log = Starts()
    handled: list[str] = []
    async with FaultProxy(server.port, cut_every=2 * MB) as proxy, Device(
            "gw", proxy.url, token=token, path=tmp_path / "gw.db", interval=None) as dev:
        dev.on_file_progress(log)
        dev.on_file("fw.bin")(lambda info: handled.append(info.sha256))
        failures = await until_done(dev, lambda: "fw.bin" in dev.files, sync=True)
        assert failures >= 5 and proxy.stats["cut_every"] >= 10
        out = tmp_path / "fw.out"
        await dev.fetch_file("fw.bin", out)
        assert out.read_bytes() == payload
        await dev.sync()
        await dev.sync_files()
    assert handled == [hashlib.sha256(payload).hexdigest()]
    resumed = log.starts["down"]  # each attempt resumed where the last one was cut
    assert len(resumed) >= 5 and resumed == sorted(resumed) and resumed[-1] >= 16 * MB


# --- kill -9 of the device -------------------------------------------------------------------


DEVICE_SCRIPT = '''
import asyncio
import sys
import time

from crdtsync import CrdtsyncError, Device


async def main(url, token, path, source, queue):
    async with Device("dk", url, token=token, path=path, interval=None) as dev:
        def progress(transfer):
            print(f"PROGRESS {transfer.direction} {transfer.done}", flush=True)
            time.sleep(0.05)  # slow enough to be killed in the middle

        dev.on_file_progress(progress)
        if queue == "queue":
            await dev.send_file("dump.bin", source)
            print("QUEUED", flush=True)
        while dev.pending_files or "fw.bin" not in dev.files:
            try:
                await dev.sync()
                await dev.sync_files()
            except CrdtsyncError as exc:
                if not exc.retryable:
                    raise
    print("DONE", flush=True)


asyncio.run(main(*sys.argv[1:]))
'''


async def run_device(args: list[str], log: Path, kill: tuple[str, int] | None
                     ) -> tuple[list[str], int]:
    """Run the device script; with ``kill`` = ``(direction, bytes)``, SIGKILL it once that
    transfer reported at least that many bytes. Returns the lines it printed and its exit
    status."""
    script = log.parent / "device.py"
    script.write_text(DEVICE_SCRIPT)
    with log_file(log) as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), *args, stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while line := (await proc.stdout.readline()).decode():
                lines.append(line.strip())
                words = line.split()
                if kill is not None and words[:2] == ["PROGRESS", kill[0]] \
                        and int(words[2]) >= kill[1]:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        return lines, await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def first_progress(lines: list[str], direction: str) -> int:
    return next(int(ln.split()[2]) for ln in lines if ln.startswith(f"PROGRESS {direction}"))


async def test_device_killed_mid_transfer_resumes(server: Server, admin: AdminClient,
                                                  payload: bytes, tmp_path: Path) -> None:
    """Killed while uploading (after 4 MB), then while downloading (after 4 MB): each run
    resumes the transfer the last one was killed in, and the last one completes both."""
    token = (await admin.add_device("dk"))["token"]
    firmware = payload[::-1]
    await put_down(server.url, "/v1/devices/dk/files/fw.bin", firmware)
    source = tmp_path / "dump.bin"
    source.write_bytes(payload)
    args = [server.url, token, str(tmp_path / "dk.db"), str(source)]
    lines, status = await run_device([*args, "queue"], tmp_path / "dev-1.log", ("up", 4 * MB))
    assert status == -signal.SIGKILL and "QUEUED" in lines
    assert await feed_files(server.url) == []  # nothing half-stored is visible
    lines, status = await run_device([*args, "resume"], tmp_path / "dev-2.log",
                                     ("down", 4 * MB))
    assert status == -signal.SIGKILL, (tmp_path / "dev-2.log").read_text()
    assert first_progress(lines, "up") >= 4 * MB  # resumed, not restarted
    lines, status = await run_device([*args, "resume"], tmp_path / "dev-3.log", None)
    assert status == 0 and "DONE" in lines, (tmp_path / "dev-3.log").read_text()
    assert first_progress(lines, "down") >= 4 * MB
    files = await feed_files(server.url)
    assert [f["name"] for f in files] == ["dump.bin"]
    assert await cloud_bytes(server.url, files[0]["url"]) == payload
    async with Device("dk", server.url, token=token, path=tmp_path / "dk.db",
                      interval=None) as dev:
        out = io.BytesIO()
        await dev.fetch_file("fw.bin", out)
        assert out.getvalue() == firmware and dev.pending_files == []


# --- kill -9 of the server -------------------------------------------------------------------


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    proc = ServeProcess(tmp_path / "server.db", free_port(), tmp_path,
                        args=["--file-chunk", str(MB)])
    try:
        await proc.start()
        yield proc
    finally:
        await proc.close()


async def kill_when(proxy: FaultProxy, serve: ServeProcess, reached: asyncio.Event,
                    mode: str) -> None:
    """Once ``reached`` is set, hold the next exchange at ``mode``'s point, kill -9 the
    server while it is held, and start it again."""
    await reached.wait()
    proxy.mode = mode
    async with asyncio.timeout(20):
        await proxy.wait_held()
    await serve.kill()
    proxy.mode = "pass"
    await serve.start()


async def test_server_killed_mid_transfer_resumes(serve_process: ServeProcess,
                                                  payload: bytes, tmp_path: Path) -> None:
    firmware = payload[::-1]
    async with AdminClient(serve_process.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("sk"))["token"]
    await put_down(serve_process.url, "/v1/devices/sk/files/fw.bin", firmware)
    log = Starts(reached=6 * MB)
    async with FaultProxy(serve_process.port, cut_every=2 * MB) as proxy, Device(
            "sk", transport=HttpTransport(proxy.url, token, timeout=5),
            path=tmp_path / "sk.db", interval=None) as dev:
        dev.on_file_progress(log)
        await dev.send_file("dump.bin", payload)
        killer = asyncio.create_task(_kills(proxy, serve_process, log.reached))
        try:
            await until_done(dev, lambda: not dev.pending_files and "fw.bin" in dev.files
                             and killer.done(), sync=True, tries=400)
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
        out = io.BytesIO()
        await dev.fetch_file("fw.bin", out)
        assert out.getvalue() == firmware
    assert serve_process.starts == 3  # killed once in each direction
    files = await feed_files(serve_process.url)
    assert [f["name"] for f in files] == ["dump.bin"]
    assert await cloud_bytes(serve_process.url, files[0]["url"]) == payload
    for direction in ("up", "down"):
        resumed = log.starts[direction]  # never went back, and resumed past the kill
        assert resumed == sorted(resumed) and max(resumed) >= 6 * MB, (direction, resumed)
    assert not any("Traceback" in serve_process.log(n) for n in (1, 2, 3))


async def _kills(proxy: FaultProxy, serve: ServeProcess,
                 reached: dict[str, asyncio.Event]) -> None:
    await kill_when(proxy, serve, reached["up"], "hold_request")
    await kill_when(proxy, serve, reached["down"], "hold_response")

