"""The ``postgres`` and ``postgres-projection`` sinks against a real PostgreSQL
(``tests/services.py``): rows unique by key whatever is redelivered, the projection equal to
the final state after random edits (deletes included) with old batches redelivered out of
order, table names, errors, a lost connection, and the feed of a real server (devices, cloud
writes, a restart) landing in both tables. Each test uses its own tables and drops them."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from crdtsync import AdminClient, Device
from crdtsync.errors import MalformedRequest, SinkError, SinkRejected
from crdtsync_server import Server, ServerConfig
from crdtsync_server.sinks import SINK_TYPES, Sink, SinkConfig
from crdtsync_server.store.feed import FeedItem

from .conftest import ADMIN_TOKEN
from .services import require_postgres
from .test_sinks_e2e import (
    caught_up,
    eventually,
    feed_keys,
    server_config,
    start_devices,
    start_pinned,
)
from .test_sinks_nats import conflict, delivered, event, state

__all__ = ["server_config"]  # the e2e fixture: readers re-poll the feed often

SERVICE = pytest.mark.service

Where = tuple[str, str, str, str]
"""(device, doc, map, key) of a projection row."""
Projection = dict[Where, tuple[Any, int, int]]
"""The live rows of a projection: ``{where: (value, updated, cursor)}``."""


@dataclass
class Database:
    """A test's own tables (names starting with ``t_<tag>_``) in the real database."""

    url: str
    conn: Any
    tag: str

    def table(self, name: str) -> str:
        return f"t_{self.tag}_{name}"

    def sink(self, type_: str, table: str, name: str = "pg", **options: Any) -> Sink:
        return SINK_TYPES[type_](SinkConfig(name, type_, {"url": self.url, "table": table,
                                                          **options}))

    async def rows(self, table: str) -> list[dict[str, Any]]:
        records = await self.conn.fetch(f'SELECT * FROM {table} ORDER BY cursor')
        return [dict(record) for record in records]

    async def projection(self, table: str) -> Projection:
        records = await self.conn.fetch(
            f'SELECT device, doc, map, key, value, updated, cursor FROM "{table}_current"')
        return {(r["device"], r["doc"], r["map"], r["key"]):
                (json.loads(r["value"]), r["updated"], r["cursor"]) for r in records}


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    url = require_postgres()
    conn = await asyncpg.connect(url)
    db = Database(url, conn, uuid.uuid4().hex[:12])
    try:
        yield db
    finally:
        tables = await conn.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables "
            "WHERE starts_with(tablename, $1)", f"t_{db.tag}_")
        for table in tables:
            await conn.execute(f"DROP TABLE IF EXISTS {table['name']} CASCADE")
        await conn.execute(f'DROP SCHEMA IF EXISTS "s_{db.tag}" CASCADE')
        await conn.close()


def project(items: Sequence[FeedItem]) -> Projection:
    """What the projection must hold after ``items`` (applied in feed order)."""
    live: Projection = {}
    for item in items:
        if item.kind != "state":
            continue
        for name, keys in item.body.items():
            for key, value in keys.items():
                where = (item.device, item.doc or "", name, key)
                if value is None:
                    live.pop(where, None)
                else:
                    live[where] = (value, item.time, item.cursor)
    return live


# --- options (no service) ----------------------------------------------------------------------

@pytest.mark.parametrize("table", ['x"; DROP TABLE y; --', "a b", "1abc", "a.b.c", "", ".x",
                                   "x" * 49, "é", 'a."b"', 7])
def test_unsafe_table_names_are_refused(table: object) -> None:
    for type_ in ("postgres", "postgres-projection"):
        with pytest.raises(MalformedRequest) as info:
            SINK_TYPES[type_](SinkConfig("pg", type_, {"table": table}))
        assert info.value.detail["field"] == "options.table"


@pytest.mark.parametrize(("options", "field"), [
    ({"url": "mysql://x"}, "url"), ({"create_table": 1}, "create_table"),
    ({"timeout": 0}, "timeout")])
def test_options_are_validated(options: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        SINK_TYPES["postgres"](SinkConfig("pg", "postgres", options))
    assert info.value.detail["field"] == f"options.{field}"


# --- the table sink ----------------------------------------------------------------------------

@SERVICE
async def test_rows_are_unique_by_key_whatever_is_redelivered(database: Database) -> None:
    items = [event(1, "d.1", 1, "temp.in", fleet="north"), event(2, "d2", 1),
             state(3, "d.1", {"state": {"mode": "eco", "old": None}}, fleet="north"),
             event(4, "d.1", 2, body={"deep": [1, {"x": None}], "text": "é"}),
             event(5, "d2", 2), conflict(6, "d2")]
    table = database.table("events")
    await delivered(database.sink("postgres", table), items[:3], items[:3], items[1:],
                    items[3:], items)

    rows = await database.rows(table)
    assert [row["key"] for row in rows] == [item.key for item in items]
    for row, item in zip(rows, items, strict=True):
        assert json.loads(row.pop("body")) == item.body
        assert row == {"key": item.key, "cursor": item.cursor, "kind": item.kind,
                       "device": item.device, "fleet": item.fleet, "topic": item.topic,
                       "seq": item.seq, "doc": item.doc, "source": item.source,
                       "time": item.time, "received": item.received}
    indexes = await database.conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = $1",
                                        table)
    assert any("(device, seq)" in index["indexdef"] for index in indexes)


