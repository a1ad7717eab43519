"""An in-memory :class:`~crdtsync_server.store.base.Store` for unit tests and simulations.

It keeps the same contract as the SQLite store (the contract suite runs against both):
monotonic update ids and event cursors that are never reused, compaction by id range,
``(device, seq)`` deduplication through :func:`plan_events`, and all-or-nothing commits.
Event bodies and device metadata go through JSON on the way in and out, exactly as they do
in a database, so a test cannot pass here and fail on SQLite because of a shared object.

Every method runs synchronously between two awaits, so each one is atomic on its event loop.
Nothing survives :meth:`MemoryStore.aclose`. Unlike a database store, a ``MemoryStore`` may
be used without calling :meth:`~MemoryStore.open` (it has nothing to connect to).
"""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from crdtsync.errors import AlreadyExists, ClosedError, NotFound

from .base import (
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    EventPlan,
    StoredEvent,
    SyncWrite,
    event_digest,
    event_json,
    plan_events,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Doc:
    gen: int = 0
    snapshot: bytes = b""
    snapshot_id: int = 0
    updates: dict[int, bytes] = field(default_factory=dict)  # insertion order is id order


@dataclass(frozen=True, slots=True)
class _Event:
    cursor: int
    device: str
    seq: int
    topic: str
    time: int
    received: int
    body_json: str

    def stored(self) -> StoredEvent:
        return StoredEvent(
            cursor=self.cursor, device=self.device, seq=self.seq, topic=self.topic,
            time=self.time, received=self.received, body=json.loads(self.body_json),
        )


def _copy_device(device: DeviceRecord) -> DeviceRecord:
    return dataclasses.replace(device, meta=json.loads(json.dumps(dict(device.meta))))


class MemoryStore:
    """A :class:`Store` held in dicts. Raises :class:`ClosedError` after :meth:`aclose`."""

    def __init__(self) -> None:
        self._closed = False
        self._docs: dict[str, _Doc] = {}
        self._last_update_id = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._events: list[_Event] = []  # cursor order
        self._digests: dict[tuple[str, int], bytes] = {}
        self._settings: dict[str, str] = {}

    async def __aenter__(self) -> MemoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("MemoryStore is closed")

    async def open(self) -> None:
        """Nothing to connect to; raises :class:`ClosedError` after :meth:`aclose`."""
        self._check_open()

    async def aclose(self) -> None:
        """Drop everything; idempotent."""
        self._closed = True
        self._docs.clear()
        self._devices.clear()
        self._events.clear()
        self._digests.clear()
        self._settings.clear()

    # documents

    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""
        self._check_open()
        doc = self._docs.get(key)
        if doc is None:
            return DocLog()
        return DocLog(doc.gen, doc.snapshot, doc.snapshot_id, tuple(doc.updates.items()))

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...]:
        """Updates of ``key`` with id > ``after_id`` in id order."""
        self._check_open()
        doc = self._docs.get(key)
        if doc is None:
            return ()
        return tuple((i, data) for i, data in doc.updates.items() if i > after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows.

        A no-op unless ``upto_id`` is above the current ``snapshot_id`` (a stale compaction
        never replaces a newer snapshot)."""
        self._check_open()
        doc = self._docs.get(key, _Doc())
        if upto_id <= doc.snapshot_id:
            return
        self._docs[key] = doc
        doc.snapshot, doc.snapshot_id = snapshot, upto_id
        doc.updates = {i: data for i, data in doc.updates.items() if i > upto_id}

    # the sync transaction

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates and store new events atomically (see ``Store.commit``).

        Raises :class:`NotFound` for an unknown device and :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, in every case with nothing written;
        ``ValueError`` for events without a device."""
        self._check_open()
        if write.device is None:
            if write.events:
                raise ValueError("a write without a device cannot carry events")
            return CommitResult(update_ids=self._append_updates(write.docs))
        device = self._devices.get(write.device)
        if device is None:
            raise NotFound(f"device {write.device!r} does not exist", {"device": write.device})
        plan = self._plan(device, write)
        # Everything that can fail has been checked: from here on the commit cannot half-apply.
        update_ids = self._append_updates(write.docs)
        device = self._store_events(device, write.time, plan)
        return CommitResult(update_ids, device.last_seq, len(plan.new))

    def _plan(self, device: DeviceRecord, write: SyncWrite) -> EventPlan:
        stored = {
            e.seq: self._digests[(device.id, e.seq)]
            for e in write.events
            if e.seq <= device.last_seq and (device.id, e.seq) in self._digests
        }
        return plan_events(device.id, device.last_seq, write.purged, write.events, stored)

    def _append_updates(self, docs: Sequence[DocWrite]) -> tuple[int, ...]:
        ids: list[int] = []
        for w in docs:
            doc = self._docs.setdefault(w.key, _Doc(gen=w.gen))
            self._last_update_id += 1
            doc.updates[self._last_update_id] = w.update
            ids.append(self._last_update_id)
        return tuple(ids)

    def _store_events(self, device: DeviceRecord, received: int, plan: EventPlan) -> DeviceRecord:
        for e in plan.new:
            cursor = self._events[-1].cursor + 1 if self._events else 1
            self._events.append(
                _Event(cursor, device.id, e.seq, e.topic, e.time, received, event_json(e))
            )
            self._digests[(device.id, e.seq)] = event_digest(e)
        last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
        updated = dataclasses.replace(
            device, last_seq=last_seq, events_lost=device.events_lost + plan.lost,
            last_sync=received,
        )
        self._devices[device.id] = updated
        return updated

    # devices

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken."""
        self._check_open()
        if device.id in self._devices:
            raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})
        self._devices[device.id] = _copy_device(device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        self._check_open()
        device = self._devices.get(device_id)
        return None if device is None else _copy_device(device)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        self._check_open()
        _check_limit(limit)
        ids = sorted(i for i in self._devices if i > after)[:limit]
        return [_copy_device(self._devices[i]) for i in ids]

    # events

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        self._check_open()
        _check_limit(limit)
        found: list[StoredEvent] = []
        start = bisect_right(self._events, after, key=lambda e: e.cursor)
        for e in self._events[start:]:
            if len(found) >= limit:
                break
            if (device is None or e.device == device) and (topic is None or e.topic == topic):
                found.append(e.stored())
        return found

    # settings

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        self._check_open()
        return self._settings.get(key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        self._check_open()
        self._settings[key] = value


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")

