"""``POST /v1/sync/batch``: a gateway's many device syncs in one request (docs/protocol.md 18).

The request is let in by one device token in its headers, checked before a byte of the
body is read (a client without a credential costs no body memory); the body is bounded like
a sync's (``max_body``, as sent and decompressed) and its entry count by
``limits.max_batch_entries`` before an entry is read. Then each entry is a sync of its own
(:mod:`crdtsync_server.batch`): authenticated by its own token, answered by its own response
or error frame, in order.
"""

from __future__ import annotations

from aiohttp import web

from crdtsync.errors import Unauthorized, UnsupportedEncoding
from crdtsync.protocol import (
    BATCH_PATH,
    MEDIA_TYPE,
    decode_batch_request,
    encode_batch_response,
)
from crdtsync.transport import COMPRESS_THRESHOLD, compress

from ..auth import UNAUTHORIZED_DEVICE, hash_token
from ..batch import EntryOutcome, process_batch
from ..metrics import SyncTally
from .body import accepted_encodings, read_body
from .common import bearer
from .keys import METRICS, SERVICES
from .sync import ACCEPTED_TYPES, response_headers

routes = web.RouteTableDef()


@routes.post(BATCH_PATH)
async def batch(request: web.Request) -> web.Response:
    """Many devices' syncs in one round trip. Refused whole only for what concerns the
    request itself (no valid token in its header, its Content-Type or Content-Encoding, its
    size, its framing, its entry count); everything else is answered per entry."""
    services = request.app[SERVICES]
    metrics = request.app[METRICS]
    try:
        # Any provisioned device's token lets the request in (a disabled one too: its own
        # entry is refused like any other); it grants nothing else.
        gate = await services.store.device_by_token(hash_token(bearer(request)))
        if gate is None:
            raise Unauthorized(UNAUTHORIZED_DEVICE)
        if "Content-Type" in request.headers and request.content_type not in ACCEPTED_TYPES:
            raise UnsupportedEncoding(f"Content-Type must be {MEDIA_TYPE}",
                                      {"accepted": list(ACCEPTED_TYPES)})
        entries = decode_batch_request(await read_body(request), services.config.limits)
        outcomes = await process_batch(services, entries)
    except BaseException as exc:
        metrics.batches.failed(exc)
        raise
    metrics.batches.served(len(outcomes))
    _tally(metrics.syncs, entries_sizes=[len(e.body) for e in entries], outcomes=outcomes)
    body = encode_batch_response([outcome.answer for outcome in outcomes])
    headers = response_headers(request)
    coding = answer_encoding(request.headers.get("Accept-Encoding", ""))
    if coding is not None and len(body) >= COMPRESS_THRESHOLD:
        packed = compress(body, coding)
        if len(packed) < len(body):
            body, headers["Content-Encoding"] = packed, coding
    return web.Response(body=body, content_type=MEDIA_TYPE, headers=headers)


def _tally(tally: SyncTally, *, entries_sizes: list[int],
           outcomes: list[EntryOutcome]) -> None:
    """Count each entry as a sync: its body as received (uncompressed: a batch is
    compressed whole), its answer, its time."""
    for size, outcome in zip(entries_sizes, outcomes, strict=True):
        if outcome.error is None:
            tally.served(size, len(outcome.answer.body), outcome.seconds)
        else:
            tally.failed(outcome.error)


def answer_encoding(accept: str) -> str | None:
    """How to compress a batch answer for a client whose ``Accept-Encoding`` is ``accept``:
    ``zstd`` or ``deflate`` (the server's preference among those the client lists with a
    non-zero weight), else ``None`` (identity)."""
    offered = set()
    for part in accept.split(","):
        name, _, params = part.strip().lower().partition(";")
        if params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            offered.add(name.strip())
    return next((c for c in accepted_encodings() if c in offered and c in ("zstd", "deflate")),
                None)
