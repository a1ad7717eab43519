"""Files on PostgreSQL shared by two server instances: the blobs live in the database
(``BYTEA`` chunks), so an upload started on one instance resumes on the other, and a file
put through one is served by the other, byte for byte, with one feed item."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from crdtsync import AdminClient, Device
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store.postgres.blobs import PostgresBlobs

from .conftest import ADMIN_TOKEN
from .services import postgres_schema

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MB = 1024 * 1024

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def two_instances() -> AsyncIterator[tuple[Server, Server]]:
    async with postgres_schema() as url, contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(Server(ServerConfig(
            db=url, port=0, admin_token=ADMIN_TOKEN, file_chunk=MB))) for _ in range(2)]
        yield servers[0], servers[1]


async def test_two_instances_share_the_bytes(tmp_path: Path) -> None:
    upload = os.urandom(5 * MB + 3)
    firmware = os.urandom(3 * MB)
    async with two_instances() as (one, other):
        assert isinstance(one.services.files.blobs, PostgresBlobs)
        async with AdminClient(one.url, ADMIN_TOKEN) as admin:
            token = (await admin.add_device("pg-1"))["token"]
        async with aiohttp.ClientSession() as http:
            # half an upload through the first instance...
            auth = {"Authorization": f"Bearer {token}"}
            declared = {"name": "dump.bin", "size": len(upload),
                        "sha256": hashlib.sha256(upload).hexdigest()}
            async with http.post(f"{one.url}/v1/files/uploads", json=declared,
                                 headers=auth) as resp:
                begun = await resp.json()
            for offset in (0, MB):
                async with http.put(f"{one.url}/v1/files/uploads/{begun['id']}?offset={offset}",
                                    data=io.BytesIO(upload[offset:offset + MB]),
                                    headers=auth) as resp:
                    assert resp.status == 200
        # ...the rest by the device through the second, resumed at 2 MB
        starts: list[int] = []
        async with Device("pg-1", other.url, token=token, path=tmp_path / "pg.db",
                          interval=None) as dev:
            dev.on_file_progress(lambda t: starts.append(t.done) if not starts else None)
            await dev.send_file("dump.bin", upload)
            await dev.sync_files()
            assert dev.pending_files == []
        assert starts == [2 * MB]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{one.url}/v1/devices/pg-1/files/dump.bin",
                                headers=ADMIN) as resp:
                assert await resp.read() == upload
            async with http.get(f"{one.url}/v1/devices/pg-1/files/dump.bin",
                                headers=dict(ADMIN, Range="bytes=1048570-1048580")) as resp:
                assert resp.status == 206 and await resp.read() == upload[1048570:1048581]
            async with http.get(f"{other.url}/v1/feed?kind=file", headers=ADMIN) as resp:
                items = [i for i in (await resp.json())["items"] if i["kind"] == "file"]
            assert len(items) == 1
            async with http.put(f"{one.url}/v1/devices/pg-1/files/fw.bin",
                                data=io.BytesIO(firmware), headers=ADMIN) as resp:
                assert resp.status == 201
        async with Device("pg-1", other.url, token=token, path=tmp_path / "pg.db",
                          interval=None) as dev:
            await dev.sync()
            await dev.sync_files()
            out = io.BytesIO()
            await dev.fetch_file("fw.bin", out)
            assert out.getvalue() == firmware
