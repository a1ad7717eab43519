"""The device's local database: one SQLite file with the CRDT update log, the dirty keys (local
writes the cloud has not acknowledged, with their stamps and values), the event outbox and
sync metadata.

Durability: WAL journal with ``synchronous=FULL`` by default, so every committed write (a
state change, an emitted event, an acknowledgement) survives a power cut; ``"NORMAL"`` trades
the last transactions before a power cut (never consistency) for speed. See
docs/architecture.md.

Every operation is one transaction run in the connection's own thread
(:class:`~crdtsync._sqlite_worker.SQLiteWorker`). A state assignment (``dev.state["k"] = v``)
is synchronous and must be durable before it returns, so :meth:`DeviceStore.append_update`
waits for that thread from the event loop; it cannot deadlock, because no transaction ever
spans an ``await``. The in-memory mirror (``meta``, outbox counters) is changed only inside
those functions, after their commit, so it never runs ahead of the file.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._sqlite_worker import SQLiteWorker, transaction
from .errors import OutboxFull
from .hlc import COUNTER_BITS

T = TypeVar("T")

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
    # v2: command results waiting for the cloud, proxied requests and their outcomes
    """
    CREATE TABLE results (seq INTEGER PRIMARY KEY, ok INTEGER NOT NULL, body BLOB NOT NULL)
        STRICT;
    CREATE TABLE calls (id TEXT PRIMARY KEY, route TEXT NOT NULL, body BLOB NOT NULL,
                        created INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
                        outcome BLOB) STRICT;
    CREATE INDEX calls_status ON calls (status, created);
    """,
    # v3: the template (hash, hex) an event was emitted with, or NULL
    """
    ALTER TABLE outbox ADD COLUMN template TEXT;
    """,
    # v4: dirty keys, the root-map keys of `state` written locally and not yet acknowledged
    # by the cloud, with the local version of their last write (docs/protocol.md 9.1)
    """
    CREATE TABLE dirty (map TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
                        PRIMARY KEY (map, key)) STRICT;
    """,
    # v5: what each dirty key's last local write was: its hybrid-logical-clock stamp (NULL
    # for rows written before v5: the device stamps them when it starts), the value written
    # (msgpack; NULL: deleted, or a shared type) and whether it is a shared type (merged by
    # Yjs, not stamped on the wire) (docs/protocol.md 9.1)
    """
    ALTER TABLE dirty ADD COLUMN stamp INTEGER;
    ALTER TABLE dirty ADD COLUMN value BLOB;
    ALTER TABLE dirty ADD COLUMN nested INTEGER NOT NULL DEFAULT 0;
    """,
    # v6: files (crdtsync/_files.py): queued to send (their bytes copied under <path>.files/out)
    # and received, verified (under <path>.files/in), with whether on_file handlers ran
    """
    CREATE TABLE files_out (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
                            meta TEXT NOT NULL, queued INTEGER NOT NULL) STRICT;
    CREATE TABLE files_in (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
                           meta TEXT NOT NULL, handled INTEGER NOT NULL DEFAULT 0) STRICT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

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
    template: str | None = None
    """Hash (hex) of the template the event was emitted with; its definition is in
    ``meta["template:<hash>"]``."""


@dataclass(frozen=True, slots=True)
class LocalDoc:
    snapshot: bytes
    upto: int
    updates: tuple[tuple[int, bytes], ...]

    @property
    def last_id(self) -> int:
        return self.updates[-1][0] if self.updates else self.upto


@dataclass(frozen=True, slots=True)
class StoredCall:
    """A proxied request as the device keeps it: ``pending`` (not yet accepted by the cloud),
    ``accepted``, ``done`` (outcome stored, its acknowledgement not yet sent) or ``acked``."""

    id: str
    route: str
    body: bytes
    created: int
    status: str
    outcome: bytes | None


QueuedEvent = tuple[str, int, bytes, str | None]
"""``(topic, time, msgpack body, template hash or None)`` of an event to queue."""

DirtyKey = tuple[str, str]
"""``(root map name, key)`` of the device's own document."""


