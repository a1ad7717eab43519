"""The pool every part of :class:`~crdtsync_server.store.postgres.PostgresStore` runs on.

Connections: an ``asyncpg`` pool (``min_size``..``max_size``). Each public coroutine runs
one whole async function ``fn(conn, *args)`` on one pooled connection: :meth:`_read` in a
read-only ``REPEATABLE READ`` transaction (one snapshot for every query of the call),
:meth:`_write` in a ``READ COMMITTED`` transaction, committed when ``fn`` returns and rolled
back when it raises. Every connection has ``statement_timeout`` set, and waiting for a free
connection is bounded by ``acquire_timeout``: a slow or absent database becomes
:class:`Unavailable` (HTTP 503, retryable) within a bounded time, with nothing committed,
instead of piling up requests.

Commit order: cursors a reader follows (update ids, feed cursors, wake cursors) come from
sequences, and PostgreSQL hands out a sequence value when a row is inserted, not when its
transaction commits: a reader could see cursor 11 committed while 10 is still in flight and
step over 10 for ever. Every transaction that inserts such a row therefore first takes the
transaction-scoped advisory lock :data:`SEQUENCE_LOCK` (:func:`sequenced`), held until it
commits: cursors become visible in the order they were given out, across every instance on
the database. The lock is taken first in its transaction, so it never waits while holding
a row lock (no deadlock with row locks), and it is held only by writes that append.

Announcements: transactions that append wake entries, feed items or command results call
:func:`announce`; :meth:`_write` sends them with ``pg_notify`` on the store's channel
(:data:`CHANNEL`, plus ``.schema`` for a store in its own schema: stores in other schemas
of the database hear nothing of it) just before it commits, and PostgreSQL delivers them at
commit to every instance's listener connection (:meth:`_listen`). Each instance hears every
instance's commits, its own included: waiters need no polling loop (:attr:`hears_others`).
The instance that committed also hands them to its own listeners as soon as the commit
returned, so a caller that awaited a write has had it announced (the notification comes
again a moment later: listeners take news twice; ``on_wakes`` passes each head once). When
the listener connection is lost, it reconnects with backoff and then announces ``None`` to
every listener ("something may have been missed: re-read").

Errors: connection loss, timeouts, a database starting up or shutting down, serialization
failures and deadlocks become :class:`Unavailable` (retryable); any other database error
becomes :class:`StoreError`; the crdtsync errors of the contract pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from crdtsync.errors import ClosedError, StoreError, Unavailable

from .schema import MIGRATIONS

T = TypeVar("T")

log = logging.getLogger("crdtsync.server")

SEQUENCE_LOCK = 0x6372_0001
"""First half of the advisory lock key held by every transaction that appends rows read by
cursor; the second half is the hash of the store's schema (:data:`_LOCK`), so stores in
different schemas of one database never wait for each other."""

MIGRATION_LOCK = 0x6372_0002
"""First half of the advisory lock key held while the schema is migrated (instances
starting together); the second half as for :data:`SEQUENCE_LOCK`."""

_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))"
"""Take the transaction-scoped advisory lock ``($1, this schema)``."""

CHANNEL = "crdtsync"
"""``LISTEN``/``NOTIFY`` channel of the announcements (payloads in :func:`announce`)."""

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,53}$")
"""A schema name (short enough that ``crdtsync.<schema>`` is a channel name, < 64 bytes)."""

_ANNOUNCED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "crdtsync_pg_announced", default=None)
"""The announcements (``kind:payload``) of the :meth:`PostgresConnection._write` running in
this task, sent when it commits."""

_BROKEN: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a query on a connection the server just terminated
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)
"""Errors after which a connection is closed, not given back to the pool for reuse."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    *_BROKEN,
    asyncio.TimeoutError,
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after a failover
)


def store_error(exc: BaseException) -> Exception:
    """The crdtsync error a database failure becomes (see the module docstring)."""
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable(f"database unavailable: {type(exc).__name__}: {exc}",
                           {"retry_after": 1})
    return StoreError(f"postgres: {type(exc).__name__}: {exc}")


