"""The default :class:`~crdtsync_server.store.base.Store`: one SQLite file, stdlib ``sqlite3``.

Threading: the connection lives in one dedicated worker thread. Each public coroutine runs
one whole synchronous function in that thread, and every function that writes is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any exception), so the
statements of two transactions never interleave and the event loop never blocks on disk.
If the awaiting coroutine is cancelled, the function still runs to its end in the thread:
a commit either lands whole or not at all, but only a returned :meth:`SQLiteStore.commit`
counts as acknowledged.

Durability: WAL journal, ``PRAGMA synchronous=FULL`` by default (a returned commit survives
power loss), ``busy_timeout`` 5 s so another process (a backup, an admin shell) can hold the
lock briefly.

Schema: ``PRAGMA user_version`` is the number of :data:`MIGRATIONS` applied. Opening applies
the missing ones, each in its own transaction. A database from a newer crdtsync raises
:class:`StoreError` and is left exactly as it was; it is never moved aside.

Errors: ``sqlite3`` exceptions become :class:`StoreError` (``raise ... from``); the
crdtsync errors of the contract (``NotFound``, ``AlreadyExists``, ``SeqGap``,
``SeqConflict``) pass through unchanged.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from crdtsync.errors import AlreadyExists, NotFound
from crdtsync.sqlite_worker import SQLiteWorker, pragmas, transaction

from .base import (
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    EventPlan,
    StoredEvent,
    SyncWrite,
    event_digest,
    event_json,
    plan_events,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # v1
    """
    CREATE TABLE docs (
        key TEXT PRIMARY KEY,
        gen INTEGER NOT NULL DEFAULT 0,
        snapshot BLOB NOT NULL DEFAULT x'',
        snapshot_id INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE updates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        gen INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX updates_key_id ON updates (key, id);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_sync INTEGER,
        last_seq INTEGER NOT NULL DEFAULT 0,
        events_lost INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        time INTEGER NOT NULL,
        received INTEGER NOT NULL,
        body TEXT NOT NULL,
        digest BLOB NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX events_device_cursor ON events (device, cursor);
    CREATE INDEX events_topic_cursor ON events (topic, cursor);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
)
"""Schema migrations in order; ``MIGRATIONS[n]`` takes a database from v``n`` to v``n+1``.
Append only: a released script is never edited."""

SCHEMA_VERSION = len(MIGRATIONS)


_DEVICE_COLUMNS = "id, token_hash, created, last_sync, last_seq, events_lost, meta"
_EVENT_COLUMNS = "cursor, device, seq, topic, time, received, body"


