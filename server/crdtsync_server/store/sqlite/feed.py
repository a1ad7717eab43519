"""Events, the change feed and the projection in SQLite (the
:class:`~crdtsync_server.store.roles.FeedStore` role): table ``feed`` with the ``events``
view, table ``projection`` (schema v4 in ``sqlite/schema.py``; the model in
``store/feed.py``), and their part of a commit. The floor of a purged feed is kept in
``settings`` under ``FEED_FLOOR_SETTING``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from crdtsync.protocol import Event

from ..feed import (
    FEED_COLUMNS,
    FEED_FLOOR_SETTING,
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    ProjectionRow,
    StateChange,
    change_row,
    conflict_row,
    cursor_page,
    event_rows,
    item_from_row,
    json_text,
    projection_writes,
    purgeable_prefix,
)
from ..records import DeviceRecord, StoredEvent, SyncWrite
from ..rules import check_limit, event_digests
from .connection import SQLiteConnection, execute_many, in_transaction, insert_values

_EVENT_COLUMNS = "cursor, device, seq, topic, time, received, body"


PURGE_CHUNK = 5000
"""Feed items deleted per transaction: a purge never holds the write lock for long."""


class SQLiteFeed(SQLiteConnection):
    """The :class:`FeedStore` role."""

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_read_events, after, limit, device, topic)

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""
        check_limit(limit)
        return await self._run(_read_feed, after, limit, where or FeedFilter())

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any)."""
        return await self._run(_feed_head)

    async def feed_floor(self) -> int:
        """The highest purged cursor (0 when nothing was purged)."""
        return await self._run(_feed_floor)

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items (see ``Store.purge_feed``), ``PURGE_CHUNK`` per
        transaction so that syncs go on in between; returns how many."""
        total = 0
        while True:
            count: int = await self._run(in_transaction, _purge_feed_chunk,
                                         before, keep_after)
            total += count
            if count < PURGE_CHUNK:
                return total

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows ordered by (device, doc, map, key), after ``after``."""
        check_limit(limit)
        return await self._run(_read_projection, device, after, limit)

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows``."""
        await self._run(in_transaction, _replace_projection, device, doc, rows,
                        now)


def _param(number: int) -> str:
    return "?"


def _read_events(
    conn: sqlite3.Connection, after: int, limit: int, device: str | None, topic: str | None
) -> list[StoredEvent]:
    tail, params = cursor_page(after, limit, {"device": device, "topic": topic}, _param)
    rows = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events {tail}", params)
    return [
        StoredEvent(cursor, dev, seq, top, time, received, json.loads(body))
        for cursor, dev, seq, top, time, received, body in rows
    ]


def _read_feed(conn: sqlite3.Connection, after: int, limit: int, where: FeedFilter
              ) -> list[FeedItem]:
    tail, params = cursor_page(after, limit, where.columns(), _param)
    rows = conn.execute(f"SELECT cursor, {FEED_COLUMNS} FROM feed {tail}", params)
    return [item_from_row(row[0], row[1:]) for row in rows]


def _feed_head(conn: sqlite3.Connection) -> int:
    highest = int(conn.execute("SELECT COALESCE(MAX(cursor), 0) FROM feed").fetchone()[0])
    return max(highest, _feed_floor(conn))


def _feed_floor(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM settings WHERE key = ?",
                       (FEED_FLOOR_SETTING,)).fetchone()
    return 0 if row is None else int(row[0])


def _purge_feed_chunk(conn: sqlite3.Connection, before: int, keep_after: int) -> int:
    """One transaction's share of ``Store.purge_feed``: up to ``PURGE_CHUNK`` of the oldest
    items; returns how many went."""
    floor = _feed_floor(conn)
    rows = conn.execute("SELECT cursor, received FROM feed WHERE cursor > ?"
                        " ORDER BY cursor LIMIT ?", (floor, PURGE_CHUNK)).fetchall()
    count = purgeable_prefix(rows, before, keep_after)
    if count:
        upto = int(rows[count - 1][0])
        conn.execute("DELETE FROM feed WHERE cursor <= ?", (upto,))
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = excluded.value", (FEED_FLOOR_SETTING, str(upto)))
    return count


def _read_projection(conn: sqlite3.Connection, device: str | None, after: tuple[str, ...],
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


def _replace_projection(conn: sqlite3.Connection, device: str, doc: str, rows: Changes,
                       now: int) -> None:
    conn.execute("DELETE FROM projection WHERE device = ? AND doc = ?", (device, doc))
    conn.executemany(
        "INSERT INTO projection (device, doc, map, key, value, updated) VALUES (?, ?, ?, ?, ?, ?)",
        [(device, doc, name, key, json_text(value), now)
         for name, keys in rows.items() for key, value in keys.items() if value is not None])


# --- the feed part of a commit


def stored_digests(
    conn: sqlite3.Connection, device: DeviceRecord, write: SyncWrite
) -> dict[int, bytes]:
    """Digests of this device's stored events among the batch's seqs <= ``last_seq``."""
    seqs = [e.seq for e in write.events if e.seq <= device.last_seq]
    if not seqs:
        return {}
    rows = conn.execute(
        "SELECT seq, digest FROM events WHERE device = ? AND seq BETWEEN ? AND ?",
        (device.id, min(seqs), max(seqs)),
    )
    wanted = set(seqs)
    return {int(seq): bytes(digest) for seq, digest in rows if seq in wanted}


def record_feed(conn: sqlite3.Connection, writer: DeviceRecord | None, now: int,
                events: Sequence[Event], changes: Sequence[StateChange],
                conflicts: Sequence[ConflictRecord]) -> None:
    """Append one write's feed rows in cursor order, in as few statements as they fit: its
    new ``events`` (with their digest; the ``events`` view shows them), then ``changes``,
    then ``conflicts``; and apply ``changes`` to the projection. ``writer`` is the writing
    device (the events' device; its fleet is known); a cloud write (``None``, no events:
    ``check_write``) looks each device's fleet up."""
    rows: list[tuple[Any, ...]] = []
    if events:
        assert writer is not None
        rows = [(*row, digest) for row, digest in zip(
            event_rows(writer.id, writer.fleet, now, events), event_digests(events),
            strict=True)]
    rows += [(*change_row(c, _fleet(conn, writer, c.device), now), None) for c in changes]
    rows += [(*conflict_row(c, _fleet(conn, writer, c.device), now), None)
             for c in conflicts]
    insert_values(conn, f"INSERT INTO feed ({FEED_COLUMNS}, digest)", rows)
    for change in changes:
        _apply_projection(conn, change, now)


def _fleet(conn: sqlite3.Connection, writer: DeviceRecord | None, device: str) -> str | None:
    """The fleet of ``device``: the writing device's if known, else as stored."""
    if writer is not None:
        return writer.fleet
    row = conn.execute("SELECT fleet FROM devices WHERE id = ?", (device,)).fetchone()
    return None if row is None else row[0]


def _apply_projection(conn: sqlite3.Connection, change: StateChange, now: int) -> None:
    device, doc = change.device, change.doc
    deletes: list[tuple[str, str, str, str]] = []
    upserts: list[tuple[str, str, str, str, str, int]] = []
    for name, key, value in projection_writes(change):
        if value is None:
            deletes.append((device, doc, name, key))
        else:
            upserts.append((device, doc, name, key, value, now))
    execute_many(
        conn, "DELETE FROM projection WHERE device = ? AND doc = ? AND map = ? AND key = ?",
        deletes)
    insert_values(
        conn, "INSERT INTO projection (device, doc, map, key, value, updated)", upserts,
        " ON CONFLICT (device, doc, map, key)"
        " DO UPDATE SET value = excluded.value, updated = excluded.updated")
