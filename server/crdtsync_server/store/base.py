"""The narrow storage interface of the sync server, and the records it speaks in.

A :class:`Store` keeps, per document, a generation, an append-only update log keyed by a
monotonic id plus one snapshot that covers every row up to ``snapshot_id``, and one stamp
per key (:class:`KeyStamp`: when and by whom the key was last written); an events table
unique on ``(device, seq)`` with a global arrival ``cursor``; devices with hashed tokens
(found by that hash too); fleets (a device belongs to at most one); and settings.
Policy (when to compact or rebuild, what a device may touch) lives one layer up, in
``crdtsync_server.documents`` and ``crdtsync_server.sync``. Every backend passes the same
contract suite, ``tests/test_store_contract.py``.

All methods are coroutines; a backend may serialise them. Nothing is acknowledged to a
device unless :meth:`Store.commit` returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from crdtsync.errors import SeqConflict, SeqGap, Unavailable
from crdtsync.hlc import MAX_STAMP
from crdtsync.protocol import WRITERS, Event

from .feed import (
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    ProjectionRow,
    StateChange,
    json_text,
)
from .sinks import DeadLetter, SinkConfig, SinkRecord


@dataclass(frozen=True, slots=True)
class DocLog:
    """A document as stored: generation, snapshot (covers update ids <= ``snapshot_id``) and
    the updates logged after it, in id order."""

    gen: int = 0
    snapshot: bytes = b""
    snapshot_id: int = 0
    updates: tuple[tuple[int, bytes], ...] = ()

    @property
    def last_id(self) -> int:
        """Highest update id this log reflects."""
        return self.updates[-1][0] if self.updates else self.snapshot_id


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A provisioned device. ``last_seq`` is the highest event seq stored for it."""

    id: str
    token_hash: str
    created: int
    last_sync: int | None = None
    last_seq: int = 0
    events_lost: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)
    down_seq: int = 0
    """Highest downlink seq given to this device."""
    down_done: int = 0
    """Highest downlink seq the device processed (acknowledged)."""
    fleet: str | None = None
    """The fleet the device belongs to, if any."""
    fleet_gen: int = 0
    """Bumped each time the device changes fleet; the device's copy of its fleet document is
    replaced when it changes."""
    disabled: bool = False
    """A disabled device keeps everything but its syncs are refused (``403 forbidden``)."""
    seq_floor: int = 0
    """Event seqs up to here were used by an earlier device with this id, since deleted: an
    event of this device at or below it is never a replay (:func:`plan_events` refuses it
    with ``seq_conflict``, and the device renumbers above ``last_seq``). Keeps the feed's
    ``ev:<device>:<seq>`` keys unique for ever. Set by :meth:`Store.add_device`."""


