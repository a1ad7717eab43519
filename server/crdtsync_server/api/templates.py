"""Event templates per fleet and topic (admin token, JSON).

A template is stored in the fleet's shared document, map ``templates``:
``{topic: {"hash": hex, "json": canonical definition}}`` (JSON text, because a CRDT map does
not keep the order of its keys and field order is wire order), so it reaches every device at
its next sync; and in the :class:`~.template_registry.TemplateRegistry` by hash, so events
encoded with an older version still decode.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from crdtsync.errors import InvalidValue
from crdtsync.templates import Template

from .common import (
    admin_fleet,
    json_response,
    name_param,
    read_object,
)

routes = web.RouteTableDef()
TEMPLATES = "templates"


@routes.get("/v1/fleets/{fleet}/templates")
async def list_templates(request: web.Request) -> web.Response:
    """The fleet's templates: ``{topic: {"hash", "def"}}``."""
    services, key = await admin_fleet(request)
    doc = await services.sync.read_doc(key, key)
    return json_response({topic: _shown(entry)
                          for topic, entry in doc.get(TEMPLATES, {}).items()})


def _shown(entry: dict[str, Any]) -> dict[str, Any]:
    return {"hash": entry["hash"], "def": json.loads(entry["json"])}


@routes.put("/v1/fleets/{fleet}/templates/{topic}")
async def put_template(request: web.Request) -> web.Response:
    """Set the template of a topic (``{field: type}``); returns ``{"hash", "def"}``."""
    services, key = await admin_fleet(request)
    template = Template(await read_object(request, "a template is a JSON object {field: type}"))
    limit = services.config.limits.max_event_body
    if template.min_body_size > limit:  # no event could ever be sent with it
        raise InvalidValue(f"every event of this template decodes to at least "
                           f"{template.min_body_size} bytes (max {limit})",
                           {"min_body_size": template.min_body_size, "max_event_body": limit})
    await services.templates.put(template)
    entry = {"hash": template.hash.hex(), "json": template.canonical.decode()}
    await services.sync.write_shared(key, TEMPLATES, {name_param(request, "topic"): entry})
    return json_response(_shown(entry))


@routes.delete("/v1/fleets/{fleet}/templates/{topic}")
async def delete_template(request: web.Request) -> web.Response:
    """Stop templating a topic (queued events encoded with it still decode)."""
    services, key = await admin_fleet(request)
    await services.sync.write_shared(key, TEMPLATES, {name_param(request, "topic"): None})
    return web.Response(status=204)
