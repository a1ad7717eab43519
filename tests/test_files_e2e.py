"""Files end to end with the reference device against a real server on 127.0.0.1 over
SQLite: ``send_file`` from a path, bytes or a file object, durable across a restart, one
feed item per file; cloud puts for a device and a fleet reach the device at its next sync,
verified, with ``on_file`` once, and ``fetch_file`` copies them out."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient, Device, FileInfo, FileTransfer
from crdtsync_server import Server

from .conftest import DeviceFactory
from .filehttp import ADMIN, cloud_bytes, feed_files, put_down


async def test_send_files_of_every_source(server: Server, make_device: DeviceFactory,
                                          tmp_path: Path) -> None:
    dev = await make_device("cam-1")
    on_disk = tmp_path / "photo.jpg"
    on_disk.write_bytes(os.urandom(300_000))
    blob = os.urandom(5_000_000)
    progress: list[tuple[str, int, int]] = []
    dev.on_file_progress(lambda t: progress.append((t.name, t.done, t.total)))
    await dev.send_file("photo.jpg", on_disk, meta={"camera": 2})
    await dev.send_file("dump.bin", blob)
    await dev.send_file("log.txt", io.BytesIO(b"line\n" * 1000))
    on_disk.write_bytes(b"changed after queueing")  # the queued copy is what goes
    assert [f.name for f in dev.pending_files] == ["photo.jpg", "dump.bin", "log.txt"]
    assert await feed_files(server.url) == []
    await dev.sync_files()
    assert dev.pending_files == [] and dev.file_errors == {}
    files = await feed_files(server.url)
    assert [(f["name"], f["size"]) for f in files] == [
        ("photo.jpg", 300_000), ("dump.bin", 5_000_000), ("log.txt", 5000)]
    assert files[0]["meta"] == {"camera": 2}
    assert await cloud_bytes(server.url, files[1]["url"]) == blob
    assert ("dump.bin", 5_000_000, 5_000_000) in progress
    await dev.sync_files()  # nothing left: no second feed item
    assert len(await feed_files(server.url)) == 3


async def test_queue_survives_a_restart(server: Server, admin: AdminClient,
                                        tmp_path: Path) -> None:
    token = (await admin.add_device("cam-2"))["token"]
    data = os.urandom(100_000)
    async with Device("cam-2", server.url, token=token, path=tmp_path / "cam.db",
                      interval=None) as dev:
        await dev.send_file("a.bin", data)
    async with Device("cam-2", server.url, token=token, path=tmp_path / "cam.db",
                      interval=None) as dev:
        assert dev.pending_files == [FileInfo("a.bin", len(data),
                                              hashlib.sha256(data).hexdigest(), None)]
        await dev.sync_files()
        assert dev.pending_files == []
    assert await cloud_bytes(server.url, "/v1/devices/cam-2/files/a.bin") == data


async def test_cloud_files_reach_the_device(server: Server, admin: AdminClient,
                                            make_device: DeviceFactory, tmp_path: Path
                                            ) -> None:
    await admin.add_fleet("west")
    dev = await make_device("gw-1")
    await admin.set_fleet("gw-1", "west")
    firmware = os.urandom(3_000_000)
    config = b'{"rate": 5}'
    seen: list[FileInfo] = []
    every: list[str] = []
    dev.on_file("fw.bin")(seen.append)

    @dev.on_file()
    async def any_file(info: FileInfo) -> None:
        every.append(info.name)

    await put_down(server.url, "/v1/fleets/west/files/fw.bin", firmware, '{"version": "2.0"}')
    await put_down(server.url, "/v1/devices/gw-1/files/config.json", config)
    await dev.sync()
    await dev.sync_files()
    assert set(dev.files) == {"fw.bin", "config.json"}
    assert dev.files["fw.bin"] == FileInfo("fw.bin", len(firmware),
                                           hashlib.sha256(firmware).hexdigest(),
                                           {"version": "2.0"})
    assert [i.name for i in seen] == ["fw.bin"] and sorted(every) == ["config.json", "fw.bin"]
    out = tmp_path / "fw-copy.bin"
    await dev.fetch_file("fw.bin", out)
    assert out.read_bytes() == firmware
    buffer = io.BytesIO()
    await dev.fetch_file("config.json", buffer)
    assert buffer.getvalue() == config
    await dev.sync()
    await dev.sync_files()  # nothing new: handlers do not run again
    assert len(seen) == 1 and len(every) == 2
    newer = os.urandom(1000)
    await put_down(server.url, "/v1/fleets/west/files/fw.bin", newer)
    async with aiohttp.ClientSession() as http, http.delete(
            f"{server.url}/v1/devices/gw-1/files/config.json?direction=down",
            headers=ADMIN) as resp:
        assert resp.status == 200
    await dev.sync()
    await dev.sync_files()
    assert set(dev.files) == {"fw.bin"} and dev.files["fw.bin"].size == 1000
    assert len(seen) == 2
    transfers: list[FileTransfer] = dev.file_transfers
    assert transfers == []


async def test_a_chunk_damaged_on_the_way_is_refused_and_sent_again(
        server: Server, make_device: DeviceFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose bytes no longer match their X-Chunk-Sha256 (damaged between the read
    and the server) is refused with ``digest_mismatch`` (nothing of it stored) and sent
    again; the file arrives whole, once."""
    import crdtsync._files as files

    read = files._read_chunk
    damaged: list[int] = []

    def damage_once(path: Path, offset: int, size: int) -> tuple[bytes, str]:
        chunk, digest = read(path, offset, size)
        if not damaged and offset > 0:
            damaged.append(offset)
            return bytes([chunk[0] ^ 0xFF]) + chunk[1:], digest
        return chunk, digest

    monkeypatch.setattr(files, "_read_chunk", damage_once)
    server.services.config.file_chunk = 1024 * 1024
    dev = await make_device("cam-9")
    data = os.urandom(3 * 1024 * 1024)
    await dev.send_file("x.bin", data)
    await dev.sync_files()
    assert damaged == [1024 * 1024] and dev.pending_files == []
    files_in_feed = await feed_files(server.url)
    assert len(files_in_feed) == 1
    assert await cloud_bytes(server.url, files_in_feed[0]["url"]) == data


