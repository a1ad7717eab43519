"""The server process's garbage-collector tuning (``ServerConfig.gc_young``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdtsync import AdminClient, Device
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the collector back as it was (the tests share one process)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Node:
    """A container object that can be part of a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def test_a_server_freezes_its_start_up_and_collects_later_but_still(
        collector: None, tmp_path: Path) -> None:
    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN,
                          gc_young=12_345)
    async with Server(config) as server:
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_freeze_count() > 1000  # the start-up's objects: never scanned again
        async with AdminClient(server.url, ADMIN_TOKEN) as admin:
            token = (await admin.add_device("gc-1"))["token"]
            async with Device("gc-1", server.url, token=token, path=tmp_path / "d.db",
                              interval=None) as device:
                device.state["v"] = 1
                await device.emit("t", {"n": 1})
                assert (await device.sync()).events_acked == 1
            assert (await admin.state("gc-1"))["state"] == {"v": 1}
        # A cycle is not freed by reference counting, nor at once by the collector ...
        gc.collect()
        ref = cycle()
        assert ref() is not None
        # ... but once more container objects than the threshold are alive, it is.
        keep = [[] for _ in range(13_000)]
        assert ref() is None
        del keep


async def test_gc_young_zero_leaves_the_collector_alone(collector: None,
                                                        tmp_path: Path) -> None:
    gc.set_threshold(701, 11, 12)
    frozen = gc.get_freeze_count()
    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN)
    assert config.gc_young == 0  # an embedded server: the process is its host's
    async with Server(config):
        assert gc.get_threshold() == (701, 11, 12)
        assert gc.get_freeze_count() == frozen
