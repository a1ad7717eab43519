"""End-to-end: a real device library against a real server on 127.0.0.1 and SQLite files."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from crdtsync import AdminClient, Device
from crdtsync_server import Server

from .conftest import DeviceFactory


async def test_state_and_events_reach_the_cloud(make_device: DeviceFactory,
                                                admin: AdminClient) -> None:
    dev = await make_device("sensor-7")
    dev.state["voltage"] = 3.71
    seq = await dev.emit("readings", {"temp": 21.5})
    assert seq == 1
    report = await dev.sync()
    assert report.events_sent == 1 and report.events_acked == 1
    assert dev.pending_events == 0
    assert (await admin.state("sensor-7"))["state"] == {"voltage": 3.71}
    page = await admin.events(device="sensor-7")
    assert [(e["seq"], e["topic"], e["body"]) for e in page["events"]] == [
        (1, "readings", {"temp": 21.5})]


async def test_cloud_write_reaches_device(make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")
    await dev.sync()
    await admin.patch_state("d1", {"interval": 30})
    report = await dev.sync()
    assert dev.state["interval"] == 30
    assert report.changes == 1


async def test_a_closed_device_is_freed(server: Server, admin: AdminClient,
                                        tmp_path: Path) -> None:
    """A gateway opening and closing devices does not leak them: their documents' observers
    (which pycrdt keeps alive on the Rust side) are removed at ``aclose``."""
    token = (await admin.add_device("d1"))["token"]
    refs = []
    for _ in range(3):
        async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            dev.state["k"] = 1
            await dev.sync()
            refs.append((weakref.ref(dev), weakref.ref(dev.doc)))
        del dev
    gc.collect()
    assert all(d() is None and doc() is None for d, doc in refs)
