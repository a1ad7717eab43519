"""The ``crdtsync`` command: run a server or the demo, and manage devices, state and events.

    crdtsync serve  [--db PATH] [--host H] [--port N] [--admin-token T] [--max-body B]
    crdtsync demo   [--devices N] [--duration S] [--db PATH] [--port N] [--data-dir DIR]
    crdtsync device add ID [--meta JSON] | crdtsync device list | crdtsync device show ID
    crdtsync state ID [--map NAME] | crdtsync state set ID KEY=VALUE... [--map NAME]
    crdtsync events [--device ID] [--topic T] [--after CURSOR] [--limit N] [--follow]

Management commands take ``--url`` (or ``CRDTSYNC_URL``) and ``--admin-token`` (or
``CRDTSYNC_ADMIN_TOKEN``). Exit status: 0 success; 1 an error from the server or the network,
printed as ``error: <code>: <message>``; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

# mypy does not resolve the editable install of crdtsync_server (its source is `server/`).
from crdtsync_server import Server, ServerConfig

from . import __version__
from .admin import AdminClient
from .device import Device
from .errors import CrdtsyncError
from .transport import HttpTransport, Transport

DEFAULT_URL = "http://127.0.0.1:8787"
PAGE = 1000
"""The largest page the management API serves."""

Command = Callable[[argparse.Namespace], Awaitable[int]]
AdminCommand = Callable[[AdminClient, argparse.Namespace], Awaitable[int]]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """A command line that parses but cannot be carried out (exit status 2)."""


# --- output and signals -------------------------------------------------------------------


def out(text: str) -> None:
    """Print a line on stdout, flushed at once (a pipe reader sees every line as it comes)."""
    print(text, flush=True)


def err(text: str) -> None:
    """Print a line on stderr (information that must not mix with a command's output)."""
    print(text, file=sys.stderr, flush=True)


def pretty(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def stop_event() -> asyncio.Event:
    """An event the first SIGINT or SIGTERM sets, so the caller can shut down cleanly.

    The handlers remove themselves when they fire: a second Ctrl-C interrupts at once.
    Where the loop cannot handle signals (Windows), Ctrl-C raises ``KeyboardInterrupt``
    instead and :func:`main` exits with status 130.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def fire() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stop.set()

    with contextlib.suppress(NotImplementedError):
        for sig in signals:
            loop.add_signal_handler(sig, fire)
    return stop


async def wait_or_stop(stop: asyncio.Event, seconds: float | None) -> bool:
    """Wait ``seconds`` (``None``: forever); return True as soon as ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


# --- serve --------------------------------------------------------------------------------


def announce_admin_token(token: str) -> None:
    """Print a newly created admin token, the only time it can be seen."""
    rule = "=" * 72
    out(f"{rule}\nadmin token (shown once, store it): {token}\n"
        f"  export CRDTSYNC_ADMIN_TOKEN={token}\n{rule}")


async def cmd_serve(args: argparse.Namespace) -> int:
    """Run the sync server until SIGINT or SIGTERM, then shut it down cleanly."""
    created: list[str] = []

    def on_admin_token(token: str) -> None:
        created.append(token)
        announce_admin_token(token)

    config = ServerConfig(db=args.db, host=args.host, port=args.port,
                          admin_token=args.admin_token or None, on_admin_token=on_admin_token)
    if args.max_body is not None:
        config.max_body = args.max_body
    stop = stop_event()
    async with Server(config) as server:
        if args.admin_token:
            err("admin token: the one given by --admin-token / CRDTSYNC_ADMIN_TOKEN")
        elif not created:
            err("admin token: the one created at first start (the database keeps its hash)")
        out(f"crdtsync server listening on {server.url} (database: {args.db})")
        await stop.wait()
        err("shutting down")
    err("stopped")
    return 0


# --- management commands ------------------------------------------------------------------


def admin_command(command: AdminCommand) -> Command:
    """Run ``command`` with an :class:`AdminClient` built from ``--url`` and ``--admin-token``."""

    @functools.wraps(command)
    async def run(args: argparse.Namespace) -> int:
        if not args.admin_token:
            raise UsageError("no admin token: pass --admin-token or set CRDTSYNC_ADMIN_TOKEN "
                             "(`crdtsync serve` prints one at its first start)")
        async with AdminClient(args.url, args.admin_token) as admin:
            return await command(admin, args)

    return run


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE is read as JSON, else taken as a string; ``null`` deletes KEY."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"expected KEY=VALUE, got {text!r}")

    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN and Infinity stay strings: no CRDT holds them

    try:
        return key, json.loads(raw, parse_constant=no_constants)
    except ValueError:
        return key, raw


def format_time(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds")


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


async def cmd_device_add(admin: AdminClient, args: argparse.Namespace) -> int:
    """Provision a device. Only its token goes to stdout: ``TOKEN=$(crdtsync device add x)``."""
    device = await admin.add_device(args.id, args.meta)
    err(f"provisioned device {device['id']}; its token (shown once) follows on stdout")
    out(device["token"])
    return 0


async def cmd_device_list(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print every device as a table, in id order."""
    rows = [("ID", "LAST SEQ", "LOST", "LAST SYNC", "CREATED")]
    after = ""
    while True:
        page = await admin.list_devices(after, PAGE)
        rows += [(d["id"], str(d["last_seq"]), str(d["events_lost"]),
                  format_time(d["last_sync"]), format_time(d["created"]))
                 for d in page["devices"]]
        if not page["next"]:
            break
        after = page["next"]
    out(format_table(rows))
    return 0


async def cmd_device_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print one device's record as JSON."""
    out(pretty(await admin.device(args.id)))
    return 0


async def cmd_state(admin: AdminClient, args: argparse.Namespace) -> int:
    """``state ID``: print the document (or one map). ``state set ID K=V...``: patch a map."""
    words: list[str] = args.words
    if len(words) == 1:
        state = await admin.state(words[0])
        out(pretty(state if args.map is None else state.get(args.map, {})))
        return 0
    if words[0] != "set" or len(words) < 3:
        raise UsageError("use `crdtsync state ID` or `crdtsync state set ID KEY=VALUE...`")
    changes = dict(parse_assignment(word) for word in words[2:])
    out(pretty(await admin.patch_state(words[1], changes, args.map or "state")))
    return 0


async def cmd_events(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print events as NDJSON, oldest first; with ``--follow``, poll for more until Ctrl-C."""
    stop = stop_event() if args.follow else None
    after, left = args.after, args.limit
    while left is None or left > 0:
        page = await admin.events(after=after, limit=min(PAGE, left or PAGE),
                                  device=args.device, topic=args.topic)
        for event in page["events"]:
            out(compact(event))
        after = page["next"]
        if left is not None:
            left -= len(page["events"])
        if page["events"]:
            continue
        if stop is None or await wait_or_stop(stop, args.poll):
            break
    return 0


# --- demo ---------------------------------------------------------------------------------


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
    db, data_dir = Path(args.db), Path(args.data_dir)
    reset_demo_files(db, data_dir)
    token = secrets.token_urlsafe(24)
    stop = stop_event()
    config = ServerConfig(db=str(db), host="127.0.0.1", port=args.port, admin_token=token)
    async with Server(config) as server, AdminClient(server.url, token) as admin:
        out(f"demo: server on {server.url} (fresh database {db}, device stores in {data_dir}/)\n"
            f"      watch from another shell: CRDTSYNC_URL={server.url} "
            f"CRDTSYNC_ADMIN_TOKEN={token} crdtsync events --follow")
        demo = Demo(admin, server.url, data_dir)
        async with contextlib.AsyncExitStack() as stack:
            await demo.start_devices(args.devices, stack)
            out(f"demo: {args.devices} devices syncing every 2 s, one reading per second each; "
                + (f"running {args.duration:g} s" if args.duration else "Ctrl-C to stop"))
            await demo.run(stop, args.duration)
            ok = await demo.finish()
    return 0 if ok else 1


# --- command line -------------------------------------------------------------------------


def number(kind: Callable[[str], float], minimum: float) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` that is at least ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}")
        return value

    return parse


def client_options() -> argparse.ArgumentParser:
    """The options every management command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", default=os.environ.get("CRDTSYNC_URL", DEFAULT_URL),
                        help="server URL (env CRDTSYNC_URL; default %(default)s)")
    parent.add_argument("--admin-token", default=os.environ.get("CRDTSYNC_ADMIN_TOKEN"),
                        help="admin token (env CRDTSYNC_ADMIN_TOKEN, which keeps it out of `ps`)")
    return parent


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="run the sync server", description=cmd_serve.__doc__)
    p.add_argument("--db", default="./crdtsync.db",
                   help="SQLite file, sqlite:///PATH or memory: (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    p.add_argument("--port", type=int, default=8787,
                   help="0 picks a free port (default %(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("CRDTSYNC_ADMIN_TOKEN"),
                   help="admin token (env CRDTSYNC_ADMIN_TOKEN); without one, the server uses "
                        "the token created and printed at its first start")
    p.add_argument("--max-body", type=number(int, 1), metavar="BYTES",
                   help="largest request body accepted")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_serve)


def add_demo(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="run a server and simulated devices in one process",
                       description=cmd_demo.__doc__)
    p.add_argument("--devices", type=number(int, 1), default=5, help="default %(default)s")
    p.add_argument("--duration", type=number(float, 0), default=20.0,
                   help="seconds; 0 runs until Ctrl-C (default %(default)g)")
    p.add_argument("--db", default="./crdtsync-demo.db",
                   help="server database, deleted and recreated at start (default %(default)s)")
    p.add_argument("--port", type=int, default=8787,
                   help="0 picks a free port (default %(default)s)")
    p.add_argument("--data-dir", default="./crdtsync-demo",
                   help="device stores, recreated at start (default %(default)s)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_demo)


def add_device(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("device", help="provision and inspect devices")
    device = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = device.add_parser("add", parents=[client], help="provision a device, print its token",
                            description=cmd_device_add.__doc__)
    add.add_argument("id")
    add.add_argument("--meta", type=json_object, default={}, help="JSON object kept with it")
    add.set_defaults(run=admin_command(cmd_device_add))
    listing = device.add_parser("list", parents=[client], help="list devices")
    listing.set_defaults(run=admin_command(cmd_device_list))
    show = device.add_parser("show", parents=[client], help="show one device as JSON")
    show.add_argument("id")
    show.set_defaults(run=admin_command(cmd_device_show))


def add_state(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "state", parents=[client], help="show a device's state, or set keys of it",
        usage="crdtsync state ID [--map NAME]\n"
              "       crdtsync state set ID KEY=VALUE... [--map NAME]",
        description="Show a device's document, or merge KEY=VALUE pairs into one of its maps. "
                    "VALUE is read as JSON, else taken as a string; KEY=null deletes KEY.")
    p.add_argument("words", nargs="+", metavar="ID | set ID KEY=VALUE")
    p.add_argument("--map", help="map to show, or to set keys in (default: state)")
    p.set_defaults(run=admin_command(cmd_state))


def add_events(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("events", parents=[client], help="print events as NDJSON",
                       description=cmd_events.__doc__)
    p.add_argument("--device", help="only this device's events")
    p.add_argument("--topic", help="only events of this topic")
    p.add_argument("--after", default="0", metavar="CURSOR",
                   help="start after this cursor (each event carries its own)")
    p.add_argument("--limit", type=number(int, 1), help="print at most this many events")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling for new events")
    p.add_argument("--poll", type=number(float, 0.05), default=1.0,
                   help="seconds between polls with --follow (default %(default)g)")
    p.set_defaults(run=admin_command(cmd_events))


def build_parser() -> argparse.ArgumentParser:
    """The ``crdtsync`` argument parser; each command stores its coroutine as ``run``."""
    parser = argparse.ArgumentParser(
        prog="crdtsync", description="Offline-first sync of device state and events.")
    parser.add_argument("--version", action="version", version=f"crdtsync {__version__}")
    parser.set_defaults(log_level="warning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = client_options()
    add_serve(sub)
    add_demo(sub)
    add_device(sub, client)
    add_state(sub, client)
    add_events(sub, client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crdtsync`` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(args.run(args))  # type: ignore[no-any-return]
    except UsageError as exc:
        err(f"error: {exc}")
        return 2
    except CrdtsyncError as exc:
        err(f"error: {exc.code}: {exc.message}")
        return 1
    except BrokenPipeError:
        # The reader went away (`crdtsync events | head`): silence the final flush too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the port is taken, the database cannot be opened, ...
        err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
