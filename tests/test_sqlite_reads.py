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

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from crdtsync._sqlite_worker import SQLiteWorker, transaction
from crdtsync.errors import ClosedError, StoreError
from crdtsync_server.auth import hash_token
from crdtsync_server.store import DeviceRecord, FleetRecord, SyncWrite
from crdtsync_server.store.sinks import SinkConfig
from crdtsync_server.store.sqlite import SQLiteStore
from crdtsync_server.store.sqlite.connection import (
    DEVICE_CACHE_LIMIT,
    DEVICE_CACHE_SECONDS,
    DeviceCache,
)
from crdtsync_server.store.sqlite.writers import Writers

from .store_backends import evs

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


def test_once_alone_a_check_takes_no_lock_until_the_file_grows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a check found it alone, the next checks are one ``fstat``: another writer
    appends its byte before it writes anything, and that growth brings back the full check."""
    from crdtsync_server.store.sqlite import writers
    locks: list[int] = []
    real_lock = writers._lock
    monkeypatch.setattr(writers, "_lock", lambda fd, kind, **kw: (locks.append(kind),
                                                                   real_lock(fd, kind, **kw)))
    one = Writers(str(tmp_path / "w.db"))
    one.open()
    one.alone()
    assert one.alone()
    taken = len(locks)
    assert one.alone() and one.alone()
    assert len(locks) == taken  # no fcntl while nothing changed
    two = Writers(str(tmp_path / "w.db"))
    two.open()
    try:
        assert not one.alone()
        assert len(locks) > taken
    finally:
        two.close()
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


# --- the device records a lone store keeps (``known_devices``)


async def lookup_matches_the_row(store: SQLiteStore, token: str, device_id: str) -> None:
    """The sync's lookup answers exactly the stored row (or nothing for a gone token)."""
    found = await store.device_by_token(hash_token(token))
    stored = await store.get_device(device_id)
    if stored is None or stored.token_hash != hash_token(token):
        assert found is None
    else:
        assert found == stored


async def test_the_lookup_answers_the_stored_row_after_every_kind_of_write(
        tmp_path: Path) -> None:
    """Whatever this store writes (a sync's commit, a touch, a message queued, a fleet, a
    token, a disable, a delete), the next lookup answers the row as stored: a commit puts
    its row back as written, every other write forgets what was kept."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_fleet(FleetRecord("f1", created=1))
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await store.add_device(DeviceRecord("d2", hash_token("u"), 1))
        await lookup_matches_the_row(store, "t", "d1")
        assert store.writers.alone()
        steps = [
            lambda: store.commit(SyncWrite("d1", time=500, events=evs(1, 3))),
            lambda: store.commit(SyncWrite("d2", time=501, events=evs(1, 2))),
            lambda: store.touch_devices({"d1": 900}),
            lambda: store.queue_downlink("d1", "message", "cfg", {"a": 1}, 950, None),
            lambda: store.commit(SyncWrite("d1", time=1000, events=evs(4, 4), down_done=1)),
            lambda: store.set_device_fleet("d1", "f1", 1100),
            lambda: store.commit(SyncWrite("d1", time=1200, events=evs(6, 6), purged=5)),
            lambda: store.update_device("d1", disabled=True),
            lambda: store.update_device("d1", token_hash=hash_token("t2")),
            lambda: store.delete_device("d2", []),
        ]
        for step in steps:
            await step()
            for token, device in (("t", "d1"), ("t2", "d1"), ("u", "d2")):
                await lookup_matches_the_row(store, token, device)
        found = await store.device_by_token(hash_token("t2"))
        assert found is not None and found.disabled and found.fleet == "f1"
        assert (found.last_seq, found.events_lost, found.down_done) == (6, 1, 1)


async def test_a_commit_keeps_its_row_and_the_lookup_reads_nothing(tmp_path: Path) -> None:
    """After a sync's commit the next lookup of that device is answered from memory: the
    proof is a row changed behind the store's back (an SQL shell), which the lookup does
    not see until the kept records expire or this store looks at the file again."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        assert await store.device_by_token(hash_token("t")) is not None
        assert store.writers.alone()
        await store.commit(SyncWrite("d1", time=500, events=evs(1, 2)))
        with sqlite3.connect(tmp_path / "s.db") as shell:
            shell.execute("UPDATE devices SET disabled = 1 WHERE id = 'd1'")
        kept = await store.device_by_token(hash_token("t"))
        assert kept is not None and kept.last_seq == 2 and not kept.disabled
        await store.set_setting("k", "v")  # its look at the file sees the shell's commit
        fresh = await store.device_by_token(hash_token("t"))
        assert fresh is not None and fresh.disabled


