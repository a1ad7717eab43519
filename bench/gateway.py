"""A gateway's devices synced in batches against the same devices syncing one by one.

One `crdtsync serve` process (SQLite in a temp folder, default durability) and, per round, a
client process per side, interleaved (gateway, devices, gateway, devices, ...):

- **gateway**: one `crdtsync.Gateway` hosting N devices (one SQLite file each), synced with
  `await gw.sync()`: `POST /v1/sync/batch`, as few requests as the server's limits allow;
- **devices**: the same N devices as N `crdtsync.Device`s sharing one `aiohttp` session
  (100 connections), each syncing with `POST /v1/sync`, all at once.

Each side has its own N provisioned devices. A client process opens its devices (their
files kept from round to round), syncs once untimed (nothing to send), then makes the round's
changes (per device: 1 state change and 5 events) and syncs them, timed. Measured during the
timed sync: the HTTP requests, the bytes on the wire both ways (every TCP byte, headers
included, counted by a forwarding proxy inside the client process), the server process's CPU
(user + system, every thread, from `/proc/<pid>/stat`) divided by N, the wall time, and the
client process's peak RSS. A round 0 (the first contact: whole documents) is left out.
At the end every device's stored `last_seq` is checked against the events it emitted.

    python bench/gateway.py [--devices 500] [--rounds 5] [--quick] [--write FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import (
    check_last_seq,
    machine,
    median,
    provision,
    report,
    spread,
    start_server,
)

from crdtsync import Device, Gateway

NAME = "gateway"
SCRIPT = Path(__file__).resolve()
EVENTS = 5
CONNECTIONS = 100
"""The shared session's connections on the devices side (aiohttp's default)."""
LIBS = ("aiohttp", "pycrdt", "msgpack", "zstandard")


# --- the client process --------------------------------------------------------------------


class CountingProxy:
    """A TCP forwarder to ``127.0.0.1:port`` counting every byte each way."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.up = 0
        self.down = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(self._pump(reader, up_writer, "up"),
                                 self._pump(up_reader, writer, "down"))
        except asyncio.CancelledError:
            writer.close()  # closing at the end of the run: nothing left to forward
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    way: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                setattr(self, way, getattr(self, way) + len(data))
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True)
class Reading:
    """The server's CPU seconds, the bytes counted each way and the time, at one moment."""

    cpu: float
    up: int
    down: int
    at: float

    def since(self, start: Reading) -> dict[str, float]:
        return {"cpu": self.cpu - start.cpu, "up": self.up - start.up,
                "down": self.down - start.down, "wall": self.at - start.at}


def server_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def change(devices: Sequence[Device], step: int) -> None:
    """The round's changes: 1 state change and :data:`EVENTS` events per device."""
    for dev in devices:
        dev.state["reading"] = step
        await dev.emit_many([("reading", {"step": step, "n": n, "temp": 21.5 + n})
                             for n in range(EVENTS)])


async def gateway_side(url: str, tokens: dict[str, str], folder: Path, step: int,
                       reading: Callable[[], Reading]) -> dict[str, Any]:
    async with Gateway(url, path=folder, interval=None, durability="NORMAL") as gw:
        devices = [await gw.add(i, t) for i, t in tokens.items()]
        await gw.sync(force=True)  # untimed: nothing to send
        await change(devices, step)
        requests, start = gw.stats.requests, reading()
        outcomes = await gw.sync()
        result: dict[str, Any] = reading().since(start)
        result["requests"] = gw.stats.requests - requests
        result["errors"] = sum(isinstance(o, Exception) for o in outcomes.values())
        result["left"] = sum(d.pending_events for d in devices)
    return result


async def devices_side(url: str, tokens: dict[str, str], folder: Path, step: int,
                       reading: Callable[[], Reading]) -> dict[str, Any]:
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session, \
            contextlib.AsyncExitStack() as stack:
        devices = [await stack.enter_async_context(
            Device(i, url, token=t, session=session, path=folder / f"{i}.db", interval=None,
                   live=False, durability="NORMAL")) for i, t in tokens.items()]
        await asyncio.gather(*(d.sync() for d in devices))  # untimed: nothing to send
        await change(devices, step)
        start = reading()
        results = await asyncio.gather(*(d.sync() for d in devices), return_exceptions=True)
        result: dict[str, Any] = reading().since(start)
        result["requests"] = sum(r.rounds for r in results if not isinstance(r, BaseException))
        result["errors"] = sum(isinstance(r, BaseException) for r in results)
        result["left"] = sum(d.pending_events for d in devices)
    return result


async def client(args: argparse.Namespace) -> dict[str, Any]:
    """One side's round in this process: the figures as one JSON line."""
    tokens = json.loads(Path(args.tokens).read_bytes())  # noqa: ASYNC240 (before any I/O)
    proxy = CountingProxy(args.port)
    url = await proxy.start()
    side = gateway_side if args.side == "gateway" else devices_side

    def reading() -> Reading:
        return Reading(server_cpu(args.server_pid), proxy.up, proxy.down, time.perf_counter())

    try:
        result = await side(url, tokens, Path(args.folder), args.step, reading)
    finally:
        await proxy.aclose()
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# --- the benchmark -------------------------------------------------------------------------


SIDES = ("gateway", "devices")


