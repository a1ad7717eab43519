"""``GET /v1/metrics``: the process's metrics in the Prometheus text format, written by
``prometheus_client`` from the process's own registry (``crdtsync_server.metrics``; the
series are listed in docs/operations.md). Needs the admin token: give it to the scraper as a
bearer token (``authorization`` in a Prometheus scrape config)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .common import require_admin
from .keys import METRICS

routes = web.RouteTableDef()

CONTENT_TYPE = CONTENT_TYPE_LATEST


@routes.get("/v1/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Every series: this process's counters and gauges, and what the store holds (feed,
    sinks, devices), read now."""
    require_admin(request)
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE,
                                            "Cache-Control": "no-store"})
