"""The rules every storage backend applies alike, so memory, SQLite and PostgreSQL decide the
same way: which events of a sync are new (:func:`plan_events`, by ``(device, seq)`` and the
event's digest), which writes no backend may store (:func:`check_write`), the error of a
stale generation, and small argument checks. Pure functions over the records of
``store/records.py``; no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from crdtsync._fastinit import fast_init
from crdtsync.errors import SeqConflict, SeqGap, Unavailable
from crdtsync.hlc import MAX_STAMP
from crdtsync.protocol import WRITERS, Event

from .feed import json_text
from .records import DOWNLINK_KINDS, CommandResult, DeviceRecord, SyncWrite


def event_digests(events: Sequence[Event]) -> list[bytes]:
    """A 16-byte fingerprint of each event's content, to tell a replay from a reused seq:
    BLAKE2b (16-byte digest) of the msgpack array ``[topic, time, body]`` (bytes as msgpack
    bin). The stored digests of every backend depend on these exact bytes; a cheaper
    encoding would need the old one kept for events stored before it."""
    # One packer per call, not per event (packb builds one each time) nor per module (a
    # packer holds its buffer between calls: it cannot be shared across threads).
    pack = msgpack.Packer(use_bin_type=True).pack
    blake2b = hashlib.blake2b
    return [blake2b(pack([e.topic, e.time, e.body]), digest_size=16).digest() for e in events]


def event_digest(event: Event) -> bytes:
    """The fingerprint of one event (see :func:`event_digests`)."""
    return event_digests((event,))[0]


@fast_init
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
    """``device`` as :meth:`DeviceStore.add_device` stores it when a deleted device with the same
    id had stored events up to ``deleted_last_seq`` (0: none, or no such device)."""
    if deleted_last_seq <= device.seq_floor:
        return device
    return dataclasses.replace(device, seq_floor=deleted_last_seq,
                               last_seq=max(device.last_seq, deleted_last_seq))


def updated_fields(**fields: Any) -> dict[str, Any]:
    """The fields of :meth:`DeviceStore.update_device` to change: those not ``None``."""
    return {name: value for name, value in fields.items() if value is not None}


def check_limit(limit: int) -> None:
    """Raise ``ValueError`` for a negative page size (SQLite would read it as no limit)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
