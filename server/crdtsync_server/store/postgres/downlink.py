"""Downlink and proxied requests in PostgreSQL (the
:class:`~crdtsync_server.store.roles.DownlinkStore` role): tables ``downlink``,
``requests`` and ``instances``, a device's ``down_seq`` and ``down_done``, and their part of
a commit.

The rules of the downlink and of proxied requests are the SQLite backend's
(``sqlite/downlink.py``); what several instances on one database add:

- ``queue_downlink`` bumps ``down_seq`` with one ``UPDATE ... RETURNING`` (the device's row
  stays locked until commit, so two instances never hand out one seq twice).
- ``pending_downlink`` locks the device's row and then the items it walks (``FOR UPDATE``):
  two instances serving one device at once run one after the other, as they do with the
  device's commits (which lock the same row first).
- ``claim_request`` is one ``UPDATE ... WHERE status = 'pending'``: a second claimer waits
  for the first one's row lock, then finds the request running (at most once). It records
  this instance as the request's ``runner``.
- Instances: each one refreshes ``seen`` in its row of ``instances``
  (:meth:`~PostgresDownlink.heartbeat`) and deletes the row when it closes
  (:meth:`~PostgresDownlink.leave`).
  ``interrupt_running`` finishes the running requests of runners that are gone (no row, or
  a row not seen for ``stale_ms``), never this instance's, and skips the rows another
  recovering instance holds (``FOR UPDATE SKIP LOCKED``): each request is finished once.

Every transaction that appends wake entries takes the sequence lock first
(``connection.sequenced``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from ..feed import json_text
from ..records import (
    FINISHED_DOWNLINK,
    DeviceRecord,
    Downlink,
    ProxyRequest,
    SyncWrite,
    wake_device,
)
from ..rules import check_kind, check_limit, result_columns
from .connection import PostgresConnection, loads, sequenced
from .devices import require_device
from .wakes import insert_wakes

_DOWNLINK_COLUMNS = (
    "id, device, seq, kind, name, body, created, expires, status, result, error, updated"
)


_REQUEST_COLUMNS = "device, id, route, body, created, status, outcome, updated"


class PostgresDownlink(PostgresConnection):
    """The :class:`DownlinkStore` role. ``instance`` (set by the store) names this server
    instance: the runner of the requests it claims."""

    instance: str

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item with the device's next seq and a wake entry for the device, in
        one transaction (see ``Store.queue_downlink``).

        Raises ``ValueError`` for a kind not in ``DOWNLINK_KINDS``, ``TypeError`` for a body
        that is not JSON, :class:`NotFound` for an unknown device; nothing is written then."""
        check_kind(kind)
        return await self._write(_queue_downlink, device, kind, name, json_text(body), now,
                                 expires)

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""
        return await self._read(_get_downlink, item_id)

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, at most ``limit`` (>= 0),
        optionally of one ``kind`` (``ValueError`` if unknown); empty for an unknown device."""
        if kind is not None:
            check_kind(kind)
        check_limit(limit)
        return await self._read(_list_downlink, device, kind, after, limit)

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Up to ``limit`` items to send, in seq order, as stored after this call (see the
        module docstring of ``sqlite/downlink.py``); the device's row and the items are
        locked meanwhile. :class:`NotFound` for an unknown device."""
        check_limit(limit)
        return await self._write(_pending_downlink, device, now, limit)

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """``pending`` -> ``running`` in one statement, with this instance as the runner;
        ``None`` unless this call moved it (at most once across instances)."""
        return await self._write(_claim_request, device, request_id, now, self.instance)

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """``running`` -> ``done`` with ``outcome`` and a wake entry for the device; does
        nothing if the request is not running (unknown, never claimed, or already finished:
        the first outcome stays)."""
        await self._write(_finish_request, device, request_id, json_text(dict(outcome)), now)

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""
        return await self._read(_select_request, device, request_id)

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device by ``updated`` then id, at most ``limit``."""
        check_limit(limit)
        return await self._read(_undelivered_outcomes, device, limit)

    async def heartbeat(self, now: int) -> None:
        """Record that this instance is alive at ``now`` (its row of ``instances``, created
        on the first call): its running requests are not interrupted by other instances
        while ``seen`` is recent."""
        await self._write(_heartbeat, self.instance, now)

    async def leave(self) -> None:
        """Delete this instance's row of ``instances``: from now on its running requests
        count as orphans for every other instance (called when the store closes)."""
        await self._write(_leave, self.instance)

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int,
                                stale_ms: int = 0) -> int:
        """Finish with ``outcome`` (status ``done``, one wake entry per device) every
        ``running`` request whose runner is gone: not this instance, and without a row of
        ``instances`` seen at or after ``now - stale_ms`` (a request without a runner is
        always an orphan). Requests another instance is finishing meanwhile are skipped, so
        each is finished once. Returns how many this call finished."""
        alive_since = now - stale_ms
        if not await self._read(_any_orphaned, self.instance, alive_since):
            return 0  # the common case, every heartbeat: no lock taken
        return await self._write(_interrupt_running, json_text(dict(outcome)), now,
                                 self.instance, alive_since)

    async def purge_finished(self, before: int) -> int:
        """Delete finished downlink items and acknowledged requests older than ``before``."""
        return await self._write(_purge_finished, before)


def _downlink_from_row(row: Sequence[Any]) -> Downlink:
    id_, device, seq, kind, name, body, created, expires, status, result, error, updated = row
    return Downlink(
        id=id_, device=device, seq=seq, kind=kind, name=name, body=json.loads(body),
        created=created, expires=expires, status=status, result=loads(result),
        error=loads(error), updated=updated,
    )


async def _queue_downlink(
    conn: asyncpg.Connection, device_id: str, kind: str, name: str, body: str, now: int,
    expires: int | None,
) -> Downlink:
    await sequenced(conn)  # first: the transaction appends a wake entry
    seq = await conn.fetchval(
        "UPDATE devices SET down_seq = down_seq + 1 WHERE id = $1 RETURNING down_seq",
        device_id)
    if seq is None:  # no such device: NotFound, worded as every role words it
        await require_device(conn, device_id)
    item_id = await conn.fetchval(
        "INSERT INTO downlink (device, seq, kind, name, body, created, expires, updated)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $6) RETURNING id",
        device_id, seq, kind, name, body, now, expires)
    await insert_wakes(conn, [wake_device(device_id)], now)
    return Downlink(int(item_id), device_id, int(seq), kind, name, json.loads(body), now,
                    expires, updated=now)


async def _get_downlink(conn: asyncpg.Connection, item_id: int) -> Downlink | None:
    row = await conn.fetchrow(f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE id = $1",
                              item_id)
    return None if row is None else _downlink_from_row(row)


async def _list_downlink(conn: asyncpg.Connection, device: str, kind: str | None, after: int,
                         limit: int) -> list[Downlink]:
    rows = await conn.fetch(
        f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE device = $1 AND seq > $2"
        " AND ($3::text IS NULL OR kind = $3) ORDER BY seq LIMIT $4",
        device, after, kind, limit)
    return [_downlink_from_row(row) for row in rows]


async def _pending_downlink(conn: asyncpg.Connection, device_id: str, now: int, limit: int
                            ) -> list[Downlink]:
    device = await require_device(conn, device_id, lock=True)
    expired: list[int] = []
    picked: list[Downlink] = []
    if limit > 0:
        async for row in conn.cursor(
                f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE device = $1 AND seq > $2"
                " AND status IN ('queued', 'delivered') ORDER BY seq FOR UPDATE",
                device.id, device.down_done, prefetch=limit + 1):
            item = _downlink_from_row(row)
            if _is_expired(item, now):
                expired.append(item.id)
            else:
                picked.append(item)
                if len(picked) >= limit:
                    break
    sent = [_send(item, now) for item in picked]
    await _set_status(conn, "expired", expired, now)
    await _set_status(conn, "delivered", [a.id for a, b in zip(sent, picked, strict=True)
                                          if a is not b], now)
    return sent


async def _set_status(conn: asyncpg.Connection, status: str, ids: list[int], now: int
                      ) -> None:
    if ids:
        await conn.execute("UPDATE downlink SET status = $1, updated = $2"
                           " WHERE id = ANY($3::bigint[])", status, now, ids)


def _is_expired(item: Downlink, now: int) -> bool:
    """Whether ``item`` is still queued (never sent) and its ``expires`` has passed."""
    return item.status == "queued" and item.expires is not None and item.expires <= now


def _send(item: Downlink, now: int) -> Downlink:
    """``item`` as it is once handed to the device: a queued command becomes ``delivered``;
    anything else (a message waits for the device's acknowledgement) is returned as is."""
    if item.kind == "command" and item.status == "queued":
        return dataclasses.replace(item, status="delivered", updated=now)
    return item


def _request_from_row(row: Sequence[Any]) -> ProxyRequest:
    device, id_, route, body, created, status, outcome, updated = row
    return ProxyRequest(
        device=device, id=id_, route=route, body=json.loads(body), created=created,
        status=status, outcome=loads(outcome), updated=updated,
    )


async def _select_request(conn: asyncpg.Connection, device: str, request_id: str
                          ) -> ProxyRequest | None:
    row = await conn.fetchrow(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = $1 AND id = $2",
        device, request_id)
    return None if row is None else _request_from_row(row)


async def _claim_request(conn: asyncpg.Connection, device: str, request_id: str, now: int,
                         runner: str) -> ProxyRequest | None:
    row = await conn.fetchrow(
        "UPDATE requests SET status = 'running', runner = $4, updated = $3"
        " WHERE device = $1 AND id = $2 AND status = 'pending'"
        f" RETURNING {_REQUEST_COLUMNS}", device, request_id, now, runner)
    return None if row is None else _request_from_row(row)


async def _finish_request(conn: asyncpg.Connection, device: str, request_id: str,
                          outcome: str, now: int) -> None:
    await sequenced(conn)  # first: the transaction may append a wake entry
    done = await conn.fetchval(
        "UPDATE requests SET status = 'done', outcome = $3, updated = $4"
        " WHERE device = $1 AND id = $2 AND status = 'running' RETURNING device",
        device, request_id, outcome, now)
    if done is not None:
        await insert_wakes(conn, [wake_device(device)], now)


async def _undelivered_outcomes(conn: asyncpg.Connection, device: str, limit: int
                                ) -> list[ProxyRequest]:
    rows = await conn.fetch(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = $1 AND status = 'done'"
        " ORDER BY updated, id LIMIT $2", device, limit)
    return [_request_from_row(row) for row in rows]


async def _heartbeat(conn: asyncpg.Connection, instance: str, now: int) -> None:
    await conn.execute(
        "INSERT INTO instances (id, started, seen) VALUES ($1, $2, $2)"
        " ON CONFLICT (id) DO UPDATE SET seen = GREATEST(instances.seen, excluded.seen)",
        instance, now)


async def _leave(conn: asyncpg.Connection, instance: str) -> None:
    await conn.execute("DELETE FROM instances WHERE id = $1", instance)


_ORPHANED = (
    "status = 'running' AND r.runner IS DISTINCT FROM $1 AND NOT EXISTS"
    " (SELECT 1 FROM instances i WHERE i.id = r.runner AND i.seen >= $2)"
)
"""Running requests whose runner is gone: not this instance (``$1``), no heartbeat since
``$2``."""


async def _any_orphaned(conn: asyncpg.Connection, instance: str, alive_since: int) -> bool:
    return bool(await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM requests r WHERE {_ORPHANED})", instance, alive_since))


async def _interrupt_running(conn: asyncpg.Connection, outcome: str, now: int,
                             instance: str, alive_since: int) -> int:
    await sequenced(conn)  # first: the transaction appends wake entries
    rows = await conn.fetch(
        f"WITH orphans AS (SELECT device, id FROM requests r WHERE {_ORPHANED}"
        " FOR UPDATE SKIP LOCKED)"
        " UPDATE requests r SET status = 'done', outcome = $3, updated = $4 FROM orphans"
        " WHERE r.device = orphans.device AND r.id = orphans.id RETURNING r.device",
        instance, alive_since, outcome, now)
    devices = sorted({row[0] for row in rows})
    await insert_wakes(conn, [wake_device(device) for device in devices], now)
    return len(rows)


async def _purge_finished(conn: asyncpg.Connection, before: int) -> int:
    return int(await conn.fetchval(
        "WITH items AS (DELETE FROM downlink WHERE status = ANY($1::text[]) AND updated < $2"
        " RETURNING 1), requests AS (DELETE FROM requests WHERE status = 'acked'"
        " AND updated < $2 RETURNING 1)"
        " SELECT (SELECT count(*) FROM items) + (SELECT count(*) FROM requests)",
        list(FINISHED_DOWNLINK), before))


# --- the downlink part of a commit


async def ack_downlink(conn: asyncpg.Connection, device: DeviceRecord, write: SyncWrite) -> int:
    """Advance the device's ``down_done`` (never back, never past ``down_seq``), mark the
    messages it covers ``delivered`` and store the results of unfinished commands it covers,
    in the caller's transaction (which holds the device's row). Returns the new
    ``down_done``."""
    done = max(device.down_done, min(write.down_done, device.down_seq))
    if done > device.down_done:
        await conn.execute(
            "UPDATE downlink SET status = 'delivered', updated = $1"
            " WHERE device = $2 AND status = 'queued' AND kind = 'message' AND seq <= $3",
            write.time, device.id, done)
    results = [(*result_columns(r), write.time, device.id, r.seq)
               for r in write.results if r.seq <= done]
    if results:
        await conn.executemany(
            "UPDATE downlink SET status = $1, result = $2, error = $3, updated = $4"
            " WHERE device = $5 AND seq = $6 AND kind = 'command'"
            " AND status IN ('queued', 'delivered')", results)
    return done


async def insert_requests(conn: asyncpg.Connection, device: str, write: SyncWrite
                          ) -> tuple[str, ...]:
    """Insert the write's requests as ``pending`` (a known ``(device, id)`` is left as it
    is), in the caller's transaction; returns the ids that were not known, in order."""
    new: list[str] = []
    for r in write.requests:
        inserted = await conn.fetchval(
            "INSERT INTO requests (device, id, route, body, created, updated)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device, id) DO NOTHING"
            " RETURNING id", device, r.id, r.route, json_text(r.body), r.created, write.time)
        if inserted is not None:
            new.append(r.id)
    return tuple(new)


async def ack_outcomes(conn: asyncpg.Connection, device: str, write: SyncWrite) -> None:
    """Move the ``done`` requests the device acknowledged to ``acked``, in the caller's
    transaction (ids that are not ``done`` are ignored)."""
    if write.outcomes_acked:
        await conn.execute(
            "UPDATE requests SET status = 'acked', updated = $1"
            " WHERE device = $2 AND id = ANY($3::text[]) AND status = 'done'",
            write.time, device, list(write.outcomes_acked))
