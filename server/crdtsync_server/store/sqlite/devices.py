"""Devices and fleets in SQLite (the :class:`~crdtsync_server.store.roles.DeviceStore` role):
tables ``devices``, ``deleted_devices`` and ``fleets``.

A sync finds its device by token hash (index ``devices_token_hash``, v5). A device's
``fleet`` is checked against the ``fleets`` table in the transaction that sets it
(``add_device``, ``set_device_fleet``), so both backends raise the same :class:`NotFound`
(not a foreign-key ``IntegrityError`` to translate). A deleted device's ``last_seq`` stays in
``deleted_devices`` until a device with the same id is added, which then starts above it
(``seq_floor``).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping

from crdtsync._sqlite_worker import transaction
from crdtsync.errors import AlreadyExists, NotFound

from ..columns import DEVICE_COLUMNS, FLEET_COLUMNS, device_from_row, fleet_from_row
from ..feed import json_text
from ..records import DeviceRecord, FleetRecord, wake_device
from ..rules import above_deleted, check_limit, updated_fields
from .connection import SQLiteConnection
from .wakes import insert_wakes


class SQLiteDevices(SQLiteConnection):
    """The :class:`DeviceStore` role."""

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises :class:`AlreadyExists` if the id is taken and
        :class:`NotFound` if its ``fleet`` does not exist."""
        await self._run(_add_device, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""
        return await self._run(select_device, device_id)

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device with this token hash (index ``devices_token_hash``), or ``None``.

        It runs before every sync. While this store is the only writer of the file, the
        record comes from :attr:`known_devices` (every row this store changed since is
        forgotten there or put back as written, so it is the stored row; a row changed behind
        the server's back is seen within ``DEVICE_CACHE_SECONDS`` of the store's last look at
        the file, ``DeviceCache``, and a lookup after a longer quiet looks first,
        :meth:`confirm_devices`), else is read on the event
        loop's thread (``SQLiteWorker.read``, no hop); otherwise in the store's thread,
        observing what other writers committed (``external_writes``) before the sync reads
        its documents (``sqlite/writers.py``). Reading the row on the loop cost about 40 µs
        a sync under load: every commit of the store's thread makes the reading connection
        fetch the pages again."""
        if not self.writers.alone():
            self.known_devices.clear()
            return await self._run(_device_by_token, token_hash)
        if self.known_devices.unconfirmed():  # (no coroutine at every sync)
            await self.confirm_devices()
        device = self.known_devices.get(token_hash)
        if device is None:
            device = await self._db.read(_device_by_token, token_hash)
            if device is not None:
                self.known_devices.keep(device)
        return device

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the token hash and/or the disabled flag; returns the stored record.
        :class:`NotFound` for an unknown device."""
        return await self._run(_update_device, device_id, token_hash, disabled)

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_list_devices, after, limit)

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as ``last_sync`` (never backwards), one transaction.
        The device records kept for the syncs' lookups stay, with the same times moved
        (:meth:`DeviceCache.touched`): the flush runs every second while devices make
        no-change syncs, and forgetting them made every sync read its device's row."""
        times = dict(last_sync)
        await self._run(_touch_devices, times, forget_devices=False)
        self.known_devices.touched(times)

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises :class:`AlreadyExists` if the id is taken."""
        await self._run(_add_fleet, fleet)

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""
        return await self._run(_select_fleet, fleet_id)

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order, at most ``limit`` (>= 0)."""
        check_limit(limit)
        return await self._run(_list_fleets, after, limit)

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Move the device to ``fleet`` (``None``: no fleet) in one transaction, bumping
        ``fleet_gen`` only on a change; returns the stored record. :class:`NotFound` for an
        unknown device or fleet, with nothing written."""
        return await self._run_waking(_set_device_fleet, device_id, fleet, now)

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order, at most ``limit`` (>= 0);
        empty for an unknown fleet."""
        check_limit(limit)
        return await self._run(_devices_in_fleet, fleet, after, limit)


