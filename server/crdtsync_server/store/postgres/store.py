"""The :class:`~crdtsync_server.store.roles.Store` on PostgreSQL, for several server
instances sharing one database: put together from one mixin per role over one
:class:`~.connection.PostgresConnection` (pool, timeouts, commit order and announcements
are described there, the schema in ``postgres/schema.py``, each role's rules in its module).

This module holds the two writes that span roles. ``commit``: concurrent calls of this
instance share one transaction, each write in its own savepoint
(:mod:`crdtsync_server.store.group_commit`); the transaction takes the sequence lock first
(it appends updates, feed items and wake entries) and locks the device's row, so two
instances committing syncs of one device run one after the other and events stay exactly
once per ``(device, seq)``. ``delete_device`` deletes the device's rows of every role in
one transaction.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence

import asyncpg

from crdtsync.errors import CrdtsyncError

from ..columns import log_stamps
from ..group_commit import GroupCommitter
from ..records import CommitResult, SyncWrite
from ..rules import check_write, plan_events
from .connection import announce, sequenced, store_error
from .devices import PostgresDevices, require_device
from .documents import PostgresDocuments, delete_stamps, insert_updates, replace_doc, write_stamps
from .downlink import PostgresDownlink, ack_downlink, ack_outcomes, insert_requests
from .feed import PostgresFeed, insert_events, record_changes, record_conflicts, stored_digests
from .files import PostgresFiles
from .settings import PostgresSettings
from .sinks import PostgresSinks
from .wakes import PostgresWakes, insert_wakes


class PostgresStore(PostgresDocuments, PostgresDevices, PostgresSettings, PostgresDownlink,
                    PostgresFeed, PostgresSinks, PostgresWakes, PostgresFiles):
    """A :class:`Store` in the PostgreSQL database at ``url``
    (``postgresql://user@host:port/dbname``).

    Use ``async with PostgresStore(url) as store:`` or :meth:`open` / :meth:`aclose`.
    Keyword arguments are those of :class:`~.connection.PostgresConnection` (``schema``,
    pool sizes, timeouts). ``instance`` names this server instance (random by default):
    the runner of the proxied requests it claims.
    """

    def __init__(self, url: str, *, instance: str | None = None, **kwargs: object) -> None:
        super().__init__(url, **kwargs)  # type: ignore[arg-type]
        self.instance = instance or secrets.token_hex(8)
        self.group_commit: GroupCommitter[SyncWrite, CommitResult] = GroupCommitter(
            self._commit_group)
        """Batches concurrent :meth:`commit` calls into one transaction."""

    def __repr__(self) -> str:
        where = self.url.rsplit("@", 1)[-1]  # never the password
        return f"<PostgresStore {where!r} schema={self.schema!r}>"

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect the pool and the listener and migrate the schema; a no-op if open.
        :class:`StoreError` for a newer schema, :class:`Unavailable` when the database
        cannot be reached."""
        await self._connect()

    async def aclose(self) -> None:
        """Wait for queued commits, forget this instance (its running requests now count as
        interrupted), then close the pool and the listener; idempotent."""
        await self.group_commit.drain()
        if self._pool is not None:
            with contextlib.suppress(CrdtsyncError):
                await self.leave()
        await self._disconnect()
        self._closed = True

    # the writes that span roles

    async def commit(self, write: SyncWrite) -> CommitResult:
        """See ``Store.commit``."""
        check_write(write)
        return await self.group_commit.submit(write)

    async def _commit_group(self, writes: list[SyncWrite]
                            ) -> list[CommitResult | BaseException]:
        return await self._write(_commit_group, writes)

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """See ``Store.delete_device``."""
        await self._write(_delete_device, device_id, list(docs), events)


async def _commit_group(conn: asyncpg.Connection, writes: Sequence[SyncWrite]
                        ) -> list[CommitResult | BaseException]:
    """Commit ``writes`` in the caller's transaction, each in its own savepoint: a write
    that raises is rolled back alone and its exception returned in its place."""
    await sequenced(conn)
    outcomes: list[CommitResult | BaseException] = []
    for write in writes:
        try:
            async with conn.transaction():  # a savepoint
                outcomes.append(await _commit(conn, write))
        except (CrdtsyncError, ValueError) as exc:
            outcomes.append(exc)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            outcomes.append(store_error(exc))
    return outcomes


async def _commit(conn: asyncpg.Connection, write: SyncWrite) -> CommitResult:
    """One write's statements, inside the caller's transaction."""
    logged, rest = log_stamps(write.docs, write.stamps)
    update_ids, prev_ids = await insert_updates(conn, write.docs, logged)
    await write_stamps(conn, rest)
    await insert_wakes(conn, write.wakes, write.time)
    if write.device is None:
        await record_changes(conn, write.changes, None, write.time)
        await record_conflicts(conn, write.conflicts, None, write.time)
        return CommitResult(update_ids=update_ids, prev_ids=prev_ids)
    device = await require_device(conn, write.device, lock=True)
    plan = plan_events(
        device.id, device.last_seq, write.purged, write.events,
        await stored_digests(conn, device, write), seq_floor=device.seq_floor,
    )
    await insert_events(conn, device, write.time, plan)
    await record_changes(conn, write.changes, device, write.time)
    await record_conflicts(conn, write.conflicts, device, write.time)
    last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
    down_done = await ack_downlink(conn, device, write)
    new_requests = await insert_requests(conn, device.id, write)
    await ack_outcomes(conn, device.id, write)
    if write.results:
        await announce(conn, "r", device.id)
    await conn.execute(
        "UPDATE devices SET last_seq = $1, events_lost = events_lost + $2, last_sync = $3,"
        " down_done = $4 WHERE id = $5",
        last_seq, plan.lost, write.time, down_done, device.id,
    )
    return CommitResult(update_ids, last_seq, len(plan.new), down_done, new_requests,
                        prev_ids)


async def _delete_device(conn: asyncpg.Connection, device_id: str, docs: list[str],
                         events: bool) -> None:
    await sequenced(conn)
    device = await require_device(conn, device_id, lock=True)
    for key in docs:
        await replace_doc(conn, key, 0, b"", keep_stamps=False)
    await delete_stamps(conn, docs)
    for table in ("projection", "downlink", "requests", *(("feed",) if events else ())):
        await conn.execute(f"DELETE FROM {table} WHERE device = $1", device.id)
    await conn.execute("DELETE FROM devices WHERE id = $1", device.id)
    await conn.execute(
        "INSERT INTO deleted_devices (id, last_seq) VALUES ($1, $2) ON CONFLICT (id)"
        " DO UPDATE SET last_seq = GREATEST(deleted_devices.last_seq, excluded.last_seq)",
        device.id, device.last_seq)