@dataclass(frozen=True, slots=True)
class FleetRecord:
    """A fleet: a group of devices sharing one read-only fleet document. ``created`` is ms
    since the epoch; ``meta`` a free-form JSON object."""

    id: str
    created: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "meta": dict(self.meta)}


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the cloud keeps it: ``time`` is the device clock, ``received`` the server
    clock (both ms since the epoch), ``cursor`` its position in global arrival order."""

    cursor: int
    device: str
    seq: int
    topic: str
    time: int
    received: int
    body: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "cursor": str(self.cursor),
            "device": self.device,
            "seq": self.seq,
            "topic": self.topic,
            "time": self.time,
            "received": self.received,
            "body": self.body,
        }


@dataclass(frozen=True, slots=True)
class DocWrite:
    """One effective CRDT update to append to document ``key`` at generation ``gen``."""

    key: str
    update: bytes
    gen: int = 0


@dataclass(frozen=True, slots=True)
class KeyStamp:
    """The write that decides key ``key`` of root map ``map`` of document ``doc`` (a store
    key, ``<device>/state``): its hybrid-logical-clock ``stamp`` in the server's frame
    (:mod:`crdtsync.hlc`; a device's stamps corrected by its clock offset), who wrote it
    (``writer``: ``device`` or ``cloud``), and ``raw``, the highest of the device's own
    stamps decided for the key: the winning write's for a ``device`` row, the highest device
    write this cloud write overruled for a ``cloud`` row (0: none, or a write of a client
    that does not stamp). A delete is a write like any other: its row stays. Rows are per
    key, not per generation, so they survive compaction and rebuilds; they go with their
    document when its device is deleted (docs/protocol.md section 13)."""

    doc: str
    map: str
    key: str
    stamp: int
    writer: str
    raw: int = 0


@dataclass(frozen=True, slots=True)
class SyncWrite:
    """Everything one sync (or one cloud write) commits in a single transaction.

    ``events`` must be consecutive seqs (the codec checks it). ``purged`` is the device's
    claim that it deleted every seq up to it, so a gap below it is data the cloud lost, not
    a bug. ``device=None`` writes documents only (a cloud-side write)."""

    device: str | None
    time: int
    docs: Sequence[DocWrite] = ()
    events: Sequence[Event] = ()
    purged: int = 0
    down_done: int = 0
    """The device processed its downlink up to this seq (messages handled, commands run)."""
    results: Sequence[CommandResult] = ()
    """Results of commands with seq <= ``down_done``; stored unless already stored."""
    requests: Sequence[ProxyRequest] = ()
    """New proxied requests; a known ``(device, id)`` is ignored (at most once)."""
    outcomes_acked: Sequence[str] = ()
    """Request ids whose outcome the device stored: marked ``acked``."""
    changes: Sequence[StateChange] = ()
    """Document keys these updates changed: appended to the feed and applied to the
    projection in the same transaction. A cloud write (``device=None``) names the device in
    each change."""
    stamps: Sequence[KeyStamp] = ()
    """Stamps of the keys these updates decided: each replaces the stored row of its
    ``(doc, map, key)``, in the same transaction (at most one per key)."""
    conflicts: Sequence[ConflictRecord] = ()
    """Conflicts decided in this sync: appended to the feed (kind ``conflict``) after the
    changes, in the same transaction."""


DOWNLINK_KINDS = ("message", "command")
FINISHED_DOWNLINK = ("delivered", "succeeded", "failed", "expired")
DOWNLINK_STATUSES = ("queued", "delivered", "succeeded", "failed", "expired")
REQUEST_STATUSES = ("pending", "running", "done", "acked")


@dataclass(frozen=True, slots=True)
class Downlink:
    """A cloud-to-device item: a queued ``message`` (``name`` is its topic) or a ``command``
    (``name`` is the method, ``body`` its params). ``seq`` orders a device's downlink
    (1, 2, 3, ...). ``expires`` (ms) is a message's time-to-live or a command's deadline.

    Status: ``queued`` (not yet sent) -> ``delivered`` (sent to the device; for a message:
    handled and acknowledged by it) -> ``succeeded`` / ``failed`` (commands: the device's
    result) ; ``expired`` when ``expires`` passed while still queued."""

    id: int
    device: str
    seq: int
    kind: str
    name: str
    body: Any
    created: int
    expires: int | None = None
    status: str = "queued"
    result: Any = None
    error: Mapping[str, Any] | None = None
    updated: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "seq": self.seq, "kind": self.kind,
                "name": self.name, "body": self.body, "created": self.created,
                "expires": self.expires, "status": self.status, "result": self.result,
                "error": dict(self.error) if self.error is not None else None,
                "updated": self.updated}


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A device's result for command ``seq``: ``ok`` with ``value``, or an error
    ``{"code", "message"}``."""

    seq: int
    ok: bool
    value: Any = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A device's request for the cloud to call route ``route`` with ``body``; ``id`` is
    chosen by the device and unique per device. ``outcome`` is the route's result (JSON)."""

    device: str
    id: str
    route: str
    body: Any
    created: int
    status: str = "pending"
    outcome: Mapping[str, Any] | None = None
    updated: int = 0


@dataclass(frozen=True, slots=True)
class CommitResult:
    """``update_ids`` holds the id given to each ``DocWrite`` in order; ``last_seq`` the
    device's highest stored seq after the commit; ``stored`` how many events were new."""

    update_ids: tuple[int, ...] = ()
    last_seq: int = 0
    stored: int = 0
    down_done: int = 0
    """The device's processed downlink seq as stored after the commit."""
    new_requests: tuple[str, ...] = ()
    """Ids of the proxied requests this commit stored for the first time."""
    prev_ids: tuple[int, ...] = ()
    """For each ``DocWrite``, the highest update id its document reflected just before
    (logged rows and snapshot): when it equals what a cached copy holds, nobody else wrote
    that document in between."""


class Store(Protocol):
    """What the server needs from a database. Backends: memory, SQLite (default)."""

    @property
    def external_writes(self) -> int | None:
        """A counter that moves whenever the backend notices that another writer (another
        process) committed; ``None`` if it cannot tell. Read it before a read: when it has
        not moved since, nobody else wrote in between (the document cache then skips
        catching up)."""

    async def open(self) -> None:
        """Connect and migrate the schema. Raises ``StoreError`` for a newer schema."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""

    # documents
    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` when rows after
        ``after_id`` were already folded into the snapshot (``after_id < snapshot_id``): the
        caller must reload the document with :meth:`load_doc`. That includes every copy read
        before a :meth:`rebuild` or a :meth:`delete_device` (both leave a ``snapshot_id``
        above every id such a copy can hold), so a copy of an older generation is never
        caught up, only reloaded."""

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Replace the snapshot of ``key`` by ``snapshot`` (which must reflect every update
        with id <= ``upto_id``) and delete exactly those rows, in one transaction."""

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> bool:
        """Replace document ``key`` by generation ``gen + 1`` whose whole content is
        ``snapshot`` (a full Yjs update of a fresh document with the content of generation
        ``gen`` up to update ``upto_id``), in one transaction, if and only if the stored
        generation is ``gen`` and the stored document reflects no update id above
        ``upto_id`` (nobody appended, compacted past it or rebuilt meanwhile; an unknown
        document is generation 0 with nothing logged). Every update row of ``key`` is
        deleted and the snapshot gets a fresh, never reused update id as ``snapshot_id``, so
        :meth:`read_since` answers ``None`` to every cached copy. Returns ``True`` if it
        happened; ``False`` changes nothing."""

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key`` (:class:`KeyStamp`), ordered by map and key;
        empty if it has none. Rows are written by :meth:`commit` only."""

    # the sync transaction
    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates, store new events (deduplicated by ``(device, seq)``), replace
        the stamp rows of ``write.stamps``, append the changes and conflicts to the feed and
        update the device's bookkeeping, atomically. Raises :class:`SeqGap` / :class:`SeqConflict`
        (see :func:`plan_events`), and :class:`Unavailable` (retryable) when a ``DocWrite``
        names a generation other than its document's stored one (another process rebuilt it
        since the writer read it: :func:`stale_generation`), with nothing written. The first
        write of a document sets its generation."""

    # downlink: messages and commands to a device
    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item to the device's downlink with the next seq; ``NotFound`` if the
        device does not exist."""

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, optionally of one kind."""

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Items to send to the device: seq above its ``down_done``, not expired, in seq
        order. Marks queued items whose ``expires`` passed ``expired`` (not returned) and
        the returned queued items ``delivered`` (commands) in the same transaction."""

    # proxied requests
    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """Move a ``pending`` request to ``running`` and return it; ``None`` if it is not
        pending (already claimed by another worker or finished): at most once."""

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """Store the outcome of a running request (status ``done``)."""

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device (outcome not yet acknowledged), oldest first."""

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int) -> int:
        """At start: requests left ``running`` by a dead process are finished with
        ``outcome`` (never run twice); returns how many."""

    async def purge_finished(self, before: int) -> int:
        """Delete downlink items that are finished (``delivered``, ``succeeded``,
        ``failed``, ``expired``) and requests that are ``acked``, last updated before
        ``before`` (ms); returns how many rows went."""

    # devices
    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises ``AlreadyExists`` if the id is taken and ``NotFound`` if
        its ``fleet`` does not exist. When a device with this id was deleted before, the new
        one starts above the seqs the old one used: its ``seq_floor`` and ``last_seq`` are
        raised to the old device's ``last_seq`` (see :attr:`DeviceRecord.seq_floor`)."""

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device whose ``token_hash`` this is, or ``None``; a database backend answers
        from an index (every sync calls it). Hashes of random tokens do not collide; should
        two devices share one anyway, the one with the lowest id is returned."""

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the device's ``token_hash`` and/or ``disabled`` flag (``None``: keep) in
        one transaction; returns the stored record. The old hash stops matching at once for
        every reader of the store. ``NotFound`` for an unknown device."""

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device, its documents ``docs`` (store keys) with their stamp rows, its
        projection rows, its downlink items and proxied requests, in one transaction; with
        ``events`` also every feed item naming it (its events, state changes and conflicts),
        else those stay. Its ``last_seq`` is remembered for a later device with the same id
        (see :meth:`add_device`). A deleted document is left as an empty snapshot whose
        ``snapshot_id`` is a new, never reused update id, so :meth:`read_since` answers
        ``None`` to every reader holding a copy: other processes' caches reload it empty.
        ``NotFound`` for an unknown device, with nothing deleted."""

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order."""

    # fleets
    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises ``AlreadyExists`` if the id is taken."""

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order."""

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Put the device in ``fleet`` (``None``: in no fleet) and return it as stored.
        ``fleet_gen`` goes up by one only when the fleet actually changes. ``now`` (ms) is
        the time of the change; no backend records it yet. Raises ``NotFound`` for an
        unknown device or fleet, with nothing written."""

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order; empty for an unknown
        fleet."""

    # events
    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, optionally filtered."""

    # downstream: the change feed and the state projection (store/feed.py)
    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any): a purge does
        not move it back."""

    async def feed_floor(self) -> int:
        """The highest cursor :meth:`purge_feed` deleted (0 when nothing was): every item
        above it is still there, so a reader resuming from a cursor below it missed some."""

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items: in cursor order, those received before ``before``
        (ms), stopping at the first one received later or with a cursor above
        ``keep_after`` (the lowest cursor of the sinks: what one has not delivered stays).
        The feed is cut as a prefix; the events among the items go too (the events view),
        and so do their digests, so a replay of a purged seq is not compared any more.
        Raises the floor to the last deleted cursor; returns how many items went. May run
        as several transactions."""

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows (optionally of one device) ordered by (device, doc, map, key),
        after the row whose key tuple is ``after``."""

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows`` (``{map: {key:
        value}}``): used to (re)build it from a document, e.g. after an upgrade."""

    # downstream sinks (store/sinks.py): configuration, progress and dead letters
    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create sink ``config.name``, or replace its configuration, ``origin`` and
        ``paused`` flag keeping its cursor, counters and dead letters; returns it as stored.
        A new sink's cursor starts at ``start`` (0: the whole feed). ``ValueError`` for an
        origin not in ``SINK_ORIGINS``, ``TypeError`` for options that are not JSON."""

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Atomically take the sink's delivery lease for ``owner`` until ``now + ttl_ms``
        when nobody holds it, it expired (``lease_until <= now``) or ``owner`` holds it
        already (a renewal); returns whether ``owner`` holds it. ``False`` for an unknown
        sink."""

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it (anyone may take it at once)."""

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """The destination accepted ``count`` items up to feed cursor ``cursor``: move the
        cursor there (never back) and add ``count`` to ``delivered``; when ``count`` > 0 also
        reset ``consecutive_failures`` and set ``last_delivered_at``. ``count`` 0 only moves
        the cursor (past items the filter skips). With ``owner``, only if ``owner`` holds
        the sink's lease (checked atomically with the update). Returns whether it was
        updated: nothing happens for an unknown sink or another owner's."""

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed delivery attempt and keep ``error`` as the last error."""

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store ``items`` (non-empty, cursor order) as dead letters of the sink and move its
        cursor past the last one, in one transaction; resets ``consecutive_failures``.
        ``owner`` as for :meth:`sink_delivered`; returns whether anything was stored
        (nothing is for an unknown sink or another owner's)."""

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, optionally only those
        marked (or not marked) for a retry."""

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark the sink's dead letters ``ids`` (``None``: all of them) for a retry; returns
        how many exist. Unknown ids are ignored."""

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """After retrying dead letters ``ids``: with ``error`` None they were delivered and
        go (counted in ``delivered``); else they stay, unmarked, with ``error`` and
        ``attempts`` more attempts."""

    # settings
    async def get_setting(self, key: str) -> str | None:
        """A server setting (e.g. the admin token hash), or ``None``."""

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as the devices' ``last_sync`` (never moving it back);
        unknown devices are ignored. Syncs that change nothing are recorded this way, in
        batches, instead of each paying a durable commit."""


def event_digest(event: Event) -> bytes:
    """A 16-byte fingerprint of an event's content, to tell a replay from a reused seq."""
    packed = msgpack.packb([event.topic, event.time, event.body], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=16).digest()