@dataclass(frozen=True, slots=True)
class DirtyWrite:
    """The last local write of a dirty key: its stamp (:mod:`crdtsync.hlc`, the device's
    clock) and what it wrote: ``value`` the msgpack of the plain JSON value, ``None`` for a
    delete; ``nested`` when the key holds a shared type (``Y.Map``, ``Y.Array``,
    ``Y.Text``), whose edits Yjs merges (then ``value`` is ``None`` and the write is not
    sent with a stamp, docs/protocol.md 9.2)."""

    map: str
    key: str
    stamp: int
    value: bytes | None = None
    nested: bool = False

    @property
    def where(self) -> DirtyKey:
        return (self.map, self.key)


@dataclass
class _Mirror:
    """What the device keeps in memory about its file; written only by the store thread."""

    meta: dict[str, Any] = field(default_factory=dict)
    outbox_count: int = 0
    outbox_bytes: int = 0
    update_rows: int = 0
    last_update_id: int = 0
    results: int = 0
    """Command results not yet acknowledged by the cloud."""
    calls: dict[str, int] = field(default_factory=dict)
    """Proxied requests per status."""
    dirty: int = 0
    """Dirty keys stored."""
    dirty_version: int = 0
    """The highest version of a stored dirty key (0 when there is none)."""
    dirty_stamp: int = 0
    """The highest stamp of a stored dirty key (0 when there is none)."""


