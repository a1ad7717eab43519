"""A device's files both ways (docs/protocol.md section 19): the durable send queue and its
resumable upload, and the downloads of the files the cloud announces.

Sending: :meth:`FileTransfers.queue` copies the source into ``<path>.files/out/<sha256>``
while hashing it, then records it in ``files_out`` (the device's SQLite): from then on the
file survives restarts and whatever happens to the source. (A copy, not a reference to the
source's path: a reference would have to trust that nobody rewrites or deletes the source
before the last byte is out, and a digest taken at queueing time would then fail at the
end; the copy costs disk for the time the file waits.) The upload asks the cloud where to
resume (``POST /v1/files/uploads``), sends chunks from there (``PUT
/v1/files/uploads/{id}?offset=``, each with its SHA-256, :data:`WINDOW` of them in flight),
and forgets the file once the cloud answered ``complete``: the cloud verified the whole
SHA-256 first.

Receiving: after each sync the device reads the ``files`` map of its fleet's document and
of its own (its own wins), and downloads each announced file it does not hold by SHA-256
(``GET /v1/files/blobs/{sha256}``) into ``<path>.files/in/.part-<sha256>``, resuming with a
``Range`` from what is there after any cut, verifies the SHA-256, moves it to
``in/<sha256>`` and records it in ``files_in``. Handlers registered with ``on_file`` then
run; once they returned the file is marked handled, so they run once (again only if the
device dies between their end and that mark).

Transfers run in their own task (:meth:`FileTransfers.run`), never inside a sync: events
and state keep syncing while a file moves. Memory use is one chunk, whatever the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import secrets
import sqlite3
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from ._aio import wait_event
from ._device_store import DeviceStore
from ._disk import fsync_dir, size_or_zero, unlink_missing_ok, write_behind
from ._sqlite_worker import transaction
from .errors import (
    ClosedError,
    CrdtsyncError,
    DigestMismatch,
    NotFound,
    OffsetMismatch,
    TransportError,
    error_from_code,
)
from .protocol import FILE_NAME_RE
from .transport import describe

log = logging.getLogger("crdtsync.device")

FileSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]
"""What :meth:`Device.send_file` takes: a path, the bytes, or a binary file object."""

BLOCK = 1024 * 1024
"""Bytes read, hashed or written at a time."""
DEFAULT_CHUNK = 4 * 1024 * 1024
"""Upload chunk when the server does not say (it answers its ``chunk``)."""
WINDOW = 2
"""Chunks in flight at once: the next one travels while the server stores the one before
(docs/protocol.md 19.1); each on its own connection of the session's pool."""
MAX_DAMAGED = 5
"""Chunks in a row the cloud may refuse as damaged (``digest_mismatch``, scope ``chunk``)
before the upload stops with that error."""
RECHECK = 300.0
"""Seconds after which the transfer task tries again files that failed for good."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file as the device holds it: queued to send (``Device.pending_files``) or
    received and verified (``Device.files``)."""

    name: str
    size: int
    sha256: str
    meta: Any = None


@dataclass(slots=True)
class FileTransfer:
    """Progress of one transfer in flight: ``direction`` ``"up"`` or ``"down"``, ``done``
    bytes of ``total``."""

    name: str
    direction: str
    done: int
    total: int


