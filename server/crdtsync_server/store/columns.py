"""What the SQL backends (``store/sqlite/``, ``store/postgres/``) store alike: the columns of
a device and of a fleet with the records read back from a row, how an unsigned 64-bit
stamp fits a signed 64-bit integer column, and how a commit's stamps are logged in its
update rows and read back. Pure functions; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgpack

from .records import DeviceRecord, DocWrite, FleetRecord, KeyStamp

DEVICE_COLUMNS = (
    "id, token_hash, created, last_sync, last_seq, events_lost, meta, down_seq, down_done,"
    " fleet, fleet_gen, disabled, seq_floor"
)
"""The columns of ``devices``, in the order :func:`device_from_row` reads them."""

FLEET_COLUMNS = "id, created, meta"
"""The columns of ``fleets``, in the order :func:`fleet_from_row` reads them."""


def device_from_row(row: Sequence[Any]) -> DeviceRecord:
    """The device of a row of :data:`DEVICE_COLUMNS` (``meta`` JSON text)."""
    (id_, token_hash, created, last_sync, last_seq, events_lost, meta, down_seq, down_done,
     fleet, fleet_gen, disabled, seq_floor) = row
    return DeviceRecord(
        id=id_, token_hash=token_hash, created=created, last_sync=last_sync,
        last_seq=last_seq, events_lost=events_lost, meta=json.loads(meta),
        down_seq=down_seq, down_done=down_done, fleet=fleet, fleet_gen=fleet_gen,
        disabled=bool(disabled), seq_floor=seq_floor,
    )


def fleet_from_row(row: Sequence[Any]) -> FleetRecord:
    """The fleet of a row of :data:`FLEET_COLUMNS` (``meta`` JSON text)."""
    id_, created, meta = row
    return FleetRecord(id=id_, created=created, meta=json.loads(meta))


# --- stamps: unsigned 64-bit integers in signed 64-bit columns


_SIGN = 1 << 63


_WRAP = 1 << 64


def to_column(value: int) -> int:
    """Unsigned 64-bit ``value`` as the signed integer with the same 64 bits (what SQLite's
    ``INTEGER`` and PostgreSQL's ``BIGINT`` hold). SQL never compares stamps, so the order of
    the stored integers does not matter."""
    return value - _WRAP if value >= _SIGN else value


def from_column(value: int) -> int:
    """The unsigned 64-bit integer stored as ``value`` (:func:`to_column`)."""
    return value + _WRAP if value < 0 else value


# --- stamps logged with their update row (SQLite v10, PostgreSQL v3)
#
# A commit's stamps for a document it also updates are logged in that update's row (a
# msgpack array of ``[map, key, stamp, writer, raw]``, stamps unsigned) instead of one
# upserted ``stamps`` row each; the ``stamps`` table keeps the others, each with ``upto``,
# an update id: a stamp logged in a row of its document with a higher id is newer. A direct
# write takes the highest update id given so far (every row logged before it is older,
# every row logged after it newer); compaction and rebuilds move the logged stamps of the
# rows they delete into the table with the id of their row (:func:`folded`), never over a
# row with a higher ``upto``. A key's stamp is the newest (:func:`newest_stamps`).

StampRow = tuple[str, str, int, str, int, int]
"""``(map, key, stamp, writer, raw, upto)`` of the ``stamps`` table, stamps unsigned."""

LoggedStamp = tuple[int, str, str, int, str, int]
"""``(row id, map, key, stamp, writer, raw)``: one stamp logged in an update row."""


def log_stamps(docs: Sequence[DocWrite], rows: Sequence[KeyStamp]
               ) -> tuple[tuple[bytes | None, ...] | None, list[KeyStamp]]:
    """What the update row of each of ``docs`` logs of ``rows`` (the stamps of its document,
    packed; ``None`` when there are none; a document written twice logs them in its last
    row; ``None`` for all when ``rows`` is empty), and the rows of documents ``docs`` does
    not write, for the ``stamps`` table."""
    if not rows:
        return None, []
    where = {w.key: i for i, w in enumerate(docs)}
    logged: list[list[tuple[str, str, int, str, int]]] = [[] for _ in docs]
    rest: list[KeyStamp] = []
    for r in rows:
        i = where.get(r.doc)
        if i is None:
            rest.append(r)
        else:
            logged[i].append((r.map, r.key, r.stamp, r.writer, r.raw))
    return tuple(msgpack.packb(each) if each else None for each in logged), rest


def unpack_logged(rows: Iterable[tuple[int, bytes]]) -> Iterator[LoggedStamp]:
    """Each stamp logged in ``(row id, stamps column)`` rows, in their order (only
    :func:`log_stamps` writes that column)."""
    for row_id, blob in rows:
        for name, key, stamp, writer, raw in msgpack.unpackb(blob):
            yield row_id, name, key, stamp, writer, raw


def newest_stamps(doc: str, table: Iterable[StampRow], logged: Iterable[LoggedStamp]
                  ) -> list[KeyStamp]:
    """Every stamp of ``doc`` ordered by map and key: each table row, superseded by the last
    stamp of its key logged (in row order) in an update row above its ``upto``."""
    held: dict[tuple[str, str], tuple[KeyStamp, int]] = {
        (name, key): (KeyStamp(doc, name, key, stamp, writer, raw), upto)
        for name, key, stamp, writer, raw, upto in table}
    for row_id, name, key, stamp, writer, raw in logged:
        kept = held.get((name, key))
        if kept is None or kept[1] < row_id:
            held[name, key] = (KeyStamp(doc, name, key, stamp, writer, raw), row_id)
    return [held[both][0] for both in sorted(held)]


def folded(logged: Iterable[LoggedStamp]) -> list[StampRow]:
    """The table rows that stand for ``logged`` (in row order) once their update rows are
    gone: the last stamp of each key, with the id of its row as ``upto``."""
    last: dict[tuple[str, str], StampRow] = {}
    for row_id, name, key, stamp, writer, raw in logged:
        last[name, key] = (name, key, stamp, writer, raw, row_id)
    return list(last.values())
