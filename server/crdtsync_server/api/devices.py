"""The management API (JSON, admin bearer token): devices, state, events, OpenAPI."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from crdtsync.errors import MalformedRequest
from crdtsync.protocol import NAME_RE
from crdtsync.values import check_key

from ..auth import DEVICE_TOKEN_BYTES, hash_token, new_token
from ..store import DeviceRecord
from .common import (
    bool_param,
    device_json,
    found,
    id_page,
    int_param,
    json_response,
    limit_param,
    name_param,
    read_json,
    require_admin,
)
from .keys import SERVICES

routes = web.RouteTableDef()


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
    after, limit = id_page(request)
    devices = await request.app[SERVICES].store.list_devices(after, limit)
    sync = request.app[SERVICES].sync
    return json_response({"devices": [device_json(sync.with_recent_sync(d)) for d in devices],
                          "next": devices[-1].id if len(devices) == limit else None})


@routes.get("/v1/devices/{device}")
async def get_device(request: web.Request) -> web.Response:
    """One device with its bookkeeping (last sync time, last stored seq)."""
    require_admin(request)
    device_id = name_param(request)
    device = found(await request.app[SERVICES].store.get_device(device_id), "device", device_id)
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
    """Delete the device, its documents, projection, queued messages and commands, its
    proxied requests and its files; its token stops working at once. Its events and state
    changes stay in the feed unless ``?events=true``. Answers 204."""
    require_admin(request)
    events = bool_param(request, "events")
    services = request.app[SERVICES]
    device_id = name_param(request)
    await services.sync.delete_device(device_id, events=events)
    await services.files.forget_device(device_id)
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
    limit = limit_param(request)
    events = await request.app[SERVICES].store.read_events(
        after, limit, device=request.query.get("device") or None,
        topic=request.query.get("topic") or None)
    next_cursor = str(events[-1].cursor) if events else str(after)
    return json_response({"events": [e.to_json() for e in events], "next": next_cursor})