class DeviceStore:
    """Local persistence of one device. Use ``async with DeviceStore(path) as store``."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        # A device database is small: checkpoint its log every 1 MB (not 4), so the files stay
        # small on a gateway hosting hundreds of devices.
        self._db = SQLiteWorker(path, migrations=MIGRATIONS, synchronous=synchronous,
                                name="crdtsync-device", wal_pages=256)
        self._m = _Mirror()

    async def __aenter__(self) -> DeviceStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open (creating if needed) and migrate the database; load meta and counters.

        Raises :class:`~crdtsync.errors.StoreError` if the file is not a database or is
        from a newer crdtsync (the file is left untouched)."""
        await self._db.open()
        await self._db.run(_load_mirror, self._m)

    async def aclose(self) -> None:
        """Close the connection; idempotent."""
        await self._db.aclose()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the store's thread: for a module that owns its own
        tables (``crdtsync/_files.py``: ``files_out``, ``files_in``)."""
        return await self._db.run(fn, *args)

    # --- the mirror -------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """Sync metadata (client id, next seq, purged seq, last known server state vector,
        the generation of each document as ``gen:<doc>``, the device clock's ``clock_last``
        and ``clock_offset``). Read-only for callers: change it with :meth:`set_meta` (or
        :meth:`clear_dirty`, :meth:`replace_doc`)."""
        return self._m.meta

    @property
    def outbox_count(self) -> int:
        return self._m.outbox_count

    @property
    def outbox_bytes(self) -> int:
        return self._m.outbox_bytes

    @property
    def update_rows(self) -> int:
        """Update-log rows not yet folded into a snapshot (all documents)."""
        return self._m.update_rows

    @property
    def last_update_id(self) -> int:
        return self._m.last_update_id

    @property
    def result_count(self) -> int:
        """Command results waiting for the cloud's acknowledgement."""
        return self._m.results

    def call_count(self, *statuses: str) -> int:
        """How many proxied requests are in any of ``statuses``."""
        return sum(self._m.calls.get(status, 0) for status in statuses)

    @property
    def dirty_count(self) -> int:
        """Dirty keys stored (local writes the cloud has not acknowledged)."""
        return self._m.dirty

    @property
    def dirty_stamp(self) -> int:
        """The highest stamp recorded with a dirty key, 0 when there is none: with
        ``meta["clock_last"]`` (stored with each applied response) the greatest stamp the
        device ever issued, so a restarted clock stamps on from there."""
        return self._m.dirty_stamp

    @property
    def dirty_version(self) -> int:
        """The highest local version recorded with a dirty key, 0 when there is none: a
        device numbers its local writes on from here after a restart, so that versions
        stay monotonic across restarts for as long as they matter."""
        return self._m.dirty_version

    # --- operations ---------------------------------------------------------------------

    async def set_meta(self, **values: Any) -> None:
        """Persist metadata values (int, str, bytes) in one transaction."""
        await self._db.run(_set_meta, self._m, values)

    async def load_doc(self, doc: str) -> LocalDoc:
        """The stored snapshot of ``doc`` and the updates logged after it."""
        return await self._db.run(_load_doc, self._m, doc)

    def append_update(self, doc: str, data: bytes, dirty: Sequence[DirtyWrite] = (),
                      version: int = 0) -> int:
        """Append one update to the log, durably, before returning its id (synchronous).

        ``dirty`` are the writes of the keys the update wrote locally: they are recorded
        with ``version`` (replacing an older write of the same key) in the same
        transaction."""
        return self._db.run_blocking(_append_update, self._m, doc, data, tuple(dirty),
                                     version)

    async def dirty_keys(self) -> list[DirtyKey]:
        """The dirty keys, sorted."""
        if not self._m.dirty:
            return []
        return await self._db.run(_dirty_keys)

    async def dirty_writes(self) -> list[DirtyWrite]:
        """The last write of each dirty key that has a stamp, sorted by map and key."""
        if not self._m.dirty:
            return []
        return await self._db.run(_dirty_writes)

    async def unstamped_keys(self) -> list[DirtyKey]:
        """Dirty keys recorded before stamps existed (schema v4), sorted: the device
        stamps them (:meth:`mark_dirty`) when it starts."""
        if not self._m.dirty:
            return []
        return await self._db.run(_unstamped_keys)

    async def clear_dirty(self, upto: int | None, *, shift_ms: int = 0, **meta: Any) -> None:
        """Forget the dirty keys whose version is ``<= upto`` (the cloud acknowledged every
        local write up to that version; ``None``: none), move the stamps of those that stay
        ``shift_ms`` later (the device's clock moved forward: they stay in its frame,
        docs/protocol.md 9.2) and store ``meta`` values, in one transaction; no write when
        there is nothing to do."""
        if self._m.dirty or meta:
            await self._db.run(_clear_dirty, self._m, upto, shift_ms, meta)

    async def mark_dirty(self, writes: Sequence[DirtyWrite], version: int) -> None:
        """Record local ``writes`` with ``version`` (replacing an older write of the same
        key), in one transaction."""
        if writes:
            await self._db.run(_mark_dirty, self._m, tuple(writes), version)

    async def compact(self, doc: str, upto: int, snapshot: bytes) -> None:
        """Store ``snapshot`` (covering every update id <= ``upto``) and delete those rows."""
        await self._db.run(_compact, self._m, doc, upto, snapshot)

    async def replace_doc(self, doc: str, snapshot: bytes, meta: Mapping[str, Any], *,
                          carried: bool = False, dirty: Sequence[DirtyWrite] = (),
                          version: int = 0, shift_ms: int = 0) -> None:
        """Make ``snapshot`` the whole stored state of ``doc`` (its log rows go) and set
        ``meta``, in one transaction: a shared document's new copy, or a new generation of
        the device's own document (adoption, docs/protocol.md 8.1). With ``carried``, every
        dirty key already stored takes ``version`` (keeping its stamp and value: it is
        carried into the new document), ``dirty`` adds writes of keys not yet dirty, and
        every dirty stamp moves ``shift_ms`` later (as in :meth:`clear_dirty`)."""
        await self._db.run(_replace_doc, self._m, doc, snapshot, dict(meta), carried,
                           tuple(dirty), version, shift_ms)

    async def push_event(self, topic: str, time: int, body: bytes,
                         limits: OutboxLimits, template: str | None = None) -> int:
        """Durably queue an event and return its seq; apply the outbox policy when full.
        ``template`` is the hash (hex) of the template it must travel with."""
        seqs = await self.push_events([(topic, time, body, template)], limits)
        return seqs[0]

    async def push_events(self, items: Sequence[QueuedEvent], limits: OutboxLimits
                          ) -> list[int]:
        """Durably queue several ``(topic, time, body, template)`` events in one transaction
        (one fsync), all or none; return their seqs."""
        return await self._db.run(_push_events, self._m, items, limits)

    async def pending(self, limit: int, max_bytes: int) -> list[OutboxEvent]:
        """The oldest queued events, at most ``limit`` and about ``max_bytes`` (at least one)."""
        return await self._db.run(_pending, limit, max_bytes)

    async def ack(self, seq: int) -> int:
        """Delete events with seq <= ``seq`` (the cloud stored them); return how many."""
        return await self._db.run(_ack, self._m, seq)

    # --- downlink and proxied requests ------------------------------------------------------

    async def finish_down(self, seq: int, result: tuple[bool, bytes] | None = None) -> None:
        """Record that downlink item ``seq`` is processed (``down_done``), with a command's
        ``(ok, msgpack body)`` result to send, in one transaction."""
        await self._db.run(_finish_down, self._m, seq, result)

    async def results(self, limit: int) -> list[tuple[int, bool, bytes]]:
        """Command results not yet acknowledged by the cloud, oldest first."""
        if not self._m.results:
            return []
        return await self._db.run(_results, limit)

    async def ack_results(self, upto: int) -> None:
        """Forget results of commands with seq <= ``upto`` (the cloud stored them)."""
        if self._m.results:
            await self._db.run(_ack_results, self._m, upto)

    async def add_call(self, call_id: str, route: str, body: bytes, created: int) -> bool:
        """Queue a proxied request durably; False if ``call_id`` is already known."""
        return await self._db.run(_add_call, self._m, call_id, route, body, created)

    async def calls(self, status: str, limit: int = 1000) -> list[StoredCall]:
        """Proxied requests in ``status``, oldest first."""
        if not self._m.calls.get(status):
            return []
        return await self._db.run(_calls, status, limit)

    async def get_call(self, call_id: str) -> StoredCall | None:
        return await self._db.run(_get_call, call_id)

    async def set_calls(self, ids: Sequence[str], status: str, *, only: str | None = None,
                        outcome: bytes | None = None) -> None:
        """Move requests ``ids`` to ``status`` (only those currently in ``only``, if given),
        storing ``outcome`` when given."""
        await self._db.run(_set_calls, self._m, list(ids), status, only, outcome)

    async def renumber(self, from_seq: int, start: int) -> None:
        """Give queued events with seq >= ``from_seq`` new consecutive seqs from ``start``.

        Used when the cloud reports a seq it already holds with other content (a wiped or
        restored device store): those events were never stored, so new numbers are safe.
        """
        await self._db.run(_renumber, self._m, from_seq, start)


