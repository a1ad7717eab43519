"""How a device reaches the cloud: a small ``Transport`` protocol and its HTTP adapter.

A transport moves one encoded sync request and returns the encoded response; it knows nothing
of the protocol's content. Tests and simulations plug in their own (``crdtsync.testing``).
A :class:`LiveTransport` also holds the live channel, a long poll that tells the device
when to sync (docs/protocol.md 14a).
"""

from __future__ import annotations

import functools
import importlib
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp

from .errors import (
    CrdtsyncError,
    NotFound,
    RequestError,
    TooManyRequests,
    TransportError,
    UnsupportedEncoding,
)
from .protocol import SYNC_PATH, WAKE_PATH, WakeSignal, decode_error, decode_wake, wake_query

COMPRESS_THRESHOLD = 128
"""Request bodies at least this large are compressed, and sent compressed only when that
made them smaller (below about 100 bytes a compressed body never is)."""

SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
"""Headers aiohttp adds by itself that the reference client leaves out: the server needs
none of them (a sync request without ``Content-Type`` is taken as ``MEDIA_TYPE``), and every
header byte is paid on every sync."""

WAKE_GRACE = 30.0
"""Seconds a wake request may take beyond the ``wait`` it asks for before the client gives
up on it (a server that never answers, a connection silently dropped)."""

zstandard: Any
try:  # optional: `pip install crdtsync[zstd]` (imported by name: typed alike with or without it)
    zstandard = importlib.import_module("zstandard")
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None


def request_headers(token: str, encoding: str = "identity") -> dict[str, str]:
    """The headers of a sync request besides ``Host`` and ``Content-Length``: the bearer
    token, and ``Content-Encoding`` when the body is compressed."""
    headers = {"Authorization": f"Bearer {token}"}
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    return headers


class Transport(Protocol):
    """Sends one sync request body, returns the response body (``bytes``) on success.

    Raises the :mod:`crdtsync.errors` exception of an error frame, or :class:`TransportError`
    when the outcome is unknown (connection failed, reset, timed out)."""

    async def exchange(self, body: bytes) -> bytes: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LiveTransport(Transport, Protocol):
    """A :class:`Transport` that also holds the live channel: ``wake`` sends one wake
    request (``after``: the cursor of the previous answer, ``None`` on the first; ``wait``:
    seconds the server may hold it) and returns the answer. It raises like ``exchange``; it
    must not delay a concurrent ``exchange`` (a held request occupies its connection)."""

    async def wake(self, after: int | None, wait: float) -> WakeSignal: ...


class HttpTransport:
    """``POST {url}/v1/sync`` with a bearer token, over an aiohttp session, and the live
    channel ``GET {url}/v1/wake`` (a :class:`LiveTransport`).

    Pass ``session`` to share one connection pool among many devices (a gateway); the
    transport then leaves it open on ``aclose()``. Wake requests always use a session of
    their own with a single connection, so a held one never takes a connection a sync needs.
    """

    def __init__(self, url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = 30.0, compress_threshold: int = COMPRESS_THRESHOLD) -> None:
        self.base_url = url.rstrip("/")
        """The server's base URL (the file transfers, ``crdtsync/_files.py``, use it too)."""
        self.url = self.base_url + SYNC_PATH
        self.wake_url = url.rstrip("/") + WAKE_PATH
        self._wake_session: aiohttp.ClientSession | None = None
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._compress_threshold = compress_threshold
        self.encoding = "zstd" if zstandard is not None else "deflate"
        """How request bodies over the threshold are compressed: zstd when this installation
        has it, until a server without it answers ``unsupported_encoding`` (the request is
        then sent again at once with deflate) or lists what it takes (``Accept-Encoding``
        on a sync response)."""
        self.wire_bytes_up = 0
        """Request body bytes sent so far, after compression (HTTP headers not counted)."""
        self.wire_bytes_down = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def files(self) -> tuple[str, str, Callable[[], aiohttp.ClientSession]]:
        """What the device's file transfers need to reach the server on this transport's
        connections: the base URL, the token and the session (created when first used)."""
        return self.base_url, self._token, self._client

    async def exchange(self, body: bytes) -> bytes:
        try:
            return await self._post(body)
        except UnsupportedEncoding as exc:
            if self.encoding == "deflate":
                raise
            self._negotiate(", ".join(exc.detail.get("accepted", ())))
            return await self._post(body)  # nothing was applied: send it again, as deflate

    async def _post(self, body: bytes) -> bytes:
        encoding = "identity"
        if len(body) >= self._compress_threshold:
            packed = compress(body, self.encoding)
            if len(packed) < len(body):
                body, encoding = packed, self.encoding
        self.wire_bytes_up += len(body)
        try:
            async with self._client().post(self.url, data=body,
                                           headers=request_headers(self._token, encoding),
                                           skip_auto_headers=SKIP_AUTO_HEADERS,
                                           timeout=self._timeout) as resp:
                data = await resp.read()
                status = resp.status
                if "Accept-Encoding" in resp.headers:
                    self._negotiate(resp.headers["Accept-Encoding"])
                self.wire_bytes_down += int(resp.headers.get("Content-Length", len(data)))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(describe(exc, self.url)) from exc
        if status != 200:
            raise decode_error(data, status)
        return data

    async def wake(self, after: int | None, wait: float) -> WakeSignal:
        """Send one wake request and return its answer, after at most ``wait`` +
        :data:`WAKE_GRACE` seconds. Raises :class:`TransportError` (connection failed or
        timed out), the error an error answer carries (a 429 :class:`TooManyRequests`
        holds the ``Retry-After`` seconds in ``retry_after``), or ``MalformedRequest``
        for an answer that does not decode."""
        try:
            async with self._wake_client().get(
                    self.wake_url, params=wake_query(after, wait),
                    headers=request_headers(self._token), skip_auto_headers=SKIP_AUTO_HEADERS,
                    timeout=aiohttp.ClientTimeout(total=wait + WAKE_GRACE)) as resp:
                data = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"wake request failed: {describe(exc)}") from exc
        if status != 200:
            raise wake_error(data, status, headers)
        return decode_wake(data)

    def _wake_client(self) -> aiohttp.ClientSession:
        if self._wake_session is None:
            self._wake_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1))
        return self._wake_session

    def _negotiate(self, accepted: str) -> None:
        """Use zstd if the server lists it (and this installation has it), else deflate."""
        offered = {part.strip().split(";")[0] for part in accepted.split(",")}
        self.encoding = "zstd" if "zstd" in offered and zstandard is not None else "deflate"

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        if self._wake_session is not None:
            await self._wake_session.close()
        self._session = self._wake_session = None


