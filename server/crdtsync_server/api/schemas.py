"""State schemas per fleet (admin token, JSON; docs/protocol.md section 15c).

``PUT /v1/fleets/{fleet}/schema`` checks the schema, keeps the version by hash
(:class:`~.schemas.SchemaRegistry`) and writes it into the fleet's shared document, root map
``schema`` (``{"hash", "json"}``), in one cloud write: every device of the fleet receives it
at its next sync, and every server process enforces it from its next sync of the fleet's
devices. ``DELETE`` removes it from the document (the version stays in the registry).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest, NotFound
from crdtsync.schema import SCHEMA_MAP, StateSchema

from ..schemas import SchemaRegistry
from .common import (
    admin_fleet,
    json_response,
    read_object,
    require_admin,
)
from .keys import SERVICES

routes = web.RouteTableDef()
VERSION_RE = re.compile(r"[0-9a-f]{16}\Z")


def _shown(version: str | None, text: str | None) -> dict[str, Any]:
    """The API's view of a schema: ``{"hash": version, "schema": definition}`` (both
    ``null`` when there is none)."""
    return {"hash": version, "schema": None if text is None else json.loads(text)}


@routes.put("/v1/fleets/{fleet}/schema")
async def put_schema(request: web.Request) -> web.Response:
    """Set the fleet's state schema; returns ``{"hash", "schema"}`` (normalized)."""
    services, key = await admin_fleet(request)
    schema = StateSchema(await read_object(
        request, 'a schema is a JSON object {"unknown", "policy", "maps"}'))
    await SchemaRegistry(services.store).put(schema)  # kept before it can be in force
    await services.sync.write_shared(key, SCHEMA_MAP, schema.entry)
    return json_response(_shown(schema.version, schema.canonical.decode()))


@routes.get("/v1/fleets/{fleet}/schema")
async def get_schema(request: web.Request) -> web.Response:
    """The fleet's current schema and its version: ``{"hash", "schema"}``, both ``null``
    when the fleet has none."""
    services, key = await admin_fleet(request)
    entry = (await services.sync.read_doc(key, key)).get(SCHEMA_MAP, {})
    return json_response(_shown(entry.get("hash"), entry.get("json")))


@routes.delete("/v1/fleets/{fleet}/schema")
async def delete_schema(request: web.Request) -> web.Response:
    """Remove the fleet's schema: its devices are held to nothing from their next sync."""
    services, key = await admin_fleet(request)
    await services.sync.write_shared(key, SCHEMA_MAP, {"hash": None, "json": None})
    return web.Response(status=204)


@routes.get("/v1/schemas/{version}")
async def get_schema_version(request: web.Request) -> web.Response:
    """Any schema version ever set, by its hash: ``{"hash", "schema"}``."""
    require_admin(request)
    version = request.match_info["version"]
    if not VERSION_RE.match(version):
        raise MalformedRequest(f"{version!r} is not a schema hash (16 hex digits)")
    schema = await SchemaRegistry(request.app[SERVICES].store).get(version)
    if schema is None:
        raise NotFound(f"no schema {version}", {"schema": version})
    return json_response(_shown(schema.version, schema.canonical.decode()))
