"""Files and uploads in PostgreSQL (the :class:`~crdtsync_server.store.roles.FileStore`
role): tables ``files`` and ``uploads``. Starting an upload locks the device's row, so two
instances checking one device's quota run one after the other; finishing one takes the
sequence lock (it appends a ``file`` feed item). The blobs are in ``postgres/blobs.py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from crdtsync.errors import NotFound, QuotaExceeded

from ..feed import json_text
from ..files import UP, FileRecord, UploadRecord, device_owner, file_feed_row, quota_used
from ..rules import check_limit
from .connection import PostgresConnection, loads, sequenced
from .devices import require_device
from .feed import append_feed

_FILE_COLUMNS = "owner, direction, name, sha256, size, meta, created"
_UPLOAD_COLUMNS = "id, device, name, sha256, size, meta, created"


class PostgresFiles(PostgresConnection):
    """The :class:`FileStore` role."""

    async def begin_upload(self, upload: UploadRecord, quota: int | None
                           ) -> tuple[UploadRecord, list[str]]:
        """See ``FileStore.begin_upload``."""
        return await self._write(_begin_upload, upload, quota)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        """One upload in progress, or ``None``."""
        return await self._read(_get_upload, upload_id)

    async def finish_upload(self, upload_id: str, now: int) -> tuple[FileRecord, str | None]:
        """See ``FileStore.finish_upload``."""
        return await self._write(_finish_upload, upload_id, now)

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload in progress; whether it existed."""
        return await self._write(_drop_upload, upload_id)

    async def put_file(self, record: FileRecord) -> str | None:
        """Store ``record``; returns the SHA-256 of the file it replaced."""
        return await self._write(_put_file, record)

    async def get_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """One file, or ``None``."""
        return await self._read(_get_file, owner, direction, name)

    async def list_files(self, owner: str, direction: str | None = None, after: str = "",
                         limit: int = 100) -> list[FileRecord]:
        """The owner's files with name > ``after``, by name then direction."""
        check_limit(limit)
        return await self._read(_list_files, owner, direction, after, limit)

    async def find_file(self, owners: Sequence[str], direction: str, sha256: str
                        ) -> FileRecord | None:
        """A file of one of ``owners`` in ``direction`` naming blob ``sha256``."""
        return await self._read(_find_file, list(owners), direction, sha256)

    async def delete_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """Delete one file; returns it, or ``None``."""
        return await self._write(_delete_file, owner, direction, name)

    async def purge_files(self, before: int, uploads_before: int
                          ) -> tuple[list[str], list[str]]:
        """Delete old ``up`` files and old uploads; see ``FileStore.purge_files``."""
        return await self._write(_purge_files, before, uploads_before)

    async def digests_in_use(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that a file or an upload still names."""
        return await self._read(_digests_in_use, list(digests))


def _file(row: Sequence[Any]) -> FileRecord:
    owner, direction, name, sha256, size, meta, created = row
    return FileRecord(owner, direction, name, sha256, size, loads(meta), created)


def _upload(row: Sequence[Any]) -> UploadRecord:
    upload_id, device, name, sha256, size, meta, created = row
    return UploadRecord(upload_id, device, name, sha256, size, loads(meta), created)


async def _begin_upload(conn: asyncpg.Connection, upload: UploadRecord, quota: int | None
                        ) -> tuple[UploadRecord, list[str]]:
    await require_device(conn, upload.device, lock=True)
    mine = [_upload(row) for row in await conn.fetch(
        f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE device = $1 AND name = $2",
        upload.device, upload.name)]
    for existing in mine:
        if existing.sha256 == upload.sha256:
            return existing, []
    if quota is not None:
        files = [(r[0], r[1]) for r in await conn.fetch(
            "SELECT name, size FROM files WHERE owner = $1 AND direction = $2",
            device_owner(upload.device), UP)]
        uploads = [(r[0], r[1], r[2]) for r in await conn.fetch(
            "SELECT id, name, size FROM uploads WHERE device = $1", upload.device)]
        used = quota_used(files, uploads, upload.name, upload.id)
        if used + upload.size > quota:
            raise QuotaExceeded(f"device {upload.device!r} would hold {used + upload.size}"
                                f" bytes of files, over its quota of {quota}",
                                {"quota": quota, "used": used, "size": upload.size})
    await conn.execute("DELETE FROM uploads WHERE device = $1 AND name = $2",
                       upload.device, upload.name)
    await conn.execute(
        f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        upload.id, upload.device, upload.name, upload.sha256, upload.size,
        json_text(upload.meta), upload.created)
    return await _get_upload(conn, upload.id) or upload, [u.id for u in mine]


async def _get_upload(conn: asyncpg.Connection, upload_id: str) -> UploadRecord | None:
    row = await conn.fetchrow(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = $1",
                              upload_id)
    return None if row is None else _upload(row)


async def _finish_upload(conn: asyncpg.Connection, upload_id: str, now: int
                         ) -> tuple[FileRecord, str | None]:
    await sequenced(conn)  # first: the transaction appends a feed item
    row = await conn.fetchrow(
        f"DELETE FROM uploads WHERE id = $1 RETURNING {_UPLOAD_COLUMNS}", upload_id)
    if row is None:
        raise NotFound(f"no upload {upload_id!r}", {"upload": upload_id})
    upload = _upload(row)
    device = await require_device(conn, upload.device)
    record = FileRecord(device_owner(device.id), UP, upload.name, upload.sha256, upload.size,
                        upload.meta, now)
    old = await _put_file(conn, record)
    await append_feed(conn, [file_feed_row(record, device.id, device.fleet, now)])
    return record, old


async def _drop_upload(conn: asyncpg.Connection, upload_id: str) -> bool:
    return await conn.fetchval("DELETE FROM uploads WHERE id = $1 RETURNING id",
                               upload_id) is not None


async def _put_file(conn: asyncpg.Connection, record: FileRecord) -> str | None:
    old: str | None = await conn.fetchval(
        "SELECT sha256 FROM files WHERE owner = $1 AND direction = $2 AND name = $3"
        " FOR UPDATE", record.owner, record.direction, record.name)
    await conn.execute(
        f"INSERT INTO files ({_FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (owner, direction, name) DO UPDATE SET sha256 = excluded.sha256,"
        " size = excluded.size, meta = excluded.meta, created = excluded.created",
        record.owner, record.direction, record.name, record.sha256, record.size,
        json_text(record.meta), record.created)
    return old


async def _get_file(conn: asyncpg.Connection, owner: str, direction: str, name: str
                    ) -> FileRecord | None:
    row = await conn.fetchrow(f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = $1"
                              " AND direction = $2 AND name = $3", owner, direction, name)
    return None if row is None else _file(row)


async def _list_files(conn: asyncpg.Connection, owner: str, direction: str | None,
                      after: str, limit: int) -> list[FileRecord]:
    rows = await conn.fetch(
        f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = $1 AND name > $2"
        " AND ($3::text IS NULL OR direction = $3) ORDER BY name, direction LIMIT $4",
        owner, after, direction, limit)
    return [_file(row) for row in rows]


async def _find_file(conn: asyncpg.Connection, owners: list[str], direction: str,
                     sha256: str) -> FileRecord | None:
    row = await conn.fetchrow(
        f"SELECT {_FILE_COLUMNS} FROM files WHERE sha256 = $1 AND direction = $2"
        " AND owner = ANY($3::text[]) ORDER BY owner, name LIMIT 1", sha256, direction, owners)
    return None if row is None else _file(row)


async def _delete_file(conn: asyncpg.Connection, owner: str, direction: str, name: str
                       ) -> FileRecord | None:
    row = await conn.fetchrow(
        f"DELETE FROM files WHERE owner = $1 AND direction = $2 AND name = $3"
        f" RETURNING {_FILE_COLUMNS}", owner, direction, name)
    return None if row is None else _file(row)


async def _purge_files(conn: asyncpg.Connection, before: int, uploads_before: int
                       ) -> tuple[list[str], list[str]]:
    digests = [r[0] for r in await conn.fetch(
        "DELETE FROM files WHERE direction = $1 AND created < $2 RETURNING sha256", UP, before)]
    uploads = [r[0] for r in await conn.fetch(
        "DELETE FROM uploads WHERE created < $1 RETURNING id", uploads_before)]
    return digests, uploads


async def _digests_in_use(conn: asyncpg.Connection, digests: list[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT sha256 FROM files WHERE sha256 = ANY($1::text[])"
        " UNION SELECT sha256 FROM uploads WHERE sha256 = ANY($1::text[])", digests)
    return {r[0] for r in rows}
