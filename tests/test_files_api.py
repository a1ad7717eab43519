"""The files HTTP API against a real server on 127.0.0.1 over SQLite (docs/protocol.md
section 19): the resumable upload with its typed refusals, listings and range downloads,
the cloud's streamed put and the device's download by SHA-256."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def server_config(tmp_path: Path, server_config: ServerConfig) -> ServerConfig:
    server_config.file_chunk = 1024 * 1024
    server_config.file_quota = 5 * 1024 * 1024
    return server_config


async def _device(admin: AdminClient, device_id: str = "cam-1", **kw: Any) -> dict[str, str]:
    token = (await admin.add_device(device_id, **kw))["token"]
    return {"Authorization": f"Bearer {token}"}


async def _begin(http: aiohttp.ClientSession, url: str, auth: dict[str, str], name: str,
                 data: bytes, meta: Any = None) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/files/uploads", headers=auth, json={
            "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "meta": meta}) as resp:
        return resp.status, await resp.json()


async def _put(http: aiohttp.ClientSession, url: str, auth: dict[str, str], upload: str,
               offset: int, chunk: bytes, sha: str | None = None
               ) -> tuple[int, dict[str, Any]]:
    headers = dict(auth, **({"X-Chunk-Sha256": sha} if sha else {}))
    async with http.put(f"{url}/v1/files/uploads/{upload}?offset={offset}",
                        data=io.BytesIO(chunk),
                        headers=headers) as resp:
        return resp.status, await resp.json()


async def _feed_files(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/v1/feed?kind=file&limit=100", headers=ADMIN) as resp:
        assert resp.status == 200
        return [item for item in (await resp.json())["items"] if item["kind"] == "file"]


async def test_upload_resume_and_range(server: Server, admin: AdminClient) -> None:
    auth = await _device(admin)
    data = os.urandom(2 * 1024 * 1024 + 77)
    mb = 1024 * 1024
    async with aiohttp.ClientSession() as http:
        status, begun = await _begin(http, server.url, auth, "dump.bin", data, {"kind": "log"})
        assert status == 200 and begun["offset"] == 0 and begun["chunk"] == mb
        upload = begun["id"]
        status, answer = await _put(http, server.url, auth, upload, 0, data[:mb],
                                    hashlib.sha256(data[:mb]).hexdigest())
        assert (status, answer["offset"], answer["complete"]) == (200, mb, False)
        # a cut: the device asks again where to resume
        status, again = await _begin(http, server.url, auth, "dump.bin", data, {"kind": "log"})
        assert (again["id"], again["offset"]) == (upload, mb)
        status, wrong = await _put(http, server.url, auth, upload, 0, data[:mb])
        assert status == 409 and wrong["error"]["code"] == "offset_mismatch"
        assert wrong["error"]["detail"]["offset"] == mb
        status, bad = await _put(http, server.url, auth, upload, mb, data[mb:2 * mb],
                                 "0" * 64)
        assert status == 422 and bad["error"]["code"] == "digest_mismatch"
        assert bad["error"]["detail"]["scope"] == "chunk"
        assert await _feed_files(http, server.url) == []  # nothing half-stored is visible
        async with http.get(f"{server.url}/v1/devices/cam-1/files", headers=ADMIN) as resp:
            assert (await resp.json())["files"] == []
        await _put(http, server.url, auth, upload, mb, data[mb:2 * mb])
        status, done = await _put(http, server.url, auth, upload, 2 * mb, data[2 * mb:])
        assert status == 200 and done["complete"] is True
        assert done["file"]["sha256"] == hashlib.sha256(data).hexdigest()
        # the answer was lost: declaring it again is complete at once, no second feed item
        status, replay = await _begin(http, server.url, auth, "dump.bin", data, {"kind": "log"})
        assert replay["complete"] is True
        items = await _feed_files(http, server.url)
        assert len(items) == 1
        assert items[0]["file"] == {"name": "dump.bin", "size": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(),
                                    "meta": {"kind": "log"},
                                    "url": "/v1/devices/cam-1/files/dump.bin"}
        async with http.get(f"{server.url}/v1/devices/cam-1/files", headers=ADMIN) as resp:
            listed = (await resp.json())["files"]
        assert [(f["name"], f["size"], f["direction"]) for f in listed] == [
            ("dump.bin", len(data), "up")]
        async with http.get(server.url + items[0]["file"]["url"], headers=ADMIN) as resp:
            assert resp.status == 200 and await resp.read() == data
        async with http.get(server.url + items[0]["file"]["url"],
                            headers=dict(ADMIN, Range="bytes=1000-1999")) as resp:
            assert resp.status == 206 and await resp.read() == data[1000:2000]
            assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        async with http.get(server.url + items[0]["file"]["url"],
                            headers=dict(ADMIN, Range="bytes=-10")) as resp:
            assert resp.status == 206 and await resp.read() == data[-10:]
        async with http.get(server.url + items[0]["file"]["url"], headers=auth) as resp:
            assert resp.status == 401  # the admin's route


@pytest.mark.parametrize("header, status, span", [
    ("bytes=10-19", 206, (10, 20)), ("bytes=-10", 206, (990, 1000)),
    ("bytes=995-", 206, (995, 1000)),
    ("bytes=0-99999", 206, (0, 1000)),
    ("items=0-5", 200, (0, 1000)), ("bytes=0-5,10-20", 200, (0, 1000)),
    ("bytes=abc", 200, (0, 1000)),
    ("bytes=5-2", 200, (0, 1000)),
    ("bytes=1000-", 416, None), ("bytes=-0", 416, None)])
async def test_ranges_are_answered_alike_for_devices_and_the_admin(
        server: Server, admin: AdminClient, header: str, status: int,
        span: tuple[int, int] | None) -> None:
    """One reading of ``Range`` (protocol 19.2) for the device's blob route and the admin's
    file route, on local disk: one range honoured, several or another unit ignored, a start
    beyond the end a typed ``416`` with ``Content-Range: bytes */size``."""
    auth = await _device(admin)
    data = os.urandom(1000)
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{server.url}/v1/devices/cam-1/files/r.bin", data=data,
                            headers=ADMIN) as resp:
            assert resp.status == 201
        sha = hashlib.sha256(data).hexdigest()
        for url, who in (("/v1/devices/cam-1/files/r.bin?direction=down", ADMIN),
                         (f"/v1/files/blobs/{sha}", auth)):
            async with http.get(server.url + url, headers=dict(who, Range=header)) as resp:
                assert resp.status == status, (url, await resp.text())
                if span is None:
                    assert resp.headers["Content-Range"] == "bytes */1000"
                    assert (await resp.json())["error"]["code"] == "bad_request"
                else:
                    assert await resp.read() == data[span[0]:span[1]]
                    if status == 206:
                        assert resp.headers["Content-Range"] == (
                            f"bytes {span[0]}-{span[1] - 1}/1000")


async def test_whole_file_mismatch_starts_over(server: Server, admin: AdminClient) -> None:
    auth = await _device(admin)
    data = b"x" * 1000
    async with aiohttp.ClientSession() as http:
        _, begun = await _begin(http, server.url, auth, "a.bin", data)
        status, bad = await _put(http, server.url, auth, begun["id"], 0, b"y" * 1000)
        assert status == 422 and bad["error"]["detail"] == {"scope": "file", "offset": 0}
        _, again = await _begin(http, server.url, auth, "a.bin", data)
        assert (again["id"], again["offset"]) == (begun["id"], 0)
        status, done = await _put(http, server.url, auth, begun["id"], 0, data)
        assert status == 200 and done["complete"] is True


async def test_a_chunk_ahead_waits_for_the_one_before_in_flight(server: Server,
                                                                admin: AdminClient) -> None:
    """A window of two chunks: the second, whole before the first finished arriving, waits
    for it instead of being refused; each answer is the exact end after its chunk. A chunk
    ahead with nothing in flight before it is refused with the true end; a damaged chunk is
    refused with nothing stored."""
    auth = await _device(admin)
    mb = 1024 * 1024
    data = os.urandom(2 * mb + 5)
    first_half_sent = asyncio.Event()
    release = asyncio.Event()

    async def slow_first() -> AsyncIterator[bytes]:
        yield data[:mb // 2]
        first_half_sent.set()
        await release.wait()
        yield data[mb // 2:mb]

    async with aiohttp.ClientSession() as http:
        _, begun = await _begin(http, server.url, auth, "w.bin", data)
        upload = begun["id"]
        status, ahead = await _put(http, server.url, auth, upload, mb, data[mb:2 * mb])
        assert status == 409 and ahead["error"]["detail"]["offset"] == 0
        status, bad = await _put(http, server.url, auth, upload, 0, data[:mb],
                                 "0" * 64)
        assert status == 422 and bad["error"]["detail"] == {"scope": "chunk", "offset": 0}

        async def first() -> tuple[int, dict[str, Any]]:
            async with http.put(f"{server.url}/v1/files/uploads/{upload}?offset=0",
                                data=slow_first(),
                                headers=dict(auth, **{"Content-Length": str(mb)})) as resp:
                return resp.status, await resp.json()

        sending_first = asyncio.ensure_future(first())
        await first_half_sent.wait()
        second = asyncio.ensure_future(_put(http, server.url, auth, upload, mb,
                                            data[mb:2 * mb],
                                            hashlib.sha256(data[mb:2 * mb]).hexdigest()))
        await asyncio.sleep(0.2)  # the second is whole at the server by now: it waits
        assert not second.done()
        release.set()
        assert await sending_first == (200, {"id": upload, "offset": mb, "size": len(data),
                                             "chunk": mb, "complete": False})
        status, answer = await second
        assert (status, answer["offset"]) == (200, 2 * mb)
        status, done = await _put(http, server.url, auth, upload, 2 * mb, data[2 * mb:])
        assert status == 200 and done["file"]["sha256"] == hashlib.sha256(data).hexdigest()


async def test_limits_are_typed(server: Server, admin: AdminClient) -> None:
    auth = await _device(admin)
    async with aiohttp.ClientSession() as http:
        status, answer = await _begin(http, server.url, auth, "big.bin", b"z" * (4 * 1024**2))
        assert status == 200
        status, over = await _begin(http, server.url, auth, "more.bin", b"q" * (2 * 1024**2))
        assert status == 413 and over["error"]["code"] == "quota_exceeded"
        assert over["error"]["detail"]["quota"] == 5 * 1024**2
        status, chunk = await _put(http, server.url, auth, answer["id"], 0,
                                   b"z" * (1024**2 + 1))
        assert status == 413 and chunk["error"]["code"] == "body_too_large"
        status, name = await _begin(http, server.url, auth, "../etc", b"1")
        assert status == 400 and name["error"]["code"] == "malformed_request"
        async with http.post(f"{server.url}/v1/files/uploads", json={}) as resp:
            assert resp.status == 401
    server.services.config.max_file_size = 10
    async with aiohttp.ClientSession() as http:
        status, big = await _begin(http, server.url, auth, "c.bin", b"1" * 11)
        assert status == 413 and big["error"]["code"] == "file_too_large"
        async with http.put(f"{server.url}/v1/devices/cam-1/files/fw.bin",
                            data=io.BytesIO(b"2" * 11), headers=ADMIN) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == \
                "file_too_large"


async def test_cloud_put_and_device_download(server: Server, admin: AdminClient) -> None:
    await admin.add_fleet("west")
    auth = await _device(admin, fleet="west")
    other = await _device(admin, "cam-2")
    firmware = os.urandom(3 * 1024 * 1024 + 5)
    sha = hashlib.sha256(firmware).hexdigest()
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{server.url}/v1/fleets/west/files/fw.bin",
                            data=io.BytesIO(firmware),
                            headers=dict(ADMIN, **{"X-File-Meta": '{"version": "1.2"}'})
                            ) as resp:
            assert resp.status == 201
            record = await resp.json()
        assert (record["sha256"], record["size"], record["meta"]) == (
            sha, len(firmware), {"version": "1.2"})
        env = await admin.request("GET", "/v1/fleets/west/files")
        assert [f["name"] for f in env["files"]] == ["fw.bin"]
        async with http.get(f"{server.url}/v1/files/blobs/{sha}", headers=auth,
                            ) as resp:
            assert resp.status == 200 and await resp.read() == firmware
        async with http.get(f"{server.url}/v1/files/blobs/{sha}",
                            headers=dict(auth, Range="bytes=3145728-")) as resp:
            assert resp.status == 206 and await resp.read() == firmware[3145728:]
        async with http.get(f"{server.url}/v1/files/blobs/{sha}", headers=other) as resp:
            assert resp.status == 404  # not announced to cam-2
        async with http.get(f"{server.url}/v1/fleets/west/files/fw.bin",
                            headers=dict(ADMIN, Range="bytes=0-9")) as resp:
            assert resp.status == 206 and await resp.read() == firmware[:10]
        async with http.get(f"{server.url}/v1/fleets/west/files/fw.bin",
                            headers=dict(ADMIN, Range="bytes=99999999-")) as resp:
            assert resp.status == 416
        async with http.delete(f"{server.url}/v1/fleets/west/files/fw.bin",
                               headers=ADMIN) as resp:
            assert resp.status == 200
        async with http.get(f"{server.url}/v1/files/blobs/{sha}", headers=auth) as resp:
            assert resp.status == 404
    assert await server.services.files.blobs.blob_size(sha) is None  # nothing names it


def test_file_feed_item_json_and_subject() -> None:
    from crdtsync_server.sinks.nats import item_subject
    from crdtsync_server.store.feed import FeedItem

    body = {"name": "dump.bin", "size": 3, "sha256": "a" * 64, "meta": None,
            "url": "/v1/devices/cam.1/files/dump.bin"}
    item = FeedItem(7, "file", "cam.1", "west", 10, 10, body)
    assert item.key == "fi:7"
    assert item.to_json() == {"cursor": "7", "key": "fi:7", "kind": "file", "device": "cam.1",
                              "fleet": "west", "time": 10, "received": 10, "file": body}
    assert item_subject("cs", item) == "cs.west.cam%2E1._file.dump%2Ebin"


async def test_deleting_a_device_deletes_its_files(server: Server, admin: AdminClient) -> None:
    auth = await _device(admin)
    data = b"photo" * 100
    async with aiohttp.ClientSession() as http:
        _, begun = await _begin(http, server.url, auth, "p.jpg", data)
        await _put(http, server.url, auth, begun["id"], 0, data)
        async with http.put(f"{server.url}/v1/devices/cam-1/files/cfg.json",
                            data=io.BytesIO(b"{}"), headers=ADMIN) as resp:
            assert resp.status == 201
    await admin.delete_device("cam-1")
    await _device(admin)  # the same id again: a new device, without the old one's files
    assert await admin.files(device="cam-1") == []
    assert await server.services.files.blobs.blob_size(hashlib.sha256(data).hexdigest()) is None


async def test_a_put_the_schema_refuses_stores_nothing(server: Server, admin: AdminClient
                                                       ) -> None:
    """A device whose fleet schema refuses unknown maps cannot be announced a file: the put
    is refused with the schema's error and nothing of it stays."""
    await admin.add_fleet("strict")
    await _device(admin, fleet="strict")
    await admin.put_schema("strict", {"unknown": "refuse"})
    async with aiohttp.ClientSession() as http, http.put(
            f"{server.url}/v1/devices/cam-1/files/fw.bin", data=io.BytesIO(b"fw"),
            headers=ADMIN) as resp:
        assert resp.status in (403, 422)
    assert await admin.files(device="cam-1") == []
    assert await server.services.files.blobs.blob_size(hashlib.sha256(b"fw").hexdigest()) \
        is None


