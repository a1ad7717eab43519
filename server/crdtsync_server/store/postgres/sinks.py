"""Downstream sinks in PostgreSQL (the :class:`~crdtsync_server.store.roles.SinkStore` role):
tables ``sinks`` and ``dead_letters`` (the model in ``store/sinks.py``).

Several instances deliver sinks from one database, one instance per sink at a time: the
lease is taken, renewed and checked by single statements (``UPDATE ... WHERE`` the lease is
free, expired or already the caller's), so two instances racing for a sink never both get
it, and a cursor moves only for the owner named in the same statement. A second writer of
one row waits for the first one's row lock and then re-evaluates its condition on the
committed row (``READ COMMITTED``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

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
from .connection import PostgresConnection

_CONFIG = "name, type, options, filter, batch, max_attempts, backoff, max_backoff"


_STATUS = ("origin, paused, cursor, delivered, failures, consecutive_failures, dead_lettered,"
           " last_error, last_error_at, last_delivered_at, created, updated, owner, lease_until")


_SELECT = (f"SELECT {_CONFIG}, {_STATUS}, (SELECT count(*) FROM dead_letters d"
           " WHERE d.sink = sinks.name) FROM sinks")


_LETTER = "id, sink, item, error, attempts, created, retry"


_OWNED = "name = $1 AND ($2::text IS NULL OR owner = $2)"
"""The sink ``$1``, and (unless the owner ``$2`` is NULL) only while that owner holds its
lease."""


class PostgresSinks(PostgresConnection):
    """The :class:`SinkStore` role."""

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create or reconfigure a sink in one transaction, keeping its progress (see
        ``Store.put_sink``)."""
        check_origin(origin)
        return await self._write(_put_sink, config, now, origin, paused, start)

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""
        return await self._read(_get_sink, name)

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""
        return await self._read(_list_sinks)

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""
        await self._write(_delete_sink, name)

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Take or renew the sink's lease in one statement (see ``Store``): of several
        instances racing for a free lease, one gets it."""
        return await self._write(_acquire_sink_lease, name, owner, now, ttl_ms)

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it."""
        await self._write(_release_sink_lease, name, owner)

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """Move the cursor forward and count delivered items, the owner checked in the same
        statement (see ``Store``)."""
        return await self._write(_sink_delivered, name, cursor, count, now, owner)

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed attempt and keep ``error``."""
        await self._write(_sink_failed, name, error, now)

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store dead letters and move the cursor past them, in one transaction."""
        return await self._write(_add_dead_letters, name, list(items), error, attempts, now,
                                 owner)

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, at most ``limit``."""
        check_limit(limit)
        return await self._read(_list_dead_letters, name, after, limit, retrying)

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark dead letters for a retry; returns how many exist."""
        return await self._write(_retry_dead_letters, name,
                                 None if ids is None else sorted(set(ids)))

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """Delete delivered dead letters, or record another failure (see ``Store``)."""
        await self._write(_finish_dead_letters, name, sorted(set(ids)), now, error, attempts)


def _record(row: Sequence[Any]) -> SinkRecord:
    (origin, paused, cursor, delivered, failures, consecutive, dead_lettered, last_error,
     last_error_at, last_delivered_at, created, updated, owner, lease_until,
     dead_letters) = row[8:]
    return SinkRecord(config_from_columns(*row[:8]), origin, paused, cursor, delivered,
                      failures, consecutive, dead_lettered, dead_letters, last_error,
                      last_error_at, last_delivered_at, created, updated, owner, lease_until)


def _letter(row: Sequence[Any]) -> DeadLetter:
    id_, sink, item, error, attempts, created, retry = row
    return DeadLetter(id_, sink, item_from_text(item), error, attempts, created, retry)


async def _get_sink(conn: asyncpg.Connection, name: str) -> SinkRecord | None:
    row = await conn.fetchrow(f"{_SELECT} WHERE name = $1", name)
    return None if row is None else _record(row)


async def _list_sinks(conn: asyncpg.Connection) -> list[SinkRecord]:
    return [_record(row) for row in await conn.fetch(f"{_SELECT} ORDER BY name")]


async def _put_sink(conn: asyncpg.Connection, config: SinkConfig, now: int, origin: str,
                    paused: bool, start: int) -> SinkRecord:
    await conn.execute(
        f"INSERT INTO sinks ({_CONFIG}, origin, paused, cursor, created, updated)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)"
        " ON CONFLICT (name) DO UPDATE SET"
        " type = excluded.type, options = excluded.options, filter = excluded.filter,"
        " batch = excluded.batch, max_attempts = excluded.max_attempts,"
        " backoff = excluded.backoff, max_backoff = excluded.max_backoff,"
        " origin = excluded.origin, paused = excluded.paused, updated = excluded.updated",
        *config_columns(config), origin, paused, start, now)
    record = await _get_sink(conn, config.name)
    assert record is not None
    return record


