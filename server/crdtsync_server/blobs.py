"""The bytes of files: content-addressed blobs, and the parts of uploads in progress.

A blob is named by the SHA-256 of its bytes, so the same bytes are stored once whatever
names, devices or fleets point at them (the names are records of the store's
:class:`~crdtsync_server.store.roles.FileStore`). A blob only ever comes into being whole
and verified: bytes arrive as a *part* (appended in order, at the offset where the part
ends), and :meth:`BlobStore.seal` hashes the part and, only if it matches, makes it the
blob in one atomic step. Nothing reads a part but :meth:`BlobStore.part_size`.

Backends: :class:`DirectoryBlobs` (the default: files under a directory next to the SQLite
database), :class:`MemoryBlobs` (tests, simulations) and ``PostgresBlobs``
(``store/postgres/blobs.py``: ``BYTEA`` chunks in the database, shared by every instance).
Which blobs may go is the caller's decision (``crdtsync_server.files``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from crdtsync._disk import fsync_dir, size_or_zero, unlink_missing_ok, write_behind
from crdtsync.errors import OffsetMismatch

fcntl: Any
try:  # POSIX: appends of several server processes to one part are serialised
    import fcntl
except ImportError:  # pragma: no cover (Windows: one server process, nothing to serialise)
    fcntl = None

READ_BLOCK = 1024 * 1024
"""Bytes read at a time when hashing or serving a blob: memory stays flat in file size."""


class BlobStore(Protocol):
    """Blobs by SHA-256 (hex) and parts by id. Every method may run concurrently with
    others on other parts; callers serialise the writers of one part."""

    async def part_size(self, part: str) -> int:
        """Bytes stored of ``part`` (0 when it does not exist)."""

    async def append_part(self, part: str, offset: int, data: bytes) -> int:
        """Append ``data`` to ``part`` (created if missing) if ``offset`` is where it ends;
        returns its new size. :class:`OffsetMismatch` (``detail.offset``: its size) with
        nothing written otherwise."""

    async def seal(self, part: str, sha256: str, *, hashed: bool = False) -> bool:
        """Hash ``part``; if it hashes to ``sha256``, make it blob ``sha256`` (already there:
        kept) atomically and durably, and return ``True``. The part is gone either way.
        ``hashed``: the caller hashed every byte it appended and they match; the part is
        not read again."""

    async def drop_part(self, part: str) -> None:
        """Delete ``part`` if it exists."""

    async def blob_size(self, sha256: str) -> int | None:
        """The size of blob ``sha256``, or ``None`` if there is none."""

    def local_path(self, sha256: str) -> Path | None:
        """A local file holding blob ``sha256`` (served with ``sendfile``), or ``None`` when
        this backend has none (then :meth:`read_blob`)."""

    def read_blob(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of blob ``sha256``, in blocks of at most
        :data:`READ_BLOCK`; ``FileNotFoundError`` if it does not exist."""

    async def delete_blobs(self, digests: Sequence[str]) -> None:
        """Delete the blobs named (missing ones are ignored)."""


class DirectoryBlobs:
    """Blobs as files ``<root>/blobs/<sha[:2]>/<sha>``, parts as ``<root>/parts/<id>``.

    A part becomes a blob by ``fsync`` then ``rename`` (atomic on POSIX), then ``fsync`` of
    the directory: a crash leaves either no blob or the whole verified one. File I/O runs in
    threads, never on the event loop. A process killed while appending leaves a part whose
    length includes what it wrote: bytes of a chunk that was checked whole before it was
    written, so still a correct prefix; the final SHA-256 catches anything else."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._parts = self.root / "parts"

    def __repr__(self) -> str:
        return f"<DirectoryBlobs {str(self.root)!r}>"

    def _part(self, part: str) -> Path:
        return self._parts / part

    def _blob(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    async def part_size(self, part: str) -> int:
        return await asyncio.to_thread(size_or_zero, self._part(part))

    async def append_part(self, part: str, offset: int, data: bytes) -> int:
        return await asyncio.to_thread(self._append, self._part(part), offset, data)

    def _append(self, path: Path, offset: int, data: bytes) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            # Locked from the size check to the end of the write: server processes sharing
            # the directory (serve --workers) never both append at one offset.
            if fcntl is not None:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
            size = os.fstat(out.fileno()).st_size
            if size != offset:
                raise OffsetMismatch(f"the part ends at {size}, not {offset}",
                                     {"offset": size})
            out.write(data)
            out.flush()
            write_behind(out.fileno(), offset, len(data))  # the seal's fsync is short
        return size + len(data)

    async def seal(self, part: str, sha256: str, *, hashed: bool = False) -> bool:
        return await asyncio.to_thread(self._seal, self._part(part), sha256, hashed)

    def _seal(self, path: Path, sha256: str, hashed: bool) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # an empty file is a part too
        if not hashed and _file_sha256(path) != sha256:
            path.unlink()
            return False
        target = self._blob(sha256)
        if target.exists():
            path.unlink()
            os.utime(target)
            return True
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb+") as part_file:
            os.fsync(part_file.fileno())
        os.replace(path, target)
        fsync_dir(target.parent)
        return True

    async def drop_part(self, part: str) -> None:
        await asyncio.to_thread(unlink_missing_ok, self._part(part))

    async def blob_size(self, sha256: str) -> int | None:
        path = self._blob(sha256)
        return await asyncio.to_thread(lambda: path.stat().st_size if path.exists() else None)

    def local_path(self, sha256: str) -> Path | None:
        return self._blob(sha256)

    async def read_blob(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, self._blob(sha256), "rb")
        try:
            await asyncio.to_thread(handle.seek, start)
            while start < end:
                block = await asyncio.to_thread(handle.read, min(READ_BLOCK, end - start))
                if not block:
                    return
                start += len(block)
                yield block
        finally:
            handle.close()

    async def delete_blobs(self, digests: Sequence[str]) -> None:
        for digest in digests:
            await asyncio.to_thread(unlink_missing_ok, self._blob(digest))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class MemoryBlobs:
    """Blobs and parts in dicts (tests and simulations); nothing persists."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._parts: dict[str, bytearray] = {}

    async def part_size(self, part: str) -> int:
        return len(self._parts.get(part, b""))

    async def append_part(self, part: str, offset: int, data: bytes) -> int:
        stored = self._parts.setdefault(part, bytearray())
        if len(stored) != offset:
            raise OffsetMismatch(f"the part ends at {len(stored)}, not {offset}",
                                 {"offset": len(stored)})
        stored += data
        return len(stored)

    async def seal(self, part: str, sha256: str, *, hashed: bool = False) -> bool:
        data = bytes(self._parts.pop(part, b""))
        if not hashed and hashlib.sha256(data).hexdigest() != sha256:
            return False
        self._blobs.setdefault(sha256, data)
        return True

    async def drop_part(self, part: str) -> None:
        self._parts.pop(part, None)

    async def blob_size(self, sha256: str) -> int | None:
        data = self._blobs.get(sha256)
        return None if data is None else len(data)

    def local_path(self, sha256: str) -> Path | None:
        return None

    async def read_blob(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        if sha256 not in self._blobs:
            raise FileNotFoundError(sha256)
        data = self._blobs[sha256]
        for at in range(start, min(end, len(data)), READ_BLOCK):
            yield data[at:min(at + READ_BLOCK, end)]

    async def delete_blobs(self, digests: Sequence[str]) -> None:
        for digest in digests:
            self._blobs.pop(digest, None)
