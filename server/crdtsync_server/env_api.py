"""Environment variables: project defaults, per fleet, per device (admin token, JSON).

Each layer is the ``env`` map of a document: the project document, the fleet's shared
document, the device's own document. A device reads the merged view with precedence
device > fleet > project; a change reaches every device sharing the document at its next
sync. Bodies are merge patches (``null`` deletes a variable).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest, NotFound
from crdtsync.protocol import NAME_RE, PROJECT_DOC, STATE_DOC

from .admin_api import json_response, name_param, read_json, require_admin
from .app import SERVICES, Services
from .sync import doc_key, fleet_key

routes = web.RouteTableDef()
ENV = "env"


async def _patch(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise MalformedRequest("body must be a JSON object of NAME: value (null deletes)")
    return body


async def fleet_param(services: Services, request: web.Request) -> str:
    fleet = request.match_info["fleet"]
    if not NAME_RE.match(fleet) or await services.store.get_fleet(fleet) is None:
        raise NotFound(f"no fleet {fleet!r}")
    return fleet


async def _layer(services: Services, key: str) -> dict[str, Any]:
    layer: dict[str, Any] = (await services.sync.read_doc(key, key)).get(ENV, {})
    return layer


@routes.get("/v1/env")
async def get_project_env(request: web.Request) -> web.Response:
    """The project defaults."""
    require_admin(request)
    return json_response(await _layer(request.app[SERVICES], PROJECT_DOC))


@routes.patch("/v1/env")
async def patch_project_env(request: web.Request) -> web.Response:
    """Set or delete project defaults; returns them."""
    require_admin(request)
    services = request.app[SERVICES]
    return json_response(await services.sync.write_shared(PROJECT_DOC, ENV,
                                                          await _patch(request)))


@routes.get("/v1/fleets/{fleet}/env")
async def get_fleet_env(request: web.Request) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    return json_response(await _layer(services, fleet_key(await fleet_param(services, request))))


@routes.patch("/v1/fleets/{fleet}/env")
async def patch_fleet_env(request: web.Request) -> web.Response:
    """Set or delete a fleet's variables; they reach every device of the fleet."""
    require_admin(request)
    services = request.app[SERVICES]
    key = fleet_key(await fleet_param(services, request))
    return json_response(await services.sync.write_shared(key, ENV, await _patch(request)))


@routes.patch("/v1/devices/{device}/env")
async def patch_device_env(request: web.Request) -> web.Response:
    """Set or delete one device's own variables (they win over fleet and project)."""
    require_admin(request)
    services = request.app[SERVICES]
    return json_response(await services.sync.write_state(name_param(request), ENV,
                                                         await _patch(request)))


@routes.get("/v1/devices/{device}/env")
async def get_device_env(request: web.Request) -> web.Response:
    """The merged view the device sees, and where each variable comes from."""
    require_admin(request)
    services = request.app[SERVICES]
    device_id = name_param(request)
    device = await services.store.get_device(device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    layers = [("project", await _layer(services, PROJECT_DOC))]
    if device.fleet:
        layers.append(("fleet", await _layer(services, fleet_key(device.fleet))))
    layers.append(("device", (await services.sync.read_doc(doc_key(device_id, STATE_DOC),
                                                           device_id)).get(ENV, {})))
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, layer in layers:
        merged.update(layer)
        source.update(dict.fromkeys(layer, name))
    return json_response({"env": merged, "source": source})
