"""The device side of "latest write wins" (docs/protocol.md 9.1, 9.2): every local write of a
root-map key is stamped by the device's hybrid logical clock and sent, with the value the
device wrote, in the ``s`` of every request until the cloud acknowledged it; every request
carries the device clock (``ck``); the clock learns its offset from each response's ``time``
and never goes back, across restarts too. Against :class:`GenerationCloud`, which records
what the device sends and answers with the time and conflicts the test sets."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pycrdt import Map, Text

from crdtsync import Conflict, Device, WriteInfo, crdt
from crdtsync.hlc import COUNTER_MASK, stamp
from crdtsync.protocol import StampedWrite, SyncRequest
from crdtsync.transport import Transport

from .generation_cloud import GenerationCloud
from .test_device_store import FIXTURES

T0 = 1_700_000_000_000
HOUR = 3_600_000


class Clock:
    """A wall clock the test sets (ms since the epoch)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def cloud() -> AsyncIterator[GenerationCloud]:
    async with GenerationCloud().serving() as served:
        yield served


def open_device(cloud: GenerationCloud, path: Path, clock: Clock) -> Device:
    return Device("d1", transport=cloud.transport(), path=path, interval=None, clock=clock)


def sent(request: SyncRequest) -> tuple[StampedWrite, ...] | None:
    """The stamped writes of a request's ``state`` entry."""
    return next(d for d in request.docs if d.doc == "state").stamps


def dirty_rows(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT map, key, version, stamp, value, nested FROM dirty "
                          "ORDER BY map, key").fetchall()


def meta(path: Path, key: str) -> Any:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


