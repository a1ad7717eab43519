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

Fleets: a device's ``fleet`` is checked against the ``fleets`` table in the transaction that
sets it (``add_device``, ``set_device_fleet``), so both backends raise the same
:class:`NotFound` (not a foreign-key ``IntegrityError`` to translate).

Devices: a sync finds its device by token hash (index ``devices_token_hash``, v5).
``delete_device`` deletes the device's rows in one transaction, turns each of its documents
into an empty snapshot at a fresh update id (so other processes' cached copies reload), and
keeps the device's ``last_seq`` in ``deleted_devices`` until a device with the same id is
added, which then starts above it (``seq_floor``).

Generations: ``rebuild`` checks the stored generation and the highest update id of the
document and replaces it in the same ``BEGIN IMMEDIATE`` transaction (a compare-and-set no
other process can slip a write into), again at a fresh update id; ``commit`` refuses a
``DocWrite`` of another generation than the stored one, so a process that has not yet
noticed a rebuild never appends to the new generation an update built on the old one.

Stamps (v6, SQL in ``store/sqlite_stamps.py``): one row per ``(doc, map, key)``, replaced by
``commit`` in the write's transaction, never touched by ``compact`` or ``rebuild`` (they are
per key, not per generation), deleted by ``delete_device`` with the device's documents.

Group commit: concurrent :meth:`SQLiteStore.commit` calls share one transaction, each write in
its own savepoint (:mod:`crdtsync_server.store.group_commit`).

Errors: ``sqlite3`` exceptions become :class:`StoreError` (``raise ... from``); the
crdtsync errors of the contract (``NotFound``, ``AlreadyExists``, ``SeqGap``,
``SeqConflict``) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from typing import Any, TypeVar

from crdtsync.errors import AlreadyExists, CrdtsyncError, NotFound, StoreError
from crdtsync.sqlite_worker import SQLiteWorker, pragmas, transaction

from . import sqlite_feed, sqlite_sinks, sqlite_stamps
from .base import (
    FINISHED_DOWNLINK,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Downlink,
    EventPlan,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    StoredEvent,
    SyncWrite,
    above_deleted,
    check_kind,
    check_limit,
    check_write,
    event_digest,
    plan_events,
    result_columns,
    stale_generation,
    updated_fields,
)
from .feed import (
    FEED_COLUMNS,
    Changes,
    FeedFilter,
    FeedItem,
    ProjectionRow,
    event_rows,
    json_text,
)
from .group_commit import GroupCommitter
from .sinks import DeadLetter, SinkConfig, SinkRecord, check_origin

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
    # v2: downlink (messages and commands to devices) and proxied requests
    """
    ALTER TABLE devices ADD COLUMN down_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN down_done INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE downlink (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER,
        status TEXT NOT NULL DEFAULT 'queued',
        result TEXT,
        error TEXT,
        updated INTEGER NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX downlink_device_status_seq ON downlink (device, status, seq);
    CREATE TABLE requests (
        device TEXT NOT NULL,
        id TEXT NOT NULL,
        route TEXT NOT NULL,
        body TEXT NOT NULL,
        created INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        outcome TEXT,
        updated INTEGER NOT NULL,
        PRIMARY KEY (device, id)
    );
    CREATE INDEX requests_device_status ON requests (device, status);
    """,
    # v3: fleets; a device belongs to at most one
    """
    CREATE TABLE fleets (
        id TEXT PRIMARY KEY,
        created INTEGER NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    ALTER TABLE devices ADD COLUMN fleet TEXT;
    ALTER TABLE devices ADD COLUMN fleet_gen INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX devices_fleet_id ON devices (fleet, id);
    """,
    # v4: the change feed and the state projection
    sqlite_feed.MIGRATION,
    # v5: credential lifecycle: devices found by token hash, disabled, deleted, re-created
    """
    ALTER TABLE devices ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN seq_floor INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX devices_token_hash ON devices (token_hash, id);
    CREATE TABLE deleted_devices (
        id TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL
    );
    """,
    # v6: per-key stamps, the latest-write-wins decision (issue 13)
    sqlite_stamps.MIGRATION,
)
"""Schema migrations in order; ``MIGRATIONS[n]`` takes a database from v``n`` to v``n+1``.
Append only: a released script is never edited."""

SCHEMA_VERSION = len(MIGRATIONS)


