"""Document generations on the server (issue 12): ``crdt.rebuilt``, and end to end over a
real server and SQLite file, the rebuild of a device's ``state`` document and what the
server answers to a request of another generation, with and without ``a`` (protocol
section 8). The device here is a small client written from protocol.md that sends ``a``;
the device library's adoption is tested in test_adoption.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Array, Doc, Map, Text

from crdtsync import AdminClient, crdt
from crdtsync.errors import GenerationMismatch
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    DocSync,
    Event,
    SyncRequest,
    SyncResponse,
    decode_response,
    encode_request,
)
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store.sqlite import documents as sqlite_documents

from .conftest import ADMIN_TOKEN
from .scrape import scrape, value
from .test_device_lifecycle import second_server
from .test_hostile_updates import rich_doc

T0 = 1_700_000_000_000
EMPTY_UPDATE = b"\x00\x00"


# --- crdt.rebuilt ----------------------------------------------------------------------------


def alternate(doc: Doc[Any], other: Doc[Any], writes: int) -> None:
    """Two replicas overwriting the same ten keys in turn (tombstones Yjs cannot collect),
    each write sent to the other."""
    for i in range(writes):
        writer, reader = (doc, other) if i % 2 else (other, doc)
        before = reader.get_state()
        crdt.write(writer, "state", {f"k{i % 10}": i})
        reader.apply_update(writer.get_update(before))


def test_rebuilt_keeps_the_content_and_drops_the_history() -> None:
    doc = rich_doc()
    alternate(doc, crdt.new_doc(8, doc.get_update()), 2000)
    fresh = crdt.rebuilt(doc, 4242)
    assert fresh.client_id == 4242
    assert crdt.to_json(fresh) == crdt.to_json(doc)
    assert crdt.to_json(crdt.new_doc(1, fresh.get_update())) == crdt.to_json(doc)
    assert len(fresh.get_update()) * 20 < len(doc.get_update())
    assert fresh.get_state() == crdt.new_doc(1, fresh.get_update()).get_state()


def test_rebuilt_recreates_nested_types_as_the_same_types() -> None:
    doc: Doc[Any] = Doc(client_id=7)
    state = doc.get("state", type=Map)
    state["plain"] = {"list": [1, 2.5, None, True, {"deep": "x"}], "e": {}}
    state["cfg"] = Map({"mode": "eco", "limits": Array([1, Map({"q": Text("hi")})])})
    state["note"] = Text("hello 😀")
    state["nothing"] = None
    doc.get("config", type=Map)["interval"] = 30
    note = state["note"]
    note.insert(len(note), " world")
    fresh = crdt.rebuilt(doc, 99)
    assert crdt.to_json(fresh) == crdt.to_json(doc)
    copy = crdt.new_doc(1, fresh.get_update())
    root = copy.get("state", type=Map)
    assert isinstance(root["cfg"], Map) and isinstance(root["cfg"]["limits"], Array)
    assert isinstance(root["cfg"]["limits"][1], Map)
    assert isinstance(root["cfg"]["limits"][1]["q"], Text)
    assert isinstance(root["note"], Text) and str(root["note"]) == "hello 😀 world"
    assert isinstance(root["plain"], dict)  # a plain value stays plain
    assert "nothing" in root and root["nothing"] is None
    # Edits inside a nested type still merge with concurrent ones of another replica.
    other = crdt.new_doc(2, fresh.get_update())
    root["cfg"]["mode"] = "turbo"
    other.get("state", type=Map)["cfg"]["limits"].append(3)
    copy.apply_update(other.get_update(copy.get_state()))
    assert crdt.to_json(copy)["state"]["cfg"] == {"mode": "turbo",
                                                  "limits": [1, {"q": "hi"}, 3]}


# --- end to end ------------------------------------------------------------------------------

SLACK = 256


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        rebuild_slack=SLACK)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Reply:
    status: int
    body: bytes

    def response(self) -> SyncResponse:
        assert self.status == 200, self.body
        return decode_response(self.body)


class Client:
    """A device that speaks the protocol from protocol.md and can adopt (it sends ``a``):
    one document, the generation it holds, the server's last state vector, an outbox."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.doc = crdt.new_doc(crdt.random_client_id())
        self.gen = 0
        self.server_sv = b"\x00"
        self.seq = 0

    def entry(self, *, adopt: bool = True) -> DocSync:
        update = self.doc.get_update(self.server_sv)
        return DocSync("state", self.doc.get_state(), b"" if update == EMPTY_UPDATE else update,
                       self.gen, adopt)

    async def post(self, request: SyncRequest) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": MEDIA_TYPE}
        async with self.http.post(self.url + SYNC_PATH, data=encode_request(request),
                                  headers=headers) as resp:
            return Reply(resp.status, await resp.read())

    async def sync(self, events: tuple[Event, ...] = ()) -> SyncResponse:
        """One round; adopts the answered generation when it differs (this client only
        adopts when it has no local change in flight, so it has nothing to rebase)."""
        response = (await self.post(SyncRequest("d1", (self.entry(),), events))).response()
        self.receive(response.docs[0])
        return response

    def receive(self, entry: DocSync) -> None:
        if entry.gen != self.gen:
            self.doc = crdt.new_doc(crdt.random_client_id(), entry.update)
            self.gen = entry.gen
        elif entry.update:
            self.doc.apply_update(entry.update)
        self.server_sv = entry.sv

    def event(self, n: int) -> Event:
        self.seq += 1
        return Event(self.seq, "t", T0 + self.seq, {"n": n})