async def test_two_chunks_travel_at_once(server: Server, make_device: DeviceFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The device keeps two chunks in flight (the next travels while the server stores the
    one before), never more, with exact offsets; the file arrives whole, once."""
    import crdtsync._files as files

    send = files.FileClient.send
    flying: list[int] = []
    most = 0
    offsets: list[int] = []

    async def counted(self: Any, upload: str, offset: int, chunk: bytes, check: str
                      ) -> dict[str, Any]:
        nonlocal most
        flying.append(offset)
        offsets.append(offset)
        most = max(most, len(flying))
        try:
            return await send(self, upload, offset, chunk, check)
        finally:
            flying.remove(offset)

    monkeypatch.setattr(files.FileClient, "send", counted)
    server.services.config.file_chunk = 256 * 1024
    dev = await make_device("cam-10")
    data = os.urandom(10 * 256 * 1024 + 1)
    await dev.send_file("w.bin", data)
    await dev.sync_files()
    assert dev.pending_files == [] and most == 2
    assert offsets == [i * 256 * 1024 for i in range(11)]
    files_in_feed = await feed_files(server.url)
    assert len(files_in_feed) == 1
    assert await cloud_bytes(server.url, files_in_feed[0]["url"]) == data


async def test_a_part_held_whole_but_not_finished_is_finished(
        server: Server, make_device: DeviceFactory) -> None:
    """The server holds every byte of an upload it did not finish (it died between the last
    write and the record): declared again, the offset answered is the size, and the device's
    empty chunk at the end finishes it, checked against the whole SHA-256."""
    dev = await make_device("cam-11")
    data = os.urandom(300_000)
    device = await server.services.store.get_device("cam-11")
    assert device is not None
    files = server.services.files
    begun = await files.begin_upload(device, "held.bin", len(data),
                                     hashlib.sha256(data).hexdigest(), None)
    await files.blobs.append_part(begun["id"], 0, data)
    await dev.send_file("held.bin", data)
    await dev.sync_files()
    assert dev.pending_files == [] and dev.file_errors == {}
    files_in_feed = await feed_files(server.url)
    assert [f["name"] for f in files_in_feed] == ["held.bin"]
    assert await cloud_bytes(server.url, files_in_feed[0]["url"]) == data


async def test_an_empty_file_is_sent(server: Server, make_device: DeviceFactory) -> None:
    """A zero-byte file goes as one empty chunk (it was refused as cut off before)."""
    dev = await make_device("cam-12")
    await dev.send_file("empty.bin", b"")
    await dev.sync_files()
    assert dev.pending_files == [] and dev.file_errors == {}
    files_in_feed = await feed_files(server.url)
    assert [(f["name"], f["size"]) for f in files_in_feed] == [("empty.bin", 0)]
    assert await cloud_bytes(server.url, files_in_feed[0]["url"]) == b""


async def test_a_sink_receives_each_file_once(server: Server, admin: AdminClient,
                                              make_device: DeviceFactory) -> None:
    """A webhook sink filtered on ``kind: file`` gets one item per stored upload, with
    where to fetch it; a resent file (its answer lost) adds none."""
    from aiohttp import web

    from .conftest import local_app

    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.extend((await request.json())["items"])
        arrived.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with local_app(app) as url:
        await admin.put_sink("files", {"type": "webhook", "filter": {"kind": "file"},
                                       "options": {"url": f"{url}/hook",
                                                   "secret": "s" * 16}})
        dev = await make_device("cam-s")
        await dev.send_file("a.bin", b"a" * 1000)
        await dev.send_file("b.bin", b"b" * 2000)
        await dev.sync_files()
        await dev.send_file("a.bin", b"a" * 1000)  # the same file again: already stored
        await dev.sync_files()
        async with asyncio.timeout(30):
            while len(received) < 2:
                arrived.clear()
                await arrived.wait()
        await asyncio.sleep(0.3)  # nothing more comes
    assert [(i["kind"], i["file"]["name"], i["file"]["size"]) for i in received] == [
        ("file", "a.bin", 1000), ("file", "b.bin", 2000)]
    assert len({i["key"] for i in received}) == 2
    assert received[0]["file"]["url"] == "/v1/devices/cam-s/files/a.bin"


async def test_the_background_loop_moves_files_by_itself(server: Server,
                                                         make_device: DeviceFactory) -> None:
    """With the background loop (and the live channel), a queued file leaves and a file the
    cloud puts arrives without any call: the transfer task runs after each sync."""
    dev = await make_device("cam-bg", interval=30.0, min_spacing=0.05)
    got = asyncio.Event()
    dev.on_file("fw.bin")(lambda info: got.set())
    await dev.send_file("up.bin", b"u" * 5000)
    await put_down(server.url, "/v1/devices/cam-bg/files/fw.bin", b"f" * 7000)
    async with asyncio.timeout(30):
        await got.wait()
        while dev.pending_files:  # noqa: ASYNC110 (no event announces an empty queue)
            await asyncio.sleep(0.05)
    assert dev.files["fw.bin"].size == 7000
    assert [f["name"] for f in await feed_files(server.url)] == ["up.bin"]
