"""End-to-end: a real device library against a real server on 127.0.0.1 and SQLite files."""

from __future__ import annotations

from crdtsync import AdminClient

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