async def test_a_documents_upkeep_forgets_no_device_and_runs_on_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction, a rebuild into a new generation and a document's load change no device
    row: the device rows the store kept stay kept. With the store's thread idle they run on
    the event loop's thread, so the group commits that come meanwhile are not sent to the
    store's thread."""
    from crdtsync_server.store import DocWrite
    from crdtsync_server.store.sqlite import documents
    from crdtsync_server.store.sqlite import store as sqlite_store

    ran_in: dict[str, int] = {}
    def spy(module: Any, name: str) -> Any:
        real = getattr(module, name)

        def run(*args: object) -> object:
            ran_in[name] = threading.get_ident()
            return real(*args)
        return run

    for module, name in ((documents, "_compact"), (sqlite_store, "rebuild_in"),
                         (documents, "_load_doc")):
        monkeypatch.setattr(module, name, spy(module, name))
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        assert await store.device_by_token(hash_token("t")) is not None
        result = await store.commit(SyncWrite("d1", time=500, events=evs(1, 2),
                                              docs=[DocWrite("d1/state", b"\x00\x00")]))
        kept = store.known_devices.by_id()["d1"]  # put back by the commit
        await store.compact("d1/state", result.update_ids[0], b"\x00\x00")
        assert await store.rebuild("d1/state", 0, result.update_ids[0], b"\x00\x00")
        assert (await store.load_doc("d1/state")).gen == 1
        assert store.known_devices.by_id() == {"d1": kept}
        await store.update_device("d1", disabled=True)  # whereas a device's write forgets
        assert store.known_devices.by_id() == {}
    assert ran_in == dict.fromkeys(("_compact", "rebuild_in", "_load_doc"),
                                   threading.get_ident())



async def test_writes_that_change_no_device_row_keep_the_records(tmp_path: Path) -> None:
    """A heartbeat (every 10 s), a sink's progress, a wake, a setting, a purge: none changes a
    row of ``devices``, and the records kept for the syncs' lookups stay. They used to be
    forgotten at every write, so the heartbeat alone made a device that syncs every minute
    read its row at every sync."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await store.commit(SyncWrite("d1", time=500, events=evs(1, 2)))
        kept = store.known_devices.by_id()
        assert set(kept) == {"d1"} and kept["d1"].last_seq == 2
        await store.heartbeat(600)
        await store.set_setting("k", "v")
        await store.add_wakes(["device:d1"], 700)
        await store.put_sink(SinkConfig("s1", "file", {"path": str(tmp_path / "f")}), 800)
        await store.sink_delivered("s1", 2, 2, 900)
        await store.purge_finished(1000)
        await store.purge_wakes(1000)
        assert store.known_devices.by_id() == kept


async def test_any_write_of_a_device_row_forgets_the_records_whatever_runs_it(
        tmp_path: Path) -> None:
    """The store notices a changed row of ``devices`` by itself (temporary triggers count
    them), not by a list of the calls that may change one: any function run on its
    connection that inserts, updates or deletes such a row, by one statement or many,
    forgets what was kept, and the next lookup answers the row as stored."""
    def disable(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.executemany("UPDATE devices SET disabled = 1 WHERE id = ?", [("d1",)])

    def drop(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            conn.execute("DELETE FROM devices WHERE id = 'd1'")

    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await store.commit(SyncWrite("d1", time=500, events=evs(1, 2)))
        assert set(store.known_devices.by_id()) == {"d1"}
        await store._run(disable)
        assert store.known_devices.by_id() == {}
        found = await store.device_by_token(hash_token("t"))
        assert found is not None and found.disabled
        assert set(store.known_devices.by_id()) == {"d1"}
        await store._run(drop)
        assert await store.device_by_token(hash_token("t")) is None


async def test_a_flush_of_last_sync_times_moves_them_in_the_kept_records(
        tmp_path: Path) -> None:
    """``touch_devices`` (every second while devices make no-change syncs) keeps the records
    and moves their ``last_sync`` forward, never back, as it does in the rows."""
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await store.add_device(DeviceRecord("d2", hash_token("u"), 1))
        await store.commit(SyncWrite("d1", time=500, events=evs(1, 2)))
        await store.commit(SyncWrite("d2", time=800, events=evs(1, 1)))
        await store.touch_devices({"d1": 900, "d2": 700})
        kept = store.known_devices.by_id()
        assert (kept["d1"].last_sync, kept["d2"].last_sync) == (900, 800)
        assert kept["d1"].last_seq == 2
        for token, device in (("t", "d1"), ("u", "d2")):
            await lookup_matches_the_row(store, token, device)

def test_kept_records_expire() -> None:
    """A row changed behind the server's back is seen within ``DEVICE_CACHE_SECONDS``."""
    now = [100.0]
    cache = DeviceCache(clock=lambda: now[0])
    record = DeviceRecord("d1", "h", 1)
    cache.keep(record)
    now[0] += DEVICE_CACHE_SECONDS / 2
    cache.keep(DeviceRecord("d2", "h2", 1))
    assert cache.get("h") == record
    now[0] += DEVICE_CACHE_SECONDS / 2 + 0.1  # from the first kept record, not the last
    assert cache.get("h") is None and cache.get("h2") is None


