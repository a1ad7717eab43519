"""PostgreSQL-only behaviour of the store: migrations and schema versions, several store
objects (server instances) on one database, the sequence lock that keeps cursors from
skipping, announcements over ``LISTEN``/``NOTIFY``, lost connections, two servers on one
database, and :func:`open_store` URLs. The shared contract is in the role suites
``test_store_<role>.py`` (backends in ``store_backends.py``, where each store gets a schema
of its own).

Every test runs on the test database of ``tests/services.py`` in a random schema, dropped
afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from crdtsync import AdminClient, Device
from crdtsync.errors import StoreError, Unavailable
from crdtsync.protocol import WAKE_PATH
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store import (
    DeviceRecord,
    DocWrite,
    KeyStamp,
    SyncWrite,
    WakeEntry,
    open_store,
    wake_device,
)
from crdtsync_server.store.postgres import PostgresStore
from crdtsync_server.store.postgres.connection import sequenced
from crdtsync_server.store.postgres.schema import SCHEMA_VERSION

from .conftest import ADMIN_TOKEN
from .services import drop_schema, new_schema, require_postgres
from .store_backends import evs, write_docs

OpenStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    require_postgres()
    try:
        yield name
    finally:
        await drop_schema(name)


@pytest.fixture
async def instance(schema: str) -> AsyncIterator[OpenStore]:
    """Opens store objects on the test schema (server instances sharing one database);
    closes them after the test."""
    opened: list[PostgresStore] = []

    async def open_one(**kw: Any) -> PostgresStore:
        store = PostgresStore(require_postgres(), schema=schema, **kw)
        await store.open()
        opened.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in opened:
            await store.aclose()


async def admin_fetch(query: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``query`` on a connection of its own (not a store's)."""
    conn = await asyncpg.connect(require_postgres())
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


class Heads:
    """What an ``on_wakes`` listener heard, and a way to wait for it."""

    def __init__(self) -> None:
        self.heard: list[int] = []
        self._news = asyncio.Event()

    def __call__(self, head: int) -> None:
        self.heard.append(head)
        self._news.set()

    async def until(self, check: Callable[[list[int]], bool], seconds: float = 10.0) -> None:
        """Wait until ``check(heard)`` holds (``seconds`` bound a hang; no timing is
        asserted)."""
        async with asyncio.timeout(seconds):
            while not check(self.heard):
                self._news.clear()
                await self._news.wait()


# --- migrations --------------------------------------------------------------------------


async def test_a_new_schema_is_migrated_once(schema: str, instance: OpenStore) -> None:
    store = await instance()
    again = await instance()  # a second instance finds it migrated
    assert await store.schema_version() == await again.schema_version() == SCHEMA_VERSION
    rows = await admin_fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY version')
    assert [row["version"] for row in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_instances_starting_together_migrate_once(schema: str,
                                                        instance: OpenStore) -> None:
    stores = await asyncio.gather(*(instance() for _ in range(4)))
    assert {await s.schema_version() for s in stores} == {SCHEMA_VERSION}
    rows = await admin_fetch(f'SELECT version FROM "{schema}".schema_version')
    assert sorted(row["version"] for row in rows) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_v2_schema_migrates_and_its_stamps_read_as_before(
        schema: str, instance: OpenStore) -> None:
    """v3 logs a commit's stamps in its update rows: a v2 stamp row (no ``upto``, so 0)
    reads as it did, until a stamp of its key logged with a later update supersedes it."""
    store = await instance()
    await store.aclose()
    conn = await asyncpg.connect(require_postgres())
    for statement in ("ALTER TABLE updates DROP COLUMN stamps",
                      "ALTER TABLE stamps DROP COLUMN upto",
                      "DELETE FROM schema_version WHERE version = 3",
                      "INSERT INTO docs (key, gen) VALUES ('d/state', 0)",
                      "INSERT INTO updates (key, gen, data) VALUES ('d/state', 0, '\\x01')",
                      "INSERT INTO stamps (doc, map, key, stamp, writer, raw)"
                      " VALUES ('d/state', 'state', 'x', 123, 'device', 120)"):
        await conn.execute(f'SET search_path TO "{schema}"; {statement}')
    await conn.close()
    old = KeyStamp("d/state", "state", "x", 123, "device", 120)
    migrated = await instance()
    assert await migrated.schema_version() == SCHEMA_VERSION == 3
    assert await migrated.read_stamps("d/state") == [old]
    newer = KeyStamp("d/state", "state", "x", 124, "cloud", 0)
    await migrated.commit(SyncWrite(None, 10, docs=[DocWrite("d/state", b"u2")],
                                    stamps=[newer]))
    assert await migrated.read_stamps("d/state") == [newer]


async def test_a_newer_schema_is_refused_and_left_untouched(schema: str,
                                                            instance: OpenStore) -> None:
    store = await instance()
    await store.set_setting("kept", "yes")
    await store.aclose()
    await admin_fetch(f'INSERT INTO "{schema}".schema_version VALUES ($1)', SCHEMA_VERSION + 1)
    tables = f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}'"
    before = sorted(row[0] for row in await admin_fetch(tables))
    newer = PostgresStore(require_postgres(), schema=schema)
    with pytest.raises(StoreError, match="newer"):
        await newer.open()
    await newer.aclose()
    assert sorted(row[0] for row in await admin_fetch(tables)) == before
    rows = await admin_fetch(f'SELECT max(version) FROM "{schema}".schema_version')
    assert rows[0][0] == SCHEMA_VERSION + 1
    assert (await admin_fetch(f'SELECT value FROM "{schema}".settings'))[0][0] == "yes"


