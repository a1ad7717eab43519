"""Devices and fleets in PostgreSQL (the :class:`~crdtsync_server.store.roles.DeviceStore`
role): tables ``devices``, ``deleted_devices`` and ``fleets``.

The rules are the SQLite backend's (``sqlite/devices.py``): a sync finds its device by token
hash (index ``devices_token_hash``); a device's ``fleet`` is checked against ``fleets`` in
the transaction that sets it, so every backend raises the same :class:`NotFound`; a deleted
device's ``last_seq`` stays in ``deleted_devices`` until a device with the same id is added,
which then starts above it (``seq_floor``). Ids taken concurrently by another instance are
found by ``ON CONFLICT DO NOTHING`` and raise :class:`AlreadyExists`.

Locks: writers of one device lock its row (:func:`require_device` with ``lock``), so two
instances updating one device run one after the other. ``set_device_fleet`` appends a wake
entry and ``touch_devices`` locks many rows: both take the sequence lock first
(``connection.sequenced``), as commit groups do before they lock their devices, so no two
writers wait for each other's rows in opposite orders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import asyncpg

from crdtsync.errors import AlreadyExists, NotFound

from ..columns import DEVICE_COLUMNS, FLEET_COLUMNS, device_from_row, fleet_from_row
from ..feed import json_text
from ..records import DeviceRecord, FleetRecord, wake_device
from ..rules import above_deleted, check_limit, updated_fields
from .connection import PostgresConnection, sequenced
from .wakes import insert_wakes


class PostgresDevices(PostgresConnection):
    """The :class:`DeviceStore` role."""

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken and
        :class:`NotFound` if its ``fleet`` does not exist."""
        await self._write(_add_device, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        return await self._read(select_device, device_id)

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device with this token hash (index ``devices_token_hash``), or ``None``."""
        return await self._read(_device_by_token, token_hash)

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the token hash and/or the disabled flag; returns the stored record.
        :class:`NotFound` for an unknown device."""
        return await self._write(_update_device, device_id, token_hash, disabled)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._read(_list_devices, after, limit)

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as ``last_sync`` (never backwards), one transaction."""
        if last_sync:
            await self._write(_touch_devices, dict(last_sync))

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises :class:`AlreadyExists` if the id is taken."""
        await self._write(_add_fleet, fleet)

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""
        return await self._read(_select_fleet, fleet_id)

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._read(_list_fleets, after, limit)

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Move the device to ``fleet`` (``None``: no fleet) in one transaction, bumping
        ``fleet_gen`` only on a change (then appending a wake entry for the device);
        returns the stored record. :class:`NotFound` for an unknown device or fleet, with
        nothing written."""
        return await self._write(_set_device_fleet, device_id, fleet, now)

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order, at most ``limit`` (>= 0);
        empty for an unknown fleet."""
        check_limit(limit)
        return await self._read(_devices_in_fleet, fleet, after, limit)


async def _add_device(conn: asyncpg.Connection, device: DeviceRecord) -> None:
    if device.fleet is not None:
        await _require_fleet(conn, device.fleet)
    deleted = await conn.fetchval("DELETE FROM deleted_devices WHERE id = $1 RETURNING last_seq",
                                  device.id)
    if deleted is not None:  # the new device starts above the seqs the old one used
        device = above_deleted(device, int(deleted))
    added = await conn.fetchval(
        f"INSERT INTO devices ({DEVICE_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        " ON CONFLICT (id) DO NOTHING RETURNING true",
        device.id, device.token_hash, device.created, device.last_sync, device.last_seq,
        device.events_lost, json_text(dict(device.meta)), device.down_seq, device.down_done,
        device.fleet, device.fleet_gen, device.disabled, device.seq_floor)
    if not added:  # raising rolls the deletion above back
        raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})


async def _device_by_token(conn: asyncpg.Connection, token_hash: str) -> DeviceRecord | None:
    row = await conn.fetchrow(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE token_hash = $1 ORDER BY id LIMIT 1",
        token_hash)
    return None if row is None else device_from_row(row)


