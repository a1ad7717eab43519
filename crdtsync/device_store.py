"""The device's local database: one SQLite file with the CRDT update log, the event outbox and
sync metadata.

Durability: WAL journal with ``synchronous=FULL`` by default, so every committed write (a
state change, an emitted event, an acknowledgement) survives a power cut; ``"NORMAL"`` trades
the last transactions before a power cut (never consistency) for speed. See
docs/architecture.md.

Two connections share the file: an aiosqlite connection for the async paths (outbox, meta,
compaction) and a plain ``sqlite3`` connection used only by :meth:`DeviceStore.append_update`,
because a state assignment (``dev.state["k"] = v``) is synchronous and must be durable before
it returns. That append is one small INSERT, bounded in time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from .errors import ClosedError, OutboxFull, StoreError

SCHEMA_VERSION = 1
MIGRATIONS: Sequence[str] = (
    # v1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY) STRICT;
    CREATE TABLE updates (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL,
                          data BLOB NOT NULL) STRICT;
    CREATE INDEX updates_doc ON updates (doc, id);
    CREATE TABLE snapshots (doc TEXT PRIMARY KEY, gen INTEGER NOT NULL DEFAULT 0,
                            data BLOB NOT NULL, upto INTEGER NOT NULL) STRICT;
    CREATE TABLE outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, time INTEGER NOT NULL,
                         body BLOB NOT NULL) STRICT;
    """,
)