async def test_a_bad_schema_name_is_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresStore("postgresql://nowhere/db", schema='x"; DROP TABLE y; --')


# --- instances sharing one database ------------------------------------------------------


async def test_two_instances_see_each_others_writes(instance: OpenStore) -> None:
    a, b = await instance(), await instance()
    await a.set_setting("k", "from a")
    assert await b.get_setting("k") == "from a"
    await b.add_device(DeviceRecord("d1", "h", created=1))
    assert (await a.get_device("d1")) == (await b.get_device("d1"))
    result = await a.commit(SyncWrite(None, 5, docs=[DocWrite("doc", b"u1")]))
    assert (await b.load_doc("doc")).updates == ((result.update_ids[0], b"u1"),)
    assert await b.rebuild("doc", 0, result.update_ids[0], b"snap") is not None
    assert (await a.load_doc("doc")).gen == 1
    assert await a.read_since("doc", result.update_ids[0]) is None  # a's copy must reload


async def test_concurrent_syncs_of_one_device_store_each_event_once(
        instance: OpenStore) -> None:
    """Two instances commit the same device's retried syncs at once (a device whose answer
    was lost syncs again through another instance): each seq is stored once, the replays
    are accepted, and ``last_seq`` is the highest seq."""
    a, b = await instance(), await instance()
    await a.add_device(DeviceRecord("d1", "h", created=1))
    writes = [SyncWrite("d1", 10 + n, events=evs(1, n)) for n in range(1, 21)]
    outcomes = await asyncio.gather(*(store.commit(write) for write in writes
                                      for store in (a, b)), return_exceptions=True)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    events = await b.read_events(limit=1000)
    assert sorted(e.seq for e in events) == list(range(1, 21))
    device = await a.get_device("d1")
    assert device is not None and device.last_seq == 20 and device.events_lost == 0


async def test_concurrent_rebuilds_of_one_document_succeed_once(instance: OpenStore) -> None:
    stores = [await instance() for _ in range(3)]
    upto = (await stores[0].commit(SyncWrite(None, 5, docs=[DocWrite("doc", b"u")]))
            ).update_ids[0]
    done = await asyncio.gather(*(s.rebuild("doc", 0, upto, f"s{i}".encode())
                                  for i, s in enumerate(stores) for _ in range(3)))
    won = [snapshot_id for snapshot_id in done if snapshot_id is not None]
    assert len(won) == 1
    log = await stores[1].load_doc("doc")
    assert log.gen == 1 and log.updates == () and log.snapshot_id == won[0] > upto


# --- cursors never skip ------------------------------------------------------------------


async def follow(read: Callable[[int], Awaitable[list[int]]], stop: asyncio.Event
                 ) -> list[int]:
    """Every cursor a reader following ``read(after)`` sees, in order, until ``stop`` is
    set and a last read finds nothing new."""
    seen: list[int] = []
    after = 0
    while True:
        finished = stop.is_set()  # before the read: a read after the last write follows
        batch = await read(after)
        seen += batch
        after = batch[-1] if batch else after
        if finished and not batch:
            return seen
        await asyncio.sleep(0)


