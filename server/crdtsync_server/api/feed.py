"""The change feed over HTTP (admin token): a long-polled page, a Server-Sent Events stream,
and the state projection. See docs/protocol.md, "Change feed"."""

from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext

from aiohttp import web

from crdtsync.errors import CrdtsyncError, CursorExpired, MalformedRequest

from ..feed import check_cursor, read_feed
from ..store.feed import FEED_KINDS, FeedFilter, FeedItem
from .common import (
    MAX_PAGE,
    int_param,
    json_response,
    limit_param,
    require_admin,
)
from .errors import error_json
from .input import parse_json, parse_uint
from .keys import METRICS, SERVICES

routes = web.RouteTableDef()

MAX_CURSOR = 2**63 - 1
MAX_WAIT_S = 60
HEARTBEAT_S = 15.0
"""An SSE comment line is sent this often when nothing happens (keeps proxies from closing
the stream and lets the server notice a client that left)."""


def feed_filter(request: web.Request) -> FeedFilter:
    """``device``, ``fleet``, ``topic`` and ``kind`` query parameters (all optional; ``kind``
    one kind or several separated by commas)."""
    values = {name: request.query.get(name) or None
              for name in ("device", "fleet", "topic", "kind")}
    try:
        return FeedFilter(**values)
    except ValueError as exc:
        raise MalformedRequest(f"kind must be one or more of {list(FEED_KINDS)}, separated "
                               "by commas") from exc


def cursor_value(raw: str | None, name: str) -> int:
    """A feed cursor parameter (0 when absent or empty); :class:`MalformedRequest` unless
    it is a decimal integer up to :data:`MAX_CURSOR`."""
    if raw is None or raw == "":
        return 0
    value = parse_uint(raw, 0, MAX_CURSOR)
    if value is None:
        raise MalformedRequest(f"{name} must be a feed cursor (a decimal integer)")
    return value


@routes.get("/v1/feed")
async def get_feed(request: web.Request) -> web.Response:
    """Items after ``after`` in cursor order; ``wait=S`` long-polls up to S seconds (max 60)
    when there are none yet. ``next`` is the cursor to resume from."""
    require_admin(request)
    services = request.app[SERVICES]
    after = cursor_value(request.query.get("after"), "after")
    wait = int_param(request, "wait", 0, MAX_WAIT_S)
    with request.app[METRICS].feed_polls if wait else nullcontext():
        items = await read_feed(services.store, services.feed, after, limit_param(request),
                                feed_filter(request), wait)
    return json_response({"items": [i.to_json() for i in items],
                          "next": str(items[-1].cursor if items else after)})


def sse_frame(item: FeedItem) -> bytes:
    data = json.dumps(item.to_json(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {item.cursor}\nevent: {item.kind}\ndata: {data}\n\n".encode()


@routes.get("/v1/feed/stream")
async def stream_feed(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every item after ``Last-Event-ID`` (or ``after``), then new ones
    as they are stored, until the client leaves. Each event's ``id`` is its cursor."""
    require_admin(request)
    services = request.app[SERVICES]
    after = cursor_value(request.headers.get("Last-Event-ID") or request.query.get("after"),
                         "Last-Event-ID")
    where = feed_filter(request)
    await check_cursor(services.store, after)  # a 410 while an HTTP status can still say it
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    try:
        with request.app[METRICS].feed_streams:
            await _stream(request, response, after, where)
    except CursorExpired as exc:  # the stream fell behind a purge: say so, then end it
        await response.write(error_frame(exc))
    except ConnectionError:
        pass  # the client left
    return response


async def _stream(request: web.Request, response: web.StreamResponse, after: int,
                  where: FeedFilter) -> None:
    """Write the items after ``after`` as they come, and a comment line every
    :data:`HEARTBEAT_S` seconds without any, until the server stops."""
    services = request.app[SERVICES]
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    while not services.feed.closed:
        items = await read_feed(services.store, services.feed, after, MAX_PAGE, where,
                                HEARTBEAT_S)
        for item in items:
            await response.write(sse_frame(item))
            after = item.cursor
        if items:
            last_write = loop.time()
        elif loop.time() - last_write >= HEARTBEAT_S:
            await response.write(b": keep-alive\n\n")
            last_write = loop.time()


def error_frame(error: CrdtsyncError) -> bytes:
    """An SSE ``error`` event with the error's JSON (as the body of an error answer)."""
    data = json.dumps(error_json(error), separators=(",", ":"), ensure_ascii=False)
    return f"event: error\ndata: {data}\n\n".encode()


def projection_token(raw: str) -> tuple[str, ...]:
    """The ``after`` token of a projection page: ``()`` when empty, else the JSON array of
    four strings a page's ``next`` holds; :class:`MalformedRequest` for anything else."""
    if not raw:
        return ()
    try:
        after = parse_json(raw, "after")
    except CrdtsyncError as exc:
        raise MalformedRequest("after must be the next token of a previous page") from exc
    if not (isinstance(after, list) and len(after) == 4
            and all(isinstance(p, str) for p in after)):
        raise MalformedRequest("after must be the next token of a previous page")
    return tuple(after)


@routes.get("/v1/projection")
async def get_projection(request: web.Request) -> web.Response:
    """The current-state projection: one row per device, document, map and key, in that
    order; ``after`` is the ``next`` token of the previous page."""
    require_admin(request)
    services = request.app[SERVICES]
    after = projection_token(request.query.get("after") or "")
    rows = await services.store.read_projection(
        request.query.get("device") or None, after,
        limit_param(request, 1000))
    last = rows[-1] if rows else None
    return json_response({
        "rows": [r.to_json() for r in rows],
        "next": json.dumps([last.device, last.doc, last.map, last.key]) if last else None})
