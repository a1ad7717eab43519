"""A gateway: many devices in one process, synced together in batch requests.

One :class:`crdtsync.Gateway` hosts every device (each keeps its own SQLite file under the
gateway's directory: its CRDT state and its event outbox) and syncs them through
``POST /v1/sync/batch``: one HTTP request carries every device that has something to send
or is due, each authenticated by its own token. The gateway's loop syncs shortly after new
readings (at most once per ``min_spacing``), every ``interval`` seconds, and backs off per
device while the cloud is unreachable. A cloud write to a device's ``config`` map reaches
it at its next sync. The devices and their tokens are kept in the directory, so a restart
needs no ``--device`` again.

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
import os
import random
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crdtsync import AdminClient, CrdtsyncError, Device, Gateway
from crdtsync_server import Server, ServerConfig


async def run_device(device: Device, readings: int, period: float) -> None:
    """A pump: each cycle, queue a reading and keep the latest one in state; the gateway's
    loop syncs it (with the other devices, in one request).

    A failed sync loses nothing: the readings wait in the device's outbox for the next one."""
    for n in range(1, readings + 1):
        pressure = round(random.uniform(1.8, 2.4), 2)
        await device.emit("pressure", {"bar": pressure})
        device.state.update({"pressure_bar": pressure, "readings": n})
        await asyncio.sleep(period)


def announcer(device_id: str) -> Callable[[str, str, Any, Any], None]:
    """An ``on_change`` callback: a gateway would route the command to its hardware."""

    def announce(name: str, key: str, old: Any, new: Any) -> None:
        print(f"{device_id}: the cloud set {name}.{key} = {new!r}")

    return announce


async def run_gateway(url: str, tokens: dict[str, str], data_dir: Path, readings: int,
                      period: float) -> None:
    """Host every device of ``tokens`` (and those the directory already lists) in one
    :class:`Gateway` until each sent ``readings`` readings; then one last sync of all."""
    async with Gateway(url, path=data_dir, interval=5.0, min_spacing=0.5) as gw:
        for device in gw.devices.values():  # those a previous run added
            if device.id not in tokens:
                device.on_change(announcer(device.id))
        for device_id, token in tokens.items():
            # Handlers go on before the next await: the gateway may sync from then on.
            (await gw.add(device_id, token)).on_change(announcer(device_id))
        devices = list(gw.devices.values())
        print(f"gateway: {len(devices)} devices in one Gateway, files in {data_dir}")
        await asyncio.gather(*(run_device(device, readings, period) for device in devices))
        for device_id, outcome in (await gw.sync(force=True)).items():
            if isinstance(outcome, CrdtsyncError):
                if not outcome.retryable:
                    raise outcome
                print(f"{device_id}: offline ({outcome.code}), "
                      f"{gw.devices[device_id].pending_events} queued")
        for device in devices:
            print(f"{device.id}: state {device.state.to_dict()}, "
                  f"config {device.map('config').to_dict()}, {device.pending_events} queued")
        stats = gw.stats
        print(f"gateway: {stats.entries} device syncs in {stats.requests} HTTP request(s)")


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
          "through one gateway")
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
                        metavar="ID=TOKEN", help="a device to host (repeat; kept in the "
                        "data directory for the next runs)")
    parser.add_argument("--readings", type=int, default=5, help="readings per device")
    parser.add_argument("--period", type=float, default=0.2, help="seconds between readings")
    parser.add_argument("--data-dir", default="gateway-data",
                        help="the gateway's directory: device SQLite files and tokens")
    args = parser.parse_args()
    if not args.url:
        return asyncio.run(self_contained(args))
    data_dir = Path(args.data_dir)
    if not args.device and not (data_dir / "gateway.json").exists():
        parser.error("give at least one --device ID=TOKEN")
    asyncio.run(run_gateway(args.url, dict(args.device), data_dir, args.readings, args.period))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
