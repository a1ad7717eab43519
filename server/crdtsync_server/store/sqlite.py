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

import asyncio
import json
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from crdtsync.errors import AlreadyExists, ClosedError, NotFound, StoreError

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

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_MS = 5000

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
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        self._path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._state: Literal["new", "open", "closed"] = "new"
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {self._path!r} {self._state}>"

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Only warn: the connection belongs to the worker thread and the loop may be gone.
        if getattr(self, "_state", None) == "open":
            _warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)

    # lifecycle

    async def open(self) -> None:
        """Connect, set the pragmas and migrate the schema; a no-op if already open.

        Raises :class:`StoreError` if the file is not a database, cannot be opened, or holds
        a newer schema (the file is then left untouched), and :class:`ClosedError` after
        :meth:`aclose`. After a failed open the store may be opened again."""
        if self._state == "closed":
            raise ClosedError(f"{self!r} is closed")
        if self._state == "open":
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crdtsync-sqlite")
        try:
            self._conn = await _in_thread(executor, _connect, self._path, self._synchronous)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        self._state = "open"

    async def aclose(self) -> None:
        """Wait for queued calls, close the connection and stop the thread; idempotent."""
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closed"
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        assert executor is not None and conn is not None
        try:
            await _in_thread(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread."""
        if self._state != "open":
            raise ClosedError(f"{self!r} is not open")
        assert self._executor is not None
        return await _in_thread(self._executor, fn, self._conn, *args)

    async def pragmas(self) -> dict[str, Any]:
        """The connection's ``journal_mode``, ``synchronous``, ``busy_timeout``,
        ``foreign_keys`` and ``user_version``, for diagnostics and tests."""
        return await self._run(_pragmas)

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


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``executor``, turning ``sqlite3`` errors into :class:`StoreError`."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, fn, *args)
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")


# --- connection and schema (worker thread) -----------------------------------------------


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, every one is spelled out below.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        _refuse_newer(conn, path)  # before any pragma that could write to the file
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")  # validated in __init__
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _refuse_newer(conn: sqlite3.Connection, path: str) -> None:
    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema v{version} is newer than this crdtsync (v{SCHEMA_VERSION})",
            {"path": path, "version": version, "supported": SCHEMA_VERSION},
        )


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations, each in one transaction. The version is read again
    under the write lock, so two processes opening a fresh file do not both migrate."""
    for target, script in enumerate(MIGRATIONS, start=1):
        with _transaction(conn):
            if _user_version(conn) >= target:
                continue
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")


def _statements(script: str) -> Iterator[str]:
    """Split an SQL script into statements (``executescript`` would commit first)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()!r}")


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """``BEGIN <mode>`` ... ``COMMIT``; ``ROLLBACK`` and re-raise on any exception."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            conn.execute("ROLLBACK")
        raise


def _pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
    names = ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "user_version")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}


# --- documents (worker thread) -----------------------------------------------------------


def _load_doc(conn: sqlite3.Connection, key: str) -> DocLog:
    with _transaction(conn, "DEFERRED"):  # one read snapshot for both queries
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
    with _transaction(conn):
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
    with _transaction(conn):
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
