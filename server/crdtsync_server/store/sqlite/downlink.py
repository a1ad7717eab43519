"""Downlink and proxied requests in SQLite (the
:class:`~crdtsync_server.store.roles.DownlinkStore` role): tables ``downlink`` and
``requests``, a device's ``down_seq`` and ``down_done``, and their part of a commit.

Downlink and proxied requests (the memory store keeps the same rules):

- ``queue_downlink`` takes the device's next ``down_seq``, so seqs are 1, 2, 3, ... per device.
- ``pending_downlink`` walks the items above the device's ``down_done`` that are ``queued`` or
  ``delivered``, in seq order: a queued one whose ``expires`` has passed becomes ``expired``
  and is skipped (it never blocks the items behind it); the others are returned, a queued
  command becoming ``delivered``. A message stays ``queued`` until the device acknowledges it.
- The device acknowledges cumulatively: ``SyncWrite.down_done`` is the highest seq it
  processed. Expired seqs below it were never sent and count as done. ``commit`` clamps it to
  ``down_seq`` (nothing above was ever sent), never moves it back, marks the queued messages
  it covers ``delivered``, and stores a result only for a command it covers that is still
  ``queued`` or ``delivered`` (a replayed result, or one for a message, is ignored). A failed
  result stores its ``error`` and no ``result``; a succeeded one the reverse.
- Requests: ``commit`` inserts each unknown ``(device, id)`` as ``pending`` (a replay is a
  no-op) and reports the new ids; ``claim_request`` moves pending -> running at most once;
  ``finish_request`` running -> done, and does nothing for a request that is not running;
  ``outcomes_acked`` moves done -> acked.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from typing import Any

from crdtsync._sqlite_worker import transaction

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
from .connection import SQLiteConnection, execute_many, in_transaction, loads
from .devices import require_device
from .wakes import insert_wakes

_DOWNLINK_COLUMNS = (
    "id, device, seq, kind, name, body, created, expires, status, result, error, updated"
)


_REQUEST_COLUMNS = "device, id, route, body, created, status, outcome, updated"


class SQLiteDownlink(SQLiteConnection):
    """The :class:`DownlinkStore` role."""

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item with the device's next seq (see ``Store.queue_downlink``).

        Raises ``ValueError`` for a kind not in ``DOWNLINK_KINDS``, ``TypeError`` for a body
        that is not JSON, :class:`NotFound` for an unknown device; nothing is written then."""
        check_kind(kind)
        return await self._run_waking(_queue_downlink, device, kind, name, json_text(body), now,
                                      expires)

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""
        return await self._run(_get_downlink, item_id)

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, at most ``limit`` (>= 0),
        optionally of one ``kind`` (``ValueError`` if unknown); empty for an unknown device."""
        if kind is not None:
            check_kind(kind)
        check_limit(limit)
        return await self._run(_list_downlink, device, kind, after, limit)

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Up to ``limit`` items to send, in seq order, as stored after this call (see the
        module docstring). :class:`NotFound` for an unknown device."""
        check_limit(limit)
        return await self._run(_pending_downlink, device, now, limit)

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """``pending`` -> ``running`` (runner: this instance) in one statement; ``None``
        unless this call moved it."""
        return await self._run(_claim_request, device, request_id, now, self.instance)

    async def heartbeat(self, now: int) -> None:
        """Record that this instance is alive at ``now`` (ms)."""
        await self._run(in_transaction, _heartbeat, self.instance, now)

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """``running`` -> ``done`` with ``outcome``; does nothing if the request is not
        running (unknown, never claimed, or already finished: the first outcome stays)."""
        await self._run_waking(_finish_request, device, request_id, json_text(dict(outcome)), now)

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""
        return await self._run(_select_request, device, request_id)

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device by ``updated`` then id, at most ``limit``."""
        check_limit(limit)
        return await self._run(_undelivered_outcomes, device, limit)

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int,
                                stale_ms: int = 0) -> int:
        """Finish the ``running`` requests whose runner is gone with ``outcome`` (see
        ``DownlinkStore.interrupt_running``), in one transaction; returns how many."""
        return await self._run_waking(_interrupt_running, json_text(dict(outcome)), now,
                                      now - stale_ms, self.instance)

    async def purge_finished(self, before: int) -> int:
        """Delete finished downlink items and acknowledged requests older than ``before``."""
        return await self._run(_purge_finished, before)


def _downlink_from_row(row: Sequence[Any]) -> Downlink:
    id_, device, seq, kind, name, body, created, expires, status, result, error, updated = row
    return Downlink(
        id=id_, device=device, seq=seq, kind=kind, name=name, body=json.loads(body),
        created=created, expires=expires, status=status, result=loads(result),
        error=loads(error), updated=updated,
    )


def _queue_downlink(
    conn: sqlite3.Connection, device_id: str, kind: str, name: str, body: str, now: int,
    expires: int | None,
) -> Downlink:
    with transaction(conn):
        device = require_device(conn, device_id)
        seq = device.down_seq + 1
        conn.execute("UPDATE devices SET down_seq = ? WHERE id = ?", (seq, device.id))
        cur = conn.execute(
            "INSERT INTO downlink (device, seq, kind, name, body, created, expires, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device.id, seq, kind, name, body, now, expires, now),
        )
        assert cur.lastrowid is not None
        insert_wakes(conn, [wake_device(device.id)], now)
    return Downlink(cur.lastrowid, device.id, seq, kind, name, json.loads(body), now, expires,
                    updated=now)


def _get_downlink(conn: sqlite3.Connection, item_id: int) -> Downlink | None:
    row = conn.execute(
        f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE id = ?", (item_id,)
    ).fetchone()
    return None if row is None else _downlink_from_row(row)


def _list_downlink(
    conn: sqlite3.Connection, device: str, kind: str | None, after: int, limit: int
) -> list[Downlink]:
    rows = conn.execute(
        f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE device = ? AND seq > ?"
        " AND (? IS NULL OR kind = ?) ORDER BY seq LIMIT ?",
        (device, after, kind, kind, limit),
    )
    return [_downlink_from_row(row) for row in rows]


def _pending_downlink(
    conn: sqlite3.Connection, device_id: str, now: int, limit: int
) -> list[Downlink]:
    with transaction(conn):
        device = require_device(conn, device_id)
        expired: list[int] = []
        picked: list[Downlink] = []
        with closing(conn.execute(
            f"SELECT {_DOWNLINK_COLUMNS} FROM downlink WHERE device = ? AND seq > ?"
            " AND status IN ('queued', 'delivered') ORDER BY seq",
            (device.id, device.down_done),
        )) as rows:
            for row in rows:
                if len(picked) >= limit:
                    break
                item = _downlink_from_row(row)
                if _is_expired(item, now):
                    expired.append(item.id)
                else:
                    picked.append(item)
        conn.executemany("UPDATE downlink SET status = 'expired', updated = ? WHERE id = ?",
                         [(now, i) for i in expired])
        sent = [_send(item, now) for item in picked]
        conn.executemany("UPDATE downlink SET status = ?, updated = ? WHERE id = ?",
                         [(a.status, a.updated, a.id) for a, b in zip(sent, picked, strict=True)
                          if a is not b])
    return sent


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


def _select_request(conn: sqlite3.Connection, device: str, request_id: str
                    ) -> ProxyRequest | None:
    row = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = ? AND id = ?",
        (device, request_id),
    ).fetchone()
    return None if row is None else _request_from_row(row)


def _claim_request(conn: sqlite3.Connection, device: str, request_id: str, now: int,
                   runner: str) -> ProxyRequest | None:
    with transaction(conn):
        cur = conn.execute(
            "UPDATE requests SET status = 'running', updated = ?, runner = ?"
            " WHERE device = ? AND id = ? AND status = 'pending'",
            (now, runner, device, request_id),
        )
        return _select_request(conn, device, request_id) if cur.rowcount == 1 else None


def _finish_request(conn: sqlite3.Connection, device: str, request_id: str, outcome: str,
                    now: int) -> None:
    with transaction(conn):
        done = conn.execute(
            "UPDATE requests SET status = 'done', outcome = ?, updated = ?"
            " WHERE device = ? AND id = ? AND status = 'running'",
            (outcome, now, device, request_id),
        ).rowcount
        if done:
            insert_wakes(conn, [wake_device(device)], now)


def _undelivered_outcomes(conn: sqlite3.Connection, device: str, limit: int
                          ) -> list[ProxyRequest]:
    rows = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = ? AND status = 'done'"
        " ORDER BY updated, id LIMIT ?",
        (device, limit),
    )
    return [_request_from_row(row) for row in rows]


_ORPHANED = (
    "status = 'running' AND (runner IS NULL OR runner <> :me) AND NOT EXISTS"
    " (SELECT 1 FROM instances i WHERE i.id = requests.runner AND i.seen >= :alive)"
)
"""Running requests whose runner is gone: not this instance, no heartbeat since ``alive``."""


def _heartbeat(conn: sqlite3.Connection, instance: str, now: int) -> None:
    conn.execute("INSERT INTO instances (id, started, seen) VALUES (?, ?, ?) ON CONFLICT (id)"
                 " DO UPDATE SET seen = MAX(seen, excluded.seen)", (instance, now, now))


def leave(conn: sqlite3.Connection, instance: str) -> None:
    """Forget ``instance`` (it closed): its running requests count as a gone runner's."""
    conn.execute("DELETE FROM instances WHERE id = ?", (instance,))