class PostgresConnection:
    """The pool to the database at ``url`` and what every role's coroutines share.

    ``schema``: the PostgreSQL schema holding the tables (created if missing; default
    ``public``), so several independent stores can share one database (tests do).
    ``statement_timeout``: seconds any statement may run. ``acquire_timeout``: seconds a
    call waits for a pooled connection.
    """

    def __init__(self, url: str, *, schema: str | None = None, min_size: int = 1,
                 max_size: int = 10, statement_timeout: float = 10.0,
                 acquire_timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema must match {_SCHEMA_NAME.pattern}, not {schema!r}")
        self.url = url
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.statement_timeout = statement_timeout
        self.acquire_timeout = acquire_timeout
        self.connect_timeout = connect_timeout
        self.hears_others = True
        """Listeners (``on_wakes``, ``on_news``) hear every instance's commits."""
        self.channel = CHANNEL if schema is None else f"{CHANNEL}.{schema}"
        """The ``LISTEN``/``NOTIFY`` channel of this store's announcements."""
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        self._listeners: dict[str, list[Callable[[str | None], None]]] = {}
        self._listen_task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._opening = asyncio.Lock()

    @property
    def external_writes(self) -> int | None:
        """``None``: another instance may write at any time, so the document cache always
        catches up (one indexed read) before it answers."""
        return None

    # --- lifecycle

    async def _connect(self) -> None:
        async with self._opening:  # two concurrent open() calls make one pool
            await self._connect_once()

    async def _connect_once(self) -> None:
        if self._closed:
            raise ClosedError("the store is closed")
        if self._pool is not None:
            return
        try:
            await self._create_schema()
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self.min_size, max_size=self.max_size,
                timeout=self.connect_timeout, server_settings=self._settings())
            await self._migrate()
        except BaseException as exc:
            await self._disconnect()
            if isinstance(exc, StoreError | Unavailable | ClosedError):
                raise
            if isinstance(exc, Exception):
                raise store_error(exc) from exc
            raise
        self._listening.clear()
        self._listen_task = asyncio.create_task(self._listen(), name="crdtsync-pg-listen")
        # announcements committed once open() returned must be heard: wait for LISTEN (a
        # listener that cannot connect yet keeps retrying; the store works meanwhile)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), self.connect_timeout)

    async def _disconnect(self) -> None:
        task, self._listen_task = self._listen_task, None
        for pending in [*self._tasks, *([task] if task is not None else [])]:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5.0)
            except Exception:  # TimeoutError included
                pool.terminate()

    def _settings(self) -> dict[str, str]:
        settings = {"statement_timeout": str(int(self.statement_timeout * 1000)),
                    "application_name": self.channel}  # which store, in pg_stat_activity
        if self.schema is not None:
            settings["search_path"] = self.schema
        return settings

    async def _create_schema(self) -> None:
        if self.schema is None:
            return
        conn = await asyncpg.connect(self.url, timeout=self.connect_timeout)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        except asyncpg.exceptions.UniqueViolationError:
            pass  # created concurrently by another instance
        finally:
            await conn.close()

    async def _migrate(self) -> None:
        """Apply the missing migrations, each in its own transaction, under
        :data:`MIGRATION_LOCK` (instances starting together migrate once). A database
        from a newer crdtsync raises :class:`StoreError` and is left untouched."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_LOCK, MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version"
                               " (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the database holds schema v{version}, newer than this crdtsync"
                    f" (v{len(MIGRATIONS)}); upgrade crdtsync", {"version": version})
            for number in range(version, len(MIGRATIONS)):
                await conn.execute(MIGRATIONS[number])
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)",
                                   number + 1)

    async def schema_version(self) -> int:
        """The schema version the database holds (diagnostics and tests)."""
        return int(await self._read(_schema_version))

    # --- running calls

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise ClosedError("the store is not open" if not self._closed
                              else "the store is closed")
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout) as conn:
                try:
                    yield conn
                except _BROKEN:
                    conn.terminate()  # lost or in an unknown state: the pool replaces it
                    raise
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise store_error(exc) from exc

    async def _read(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one read-only snapshot."""
        async with self._connection() as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            return await fn(conn, *args)

    async def _write(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(conn, *args)`` as one transaction (committed when it returns); send
        the announcements it queued (:func:`announce`) before the commit, and hand them to
        this instance's listeners after."""
        announced: list[str] = []
        token = _ANNOUNCED.set(announced)
        try:
            async with self._connection() as conn, conn.transaction():
                result = await fn(conn, *args)
                if announced:
                    await conn.execute("SELECT pg_notify($1, text) FROM unnest($2::text[])"
                                       " AS t(text)", self.channel, announced)
        finally:
            _ANNOUNCED.reset(token)
        for payload in announced:
            self._dispatch(payload)
        return result

    # --- announcements

    def _on(self, kind: str, callback: Callable[[str | None], None]) -> None:
        self._listeners.setdefault(kind, []).append(callback)

    def on_wakes(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(head)`` when any instance committed wake entries (the highest
        cursor its transaction gave out; this instance's own before its write returns);
        after a lost listener connection, with the current head. Each head is passed once,
        and only when above every head passed before."""
        passed = 0

        def heard(payload: str | None) -> None:
            nonlocal passed
            if payload is None:
                self._spawn(self._reread_wake_head(heard))
            elif int(payload) > passed:
                passed = int(payload)
                callback(passed)
        self._on("w", heard)

    def on_feed(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when any instance committed feed items, and after a lost
        listener connection."""
        self._on("f", lambda _payload: callback())

    def on_results(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(device)`` when any instance stored command results of
        ``device``; ``callback(None)`` after a lost listener connection (re-read all)."""
        self._on("r", callback)

    async def _reread_wake_head(self, heard: Callable[[str | None], None]) -> None:
        try:
            head = await self._read(wake_head)
        except (StoreError, Unavailable, ClosedError) as exc:
            log.warning("store listener: cannot re-read the wake head: %s", exc)
            return
        heard(str(head))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task this connection keeps until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        for callback in self._listeners.get(kind, ()):
            try:
                callback(rest)
            except Exception:
                log.exception("a store listener failed on %r", payload)

    def _missed(self) -> None:
        for callbacks in self._listeners.values():
            for callback in callbacks:
                with contextlib.suppress(Exception):
                    callback(None)

    async def _listen(self) -> None:
        """Hold a dedicated connection that ``LISTEN``s on :data:`CHANNEL`; reconnect
        with backoff when it is lost, then tell every listener it may have missed news."""
        delay = 0.1
        first = True
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.url, timeout=self.connect_timeout,
                                             server_settings=self._settings())
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, lambda _c, _pid, _ch, payload:
                                        self._dispatch(payload))
                self._listening.set()
                if not first:
                    self._missed()
                first = False
                delay = 0.1
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store listener: %s: %s; retrying in %.1f s",
                            type(exc).__name__, exc, delay)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2.0)
            first = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def sequenced(conn: asyncpg.Connection) -> None:
    """Take :data:`SEQUENCE_LOCK` for the rest of the transaction: call it first in every
    transaction that appends rows read by cursor (updates, feed, wakes)."""
    await conn.execute(_LOCK, SEQUENCE_LOCK)


async def announce(conn: asyncpg.Connection, kind: str, payload: str | int) -> None:
    """Queue the announcement ``kind:payload`` of the transaction ``conn`` runs for
    :meth:`PostgresConnection._write` (delivered when it commits; identical ones in one
    transaction are delivered once, and of the heads ``w`` and ``f`` only the last; one in a
    savepoint rolled back is still delivered:
    listeners re-read, they never trust an announcement for data). Kinds: ``w`` (wake
    head), ``f`` (feed head), ``r`` (device whose command results were stored)."""
    announced = _ANNOUNCED.get()
    if announced is None:
        raise RuntimeError("announce() outside a transaction of PostgresConnection._write")
    if kind in _HEADS:  # a head: the transaction's highest says it all
        announced[:] = [a for a in announced if not a.startswith(f"{kind}:")]
    text = f"{kind}:{payload}"
    if text not in announced:
        announced.append(text)


_HEADS = ("w", "f")
"""Announcement kinds whose payload is a head that only grows within a transaction."""


def rowcount(status: str) -> int:
    """The rows a statement touched, from the status ``execute`` returns (``DELETE 3``)."""
    return int(status.rpartition(" ")[2])


def loads(text: str | None) -> Any:
    """A nullable JSON column as data (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


async def _schema_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT max(version) FROM schema_version") or 0)


WAKE_HEAD = "wake_head"
"""The mark holding the head of the wake log (``postgres/wakes.py``)."""


async def wake_head(conn: asyncpg.Connection) -> int:
    """The head of the wake log: the highest cursor ever given out (0: none)."""
    return await mark(conn, WAKE_HEAD)


async def mark(conn: asyncpg.Connection, name: str) -> int:
    """A named counter of table ``marks`` (0 if never set): the heads of the feed and the
    wake log (never lowered by a purge) and their floors."""
    return int(await conn.fetchval("SELECT value FROM marks WHERE name = $1", name) or 0)


async def raise_mark(conn: asyncpg.Connection, name: str, value: int) -> None:
    """Raise the counter ``name`` to ``value`` (never lowers it), in the caller's
    transaction."""
    await conn.execute(
        "INSERT INTO marks (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
        " SET value = GREATEST(marks.value, excluded.value)", name, value)