@dataclass(frozen=True, slots=True)
class EventPlan:
    """What a commit does with a batch of events: insert ``new`` and count ``lost`` seqs the
    device purged before the cloud stored them (a restored server backup, or the device's
    drop-oldest outbox policy)."""

    new: tuple[Event, ...]
    lost: int


def plan_events(
    device: str, last_seq: int, purged: int, events: Sequence[Event],
    stored_digests: Mapping[int, bytes], *, seq_floor: int = 0,
) -> EventPlan:
    """Decide, inside the commit transaction, which events are new.

    ``stored_digests`` holds the digests of already-stored events of this device among the
    batch's seqs. Seqs <= ``last_seq`` must match what is stored (a replay) or the batch is
    refused with :class:`SeqConflict`; so is any seq <= ``seq_floor`` (it belonged to a
    deleted device with the same id). The first new seq must be ``last_seq + 1``, unless
    the device purged everything before it (``first - 1 <= purged``), else :class:`SeqGap`.
    """
    new: list[Event] = []
    for event in events:
        if event.seq <= seq_floor:
            raise SeqConflict(
                f"seq {event.seq} of {device!r} was used by a deleted device with this id",
                {"seq": event.seq, "last_seq": last_seq},
            )
        if event.seq <= last_seq:
            stored = stored_digests.get(event.seq)
            if stored is not None and stored != event_digest(event):
                raise SeqConflict(
                    f"device {device!r} reused seq {event.seq} with different content",
                    {"seq": event.seq, "last_seq": last_seq},
                )
            continue
        new.append(event)
    lost = 0
    if new and new[0].seq != last_seq + 1:
        if new[0].seq - 1 > purged:
            raise SeqGap(
                f"device {device!r} sent seq {new[0].seq} but the cloud has only {last_seq}",
                {"seq": new[0].seq, "last_seq": last_seq},
            )
        lost = new[0].seq - 1 - last_seq
    return EventPlan(tuple(new), lost)


