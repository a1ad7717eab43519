"""Latest write wins, end to end: real devices (random client ids) and the real server, on
loopback and SQLite, with clocks the test moves instead of sleeping. Whichever side wrote a
key later wins on both sides, whatever the client ids, when the device clock is an hour
ahead or behind, whether or not the device synced before writing, and across a restart
between its write and its sync; the device hears of each conflict (``on_conflict``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crdtsync import AdminClient, Conflict, Device
from crdtsync_server import ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory
from .test_lww_device import HOUR, Clock

DEVICES = 12


@pytest.fixture
def server_clock() -> Clock:
    return Clock()


@pytest.fixture
def server_config(tmp_path: Path, server_clock: Clock) -> ServerConfig:
    return ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                        clock=server_clock)


class Fleet:
    """``DEVICES`` devices whose clocks are the server's plus ``skew``, each holding ``gone``.
    Device ``i`` is of kind ``i % 3``: 0 never synced before its writes (only ``ck``
    corrects its stamps), 1 synced first and restarts between its writes and its sync, 2
    synced first."""

    def __init__(self, make_device: DeviceFactory, server_clock: Clock, skew: int,
                 prefix: str) -> None:
        self.make_device = make_device
        self.clock: Callable[[], int] = lambda: server_clock.ms + skew
        self.ids = [f"{prefix}{i}" for i in range(DEVICES)]
        self.devices: list[Device] = []
        self.conflicts: dict[str, list[Conflict]] = {}

    async def open(self, device_id: str) -> Device:
        dev = await self.make_device(device_id, clock=self.clock)
        dev.on_conflict(self.conflicts.setdefault(device_id, []).append)
        return dev

    async def start(self) -> None:
        self.devices = [await self.open(device_id) for device_id in self.ids]
        for i, dev in enumerate(self.devices):
            dev.state["gone"] = "init"
            if i % 3:
                await dev.sync()

    async def write(self) -> None:
        """Each device sets ``k`` and deletes ``gone``, offline; kind 1 then restarts."""
        for i, dev in enumerate(self.devices):
            dev.state["k"] = f"device-{i}"
            del dev.state["gone"]
            if i % 3 == 1:
                await dev.aclose()
                self.devices[i] = await self.open(self.ids[i])

    async def cloud_write(self, admin: AdminClient) -> None:
        for device_id in self.ids:
            await admin.patch_state(device_id, {"k": "cloud", "gone": "cloud"})

    async def sync(self) -> None:
        for dev in self.devices:
            await dev.sync()

    def states(self) -> list[dict[str, object]]:
        return [dev.state.to_dict() for dev in self.devices]

    async def cloud_states(self, admin: AdminClient) -> list[dict[str, object]]:
        return [(await admin.state(device_id))["state"] for device_id in self.ids]


SKEWS = pytest.mark.parametrize("skew", [-HOUR, 0, HOUR], ids=["behind", "right", "ahead"])


@SKEWS
async def test_the_cloud_writing_one_second_later_wins_on_both_sides(
        make_device: DeviceFactory, admin: AdminClient, server_clock: Clock,
        skew: int) -> None:
    """A set after a delete wins too."""
    fleet = Fleet(make_device, server_clock, skew, "c")
    await fleet.start()
    await fleet.write()
    server_clock.ms += 1000
    await fleet.cloud_write(admin)
    server_clock.ms += 1000
    await fleet.sync()

    expected = [{"gone": "cloud", "k": "cloud"}] * DEVICES
    assert fleet.states() == expected == await fleet.cloud_states(admin)
    for i, device_id in enumerate(fleet.ids):
        gone, k = sorted(fleet.conflicts[device_id], key=lambda c: c.key)
        assert (k.map, k.key, k.winner.writer, k.winner.value, k.loser.writer,
                k.loser.value) == ("state", "k", "cloud", "cloud", "device", f"device-{i}")
        assert (gone.key, gone.winner.value, gone.loser.writer, gone.loser.deleted) == (
            "gone", "cloud", "device", True)
        # The device's time corrected; a write in the millisecond of the device's last sync
        # is stamped just after that sync (the next millisecond).
        assert k.winner.time - k.loser.time in (999, 1000)
    assert {dev._store.dirty_count for dev in fleet.devices} == {0}


@SKEWS
async def test_the_device_writing_one_second_later_wins_on_both_sides(
        make_device: DeviceFactory, admin: AdminClient, server_clock: Clock,
        skew: int) -> None:
    """A delete after a set wins too."""
    fleet = Fleet(make_device, server_clock, skew, "d")
    await fleet.start()
    server_clock.ms += 1000
    await fleet.cloud_write(admin)
    server_clock.ms += 1000
    await fleet.write()
    await fleet.sync()

    expected = [{"k": f"device-{i}"} for i in range(DEVICES)]
    assert fleet.states() == expected == await fleet.cloud_states(admin)
    for i, device_id in enumerate(fleet.ids):
        gone, k = sorted(fleet.conflicts[device_id], key=lambda c: c.key)
        assert (k.winner.writer, k.winner.value, k.loser.writer, k.loser.value) == (
            "device", f"device-{i}", "cloud", "cloud")
        assert (gone.winner.writer, gone.winner.deleted, gone.loser.value) == (
            "device", True, "cloud")
        assert k.winner.time - k.loser.time in (1000, 1001)
    assert {dev._store.dirty_count for dev in fleet.devices} == {0}
