"""The management API (JSON, admin bearer token): devices, state, events, OpenAPI."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest, NotFound, Unauthorized
from crdtsync.protocol import NAME_RE
from crdtsync.values import check_key

from .api_input import parse_json, parse_uint
from .app import SERVICES, read_body
from .auth import DEVICE_TOKEN_BYTES, bearer, hash_token, new_token, token_matches
from .store import DeviceRecord

routes = web.RouteTableDef()
MAX_PAGE = 1000


def require_admin(request: web.Request) -> None:
    """Raise :class:`Unauthorized` unless the admin token is presented."""
    token = bearer(request)
    if not token_matches(token, request.app[SERVICES].admin_hash):
        raise Unauthorized("this endpoint needs the admin token")


async def read_json(request: web.Request) -> Any:
    """The JSON body (``None`` if empty), parsed by :func:`api_input.parse_json`:
    :class:`MalformedRequest` if it is not JSON, :class:`InvalidValue` for NaN, deep
    nesting or a lone surrogate."""
    return parse_json(await read_body(request) or b"null")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(
        ",", ":")))


def device_json(device: DeviceRecord) -> dict[str, Any]:
    return {"id": device.id, "created": device.created, "last_sync": device.last_sync,
            "last_seq": device.last_seq, "events_lost": device.events_lost,
            "meta": dict(device.meta), "fleet": device.fleet, "fleet_gen": device.fleet_gen,
            "disabled": device.disabled}


def int_param(request: web.Request, name: str, default: int, maximum: int,
               minimum: int = 0) -> int:
    """The query parameter ``name`` as an integer from ``minimum`` to ``maximum``
    (``default`` when absent or empty); :class:`MalformedRequest` otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = parse_uint(raw, minimum, maximum)
    if value is None:
        raise MalformedRequest(
            f"query parameter {name!r} must be an integer {minimum}..{maximum}")
    return value


def bool_param(request: web.Request, name: str) -> bool:
    """Query parameter ``name``: ``true`` or ``1``, ``false`` or ``0`` (absent or empty:
    false)."""
    raw = request.query.get(name, "") or "false"
    if raw not in ("true", "false", "1", "0"):
        raise MalformedRequest(f"query parameter {name!r} must be true, false, 1 or 0")
    return raw in ("true", "1")


