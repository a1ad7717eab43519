"""``Gateway``: many devices in one process, synced together in batch requests.

A gateway (one Linux box in front of many sensors) hosts one :class:`~crdtsync.Device` per
sensor, each a whole device (state, events, messages, commands, proxied requests, env) with
its own SQLite file under the gateway's directory, and syncs them through
``POST /v1/sync/batch`` (docs/protocol.md 18): one HTTP request carries the sync requests of
every device that has something to send or is due, each authenticated by its own token.

How it fits together:

- each device's transport (:class:`BatchedTransport`) hands its encoded sync request to the
  gateway's :class:`Batcher` and waits for its own answer, so a device runs its ordinary sync
  algorithm (rounds, adoption, renumbering, shrinking its batch on ``too_many_events``)
  unchanged, and raises the same errors as over ``POST /v1/sync``: an entry's error frame
  becomes its exception, and a batch whose outcome is unknown (cut, timed out, an answer that
  does not decode) raises :class:`~crdtsync.errors.TransportError` in every device of it;
- the batcher sends what is queued once every device the gateway is syncing has either
  queued its request or finished (at once for a sync started elsewhere, such as an
  application's ``dev.sync()``; after ``patience`` seconds without a new request when a
  device is slow to prepare its own, a command handler running say), split by the server's
  limits (entries and body size, learnt from its refusals);
- the gateway's scheduler replaces each device's own loop: it syncs, together, every device
  that has something new to send (``min_spacing`` after its last sync), is due (every
  ``interval``) or whose backoff after a failure ended (the backoff of
  :meth:`Device._run <crdtsync.device.Device>`, per device). There is no live channel per
  device: cloud writes, messages and commands reach a device at its next due sync, within
  ``interval`` seconds (or at once with :meth:`Gateway.sync`).

The devices and their tokens are listed in ``gateway.json`` in the directory (mode 0600: it
holds credentials), so a restarted gateway reloads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ._aio import cancel_and_wait, spawn, wait_event
from .device import Device, SyncReport, backoff_delay
from .errors import (
    BatchTooLarge,
    BodyTooLarge,
    ClosedError,
    CrdtsyncError,
    TransportError,
    Unauthorized,
    UnsupportedEncoding,
)
from .protocol import (
    BATCH_PATH,
    DEFAULT_LIMITS,
    NAME_RE,
    BatchEntry,
    decode_batch_response,
    decode_error,
    encode_batch_request,
)
from .transport import (
    COMPRESS_THRESHOLD,
    SKIP_AUTO_HEADERS,
    compress,
    describe,
    failure_reason,
    request_headers,
    zstandard,
)

log = logging.getLogger("crdtsync.gateway")

REGISTRY = "gateway.json"
"""The file in the gateway's directory that lists its devices and their tokens."""
DEFAULT_MAX_BODY = 4 * 1024 * 1024
"""The server's default ``max_body``: what a batch body may weigh, uncompressed."""
MAX_ANSWER = 256 * 1024 * 1024
"""The largest batch answer the gateway reads (decompressed)."""
ENTRY_OVERHEAD = 16
"""Bytes of framing per entry besides its token and body (msgpack array, bin and str heads)."""

_DRIVEN: contextvars.ContextVar[bool] = contextvars.ContextVar("crdtsync_gateway_driven",
                                                               default=False)
"""True inside a device sync the gateway started: the batcher waits for those."""


@dataclass(slots=True)
class _Pending:
    token: str
    body: bytes
    future: asyncio.Future[bytes]


@dataclass(slots=True)
class BatchStats:
    """What the batcher sent: HTTP requests, entries, body bytes on the wire each way (as
    sent: compressed), and whole batches that failed."""

    requests: int = 0
    entries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    failed: int = 0


