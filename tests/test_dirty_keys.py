"""Dirty keys (docs/protocol.md 9.1, 9.2): every local write of a root-map key is recorded
with its local version in the same transaction as its update, and forgotten once a sync
shows the cloud holds it; what the device adopts a new generation with (8.1)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from pycrdt import Map

from crdtsync import AdminClient, Device, StoreError, TransportError
from crdtsync.transport import Transport

from .conftest import DeviceFactory, LoseResponses


def dirty(path: Path) -> list[tuple[str, str, int]]:
    """The dirty keys stored in the device database at ``path``, with their versions."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT map, key, version FROM dirty ORDER BY map, key").fetchall()


def update_rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM updates").fetchone()[0])


async def test_every_local_write_records_its_keys(make_device: DeviceFactory,
                                                  admin: AdminClient, tmp_path: Path) -> None:
    dev = await make_device("d1")
    path = tmp_path / "d1.db"
    dev.state["a"] = 1
    dev.state.update({"b": 2, "c": {"nested": True}})  # one transaction, one version
    del dev.state["a"]  # a delete is a write
    dev.map("config")["mode"] = "eco"  # a root the document did not have
    assert dirty(path) == [("config", "mode", 4), ("state", "a", 3), ("state", "b", 2),
                           ("state", "c", 2)]
    await dev.sync()
    assert dirty(path) == []

    await admin.patch_state("d1", {"cloud": 1})
    await dev.sync()  # a cloud write is not a local one
    dev.doc.get("state", type=Map)["m"] = Map({"x": 1})  # directly on the document
    dev.doc.get("state", type=Map)["m"]["x"] = 2  # inside a nested value: its root key
    assert dirty(path) == [("state", "m", 6)]
    dev.doc.get("direct", type=Map)["k"] = 1  # a new root, written directly
    dev._transport = LoseResponses(dev._transport, 1)
    with pytest.raises(TransportError):
        await dev.sync()  # recorded before it is sent
    assert dirty(path) == [("direct", "k", 7), ("state", "m", 6)]
    await dev.sync()
    assert dirty(path) == []
    assert (await admin.state("d1"))["direct"] == {"k": 1}


async def test_the_update_and_its_dirty_keys_are_stored_together(
        make_device: DeviceFactory, tmp_path: Path) -> None:
    """A write whose dirty key cannot be stored does not store its update either; both
    are stored by the next write."""
    dev = await make_device("d1")
    path = tmp_path / "d1.db"
    dev.state["a"] = 1
    rows = update_rows(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TRIGGER no_dirty BEFORE INSERT ON dirty "
                   "BEGIN SELECT RAISE(ABORT, 'refused (test)'); END")
    with pytest.raises(StoreError):
        dev.state["b"] = 2
    assert (update_rows(path), dirty(path)) == (rows, [("state", "a", 1)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP TRIGGER no_dirty")
    dev.state["c"] = 3
    assert update_rows(path) == rows + 2
    assert dirty(path) == [("state", "a", 1), ("state", "b", 2), ("state", "c", 3)]


class WriteInFlight:
    """A transport that makes a local write while the request is in flight."""

    def __init__(self, inner: Transport, dev: list[Device]) -> None:
        self.inner, self.dev = inner, dev

    async def exchange(self, body: bytes) -> bytes:
        response = await self.inner.exchange(body)
        if self.dev:
            self.dev.pop().state["late"] = 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_acknowledged_sync_clears_what_it_carried(
        make_device: DeviceFactory, tmp_path: Path) -> None:
    """Keys written before the request are clean once the response covers it; a key
    written while it was in flight stays dirty until the next sync."""
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    dev.state.update({"a": 1, "b": 2})
    pending: list[Device] = [dev]
    dev._transport = WriteInFlight(dev._transport, pending)
    await dev.sync()
    assert not pending and dirty(path) == [("state", "late", 2)]
    await dev.sync()
    assert dirty(path) == []


async def test_a_lost_response_keeps_the_keys_dirty(make_device: DeviceFactory,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    dev.state["a"] = 1
    dev._transport = LoseResponses(dev._transport, 1)
    with pytest.raises(TransportError):
        await dev.sync()
    assert dirty(path) == [("state", "a", 1)]
    await dev.sync()
    assert dirty(path) == []


async def test_versions_continue_across_restarts(make_device: DeviceFactory,
                                                 tmp_path: Path) -> None:
    """After a restart, local versions continue above the stored ones: an acknowledged
    sync clears keys written before the restart too."""
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    for n in range(5):
        dev.state[f"k{n}"] = n
    await dev.aclose()
    dev = await make_device("d1")
    dev.state["after"] = 1
    assert dirty(path)[0] == ("state", "after", 6)
    await dev.sync()
    assert dirty(path) == []
