"""Management API for fleets (admin token, JSON): create and list fleets, list a fleet's
devices, and move a device into a fleet or out of every fleet.

A device belongs to at most one fleet. Moving it to another fleet (or out) bumps its
``fleet_gen``, which tells its next sync to replace its copy of the fleet document.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest
from crdtsync.protocol import NAME_RE

from ..store import FleetRecord
from .common import (
    device_json,
    found,
    id_page,
    json_response,
    name_param,
    read_object,
    require_admin,
)
from .keys import SERVICES

routes = web.RouteTableDef()


async def _require_fleet(request: web.Request) -> FleetRecord:
    fleet_id = name_param(request, "fleet")
    return found(await request.app[SERVICES].store.get_fleet(fleet_id), "fleet", fleet_id)


@routes.post("/v1/fleets")
async def add_fleet(request: web.Request) -> web.Response:
    """Create ``{"id", "meta"}``; 409 ``already_exists`` if the id is taken."""
    require_admin(request)
    body = await read_object(request, 'body must be {"id": "<fleet id>", "meta": {...}}')
    fleet_id, meta = body.get("id"), body.get("meta", {})
    if not isinstance(fleet_id, str) or not NAME_RE.match(fleet_id):
        raise MalformedRequest(f"{fleet_id!r} is not a valid fleet id "
                               "(1-64 of A-Z a-z 0-9 _ . : -)")
    if not isinstance(meta, dict):
        raise MalformedRequest("meta must be an object")
    record = FleetRecord(id=fleet_id, created=request.app[SERVICES].config.clock(), meta=meta)
    await request.app[SERVICES].store.add_fleet(record)
    return json_response(record.to_json(), status=201)


@routes.get("/v1/fleets")
async def list_fleets(request: web.Request) -> web.Response:
    """Fleets in id order, paginated with ``after`` (the last id seen) and ``limit``."""
    require_admin(request)
    after, limit = id_page(request)
    fleets = await request.app[SERVICES].store.list_fleets(after, limit)
    return json_response({"fleets": [f.to_json() for f in fleets],
                          "next": fleets[-1].id if len(fleets) == limit else None})


@routes.get("/v1/fleets/{fleet}")
async def get_fleet(request: web.Request) -> web.Response:
    """One fleet."""
    require_admin(request)
    return json_response((await _require_fleet(request)).to_json())


@routes.get("/v1/fleets/{fleet}/devices")
async def list_fleet_devices(request: web.Request) -> web.Response:
    """The fleet's devices in id order, paginated like ``GET /v1/devices``."""
    require_admin(request)
    fleet = await _require_fleet(request)
    after, limit = id_page(request)
    devices = await request.app[SERVICES].store.devices_in_fleet(fleet.id, after, limit)
    sync = request.app[SERVICES].sync
    return json_response({"devices": [device_json(sync.with_recent_sync(d)) for d in devices],
                          "next": devices[-1].id if len(devices) == limit else None})


@routes.put("/v1/devices/{device}/fleet")
async def set_device_fleet(request: web.Request) -> web.Response:
    """``{"fleet": id}`` moves the device into a fleet, ``{"fleet": null}`` out of every
    fleet; returns the device. 404 ``not_found`` for an unknown device or fleet."""
    require_admin(request)
    device_id = name_param(request)
    fleet = _fleet_choice(await read_object(request, f"body must be {_ASSIGN_SHAPE}"))
    services = request.app[SERVICES]
    device = await services.store.set_device_fleet(device_id, fleet, services.config.clock())
    return json_response(device_json(services.sync.with_recent_sync(device)))


_ASSIGN_SHAPE = '{"fleet": "<fleet id>" | null}'


def _fleet_choice(body: dict[str, Any]) -> str | None:
    """The ``fleet`` of an assignment body: a valid fleet id, or ``None`` (no fleet)."""
    fleet = body.get("fleet")
    if "fleet" not in body or not (fleet is None
                                   or (isinstance(fleet, str) and NAME_RE.match(fleet))):
        raise MalformedRequest(f"body must be {_ASSIGN_SHAPE}")
    return fleet