class ChunkReader:
    """Chunks of a queued file with their SHA-256, read in a worker thread; the next one is
    read ahead while the current one travels."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size
        self._ahead: tuple[int, int, asyncio.Future[tuple[bytes, str]]] | None = None

    async def read(self, offset: int, size: int) -> tuple[bytes, str]:
        """Bytes ``offset`` to ``offset + size`` (or the end) and their SHA-256."""
        size = min(size, self._size - offset)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (offset, size):
            chunk = await ahead[2]
        else:
            if ahead is not None:
                await _settle(ahead[2])
            chunk = await asyncio.to_thread(_read_chunk, self._path, offset, size)
        following = offset + size
        if following < self._size:
            length = min(size, self._size - following)
            self._ahead = (following, length, asyncio.ensure_future(
                asyncio.to_thread(_read_chunk, self._path, following, length)))
        return chunk

    async def aclose(self) -> None:
        """Wait for a read ahead still running (its chunk is dropped)."""
        if self._ahead is not None:
            await _settle(self._ahead[2])
            self._ahead = None


async def _settle(future: asyncio.Future[Any]) -> None:
    with contextlib.suppress(Exception):
        await future


FileHandler = Callable[[FileInfo], Awaitable[None] | None]
ProgressCallback = Callable[[FileTransfer], None]


class FileClient:
    """The HTTP side: the upload calls and the range download, with the device's token
    (``token``: the token, or a function giving the current one, as a gateway's devices
    have: their token may be replaced while they run)."""

    def __init__(self, base_url: str, token: str | Callable[[], str],
                 session: Callable[[], aiohttp.ClientSession]) -> None:
        self.base_url = base_url
        self._token = token if callable(token) else (lambda: token)
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=60)

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"}

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self.base_url + path
        try:
            async with self._session().request(method, url, headers={
                    **self._headers, **kwargs.pop("headers", {})}, timeout=self._timeout,
                    **kwargs) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise TransportError(describe(exc, url)) from exc
        if status != 200:
            raise _error(data, status)
        if not isinstance(data, dict):
            raise TransportError(f"unexpected answer from {url}")
        return data

    async def begin(self, info: FileInfo) -> dict[str, Any]:
        """Declare ``info``; the server's ``{"id", "offset", "chunk", "complete"}``."""
        return await self._json("POST", "/v1/files/uploads", json={
            "name": info.name, "size": info.size, "sha256": info.sha256, "meta": info.meta})

    async def send(self, upload: str, offset: int, chunk: bytes, sha256: str
                   ) -> dict[str, Any]:
        """One chunk at ``offset``; the server's new state."""
        return await self._json(
            "PUT", f"/v1/files/uploads/{upload}?offset={offset}", data=_payload(chunk),
            headers={"X-Chunk-Sha256": sha256})

    async def download(self, sha256: str, start: int,
                       write: Callable[[list[bytes]], Awaitable[None]]) -> None:
        """Bytes ``start``.. of the announced blob ``sha256``, handed to ``write`` in
        lists of blocks of about :data:`BLOCK` bytes together (no copy into one buffer);
        after a cut, what arrived is handed over before the error is raised."""
        url = f"{self.base_url}/v1/files/blobs/{sha256}"
        headers = {**self._headers, **({"Range": f"bytes={start}-"} if start else {})}
        try:
            async with self._session().get(url, headers=headers,
                                           timeout=self._timeout) as resp:
                if resp.status not in (200, 206):
                    raise _error(await _json_or_none(resp), resp.status)
                if start and resp.status != 206:
                    raise TransportError("the server ignored the range")
                blocks: list[bytes] = []
                size = 0
                try:
                    async for block in resp.content.iter_any():
                        blocks.append(block)
                        size += len(block)
                        if size >= BLOCK:
                            full, blocks, size = blocks, [], 0
                            await write(full)
                finally:  # also after a cut: what arrived is a correct prefix, kept
                    if blocks:
                        await write(blocks)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(describe(exc, url)) from exc