async def run_client(side: str, server_port: int, server_pid: int, tokens_file: Path,
                     folder: Path, step: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--side", side, "--port", str(server_port),
        "--server-pid", str(server_pid), "--tokens", str(tokens_file), "--folder",
        str(folder), "--step", str(step), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} client failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def benchmark(devices: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = await start_server(tmp)
        try:
            files = {}
            for side in SIDES:
                ids = [f"{side[:2]}-{n:04d}" for n in range(devices)]
                tokens = await provision(server.url, ids)
                files[side] = tmp / f"{side}.json"
                files[side].write_text(json.dumps(tokens))
                (tmp / side).mkdir()
            for step in range(rounds + 1):
                for side in SIDES:
                    r = await run_client(side, server.port, server.pid, files[side],
                                         tmp / side, step)
                    if r["errors"] or r["left"]:
                        raise RuntimeError(f"{side} round {step}: {r}")
                    if step:
                        results[side].append(r)
                    print(f"round {step}/{rounds} {side:>8}: {r['requests']:4d} requests, "
                          f"{(r['up'] + r['down']) / devices:6.0f} B/device, server CPU "
                          f"{r['cpu'] * 1000 / devices:6.3f} ms/device, wall "
                          f"{r['wall']:6.3f} s, client RSS {r['rss'] / 2**20:5.0f} MB"
                          + (" (first contact, not counted)" if not step else ""),
                          flush=True)
            for side in SIDES:
                tokens = json.loads(files[side].read_text())
                await check_last_seq(server.url, {i: (rounds + 1) * EVENTS
                                                  for i in list(tokens)[::max(1, devices // 20)]})
        finally:
            await server.stop()
    return results


def render(devices: int, rounds: int, quick: bool, res: dict[str, list[dict[str, Any]]]
           ) -> str:
    g, d = res["gateway"], res["devices"]

    def per_device(r: dict[str, Any], key: str) -> float:
        return float(r[key]) / devices

    def row(name: str, fn: Any, fmt: str, ratio: bool = True) -> str:
        a, b = [fn(r) for r in g], [fn(r) for r in d]
        text = f"| {name} | {spread(a, fmt)} | {spread(b, fmt)} |"
        if ratio:
            pairs = [y / x for x, y in zip(a, b, strict=True) if x]
            text += (f" **{median(b) / median(a):.1f}x** ({min(pairs):.1f}-{max(pairs):.1f}) |"
                     if pairs else " |")
        else:
            text += " |"
        return text

    cpu = median([per_device(r, "cpu") for r in d]) / median([per_device(r, "cpu") for r in g])
    wire = (median([per_device(r, "up") + per_device(r, "down") for r in d])
            / median([per_device(r, "up") + per_device(r, "down") for r in g]))
    lines = [
        f"Machine: {machine(LIBS, model=True, temp_dir=True)}.",
        "",
        f"Load: {devices} devices per side, each with 1 state change + {EVENTS} events per "
        f"round; {rounds} rounds per side, interleaved, each in a fresh client process"
        + (" (quick mode: not representative)" if quick else "")
        + ". gateway = one `crdtsync.Gateway` (`gw.sync()`, `POST /v1/sync/batch`); devices "
        f"= {devices} `crdtsync.Device`s sharing one aiohttp session ({CONNECTIONS} "
        "connections), all syncing at once (`POST /v1/sync`). Bytes: every TCP byte both "
        "ways, HTTP headers included. Server CPU: user + system of the `crdtsync serve` "
        "process during the timed sync, per device.",
        "",
        "Medians over rounds, (min-max) across rounds; ratio = devices / gateway (of the "
        "medians; per-round ratios in brackets):",
        "",
        "| figure (per round) | gateway | devices | ratio |",
        "|---|---:|---:|---:|",
        row("HTTP requests", lambda r: r["requests"], "{:,.0f}"),
        row("bytes on the wire per device, up", lambda r: per_device(r, "up"), "{:,.0f}"),
        row("bytes on the wire per device, down", lambda r: per_device(r, "down"), "{:,.0f}"),
        row("bytes on the wire per device, total",
            lambda r: per_device(r, "up") + per_device(r, "down"), "{:,.0f}"),
        row("server CPU per device (ms)", lambda r: per_device(r, "cpu") * 1000, "{:.3f}"),
        row("wall time of the sync (s)", lambda r: r["wall"], "{:.3f}"),
        row("client process peak RSS (MB)", lambda r: r["rss"] / 2**20, "{:.0f}",
            ratio=False),
        "",
        f"Goal (issue 19): at least 5x less server CPU per device through the gateway: "
        f"{'met' if cpu >= 5 else 'not met'} ({cpu:.1f}x); at least 2x fewer bytes: "
        f"{'met' if wire >= 2 else 'not met'} ({wire:.1f}x).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="50 devices, 2 rounds (CI)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(asyncio.run(client(args))))
        return
    devices = 50 if args.quick else args.devices
    rounds = 2 if args.quick else args.rounds
    print(f"Machine: {machine(LIBS, model=True, temp_dir=True)}", flush=True)
    results = asyncio.run(benchmark(devices, rounds))
    report(render(devices, rounds, args.quick, results), args.write, NAME)


if __name__ == "__main__":
    main()
