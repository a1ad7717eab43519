"""SQL of the change feed and the state projection (worker-thread functions of
:class:`~crdtsync_server.store.sqlite.SQLiteStore`; see ``store/feed.py`` for the model)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from .feed import (
    FEED_COLUMNS,
    FEED_FLOOR_SETTING,
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    FeedRow,
    ProjectionRow,
    StateChange,
    change_row,
    conflict_row,
    item_from_row,
    json_text,
    projection_writes,
    purgeable_prefix,
)

MIGRATION = """
    CREATE TABLE feed (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        fleet TEXT,
        doc TEXT,
        topic TEXT,
        seq INTEGER,
        time INTEGER NOT NULL,
        received INTEGER NOT NULL,
        body TEXT NOT NULL,
        source TEXT,
        digest BLOB
    );
    INSERT INTO feed (cursor, kind, device, fleet, topic, seq, time, received, body, digest)
        SELECT e.cursor, 'event', e.device, d.fleet, e.topic, e.seq, e.time, e.received,
               e.body, e.digest
        FROM events e LEFT JOIN devices d ON d.id = e.device ORDER BY e.cursor;
    DROP TABLE events;
    CREATE UNIQUE INDEX feed_event_seq ON feed (device, seq) WHERE kind = 'event';
    CREATE INDEX feed_device_cursor ON feed (device, cursor);
    CREATE INDEX feed_topic_cursor ON feed (topic, cursor) WHERE kind = 'event';
    CREATE VIEW events AS
        SELECT cursor, device, seq, topic, time, received, body, digest
        FROM feed WHERE kind = 'event';
    CREATE TABLE projection (
        device TEXT NOT NULL,
        doc TEXT NOT NULL,
        map TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated INTEGER NOT NULL,
        PRIMARY KEY (device, doc, map, key)
    ) WITHOUT ROWID;
    CREATE TABLE sinks (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        options TEXT NOT NULL,
        filter TEXT NOT NULL,
        batch INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        backoff REAL NOT NULL,
        max_backoff REAL NOT NULL,
        origin TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        cursor INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at INTEGER,
        last_delivered_at INTEGER,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        owner TEXT,
        lease_until INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sink TEXT NOT NULL,
        cursor INTEGER NOT NULL,
        key TEXT NOT NULL,
        item TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        retry INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_sink_id ON dead_letters (sink, id);
"""
"""Schema v4: the feed (backfilled with the events already stored), the projection (built
from the documents by the server at its first start on v4), and the downstream sinks with
their dead letters (SQL in ``store/sqlite_sinks.py``)."""


def insert_feed(conn: sqlite3.Connection, rows: Sequence[FeedRow]) -> None:
    conn.executemany(f"INSERT INTO feed ({FEED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     rows)


def device_fleet(conn: sqlite3.Connection, device: str) -> str | None:
    row = conn.execute("SELECT fleet FROM devices WHERE id = ?", (device,)).fetchone()
    return None if row is None else row[0]


def record_changes(conn: sqlite3.Connection, changes: Sequence[StateChange],
                   fleet: str | None, now: int) -> None:
    """Append the feed rows of ``changes`` and apply them to the projection. ``fleet`` is
    the writing device's; a cloud write (``fleet`` unknown) looks each device up."""
    for change in changes:
        owner = fleet if fleet is not None else device_fleet(conn, change.device)
        insert_feed(conn, [change_row(change, owner, now)])
        apply_projection(conn, change, now)


def record_conflicts(conn: sqlite3.Connection, conflicts: Sequence[ConflictRecord],
                     fleet: str | None, now: int) -> None:
    """Append the feed rows of ``conflicts`` (``fleet`` as for :func:`record_changes`)."""
    insert_feed(conn, [
        conflict_row(c, fleet if fleet is not None else device_fleet(conn, c.device), now)
        for c in conflicts])


def apply_projection(conn: sqlite3.Connection, change: StateChange, now: int) -> None:
    writes = list(projection_writes(change))
    conn.executemany(
        "DELETE FROM projection WHERE device = ? AND doc = ? AND map = ? AND key = ?",
        [(change.device, change.doc, name, key) for name, key, value in writes
         if value is None])
    conn.executemany(
        "INSERT INTO projection (device, doc, map, key, value, updated)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, doc, map, key)"
        " DO UPDATE SET value = excluded.value, updated = excluded.updated",
        [(change.device, change.doc, name, key, value, now) for name, key, value in writes
         if value is not None])


def read_feed(conn: sqlite3.Connection, after: int, limit: int, where: FeedFilter
              ) -> list[FeedItem]:
    clauses, params = ["cursor > ?"], [after]
    for column in ("device", "fleet", "topic", "kind"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    rows = conn.execute(
        f"SELECT cursor, {FEED_COLUMNS} FROM feed WHERE {' AND '.join(clauses)}"
        " ORDER BY cursor LIMIT ?", (*params, limit))
    return [item_from_row(row[0], row[1:]) for row in rows]


def feed_head(conn: sqlite3.Connection) -> int:
    highest = int(conn.execute("SELECT COALESCE(MAX(cursor), 0) FROM feed").fetchone()[0])
    return max(highest, feed_floor(conn))


def feed_floor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM settings WHERE key = ?",
                       (FEED_FLOOR_SETTING,)).fetchone()
    return 0 if row is None else int(row[0])


PURGE_CHUNK = 5000
"""Feed items deleted per transaction: a purge never holds the write lock for long."""


def purge_feed_chunk(conn: sqlite3.Connection, before: int, keep_after: int) -> int:
    """One transaction's share of ``Store.purge_feed``: up to ``PURGE_CHUNK`` of the oldest
    items; returns how many went."""
    floor = feed_floor(conn)
    rows = conn.execute("SELECT cursor, received FROM feed WHERE cursor > ?"
                        " ORDER BY cursor LIMIT ?", (floor, PURGE_CHUNK)).fetchall()
    count = purgeable_prefix(rows, before, keep_after)
    if count:
        upto = int(rows[count - 1][0])
        conn.execute("DELETE FROM feed WHERE cursor <= ?", (upto,))
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = excluded.value", (FEED_FLOOR_SETTING, str(upto)))
    return count


def read_projection(conn: sqlite3.Connection, device: str | None, after: tuple[str, ...],
                    limit: int) -> list[ProjectionRow]:
    clauses, params = [], []
    if device is not None:
        clauses.append("device = ?")
        params.append(device)
    if after:
        clauses.append("(device, doc, map, key) > (?, ?, ?, ?)")
        params.extend(after)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT device, doc, map, key, value, updated FROM projection {where}"
        " ORDER BY device, doc, map, key LIMIT ?", (*params, limit))
    return [ProjectionRow(d, doc, m, k, json.loads(v), u) for d, doc, m, k, v, u in rows]


def replace_projection(conn: sqlite3.Connection, device: str, doc: str, rows: Changes,
                       now: int) -> None:
    conn.execute("DELETE FROM projection WHERE device = ? AND doc = ?", (device, doc))
    conn.executemany(
        "INSERT INTO projection (device, doc, map, key, value, updated) VALUES (?, ?, ?, ?, ?, ?)",
        [(device, doc, name, key, json_text(value), now)
         for name, keys in rows.items() for key, value in keys.items() if value is not None])
