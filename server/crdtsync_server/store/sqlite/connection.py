"""The connection every part of :class:`~crdtsync_server.store.sqlite.SQLiteStore` runs on.

Threading: the connection lives in one dedicated worker thread. Each public coroutine runs
one whole synchronous function in that thread, and every function that writes is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any exception), so the
statements of two transactions never interleave and the event loop never blocks on disk.
If the awaiting coroutine is cancelled, the function still runs to its end in the thread:
a commit either lands whole or not at all, but only a returned :meth:`SQLiteStore.commit`
counts as acknowledged.
Some calls run on the event loop's thread instead. The group commit of syncs
(``SQLiteStore.commit``) runs there whenever the store's thread is idle
(``SQLiteWorker.write_here``): handing it over cost every sync's objects a trip to another
CPU and back, about a sixth of its CPU. It commits without SQLite's ``fsync`` and without an
automatic checkpoint; ``SQLiteWorker.durable`` then syncs the log in a thread of its own
before any sync of the group is answered, so the guarantee stays ``synchronous=FULL``'s.
When the thread is busy, or another process holds the write lock, the group runs in the
thread as every other call. A document's upkeep (a compaction, a rebuild) runs there the
same way (:meth:`SQLiteConnection._write_soon`), and so does a document's load, on the
read-only connection below (:meth:`SQLiteConnection._read_soon`), so that they do not keep
the thread busy and send the group commits there. And the device lookup of every sync
(``device_by_token``): a
read of a few cached index pages, run on the event loop's thread on a second, read-only
connection (``SQLiteWorker.read``), because the hop to the thread and back costs several
times the read.
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

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from crdtsync._sqlite_worker import SQLiteWorker, StoreBusy, pragmas, transaction

from ..records import DeviceRecord
from .schema import MIGRATIONS
from .writers import Writers

T = TypeVar("T")

WAL_LIMIT = 64 * 1024 * 1024
"""Bytes the ``-wal`` file is cut back to after a checkpoint. The log checkpoints every 1000
pages (4 MB) and, under load, is rewritten from its start many times a second; cutting it to
less than that after each checkpoint made every later commit grow the file again, an ext4
block allocation and a metadata journal write per ``fdatasync`` (12 % of a sync's commit CPU
on a 33 MB database, measured with bench-style commits). 64 MiB only bounds the file after a
burst (a large import) that outgrew the checkpoints."""


class SQLiteConnection:
    """The worker thread and its connection to the SQLite file ``path``, and what every
    role's coroutines share: :meth:`_run` and :attr:`external_writes`."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 instance: str | None = None) -> None:
        self.instance = instance or secrets.token_hex(8)
        """This server instance's id: the runner of the proxied requests it claims."""
        self._db = SQLiteWorker(path, migrations=MIGRATIONS, synchronous=synchronous,
                                name="crdtsync-store", wal_limit=WAL_LIMIT)
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
        self.known_devices = DeviceCache()
        """The devices as stored, by token hash, as far as this store saw them: what a sync's
        lookup answers while this store is alone on the file (``sqlite/devices.py``). Every
        call that inserts, updates or deletes a row of ``devices`` forgets all of it
        (:meth:`_run`); a commit puts back the device rows it wrote (``sqlite/store.py``),
        and a flush of ``last_sync`` times moves them in the records kept."""
        self._device_writes = 0
        """Rows of ``devices`` this store's connection inserted, updated or deleted, counted
        by temporary triggers (:func:`count_device_writes`): the other writes (a heartbeat, a
        sink's cursor, a wake, a purge) leave the kept records alone. When every write
        forgot them, the heartbeat alone (every 10 s) emptied them, and a device syncing
        every minute read its row at every sync."""
        self._confirming: asyncio.Future[None] | None = None
        """The look of :meth:`confirm_devices` under way, shared by the lookups meanwhile."""

    @property
    def path(self) -> str:
        """The database file."""
        return self._db.path

    async def _run(self, fn: Callable[..., T], *args: Any, forget_devices: bool = True) -> T:
        """Run ``fn(conn, *args)`` in the store's thread, noting first whether another
        connection committed since the previous call (``PRAGMA data_version``), and after it
        whether it changed any row of ``devices`` (then :attr:`known_devices` is forgotten;
        forgetting at the end, not the start, also drops a record read on the loop while the
        call ran). A sync's commit passes ``forget_devices=False``: it changes no device row
        but its own, which it puts back as written."""
        started = self.known_devices.clock()
        observed: tuple[int, bool, T] = await self._db.run(self._observing, fn, *args)
        return self._observed(observed, forget_devices, started)

    def _observing(self, conn: sqlite3.Connection, fn: Callable[..., T], *args: Any
                   ) -> tuple[int, bool, T]:
        """``PRAGMA data_version`` (changes when another connection commits), then ``fn``,
        and whether ``fn`` inserted, updated or deleted a row of ``devices`` (the count of
        :func:`count_device_writes` moved). In the connection's thread, or on the loop's
        under the thread's lock (``write_here``): calls of the connection never overlap."""
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        before = self._device_writes
        result = fn(conn, *args)
        return version, self._device_writes != before, result

    def _device_written(self) -> None:
        """Called by SQLite for each row of ``devices`` the connection changes."""
        self._device_writes += 1

    def _observed(self, observed: tuple[int, bool, T], forget_devices: bool,
                  started: float) -> T:
        """What :meth:`_run` notes of a call's :meth:`_observing` result, the call handed to
        the connection at ``started`` (:attr:`known_devices`' clock); returns the call's.
        Another connection's commit makes :attr:`known_devices` forget what it kept; none
        tells it that what it kept was as stored at ``started``."""
        version, wrote, result = observed
        if wrote and forget_devices:
            self.known_devices.clear()
        if version == self._data_version:
            self.known_devices.checked(started)
        else:
            if self._data_version is not None:  # the first reading is no news
                self.external_writes += 1
                self.known_devices.clear()
            self._data_version = version
        return result

    async def confirm_devices(self) -> None:
        """Look at the file once (``PRAGMA data_version``, in the store's thread) when the
        kept device records are :meth:`~DeviceCache.unconfirmed`: they are kept on when no
        other connection committed since the store's last look, else forgotten. A server
        that was idle for a while (its devices offline, then all back at once) so answers
        their lookups from memory, one look for all of them, instead of reading every row.
        Concurrent callers share the one look."""
        if not self.known_devices.unconfirmed():
            return
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._look())
        await asyncio.shield(self._confirming)

    async def _look(self) -> None:
        # A failed look confirms nothing: the records are then forgotten by ``get`` and the
        # lookup reads the row, which reports what is wrong with the store.
        with contextlib.suppress(Exception):
            await self._run(_no_write, forget_devices=False)

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

    async def _run_waking(self, fn: Callable[..., T], *args: Any,
                          forget_devices: bool = True) -> T:
        """:meth:`_run` for a call that may append wake entries: read the head of the wake
        log after its transaction and announce it to the listeners when it moved."""
        outcome: tuple[int, T] = await self._run(_then_wake_head, fn, *args,
                                                 forget_devices=forget_devices)
        return self._woken(outcome)

    async def _write_here(self, fn: Callable[..., T], *args: Any,
                          forget_devices: bool = True) -> T:
        """:meth:`_run` of a write transaction ``fn`` (beginning ``BEGIN IMMEDIATE``) in the
        event loop's thread when the store's thread is idle (``SQLiteWorker.write_here``),
        durable on return; :class:`~crdtsync._sqlite_worker.StoreBusy` (nothing written)
        when it cannot run there."""
        started = self.known_devices.clock()
        observed: tuple[int, bool, T] = self._db.write_here(self._observing, fn, *args)
        try:
            await self._db.durable()
        except BaseException:
            # Committed but not reported stored: the caller will not put back the device
            # rows it changed, so the records kept are stale (a retry planned from them
            # would store its events again and fail on the feed's unique key).
            self.known_devices.clear()
            raise
        finally:  # committed, durable or not: what it changed is noted all the same
            outcome = self._observed(observed, forget_devices, started)
        return outcome

    async def _write_here_waking(self, fn: Callable[..., T], *args: Any,
                                 forget_devices: bool = True) -> T:
        """:meth:`_write_here` of a call that may append wake entries (as
        :meth:`_run_waking`)."""
        outcome: tuple[int, T] = await self._write_here(_then_wake_head, fn, *args,
                                                        forget_devices=forget_devices)
        return self._woken(outcome)

    async def _write_soon(self, fn: Callable[..., T], *args: Any,
                          forget_devices: bool = True) -> T:
        """A small write transaction ``fn`` of a document's upkeep (a compaction, a rebuild)
        in the event loop's thread when the store's thread is idle (:meth:`_write_here`),
        else in the store's thread (:meth:`_run`). In the thread it would keep the thread
        busy, and the group commits that come meanwhile would go there too, where each
        write reads its device's row and its document's generation again (they are known
        only on the loop's thread, ``SQLiteStore._rows_if_alone``): with a rebuild every 36
        syncs of each device, that was a fifth of the group commits."""
        try:
            return await self._write_here(fn, *args, forget_devices=forget_devices)
        except StoreBusy:
            return await self._run(fn, *args, forget_devices=forget_devices)

    async def _read_soon(self, fn: Callable[..., T], *args: Any) -> T:
        """A read ``fn`` in the event loop's thread on the reading connection
        (``SQLiteWorker.read``) while this store is the file's only writer, so that no
        commit of another process is left to observe, else :meth:`_run` (for a cached
        document's load, which must not keep the store's thread busy either, as in
        :meth:`_write_soon`)."""
        if self.writers.alone():
            return await self._db.read(fn, *args)
        return await self._run(fn, *args)

    def _woken(self, outcome: tuple[int, T]) -> T:
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