async def test_readers_following_cursors_see_every_row_once(instance: OpenStore) -> None:
    """Writers on three instances append updates (one document) and wake entries at once
    while a reader on a fourth follows ``read_since`` and ``read_wakes``: it sees every
    row exactly once, in cursor order. Without the sequence lock a reader could see a
    later cursor committed before an earlier one and step over it for ever."""
    writers = [await instance(max_size=4) for _ in range(3)]
    reader = await instance()
    stop = asyncio.Event()

    async def updates_after(after: int) -> list[int]:
        rows = await reader.read_since("doc", after)
        assert rows is not None  # never compacted
        return [update_id for update_id, _ in rows]

    async def wakes_after(after: int) -> list[int]:
        return [entry.cursor for entry in await reader.read_wakes(after, 50)]

    async def write(store: PostgresStore, n: int) -> None:
        for i in range(25):
            await store.commit(SyncWrite(None, i, docs=[DocWrite("doc", b"u%d" % n)],
                                         wakes=[wake_device(f"w{n}")]))
            await store.add_wakes([wake_device(f"a{n}"), wake_device(f"b{n}")], i)

    await write_docs(reader, "doc", b"first")  # the document exists: writers only append
    following = [asyncio.create_task(follow(updates_after, stop)),
                 asyncio.create_task(follow(wakes_after, stop))]
    try:
        await asyncio.gather(*(write(store, n) for n, store in enumerate(writers * 3)))
    finally:
        stop.set()
        updates, wakes = await asyncio.gather(*following)
    stored_updates = [i for i, _ in (await reader.load_doc("doc")).updates]
    stored_wakes = [entry.cursor for entry in await reader.read_wakes(0, 10_000)]
    assert len(stored_updates) == 1 + 9 * 25 and len(stored_wakes) == 9 * 25 * 3
    assert updates == stored_updates
    assert wakes == stored_wakes
    assert await reader.wake_head() == stored_wakes[-1]


# --- announcements -----------------------------------------------------------------------


async def test_on_wakes_hears_other_instances_and_not_other_schemas(
        instance: OpenStore) -> None:
    listener, writer = await instance(), await instance()
    heads = Heads()
    listener.on_wakes(heads)
    stranger = PostgresStore(require_postgres(), schema="t_" + secrets.token_hex(6))
    try:
        await stranger.open()
        assert await stranger.add_wakes([wake_device("x")] * 5, 1) == 5  # another schema
    finally:
        await stranger.aclose()
        assert stranger.schema is not None
        await drop_schema(stranger.schema)
    assert await writer.add_wakes([wake_device("d1")], 1) == 1
    await heads.until(lambda heard: len(heard) > 0)
    assert heads.heard == [1]  # the other instance's head, and nothing of the other schema
    assert await writer.add_wakes([wake_device("d1"), wake_device("d2")], 2) == 3
    await heads.until(lambda heard: len(heard) > 1)
    assert heads.heard == [1, 3]  # each head once, in order
    assert await listener.read_wakes(0, 10) == [
        WakeEntry(1, "d:d1", 1), WakeEntry(2, "d:d1", 2), WakeEntry(3, "d:d2", 2)]


# --- lost connections --------------------------------------------------------------------


async def terminate(store: PostgresStore) -> int:
    """Kill every server process of ``store`` (pool and listener) from another connection,
    as a restart or a failover would; returns how many."""
    rows = await admin_fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = $1 AND pid <> pg_backend_pid()", store.channel)
    return len(rows)


async def test_lost_connections_give_unavailable_then_the_store_recovers(
        instance: OpenStore) -> None:
    store, other = await instance(min_size=2), await instance()
    heads = Heads()
    store.on_wakes(heads)
    await store.set_setting("k", "v")
    assert await terminate(store) >= 2  # a pooled connection and the listener
    outcomes: list[BaseException | str | None] = []
    for _ in range(5):  # each pooled connection may fail once, then the pool reconnects
        try:
            outcomes.append(await store.get_setting("k"))
        except Unavailable as exc:
            assert exc.retryable
            outcomes.append(exc)
    assert outcomes[-1] == "v"
    assert all(o == "v" or isinstance(o, Unavailable) for o in outcomes)
    await store.set_setting("k", "w")
    assert await other.get_setting("k") == "w"
    # the listener reconnects: another instance's wake entries are heard again
    head = await other.add_wakes([wake_device("d1")], 1)
    await heads.until(lambda heard: head in heard)  # the listener reconnected


async def test_a_slow_database_answers_unavailable_instead_of_piling_up(
        instance: OpenStore) -> None:
    """A statement over ``statement_timeout`` and a call that finds every pooled connection
    busy for longer than ``acquire_timeout`` both raise the retryable ``Unavailable``; the
    store serves again afterwards."""
    quick = await instance(statement_timeout=0.3)
    with pytest.raises(Unavailable) as raised:
        await quick._read(_sleep, 5.0)  # cancelled by the database after 0.3 s
    assert raised.value.retryable
    assert await quick.get_setting("k") is None
    store = await instance(max_size=1, acquire_timeout=0.2)
    holding = asyncio.Event()

    async def hold(conn: asyncpg.Connection) -> None:
        holding.set()
        await conn.execute("SELECT pg_sleep(3)")

    held = asyncio.create_task(store._read(hold))
    await holding.wait()  # the only connection is busy for 3 s, 15x the acquire timeout
    with pytest.raises(Unavailable):
        await store.get_setting("k")
    await held
    assert await store.get_setting("k") is None  # and it serves again


async def _sleep(conn: asyncpg.Connection, seconds: float) -> None:
    await conn.execute("SELECT pg_sleep($1)", seconds)