async def test_retention_purges_old_files_and_abandoned_uploads(
        server: Server, admin: AdminClient, server_clock: Any) -> None:
    """With ``file_retention_ms`` set, the purge deletes uploaded files stored before it
    (and the blobs nothing names), and uploads abandoned past ``upload_retention_ms`` with
    their parts; a cloud put (``down``) stays."""
    config = server.services.config
    config.file_retention_ms = 60_000
    config.upload_retention_ms = 120_000
    auth = await _device(admin)
    old, fresh, partial = b"old" * 100, b"fresh" * 100, b"partial" * 100
    async with aiohttp.ClientSession() as http:
        _, begun = await _begin(http, server.url, auth, "old.bin", old)
        await _put(http, server.url, auth, begun["id"], 0, old)
        _, abandoned = await _begin(http, server.url, auth, "partial.bin", partial)
        await _put(http, server.url, auth, abandoned["id"], 0, partial[:10])
        async with http.put(f"{server.url}/v1/devices/cam-1/files/fw.bin",
                            data=io.BytesIO(b"fw"), headers=ADMIN) as resp:
            assert resp.status == 201
        server_clock.advance(90_000)
        _, begun = await _begin(http, server.url, auth, "fresh.bin", fresh)
        await _put(http, server.url, auth, begun["id"], 0, fresh)
        assert await server.services.maintenance.purge() >= 1
        assert sorted(f["name"] for f in await admin.files(device="cam-1")) == [
            "fresh.bin", "fw.bin"]
        blobs = server.services.files.blobs
        assert await blobs.blob_size(hashlib.sha256(old).hexdigest()) is None
        assert await blobs.part_size(abandoned["id"]) == 10  # not abandoned long enough yet
        server_clock.advance(60_000)
        await server.services.maintenance.purge()
        assert await blobs.part_size(abandoned["id"]) == 0
        status, gone = await _put(http, server.url, auth, abandoned["id"], 10, partial[10:])
        assert status == 404 and gone["error"]["code"] == "not_found"
    assert server.services.maintenance.purged["files"] >= 2