async def test_every_write_is_sent_with_its_stamp_value_and_the_clock(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """StateMap writes, ``write_state`` into another root and writes made directly on the
    document are all stamped; a key written twice sends its last write; after the cloud
    acknowledged them ``s`` is empty but present, and ``ck`` is always sent."""
    clock = Clock()
    async with open_device(cloud, tmp_path / "d.db", clock) as dev:
        dev.state["a"] = 0
        dev.state["a"] = 1  # same millisecond: the counter orders them
        clock.ms += 5
        dev.write_state("config", {"mode": "eco"})
        clock.ms += 5
        dev.doc.get("state", type=Map)["b"] = {"deep": [1.5, "x"]}
        # Stored with the update that wrote them, before any sync.
        assert dirty_rows(tmp_path / "d.db") == [
            ("config", "mode", 3, stamp(T0 + 5), packed("eco"), 0),
            ("state", "a", 2, stamp(T0, 1), packed(1), 0),
            ("state", "b", 4, stamp(T0 + 10), packed({"deep": [1.5, "x"]}), 0)]
        clock.ms += 1
        await dev.sync()
        clock.ms += 1
        await dev.sync()
    first, second = cloud.requests
    assert sent(first) == (StampedWrite("config", "mode", stamp(T0 + 5), "eco"),
                           StampedWrite("state", "a", stamp(T0, 1), 1),
                           StampedWrite("state", "b", stamp(T0 + 10), {"deep": [1.5, "x"]}))
    # Acknowledged: nothing dirty, so neither `s` nor `ck` (a no-change sync stays small).
    assert (first.clock, second.clock) == (T0 + 11, None)
    assert sent(second) is None
    assert [(d.doc, d.stamps) for d in first.docs[1:]] == [("fleet", None), ("project", None)]
    assert dirty_rows(tmp_path / "d.db") == []
    assert cloud.json() == {"config": {"mode": "eco"},
                            "state": {"a": 1, "b": {"deep": [1.5, "x"]}}}


async def test_deletes_are_nil_and_shared_types_are_not_stamped(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """A delete is a write (sent as nil); a key holding a Y.Map or Y.Text is dirty until
    acknowledged but not in ``s`` (Yjs merges it); an edit inside it likewise."""
    clock = Clock()
    path = tmp_path / "d.db"
    async with open_device(cloud, path, clock) as dev:
        dev.state.update({"a": 1, "keep": True})
        await dev.sync()
        clock.ms += 1
        del dev.state["a"]
        root = dev.doc.get("state", type=Map)
        root["m"] = Map({"x": 1})
        root["t"] = Text("hi")
        assert [(k, v, n) for _, k, _, _, v, n in dirty_rows(path)] == [
            ("a", None, 0), ("m", None, 1), ("t", None, 1)]
        await dev.sync()
        root = dev.doc.get("state", type=Map)
        root["m"]["x"] = 2  # inside the nested value: its root key is written
        await dev.sync()
    assert sent(cloud.requests[1]) == (StampedWrite("state", "a", stamp(T0 + 1), None, True),)
    assert sent(cloud.requests[2]) is None  # nested only: nothing stamped, no `s`
    assert dirty_rows(path) == []
    assert cloud.json()["state"] == {"keep": True, "m": {"x": 2}, "t": "hi"}


async def test_stamps_increase_across_restarts_even_when_the_clock_goes_back_to_1970(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """After a restart at 1970 the clock goes on from its last stamp at the wall clock's
    rate (not stuck on one millisecond), and ``ck`` with it, so the cloud can still date
    the writes by how far each is from ``ck``."""
    clock = Clock()
    path = tmp_path / "d.db"
    async with open_device(cloud, path, clock) as dev:
        dev.state["a"] = 1  # not synced: its stamp is only in the dirty table
    clock.ms = 0
    async with open_device(cloud, path, clock) as dev:
        dev.state["b"] = 1  # the millisecond of the restart: the last stamp's
        clock.ms += 500
        dev.state["c"] = 1
        clock.ms += 100
        await dev.sync()
    assert sent(cloud.requests[0]) == (StampedWrite("state", "a", stamp(T0), 1),
                                       StampedWrite("state", "b", stamp(T0) + 1, 1),
                                       StampedWrite("state", "c", stamp(T0 + 500), 1))
    assert cloud.requests[0].clock == T0 + 600
    # Nothing dirty is left: the clock itself was stored with the response.
    assert dirty_rows(path) == []
    clock.ms = 0
    async with open_device(cloud, path, clock) as dev:
        dev.state["d"] = 1
        await dev.sync()
    assert sent(cloud.requests[1]) == (StampedWrite("state", "d", stamp(T0 + 500) + 1, 1),)
    assert cloud.requests[1].clock == T0 + 500


async def test_the_offset_is_learnt_from_the_response_time(cloud: GenerationCloud,
                                                           tmp_path: Path) -> None:
    """A device an hour behind stamps in the server's time once it heard from it (every
    later write after the response's time), and keeps the offset across a restart."""
    clock = Clock(T0 - HOUR)
    path = tmp_path / "d.db"
    cloud.time = T0
    async with open_device(cloud, path, clock) as dev:
        await dev.sync()
        assert cloud.requests[0].clock is None  # nothing to stamp: no `ck` either
        dev.state["a"] = 1  # in the same millisecond as the response: after it
        clock.ms += 10_000
        cloud.time += 10_000
        dev.state["b"] = 1
        await dev.sync()
    assert meta(path, "clock_offset") == HOUR
    assert sent(cloud.requests[1]) == (
        StampedWrite("state", "a", stamp(T0, COUNTER_MASK) + 1, 1),
        StampedWrite("state", "b", stamp(T0 + 10_000), 1))
    assert cloud.requests[1].clock == T0 + 10_000
    clock.ms += 5_000
    cloud.time = 0  # a server that sends no time teaches nothing
    async with open_device(cloud, path, clock) as dev:
        dev.state["c"] = 1
        await dev.sync()
    assert sent(cloud.requests[2]) == (StampedWrite("state", "c", stamp(T0 + 15_000), 1),)
    assert meta(path, "clock_offset") == HOUR


async def test_a_clock_an_hour_ahead(cloud: GenerationCloud, tmp_path: Path) -> None:
    """A device an hour ahead that has not stamped yet stamps in the server's time once it
    heard from it. One that stamped before keeps stamping after its last stamp (a clock
    never goes back) at the wall clock's rate, and its ``ck`` stays in the frame of those
    stamps, so the server's correction (stamp + receive time - ``ck``) still brings them to
    the server's time. The frame comes back to the server's time as far as idle time
    allows: after two idle hours, entirely."""
    clock = Clock(T0 + HOUR)
    cloud.time = T0
    async with open_device(cloud, tmp_path / "fresh.db", clock) as dev:
        await dev.sync()
        clock.ms += 60_000
        dev.state["a"] = 1
        await dev.sync()
    assert sent(cloud.requests[1]) == (StampedWrite("state", "a", stamp(T0 + 60_000), 1),)
    assert cloud.requests[1].clock == T0 + 60_000

    clock.ms = T0 + HOUR
    async with open_device(cloud, tmp_path / "early.db", clock) as dev:
        dev.state["a"] = 1
        await dev.sync()
        clock.ms += 60_000
        dev.state["b"] = 1
        await dev.sync()
        clock.ms += 2 * HOUR
        cloud.time += 2 * HOUR + 60_000
        await dev.sync()
        clock.ms += 1000
        dev.state["c"] = 1
        await dev.sync()
    first, second, _, third = cloud.requests[2:]
    assert (sent(first), first.clock) == ((StampedWrite("state", "a", stamp(T0 + HOUR), 1),),
                                          T0 + HOUR)
    assert (sent(second), second.clock) == (
        (StampedWrite("state", "b", stamp(T0 + HOUR + 60_000), 1),), T0 + HOUR + 60_000)
    assert (sent(third), third.clock) == (
        (StampedWrite("state", "c", stamp(T0 + 2 * HOUR + 61_000), 1),),
        T0 + 2 * HOUR + 61_000)


class WriteInFlight:
    """A transport that makes a device write while its request is on the way."""

    def __init__(self, inner: Transport, write: Callable[[], None]) -> None:
        self.inner, self.write = inner, write

    async def exchange(self, body: bytes) -> bytes:
        self.write()
        self.write = lambda: None
        return await self.inner.exchange(body)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_write_in_flight_moves_with_the_learnt_offset(cloud: GenerationCloud,
                                                              tmp_path: Path) -> None:
    """A device an hour behind writes while its first request is on the way: that write,
    still to send, is moved into the frame the response taught (so the next ``ck`` dates
    it right), not left an hour early."""
    clock = Clock(T0 - HOUR)
    cloud.time = T0
    dev = Device("d1", transport=cloud.transport(), path=tmp_path / "d.db", interval=None,
                 clock=clock)
    async with dev:
        dev._transport = WriteInFlight(dev._transport, lambda: dev.state.update({"x": 1}))
        await dev.sync()
        clock.ms += 5000
        cloud.time += 5000
        await dev.sync()
    assert sent(cloud.requests[0]) is None
    assert sent(cloud.requests[1]) == (StampedWrite("state", "x", stamp(T0), 1),)
    assert cloud.requests[1].clock == T0 + 5000


async def test_a_write_still_to_send_keeps_its_frame_when_the_offset_drops(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """Regression (simulation seed 702): a device whose frame runs ahead of the server's
    clock (it stamped before learning its offset, so its frame is anchored at its stamps)
    writes while a slow request is on the way. The response's ``time`` would move the frame
    back to that write's stamp, 10 s; the write stays to send and its stamp cannot move
    back with it, so the next ``ck`` would date it at its send, 10 s late. The frame is
    kept while the write is pending, and comes back once the cloud acknowledged it."""
    clock = Clock(T0 + HOUR)
    cloud.time = T0
    dev = Device("d1", transport=cloud.transport(), path=tmp_path / "d.db", interval=None,
                 clock=clock)

    def write_then_wait() -> None:
        dev.state["x"] = 1
        clock.ms += 10_000  # the request takes 10 s
        cloud.time += 10_000

    async with dev:
        dev.state["a"] = 1
        await dev.sync()  # frame anchored at the stamp of "a": an hour ahead
        clock.ms += 60_000
        cloud.time += 60_000
        dev._transport = WriteInFlight(dev._transport, write_then_wait)
        await dev.sync()
        clock.ms += 1000
        cloud.time += 1000
        await dev.sync()  # sends "x" again
        clock.ms += 1000
        cloud.time += 1000
        dev.state["y"] = 1
        await dev.sync()
    retry, after = cloud.requests[2:]
    assert sent(retry) == (StampedWrite("state", "x", stamp(T0 + HOUR + 60_000), 1),)
    assert retry.clock == T0 + HOUR + 71_000  # 11 s after the write, as for the wall clock
    # acknowledged: the frame came back to the last stamp, and runs on from there
    assert (sent(after), after.clock) == (
        (StampedWrite("state", "y", stamp(T0 + HOUR + 61_000), 1),), T0 + HOUR + 61_000)


async def test_the_device_sends_its_own_value_after_a_remote_change_while_dirty(
        tmp_path: Path) -> None:
    """The cloud loses the device's update and answers with its own write of the same key,
    which Yjs lets win locally (the cloud's client id is higher): the key stays dirty, and
    the next round sends the device's own value with its original stamp, not the value the
    document now holds."""
    cloud = GenerationCloud(client_id=2**40)
    async with cloud.serving():
        clock = Clock()
        async with open_device(cloud, tmp_path / "d.db", clock) as dev:
            dev.state["k"] = "device"
            clock.ms += 1000
            cloud.write("state", {"k": "cloud"})
            cloud.drop_updates = 1
            values: list[Any] = []
            dev.on_change(lambda m, k, old, new: values.append(new))
            report = await dev.sync()
            assert report.rounds == 2 and report.recovered
            assert values == ["cloud"] and dev.state["k"] == "cloud"
    first, second = (sent(r) for r in cloud.requests)
    assert first == second == (StampedWrite("state", "k", stamp(T0), "device"),)


async def test_on_conflict_gets_each_conflict_after_the_update(
        cloud: GenerationCloud, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Callbacks run after the response's update was applied (the key already holds the
    winner); one that raises is logged and does not stop the others or the sync."""
    conflict = Conflict("state", "k", WriteInfo("cloud", T0 + 1000, "cloud"),
                        WriteInfo("device", T0, None, True))
    async with open_device(cloud, tmp_path / "d.db", Clock()) as dev:
        seen: list[tuple[Conflict, Any]] = []

        @dev.on_conflict
        def broken(c: Conflict) -> None:
            raise RuntimeError("callback bug (test)")

        @dev.on_conflict
        def record(c: Conflict) -> None:
            seen.append((c, dev.state.get("other")))

        dev.state["k"] = 1
        cloud.write("state", {"k": "cloud", "other": "cloud"})
        cloud.conflicts = [conflict]
        with caplog.at_level(logging.ERROR, logger="crdtsync.device"):
            report = await dev.sync()
        assert report.conflicts == [conflict]
        assert "on_conflict callback failed" in caplog.text
        assert seen == [(conflict, "cloud")]  # the response's update is already applied
        assert (await dev.sync()).conflicts == []
    assert len(seen) == 1


async def test_adoption_keeps_stamps_and_values(cloud: GenerationCloud,
                                                tmp_path: Path) -> None:
    """Carried dirty keys are sent with the stamps and values of the device's writes, a
    delete too (8.1); from a lower generation, keys the cloud had acknowledged are stamped
    with the clock stored at the last sync, and a key deleted offline stays deleted."""
    clock = Clock()
    path = tmp_path / "d.db"
    cloud.time = T0
    async with open_device(cloud, path, clock) as dev:
        dev.state.update({"a": 1, "b": 1, "c": 1})
        await dev.sync()
        cloud.rebuild(gen=3)
        clock.ms += 1000
        cloud.time += 1000
        dev.state["a"] = 2
        await dev.sync()  # adopts 3, carries a
        carried = [sent(r) for r in cloud.requests[1:]]
        assert carried == [(StampedWrite("state", "a", stamp(T0 + 1000), 2),)] * 2
        backup = cloud.doc.get_update()  # a, b, c at generation 3
        synced = meta(path, "clock_last")

        clock.ms += 1000
        cloud.time += 1000
        del dev.state["c"]  # offline
        cloud.doc = crdt.new_doc(crdt.random_client_id(), backup)
        cloud.rebuild(gen=2)  # restored from the backup
        assert (await dev.sync()).adopted
    last = sent(cloud.requests[-1])
    assert last == (StampedWrite("state", "a", synced, 2),
                    StampedWrite("state", "b", synced, 1),
                    StampedWrite("state", "c", stamp(T0 + 2000), None, True))
    assert cloud.json()["state"] == {"a": 2, "b": 1}


async def test_a_v4_database_gets_stamps_and_values_from_its_document(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """Dirty keys recorded before stamps existed are stamped when the device starts, with
    what the document holds: a value, a delete, or a shared type (not sent)."""
    path = tmp_path / "d.db"
    shutil.copyfile(FIXTURES / "device_v4.db", path)
    async with open_device(cloud, path, Clock()) as dev:
        assert [(m, k, s, v, n) for m, k, _, s, v, n in dirty_rows(path)] == [
            ("config", "level", stamp(T0), packed(3), 0),
            ("state", "cfg", stamp(T0), None, 1),
            ("state", "gone", stamp(T0), None, 0),
            ("state", "z", stamp(T0), packed(True), 0)]
        dev.state["w"] = 1
        await dev.sync()
    assert sent(cloud.requests[0]) == (StampedWrite("config", "level", stamp(T0), 3),
                                       StampedWrite("state", "gone", stamp(T0), None, True),
                                       StampedWrite("state", "w", stamp(T0) + 1, 1),
                                       StampedWrite("state", "z", stamp(T0), True))
    assert dirty_rows(path) == []
    assert cloud.json() == {"config": {"level": 3},
                            "state": {"cfg": {"mode": "eco"}, "w": 1, "x": 1, "y": "hi",
                                      "z": True}}
