"""Errors as the client reads them: a msgpack frame on ``/v1/sync`` and
``/v1/sync/batch``, JSON elsewhere."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from crdtsync.crdt import rejects_input
from crdtsync.errors import CrdtsyncError, ServerError
from crdtsync.protocol import BATCH_PATH, MEDIA_TYPE, SYNC_PATH, encode_error

INTERNAL = "internal error; nothing was committed"
"""What a client is told of a failure that is not its request's fault."""


def error_response(request: web.Request, error: CrdtsyncError) -> web.Response:
    """Render ``error`` as a frame in the format the endpoint speaks."""
    if request.path in (SYNC_PATH, BATCH_PATH):
        return web.Response(status=error.status, body=encode_error(error),
                            content_type=MEDIA_TYPE, headers={"Server": "crdtsync"})
    return web.Response(status=error.status, text=json.dumps(error_json(error)),
                        content_type="application/json", headers=_retry_after(error))


def _retry_after(error: CrdtsyncError) -> dict[str, str]:
    """``Retry-After`` (seconds) for an error that says when to come back
    (``detail.retry_after``, e.g. ``429 too_many_requests``)."""
    seconds = error.detail.get("retry_after")
    return {"Retry-After": str(seconds)} if isinstance(seconds, int) else {}


def error_json(error: CrdtsyncError) -> dict[str, Any]:
    """The JSON body of an error answer of the management API."""
    return {"error": {"code": error.code, "message": error.message, "detail": error.detail,
                      "retryable": error.retryable}}


def answered(exc: BaseException) -> tuple[CrdtsyncError, str, str, bool] | None:
    """How a failure of a handler is answered: ``(error sent, code logged, reason logged,
    log the traceback)``; ``None`` for what must propagate (a cancellation, an exit). A
    typed client error goes as it is; a local one (status 0: ``StoreError``...) and any
    other exception, a Rust panic from pycrdt included, as ``500 internal``."""
    if isinstance(exc, CrdtsyncError):
        if exc.status == 0:
            return ServerError(INTERNAL), exc.code, exc.message, False
        return exc, exc.code, exc.message, False
    if not isinstance(exc, Exception) and not rejects_input(exc):
        return None
    return ServerError(INTERNAL), ServerError.code, "unexpected error", True