DEVICE_CACHE_SECONDS = 5.0
"""Longest a device record is answered from memory without news of the file: a row changed
behind the server's back (an SQL shell on the file, which no store object registers) is
seen within this time of the store's last look at ``PRAGMA data_version`` (its next call);
a lookup after a longer quiet looks first (:meth:`SQLiteConnection.confirm_devices`)."""
DEVICE_CACHE_LIMIT = 600.0
"""Longest the kept records live in any case, in seconds: they are forgotten all at once
this long after the first was kept, so memory holds the devices of the last ten minutes at
most (the document cache keeps their documents as long, ``--cache-idle``)."""


class DeviceCache:
    """Device records by token hash (see :attr:`SQLiteConnection.known_devices`), and by id,
    all forgotten at once: :data:`DEVICE_CACHE_SECONDS` after the later of the first record
    kept and the store's last look at the file that found no other writer's commit
    (:meth:`checked`), and in any case :data:`DEVICE_CACHE_LIMIT` after the first.

    A device that syncs every minute on a busy server is answered from here at every sync;
    when only the first record's age counted, the records were all dropped every 5 s and
    such a device's every sync read its row (about 40 µs on the loop under load, and again
    in its commit's transaction)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._records: dict[str, DeviceRecord] = {}
        self._by_id: dict[str, DeviceRecord] = {}
        self._since = 0.0
        self._checked = -math.inf

    def get(self, token_hash: str) -> DeviceRecord | None:
        return self._fresh().get(token_hash)

    def by_id(self) -> dict[str, DeviceRecord]:
        """The records kept, by device id (the commit's rows when the store is alone)."""
        self._fresh()
        return self._by_id

    def _fresh(self) -> dict[str, DeviceRecord]:
        if self._records:
            now = self.clock()
            if (now - max(self._since, self._checked) > DEVICE_CACHE_SECONDS
                    or now - self._since > DEVICE_CACHE_LIMIT):
                self.clear()
        return self._records

    def unconfirmed(self) -> bool:
        """Records are kept, within :data:`DEVICE_CACHE_LIMIT` of the first, but the store's
        last look at the file is more than :data:`DEVICE_CACHE_SECONDS` old: one more look
        (:meth:`SQLiteConnection.confirm_devices`) keeps them, or forgets them if another
        connection committed meanwhile; without it, :meth:`get` forgets them."""
        if not self._records:
            return False
        now = self.clock()
        return (now - max(self._since, self._checked) > DEVICE_CACHE_SECONDS
                and now - self._since <= DEVICE_CACHE_LIMIT)

    def checked(self, at: float) -> None:
        """The store read ``PRAGMA data_version`` at or after ``at`` (this cache's clock) and
        found no commit of another connection since its previous reading, which either found
        none either or made it :meth:`clear` this cache: every record kept was as stored
        at ``at``."""
        self._checked = max(self._checked, at)

    def keep(self, device: DeviceRecord) -> None:
        if not self._records:
            self._since = self.clock()
        old = self._by_id.get(device.id)
        if old is not None and old.token_hash != device.token_hash:
            self._records.pop(old.token_hash, None)
        self._records[device.token_hash] = device
        self._by_id[device.id] = device

    def touched(self, last_sync: dict[str, int]) -> None:
        """``{device id: time}`` was stored as ``last_sync`` where it is later: the same
        in the records kept (as ``_touch_devices`` moves it, never backwards)."""
        for device_id, time_ms in last_sync.items():
            device = self._by_id.get(device_id)
            if device is not None and (device.last_sync or 0) < time_ms:
                self.keep(dataclasses.replace(device, last_sync=time_ms))

    def clear(self) -> None:
        self._records = {}
        self._by_id = {}


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


DEVICE_WRITES_FUNCTION = "crdtsync_device_written"


def count_device_writes(conn: sqlite3.Connection, callback: Callable[[], None]) -> None:
    """Make ``conn`` call ``callback()`` for each row of ``devices`` it inserts, updates or
    deletes: the SQL function :data:`DEVICE_WRITES_FUNCTION` and three ``TEMP`` triggers
    calling it, which live as long as the connection and see no other connection's writes.
    After the migrations (the table must exist)."""
    conn.create_function(DEVICE_WRITES_FUNCTION, 0, callback)
    for event in ("INSERT", "UPDATE", "DELETE"):
        conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS crdtsync_devices_{event.lower()}"
                     f" AFTER {event} ON main.devices"
                     f" BEGIN SELECT {DEVICE_WRITES_FUNCTION}(); END")


def _no_write(conn: sqlite3.Connection) -> None:
    """Nothing: run through :meth:`SQLiteConnection._observing` for its look at the
    file."""


def wake_head(conn: sqlite3.Connection) -> int:
    """The head of the wake log: the highest cursor ever given out (0: none)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'wakes'").fetchone()
    return 0 if row is None else int(row[0])


def _then_wake_head(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any
                    ) -> tuple[int, T]:
    result = fn(conn, *args)
    return wake_head(conn), result