def test_a_look_at_the_file_that_finds_no_other_writer_extends_the_kept_records() -> None:
    """Each :meth:`DeviceCache.checked` moves the 5 s window on (a device that syncs every
    minute stays kept while other syncs commit); without one, the records go 5 s after the
    last; whatever the checks, all go ``DEVICE_CACHE_LIMIT`` after the first was kept."""
    now = [100.0]
    cache = DeviceCache(clock=lambda: now[0])
    record = DeviceRecord("d1", "h", 1)
    cache.keep(record)
    while now[0] < 100.0 + 10 * DEVICE_CACHE_SECONDS:
        cache.checked(now[0])
        now[0] += DEVICE_CACHE_SECONDS * 0.9
        assert cache.get("h") == record
    cache.checked(now[0] - DEVICE_CACHE_SECONDS)  # an older check than the last: no effect
    now[0] += DEVICE_CACHE_SECONDS * 0.2  # 1.1 windows after the last check
    assert cache.get("h") is None
    cache.keep(record)
    started = now[0]
    while now[0] - started < DEVICE_CACHE_LIMIT:
        assert cache.get("h") == record
        cache.checked(now[0])
        now[0] += DEVICE_CACHE_SECONDS / 2
    now[0] += 0.1
    assert cache.get("h") is None  # past the limit, checked 2.6 s ago
    assert cache.by_id() == {}


async def test_the_store_keeps_a_device_past_5_s_while_its_looks_find_no_other_writer(
        tmp_path: Path) -> None:
    """On a real file, with the kept records' clock moved by hand: the lookup of a device
    kept 8 s ago is answered from memory when a commit of another device looked at the
    file 4 s ago (the proof: a row changed behind the store's back is not seen); the next
    look at the file sees that change and forgets everything, and so does 5 s without any
    look."""
    now = [1000.0]
    async with SQLiteStore(tmp_path / "s.db") as store:
        store.known_devices.clock = lambda: now[0]
        await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await store.add_device(DeviceRecord("d2", hash_token("u"), 1))
        for _ in range(2):  # the first observes (``Writers.alone``), the second keeps it
            await lookup_matches_the_row(store, "t", "d1")
        assert store.writers.alone() and store.known_devices.by_id().keys() == {"d1"}
        now[0] += 4
        await store.commit(SyncWrite("d2", time=500, events=evs(1, 1)))  # looks: no news
        now[0] += 4
        with sqlite3.connect(tmp_path / "s.db") as shell:
            shell.execute("UPDATE devices SET disabled = 1 WHERE id = 'd1'")
        kept = await store.device_by_token(hash_token("t"))
        assert kept is not None and not kept.disabled  # 8 s after it was kept
        await store.commit(SyncWrite("d2", time=501, events=evs(2, 2)))  # sees the shell
        fresh = await store.device_by_token(hash_token("t"))
        assert fresh is not None and fresh.disabled
        with sqlite3.connect(tmp_path / "s.db") as shell:
            shell.execute("UPDATE devices SET disabled = 0 WHERE id = 'd1'")
        now[0] += DEVICE_CACHE_SECONDS + 0.1  # no call of the store meanwhile
        again = await store.device_by_token(hash_token("t"))
        assert again is not None and not again.disabled