async def _delete_sink(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("DELETE FROM dead_letters WHERE sink = $1", name)
    if await conn.fetchval("DELETE FROM sinks WHERE name = $1 RETURNING name", name) is None:
        raise NotFound(f"no sink {name!r}", {"sink": name})


async def _acquire_sink_lease(conn: asyncpg.Connection, name: str, owner: str, now: int,
                              ttl_ms: int) -> bool:
    return await conn.fetchval(
        "UPDATE sinks SET owner = $2, lease_until = $3 WHERE name = $1"
        " AND (owner IS NULL OR owner = $2 OR lease_until <= $4) RETURNING name",
        name, owner, now + ttl_ms, now) is not None


async def _release_sink_lease(conn: asyncpg.Connection, name: str, owner: str) -> None:
    await conn.execute(
        "UPDATE sinks SET owner = NULL, lease_until = 0 WHERE name = $1 AND owner = $2",
        name, owner)


async def _sink_delivered(conn: asyncpg.Connection, name: str, cursor: int, count: int,
                          now: int, owner: str | None = None) -> bool:
    return await conn.fetchval(
        "UPDATE sinks SET cursor = GREATEST(cursor, $3), delivered = delivered + $4,"
        " consecutive_failures = CASE WHEN $4 > 0 THEN 0 ELSE consecutive_failures END,"
        " last_delivered_at = CASE WHEN $4 > 0 THEN $5 ELSE last_delivered_at END"
        f" WHERE {_OWNED} RETURNING name", name, owner, cursor, count, now) is not None


async def _sink_failed(conn: asyncpg.Connection, name: str, error: str, now: int) -> None:
    await conn.execute(
        "UPDATE sinks SET failures = failures + 1,"
        " consecutive_failures = consecutive_failures + 1, last_error = $2,"
        " last_error_at = $3 WHERE name = $1", name, error, now)


async def _add_dead_letters(conn: asyncpg.Connection, name: str, items: Sequence[FeedItem],
                            error: str, attempts: int, now: int, owner: str | None) -> bool:
    moved = await conn.fetchval(
        "UPDATE sinks SET cursor = GREATEST(cursor, $3), dead_lettered = dead_lettered + $4,"
        f" consecutive_failures = 0 WHERE {_OWNED} RETURNING name",
        name, owner, items[-1].cursor, len(items))
    if moved is None:  # an unknown (deleted) sink, or another owner's, keeps no dead letters
        return False
    await conn.executemany(
        "INSERT INTO dead_letters (sink, cursor, key, item, error, attempts, created)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(name, i.cursor, i.key, item_text(i), error, attempts, now) for i in items])
    return True


async def _list_dead_letters(conn: asyncpg.Connection, name: str, after: int, limit: int,
                             retrying: bool | None) -> list[DeadLetter]:
    rows = await conn.fetch(
        f"SELECT {_LETTER} FROM dead_letters WHERE sink = $1 AND id > $2"
        " AND ($3::boolean IS NULL OR retry = $3) ORDER BY id LIMIT $4",
        name, after, retrying, limit)
    return [_letter(row) for row in rows]


async def _retry_dead_letters(conn: asyncpg.Connection, name: str, ids: list[int] | None
                              ) -> int:
    return int(await conn.fetchval(
        "WITH marked AS (UPDATE dead_letters SET retry = TRUE WHERE sink = $1"
        " AND ($2::bigint[] IS NULL OR id = ANY($2)) RETURNING 1)"
        " SELECT count(*) FROM marked", name, ids))


async def _finish_dead_letters(conn: asyncpg.Connection, name: str, ids: list[int], now: int,
                               error: str | None, attempts: int) -> None:
    if error is not None:
        await conn.execute(
            "UPDATE dead_letters SET retry = FALSE, error = $3, attempts = attempts + $4"
            " WHERE sink = $1 AND id = ANY($2::bigint[])", name, ids, error, attempts)
        return
    gone = await conn.fetchval(
        "WITH gone AS (DELETE FROM dead_letters WHERE sink = $1 AND id = ANY($2::bigint[])"
        " RETURNING 1) SELECT count(*) FROM gone", name, ids)
    await _sink_delivered(conn, name, 0, int(gone), now)
