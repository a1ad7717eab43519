"""Latest write wins by time, the server side (issue 13, protocol section 13).

A real server on 127.0.0.1 over a real SQLite file, driven with requests built by
``crdtsync.protocol`` from pycrdt documents whose client ids the tests choose (above and
below the server's), so every case runs both ways round of the Yjs tie-break the decision
must overrule. The server's clock is injected (``ServerConfig.clock``) and the device's
stamps and ``ck`` are chosen: nothing sleeps, and a device clock an hour off is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from crdtsync import AdminClient, hlc
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    Conflict,
    DocSync,
    StampedWrite,
    SyncRequest,
    SyncResponse,
    WriteInfo,
    decode_response,
    encode_request,
)
from crdtsync.schema import StateSchema
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store import DeviceRecord

from .conftest import ADMIN_TOKEN

SERVER_ID = 1_000_000
HIGH_ID, LOW_ID = 2_000_000_000, 7
"""Client ids of a device whose concurrent writes Yjs lets win (higher than the server's)
and lose (lower)."""
T0 = 1_750_000_000_000
"""The server's clock at the start of each test, ms."""
HOUR = 3_600_000
MISSING = object()


class Clock:
    """A wall clock in ms that tests move by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class RawDevice:
    """A device built from the protocol alone: a pycrdt document with a chosen client id,
    writes stamped with chosen stamps, ``ck`` chosen per request."""

    def __init__(self, http: aiohttp.ClientSession, url: str, device_id: str, token: str,
                 client_id: int) -> None:
        self.http, self.url, self.id, self.token = http, url, device_id, token
        self.doc: Doc[Any] = Doc(client_id=client_id)
        self.server_sv = b"\x00"
        self.gen = 0
        self.dirty: dict[tuple[str, str], StampedWrite] = {}

    def write(self, key: str, value: Any, at: int, name: str = "state") -> None:
        """Set ``key`` (``MISSING``: delete it) stamped ``hlc.stamp(at)``."""
        root = self.doc.get(name, type=Map)
        if value is MISSING:
            del root[key]
            self.dirty[(name, key)] = StampedWrite(name, key, hlc.stamp(at), None, True)
        else:
            root[key] = value
            self.dirty[(name, key)] = StampedWrite(name, key, hlc.stamp(at), value)

    def request(self, ck: int | None, stamped: bool = True) -> SyncRequest:
        part = DocSync("state", self.doc.get_state(), self.doc.get_update(self.server_sv),
                       self.gen, stamps=tuple(self.dirty.values()) if stamped else None)
        return SyncRequest(device=self.id, docs=(part,), clock=ck if stamped else None)

    async def post(self, request: SyncRequest) -> tuple[int, bytes]:
        async with self.http.post(self.url + SYNC_PATH, data=encode_request(request),
                                  headers={"Authorization": f"Bearer {self.token}",
                                           "Content-Type": MEDIA_TYPE}) as resp:
            return resp.status, await resp.read()

    async def send(self, request: SyncRequest) -> SyncResponse:
        """One round trip whose response the device does not apply (it may be lost)."""
        status, body = await self.post(request)
        assert status == 200, body
        return decode_response(body)

    async def sync(self, ck: int | None, stamped: bool = True) -> SyncResponse:
        """Send the dirty writes, apply the answer, clear them (the answer covers them)."""
        response = await self.send(self.request(ck, stamped))
        self.apply(response)
        return response

    def apply(self, response: SyncResponse) -> None:
        (entry,) = response.docs
        if entry.update:
            self.doc.apply_update(entry.update)
        self.server_sv, self.gen = entry.sv, entry.gen
        self.dirty.clear()

    def value(self, key: str, name: str = "state") -> Any:
        return self.doc.get(name, type=Map).to_py().get(key, MISSING)


@dataclasses.dataclass
class World:
    """A server with a fake clock, an admin client and a way to make raw devices."""

    clock: Clock
    server: Server
    admin: AdminClient
    http: aiohttp.ClientSession

    async def device(self, device_id: str, client_id: int, server: Server | None = None
                     ) -> RawDevice:
        token = (await self.admin.add_device(device_id))["token"]
        return RawDevice(self.http, (server or self.server).url, device_id, token, client_id)

    async def value(self, device_id: str, key: str = "k") -> Any:
        return (await self.admin.state(device_id))["state"].get(key, MISSING)

    async def meta(self, device_id: str, key: str = "k") -> dict[str, Any]:
        meta: dict[str, Any] = (await self.admin.state(device_id, meta=True))["meta"]
        return dict(meta["state"][key])

    async def feed(self, kind: str) -> list[dict[str, Any]]:
        items, _ = await self.admin.feed(kind=kind, limit=1000)
        return items


def server_config(tmp_path: Path, clock: Clock) -> ServerConfig:
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        clock=clock)


async def start(config: ServerConfig) -> Server:
    server = Server(config)
    await server.start()
    server.services.docs.client_id = SERVER_ID  # before any document is loaded
    return server


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    server = await start(server_config(tmp_path, clock))
    async with AdminClient(server.url, ADMIN_TOKEN) as admin, aiohttp.ClientSession() as http:
        state = World(clock, server, admin, http)
        try:
            yield state
        finally:
            await state.server.aclose()  # the one running now (a test may restart it)


async def settled(world: World, client_id: int, skew: int = 0, value: Any = "init"
                  ) -> RawDevice:
    """A device ``d`` whose key ``k`` holds ``value``, synced at ``T0`` (device clock
    ``skew`` ms off)."""
    dev = await world.device("d", client_id)
    dev.write("k", value, T0 + skew)
    await dev.sync(ck=T0 + skew)
    assert await world.value("d") == value
    return dev


both_ids = pytest.mark.parametrize("client_id", [HIGH_ID, LOW_ID], ids=["high", "low"])
skews = pytest.mark.parametrize("skew", [0, HOUR, -HOUR], ids=["exact", "ahead", "behind"])


# --- the decision, both ways round ------------------------------------------------------


@both_ids
@skews
async def test_a_cloud_write_after_an_offline_device_write_wins(
        world: World, client_id: int, skew: int) -> None:
    dev = await settled(world, client_id, skew)
    dev.write("k", "device", T0 + 10_000 + skew)  # offline
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"k": "cloud"})
    world.clock.now = T0 + 12_000
    response = await dev.sync(ck=T0 + 12_000 + skew)
    assert (await world.value("d"), dev.value("k")) == ("cloud", "cloud")
    assert response.conflicts == (Conflict("state", "k", WriteInfo("cloud", T0 + 11_000, "cloud"),
                                           WriteInfo("device", T0 + 10_000, "device")),)
    assert await world.meta("d") == {"time": T0 + 11_000, "writer": "cloud"}
    (item,) = await world.feed("conflict")
    assert (item["device"], item["doc"], item["key"]) == ("d", "state", f"cf:{item['cursor']}")
    assert item["conflict"] == {
        "map": "state", "key": "k",
        "winner": {"writer": "cloud", "time": T0 + 11_000, "value": "cloud"},
        "loser": {"writer": "device", "time": T0 + 10_000, "value": "device"}}
    # The key did not change in the sync: the feed has no change of it from the device.
    changes = [i["changes"] for i in await world.feed("state") if i["source"] == "device"]
    assert changes == [{"state": {"k": "init"}}]


@both_ids
@skews
async def test_a_device_write_after_a_cloud_write_wins(
        world: World, client_id: int, skew: int) -> None:
    dev = await settled(world, client_id, skew)
    world.clock.now = T0 + 10_000
    await world.admin.patch_state("d", {"k": "cloud"})
    dev.write("k", "device", T0 + 11_000 + skew)  # offline: it has not seen the cloud's
    world.clock.now = T0 + 12_000
    response = await dev.sync(ck=T0 + 12_000 + skew)
    assert (await world.value("d"), dev.value("k")) == ("device", "device")
    assert response.conflicts == (Conflict(
        "state", "k", WriteInfo("device", T0 + 11_000, "device"),
        WriteInfo("cloud", T0 + 10_000, "cloud")),)
    assert await world.meta("d") == {"time": T0 + 11_000, "writer": "device"}
    assert [i["conflict"]["winner"]["writer"] for i in await world.feed("conflict")] == [
        "device"]
    rows = await world.admin.request("GET", "/v1/projection", params={"device": "d"})
    assert [(r["key"], r["value"]) for r in rows["rows"]] == [("k", "device")]


@both_ids
@pytest.mark.parametrize("first, second, expected", [
    ("device-delete", "cloud-set", "cloud"),
    ("cloud-delete", "device-set", "device"),
    ("device-set", "cloud-delete", MISSING),
    ("cloud-set", "device-delete", MISSING),
])
async def test_deletes_are_writes_with_a_time(world: World, client_id: int, first: str,
                                              second: str, expected: Any) -> None:
    """A later set beats an earlier delete and a later delete an earlier set, whichever
    side wrote which (Yjs alone lets the set win)."""
    dev = await settled(world, client_id)

    async def write(what: str, at: int) -> None:
        side, action = what.split("-")
        value = MISSING if action == "delete" else side
        if side == "device":
            dev.write("k", value, at)
        else:
            world.clock.now = at
            await world.admin.patch_state("d", {"k": None if value is MISSING else value})

    await write(first, T0 + 10_000)
    await write(second, T0 + 11_000)
    world.clock.now = T0 + 12_000
    response = await dev.sync(ck=T0 + 12_000)
    assert await world.value("d") == expected
    assert dev.value("k") == expected
    (conflict,) = response.conflicts
    assert conflict.winner.deleted == (expected is MISSING)
    assert conflict.winner.time == T0 + 11_000 and conflict.loser.time == T0 + 10_000
    meta = await world.meta("d")
    assert meta["time"] == T0 + 11_000 and meta.get("deleted", False) == (expected is MISSING)


@both_ids
async def test_a_cloud_delete_of_a_key_the_server_never_held_wins_if_later(
        world: World, client_id: int) -> None:
    """The cloud deletes a key it does not hold (no update at all) after the device set it
    offline: the delete is stored as a write with a time, and wins."""
    dev = await settled(world, client_id)
    dev.write("fresh", 1, T0 + 10_000)
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"fresh": None})
    world.clock.now = T0 + 12_000
    await dev.sync(ck=T0 + 12_000)
    assert await world.value("d", "fresh") is MISSING and dev.value("fresh") is MISSING
    assert await world.meta("d", "fresh") == {"time": T0 + 11_000, "writer": "cloud",
                                              "deleted": True}


# --- clocks -----------------------------------------------------------------------------


@both_ids
async def test_a_stamp_from_the_future_is_clamped(world: World, client_id: int) -> None:
    """A device stamp an hour ahead of its own ``ck`` counts as the server's now: a cloud
    write a second later still wins."""
    dev = await settled(world, client_id)
    world.clock.now = T0 + 10_000
    dev.write("k", "future", T0 + 10_000 + HOUR)
    await dev.sync(ck=T0 + 10_000)
    assert await world.meta("d") == {"time": T0 + 10_000, "writer": "device"}
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"k": "cloud"})
    world.clock.now = T0 + 12_000
    await dev.sync(ck=T0 + 12_000)
    assert (await world.value("d"), dev.value("k")) == ("cloud", "cloud")


async def test_without_ck_stamps_are_taken_as_they_are(world: World) -> None:
    dev = await settled(world, HIGH_ID)
    dev.write("k", "device", T0 + 10_000)
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"k": "cloud"})
    world.clock.now = T0 + HOUR
    response = await dev.sync(ck=None)
    assert await world.value("d") == "cloud"
    assert response.conflicts[0].loser.time == T0 + 10_000


@both_ids
async def test_a_devices_own_newer_write_wins_whatever_the_correction(
        world: World, client_id: int) -> None:
    """Its clock is an hour behind at one sync and an hour ahead at the next: corrected,
    the second write would be earlier than the first, yet it is the device's latest."""
    dev = await settled(world, client_id)
    world.clock.now = T0 + 10_000
    dev.write("k", "first", T0 + 5_000)
    await dev.sync(ck=T0 + 10_000 - HOUR)  # corrected: 5 s + 1 h, clamped to now
    world.clock.now = T0 + 20_000
    dev.write("k", "second", T0 + 5_001)
    response = await dev.sync(ck=T0 + 20_000 + HOUR)  # corrected: 5 s - 1 h
    assert (await world.value("d"), dev.value("k")) == ("second", "second")
    assert response.conflicts == ()
    assert await world.meta("d") == {"time": T0 + 5_001 - HOUR, "writer": "device"}
    # A write older than the one decided is ignored: the key keeps the newer value.
    dev.write("k", "older", T0 + 5_000)
    await dev.sync(ck=T0 + 20_000)
    assert (await world.value("d"), dev.value("k")) == ("second", "second")


# --- replays ----------------------------------------------------------------------------


@both_ids
@pytest.mark.parametrize("cloud_first", [False, True], ids=["device-wins", "cloud-wins"])
async def test_a_replay_after_a_lost_response_changes_nothing(
        world: World, client_id: int, cloud_first: bool) -> None:
    dev = await settled(world, client_id)
    if cloud_first:
        dev.write("k", "device", T0 + 10_000)
        world.clock.now = T0 + 11_000
        await world.admin.patch_state("d", {"k": "cloud"})
    else:
        world.clock.now = T0 + 10_000
        await world.admin.patch_state("d", {"k": "cloud"})
        dev.write("k", "device", T0 + 11_000)
    world.clock.now = T0 + 12_000
    request = dev.request(ck=T0 + 12_000)
    first = await dev.send(request)  # the response is lost
    assert len(first.conflicts) == 1
    state, meta = await world.admin.state("d", meta=True), await world.meta("d")
    feed, _ = await world.admin.feed(limit=1000)
    world.clock.now = T0 + 13_000
    again = await dev.send(dataclasses.replace(request, clock=T0 + 13_000))
    assert again.conflicts == ()
    assert await world.admin.state("d", meta=True) == state and await world.meta("d") == meta
    assert (await world.admin.feed(limit=1000))[0] == feed
    dev.apply(again)
    assert dev.value("k") == ("cloud" if cloud_first else "device")


# --- clients without stamps -------------------------------------------------------------


@both_ids
async def test_a_client_without_stamps_keeps_the_yjs_merge(world: World,
                                                            client_id: int) -> None:
    """No ``s`` and no ``ck``: the keys merge exactly as Yjs merges them (the higher client
    id wins, whatever the times), no conflict is reported, and the keys the device changed
    get the device's row at the server's time."""
    dev = await world.device("d", client_id)
    dev.doc.get("state", type=Map)["k"] = "init"
    await dev.sync(ck=None, stamped=False)
    mirror = Doc(client_id=SERVER_ID)  # what Yjs alone makes of the same two writes
    mirror.apply_update(dev.doc.get_update())
    dev.doc.get("state", type=Map)["k"] = "device"
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"k": "cloud"})
    mirror.get("state", type=Map)["k"] = "cloud"
    mirror.apply_update(dev.doc.get_update())
    world.clock.now = T0 + 12_000
    response = await dev.sync(ck=None, stamped=False)
    expected = "device" if client_id > SERVER_ID else "cloud"
    assert mirror.get("state", type=Map)["k"] == expected
    assert (await world.value("d"), dev.value("k")) == (expected, expected)
    assert response.conflicts == () and await world.feed("conflict") == []
    assert await world.meta("d") == ({"time": T0 + 12_000, "writer": "device"}
                                     if expected == "device"  # the sync changed the key
                                     else {"time": T0 + 11_000, "writer": "cloud"})


