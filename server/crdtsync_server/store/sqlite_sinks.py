"""SQL of downstream sinks and their dead letters (worker-thread functions of
:class:`~crdtsync_server.store.sqlite.SQLiteStore`; see ``store/sinks.py`` for the model).
The tables are created by the v4 migration (``store/sqlite_feed.py``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from crdtsync.errors import NotFound
from crdtsync.sqlite_worker import transaction

from .feed import FeedItem
from .sinks import (
    DeadLetter,
    SinkConfig,
    SinkRecord,
    config_columns,
    config_from_columns,
    item_from_text,
    item_text,
)

_CONFIG = "name, type, options, filter, batch, max_attempts, backoff, max_backoff"
_STATUS = ("origin, paused, cursor, delivered, failures, consecutive_failures, dead_lettered,"
           " last_error, last_error_at, last_delivered_at, created, updated, owner, lease_until")
_SELECT = (f"SELECT {_CONFIG}, {_STATUS}, (SELECT COUNT(*) FROM dead_letters d"
           " WHERE d.sink = sinks.name) FROM sinks")
_LETTER = "id, sink, item, error, attempts, created, retry"


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


def get_sink(conn: sqlite3.Connection, name: str) -> SinkRecord | None:
    row = conn.execute(f"{_SELECT} WHERE name = ?", (name,)).fetchone()
    return None if row is None else _record(row)


def list_sinks(conn: sqlite3.Connection) -> list[SinkRecord]:
    return [_record(row) for row in conn.execute(f"{_SELECT} ORDER BY name")]


def put_sink(conn: sqlite3.Connection, config: SinkConfig, now: int, origin: str,
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
        record = get_sink(conn, config.name)
    assert record is not None
    return record


def delete_sink(conn: sqlite3.Connection, name: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM dead_letters WHERE sink = ?", (name,))
        if conn.execute("DELETE FROM sinks WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no sink {name!r}", {"sink": name})


_OWNED = "name = ? AND (? IS NULL OR owner = ?)"
"""The sink, and (unless the owner given is NULL) only while that owner holds its lease."""


def acquire_sink_lease(conn: sqlite3.Connection, name: str, owner: str, now: int,
                       ttl_ms: int) -> bool:
    return bool(conn.execute(
        "UPDATE sinks SET owner = ?, lease_until = ? WHERE name = ?"
        " AND (owner IS NULL OR owner = ? OR lease_until <= ?)",
        (owner, now + ttl_ms, name, owner, now)).rowcount)


def release_sink_lease(conn: sqlite3.Connection, name: str, owner: str) -> None:
    conn.execute("UPDATE sinks SET owner = NULL, lease_until = 0 WHERE name = ? AND owner = ?",
                 (name, owner))


def sink_delivered(conn: sqlite3.Connection, name: str, cursor: int, count: int, now: int,
                   owner: str | None = None) -> bool:
    return bool(conn.execute(
        "UPDATE sinks SET cursor = MAX(cursor, ?), delivered = delivered + ?,"
        " consecutive_failures = CASE WHEN ? > 0 THEN 0 ELSE consecutive_failures END,"
        " last_delivered_at = CASE WHEN ? > 0 THEN ? ELSE last_delivered_at END"
        f" WHERE {_OWNED}", (cursor, count, count, count, now, name, owner, owner)).rowcount)


def sink_failed(conn: sqlite3.Connection, name: str, error: str, now: int) -> None:
    conn.execute(
        "UPDATE sinks SET failures = failures + 1,"
        " consecutive_failures = consecutive_failures + 1, last_error = ?, last_error_at = ?"
        " WHERE name = ?", (error, now, name))


def add_dead_letters(conn: sqlite3.Connection, name: str, items: Sequence[FeedItem],
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


def list_dead_letters(conn: sqlite3.Connection, name: str, after: int, limit: int,
                      retrying: bool | None) -> list[DeadLetter]:
    flag = None if retrying is None else int(retrying)
    rows = conn.execute(
        f"SELECT {_LETTER} FROM dead_letters WHERE sink = ? AND id > ?"
        " AND (? IS NULL OR retry = ?) ORDER BY id LIMIT ?", (name, after, flag, flag, limit))
    return [_letter(row) for row in rows]


def retry_dead_letters(conn: sqlite3.Connection, name: str, ids: Sequence[int] | None) -> int:
    if ids is None:
        return int(conn.execute("UPDATE dead_letters SET retry = 1 WHERE sink = ?",
                                (name,)).rowcount)
    with transaction(conn):
        return int(conn.executemany(
            "UPDATE dead_letters SET retry = 1 WHERE sink = ? AND id = ?",
            [(name, i) for i in ids]).rowcount)


def finish_dead_letters(conn: sqlite3.Connection, name: str, ids: Sequence[int], now: int,
                        error: str | None, attempts: int) -> None:
    with transaction(conn):
        if error is not None:
            conn.executemany(
                "UPDATE dead_letters SET retry = 0, error = ?, attempts = attempts + ?"
                " WHERE sink = ? AND id = ?", [(error, attempts, name, i) for i in ids])
            return
        gone = conn.executemany("DELETE FROM dead_letters WHERE sink = ? AND id = ?",
                                [(name, i) for i in ids]).rowcount
        sink_delivered(conn, name, 0, gone, now)
