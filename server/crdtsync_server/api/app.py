"""The aiohttp application of the reference sync server: routes, lifecycle, errors.

``create_app(config)`` builds the app; its ``cleanup_ctx`` opens the server core
(:func:`crdtsync_server.core.open_services`, with the HTTP executor of proxied requests) and
closes it on shutdown. Handlers are thin adapters in this package. Every error leaves as a
typed frame: msgpack on ``/v1/sync`` (devices), JSON elsewhere (management API), with the
HTTP status of its class (crdtsync.errors).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from crdtsync.errors import BodyTooLarge, CrdtsyncError, NotFound, RequestError

from ..config import ServerConfig
from ..core import open_services
from ..metrics import ProcessMetrics
from ..proxied.executor import RouteExecutor
from ..store import Store
from . import (
    batch,
    console,
    devices,
    downlink,
    env,
    feed,
    files,
    fleets,
    health,
    metrics,
    schemas,
    sinks,
    sync,
    templates,
    wake,
)
from .deadlines import HeadDeadline
from .errors import answered, error_response
from .fastsync import FastSync
from .keys import HEADS, METRICS, SERVICES
from .requestlog import log_failure

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTE_TABLES = (sync, batch, wake, devices, downlink, env, templates, schemas, fleets, feed,
                sinks, files, metrics, console, health)
"""The handler modules; each has a ``routes`` table."""


def create_app(config: ServerConfig, store: Store | None = None) -> web.Application:
    """Build the server app. ``store`` overrides ``config.db`` (tests, simulations)."""
    heads = HeadDeadline(config.header_timeout)
    worker = None if config.worker is None else f"{config.worker}/{os.getpid()}"
    app = web.Application(client_max_size=config.max_body,
                          middlewares=[heads.middleware, unread_body_middleware,
                                       error_middleware],
                          handler_args={"auto_decompress": False})
    app[HEADS] = heads
    for module in ROUTE_TABLES:
        app.add_routes(module.routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with open_services(config, executor=RouteExecutor(), store=store) as services:
            app[SERVICES] = services
            app[METRICS] = ProcessMetrics(services)
            yield

    async def release_waiters(app: web.Application) -> None:
        if SERVICES in app:
            app[SERVICES].release_waiters()

    app.cleanup_ctx.append(lifecycle)
    if config.plain_syncs:
        heads.fast = FastSync(app, {} if worker is None else {WORKER_HEADER: worker})

    async def close_connections(app: web.Application) -> None:
        await heads.shutdown()

    app.on_shutdown.append(close_connections)
    app.on_shutdown.append(release_waiters)
    if worker is not None:
        app.on_response_prepare.append(worker_header(worker))
    return app


WORKER_HEADER = "X-Crdtsync-Worker"
"""Names the worker process that answered, as ``<number>/<pid>``; sent only under
``crdtsync serve --workers`` (operators and tests see how connections spread)."""


def worker_header(value: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` hook that adds :data:`WORKER_HEADER` (``value``) to every
    answer (``FastSync`` adds it to the answers it writes)."""

    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = value

    return tag


_HTTP_CODES: dict[int, type[CrdtsyncError]] = {404: NotFound, 413: BodyTooLarge}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a typed error frame, logged once (:mod:`.requestlog`); the
    server keeps serving. A success costs one clock read here."""
    started = time.monotonic()
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = _HTTP_CODES.get(exc.status, RequestError)
        error = cls(exc.reason, {"http": exc.status})
        response = error_response(request, error)
        response.set_status(exc.status if exc.status != 400 else error.status)
        if "Content-Range" in exc.headers:  # a 416 says how large the resource is
            response.headers["Content-Range"] = exc.headers["Content-Range"]
        return log_failure(request, response, error.code, error.message, started)
    except BaseException as exc:
        # Exception, and a Rust panic from pycrdt (a BaseException): answer, keep serving.
        how = answered(exc)
        if how is None:
            raise
        sent, code, why, trace = how
        return log_failure(request, error_response(request, sent), code, why, started,
                           exc_info=trace)


@web.middleware
async def unread_body_middleware(request: web.Request, handler: Handler
                                 ) -> web.StreamResponse:
    """Close the connection after answering a request whose body was not read to its end
    (refused before reading: a wrong token, a timeout, an oversized Content-Length). The
    rest of that body is never read into memory: aiohttp only drains and drops it for at
    most its ``lingering_time`` (10 s), so that the client gets the answer, not a reset."""
    response = await handler(request)
    if not request.content.is_eof():
        response.force_close()
    return response
