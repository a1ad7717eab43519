"""The records the sync server's storage speaks in, shared by every role and backend.

Plain frozen dataclasses, no I/O: documents (:class:`DocLog`, :class:`DocWrite`,
:class:`KeyStamp`), devices and fleets (:class:`DeviceRecord`, :class:`FleetRecord`), events
(:class:`StoredEvent`), the downlink and proxied requests (:class:`Downlink`,
:class:`CommandResult`, :class:`ProxyRequest`) and the one cross-role write, a sync
(:class:`SyncWrite` in, :class:`CommitResult` out). The feed's and the sinks' records live in
``store/feed.py`` and ``store/sinks.py``; the interfaces that use them in ``store/roles.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crdtsync._fastinit import fast_init
from crdtsync.protocol import Event

from .feed import ConflictRecord, StateChange


@dataclass(frozen=True, slots=True)
class DocLog:
    """A document as stored: generation, snapshot (covers update ids <= ``snapshot_id``) and
    the updates logged after it, in id order; and its stamp rows (ordered by map and key)
    when they were asked for (``DocumentStore.load_doc(key, stamps=True)``)."""

    gen: int = 0
    snapshot: bytes = b""
    snapshot_id: int = 0
    updates: tuple[tuple[int, bytes], ...] = ()
    stamps: tuple[KeyStamp, ...] = ()

    @property
    def last_id(self) -> int:
        """Highest update id this log reflects."""
        return self.updates[-1][0] if self.updates else self.snapshot_id


@fast_init
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
    event of this device at or below it is never a replay (:func:`~.rules.plan_events` refuses it
    with ``seq_conflict``, and the device renumbers above ``last_seq``). Keeps the feed's
    ``ev:<device>:<seq>`` keys unique for ever. Set by :meth:`DeviceStore.add_device`."""


def synced(device: DeviceRecord, last_seq: int, lost: int, time: int, down_done: int
           ) -> DeviceRecord:
    """``device`` as a sync's commit leaves its row: events stored up to ``last_seq``,
    ``lost`` more counted lost, synced at ``time``, downlink done up to ``down_done``. The
    same as ``dataclasses.replace``, at about half its cost (once per sync)."""
    return DeviceRecord(
        id=device.id, token_hash=device.token_hash, created=device.created, last_sync=time,
        last_seq=last_seq, events_lost=device.events_lost + lost, meta=device.meta,
        down_seq=device.down_seq, down_done=down_done, fleet=device.fleet,
        fleet_gen=device.fleet_gen, disabled=device.disabled, seq_floor=device.seq_floor)


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


@fast_init
@dataclass(frozen=True, slots=True)
class DocWrite:
    """One effective CRDT update to append to document ``key`` at generation ``gen``.
    ``last_id`` is the highest update id the writer's copy reflects (``None``: not known, or
    the document was never stored); a store that knows it is the only writer may take it
    for what it stores instead of reading it (``CommitResult.prev_ids``)."""

    key: str
    update: bytes
    gen: int = 0
    last_id: int | None = None


@fast_init
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


@fast_init
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
    wakes: Sequence[str] = ()
    """Wake targets (:func:`wake_device`, :func:`wake_fleet`, :data:`WAKE_EVERYONE`) to
    append to the wake log in the same transaction: whose live channel this write must
    wake (a cloud write of a device's, a fleet's or the project document)."""


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


@fast_init
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


@fast_init
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
    device: DeviceRecord | None = field(default=None, compare=False, repr=False)
    """The device's row as the commit left it, where the backend has it at hand (SQLite: for
    its cache of device records); ``None`` otherwise. Not part of the contract: results of
    different backends compare equal without it."""


WAKE_EVERYONE = "*"
"""The wake target of every device (a write of the ``project`` document)."""


def wake_device(device_id: str) -> str:
    """The wake target of one device: ``"d:<id>"``."""
    return "d:" + device_id


def wake_fleet(fleet: str) -> str:
    """The wake target of every device of a fleet: ``"f:<fleet>"``."""
    return "f:" + fleet


def wake_targets(device: DeviceRecord) -> tuple[str, ...]:
    """Every target that wakes ``device``: its own, its fleet's (if any), everyone's."""
    if device.fleet is None:
        return (wake_device(device.id), WAKE_EVERYONE)
    return (wake_device(device.id), wake_fleet(device.fleet), WAKE_EVERYONE)


@dataclass(frozen=True, slots=True)
class WakeEntry:
    """One entry of the wake log: something for ``target`` was committed at ``at`` (ms).
    ``cursor`` orders the log; it is never reused, and on one database entries become
    visible in cursor order (a reader that saw cursor ``c`` never later finds an entry
    below ``c`` it had not seen)."""

    cursor: int
    target: str
    at: int
