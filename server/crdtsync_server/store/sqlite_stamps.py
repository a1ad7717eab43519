"""SQL of the per-key stamps (worker-thread functions of
:class:`~crdtsync_server.store.sqlite.SQLiteStore`; the model is
:class:`~crdtsync_server.store.base.KeyStamp`).

Stamps are unsigned 64-bit integers and SQLite's are signed: a stamp is stored as the
signed integer with the same 64 bits (:func:`to_column`) and read back with
:func:`from_column`. SQL never compares stamps, so the order of the stored integers does
not matter.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .base import KeyStamp

MIGRATION = """
    CREATE TABLE stamps (
        doc TEXT NOT NULL,
        map TEXT NOT NULL,
        key TEXT NOT NULL,
        stamp INTEGER NOT NULL,
        writer TEXT NOT NULL,
        raw INTEGER NOT NULL,
        PRIMARY KEY (doc, map, key)
    ) WITHOUT ROWID;
"""
"""Schema v6: one row per key of a document, the write that decides it (docs/protocol.md
section 13). Documents written before v6 have no rows: their keys count as never stamped
(the next stamped write of a key wins)."""

_SIGN = 1 << 63
_WRAP = 1 << 64


def to_column(value: int) -> int:
    """Unsigned 64-bit ``value`` as the signed integer SQLite stores."""
    return value - _WRAP if value >= _SIGN else value


def from_column(value: int) -> int:
    """The unsigned 64-bit integer stored as ``value`` (:func:`to_column`)."""
    return value + _WRAP if value < 0 else value


def read_stamps(conn: sqlite3.Connection, doc: str) -> list[KeyStamp]:
    rows = conn.execute(
        "SELECT map, key, stamp, writer, raw FROM stamps WHERE doc = ? ORDER BY map, key",
        (doc,))
    return [KeyStamp(doc, name, key, from_column(stamp), writer, from_column(raw))
            for name, key, stamp, writer, raw in rows]


def write_stamps(conn: sqlite3.Connection, rows: Sequence[KeyStamp]) -> None:
    """Insert or replace each row, inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO stamps (doc, map, key, stamp, writer, raw) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (doc, map, key) DO UPDATE SET stamp = excluded.stamp,"
        " writer = excluded.writer, raw = excluded.raw",
        [(r.doc, r.map, r.key, to_column(r.stamp), r.writer, to_column(r.raw))
         for r in rows])


def delete_stamps(conn: sqlite3.Connection, docs: Sequence[str]) -> None:
    """Delete every row of documents ``docs``, inside the caller's transaction."""
    conn.executemany("DELETE FROM stamps WHERE doc = ?", [(doc,) for doc in docs])
