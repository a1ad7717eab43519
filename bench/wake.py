"""Live delivery (issue 15): how soon an online device hears of the cloud, and what holding
the live channels of many devices costs the server.

i. Latency: ``--devices`` real ``crdtsync.Device`` objects (``live=True``, the default, with
   ``interval=60``) in this process, the server (``crdtsync serve``, SQLite) in its own. Each
   of ``--deliveries`` deliveries, one at a time, to a random device, rotating over three
   kinds: a cloud state write (``PATCH .../state/state``; observed by ``on_change``), a
   message (``@dev.on``) and a command (``@dev.command``). Latency runs from just before the
   admin call to the device's handler. The floor, in the same run and on the same devices
   with the channel off (``live=False``): the admin call, then an explicit ``dev.sync()``
   started the moment the call returned: what a device that knew at once could do at best
   without a channel. Without either, a device hears at its next interval sync (60 s by
   default; ``interval / 2`` on average).
ii. Channels held: ``--channels`` devices each hold one ``GET /v1/wake`` (a client holding a
   raw long poll per device, as a third-party client would, in a separate process). Server
   RSS is read before any connection (server up, devices provisioned) and while all are
   held: the difference per channel (its TCP connection and request included). Server CPU
   (user + system from ``/proc``) with no channel, over a quiet span while all are held,
   and over whole hold periods (``--wake-hold``, the renewals included). Then one write of
   the project's env wakes every device: the time until every channel was answered, and the
   largest ``in`` (the spread of their syncs at ``--wake-rate``).
iii. Reconnect storm: with every channel held, the server is killed (``SIGKILL``) and started
   again on the same port and database. Clients reconnect as the reference client does
   (backoff from 1 s doubling, full jitter). Measured: time from the new server's readiness
   until every channel is held again, the server's peak RSS (sampled every 50 ms) and its CPU
   during that time, and how many refusals (``429``) and failed connects the clients saw.

    python bench/wake.py [--devices 20] [--deliveries 240] [--channels 10000]
                         [--wake-hold 20] [--write docs/benchmarks.md] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import (
    ADMIN_TOKEN,
    Child,
    arg_parser,
    machine,
    median,
    percentile,
    provision,
    report,
    rss,
    start_server,
)

from crdtsync import AdminClient, Device
from crdtsync.protocol import WAKE_PATH

KINDS = ("state", "message", "command")
HOLDER = Path(__file__).resolve()


# --- i. latency ---------------------------------------------------------------------------


class Probe:
    """Devices whose handlers stamp the moment a delivery arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}

    def expect(self, tag: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[tag] = future
        return future

    def hit(self, tag: Any) -> None:
        if isinstance(tag, str) and tag in self.waiters and not self.waiters[tag].done():
            self.waiters[tag].set_result(time.perf_counter())

    def attach(self, dev: Device) -> None:
        dev.on_change(lambda name, key, old, new: self.hit(new) if key == "tag" else None)

        @dev.on("probe")
        async def on_probe(message: Any) -> None:
            self.hit(message.body.get("tag"))

        @dev.command("probe")
        async def on_command(params: Any) -> Any:
            self.hit(params.get("tag"))
            return True


async def deliver(admin: AdminClient, device_id: str, kind: str, tag: str) -> None:
    if kind == "state":
        await admin.patch_state(device_id, {"tag": tag})
    elif kind == "message":
        await admin.request("POST", f"/v1/devices/{device_id}/messages",
                            json={"topic": "probe", "body": {"tag": tag}})
    else:
        await admin.request("POST", f"/v1/devices/{device_id}/commands",
                            json={"method": "probe", "params": {"tag": tag}})


async def measure_latency(url: str, folder: Path, tokens: dict[str, str], deliveries: int,
                          live: bool, rng: random.Random) -> dict[str, list[float]]:
    """Seconds from the admin call to the handler, by kind; ``live=False`` syncs by hand
    right after each call (the floor)."""
    probe = Probe()
    devices: dict[str, Device] = {}
    for device_id, token in tokens.items():
        dev = Device(device_id, url, token=token, path=folder / f"{device_id}-{live}.db",
                     interval=60.0 if live else None, live=live)
        probe.attach(dev)
        await dev.start()
        devices[device_id] = dev
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for dev in devices.values():
            await dev.sync()
        if live:
            await _until_live(devices.values())
        async with AdminClient(url, ADMIN_TOKEN) as admin:
            for n in range(deliveries):
                kind, device_id = KINDS[n % len(KINDS)], rng.choice(list(devices))
                tag = f"{kind}-{live}-{n}"
                arrived = probe.expect(tag)
                await asyncio.sleep(rng.uniform(0.05, 0.15))  # deliveries do not queue up
                start = time.perf_counter()
                await deliver(admin, device_id, kind, tag)
                if not live:
                    await devices[device_id].sync()
                results[kind].append(await asyncio.wait_for(arrived, 30) - start)
    finally:
        for dev in devices.values():
            await dev.aclose()
    return results


async def until(check: Callable[[], bool], every: float = 0.05, patience: float = 600.0
                ) -> None:
    """Return once ``check()`` holds (tested every ``every`` s); TimeoutError after
    ``patience`` s."""
    async with asyncio.timeout(patience):
        for _ in itertools.count():
            if check():
                return
            await asyncio.sleep(every)


async def _until_live(devices: Any) -> None:
    """Every device's channel is open (it has a cursor and waits)."""
    await until(lambda: all(dev.wake_cursor is not None for dev in devices), 0.01, 30)


def latency_rows(measured: dict[str, list[float]]) -> list[str]:
    rows = []
    every: list[float] = []
    for kind in KINDS:
        ms = [s * 1000 for s in measured[kind]]
        every += ms
        rows.append(f"| {kind} | {len(ms)} | {median(ms):.1f} | {percentile(ms, 0.99):.1f} |"
                    f" {max(ms):.1f} |")
    rows.append(f"| all | {len(every)} | {median(every):.1f} | {percentile(every, 0.99):.1f} |"
                f" {max(every):.1f} |")
    return rows


# --- ii/iii. many channels: the holder process --------------------------------------------


async def hold_channels(url: str, tokens: list[str], control: asyncio.StreamReader) -> None:
    """Hold one wake request per token until told to stop; reconnect as the reference
    client does. Prints one JSON line per command read on stdin: ``held`` (wait until every
    channel is held, print the count), ``stop`` (print the counters and exit)."""
    state = {"held": 0, "refused": 0, "failed": 0, "answered": 0, "woken": 0, "max_in": 0}
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

    async def channel(token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        after: int | None = None
        failures = 0
        while True:
            params = {"wait": "3600"} if after is None else {"after": str(after), "wait": "3600"}
            held = after is not None
            if held:
                state["held"] += 1
            try:
                async with session.get(url + WAKE_PATH, params=params,
                                       headers=headers) as resp:
                    body = await resp.read()
                    status = resp.status
                    retry = resp.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError, OSError):
                status, body, retry = 0, b"", None
            finally:
                if held:
                    state["held"] -= 1
            if status == 200:
                failures = 0
                state["answered"] += 1
                answer = json.loads(body)
                if answer["wake"] and after is not None:
                    state["woken"] += 1
                    state["max_in"] = max(state["max_in"], answer["in"])
                after = int(answer["w"])
                continue
            failures += 1
            if status == 429:
                state["refused"] += 1
                delay = float(retry or 5) * random.uniform(1.0, 1.2)
            else:
                state["failed"] += 1
                delay = random.uniform(0, min(60.0, 2.0 ** (failures - 1)))
            await asyncio.sleep(delay)

    tasks = [asyncio.create_task(channel(t)) for t in tokens]
    try:
        while line := (await control.readline()).decode().strip():
            if line == "held":
                await until(lambda: state["held"] >= len(tokens))
            elif line == "woken":
                await until(lambda: state["woken"] >= len(tokens), 0.01)
            print(json.dumps(state), flush=True)
            if line == "stop":
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


async def holder_main(url: str, tokens_file: str) -> None:
    tokens = json.loads(await asyncio.to_thread(Path(tokens_file).read_text))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await hold_channels(url, tokens, reader)


class Holder:
    """The holder process, driven line by line."""

    def __init__(self, url: str, tokens_file: Path, folder: Path) -> None:
        self.child = Child("wake holder", [sys.executable, str(HOLDER), "--hold", url,
                                           str(tokens_file)], folder / "holder.log")

    async def start(self) -> None:
        self.child.launch(stdin=True)

    async def ask(self, command: str, patience: float = 600.0) -> dict[str, int]:
        seen = len(self.child.output().splitlines())
        self.child.stdin.write(command.encode() + b"\n")
        self.child.stdin.flush()
        await until(lambda: len(self.child.output().splitlines()) > seen, 0.05, patience)
        answer: dict[str, int] = json.loads(self.child.output().splitlines()[seen])
        return answer


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def peak_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):  # the process may be gone for a moment
            peak = max(peak, rss(pid))
        await asyncio.sleep(0.05)
    return peak