def wake_error(data: bytes, status: int, headers: Mapping[str, str]) -> CrdtsyncError:
    """The error of a wake answer with status ``status``: a 429 without
    ``detail.retry_after`` takes the ``Retry-After`` header (seconds) instead, and a 404
    without an error body (a proxy's page) is :class:`NotFound` too: no such endpoint."""
    error = decode_error(data, status)
    if status == 404 and type(error) is RequestError:
        return NotFound(error.message, {"http": 404})
    if isinstance(error, TooManyRequests) and error.retry_after is None:
        value = headers.get("Retry-After", "")
        if value.isascii() and value.isdigit():
            error.detail["retry_after"] = int(value)
    return error


def describe(exc: BaseException, url: str | None = None) -> str:
    """A short reason for a failed request ("connection refused", "timed out"), for one
    log line rather than a long ``repr``. With the request's ``url``, a failed connection
    names the server: ``cannot connect to http://host:port (connection refused)``."""
    if isinstance(exc, TimeoutError):
        return "timed out" if url is None else f"timed out waiting for {origin(url)}"
    if isinstance(exc, _DNS_ERRORS):
        return f"cannot resolve the server's host name {exc.host!r}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS failed with {exc.host}:{exc.port} (certificate or handshake)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno).lower()
        if url is not None and isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot connect to {origin(url)} ({reason})"
        return reason
    reason = str(exc) or type(exc).__name__
    return str(reason)[:120].lower()


_DNS_ERRORS: tuple[type[aiohttp.ClientConnectorError], ...] = tuple(
    cls for cls in [getattr(aiohttp, "ClientConnectorDNSError", None)] if cls is not None)
"""aiohttp's error for a failed name lookup (aiohttp 3.11 and later; before, such a failure
reads as its ``os.strerror``)."""


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: no user or password, path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def failure_reason(exc: CrdtsyncError) -> str:
    """A failed request in a few words for a log line: the message of a local or network
    error (already short: :func:`describe`), ``HTTP 401 unauthorized: <message>`` for an
    error answer, its message cut to 120 characters."""
    if exc.status == 0:
        return exc.message[:160]
    return f"HTTP {exc.status} {exc.code}: {exc.message[:120]}"


def compress(body: bytes, encoding: str) -> bytes:
    """``body`` compressed as ``deflate`` (zlib, level 6) or ``zstd`` (level 3)."""
    if encoding == "zstd":
        return bytes(_zstd_compressor().compress(body))
    return zlib.compress(body, 6)


@functools.cache
def _zstd_compressor() -> Any:
    """One compressor per process (building one allocates its context). It writes the
    content size into each frame, which lets the server size the output up front."""
    assert zstandard is not None
    return zstandard.ZstdCompressor(level=3)
