"""The wake log in SQLite (the :class:`~crdtsync_server.store.roles.WakeStore` role): table
``wakes``, its head in ``sqlite_sequence`` (a purge never lowers it) and its floor in
``settings`` under ``WAKE_FLOOR_SETTING``.

Entries are appended by :func:`insert_wakes` inside the transaction of the write they
announce. Calls that may append one run through ``SQLiteConnection._run_waking``, which reads
the head after the transaction and calls the ``on_wakes`` listeners when it moved (entries
another process appended are announced the same way when this process next writes one).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from crdtsync._sqlite_worker import transaction

from ..records import WakeEntry
from ..rules import check_limit
from .connection import SQLiteConnection, execute_many, in_transaction, wake_head

WAKE_FLOOR_SETTING = "wake_floor"


class SQLiteWakes(SQLiteConnection):
    """The :class:`WakeStore` role (``on_wakes`` and the announcing ``_run_waking`` are
    :class:`SQLiteConnection`'s: every role that appends entries needs them)."""

    async def add_wakes(self, targets: Sequence[str], now: int) -> int:
        """Append one entry per target in one transaction; returns the head."""
        await self._run_waking(in_transaction, insert_wakes, list(targets), now)
        return await self.wake_head()

    async def wake_head(self) -> int:
        """The highest cursor ever given out (0: none)."""
        return await self._run(wake_head)

    async def read_wakes(self, after: int, limit: int) -> list[WakeEntry]:
        """Entries with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_read_wakes, after, limit)

    async def wake_pending(self, targets: Sequence[str], after: int) -> bool:
        """See ``WakeStore.wake_pending``."""
        return await self._run(_wake_pending, list(targets), after)

    async def purge_wakes(self, before: int) -> int:
        """Delete the oldest entries, in cursor order, up to the first one written at or
        after ``before`` (ms), in one transaction; the head stays."""
        return await self._run(in_transaction, _purge_wakes, before)


def insert_wakes(conn: sqlite3.Connection, targets: Sequence[str], now: int) -> None:
    """Append one entry per target, inside the caller's transaction."""
    execute_many(conn, "INSERT INTO wakes (target, at) VALUES (?, ?)",
                     [(target, now) for target in targets])


def _floor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM settings WHERE key = ?",
                       (WAKE_FLOOR_SETTING,)).fetchone()
    return 0 if row is None else int(row[0])


def _read_wakes(conn: sqlite3.Connection, after: int, limit: int) -> list[WakeEntry]:
    rows = conn.execute("SELECT cursor, target, at FROM wakes WHERE cursor > ?"
                        " ORDER BY cursor LIMIT ?", (after, limit)).fetchall()
    return [WakeEntry(*row) for row in rows]


def _wake_pending(conn: sqlite3.Connection, targets: list[str], after: int) -> bool:
    with transaction(conn, "DEFERRED"):  # one snapshot: floor, head and entries
        if after < _floor(conn) or after > wake_head(conn):
            return True
        marks = ", ".join("?" * len(targets))
        row = conn.execute(f"SELECT EXISTS (SELECT 1 FROM wakes WHERE target IN ({marks})"
                           " AND cursor > ?)", (*targets, after)).fetchone()
        return bool(row[0])


def _purge_wakes(conn: sqlite3.Connection, before: int) -> int:
    first_kept = conn.execute("SELECT min(cursor) FROM wakes WHERE at >= ?",
                              (before,)).fetchone()[0]
    upto = (conn.execute("SELECT max(cursor) FROM wakes").fetchone()[0] or 0
            if first_kept is None else first_kept - 1)
    gone = conn.execute("DELETE FROM wakes WHERE cursor <= ?", (upto,)).rowcount
    if gone:
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = excluded.value", (WAKE_FLOOR_SETTING, str(upto)))
    return gone
