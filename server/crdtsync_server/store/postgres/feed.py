"""Events, the change feed and the projection in PostgreSQL (the
:class:`~crdtsync_server.store.roles.FeedStore` role): table ``feed`` with the ``events``
view, table ``projection`` (``FEED`` in ``postgres/schema.py``; the model in
``store/feed.py``), and their part of a commit. The feed's head and floor are the marks
``feed_head`` and ``feed_floor`` (``connection.mark``).

Cursors come from the ``feed`` sequence; every transaction that appends holds the sequence
lock (``connection.sequenced``: ``Store.commit`` takes it), so a reader never sees a cursor
before a lower one that will still commit. Each append raises ``feed_head`` to its highest
cursor and announces it (``f:<head>``). Feed rows are appended with one multi-row statement
per call (arrays through ``unnest``), in the order given.

Text order: the projection is read in code-point order, as SQLite and the memory backend
order it, since the schema declares its columns ``COLLATE "C"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from ..feed import (
    FEED_COLUMNS,
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    FeedRow,
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
from ..rules import EventPlan, check_limit, event_digests
from .connection import PostgresConnection, announce, loads, mark, raise_mark

_EVENT_COLUMNS = "cursor, device, seq, topic, time, received, body"

_FEED_TYPES = ("text", "text", "text", "text", "text", "bigint", "bigint", "bigint", "text",
               "text", "bytea")
"""Array types of ``FEED_COLUMNS`` and ``digest``, in that order (for ``unnest``)."""

_APPEND = (
    f"WITH new AS (INSERT INTO feed ({FEED_COLUMNS}, digest)"
    f" SELECT {FEED_COLUMNS}, digest FROM unnest("
    + ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(_FEED_TYPES, 1))
    + f") WITH ORDINALITY AS given ({FEED_COLUMNS}, digest, position) ORDER BY position"
    " RETURNING cursor) SELECT max(cursor) FROM new"
)
"""Append rows given as one array per column, in array order; returns the highest cursor."""

_PROJECTION_KEY = "device, doc, map, key"

PURGE_CHUNK = 5000
"""Feed items deleted per transaction: a purge never holds its row locks for long."""


class PostgresFeed(PostgresConnection):
    """The :class:`FeedStore` role."""

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._read(_read_events, after, limit, device, topic)

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""
        check_limit(limit)
        return await self._read(_read_feed, after, limit, where or FeedFilter())

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any)."""
        return await self._read(mark, "feed_head")

    async def feed_floor(self) -> int:
        """The highest purged cursor (0 when nothing was purged)."""
        return await self._read(mark, "feed_floor")

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items (see ``Store.purge_feed``), ``PURGE_CHUNK`` per
        transaction so that syncs go on in between; returns how many went (items another
        instance's purge deleted first are not counted)."""
        total = 0
        while True:
            cut, deleted = await self._write(_purge_feed_chunk, before, keep_after)
            total += deleted
            if cut < PURGE_CHUNK:
                return total

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows ordered by (device, doc, map, key), after ``after``."""
        check_limit(limit)
        return await self._read(_read_projection, device, after, limit)

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows``."""
        await self._write(_replace_projection, device, doc, rows, now)


def _param(number: int) -> str:
    return f"${number}"


async def _read_events(conn: asyncpg.Connection, after: int, limit: int, device: str | None,
                       topic: str | None) -> list[StoredEvent]:
    tail, params = cursor_page(after, limit, {"device": device, "topic": topic}, _param)
    rows = await conn.fetch(f"SELECT {_EVENT_COLUMNS} FROM events {tail}", *params)
    return [StoredEvent(cursor, dev, seq, top, time, received, loads(body))
            for cursor, dev, seq, top, time, received, body in rows]


async def _read_feed(conn: asyncpg.Connection, after: int, limit: int, where: FeedFilter
                     ) -> list[FeedItem]:
    tail, params = cursor_page(after, limit, where.columns(), _param)
    rows = await conn.fetch(f"SELECT cursor, {FEED_COLUMNS} FROM feed {tail}", *params)
    return [item_from_row(row[0], tuple(row)[1:]) for row in rows]


async def _purge_feed_chunk(conn: asyncpg.Connection, before: int, keep_after: int
                            ) -> tuple[int, int]:
    """One transaction's share of ``Store.purge_feed``: up to ``PURGE_CHUNK`` of the oldest
    items. Returns how many the cut spans and how many this transaction deleted."""
    rows = await conn.fetch("SELECT cursor, received FROM feed WHERE cursor > $1"
                            " ORDER BY cursor LIMIT $2",
                            await mark(conn, "feed_floor"), PURGE_CHUNK)
    cut = purgeable_prefix([(r[0], r[1]) for r in rows], before, keep_after)
    if not cut:
        return 0, 0
    upto = int(rows[cut - 1][0])
    status = await conn.execute("DELETE FROM feed WHERE cursor <= $1", upto)
    await raise_mark(conn, "feed_floor", upto)
    return cut, int(status.split()[-1])


async def _read_projection(conn: asyncpg.Connection, device: str | None,
                           after: tuple[str, ...], limit: int) -> list[ProjectionRow]:
    clauses: list[str] = []
    params: list[Any] = []
    if device is not None:
        params.append(device)
        clauses.append(f"device = ${len(params)}")
    if after:
        params.extend(after)
        n = len(params)
        clauses.append(f"({_PROJECTION_KEY}) > (${n - 3}, ${n - 2}, ${n - 1}, ${n})")
    params.append(limit)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(
        f"SELECT device, doc, map, key, value, updated FROM projection {where}"
        f" ORDER BY {_PROJECTION_KEY} LIMIT ${len(params)}", *params)
    return [ProjectionRow(d, doc, m, k, loads(v), u) for d, doc, m, k, v, u in rows]


async def _replace_projection(conn: asyncpg.Connection, device: str, doc: str, rows: Changes,
                              now: int) -> None:
    await conn.execute("DELETE FROM projection WHERE device = $1 AND doc = $2", device, doc)
    await _upsert_projection(conn, sorted(
        (device, doc, name, key, json_text(value))
        for name, keys in rows.items() for key, value in keys.items() if value is not None),
        now)


# --- the feed part of a commit


async def stored_digests(conn: asyncpg.Connection, device: DeviceRecord, write: SyncWrite
                         ) -> dict[int, bytes]:
    """Digests of this device's stored events among the batch's seqs <= ``last_seq``."""
    seqs = sorted({e.seq for e in write.events if e.seq <= device.last_seq})
    if not seqs:
        return {}
    rows = await conn.fetch(
        "SELECT seq, digest FROM events WHERE device = $1 AND seq = ANY($2::bigint[])",
        device.id, seqs)
    return {int(seq): bytes(digest) for seq, digest in rows}


async def insert_events(conn: asyncpg.Connection, device: DeviceRecord, received: int,
                        plan: EventPlan) -> None:
    """New events go into the feed (``events`` is a view over it), with their digest."""
    rows = event_rows(device.id, device.fleet, received, plan.new)
    await _append(conn, rows, event_digests(plan.new))


async def record_changes(conn: asyncpg.Connection, changes: Sequence[StateChange],
                         writer: DeviceRecord | None, now: int) -> None:
    """Append the feed rows of ``changes`` and apply them to the projection, in order.
    ``writer`` is the writing device (its fleet is known); a cloud write (``None``) looks
    each device's fleet up."""
    if not changes:
        return
    fleets = await _fleets(conn, [c.device for c in changes], writer)
    await _append(conn, [change_row(c, fleets[c.device], now) for c in changes])
    final: dict[tuple[str, str, str, str], str | None] = {}
    for change in changes:  # a later change of a key wins, as if applied one by one
        for name, key, value in projection_writes(change):
            final[(change.device, change.doc, name, key)] = value
    gone = sorted(k for k, v in final.items() if v is None)
    if gone:
        await conn.execute(
            "DELETE FROM projection p USING unnest($1::text[], $2::text[], $3::text[],"
            " $4::text[]) AS g (device, doc, map, key) WHERE (p.device, p.doc, p.map, p.key)"
            " = (g.device, g.doc, g.map, g.key)", *map(list, zip(*gone, strict=True)))
    await _upsert_projection(conn, sorted((*k, v) for k, v in final.items() if v is not None),
                             now)


async def record_conflicts(conn: asyncpg.Connection, conflicts: Sequence[ConflictRecord],
                           writer: DeviceRecord | None, now: int) -> None:
    """Append the feed rows of ``conflicts`` (``writer`` as for :func:`record_changes`)."""
    if not conflicts:
        return
    fleets = await _fleets(conn, [c.device for c in conflicts], writer)
    await _append(conn, [conflict_row(c, fleets[c.device], now) for c in conflicts])


async def append_feed(conn: asyncpg.Connection, rows: Sequence[FeedRow]) -> None:
    """Append ``rows`` (no digests) to the feed, inside the caller's transaction, which
    holds the sequence lock (another role's write with a feed item: a finished upload)."""
    await _append(conn, rows)


async def _append(conn: asyncpg.Connection, rows: Sequence[FeedRow],
                  digests: Sequence[bytes | None] | None = None) -> None:
    """Append ``rows`` (with ``digests``, if any) in one statement, raise ``feed_head`` to
    the highest cursor given and announce it. The caller holds the sequence lock."""
    if not rows:
        return
    columns = [list(column) for column in zip(*rows, strict=True)]
    head = await conn.fetchval(_APPEND, *columns,
                               list(digests) if digests is not None else [None] * len(rows))
    await raise_mark(conn, "feed_head", head)
    await announce(conn, "f", head)


async def _fleets(conn: asyncpg.Connection, devices: Sequence[str],
                  writer: DeviceRecord | None) -> dict[str, str | None]:
    """The fleet of each of ``devices``: the writing device's if known, else each device's
    as stored (``None`` for an unknown device)."""
    if writer is not None:
        return dict.fromkeys(devices, writer.fleet)
    rows = await conn.fetch("SELECT id, fleet FROM devices WHERE id = ANY($1::text[])",
                            sorted(set(devices)))
    return {**dict.fromkeys(devices), **{r[0]: r[1] for r in rows}}


async def _upsert_projection(conn: asyncpg.Connection,
                             rows: Sequence[tuple[str, str, str, str, str | None]], now: int
                             ) -> None:
    """Set each ``(device, doc, map, key, value JSON text)`` of ``rows`` (keys distinct;
    callers sort them, so that concurrent writers lock rows in one order)."""
    if not rows:
        return
    await conn.execute(
        "INSERT INTO projection (device, doc, map, key, value, updated)"
        " SELECT device, doc, map, key, value, $6 FROM unnest($1::text[], $2::text[],"
        " $3::text[], $4::text[], $5::text[]) AS r (device, doc, map, key, value)"
        " ON CONFLICT (device, doc, map, key)"
        " DO UPDATE SET value = excluded.value, updated = excluded.updated",
        *map(list, zip(*rows, strict=True)), now)
