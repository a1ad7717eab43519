"""Management API for the cloud reaching devices: messages, commands, and the routes that
proxied requests may call. All endpoints need the admin token; bodies are JSON."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest, NotFound
from crdtsync.protocol import NAME_RE, item_body
from crdtsync.values import check_value

from ..core import Services
from ..proxied.dispatch import remember_route
from ..proxied.routes import Route
from ..store.records import Downlink
from .common import (
    int_param,
    json_response,
    limit_param,
    name_param,
    not_from_file,
    read_object,
    require_admin,
)
from .input import parse_uint
from .keys import METRICS, SERVICES

routes = web.RouteTableDef()

FINAL = frozenset({"succeeded", "failed", "expired"})
MAX_WAIT_S = 60
DEFAULT_DEADLINE_S = 24 * 3600


def _name(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise MalformedRequest(f"{key!r} must be a name (1-64 of A-Za-z0-9_.:-)")
    return value


def _seconds(body: dict[str, Any], key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 10**8:
        raise MalformedRequest(f"{key!r} must be a number of seconds > 0")
    return float(value)


async def _queue(request: web.Request, kind: str, name_key: str, body_key: str,
                 life_key: str, default_life: float | None) -> Downlink:
    """Queue the item a JSON body describes. ``413 body_too_large`` (``detail``:
    ``max_item_body``, ``size``) when ``body_key`` is over what a device takes: queued, it
    would reach the device only to be skipped."""
    services = request.app[SERVICES]
    body = await read_object(request, "body must be a JSON object")
    payload = body.get(body_key)
    check_value(payload, where=body_key, max_int=2**63 - 1)
    item_body(payload, services.config.limits, what=body_key)
    life = _seconds(body, life_key, default_life)
    now = services.config.clock()
    return await services.store.queue_downlink(
        name_param(request), kind, _name(body, name_key), payload, now,
        None if life is None else now + int(life * 1000))


@routes.post("/v1/devices/{device}/messages")
async def post_message(request: web.Request) -> web.Response:
    """Queue ``{"topic", "body", "ttl"}`` for the device; it rides on its next sync."""
    require_admin(request)
    item = await _queue(request, "message", "topic", "body", "ttl", None)
    return json_response(item.to_json(), status=201)


@routes.get("/v1/devices/{device}/messages")
async def list_messages(request: web.Request) -> web.Response:
    """The device's messages in order with their delivery status."""
    return await _list(request, "message")


@routes.post("/v1/devices/{device}/commands")
async def post_command(request: web.Request) -> web.Response:
    """Queue ``{"method", "params", "deadline"}`` (seconds from now); returns the command."""
    require_admin(request)
    item = await _queue(request, "command", "method", "params", "deadline",
                        DEFAULT_DEADLINE_S)
    return json_response(item.to_json(), status=201)


@routes.get("/v1/devices/{device}/commands")
async def list_commands(request: web.Request) -> web.Response:
    """The device's commands in order with state and result."""
    return await _list(request, "command")


async def _list(request: web.Request, kind: str) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    device = name_param(request)
    if await services.store.get_device(device) is None:
        raise NotFound(f"no device {device!r}")
    items = await services.store.list_downlink(
        device, kind, int_param(request, "after", 0, 2**63 - 1),
        limit_param(request))
    return json_response({"items": [i.to_json() for i in items],
                          "next": items[-1].seq if items else None})


def _item_id(request: web.Request, kind: str) -> int:
    """The ``id`` path parameter; :class:`NotFound` unless it is a possible item id."""
    raw = request.match_info["id"]
    item_id = parse_uint(raw, 1, 2**63 - 1)
    if item_id is None:
        raise NotFound(f"no {kind} {raw!r}")
    return item_id


async def _item(services: Services, item_id: int, kind: str) -> Downlink:
    item = await services.store.get_downlink(item_id)
    if item is None or item.kind != kind:
        raise NotFound(f"no {kind} {item_id}")
    return item


@routes.get("/v1/messages/{id}")
async def get_message(request: web.Request) -> web.Response:
    require_admin(request)
    item = await _item(request.app[SERVICES], _item_id(request, "message"), "message")
    return json_response(item.to_json())


@routes.get("/v1/commands/{id}")
async def get_command(request: web.Request) -> web.Response:
    """A command's state and result; ``?wait=S`` long-polls up to S seconds (max 60) until
    it succeeded, failed or expired (woken by the commit that stores its result)."""
    require_admin(request)
    services = request.app[SERVICES]
    wait = int_param(request, "wait", 0, MAX_WAIT_S)
    item_id = _item_id(request, "command")
    if wait == 0:
        return json_response((await _item(services, item_id, "command")).to_json())
    with request.app[METRICS].command_polls:
        return json_response((await _final_command(services, item_id, wait)).to_json())


async def _final_command(services: Services, item_id: int, wait: float) -> Downlink:
    """The command once final, or as it is after ``wait`` seconds (or at shutdown).

    It is read again only when a sync of this process committed results of its device, or
    every ``command_poll`` seconds (another process's commit): waiting costs no reads."""
    results = services.results
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    before = results.notified
    item = await _item(services, item_id, "command")
    with results.watch(item.device) as watch:
        if results.notified != before:  # a result may have committed during the read
            item = await _item(services, item_id, "command")
        while (item.status not in FINAL and not results.closed
               and (remaining := deadline - loop.time()) > 0):
            await watch.wait(remaining)
            item = await _item(services, item_id, "command")
    return item


# --- routes ----------------------------------------------------------------------------------

def _route_json(route: Route) -> dict[str, Any]:
    return {"alias": route.alias, **route.to_json()}


@routes.get("/v1/routes")
async def list_routes(request: web.Request) -> web.Response:
    """Configured routes; header values and URLs are redacted."""
    require_admin(request)
    return json_response({"routes": [_route_json(r) for r in request.app[SERVICES].routes.list()]})


@routes.get("/v1/routes/{alias}")
async def get_route(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(_route_json(request.app[SERVICES].routes.get(request.match_info["alias"])))


@routes.put("/v1/routes/{alias}")
async def put_route(request: web.Request) -> web.Response:
    """Create or replace a route; persisted (a routes-file route of the same alias wins
    again at the next start); returned redacted. A url or header value sent back as a GET
    showed it keeps the stored value."""
    require_admin(request)
    services = request.app[SERVICES]
    alias = request.match_info["alias"]
    not_from_file("route", alias, services.routes.from_file)
    body = await read_object(request, "body must be a JSON object")
    route = Route.from_json(alias, body, keep=services.routes.find(alias))
    services.routes.put(route)
    await remember_route(services.store, route, route.alias)
    return json_response(_route_json(route))


@routes.delete("/v1/routes/{alias}")
async def delete_route(request: web.Request) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    alias = request.match_info["alias"]
    not_from_file("route", alias, services.routes.from_file)
    services.routes.delete(alias)
    await remember_route(services.store, None, alias)
    return web.Response(status=204)
