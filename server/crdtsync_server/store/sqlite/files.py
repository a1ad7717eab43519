"""Files and uploads in SQLite (the :class:`~crdtsync_server.store.roles.FileStore` role):
tables ``files`` and ``uploads`` (schema v9). A finished upload becomes a file row and a
``file`` feed item in one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from crdtsync.errors import NotFound, QuotaExceeded

from ..feed import FEED_COLUMNS, json_text
from ..files import UP, FileRecord, UploadRecord, device_owner, file_feed_row, quota_used
from ..rules import check_limit
from .connection import SQLiteConnection, in_transaction, insert_values, loads
from .devices import require_device

_FILE_COLUMNS = "owner, direction, name, sha256, size, meta, created"
_UPLOAD_COLUMNS = "id, device, name, sha256, size, meta, created"


class SQLiteFiles(SQLiteConnection):
    """The :class:`FileStore` role."""

    async def begin_upload(self, upload: UploadRecord, quota: int | None
                           ) -> tuple[UploadRecord, list[str]]:
        """See ``FileStore.begin_upload``."""
        return await self._run(in_transaction, _begin_upload, upload, quota)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        """One upload in progress, or ``None``."""
        return await self._run(_get_upload, upload_id)

    async def finish_upload(self, upload_id: str, now: int) -> tuple[FileRecord, str | None]:
        """See ``FileStore.finish_upload``."""
        return await self._run(in_transaction, _finish_upload, upload_id, now)

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload in progress; whether it existed."""
        return await self._run(in_transaction, _drop_upload, upload_id)

    async def put_file(self, record: FileRecord) -> str | None:
        """Store ``record``; returns the SHA-256 of the file it replaced."""
        return await self._run(in_transaction, _put_file, record)

    async def get_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """One file, or ``None``."""
        return await self._run(_get_file, owner, direction, name)

    async def list_files(self, owner: str, direction: str | None = None, after: str = "",
                         limit: int = 100) -> list[FileRecord]:
        """The owner's files with name > ``after``, by name then direction."""
        check_limit(limit)
        return await self._run(_list_files, owner, direction, after, limit)

    async def find_file(self, owners: Sequence[str], direction: str, sha256: str
                        ) -> FileRecord | None:
        """A file of one of ``owners`` in ``direction`` naming blob ``sha256``."""
        return await self._run(_find_file, list(owners), direction, sha256)

    async def delete_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """Delete one file; returns it, or ``None``."""
        return await self._run(in_transaction, _delete_file, owner, direction, name)

    async def purge_files(self, before: int, uploads_before: int
                          ) -> tuple[list[str], list[str]]:
        """Delete old ``up`` files and old uploads; see ``FileStore.purge_files``."""
        return await self._run(in_transaction, _purge_files, before, uploads_before)

    async def digests_in_use(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that a file or an upload still names."""
        return await self._run(_digests_in_use, list(digests))


def _file(row: Sequence[Any]) -> FileRecord:
    owner, direction, name, sha256, size, meta, created = row
    return FileRecord(owner, direction, name, sha256, size, loads(meta), created)


def _upload(row: Sequence[Any]) -> UploadRecord:
    upload_id, device, name, sha256, size, meta, created = row
    return UploadRecord(upload_id, device, name, sha256, size, loads(meta), created)


def _begin_upload(conn: sqlite3.Connection, upload: UploadRecord, quota: int | None
                  ) -> tuple[UploadRecord, list[str]]:
    require_device(conn, upload.device)
    mine = [_upload(row) for row in conn.execute(
        f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE device = ? AND name = ?",
        (upload.device, upload.name))]
    for existing in mine:
        if existing.sha256 == upload.sha256:
            return existing, []
    if quota is not None:
        files = conn.execute("SELECT name, size FROM files WHERE owner = ? AND direction = ?",
                             (device_owner(upload.device), UP)).fetchall()
        uploads = conn.execute("SELECT id, name, size FROM uploads WHERE device = ?",
                               (upload.device,)).fetchall()
        used = quota_used(files, uploads, upload.name, upload.id)
        if used + upload.size > quota:
            raise QuotaExceeded(f"device {upload.device!r} would hold {used + upload.size}"
                                f" bytes of files, over its quota of {quota}",
                                {"quota": quota, "used": used, "size": upload.size})
    conn.execute("DELETE FROM uploads WHERE device = ? AND name = ?",
                 (upload.device, upload.name))
    conn.execute(f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (upload.id, upload.device, upload.name, upload.sha256, upload.size,
                  json_text(upload.meta), upload.created))
    return _get_upload(conn, upload.id) or upload, [u.id for u in mine]


def _get_upload(conn: sqlite3.Connection, upload_id: str) -> UploadRecord | None:
    row = conn.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = ?",
                       (upload_id,)).fetchone()
    return None if row is None else _upload(row)


def _finish_upload(conn: sqlite3.Connection, upload_id: str, now: int
                   ) -> tuple[FileRecord, str | None]:
    upload = _get_upload(conn, upload_id)
    if upload is None:
        raise NotFound(f"no upload {upload_id!r}", {"upload": upload_id})
    device = require_device(conn, upload.device)
    conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
    record = FileRecord(device_owner(device.id), UP, upload.name, upload.sha256, upload.size,
                        upload.meta, now)
    old = _put_file(conn, record)
    insert_values(conn, f"INSERT INTO feed ({FEED_COLUMNS})",
                  [file_feed_row(record, device.id, device.fleet, now)])
    return record, old


def _drop_upload(conn: sqlite3.Connection, upload_id: str) -> bool:
    return conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,)).rowcount > 0


def _put_file(conn: sqlite3.Connection, record: FileRecord) -> str | None:
    old = _get_file(conn, record.owner, record.direction, record.name)
    conn.execute(
        f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (owner, direction, name) DO UPDATE SET sha256 = excluded.sha256,"
        " size = excluded.size, meta = excluded.meta, created = excluded.created",
        (record.owner, record.direction, record.name, record.sha256, record.size,
         json_text(record.meta), record.created))
    return None if old is None else old.sha256


def _get_file(conn: sqlite3.Connection, owner: str, direction: str, name: str
              ) -> FileRecord | None:
    row = conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = ? AND direction = ?"
                       " AND name = ?", (owner, direction, name)).fetchone()
    return None if row is None else _file(row)


def _list_files(conn: sqlite3.Connection, owner: str, direction: str | None, after: str,
                limit: int) -> list[FileRecord]:
    rows = conn.execute(
        f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = ? AND name > ?"
        " AND (? IS NULL OR direction = ?) ORDER BY name, direction LIMIT ?",
        (owner, after, direction, direction, limit)).fetchall()
    return [_file(row) for row in rows]


def _find_file(conn: sqlite3.Connection, owners: list[str], direction: str, sha256: str
               ) -> FileRecord | None:
    if not owners:
        return None
    marks = ", ".join("?" * len(owners))
    row = conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE sha256 = ? AND direction = ?"
                       f" AND owner IN ({marks}) ORDER BY owner, name LIMIT 1",
                       (sha256, direction, *owners)).fetchone()
    return None if row is None else _file(row)


def _delete_file(conn: sqlite3.Connection, owner: str, direction: str, name: str
                 ) -> FileRecord | None:
    old = _get_file(conn, owner, direction, name)
    if old is not None:
        conn.execute("DELETE FROM files WHERE owner = ? AND direction = ? AND name = ?",
                     (owner, direction, name))
    return old


def _purge_files(conn: sqlite3.Connection, before: int, uploads_before: int
                 ) -> tuple[list[str], list[str]]:
    digests = [row[0] for row in conn.execute(
        "DELETE FROM files WHERE direction = ? AND created < ? RETURNING sha256", (UP, before))]
    uploads = [row[0] for row in conn.execute(
        "DELETE FROM uploads WHERE created < ? RETURNING id", (uploads_before,))]
    return digests, uploads


def _digests_in_use(conn: sqlite3.Connection, digests: list[str]) -> set[str]:
    used: set[str] = set()
    for digest in digests:
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM files WHERE sha256 = ?)"
                           " OR EXISTS (SELECT 1 FROM uploads WHERE sha256 = ?)",
                           (digest, digest)).fetchone()
        if row[0]:
            used.add(digest)
    return used
