"""``POST /v1/sync``: authenticate the device, decode, run the sync, encode the answer."""

from __future__ import annotations

from aiohttp import web

from crdtsync.errors import Unauthorized, UnsupportedEncoding
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, decode_request, encode_response

from .app import ACCEPT_ENCODING, BEST_ENCODING, SERVICES, Services, read_body
from .auth import UNAUTHORIZED_DEVICE, authenticate_device, bearer
from .store import DeviceRecord

routes = web.RouteTableDef()

ACCEPTED_TYPES = (MEDIA_TYPE, "application/msgpack", "application/x-msgpack")
"""Content-Types of a sync request, best first (as ``detail.accepted`` lists them)."""


@routes.post(SYNC_PATH)
async def sync(request: web.Request) -> web.Response:
    """One sync round trip; see docs/protocol.md. The device is authenticated from the
    headers alone (its token), before any of the body is read or decompressed: a client
    without a valid token costs no body memory and no decompression. A request without
    Content-Type is taken as ``MEDIA_TYPE`` (the reference client sends none: every header
    byte is paid on every sync); any other type is refused."""
    services = request.app[SERVICES]
    device = await authenticate_device(services.store, bearer(request))
    if "Content-Type" in request.headers and request.content_type not in ACCEPTED_TYPES:
        raise UnsupportedEncoding(f"Content-Type must be {MEDIA_TYPE}",
                                  {"accepted": list(ACCEPTED_TYPES)})
    body = await read_body(request)
    return web.Response(body=await run_sync(services, device, body),
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
    """Authenticate, decode and run one sync request body; return the encoded response.

    The transport-free core of ``POST /v1/sync`` (the simulator in ``crdtsync.testing`` calls
    it directly). Raises a :class:`~crdtsync.errors.CrdtsyncError` with nothing committed.
    """
    return await run_sync(services, await authenticate_device(services.store, token), body)


async def run_sync(services: Services, device: DeviceRecord, body: bytes) -> bytes:
    """Decode and run a sync request body of the authenticated ``device``.

    The envelope's ``dev`` must name that device, else :class:`Unauthorized` with the same
    answer as a wrong token (a token is good for its own device only; ids are not
    disclosed)."""
    sync_request = decode_request(body, services.config.limits)
    if sync_request.device != device.id:
        raise Unauthorized(UNAUTHORIZED_DEVICE)
    sync_request = await services.templates.expand(sync_request, services.config.limits)
    response = await services.sync.sync(device, sync_request)
    return encode_response(response)
