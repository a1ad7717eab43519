"""``Device``: the library a device or gateway app embeds.

It holds the device's CRDT document (replicated state) and its event outbox in one local
SQLite file, and syncs both with the cloud in one HTTP round trip, explicitly
(:meth:`Device.sync`) or from a background loop (interval, prompt sync after local changes with
a minimum spacing, exponential backoff with jitter on failure). With the loop, a live channel
(:mod:`crdtsync._live`, a long poll) wakes it as soon as the cloud has something for the
device.

Every local write of a root-map key is stamped by the device's hybrid logical clock
(:mod:`crdtsync.hlc`) and sent with its stamp and value until the cloud acknowledged it, so
the cloud decides "latest write wins" by time (docs/protocol.md 9 and 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from pycrdt import Array, Doc, Map, Text, TransactionEvent

from . import crdt, hlc
from ._aio import cancel_and_wait, spawn, wait_event
from ._calls import Calls
from ._device_store import (
    DeviceStore,
    DirtyKey,
    DirtyWrite,
    OutboxEvent,
    OutboxLimits,
    QueuedEvent,
)
from ._files import (
    FileClient,
    FileHandler,
    FileInfo,
    FileSource,
    FileTransfer,
    FileTransfers,
    ProgressCallback,
)
from ._inbox import CommandHandler, Inbox, MessageHandler
from ._live import LiveChannel
from ._packing import pack, plain_events
from ._shared import TEMPLATES, Env, FleetSchema, ReadOnlyMap, SharedDoc
from ._state import StateMap
from .errors import (
    BodyTooLarge,
    ClosedError,
    CrdtsyncError,
    InvalidValue,
    SeqConflict,
    SyncStalled,
    TooManyEvents,
)
from .protocol import (
    DEFAULT_LIMITS,
    DEFAULT_WAKE_WAIT,
    FLEET_DOC,
    MAX_WAKE_WAIT,
    NAME_RE,
    PROJECT_DOC,
    SHARED_DOC_NAMES,
    STATE_DOC,
    STATE_MAP,
    Conflict,
    DocSync,
    StampedWrite,
    SyncRequest,
    SyncResponse,
    covers,
    decode_event_body,
    decode_response,
    encode_event_body,
    encode_request,
    parse_state_vector,
)
from .schema import StateSchema
from .templates import Template
from .transport import HttpTransport, LiveTransport, Transport, failure_reason
from .values import check_event_body, normalize

log = logging.getLogger("crdtsync.device")

FILES_MAP = "files"
"""The root map where the cloud announces files (docs/protocol.md section 19)."""

STATE_GEN = f"gen:{STATE_DOC}"
"""Store meta key of the generation of the device's own document (docs/protocol.md 8)."""
EMPTY_UPDATE = b"\x00\x00"
ChangeCallback = Callable[[str, str, Any, Any], None]
ConflictCallback = Callable[[Conflict], None]
MAX_TIME_MS = hlc.stamp_ms(2**63 - 1)
"""The latest server ``time`` the clock takes from a response: a stamp of a later
millisecond would not fit the device store's signed 64-bit integers."""
OFFSET_SLACK_MS = 1000
"""A sync that changes nothing else stores the clock only when the offset learnt from the
server moved by more than this (the stamps that matter are stored with every change)."""
WAKE_SPACING = 0.05
"""Seconds between the start of a sync and that of a sync the live channel asked for (which
skips ``min_spacing``): a server that wakes the device in a loop cannot make it hammer."""
_MISSING = object()


@dataclass(frozen=True, slots=True)
class SkippedItem:
    """A cloud-to-device item this device could not take and skipped, without failing the
    sync (docs/protocol.md 14): ``kind`` is ``"message"``, ``"command"`` or ``"outcome"``,
    ``ref`` the downlink seq (as text) or the proxied request's id, ``code``
    ``item_too_large`` or ``invalid_item``. A message is acknowledged unhandled, a command
    answered with the error ``code``, an outcome stored as a failed one."""

    kind: str
    ref: str
    code: str
    message: str


@dataclass(slots=True)
class SyncReport:
    """What one :meth:`Device.sync` did.

    ``bytes_up`` / ``bytes_down`` are protocol message bytes, before the HTTP transport
    deflates request bodies of 1 KiB or more. ``changes`` counts state keys the cloud changed
    on this device; ``recovered`` is true when a side had lost data and an extra round trip
    repaired it."""

    rounds: int = 0
    events_sent: int = 0
    events_acked: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    changes: int = 0
    downlink: int = 0
    """Cloud messages and commands processed."""
    env_changes: int = 0
    """Environment variables whose merged value changed."""
    outcomes: int = 0
    """Proxied-request outcomes received."""
    skipped: list[SkippedItem] = field(default_factory=list)
    """Items the device could not take (too large, not JSON data): skipped and logged."""
    recovered: bool = False
    adopted: bool = False
    """True when the device adopted a new generation of its document (docs/protocol.md 8.1):
    the cloud rebuilt it, and the device's unacknowledged writes were re-applied onto it."""
    conflicts: list[Conflict] = field(default_factory=list)
    """Keys written concurrently by this device and the cloud, as the cloud decided them
    (the same conflicts :meth:`Device.on_conflict` callbacks receive)."""
    duration: float = 0.0