async def measure_channels(folder: Path, channels: int, hold: float, quiet: float
                           ) -> dict[str, float]:
    flags = ["--wake-hold", f"{hold:g}", "--cache-docs", str(max(channels, 100))]
    server = await start_server(folder, *flags)
    out: dict[str, float] = {}
    try:
        ids = [f"w{i:05d}" for i in range(channels)]
        tokens = await provision(server.url, ids, parallel=32)
        tokens_file = folder / "tokens.json"
        tokens_file.write_text(json.dumps(list(tokens.values())))
        port = server.url.rsplit(":", 1)[1]
        await asyncio.sleep(1.0)
        before = rss(server.pid)
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        await asyncio.sleep(quiet)
        out["idle_cpu_pct"] = 100 * (cpu_seconds(server.pid) - cpu0) / (
            time.perf_counter() - t0)
        holder = Holder(server.url, tokens_file, folder)
        await holder.start()
        await holder.ask("held")
        await asyncio.sleep(1.0)
        held_rss = rss(server.pid)
        out["rss_before_mb"] = before / 2**20
        out["rss_held_mb"] = held_rss / 2**20
        out["per_channel_kb"] = (held_rss - before) / channels / 1024
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        await asyncio.sleep(quiet)
        out["quiet_cpu_pct"] = 100 * (cpu_seconds(server.pid) - cpu0) / (
            time.perf_counter() - t0)
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        await asyncio.sleep(2 * hold)
        span = time.perf_counter() - t0
        used = cpu_seconds(server.pid) - cpu0
        out["cycle_cpu_pct"] = 100 * used / span
        out["renewal_us"] = 1e6 * used / (channels * span / hold)
        # everyone woken at once: a project-wide env write
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        async with AdminClient(server.url, ADMIN_TOKEN) as admin:
            await admin.request("PATCH", "/v1/env", json={"bench": "wake"})
        counters = await holder.ask("woken")
        out["everyone_s"] = time.perf_counter() - t0
        out["everyone_cpu_s"] = cpu_seconds(server.pid) - cpu0
        out["everyone_max_in_s"] = counters["max_in"] / 1000
        await holder.ask("held")
        # iii. the storm
        os.kill(server.pid, signal.SIGKILL)
        proc = server.proc
        assert proc is not None
        await until(lambda: proc.poll() is not None, 0.01, 30)
        await server.stop()
        server = await start_server(folder, *flags, "--port", port)
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(server.pid)
        stop = asyncio.Event()
        sampler = asyncio.create_task(peak_rss(server.pid, stop))
        counters = await holder.ask("held")
        out["storm_s"] = time.perf_counter() - t0
        out["storm_cpu_s"] = cpu_seconds(server.pid) - cpu0
        stop.set()
        out["storm_peak_rss_mb"] = await sampler / 2**20
        out["storm_refused"] = counters["refused"]
        out["storm_failed"] = counters["failed"]
        await holder.ask("stop")
    finally:
        await server.stop()
    return out