class SQLiteStore:
    """A :class:`Store` in the SQLite file ``path``.

    Use ``async with SQLiteStore(path) as store:`` or :meth:`open` / :meth:`aclose`.
    ``synchronous`` is the ``PRAGMA synchronous`` level (``OFF``, ``NORMAL``, ``FULL``,
    ``EXTRA``); ``FULL`` makes every returned commit survive power loss. Any method called
    before :meth:`open` or after :meth:`aclose` raises :class:`ClosedError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self._db = SQLiteWorker(path, migrations=MIGRATIONS, synchronous=synchronous,
                                name="crdtsync-store")

    def __repr__(self) -> str:
        return f"<SQLiteStore {self._db.path!r} {self._db.state}>"

    @property
    def path(self) -> str:
        """The database file."""
        return self._db.path

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # lifecycle

    async def open(self) -> None:
        """Connect, set the pragmas and migrate the schema; a no-op if already open.

        Raises :class:`StoreError` if the file is not a database, cannot be opened, or holds
        a newer schema (the file is then left untouched), and :class:`ClosedError` after
        :meth:`aclose`. After a failed open the store may be opened again."""
        await self._db.open()

    async def aclose(self) -> None:
        """Wait for queued calls, close the connection and stop the thread; idempotent."""
        await self._db.aclose()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread."""
        return await self._db.run(fn, *args)

    async def pragmas(self) -> dict[str, Any]:
        """The connection's ``journal_mode``, ``synchronous``, ``busy_timeout``,
        ``foreign_keys`` and ``user_version``, for diagnostics and tests."""
        return await self._run(pragmas)

    # documents

    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""
        return await self._run(_load_doc, key)

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...]:
        """Updates of ``key`` with id > ``after_id`` in id order."""
        return await self._run(_select_updates, key, after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows,
        in one transaction. A no-op unless ``upto_id`` is above the current ``snapshot_id``."""
        await self._run(_compact, key, upto_id, snapshot)

    # the sync transaction

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates and store new events in one transaction (see ``Store.commit``).

        Raises :class:`NotFound` for an unknown device and :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, in every case with nothing written;
        ``ValueError`` for events without a device."""
        if write.device is None and write.events:
            raise ValueError("a write without a device cannot carry events")
        return await self._run(_commit, write)

    # devices

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken."""
        await self._run(_add_device, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        return await self._run(_select_device, device_id)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        _check_limit(limit)
        return await self._run(_list_devices, after, limit)

    # events

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        _check_limit(limit)
        return await self._run(_read_events, after, limit, device, topic)

    # settings

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        return await self._run(_get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        await self._run(_set_setting, key, value)


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


# --- documents (worker thread) -----------------------------------------------------------


def _load_doc(conn: sqlite3.Connection, key: str) -> DocLog:
    with transaction(conn, "DEFERRED"):  # one read snapshot for both queries
        row = conn.execute(
            "SELECT gen, snapshot, snapshot_id FROM docs WHERE key = ?", (key,)
        ).fetchone()
        gen, snapshot, snapshot_id = row if row is not None else (0, b"", 0)
        updates = _select_updates(conn, key, snapshot_id)
    return DocLog(gen, bytes(snapshot), snapshot_id, updates)


def _select_updates(
    conn: sqlite3.Connection, key: str, after_id: int
) -> tuple[tuple[int, bytes], ...]:
    rows = conn.execute(
        "SELECT id, data FROM updates WHERE key = ? AND id > ? ORDER BY id", (key, after_id)
    )
    return tuple((int(i), bytes(data)) for i, data in rows)


def _insert_updates(conn: sqlite3.Connection, docs: Sequence[DocWrite]) -> tuple[int, ...]:
    ids: list[int] = []
    for w in docs:
        conn.execute(
            "INSERT INTO docs (key, gen) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (w.key, w.gen),
        )
        cur = conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES (?, ?, ?)", (w.key, w.gen, w.update)
        )
        assert cur.lastrowid is not None
        ids.append(cur.lastrowid)
    return tuple(ids)


def _compact(conn: sqlite3.Connection, key: str, upto_id: int, snapshot: bytes) -> None:
    if upto_id <= 0:
        return  # covers nothing; matches "upto_id must exceed snapshot_id (0 if absent)"
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO docs (key, snapshot, snapshot_id) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE"
            " SET snapshot = excluded.snapshot, snapshot_id = excluded.snapshot_id"
            " WHERE excluded.snapshot_id > docs.snapshot_id",
            (key, snapshot, upto_id),
        )
        if cur.rowcount > 0:
            conn.execute("DELETE FROM updates WHERE key = ? AND id <= ?", (key, upto_id))


# --- the sync transaction (worker thread) ------------------------------------------------


def _commit(conn: sqlite3.Connection, write: SyncWrite) -> CommitResult:
    with transaction(conn):
        update_ids = _insert_updates(conn, write.docs)
        if write.device is None:
            return CommitResult(update_ids=update_ids)
        device = _select_device(conn, write.device)
        if device is None:
            raise NotFound(f"device {write.device!r} does not exist", {"device": write.device})
        plan = plan_events(
            device.id, device.last_seq, write.purged, write.events,
            _stored_digests(conn, device, write),
        )
        _insert_events(conn, device.id, write.time, plan)
        last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
        conn.execute(
            "UPDATE devices SET last_seq = ?, events_lost = events_lost + ?, last_sync = ?"
            " WHERE id = ?",
            (last_seq, plan.lost, write.time, device.id),
        )
    return CommitResult(update_ids, last_seq, len(plan.new))


def _stored_digests(
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


def _insert_events(
    conn: sqlite3.Connection, device: str, received: int, plan: EventPlan
) -> None:
    conn.executemany(
        "INSERT INTO events (device, seq, topic, time, received, body, digest)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (device, e.seq, e.topic, e.time, received, event_json(e), event_digest(e))
            for e in plan.new
        ],
    )


# --- devices (worker thread) -------------------------------------------------------------


def _device_from_row(row: Sequence[Any]) -> DeviceRecord:
    id_, token_hash, created, last_sync, last_seq, events_lost, meta = row
    return DeviceRecord(
        id=id_, token_hash=token_hash, created=created, last_sync=last_sync,
        last_seq=last_seq, events_lost=events_lost, meta=json.loads(meta),
    )


def _add_device(conn: sqlite3.Connection, device: DeviceRecord) -> None:
    cur = conn.execute(
        f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO NOTHING",
        (
            device.id, device.token_hash, device.created, device.last_sync, device.last_seq,
            device.events_lost, json.dumps(dict(device.meta), separators=(",", ":")),
        ),
    )
    if cur.rowcount == 0:
        raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})


def _select_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)
    ).fetchone()
    return None if row is None else _device_from_row(row)


def _list_devices(conn: sqlite3.Connection, after: str, limit: int) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )
    return [_device_from_row(row) for row in rows]


# --- events (worker thread) --------------------------------------------------------------


def _read_events(
    conn: sqlite3.Connection, after: int, limit: int, device: str | None, topic: str | None
) -> list[StoredEvent]:
    where: list[str] = ["cursor > ?"]
    params: list[Any] = [after]
    for column, value in (("device", device), ("topic", topic)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
        " ORDER BY cursor LIMIT ?",
        (*params, limit),
    )
    return [
        StoredEvent(cursor, dev, seq, top, time, received, json.loads(body))
        for cursor, dev, seq, top, time, received, body in rows
    ]


# --- settings (worker thread) ------------------------------------------------------------


def _get_setting(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
