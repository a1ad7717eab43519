"""``crdtsync demo``: a server on SQLite, simulated devices syncing, a cloud writing their
config, one live line per second, and a final exactly-once check."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._console import compact, out, stop_event, wait_or_stop
from .admin import AdminClient
from .device import Device
from .transport import HttpTransport, Transport


@dataclass(slots=True)
class DemoStats:
    """What the demo counts while it runs."""

    syncs: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    config_received: int = 0
    emitted: dict[str, int] = field(default_factory=dict)
    stored: dict[str, list[int]] = field(default_factory=dict)
    """Per device, the seqs of its events in the cloud, as the events API lists them."""


class CountingTransport:
    """A :class:`~crdtsync.transport.Transport` that counts sync requests and bytes."""

    def __init__(self, inner: Transport, stats: DemoStats) -> None:
        self.inner = inner
        self.stats = stats

    async def exchange(self, body: bytes) -> bytes:
        self.stats.syncs += 1
        self.stats.bytes_up += len(body)
        response = await self.inner.exchange(body)
        self.stats.bytes_down += len(response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


CONFIG_CHOICES: dict[str, list[Any]] = {
    "report_every_s": [1, 2, 5, 10], "led": ["green", "blue", "off"], "alarm_below_v": [3.4, 3.6]}


def cli_path() -> str:
    """How to run ``crdtsync`` from another shell: its name when it is on the PATH, else the
    script next to this interpreter (``.venv/bin/crdtsync`` of ``make demo``)."""
    if shutil.which("crdtsync"):
        return "crdtsync"
    beside = Path(sys.executable).with_name("crdtsync")
    return str(beside) if beside.exists() else "crdtsync"


def reset_demo_files(db: Path, data_dir: Path) -> None:
    """Delete the demo database and the demo device stores, so every demo starts fresh.

    Simpler and more robust than reusing tokens from an earlier run: a device store that
    outlived its server database would look to the new server like a device from the future.
    """
    doomed = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    if data_dir.is_dir():
        doomed += data_dir.glob("demo-*.db*")
    for path in doomed:
        path.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


class Demo:
    """Simulated devices, a cloud writing their config, a live line, and a final check."""

    def __init__(self, admin: AdminClient, url: str, data_dir: Path) -> None:
        self.admin = admin
        self.url = url
        self.data_dir = data_dir
        self.stats = DemoStats()
        self.devices: list[Device] = []
        self.done = asyncio.Event()
        self.cursor = "0"

    async def start_devices(self, count: int, stack: contextlib.AsyncExitStack) -> None:
        """Provision ``demo-1..count`` and start each with a background sync loop."""
        for i in range(1, count + 1):
            device_id = f"demo-{i}"
            added = await self.admin.add_device(device_id, {"kind": "simulated sensor"})
            transport = CountingTransport(HttpTransport(self.url, added["token"]), self.stats)
            device = Device(device_id, transport=transport, path=self.data_dir / f"{device_id}.db",
                            interval=2.0, min_spacing=0.5)
            device.on_change(functools.partial(self.on_change, device_id))
            self.devices.append(await stack.enter_async_context(device))
            self.stats.emitted[device_id] = 0
            self.stats.stored[device_id] = []

    def on_change(self, device_id: str, name: str, key: str, old: Any, new: Any) -> None:
        if name == "config":
            self.stats.config_received += 1
            was = "" if old is None else f" (was {compact(old)})"
            out(f"  {device_id} got config.{key} = {compact(new)}{was}")

    async def run(self, stop: asyncio.Event, duration: float) -> None:
        """Run devices and cloud until ``duration`` seconds passed (0: until ``stop``)."""
        tasks = [asyncio.create_task(self.simulate(device)) for device in self.devices]
        tasks.append(asyncio.create_task(self.cloud()))
        deadline = time.monotonic() + duration if duration > 0 else None
        try:
            await self.report_until(stop, deadline)
        finally:
            self.done.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def simulate(self, device: Device) -> None:
        """Every second: let the voltage drift, count, and emit a reading."""
        voltage, counter = random.uniform(3.6, 3.9), 0
        if await wait_or_stop(self.done, random.random()):  # spread devices over the second
            return
        while not self.done.is_set():
            voltage = round(min(4.2, max(3.0, voltage + random.gauss(0, 0.02))), 3)
            counter += 1
            # Emit first: the state write follows before the sync loop wakes, so one sync
            # carries both.
            await device.emit("readings", {"voltage": voltage, "n": counter})
            device.state.update({"voltage": voltage, "counter": counter})
            self.stats.emitted[device.id] += 1
            await wait_or_stop(self.done, 1.0)

    async def cloud(self) -> None:
        """Every few seconds, write one key of a random device's ``config`` map."""
        while not await wait_or_stop(self.done, random.uniform(2.0, 4.0)):
            device_id = random.choice(self.devices).id
            key = random.choice(list(CONFIG_CHOICES))
            value = random.choice(CONFIG_CHOICES[key])
            await self.admin.patch_state(device_id, {key: value}, "config")
            out(f"  cloud set {device_id} config.{key} = {compact(value)}")

    async def report_until(self, stop: asyncio.Event, deadline: float | None) -> None:
        started = time.monotonic()
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0 or await wait_or_stop(stop, wait):
                return
            await self.poll_cloud()
            out(self.live_line(time.monotonic() - started))

    async def poll_cloud(self) -> None:
        """Read the events the cloud stored since the last poll."""
        async for event in self.admin.iter_events(after=self.cursor):
            self.stats.stored[event["device"]].append(event["seq"])
            self.cursor = event["cursor"]

    def live_line(self, elapsed: float) -> str:
        s = self.stats
        emitted = sum(s.emitted.values())
        stored = sum(len(seqs) for seqs in s.stored.values())
        queued = sum(device.pending_events for device in self.devices)
        return (f"[{elapsed:5.1f}s] syncs {s.syncs:4d} | events emitted {emitted:4d}, "
                f"in cloud {stored:4d}, queued {queued:3d} | "
                f"up {kib(s.bytes_up)}, down {kib(s.bytes_down)}")

    async def finish(self) -> bool:
        """Sync every device a last time and check events and state; True when all is well."""
        out("demo: stopping; last sync of every device")
        for device in self.devices:
            await device.sync()
        await self.poll_cloud()
        exactly_once = self.check_events()
        converged = await self.check_state()
        s = self.stats
        emitted = sum(s.emitted.values())
        out(f"summary: {len(self.devices)} devices, {emitted} events emitted, "
            f"{sum(len(v) for v in s.stored.values())} stored in the cloud, "
            f"exactly once: {'yes' if exactly_once else 'NO'}\n"
            f"         {s.syncs} sync requests, {kib(s.bytes_up)} up, {kib(s.bytes_down)} down, "
            f"{s.config_received} config changes delivered, "
            f"state converged: {'yes' if converged else 'NO'}")
        return exactly_once and converged

    def check_events(self) -> bool:
        """Each device's events in the cloud are exactly seqs 1..emitted, each once."""
        results = []
        for device_id, count in self.stats.emitted.items():
            seqs = self.stats.stored[device_id]
            exact = sorted(seqs) == list(range(1, count + 1))
            results.append(exact)
            out(f"  {device_id}: emitted {count}, in cloud {len(seqs)} "
                f"({len(set(seqs))} distinct): {'exactly once' if exact else 'MISMATCH'}")
        return all(results)

    async def check_state(self) -> bool:
        """Every device holds the same document as the cloud."""
        results = []
        for device in self.devices:
            cloud = await self.admin.state(device.id)
            local = {name: device.map(name).to_dict() for name in cloud}
            results.append(local == cloud)
        return all(results)


async def cmd_demo(args: argparse.Namespace) -> int:
    """Server, simulated devices and a cloud writer in one process; checks exactly-once."""
    from crdtsync_server import Server, ServerConfig  # lazily: the library never needs it

    db, data_dir = Path(args.db), Path(args.data_dir)
    reset_demo_files(db, data_dir)
    token = secrets.token_urlsafe(24)
    stop = stop_event()
    config = ServerConfig(db=str(db), host="127.0.0.1", port=args.port, admin_token=token)
    async with Server(config) as server, AdminClient(server.url, token) as admin:
        out(f"demo: server on {server.url} (fresh database {db}, device stores in {data_dir}/)\n"
            f"      watch from another shell: CRDTSYNC_URL={server.url} "
            f"CRDTSYNC_ADMIN_TOKEN={token} {cli_path()} events --follow")
        demo = Demo(admin, server.url, data_dir)
        async with contextlib.AsyncExitStack() as stack:
            await demo.start_devices(args.devices, stack)
            out(f"demo: {args.devices} devices syncing every 2 s, one reading per second each; "
                + (f"running {args.duration:g} s" if args.duration else "Ctrl-C to stop"))
            await demo.run(stop, args.duration)
            ok = await demo.finish()
    return 0 if ok else 1
