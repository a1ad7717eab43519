"""``GET /healthz`` and ``GET /readyz``: probes for an orchestrator or a load balancer.
Unauthenticated, so they tell nothing but the answer: no version, path, count or error text
(a store's error message may name the database file; it goes to the log only)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from crdtsync.errors import Unavailable

from .common import json_response
from .errors import error_response
from .keys import SERVICES

log = logging.getLogger("crdtsync.server")

routes = web.RouteTableDef()

READY_TIMEOUT = 2.0
"""Seconds the database has to answer the readiness query."""
READY_PROBE = "readyz"
"""The settings key read by the readiness query (it need not exist)."""


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: 200 whenever the process answers at all (nothing else is checked)."""
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: 200 once the database answers a trivial read within :data:`READY_TIMEOUT`;
    503 ``unavailable`` while it does not, or while the server is stopping."""
    services = request.app.get(SERVICES)
    if services is None or services.feed.closed:
        return error_response(request, Unavailable("the server is not serving"))
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await services.store.get_setting(READY_PROBE)
    except Exception as exc:  # any failure means "not ready"; the answer says no more
        log.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
        return error_response(request, Unavailable("the database does not answer"))
    return json_response({"status": "ready"})