def _add_device(conn: sqlite3.Connection, device: DeviceRecord) -> None:
    with transaction(conn):
        if device.fleet is not None:
            _require_fleet(conn, device.fleet)
        if select_device(conn, device.id) is not None:
            raise AlreadyExists(f"device {device.id!r} already exists", {"device": device.id})
        row = conn.execute("SELECT last_seq FROM deleted_devices WHERE id = ?",
                           (device.id,)).fetchone()
        if row is not None:  # the new device starts above the seqs the old one used
            conn.execute("DELETE FROM deleted_devices WHERE id = ?", (device.id,))
            device = above_deleted(device, int(row[0]))
        conn.execute(
            f"INSERT INTO devices ({DEVICE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device.id, device.token_hash, device.created, device.last_sync,
                device.last_seq, device.events_lost, json_text(dict(device.meta)),
                device.down_seq, device.down_done, device.fleet, device.fleet_gen,
                int(device.disabled), device.seq_floor,
            ),
        )


def _device_by_token(conn: sqlite3.Connection, token_hash: str) -> DeviceRecord | None:
    row = conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE token_hash = ? ORDER BY id LIMIT 1",
        (token_hash,),
    ).fetchone()
    return None if row is None else device_from_row(row)


def _update_device(conn: sqlite3.Connection, device_id: str, token_hash: str | None,
                   disabled: bool | None) -> DeviceRecord:
    with transaction(conn):
        device = dataclasses.replace(
            require_device(conn, device_id),
            **updated_fields(token_hash=token_hash, disabled=disabled))
        conn.execute("UPDATE devices SET token_hash = ?, disabled = ? WHERE id = ?",
                     (device.token_hash, int(device.disabled), device.id))
    return device


def require_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
    device = select_device(conn, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}", {"device": device_id})
    return device


def select_device(conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
    row = conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,)
    ).fetchone()
    return None if row is None else device_from_row(row)


def _list_devices(conn: sqlite3.Connection, after: str, limit: int) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )
    return [device_from_row(row) for row in rows]


def _touch_devices(conn: sqlite3.Connection, last_sync: dict[str, int]) -> None:
    with transaction(conn):
        conn.executemany(
            "UPDATE devices SET last_sync = ? WHERE id = ? AND"
            " (last_sync IS NULL OR last_sync < ?)",
            [(t, device, t) for device, t in last_sync.items()])


def _add_fleet(conn: sqlite3.Connection, fleet: FleetRecord) -> None:
    cur = conn.execute(
        f"INSERT INTO fleets ({FLEET_COLUMNS}) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (fleet.id, fleet.created, json_text(dict(fleet.meta))),
    )
    if cur.rowcount == 0:
        raise AlreadyExists(f"fleet {fleet.id!r} already exists", {"fleet": fleet.id})


def _select_fleet(conn: sqlite3.Connection, fleet_id: str) -> FleetRecord | None:
    row = conn.execute(
        f"SELECT {FLEET_COLUMNS} FROM fleets WHERE id = ?", (fleet_id,)
    ).fetchone()
    return None if row is None else fleet_from_row(row)


def _require_fleet(conn: sqlite3.Connection, fleet_id: str) -> None:
    if _select_fleet(conn, fleet_id) is None:
        raise NotFound(f"no fleet {fleet_id!r}", {"fleet": fleet_id})


def _list_fleets(conn: sqlite3.Connection, after: str, limit: int) -> list[FleetRecord]:
    rows = conn.execute(
        f"SELECT {FLEET_COLUMNS} FROM fleets WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    )
    return [fleet_from_row(row) for row in rows]


def _set_device_fleet(conn: sqlite3.Connection, device_id: str, fleet: str | None, now: int
                      ) -> DeviceRecord:
    with transaction(conn):
        device = require_device(conn, device_id)
        if fleet is not None:
            _require_fleet(conn, fleet)
        if fleet == device.fleet:
            return device
        conn.execute("UPDATE devices SET fleet = ?, fleet_gen = fleet_gen + 1 WHERE id = ?",
                     (fleet, device.id))
        insert_wakes(conn, [wake_device(device.id)], now)
    return dataclasses.replace(device, fleet=fleet, fleet_gen=device.fleet_gen + 1)


def _devices_in_fleet(conn: sqlite3.Connection, fleet: str, after: str, limit: int
                      ) -> list[DeviceRecord]:
    rows = conn.execute(
        f"SELECT {DEVICE_COLUMNS} FROM devices WHERE fleet = ? AND id > ? ORDER BY id LIMIT ?",
        (fleet, after, limit),
    )
    return [device_from_row(row) for row in rows]