# --- transactions (store thread) -----------------------------------------------------------

def _load_mirror(conn: sqlite3.Connection, m: _Mirror) -> None:
    m.meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    highest = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()[0]
    if highest is not None:  # emits store only their row: the next seq follows the outbox
        m.meta["next_seq"] = max(int(m.meta.get("next_seq", 1)), int(highest) + 1)
    m.outbox_count, m.outbox_bytes = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()
    _count_side_tables(conn, m)
    _count_dirty(conn, m)


def _count_side_tables(conn: sqlite3.Connection, m: _Mirror) -> None:
    m.results = int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    m.calls = dict(conn.execute("SELECT status, COUNT(*) FROM calls GROUP BY status"))


def _write_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                     list(values.items()))


def _set_meta(conn: sqlite3.Connection, m: _Mirror, values: dict[str, Any]) -> None:
    with transaction(conn):
        _write_meta(conn, values)
    m.meta.update(values)


def _load_doc(conn: sqlite3.Connection, m: _Mirror, doc: str) -> LocalDoc:
    row = conn.execute("SELECT data, upto FROM snapshots WHERE doc = ?", (doc,)).fetchone()
    snapshot, upto = (bytes(row[0]), int(row[1])) if row else (b"", 0)
    rows = conn.execute("SELECT id, data FROM updates WHERE doc = ? AND id > ? ORDER BY id",
                        (doc, upto)).fetchall()
    local = LocalDoc(snapshot, upto, tuple((int(i), bytes(d)) for i, d in rows))
    m.update_rows = len(local.updates)
    m.last_update_id = local.last_id
    return local