async def test_stores_in_other_schemas_never_wait_for_each_others_commit_lock(
        instance: OpenStore) -> None:
    """The commit-order lock is per schema: while a transaction of one schema holds it, a
    commit in another schema of the same database goes through."""
    mine = await instance()
    stranger = PostgresStore(require_postgres(), schema=new_schema())
    await stranger.open()
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: asyncpg.Connection) -> None:
        await sequenced(conn)
        holding.set()
        await release.wait()

    held = asyncio.create_task(mine._write(hold))
    try:
        await holding.wait()
        async with asyncio.timeout(10):  # a hang, not a speed, is what this bounds
            await write_docs(stranger, "doc", b"\x00\x00")
    finally:
        release.set()
        await held
        await stranger.aclose()
        await drop_schema(stranger.schema or "")


async def test_an_unreachable_database_is_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2.0)
    with pytest.raises(Unavailable):
        await store.open()
    await store.aclose()


# --- open_store --------------------------------------------------------------------------


def test_open_store_takes_postgres_urls() -> None:
    for url in ("postgresql://u@h:5432/db", "postgres://u@h/db"):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        assert store.url == url
        assert "u@" not in repr(store)  # never the user and password


def test_store_url_parameters_configure_the_store_and_the_rest_goes_to_the_driver() -> None:
    store = open_store("postgresql://u:p@h:5432/db?schema=tenant_a&sslmode=require"
                       "&pool_max=4&statement_timeout=2.5&pool_min=2&acquire_timeout=1")
    assert isinstance(store, PostgresStore)
    assert store.url == "postgresql://u:p@h:5432/db?sslmode=require"
    assert (store.schema, store.min_size, store.max_size) == ("tenant_a", 2, 4)
    assert (store.statement_timeout, store.acquire_timeout) == (2.5, 1.0)
    with pytest.raises(ValueError, match="pool_max"):
        open_store("postgresql://h/db?pool_max=many")
    with pytest.raises(ValueError, match="schema"):
        open_store("postgresql://h/db?schema=Robert');DROP")


async def test_stamps_keep_all_64_bits(instance: OpenStore) -> None:
    """Stamps are unsigned 64-bit and BIGINT is signed: the top bit survives."""
    store = await instance()
    rows = [KeyStamp("doc", "m", "hi", 2**64 - 1, "device", 2**63),
            KeyStamp("doc", "m", "lo", 0, "cloud", 2**63 - 1)]
    await store.commit(SyncWrite(None, 1, stamps=rows))
    assert await store.read_stamps("doc") == rows



async def test_concurrent_opens_make_one_pool(schema: str) -> None:
    store = PostgresStore(require_postgres(), schema=schema)
    try:
        await asyncio.gather(store.open(), store.open())
        await store.set_setting("k", "v")
        rows = await admin_fetch("SELECT count(*) FROM pg_stat_activity"
                                 " WHERE application_name = $1", store.channel)
        assert rows[0][0] == 2  # min_size=1 pooled connection and the listener
    finally:
        await store.aclose()


# --- servers sharing the database --------------------------------------------------------


async def wake(url: str, token: str, after: int | None = None) -> dict[str, Any]:
    """One live-channel request (docs/protocol.md section 14a) and its JSON answer."""
    params = {} if after is None else {"after": str(after), "wait": "30"}
    async with aiohttp.ClientSession() as session, session.get(
            url + WAKE_PATH, params=params, headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=60)) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


async def holding(server: Server, count: int) -> None:
    """Wait until ``server`` holds ``count`` live-channel requests."""
    for _ in range(1000):
        if server.services.wakes.waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server never held {count} requests")


async def test_two_servers_on_one_database(schema: str, server_config: ServerConfig,
                                           tmp_path: Path) -> None:
    """A cloud write through one server reaches a device syncing through the other (the
    document cache catches up with every read), and wakes that device's live channel held
    by the other server at once: heard over ``NOTIFY``, since the hub's polling of the log
    is turned off here (``wake_poll`` far beyond the test; without the announcement the
    request would end unwoken after 30 s)."""
    config = dataclasses.replace(server_config, wake_poll=3600.0)
    stores = [PostgresStore(require_postgres(), schema=schema) for _ in range(2)]
    async with Server(config, store=stores[0]) as one, \
            Server(dataclasses.replace(config, port=0), store=stores[1]) as two, \
            AdminClient(one.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", two.url, token=token, interval=None,
                          path=tmp_path / "d1.db") as device:
            await device.sync()
            start = int((await wake(two.url, token))["w"])
            held = asyncio.create_task(wake(two.url, token, start))
            await holding(two, 1)  # the write comes after the request waits
            await admin.patch_state("d1", {"led": "on"})
            answer = await held
            assert answer["wake"] is True and answer["w"] > start
            await device.sync()
            assert device.state["led"] == "on"