# --- the report -----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> str:
    rng = random.Random(7)
    lines = [f"Measured on {machine(temp_dir=True)}.", ""]
    with tempfile.TemporaryDirectory(prefix="crdtsync-wake-") as tmp:
        folder = Path(tmp)
        if args.deliveries:
            (folder / "lat").mkdir()
            server = await start_server(folder / "lat", "--wake-hold", f"{args.wake_hold:g}")
            try:
                ids = [f"d{i:03d}" for i in range(args.devices)]
                tokens = await provision(server.url, ids)
                live = await measure_latency(server.url, folder, tokens, args.deliveries,
                                             True, rng)
                floor = await measure_latency(server.url, folder, tokens,
                                              max(30, args.deliveries // 4), False, rng)
            finally:
                await server.stop()
            lines += [
                f"i. Latency from the admin call to the device's handler, {args.devices}"
                " online devices, one delivery at a time (ms):", "",
                "| live channel | n | p50 | p99 | max |", "|---|---:|---:|---:|---:|",
                *latency_rows(live), "",
                "Floor, same devices with the channel off: the admin call, then `dev.sync()`"
                " at once (ms):", "",
                "| sync right after | n | p50 | p99 | max |", "|---|---:|---:|---:|---:|",
                *latency_rows(floor), "",
                "Without the channel a device hears at its next interval sync: 60 s by"
                " default, 30 s on average.", ""]
        if args.channels:
            (folder / "many").mkdir()
            figures = await measure_channels(folder / "many", args.channels, args.wake_hold,
                                             args.quiet)
            f = figures
            lines += [
                f"ii. {args.channels:,} devices hold the live channel"
                f" (`--wake-hold {args.wake_hold:g}`):", "",
                "| | |", "|---|---:|",
                f"| server RSS with no connection / while all are held |"
                f" {f['rss_before_mb']:.0f} MB / {f['rss_held_mb']:.0f} MB |",
                f"| memory per held channel | {f['per_channel_kb']:.1f} KB |",
                f"| server CPU with no channel ({args.quiet:g} s, the server's own timers) |"
                f" {f['idle_cpu_pct']:.2f} % of one core |",
                f"| server CPU while all are held, quiet span ({args.quiet:g} s, no"
                f" renewal) | {f['quiet_cpu_pct']:.2f} % of one core |",
                f"| server CPU over two hold periods (renewals included) |"
                f" {f['cycle_cpu_pct']:.2f} % of one core |",
                f"| server CPU per renewal (one answer + next request) |"
                f" {f['renewal_us']:.0f} µs |",
                f"| a project-wide write wakes all: every channel answered after |"
                f" {f['everyone_s']:.2f} s (server CPU {f['everyone_cpu_s']:.2f} s) |",
                f"| ... their syncs spread over (`--wake-rate 500`, largest `in`) |"
                f" {f['everyone_max_in_s']:.1f} s |", "",
                f"iii. Reconnect storm: the server is killed and restarted; all"
                f" {args.channels:,} reconnect:", "",
                "| | |", "|---|---:|",
                f"| time until every channel is held again | {f['storm_s']:.1f} s |",
                f"| server CPU during it | {f['storm_cpu_s']:.1f} s |",
                f"| server peak RSS | {f['storm_peak_rss_mb']:.0f} MB |",
                f"| refused (429) / failed connects seen by clients |"
                f" {f['storm_refused']:,.0f} / {f['storm_failed']:,.0f} |"]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        asyncio.run(holder_main(sys.argv[2], sys.argv[3]))
        return 0
    parser = arg_parser(__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--deliveries", type=int, default=240)
    parser.add_argument("--channels", type=int, default=10_000)
    parser.add_argument("--wake-hold", type=float, default=20.0)
    parser.add_argument("--quiet", type=float, default=8.0,
                        help="seconds of the quiet span (shorter than the hold)")
    parser.add_argument("--write", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="5 devices, 30 deliveries, 200 channels, 4 s holds (CI)")
    args = parser.parse_args()
    if args.quick:
        args.devices = 5
        args.deliveries = min(args.deliveries, 30)
        args.channels = min(args.channels, 200)
        args.wake_hold, args.quiet = 4.0, 1.5
    report(asyncio.run(run(args)), args.write, "wake")
    return 0


if __name__ == "__main__":
    sys.exit(main())
