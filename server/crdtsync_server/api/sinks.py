"""Management API of downstream sinks (admin token): configure sinks, watch their delivery,
inspect and retry their dead letters. See docs/downstream.md."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from crdtsync.errors import MalformedRequest

from ..core import Services
from ..sinks.config import check_options, parse_sink, spec_json
from ..sinks.manager import start_cursor
from ..store.sinks import SinkRecord
from ..validation import keep_redacted
from .common import (
    found,
    int_param,
    json_response,
    limit_param,
    name_param,
    not_from_file,
    read_json,
    require_admin,
)
from .keys import SERVICES

routes = web.RouteTableDef()


def sink_json(record: SinkRecord, head: int, state: str) -> dict[str, Any]:
    """A sink as the API shows it: its configuration (secrets redacted) and its status."""
    return {
        "name": record.name, **spec_json(record.config, record.paused),
        "origin": record.origin, "created": record.created, "updated": record.updated,
        "status": {
            "state": state, "cursor": str(record.cursor), "head": str(head),
            "lag": max(0, head - record.cursor), "delivered": record.delivered,
            "failures": record.failures, "consecutive_failures": record.consecutive_failures,
            "dead_letters": record.dead_letters, "dead_lettered": record.dead_lettered,
            "last_error": record.last_error, "last_error_at": record.last_error_at,
            "last_delivered_at": record.last_delivered_at,
            "owner": record.owner, "lease_until": record.lease_until,
        },
    }


async def _show(services: Services, record: SinkRecord, status: int = 200) -> web.Response:
    head = await services.store.feed_head()
    return json_response(sink_json(record, head, services.sinks.state(record)), status=status)


async def _record(services: Services, name: str) -> SinkRecord:
    return found(await services.store.get_sink(name), "sink", name)


@routes.get("/v1/sinks")
async def list_sinks(request: web.Request) -> web.Response:
    """Every sink with its status, in name order."""
    require_admin(request)
    services = request.app[SERVICES]
    head = await services.store.feed_head()
    return json_response({"sinks": [sink_json(r, head, services.sinks.state(r))
                                    for r in await services.store.list_sinks()]})


@routes.get("/v1/sinks/{name}")
async def get_sink(request: web.Request) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    return await _show(services, await _record(services, name_param(request, "name")))


@routes.put("/v1/sinks/{name}")
async def put_sink(request: web.Request) -> web.Response:
    """Create or reconfigure a sink (its cursor, counters and dead letters stay); its runner
    restarts with the new configuration. A ``"***"`` option keeps the stored value."""
    require_admin(request)
    services = request.app[SERVICES]
    name = name_param(request, "name")
    not_from_file("sink", name, services.sinks.file_sinks)
    spec = parse_sink(name, await read_json(request))
    old = await services.store.get_sink(name)
    config = spec.config if old is None else dataclasses.replace(
        spec.config, options=keep_redacted(spec.config.options, old.config.options))
    check_options(config)
    record = await services.store.put_sink(config, services.config.clock(), paused=spec.paused,
                                           start=await start_cursor(services.store, spec))
    await services.sinks.apply(name)
    return await _show(services, record, status=201 if old is None else 200)


@routes.delete("/v1/sinks/{name}")
async def delete_sink(request: web.Request) -> web.Response:
    """Stop the sink and forget it, with its dead letters."""
    require_admin(request)
    services = request.app[SERVICES]
    name = name_param(request, "name")
    not_from_file("sink", name, services.sinks.file_sinks)
    await services.store.delete_sink(name)
    await services.sinks.apply(name)
    return web.Response(status=204)


@routes.get("/v1/sinks/{name}/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    """The sink's dead letters in id order, paginated with ``after`` (an id) and ``limit``."""
    require_admin(request)
    services = request.app[SERVICES]
    record = await _record(services, name_param(request, "name"))
    limit = limit_param(request)
    letters = await services.store.list_dead_letters(
        record.name, int_param(request, "after", 0, 2**63 - 1), limit)
    return json_response({"dead_letters": [d.to_json() for d in letters],
                          "next": str(letters[-1].id) if len(letters) == limit else None})


@routes.post("/v1/sinks/{name}/dead-letters/retry")
async def retry_dead_letters(request: web.Request) -> web.Response:
    """Deliver dead letters again (all, or ``{"ids": [...]}``): delivered ones go, the
    others stay with their new error."""
    require_admin(request)
    services = request.app[SERVICES]
    record = await _record(services, name_param(request, "name"))
    body = await read_json(request)
    ids = None if body is None else _ids(body)
    count = await services.store.retry_dead_letters(record.name, ids)
    services.sinks.retry(record.name)
    return json_response({"retrying": count})


def _ids(body: Any) -> list[int] | None:
    if not isinstance(body, dict) or set(body) - {"ids"}:
        raise MalformedRequest('body must be {"ids": [dead letter id, ...]} or empty')
    ids = body.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
        raise MalformedRequest("ids must be a list of dead letter ids")
    return ids
