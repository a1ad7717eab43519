"""Blobs in PostgreSQL (a :class:`~crdtsync_server.blobs.BlobStore`): ``BYTEA`` rows of at
most :data:`CHUNK` bytes, complete blobs in ``blob_chunks`` by SHA-256, parts of uploads in
progress in ``part_chunks``. Every server instance on the database serves the same bytes.

Sealing a part hashes its rows in order, then copies them to ``blob_chunks`` and deletes
them in one transaction: a blob is visible whole or not at all. Appends to one part take a
transaction-scoped advisory lock on it, so two instances never interleave a part's rows.
(Why rows, not large objects: docs/architecture.md.)
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg

from crdtsync.errors import OffsetMismatch

from .connection import PostgresConnection

CHUNK = 1024 * 1024
"""Bytes per row: small enough that a row is read, hashed and sent without holding much
memory, large enough that a 100 MB file is 100 rows."""

_ROWS_PER_READ = 4
"""Rows fetched per query while hashing or serving: at most 4 MiB in memory."""


class PostgresBlobs:
    """Blobs on the pool of ``store`` (a ``PostgresStore``, opened by its owner)."""

    def __init__(self, store: PostgresConnection) -> None:
        self._store = store

    async def part_size(self, part: str) -> int:
        return await self._store._read(_part_size, part)

    async def append_part(self, part: str, offset: int, data: bytes) -> int:
        return await self._store._write(_append_part, part, offset, data)

    async def seal(self, part: str, sha256: str, *, hashed: bool = False) -> bool:
        ok = hashed
        if not hashed:
            digest = hashlib.sha256()
            async for block in self._rows("part_chunks", "part", part, 0, 2**62):
                digest.update(block)
            ok = digest.hexdigest() == sha256
        await self._store._write(_seal, part, sha256 if ok else None)
        return ok

    async def drop_part(self, part: str) -> None:
        await self._store._write(_drop_part, part)

    async def blob_size(self, sha256: str) -> int | None:
        size: int | None = await self._store._read(_blob_size, sha256)
        return size

    def local_path(self, sha256: str) -> Path | None:
        return None

    async def read_blob(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        if await self.blob_size(sha256) is None:
            raise FileNotFoundError(sha256)
        async for block in self._rows("blob_chunks", "sha256", sha256, start, end):
            yield block

    async def _rows(self, table: str, key: str, value: str, start: int, end: int
                    ) -> AsyncIterator[bytes]:
        """Bytes ``start``..``end`` of the rows of ``table`` where ``key`` = ``value``, a
        few rows per query."""
        at = start
        while at < end:
            rows = await self._store._read(_rows_from, table, key, value, at, _ROWS_PER_READ)
            if not rows:
                return
            for pos, data in rows:
                block = bytes(data)[max(0, at - pos):max(0, end - pos)]
                if block:
                    yield block
                at = pos + len(data)
                if at >= end:
                    return

    async def delete_blobs(self, digests: Sequence[str]) -> None:
        await self._store._write(_delete_blobs, list(digests))


async def _part_size(conn: asyncpg.Connection, part: str) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(max(pos + length(data)), 0) FROM part_chunks WHERE part = $1", part))


async def _append_part(conn: asyncpg.Connection, part: str, offset: int, data: bytes) -> int:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 19))", part)
    size = await _part_size(conn, part)
    if size != offset:
        raise OffsetMismatch(f"the part ends at {size}, not {offset}", {"offset": size})
    view = memoryview(data)
    rows = [(part, offset + at, bytes(view[at:at + CHUNK])) for at in range(0, len(data), CHUNK)]
    await conn.executemany("INSERT INTO part_chunks (part, pos, data) VALUES ($1, $2, $3)", rows)
    return size + len(data)


async def _seal(conn: asyncpg.Connection, part: str, sha256: str | None) -> None:
    if sha256 is not None and await _blob_size(conn, sha256) is None:
        await conn.execute(
            "INSERT INTO blob_chunks (sha256, pos, data) SELECT $2, pos, data"
            " FROM part_chunks WHERE part = $1", part, sha256)
        await conn.execute(  # an empty file is one empty row
            "INSERT INTO blob_chunks (sha256, pos, data) VALUES ($1, 0, '\\x')"
            " ON CONFLICT DO NOTHING", sha256)
    await _drop_part(conn, part)


async def _drop_part(conn: asyncpg.Connection, part: str) -> None:
    await conn.execute("DELETE FROM part_chunks WHERE part = $1", part)


async def _blob_size(conn: asyncpg.Connection, sha256: str) -> int | None:
    size = await conn.fetchval(
        "SELECT max(pos + length(data)) FROM blob_chunks WHERE sha256 = $1", sha256)
    return None if size is None else int(size)


async def _rows_from(conn: asyncpg.Connection, table: str, key: str, value: str, at: int,
                     limit: int) -> list[tuple[int, bytes]]:
    rows = await conn.fetch(
        f"SELECT pos, data FROM {table} WHERE {key} = $1 AND pos + length(data) > $2"
        " ORDER BY pos LIMIT $3", value, at, limit)
    return [(int(r[0]), r[1]) for r in rows]


async def _delete_blobs(conn: asyncpg.Connection, digests: list[str]) -> None:
    await conn.execute("DELETE FROM blob_chunks WHERE sha256 = ANY($1::text[])", digests)
