"""Files both ways, the policy over the store's records (:class:`~.store.roles.FileStore`)
and the blobs (:mod:`crdtsync_server.blobs`): limits, quota, the resumable upload, the
cloud's streamed put, announcements to devices and retention.

Device to cloud (docs/protocol.md section 19): the device declares a file (name, size,
SHA-256, meta) and gets an upload id and the offset to resume from; it appends chunks at
that offset; the last chunk seals the part into a blob (only if the whole SHA-256 matches)
and turns the upload into a file with its one ``file`` feed item, in one transaction.

Cloud to device: the bytes are streamed into a part while hashed, sealed, recorded as a
``down`` file, and announced in the ``files`` root map of the device's ``state`` document
(a device's file) or of its fleet's shared document (a fleet's file): devices learn of it
at their next sync like any cloud write, with no extra cost on the sync path, and a device
that joins the fleet later finds it there too. Devices download blobs by SHA-256 with
range requests (``GET /v1/files/blobs/{sha256}``).

Blobs no record names any more are deleted; in one process under a lock shared with the
writes that name a blob, so a blob is never deleted between its seal and its record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from crdtsync.errors import (
    CrdtsyncError,
    DigestMismatch,
    FileTooLarge,
    InvalidValue,
    MalformedRequest,
    NotFound,
    OffsetMismatch,
)

from .blobs import READ_BLOCK, BlobStore, DirectoryBlobs, MemoryBlobs
from .config import ServerConfig
from .feed import FeedNotifier
from .store import DeviceRecord, MemoryStore, SQLiteStore, Store
from .store.feed import json_text
from .store.files import (
    DOWN,
    UP,
    FileRecord,
    UploadRecord,
    check_file_name,
    check_sha256,
    device_owner,
    fleet_owner,
)
from .sync import SyncService, fleet_key

log = logging.getLogger("crdtsync.server")

FILES_MAP = "files"
"""The root map announcing a device's or a fleet's files: ``{name: {"sha256", "size",
"meta"}}`` in the device's ``state`` document or the fleet's shared document."""

MAX_META = 4096
"""Bytes of a file's ``meta`` as JSON at most."""


def open_blobs(config: ServerConfig, store: Store) -> BlobStore:
    """The blob store for ``config`` and ``store``: ``files_dir`` if set, else a directory
    next to a SQLite database, the database itself on PostgreSQL, memory beside any other
    store (memory, a simulation's)."""
    if config.files_dir:
        return DirectoryBlobs(config.files_dir)
    if isinstance(store, SQLiteStore):
        return DirectoryBlobs(f"{store.path}.files")
    if not isinstance(store, MemoryStore):
        try:  # only here: asyncpg is optional
            from .store.postgres import PostgresStore
            from .store.postgres.blobs import PostgresBlobs
        except ImportError:
            return MemoryBlobs()
        if isinstance(store, PostgresStore):
            return PostgresBlobs(store)
    return MemoryBlobs()


def _background(write: Coroutine[Any, Any, int]) -> asyncio.Future[int]:
    """``write`` running on its own; its failure is kept for whoever awaits it next (and
    not reported as never retrieved if nobody does)."""
    task = asyncio.ensure_future(write)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _check_and_hash(data: bytes, expected: str | None, running: Any) -> Any:
    """The ``running`` SHA-256 (if any) advanced over ``data`` if ``data`` hashes to
    ``expected`` (``None``: not checked), else ``False``. The check and the running hash
    run at once in two worker threads (hashlib lets go of the GIL for large buffers), the
    latter on a copy that only a chunk that passed replaces."""
    advanced = running.copy() if running is not None else None
    hashing = (asyncio.to_thread(advanced.update, data) if advanced is not None
               else asyncio.sleep(0))
    if expected is None:
        await hashing
        return advanced
    digest, _ = await asyncio.gather(asyncio.to_thread(_sha256_hex, data), hashing)
    return advanced if digest == expected else False


def check_meta(meta: Any) -> Any:
    """``meta`` if it is JSON data of at most :data:`MAX_META` bytes, else
    :class:`InvalidValue`."""
    try:
        size = len(json_text(meta).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"file meta is not JSON data: {exc}") from exc
    if size > MAX_META:
        raise InvalidValue(f"file meta over {MAX_META} bytes as JSON", {"max_meta": MAX_META})
    return meta