def _interrupt_running(conn: sqlite3.Connection, outcome: str, now: int, alive: int,
                       me: str) -> int:
    with transaction(conn):
        marks = {"me": me, "alive": alive}
        devices = [row[0] for row in conn.execute(
            f"SELECT DISTINCT device FROM requests WHERE {_ORPHANED} ORDER BY device", marks)]
        cur = conn.execute(
            f"UPDATE requests SET status = 'done', outcome = :outcome, updated = :now"
            f" WHERE {_ORPHANED}", {**marks, "outcome": outcome, "now": now})
        insert_wakes(conn, [wake_device(device) for device in devices], now)
    return cur.rowcount


def _purge_finished(conn: sqlite3.Connection, before: int) -> int:
    marks = ", ".join("?" * len(FINISHED_DOWNLINK))
    with transaction(conn):
        items = conn.execute(f"DELETE FROM downlink WHERE status IN ({marks}) AND updated < ?",
                             (*FINISHED_DOWNLINK, before)).rowcount
        requests = conn.execute("DELETE FROM requests WHERE status = 'acked' AND updated < ?",
                                (before,)).rowcount
    return int(items) + int(requests)


# --- the downlink part of a commit


def ack_downlink(conn: sqlite3.Connection, device: DeviceRecord, write: SyncWrite) -> int:
    """Advance the device's ``down_done`` (never back, never past ``down_seq``), mark the
    messages it covers ``delivered`` and store the results of unfinished commands it covers.
    Returns the new ``down_done``."""
    done = max(device.down_done, min(write.down_done, device.down_seq))
    if done > device.down_done:
        conn.execute(
            "UPDATE downlink SET status = 'delivered', updated = ?"
            " WHERE device = ? AND status = 'queued' AND kind = 'message' AND seq <= ?",
            (write.time, device.id, done),
        )
    execute_many(conn, 
        "UPDATE downlink SET status = ?, result = ?, error = ?, updated = ?"
        " WHERE device = ? AND seq = ? AND kind = 'command'"
        " AND status IN ('queued', 'delivered')",
        [(*result_columns(r), write.time, device.id, r.seq)
         for r in write.results if r.seq <= done],
    )
    return done


def insert_requests(conn: sqlite3.Connection, device: str, write: SyncWrite) -> tuple[str, ...]:
    """Insert the write's requests as ``pending``; returns the ids that were not known."""
    new: list[str] = []
    for r in write.requests:
        cur = conn.execute(
            "INSERT INTO requests (device, id, route, body, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, id) DO NOTHING",
            (device, r.id, r.route, json_text(r.body), r.created, write.time),
        )
        if cur.rowcount == 1:
            new.append(r.id)
    return tuple(new)


def ack_outcomes(conn: sqlite3.Connection, device: str, write: SyncWrite) -> None:
    execute_many(conn, 
        "UPDATE requests SET status = 'acked', updated = ?"
        " WHERE device = ? AND id = ? AND status = 'done'",
        [(write.time, device, request_id) for request_id in write.outcomes_acked],
    )
