"""The plain device sync, served without aiohttp's per-request machinery (issue 17).

aiohttp costs about 350,000 instructions per connection above a bare asyncio protocol (a
task per connection and one per request, a request and a response object, header
multidicts, the middleware chain): in a reconnect storm, where every device opens a
connection for one sync, that was a fifth of the server's work per reconnect. This module
serves the common case itself, on the connection's own protocol (``deadlines._Guard``):

- a request that :func:`plain_sync` accepts (``POST /v1/sync HTTP/1.1``, a bearer token,
  a ``Content-Length`` within ``max_body``, no ``Transfer-Encoding``, ``Expect`` or
  ``Upgrade``, a Content-Type and Content-Encoding the sync handler takes, every header once,
  and the whole body already received with the head) is authenticated, decoded and synced
  by the same functions as the aiohttp handler (``api/sync.py``), and its ``200`` answer
  written with the same headers;
- a plain sync that fails is answered as the app's error middleware answers it (the same
  typed frame and status, ``X-Request-Id``, one log record, the same metrics:
  ``errors.answered``, ``requestlog.log_error``);
- anything else goes to aiohttp with the bytes as received: the connection's aiohttp
  protocol is made then and serves it, and the rest of the connection, exactly as before.
  A request whose body has not arrived with its head goes to aiohttp too: the token is
  checked before the body is waited for, and the body deadline answers ``408``, as always.

The answer of a plain sync is written when it is ready; a connection keeps serving plain
syncs in order (bytes that arrive meanwhile wait in its buffer). An idle kept-alive
connection is closed after ``deadlines.KEEPALIVE`` seconds, as aiohttp closes its own. On
shutdown, the syncs being served finish and are answered before the services close, and the
connections aiohttp does not know are closed (``HeadDeadline.shutdown``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time

from crdtsync.errors import CrdtsyncError
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, encode_error

from ..auth import authenticate_device
from ..core import Services
from ..metrics import SyncTally
from . import sync as handler
from .body import ACCEPT_ENCODING, BEST_ENCODING, decodable, decode_body
from .errors import answered
from .keys import METRICS, SERVICES
from .requestlog import log_error, request_id
from .sync import ACCEPTED_TYPES

if TYPE_CHECKING:
    from .deadlines import _Guard

MAX_HEAD = 8190
"""Bytes of a request head served here at most (aiohttp's own line limit); a longer head,
or one still incomplete at this size, goes to aiohttp."""
REQUEST_LINE = f"POST {SYNC_PATH} HTTP/1.1\r\n".encode()
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*\r\n)*")
"""Header lines as RFC 9110 spells them (a token, a colon, a value without CR or LF)."""
_CONNECTION = {b"close": True, b"keep-alive": False}
_SKIP = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_TYPES = frozenset(t.encode() for t in ACCEPTED_TYPES)
_MEDIA_TYPE = MEDIA_TYPE.encode()


@dataclass(slots=True)
class PlainSync:
    """A complete plain sync request as :func:`plain_sync` read it."""

    size: int
    """Its bytes in the buffer, head and body."""
    token: str
    encoding: str
    """Content-Encoding, lower case (``identity`` when absent)."""
    length: int
    """Content-Length: the body's bytes as sent."""
    close: bool
    """The client asked for ``Connection: close``."""
    request_id: str = ""
    """The client's ``X-Request-Id`` (only used in an error answer)."""


MORE = "more"
"""What :func:`plain_sync` says of a buffer that may still become a plain sync's head."""


def plain_sync(buffer: bytes, max_body: int) -> PlainSync | str | None:
    """The plain sync request at the start of ``buffer`` (module docstring), :data:`MORE`
    when its head may still be coming, ``None`` when aiohttp must serve what is there."""
    if not buffer.startswith(REQUEST_LINE):
        return MORE if REQUEST_LINE.startswith(buffer) else None
    end = buffer.find(b"\r\n\r\n", len(REQUEST_LINE) - 2, MAX_HEAD + 4)
    if end < 0:
        return MORE if len(buffer) <= MAX_HEAD else None
    headers = _headers(buffer[len(REQUEST_LINE):end + 2])
    if headers is None or not _SKIP.isdisjoint(headers):
        return None
    length, token = headers.get(b"content-length", b""), _bearer(headers)
    encoding = headers.get(b"content-encoding", b"identity").lower().decode("latin-1")
    close = _CONNECTION.get(headers.get(b"connection", b"keep-alive").lower())
    kind = headers.get(b"content-type")
    if (not length.isdigit() or len(length) > 18 or token is None or close is None
            or not decodable(encoding) or (kind is not None and kind not in _TYPES)):
        return None
    size = end + 4 + int(length)
    if int(length) > max_body or len(buffer) < size:
        return None
    return PlainSync(size, token, encoding, int(length), close,
                     headers.get(b"x-request-id", b"").decode("latin-1"))


def _headers(block: bytes) -> dict[bytes, bytes] | None:
    """``{lower-case name: value}`` of a head's header lines (each ending in CRLF); ``None``
    for anything but one well-formed line per name (aiohttp decides about the rest)."""
    if not _FIELDS.fullmatch(block):
        return None
    lines = block.split(b"\r\n")
    lines.pop()  # after the last CRLF
    out = {}
    for line in lines:
        name, _, value = line.partition(b":")
        out[name.lower()] = value.strip(b" \t")
    return out if len(out) == len(lines) else None


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    token = token.strip(b" \t")
    if scheme.lower() != b"bearer" or not token or not token.isascii():
        return None
    return token.decode("ascii")


class FastSync:
    """Serves plain syncs for the connections of one app (``create_app`` makes one; the
    app's :class:`~.deadlines.HeadDeadline` hands it each connection's bytes)."""

    def __init__(self, app: web.Application, headers: Mapping[str, str] | None = None
                 ) -> None:
        self._app = app
        self._extra = "".join(f"{name}: {value}\r\n"
                              for name, value in (headers or {}).items()).encode("latin-1")
        """Headers every answer carries besides its own (the app's ``on_response_prepare``
        hooks add them to aiohttp's)."""
        self._parts: tuple[Services, SyncTally] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self.closing = False

    def received(self, guard: _Guard) -> None:
        """Serve what ``guard`` buffered: a plain sync, or hand it over to aiohttp."""
        parts = self._parts or self._started()
        if parts is None or self.closing:
            guard.delegate()
            return
        found = plain_sync(guard.buffer, parts[0].config.max_body)
        if found is None:
            guard.delegate()
        elif found is not MORE:
            assert isinstance(found, PlainSync)
            body = guard.take(found.size)[found.size - found.length:]
            task = asyncio.get_running_loop().create_task(
                self._serve(guard, found, body, *parts))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    def _started(self) -> tuple[Services, SyncTally] | None:
        """The services and the sync metrics, once the app has started them."""
        if SERVICES in self._app and METRICS in self._app:
            self._parts = (self._app[SERVICES], self._app[METRICS].syncs)
        return self._parts

    async def _serve(self, guard: _Guard, request: PlainSync, body: bytes,
                     services: Services, tally: SyncTally) -> None:
        started = time.perf_counter()
        device: str | None = None
        try:
            record = await authenticate_device(services.store, request.token)
            device = record.id
            # Looked up at each call, as the handler's: one seam for both paths (tests).
            answer = await handler.run_sync(services, record, decode_body(
                body, request.encoding, services.config.max_body))
        except BaseException as exc:
            tally.failed(exc)
            how = answered(exc)
            if how is None:  # cancelled (the loop is going down): no answer
                guard.abort()
                raise
            guard.answer(self._error(request, device, started, *how), request.close)
            return
        tally.served(request.length, len(answer), time.perf_counter() - started)
        guard.answer(self._head(request, 200, len(answer)) + answer, request.close)

    def _error(self, request: PlainSync, device: str | None, started: float,
               error: CrdtsyncError, code: str, why: str, trace: bool) -> bytes:
        """The error answer of a plain sync, logged: as ``error_middleware``'s."""
        frame, rid = encode_error(error), request_id(request.request_id)
        log_error("POST", SYNC_PATH, error.status, code, why, rid, device,
                  time.perf_counter() - started, trace)
        return self._head(request, error.status, len(frame),
                          f"X-Request-Id: {rid}\r\n".encode()) + frame

    def _head(self, request: PlainSync, status: int, length: int, more: bytes = b""
              ) -> bytes:
        """The status line and headers of an answer, as the aiohttp handler's."""
        accept = (b"" if status != 200 or request.encoding in ("identity", BEST_ENCODING)
                  else f"Accept-Encoding: {ACCEPT_ENCODING}\r\n".encode())
        return b"".join((
            b"HTTP/1.1 %d %s\r\nServer: crdtsync\r\n" % (
                status, HTTPStatus(status).phrase.encode()),
            accept, b"Content-Type: ", _MEDIA_TYPE, b"\r\n", more, self._extra,
            b"Content-Length: %d\r\nDate: %s\r\n" % (
                length, rfc822_formatted_time().encode()),
            b"Connection: close\r\n\r\n" if request.close else b"\r\n"))

    async def drain(self) -> None:
        """From now on hand every connection to aiohttp, and wait for the plain syncs being
        served to be answered."""
        self.closing = True
        while self._serving:
            await asyncio.wait(set(self._serving))