@SERVICE
async def test_a_schema_qualified_table(database: Database) -> None:
    schema = f"s_{database.tag}"
    await database.conn.execute(f'CREATE SCHEMA "{schema}"')
    await delivered(database.sink("postgres", f"{schema}.events"), [event(1, "d", 1)])
    await delivered(database.sink("postgres-projection", f"{schema}.state"),
                    [state(2, "d", {"state": {"k": 1}})])
    assert [row["key"] for row in await database.rows(f'"{schema}".events')] == ["ev:d:1"]
    assert await database.conn.fetchval(f'SELECT value FROM "{schema}".state_current') == "1"


@SERVICE
@pytest.mark.parametrize("type_", ["postgres", "postgres-projection"])
async def test_a_missing_table_without_create_table_is_rejected(
        database: Database, type_: str) -> None:
    sink = database.sink(type_, database.table("missing"), create_table=False)
    with pytest.raises(SinkRejected, match="does not exist"):
        await sink.open()
    await sink.aclose()


@SERVICE
async def test_a_value_postgres_cannot_store_is_rejected(database: Database) -> None:
    sink = database.sink("postgres", database.table("events"))
    await sink.open()
    try:
        with pytest.raises(SinkRejected) as info:
            await sink.deliver([event(1, "d", 1), event(2, "d", 2, body={"nul": "a\u0000b"})])
        assert info.value.detail["sqlstate"].startswith("22")
        await sink.deliver([event(1, "d", 1)])  # the runner delivers the others one by one
    finally:
        await sink.aclose()
    assert [row["key"] for row in await database.rows(database.table("events"))] == ["ev:d:1"]


