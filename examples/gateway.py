"""A gateway: several devices in one process, sharing one HTTP connection pool.

Each device keeps its own SQLite file (its CRDT state and its event outbox); all of them
reach the cloud through one ``aiohttp.ClientSession``. Each device syncs from its own
background loop: every ``interval`` seconds, and shortly after each new reading (at most one
sync per ``min_spacing``), backing off while the cloud is unreachable. A cloud write to a
device's ``config`` map reaches it at its next sync.

Against a running server, one ``--device ID=TOKEN`` per device::

    python examples/gateway.py --url http://127.0.0.1:8787 \\
        --device pump-1="$(crdtsync device add pump-1)" \\
        --device pump-2="$(crdtsync device add pump-2)"

Without ``--url`` (nor ``CRDTSYNC_URL``) it runs on its own, as CI does: it starts a server in
this process on a temporary SQLite file and a free port, provisions three devices, runs them
briefly, checks through the management API that every event arrived exactly once, and
prints ``ok: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from crdtsync import AdminClient, CrdtsyncError, Device
from crdtsync_server import Server, ServerConfig


async def run_device(device: Device, readings: int, period: float) -> None:
    """A pump: each cycle, queue a reading and keep the latest one in state; the device's
    background loop syncs. At the end, one explicit sync flushes what is left.

    A failed sync loses nothing: the readings wait in the device's outbox for the next one."""
    for n in range(1, readings + 1):
        pressure = round(random.uniform(1.8, 2.4), 2)
        await device.emit("pressure", {"bar": pressure})
        device.state.update({"pressure_bar": pressure, "readings": n})
        await asyncio.sleep(period)
    try:
        await device.sync()
    except CrdtsyncError as exc:
        if not exc.retryable:
            raise
        print(f"{device.id}: offline ({exc.code}), {device.pending_events} queued")
    print(f"{device.id}: state {device.state.to_dict()}, "
          f"config {device.map('config').to_dict()}, {device.pending_events} queued")


def announcer(device_id: str) -> Callable[[str, str, Any, Any], None]:
    """An ``on_change`` callback: a gateway would route the command to its hardware."""

    def announce(name: str, key: str, old: Any, new: Any) -> None:
        print(f"{device_id}: the cloud set {name}.{key} = {new!r}")

    return announce


async def run_gateway(url: str, tokens: dict[str, str], data_dir: Path, readings: int,
                      period: float) -> None:
    """Host one :class:`Device` per token over one shared session until each sent
    ``readings`` readings."""
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        devices: list[Device] = []
        for device_id, token in tokens.items():
            device = Device(device_id, url, token=token, session=session,
                            path=data_dir / f"{device_id}.db", interval=5.0,
                            min_spacing=0.1)
            device.on_change(announcer(device_id))
            devices.append(await stack.enter_async_context(device))
        print(f"gateway: {len(devices)} devices over one HTTP session, files in {data_dir}")
        await asyncio.gather(*(run_device(device, readings, period) for device in devices))


async def verify(admin: AdminClient, device_ids: list[str], readings: int) -> bool:
    """True when the cloud holds exactly events 1..readings of every device."""
    seqs: dict[str, list[int]] = {device_id: [] for device_id in device_ids}
    async for event in admin.iter_events():
        seqs[event["device"]].append(event["seq"])
    wrong = {d: s for d, s in seqs.items() if sorted(s) != list(range(1, readings + 1))}
    if wrong:
        print(f"FAILED: expected seqs 1..{readings} per device, found {wrong}")
        return False
    print(f"ok: {len(device_ids)} devices x {readings} events arrived exactly once "
          "over one shared session")
    return True


async def self_contained(args: argparse.Namespace) -> int:
    """Own server on a temporary SQLite file, own provisioning, then verify."""
    admin_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(db=str(Path(tmp) / "server.db"), port=0, admin_token=admin_token)
        async with Server(config) as server, AdminClient(server.url, admin_token) as admin:
            print(f"no --url given: started a server on {server.url}")
            tokens = {f"gateway-{i}": "" for i in range(1, 4)}
            for device_id in tokens:
                tokens[device_id] = (await admin.add_device(device_id))["token"]
            await admin.patch_state("gateway-2", {"valve": "open"}, "config")
            await run_gateway(server.url, tokens, Path(tmp), args.readings, args.period)
            return 0 if await verify(admin, list(tokens), args.readings) else 1


def device_token(text: str) -> tuple[str, str]:
    device_id, sep, token = text.partition("=")
    if not sep or not device_id or not token:
        raise argparse.ArgumentTypeError("expected ID=TOKEN")
    return device_id, token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRDTSYNC_URL"),
                        help="server URL (env CRDTSYNC_URL); none: self-contained run")
    parser.add_argument("--device", type=device_token, action="append", default=[],
                        metavar="ID=TOKEN", help="a device to host (repeat)")
    parser.add_argument("--readings", type=int, default=5, help="readings per device")
    parser.add_argument("--period", type=float, default=0.2, help="seconds between readings")
    parser.add_argument("--data-dir", default="gateway-data", help="device SQLite files")
    args = parser.parse_args()
    if not args.url:
        return asyncio.run(self_contained(args))
    if not args.device:
        parser.error("give at least one --device ID=TOKEN")
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run_gateway(args.url, dict(args.device), data_dir, args.readings, args.period))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