def _append_update(conn: sqlite3.Connection, m: _Mirror, doc: str, data: bytes,
                   dirty: tuple[DirtyWrite, ...], version: int) -> int:
    if dirty:
        with transaction(conn):
            row = _insert_update(conn, doc, data)
            _write_dirty(conn, dirty, version)
        _count_dirty(conn, m)
    else:  # one statement in autocommit mode is its own durable transaction
        row = _insert_update(conn, doc, data)
    m.update_rows += 1
    m.last_update_id = row
    return row


def _insert_update(conn: sqlite3.Connection, doc: str, data: bytes) -> int:
    cur = conn.execute("INSERT INTO updates (doc, data) VALUES (?, ?)", (doc, data))
    return int(cur.lastrowid or 0)


_INSERT_DIRTY = ("INSERT INTO dirty (map, key, version, stamp, value, nested) "
                 "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (map, key) ")


def _write_dirty(conn: sqlite3.Connection, writes: tuple[DirtyWrite, ...], version: int, *,
                 keep: bool = False) -> None:
    """Record ``writes`` with ``version``. A key already dirty takes the new write (its
    version never goes down), or with ``keep`` stays as it is."""
    conn.executemany(
        _INSERT_DIRTY + ("DO NOTHING" if keep else
                         "DO UPDATE SET version = MAX(version, excluded.version), "
                         "stamp = excluded.stamp, value = excluded.value, "
                         "nested = excluded.nested"),
        [(w.map, w.key, version, w.stamp, w.value, int(w.nested)) for w in writes])


def _count_dirty(conn: sqlite3.Connection, m: _Mirror) -> None:
    m.dirty, m.dirty_version, m.dirty_stamp = (int(v) for v in conn.execute(
        "SELECT COUNT(*), COALESCE(MAX(version), 0), COALESCE(MAX(stamp), 0) FROM dirty"
    ).fetchone())


def _dirty_keys(conn: sqlite3.Connection) -> list[DirtyKey]:
    return [(str(n), str(k)) for n, k in conn.execute(
        "SELECT map, key FROM dirty ORDER BY map, key")]


def _dirty_writes(conn: sqlite3.Connection) -> list[DirtyWrite]:
    rows = conn.execute("SELECT map, key, stamp, value, nested FROM dirty "
                        "WHERE stamp IS NOT NULL ORDER BY map, key")
    return [DirtyWrite(str(n), str(k), int(s), bytes(v) if v is not None else None,
                       bool(nested)) for n, k, s, v, nested in rows]


def _unstamped_keys(conn: sqlite3.Connection) -> list[DirtyKey]:
    return [(str(n), str(k)) for n, k in conn.execute(
        "SELECT map, key FROM dirty WHERE stamp IS NULL ORDER BY map, key")]


def _clear_dirty(conn: sqlite3.Connection, m: _Mirror, upto: int | None, shift_ms: int,
                 meta: dict[str, Any]) -> None:
    with transaction(conn):
        if m.dirty and upto is not None:
            conn.execute("DELETE FROM dirty WHERE version <= ?", (upto,))
        _shift_stamps(conn, shift_ms)
        _write_meta(conn, meta)
    m.meta.update(meta)
    _count_dirty(conn, m)


def _shift_stamps(conn: sqlite3.Connection, ms: int) -> None:
    if ms > 0:
        conn.execute("UPDATE dirty SET stamp = stamp + ? WHERE stamp IS NOT NULL",
                     (ms << COUNTER_BITS,))


def _mark_dirty(conn: sqlite3.Connection, m: _Mirror, writes: tuple[DirtyWrite, ...],
                version: int) -> None:
    with transaction(conn):
        _write_dirty(conn, writes, version)
    _count_dirty(conn, m)


def _compact(conn: sqlite3.Connection, m: _Mirror, doc: str, upto: int,
             snapshot: bytes) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO snapshots (doc, data, upto) VALUES (?, ?, ?) ON CONFLICT (doc) "
            "DO UPDATE SET data = excluded.data, upto = excluded.upto "
            "WHERE excluded.upto > snapshots.upto", (doc, snapshot, upto))
        conn.execute("DELETE FROM updates WHERE doc = ? AND id <= ?", (doc, upto))
        remaining = int(conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0])
    m.update_rows = remaining


