"""An in-memory :class:`~crdtsync_server.store.base.Store` for unit tests and simulations.

It keeps the same contract as the SQLite store (the contract suite runs against both):
monotonic update ids and event cursors that are never reused, compaction by id range,
rebuilds compared-and-set on generation and last update id, commits refused for a stale
generation, ``(device, seq)`` deduplication through :func:`plan_events`, and
all-or-nothing commits. Event bodies, device and fleet metadata, downlink bodies and
results, and request bodies and outcomes go through JSON on the way in and out, exactly as
they do in a database, so a test cannot pass here and fail on SQLite because of a shared
object. The downlink, request
and fleet rules are those of :mod:`crdtsync_server.store.sqlite` (its module docstring spells
them out).

Every method runs synchronously between two awaits, so each one is atomic on its event loop.
Nothing survives :meth:`MemoryStore.aclose`. Unlike a database store, a ``MemoryStore`` may
be used without calling :meth:`~MemoryStore.open` (it has nothing to connect to).
"""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crdtsync.errors import AlreadyExists, ClosedError, NotFound

from .base import (
    FINISHED_DOWNLINK,
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Downlink,
    EventPlan,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    StoredEvent,
    SyncWrite,
    above_deleted,
    check_kind,
    check_limit,
    check_write,
    event_digest,
    plan_events,
    result_columns,
    stale_generation,
    updated_fields,
)
from .feed import (
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    FeedRow,
    ProjectionRow,
    StateChange,
    change_row,
    conflict_row,
    event_json,
    event_rows,
    item_from_row,
    json_text,
    projection_writes,
    purgeable_prefix,
)
from .sinks import (
    DeadLetter,
    SinkConfig,
    SinkRecord,
    check_origin,
    config_columns,
    config_from_columns,
    item_from_text,
    item_text,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Doc:
    gen: int = 0
    snapshot: bytes = b""
    snapshot_id: int = 0
    updates: dict[int, bytes] = field(default_factory=dict)  # insertion order is id order

    @property
    def last_id(self) -> int:
        """The highest update id this document reflects (logged rows and snapshot)."""
        return max([self.snapshot_id, *self.updates])


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


@dataclass(slots=True)
class _Item:
    """A downlink row; JSON columns are kept as text, as a database keeps them."""

    id: int
    device: str
    seq: int
    kind: str
    name: str
    body: str
    created: int
    expires: int | None
    updated: int
    status: str = "queued"
    result: str | None = None
    error: str | None = None

    def record(self) -> Downlink:
        return Downlink(
            id=self.id, device=self.device, seq=self.seq, kind=self.kind, name=self.name,
            body=json.loads(self.body), created=self.created, expires=self.expires,
            status=self.status, result=_loads(self.result), error=_loads(self.error),
            updated=self.updated,
        )

    def set_status(self, status: str, now: int) -> None:
        self.status, self.updated = status, now


@dataclass(slots=True)
class _Request:
    device: str
    id: str
    route: str
    body: str
    created: int
    updated: int
    status: str = "pending"
    outcome: str | None = None

    def record(self) -> ProxyRequest:
        return ProxyRequest(
            device=self.device, id=self.id, route=self.route, body=json.loads(self.body),
            created=self.created, status=self.status, outcome=_loads(self.outcome),
            updated=self.updated,
        )

    def set_status(self, status: str, now: int, outcome: str | None = None) -> None:
        self.status, self.updated = status, now
        if outcome is not None:
            self.outcome = outcome


@dataclass(slots=True)
class _Letter:
    """A dead letter; the item is kept as JSON text, as a database keeps it."""

    id: int
    sink: str
    item: str
    error: str
    attempts: int
    created: int
    retry: bool = False

    def record(self) -> DeadLetter:
        return DeadLetter(self.id, self.sink, item_from_text(self.item), self.error,
                          self.attempts, self.created, self.retry)


def _copy_config(config: SinkConfig) -> SinkConfig:
    return config_from_columns(*config_columns(config))


def _copy_device(device: DeviceRecord) -> DeviceRecord:
    return dataclasses.replace(device, meta=json.loads(json.dumps(dict(device.meta))))


def _copy_fleet(fleet: FleetRecord) -> FleetRecord:
    return dataclasses.replace(fleet, meta=json.loads(json.dumps(dict(fleet.meta))))


class MemoryStore:
    """A :class:`Store` held in dicts. Raises :class:`ClosedError` after :meth:`aclose`."""

    def __init__(self) -> None:
        self._closed = False
        self.external_writes: int | None = None
        """Unknown: a memory store may be shared, so the document cache always catches up."""
        self._docs: dict[str, _Doc] = {}
        self._last_update_id = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._by_token: dict[str, set[str]] = {}  # token hash -> device ids (the index)
        self._fleets: dict[str, FleetRecord] = {}
        self._events: list[_Event] = []  # cursor order
        self._digests: dict[tuple[str, int], bytes] = {}
        self._settings: dict[str, str] = {}
        self._items: dict[int, _Item] = {}
        self._last_item_id = 0
        self._downlink: dict[str, dict[int, _Item]] = {}  # device -> seq -> item, seq order
        self._requests: dict[tuple[str, str], _Request] = {}
        self._feed: list[FeedItem] = []  # cursor order
        self._feed_floor = 0  # the highest purged cursor
        self._last_cursor = 0  # cursors are never reused, even after a purge
        self._projection: dict[tuple[str, str, str, str], tuple[str, int]] = {}
        self._sinks: dict[str, SinkRecord] = {}
        self._letters: dict[int, _Letter] = {}  # id order
        self._last_letter_id = 0
        self._deleted_devices: dict[str, int] = {}  # id -> last_seq when deleted
        self._stamps: dict[str, dict[tuple[str, str], KeyStamp]] = {}  # doc -> (map, key)

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
        self._by_token.clear()
        self._fleets.clear()
        self._events.clear()
        self._digests.clear()
        self._settings.clear()
        self._items.clear()
        self._downlink.clear()
        self._requests.clear()
        self._sinks.clear()
        self._letters.clear()
        self._deleted_devices.clear()
        self._stamps.clear()

    # documents

    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""
        self._check_open()
        doc = self._docs.get(key)
        if doc is None:
            return DocLog()
        return DocLog(doc.gen, doc.snapshot, doc.snapshot_id, tuple(doc.updates.items()))

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` if compacted
        past ``after_id``."""
        self._check_open()
        doc = self._docs.get(key)
        if doc is None:
            return ()
        if after_id < doc.snapshot_id:
            return None
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

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> bool:
        """Replace ``key`` by generation ``gen + 1`` holding ``snapshot`` if it is still at
        ``gen`` with nothing above ``upto_id`` (see ``Store.rebuild``)."""
        self._check_open()
        doc = self._docs.get(key, _Doc())
        if doc.gen != gen or doc.last_id > upto_id:
            return False
        self._replace_doc(key, gen + 1, snapshot)
        return True

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key``, ordered by map and key."""
        self._check_open()
        rows = self._stamps.get(key, {})
        return [rows[where] for where in sorted(rows)]

    def _write_stamps(self, rows: Sequence[KeyStamp]) -> None:
        for row in rows:
            self._stamps.setdefault(row.doc, {})[(row.map, row.key)] = row

    def _replace_doc(self, key: str, gen: int, snapshot: bytes) -> None:
        """Make ``key`` generation ``gen`` holding only ``snapshot``, at a fresh update id
        (every cached copy must reload)."""
        self._last_update_id += 1
        self._docs[key] = _Doc(gen=gen, snapshot=snapshot, snapshot_id=self._last_update_id)

    # the sync transaction

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates and store new events atomically (see ``Store.commit``).

        Raises :class:`NotFound` for an unknown device, :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, and :class:`Unavailable` for a
        ``DocWrite`` of another generation than the stored one (``stale_generation``), in
        every case with nothing written;
        ``ValueError`` for device parts without a device, or a request whose ``device`` is
        not the write's."""
        self._check_open()
        check_write(write)
        self._check_generations(write.docs)
        if write.device is None:
            self._record_changes(write.changes, write.time)
            self._record_conflicts(write.conflicts, write.time)
            self._write_stamps(write.stamps)
            update_ids, prev_ids = self._append_updates(write.docs)
            return CommitResult(update_ids=update_ids, prev_ids=prev_ids)
        device = self._require_device(write.device)
        plan = self._plan(device, write)
        results = [(r, *result_columns(r)) for r in write.results]
        bodies = [json_text(r.body) for r in write.requests]
        # Everything that can fail has been checked: from here on the commit cannot half-apply.
        update_ids, prev_ids = self._append_updates(write.docs)
        fleet = device.fleet
        device = self._store_events(device, write.time, plan)
        self._append_feed(event_rows(device.id, fleet, write.time, plan.new))
        self._record_changes(write.changes, write.time)
        self._record_conflicts(write.conflicts, write.time)
        self._write_stamps(write.stamps)
        down_done = self._ack_downlink(device, write, results)
        new_requests = self._insert_requests(device.id, write, bodies)
        for request_id in write.outcomes_acked:
            request = self._requests.get((device.id, request_id))
            if request is not None and request.status == "done":
                request.set_status("acked", write.time)
        self._devices[device.id] = dataclasses.replace(device, down_done=down_done)
        return CommitResult(update_ids, device.last_seq, len(plan.new), down_done, new_requests,
                            prev_ids)

    def _append_feed(self, rows: Sequence[FeedRow]) -> None:
        for row in rows:
            self._last_cursor += 1
            self._feed.append(item_from_row(self._last_cursor, row))

    def _record_changes(self, changes: Sequence[StateChange], now: int) -> None:
        for change in changes:
            owner = self._devices.get(change.device)
            self._append_feed([change_row(change, owner.fleet if owner else None, now)])
            for name, key, value in projection_writes(change):
                row_key = (change.device, change.doc, name, key)
                if value is None:
                    self._projection.pop(row_key, None)
                else:
                    self._projection[row_key] = (value, now)

    def _record_conflicts(self, conflicts: Sequence[ConflictRecord], now: int) -> None:
        for record in conflicts:
            owner = self._devices.get(record.device)
            self._append_feed([conflict_row(record, owner.fleet if owner else None, now)])

    def _require_device(self, device_id: str) -> DeviceRecord:
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} does not exist", {"device": device_id})
        return device

    def _plan(self, device: DeviceRecord, write: SyncWrite) -> EventPlan:
        stored = {
            e.seq: self._digests[(device.id, e.seq)]
            for e in write.events
            if e.seq <= device.last_seq and (device.id, e.seq) in self._digests
        }
        return plan_events(device.id, device.last_seq, write.purged, write.events, stored,
                           seq_floor=device.seq_floor)

    def _check_generations(self, docs: Sequence[DocWrite]) -> None:
        for w in docs:
            doc = self._docs.get(w.key)
            if doc is not None and doc.gen != w.gen:
                raise stale_generation(w.key, doc.gen, w.gen)

    def _append_updates(self, docs: Sequence[DocWrite]
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ids: list[int] = []
        prevs: list[int] = []
        for w in docs:
            doc = self._docs.setdefault(w.key, _Doc(gen=w.gen))
            prevs.append(doc.last_id)
            self._last_update_id += 1
            doc.updates[self._last_update_id] = w.update
            ids.append(self._last_update_id)
        return tuple(ids), tuple(prevs)

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

    def _ack_downlink(
        self, device: DeviceRecord, write: SyncWrite,
        results: Sequence[tuple[CommandResult, str, str | None, str | None]],
    ) -> int:
        done = max(device.down_done, min(write.down_done, device.down_seq))
        items = self._downlink.get(device.id, {})
        if done > device.down_done:
            for item in items.values():
                if item.seq > done:
                    break
                if item.kind == "message" and item.status == "queued":
                    item.set_status("delivered", write.time)
        for r, status, result, error in results:
            command = items.get(r.seq)
            if (r.seq <= done and command is not None and command.kind == "command"
                    and command.status in ("queued", "delivered")):
                command.set_status(status, write.time)
                command.result, command.error = result, error
        return done

    def _insert_requests(self, device: str, write: SyncWrite, bodies: Sequence[str]
                         ) -> tuple[str, ...]:
        new: list[str] = []
        for r, body in zip(write.requests, bodies, strict=True):
            if (device, r.id) not in self._requests:
                self._requests[(device, r.id)] = _Request(
                    device, r.id, r.route, body, r.created, updated=write.time)
                new.append(r.id)
        return tuple(new)

    # downlink

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item with the device's next seq (see ``Store.queue_downlink``).

        Raises ``ValueError`` for a kind not in ``DOWNLINK_KINDS``, ``TypeError`` for a body
        that is not JSON, :class:`NotFound` for an unknown device; nothing is written then."""
        self._check_open()
        check_kind(kind)
        body_json = json_text(body)
        record = self._require_device(device)
        seq = record.down_seq + 1
        self._devices[device] = dataclasses.replace(record, down_seq=seq)
        self._last_item_id += 1  # never reused, even after purges and deletions
        item = _Item(self._last_item_id, device, seq, kind, name, body_json, now, expires, now)
        self._items[item.id] = item
        self._downlink.setdefault(device, {})[seq] = item
        return item.record()

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""
        self._check_open()
        item = self._items.get(item_id)
        return None if item is None else item.record()

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, at most ``limit`` (>= 0),
        optionally of one ``kind`` (``ValueError`` if unknown); empty for an unknown device."""
        self._check_open()
        if kind is not None:
            check_kind(kind)
        check_limit(limit)
        items = [i for i in self._downlink.get(device, {}).values()
                 if i.seq > after and (kind is None or i.kind == kind)]
        return [i.record() for i in items[:limit]]

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Up to ``limit`` items to send, in seq order, as stored after this call (see
        :mod:`crdtsync_server.store.sqlite`). :class:`NotFound` for an unknown device."""
        self._check_open()
        check_limit(limit)
        record = self._require_device(device)
        picked: list[Downlink] = []
        for item in self._downlink.get(device, {}).values():
            if len(picked) >= limit:
                break
            if item.seq <= record.down_done or item.status not in ("queued", "delivered"):
                continue
            if item.status == "queued" and item.expires is not None and item.expires <= now:
                item.set_status("expired", now)
                continue
            if item.kind == "command" and item.status == "queued":
                item.set_status("delivered", now)
            picked.append(item.record())
        return picked

    # proxied requests

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """``pending`` -> ``running``; ``None`` unless this call moved it."""
        self._check_open()
        request = self._requests.get((device, request_id))
        if request is None or request.status != "pending":
            return None
        request.set_status("running", now)
        return request.record()

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """``running`` -> ``done`` with ``outcome``; does nothing if the request is not
        running (unknown, never claimed, or already finished: the first outcome stays)."""
        self._check_open()
        outcome_json = json_text(dict(outcome))
        request = self._requests.get((device, request_id))
        if request is not None and request.status == "running":
            request.set_status("done", now, outcome_json)

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""
        self._check_open()
        request = self._requests.get((device, request_id))
        return None if request is None else request.record()

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device by ``updated`` then id, at most ``limit``."""
        self._check_open()
        check_limit(limit)
        done = sorted((r for r in self._requests.values()
                       if r.device == device and r.status == "done"),
                      key=lambda r: (r.updated, r.id))
        return [r.record() for r in done[:limit]]

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int) -> int:
        """Finish every ``running`` request with ``outcome``; returns how many."""
        self._check_open()
        outcome_json = json_text(dict(outcome))
        running = [r for r in self._requests.values() if r.status == "running"]
        for request in running:
            request.set_status("done", now, outcome_json)
        return len(running)

    async def purge_finished(self, before: int) -> int:
        """Delete finished downlink items and acknowledged requests older than ``before``."""
        self._check_open()
        gone = 0
        for items in self._downlink.values():
            for seq in [s for s, i in items.items()
                        if i.status in FINISHED_DOWNLINK and i.updated < before]:
                del self._items[items.pop(seq).id]
                gone += 1
        for key in [k for k, r in self._requests.items()
                    if r.status == "acked" and r.updated < before]:
            del self._requests[key]
            gone += 1
        return gone

    # devices

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken and
        :class:`NotFound` if its ``fleet`` does not exist."""
        self._check_open()
        if device.fleet is not None:
            self._require_fleet(device.fleet)
        if device.id in self._devices:
            raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})
        deleted = self._deleted_devices.pop(device.id, 0)
        self._devices[device.id] = _copy_device(above_deleted(device, deleted))
        self._by_token.setdefault(device.token_hash, set()).add(device.id)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        self._check_open()
        device = self._devices.get(device_id)
        return None if device is None else _copy_device(device)

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device with this token hash (lowest id first), or ``None``."""
        self._check_open()
        ids = self._by_token.get(token_hash)
        return _copy_device(self._devices[min(ids)]) if ids else None

    def _unindex(self, device: DeviceRecord) -> None:
        ids = self._by_token[device.token_hash]
        ids.discard(device.id)
        if not ids:
            del self._by_token[device.token_hash]

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the token hash and/or the disabled flag; returns the stored record.
        :class:`NotFound` for an unknown device."""
        self._check_open()
        old = self._require_device(device_id)
        device = dataclasses.replace(
            old, **updated_fields(token_hash=token_hash, disabled=disabled))
        self._unindex(old)
        self._devices[device_id] = device
        self._by_token.setdefault(device.token_hash, set()).add(device_id)
        return _copy_device(device)

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device and what belongs to it (see ``Store.delete_device``).
        :class:`NotFound` for an unknown device."""
        self._check_open()
        device = self._devices.pop(self._require_device(device_id).id)
        self._unindex(device)
        for key in docs:
            self._replace_doc(key, 0, b"")
            self._stamps.pop(key, None)
        self._projection = {k: v for k, v in self._projection.items() if k[0] != device.id}
        for item in self._downlink.pop(device.id, {}).values():
            del self._items[item.id]
        self._requests = {k: r for k, r in self._requests.items() if k[0] != device.id}
        if events:
            self._feed = [item for item in self._feed if item.device != device.id]
            self._events = [e for e in self._events if e.device != device.id]
            self._digests = {k: d for k, d in self._digests.items() if k[0] != device.id}
        self._deleted_devices[device.id] = max(device.last_seq,
                                               self._deleted_devices.get(device.id, 0))

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i in self._devices if i > after)[:limit]
        return [_copy_device(self._devices[i]) for i in ids]

    # fleets

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises :class:`AlreadyExists` if the id is taken."""
        self._check_open()
        if fleet.id in self._fleets:
            raise AlreadyExists(f"fleet {fleet.id!r} already exists", {"fleet": fleet.id})
        self._fleets[fleet.id] = _copy_fleet(fleet)

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""
        self._check_open()
        fleet = self._fleets.get(fleet_id)
        return None if fleet is None else _copy_fleet(fleet)

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i in self._fleets if i > after)[:limit]
        return [_copy_fleet(self._fleets[i]) for i in ids]

    def _require_fleet(self, fleet_id: str) -> None:
        if fleet_id not in self._fleets:
            raise NotFound(f"fleet {fleet_id!r} does not exist", {"fleet": fleet_id})

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Move the device to ``fleet`` (``None``: no fleet), bumping ``fleet_gen`` only on
        a change; returns the stored record. :class:`NotFound` for an unknown device or
        fleet, with nothing written."""
        self._check_open()
        device = self._require_device(device_id)
        if fleet is not None:
            self._require_fleet(fleet)
        if fleet != device.fleet:
            device = dataclasses.replace(device, fleet=fleet, fleet_gen=device.fleet_gen + 1)
            self._devices[device_id] = device
        return _copy_device(device)

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order, at most ``limit`` (>= 0);
        empty for an unknown fleet."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i, d in self._devices.items() if d.fleet == fleet and i > after)
        return [_copy_device(self._devices[i]) for i in ids[:limit]]

    # events

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        found: list[StoredEvent] = []
        start = bisect_right(self._events, after, key=lambda e: e.cursor)
        for e in self._events[start:]:
            if len(found) >= limit:
                break
            if (device is None or e.device == device) and (topic is None or e.topic == topic):
                found.append(e.stored())
        return found

    # downstream: feed and projection

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""
        self._check_open()
        check_limit(limit)
        where = where or FeedFilter()
        start = bisect_right(self._feed, after, key=lambda item: item.cursor)
        found: list[FeedItem] = []
        for item in self._feed[start:]:
            if len(found) >= limit:
                break
            if where.matches(item):
                found.append(item)
        return found

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any)."""
        self._check_open()
        return self._last_cursor

    async def feed_floor(self) -> int:
        """The highest purged cursor (0 when nothing was purged)."""
        self._check_open()
        return self._feed_floor

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items (see ``Store.purge_feed``); returns how many."""
        self._check_open()
        count = purgeable_prefix([(i.cursor, i.received) for i in self._feed], before,
                                 keep_after)
        if not count:
            return 0
        gone, self._feed = self._feed[:count], self._feed[count:]
        self._feed_floor = gone[-1].cursor
        purged = {(i.device, i.seq) for i in gone if i.seq is not None}
        self._events = [e for e in self._events if (e.device, e.seq) not in purged]
        for device, seq in purged:
            self._digests.pop((device, seq), None)
        return count

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows ordered by (device, doc, map, key), after ``after``."""
        self._check_open()
        check_limit(limit)
        keys = sorted(k for k in self._projection
                      if (device is None or k[0] == device) and k > after)[:limit]
        return [ProjectionRow(*k, json.loads(self._projection[k][0]), self._projection[k][1])
                for k in keys]

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows``."""
        self._check_open()
        for stale in [k for k in self._projection if k[:2] == (device, doc)]:
            del self._projection[stale]
        for name, keys in rows.items():
            for key, value in keys.items():
                if value is not None:
                    self._projection[(device, doc, name, key)] = (json_text(value), now)

    # downstream sinks

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create or reconfigure a sink, keeping its progress (see ``Store.put_sink``)."""
        self._check_open()
        check_origin(origin)
        copy = _copy_config(config)
        old = self._sinks.get(config.name)
        self._sinks[config.name] = (
            SinkRecord(copy, origin, paused, cursor=start, created=now, updated=now)
            if old is None else
            dataclasses.replace(old, config=copy, origin=origin, paused=paused, updated=now))
        return self._sink_record(config.name)

    def _sink_record(self, name: str) -> SinkRecord:
        record = self._sinks[name]
        return dataclasses.replace(record, config=_copy_config(record.config),
                                   dead_letters=len(self._sink_letters(name)))

    def _sink_letters(self, name: str) -> list[_Letter]:
        return [letter for letter in self._letters.values() if letter.sink == name]

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""
        self._check_open()
        return self._sink_record(name) if name in self._sinks else None

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""
        self._check_open()
        return [self._sink_record(name) for name in sorted(self._sinks)]

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""
        self._check_open()
        if self._sinks.pop(name, None) is None:
            raise NotFound(f"no sink {name!r}", {"sink": name})
        for letter in self._sink_letters(name):
            del self._letters[letter.id]

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Take or renew the sink's lease (see ``Store``)."""
        self._check_open()
        record = self._sinks.get(name)
        if record is None or (record.owner not in (None, owner) and record.lease_until > now):
            return False
        self._sinks[name] = dataclasses.replace(record, owner=owner, lease_until=now + ttl_ms)
        return True

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it."""
        self._check_open()
        record = self._owned(name, owner)
        if record is not None:
            self._sinks[name] = dataclasses.replace(record, owner=None, lease_until=0)

    def _owned(self, name: str, owner: str | None) -> SinkRecord | None:
        """The stored sink, if ``owner`` (unless ``None``) holds its lease."""
        record = self._sinks.get(name)
        return record if record is not None and owner in (None, record.owner) else None

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """Move the cursor forward and count delivered items (see ``Store``)."""
        self._check_open()
        record = self._owned(name, owner)
        if record is None:
            return False
        record = dataclasses.replace(record, cursor=max(record.cursor, cursor),
                                     delivered=record.delivered + count)
        if count > 0:
            record = dataclasses.replace(record, consecutive_failures=0, last_delivered_at=now)
        self._sinks[name] = record
        return True

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed attempt and keep ``error``."""
        self._check_open()
        record = self._sinks.get(name)
        if record is not None:
            self._sinks[name] = dataclasses.replace(
                record, failures=record.failures + 1,
                consecutive_failures=record.consecutive_failures + 1, last_error=error,
                last_error_at=now)

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store dead letters and move the cursor past them, atomically."""
        self._check_open()
        record = self._owned(name, owner)
        if record is None:
            return False
        texts = [item_text(item) for item in items]
        for text in texts:
            self._last_letter_id += 1
            self._letters[self._last_letter_id] = _Letter(self._last_letter_id, name, text,
                                                          error, attempts, now)
        self._sinks[name] = dataclasses.replace(
            record, cursor=max(record.cursor, items[-1].cursor),
            dead_lettered=record.dead_lettered + len(items), consecutive_failures=0)
        return True

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, at most ``limit``."""
        self._check_open()
        check_limit(limit)
        found = [letter for letter in self._sink_letters(name) if letter.id > after
                 and (retrying is None or letter.retry == retrying)]
        return [letter.record() for letter in found[:limit]]

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark dead letters for a retry; returns how many exist."""
        self._check_open()
        wanted = None if ids is None else set(ids)
        marked = [letter for letter in self._sink_letters(name)
                  if wanted is None or letter.id in wanted]
        for letter in marked:
            letter.retry = True
        return len(marked)

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """Delete delivered dead letters, or record another failure (see ``Store``)."""
        self._check_open()
        wanted = set(ids)
        letters = [letter for letter in self._sink_letters(name) if letter.id in wanted]
        for letter in letters:
            if error is None:
                del self._letters[letter.id]
            else:
                letter.retry, letter.error = False, error
                letter.attempts += attempts
        if error is None:
            await self.sink_delivered(name, 0, len(letters), now)

    # settings

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        self._check_open()
        return self._settings.get(key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        self._check_open()
        self._settings[key] = value

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as ``last_sync`` (never backwards)."""
        self._check_open()
        for device, time in last_sync.items():
            record = self._devices.get(device)
            if record is not None and (record.last_sync or 0) < time:
                self._devices[device] = dataclasses.replace(record, last_sync=time)









def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)

