"""Environment variables: project defaults, per fleet, per device (admin token, JSON).

Each layer is the ``env`` map of a document: the project document, the fleet's shared
document, the device's own document. A device reads the merged view with precedence
device > fleet > project; a change reaches every device sharing the document at its next
sync. Bodies are merge patches (``null`` deletes a variable).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from crdtsync.protocol import PROJECT_DOC, STATE_DOC

from ..core import Services
from ..sync import doc_key, fleet_key
from .common import (
    admin_fleet,
    found,
    json_response,
    name_param,
    read_object,
    require_admin,
)
from .keys import SERVICES

routes = web.RouteTableDef()
ENV = "env"


async def _patch(request: web.Request) -> dict[str, Any]:
    return await read_object(request, "body must be a JSON object of NAME: value (null deletes)")


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
    services, key = await admin_fleet(request)
    return json_response(await _layer(services, key))


@routes.patch("/v1/fleets/{fleet}/env")
async def patch_fleet_env(request: web.Request) -> web.Response:
    """Set or delete a fleet's variables; they reach every device of the fleet."""
    services, key = await admin_fleet(request)
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
    device = found(await services.store.get_device(device_id), "device", device_id)
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