class PartWriter:
    """Appends blocks to a download's part file in a worker thread, hashing them into
    ``running`` on the way, while the next blocks arrive: one write in flight at most, so
    memory stays at two blocks whatever the file size. ``written(n)`` is called as bytes
    land; :attr:`size` is the part's size."""

    def __init__(self, handle: IO[bytes], running: Any, written: Callable[[int], None]
                 ) -> None:
        self._handle = handle
        self._running = running
        self._written = written
        self._writing: asyncio.Future[int] | None = None
        self.size = handle.tell()

    @classmethod
    async def open(cls, path: Path, running: Any, written: Callable[[int], None]
                   ) -> PartWriter:
        """A writer appending to ``path`` (created if missing)."""
        handle = await asyncio.to_thread(open, path, "ab")
        return cls(handle, running, written)

    async def write(self, blocks: list[bytes]) -> None:
        """Wait for the write in flight (raising its error), then start writing
        ``blocks``."""
        await self._settle()
        self._writing = asyncio.ensure_future(
            asyncio.to_thread(_append_blocks, self._handle, blocks, self._running))

    async def _settle(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            size = await writing
            self.size += size
            self._written(size)

    async def aclose(self) -> None:
        """Finish the write in flight and close the file (its error raised)."""
        try:
            await self._settle()
        finally:
            await asyncio.to_thread(self._handle.close)


def _payload(chunk: bytes) -> aiohttp.BytesPayload:
    """``chunk`` as a body written to the socket in one call. aiohttp warns about bytes
    bodies over 1 MiB (the copy into the socket buffer runs on the loop); a chunk is at most
    the server's ``chunk`` (4 MiB by default), and one copy took a third less time per
    upload than the 64 KiB writes of an ``io.BytesIO`` body (bench/files.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(chunk, content_type="application/octet-stream")


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None


def _error(data: Any, status: int) -> CrdtsyncError:
    err = data.get("error", {}) if isinstance(data, dict) else {}
    return error_from_code(str(err.get("code", "internal")), str(err.get("message", "")),
                           err.get("detail") or None, status)


class FileTransfers:
    """The device's files: queue, upload, download, handlers, progress. Built by
    :class:`~crdtsync.Device`; ``client`` is ``None`` when its transport cannot carry files
    (then files queue, and transfers raise :class:`ClosedError`)."""

    def __init__(self, store: DeviceStore, root: Path, client: FileClient | None,
                 announced: Callable[[], Mapping[str, Any]], clock: Callable[[], int],
                 backoff: tuple[float, float] = (1.0, 300.0)) -> None:
        self._store = store
        self._clock = clock
        self._out = root / "out"
        self._in = root / "in"
        self._client = client
        self._announced = announced
        self._backoff = backoff
        self._pending: dict[str, FileInfo] = {}
        self._held: dict[str, FileInfo] = {}
        self._unhandled: set[str] = set()
        self._handlers: list[tuple[str | None, FileHandler]] = []
        self._progress: list[ProgressCallback] = []
        self.transfers: dict[tuple[str, str], FileTransfer] = {}
        """Transfers in flight by ``(direction, name)``."""
        self.errors: dict[str, CrdtsyncError] = {}
        """The last error of each file that could not move (by name; cleared on success)."""
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the queue and the received files from the store."""
        out, held = await self._store.run(_load)
        self._pending = {f.name: f for f in out}
        self._held = {f.name: f for f, _ in held}
        self._unhandled = {f.name for f, handled in held if not handled}

    @property
    def pending(self) -> list[FileInfo]:
        """Files queued to send, oldest first."""
        return list(self._pending.values())

    @property
    def held(self) -> dict[str, FileInfo]:
        """Files received and verified, by name."""
        return dict(self._held)

    def poke(self) -> None:
        """Have the transfer task look for work now (a file queued, a sync done)."""
        self._poke.set()

    def on_file(self, name: str | None, handler: FileHandler) -> None:
        """Call ``handler(info)`` once for each received file ``name`` (``None``: any)."""
        self._handlers.append((name, handler))
        self.poke()

    def on_progress(self, callback: ProgressCallback) -> None:
        """Call ``callback(transfer)`` as transfers move (after each chunk or block)."""
        self._progress.append(callback)

    # --- sending ----------------------------------------------------------------------------

    async def queue(self, name: str, source: FileSource, meta: Any = None) -> FileInfo:
        """Copy ``source`` into the queue and record it durably; replaces a queued file of
        the same name. Raises ``ValueError`` for a bad name or meta, ``OSError`` when the
        source cannot be read."""
        _check_name(name)
        meta = json.loads(json.dumps(meta, allow_nan=False))  # JSON data, as sent
        self._out.mkdir(parents=True, exist_ok=True)
        temp = self._out / f".new-{secrets.token_hex(8)}"
        try:
            sha256, size = await asyncio.to_thread(_copy_in, source, temp, self._out)
        finally:
            await asyncio.to_thread(unlink_missing_ok, temp)
        info = FileInfo(name, size, sha256, meta)
        replaced = await self._store.run(_queue, info, self._clock())
        self._pending.pop(name, None)
        self._pending[name] = info
        await self._drop_copies(replaced)
        self.poke()
        return info

    async def _drop_copies(self, digests: list[str]) -> None:
        keep = {f.sha256 for f in self._pending.values()}
        for digest in digests:
            if digest not in keep:
                await asyncio.to_thread(unlink_missing_ok, self._out / digest)

    async def _upload(self, info: FileInfo) -> None:
        client = self._require_client()
        state = await client.begin(info)
        transfer = self._start("up", info.name, int(state["offset"]), info.size)
        chunks = ChunkReader(self._out / info.sha256, info.size)
        sending: deque[asyncio.Future[dict[str, Any]]] = deque()
        try:
            while not state.get("complete"):
                state = await self._send(client, info, state, transfer, chunks, sending)
        finally:
            for future in sending:
                future.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            await chunks.aclose()
            self.transfers.pop(("up", info.name), None)
        done = await self._store.run(_sent, info)
        if done:
            self._pending.pop(info.name, None)
            await self._drop_copies([info.sha256])
        log.info("file %s sent (%d bytes)", info.name, info.size)

    async def _send(self, client: FileClient, info: FileInfo, state: dict[str, Any],
                    transfer: FileTransfer, chunks: ChunkReader,
                    sending: deque[asyncio.Future[dict[str, Any]]]) -> dict[str, Any]:
        """Fill the window (:data:`WINDOW` chunks in flight after ``state["offset"]``), then
        wait for the oldest answer: the new state. After a refusal the chunks still in
        flight are awaited (the server refuses those after it too) and the state is the
        refusal's, or the answer of a later chunk that went through after all."""
        upload = str(state["id"])
        chunk_size = max(1, min(int(state.get("chunk") or DEFAULT_CHUNK), 64 * BLOCK))
        following = int(state.get("following", state["offset"]))
        # Nothing left but nothing in flight either (an empty file; a part the server holds
        # whole but has not finished): an empty chunk at the end finishes it.
        while len(sending) < WINDOW and (following < info.size or not sending):
            chunk, check = await chunks.read(following, chunk_size)
            sending.append(asyncio.ensure_future(client.send(upload, following, chunk, check)))
            following += len(chunk)
        try:
            answer = await sending.popleft()
        except (OffsetMismatch, NotFound, DigestMismatch) as exc:
            later = [a for a in await asyncio.gather(*sending, return_exceptions=True)
                     if isinstance(a, dict)]
            sending.clear()
            if later:
                return self._progress_to(transfer, state, later[-1])
            return await self._refused(client, info, state, exc)
        return {**self._progress_to(transfer, state, answer), "following": following}

    def _progress_to(self, transfer: FileTransfer, state: dict[str, Any],
                     answer: dict[str, Any]) -> dict[str, Any]:
        transfer.done = int(answer["offset"])
        self._report(transfer)
        state = {**state, **answer, "damaged": 0}
        state.pop("following", None)
        return state

    async def _refused(self, client: FileClient, info: FileInfo, state: dict[str, Any],
                       exc: CrdtsyncError) -> dict[str, Any]:
        """The state to go on from after the server refused a chunk (``exc``): where it
        says to resume; raised when it is damaged too often or for good."""
        state = {k: v for k, v in state.items() if k != "following"}
        if isinstance(exc, OffsetMismatch):
            return {**state, "offset": int(exc.detail.get("offset", 0))}
        if isinstance(exc, NotFound):  # finished (an answer lost) or dropped: declare again
            return await client.begin(info)
        if exc.detail.get("scope") == "file":
            await self._check_copy(info)
            return {**state, "offset": 0}
        # Damaged on the way: send it again, a few times in a row at most.
        damaged = int(state.get("damaged", 0)) + 1
        if damaged > MAX_DAMAGED:
            raise exc
        return {**state, "damaged": damaged}

    async def _check_copy(self, info: FileInfo) -> None:
        """After the cloud refused the whole file: the local copy must still hash right,
        else it was damaged on disk and can never be sent (raised, the file stays)."""
        actual, _ = await asyncio.to_thread(_hash_file, self._out / info.sha256)
        if actual != info.sha256:
            raise DigestMismatch(f"the queued copy of {info.name} is damaged on disk",
                                 {"scope": "local", "name": info.name})

    # --- receiving --------------------------------------------------------------------------

    async def _download(self, name: str, info: FileInfo) -> None:
        client = self._require_client()
        self._in.mkdir(parents=True, exist_ok=True)
        part = self._in / f".part-{info.sha256}"
        start = await asyncio.to_thread(size_or_zero, part)
        if start > info.size:
            await asyncio.to_thread(unlink_missing_ok, part)
            start = 0
        transfer = self._start("down", name, start, info.size)
        # Hashed as it is written (after the prefix a cut left, if any): no second pass.
        running = hashlib.sha256()
        if start:
            await asyncio.to_thread(_hash_into, part, running)

        def written(size: int) -> None:
            transfer.done += size
            self._report(transfer)

        writer = await PartWriter.open(part, running, written)
        try:
            try:
                if start < info.size or info.size == 0:
                    await client.download(info.sha256, start, writer.write)
            finally:  # what arrived before a cut is a correct prefix, kept
                await writer.aclose()
            if running.hexdigest() != info.sha256 or writer.size != info.size:
                await asyncio.to_thread(unlink_missing_ok, part)
                raise DigestMismatch(f"file {name} does not match its sha256; downloading"
                                     " it again", {"scope": "file", "name": name})
            await asyncio.to_thread(_seal, part, self._in / info.sha256)
        finally:
            self.transfers.pop(("down", name), None)
        old = await self._store.run(_received, info)
        self._held[name] = info
        self._unhandled.add(name)
        if old and old not in {f.sha256 for f in self._held.values()}:
            await asyncio.to_thread(unlink_missing_ok, self._in / old)
        log.info("file %s received (%d bytes)", name, info.size)

    async def _withdraw(self, name: str) -> None:
        """The cloud no longer announces ``name``: forget it and its bytes."""
        info = self._held.pop(name)
        self._unhandled.discard(name)
        await self._store.run(_forget, name)
        if info.sha256 not in {f.sha256 for f in self._held.values()}:
            await asyncio.to_thread(unlink_missing_ok, self._in / info.sha256)

    def _wanted(self) -> tuple[dict[str, FileInfo], list[str]]:
        """Announced files to download, and held ones no longer announced."""
        announced: dict[str, FileInfo] = {}
        for name, entry in self._announced().items():
            info = _announced_info(name, entry)
            if info is not None:
                announced[name] = info
        wanted = {name: info for name, info in announced.items()
                  if self._held.get(name, FileInfo("", -1, "")).sha256 != info.sha256}
        gone = [name for name in self._held if name not in announced]
        return wanted, gone

    async def _handle(self) -> None:
        for name in sorted(self._unhandled):
            handlers = [h for wanted, h in self._handlers if wanted in (None, name)]
            if not handlers or name not in self._held:
                continue
            try:
                for handler in handlers:
                    result = handler(self._held[name])
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                log.exception("on_file handler for %s failed; it runs again later", name)
                continue
            await self._store.run(_handled, name, self._held[name].sha256)
            self._unhandled.discard(name)

    async def fetch(self, name: str, dest: str | os.PathLike[str] | IO[bytes]) -> FileInfo:
        """Copy received file ``name`` to ``dest`` (a path or a binary file object),
        checking its SHA-256 on the way. :class:`NotFound` when the device holds none,
        :class:`DigestMismatch` when its stored copy was damaged (``dest`` then holds
        bytes that must not be used)."""
        info = self._held.get(name)
        if info is None:
            raise NotFound(f"the device holds no file {name!r}", {"file": name})
        digest = await asyncio.to_thread(_copy_out, self._in / info.sha256, dest)
        if digest != info.sha256:
            raise DigestMismatch(f"the stored copy of {name} is damaged",
                                 {"scope": "local", "name": name})
        return info

    # --- running ----------------------------------------------------------------------------

    async def run_once(self) -> None:
        """Send every queued file and receive every announced one, then run the handlers.
        A file refused for good (too large, over quota, ...) is kept, its error in
        :attr:`errors`, and the others go on; a retryable error (the link, the server)
        stops the pass and is raised."""
        async with self._lock:
            for info in list(self._pending.values()):
                await self._attempt(info.name, self._upload(info))
            wanted, gone = self._wanted()
            for name in gone:
                await self._withdraw(name)
            for name, info in wanted.items():
                await self._attempt(name, self._download(name, info))
            await self._handle()

    async def _attempt(self, name: str, transfer: Awaitable[None]) -> None:
        try:
            await transfer
        except CrdtsyncError as exc:
            self.errors[name] = exc
            if exc.retryable:
                raise
            log.error("file %s: %s (%s); kept, tried again later", name, exc.message,
                      exc.code)
        else:
            self.errors.pop(name, None)

    async def run(self) -> None:
        """FileTransfer whenever poked (and every :data:`RECHECK` seconds), backing off after
        retryable failures, until cancelled."""
        failures = 0
        delay: float | None = 0.0
        while True:
            await wait_event(self._poke, delay)
            self._poke.clear()
            try:
                await self.run_once()
                failures, delay = 0, (RECHECK if self.errors else None)
            except CrdtsyncError as exc:
                failures += 1
                base, cap = self._backoff
                step = min(cap, base * 2.0 ** min(failures - 1, 32))
                delay = step / 2 + random.uniform(0, step / 2)
                log.warning("file transfer failed: %s; retrying in %.1f s", exc.message, delay)
            except OSError as exc:
                failures += 1
                delay = self._backoff[1]
                log.error("file transfer failed on local disk: %s", exc)

    def _require_client(self) -> FileClient:
        if self._client is None:
            raise ClosedError("this device's transport cannot carry files")
        return self._client

    def _start(self, direction: str, name: str, done: int, total: int) -> FileTransfer:
        transfer = self.transfers[(direction, name)] = FileTransfer(name, direction, done, total)
        self._report(transfer)
        return transfer

    def _report(self, transfer: FileTransfer) -> None:
        for callback in self._progress:
            try:
                callback(transfer)
            except Exception:
                log.exception("file progress callback failed")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid file name (1-128 of A-Z a-z 0-9 . _ -,"
                         " not starting with . or -)")


def _announced_info(name: str, entry: Any) -> FileInfo | None:
    """A ``files`` map entry as a :class:`FileInfo`; ``None`` for one that is not a file
    (numbers come back from the document as floats)."""
    if not isinstance(entry, Mapping):
        return None
    sha256, size = entry.get("sha256"), entry.get("size")
    if not isinstance(sha256, str) or len(sha256) != 64 or not isinstance(size, int | float):
        return None
    return FileInfo(name, int(size), sha256, entry.get("meta"))


# --- local files (worker threads) ------------------------------------------------------------


def _copy_in(source: FileSource, temp: Path, out: Path) -> tuple[str, int]:
    """Copy ``source`` to ``temp`` hashing it, ``fsync``, and move it to ``out/<sha256>``."""
    digest = hashlib.sha256()
    size = 0
    with open(temp, "wb") as target:
        for block in _blocks(source):
            digest.update(block)
            target.write(block)
            size += len(block)
        target.flush()
        os.fsync(target.fileno())
    sha256 = digest.hexdigest()
    os.replace(temp, out / sha256)
    fsync_dir(out)
    return sha256, size


def _blocks(source: FileSource) -> Iterator[bytes | memoryview]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for at in range(0, len(view), BLOCK):
            yield view[at:at + BLOCK]
        return
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:
            yield from _blocks(handle)
        return
    while block := source.read(BLOCK):
        yield block


def _read_chunk(path: Path, offset: int, size: int) -> tuple[bytes, str]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read(size)
    return chunk, hashlib.sha256(chunk).hexdigest()


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _copy_out(path: Path, dest: str | os.PathLike[str] | IO[bytes]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source, _opened(dest) as target:
        while block := source.read(BLOCK):
            digest.update(block)
            target.write(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _opened(dest: str | os.PathLike[str] | IO[bytes]) -> Any:
    if isinstance(dest, str | os.PathLike):
        with open(dest, "wb") as handle:
            yield handle
    else:
        yield dest


def _append_blocks(handle: IO[bytes], blocks: list[bytes], running: Any) -> int:
    for block in blocks:
        running.update(block)
    start = handle.tell()
    handle.writelines(blocks)
    handle.flush()
    size = handle.tell() - start
    write_behind(handle.fileno(), start, size)  # the seal's fsync is short
    return size


def _hash_into(path: Path, running: Any) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            running.update(block)


def _seal(part: Path, target: Path) -> None:
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, target)
    fsync_dir(target.parent)


# --- the tables (store thread) ---------------------------------------------------------------


def _info(row: Any) -> FileInfo:
    return FileInfo(row[0], row[2], row[1], json.loads(row[3]))


def _load(conn: sqlite3.Connection) -> tuple[list[FileInfo], list[tuple[FileInfo, bool]]]:
    out = [_info(r) for r in conn.execute(
        "SELECT name, sha256, size, meta FROM files_out ORDER BY queued, name")]
    held = [(_info(r), bool(r[4])) for r in conn.execute(
        "SELECT name, sha256, size, meta, handled FROM files_in ORDER BY name")]
    return out, held


def _queue(conn: sqlite3.Connection, info: FileInfo, now: int) -> list[str]:
    with transaction(conn):
        old = [r[0] for r in conn.execute("SELECT sha256 FROM files_out WHERE name = ?",
                                          (info.name,))]
        conn.execute("INSERT OR REPLACE INTO files_out (name, sha256, size, meta, queued)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (info.name, info.sha256, info.size, json.dumps(info.meta), now))
    return [digest for digest in old if digest != info.sha256]


def _sent(conn: sqlite3.Connection, info: FileInfo) -> bool:
    with transaction(conn):
        return conn.execute("DELETE FROM files_out WHERE name = ? AND sha256 = ?",
                            (info.name, info.sha256)).rowcount > 0


def _received(conn: sqlite3.Connection, info: FileInfo) -> str | None:
    with transaction(conn):
        row = conn.execute("SELECT sha256 FROM files_in WHERE name = ?",
                           (info.name,)).fetchone()
        conn.execute("INSERT OR REPLACE INTO files_in (name, sha256, size, meta, handled)"
                     " VALUES (?, ?, ?, ?, 0)",
                     (info.name, info.sha256, info.size, json.dumps(info.meta)))
    return None if row is None or row[0] == info.sha256 else str(row[0])


def _handled(conn: sqlite3.Connection, name: str, sha256: str) -> None:
    with transaction(conn):
        conn.execute("UPDATE files_in SET handled = 1 WHERE name = ? AND sha256 = ?",
                     (name, sha256))


def _forget(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM files_in WHERE name = ?", (name,))