# --- several server processes, restarts -------------------------------------------------


async def test_another_process_sees_the_stamps_of_the_first(world: World,
                                                            tmp_path: Path) -> None:
    """Two servers on one SQLite file: the first holds the document (and its stamps) in
    its cache when the second stamps a cloud write; the first rereads the stamps before
    deciding the device's older write, even for a key the cloud deleted without changing
    the document."""
    dev = await settled(world, HIGH_ID)
    other = await start(dataclasses.replace(server_config(tmp_path, world.clock),
                                            admin_token=ADMIN_TOKEN))
    try:
        dev.write("k", "device", T0 + 10_000)
        dev.write("fresh", "device", T0 + 10_000)
        world.clock.now = T0 + 11_000
        async with AdminClient(other.url, ADMIN_TOKEN) as admin2:
            await admin2.patch_state("d", {"k": "cloud", "fresh": None})
        world.clock.now = T0 + 12_000
        response = await dev.sync(ck=T0 + 12_000)  # through the first server
    finally:
        await other.aclose()
    assert await world.value("d") == "cloud" and dev.value("k") == "cloud"
    assert await world.value("d", "fresh") is MISSING and dev.value("fresh") is MISSING
    assert sorted((c.key, c.winner.writer, c.winner.deleted) for c in response.conflicts) == [
        ("fresh", "cloud", True), ("k", "cloud", False)]


