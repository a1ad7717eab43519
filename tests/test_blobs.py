"""The :class:`~crdtsync_server.blobs.BlobStore` contract, run against every backend: the
directory (default), memory, and PostgreSQL ``BYTEA`` chunks. A part grows only at its end,
becomes a blob only when its SHA-256 matches, and a blob is read back by range."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crdtsync.errors import OffsetMismatch
from crdtsync_server.blobs import READ_BLOCK, BlobStore, DirectoryBlobs, MemoryBlobs
from crdtsync_server.store.postgres import PostgresStore
from crdtsync_server.store.postgres.blobs import CHUNK, PostgresBlobs

from .services import drop_schema, require_postgres
from .store_backends import postgres_store


@pytest.fixture(params=["directory", "memory", "postgres"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "directory":
        yield DirectoryBlobs(tmp_path / "files")
    elif request.param == "memory":
        yield MemoryBlobs()
    else:
        require_postgres()
        store: PostgresStore = postgres_store()
        await store.open()
        try:
            yield PostgresBlobs(store)
        finally:
            await store.aclose()
            assert store.schema is not None
            await drop_schema(store.schema)


async def _read(blobs: BlobStore, sha: str, start: int, end: int) -> bytes:
    return b"".join([block async for block in blobs.read_blob(sha, start, end)])


async def test_part_to_blob(blobs: BlobStore) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256 + 7)  # spans several rows and read blocks
    sha = hashlib.sha256(data).hexdigest()
    assert await blobs.part_size("p1") == 0
    cut = CHUNK + 5
    assert await blobs.append_part("p1", 0, data[:cut]) == cut
    with pytest.raises(OffsetMismatch) as caught:
        await blobs.append_part("p1", 3, b"xx")
    assert caught.value.detail == {"offset": cut}
    assert await blobs.append_part("p1", cut, data[cut:]) == len(data)
    assert await blobs.blob_size(sha) is None  # a part is not a blob
    assert await blobs.seal("p1", sha) is True
    assert await blobs.part_size("p1") == 0
    assert await blobs.blob_size(sha) == len(data)
    assert await _read(blobs, sha, 0, len(data)) == data
    assert await _read(blobs, sha, READ_BLOCK - 3, READ_BLOCK + CHUNK + 9) == \
        data[READ_BLOCK - 3:READ_BLOCK + CHUNK + 9]
    assert await _read(blobs, sha, len(data) - 1, len(data)) == data[-1:]


async def test_wrong_digest_drops_the_part(blobs: BlobStore) -> None:
    await blobs.append_part("p2", 0, b"hello")
    assert await blobs.seal("p2", hashlib.sha256(b"hellO").hexdigest()) is False
    assert await blobs.part_size("p2") == 0
    assert await blobs.blob_size(hashlib.sha256(b"hellO").hexdigest()) is None
    assert await blobs.blob_size(hashlib.sha256(b"hello").hexdigest()) is None


async def test_same_bytes_stored_once_and_deleted(blobs: BlobStore) -> None:
    sha = hashlib.sha256(b"same").hexdigest()
    for part in ("a", "b"):
        await blobs.append_part(part, 0, b"same")
        assert await blobs.seal(part, sha) is True
    assert await _read(blobs, sha, 0, 4) == b"same"
    await blobs.delete_blobs([sha])
    assert await blobs.blob_size(sha) is None
    with pytest.raises(FileNotFoundError):
        await _read(blobs, sha, 0, 4)


async def test_empty_blob_and_drop(blobs: BlobStore) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    assert await blobs.seal("e", empty) is True
    assert await blobs.blob_size(empty) == 0
    assert await _read(blobs, empty, 0, 0) == b""
    await blobs.append_part("d", 0, b"abc")
    await blobs.drop_part("d")
    assert await blobs.part_size("d") == 0
