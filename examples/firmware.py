"""Files both ways: firmware down to a fleet, a camera image and a log dump up.

Against a running server (``crdtsync serve``; ``crdtsync fleet add cams``;
``TOKEN=$(crdtsync device add cam-1)``; ``crdtsync fleet assign cam-1 cams``;
``crdtsync file put --fleet cams firmware.bin ./firmware.bin --meta '{"version": "2.1"}'``)::

    python examples/firmware.py --url http://127.0.0.1:8787 --token "$TOKEN"

The device installs whatever firmware its fleet announces (once per version) and sends a
snapshot; ``crdtsync file list --device cam-1`` then shows it. Without ``--url`` (nor
``CRDTSYNC_URL``) it runs on its own, as CI does: a server in this process on a temporary
SQLite file and a free port, a fleet, a 3 MB firmware put through the management API, the
device receiving it and sending two files back; it checks every byte both ways and prints
``ok: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import sys
import tempfile
from pathlib import Path

from crdtsync import AdminClient, Device, FileInfo, FileTransfer
from crdtsync_server import Server, ServerConfig


async def run_camera(device: Device, workdir: Path) -> dict[str, bytes]:
    """Install the announced firmware, send a snapshot and a log dump; returns what was
    sent, by name."""
    installed: list[str] = []

    @device.on_file("firmware.bin")
    async def install(info: FileInfo) -> None:
        image = workdir / "installed-firmware.bin"
        await device.fetch_file(info.name, image)  # verified copy out
        version = (info.meta or {}).get("version", "?")
        print(f"firmware {version}: {info.size} bytes verified, installed")
        installed.append(version)

    def progress(t: FileTransfer) -> None:
        if t.done == t.total:
            print(f"  {t.direction} {t.name}: {t.total} bytes")

    device.on_file_progress(progress)
    sent = {"snapshot.jpg": os.urandom(2_000_000), "dump.log": b"boot ok\n" * 20_000}
    for name, data in sent.items():
        await device.send_file(name, data, meta={"camera": device.id})
    print(f"queued {len(device.pending_files)} file(s) for the cloud")
    await device.sync()  # learns of the fleet's files (the `files` map)
    await device.sync_files()  # sends the queue, receives what was announced
    print(f"after the transfers: {len(device.pending_files)} file(s) queued, "
          f"holding {sorted(device.files)}")
    return sent


async def self_contained() -> int:
    admin_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = ServerConfig(db=str(work / "server.db"), port=0, admin_token=admin_token)
        async with Server(config) as server, AdminClient(server.url, admin_token) as admin:
            print(f"no --url given: started a server on {server.url}")
            await admin.add_fleet("cams")
            token = (await admin.add_device("cam-1", fleet="cams"))["token"]
            firmware = work / "firmware.bin"
            firmware.write_bytes(os.urandom(3_000_000))
            record = await admin.put_file("firmware.bin", firmware, fleet="cams",
                                          meta={"version": "2.1"})
            print(f"the cloud put firmware.bin for fleet cams ({record['size']} bytes)")
            async with Device("cam-1", server.url, token=token, path=work / "cam.db",
                              interval=None) as device:
                sent = await run_camera(device, work)
                got = (work / "installed-firmware.bin").read_bytes()
            return 0 if await verify(admin, sent, got, firmware.read_bytes(), work) else 1


async def verify(admin: AdminClient, sent: dict[str, bytes], installed: bytes,
                 firmware: bytes, work: Path) -> bool:
    """True when the cloud holds every sent file byte for byte, announced once each in the
    feed, and the device installed the exact firmware."""
    listed = {f["name"]: f["sha256"] for f in await admin.files(device="cam-1",
                                                                direction="up")}
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in sent.items()}
    items, _ = await admin.feed(limit=1000, kind="file")
    announced = sorted(i["file"]["name"] for i in items)
    with open(work / "back.bin", "wb") as back:  # noqa: ASYNC230 (a small local file)
        await admin.get_file("snapshot.jpg", back, device="cam-1")
    if (listed != expected or announced != sorted(sent) or installed != firmware
            or (work / "back.bin").read_bytes() != sent["snapshot.jpg"]):
        print(f"FAILED: listed {listed}, feed {announced}")
        return False
    print(f"ok: firmware down verified, {len(sent)} file(s) up verified, "
          f"each announced once in the feed")
    return True


async def connected(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("CRDTSYNC_TOKEN")
    if not token:
        print("error: give --token or set CRDTSYNC_TOKEN", file=sys.stderr)
        return 2
    workdir = Path(args.db or f"{args.id}.db").parent
    async with Device(args.id, args.url, token=token, path=args.db or f"{args.id}.db",
                      interval=None) as device:
        await run_camera(device, workdir)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRDTSYNC_URL"),
                        help="server URL (env CRDTSYNC_URL); none: self-contained run")
    parser.add_argument("--token", help="device token (env CRDTSYNC_TOKEN)")
    parser.add_argument("--id", default="cam-1", help="device id (default %(default)s)")
    parser.add_argument("--db", help="local SQLite file (default ./<id>.db)")
    args = parser.parse_args()
    return asyncio.run(connected(args) if args.url else self_contained())


if __name__ == "__main__":
    raise SystemExit(main())
