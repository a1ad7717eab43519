"""A device adopts a new generation of its document (docs/protocol.md 8.1): its writes the
cloud has not acknowledged (dirty keys) are re-applied onto the generation the cloud answers
with; cloud deletes are not undone, cloud writes arrive, in one sync. Against
:class:`GenerationCloud`, whose generation the test controls."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Map

from crdtsync import Device, StoreError, TransportError, crdt
from crdtsync import _device_store as device_store_module
from crdtsync.transport import Transport

from .generation_cloud import GenerationCloud

Change = tuple[str, str, Any, Any]


@pytest.fixture
async def cloud() -> AsyncIterator[GenerationCloud]:
    async with GenerationCloud().serving() as served:
        yield served


def open_device(cloud: GenerationCloud, path: Path, **kwargs: Any) -> Device:
    return Device("d1", transport=cloud.transport(), path=path, interval=None, **kwargs)


def dirty(path: Path) -> list[tuple[str, str]]:
    """The dirty keys stored in the device database at ``path``."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT map, key FROM dirty ORDER BY map, key").fetchall()


def meta(path: Path, key: str) -> Any:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def watch(dev: Device) -> list[Change]:
    changes: list[Change] = []
    dev.on_change(lambda *change: changes.append(change))
    return changes


async def test_the_state_entry_carries_the_generation_and_adopt(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    async with open_device(cloud, tmp_path / "d.db") as dev:
        await dev.sync()
        cloud.rebuild(gen=4)
        report = await dev.sync()
        assert report.adopted and report.rounds == 1  # nothing of its own to carry
        await dev.sync()
    first, adopting, after = (r.docs[0] for r in cloud.requests[:3])
    assert (first.doc, first.gen, first.adopt) == ("state", 0, True)
    assert (adopting.gen, after.gen) == (0, 4)
    async with open_device(cloud, tmp_path / "d.db") as dev:  # persisted
        await dev.sync()
    assert cloud.requests[-1].docs[0].gen == 4


async def test_offline_across_rebuilds_converges_without_resurrection(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    async with open_device(cloud, tmp_path / "d.db") as dev:
        dev.state.update({"a": 1, "b": 1, "c": 1, "d": 1, "mine": 1})
        await dev.sync()
        assert cloud.json()["state"] == dev.state.to_dict()
        changes = watch(dev)

        # Offline: the device overwrites a, deletes b, adds g; the cloud overwrites a and d,
        # deletes c, adds e and f, and rebuilds the document twice meanwhile.
        dev.state["a"] = "device"
        del dev.state["b"]
        dev.state["g"] = "new"
        cloud.write("state", {"a": "cloud", "d": "cloud", "c": None, "e": "cloud"})
        cloud.rebuild()
        cloud.write("state", {"f": 2})
        cloud.rebuild()

        report = await dev.sync()
        expected = {"a": "device", "d": "cloud", "e": "cloud", "f": 2, "g": "new", "mine": 1}
        assert dev.state.to_dict() == expected == cloud.json()["state"]
        assert report.adopted and report.rounds <= 3
        assert sorted(changes) == [("state", "c", 1, None), ("state", "d", 1, "cloud"),
                                   ("state", "e", None, "cloud"), ("state", "f", None, 2)]
        assert report.changes == 4
        assert dirty(tmp_path / "d.db") == []  # everything acknowledged

        again = await dev.sync()  # nothing left to do: one round, no update sent
        assert (again.rounds, again.adopted, again.changes) == (1, False, 0)
        assert cloud.requests[-1].docs[0].update == b""


async def test_nested_values_are_carried_as_shared_types(cloud: GenerationCloud,
                                                          tmp_path: Path) -> None:
    """A key holding a nested ``Y.Map`` (written here directly on ``dev.doc``, which dirty
    tracking sees too) is re-applied as a ``Y.Map``, not flattened to a plain value."""
    async with open_device(cloud, tmp_path / "d.db") as dev:
        await dev.sync()
        root = dev.doc.get("state", type=Map)
        root["cfg"] = Map({"mode": "eco", "limits": Map({"max": 3})})
        cloud.rebuild()
        await dev.sync()
        nested = dev.doc.get("state", type=Map)["cfg"]
        assert isinstance(nested, Map) and isinstance(nested["limits"], Map)
        nested["limits"]["max"] = 4  # an edit inside it is a change of "cfg"
        await dev.sync()
    assert cloud.json()["state"] == {"cfg": {"limits": {"max": 4}, "mode": "eco"}}


async def restore_older_generation(cloud: GenerationCloud, dev: Device) -> None:
    """Bring device and cloud to generation 3, take a backup of the cloud, acknowledge more
    device writes (a = 2, c = 3), then put the backup back as generation 2 and write a key
    in it: the cloud lost writes it had acknowledged."""
    dev.state.update({"a": 1, "b": 1})
    dev.map("config").update({"mode": "eco"})
    await dev.sync()
    cloud.rebuild(gen=3)
    await dev.sync()
    backup = cloud.doc.get_update()
    dev.state.update({"a": 2, "c": 3})
    await dev.sync()
    cloud.doc = crdt.new_doc(crdt.random_client_id(), backup)
    cloud.rebuild(gen=2)
    cloud.write("state", {"cloud": True})


RESTORED = {"config": {"mode": "eco"}, "state": {"a": 2, "b": 1, "c": 3, "cloud": True}}


async def test_a_lower_generation_gets_every_local_key(cloud: GenerationCloud,
                                                       tmp_path: Path) -> None:
    """The cloud went back to an older generation (restored from a backup): it may lack
    writes it once acknowledged, so every key the device holds is re-applied, not only
    the dirty ones."""
    async with open_device(cloud, tmp_path / "d.db") as dev:
        await restore_older_generation(cloud, dev)
        assert dirty(tmp_path / "d.db") == []
        report = await dev.sync()
    assert report.adopted
    assert cloud.json() == RESTORED


async def test_keys_carried_from_a_lower_generation_stay_dirty(cloud: GenerationCloud,
                                                               tmp_path: Path) -> None:
    """Every key re-applied on adoption is dirty until acknowledged: when the link fails
    before that and the cloud rebuilds again, the next adoption re-applies them again."""
    link = Link(cloud.transport())
    async with Device("d1", transport=link, path=tmp_path / "d.db", interval=None) as dev:
        await restore_older_generation(cloud, dev)
        link.allowed = 1
        with pytest.raises(TransportError):
            await dev.sync()  # adopts generation 2, then the link fails
        assert len(dirty(tmp_path / "d.db")) == 4
        cloud.rebuild()
        link.allowed = None
        report = await dev.sync()
    assert report.adopted
    assert cloud.json() == RESTORED


async def test_a_replacement_device_restores_the_whole_generation(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    async with open_device(cloud, tmp_path / "old.db") as dev:
        dev.state.update({f"k{i}": i for i in range(10)})
        await dev.sync()
    cloud.rebuild(gen=5)
    async with open_device(cloud, tmp_path / "new.db") as dev:  # a new database
        changes = watch(dev)
        report = await dev.sync()
        assert dev.state.to_dict() == {f"k{i}": i for i in range(10)}
        assert report.adopted and report.rounds == 1 and len(changes) == 10
        await dev.sync()
    assert cloud.requests[-1].docs[0].gen == 5


def break_generation_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device store fails (an I/O error) when an adoption writes the new generation:
    after its snapshot was replaced, inside the same transaction. ``monkeypatch.undo()``
    repairs it."""
    write_meta = device_store_module._write_meta

    def failing(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
        if "gen:state" in values:
            raise sqlite3.OperationalError("disk I/O error (injected)")
        write_meta(conn, values)

    monkeypatch.setattr(device_store_module, "_write_meta", failing)


async def test_a_failed_adoption_leaves_the_old_generation(
        cloud: GenerationCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store write of an adoption fails midway (after the snapshot was replaced, before
    the generation is written): nothing of it stays, in the file or in memory. The device
    keeps syncing, and after a restart adopts with its dirty keys intact."""
    path = tmp_path / "d.db"
    async with open_device(cloud, path) as dev:
        dev.state["kept"] = 1
        await dev.sync()
        dev.state["offline"] = "device"
        cloud.write("state", {"kept": None, "cloud": 1})
        cloud.rebuild()
        break_generation_writes(monkeypatch)
        with pytest.raises(StoreError):
            await dev.sync()
        assert dev.state.to_dict() == {"kept": 1, "offline": "device"}
        assert (meta(path, "gen:state"), dirty(path)) == (None, [("state", "offline")])
        dev.state["later"] = 2  # still writable: the old document is the live one
    monkeypatch.undo()
    assert dirty(path) == [("state", "later"), ("state", "offline")]
    async with open_device(cloud, path) as dev:
        assert dev.state.to_dict() == {"kept": 1, "later": 2, "offline": "device"}
        report = await dev.sync()
        assert report.adopted
        assert dev.state.to_dict() == {"cloud": 1, "later": 2, "offline": "device"}
    assert cloud.json()["state"] == {"cloud": 1, "later": 2, "offline": "device"}


async def test_a_crash_after_adopting_sends_the_rebased_writes_after_restart(
        cloud: GenerationCloud, tmp_path: Path) -> None:
    """The adoption is stored, then the link fails before the round that sends the
    re-applied writes (the device dies): after a restart they are still local changes
    and dirty keys, and go out."""
    path = tmp_path / "d.db"
    async with Device("d1", transport=Link(cloud.transport(), 2), path=path,
                      interval=None) as dev:
        await dev.sync()
        dev.state["offline"] = 1
        cloud.write("state", {"cloud": 1})
        cloud.rebuild()
        with pytest.raises(TransportError):
            await dev.sync()  # adopts, then the second round fails
        assert dev.state.to_dict() == {"cloud": 1, "offline": 1}
    assert "offline" not in cloud.json()["state"]
    assert (meta(path, "gen:state"), dirty(path)) == (1, [("state", "offline")])
    async with open_device(cloud, path) as dev:
        report = await dev.sync()
        assert not report.adopted
    assert cloud.json()["state"] == {"cloud": 1, "offline": 1}
    assert dirty(path) == []


class Link:
    """A transport that fails without sending once ``allowed`` exchanges went through
    (``None``: no limit)."""

    def __init__(self, inner: Transport, allowed: int | None = None) -> None:
        self.inner, self.allowed = inner, allowed

    async def exchange(self, body: bytes) -> bytes:
        if self.allowed is not None:
            if self.allowed <= 0:
                raise TransportError("link down (test)")
            self.allowed -= 1
        return await self.inner.exchange(body)

    async def aclose(self) -> None:
        await self.inner.aclose()
