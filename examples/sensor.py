"""A sensor device: replicated state, events, and what each sync did.

Against a running server (``crdtsync serve``, then ``TOKEN=$(crdtsync device add sensor-1)``)::

    python examples/sensor.py --url http://127.0.0.1:8787 --token "$TOKEN" --count 10

The token may also come from ``CRDTSYNC_TOKEN``. Stop the server meanwhile: readings keep
queueing in the local SQLite file and reach the cloud at the next successful sync.

Without ``--url`` (nor ``CRDTSYNC_URL``) it runs on its own, as CI does: it starts a server in
this process on a temporary SQLite file and a free port, provisions itself, takes a few
readings, checks through the management API that each arrived exactly once, and prints
``ok: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from crdtsync import AdminClient, CrdtsyncError, Device
from crdtsync_server import Server, ServerConfig


def print_change(name: str, key: str, old: Any, new: Any) -> None:
    print(f"  the cloud changed {name}.{key}: {old!r} -> {new!r}")


async def sync_and_report(device: Device) -> None:
    """Sync once and print the report; when offline, say so and carry on."""
    try:
        r = await device.sync()
    except CrdtsyncError as exc:
        if not exc.retryable:
            raise
        print(f"  offline ({exc.code}): {device.pending_events} event(s) wait in the outbox")
        return
    print(f"  synced: {r.rounds} round trip(s), {r.events_acked} event(s) acked, "
          f"{r.changes} change(s) from the cloud, {r.bytes_up} B up, {r.bytes_down} B down, "
          f"{r.duration * 1000:.0f} ms")


async def run_sensor(device: Device, count: int, period: float) -> None:
    """Take ``count`` readings: write state, emit an event, sync, print what happened."""
    device.on_change(print_change)
    for n in range(1, count + 1):
        temperature = round(21.0 + random.gauss(0, 0.3), 2)
        device.state.update({"temperature": temperature, "readings": n})
        seq = await device.emit("readings", {"temperature": temperature})
        print(f"reading {n}: {temperature} C, queued as event {seq}")
        await sync_and_report(device)
        await asyncio.sleep(period)
    print(f"state on the device: {device.state.to_dict()}")


async def verify(admin: AdminClient, device_id: str, count: int) -> bool:
    """True when the cloud holds exactly events 1..count of the device, each once."""
    seqs = [event["seq"] async for event in admin.iter_events(device=device_id)]
    if seqs != list(range(1, count + 1)):
        print(f"FAILED: expected events 1..{count} in the cloud, found seqs {seqs}")
        return False
    state = (await admin.state(device_id))["state"]
    print(f"ok: {count} readings arrived exactly once; state in the cloud: {state}")
    return True


async def self_contained(args: argparse.Namespace) -> int:
    """Own server on a temporary SQLite file, own provisioning, then verify."""
    admin_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(db=str(Path(tmp) / "server.db"), port=0, admin_token=admin_token)
        async with Server(config) as server, AdminClient(server.url, admin_token) as admin:
            print(f"no --url given: started a server on {server.url}")
            token = (await admin.add_device(args.id))["token"]
            await admin.patch_state(args.id, {"unit": "celsius"}, "config")
            async with Device(args.id, server.url, token=token, path=Path(tmp) / "sensor.db",
                              interval=None) as device:
                await run_sensor(device, args.count, args.period)
            return 0 if await verify(admin, args.id, args.count) else 1


async def connected(args: argparse.Namespace) -> int:
    """Run against the server at ``--url``."""
    token = args.token or os.environ.get("CRDTSYNC_TOKEN")
    if not token:
        print("error: give --token or set CRDTSYNC_TOKEN", file=sys.stderr)
        return 2
    path = args.db or f"{args.id}.db"
    async with Device(args.id, args.url, token=token, path=path, interval=None) as device:
        await run_sensor(device, args.count, args.period)
        print(f"done: {device.pending_events} event(s) still queued in {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRDTSYNC_URL"),
                        help="server URL (env CRDTSYNC_URL); none: self-contained run")
    parser.add_argument("--token", help="device token (env CRDTSYNC_TOKEN)")
    parser.add_argument("--id", default="sensor-1", help="device id (default %(default)s)")
    parser.add_argument("--count", type=int, default=5, help="readings, then exit")
    parser.add_argument("--period", type=float, default=0.2, help="seconds between readings")
    parser.add_argument("--db", help="local SQLite file (default ./<id>.db)")
    args = parser.parse_args()
    return asyncio.run(connected(args) if args.url else self_contained(args))


if __name__ == "__main__":
    raise SystemExit(main())
