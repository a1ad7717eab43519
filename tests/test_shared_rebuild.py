"""Rebuilds of the shared documents ``fleet:<name>`` and ``project`` (issue 12), end to end
over real servers on one SQLite file and the real device library: cloud writes from two
server processes in turn (two Yjs client ids, so the history is never collected) make the
document rebuild; a device replaces its copy when the ``g`` answered changes, and the ``g``
of ``fleet`` tells every (fleet assignment, stored generation) apart (protocol section 8).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient
from crdtsync.errors import Unavailable
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory

SLACK = 256
GEN = 2**32
"""The factor of ``fleet_gen`` in the ``g`` of ``fleet`` (``sync.shared_generation``)."""


def config(db: str) -> ServerConfig:
    return ServerConfig(db=db, port=0, admin_token=ADMIN_TOKEN, rebuild_slack=SLACK)


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    return config(str(tmp_path / "server.db"))


@asynccontextmanager
async def second_server(db: str) -> AsyncIterator[tuple[Server, AdminClient]]:
    """Another server process's worth of state (its own cache and Yjs client id) on the
    same database, with the same rebuild policy."""
    async with Server(config(db)) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        yield srv, admin


def stored(db: str, key: str) -> tuple[int, int]:
    """``(generation, stored bytes: snapshot and update rows)`` of document ``key``."""
    with closing(sqlite3.connect(db)) as conn:
        gen, snapshot = conn.execute(
            "SELECT gen, length(snapshot) FROM docs WHERE key = ?", (key,)).fetchone()
        (rows,) = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM updates"
                               " WHERE key = ?", (key,)).fetchone()
    return int(gen), int(snapshot + rows)


def device_copy(path: Path, doc: str) -> tuple[int, int]:
    """``(g, bytes)`` of the stored copy of shared document ``doc`` in the device database
    ``path``: what survives a restart."""
    with closing(sqlite3.connect(path)) as conn:
        (gen,) = conn.execute("SELECT value FROM meta WHERE key = ?", (f"gen:{doc}",)
                              ).fetchone()
        size = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM updates WHERE doc = ?",
                            (doc,)).fetchone()[0]
        snapshot = conn.execute("SELECT coalesce(length(data), 0) FROM snapshots"
                                " WHERE doc = ?", (doc,)).fetchone()
    return int(gen), int(size) + (int(snapshot[0]) if snapshot else 0)


async def patch(admin: AdminClient, path: str, body: dict[str, Any]) -> Any:
    return await admin.request("PATCH", path, json=body)


async def alternate_until(admins: tuple[AdminClient, AdminClient], path: str, db: str,
                          key: str, gen: int, start: int = 0, limit: int = 400
                          ) -> tuple[int, int]:
    """Cloud writes of the same two variables through the two processes in turn until
    ``key`` is stored at generation ``gen``; returns the next write number and the stored
    size just before the rebuild."""
    before = stored(db, key)[1] if start else 0
    for i in range(start, start + limit):
        await patch(admins[i % 2], path, {"A": i, "B": -i})
        if stored(db, key)[0] >= gen:
            return i + 1, before
        before = stored(db, key)[1]
    raise AssertionError(f"{key} not rebuilt into generation {gen} in {limit} writes")


async def force_rebuild(server: Server, key: str) -> None:
    """Rebuild ``key`` now, whatever its size (what the policy does once it decided)."""
    docs = server.services.docs
    # A store call notices other processes' commits (``Store.external_writes``), as the
    # lookups before every sync or cloud write do.
    await docs.store.load_doc(key)
    async with docs.lock(key):
        assert await docs.rebuild(await docs.get(key))


@pytest.mark.parametrize(("doc", "path", "key"), [
    ("fleet", "/v1/fleets/f/env", "fleet:f"),
    ("project", "/v1/env", "project"),
])
async def test_alternating_cloud_writes_rebuild_a_shared_document_and_devices_replace_it(
        make_device: DeviceFactory, admin: AdminClient, server: Server,
        server_config: ServerConfig, tmp_path: Path, doc: str, path: str, key: str
) -> None:
    """Two processes writing the same variables in turn leave history Yjs cannot collect;
    the shared document is rebuilt (generation up, stored bytes down), each process writes
    into the other's new generation, and a device that held the old copy replaces it: it
    shows the same values and holds no more than the fresh document."""
    db = server_config.db
    await admin.add_fleet("f")
    dev = await make_device("d1")
    await admin.set_fleet("d1", "f")
    fleet_gen = GEN if doc == "fleet" else 0
    async with second_server(db) as (other, other_admin):
        admins = (admin, other_admin)
        await patch(admin, path, {"A": "first"})
        await dev.sync()
        assert device_copy(tmp_path / "d1.db", doc)[0] == fleet_gen
        end, before = await alternate_until(admins, path, db, key, gen=1)
        gen, size = stored(db, key)
        assert gen == 1 and size * 2 < before
        assert server.services.docs.rebuilds + other.services.docs.rebuilds == 1
        expected = {"A": end - 1, "B": -(end - 1)}
        assert await admin.request("GET", path) == await other_admin.request("GET", path) \
            == expected

        await dev.sync()
        assert dict(dev.env) == expected
        if doc == "fleet":
            assert dict(dev.fleet("env")) == expected
        g, copy = device_copy(tmp_path / "d1.db", doc)
        assert g == fleet_gen + 1 and copy * 2 < before  # replaced, not merged into

        end, _ = await alternate_until(admins, path, db, key, gen=2, start=end)
        await dev.sync()
        assert dict(dev.env) == {"A": end - 1, "B": -(end - 1)}
        assert device_copy(tmp_path / "d1.db", doc)[0] == fleet_gen + 2
    await dev.aclose()
    dev = await make_device("d1")  # the replaced copy is what was stored
    assert dict(dev.env) == {"A": end - 1, "B": -(end - 1)}


async def test_moving_between_rebuilt_fleets_always_replaces_the_copy(
        make_device: DeviceFactory, admin: AdminClient, server: Server, tmp_path: Path
) -> None:
    """Regression for the encoding of ``g``: fleet a rebuilt twice and fleet b once would
    give the same ``g`` as ``fleet_gen + generation`` (1 + 2 = 2 + 1); the device moved
    from a to b must still get b's document, and a's again when moved back."""
    await admin.add_fleet("a")
    await admin.add_fleet("b")
    await patch(admin, "/v1/fleets/a/env", {"ONLY_A": 1, "LEVEL": "a"})
    await patch(admin, "/v1/fleets/b/env", {"LEVEL": "b"})
    for _ in range(2):
        await force_rebuild(server, "fleet:a")
    await force_rebuild(server, "fleet:b")
    dev = await make_device("d1")
    await admin.set_fleet("d1", "a")
    await dev.sync()
    assert dict(dev.env) == {"ONLY_A": 1, "LEVEL": "a"}
    assert device_copy(tmp_path / "d1.db", "fleet")[0] == 1 * GEN + 2

    await admin.set_fleet("d1", "b")
    await dev.sync()
    assert dict(dev.env) == dict(dev.fleet("env")) == {"LEVEL": "b"}
    assert device_copy(tmp_path / "d1.db", "fleet")[0] == 2 * GEN + 1

    await force_rebuild(server, "fleet:a")  # a at 3: (3, 3) is new again
    await admin.set_fleet("d1", "a")
    await dev.sync()
    assert dict(dev.env) == {"ONLY_A": 1, "LEVEL": "a"}
    assert device_copy(tmp_path / "d1.db", "fleet")[0] == 3 * GEN + 3
    await admin.set_fleet("d1", None)
    await dev.sync()
    assert dict(dev.env) == {}
    assert device_copy(tmp_path / "d1.db", "fleet")[0] == 4 * GEN


async def test_a_rebuilt_project_document_replaces_the_copy_of_a_device_without_fleet(
        make_device: DeviceFactory, admin: AdminClient, server: Server, tmp_path: Path
) -> None:
    """``g`` of ``project`` is its stored generation: each rebuild makes the device
    replace its copy, and writes after it reach the device as diffs."""
    await patch(admin, "/v1/env", {"UNIT": "C", "OLD": True})
    dev = await make_device("d1")
    await dev.sync()
    assert dict(dev.env) == {"UNIT": "C", "OLD": True}
    await force_rebuild(server, "project")
    await patch(admin, "/v1/env", {"OLD": None})
    await dev.sync()
    assert dict(dev.env) == {"UNIT": "C"}
    assert device_copy(tmp_path / "d1.db", "project")[0] == 1
    await patch(admin, "/v1/env", {"NEW": 2})
    await dev.sync()
    assert dict(dev.env) == {"UNIT": "C", "NEW": 2}
    assert device_copy(tmp_path / "d1.db", "project")[0] == 1


async def test_a_cloud_write_prepared_on_the_old_generation_is_refused(
        admin: AdminClient, server: Server, server_config: ServerConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process rebuilds the fleet document between this process's read and its
    commit: the write is refused (``Unavailable``, retryable) with nothing stored, and the
    retry writes into the new generation."""
    db = server_config.db
    await admin.add_fleet("f")
    await patch(admin, "/v1/fleets/f/env", {"A": 1})
    async with second_server(db) as (other, other_admin):
        await patch(other_admin, "/v1/fleets/f/env", {"B": 1})  # cached in the other
        store = other.services.sync.store
        real = store.commit

        async def rebuild_first(write: Any) -> Any:
            monkeypatch.undo()
            await force_rebuild(server, "fleet:f")
            return await real(write)

        monkeypatch.setattr(store, "commit", rebuild_first)
        with pytest.raises(Unavailable) as info:
            await patch(other_admin, "/v1/fleets/f/env", {"C": 1})
        assert info.value.retryable
        assert stored(db, "fleet:f")[0] == 1
        assert await admin.request("GET", "/v1/fleets/f/env") == {"A": 1, "B": 1}
        assert await patch(other_admin, "/v1/fleets/f/env", {"C": 1}) == {"A": 1, "B": 1,
                                                                         "C": 1}
        assert stored(db, "fleet:f")[0] == 1
        assert await admin.request("GET", "/v1/fleets/f/env") == {"A": 1, "B": 1, "C": 1}
