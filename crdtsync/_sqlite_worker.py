"""``SQLiteWorker``: one SQLite connection owned by one thread, running whole transactions.

Both the device store and the server's SQLite store use it. Every call hands a plain
function ``fn(conn, *args)`` to the connection's own thread, so a transaction is one call:
its statements never interleave with another's, and the event loop never holds a write
lock across an ``await``. That matters on the device, where a state assignment must be
durable before it returns: :meth:`SQLiteWorker.run_blocking` waits for the thread from the
event loop, which cannot deadlock because the thread never waits for the loop (an aiosqlite
transaction spread over several awaits would: the loop, blocked waiting for the write lock,
could never send that transaction's COMMIT).

Schema: ``PRAGMA user_version`` counts the migrations applied; opening applies the missing
ones, each in its own transaction, and refuses a database from a newer version without
touching it (never moving it aside).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import _accel as accel
from .errors import ClosedError, StoreError

if TYPE_CHECKING:
    from ._logsync import LogSyncer

T = TypeVar("T")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_MS = 5000
CHECKPOINT_SECONDS = 0.5
"""Longest time between two checkpoints of the log while transactions commit in the caller's
thread (:meth:`SQLiteWorker.write_here` turns the connection's automatic checkpoint off)."""


def _as_is(value: T) -> T:
    return value


def bind_blobs_and_nulls_as_is() -> None:
    """Register ``sqlite3`` adapters that hand ``bytes`` and ``None`` parameters to SQLite
    as they are (which it binds natively), unless the process registered its own.

    CPython's ``sqlite3`` (3.11 and before 3.14) skips adaptation only for exact ``int``,
    ``float``, ``str`` and ``bytearray``; every ``bytes`` or ``None`` parameter without an
    adapter goes through the PEP 246 protocol, whose first step raises and formats an
    ``AttributeError`` (``PrepareProtocol.__adapt__``) to be thrown away: about 2,000
    instructions per parameter, 46 per sync of the server (an event's body and its feed
    row's empty columns), 5 % of a sync's instructions. With an adapter registered, the
    parameter is one dictionary hit and one call instead. What is stored is unchanged:
    the adapter returns the very object."""
    for kind in (bytes, type(None)):
        if (kind, sqlite3.PrepareProtocol) not in sqlite3.adapters:
            sqlite3.register_adapter(kind, _as_is)


bind_blobs_and_nulls_as_is()


class StoreBusy(StoreError):
    """:meth:`SQLiteWorker.write_here` cannot run the transaction in the caller's thread now:
    the connection's thread has calls of its own, or another connection holds the write
    lock. Nothing was written; run it with :meth:`SQLiteWorker.run` instead (the caller
    always does: it never reaches a client)."""


class SQLiteWorker:
    """The connection to ``path``, its thread, and its schema ``migrations``.

    ``synchronous`` is SQLite's ``PRAGMA synchronous``: ``FULL`` (default) makes each
    returned commit survive a power cut; ``NORMAL`` may lose the last commits, never
    consistency; ``OFF`` is for tests only. Calls before :meth:`open` or after
    :meth:`aclose` raise :class:`ClosedError`; ``sqlite3`` errors become :class:`StoreError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, migrations: Sequence[str],
                 synchronous: str = "FULL", name: str = "crdtsync-sqlite",
                 wal_pages: int = 1000, wal_limit: int | None = None) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, "
                             f"not {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self.migrations = tuple(migrations)
        self.wal_pages = wal_pages
        self.wal_limit = WAL_SIZE_LIMIT if wal_limit is None else wal_limit
        """``PRAGMA journal_size_limit``: bytes the log is cut back to after a checkpoint."""
        """``PRAGMA wal_autocheckpoint``: pages the write-ahead log may hold before a commit
        checkpoints it (SQLite's default 1000 pages, 4 MB; a device store takes fewer)."""
        self._name = name
        self.state: Literal["new", "open", "closed"] = "new"
        self._thread: _Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        """The connection of :meth:`read`, opened on first use in the event loop's thread."""
        self._log: _LogSync | None = None
        """Makes the commits of :meth:`write_here` durable (:meth:`durable`)."""
        self._here: _HereMode | None = None
        """The connection's pragmas as :meth:`write_here` left them, with what they were
        before (restored before the next call in the thread); ``None`` when they are as
        configured. Read and written only under the thread's lock."""

    def __repr__(self) -> str:
        return f"<SQLiteWorker {self.path!r} {self.state}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Only warn: the connection belongs to the worker thread and the loop may be gone.
        if getattr(self, "state", None) == "open":
            _warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)

    async def open(self) -> None:
        """Connect, set the pragmas and migrate; a no-op if already open.

        Raises :class:`StoreError` if the file is not a database or holds a newer schema
        (left untouched). After a failed open, ``open`` may be called again."""
        if self.state == "closed":
            raise ClosedError(f"{self!r} is closed")
        if self.state == "open":
            return
        thread = _Thread(self._name)
        try:
            self._conn = await thread.call(connect, self.path, self.synchronous,
                                           self.migrations, self.wal_pages, self.wal_limit)
        except BaseException:
            thread.stop()
            raise
        self._thread = thread
        self.state = "open"

    async def aclose(self) -> None:
        """Wait for queued calls, close the connection and stop the thread; idempotent."""
        if self.state != "open":
            self.state = "closed"
            return
        self.state = "closed"
        thread, conn = self._thread, self._conn
        self._thread = self._conn = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        assert thread is not None and conn is not None
        try:
            if self._log is not None:  # before the connection: its close checkpoints last
                log, self._log = self._log, None
                await log.aclose()
            await thread.call(self._as_configured, _close, conn)
        finally:
            thread.stop()

    def _ready(self) -> tuple[_Thread, sqlite3.Connection]:
        if self.state != "open" or self._thread is None or self._conn is None:
            raise ClosedError(f"{self!r} is not open")
        return self._thread, self._conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the connection's thread and return its result."""
        thread, conn = self._ready()
        return await thread.call(self._as_configured, fn, conn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the read-only ``fn(conn, *args)`` right here, in the event loop's thread, on
        a second connection (``query_only``), falling back to :meth:`run` when the file is
        busy.

        For small indexed reads on a hot path (a sync's device lookup): one read of a few
        cached pages costs about 10 µs, a hop to the connection's thread and back costs
        several times that in queue, wake-up and GIL hand-offs. In WAL mode a reader never
        waits for a writer, so the only wait is SQLite's rare recovery of the log; it is not
        waited for here (no busy timeout) but handed to the thread. The reader sees every
        transaction committed before the call, the thread's included."""
        self._ready()
        try:
            return fn(self._reader or self._open_reader(), *args)
        except sqlite3.OperationalError as exc:
            if _code(exc) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _translate(exc) from exc
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        return await self.run(fn, *args)

    def _open_reader(self) -> sqlite3.Connection:
        reader = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        try:
            reader.execute("PRAGMA query_only = ON")
        except BaseException:
            reader.close()
            raise
        self._reader = reader
        return reader

    def write_here(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)``, a function that runs one write transaction beginning with
        ``BEGIN IMMEDIATE``, right here in the event loop's thread, and return its result;
        :class:`StoreBusy` (nothing written) when the connection's thread has calls of its own
        or another connection holds the write lock, which is not waited for.

        For the hot write of a server (a group of syncs): handing the transaction to the
        connection's thread costs its objects a trip to another CPU and back, about a sixth
        of a sync's CPU. What must stay off the event loop stays off it: the transaction
        commits without SQLite's own ``fsync`` (``synchronous`` is ``NORMAL`` while it runs,
        when the connection's is ``FULL`` or ``EXTRA``), without an automatic checkpoint
        and without a busy timeout; :meth:`durable` makes it durable, in a thread of its
        own, before the caller may report it stored. Calls queued meanwhile run after it,
        in their order.

        The pragmas stay so between two such transactions (setting and restoring them cost
        nine statements a group); the next call in the connection's thread finds them
        restored first (:meth:`_as_configured`)."""
        thread, conn = self._ready()
        if not thread.idle() or not thread.lock.acquire(blocking=False):
            raise StoreBusy("the connection's thread has calls of its own")
        try:
            if self._here is None:
                self._here = _HereMode.read(conn, self.synchronous)
                self._here.apply(conn, self.synchronous)
            return _busy_if_locked(conn, fn, *args)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        finally:
            thread.lock.release()

    async def durable(self) -> None:
        """Make every transaction committed so far durable, as ``synchronous`` promises:
        after :meth:`write_here`, ``fdatasync`` of the write-ahead log in a thread of its
        own (``synchronous`` ``FULL`` or ``EXTRA``), then, at most every
        :data:`CHECKPOINT_SECONDS`, a passive checkpoint from that thread's own connection.
        Raises :class:`StoreError` when the log cannot be synced (the transactions are
        committed but must not be reported durable)."""
        self._ready()
        if self._log is None:
            self._log = _LogSync(self.path, self.synchronous)
        await self._log.sync()

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the connection's thread, waiting for it here.

        For the few synchronous paths that must be durable before they return; the wait is
        one short transaction plus whatever single call is ahead of it."""
        thread, conn = self._ready()
        result: T = thread.call_blocking(self._as_configured, fn, conn, *args)
        return result

    def _as_configured(self, fn: Callable[..., T], conn: sqlite3.Connection, *args: Any) -> T:
        """``fn(conn, *args)`` in the thread, the pragmas first restored as they were before
        :meth:`write_here` changed them, if it did."""
        if self._here is not None:
            self._here.restore(conn)  # if it fails, the next call tries again
            self._here = None
        return fn(conn, *args)


class _Thread:
    """One thread running submitted calls in order. Cheaper per call than a
    ``ThreadPoolExecutor`` with ``run_in_executor`` (which chains two futures and wakes the
    loop through an extra hop): a call is a tuple on a ``SimpleQueue``, and its result is
    handed to the loop with one ``call_soon_threadsafe``. ``sqlite3`` errors become
    :class:`StoreError`.

    :meth:`idle` tells whether every submitted call has finished; :attr:`lock` is held while
    one runs, so that a caller that found the thread idle may use its connection in its own
    thread meanwhile (:meth:`SQLiteWorker.write_here`)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None]] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self._submitted = 0  # moved only by the submitting threads (the event loop's)
        self._finished = 0  # moved only by this thread: neither count needs a lock
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job[0]()

    def _outcome(self, fn: Callable[..., T], args: tuple[Any, ...]
                 ) -> tuple[T | None, BaseException | None]:
        """Run ``fn(*args)`` under :attr:`lock`; counted finished before the caller hears of
        it, so that a caller that goes on at once finds the thread idle."""
        try:
            with self.lock:
                try:
                    return fn(*args), None
                except BaseException as exc:  # delivered to the caller, never lost here
                    return None, _translate(exc)
        finally:
            self._finished += 1

    def idle(self) -> bool:
        """True when no submitted call is waiting or running."""
        return self._submitted == self._finished

    def _submit(self, job: Callable[[], None]) -> None:
        self._submitted += 1
        self._jobs.put((job,))

    def stop(self) -> None:
        """Stop after the calls already queued (does not wait)."""
        self._jobs.put(None)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            outcome = self._outcome(fn, args)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, *outcome)

        self._submit(job)
        return await future

    def call_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            result, error = self._outcome(fn, args)
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        self._submit(job)
        return done.result()


class _LogSync:
    """What :meth:`SQLiteWorker.durable` runs off the event loop: the write-ahead log's file
    synced, and a connection of its own for the checkpoints that the commits of
    :meth:`SQLiteWorker.write_here` do not run.

    The syncs run in ``crdtsync._logsync.LogSyncer``'s C thread where it is built (Linux
    with a C compiler): it never takes the GIL, and tells the event loop through an eventfd
    that it watches (:meth:`_settle`). A Python thread syncing cost the GIL several times per
    sync (woken from its queue, around ``fdatasync``, to hand the result back), each time
    taken from the busy event loop: about 3 % of a busy server's CPU. Without the C module,
    or with ``NATIVE`` False, the Python thread syncs as before. Checkpoints run in the
    Python thread either way, at most every :data:`CHECKPOINT_SECONDS`."""

    NATIVE = True
    """Use the C syncer when it is built (tests turn it off to spy on ``_fdatasync``)."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._thread = _Thread("crdtsync-sqlite-log")
        self._fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._checkpointed = time.monotonic()
        self._syncer: LogSyncer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque())
        """Rounds asked of the C syncer and the futures waiting for them, in order."""
        self._failures = 0

    async def sync(self) -> None:
        if (self.synchronous not in ("FULL", "EXTRA") or accel.log_syncer is None
                or not self.NATIVE):
            await self._thread.call(self._sync)
            return
        try:
            waiter = self._round()
        except OSError as exc:  # the log cannot be opened, the thread cannot start
            raise _unsynced(exc) from exc
        await waiter
        if time.monotonic() - self._checkpointed >= CHECKPOINT_SECONDS:
            await self._thread.call(self._checkpoint)

    async def aclose(self) -> None:
        try:
            if self._syncer is not None:
                self._unwatch()
                await self._thread.call(self._syncer.close)  # waits for its last rounds
                self._settle()
                self._syncer = None
            await self._thread.call(self._close)
        finally:
            self._thread.stop()

    def _sync(self) -> None:  # in the thread
        if self.synchronous in ("FULL", "EXTRA"):
            try:
                _fdatasync(self._log_fd())
            except OSError as exc:
                raise _unsynced(exc) from exc
        if time.monotonic() - self._checkpointed >= CHECKPOINT_SECONDS:
            self._checkpoint()

    def _checkpoint(self) -> None:  # in the thread
        self._checkpointed = time.monotonic()
        with contextlib.suppress(sqlite3.Error):  # another checkpoint runs: it does it
            self._checkpointer().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _round(self) -> asyncio.Future[None]:
        """A round of the C syncer, which covers every commit made so far; done when the
        loop hears that it finished (:meth:`_settle`)."""
        loop = asyncio.get_running_loop()
        syncer = self._syncer
        if syncer is None or self._loop is not loop:
            syncer = self._start_syncer(loop)
        elif os.fstat(syncer.fd).st_nlink == 0:  # the log was removed: sync the new one
            syncer.set_fd(_open_log(self.path))
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((syncer.request(), future))
        return future

    def _start_syncer(self, loop: asyncio.AbstractEventLoop) -> LogSyncer:
        assert accel.log_syncer is not None
        if self._syncer is not None:  # used from another loop (stopped): start afresh here
            self._unwatch()
            self._syncer.close()
            self._settle()
        fd = _open_log(self.path)
        try:
            syncer = accel.log_syncer(fd)
        except BaseException:
            os.close(fd)
            raise
        loop.add_reader(syncer.fileno(), self._settle)
        self._syncer, self._loop = syncer, loop
        return syncer

    def _unwatch(self) -> None:
        """Stop watching the C syncer's eventfd (on the loop's thread)."""
        assert self._syncer is not None and self._loop is not None
        with contextlib.suppress(RuntimeError, ValueError):  # the loop is closed
            self._loop.remove_reader(self._syncer.fileno())

    def _settle(self) -> None:
        """Settle the futures of the rounds the C syncer finished: each fails with a
        :class:`StoreError` when the round that covered it failed (when more than one
        failed since the last look, every round up to the last failure fails: a retried
        write is a replay, a write wrongly reported durable would be a loss)."""
        if self._syncer is None:
            return
        finished, failures, failed_from, failed_to, error = self._syncer.collect()
        new_failures, self._failures = failures - self._failures, failures
        while self._waiting and self._waiting[0][0] <= finished:
            ticket, future = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if new_failures and ticket <= failed_to and (new_failures > 1
                                                         or ticket > failed_from):
                failure = OSError(error, os.strerror(error))
                future.set_exception(_unsynced(failure))
            else:
                future.set_result(None)

    def _log_fd(self) -> int:
        """The log file, opened again if it was removed (its link count fell to 0)."""
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self._fd = _open_log(self.path)
        return self._fd

    def _checkpointer(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")  # the checkpoint's syncs
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_log(path: str) -> int:
    return os.open(f"{path}-wal", os.O_RDWR | os.O_CLOEXEC)


def _unsynced(exc: OSError) -> StoreError:
    return StoreError(f"sqlite: cannot sync the write-ahead log: {exc}")


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
"""What SQLite calls on Linux to sync its log (the data and the size, not the times)."""


class _HereMode:
    """The pragmas of :meth:`SQLiteWorker.write_here`'s transactions: ``synchronous`` at
    ``NORMAL`` (when it is ``FULL`` or ``EXTRA``: no ``fsync`` at the commit), no automatic
    checkpoint and no busy timeout; :meth:`restore` sets them back as they were."""

    __slots__ = ("restore_statements",)

    def __init__(self, restore_statements: list[str]) -> None:
        self.restore_statements = restore_statements

    @classmethod
    def read(cls, conn: sqlite3.Connection, synchronous: str) -> _HereMode:
        """The pragmas as they are, to restore."""
        return cls([f"PRAGMA {name} = {_pragma(conn, name)}"
                    for name in ("busy_timeout", "wal_autocheckpoint",
                                 *(("synchronous",) if _deferred(synchronous) else ()))])

    @staticmethod
    def apply(conn: sqlite3.Connection, synchronous: str) -> None:
        if _deferred(synchronous):
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA busy_timeout = 0")

    def restore(self, conn: sqlite3.Connection) -> None:
        for statement in self.restore_statements:
            conn.execute(statement)


def _deferred(synchronous: str) -> bool:
    """Whether the commits of :meth:`SQLiteWorker.write_here` leave their ``fsync`` to
    :meth:`SQLiteWorker.durable`."""
    return synchronous in ("FULL", "EXTRA")


def _code(exc: sqlite3.Error) -> int:
    """SQLite's extended result code of ``exc``; 0 for one raised by Python code, which
    carries none (a function inside a transaction, an injected fault)."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0)


def _busy_if_locked(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` (one write transaction); :class:`StoreBusy` when the transaction
    could not begin because another connection holds the write lock."""
    try:
        return fn(conn, *args)
    except sqlite3.OperationalError as exc:
        locked = _code(exc) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        if locked and not conn.in_transaction:
            raise StoreBusy("another connection holds the write lock") from exc
        raise


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the call itself ran to its end
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        error = StoreError(f"sqlite: {exc}")
        error.__cause__ = exc
        return error
    return exc


WAL_SIZE_LIMIT = 1024 * 1024
"""Bytes the ``-wal`` file is truncated to after a checkpoint (``PRAGMA journal_size_limit``)
unless the caller says otherwise: right for a device's small log. A log that checkpoints at
more than this (the server's) needs a larger limit, or every checkpoint cuts the file and
the next commits grow it again, block by block."""


def connect(path: str, synchronous: str, migrations: Sequence[str], wal_pages: int = 1000,
            wal_limit: int = WAL_SIZE_LIMIT) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the given durability and apply ``migrations``; the log
    is checkpointed every ``wal_pages`` pages and then cut back to ``wal_limit`` bytes."""
    # isolation_level=None: no implicit transactions, every one is spelled out.
    # cached_statements: room for the multi-row inserts of the server's store, one text per
    # row count (``ROWS_PER_INSERT`` in crdtsync_server/store/sqlite/connection.py), beside
    # every other statement (the default keeps 128).
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False, cached_statements=256)
    try:
        refuse_newer(conn, path, len(migrations))  # before any pragma that writes the file
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")  # validated by the caller
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        # A checkpoint truncates the write-ahead log back to this size: without it the file
        # keeps the largest size it ever reached (4 MB and more after a burst of writes).
        conn.execute(f"PRAGMA journal_size_limit = {int(wal_limit)}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_pages)}")
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def refuse_newer(conn: sqlite3.Connection, path: str, known: int) -> None:
    """Raise :class:`StoreError` if the database was written by a newer schema."""
    version = user_version(conn)
    if version > known:
        raise StoreError(
            f"database schema v{version} is newer than this crdtsync (v{known})",
            {"path": path, "version": version, "supported": known},
        )


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Apply the missing migrations, each in one transaction. The version is read again
    under the write lock, so two processes opening a fresh file do not both migrate."""
    for target, script in enumerate(migrations, start=1):
        with transaction(conn):
            if user_version(conn) >= target:
                continue
            for statement in statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")


def statements(script: str) -> Iterator[str]:
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
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """``BEGIN <mode>`` ... ``COMMIT``; ``ROLLBACK`` and re-raise on any exception."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            conn.execute("ROLLBACK")
        raise


def pragmas(conn: sqlite3.Connection) -> dict[str, Any]:
    """The connection's pragmas that matter for durability, for diagnostics and tests."""
    names = ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "user_version",
             "journal_size_limit")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}