async def test_stamps_survive_a_restart(world: World, tmp_path: Path) -> None:
    dev = await settled(world, HIGH_ID)
    dev.write("k", "device", T0 + 10_000)
    world.clock.now = T0 + 11_000
    await world.admin.patch_state("d", {"k": "cloud"})
    await world.server.aclose()
    world.server = await start(server_config(tmp_path, world.clock))
    dev.url = world.server.url
    async with AdminClient(world.server.url, ADMIN_TOKEN) as admin:
        world.admin = admin
        world.clock.now = T0 + 12_000
        response = await dev.sync(ck=T0 + 12_000)
        assert (await world.value("d"), dev.value("k")) == ("cloud", "cloud")
        assert response.conflicts[0].winner == WriteInfo("cloud", T0 + 11_000, "cloud")
        assert await world.meta("d") == {"time": T0 + 11_000, "writer": "cloud"}


# --- policies (the schema hook) ---------------------------------------------------------


class KeyPolicies(StateSchema):
    """A schema giving key ``name`` policy ``name`` (``crdt``, ``device``, ``cloud``) whose
    checks allow every write: the decision's rule when a write of the other side gets there."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__({"maps": {"state": {"keys": {
            key: {"policy": key} for key in ("crdt", "device", "cloud")}}}})
        self._trivial = True  # no refusal: what the decision does on its own


@both_ids
async def test_the_policies_of_the_schema_decide(world: World, client_id: int) -> None:
    """``crdt`` keys keep the Yjs merge; a ``device`` key keeps the device's write and a
    ``cloud`` key the cloud's, whatever the times (the schema refuses the other side's
    writes of them before they get there; this is the rule if one does)."""
    async def schema_for(device: DeviceRecord) -> StateSchema:
        return KeyPolicies()

    world.server.services.sync.schema_for = schema_for
    dev = await settled(world, client_id)
    for key in ("crdt", "device", "cloud"):
        dev.write(key, "init", T0)
    await dev.sync(ck=T0)
    world.clock.now = T0 + 10_000
    await world.admin.patch_state("d", {"crdt": "cloud", "device": "cloud", "cloud": "cloud"})
    for key in ("crdt", "device", "cloud"):  # a second later than the cloud's
        dev.write(key, "device", T0 + 11_000)
    world.clock.now = T0 + 12_000
    response = await dev.sync(ck=T0 + 12_000)
    yjs = "device" if client_id > SERVER_ID else "cloud"
    assert [await world.value("d", key) for key in ("crdt", "device", "cloud")] == [
        yjs, "device", "cloud"]
    assert [dev.value(key) for key in ("crdt", "device", "cloud")] == [yjs, "device", "cloud"]
    assert sorted((c.key, c.winner.writer) for c in response.conflicts) == [
        ("cloud", "cloud"), ("device", "device")]
