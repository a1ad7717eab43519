"""What the SQL backends (``store/sqlite/``, ``store/postgres/``) store alike: the columns of
a device and of a fleet with the records read back from a row, and how an unsigned 64-bit
stamp fits a signed 64-bit integer column. Pure functions; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .records import DeviceRecord, FleetRecord

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