class Batcher:
    """Collects device sync requests and sends them as batches (see the module)."""

    def __init__(self, url: str, session: aiohttp.ClientSession, *, timeout: float,
                 patience: float, max_entries: int, max_body: int) -> None:
        self.base_url = url.rstrip("/")
        self.url = self.base_url + BATCH_PATH
        self.session = session
        """The gateway's connections: its batches, and its devices' file transfers."""
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.patience = patience
        """Seconds queued requests wait, without a new one arriving, for the devices still
        preparing theirs."""
        self.max_entries = max_entries
        """Entries per batch; lowered to the server's ``detail.max_entries`` if it refuses."""
        self.max_body = max_body
        """Uncompressed bytes per batch; the server's ``detail.max_body`` when it refuses a
        batch of several entries with a lower one, else halved at such a refusal."""
        self.encoding = "zstd" if zstandard is not None else "deflate"
        self.stats = BatchStats()
        self.busy = 0
        """Devices in a gateway-driven sync that are not waiting for an answer."""
        self._queue: list[_Pending] = []
        self._queued = 0
        """:func:`_entry_size` of everything in the queue."""
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._good: set[str] = set()
        """Tokens the server last answered with a sync response: the header's token is
        taken from one of them when the batch has one (a revoked token in the header
        would cost a refused request)."""

    async def exchange(self, token: str, body: bytes) -> bytes:
        """Send ``body`` for the device of ``token`` with the next batch; its answer, or
        its error raised (the transport contract of :class:`~crdtsync.transport.Transport`)."""
        if self._closed:
            raise ClosedError("the gateway is closed")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        item = _Pending(token, body, future)
        self._queue.append(item)
        self._queued += _entry_size(item)
        driven = _DRIVEN.get()
        if driven:
            self.busy -= 1
        try:
            self.poke(arrived=True)
            return await future
        finally:
            if driven:
                self.busy += 1

    def poke(self, *, arrived: bool = False) -> None:
        """Send now if nobody the gateway waits for is still preparing a request, or a full
        batch is queued; else (re)arm the patience timer when a request ``arrived``."""
        if not self._queue or self._closed:
            return
        full = len(self._queue) >= self.max_entries or self._queued >= self.max_body
        if self.busy <= 0 or full:
            self._flush()
        elif arrived:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self.patience, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue, self._queued = self._queue, [], 0
        for chunk in self._chunks([p for p in queued if not p.future.done()]):
            task = asyncio.create_task(self._send(chunk), name="crdtsync-gateway-batch")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _chunks(self, pending: list[_Pending]) -> list[list[_Pending]]:
        """``pending`` split in order into batches within :attr:`max_entries` and
        :attr:`max_body` (an entry too large alone goes alone: the server's refusal becomes
        that device's ``body_too_large``)."""
        chunks: list[list[_Pending]] = []
        size = 0
        for item in pending:
            grows = _entry_size(item)
            if not chunks or len(chunks[-1]) >= self.max_entries or (
                    size + grows > self.max_body and chunks[-1]):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += grows
        return chunks

    async def _send(self, chunk: list[_Pending]) -> None:
        """Send one batch and settle each device's future; refusals of the whole batch that
        concern its shape (its size, a gate token that stopped working, an encoding) are
        handled here by sending again; any other settles every device with that error."""
        while chunk:
            chunk = self._gate_first(chunk)
            try:
                answers = await self._post(chunk)
            except asyncio.CancelledError:
                for item in chunk:
                    item.future.cancel()
                raise
            except CrdtsyncError as exc:
                chunk = self._refused(chunk, exc)
                continue
            except Exception as exc:  # a bug: no device may wait for ever on its answer
                log.exception("gateway: a batch failed unexpectedly")
                _settle(chunk, TransportError(f"batch failed: {exc!r}"))
                return
            for item, (status, body) in zip(chunk, answers, strict=True):
                if item.future.done():
                    continue
                if status == 200:
                    self._good.add(item.token)
                    item.future.set_result(body)
                else:
                    self._good.discard(item.token)
                    item.future.set_exception(decode_error(body, status))
            return

    def _gate_first(self, chunk: list[_Pending]) -> list[_Pending]:
        """``chunk`` with an entry of a token known good first (its token goes in the
        header); the order of entries means nothing else."""
        for n, item in enumerate(chunk):
            if item.token in self._good:
                return [item, *chunk[:n], *chunk[n + 1:]] if n else chunk
        return chunk

    def _refused(self, chunk: list[_Pending], exc: CrdtsyncError) -> list[_Pending]:
        """What to send again after the whole batch ``chunk`` was refused with ``exc``
        (nothing of it was processed); the devices that cannot be helped get ``exc``."""
        if isinstance(exc, Unauthorized) and len(chunk) > 1:
            # The token in the header (the first entry's) no longer names a device: that
            # device gets the error; the others go again under another entry's token.
            self._good.discard(chunk[0].token)
            _settle([chunk[0]], exc)
            return chunk[1:]
        if isinstance(exc, BatchTooLarge) and len(chunk) > 1:
            limit = exc.detail.get("max_entries")
            self.max_entries = (limit if isinstance(limit, int) and 0 < limit < len(chunk)
                                else max(1, len(chunk) // 2))
            return self._resplit(chunk)
        if isinstance(exc, BodyTooLarge) and len(chunk) > 1:
            limit = exc.detail.get("max_body")
            self.max_body = (limit if isinstance(limit, int) and 0 < limit < self.max_body
                             else max(1024, self.max_body // 2))
            return self._resplit(chunk)
        if isinstance(exc, UnsupportedEncoding) and self.encoding != "deflate":
            self.encoding = "deflate"  # a server without zstd: nothing was applied
            return chunk
        self.stats.failed += 1
        _settle(chunk, exc)
        return []

    def _resplit(self, chunk: list[_Pending]) -> list[_Pending]:
        """Send the first part of ``chunk`` split by the new limits; queue the rest."""
        first, *rest = self._chunks(chunk)
        for part in rest:
            task = asyncio.create_task(self._send(part), name="crdtsync-gateway-batch")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return first

    async def _post(self, chunk: list[_Pending]) -> list[tuple[int, bytes]]:
        """One HTTP request; the answers in order. Raises the error of a batch refused whole,
        or :class:`TransportError` when its outcome is unknown."""
        body = encode_batch_request([BatchEntry(p.token, p.body) for p in chunk])
        encoding = "identity"
        if len(body) >= COMPRESS_THRESHOLD:
            packed = compress(body, self.encoding)
            if len(packed) < len(body):
                body, encoding = packed, self.encoding
        headers = request_headers(chunk[0].token, encoding)
        headers["Accept-Encoding"] = "zstd, deflate" if zstandard is not None else "deflate"
        self.stats.requests += 1
        self.stats.entries += len(chunk)
        self.stats.bytes_up += len(body)
        try:
            async with self.session.post(self.url, data=body, headers=headers,
                                          skip_auto_headers=SKIP_AUTO_HEADERS,
                                          timeout=self._timeout) as resp:
                data = await resp.read()
                status, coding = resp.status, resp.headers.get("Content-Encoding", "identity")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(describe(exc, self.url)) from exc
        self.stats.bytes_down += len(data)
        if status != 200:
            raise decode_error(data, status)
        try:
            answers = decode_batch_response(_decompress(data, coding, MAX_ANSWER), len(chunk))
        except CrdtsyncError as exc:  # damaged on the way: as if lost (protocol 4, 18)
            raise TransportError(f"batch answer does not decode ({exc.message}); the outcome "
                                 "is unknown") from exc
        return [(a.status, a.body) for a in answers]

    async def aclose(self) -> None:
        """Refuse new requests, cancel the batches in flight (their devices see a
        cancellation, as a lost answer) and fail those still queued with
        :class:`ClosedError`."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        await cancel_and_wait(*self._sending)
        _settle(self._queue, ClosedError("the gateway is closed"))
        self._queue, self._queued = [], 0


def _entry_size(item: _Pending) -> int:
    return len(item.token) + len(item.body) + ENTRY_OVERHEAD


def _settle(items: list[_Pending], exc: CrdtsyncError) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)


def _decompress(data: bytes, coding: str, limit: int) -> bytes:
    """A batch answer's body, decoded from ``coding``, at most ``limit`` bytes;
    :class:`TransportError` otherwise."""
    coding = coding.strip().lower()
    if coding == "identity":
        return data
    try:
        if coding == "zstd" and zstandard is not None:
            with zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(data), read_across_frames=False, closefd=False) as reader:
                out: bytes = reader.read(limit + 1)
        elif coding == "deflate":
            out = zlib.decompressobj().decompress(data, limit + 1)
        else:
            raise TransportError(f"batch answer in an unknown Content-Encoding {coding!r}")
    except (zlib.error, ValueError) as exc:
        raise TransportError(f"batch answer does not decompress: {exc}") from exc
    except Exception as exc:
        if zstandard is not None and isinstance(exc, zstandard.ZstdError):
            raise TransportError(f"batch answer does not decompress: {exc}") from exc
        raise
    if len(out) > limit:
        raise TransportError(f"batch answer over {limit} bytes")
    return out


class BatchedTransport:
    """The :class:`~crdtsync.transport.Transport` of a gateway's device: its requests go
    through the gateway's :class:`Batcher` under its own token."""

    def __init__(self, batcher: Batcher, token: str) -> None:
        self.batcher = batcher
        self.token = token

    async def exchange(self, body: bytes) -> bytes:
        return await self.batcher.exchange(self.token, body)

    def files(self) -> tuple[str, Callable[[], str], Callable[[], aiohttp.ClientSession]]:
        """What the device's file transfers need (as ``HttpTransport.files``): they go
        straight to the server, one request per chunk, on the gateway's connections, under
        the device's current token."""
        return self.batcher.base_url, lambda: self.token, lambda: self.batcher.session

    async def aclose(self) -> None:
        """Nothing to close: the gateway owns the connection."""


@dataclass(eq=False)
class _Slot:
    """A device of the gateway and its schedule (the state of a device's own loop)."""

    device: Device
    transport: BatchedTransport
    wanted: bool = True
    """It has something new to sync (true at start: its outbox may hold events)."""
    due: float = 0.0
    """Monotonic time of its next periodic sync."""
    last_attempt: float = -math.inf
    failures: int = 0
    retry_at: float = 0.0
    reported: str | None = None
    """The failure last logged: its repeats go to debug."""

    def ready(self, now: float, spacing: float) -> bool:
        if self.failures:
            return now >= self.retry_at
        return now >= self.due or (self.wanted and now - self.last_attempt >= spacing)

    def next_time(self, spacing: float) -> float:
        if self.failures:
            return self.retry_at
        return min(self.due, self.last_attempt + spacing if self.wanted else math.inf)


SyncOutcome = SyncReport | CrdtsyncError
"""What :meth:`Gateway.sync` gives per device: its report, or the error its sync raised."""


class Gateway:
    """Many devices in one process, synced in batches (see the module).

    Use ``async with Gateway(url, path=DIR) as gw:`` then ``dev = await gw.add(id, token)``.
    ``interval`` (seconds) runs the background scheduler (``None``: none; call
    :meth:`sync`); ``min_spacing``, ``backoff`` and ``durability`` mean what they mean for a
    :class:`Device`. ``linger``: devices ready within that many seconds of each other are
    synced in one batch by the scheduler. ``patience``: how long, without a new request, the
    queued requests of a gateway sync wait for the devices still preparing theirs.
    ``max_entries`` and ``max_body`` bound a batch before the server says its own limits
    (the defaults are the reference server's). ``timeout`` is the time of one batch request.
    """

    def __init__(self, url: str, *, path: str | Path, interval: float | None = 60.0,
                 min_spacing: float = 1.0, backoff: tuple[float, float] = (1.0, 300.0),
                 durability: str = "FULL", linger: float = 0.05, patience: float = 0.5,
                 max_entries: int = DEFAULT_LIMITS.max_batch_entries,
                 max_body: int = DEFAULT_MAX_BODY, timeout: float = 30.0,
                 connections: int = 4) -> None:
        self.url = url
        self.path = Path(path)
        self.interval = interval
        self.min_spacing = min_spacing
        self.backoff = backoff
        self.durability = durability
        self.linger = linger
        self._limits = (patience, max_entries, max_body, timeout)
        self._connections = connections
        self._slots: dict[str, _Slot] = {}
        self._session: aiohttp.ClientSession | None = None
        self._batcher: Batcher | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._state = "new"

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the directory if needed, open every device it lists, and start the
        scheduler (with an ``interval``). Raises what opening a device raises."""
        if self._state != "new":
            raise ClosedError("this gateway was already started")
        self._state = "open"
        self.path.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=self._connections))
        patience, max_entries, max_body, timeout = self._limits
        self._batcher = Batcher(self.url, self._session, timeout=timeout, patience=patience,
                                max_entries=max_entries, max_body=max_body)
        try:
            for device_id, token in self._read_registry().items():
                await self._open(device_id, token)
        except BaseException:
            await self.aclose()
            raise
        if self.interval is not None:
            self._task = spawn(self._run(), "crdtsync-gateway")

    async def aclose(self) -> None:
        """Stop the scheduler, close every device (without syncing) and the connection."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._batcher is not None:
            await self._batcher.aclose()
        for slot in self._slots.values():
            await slot.device.aclose()
        if self._session is not None:
            await self._session.close()

    def _check_open(self) -> Batcher:
        if self._state != "open" or self._batcher is None:
            raise ClosedError(f"the gateway is {self._state}; use `async with Gateway(...)`")
        return self._batcher

    # --- devices --------------------------------------------------------------------------

    @property
    def devices(self) -> dict[str, Device]:
        """The gateway's devices by id (a copy)."""
        return {device_id: slot.device for device_id, slot in self._slots.items()}

    @property
    def stats(self) -> BatchStats:
        """What the gateway sent so far (requests, entries, bytes)."""
        return self._check_open().stats

    async def add(self, device_id: str, token: str, **options: Any) -> Device:
        """The device ``device_id`` with the bearer ``token``, opened (its SQLite file
        ``<path>/<device_id>.db`` is created or reopened) and listed in the directory, so a
        restarted gateway opens it again; returns the :class:`Device`, whose whole API
        works as usual (its syncs go through the gateway). ``options`` go to
        :class:`Device` (``outbox``, ``max_events_per_sync``, ``clock``...). A device already
        added gets the new ``token`` (after ``POST /v1/devices/{id}/token``); its options
        stay. The scheduler may sync the device from the caller's next ``await`` on:
        register its handlers (``on``, ``command``, ``on_change``) before that."""
        self._check_open()
        if not NAME_RE.match(device_id):
            raise ValueError(f"device id {device_id!r} is not a valid name")
        if not token:
            raise ValueError("give the device's token")
        slot = self._slots.get(device_id)
        if slot is None:
            slot = await self._open(device_id, token, **options)
        slot.transport.token = token
        self._write_registry()
        self._want(slot)
        return slot.device

    async def remove(self, device_id: str) -> None:
        """Close the device and forget it (its SQLite file stays, with whatever it had not
        synced). ``KeyError`` if the gateway has no such device."""
        self._check_open()
        slot = self._slots.pop(device_id)
        self._write_registry()
        await slot.device.aclose()

    async def _open(self, device_id: str, token: str, **options: Any) -> _Slot:
        batcher = self._check_open()
        transport = BatchedTransport(batcher, token)
        slot: _Slot | None = None

        def wake() -> None:
            if slot is not None:
                self._want(slot)

        device = Device(device_id, transport=transport, path=self.path / f"{device_id}.db",
                        interval=None, live=False, min_spacing=self.min_spacing,
                        backoff=self.backoff, durability=self.durability, on_wake=wake,
                        transfers=True, **options)
        await device.start()
        slot = self._slots[device_id] = _Slot(device, transport)
        return slot

    def _want(self, slot: _Slot) -> None:
        slot.wanted = True
        self._wake.set()

    def _read_registry(self) -> dict[str, str]:
        file = self.path / REGISTRY
        if not file.exists():
            return {}
        devices = json.loads(file.read_text()).get("devices", {})
        if not isinstance(devices, dict):
            raise ValueError(f"{file}: 'devices' must be an object")
        return {str(k): str(v) for k, v in devices.items()}

    def _write_registry(self) -> None:
        """Replace the registry atomically and durably (write, fsync, rename)."""
        file = self.path / REGISTRY
        tmp = file.with_suffix(".tmp")
        data = json.dumps({"devices": {i: s.transport.token for i, s in self._slots.items()}},
                          indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)
        with contextlib.suppress(OSError):  # the rename itself, durable too
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # --- syncing --------------------------------------------------------------------------

    async def sync(self, *, force: bool = False) -> dict[str, SyncOutcome]:
        """Sync now, in as few batch requests as the server's limits allow, every device
        that has something to send, is due, or failed last time (``force``: every device;
        without an ``interval`` every device is due at every call, so that what the cloud
        queued reaches it);
        returns each one's :class:`SyncReport` or the error its sync raised. Never raises
        for a device's failure; the failed ones are retried by the scheduler after their
        backoff, as a device's own loop would."""
        self._check_open()
        now = time.monotonic()
        chosen = [slot for slot in self._slots.values()
                  if force or slot.failures or slot.ready(now, 0.0)]
        return await self._sync_slots(chosen)

    async def _sync_slots(self, slots: list[_Slot]) -> dict[str, SyncOutcome]:
        outcomes = await asyncio.gather(*(self._drive(slot) for slot in slots))
        return {slot.device.id: outcome for slot, outcome in zip(slots, outcomes, strict=True)}

    async def _drive(self, slot: _Slot) -> SyncOutcome:
        """One device's sync as part of a gateway sync (the batcher waits for it), and its
        schedule updated as its own loop would."""
        batcher = self._check_open()
        _DRIVEN.set(True)  # in this task's context only (gather wraps it in a task)
        slot.wanted = False
        slot.last_attempt = time.monotonic()
        batcher.busy += 1
        try:
            report = await slot.device.sync()
        except CrdtsyncError as exc:
            self._failed(slot, exc)
            return exc
        except Exception as exc:  # a bug: the device's loop would log it and back off too
            log.exception("device %s: unexpected error in a gateway sync", slot.device.id)
            self._failed(slot, TransportError(f"unexpected error: {exc!r}"))
            return TransportError(f"unexpected error: {exc!r}")
        finally:
            batcher.busy -= 1
            batcher.poke()
        if slot.failures:
            log.info("device %s: sync recovered after %d failed attempts", slot.device.id,
                     slot.failures)
        slot.failures, slot.reported, slot.retry_at = 0, None, 0.0
        slot.due = time.monotonic() + (self.interval or 0.0)
        return report

    def _failed(self, slot: _Slot, exc: CrdtsyncError) -> None:
        slot.failures += 1
        delay = backoff_delay(self.backoff, slot.failures if exc.retryable else 64)
        slot.retry_at = time.monotonic() + delay
        reason = failure_reason(exc)
        level = (logging.DEBUG if reason == slot.reported
                 else logging.WARNING if exc.retryable else logging.ERROR)
        log.log(level, "device %s: sync failed: %s; retrying in %.1f s", slot.device.id,
                reason, delay)
        slot.reported = reason

    async def _run(self) -> None:
        """The scheduler: sync together every device that is ready, then sleep until the
        next one is (or a device has something new)."""
        linger = self.linger
        while True:
            # Devices ready within `linger` go now too: fewer, fuller batches.
            horizon = time.monotonic() + linger
            ready = [s for s in self._slots.values() if s.ready(horizon, self.min_spacing)]
            if ready:
                await self._sync_slots(ready)
                continue
            self._wake.clear()
            upcoming = min((s.next_time(self.min_spacing) for s in self._slots.values()),
                           default=math.inf)
            await wait_event(self._wake, None if upcoming == math.inf
                             else max(0.0, upcoming - time.monotonic()))
            if self._wake.is_set():  # something new: leave a moment for more to come
                await asyncio.sleep(linger)