_DEVICE_COLUMNS = (
    "id, token_hash, created, last_sync, last_seq, events_lost, meta, down_seq, down_done,"
    " fleet, fleet_gen, disabled, seq_floor"
)
_FLEET_COLUMNS = "id, created, meta"
_EVENT_COLUMNS = "cursor, device, seq, topic, time, received, body"
_DOWNLINK_COLUMNS = (
    "id, device, seq, kind, name, body, created, expires, status, result, error, updated"
)
_REQUEST_COLUMNS = "device, id, route, body, created, status, outcome, updated"


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
        self.external_writes = 0
        """Moves whenever this store notices a commit by another connection (another server
        process, an admin shell): the document cache skips its catch-up read while it stands
        still. Observed before each call's own statements, so a reader that records it before
        a read never misses a later commit."""
        self._data_version: int | None = None
        self.group_commit: GroupCommitter[SyncWrite, CommitResult] = GroupCommitter(
            self._commit_group)
        """Batches concurrent :meth:`commit` calls into one transaction (one fsync)."""

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
        await self.group_commit.drain()
        await self._db.aclose()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread, noting first whether another
        connection committed since the previous call (``PRAGMA data_version``)."""
        observed: tuple[int, T] = await self._db.run(_observing, fn, *args)
        version, result = observed
        if version != self._data_version:
            if self._data_version is not None:  # the first reading is no news
                self.external_writes += 1
            self._data_version = version
        return result

    async def pragmas(self) -> dict[str, Any]:
        """The connection's ``journal_mode``, ``synchronous``, ``busy_timeout``,
        ``foreign_keys`` and ``user_version``, for diagnostics and tests."""
        return await self._run(pragmas)

    # documents

    async def load_doc(self, key: str) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written."""
        return await self._run(_load_doc, key)

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` if compacted
        past ``after_id``."""
        return await self._run(_read_since, key, after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows,
        in one transaction. A no-op unless ``upto_id`` is above the current ``snapshot_id``."""
        await self._run(_compact, key, upto_id, snapshot)

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> bool:
        """Replace ``key`` by generation ``gen + 1`` holding ``snapshot`` if it is still at
        ``gen`` with nothing above ``upto_id``, in one ``BEGIN IMMEDIATE`` transaction, so
        the check and the write see no other process in between (see ``Store.rebuild``)."""
        return await self._run(_rebuild, key, gen, upto_id, snapshot)

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key``, ordered by map and key."""
        return await self._run(sqlite_stamps.read_stamps, key)

    # the sync transaction

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates, store new events, and apply the device's downlink progress,
        command results, new requests and outcome acknowledgements, in one transaction
        (see ``Store.commit``; the downlink and request rules are in the module docstring).

        Raises :class:`NotFound` for an unknown device, :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, and :class:`Unavailable` for a
        ``DocWrite`` of another generation than the stored one (``stale_generation``), in
        every case with nothing written;
        ``ValueError`` for device parts without a device, or a request whose ``device`` is
        not the write's."""
        check_write(write)
        return await self.group_commit.submit(write)

    async def _commit_group(self, writes: list[SyncWrite]
                            ) -> list[CommitResult | BaseException]:
        return await self._run(_commit_group, writes)

    # downlink

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item with the device's next seq (see ``Store.queue_downlink``).

        Raises ``ValueError`` for a kind not in ``DOWNLINK_KINDS``, ``TypeError`` for a body
        that is not JSON, :class:`NotFound` for an unknown device; nothing is written then."""
        check_kind(kind)
        return await self._run(_queue_downlink, device, kind, name, json_text(body), now, expires)

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

    # proxied requests

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """``pending`` -> ``running`` in one statement; ``None`` unless this call moved it."""
        return await self._run(_claim_request, device, request_id, now)

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """``running`` -> ``done`` with ``outcome``; does nothing if the request is not
        running (unknown, never claimed, or already finished: the first outcome stays)."""
        await self._run(_finish_request, device, request_id, json_text(dict(outcome)), now)

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""
        return await self._run(_select_request, device, request_id)

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device by ``updated`` then id, at most ``limit``."""
        check_limit(limit)
        return await self._run(_undelivered_outcomes, device, limit)

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int) -> int:
        """Finish every ``running`` request with ``outcome``; returns how many."""
        return await self._run(_interrupt_running, json_text(dict(outcome)), now)

    async def purge_finished(self, before: int) -> int:
        """Delete finished downlink items and acknowledged requests older than ``before``."""
        return await self._run(_purge_finished, before)

    # devices

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken and
        :class:`NotFound` if its ``fleet`` does not exist."""
        await self._run(_add_device, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        return await self._run(_select_device, device_id)

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device with this token hash (index ``devices_token_hash``), or ``None``."""
        return await self._run(_device_by_token, token_hash)

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the token hash and/or the disabled flag; returns the stored record.
        :class:`NotFound` for an unknown device."""
        return await self._run(_update_device, device_id, token_hash, disabled)

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device and what belongs to it in one transaction (see
        ``Store.delete_device``). :class:`NotFound` for an unknown device."""
        await self._run(_delete_device, device_id, list(docs), events)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_list_devices, after, limit)

    # fleets

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises :class:`AlreadyExists` if the id is taken."""
        await self._run(_add_fleet, fleet)

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""
        return await self._run(_select_fleet, fleet_id)

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_list_fleets, after, limit)

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Move the device to ``fleet`` (``None``: no fleet) in one transaction, bumping
        ``fleet_gen`` only on a change; returns the stored record. :class:`NotFound` for an
        unknown device or fleet, with nothing written."""
        return await self._run(_set_device_fleet, device_id, fleet)

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order, at most ``limit`` (>= 0);
        empty for an unknown fleet."""
        check_limit(limit)
        return await self._run(_devices_in_fleet, fleet, after, limit)

    # events

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_read_events, after, limit, device, topic)

    # downstream: feed and projection (SQL in store/sqlite_feed.py)

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""
        check_limit(limit)
        return await self._run(sqlite_feed.read_feed, after, limit, where or FeedFilter())

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any)."""
        return await self._run(sqlite_feed.feed_head)

    async def feed_floor(self) -> int:
        """The highest purged cursor (0 when nothing was purged)."""
        return await self._run(sqlite_feed.feed_floor)

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items (see ``Store.purge_feed``), ``PURGE_CHUNK`` per
        transaction so that syncs go on in between; returns how many."""
        total = 0
        while True:
            count: int = await self._run(_in_transaction, sqlite_feed.purge_feed_chunk,
                                         before, keep_after)
            total += count
            if count < sqlite_feed.PURGE_CHUNK:
                return total

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows ordered by (device, doc, map, key), after ``after``."""
        check_limit(limit)
        return await self._run(sqlite_feed.read_projection, device, after, limit)

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows``."""
        await self._run(_in_transaction, sqlite_feed.replace_projection, device, doc, rows,
                        now)

    # downstream sinks (SQL in store/sqlite_sinks.py)

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create or reconfigure a sink in one transaction, keeping its progress (see
        ``Store.put_sink``)."""
        check_origin(origin)
        return await self._run(sqlite_sinks.put_sink, config, now, origin, paused, start)

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""
        return await self._run(sqlite_sinks.get_sink, name)

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""
        return await self._run(sqlite_sinks.list_sinks)

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""
        await self._run(sqlite_sinks.delete_sink, name)

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Take or renew the sink's lease in one statement (see ``Store``)."""
        return await self._run(sqlite_sinks.acquire_sink_lease, name, owner, now, ttl_ms)

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it."""
        await self._run(sqlite_sinks.release_sink_lease, name, owner)

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """Move the cursor forward and count delivered items (see ``Store``)."""
        return await self._run(sqlite_sinks.sink_delivered, name, cursor, count, now, owner)

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed attempt and keep ``error``."""
        await self._run(sqlite_sinks.sink_failed, name, error, now)

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store dead letters and move the cursor past them, in one transaction."""
        return await self._run(sqlite_sinks.add_dead_letters, name, list(items), error,
                               attempts, now, owner)

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, at most ``limit``."""
        check_limit(limit)
        return await self._run(sqlite_sinks.list_dead_letters, name, after, limit, retrying)

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark dead letters for a retry; returns how many exist."""
        return await self._run(sqlite_sinks.retry_dead_letters, name,
                               None if ids is None else sorted(set(ids)))

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """Delete delivered dead letters, or record another failure (see ``Store``)."""
        await self._run(sqlite_sinks.finish_dead_letters, name, sorted(set(ids)), now, error,
                        attempts)

    # settings

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        return await self._run(_get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        await self._run(_set_setting, key, value)

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as ``last_sync`` (never backwards), one transaction."""
        await self._run(_touch_devices, dict(last_sync))







def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# --- documents (worker thread) -----------------------------------------------------------


def _load_doc(conn: sqlite3.Connection, key: str) -> DocLog:
    with transaction(conn, "DEFERRED"):  # one read snapshot for both queries
        row = conn.execute(
            "SELECT gen, snapshot, snapshot_id FROM docs WHERE key = ?", (key,)
        ).fetchone()
        gen, snapshot, snapshot_id = row if row is not None else (0, b"", 0)
        updates = _select_updates(conn, key, snapshot_id)
    return DocLog(gen, bytes(snapshot), snapshot_id, updates)


def _read_since(
    conn: sqlite3.Connection, key: str, after_id: int
) -> tuple[tuple[int, bytes], ...] | None:
    with transaction(conn, "DEFERRED"):  # one read snapshot for both queries
        row = conn.execute("SELECT snapshot_id FROM docs WHERE key = ?", (key,)).fetchone()
        if row is not None and after_id < int(row[0]):
            return None
        return _select_updates(conn, key, after_id)


def _select_updates(
    conn: sqlite3.Connection, key: str, after_id: int
) -> tuple[tuple[int, bytes], ...]:
    rows = conn.execute(
        "SELECT id, data FROM updates WHERE key = ? AND id > ? ORDER BY id", (key, after_id)
    )
    return tuple((int(i), bytes(data)) for i, data in rows)


def _stored_gen(conn: sqlite3.Connection, key: str) -> int | None:
    """The generation of document ``key``; ``None`` if it has no row yet."""
    row = conn.execute("SELECT gen FROM docs WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def _last_id(conn: sqlite3.Connection, key: str) -> int:
    """The highest update id document ``key`` reflects (logged rows and snapshot); 0 if it
    was never written."""
    row = conn.execute(
        "SELECT MAX(COALESCE((SELECT snapshot_id FROM docs WHERE key = ?), 0),"
        " COALESCE((SELECT MAX(id) FROM updates WHERE key = ?), 0))", (key, key)).fetchone()
    return int(row[0])


def _insert_updates(conn: sqlite3.Connection, docs: Sequence[DocWrite]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Append each write; returns the new row ids and, for each, the highest id its document
    reflected before (``CommitResult.prev_ids``). Raises ``stale_generation`` for a write of
    another generation than the stored one (the caller's savepoint rolls back the rest)."""
    ids: list[int] = []
    prevs: list[int] = []
    for w in docs:
        stored = _stored_gen(conn, w.key)
        if stored is None:
            conn.execute("INSERT INTO docs (key, gen) VALUES (?, ?)", (w.key, w.gen))
        elif stored != w.gen:
            raise stale_generation(w.key, stored, w.gen)
        prevs.append(_last_id(conn, w.key))
        cur = conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES (?, ?, ?)", (w.key, w.gen, w.update)
        )
        assert cur.lastrowid is not None
        ids.append(cur.lastrowid)
    return tuple(ids), tuple(prevs)


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


def _rebuild(conn: sqlite3.Connection, key: str, gen: int, upto_id: int,
             snapshot: bytes) -> bool:
    with transaction(conn):  # IMMEDIATE: no other writer between the check and the write
        if (_stored_gen(conn, key) or 0) != gen or _last_id(conn, key) > upto_id:
            return False
        _replace_doc(conn, key, gen + 1, snapshot)
        return True


# --- the sync transaction (worker thread) ------------------------------------------------


def _commit_group(conn: sqlite3.Connection, writes: Sequence[SyncWrite]
                  ) -> list[CommitResult | BaseException]:
    """Commit ``writes`` in one transaction, each in its own savepoint: a write that raises
    is rolled back alone and its exception returned in its place (group commit)."""
    outcomes: list[CommitResult | BaseException] = []
    with transaction(conn):
        for write in writes:
            conn.execute("SAVEPOINT write")
            try:
                outcomes.append(_commit(conn, write))
            except (CrdtsyncError, ValueError, sqlite3.Error) as exc:
                if not conn.in_transaction:  # SQLite rolled the whole transaction back
                    raise
                conn.execute("ROLLBACK TO write")
                outcomes.append(StoreError(f"sqlite: {exc}") if isinstance(exc, sqlite3.Error)
                                else exc)
            finally:
                if conn.in_transaction:
                    conn.execute("RELEASE write")
    return outcomes


def _commit(conn: sqlite3.Connection, write: SyncWrite) -> CommitResult:
    """One write's statements, inside the caller's transaction."""
    update_ids, prev_ids = _insert_updates(conn, write.docs)
    sqlite_stamps.write_stamps(conn, write.stamps)
    if write.device is None:
        sqlite_feed.record_changes(conn, write.changes, None, write.time)
        sqlite_feed.record_conflicts(conn, write.conflicts, None, write.time)
        return CommitResult(update_ids=update_ids, prev_ids=prev_ids)
    device = _require_device(conn, write.device)
    plan = plan_events(
        device.id, device.last_seq, write.purged, write.events,
        _stored_digests(conn, device, write), seq_floor=device.seq_floor,
    )
    _insert_events(conn, device, write.time, plan)
    sqlite_feed.record_changes(conn, write.changes, device.fleet, write.time)
    sqlite_feed.record_conflicts(conn, write.conflicts, device.fleet, write.time)
    last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
    down_done = _ack_downlink(conn, device, write)
    new_requests = _insert_requests(conn, device.id, write)
    _ack_outcomes(conn, device.id, write)
    conn.execute(
        "UPDATE devices SET last_seq = ?, events_lost = events_lost + ?, last_sync = ?,"
        " down_done = ? WHERE id = ?",
        (last_seq, plan.lost, write.time, down_done, device.id),
    )
    return CommitResult(update_ids, last_seq, len(plan.new), down_done, new_requests,
                        prev_ids)


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
    conn: sqlite3.Connection, device: DeviceRecord, received: int, plan: EventPlan
) -> None:
    """New events go into the feed (``events`` is a view over it), with their digest."""
    rows = event_rows(device.id, device.fleet, received, plan.new)
    conn.executemany(
        f"INSERT INTO feed ({FEED_COLUMNS}, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row, event_digest(e)) for row, e in zip(rows, plan.new, strict=True)],
    )


def _ack_downlink(conn: sqlite3.Connection, device: DeviceRecord, write: SyncWrite) -> int:
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
    conn.executemany(
        "UPDATE downlink SET status = ?, result = ?, error = ?, updated = ?"
        " WHERE device = ? AND seq = ? AND kind = 'command'"
        " AND status IN ('queued', 'delivered')",
        [(*result_columns(r), write.time, device.id, r.seq)
         for r in write.results if r.seq <= done],
    )
    return done



def _insert_requests(conn: sqlite3.Connection, device: str, write: SyncWrite) -> tuple[str, ...]:
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


def _ack_outcomes(conn: sqlite3.Connection, device: str, write: SyncWrite) -> None:
    conn.executemany(
        "UPDATE requests SET status = 'acked', updated = ?"
        " WHERE device = ? AND id = ? AND status = 'done'",
        [(write.time, device, request_id) for request_id in write.outcomes_acked],
    )


# --- downlink (worker thread) ------------------------------------------------------------


def _downlink_from_row(row: Sequence[Any]) -> Downlink:
    id_, device, seq, kind, name, body, created, expires, status, result, error, updated = row
    return Downlink(
        id=id_, device=device, seq=seq, kind=kind, name=name, body=json.loads(body),
        created=created, expires=expires, status=status, result=_loads(result),
        error=_loads(error), updated=updated,
    )


def _queue_downlink(
    conn: sqlite3.Connection, device_id: str, kind: str, name: str, body: str, now: int,
    expires: int | None,
) -> Downlink:
    with transaction(conn):
        device = _require_device(conn, device_id)
        seq = device.down_seq + 1
        conn.execute("UPDATE devices SET down_seq = ? WHERE id = ?", (seq, device.id))
        cur = conn.execute(
            "INSERT INTO downlink (device, seq, kind, name, body, created, expires, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device.id, seq, kind, name, body, now, expires, now),
        )
        assert cur.lastrowid is not None
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
        device = _require_device(conn, device_id)
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


# --- proxied requests (worker thread) ----------------------------------------------------


def _request_from_row(row: Sequence[Any]) -> ProxyRequest:
    device, id_, route, body, created, status, outcome, updated = row
    return ProxyRequest(
        device=device, id=id_, route=route, body=json.loads(body), created=created,
        status=status, outcome=_loads(outcome), updated=updated,
    )


def _select_request(conn: sqlite3.Connection, device: str, request_id: str
                    ) -> ProxyRequest | None:
    row = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = ? AND id = ?",
        (device, request_id),
    ).fetchone()
    return None if row is None else _request_from_row(row)


def _claim_request(conn: sqlite3.Connection, device: str, request_id: str, now: int
                   ) -> ProxyRequest | None:
    with transaction(conn):
        cur = conn.execute(
            "UPDATE requests SET status = 'running', updated = ?"
            " WHERE device = ? AND id = ? AND status = 'pending'",
            (now, device, request_id),
        )
        return _select_request(conn, device, request_id) if cur.rowcount == 1 else None


def _finish_request(conn: sqlite3.Connection, device: str, request_id: str, outcome: str,
                    now: int) -> None:
    conn.execute(
        "UPDATE requests SET status = 'done', outcome = ?, updated = ?"
        " WHERE device = ? AND id = ? AND status = 'running'",
        (outcome, now, device, request_id),
    )


def _undelivered_outcomes(conn: sqlite3.Connection, device: str, limit: int
                          ) -> list[ProxyRequest]:
    rows = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE device = ? AND status = 'done'"
        " ORDER BY updated, id LIMIT ?",
        (device, limit),
    )
    return [_request_from_row(row) for row in rows]


def _interrupt_running(conn: sqlite3.Connection, outcome: str, now: int) -> int:
    cur = conn.execute(
        "UPDATE requests SET status = 'done', outcome = ?, updated = ? WHERE status = 'running'",
        (outcome, now),
    )
    return cur.rowcount


def _purge_finished(conn: sqlite3.Connection, before: int) -> int:
    marks = ", ".join("?" * len(FINISHED_DOWNLINK))
    with transaction(conn):
        items = conn.execute(f"DELETE FROM downlink WHERE status IN ({marks}) AND updated < ?",
                             (*FINISHED_DOWNLINK, before)).rowcount
        requests = conn.execute("DELETE FROM requests WHERE status = 'acked' AND updated < ?",
                                (before,)).rowcount
    return int(items) + int(requests)


# --- devices (worker thread) -------------------------------------------------------------


def _device_from_row(row: Sequence[Any]) -> DeviceRecord:
    (id_, token_hash, created, last_sync, last_seq, events_lost, meta, down_seq, down_done,
     fleet, fleet_gen, disabled, seq_floor) = row
    return DeviceRecord(
        id=id_, token_hash=token_hash, created=created, last_sync=last_sync,
        last_seq=last_seq, events_lost=events_lost, meta=json.loads(meta),
        down_seq=down_seq, down_done=down_done, fleet=fleet, fleet_gen=fleet_gen,
        disabled=bool(disabled), seq_floor=seq_floor,
    )


def _add_device(conn: sqlite3.Connection, device: DeviceRecord) -> None:
    with transaction(conn):
        if device.fleet is not None:
            _require_fleet(conn, device.fleet)
        if _select_device(conn, device.id) is not None:
            raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})
        row = conn.execute("SELECT last_seq FROM deleted_devices WHERE id = ?",
                           (device.id,)).fetchone()
        if row is not None:  # the new device starts above the seqs the old one used
            conn.execute("DELETE FROM deleted_devices WHERE id = ?", (device.id,))
            device = above_deleted(device, int(row[0]))
        conn.execute(
            f"INSERT INTO devices ({_DEVICE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device.id, device.token_hash, device.created, device.last_sync,
                device.last_seq, device.events_lost, json_text(dict(device.meta)),
                device.down_seq, device.down_done, device.fleet, device.fleet_gen,
                int(device.disabled), device.seq_floor,
            ),
        )


def _device_by_token(conn: sqlite3.Connection, token_hash: str) -> DeviceRecord | None:
    row = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token_hash = ? ORDER BY id LIMIT 1",
        (token_hash,),
    ).fetchone()
    return None if row is None else _device_from_row(row)


def _update_device(conn: sqlite3.Connection, device_id: str, token_hash: str | None,
                   disabled: bool | None) -> DeviceRecord:
    with transaction(conn):
        device = dataclasses.replace(
            _require_device(conn, device_id),
            **updated_fields(token_hash=token_hash, disabled=disabled))
        conn.execute("UPDATE devices SET token_hash = ?, disabled = ? WHERE id = ?",
                     (device.token_hash, int(device.disabled), device.id))
    return device


def _delete_device(conn: sqlite3.Connection, device_id: str, docs: list[str],
                   events: bool) -> None:
    with transaction(conn):
        device = _require_device(conn, device_id)
        for key in docs:
            _replace_doc(conn, key, 0, b"")
        sqlite_stamps.delete_stamps(conn, docs)
        for table in ("projection", "downlink", "requests", *(("feed",) if events else ())):
            conn.execute(f"DELETE FROM {table} WHERE device = ?", (device.id,))
        conn.execute("DELETE FROM devices WHERE id = ?", (device.id,))
        conn.execute(
            "INSERT INTO deleted_devices (id, last_seq) VALUES (?, ?) ON CONFLICT (id)"
            " DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            (device.id, device.last_seq))


def _replace_doc(conn: sqlite3.Connection, key: str, gen: int, snapshot: bytes) -> None:
    """Make document ``key`` generation ``gen`` holding only ``snapshot``, at a fresh update
    id: the id of a row inserted and deleted at once (AUTOINCREMENT never gives it again),
    above every id a cached copy of the document can hold. Inside the caller's
    transaction."""
    fresh = conn.execute("INSERT INTO updates (key, gen, data) VALUES (?, ?, x'')", (key, gen))
    conn.execute("DELETE FROM updates WHERE key = ?", (key,))
    conn.execute(
        "INSERT INTO docs (key, gen, snapshot, snapshot_id) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET gen = excluded.gen, snapshot = excluded.snapshot,"
        " snapshot_id = excluded.snapshot_id", (key, gen, snapshot, fresh.lastrowid))


def _require_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
    device = _select_device(conn, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} does not exist", {"device": device_id})
    return device


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


# --- fleets (worker thread) --------------------------------------------------------------


def _fleet_from_row(row: Sequence[Any]) -> FleetRecord:
    id_, created, meta = row
    return FleetRecord(id=id_, created=created, meta=json.loads(meta))


def _add_fleet(conn: sqlite3.Connection, fleet: FleetRecord) -> None:
    cur = conn.execute(
        f"INSERT INTO fleets ({_FLEET_COLUMNS}) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (fleet.id, fleet.created, json_text(dict(fleet.meta))),
    )
    if cur.rowcount == 0:
        raise AlreadyExists(f"fleet {fleet.id!r} already exists", {"fleet": fleet.id})


def _select_fleet(conn: sqlite3.Connection, fleet_id: str) -> FleetRecord | None:
    row = conn.execute(
        f"SELECT {_FLEET_COLUMNS} FROM fleets WHERE id = ?", (fleet_id,)
    ).fetchone()
    return None if row is None else _fleet_from_row(row)


def _require_fleet(conn: sqlite3.Connection, fleet_id: str) -> None:
    if _select_fleet(conn, fleet_id) is None:
        raise NotFound(f"fleet {fleet_id!r} does not exist", {"fleet": fleet_id})


def _list_fleets(conn: sqlite3.Connection, after: str, limit: int) -> list[FleetRecord]:
    rows = conn.execute(
        f"SELECT {_FLEET_COLUMNS} FROM fleets WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )
    return [_fleet_from_row(row) for row in rows]


def _set_device_fleet(conn: sqlite3.Connection, device_id: str, fleet: str | None
                      ) -> DeviceRecord:
    with transaction(conn):
        device = _require_device(conn, device_id)
        if fleet is not None:
            _require_fleet(conn, fleet)
        if fleet == device.fleet:
            return device
        conn.execute("UPDATE devices SET fleet = ?, fleet_gen = fleet_gen + 1 WHERE id = ?",
                     (fleet, device.id))
    return dataclasses.replace(device, fleet=fleet, fleet_gen=device.fleet_gen + 1)


def _devices_in_fleet(conn: sqlite3.Connection, fleet: str, after: str, limit: int
                      ) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE fleet = ? AND id > ? ORDER BY id LIMIT ?",
        (fleet, after, limit),
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


def _touch_devices(conn: sqlite3.Connection, last_sync: dict[str, int]) -> None:
    with transaction(conn):
        conn.executemany(
            "UPDATE devices SET last_sync = ? WHERE id = ? AND"
            " (last_sync IS NULL OR last_sync < ?)",
            [(t, device, t) for device, t in last_sync.items()])


def _set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(conn, *args)`` as one transaction."""
    with transaction(conn):
        return fn(conn, *args)


def _observing(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> tuple[int, T]:
    """``PRAGMA data_version`` (changes when another connection commits), then ``fn``."""
    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
    return version, fn(conn, *args)