def name_param(request: web.Request, key: str = "device") -> str:
    """The path parameter ``key`` (a device id, fleet id, topic...), checked as a name."""
    value = request.match_info[key]
    if not NAME_RE.match(value):
        raise MalformedRequest(f"{value!r} is not a valid {key} name")
    return value


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    """Liveness, without credentials."""
    return json_response({"ok": True})


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI description of every endpoint, without credentials."""
    text = resources.files("crdtsync_server").joinpath("openapi.json").read_text()
    return web.Response(text=text, content_type="application/json")


@routes.post("/v1/devices")
async def add_device(request: web.Request) -> web.Response:
    """Provision a device; the token is in this response only (stored hashed)."""
    require_admin(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise MalformedRequest('body must be {"id": "<device id>", "meta": {...}}')
    if not NAME_RE.match(body["id"]):
        raise MalformedRequest(f"{body['id']!r} is not a valid device id "
                               "(1-64 of A-Z a-z 0-9 _ . : -)")
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise MalformedRequest("meta must be an object")
    fleet = body.get("fleet")
    if fleet is not None and not (isinstance(fleet, str) and NAME_RE.match(fleet)):
        raise MalformedRequest("fleet must be a fleet id or null")
    token = new_token(DEVICE_TOKEN_BYTES)
    record = DeviceRecord(id=body["id"], token_hash=hash_token(token),
                          created=request.app[SERVICES].config.clock(), meta=meta, fleet=fleet)
    await request.app[SERVICES].store.add_device(record)
    return json_response({**device_json(record), "token": token}, status=201)


@routes.get("/v1/devices")
async def list_devices(request: web.Request) -> web.Response:
    """Devices in id order, paginated with ``after`` (the last id seen) and ``limit``."""
    require_admin(request)
    limit = int_param(request, "limit", 100, MAX_PAGE, minimum=1)
    devices = await request.app[SERVICES].store.list_devices(request.query.get("after", ""),
                                                             limit)
    sync = request.app[SERVICES].sync
    return json_response({"devices": [device_json(sync.with_recent_sync(d)) for d in devices],
                          "next": devices[-1].id if len(devices) == limit else None})


@routes.get("/v1/devices/{device}")
async def get_device(request: web.Request) -> web.Response:
    """One device with its bookkeeping (last sync time, last stored seq)."""
    require_admin(request)
    device = await request.app[SERVICES].store.get_device(name_param(request))
    if device is None:
        raise NotFound(f"no device {request.match_info['device']!r}")
    return json_response(device_json(request.app[SERVICES].sync.with_recent_sync(device)))


@routes.post("/v1/devices/{device}/token")
async def rotate_token(request: web.Request) -> web.Response:
    """Give the device a new token, in this response only (stored hashed); the old token
    stops working at once, in every server process sharing the database (nothing caches
    credentials). For a lost or leaked token."""
    require_admin(request)
    token = new_token(DEVICE_TOKEN_BYTES)
    record = await request.app[SERVICES].store.update_device(name_param(request),
                                                             token_hash=hash_token(token))
    return json_response({**device_json(record), "token": token})


@routes.patch("/v1/devices/{device}")
async def patch_device(request: web.Request) -> web.Response:
    """``{"disabled": true}`` refuses the device's syncs (``403 forbidden``, nothing it
    holds is lost) until ``{"disabled": false}``; returns the device."""
    require_admin(request)
    device_id = name_param(request)
    body = await read_json(request)
    if not (isinstance(body, dict) and body.keys() == {"disabled"}
            and isinstance(body["disabled"], bool)):
        raise MalformedRequest('body must be {"disabled": true | false}')
    services = request.app[SERVICES]
    record = await services.store.update_device(device_id, disabled=body["disabled"])
    return json_response(device_json(services.sync.with_recent_sync(record)))


@routes.delete("/v1/devices/{device}")
async def delete_device(request: web.Request) -> web.Response:
    """Delete the device, its documents, projection, queued messages and commands and its
    proxied requests; its token stops working at once. Its events and state changes stay
    in the feed unless ``?events=true``. Answers 204."""
    require_admin(request)
    events = bool_param(request, "events")
    await request.app[SERVICES].sync.delete_device(name_param(request), events=events)
    return web.Response(status=204)


@routes.get("/v1/devices/{device}/state")
async def get_state(request: web.Request) -> web.Response:
    """The device's document as JSON: ``{map: {key: value}}``; with ``?meta=1``
    ``{"state": <the document>, "meta": {map: {key: {"time", "writer"}}}}``."""
    require_admin(request)
    meta = bool_param(request, "meta")
    return json_response(await request.app[SERVICES].sync.read_state(name_param(request),
                                                                     meta=meta))


@routes.patch("/v1/devices/{device}/state/{map}")
async def patch_state(request: web.Request) -> web.Response:
    """Merge-patch one map of the device's state (``null`` deletes a key); the change is
    durable on return and reaches the device at its next sync."""
    require_admin(request)
    name = request.match_info["map"]
    check_key(name, where="map name")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise MalformedRequest("body must be a JSON object of key: value (null deletes)")
    result = await request.app[SERVICES].sync.write_state(name_param(request), name, body)
    return json_response(result)


@routes.get("/v1/events")
async def list_events(request: web.Request) -> web.Response:
    """Events in arrival order after ``after`` (a cursor), filtered by device and topic."""
    require_admin(request)
    after = int_param(request, "after", 0, 2**63 - 1)
    limit = int_param(request, "limit", 100, MAX_PAGE, minimum=1)
    events = await request.app[SERVICES].store.read_events(
        after, limit, device=request.query.get("device") or None,
        topic=request.query.get("topic") or None)
    next_cursor = str(events[-1].cursor) if events else str(after)
    return json_response({"events": [e.to_json() for e in events], "next": next_cursor})
