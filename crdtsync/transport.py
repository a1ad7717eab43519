"""How a device reaches the cloud: a small ``Transport`` protocol and its HTTP adapter.

A transport moves one encoded sync request and returns the encoded response; it knows nothing
of the protocol's content. Tests and simulations plug in their own (``crdtsync.testing``).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Protocol

import aiohttp

from .errors import TransportError, UnsupportedEncoding
from .protocol import SYNC_PATH, decode_error

COMPRESS_THRESHOLD = 128
"""Request bodies at least this large are compressed, and sent compressed only when that
made them smaller (below about 100 bytes a compressed body never is)."""

SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
"""Headers aiohttp adds by itself that the reference client leaves out: the server needs
none of them (a sync request without ``Content-Type`` is taken as ``MEDIA_TYPE``), and every
header byte is paid on every sync."""

zstandard: Any
try:  # optional: `pip install crdtsync[zstd]`
    import zstandard
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


class HttpTransport:
    """``POST {url}/v1/sync`` with a bearer token, over an aiohttp session.

    Pass ``session`` to share one connection pool among many devices (a gateway); the
    transport then leaves it open on ``aclose()``.
    """

    def __init__(self, url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = 30.0, compress_threshold: int = COMPRESS_THRESHOLD) -> None:
        self.url = url.rstrip("/") + SYNC_PATH
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
            raise TransportError(f"sync request failed: {exc!r}") from exc
        if status != 200:
            raise decode_error(data, status)
        return data

    def _negotiate(self, accepted: str) -> None:
        """Use zstd if the server lists it (and this installation has it), else deflate."""
        offered = {part.strip().split(";")[0] for part in accepted.split(",")}
        self.encoding = "zstd" if "zstd" in offered and zstandard is not None else "deflate"

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


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