async def _update_device(conn: asyncpg.Connection, device_id: str, token_hash: str | None,
                         disabled: bool | None) -> DeviceRecord:
    device = dataclasses.replace(
        await require_device(conn, device_id, lock=True),
        **updated_fields(token_hash=token_hash, disabled=disabled))
    await conn.execute("UPDATE devices SET token_hash = $1, disabled = $2 WHERE id = $3",
                       device.token_hash, device.disabled, device.id)
    return device


async def require_device(conn: asyncpg.Connection, device_id: str, *, lock: bool = False
                         ) -> DeviceRecord:
    """The device; :class:`NotFound` if it does not exist. With ``lock`` its row stays
    locked (``FOR UPDATE``) until the transaction ends: another instance's writer of the
    device waits."""
    device = await select_device(conn, device_id, lock=lock)
    if device is None:
        raise NotFound(f"no device {device_id!r}", {"device": device_id})
    return device


async def select_device(conn: asyncpg.Connection, device_id: str, *, lock: bool = False
                        ) -> DeviceRecord | None:
    """The device, or ``None``; with ``lock`` its row locked as in :func:`require_device`."""
    row = await conn.fetchrow(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1{' FOR UPDATE' if lock else ''}",
        device_id)
    return None if row is None else device_from_row(row)


async def _list_devices(conn: asyncpg.Connection, after: str, limit: int
                        ) -> list[DeviceRecord]:
    rows = await conn.fetch(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id > $1 ORDER BY id LIMIT $2",
        after, limit)
    return [device_from_row(row) for row in rows]


async def _touch_devices(conn: asyncpg.Connection, last_sync: dict[str, int]) -> None:
    await sequenced(conn)  # first: it locks many device rows (see the module docstring)
    await conn.execute(
        "UPDATE devices d SET last_sync = t.time"
        " FROM unnest($1::text[], $2::bigint[]) AS t(id, time)"
        " WHERE d.id = t.id AND (d.last_sync IS NULL OR d.last_sync < t.time)",
        list(last_sync), list(last_sync.values()))


async def _add_fleet(conn: asyncpg.Connection, fleet: FleetRecord) -> None:
    added = await conn.fetchval(
        f"INSERT INTO fleets ({FLEET_COLUMNS}) VALUES ($1, $2, $3)"
        " ON CONFLICT (id) DO NOTHING RETURNING true",
        fleet.id, fleet.created, json_text(dict(fleet.meta)))
    if not added:
        raise AlreadyExists(f"fleet {fleet.id!r} already exists", {"fleet": fleet.id})


async def _select_fleet(conn: asyncpg.Connection, fleet_id: str) -> FleetRecord | None:
    row = await conn.fetchrow(f"SELECT {FLEET_COLUMNS} FROM fleets WHERE id = $1", fleet_id)
    return None if row is None else fleet_from_row(row)


async def _require_fleet(conn: asyncpg.Connection, fleet_id: str) -> None:
    if await _select_fleet(conn, fleet_id) is None:
        raise NotFound(f"no fleet {fleet_id!r}", {"fleet": fleet_id})


async def _list_fleets(conn: asyncpg.Connection, after: str, limit: int
                       ) -> list[FleetRecord]:
    rows = await conn.fetch(
        f"SELECT {FLEET_COLUMNS} FROM fleets WHERE id > $1 ORDER BY id LIMIT $2", after, limit)
    return [fleet_from_row(row) for row in rows]


async def _set_device_fleet(conn: asyncpg.Connection, device_id: str, fleet: str | None,
                            now: int) -> DeviceRecord:
    await sequenced(conn)  # first: the transaction may append a wake entry
    device = await require_device(conn, device_id, lock=True)
    if fleet is not None:
        await _require_fleet(conn, fleet)
    if fleet == device.fleet:
        return device
    await conn.execute("UPDATE devices SET fleet = $1, fleet_gen = fleet_gen + 1 WHERE id = $2",
                       fleet, device.id)
    await insert_wakes(conn, [wake_device(device.id)], now)
    return dataclasses.replace(device, fleet=fleet, fleet_gen=device.fleet_gen + 1)


async def _devices_in_fleet(conn: asyncpg.Connection, fleet: str, after: str, limit: int
                            ) -> list[DeviceRecord]:
    rows = await conn.fetch(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE fleet = $1 AND id > $2"
        " ORDER BY id LIMIT $3", fleet, after, limit)
    return [device_from_row(row) for row in rows]