@SERVICE
async def test_a_lost_connection_is_opened_again(database: Database) -> None:
    name = f"lost-{database.tag}"
    sink = database.sink("postgres", database.table("events"), name=name)
    await sink.open()
    try:
        await sink.deliver([event(1, "d", 1)])
        killed = await database.conn.fetchval(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE application_name = $1", f"crdtsync-sink-{name}")
        assert killed == 1
        for _ in range(2):  # at most one retryable failure, then a new connection
            try:
                await sink.deliver([event(2, "d", 2)])
                break
            except SinkRejected:
                raise
            except SinkError:
                continue
    finally:
        await sink.aclose()
    assert [row["key"] for row in await database.rows(database.table("events"))] == [
        "ev:d:1", "ev:d:2"]


# --- the projection sink -----------------------------------------------------------------------

@SERVICE
async def test_a_delete_and_a_re_add_redelivered_out_of_order(database: Database) -> None:
    items = [state(1, "d", {"state": {"a": 1}}), state(2, "d", {"state": {"a": None}}),
             state(3, "d", {"state": {"a": 3}}), event(4, "d", 1)]
    readd, deleted = database.table("readd"), database.table("deleted")
    await delivered(database.sink("postgres-projection", readd),
                    items, items[2:], items[:1], items[1:2])
    await delivered(database.sink("postgres-projection", deleted),
                    items[:2], items[1:2], items[:1])
    assert await database.projection(readd) == project(items) == {
        ("d", "state", "state", "a"): (3, items[2].time, 3)}
    assert await database.projection(deleted) == project(items[:2]) == {}
    tombstones = await database.rows(deleted)  # the delete is remembered, with its cursor
    assert [(row["key"], row["value"], row["deleted"], row["cursor"]) for row in tombstones
            ] == [("a", None, True, 2)]


def random_feed(rng: random.Random, count: int) -> list[FeedItem]:
    """``count`` feed items: state changes of random keys (a third of them deletes) of a
    few devices, documents and maps, with some events between them."""
    values: list[Any] = [None, None, None, 0, False, "", "text", 17, [1, 2], {"x": {"y": 1}}]
    seqs: dict[str, int] = {}
    items: list[FeedItem] = []
    for cursor in range(1, count + 1):
        device = rng.choice(["d0", "d.1", "d2"])
        if rng.random() < 0.2:
            seqs[device] = seqs.get(device, 0) + 1
            items.append(event(cursor, device, seqs[device]))
            continue
        changes: dict[str, dict[str, Any]] = {}
        for _ in range(rng.randint(1, 4)):
            keys = changes.setdefault(rng.choice(["state", "cfg"]), {})
            keys[rng.choice(["k0", "k1", "k2", "k.3"])] = rng.choice(values)
        items.append(state(cursor, device, changes, doc=rng.choice(["state", "other"])))
    return items


def split(rng: random.Random, items: list[FeedItem]) -> list[list[FeedItem]]:
    batches: list[list[FeedItem]] = []
    while len(items) > sum(map(len, batches)):
        start = sum(map(len, batches))
        batches.append(items[start:start + rng.randint(1, 6)])
    return batches


@SERVICE
@pytest.mark.parametrize("seed", range(4))
async def test_the_projection_is_the_final_state_despite_old_batches_redelivered(
        database: Database, seed: int) -> None:
    rng = random.Random(seed)
    items = random_feed(rng, 150)
    batches = split(rng, items)
    table = database.table("state")
    sink = database.sink("postgres-projection", table)
    await sink.open()
    try:
        for n, batch in enumerate(batches, 1):
            await sink.deliver(batch)
            for old in rng.sample(batches[:n], min(2, n)):  # redelivered, in any order
                await sink.deliver(old)
            if n % 6 == 0:
                assert await database.projection(table) == project(items[:batch[-1].cursor])
        for batch in rng.sample(batches, len(batches)):  # the whole feed again, shuffled
            await sink.deliver(batch)
    finally:
        await sink.aclose()
    expected = project(items)
    assert await database.projection(table) == expected
    assert len(expected) > 10  # the random edits left something to compare
    rows = await database.rows(table)
    assert len({(r["device"], r["doc"], r["map"], r["key"]) for r in rows}) == len(rows)
    assert len([r for r in rows if r["deleted"]]) == len(rows) - len(expected) > 0


# --- the feed of a real server -----------------------------------------------------------------

async def edit(devices: list[Device], rounds: range) -> None:
    """Each device emits an event, sets a key, deletes another now and then, and syncs."""
    for n in rounds:
        for dev in devices:
            await dev.emit("reading", {"n": n})
            dev.state[f"k{n % 3}"] = {"n": n, "by": dev.id}
            if n % 2 and f"k{(n + 1) % 3}" in dev.state:
                del dev.state[f"k{(n + 1) % 3}"]
            await dev.sync()


def pg_sinks(database: Database, start: str = "beginning") -> dict[str, dict[str, Any]]:
    common = {"batch": 3, "backoff": 0.02, "max_backoff": 0.2, "start": start}
    return {
        "rows": {"type": "postgres", **common,
                 "options": {"url": database.url, "table": database.table("events")}},
        "state": {"type": "postgres-projection", **common,
                  "options": {"url": database.url, "table": database.table("state")}},
    }


@SERVICE
async def test_a_server_feed_lands_in_both_tables_across_a_restart(
        server_config: ServerConfig, database: Database, tmp_path: Path) -> None:
    first = await start_pinned(server_config)
    devices: list[Device] = []
    try:
        async with AdminClient(first.url, ADMIN_TOKEN) as admin:
            for name, sink in pg_sinks(database).items():
                await admin.put_sink(name, sink)
            await start_devices(admin, first.url, ("d0", "d.1"), tmp_path, devices)
            await edit(devices, range(4))
            await admin.patch_state("d0", {"mode": "eco", "k0": None})  # cloud writes
            await admin.patch_state("d.1", {"limit": 5}, map_name="settings")
        await first.aclose()  # wherever the runners were
        async with Server(server_config) as second, \
                AdminClient(second.url, ADMIN_TOKEN) as admin:
            await edit(devices, range(4, 8))
            await admin.patch_state("d0", {"mode": None})
            for name in pg_sinks(database):
                await eventually(partial(caught_up, admin, name))
            keys = await feed_keys(admin)
            rows, live = (await database.rows(database.table("events")),
                          await database.projection(database.table("state")))
            # Two more sinks on the same tables deliver the whole feed again: nothing changes.
            for name, sink in pg_sinks(database).items():
                await admin.put_sink(f"{name}-again", sink)
                await eventually(partial(caught_up, admin, f"{name}-again"))
            server_rows = await second.services.store.read_projection()
    finally:
        for dev in devices:
            await dev.aclose()
        await first.aclose()

    assert [row["key"] for row in rows] == keys  # every item once, in feed order
    assert await database.rows(database.table("events")) == rows
    assert await database.projection(database.table("state")) == live
    assert {where: value for where, (value, _, _) in live.items()} == {
        (r.device, r.doc, r.map, r.key): r.value for r in server_rows}
    assert ("d0", "state", "state", "mode") not in live
    assert live[("d.1", "state", "settings", "limit")][0] == 5
