"""Documents in PostgreSQL (the :class:`~crdtsync_server.store.roles.DocumentStore` role):
tables ``docs``, ``updates`` and ``stamps``, and the document part of a commit.

Update ids come from the ``updates`` sequence and are handed out under the sequence lock
(``connection.sequenced``: every transaction that appends updates or replaces a document
takes it first), so a reader following :meth:`~PostgresDocuments.read_since` never steps
over an id still in flight.

Generations: ``rebuild`` takes the sequence lock, then locks the document's row
(``SELECT ... FOR UPDATE``), checks the stored generation and the highest update id, and
replaces the document in the same transaction: a compare-and-set no other instance can
slip a write into (commits and rebuilds wait for the sequence lock; a ``compact`` waits for
the row). ``commit`` refuses a ``DocWrite`` of another generation than the stored one, so an
instance that has not yet noticed a rebuild never appends to the new generation an update
built on the old one.

Stamps (logged since v3, as SQLite's v10; the rule is in ``store/columns.py``): a commit's
stamps for a document it also updates are logged in that update's row, the others replace
their row of ``stamps`` as of the highest update id given so far (the commit holds the
sequence lock, so every id up to it belongs to a finished transaction); ``compact`` and
``rebuild`` move the logged stamps of the rows they delete into ``stamps``; ``delete_device``
deletes both with the device's documents. A key reads as the newest of its table row and
its logged stamps, from one snapshot (reads are ``REPEATABLE READ``). Unsigned 64-bit
stamps are stored as the signed ``BIGINT`` with the same bits in the table, unsigned in
msgpack.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ..columns import LoggedStamp, folded, from_column, newest_stamps, to_column, unpack_logged
from ..records import DocLog, DocWrite, KeyStamp
from ..rules import stale_generation
from .connection import PostgresConnection, sequenced


class PostgresDocuments(PostgresConnection):
    """The :class:`DocumentStore` role (``external_writes`` comes with the connection)."""

    async def load_doc(self, key: str, *, stamps: bool = False) -> DocLog:
        """The stored log of ``key`` (with its stamp rows if ``stamps``); an empty
        ``DocLog`` if it was never written."""
        return await self._read(_load_doc, key, stamps)

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` if compacted
        past ``after_id``."""
        return await self._read(_read_since, key, after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows,
        in one transaction. A no-op unless ``upto_id`` is above the current ``snapshot_id``."""
        if upto_id > 0:  # covers nothing otherwise (``snapshot_id`` is 0 when absent)
            await self._write(_compact, key, upto_id, snapshot)

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        """Replace ``key`` by generation ``gen + 1`` holding ``snapshot`` if it is still at
        ``gen`` with nothing above ``upto_id``, in one transaction holding the sequence lock
        and the document's row lock, so the check and the write see no other instance in
        between (see ``Store.rebuild``)."""
        return await self._write(_rebuild, key, gen, upto_id, snapshot)

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key``, ordered by map and key."""
        return await self._read(_read_stamps, key)


async def _load_doc(conn: asyncpg.Connection, key: str, stamps: bool = False) -> DocLog:
    row = await conn.fetchrow("SELECT gen, snapshot, snapshot_id FROM docs WHERE key = $1",
                              key)
    gen, snapshot, snapshot_id = row if row is not None else (0, b"", 0)
    updates = await _select_updates(conn, key, snapshot_id)
    rows = tuple(await _read_stamps(conn, key)) if stamps else ()
    return DocLog(gen, bytes(snapshot), snapshot_id, updates, rows)


async def _read_since(conn: asyncpg.Connection, key: str, after_id: int
                      ) -> tuple[tuple[int, bytes], ...] | None:
    snapshot_id = await conn.fetchval("SELECT snapshot_id FROM docs WHERE key = $1", key)
    if snapshot_id is not None and after_id < snapshot_id:
        return None
    return await _select_updates(conn, key, after_id)


async def _select_updates(conn: asyncpg.Connection, key: str, after_id: int
                          ) -> tuple[tuple[int, bytes], ...]:
    rows = await conn.fetch(
        "SELECT id, data FROM updates WHERE key = $1 AND id > $2 ORDER BY id", key, after_id)
    return tuple((int(row[0]), bytes(row[1])) for row in rows)


async def _last_ids(conn: asyncpg.Connection, keys: list[str]
                    ) -> dict[str, tuple[int | None, int]]:
    """For each of ``keys``: its stored generation (``None`` if it has no row yet) and the
    highest update id it reflects (logged rows and snapshot; 0 if never written)."""
    rows = await conn.fetch(
        "SELECT k.key, d.gen, GREATEST(COALESCE(d.snapshot_id, 0),"
        " COALESCE((SELECT max(u.id) FROM updates u WHERE u.key = k.key), 0))"
        " FROM unnest($1::text[]) AS k(key) LEFT JOIN docs d ON d.key = k.key", keys)
    return {row[0]: (row[1], int(row[2])) for row in rows}


async def insert_updates(conn: asyncpg.Connection, docs: Sequence[DocWrite],
                         stamps: Sequence[bytes | None] | None = None,
                         ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Append each write, with the stamps its row logs (``stamps``, one per write, from
    ``columns.log_stamps``; none when omitted); returns the new row ids and, for each, the
    highest id its document reflected before (``CommitResult.prev_ids``). Raises
    ``stale_generation`` for a write of another generation than the stored one (the
    caller's savepoint rolls back the rest). Three statements whatever the number of
    writes; the caller holds the sequence lock."""
    if not docs:
        return (), ()
    stored = await _last_ids(conn, list(dict.fromkeys(w.key for w in docs)))
    gens = {key: gen for key, (gen, _) in stored.items() if gen is not None}
    new_docs: dict[str, int] = {}
    for w in docs:
        if w.key not in gens:  # the first write of a document sets its generation
            gens[w.key] = new_docs[w.key] = w.gen
        elif gens[w.key] != w.gen:
            raise stale_generation(w.key, gens[w.key], w.gen)
    if new_docs:
        await conn.execute(
            "INSERT INTO docs (key, gen) SELECT * FROM unnest($1::text[], $2::bigint[])",
            list(new_docs), list(new_docs.values()))
    ids = sorted(row[0] for row in await conn.fetch(
        "INSERT INTO updates (key, gen, data, stamps) SELECT key, gen, data, stamps FROM"
        " unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[])"
        " WITH ORDINALITY AS w(key, gen, data, stamps, n) ORDER BY n RETURNING id",
        [w.key for w in docs], [w.gen for w in docs], [w.update for w in docs],
        list(stamps or [None] * len(docs))))
    last = {key: last_id for key, (_, last_id) in stored.items()}
    prevs: list[int] = []
    for w, new_id in zip(docs, ids, strict=True):  # ids ascend in the order of the rows
        prevs.append(last[w.key])
        last[w.key] = new_id
    return tuple(ids), tuple(prevs)


async def _compact(conn: asyncpg.Connection, key: str, upto_id: int, snapshot: bytes) -> None:
    installed = await conn.fetchval(
        "INSERT INTO docs (key, snapshot, snapshot_id) VALUES ($1, $2, $3)"
        " ON CONFLICT (key) DO UPDATE"
        " SET snapshot = excluded.snapshot, snapshot_id = excluded.snapshot_id"
        " WHERE excluded.snapshot_id > docs.snapshot_id RETURNING true",
        key, snapshot, upto_id)
    if installed:
        await _fold_stamps(conn, key, upto_id)
        await conn.execute("DELETE FROM updates WHERE key = $1 AND id <= $2", key, upto_id)


async def _rebuild(conn: asyncpg.Connection, key: str, gen: int, upto_id: int,
                   snapshot: bytes) -> int | None:
    await sequenced(conn)  # first: no commit or rebuild of any instance in between
    stored_gen, snapshot_id = await _lock_doc(conn, key)
    if stored_gen != gen or await _last_id(conn, key, snapshot_id) > upto_id:
        return None
    return await replace_doc(conn, key, gen + 1, snapshot)


async def _lock_doc(conn: asyncpg.Connection, key: str) -> tuple[int, int]:
    """``(gen, snapshot_id)`` of document ``key``, its row locked until the transaction
    ends; an unknown document gets its row first (generation 0, empty: what every reader
    sees of an unknown document anyway)."""
    await conn.execute("INSERT INTO docs (key) VALUES ($1) ON CONFLICT (key) DO NOTHING", key)
    row = await conn.fetchrow("SELECT gen, snapshot_id FROM docs WHERE key = $1 FOR UPDATE",
                              key)
    return int(row[0]), int(row[1])


async def _last_id(conn: asyncpg.Connection, key: str, snapshot_id: int) -> int:
    """The highest update id document ``key`` reflects: its logged rows and its
    ``snapshot_id``."""
    logged = await conn.fetchval("SELECT max(id) FROM updates WHERE key = $1", key)
    return max(snapshot_id, logged or 0)


async def replace_doc(conn: asyncpg.Connection, key: str, gen: int, snapshot: bytes, *,
                      keep_stamps: bool = True) -> int:
    """Make document ``key`` generation ``gen`` holding only ``snapshot``, at a fresh update
    id (``nextval`` of the updates sequence: never given out again), above every id a
    cached copy of the document can hold. The stamps its deleted rows logged move to
    ``stamps`` unless ``keep_stamps`` is false (the caller deletes them). Inside the
    caller's transaction, which holds the sequence lock. Returns that id (the new
    ``snapshot_id``)."""
    if keep_stamps:
        await _fold_stamps(conn, key, None)
    return int(await conn.fetchval(
        "WITH gone AS (DELETE FROM updates WHERE key = $1)"
        " INSERT INTO docs (key, gen, snapshot, snapshot_id)"
        " VALUES ($1, $2, $3, nextval(pg_get_serial_sequence('updates', 'id')))"
        " ON CONFLICT (key) DO UPDATE SET gen = excluded.gen, snapshot = excluded.snapshot,"
        " snapshot_id = excluded.snapshot_id RETURNING snapshot_id", key, gen, snapshot))


# --- stamps (logged with their update row: ``store/columns.py``)

_STAMPS_TAIL = (" ON CONFLICT (doc, map, key) DO UPDATE SET stamp = excluded.stamp,"
                " writer = excluded.writer, raw = excluded.raw, upto = excluded.upto")


async def _read_stamps(conn: asyncpg.Connection, doc: str) -> list[KeyStamp]:
    """Inside the caller's snapshot (``_read``: repeatable read)."""
    table = [(name, key, from_column(stamp), writer, from_column(raw), upto)
             for name, key, stamp, writer, raw, upto in await conn.fetch(
                 "SELECT map, key, stamp, writer, raw, upto FROM stamps WHERE doc = $1", doc)]
    return newest_stamps(doc, table, await _logged(conn, doc, None))


async def _logged(conn: asyncpg.Connection, doc: str, upto_id: int | None
                  ) -> list[LoggedStamp]:
    """The stamps logged in the update rows of ``doc`` (with id <= ``upto_id`` unless
    ``None``), in row order."""
    rows = await conn.fetch(
        "SELECT id, stamps FROM updates WHERE key = $1 AND ($2::bigint IS NULL OR id <= $2)"
        " AND stamps IS NOT NULL ORDER BY id", doc, upto_id)
    return list(unpack_logged((int(row[0]), bytes(row[1])) for row in rows))


async def _fold_stamps(conn: asyncpg.Connection, doc: str, upto_id: int | None) -> None:
    """Move the stamps logged in ``doc``'s update rows (with id <= ``upto_id``, all if
    ``None``) into the table (the caller deletes those rows next, in its transaction), each
    with the id of its row as ``upto``, never over a table row with a higher ``upto``."""
    rows = folded(await _logged(conn, doc, upto_id))
    if rows:
        await conn.execute(
            "INSERT INTO stamps AS s (doc, map, key, stamp, writer, raw, upto) SELECT $1, * FROM"
            " unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[],"
            " $7::bigint[])" + _STAMPS_TAIL + " WHERE excluded.upto > s.upto",
            doc, *_stamp_columns(rows))


def _stamp_columns(rows: Sequence[tuple[str, str, int, str, int, int]]) -> list[list[object]]:
    """``(map, key, stamp, writer, raw, upto)`` rows as one array per column, stamps as the
    signed column values."""
    return [[r[0] for r in rows], [r[1] for r in rows], [to_column(r[2]) for r in rows],
            [r[3] for r in rows], [to_column(r[4]) for r in rows], [r[5] for r in rows]]


async def write_stamps(conn: asyncpg.Connection, rows: Sequence[KeyStamp]) -> None:
    """Replace each row's stamp in the table (one statement), inside the caller's
    transaction, which holds the sequence lock: as of the highest update id given so far,
    newer than every stamp logged until now, older than any logged after."""
    if not rows:
        return
    await conn.execute(
        "INSERT INTO stamps (doc, map, key, stamp, writer, raw, upto) SELECT *,"
        " COALESCE(pg_sequence_last_value(pg_get_serial_sequence('updates', 'id')::regclass),"
        " 0) FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],"
        " $6::bigint[])" + _STAMPS_TAIL,
        [r.doc for r in rows], [r.map for r in rows], [r.key for r in rows],
        [to_column(r.stamp) for r in rows], [r.writer for r in rows],
        [to_column(r.raw) for r in rows])


async def delete_stamps(conn: asyncpg.Connection, docs: Sequence[str]) -> None:
    """Delete every row of documents ``docs``, inside the caller's transaction (their update
    rows, and the stamps logged there, are the caller's to delete)."""
    await conn.execute("DELETE FROM stamps WHERE doc = ANY($1::text[])", list(docs))