# --- rules every backend applies alike ---------------------------------------------------------

def check_kind(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is one of ``DOWNLINK_KINDS``."""
    if kind not in DOWNLINK_KINDS:
        raise ValueError(f"downlink kind must be one of {DOWNLINK_KINDS}, not {kind!r}")


def check_write(write: SyncWrite) -> None:
    """Raise ``ValueError`` for a write no backend may store: device parts (events, downlink
    progress, results, requests, outcome acknowledgements) without a device, a change,
    conflict or request on behalf of another device, two stamps of one key, or a stamp row
    with an unknown writer or a stamp outside 0 .. 2**64 - 1."""
    owners = [c.device for c in write.changes] + [c.device for c in write.conflicts]
    for owner in owners:
        if write.device is not None and owner != write.device:
            raise ValueError(f"a change of device {owner!r} in a write of {write.device!r}")
    stamped = {(s.doc, s.map, s.key) for s in write.stamps}
    if len(stamped) != len(write.stamps):
        raise ValueError("a write stamps a key twice")
    for row in write.stamps:
        if row.writer not in WRITERS or not (0 <= row.stamp <= MAX_STAMP
                                             and 0 <= row.raw <= MAX_STAMP):
            raise ValueError(f"bad stamp row {row!r}: writer must be one of {WRITERS},"
                             " stamps unsigned 64-bit integers")
    if write.device is None and (write.events or write.down_done or write.results
                                 or write.requests or write.outcomes_acked):
        raise ValueError("a write without a device cannot carry events, downlink"
                         " acknowledgements, results or requests")
    for request in write.requests:
        if request.device != write.device:
            raise ValueError(f"request {request.id!r} belongs to device {request.device!r},"
                             f" not {write.device!r}")




def stale_generation(key: str, stored: int, written: int) -> Unavailable:
    """The error :meth:`Store.commit` raises for a ``DocWrite`` of generation ``written``
    into document ``key`` stored at generation ``stored``: retryable, because the writer
    reloads the document (its cached copy is evicted with the failed sync) and a new
    attempt writes into the stored generation."""
    return Unavailable(f"document {key!r} was rebuilt into generation {stored} while this"
                       f" write of generation {written} was prepared; nothing was stored,"
                       " sync again", {"doc": key, "gen": stored})


def result_columns(r: CommandResult) -> tuple[str, str | None, str | None]:
    """``(status, result, error)`` as stored for a command result."""
    if r.ok:
        return "succeeded", json_text(r.value), None
    return "failed", None, None if r.error is None else json_text(dict(r.error))


def above_deleted(device: DeviceRecord, deleted_last_seq: int) -> DeviceRecord:
    """``device`` as :meth:`Store.add_device` stores it when a deleted device with the same
    id had stored events up to ``deleted_last_seq`` (0: none, or no such device)."""
    if deleted_last_seq <= device.seq_floor:
        return device
    return dataclasses.replace(device, seq_floor=deleted_last_seq,
                               last_seq=max(device.last_seq, deleted_last_seq))


def updated_fields(**fields: Any) -> dict[str, Any]:
    """The fields of :meth:`Store.update_device` to change: those not ``None``."""
    return {name: value for name, value in fields.items() if value is not None}


def check_limit(limit: int) -> None:
    """Raise ``ValueError`` for a negative page size (SQLite would read it as no limit)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