def _replace_doc(conn: sqlite3.Connection, m: _Mirror, doc: str, snapshot: bytes,
                 meta: dict[str, Any], carried: bool, dirty: tuple[DirtyWrite, ...],
                 version: int, shift_ms: int) -> None:
    with transaction(conn):
        conn.execute("INSERT OR REPLACE INTO snapshots (doc, data, upto) VALUES (?, ?, ?)",
                     (doc, snapshot, m.last_update_id))
        conn.execute("DELETE FROM updates WHERE doc = ?", (doc,))
        _write_meta(conn, meta)
        if carried:
            conn.execute("UPDATE dirty SET version = MAX(version, ?)", (version,))
            _write_dirty(conn, dirty, version, keep=True)
            _shift_stamps(conn, shift_ms)
        remaining = int(conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0])
    m.meta.update(meta)
    m.update_rows = remaining
    _count_dirty(conn, m)


def _overflow(m: _Mirror, size: int, limits: OutboxLimits) -> int:
    """How many oldest events to drop to fit one more of ``size`` bytes (0 if it fits)."""
    if size > limits.max_bytes:
        raise OutboxFull("event is larger than the whole outbox bound")
    full = (m.outbox_count + 1 > limits.max_events
            or m.outbox_bytes + size > limits.max_bytes)
    if not full:
        return 0
    if limits.policy == "reject":
        raise OutboxFull(
            f"outbox holds {m.outbox_count} events / {m.outbox_bytes} bytes "
            f"(bound {limits.max_events} / {limits.max_bytes})",
            {"count": m.outbox_count, "bytes": m.outbox_bytes},
        )
    return max(m.outbox_count + 1 - limits.max_events, 1)


def _push_events(conn: sqlite3.Connection, m: _Mirror, items: Sequence[QueuedEvent],
                 limits: OutboxLimits) -> list[int]:
    """Queue ``items`` in one transaction, all or none; the mirror changes only after the
    commit (a scratch copy takes the changes meanwhile)."""
    scratch = dataclasses.replace(m, meta=dict(m.meta))
    with transaction(conn):
        seqs = [_queue_event(conn, scratch, item, limits) for item in items]
    m.meta, m.outbox_count, m.outbox_bytes = (scratch.meta, scratch.outbox_count,
                                              scratch.outbox_bytes)
    return seqs


def _queue_event(conn: sqlite3.Connection, m: _Mirror, item: QueuedEvent,
                 limits: OutboxLimits) -> int:
    topic, time, body, template = item
    drop = _overflow(m, len(body), limits)
    seq = int(m.meta.get("next_seq", 1))
    meta: dict[str, Any] = {"next_seq": seq + 1}
    dropped = _drop_oldest(conn, m, drop, len(body), limits) if drop else (0, 0, 0)
    conn.execute("INSERT INTO outbox (seq, topic, time, body, template) "
                 "VALUES (?, ?, ?, ?, ?)", (seq, topic, time, body, template))
    if dropped[0]:
        # Rows were deleted: the outbox no longer tells the next seq by itself.
        meta["purged"] = max(int(m.meta.get("purged", 0)), dropped[0])
        _write_meta(conn, meta)
    # Otherwise only the row is written (one page per durable emit, not two): the next seq
    # is the highest queued seq + 1 (see _load_mirror), stored when rows go.
    m.meta.update(meta)
    m.outbox_count += 1 - dropped[1]
    m.outbox_bytes += len(body) - dropped[2]
    return seq


def _drop_oldest(conn: sqlite3.Connection, m: _Mirror, at_least: int, size: int,
                 limits: OutboxLimits) -> tuple[int, int, int]:
    """Delete the oldest events, at least ``at_least`` and then until ``size`` more bytes
    fit; return (highest dropped seq, count, bytes)."""
    last = count = freed = 0
    for seq, length in conn.execute("SELECT seq, LENGTH(body) FROM outbox ORDER BY seq"):
        if count >= at_least and m.outbox_bytes - freed + size <= limits.max_bytes:
            break
        last, count, freed = int(seq), count + 1, freed + int(length)
    if count:
        conn.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
    return (last, count, freed)


