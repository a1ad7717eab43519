"""Documents in SQLite (the :class:`~crdtsync_server.store.roles.DocumentStore` role): tables
``docs``, ``updates`` and ``stamps``, and the document part of a commit.

Generations: ``rebuild`` checks the stored generation and the highest update id of the
document and replaces it in the same ``BEGIN IMMEDIATE`` transaction (a compare-and-set no
other process can slip a write into), at a fresh update id; ``commit`` refuses a
``DocWrite`` of another generation than the stored one, so a process that has not yet
noticed a rebuild never appends to the new generation an update built on the old one.

Stamps (v6): one row per ``(doc, map, key)``, replaced by :meth:`SQLiteStore.commit` in the
write's transaction, never touched by ``compact`` or ``rebuild`` (they are per key, not per
generation), deleted by ``delete_device`` with the device's documents. Stamps are unsigned
64-bit integers and SQLite's are signed: a stamp is stored as the signed integer with the
same 64 bits and read back (``store/columns.py``: ``to_column``, ``from_column``). SQL
never compares stamps, so the order of the stored integers does not matter.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from crdtsync._sqlite_worker import transaction

from ..columns import from_column, to_column
from ..records import DocLog, DocWrite, KeyStamp
from ..rules import stale_generation
from .connection import SQLiteConnection, insert_values


class SQLiteDocuments(SQLiteConnection):
    """The :class:`DocumentStore` role (``external_writes`` comes with the connection)."""

    async def load_doc(self, key: str, *, stamps: bool = False) -> DocLog:
        """The stored log of ``key`` (with its stamp rows if ``stamps``); an empty
        ``DocLog`` if it was never written."""
        return await self._run(_load_doc, key, stamps)

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
        return await self._run(_read_stamps, key)


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
                   known: Callable[[DocWrite], int | None] = lambda write: None
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Append each write; returns the new row ids and, for each, the highest id its document
    reflected before (``CommitResult.prev_ids``). Raises ``stale_generation`` for a write of
    another generation than the stored one (the caller's savepoint rolls back the rest).
    ``known(write)`` gives that highest id when the caller vouches for it and for the
    write's generation (the store is the file's only writer and the writer's copy is the
    stored document), which saves reading them."""
    ids: list[int] = []
    prevs: list[int] = []
    for w in docs:
        prev = known(w)
        if prev is None:
            prev = _check_generation(conn, w)
        prevs.append(prev)
        cur = conn.execute(
            "INSERT INTO updates (key, gen, data) VALUES (?, ?, ?)", (w.key, w.gen, w.update)
        )
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
            conn.execute("DELETE FROM updates WHERE key = ? AND id <= ?", (key, upto_id))


def _rebuild(conn: sqlite3.Connection, key: str, gen: int, upto_id: int,
             snapshot: bytes) -> bool:
    with transaction(conn):  # IMMEDIATE: no other writer between the check and the write
        if (_stored_gen(conn, key) or 0) != gen or _last_id(conn, key) > upto_id:
            return False
        replace_doc(conn, key, gen + 1, snapshot)
        return True


def replace_doc(conn: sqlite3.Connection, key: str, gen: int, snapshot: bytes) -> None:
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


# --- stamps


def _read_stamps(conn: sqlite3.Connection, doc: str) -> list[KeyStamp]:
    rows = conn.execute(
        "SELECT map, key, stamp, writer, raw FROM stamps WHERE doc = ? ORDER BY map, key",
        (doc,))
    return [KeyStamp(doc, name, key, from_column(stamp), writer, from_column(raw))
            for name, key, stamp, writer, raw in rows]


def write_stamps(conn: sqlite3.Connection, rows: Sequence[KeyStamp]) -> None:
    """Insert or replace each row, inside the caller's transaction."""
    insert_values(
        conn, "INSERT INTO stamps (doc, map, key, stamp, writer, raw)",
        [(r.doc, r.map, r.key, to_column(r.stamp), r.writer, to_column(r.raw)) for r in rows],
        " ON CONFLICT (doc, map, key) DO UPDATE SET stamp = excluded.stamp,"
        " writer = excluded.writer, raw = excluded.raw")


def delete_stamps(conn: sqlite3.Connection, docs: Sequence[str]) -> None:
    """Delete every row of documents ``docs``, inside the caller's transaction."""
    conn.executemany("DELETE FROM stamps WHERE doc = ?", [(doc,) for doc in docs])
