"""The narrow storage interface of the sync server, and the records it speaks in.

A :class:`Store` keeps, per document, an append-only update log keyed by a monotonic id plus
one snapshot that covers every row up to ``snapshot_id``; an events table unique on
``(device, seq)`` with a global arrival ``cursor``; devices with hashed tokens; and settings.
Policy (when to compact, what a device may touch) lives one layer up, in
``crdtsync_server.documents`` and ``crdtsync_server.sync``. Every backend passes the same
contract suite, ``tests/test_store_contract.py``.

All methods are coroutines; a backend may serialise them. Nothing is acknowledged to a
device unless :meth:`Store.commit` returned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from crdtsync.errors import SeqConflict, SeqGap
from crdtsync.protocol import Event


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


@dataclass(frozen=True, slots=True)
class CommitResult:
    """``update_ids`` holds the id given to each ``DocWrite`` in order; ``last_seq`` the
    device's highest stored seq after the commit; ``stored`` how many events were new."""

    update_ids: tuple[int, ...] = ()
    last_seq: int = 0
    stored: int = 0


class Store(Protocol):
    """What the server needs from a database. Backends: memory, SQLite (default)."""

    async def open(self) -> None:
        """Connect and migrate the schema. Raises ``StoreError`` for a newer schema."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""

    # documents
    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...]:
        """Updates of ``key`` with id > ``after_id`` in id order (empty if compacted past)."""

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Replace the snapshot of ``key`` by ``snapshot`` (which must reflect every update
        with id <= ``upto_id``) and delete exactly those rows, in one transaction."""

    # the sync transaction
    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates, store new events (deduplicated by ``(device, seq)``) and update
        the device's bookkeeping, atomically. Raises :class:`SeqGap` / :class:`SeqConflict`
        (see :func:`plan_events`) with nothing written."""

    # devices
    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises ``AlreadyExists`` if the id is taken."""

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order."""

    # events
    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, optionally filtered."""

    # settings
    async def get_setting(self, key: str) -> str | None:
        """A server setting (e.g. the admin token hash), or ``None``."""

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""


def event_digest(event: Event) -> bytes:
    """A 16-byte fingerprint of an event's content, to tell a replay from a reused seq."""
    packed = msgpack.packb([event.topic, event.time, event.body], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=16).digest()


def event_json(event: Event) -> str:
    """The event body as stored JSON text."""
    return json.dumps(event.body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class EventPlan:
    """What a commit does with a batch of events: insert ``new`` and count ``lost`` seqs the
    device purged before the cloud stored them (a restored server backup, or the device's
    drop-oldest outbox policy)."""

    new: tuple[Event, ...]
    lost: int


def plan_events(
    device: str, last_seq: int, purged: int, events: Sequence[Event],
    stored_digests: Mapping[int, bytes],
) -> EventPlan:
    """Decide, inside the commit transaction, which events are new.

    ``stored_digests`` holds the digests of already-stored events of this device among the
    batch's seqs. Seqs <= ``last_seq`` must match what is stored (a replay) or the batch is
    refused with :class:`SeqConflict`; the first new seq must be ``last_seq + 1``, unless
    the device purged everything before it (``first - 1 <= purged``), else :class:`SeqGap`.
    """
    new: list[Event] = []
    for event in events:
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