async def test_after_a_quiet_one_look_at_the_file_keeps_every_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices back after more than ``DEVICE_CACHE_SECONDS`` of quiet (an outage, then a
    reconnect storm) are answered from memory: their lookups, all at once, share one look
    at the file, which found no other connection's commit, and read no row. After the next
    quiet a shell's change is seen: that look finds its commit and forgets the records."""
    from crdtsync_server.store.sqlite import connection, devices

    reads: list[str] = []
    looks: list[int] = []
    real_read, real_look = devices._device_by_token, connection._no_write

    def counted_read(conn: sqlite3.Connection, token_hash: str) -> Any:
        reads.append(token_hash)
        return real_read(conn, token_hash)

    def counted_look(conn: sqlite3.Connection) -> None:
        looks.append(1)
        real_look(conn)

    monkeypatch.setattr(devices, "_device_by_token", counted_read)
    monkeypatch.setattr(connection, "_no_write", counted_look)
    now = [1000.0]
    tokens = [f"t{n}" for n in range(20)]
    async with SQLiteStore(tmp_path / "s.db") as store:
        store.known_devices.clock = lambda: now[0]
        for n, token in enumerate(tokens):
            await store.add_device(DeviceRecord(f"d{n}", hash_token(token), 1))
        for token in tokens + tokens:  # the first lookup observes (``Writers.alone``)
            assert await store.device_by_token(hash_token(token)) is not None
        assert store.writers.alone() and len(store.known_devices.by_id()) == len(tokens)
        reads.clear()
        now[0] += DEVICE_CACHE_SECONDS + 1  # no call of the store meanwhile
        found = await asyncio.gather(*(store.device_by_token(hash_token(t)) for t in tokens))
        assert [d.id for d in found if d is not None] == [f"d{n}" for n in range(20)]
        assert (reads, len(looks)) == ([], 1)
        with sqlite3.connect(tmp_path / "s.db") as shell:
            shell.execute("UPDATE devices SET disabled = 1 WHERE id = 'd3'")
        now[0] += DEVICE_CACHE_SECONDS + 1
        changed = await store.device_by_token(hash_token("t3"))
        assert changed is not None and changed.disabled
        assert (reads, len(looks)) == ([hash_token("t3")], 2)


async def kept_device_then_a_shell_change(store: SQLiteStore, path: Path,
                                         now: list[float]) -> None:
    """Device ``d1`` (token ``t``) kept by ``store`` on the clock ``now``, then disabled
    behind the store's back by an SQL shell."""
    store.known_devices.clock = lambda: now[0]
    await store.add_device(DeviceRecord("d1", hash_token("t"), 1))
    for _ in range(2):  # the first lookup observes (``Writers.alone``), the second keeps
        assert await store.device_by_token(hash_token("t")) is not None
    assert store.known_devices.by_id().keys() == {"d1"}
    with sqlite3.connect(path) as shell:
        shell.execute("UPDATE devices SET disabled = 1 WHERE id = 'd1'")


async def test_a_failed_look_after_a_quiet_confirms_nothing_and_the_row_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the look after a quiet fails, the lookup does not fail with it and the kept
    records are not trusted: it reads its row (a shell's change is seen)."""
    from crdtsync_server.store.sqlite import connection

    def broken_look(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    now = [1000.0]
    async with SQLiteStore(tmp_path / "s.db") as store:
        await kept_device_then_a_shell_change(store, tmp_path / "s.db", now)
        monkeypatch.setattr(connection, "_no_write", broken_look)
        now[0] += DEVICE_CACHE_SECONDS + 1
        found = await store.device_by_token(hash_token("t"))
        assert found is not None and found.disabled


async def test_the_records_still_go_ten_minutes_after_the_first_was_kept(
        tmp_path: Path) -> None:
    """The look after a quiet does not outlive ``DEVICE_CACHE_LIMIT``, the bound on the
    memory the records hold: past it, a lookup reads its row again."""
    now = [1000.0]
    async with SQLiteStore(tmp_path / "s.db") as store:
        await kept_device_then_a_shell_change(store, tmp_path / "s.db", now)
        now[0] += DEVICE_CACHE_LIMIT + 1
        assert not store.known_devices.unconfirmed()  # gone, not to be confirmed
        found = await store.device_by_token(hash_token("t"))
        assert found is not None and found.disabled


async def test_a_second_store_on_the_file_makes_the_lookup_forget_what_it_kept(
        tmp_path: Path) -> None:
    """Once another store object has the file open, its writes are not seen by this one's
    kept records: the lookup reads (and observes) instead, and after the other left it
    starts again from the rows."""
    path = tmp_path / "s.db"
    async with SQLiteStore(path) as first:
        await first.add_device(DeviceRecord("d1", hash_token("t"), 1))
        await first.commit(SyncWrite("d1", time=500, events=evs(1, 1)))
        for _ in range(2):
            assert await first.device_by_token(hash_token("t")) is not None
        async with SQLiteStore(path) as second:
            await second.update_device("d1", disabled=True)
            found = await first.device_by_token(hash_token("t"))
            assert found is not None and found.disabled
        found = await first.device_by_token(hash_token("t"))
        assert found is not None and found.disabled
