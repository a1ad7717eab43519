"""``POST /v1/sync``: authenticate the device, decode, run the sync, encode the answer."""

from __future__ import annotations

import time

from aiohttp import web

from crdtsync.errors import UnsupportedEncoding
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH

from ..auth import authenticate_device
from ..core import run_sync as run_sync  # re-exported: the seam both sync paths call
from .body import ACCEPT_ENCODING, BEST_ENCODING, read_body
from .common import bearer
from .keys import METRICS, SERVICES
from .requestlog import DEVICE

routes = web.RouteTableDef()

ACCEPTED_TYPES = (MEDIA_TYPE, "application/msgpack", "application/x-msgpack")
"""Content-Types of a sync request, best first (as ``detail.accepted`` lists them)."""


@routes.post(SYNC_PATH)
async def sync(request: web.Request) -> web.Response:
    """One sync round trip; see docs/protocol.md. The device is authenticated from the
    headers alone (its token), before any of the body is read or decompressed: a client
    without a valid token costs no body memory and no decompression. A request without
    Content-Type is taken as ``MEDIA_TYPE`` (the reference client sends none: every header
    byte is paid on every sync); any other type is refused. Every request is counted in the
    process's metrics (``crdtsync_sync_*``): a few additions, no lock, no lookup."""
    services = request.app[SERVICES]
    tally = request.app[METRICS].syncs
    started = time.perf_counter()
    try:
        device = await authenticate_device(services.store, bearer(request))
        request[DEVICE] = device.id  # for the log of a failure (requestlog)
        if "Content-Type" in request.headers and request.content_type not in ACCEPTED_TYPES:
            raise UnsupportedEncoding(f"Content-Type must be {MEDIA_TYPE}",
                                      {"accepted": list(ACCEPTED_TYPES)})
        body = await read_body(request)
        answer = await run_sync(services, device, body)
    except BaseException as exc:
        tally.failed(exc)
        raise
    tally.served(request.content_length or len(body), len(answer),
                 time.perf_counter() - started)
    return web.Response(body=answer, content_type=MEDIA_TYPE,
                        headers=response_headers(request))


def response_headers(request: web.Request) -> dict[str, str]:
    """A short ``Server`` header, and ``Accept-Encoding`` (RFC 7694) only for a client that
    compressed with something other than the best encoding this server takes: every header
    byte is paid on every sync."""
    headers = {"Server": "crdtsync"}
    used = request.headers.get("Content-Encoding", "identity").strip().lower()
    if used not in ("identity", BEST_ENCODING):
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    return headers
