"""Files and uploads in memory (the :class:`~crdtsync_server.store.roles.FileStore` role)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from crdtsync.errors import NotFound, QuotaExceeded

from ..feed import json_text
from ..files import UP, FileRecord, UploadRecord, device_owner, file_feed_row, quota_used
from ..rules import check_limit
from .feed import MemoryFeed

FileKey = tuple[str, str, str]
"""``(owner, direction, name)``."""


def _copy_meta(record: FileRecord | UploadRecord) -> FileRecord | UploadRecord:
    """The record with its meta through JSON, as a database stores it."""
    return dataclasses.replace(record, meta=json.loads(json_text(record.meta)))


class MemoryFiles(MemoryFeed):
    """The :class:`FileStore` role over :class:`MemoryState` (a finished upload appends to
    the feed, :class:`MemoryFeed`'s)."""

    async def begin_upload(self, upload: UploadRecord, quota: int | None
                           ) -> tuple[UploadRecord, list[str]]:
        """See ``FileStore.begin_upload``."""
        self._check_open()
        self._require_device(upload.device)
        mine = [u for u in self._uploads.values()
                if u.device == upload.device and u.name == upload.name]
        for existing in mine:
            if existing.sha256 == upload.sha256:
                return existing, []
        if quota is not None:
            owner = device_owner(upload.device)
            files = [(f.name, f.size) for (o, d, _), f in self._files.items()
                     if o == owner and d == UP]
            uploads = [(u.id, u.name, u.size) for u in self._uploads.values()
                       if u.device == upload.device]
            used = quota_used(files, uploads, upload.name, upload.id)
            if used + upload.size > quota:
                raise QuotaExceeded(f"device {upload.device!r} would hold {used + upload.size}"
                                    f" bytes of files, over its quota of {quota}",
                                    {"quota": quota, "used": used, "size": upload.size})
        for existing in mine:
            del self._uploads[existing.id]
        stored = _copy_meta(upload)
        assert isinstance(stored, UploadRecord)
        self._uploads[upload.id] = stored
        return stored, [u.id for u in mine]

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        """One upload in progress, or ``None``."""
        self._check_open()
        return self._uploads.get(upload_id)

    async def finish_upload(self, upload_id: str, now: int) -> tuple[FileRecord, str | None]:
        """See ``FileStore.finish_upload``."""
        self._check_open()
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise NotFound(f"no upload {upload_id!r}", {"upload": upload_id})
        device = self._require_device(upload.device)
        del self._uploads[upload_id]
        record = FileRecord(device_owner(upload.device), UP, upload.name, upload.sha256,
                            upload.size, upload.meta, now)
        old = self._files.get((record.owner, UP, record.name))
        self._files[(record.owner, UP, record.name)] = record
        self._append_feed([file_feed_row(record, device.id, device.fleet, now)])
        return record, None if old is None else old.sha256

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload in progress; whether it existed."""
        self._check_open()
        return self._uploads.pop(upload_id, None) is not None

    async def put_file(self, record: FileRecord) -> str | None:
        """Store ``record``; returns the SHA-256 of the file it replaced."""
        self._check_open()
        key = (record.owner, record.direction, record.name)
        old = self._files.get(key)
        stored = _copy_meta(record)
        assert isinstance(stored, FileRecord)
        self._files[key] = stored
        return None if old is None else old.sha256

    async def get_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """One file, or ``None``."""
        self._check_open()
        return self._files.get((owner, direction, name))

    async def list_files(self, owner: str, direction: str | None = None, after: str = "",
                         limit: int = 100) -> list[FileRecord]:
        """The owner's files with name > ``after``, by name then direction."""
        self._check_open()
        check_limit(limit)
        found = sorted((name, d) for (o, d, name) in self._files
                       if o == owner and name > after and direction in (None, d))
        return [self._files[(owner, d, name)] for name, d in found[:limit]]

    async def find_file(self, owners: Sequence[str], direction: str, sha256: str
                        ) -> FileRecord | None:
        """A file of one of ``owners`` in ``direction`` naming blob ``sha256``."""
        self._check_open()
        return next((f for (o, d, _), f in sorted(self._files.items())
                     if o in owners and d == direction and f.sha256 == sha256), None)

    async def delete_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """Delete one file; returns it, or ``None``."""
        self._check_open()
        return self._files.pop((owner, direction, name), None)

    async def purge_files(self, before: int, uploads_before: int
                          ) -> tuple[list[str], list[str]]:
        """Delete old ``up`` files and old uploads; see ``FileStore.purge_files``."""
        self._check_open()
        old: list[FileKey] = [key for key, f in self._files.items()
                              if key[1] == UP and f.created < before]
        digests = [self._files.pop(key).sha256 for key in old]
        uploads = [uid for uid, u in self._uploads.items() if u.created < uploads_before]
        for uid in uploads:
            del self._uploads[uid]
        return digests, uploads

    async def digests_in_use(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that a file or an upload still names."""
        self._check_open()
        named = {f.sha256 for f in self._files.values()}
        named.update(u.sha256 for u in self._uploads.values())
        return named.intersection(digests)