class Device:
    """A device: replicated state, an event outbox, and sync with the cloud.

    Use as ``async with Device(id, url, token=..., path=...) as dev``. ``interval`` (seconds)
    runs a background sync loop; ``None`` disables it (call :meth:`sync` yourself). Local
    changes trigger a sync after at most ``min_spacing`` seconds. ``durability`` is the SQLite
    ``synchronous`` mode of the local store (``"FULL"``: every call is durable on return).
    ``clock`` is the wall clock that stamps local writes and dates events, queued requests
    and command deadlines, a function returning milliseconds since the epoch (default: the
    system clock, :func:`crdtsync.hlc.wall_ms`; tests inject skewed clocks). It need not be
    right: the device learns its offset from the cloud, and stamps increase across restarts
    whatever it returns.

    ``live`` (with the background loop only: ``interval`` not ``None``, and a transport that
    is a :class:`~crdtsync.transport.LiveTransport`, as the default HTTP one is) keeps a
    wake request open to the cloud (``GET /v1/wake``, held up to ``wake_wait`` seconds):
    when the cloud commits something for the device (a state write, a message, a command,
    a shared document change), the device syncs at once instead of at its next interval.
    It costs one held HTTP connection and an empty answer every ``wake_wait`` seconds; pass
    ``live=False`` on a metered link or a battery. Against a server without the live
    channel the device syncs at its interval, as before.

    ``on_wake`` is called (on the event loop, without arguments; it must not block or raise)
    each time the device has something new to sync, whether or not it has a loop: what
    lets a scheduler outside the device, such as :class:`~crdtsync.gateway.Gateway`,
    sync it when needed.

    ``transfers`` runs the file transfer task (files sent and received beside the sync,
    :meth:`send_file`): by default with the background loop; ``True`` runs it without one
    (a device synced by a scheduler outside it, as a gateway's are), ``False`` leaves it to
    :meth:`sync_files`. Files need a transport that can carry them (``files()``: the HTTP
    transport and a gateway's do).
    """

    def __init__(
        self,
        device_id: str,
        url: str | None = None,
        *,
        token: str | None = None,
        path: str | Path,
        transport: Transport | None = None,
        session: aiohttp.ClientSession | None = None,
        interval: float | None = 60.0,
        min_spacing: float = 1.0,
        backoff: tuple[float, float] = (1.0, 300.0),
        outbox: OutboxLimits | None = None,
        durability: str = "FULL",
        max_events_per_sync: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        compact_every: int = 500,
        max_rounds: int = 1000,
        clock: Callable[[], int] | None = None,
        live: bool = True,
        wake_wait: float = DEFAULT_WAKE_WAIT,
        on_wake: Callable[[], None] | None = None,
        transfers: bool | None = None,
    ) -> None:
        if not NAME_RE.match(device_id):
            raise ValueError(f"device id {device_id!r} is not a valid name")
        if not 1 <= wake_wait <= MAX_WAKE_WAIT:
            raise ValueError(f"wake_wait must be seconds in 1..{MAX_WAKE_WAIT}")
        if transport is None:
            if url is None or token is None:
                raise ValueError("give url and token, or a transport")
            transport = HttpTransport(url, token, session=session)
        self.id = device_id
        self.interval = interval
        self.min_spacing = min_spacing
        self.backoff = backoff
        self.outbox_limits = outbox or OutboxLimits()
        self.max_events_per_sync = min(max_events_per_sync, DEFAULT_LIMITS.max_events)
        self.max_batch_bytes = max_batch_bytes
        self.compact_every = compact_every
        self.max_rounds = max_rounds
        self.last_report: SyncReport | None = None
        self.last_error: CrdtsyncError | None = None
        self._transport = transport
        self._store = DeviceStore(path, synchronous=durability)
        wall = clock or hlc.wall_ms
        self._inbox = Inbox(self._store, device_id, wall)
        self._calls = Calls(self._store, wall)
        self._shared = {name: SharedDoc(name, self._store) for name in SHARED_DOC_NAMES}
        files = getattr(transport, "files", None)  # what a transport needs to carry files
        self._files = FileTransfers(
            self._store, Path(f"{path}.files"), FileClient(*files()) if callable(files) else None,
            self._announced_files, wall, backoff)
        self._transfers = interval is not None if transfers is None else transfers
        self._files_task: asyncio.Task[None] | None = None
        self._templates: dict[str, Template] = {}
        self._schema = FleetSchema(self._shared[FLEET_DOC])
        self.env = Env(self._own_env, self._shared[FLEET_DOC], self._shared[PROJECT_DOC])
        """Environment variables, merged: device > fleet > project (read-only)."""
        self._doc: Doc[Any] | None = None
        self._captured: list[tuple[bytes, tuple[DirtyWrite, ...], int]] = []
        """Updates not yet stored: ``(update, their local writes, local version)``."""
        self._local_keys: dict[DirtyKey, tuple[bytes | None, bool]] = {}
        """Keys written by the local transaction being committed, with what they hold at
        its end (:func:`_written`); root observers fill it."""
        self._clock = hlc.HybridClock(wall)
        """Stamps local writes; ``last`` and ``offset`` are restored from the store."""
        self._applying_remote = False
        self._observed_roots: set[str] = set()
        self._subscriptions: list[tuple[Any, Any]] = []
        self._change_callbacks: list[ChangeCallback] = []
        self._conflict_callbacks: list[ConflictCallback] = []
        self._remote_changes = 0
        self._local_version = 0
        self._synced_version = -1
        self._sync_lock = asyncio.Lock()
        self._wake = _Wake(on_wake)
        """Set when the device has something to sync (a local write, an event, a request,
        a handler registered, :meth:`request_sync`); it wakes the background loop, and
        ``on_wake`` hears it too (a :class:`~crdtsync.gateway.Gateway` schedules its devices'
        syncs with it)."""
        self._hurry = asyncio.Event()
        """Set with ``_wake`` by the live channel: the next sync skips ``min_spacing``."""
        self._sync_started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel = (LiveChannel(device_id, transport, self._sync_now, wake_wait)
                         if live and interval is not None
                         and isinstance(transport, LiveTransport) else None)
        self._live_task: asyncio.Task[None] | None = None
        self._state = "new"
        self._last_attempt = 0.0
        self.state = StateMap(self, STATE_MAP)

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Device:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the local store, load the document, and start the sync loop (if any)."""
        if self._state != "new":
            raise ClosedError(f"device {self.id} was already started")
        await self._store.open()
        self._state = "open"
        client_id = self._store.meta.get("client_id")
        if client_id is None:
            client_id = crdt.random_client_id()
            await self._store.set_meta(client_id=client_id)
        for shared in self._shared.values():
            await shared.load(int(client_id))
        local = await self._store.load_doc(STATE_DOC)
        self._install_doc(crdt.new_doc(int(client_id), local.snapshot,
                                       (u for _, u in local.updates)))
        # Dirty keys keep the versions of an earlier run: number on from the highest.
        self._local_version = self._store.dirty_version
        await self._start_clock()
        self.env.remember()
        await self._files.load()
        if self.interval is not None:
            self._task = asyncio.create_task(self._run(), name=f"crdtsync-sync-{self.id}")
        if self._transfers:
            self._files_task = spawn(self._files.run(), f"crdtsync-files-{self.id}")
        if self._channel is not None:
            self._live_task = spawn(self._channel.run(), f"crdtsync-live-{self.id}")

    async def aclose(self) -> None:
        """Stop the sync loop and the live channel, and close the store and transport.
        Does not sync first."""
        if self._state == "closed":
            return
        self._state = "closed"
        tasks = [task for task in (self._task, self._live_task, self._files_task)
                 if task is not None]
        if tasks:
            await cancel_and_wait(*tasks)
        self._task = self._live_task = self._files_task = None
        async with self._sync_lock:
            if self._captured:
                self._flush()
            if self._doc is not None:
                await self._track_new_roots_at_close()
            self._unsubscribe()
            for shared in self._shared.values():
                shared.close()
            await self._transport.aclose()
            await self._store.aclose()

    async def _track_new_roots_at_close(self) -> None:
        """Record the keys of roots written directly on :attr:`doc` since the last sync: the
        next run observes those roots from its start and would never see the writes."""
        try:
            await self._track_new_roots()
        except CrdtsyncError as exc:  # their update is stored: it is sent, without a stamp
            log.warning("device %s: could not record new roots at close: %s", self.id, exc)

    async def _start_clock(self) -> None:
        """Restore the clock from the store (stamps go on from the greatest one stored),
        and stamp dirty keys recorded before stamps existed with the value they hold."""
        meta = self._store.meta
        self._clock.last = max(int(meta.get("clock_last", 0)), self._store.dirty_stamp)
        self._clock.offset = int(meta.get("clock_offset", 0))
        self._anchor()  # a wall clock set back while stopped: go on from the last stamp
        unstamped = await self._store.unstamped_keys()
        if unstamped:
            stamp = self._anchor().now()
            await self._store.mark_dirty(
                [_write_in(self.doc, name, key, stamp) for name, key in unstamped],
                self._local_version)

    @property
    def live(self) -> bool:
        """Whether the live channel is on: the device is open, its channel enabled (see the
        class docstring) and the server has one (it did not answer ``404``)."""
        return (self._live_task is not None and not self._live_task.done()
                and self._channel is not None and self._channel.available)

    @property
    def wake_cursor(self) -> int | None:
        """The live channel's cursor (``w`` of the last wake answer; ``None`` before the
        first, or without a channel): for diagnostics."""
        return self._channel.cursor if self._channel is not None else None

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError(f"device {self.id} is {self._state}; use `async with Device(...)`")

    # --- the document ---------------------------------------------------------------------

    @property
    def doc(self) -> Doc[Any]:
        """The underlying pycrdt document. Writes made directly to it are not validated;
        prefer :attr:`state` / :meth:`map`. A sync may replace it by a new object (a new
        client id, an adopted generation): look it up again rather than keeping it."""
        self._check_open()
        assert self._doc is not None
        return self._doc

    def map(self, name: str) -> StateMap:
        """The root map ``name`` of the device document (``state`` is :attr:`state`)."""
        return StateMap(self, name)

    def fleet(self, name: str) -> ReadOnlyMap:
        """The root map ``name`` of the fleet's shared document (read-only on the device)."""
        self._check_open()
        return ReadOnlyMap(self._shared[FLEET_DOC], name)

    def _own_env(self) -> dict[str, Any]:
        # Never create the root by reading it: an empty map would exist only on the device.
        if self._state != "open" or "env" not in self.doc.keys():  # noqa: SIM118
            return {}
        return StateMap(self, "env").to_dict()

    @property
    def schema(self) -> StateSchema:
        """The state schema of the device's fleet, from its copy of the fleet document
        (empty without a fleet or schema): :meth:`write_state` checks writes against it."""
        return self._schema.current()

    def write_state(self, name: str, changes: Mapping[str, Any]) -> None:
        """Validate and apply ``changes`` to root map ``name`` in one transaction, then persist
        it durably before returning (``None`` deletes a key). A write the fleet's schema
        refuses raises :class:`~crdtsync.errors.Forbidden` (a ``cloud`` key) or
        :class:`~crdtsync.errors.SchemaViolation`, and writes nothing."""
        crdt.root_map(self.doc, name)  # the device is open and the name valid
        self.schema.check_changes({name: changes}, writer="device")
        self._observe_roots()  # a new root: its keys are tracked from the first write on
        crdt.write(self.doc, name, changes)
        self._local_write_done()

    def _unsubscribe(self) -> None:
        """Remove the document's observers: pycrdt keeps an observed document (and this
        device, through the callbacks) alive until they are removed."""
        for target, subscription in self._subscriptions:
            target.unobserve(subscription)
        self._subscriptions = []

    def _install_doc(self, doc: Doc[Any]) -> None:
        self._unsubscribe()
        self._doc = doc
        self._observed_roots = set()
        # Subscribe once per document lifetime, before anyone writes (PYCRDT_NOTES 5, 9).
        self._subscriptions.append((doc, doc.observe(self._capture)))
        self._observe_roots()

    def _capture(self, event: TransactionEvent) -> None:
        if self._applying_remote:
            self._captured.append((event.update, (), 0))
            return
        # A local write, also one made directly on `dev.doc`: count it and persist it now,
        # with the keys it wrote (the root observers ran first, in the same commit).
        # An error cannot leave an observer (pycrdt would wrap it), so a failed append keeps
        # the update queued and StateMap writes re-raise it from `_local_write_done`.
        self._local_version += 1
        written, self._local_keys = self._local_keys, {}
        stamp = self._anchor().now()  # one stamp for the keys of one transaction
        writes = tuple(DirtyWrite(name, key, stamp, *written[name, key])
                       for name, key in sorted(written))
        self._captured.append((event.update, writes, self._local_version))
        self._wake.set()
        with contextlib.suppress(CrdtsyncError):
            self._flush()

    def _flush(self) -> None:
        """Persist captured updates with their dirty keys, durably, in order. On failure
        they stay queued."""
        while self._captured:
            update, keys, version = self._captured[0]
            self._store.append_update(STATE_DOC, update, keys, version)
            self._captured.pop(0)

    def _local_write_done(self) -> None:
        self._flush()

    def _observe_roots(self, *, announce: bool = False) -> list[str]:
        """Observe every root map once; with ``announce``, report the keys of roots that
        just appeared (their creation raised no map event). Returns the new roots."""
        assert self._doc is not None
        new = sorted({STATE_MAP, *self._doc.keys()} - self._observed_roots)
        for name in new:
            self._observed_roots.add(name)
            root: Map[Any] = self._doc.get(name, type=Map)
            # Keep the wrapper and subscription alive: dropping them ends the subscription.
            self._subscriptions.append((root, root.observe_deep(self._root_observer(name,
                                                                                    root))))
            if announce:
                for key, value in root.items():
                    self._notify(name, key, None, value)
        return new

    def _root_observer(self, name: str, root: Map[Any]) -> Callable[[list[Any]], None]:
        return lambda events: self._on_root_events(name, root, events)

    def _on_root_events(self, name: str, root: Map[Any], events: list[Any]) -> None:
        """A local transaction: remember the root keys it wrote (an edit inside a nested
        value writes the key that holds it) with the value each holds at its end (observers
        run when it commits). A remote one: announce the root keys it changed (edits inside
        nested values are not announced)."""
        for event in events:
            path = event.path
            if not self._applying_remote:
                for key in path[:1] or event.keys:
                    self._local_keys[name, key] = _written(root.get(key, _MISSING))
            elif not path:
                keys: dict[str, dict[str, Any]] = event.keys
                for key, change in keys.items():
                    self._notify(name, key, change.get("oldValue"), change.get("newValue"))

    async def _track_new_roots(self) -> None:
        """Roots created by writes made directly on :attr:`doc` were not observed when
        written (a remote update's roots are observed as it is applied): record their keys
        as dirty before they are sent, and observe them from now on."""
        assert self._doc is not None
        doc = self._doc
        keys = [(name, key) for name in self._observe_roots()
                for key in doc.get(name, type=Map)]
        if keys:
            stamp = self._anchor().now()
            await self._store.mark_dirty([_write_in(doc, name, key, stamp)
                                          for name, key in keys], self._local_version)

    def _notify(self, name: str, key: str, old: Any, new: Any) -> None:
        self._remote_changes += 1
        for callback in self._change_callbacks:
            try:
                callback(name, key, normalize(old), normalize(new))
            except Exception:
                log.exception("device %s: on_change callback failed", self.id)

    def on_change(self, callback: ChangeCallback) -> ChangeCallback:
        """Call ``callback(map, key, old, new)`` for every key the cloud changes (usable as a
        decorator). ``new`` is ``None`` for a deleted key. Called during :meth:`sync`."""
        self._change_callbacks.append(callback)
        return callback

    def on_conflict(self, callback: ConflictCallback) -> ConflictCallback:
        """Call ``callback(conflict)`` for every conflict the cloud decided between this
        device's writes and its own (usable as a decorator): a
        :class:`~crdtsync.protocol.Conflict` says which key, and who wrote what when, for
        the winner (what the key now holds) and the loser. Called during :meth:`sync`,
        after the response's changes were applied; an exception in ``callback`` is logged,
        not raised."""
        self._conflict_callbacks.append(callback)
        return callback

    def _announce_conflicts(self, conflicts: Iterable[Conflict], report: SyncReport) -> None:
        for conflict in conflicts:
            report.conflicts.append(conflict)
            for callback in self._conflict_callbacks:
                try:
                    callback(conflict)
                except Exception:
                    log.exception("device %s: on_conflict callback failed", self.id)

    # --- events ---------------------------------------------------------------------------

    async def emit(self, topic: str, body: Mapping[str, Any] | Any,
                   *, time_ms: int | None = None) -> int:
        """Queue an event durably and return its sequence number.

        When the fleet document holds a template for ``topic``, the body must fit it
        (:class:`InvalidValue` otherwise, nothing queued) and it travels as a compact binary
        record; otherwise as msgpack.

        The event stays in the local outbox until the cloud acknowledged storing it. Raises
        :class:`InvalidValue` for a bad topic or body (nothing is queued) and
        :class:`~crdtsync.errors.OutboxFull` when the outbox is full under the "reject" policy.
        """
        self._check_open()
        stamp = time_ms if time_ms is not None else self._clock.wall()
        seqs = await self._store.push_events([await self._prepare(topic, body, stamp)],
                                             self.outbox_limits)
        self._wake.set()
        return seqs[0]

    async def emit_many(self, events: Iterable[tuple[str, Any]], *,
                        time_ms: int | None = None) -> list[int]:
        """Queue several ``(topic, body)`` events durably in one transaction (one disk
        flush instead of one per event) and return their sequence numbers, in order.

        All or none: every event is validated first, and an error (bad body, template
        mismatch, :class:`~crdtsync.errors.OutboxFull`) queues nothing. The batched mode for
        high rates: durability is the same, only the flush is shared."""
        self._check_open()
        stamp = time_ms if time_ms is not None else self._clock.wall()
        items = [await self._prepare(topic, body, stamp) for topic, body in events]
        seqs = await self._store.push_events(items, self.outbox_limits)
        self._wake.set()
        return seqs

    async def _prepare(self, topic: str, body: Any, stamp: int) -> QueuedEvent:
        """Validate one event and encode it for the outbox."""
        if not isinstance(topic, str) or not NAME_RE.match(topic):
            raise InvalidValue(f"topic {topic!r} is not a valid name")
        check_event_body(body)  # errors that name the place in the value as given
        data = encode_event_body(body)
        # The bytes as the server will decode them: this also refuses what only the encoding
        # shows, a msgpack.ExtType (a tuple to Python, an extension type on the wire).
        decode_event_body(data)
        limit = DEFAULT_LIMITS.max_event_body
        if len(data) > limit:
            raise InvalidValue(f"event body is {len(data)} bytes (max {limit})")
        template = await self._template_for(topic)
        if template is not None:  # before anything is queued
            size = template.body_size(body)
            if size > limit:  # the cloud bounds the body it decodes, not the one sent
                raise InvalidValue(f"event body decodes to {size} bytes with the template "
                                   f"of {topic!r} (max {limit})")
        return topic, stamp, data, template.hash.hex() if template else None

    # --- cloud to device: messages and commands ------------------------------------------

    def on(self, topic: str) -> Callable[[MessageHandler], MessageHandler]:
        """Register ``handler(message)`` (sync or async) for messages on ``topic`` (``"*"``:
        any topic without its own handler). Handlers run during :meth:`sync`, in order; see
        :mod:`crdtsync._inbox` for the exact delivery guarantee. They must not call
        :meth:`sync` themselves."""
        def register(handler: MessageHandler) -> MessageHandler:
            self._inbox.message_handlers[topic] = handler
            self._wake.set()
            return handler
        return register

    def command(self, method: str) -> Callable[[CommandHandler], CommandHandler]:
        """Register ``handler(params) -> result`` (sync or async) for cloud commands named
        ``method``. Each command runs at most once, across restarts; its result (or the
        exception, as ``{"code", "message"}``) goes back on an immediate extra round."""
        def register(handler: CommandHandler) -> CommandHandler:
            self._inbox.command_handlers[method] = handler
            return handler
        return register

    # --- files both ways ---------------------------------------------------------------

    async def send_file(self, name: str, source: FileSource, meta: Any = None) -> FileInfo:
        """Queue file ``name`` for the cloud: ``source`` is a path, the bytes or a binary
        file object, ``meta`` JSON data (at most 4 KiB as JSON). The bytes are copied into
        the device's store first (``<path>.files``), so the file survives restarts and
        changes to the source; it is sent in chunks by the transfer task (the background
        loop, or :meth:`sync_files`), resumes where it stopped after any cut, and leaves
        :attr:`pending_files` once the cloud verified its SHA-256. A queued file of the
        same name is replaced. ``ValueError`` for a bad name or meta, ``OSError`` when the
        source cannot be read."""
        self._check_open()
        return await self._files.queue(name, source, meta)

    @property
    def pending_files(self) -> list[FileInfo]:
        """Files queued for the cloud and not yet stored there, oldest first."""
        return self._files.pending

    @property
    def files(self) -> dict[str, FileInfo]:
        """Files the cloud put for this device or its fleet that the device holds,
        verified, by name (copy one out with :meth:`fetch_file`)."""
        return self._files.held

    @property
    def file_transfers(self) -> list[FileTransfer]:
        """Transfers in flight, each with ``done`` and ``total`` bytes."""
        return list(self._files.transfers.values())

    @property
    def file_errors(self) -> dict[str, CrdtsyncError]:
        """Files that could not move for good (too large, over quota...), with the error;
        they stay queued and are tried again every few minutes."""
        return dict(self._files.errors)

    def on_file(self, name: str | None = None) -> Callable[[FileHandler], FileHandler]:
        """Register ``handler(info)`` (sync or async) for received file ``name`` (``None``:
        every file). It runs once per received version, after the bytes were verified;
        again only if it raised or the device died before it was recorded."""
        def register(handler: FileHandler) -> FileHandler:
            self._files.on_file(name, handler)
            return handler
        return register

    def on_file_progress(self, callback: ProgressCallback) -> ProgressCallback:
        """Register ``callback(transfer)``, called as transfers move (after each chunk)."""
        self._files.on_progress(callback)
        return callback

    async def fetch_file(self, name: str, dest: str | Path | Any) -> FileInfo:
        """Copy received file ``name`` to ``dest`` (a path or a binary file object),
        checking its SHA-256; :class:`NotFound` if the device holds none."""
        self._check_open()
        return await self._files.fetch(name, dest)

    async def sync_files(self) -> None:
        """Send every queued file and receive every announced one now (the background
        loop does this by itself; call it with ``interval=None`` after :meth:`sync`).
        Raises a retryable :class:`CrdtsyncError` when the link or the server failed;
        files refused for good are in :attr:`file_errors`."""
        self._check_open()
        await self._files.run_once()

    def _announced_files(self) -> dict[str, Any]:
        """The ``files`` maps of the fleet document and of the device's own (its own
        wins): what the cloud put for the device."""
        if self._state != "open":
            return {}
        announced = dict(self._shared[FLEET_DOC].get(FILES_MAP))
        if FILES_MAP in self.doc.keys():  # noqa: SIM118  (never create the root by reading)
            announced.update(StateMap(self, FILES_MAP).to_dict())
        return announced

    # --- device to cloud: proxied requests ----------------------------------------------

    async def request(self, route: str, body: Any = None, *, request_id: str | None = None
                      ) -> dict[str, Any]:
        """Ask the cloud to call the configured route ``route`` with ``body``; return the
        outcome ``{"ok", "status", "body", ...}`` once it arrived.

        Durable: offline, the request waits; after a restart, find it with
        :meth:`pending_requests` and await it with :meth:`wait_request`. Passing the same
        ``request_id`` again never performs it twice. Raises
        :class:`~crdtsync.errors.RouteFailed` (``.reason``) when the route failed. To bound
        the wait, use ``asyncio.timeout()``: cancelling the wait leaves the request queued."""
        return await self._calls.wait(await self.queue_request(route, body,
                                                               request_id=request_id))

    async def queue_request(self, route: str, body: Any = None, *,
                            request_id: str | None = None) -> str:
        """Queue a proxied request durably without waiting; returns its id, for
        :meth:`wait_request` later (now, or after a restart)."""
        self._check_open()
        call_id = await self._calls.add(route, body, request_id)
        self._wake.set()
        return call_id

    async def pending_requests(self) -> list[str]:
        """Ids of proxied requests still waiting for their outcome."""
        self._check_open()
        return await self._calls.pending()

    async def wait_request(self, request_id: str) -> dict[str, Any]:
        """The outcome of an earlier :meth:`request` (for example after a restart)."""
        self._check_open()
        return await self._calls.wait(request_id)

    async def _template_for(self, topic: str) -> Template | None:
        """The template the fleet document holds for ``topic`` (kept locally by hash, so
        queued events still encode after it changes), or ``None``."""
        entry = self._shared[FLEET_DOC].get(TEMPLATES).get(topic)
        if not isinstance(entry, dict) or not isinstance(entry.get("json"), str):
            return None
        known = self._templates.get(str(entry.get("hash")))
        if known is not None and f"template:{entry['hash']}" in self._store.meta:
            return known  # already checked against its hash and kept
        template = Template.from_json(entry["json"])
        if template.hash.hex() != entry.get("hash"):
            log.warning("device %s: template for %r does not match its hash; ignored",
                        self.id, topic)
            return None
        key = f"template:{entry['hash']}"
        if key not in self._store.meta:
            await self._store.set_meta(**{key: template.canonical.decode()})
        self._templates[template.hash.hex()] = template
        return template

    def _local_template(self, digest: str) -> Template | None:
        template = self._templates.get(digest)
        if template is None and f"template:{digest}" in self._store.meta:
            template = Template.from_json(self._store.meta[f"template:{digest}"])
            self._templates[digest] = template
        return template

    @property
    def pending_events(self) -> int:
        """Events queued locally and not yet acknowledged by the cloud."""
        return self._store.outbox_count

    # --- sync -----------------------------------------------------------------------------

    async def sync(self) -> SyncReport:
        """Sync state and events with the cloud now, and return what happened.

        Usually one round trip; one more when a side had lost data, and more while the outbox
        holds more events than one request carries. Raises :class:`CrdtsyncError` (check
        ``.retryable``); a failed sync loses nothing and is safe to repeat.
        """
        self._check_open()
        async with self._sync_lock:
            report = SyncReport()
            started = time.perf_counter()
            self._last_attempt = time.monotonic()
            self._sync_started.set()
            try:
                while await self._round(report):
                    if report.rounds >= self.max_rounds:
                        raise SyncStalled(f"sync needed more than {self.max_rounds} rounds",
                                          {"rounds": report.rounds})
            except CrdtsyncError as exc:
                self.last_error = exc
                raise
            report.duration = time.perf_counter() - started
            self.last_report = report
            self.last_error = None
            self._files.poke()  # the announced files may have changed
            return report

    @property
    def _gen(self) -> int:
        """The generation of the local document (docs/protocol.md 8)."""
        return int(self._store.meta.get(STATE_GEN, 0))

    def _doc_part(self, stamps: tuple[StampedWrite, ...] = ()
                  ) -> tuple[DocSync, dict[int, int]]:
        doc = self.doc
        local_sv = doc.get_state()
        known = self._store.meta.get("server_sv")
        known_sv = parse_state_vector(known) if known else {}
        local = parse_state_vector(local_sv)
        update = b""
        if self._local_version != self._synced_version or not covers(known_sv, local):
            update = doc.get_update(known) if known else doc.get_update()
            if update == EMPTY_UPDATE:
                update = b""
        # `s` (and `ck`) only when there is a stamped write: an empty `s` decides nothing,
        # and a no-change sync stays under 100 bytes (docs/protocol.md 3.1).
        return DocSync(STATE_DOC, local_sv, update, self._gen, adopt=True,
                       stamps=stamps or None), local

    async def _stamps(self) -> tuple[StampedWrite, ...]:
        """The stamped writes to send (``s``): the last write of every dirty key, except
        keys holding a shared type (Yjs merges their edits) and values too large to travel
        as one item (their update still travels: the cloud takes them as unstamped
        writes). At most ``max_stamps``, the rest likewise."""
        out: list[StampedWrite] = []
        limits = DEFAULT_LIMITS
        for w in await self._store.dirty_writes():
            if w.nested:
                continue
            if len(out) == limits.max_stamps or len(w.value or b"") > limits.max_item_body:
                log.warning("device %s: %s.%s is sent without its stamp (over %d stamps "
                            "or %d bytes)", self.id, w.map, w.key, limits.max_stamps,
                            limits.max_item_body)
                continue
            out.append(StampedWrite(w.map, w.key, w.stamp, None, True) if w.value is None
                       else StampedWrite(w.map, w.key, w.stamp, msgpack.unpackb(w.value)))
        return tuple(out)

    async def _round(self, report: SyncReport) -> bool:
        """One request/response; True when another round is needed."""
        self._flush()  # the update sent and the stamps read below hold the same writes
        await self._track_new_roots()
        # Before reading the stamps: a write made meanwhile has a higher version and stays
        # dirty, even if this request carries it.
        version = self._local_version
        stamps = await self._stamps()
        part, sent_sv = self._doc_part(stamps)
        batch = (await self._store.pending(self.max_events_per_sync, self.max_batch_bytes)
                 if self._store.outbox_count else [])
        calls, outcomes_acked = await self._calls.to_send(DEFAULT_LIMITS.max_items)
        plain, templated = pack(batch, self._local_template)
        request = SyncRequest(
            device=self.id, docs=(part, *(s.part() for s in self._shared.values())),
            events=plain_events(plain), batches=tuple(templated),
            purged=int(self._store.meta.get("purged", 0)),
            down_done=self._inbox.done,
            results=await self._inbox.results(DEFAULT_LIMITS.max_items),
            calls=calls, outcomes_acked=outcomes_acked,
            awaiting=self._store.call_count("accepted"),
            clock=self._anchor().physical() if stamps else None,
        )
        body = encode_request(request, bodies=[e.body for e in plain])
        report.rounds += 1
        report.bytes_up += len(body)
        try:
            raw = await self._transport.exchange(body)
        except SeqConflict as exc:
            return await self._renumber(exc, report)
        except (TooManyEvents, BodyTooLarge) as exc:
            if len(batch) <= 1:
                raise
            self._shrink_batches(exc, len(batch))
            return True
        report.bytes_down += len(raw)
        response = decode_response(raw)
        report.events_sent += len(batch)
        if version == self._local_version:
            self._synced_version = version
        resend = await self._apply_response(response, sent_sv, version, report)
        for doc_part in response.docs:
            if doc_part.doc in self._shared:
                await self._shared[doc_part.doc].apply(doc_part)
        report.env_changes += self.env.announce()
        acked = await self._ack(response, batch, report)
        self._announce_conflicts(response.conflicts, report)
        results = await self._apply_downlink(response, report)
        await self._maybe_compact()
        return resend or results > 0 or (acked and self._store.outbox_count > 0)

    async def _apply_downlink(self, response: SyncResponse, report: SyncReport) -> int:
        """Acknowledged results, request outcomes, then messages and commands, in order.
        Returns how many new command results wait to be sent."""
        if response.down_done:
            await self._store.ack_results(response.down_done)
        await self._calls.apply(response.accepted, response.outcomes)
        report.outcomes += len(response.outcomes)
        for outcome in response.outcomes:
            if outcome.refused is not None:
                log.warning("device %s: could not take the outcome of request %r; stored as "
                            "failed: %s: %s", self.id, outcome.id, outcome.refused.code,
                            outcome.refused.message)
                report.skipped.append(SkippedItem("outcome", outcome.id, outcome.refused.code,
                                                  outcome.refused.message))
        done = self._inbox.done
        results = await self._inbox.process(response.down)
        report.downlink += self._inbox.done - done
        report.skipped += [SkippedItem(i.kind, str(i.seq), i.refused.code, i.refused.message)
                           for i in self._inbox.skipped if i.refused is not None]
        return results

    def _shrink_batches(self, exc: CrdtsyncError, sent: int) -> None:
        """The server refused the batch size: adopt its limit (or halve) and go again."""
        limit = exc.detail.get("max_events")
        if isinstance(exc, TooManyEvents) and isinstance(limit, int) and 0 < limit < sent:
            self.max_events_per_sync = limit
        else:
            self.max_events_per_sync = max(1, sent // 2)
            self.max_batch_bytes = max(1024, self.max_batch_bytes // 2)
        log.warning("device %s: server refused %d events in one request (%s); sending at "
                    "most %d", self.id, sent, exc.code, self.max_events_per_sync)

    async def _renumber(self, exc: SeqConflict, report: SyncReport) -> bool:
        seq, last = exc.detail.get("seq"), exc.detail.get("last_seq")
        if not isinstance(seq, int) or not isinstance(last, int) or report.recovered:
            raise exc
        log.warning("device %s: cloud holds seq %d with other content (store wiped or "
                    "restored?); renumbering queued events from %d", self.id, seq, last + 1)
        # Events of the batch below `seq` matched what the cloud stores: they are acknowledged.
        report.events_acked += await self._store.ack(seq - 1)
        await self._store.renumber(seq, last + 1)
        report.recovered = True
        return True

    async def _apply_response(self, response: SyncResponse, sent_sv: dict[int, int],
                              version: int, report: SyncReport) -> bool:
        """Apply the response's ``state`` entry to a request that held ``sent_sv`` and the
        local writes up to ``version``; True when another round is needed."""
        part = next((d for d in response.docs if d.doc == STATE_DOC), None)
        shift = self._learn_time(response.time,
                                 pending=self._stays_dirty(part, sent_sv, version))
        if part is None:
            await self._store_response(None, {}, shift)
            return False
        before = self._remote_changes
        if part.gen != self._gen:
            # The checks below compare with what we sent, which belonged to another
            # generation: skipped; the next round sends the carried writes, if any.
            carried = await self._adopt(part, shift)
            report.adopted = True
            report.changes += self._remote_changes - before
            return carried
        if part.update:
            self._apply_remote(part.update)
        report.changes += self._remote_changes - before
        # The new diff base, stored after the update it covers (persisted just above).
        new_sv = {"server_sv": part.sv} if part.sv != self._store.meta.get("server_sv") else {}
        server_sv = parse_state_vector(part.sv)
        assert self._doc is not None
        own = self._doc.client_id
        if server_sv.get(own, 0) > sent_sv.get(own, 0):
            await self._rotate_client_id()
        if covers(server_sv, sent_sv):
            # The cloud holds every local write up to `version` (the request carried them,
            # or an earlier one did): they are no longer dirty. Writes made while the request
            # was in flight have higher versions and stay dirty.
            await self._store_response(version, new_sv, shift)
            return False
        await self._store_response(None, new_sv, shift)
        # The cloud lacks part of what we hold (it lost data, or our diff base was wrong):
        # the next round diffs against the state vector it just told us.
        report.recovered = True
        self._synced_version = -1
        return True

    async def _store_response(self, upto: int | None, new_sv: dict[str, bytes],
                              shift: int) -> None:
        """One local transaction for what a response changed: the dirty keys it
        acknowledged (versions ``<= upto``), the stamps of the others moved ``shift`` ms
        with the clock, the new diff base and the clock (stored alone only if it moved)."""
        clock = (self._clock_meta() if new_sv or self._store.dirty_count or self._clock_moved()
                 else {})
        await self._store.clear_dirty(upto, shift_ms=shift, **new_sv, **clock)
        self._clock.observe(self._store.dirty_stamp)  # after the shifted stamps

    def _anchor(self) -> hlc.HybridClock:
        """The clock, its frame (wall clock + offset) moved up to its last stamp if behind
        it. A clock never goes back, so after stamps from a frame that ran ahead (a wall
        clock ahead before the offset was learnt, a wall clock set back, a restart at 1970)
        it would otherwise repeat its last millisecond, and ``ck`` with it: the cloud would
        date every write as made when it was sent. Anchored, the frame runs on at the wall
        clock's rate from the last stamp, and ``ck`` stays in the frame of the stamps, which
        is all the cloud's correction needs (docs/protocol.md 9.1)."""
        clock = self._clock
        clock.offset = max(clock.offset, hlc.stamp_ms(clock.last) - clock.wall())
        return clock

    def _stays_dirty(self, part: DocSync | None, sent_sv: dict[int, int],
                     version: int) -> bool:
        """Whether a stamped local write stays to send after the response whose ``state``
        entry is ``part`` (to a request that held ``sent_sv`` and the writes up to
        ``version``): not acknowledged, or carried into a new generation (every key, when
        the cloud went back to a lower one)."""
        if part is not None and part.gen < self._gen:
            return True
        if not self._store.dirty_count:
            return False
        if part is None or part.gen != self._gen or not covers(
                parse_state_vector(part.sv), sent_sv):
            return True
        return self._store.dirty_version > version

    def _learn_time(self, server_ms: int, *, pending: bool) -> int:
        """Take the server's clock from a response's ``time``: the offset of the wall clock
        from it (as far as the last stamp allows, :meth:`_anchor`), and every later stamp
        after it (causality with what the device received). ``0`` (not sent) and times
        beyond :data:`MAX_TIME_MS` teach nothing. Returns how many ms the frame moved
        forward: dirty stamps move with it, so a write still to send (made while the request
        was in flight) stays in the frame of the next ``ck``. While writes stay ``pending``
        the frame never moves back: their stamps cannot follow it (a device's own writes
        are ordered by their stamps, which must only grow), and a ``ck`` from a frame moved
        back would date them late by the move (up to the time since the last stamp, when
        the frame ran ahead of the server's clock). Once none is pending, the next
        response brings the frame back."""
        clock = self._clock
        before = clock.offset
        if 0 < server_ms <= MAX_TIME_MS:
            learnt = server_ms - clock.wall()
            if learnt > before or not pending:
                clock.offset = learnt
            clock.observe(hlc.stamp(server_ms, hlc.COUNTER_MASK))
        return max(0, self._anchor().offset - before)

    def _clock_meta(self) -> dict[str, int]:
        """The clock as stored with a response (device meta)."""
        return {"clock_last": self._clock.last, "clock_offset": self._clock.offset}

    def _clock_moved(self) -> bool:
        """Whether the stored offset is more than :data:`OFFSET_SLACK_MS` off the clock's."""
        stored = self._store.meta.get("clock_offset")
        return stored is None or abs(int(stored) - self._clock.offset) > OFFSET_SLACK_MS

    def _apply_remote(self, update: bytes) -> None:
        self._applying_remote = True
        try:
            crdt.apply_remote(self.doc, update)
        finally:
            self._applying_remote = False
        self._flush()
        self._observe_roots(announce=True)

    async def _adopt(self, part: DocSync, shift: int) -> bool:
        """Replace the local document by the generation ``part`` carries (its ``u`` is the
        whole document), re-applying the local writes the cloud has not acknowledged (the
        dirty keys; every key when the cloud went back to a lower generation) as local
        writes of a new client id. Carried dirty keys keep their stamps and values: the
        next round sends them, and the cloud decides them like any write. One local
        transaction stores the new document, its generation, client id, diff base and the
        clock: a crash leaves either generation, complete (docs/protocol.md 8.1).
        ``on_change`` reports the keys whose value changed. Returns whether keys were
        carried (then the cloud lacks them: another round)."""
        self._flush()  # every local write of the old document is stored, with its dirty key
        old, old_gen = self.doc, self._gen
        dirty = await self._store.dirty_keys()
        # A lower generation may lack what the cloud once acknowledged: every key goes too.
        extra = sorted(set(crdt.root_keys(old)) - set(dirty)) if part.gen < old_gen else []
        keys = sorted({*dirty, *extra})
        doc = crdt.new_doc(crdt.random_client_id())
        if part.update:
            crdt.apply_remote(doc, part.update, name=STATE_DOC)
        crdt.carry(old, doc, keys)
        self._local_version += 1
        # An acknowledged key held its value when the device last stored a response: it is
        # stamped with that time, so cloud writes made since win over it.
        since = int(self._store.meta.get("clock_last", 0)) or self._anchor().now()
        await self._store.replace_doc(
            STATE_DOC, doc.get_update(),
            {STATE_GEN: part.gen, "client_id": doc.client_id, "server_sv": part.sv,
             **self._clock_meta()},
            carried=True, dirty=[_write_in(old, name, key, since) for name, key in extra],
            version=self._local_version, shift_ms=shift)
        self._clock.observe(self._store.dirty_stamp)
        log.info("device %s: adopted generation %d of its document (was %d); %d local "
                 "key(s) re-applied", self.id, part.gen, old_gen, len(keys))
        before, after = crdt.to_json(old), crdt.to_json(doc)
        self._install_doc(doc)
        self._synced_version = -1
        for name, key in crdt.differences(before, after):
            self._notify(name, key, before.get(name, {}).get(key), after.get(name, {}).get(key))
        return bool(keys)

    async def _rotate_client_id(self) -> None:
        """The cloud has seen more of our own client id than our store holds: the store was
        restored from an old copy. Continuing with that id would reuse clocks and diverge
        (PYCRDT_NOTES 14), so take a new one."""
        assert self._doc is not None
        new_id = crdt.random_client_id()
        log.warning("device %s: local store is behind the cloud for its own client id; "
                    "switching to a new client id", self.id)
        self._flush()
        await self._store.set_meta(client_id=new_id)
        self._install_doc(crdt.new_doc(new_id, self._doc.get_update()))

    async def _ack(self, response: SyncResponse, batch: list[OutboxEvent],
                   report: SyncReport) -> bool:
        if not batch:
            return False
        # Only what this request carried: a cloud ahead of a wiped store acks seqs we reuse.
        upto = min(response.acked, batch[-1].seq)
        if upto < batch[0].seq:
            return False
        report.events_acked += await self._store.ack(upto)
        return True

    async def _maybe_compact(self) -> None:
        if self._store.update_rows < self.compact_every:
            return
        self._flush()
        assert self._doc is not None
        await self._store.compact(STATE_DOC, self._store.last_update_id, self._doc.get_update())

    # --- background loop ------------------------------------------------------------------

    def request_sync(self) -> None:
        """Ask the background loop to sync soon (respecting ``min_spacing``)."""
        self._wake.set()

    async def _sync_now(self) -> None:
        """Have the background loop sync without waiting for ``min_spacing`` (a wake from
        the live channel; :data:`WAKE_SPACING` still holds), and return once a sync started
        (this one, or another that started after the call)."""
        self._sync_started.clear()
        self._hurry.set()
        self._wake.set()
        await self._sync_started.wait()

    async def _run(self) -> None:
        failures = 0
        delay = 0.0
        reported: str | None = None  # the failure last logged: its repeats go to debug
        while True:
            if failures:
                await asyncio.sleep(delay)
            else:
                await wait_event(self._wake, delay)
            await self._spaced()
            self._wake.clear()
            self._hurry.clear()
            try:
                await self.sync()
                if failures:
                    log.info("device %s: sync recovered after %d failed attempts", self.id,
                             failures)
                failures, reported = 0, None
                delay = self.interval or 0.0
            except CrdtsyncError as exc:
                failures += 1
                # A permanent error (revoked token, ...) will not heal by hammering: wait the
                # longest backoff, and keep trying so a fixed server resumes the device.
                delay = self._backoff(failures if exc.retryable else 64)
                reported = self._log_failure(exc, reported, delay)
            except Exception:
                failures += 1
                delay = self._backoff(failures)
                log.exception("device %s: unexpected error in sync loop", self.id)

    def _log_failure(self, exc: CrdtsyncError, reported: str | None, delay: float) -> str:
        """Log a failed sync on one short line: at warning (error if retrying cannot heal
        it) when it differs from the failure ``reported`` last, else at debug, so a server
        that stays down costs one warning, not one per retry. Returns the reason logged."""
        reason = failure_reason(exc)
        if reason == reported:
            level = logging.DEBUG
        else:
            level = logging.WARNING if exc.retryable else logging.ERROR
        log.log(level, "device %s: sync failed: %s; retrying in %.1f s", self.id, reason,
                delay)
        return reason

    async def _spaced(self) -> None:
        """Wait until ``min_spacing`` passed since the last sync started, or only
        :data:`WAKE_SPACING` once the live channel asks (also while this waits)."""
        while True:
            floor = WAKE_SPACING if self._hurry.is_set() else self.min_spacing
            left = floor - (time.monotonic() - self._last_attempt)
            if left <= 0:
                return
            if self._hurry.is_set():
                await asyncio.sleep(left)
            else:
                await wait_event(self._hurry, left)

    def _backoff(self, failures: int) -> float:
        return backoff_delay(self.backoff, failures)


def backoff_delay(backoff: tuple[float, float], failures: int) -> float:
    """Seconds to wait after ``failures`` failed syncs in a row, for ``backoff`` =
    ``(base, cap)``: exponential backoff with "equal jitter", half fixed, half random. A
    sync loop passes 64 failures after an error that is not retryable (the longest wait)."""
    base, cap = backoff
    step: float = min(cap, base * 2.0 ** min(failures - 1, 32))
    return step / 2 + random.uniform(0, step / 2)


class _Wake(asyncio.Event):
    """The event that wakes a device's sync loop, also told to a ``listener``."""

    def __init__(self, listener: Callable[[], None] | None) -> None:
        super().__init__()
        self._listener = listener

    def set(self) -> None:
        super().set()
        if self._listener is not None:
            self._listener()


def _written(value: Any) -> tuple[bytes | None, bool]:
    """What a root-map key holding ``value`` records as written (:class:`DirtyWrite`'s
    ``value`` and ``nested``): the msgpack of a plain value, ``(None, False)`` for a deleted
    key (``_MISSING``), ``(None, True)`` for a shared type."""
    if value is _MISSING:
        return None, False
    if isinstance(value, (Map, Array, Text)):
        return None, True
    return msgpack.packb(normalize(value), use_bin_type=True), False


def _write_in(doc: Doc[Any], name: str, key: str, stamp: int) -> DirtyWrite:
    """Key ``key`` of root map ``name`` of ``doc`` as a write with ``stamp`` (a root is not
    created only to find the key absent)."""
    value = (doc.get(name, type=Map).get(key, _MISSING)
             if name in doc.keys() else _MISSING)  # noqa: SIM118 (not a Mapping)
    return DirtyWrite(name, key, stamp, *_written(value))
