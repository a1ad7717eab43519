"""``POST /v1/sync``: authenticate the device, decode, run the sync, encode the answer."""

from __future__ import annotations

from aiohttp import web

from crdtsync.errors import Unauthorized, UnsupportedEncoding
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, decode_request, encode_response

from .app import ACCEPT_ENCODING, BEST_ENCODING, SERVICES, Services, read_body
from .auth import bearer, token_matches

routes = web.RouteTableDef()

ACCEPTED_TYPES = (MEDIA_TYPE, "application/msgpack", "application/x-msgpack")
"""Content-Types of a sync request, best first (as ``detail.accepted`` lists them)."""


@routes.post(SYNC_PATH)
async def sync(request: web.Request) -> web.Response:
    """One sync round trip; see docs/protocol.md. A request without Content-Type is taken
    as ``MEDIA_TYPE`` (the reference client sends none: every header byte is paid on every
    sync); any other type is refused."""
    services = request.app[SERVICES]
    token = bearer(request)
    if "Content-Type" in request.headers and request.content_type not in ACCEPTED_TYPES:
        raise UnsupportedEncoding(f"Content-Type must be {MEDIA_TYPE}",
                                  {"accepted": list(ACCEPTED_TYPES)})
    body = await read_body(request)
    return web.Response(body=await process_sync(services, token, body),
                        content_type=MEDIA_TYPE, headers=response_headers(request))


def response_headers(request: web.Request) -> dict[str, str]:
    """A short ``Server`` header, and ``Accept-Encoding`` (RFC 7694) only for a client that
    compressed with something other than the best encoding this server takes: every header
    byte is paid on every sync."""
    headers = {"Server": "crdtsync"}
    used = request.headers.get("Content-Encoding", "identity").strip().lower()
    if used not in ("identity", BEST_ENCODING):
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    return headers


async def process_sync(services: Services, token: str, body: bytes) -> bytes:
    """Decode, authenticate and run one sync request body; return the encoded response.

    The transport-free core of ``POST /v1/sync`` (the simulator in ``crdtsync.testing`` calls
    it directly). Raises a :class:`~crdtsync.errors.CrdtsyncError` with nothing committed.
    """
    sync_request = decode_request(body, services.config.limits)
    device = await services.store.get_device(sync_request.device)
    if device is None or not token_matches(token, device.token_hash):
        # Same answer for an unknown device and a wrong token: ids are not disclosed.
        raise Unauthorized("unknown device or wrong token")
    sync_request = await services.templates.expand(sync_request, services.config.limits)
    response = await services.sync.sync(device, sync_request)
    return encode_response(response)
