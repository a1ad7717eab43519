"""The wake log in PostgreSQL (the :class:`~crdtsync_server.store.roles.WakeStore` role):
table ``wakes``, its head and floor in ``marks`` (``wake_head``, ``wake_floor``; neither is
ever lowered, so a purge never moves the head back).

Entries are appended by :func:`insert_wakes` inside the transaction of the write they
announce, which takes the sequence lock first (``connection.sequenced``): cursors become
visible in the order they were given out, so a reader following :meth:`read_wakes` never
steps over one still in flight. :func:`insert_wakes` also announces the new head; every
instance's ``on_wakes`` listeners hear it (``connection.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ..records import WakeEntry
from ..rules import check_limit
from .connection import (
    WAKE_HEAD,
    PostgresConnection,
    announce,
    mark,
    raise_mark,
    rowcount,
    sequenced,
)
from .connection import wake_head as _wake_head

WAKE_FLOOR = "wake_floor"
"""The mark holding the highest cursor :meth:`PostgresWakes.purge_wakes` deleted."""


class PostgresWakes(PostgresConnection):
    """The :class:`WakeStore` role (``on_wakes`` is :class:`PostgresConnection`'s: it
    listens to every instance's announcements)."""

    async def add_wakes(self, targets: Sequence[str], now: int) -> int:
        """Append one entry per target in one transaction; returns the head."""
        return await self._write(_add_wakes, list(targets), now)

    async def wake_head(self) -> int:
        """The highest cursor ever given out (0: none)."""
        return await self._read(_wake_head)

    async def read_wakes(self, after: int, limit: int) -> list[WakeEntry]:
        """Entries with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._read(_read_wakes, after, limit)

    async def wake_pending(self, targets: Sequence[str], after: int) -> bool:
        """See ``WakeStore.wake_pending``."""
        return await self._read(_wake_pending, list(targets), after)

    async def purge_wakes(self, before: int) -> int:
        """Delete the oldest entries, in cursor order, up to the first one written at or
        after ``before`` (ms), in one transaction; the head stays."""
        return await self._write(_purge_wakes, before)


async def insert_wakes(conn: asyncpg.Connection, targets: Sequence[str], now: int) -> None:
    """Append one entry per target (one statement), raise the head to the highest new
    cursor and announce it, inside the caller's transaction, which holds the sequence
    lock."""
    if not targets:
        return
    head = await conn.fetchval(
        "WITH added AS (INSERT INTO wakes (target, at)"
        " SELECT target, $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(target, n)"
        " ORDER BY n RETURNING cursor) SELECT max(cursor) FROM added", list(targets), now)
    await raise_mark(conn, WAKE_HEAD, head)
    await announce(conn, "w", head)


async def _add_wakes(conn: asyncpg.Connection, targets: list[str], now: int) -> int:
    await sequenced(conn)  # first: the transaction appends entries
    await insert_wakes(conn, targets, now)
    return await _wake_head(conn)


async def _read_wakes(conn: asyncpg.Connection, after: int, limit: int) -> list[WakeEntry]:
    rows = await conn.fetch("SELECT cursor, target, at FROM wakes WHERE cursor > $1"
                            " ORDER BY cursor LIMIT $2", after, limit)
    return [WakeEntry(*row) for row in rows]


async def _wake_pending(conn: asyncpg.Connection, targets: list[str], after: int) -> bool:
    # one snapshot (the caller's read transaction): floor, head and entries
    if after < await mark(conn, WAKE_FLOOR) or after > await _wake_head(conn):
        return True
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM wakes WHERE target = ANY($1::text[]) AND cursor > $2)",
        targets, after))


async def _purge_wakes(conn: asyncpg.Connection, before: int) -> int:
    first_kept = await conn.fetchval("SELECT min(cursor) FROM wakes WHERE at >= $1", before)
    upto = (await conn.fetchval("SELECT max(cursor) FROM wakes") or 0
            if first_kept is None else first_kept - 1)
    gone = rowcount(await conn.execute("DELETE FROM wakes WHERE cursor <= $1", upto))
    if gone:
        await raise_mark(conn, WAKE_FLOOR, upto)
    return gone