OutboxPolicy = Literal["reject", "drop_oldest"]


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bound of the event outbox and what :meth:`DeviceStore.push_event` does when full:
    ``"reject"`` raises :class:`OutboxFull`; ``"drop_oldest"`` deletes the oldest unsent
    events (the cloud records them as lost)."""

    max_events: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    policy: OutboxPolicy = "reject"


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    seq: int
    topic: str
    time: int
    body: bytes  # msgpack


@dataclass(frozen=True, slots=True)
class LocalDoc:
    snapshot: bytes
    upto: int
    updates: tuple[tuple[int, bytes], ...]

    @property
    def last_id(self) -> int:
        return self.updates[-1][0] if self.updates else self.upto


class DeviceStore:
    """Local persistence of one device. Use ``async with DeviceStore(path) as store``."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError("synchronous must be FULL, NORMAL, EXTRA or OFF (tests only)")
        self.path = Path(path)
        self._synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        self._sync_db: sqlite3.Connection | None = None
        self._closed = False
        self.meta: dict[str, Any] = {}
        self.outbox_count = 0
        self.outbox_bytes = 0
        self.update_rows = 0
        """Update-log rows not yet folded into a snapshot (all documents)."""
        self.last_update_id = 0

    async def __aenter__(self) -> DeviceStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating if needed) and migrate the database; load meta and outbox counters.

        Raises :class:`StoreError` if the file is from a newer crdtsync or is not a database.
        """
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._configure(self._db)
            await self._migrate(self._db)
            self._sync_db = sqlite3.connect(self.path, isolation_level=None,
                                            check_same_thread=False)
            for pragma in self._pragmas():
                self._sync_db.execute(pragma)
            await self._load_counters()
        except sqlite3.Error as exc:
            await self.aclose()
            raise StoreError(f"cannot open device store {self.path}: {exc}") from exc
        except StoreError:
            await self.aclose()
            raise

    def _pragmas(self) -> list[str]:
        return ["PRAGMA journal_mode=WAL", f"PRAGMA synchronous={self._synchronous}",
                "PRAGMA busy_timeout=5000"]

    async def _configure(self, db: aiosqlite.Connection) -> None:
        for pragma in self._pragmas():
            await db.execute(pragma)

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"device store schema v{version} is newer than this crdtsync "
                             f"(v{SCHEMA_VERSION}); upgrade crdtsync")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await db.executescript(
                f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version={target}; COMMIT;"
            )

    async def _load_counters(self) -> None:
        db = self._conn()
        async with db.execute("SELECT key, value FROM meta") as cur:
            self.meta = {k: v for k, v in await cur.fetchall()}
        async with db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox") as c:
            row = await c.fetchone()
        self.outbox_count, self.outbox_bytes = (int(row[0]), int(row[1])) if row else (0, 0)

    async def aclose(self) -> None:
        """Close both connections; idempotent."""
        self._closed = True
        if self._sync_db is not None:
            self._sync_db.close()
            self._sync_db = None
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ClosedError("device store is closed")
        return self._db

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            await self._conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"device store write failed: {exc}") from exc

    # --- meta -----------------------------------------------------------------------------

    async def set_meta(self, **values: Any) -> None:
        """Persist metadata values (int, str, bytes) in one transaction."""
        db = self._conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 list(values.items()))
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise StoreError(f"device store write failed: {exc}") from exc
        self.meta.update(values)

    async def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            await self._db.execute("ROLLBACK")

    # --- CRDT update log ------------------------------------------------------------------

    async def load_doc(self, doc: str) -> LocalDoc:
        """The stored snapshot of ``doc`` and the updates logged after it."""
        db = self._conn()
        async with db.execute("SELECT data, upto FROM snapshots WHERE doc = ?", (doc,)) as cur:
            row = await cur.fetchone()
        snapshot, upto = (bytes(row[0]), int(row[1])) if row else (b"", 0)
        async with db.execute("SELECT id, data FROM updates WHERE doc = ? AND id > ? ORDER BY id",
                              (doc, upto)) as cur:
            updates = tuple((int(i), bytes(d)) for i, d in await cur.fetchall())
        local = LocalDoc(snapshot, upto, updates)
        self.update_rows = len(updates)
        self.last_update_id = local.last_id
        return local

    def append_update(self, doc: str, data: bytes) -> int:
        """Append one update to the log, durably, before returning its id (synchronous)."""
        if self._sync_db is None:
            raise ClosedError("device store is closed")
        try:
            cur = self._sync_db.execute("INSERT INTO updates (doc, data) VALUES (?, ?)",
                                        (doc, data))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot persist a state change: {exc}") from exc
        self.update_rows += 1
        self.last_update_id = int(cur.lastrowid or 0)
        return self.last_update_id

    async def compact(self, doc: str, upto: int, snapshot: bytes) -> None:
        """Store ``snapshot`` (covering every update id <= ``upto``) and delete those rows."""
        db = self._conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            await db.execute(
                "INSERT INTO snapshots (doc, data, upto) VALUES (?, ?, ?) ON CONFLICT (doc) "
                "DO UPDATE SET data = excluded.data, upto = excluded.upto "
                "WHERE excluded.upto > snapshots.upto", (doc, snapshot, upto))
            await db.execute("DELETE FROM updates WHERE doc = ? AND id <= ?", (doc, upto))
            async with db.execute("SELECT COUNT(*) FROM updates") as cur:
                count_row = await cur.fetchone()
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise StoreError(f"compaction failed: {exc}") from exc
        self.update_rows = int(count_row[0]) if count_row else 0

    # --- outbox ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        return int(self.meta.get("next_seq", 1))

    async def push_event(self, topic: str, time: int, body: bytes,
                         limits: OutboxLimits) -> int:
        """Durably queue an event and return its seq; apply the outbox policy when full."""
        if len(body) > limits.max_bytes:
            raise OutboxFull("event is larger than the whole outbox bound")
        drop = self._overflow(len(body), limits)
        db = self._conn()
        seq = self._next_seq()
        try:
            await db.execute("BEGIN IMMEDIATE")
            dropped = await self._drop_oldest(db, drop) if drop else (0, 0, 0)
            await db.execute("INSERT INTO outbox (seq, topic, time, body) VALUES (?, ?, ?, ?)",
                             (seq, topic, time, body))
            meta = {"next_seq": seq + 1}
            if dropped[0]:
                meta["purged"] = max(int(self.meta.get("purged", 0)), dropped[0])
            await db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 list(meta.items()))
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise StoreError(f"cannot queue event: {exc}") from exc
        self.meta.update(meta)
        self.outbox_count += 1 - dropped[1]
        self.outbox_bytes += len(body) - dropped[2]
        return seq

    def _overflow(self, size: int, limits: OutboxLimits) -> int:
        """How many oldest events to drop to fit one more of ``size`` bytes (0 if it fits)."""
        full = (self.outbox_count + 1 > limits.max_events
                or self.outbox_bytes + size > limits.max_bytes)
        if not full:
            return 0
        if limits.policy == "reject":
            raise OutboxFull(
                f"outbox holds {self.outbox_count} events / {self.outbox_bytes} bytes "
                f"(bound {limits.max_events} / {limits.max_bytes})",
                {"count": self.outbox_count, "bytes": self.outbox_bytes},
            )
        excess_count = self.outbox_count + 1 - limits.max_events
        return max(excess_count, 1)

    async def _drop_oldest(self, db: aiosqlite.Connection, at_least: int) -> tuple[int, int, int]:
        """Delete the oldest events (at least ``at_least``, more until the bytes fit);
        return (highest dropped seq, count, bytes)."""
        async with db.execute(
            "SELECT seq, LENGTH(body) FROM outbox ORDER BY seq LIMIT ?", (at_least,)
        ) as cur:
            rows = list(await cur.fetchall())
        if not rows:
            return (0, 0, 0)
        last = int(rows[-1][0])
        await db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        return (last, len(rows), sum(int(r[1]) for r in rows))

    async def pending(self, limit: int, max_bytes: int) -> list[OutboxEvent]:
        """The oldest queued events, at most ``limit`` and about ``max_bytes`` (at least one)."""
        out: list[OutboxEvent] = []
        size = 0
        async with self._conn().execute(
            "SELECT seq, topic, time, body FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ) as cur:
            async for seq, topic, time, body in cur:
                if out and size + len(body) > max_bytes:
                    break
                out.append(OutboxEvent(int(seq), topic, int(time), bytes(body)))
                size += len(body)
        return out

    async def ack(self, seq: int) -> int:
        """Delete events with seq <= ``seq`` (the cloud stored them); return how many."""
        if seq <= int(self.meta.get("purged", 0)) and self.outbox_count == 0:
            return 0
        db = self._conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            async with db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox WHERE seq <= ?",
                (seq,),
            ) as cur:
                row = await cur.fetchone()
            count, size = (int(row[0]), int(row[1])) if row else (0, 0)
            await db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
            purged = max(int(self.meta.get("purged", 0)), seq)
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('purged', ?)",
                             (purged,))
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise StoreError(f"cannot purge acknowledged events: {exc}") from exc
        self.meta["purged"] = purged
        self.outbox_count -= count
        self.outbox_bytes -= size
        return count

    async def renumber(self, from_seq: int, start: int) -> None:
        """Give queued events with seq >= ``from_seq`` new consecutive seqs from ``start``.

        Used when the cloud reports a seq it already holds with other content (a wiped or
        restored device store): those events were never stored, so new numbers are safe.
        """
        db = self._conn()
        offset = start - from_seq
        try:
            await db.execute("BEGIN IMMEDIATE")
            # Negate first so that shifting never collides with an existing primary key.
            await db.execute("UPDATE outbox SET seq = -(seq + ?) WHERE seq >= ?",
                             (offset, from_seq))
            await db.execute("UPDATE outbox SET seq = -seq WHERE seq < 0")
            async with db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox") as cur:
                row = await cur.fetchone()
            next_seq = max(int(row[0]) if row else 0, start - 1) + 1
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)",
                             (next_seq,))
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            raise StoreError(f"cannot renumber events: {exc}") from exc
        self.meta["next_seq"] = next_seq
