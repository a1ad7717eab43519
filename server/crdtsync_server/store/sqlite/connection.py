"""The connection every part of :class:`~crdtsync_server.store.sqlite.SQLiteStore` runs on.

Threading: the connection lives in one dedicated worker thread. Each public coroutine runs
one whole synchronous function in that thread, and every function that writes is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any exception), so the
statements of two transactions never interleave and the event loop never blocks on disk.
If the awaiting coroutine is cancelled, the function still runs to its end in the thread:
a commit either lands whole or not at all, but only a returned :meth:`SQLiteStore.commit`
counts as acknowledged.
The one exception is the device lookup of every sync (``device_by_token``): a read of a few
cached index pages, run on the event loop's thread on a second, read-only connection
(``SQLiteWorker.read``), because the hop to the thread and back costs several times the read.
It runs there only while no other store object writes the file (``sqlite/writers.py``):
otherwise it takes the thread and observes ``data_version`` like every other call, so a
sync's cached documents catch up with what other processes wrote.

Durability: WAL journal, ``PRAGMA synchronous=FULL`` by default (a returned commit survives
power loss), ``busy_timeout`` 5 s so another process (a backup, an admin shell) can hold the
lock briefly.

Each role's part (``sqlite/documents.py``, ``devices.py``, ``settings.py``, ``downlink.py``,
``feed.py``, ``sinks.py``) holds its worker-thread functions (``conn`` first) and a mixin
over :class:`SQLiteConnection` whose coroutines run them; ``sqlite/store.py`` puts them
together.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from crdtsync._sqlite_worker import SQLiteWorker, pragmas, transaction

from .schema import MIGRATIONS
from .writers import Writers

T = TypeVar("T")


class SQLiteConnection:
    """The worker thread and its connection to the SQLite file ``path``, and what every
    role's coroutines share: :meth:`_run` and :attr:`external_writes`."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 instance: str | None = None) -> None:
        self.instance = instance or secrets.token_hex(8)
        """This server instance's id: the runner of the proxied requests it claims."""
        self._db = SQLiteWorker(path, migrations=MIGRATIONS, synchronous=synchronous,
                                name="crdtsync-store")
        self.external_writes = 0
        """Moves whenever this store notices a commit by another connection (another server
        process, an admin shell): the document cache skips its catch-up read while it stands
        still. Observed before each call's own statements, so a reader that records it before
        a read never misses a later commit."""
        self._data_version: int | None = None
        self.writers = Writers(os.fspath(path))
        """This store among the writers of the file: while it is alone, a sync's device
        lookup reads on the event loop and needs no observation (``sqlite/writers.py``)."""
        self._wake_listeners: list[Callable[[int], None]] = []
        self._wake_announced = 0

    @property
    def path(self) -> str:
        """The database file."""
        return self._db.path

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread, noting first whether another
        connection committed since the previous call (``PRAGMA data_version``)."""
        observed: tuple[int, T] = await self._db.run(observing, fn, *args)
        version, result = observed
        if version != self._data_version:
            if self._data_version is not None:  # the first reading is no news
                self.external_writes += 1
            self._data_version = version
        return result

    def on_wakes(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(head)`` after each call of this store that moved the head of the
        wake log (``sqlite/wakes.py``)."""
        self._wake_listeners.append(callback)

    hears_others = False
    """Only this object's own commits are announced (``on_wakes``); other processes'
    are found by reading."""

    def on_feed(self, callback: Callable[[], None]) -> None:
        """Never called: this store does not hear other processes (``hears_others``)."""

    def on_results(self, callback: Callable[[str | None], None]) -> None:
        """Never called: this store does not hear other processes (``hears_others``)."""

    async def _run_waking(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`_run` for a call that may append wake entries: read the head of the wake
        log after its transaction and announce it to the listeners when it moved."""
        outcome: tuple[int, T] = await self._run(_then_wake_head, fn, *args)
        head, result = outcome
        if head > self._wake_announced:
            self._wake_announced = head
            for listener in self._wake_listeners:
                listener(head)
        return result

    async def pragmas(self) -> dict[str, Any]:
        """The connection's ``journal_mode``, ``synchronous``, ``busy_timeout``,
        ``foreign_keys`` and ``user_version``, for diagnostics and tests."""
        return await self._run(pragmas)


def loads(text: str | None) -> Any:
    """A nullable JSON column as data (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


def execute_many(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``conn.executemany(sql, rows)``, skipped when there are no rows: most parts of a
    sync's commit are empty, and an empty ``executemany`` still costs a statement lookup."""
    if rows:
        conn.executemany(sql, rows)


ROWS_PER_INSERT = 16
"""Rows of one multi-row ``INSERT`` (:func:`insert_values`): a sync's 10 events and 5 keys
fit in one statement, and each table's statements come in at most 16 texts, few enough for
the connection's statement cache (``cached_statements`` in ``crdtsync._sqlite_worker``)."""


def insert_values(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]],
                  tail: str = "") -> None:
    """``head VALUES (?, ...), (?, ...) tail`` for ``rows`` (all of one width), in order, at
    most ``ROWS_PER_INSERT`` rows per statement; nothing when there are no rows.

    The same rows as ``executemany`` with one ``VALUES`` row, inserted (or upserted) one after
    the other in the given order, for less work: SQLite runs a statement's set-up (binding,
    ``AUTOINCREMENT``'s read and write of ``sqlite_sequence``) once per statement, not per
    row."""
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start:start + ROWS_PER_INSERT]
        conn.execute(_values_sql(head, tail, len(chunk[0]), len(chunk)),
                     list(itertools.chain.from_iterable(chunk)))


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, tail: str, width: int, count: int) -> str:
    row = f"({', '.join('?' * width)})"
    return f"{head} VALUES {', '.join([row] * count)}{tail}"


def in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(conn, *args)`` as one transaction."""
    with transaction(conn):
        return fn(conn, *args)


def observing(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> tuple[int, T]:
    """``PRAGMA data_version`` (changes when another connection commits), then ``fn``."""
    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
    return version, fn(conn, *args)


def wake_head(conn: sqlite3.Connection) -> int:
    """The head of the wake log: the highest cursor ever given out (0: none)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'wakes'").fetchone()
    return 0 if row is None else int(row[0])


def _then_wake_head(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any
                    ) -> tuple[int, T]:
    result = fn(conn, *args)
    return wake_head(conn), result
