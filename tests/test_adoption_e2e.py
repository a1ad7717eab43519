"""Adoption end to end (issue 12): the real server rebuilds a device's document into new
generations while the device is offline or replaced, and the device library adopts them
(docs/protocol.md 8, 8.1), over HTTP on 127.0.0.1 and real SQLite files on both sides."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient, Device, StoreError
from crdtsync.transport import HttpTransport, Transport
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory, SteppedClock
from .test_adoption import break_generation_writes

SLACK = 256
"""A small rebuild slack, so that a few hundred bytes of history trigger a rebuild."""

Change = tuple[str, str, Any, Any]


@pytest.fixture
def server_config(tmp_path: Path, server_clock: SteppedClock) -> ServerConfig:
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        rebuild_slack=SLACK, clock=server_clock)


def server_gen(config: ServerConfig, device: str = "d1") -> int:
    """The generation of the device's document stored by the server."""
    with contextlib.closing(sqlite3.connect(config.db)) as db:
        row = db.execute("SELECT gen FROM docs WHERE key = ?", (f"{device}/state",)).fetchone()
    return int(row[0]) if row else 0


def dirty(path: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT map, key FROM dirty ORDER BY map, key").fetchall()


async def cloud_writes_until(admin: AdminClient, config: ServerConfig, gen: int,
                             start: int = 0, limit: int = 2000) -> int:
    """Cloud writes (10 keys overwritten in turn) until the server stored generation
    ``gen``; returns the next write number."""
    for i in range(start, start + limit):
        await admin.patch_state("d1", {f"n{i % 10}": i})
        if server_gen(config) >= gen:
            return i + 1
    raise AssertionError(f"no rebuild into generation {gen} in {limit} cloud writes")


async def test_offline_across_rebuilds_converges_in_one_sync(
        make_device: DeviceFactory, admin: AdminClient, server_config: ServerConfig,
        server_clock: SteppedClock, tmp_path: Path) -> None:
    """Offline across three rebuilds, with local writes and deletes and cloud writes and
    deletes meanwhile: one sync (at most two rounds more than one) converges; the later
    write of a key both wrote wins (the cloud's of ``a``, the device's of ``h``), and
    nothing the cloud deleted comes back."""
    dev = await make_device("d1", clock=server_clock)
    dev.state.update({"a": 1, "b": 1, "c": 1, "d": 1, "kept": 1})
    await dev.sync()
    changes: list[Change] = []
    dev.on_change(lambda *change: changes.append(change))

    await admin.patch_state("d1", {"h": "cloud"})  # the device is offline from here on
    server_clock.advance(1000)
    dev.state["a"] = "device"
    del dev.state["b"]
    dev.state["g"] = "new"
    dev.state["h"] = "device"
    server_clock.advance(1000)
    await admin.patch_state("d1", {"a": "cloud", "d": "cloud", "c": None})
    n = await cloud_writes_until(admin, server_config, gen=1)
    await admin.patch_state("d1", {"e": "cloud"})
    n = await cloud_writes_until(admin, server_config, gen=2, start=n)
    await admin.patch_state("d1", {"f": 2, "e": None})
    await cloud_writes_until(admin, server_config, gen=3, start=n)
    cloud_state = (await admin.state("d1"))["state"]
    assert "b" in cloud_state and "c" not in cloud_state

    report = await dev.sync()
    assert report.adopted and report.rounds <= 3
    state = (await admin.state("d1"))["state"]
    assert dev.state.to_dict() == state
    assert {k: state.get(k) for k in "abcdefgh"} == {
        "a": "cloud", "b": None, "c": None, "d": "cloud", "e": None, "f": 2, "g": "new",
        "h": "device"}
    assert state["kept"] == 1
    reported = {key for _, key, _, _ in changes}
    assert {"a", "c", "d", "f"} <= reported and not reported & {"b", "g", "h", "kept"}
    assert dirty(tmp_path / "d1.db") == []
    again = await dev.sync()
    assert (again.rounds, again.adopted, again.changes) == (1, False, 0)


async def test_a_replacement_device_downloads_the_current_state_only(
        make_device: DeviceFactory, admin: AdminClient, tmp_path: Path) -> None:
    """10 keys overwritten 10,000 times, device and cloud in turn: a replacement device (a
    new database, the same token) restores the state with a download of a few hundred
    bytes, not the history (issue 12: without rebuild and adoption it was 10 KB per 100
    overwrites)."""
    dev = await make_device("d1", durability="NORMAL")
    for i in range(10_000):
        dev.state[f"k{i % 10}"] = i
        if i % 1000 == 999:
            await dev.sync()
            await admin.patch_state("d1", {f"k{k}": -i for k in range(10)})
    await dev.sync()
    expected = await admin.state("d1")
    await dev.aclose()

    fresh = await make_device("d1", path=tmp_path / "replacement.db")
    report = await fresh.sync()
    assert {"state": fresh.state.to_dict()} == expected
    assert report.adopted and report.rounds == 1 and report.bytes_down < 4096


class Switch:
    """A transport whose target can be replaced (a restarted server on another port)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def exchange(self, body: bytes) -> bytes:
        return await self.inner.exchange(body)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[tuple[Server, AdminClient]]:
    async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        yield srv, admin


def backup(db: str, to: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as src, \
            contextlib.closing(sqlite3.connect(to)) as dst:
        src.backup(dst)


def restore(db: str, backup_file: Path) -> None:
    with contextlib.closing(sqlite3.connect(backup_file)) as src, \
            contextlib.closing(sqlite3.connect(db)) as dst:
        src.backup(dst)


async def test_a_cloud_restored_to_an_older_generation_gets_every_key_back(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """The server's database is restored from a backup taken before a rebuild the device
    adopted and before writes it acknowledged: the device meets a lower generation and
    re-applies every key it holds, so the cloud gets its acknowledged writes back."""
    saved = tmp_path / "backup.db"
    dev: Device | None = None
    try:
        async with serving(server_config) as (srv, admin):
            token = (await admin.add_device("d1"))["token"]
            link = Switch(HttpTransport(srv.url, token))
            dev = Device("d1", transport=link, path=tmp_path / "d1.db", interval=None)
            await dev.start()
            dev.state.update({"a": 1, "b": 1})
            await dev.sync()
            await cloud_writes_until(admin, server_config, gen=1)
            await dev.sync()
            backup(server_config.db, saved)  # generation 1, a = 1, no c
            await cloud_writes_until(admin, server_config, gen=2, start=1000)
            dev.state.update({"a": 2, "c": 3})
            report = await dev.sync()
            assert report.adopted and dirty(tmp_path / "d1.db") == []
            assert (await admin.state("d1"))["state"] == dev.state.to_dict()

        restore(server_config.db, saved)
        async with serving(server_config) as (srv, admin):
            assert server_gen(server_config) == 1
            await link.inner.aclose()
            link.inner = HttpTransport(srv.url, token)
            report = await dev.sync()
            assert report.adopted
            state = (await admin.state("d1"))["state"]
            assert (state["a"], state["b"], state["c"]) == (2, 1, 3)
            assert state == dev.state.to_dict()
    finally:
        if dev is not None:
            await dev.aclose()


async def test_a_failed_adoption_is_repeated_after_a_restart(
        make_device: DeviceFactory, admin: AdminClient, server_config: ServerConfig,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power cut in the middle of the adoption's local transaction (an I/O error after the
    snapshot was replaced): the device restarts on the old generation with its dirty keys,
    adopts at its next sync, and converges."""
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    dev.state["a"] = 1
    await dev.sync()
    dev.state["offline"] = "device"
    await admin.patch_state("d1", {"a": None})
    await cloud_writes_until(admin, server_config, gen=1)
    break_generation_writes(monkeypatch)
    with pytest.raises(StoreError):
        await dev.sync()
    monkeypatch.undo()
    await dev.aclose()
    assert dirty(path) == [("state", "offline")]

    dev = await make_device("d1")
    assert dev.state.to_dict() == {"a": 1, "offline": "device"}
    report = await dev.sync()
    assert report.adopted
    state = (await admin.state("d1"))["state"]
    assert state == dev.state.to_dict()
    assert "a" not in state and state["offline"] == "device"