@pytest.fixture
async def client(admin: AdminClient, server: Server, http: aiohttp.ClientSession) -> Client:
    token = (await admin.add_device("d1"))["token"]
    return Client(http, server.url, token)


def stored(db: str) -> tuple[int, int, int]:
    """``(generation, update rows, stored bytes)`` of ``d1/state`` in the server's file."""
    with closing(sqlite3.connect(db)) as conn:
        gen, snapshot = conn.execute(
            "SELECT gen, length(snapshot) FROM docs WHERE key = 'd1/state'").fetchone()
        rows, size = conn.execute("SELECT count(*), coalesce(sum(length(data)), 0)"
                                  " FROM updates WHERE key = 'd1/state'").fetchone()
    return int(gen), int(rows), int(snapshot + size)


async def round_(client: Client, admin: AdminClient, i: int) -> None:
    """Device and cloud overwrite the same keys in turn; the device first syncs alone, so
    it adopts a new generation with nothing of its own in flight."""
    await client.sync()
    crdt.write(client.doc, "state", {f"k{i % 10}": i})
    await client.sync()
    await admin.patch_state("d1", {f"k{(i + 5) % 10}": -i})


async def until_rebuilt(client: Client, admin: AdminClient, db: str, gen: int = 1,
                        start: int = 0, limit: int = 300) -> int:
    """Rounds until the server stored generation ``gen`` (the client may not know yet);
    returns the next round number."""
    for i in range(start, start + limit):
        await round_(client, admin, i)
        if stored(db)[0] >= gen:
            return i + 1
    raise AssertionError(f"no rebuild into generation {gen} in {limit} rounds")


def expected_after(rounds: int) -> dict[str, Any]:
    """The state :func:`round_` leaves after rounds ``0 .. rounds - 1``."""
    state: dict[str, Any] = {}
    for i in range(rounds):
        state[f"k{i % 10}"] = i
        state[f"k{(i + 5) % 10}"] = -i
    return {"state": state}


async def test_many_overwrites_rebuild_the_state_document(
        client: Client, admin: AdminClient, server: Server, server_config: ServerConfig
) -> None:
    """The history of alternating writers makes the server rebuild the document: the
    generation goes up, the stored log shrinks, the state read through the API is the
    same, and the device adopts the new generation and keeps syncing, across rebuilds."""
    db = server_config.db
    before: tuple[int, int, int] = (0, 0, 0)
    for i in range(300):
        await round_(client, admin, i)
        if stored(db)[0] > 0:
            break
        before = stored(db)
    assert stored(db)[0] == 1 and server.services.docs.rebuilds == 1
    _, rows, size = stored(db)
    assert rows <= 1 < before[1] and size * 2 < before[2]
    assert await admin.state("d1") == expected_after(i + 1)
    assert client.gen == 0  # it learns at its next sync
    response = await client.sync()
    assert client.gen == response.docs[0].gen == 1
    assert crdt.to_json(client.doc) == await admin.state("d1")

    end = await until_rebuilt(client, admin, db, gen=2, start=i + 1)
    assert server.services.docs.rebuilds == 2
    await client.sync()
    assert client.gen == 2 and crdt.to_json(client.doc) == expected_after(end)
    assert await admin.state("d1") == expected_after(end)
    assert value(await scrape(server), "crdtsync_doc_rebuilds_total") == 2


async def test_an_old_generation_with_a_gets_the_whole_document_and_its_events_stored(
        client: Client, admin: AdminClient, server_config: ServerConfig) -> None:
    """Protocol section 8: a ``state`` entry of another generation with ``a`` is not
    applied (its update builds on the old generation); its answer is the whole stored
    generation; the rest of the request (here two events) is processed as usual."""
    db = server_config.db
    rounds = await until_rebuilt(client, admin, db)
    assert client.gen == 0
    crdt.write(client.doc, "state", {"stale": 1})  # built on generation 0
    log_before = stored(db)
    events = (client.event(1), client.event(2))
    response = (await client.post(SyncRequest("d1", (client.entry(),), events))).response()
    entry = response.docs[0]
    assert (entry.doc, entry.gen) == ("state", 1)
    whole = crdt.new_doc(5, entry.update)
    assert crdt.to_json(whole) == await admin.state("d1") == expected_after(rounds)
    assert entry.sv == whole.get_state()
    assert stored(db) == log_before  # nothing of the old generation's update
    assert response.acked == 2
    page = await admin.events(device="d1")
    assert [(e["seq"], e["body"]) for e in page["events"]] == [(1, {"n": 1}), (2, {"n": 2})]

    client.receive(entry)  # adopt (this client drops its own change; the device rebases)
    await admin.patch_state("d1", {"after": True})
    after = await client.sync()
    assert after.docs[0].gen == 1 and after.acked == 2
    assert crdt.to_json(client.doc) == await admin.state("d1")
    assert client.doc.get("state", type=Map)["after"] is True