def _pending(conn: sqlite3.Connection, limit: int, max_bytes: int) -> list[OutboxEvent]:
    out: list[OutboxEvent] = []
    size = 0
    for seq, topic, time, body, template in conn.execute(
            "SELECT seq, topic, time, body, template FROM outbox ORDER BY seq LIMIT ?",
            (limit,)):
        if out and size + len(body) > max_bytes:
            break
        out.append(OutboxEvent(int(seq), topic, int(time), bytes(body), template))
        size += len(body)
    return out


def _ack(conn: sqlite3.Connection, m: _Mirror, seq: int) -> int:
    purged = max(int(m.meta.get("purged", 0)), seq)
    with transaction(conn):
        count, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox WHERE seq <= ?",
            (seq,)).fetchone()
        conn.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
        _write_meta(conn, {"purged": purged, "next_seq": int(m.meta.get("next_seq", 1))})
    m.meta["purged"] = purged
    m.outbox_count -= int(count)
    m.outbox_bytes -= int(size)
    return int(count)


def _renumber(conn: sqlite3.Connection, m: _Mirror, from_seq: int, start: int) -> None:
    offset = start - from_seq
    with transaction(conn):
        # Negate first so that shifting never collides with an existing primary key.
        conn.execute("UPDATE outbox SET seq = -(seq + ?) WHERE seq >= ?", (offset, from_seq))
        conn.execute("UPDATE outbox SET seq = -seq WHERE seq < 0")
        highest = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])
        next_seq = max(highest, start - 1) + 1
        _write_meta(conn, {"next_seq": next_seq})
    m.meta["next_seq"] = next_seq


def _finish_down(conn: sqlite3.Connection, m: _Mirror, seq: int,
                 result: tuple[bool, bytes] | None) -> None:
    with transaction(conn):
        if result is not None:
            conn.execute("INSERT OR REPLACE INTO results (seq, ok, body) VALUES (?, ?, ?)",
                         (seq, int(result[0]), result[1]))
        _write_meta(conn, {"down_done": seq})
    m.meta["down_done"] = seq
    _count_side_tables(conn, m)


def _results(conn: sqlite3.Connection, limit: int) -> list[tuple[int, bool, bytes]]:
    rows = conn.execute("SELECT seq, ok, body FROM results ORDER BY seq LIMIT ?", (limit,))
    return [(int(seq), bool(ok), bytes(body)) for seq, ok, body in rows]


def _ack_results(conn: sqlite3.Connection, m: _Mirror, upto: int) -> None:
    conn.execute("DELETE FROM results WHERE seq <= ?", (upto,))
    _count_side_tables(conn, m)


def _add_call(conn: sqlite3.Connection, m: _Mirror, call_id: str, route: str, body: bytes,
              created: int) -> bool:
    cur = conn.execute("INSERT OR IGNORE INTO calls (id, route, body, created) VALUES "
                       "(?, ?, ?, ?)", (call_id, route, body, created))
    _count_side_tables(conn, m)
    return cur.rowcount == 1


def _call(row: Sequence[Any]) -> StoredCall:
    return StoredCall(row[0], row[1], bytes(row[2]), int(row[3]), row[4],
                      bytes(row[5]) if row[5] is not None else None)


_CALL_COLUMNS = "id, route, body, created, status, outcome"


def _calls(conn: sqlite3.Connection, status: str, limit: int) -> list[StoredCall]:
    rows = conn.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE status = ? "
                        "ORDER BY created, id LIMIT ?", (status, limit))
    return [_call(row) for row in rows]


def _get_call(conn: sqlite3.Connection, call_id: str) -> StoredCall | None:
    row = conn.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)).fetchone()
    return _call(row) if row else None


def _set_calls(conn: sqlite3.Connection, m: _Mirror, ids: list[str], status: str,
               only: str | None, outcome: bytes | None) -> None:
    with transaction(conn):
        for call_id in ids:
            conn.execute(
                "UPDATE calls SET status = ?, outcome = COALESCE(?, outcome) WHERE id = ?"
                + (" AND status = ?" if only else ""),
                (status, outcome, call_id, *((only,) if only else ())))
    _count_side_tables(conn, m)
