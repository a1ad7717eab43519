"""``GET /v1/wake``: a device's live channel (docs/protocol.md section 14a), answered by the
process's :class:`~crdtsync_server.wake.WakeHub`. Authenticated like a sync, from the headers
alone; the answer is a small JSON object."""

from __future__ import annotations

import re

from aiohttp import web

from crdtsync.errors import MalformedRequest
from crdtsync.protocol import MAX_WAKE_WAIT, WAKE_PATH, encode_wake

from ..auth import authenticate_device
from .common import bearer, int_param
from .keys import SERVICES
from .requestlog import DEVICE

routes = web.RouteTableDef()

DEFAULT_WAIT = 50.0
"""Seconds a request without ``wait`` asks to be held (the server holds at most its own
``wake_hold``)."""
MAX_WAIT = MAX_WAKE_WAIT
_SECONDS_RE = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,3})?")


@routes.get(WAKE_PATH)
async def wake(request: web.Request) -> web.Response:
    """Hold the request until something for the device is committed after cursor
    ``after`` (``wake: true``) or the hold ends (``wake: false``); without ``after``,
    answer at once with the cursor to start from."""
    services = request.app[SERVICES]
    device = await authenticate_device(services.store, bearer(request))
    request[DEVICE] = device.id  # for the log of a failure (requestlog)
    after = (int_param(request, "after", 0, 2**63 - 1)
             if request.query.get("after", "") != "" else None)
    signal = await services.wakes.wait(device, after, _seconds(request, "wait"))
    return web.Response(body=encode_wake(signal), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _seconds(request: web.Request, name: str) -> float:
    """Query parameter ``name``: decimal seconds 0..``MAX_WAIT`` (at most 3 decimals)."""
    raw = request.query.get(name, "")
    if raw == "":
        return DEFAULT_WAIT
    if not _SECONDS_RE.fullmatch(raw) or float(raw) > MAX_WAIT:
        raise MalformedRequest(
            f"query parameter {name!r} must be decimal seconds 0..{MAX_WAIT}")
    return float(raw)
