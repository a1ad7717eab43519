"""Downstream sinks in SQLite (the :class:`~crdtsync_server.store.roles.SinkStore` role):
tables ``sinks`` and ``dead_letters`` (created by the v4 migration; the model in
``store/sinks.py``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from crdtsync._sqlite_worker import transaction
from crdtsync.errors import NotFound

from ..feed import FeedItem
from ..rules import check_limit
from ..sinks import (
    DeadLetter,
    SinkConfig,
    SinkRecord,
    check_origin,
    config_columns,
    config_from_columns,
    item_from_text,
    item_text,
)
from .connection import SQLiteConnection

_CONFIG = "name, type, options, filter, batch, max_attempts, backoff, max_backoff"


_STATUS = ("origin, paused, cursor, delivered, failures, consecutive_failures, dead_lettered,"
           " last_error, last_error_at, last_delivered_at, created, updated, owner, lease_until")


_SELECT = (f"SELECT {_CONFIG}, {_STATUS}, (SELECT COUNT(*) FROM dead_letters d"
           " WHERE d.sink = sinks.name) FROM sinks")


_LETTER = "id, sink, item, error, attempts, created, retry"


_OWNED = "name = ? AND (? IS NULL OR owner = ?)"
"""The sink, and (unless the owner given is NULL) only while that owner holds its lease."""


class SQLiteSinks(SQLiteConnection):
    """The :class:`SinkStore` role."""

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create or reconfigure a sink in one transaction, keeping its progress (see
        ``Store.put_sink``)."""
        check_origin(origin)
        return await self._run(_put_sink, config, now, origin, paused, start)

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""
        return await self._run(_get_sink, name)

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""
        return await self._run(_list_sinks)

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""
        await self._run(_delete_sink, name)

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Take or renew the sink's lease in one statement (see ``Store``)."""
        return await self._run(_acquire_sink_lease, name, owner, now, ttl_ms)

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it."""
        await self._run(_release_sink_lease, name, owner)

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """Move the cursor forward and count delivered items (see ``Store``)."""
        return await self._run(_sink_delivered, name, cursor, count, now, owner)

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed attempt and keep ``error``."""
        await self._run(_sink_failed, name, error, now)

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store dead letters and move the cursor past them, in one transaction."""
        return await self._run(_add_dead_letters, name, list(items), error,
                               attempts, now, owner)

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, at most ``limit``."""
        check_limit(limit)
        return await self._run(_list_dead_letters, name, after, limit, retrying)

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark dead letters for a retry; returns how many exist."""
        return await self._run(_retry_dead_letters, name,
                               None if ids is None else sorted(set(ids)))

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """Delete delivered dead letters, or record another failure (see ``Store``)."""
        await self._run(_finish_dead_letters, name, sorted(set(ids)), now, error,
                        attempts)


def _record(row: Sequence[Any]) -> SinkRecord:
    (origin, paused, cursor, delivered, failures, consecutive, dead_lettered, last_error,
     last_error_at, last_delivered_at, created, updated, owner, lease_until,
     dead_letters) = row[8:]
    return SinkRecord(config_from_columns(*row[:8]), origin, bool(paused), cursor, delivered,
                      failures, consecutive, dead_lettered, dead_letters, last_error,
                      last_error_at, last_delivered_at, created, updated, owner, lease_until)


def _letter(row: Sequence[Any]) -> DeadLetter:
    id_, sink, item, error, attempts, created, retry = row
    return DeadLetter(id_, sink, item_from_text(item), error, attempts, created, bool(retry))


def _get_sink(conn: sqlite3.Connection, name: str) -> SinkRecord | None:
    row = conn.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    return None if row is None else _record(row)


def _list_sinks(conn: sqlite3.Connection) -> list[SinkRecord]:
    return [_record(row) for row in conn.execute(f"{_SELECT} ORDER BY name")]


def _put_sink(conn: sqlite3.Connection, config: SinkConfig, now: int, origin: str,
             paused: bool, start: int) -> SinkRecord:
    with transaction(conn):
        conn.execute(
            f"INSERT INTO sinks ({_CONFIG}, origin, paused, cursor, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " type = excluded.type, options = excluded.options, filter = excluded.filter,"
            " batch = excluded.batch, max_attempts = excluded.max_attempts,"
            " backoff = excluded.backoff, max_backoff = excluded.max_backoff,"
            " origin = excluded.origin, paused = excluded.paused, updated = excluded.updated",
            (*config_columns(config), origin, int(paused), start, now, now))
        record = _get_sink(conn, config.name)
    assert record is not None
    return record


def _delete_sink(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM dead_letters WHERE sink = ?", (name,))
        if conn.execute("DELETE FROM sinks WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no sink {name!r}", {"sink": name})


def _acquire_sink_lease(conn: sqlite3.Connection, name: str, owner: str, now: int,
                       ttl_ms: int) -> bool:
    return bool(conn.execute(
        "UPDATE sinks SET owner = ?, lease_until = ? WHERE name = ?"
        " AND (owner IS NULL OR owner = ? OR lease_until <= ?)",
        (owner, now + ttl_ms, name, owner, now)).rowcount)


def _release_sink_lease(conn: sqlite3.Connection, name: str, owner: str) -> None:
    conn.execute("UPDATE sinks SET owner = NULL, lease_until = 0 WHERE name = ? AND owner = ?",
                 (name, owner))


def _sink_delivered(conn: sqlite3.Connection, name: str, cursor: int, count: int, now: int,
                   owner: str | None = None) -> bool:
    return bool(conn.execute(
        "UPDATE sinks SET cursor = MAX(cursor, ?), delivered = delivered + ?,"
        " consecutive_failures = CASE WHEN ? > 0 THEN 0 ELSE consecutive_failures END,"
        " last_delivered_at = CASE WHEN ? > 0 THEN ? ELSE last_delivered_at END"
        f" WHERE {_OWNED}", (cursor, count, count, count, now, name, owner, owner)).rowcount)


def _sink_failed(conn: sqlite3.Connection, name: str, error: str, now: int) -> None:
    conn.execute(
        "UPDATE sinks SET failures = failures + 1,"
        " consecutive_failures = consecutive_failures + 1, last_error = ?, last_error_at = ?"
        " WHERE name = ?", (error, now, name))


def _add_dead_letters(conn: sqlite3.Connection, name: str, items: Sequence[FeedItem],
                     error: str, attempts: int, now: int, owner: str | None = None) -> bool:
    with transaction(conn):
        moved = conn.execute(
            "UPDATE sinks SET cursor = MAX(cursor, ?), dead_lettered = dead_lettered + ?,"
            f" consecutive_failures = 0 WHERE {_OWNED}",
            (items[-1].cursor, len(items), name, owner, owner)).rowcount
        if moved:  # an unknown (deleted) sink, or another owner's, keeps no dead letters
            conn.executemany(
                "INSERT INTO dead_letters (sink, cursor, key, item, error, attempts, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(name, i.cursor, i.key, item_text(i), error, attempts, now) for i in items])
    return bool(moved)


def _list_dead_letters(conn: sqlite3.Connection, name: str, after: int, limit: int,
                      retrying: bool | None) -> list[DeadLetter]:
    flag = None if retrying is None else int(retrying)
    rows = conn.execute(
        f"SELECT {_LETTER} FROM dead_letters WHERE sink = ? AND id > ?"
        " AND (? IS NULL OR retry = ?) ORDER BY id LIMIT ?", (name, after, flag, flag, limit))
    return [_letter(row) for row in rows]


def _retry_dead_letters(conn: sqlite3.Connection, name: str, ids: Sequence[int] | None) -> int:
    if ids is None:
        return int(conn.execute("UPDATE dead_letters SET retry = 1 WHERE sink = ?",
                                (name,)).rowcount)
    with transaction(conn):
        return int(conn.executemany(
            "UPDATE dead_letters SET retry = 1 WHERE sink = ? AND id = ?",
            [(name, i) for i in ids]).rowcount)


def _finish_dead_letters(conn: sqlite3.Connection, name: str, ids: Sequence[int], now: int,
                        error: str | None, attempts: int) -> None:
    with transaction(conn):
        if error is not None:
            conn.executemany(
                "UPDATE dead_letters SET retry = 0, error = ?, attempts = attempts + ?"
                " WHERE sink = ? AND id = ?", [(error, attempts, name, i) for i in ids])
            return
        gone = conn.executemany("DELETE FROM dead_letters WHERE sink = ? AND id = ?",
                                [(name, i) for i in ids]).rowcount
        _sink_delivered(conn, name, 0, gone, now)
