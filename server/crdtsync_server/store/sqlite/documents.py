"""Documents in SQLite (the :class:`~crdtsync_server.store.roles.DocumentStore` role): tables
``docs``, ``updates`` and ``stamps``, and the document part of a commit.

Generations: ``rebuild`` checks the stored generation and the highest update id of the
document and replaces it in the same ``BEGIN IMMEDIATE`` transaction (a compare-and-set no
other process can slip a write into), at a fresh update id: the transaction of the next
group commit, as one more write of the group (:class:`Rebuild`, :func:`rebuild_in`; the
store's ``rebuild``); ``commit`` refuses a
``DocWrite`` of another generation than the stored one, so a process that has not yet
noticed a rebuild never appends to the new generation an update built on the old one.

Stamps (v6, logged since v10): the stamps a commit decides for a document it also updates
are logged in that update's row (``updates.stamps``: a msgpack array of ``[map, key, stamp,
writer, raw]``, ``columns.log_stamps``), which the row's insert writes anyway, instead of one
upserted ``stamps`` row each (about 19,000 instructions per key, the largest part of a sync
only the server pays). The ``stamps`` table, one row per ``(doc, map, key)``, holds the rest:
stamps written without an update of their document, and the logged ones folded into it
(:func:`_fold_stamps`) when ``compact`` or ``rebuild`` deletes their update rows. Each table
row has ``upto``, an update id: a stamp logged in a row of its document with a higher id is
newer and supersedes it (a direct write takes the highest id ever given, so every row logged
before it is older; a folded stamp takes the id of the row it came from and never replaces a
newer one). :func:`_read_stamps` applies that rule, so what it reads is what one row per key
replaced at each commit would hold. Stamps are per key, not per generation: a rebuild keeps
them, ``delete_device`` deletes them with the device's documents. Stamps are unsigned 64-bit
integers and SQLite's are signed: a table row stores the signed integer with the same 64 bits
and reads it back (``store/columns.py``: ``to_column``, ``from_column``); msgpack keeps them
unsigned. SQL never compares stamps, so the order of the stored integers does not matter.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from crdtsync._sqlite_worker import transaction

from ..columns import (
    LoggedStamp,
    folded,
    from_column,
    newest_stamps,
    to_column,
    unpack_logged,
)
from ..records import DocLog, DocWrite, KeyStamp
from ..rules import stale_generation
from .connection import SQLiteConnection, insert_values

MAX_ID = (1 << 63) - 1
"""Above every update id (SQLite's integers are signed 64-bit)."""


class SQLiteDocuments(SQLiteConnection):
    """The :class:`DocumentStore` role (``external_writes`` comes with the connection)."""

    async def load_doc(self, key: str, *, stamps: bool = False) -> DocLog:
        """The stored log of ``key`` (with its stamp rows if ``stamps``); an empty
        ``DocLog`` if it was never written."""
        return await self._read_soon(_load_doc, key, stamps)

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` if compacted
        past ``after_id``."""
        return await self._run(_read_since, key, after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows,
        in one transaction. A no-op unless ``upto_id`` is above the current ``snapshot_id``.
        It changes no device row, so the devices this store knows stay known (each one
        forgotten is read again at its device's next sync)."""
        await self._write_soon(_compact, key, upto_id, snapshot, forget_devices=False)

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp of document ``key``, ordered by map and key."""
        return await self._run(_read_stamps_alone, key)


def _load_doc(conn: sqlite3.Connection, key: str, stamps: bool = False) -> DocLog:
    with transaction(conn, "DEFERRED"):  # one read snapshot for every query
        row = conn.execute(
            "SELECT gen, snapshot, snapshot_id FROM docs WHERE key = ?", (key,)
        ).fetchone()
        gen, snapshot, snapshot_id = row if row is not None else (0, b"", 0)
        updates = _select_updates(conn, key, snapshot_id)
        rows = tuple(_read_stamps(conn, key)) if stamps else ()
    return DocLog(gen, bytes(snapshot), snapshot_id, updates, rows)


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


def insert_updates(conn: sqlite3.Connection, docs: Sequence[DocWrite],
                   known: Callable[[DocWrite], int | None] = lambda write: None,
                   stamps: Iterable[bytes | None] | None = None,
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Append each write, with the stamps its row logs (``stamps``, one per write, from
    :func:`log_stamps`; none when omitted); returns the new row ids and, for each, the highest
    id its document reflected before (``CommitResult.prev_ids``). Raises ``stale_generation``
    for a write of another generation than the stored one (the caller's savepoint rolls back
    the rest). ``known(write)`` gives that highest id when the caller vouches for it and for
    the write's generation (the store is the file's only writer and the writer's copy is the
    stored document), which saves reading them."""
    ids: list[int] = []
    prevs: list[int] = []
    for w, logged in zip(docs, stamps or [None] * len(docs), strict=True):
        prev = known(w)
        if prev is None:
            prev = _check_generation(conn, w)
        prevs.append(prev)
        cur = conn.execute("INSERT INTO updates (key, gen, data, stamps) VALUES (?, ?, ?, ?)",
                           (w.key, w.gen, w.update, logged))
        assert cur.lastrowid is not None
        ids.append(cur.lastrowid)
    return tuple(ids), tuple(prevs)


def _check_generation(conn: sqlite3.Connection, w: DocWrite) -> int:
    """The highest id document ``w.key`` reflects, its ``docs`` row created when absent;
    ``stale_generation`` unless it is at generation ``w.gen``."""
    stored, snapshot_id, logged = conn.execute(
        "SELECT d.gen, d.snapshot_id, (SELECT MAX(id) FROM updates WHERE key = ?1)"
        " FROM (SELECT 1) LEFT JOIN docs d ON d.key = ?1", (w.key,)).fetchone()
    if stored is None:
        conn.execute("INSERT INTO docs (key, gen) VALUES (?, ?)", (w.key, w.gen))
    elif stored != w.gen:
        raise stale_generation(w.key, stored, w.gen)
    return int(max(snapshot_id or 0, logged or 0))


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
            _fold_stamps(conn, key, upto_id)
            conn.execute("DELETE FROM updates WHERE key = ? AND id <= ?", (key, upto_id))


@dataclass(frozen=True, slots=True)
class Rebuild:
    """A rebuild of document ``key`` into generation ``gen + 1`` holding ``snapshot``, if
    it is still at ``gen`` with nothing above ``upto_id`` (``Store.rebuild``): a write of a
    group commit, next to the syncs' (:func:`rebuild_in`)."""

    key: str
    gen: int
    upto_id: int
    snapshot: bytes


def rebuild_in(conn: sqlite3.Connection, write: Rebuild) -> int | None:
    """:class:`Rebuild` inside the caller's ``BEGIN IMMEDIATE`` transaction, so that the
    check and the write see no other process in between: the new generation's snapshot id,
    or ``None`` (nothing written) when the document moved on."""
    if ((_stored_gen(conn, write.key) or 0) != write.gen
            or _last_id(conn, write.key) > write.upto_id):
        return None
    return replace_doc(conn, write.key, write.gen + 1, write.snapshot)


def replace_doc(conn: sqlite3.Connection, key: str, gen: int, snapshot: bytes, *,
                keep_stamps: bool = True) -> int:
    """Make document ``key`` generation ``gen`` holding only ``snapshot``, at a fresh update
    id: the id of a row inserted and deleted at once (AUTOINCREMENT never gives it again),
    above every id a cached copy of the document can hold. The stamps its deleted rows
    logged move to ``stamps`` unless ``keep_stamps`` is false (the caller deletes them).
    Inside the caller's transaction. Returns that id (the new ``snapshot_id``)."""
    fresh = conn.execute("INSERT INTO updates (key, gen, data) VALUES (?, ?, x'')", (key, gen))
    if keep_stamps:
        _fold_stamps(conn, key, None)
    conn.execute("DELETE FROM updates WHERE key = ?", (key,))
    conn.execute(
        "INSERT INTO docs (key, gen, snapshot, snapshot_id) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET gen = excluded.gen, snapshot = excluded.snapshot,"
        " snapshot_id = excluded.snapshot_id", (key, gen, snapshot, fresh.lastrowid))
    assert fresh.lastrowid is not None
    return fresh.lastrowid


# --- stamps (logged with their update row: ``store/columns.py``)

_STAMPS_TAIL = (" ON CONFLICT (doc, map, key) DO UPDATE SET stamp = excluded.stamp,"
                " writer = excluded.writer, raw = excluded.raw, upto = excluded.upto")
_STAMPS_HEAD = "INSERT INTO stamps (doc, map, key, stamp, writer, raw, upto)"


def _read_stamps_alone(conn: sqlite3.Connection, doc: str) -> list[KeyStamp]:
    """:func:`_read_stamps` in a read transaction of its own: its two queries see one
    snapshot, so a compaction by another process cannot move a stamp between them."""
    with transaction(conn, "DEFERRED"):
        return _read_stamps(conn, doc)


def _read_stamps(conn: sqlite3.Connection, doc: str) -> list[KeyStamp]:
    table = [(name, key, from_column(stamp), writer, from_column(raw), upto)
             for name, key, stamp, writer, raw, upto in conn.execute(
                 "SELECT map, key, stamp, writer, raw, upto FROM stamps WHERE doc = ?", (doc,))]
    return newest_stamps(doc, table, _logged(conn, doc, None))


def _logged(conn: sqlite3.Connection, doc: str, upto_id: int | None) -> Iterator[LoggedStamp]:
    """The stamps logged in the update rows of ``doc`` (with id <= ``upto_id`` unless
    ``None``), in row order."""
    rows = conn.execute(
        "SELECT id, stamps FROM updates WHERE key = ? AND id <= ? AND stamps IS NOT NULL"
        " ORDER BY id", (doc, MAX_ID if upto_id is None else upto_id)).fetchall()
    return unpack_logged(rows)


def _fold_stamps(conn: sqlite3.Connection, doc: str, upto_id: int | None) -> None:
    """Move the stamps logged in ``doc``'s update rows (with id <= ``upto_id``, all if
    ``None``) into the table (the caller deletes those rows next, in its transaction), each
    with the id of its row as ``upto``, never over a table row with a higher ``upto`` (a
    newer direct write)."""
    insert_values(conn, _STAMPS_HEAD,
                  [(doc, name, key, to_column(stamp), writer, to_column(raw), upto)
                   for name, key, stamp, writer, raw, upto in folded(_logged(conn, doc, upto_id))],
                  _STAMPS_TAIL + " WHERE excluded.upto > stamps.upto")


def write_stamps(conn: sqlite3.Connection, rows: Sequence[KeyStamp]) -> None:
    """Replace each row's stamp in the table, inside the caller's transaction, as of the
    highest update id ever given: newer than every stamp logged so far, older than any
    logged after."""
    if not rows:
        return
    given = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'updates'").fetchone()
    upto = 0 if given is None else int(given[0])
    insert_values(
        conn, _STAMPS_HEAD,
        [(r.doc, r.map, r.key, to_column(r.stamp), r.writer, to_column(r.raw), upto)
         for r in rows], _STAMPS_TAIL)


def delete_stamps(conn: sqlite3.Connection, docs: Sequence[str]) -> None:
    """Delete every row of documents ``docs``, inside the caller's transaction (their update
    rows, and the stamps logged there, are the caller's to delete)."""
    conn.executemany("DELETE FROM stamps WHERE doc = ?", [(doc,) for doc in docs])