class FileService:
    """Files of one server process over ``store`` and ``blobs``."""

    def __init__(self, config: ServerConfig, store: Store, blobs: BlobStore,
                 sync: SyncService, feed: FeedNotifier) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.sync = sync
        self.feed = feed
        self._parts: dict[str, asyncio.Lock] = {}
        self._writes: dict[str, tuple[int, asyncio.Future[int]]] = {}
        """Per upload, the write of its last chunk still in flight, and where it ends."""
        self._hashing: dict[str, tuple[int, Any]] = {}
        """Per upload, the SHA-256 of the bytes this process appended in order from 0 (and
        up to where): the last chunk then needs no second pass over the whole file."""
        self._arriving: dict[str, list[tuple[int, asyncio.Event]]] = {}
        """Per upload, the chunks being received (their offset, and an event set when the
        request is done with), so that a chunk ahead of the part waits for the one before."""
        self._naming = asyncio.Lock()
        """Held while a blob is sealed and recorded, and while unnamed blobs are deleted."""

    def _check_size(self, size: int) -> None:
        if size > self.config.max_file_size:
            raise FileTooLarge(f"file of {size} bytes over the limit of"
                               f" {self.config.max_file_size}",
                               {"max_file_size": self.config.max_file_size, "size": size})

    # --- device to cloud ------------------------------------------------------------------

    async def begin_upload(self, device: DeviceRecord, name: str, size: int, sha256: str,
                           meta: Any) -> dict[str, Any]:
        """Start or resume ``device``'s upload of ``name``; returns ``{"id", "offset",
        "size", "chunk", "complete"}``. A file of that name with that SHA-256 already
        stored is complete at once (a finished upload whose answer was lost), and so is
        one whose blob the cloud already holds (same bytes stored once). Raises
        :class:`FileTooLarge`, :class:`QuotaExceeded`, :class:`MalformedRequest`."""
        check_file_name(name)
        check_sha256(sha256)
        check_meta(meta)
        if size < 0:
            raise MalformedRequest("size must be an integer >= 0")
        self._check_size(size)
        done = await self.store.get_file(device_owner(device.id), UP, name)
        if done is not None and done.sha256 == sha256 and done.size == size:
            return self._answer("", size, size, done)
        upload = UploadRecord(secrets.token_hex(16), device.id, name, sha256, size, meta,
                              self.config.clock())
        stored, replaced = await self.store.begin_upload(upload, self.config.file_quota)
        for part in replaced:
            async with self._part_lock(part):
                await self._settled(part)
                await self.blobs.drop_part(part)
        async with self._part_lock(stored.id):
            offset = await self._settled(stored.id)
            if await self.blobs.blob_size(sha256) == size:
                return await self._finish(stored)
        return self._answer(stored.id, offset, size)

    def _answer(self, upload_id: str, offset: int, size: int,
                record: FileRecord | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": upload_id, "offset": offset, "size": size,
                                  "chunk": self.config.file_chunk,
                                  "complete": record is not None}
        if record is not None:
            answer["file"] = record.to_json()
        return answer

    async def write_chunk(self, device: DeviceRecord, upload_id: str, offset: int,
                          length: int, body: Callable[[], Awaitable[bytes]],
                          chunk_sha256: str | None) -> dict[str, Any]:
        """Append the ``length`` bytes ``body()`` reads at ``offset`` of ``device``'s upload
        ``upload_id`` (checked against ``chunk_sha256`` first when given); the chunk that
        completes it finishes the upload. The body is read only once the upload is known.

        Chunks may arrive on several connections at once (a client keeping a window of
        chunks in flight): a chunk that starts beyond the part's end waits for a chunk
        still being received that starts at that end, then goes on in order; without one
        it is refused (:class:`OffsetMismatch`).

        Returns the same answer as :meth:`begin_upload`. Raises :class:`NotFound` (no such
        upload of this device: finished or dropped; declare it again),
        :class:`DigestMismatch` (``scope`` ``chunk``: nothing written; ``file``: the whole
        file did not match, the upload starts over at 0), :class:`OffsetMismatch`."""
        upload = await self.store.get_upload(upload_id)
        if upload is None or upload.device != device.id:
            raise NotFound(f"no upload {upload_id!r} of this device", {"upload": upload_id})
        if offset + length > upload.size:
            raise MalformedRequest(f"chunk ends at {offset + length}, beyond the declared"
                                   f" size {upload.size}", {"size": upload.size})
        arriving = self._arriving.setdefault(upload_id, [])
        me = (offset, asyncio.Event())
        arriving.append(me)
        try:
            data = await body()
            while True:
                async with self._part_lock(upload_id):
                    if offset == await self._end(upload_id):
                        return await self._append(upload, offset, data, chunk_sha256)
                    stored = await self._settled(upload_id)
                    if offset == stored:
                        return await self._append(upload, offset, data, chunk_sha256)
                    before = next((event for start, event in arriving
                                   if start == stored and event is not me[1]), None)
                    if offset < stored or before is None:
                        raise OffsetMismatch(f"the part ends at {stored}, not {offset}",
                                             {"offset": stored})
                await before.wait()
        finally:
            arriving.remove(me)
            me[1].set()
            if not arriving:
                self._arriving.pop(upload_id, None)

    async def _append(self, upload: UploadRecord, offset: int, data: bytes,
                      chunk_sha256: str | None) -> dict[str, Any]:
        """Check and append a chunk at the part's end (under its lock). It is checked and
        hashed while the write of the chunk before it (if any) goes on; a failure of that
        write is then an :class:`OffsetMismatch` for this one."""
        running = await _check_and_hash(data, chunk_sha256, self._running(upload.id, offset))
        if running is False:
            raise DigestMismatch("the chunk does not match its X-Chunk-Sha256",
                                 {"scope": "chunk", "offset": offset})
        stored = await self._settled(upload.id)
        if stored != offset:  # the write before it failed: the running hash is gone too
            raise OffsetMismatch(f"the part ends at {stored}, not {offset}", {"offset": stored})
        end = offset + len(data)
        if running is not None:
            self._hashing[upload.id] = (end, running)
        if end < upload.size:
            # Written while the next chunk travels: the offset answered is where the
            # part will end. Should the write fail (or the process die first), the
            # next chunk is told the true end (offset_mismatch) and the device
            # resends from there.
            self._writes[upload.id] = (end, _background(
                self.blobs.append_part(upload.id, offset, data)))
            return self._answer(upload.id, end, upload.size)
        await self.blobs.append_part(upload.id, offset, data)
        return await self._finish(upload)

    async def _settled(self, upload_id: str) -> int:
        """Where the part of ``upload_id`` ends, once its write in flight (if any) is
        done; a failed one is logged, and forgets the running hash."""
        pending = self._writes.pop(upload_id, None)
        if pending is not None:
            try:
                await pending[1]
            except (CrdtsyncError, OSError) as exc:
                self._hashing.pop(upload_id, None)
                log.warning("upload %s: a chunk's write failed (%s); the device resends it",
                            upload_id, exc)
        return await self.blobs.part_size(upload_id)

    async def _end(self, upload_id: str) -> int:
        """Where the part of ``upload_id`` will end once its write in flight (if any) is
        done, without waiting for it."""
        pending = self._writes.get(upload_id)
        return pending[0] if pending is not None else await self.blobs.part_size(upload_id)

    async def drain(self) -> None:
        """Wait for every chunk write in flight (at shutdown)."""
        for upload_id in list(self._writes):
            await self._settled(upload_id)

    def _running(self, upload_id: str, offset: int) -> Any:
        """The running SHA-256 of ``upload_id`` if this process hashed every byte before
        ``offset`` (a fresh one at 0), else ``None`` (the seal will hash the part)."""
        if offset == 0:
            return hashlib.sha256()
        known = self._hashing.get(upload_id)
        if known is not None and known[0] == offset:
            return known[1]
        self._hashing.pop(upload_id, None)
        return None

    async def _finish(self, upload: UploadRecord) -> dict[str, Any]:
        known = self._hashing.pop(upload.id, None)
        hashed = (known[1].hexdigest() == upload.sha256 if known is not None
                  and known[0] == upload.size else None)
        async with self._naming:
            if await self.blobs.blob_size(upload.sha256) == upload.size:
                await self.blobs.drop_part(upload.id)  # same bytes stored before
            elif hashed is False or not await self.blobs.seal(upload.id, upload.sha256,
                                                             hashed=bool(hashed)):
                await self.blobs.drop_part(upload.id)
                raise DigestMismatch("the uploaded bytes do not match the declared sha256; the"
                                     " upload starts over at offset 0",
                                     {"scope": "file", "offset": 0})
            record, old = await self.store.finish_upload(upload.id, self.config.clock())
        self.feed.notify()
        log.info("file %s of device %s stored (%d bytes)", record.name, upload.device,
                 record.size)
        await self._forget([old] if old else [])
        return self._answer(upload.id, record.size, record.size, record)

    def _part_lock(self, part: str) -> asyncio.Lock:
        lock = self._parts.get(part)
        if lock is None:
            lock = self._parts[part] = asyncio.Lock()
        if len(self._parts) > 10_000:  # forget idle ones
            self._parts = {k: v for k, v in self._parts.items() if v.locked() or k == part}
        return lock

    # --- cloud to device ------------------------------------------------------------------

    async def put(self, owner: str, name: str, body: AsyncIterator[bytes], meta: Any = None
                  ) -> FileRecord:
        """Store the bytes ``body`` yields as ``owner``'s (``device_owner`` /
        ``fleet_owner``) ``down`` file ``name``, hashing them on the way (never whole in
        memory), and announce it to the device or fleet; returns the record. Raises
        :class:`FileTooLarge` as soon as the bytes pass ``max_file_size``, with nothing
        stored; what ``body`` raises, likewise; what the announcement raises (the device's
        fleet schema refusing its ``files`` map: ``SchemaViolation``, ``Forbidden``) after
        undoing the record."""
        check_file_name(name)
        check_meta(meta)
        part = f"put-{secrets.token_hex(16)}"
        previous = await self.store.get_file(owner, DOWN, name)
        try:
            sha256, size = await self._receive(part, body)
            async with self._naming:
                await self.blobs.seal(part, sha256, hashed=True)
                record = FileRecord(owner, DOWN, name, sha256, size, meta, self.config.clock())
                await self.store.put_file(record)
        finally:
            await self.blobs.drop_part(part)
        try:
            await self._announce(owner, name, {"sha256": sha256, "size": size, "meta": meta})
        except CrdtsyncError:  # e.g. the fleet's schema refuses the `files` map: undo
            if previous is None:
                await self.store.delete_file(owner, DOWN, name)
            else:
                await self.store.put_file(previous)
            await self._forget([sha256])
            raise
        old = previous.sha256 if previous is not None else None
        await self._forget([old] if old and old != sha256 else [])
        return record

    async def _receive(self, part: str, body: AsyncIterator[bytes]) -> tuple[str, int]:
        digest = hashlib.sha256()
        buffer = bytearray()
        size = 0
        async for block in body:
            size += len(block)
            self._check_size(size)
            digest.update(block)
            buffer += block
            if len(buffer) >= READ_BLOCK:
                await self.blobs.append_part(part, size - len(buffer), bytes(buffer))
                buffer.clear()
        await self.blobs.append_part(part, size - len(buffer), bytes(buffer))
        return digest.hexdigest(), size

    async def _announce(self, owner: str, name: str, entry: dict[str, Any] | None) -> None:
        kind, _, target = owner.partition(":")
        if kind == "d":
            await self.sync.write_state(target, FILES_MAP, {name: entry})
        else:
            await self.sync.write_shared(fleet_key(target), FILES_MAP, {name: entry})

    async def delete(self, owner: str, direction: str, name: str) -> FileRecord:
        """Delete a file (and its announcement, for a ``down`` one); :class:`NotFound`."""
        record = await self.store.delete_file(owner, direction, name)
        if record is None:
            raise NotFound(f"no file {name!r}", {"file": name})
        if direction == DOWN:
            await self._announce(owner, name, None)
        await self._forget([record.sha256])
        return record

    async def forget_device(self, device_id: str) -> int:
        """Delete every file of a deleted device (its blobs too, unless something else
        names them); returns how many. Its uploads in progress go with the retention of
        uploads."""
        owner = device_owner(device_id)
        gone = 0
        while records := await self.store.list_files(owner, limit=1000):
            for record in records:
                await self.store.delete_file(owner, record.direction, record.name)
            await self._forget([record.sha256 for record in records])
            gone += len(records)
        return gone

    async def readable(self, device: DeviceRecord, sha256: str) -> FileRecord:
        """The ``down`` file of ``device`` or its fleet whose blob is ``sha256``:
        what a device may download. :class:`NotFound` otherwise."""
        check_sha256(sha256)
        owners = [device_owner(device.id)]
        if device.fleet:
            owners.append(fleet_owner(device.fleet))
        record = await self.store.find_file(owners, DOWN, sha256)
        if record is None:
            raise NotFound("no file with this sha256 for this device", {"sha256": sha256})
        return record

    def local_path(self, record: FileRecord) -> Path | None:
        """A local file holding ``record``'s bytes, if the blob store has one."""
        return self.blobs.local_path(record.sha256)

    # --- retention ------------------------------------------------------------------------

    async def purge(self, now: int) -> int:
        """Delete uploaded files older than ``file_retention_ms`` (if set) and uploads
        older than ``upload_retention_ms``, with the blobs nothing names any more; returns
        how many files and uploads went."""
        before = (now - self.config.file_retention_ms
                  if self.config.file_retention_ms is not None else 0)
        digests, uploads = await self.store.purge_files(
            before, now - self.config.upload_retention_ms)
        for part in uploads:
            await self.blobs.drop_part(part)
        await self._forget(digests)
        return len(digests) + len(uploads)

    async def _forget(self, digests: Sequence[str]) -> None:
        """Delete those of the blobs ``digests`` that no file or upload names."""
        if not digests:
            return
        async with self._naming:
            unused = set(digests) - await self.store.digests_in_use(digests)
            await self.blobs.delete_blobs(sorted(unused))
