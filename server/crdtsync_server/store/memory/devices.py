"""Devices and fleets of the memory store (the
:class:`~crdtsync_server.store.roles.DeviceStore` role)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from crdtsync.errors import AlreadyExists, NotFound

from ..records import DeviceRecord, FleetRecord, wake_device
from ..rules import above_deleted, check_limit, updated_fields
from .state import MemoryState, copy_device, copy_fleet


class MemoryDevices(MemoryState):
    """The :class:`DeviceStore` role over :class:`MemoryState`."""

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken and
        :class:`NotFound` if its ``fleet`` does not exist."""
        self._check_open()
        if device.fleet is not None:
            self._require_fleet(device.fleet)
        if device.id in self._devices:
            raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})
        deleted = self._deleted_devices.pop(device.id, 0)
        self._devices[device.id] = copy_device(above_deleted(device, deleted))
        self._by_token.setdefault(device.token_hash, set()).add(device.id)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        self._check_open()
        device = self._devices.get(device_id)
        return None if device is None else copy_device(device)

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device with this token hash (lowest id first), or ``None``."""
        self._check_open()
        ids = self._by_token.get(token_hash)
        return copy_device(self._devices[min(ids)]) if ids else None

    def _unindex(self, device: DeviceRecord) -> None:
        ids = self._by_token[device.token_hash]
        ids.discard(device.id)
        if not ids:
            del self._by_token[device.token_hash]

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the token hash and/or the disabled flag; returns the stored record.
        :class:`NotFound` for an unknown device."""
        self._check_open()
        old = self._require_device(device_id)
        device = dataclasses.replace(
            old, **updated_fields(token_hash=token_hash, disabled=disabled))
        self._unindex(old)
        self._devices[device_id] = device
        self._by_token.setdefault(device.token_hash, set()).add(device_id)
        return copy_device(device)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i in self._devices if i > after)[:limit]
        return [copy_device(self._devices[i]) for i in ids]

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as ``last_sync`` (never backwards)."""
        self._check_open()
        for device, time in last_sync.items():
            record = self._devices.get(device)
            if record is not None and (record.last_sync or 0) < time:
                self._devices[device] = dataclasses.replace(record, last_sync=time)

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises :class:`AlreadyExists` if the id is taken."""
        self._check_open()
        if fleet.id in self._fleets:
            raise AlreadyExists(f"fleet {fleet.id!r} already exists", {"fleet": fleet.id})
        self._fleets[fleet.id] = copy_fleet(fleet)

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""
        self._check_open()
        fleet = self._fleets.get(fleet_id)
        return None if fleet is None else copy_fleet(fleet)

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i in self._fleets if i > after)[:limit]
        return [copy_fleet(self._fleets[i]) for i in ids]

    def _require_fleet(self, fleet_id: str) -> None:
        if fleet_id not in self._fleets:
            raise NotFound(f"no fleet {fleet_id!r}", {"fleet": fleet_id})

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Move the device to ``fleet`` (``None``: no fleet), bumping ``fleet_gen`` only on
        a change; returns the stored record. :class:`NotFound` for an unknown device or
        fleet, with nothing written."""
        self._check_open()
        device = self._require_device(device_id)
        if fleet is not None:
            self._require_fleet(fleet)
        if fleet != device.fleet:
            device = dataclasses.replace(device, fleet=fleet, fleet_gen=device.fleet_gen + 1)
            self._devices[device_id] = device
            self._append_wakes([wake_device(device_id)], now)
        return copy_device(device)

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order, at most ``limit`` (>= 0);
        empty for an unknown fleet."""
        self._check_open()
        check_limit(limit)
        ids = sorted(i for i, d in self._devices.items() if d.fleet == fleet and i > after)
        return [copy_device(self._devices[i]) for i in ids[:limit]]
