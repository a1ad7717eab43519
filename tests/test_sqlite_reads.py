"""``SQLiteWorker.read``: small reads on the event loop's thread, on a second connection,
and ``Writers``: when a sync's device lookup may use it.

A sync's device lookup runs there (``SQLiteStore.device_by_token``) instead of hopping to the
connection's thread while the store is the file's only writer. What must hold: it sees
every committed write (the thread's and other processes'), it cannot write, a busy file
never blocks the event loop (the read is handed to the thread, which waits there), closing
the worker closes it too, and as soon as another store object has the file open every
lookup observes its writes again.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from crdtsync._sqlite_worker import SQLiteWorker, transaction
from crdtsync.errors import ClosedError, StoreError
from crdtsync_server.auth import hash_token
from crdtsync_server.store import DeviceRecord
from crdtsync_server.store.sqlite import SQLiteStore
from crdtsync_server.store.sqlite.writers import Writers

MIGRATIONS = ("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)",)


def select(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute("SELECT v FROM t WHERE k = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def upsert(conn: sqlite3.Connection, key: str, value: int) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO t (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE"
                     " SET v = excluded.v", (key, value))


async def test_a_read_sees_every_commit_of_the_thread_and_of_other_connections(
        tmp_path: Path) -> None:
    worker = SQLiteWorker(tmp_path / "a.db", migrations=MIGRATIONS)
    await worker.open()
    try:
        assert await worker.read(select, "x") is None
        for value in range(1, 4):
            await worker.run(upsert, "x", value)
            assert await worker.read(select, "x") == value
        with sqlite3.connect(tmp_path / "a.db", isolation_level=None) as other:
            upsert(other, "x", 99)
        assert await worker.read(select, "x") == 99
    finally:
        await worker.aclose()


async def test_a_read_cannot_write(tmp_path: Path) -> None:
    worker = SQLiteWorker(tmp_path / "a.db", migrations=MIGRATIONS)
    await worker.open()
    try:
        with pytest.raises(StoreError, match="readonly"):
            await worker.read(upsert, "x", 1)
        assert await worker.run(select, "x") is None
        with pytest.raises(StoreError, match="no such table"):
            await worker.read(lambda conn: conn.execute("SELECT * FROM missing").fetchall())
    finally:
        await worker.aclose()


def busy_on_the_loop(conn: sqlite3.Connection, key: str, loop_thread: int) -> int | None:
    """:func:`select`, except that on the loop's thread the file is busy (SQLite's
    ``SQLITE_BUSY``, as while another process recovers the log or holds the file in
    exclusive locking mode, which WAL connections of other processes cannot set up here)."""
    if threading.get_ident() == loop_thread:
        busy = sqlite3.OperationalError("database is locked")
        busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
        raise busy
    return select(conn, key)


async def test_a_busy_file_is_read_on_the_thread(tmp_path: Path) -> None:
    worker = SQLiteWorker(tmp_path / "a.db", migrations=MIGRATIONS)
    await worker.open()
    try:
        await worker.run(upsert, "x", 7)
        assert await worker.read(busy_on_the_loop, "x", threading.get_ident()) == 7
    finally:
        await worker.aclose()


async def test_read_after_close_is_refused(tmp_path: Path) -> None:
    worker = SQLiteWorker(tmp_path / "a.db", migrations=MIGRATIONS)
    await worker.open()
    assert await worker.read(select, "x") is None
    await worker.aclose()
    with pytest.raises(ClosedError):
        await worker.read(select, "x")


async def test_device_lookup_by_token_sees_a_rotation_at_once(tmp_path: Path) -> None:
    """The device lookup of every sync reads on the loop: a token rotated or a device
    disabled through the store is seen by the very next lookup."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("old"), 1))
        found = await store.device_by_token(hash_token("old"))
        assert found is not None and found.id == "d1"
        await store.update_device("d1", token_hash=hash_token("new"))
        assert await store.device_by_token(hash_token("old")) is None
        found = await store.device_by_token(hash_token("new"))
        assert found is not None and not found.disabled
        await store.update_device("d1", disabled=True)
        found = await store.device_by_token(hash_token("new"))
        assert found is not None and found.disabled


# --- Writers: when the lookup may skip observing other writers


def test_a_lone_writer_knows_it_after_one_check(tmp_path: Path) -> None:
    one = Writers(str(tmp_path / "w.db"))
    one.open()
    try:
        assert not one.alone()  # the first check makes the caller observe once
        assert one.alone() and one.alone()
    finally:
        one.close()
    assert not one.alone()  # closed: never alone


def test_two_writers_are_never_alone_and_the_survivor_observes_once(tmp_path: Path) -> None:
    one, two = Writers(str(tmp_path / "w.db")), Writers(str(tmp_path / "w.db"))
    one.open()
    one.alone()
    assert one.alone()
    two.open()  # in this process too: the locks belong to open files, not processes
    try:
        assert not one.alone() and not two.alone()
        assert not one.alone() and not two.alone()
    finally:
        two.close()
    assert not one.alone()  # the other may have written: observe once more
    assert one.alone()
    one.close()


def test_a_writer_that_came_and_went_between_two_checks_is_noticed(tmp_path: Path) -> None:
    one = Writers(str(tmp_path / "w.db"))
    one.open()
    one.alone()
    assert one.alone()
    passing = Writers(str(tmp_path / "w.db"))
    passing.open()
    passing.close()
    assert not one.alone()
    assert one.alone()
    one.close()


async def test_a_second_store_on_the_file_makes_the_lookup_observe_its_writes(
        tmp_path: Path) -> None:
    """While alone, the lookup reads on the loop and ``external_writes`` stands still; once
    another store object (another process, in production) has the file open, every lookup
    observes, so a commit of the other one moves ``external_writes`` before the sync reads
    its documents; once the other is gone, one more lookup observes, then the loop again."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as first:
        await first.add_device(DeviceRecord("d1", hash_token("t"), 1))
        for _ in range(3):
            assert await first.device_by_token(hash_token("t")) is not None
        before = first.external_writes
        async with SQLiteStore(path) as second:
            await second.set_setting("k", "v")
            assert await first.device_by_token(hash_token("t")) is not None
            assert first.external_writes == before + 1
            moved = first.external_writes
            await second.set_setting("k", "w")
            assert await first.device_by_token(hash_token("t")) is not None
            assert first.external_writes == moved + 1
        settled = first.external_writes
        for _ in range(3):
            assert await first.device_by_token(hash_token("t")) is not None
        assert first.external_writes == settled
        assert first.writers.alone()
