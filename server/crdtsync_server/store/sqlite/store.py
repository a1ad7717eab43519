"""The default :class:`~crdtsync_server.store.roles.Store`: one SQLite file, stdlib ``sqlite3``,
put together from one mixin per role over one :class:`~.connection.SQLiteConnection`
(threading and durability are described there, the schema in ``sqlite/schema.py``, each
role's rules in its module).

This module holds the two writes that span roles. ``commit``: concurrent calls share one
transaction (:mod:`crdtsync_server.store.group_commit`; a write that fails is rolled back alone,
see ``_commit_group``).
``delete_device`` deletes the device's rows of every role in one transaction, turns each of
its documents into an empty snapshot at a fresh update id (so other processes' cached copies
reload), and keeps the device's ``last_seq`` in ``deleted_devices``.

Errors: ``sqlite3`` exceptions become :class:`StoreError` (``raise ... from``); the
crdtsync errors of the contract (``NotFound``, ``AlreadyExists``, ``SeqGap``,
``SeqConflict``) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence

from crdtsync._sqlite_worker import StoreBusy, transaction
from crdtsync.errors import CrdtsyncError, StoreError

from ..columns import log_stamps
from ..group_commit import GroupCommitter
from ..records import CommitResult, DeviceRecord, DocWrite, SyncWrite, synced
from ..rules import check_write, plan_events
from .connection import count_device_writes, in_transaction
from .devices import SQLiteDevices, require_device
from .documents import (
    Rebuild,
    SQLiteDocuments,
    delete_stamps,
    insert_updates,
    rebuild_in,
    replace_doc,
    write_stamps,
)
from .downlink import SQLiteDownlink, ack_downlink, ack_outcomes, insert_requests, leave
from .feed import SQLiteFeed, record_feed, stored_digests
from .files import SQLiteFiles
from .settings import SQLiteSettings
from .sinks import SQLiteSinks
from .wakes import SQLiteWakes, insert_wakes


class SQLiteStore(SQLiteDocuments, SQLiteDevices, SQLiteSettings, SQLiteDownlink, SQLiteFeed,
                  SQLiteSinks, SQLiteWakes, SQLiteFiles):
    """A :class:`Store` in the SQLite file ``path``.

    Use ``async with SQLiteStore(path) as store:`` or :meth:`open` / :meth:`aclose`.
    ``synchronous`` is the ``PRAGMA synchronous`` level (``OFF``, ``NORMAL``, ``FULL``,
    ``EXTRA``); ``FULL`` makes every returned commit survive power loss. Any method called
    before :meth:`open` or after :meth:`aclose` raises :class:`ClosedError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 instance: str | None = None) -> None:
        super().__init__(path, synchronous=synchronous, instance=instance)
        self.group_commit: GroupCommitter[Write, Outcome] = GroupCommitter(self._commit_group)
        """Batches concurrent :meth:`commit` and :meth:`rebuild` calls into one transaction
        (one fsync)."""

    def __repr__(self) -> str:
        return f"<SQLiteStore {self._db.path!r} {self._db.state}>"

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect, set the pragmas and migrate the schema; a no-op if already open.

        Raises :class:`StoreError` if the file is not a database, cannot be opened, or holds
        a newer schema (the file is then left untouched), and :class:`ClosedError` after
        :meth:`aclose`. After a failed open the store may be opened again."""
        await self._db.open()
        try:
            await self._db.run(count_device_writes, self._device_written)
            # After the migrations: other stores observe them when this registration shows.
            self.writers.open()
        except BaseException:
            await self._db.aclose()
            raise

    async def aclose(self) -> None:
        """Wait for queued calls, forget this instance (its running requests now count as
        interrupted), close the connection and stop the thread; idempotent."""
        await self.group_commit.drain()
        if self._db.state == "open":
            with contextlib.suppress(CrdtsyncError):
                await self._run(in_transaction, leave, self.instance)
        await self._db.aclose()
        self.writers.close()

    # the writes that span roles

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates, store new events, and apply the device's downlink progress,
        command results, new requests and outcome acknowledgements, in one transaction
        (see ``Store.commit``; the downlink and request rules are in ``sqlite/downlink.py``).

        Raises :class:`NotFound` for an unknown device, :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, and :class:`Unavailable` for a
        ``DocWrite`` of another generation than the stored one (``stale_generation``), in
        every case with nothing written;
        ``ValueError`` for device parts without a device, or a request whose ``device`` is
        not the write's."""
        check_write(write)
        result = await self.group_commit.submit(write)
        assert isinstance(result, CommitResult)
        return result

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        """Replace ``key`` by generation ``gen + 1`` holding ``snapshot`` if it is still at
        ``gen`` with nothing above ``upto_id`` (see ``Store.rebuild``), in the next group
        commit's ``BEGIN IMMEDIATE`` transaction, so the check and the write see no other
        process in between. Returns the new generation's snapshot id, ``None`` when the
        document moved on. It changes no device row.

        A rebuild is decided right after a sync of its document committed, while the syncs
        of other devices queue for the next group: riding that group's transaction saves a
        transaction of its own, its commit and its log sync (with devices that adopt, about
        one rebuild per group under load)."""
        result = await self.group_commit.submit(Rebuild(key, gen, upto_id, snapshot))
        assert result is None or isinstance(result, int)
        return result

    async def _commit_group(self, writes: list[Write]) -> list[Outcome | BaseException]:
        # On the event loop's thread when the store's is idle and the group small (most
        # groups), else in it. A commit changes no device row but its writer's, kept below
        # as written.
        try:
            if _rows(writes) > HERE_MAX_ROWS:
                raise StoreBusy("a large group is written in the store's thread")
            outcomes = await self._write_here_waking(_commit_group, writes,
                                                     self._rows_if_alone, forget_devices=False)
        except StoreBusy:
            outcomes = await self._run_waking(_commit_group, writes, forget_devices=False)
        for outcome in outcomes:  # the rows just written, for the next syncs' lookups
            if isinstance(outcome, CommitResult) and outcome.device is not None:
                self.known_devices.keep(outcome.device)
        return outcomes

    def _rows_if_alone(self) -> Mapping[str, DeviceRecord] | None:
        """The device rows this store kept as stored (``known_devices``) when it is the
        file's only writer, else ``None``: asked inside a commit's transaction on the loop's
        thread, where a write takes its device's row from here instead of reading it again,
        and its document's last id from its writer (:class:`Known`). While this store is
        alone, every row it did not write itself was forgotten, and others write none
        (``sqlite/writers.py``)."""
        return self.known_devices.by_id() if self.writers.alone() else None

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device and what belongs to it in one transaction (see
        ``Store.delete_device``). :class:`NotFound` for an unknown device."""
        await self._run(_delete_device, device_id, list(docs), events)


HERE_MAX_ROWS = 4096
"""Largest group run on the event loop's thread, in rows it writes (roughly: events, stamps,
updates, changes). A larger one (bulk ingestion, 1,000 events a sync) would hold the loop,
and every other connection, for tens of milliseconds: the store's thread writes it."""


Write = SyncWrite | Rebuild
"""A write of a group commit: a sync's (or a cloud write's), or a document's rebuild."""
Outcome = CommitResult | int | None
"""What a write of a group gives: a :class:`CommitResult`, or a rebuild's snapshot id."""


def _rows(writes: Sequence[Write]) -> int:
    return sum(1 if isinstance(w, Rebuild) else
               len(w.events) + len(w.stamps) + len(w.docs) + len(w.changes) for w in writes)


def _commit_group(conn: sqlite3.Connection, writes: Sequence[Write],
                  known: Callable[[], Mapping[str, DeviceRecord] | None] | None = None
                  ) -> list[Outcome | BaseException]:
    """Commit ``writes`` in one transaction; a write that raises is left out alone and its
    exception returned in its place (group commit). The transaction begins first, outside
    every write's handling: when it cannot begin, the caller gets that error.

    Optimistically first (:func:`_commit_all`): every write straight into the transaction,
    no savepoint. Writes are rarely refused (a seq gap, a stale generation), and a savepoint
    is not free: two more statements per write, and SQLite copies each page the write
    touches into its statement journal. If one is refused, that transaction is rolled back
    whole and the group runs again, each write in its own savepoint. A lone write needs no
    savepoint at all: its transaction is its own. ``known``, asked once the transaction
    began, gives the device rows known to be as stored, or ``None`` when other writers may
    have written (:class:`Known`).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = None if known is None else known()
    except BaseException:  # the connection must not stay inside the transaction
        _rollback(conn)
        raise
    if len(writes) == 1:
        return [_commit_alone(conn, writes[0], Known(rows))]
    outcomes = _commit_all(conn, writes, Known(rows))
    return outcomes if outcomes is not None else _commit_each(conn, writes)


def _commit_alone(conn: sqlite3.Connection, write: Write, known: Known
                  ) -> Outcome | BaseException:
    """One write as the whole begun transaction; its refusal returned, nothing stored."""
    try:
        result = _commit(conn, write, known)
        conn.execute("COMMIT")
    except (CrdtsyncError, ValueError, sqlite3.Error) as exc:
        _rollback(conn)
        return _refusal(exc)
    except BaseException:
        _rollback(conn)
        raise
    return result


def _commit_all(conn: sqlite3.Connection, writes: Sequence[Write], known: Known
                ) -> list[Outcome | BaseException] | None:
    """Every write in the begun transaction without savepoints; ``None``, with nothing
    stored, when one of them was refused."""
    outcomes: list[Outcome | BaseException] = []
    try:
        for write in writes:
            try:
                outcomes.append(_commit(conn, write, known))
            except (CrdtsyncError, ValueError, sqlite3.Error):
                _rollback(conn)
                return None
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return outcomes


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll the open transaction back; nothing when SQLite already did (a failed COMMIT)."""
    if conn.in_transaction:
        conn.rollback()


def _commit_each(conn: sqlite3.Connection, writes: Sequence[Write]
                 ) -> list[Outcome | BaseException]:
    """The group in one transaction, each write in its own savepoint."""
    outcomes: list[Outcome | BaseException] = []
    with transaction(conn):
        for write in writes:
            conn.execute("SAVEPOINT write")
            try:
                outcomes.append(_commit(conn, write, Known(None)))
            except (CrdtsyncError, ValueError, sqlite3.Error) as exc:
                if not conn.in_transaction:  # SQLite rolled the whole transaction back
                    raise
                conn.execute("ROLLBACK TO write")
                outcomes.append(_refusal(exc))
            finally:
                if conn.in_transaction:
                    conn.execute("RELEASE write")
    return outcomes


class Known:
    """What one group's transaction may take as stored without reading it, when ``rows`` is
    not ``None`` (the store is the file's only writer: ``SQLiteStore._rows_if_alone``): each
    device's row as kept there, and each document's highest update id as its writer's copy
    reflects it (``DocWrite.last_id``). Each device and document once: a second write of
    one in the same transaction reads what the first left."""

    __slots__ = ("devices", "docs", "rows")

    def __init__(self, rows: Mapping[str, DeviceRecord] | None) -> None:
        self.rows = rows
        self.devices: set[str] = set()
        self.docs: set[str] = set()

    def device(self, device_id: str) -> DeviceRecord | None:
        if self.rows is None or device_id in self.devices:
            return None
        self.devices.add(device_id)
        return self.rows.get(device_id)

    def last_id(self, write: DocWrite) -> int | None:
        if self.rows is None or write.last_id is None or write.key in self.docs:
            return None
        self.docs.add(write.key)
        return write.last_id


def _refusal(exc: Exception) -> BaseException:
    """What the caller of a refused write gets: ``sqlite3`` errors as :class:`StoreError`."""
    return StoreError(f"sqlite: {exc}") if isinstance(exc, sqlite3.Error) else exc


def _commit(conn: sqlite3.Connection, write: Write, known: Known) -> Outcome:
    """One write's statements, inside the caller's transaction; what ``known`` vouches for
    is not read again."""
    if isinstance(write, Rebuild):
        return rebuild_in(conn, write)
    logged, rest = log_stamps(write.docs, write.stamps)
    update_ids, prev_ids = insert_updates(conn, write.docs, known.last_id, logged)
    write_stamps(conn, rest)
    insert_wakes(conn, write.wakes, write.time)
    if write.device is None:
        record_feed(conn, None, write.time, (), write.changes, write.conflicts)
        return CommitResult(update_ids=update_ids, prev_ids=prev_ids)
    device = known.device(write.device) or require_device(conn, write.device)
    plan = plan_events(
        device.id, device.last_seq, write.purged, write.events,
        stored_digests(conn, device, write), seq_floor=device.seq_floor,
    )
    record_feed(conn, device, write.time, plan.new, write.changes, write.conflicts)
    last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
    down_done = ack_downlink(conn, device, write)
    new_requests = insert_requests(conn, device.id, write)
    ack_outcomes(conn, device.id, write)
    conn.execute(
        "UPDATE devices SET last_seq = ?, events_lost = events_lost + ?, last_sync = ?,"
        " down_done = ? WHERE id = ?",
        (last_seq, plan.lost, write.time, down_done, device.id),
    )
    return CommitResult(update_ids, last_seq, len(plan.new), down_done, new_requests,
                        prev_ids, synced(device, last_seq, plan.lost, write.time, down_done))


def _delete_device(conn: sqlite3.Connection, device_id: str, docs: list[str],
                   events: bool) -> None:
    with transaction(conn):
        device = require_device(conn, device_id)
        for key in docs:
            replace_doc(conn, key, 0, b"", keep_stamps=False)
        delete_stamps(conn, docs)
        for table in ("projection", "downlink", "requests", *(("feed",) if events else ())):
            conn.execute(f"DELETE FROM {table} WHERE device = ?", (device.id,))
        conn.execute("DELETE FROM devices WHERE id = ?", (device.id,))
        conn.execute(
            "INSERT INTO deleted_devices (id, last_seq) VALUES (?, ?) ON CONFLICT (id)"
            " DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            (device.id, device.last_seq))
