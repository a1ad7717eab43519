"""One log record per failed request, with the fields an operator searches by.

:func:`log_failure` is called by the app's error middleware for every error answer (a
failed sync, wake or management call): one record, ``warning`` for a 4xx, ``error`` for a
5xx, with ``method``, ``path`` (without the query string), ``status``, ``code`` (the
crdtsync error code), ``device`` (the authenticated device, only when known), ``request_id``
and ``duration_ms`` as ``extra`` fields (top-level keys of ``--log-format json``). It never
holds a token, a header other than ``X-Request-Id``, or a body.

The request id is the client's ``X-Request-Id`` when it is sane (:data:`REQUEST_ID`), else
a short random one, and it goes back to the client in the error answer's ``X-Request-Id``.
It is made only when an error is answered: a successful request pays nothing for it.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A client-sent request id is kept if it matches this (bounded length and charset, so a
client cannot inject log lines or fill them); otherwise the server makes its own."""
MAX_PATH = 200
"""The longest path logged; a longer one is cut (and marked with ``...``)."""
DEVICE: web.RequestKey[str] = web.RequestKey("device", str)
"""The id of the device the request authenticated as (set by the device endpoints)."""

log = logging.getLogger("crdtsync.server")


def request_id(given: str) -> str:
    """``given`` (the client's ``X-Request-Id``) if it matches :data:`REQUEST_ID`, else 12
    random hex digits."""
    return given if REQUEST_ID.fullmatch(given) else secrets.token_hex(6)


def log_failure(request: web.Request, response: web.StreamResponse, code: str, why: str,
                started: float, exc_info: bool = False) -> web.StreamResponse:
    """Log one record for ``request``, answered by the error ``response`` (``code``, its
    reason ``why``) after starting at ``started`` (``time.monotonic()``); ``exc_info``
    attaches the exception being handled. Returns ``response`` with ``X-Request-Id``."""
    rid = request_id(request.headers.get(REQUEST_ID_HEADER, ""))
    response.headers[REQUEST_ID_HEADER] = rid
    log_error(request.method, request.path, response.status, code, why, rid,
              request.get(DEVICE), time.monotonic() - started, exc_info)
    return response


def log_error(method: str, path: str, status: int, code: str, why: str, rid: str,
              device: str | None, seconds: float, exc_info: bool = False) -> None:
    """The record of one error answer (the module docstring's fields), given after
    ``seconds``; ``device`` when the request authenticated as one."""
    path = path if len(path) <= MAX_PATH else path[:MAX_PATH] + "..."
    fields = {"method": method, "path": path, "status": status, "code": code,
              "request_id": rid, "duration_ms": round(seconds * 1000, 1)}
    if device is not None:
        fields["device"] = device
    level = logging.ERROR if status >= 500 else logging.WARNING
    who = f"device {device}, " if device is not None else ""
    log.log(level, "%s %s %d %s: %s (%srequest %s, %.1f ms)", method, path, status, code,
            why, who, rid, fields["duration_ms"], extra=fields, exc_info=exc_info)
