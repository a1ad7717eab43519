"""Errors as the client reads them: a msgpack frame on ``/v1/sync`` and
``/v1/sync/batch``, JSON elsewhere."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from crdtsync.errors import CrdtsyncError
from crdtsync.protocol import BATCH_PATH, MEDIA_TYPE, SYNC_PATH, encode_error


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