async def test_an_old_generation_without_a_is_refused(
        client: Client, admin: AdminClient, server_config: ServerConfig) -> None:
    """An old client (no ``a``) keeps the documented answer: ``409 generation_mismatch``,
    with nothing of the request stored."""
    await until_rebuilt(client, admin, server_config.db)
    crdt.write(client.doc, "state", {"stale": 1})
    log_before = stored(server_config.db)
    event = client.event(1)
    reply = await client.post(SyncRequest("d1", (client.entry(adopt=False),), (event,)))
    assert reply.status == 409
    with pytest.raises(GenerationMismatch) as info:
        decode_response(reply.body)
    assert info.value.detail == {"doc": "state", "gen": 1}
    assert (await admin.events(device="d1"))["events"] == []
    assert stored(server_config.db) == log_before
    assert "stale" not in (await admin.state("d1"))["state"]
    # The same request with `a` goes through.
    response = (await client.post(SyncRequest("d1", (client.entry(),), (event,)))).response()
    assert response.docs[0].gen == 1 and response.acked == 1


async def test_another_server_process_reloads_the_new_generation(
        client: Client, admin: AdminClient, server_config: ServerConfig,
        http: aiohttp.ClientSession) -> None:
    """Two processes on one database: one rebuilds; the other, which cached generation 0,
    reloads it, answers an old-generation request with the new generation, and writes into
    the new generation."""
    async with second_server(server_config) as (other, other_admin):
        via_other = Client(http, other.url, client.token)
        crdt.write(via_other.doc, "state", {"first": 1})
        await via_other.sync()
        assert await other_admin.state("d1") == {"state": {"first": 1}}  # cached there

        await until_rebuilt(client, admin, server_config.db)
        response = await via_other.sync()  # generation 0, with `a`
        assert response.docs[0].gen == via_other.gen == 1
        assert crdt.to_json(via_other.doc) == await admin.state("d1")
        await other_admin.patch_state("d1", {"from_other": True})
        assert stored(server_config.db)[0] == 1
        assert (await admin.state("d1"))["state"]["from_other"] is True
        await client.sync()
        assert client.gen == 1
        assert crdt.to_json(client.doc) == await other_admin.state("d1")


async def test_a_failure_inside_the_rebuild_leaves_the_old_generation(
        client: Client, admin: AdminClient, server: Server, server_config: ServerConfig,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An I/O error in the middle of the rebuild transaction (after the rows were deleted):
    every sync and cloud write still succeeds, generation 0 stays whole, and the rebuild is
    retried at a later write."""
    real = sqlite_documents.replace_doc

    def crash(conn: sqlite3.Connection, *args: Any) -> None:
        real(conn, *args)
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(sqlite_documents, "replace_doc", crash)
    for i in range(60):  # far past the point where it rebuilds (test above)
        await round_(client, admin, i)
    docs = server.services.docs
    assert docs.rebuilds == 0 and docs.rebuild_failures >= 1
    assert "rebuild of d1/state failed, will retry" in caplog.text
    assert stored(server_config.db)[:2] == (0, 120)  # every row of 60 rounds is there
    assert await admin.state("d1") == expected_after(60)
    await client.sync()
    assert client.gen == 0 and crdt.to_json(client.doc) == expected_after(60)

    monkeypatch.undo()
    end = await until_rebuilt(client, admin, server_config.db, start=60, limit=30)
    assert docs.rebuilds == 1
    assert await admin.state("d1") == expected_after(end)
    await client.sync()
    assert client.gen == 1 and crdt.to_json(client.doc) == expected_after(end)


async def test_a_rebuilt_document_is_rebuilt_by_cloud_writes_alone_after_a_restart(
        client: Client, admin: AdminClient, server: Server, server_config: ServerConfig
) -> None:
    """Whether a device adopts is learnt from its syncs, in memory; a document at
    generation 1 or more has a device that adopts (no other can sync it), so after a
    restart cloud writes alone, with the device offline, still bound its history."""
    await until_rebuilt(client, admin, server_config.db)
    await server.aclose()
    async with Server(server_config) as restarted, \
            AdminClient(restarted.url, ADMIN_TOKEN) as cloud:
        for i in range(300):
            await cloud.patch_state("d1", {f"k{i % 10}": i, "other": -i})
            if stored(server_config.db)[0] >= 2:
                break
        assert stored(server_config.db)[0] == 2 and restarted.services.docs.rebuilds == 1
        client.url = restarted.url
        response = await client.sync()
        assert client.gen == response.docs[0].gen == 2
        assert crdt.to_json(client.doc) == await cloud.state("d1")
