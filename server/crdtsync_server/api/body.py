"""Reading a request body within bounds: its declared and decompressed size, its time, its
coding (identity, deflate, gzip, zstd when installed). Call :func:`read_body` only once the
client is authenticated."""

from __future__ import annotations

import functools
import importlib
import io
import zlib
from typing import Any

from aiohttp import web

from crdtsync.errors import BodyTooLarge, MalformedRequest, UnsupportedEncoding

from .deadlines import read_within
from .keys import SERVICES

zstandard: Any
try:  # optional: `pip install crdtsync[zstd]` (imported by name: typed alike with or without it)
    zstandard = importlib.import_module("zstandard")
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None


async def read_body(request: web.Request) -> bytes:
    """The request body, decompressed; typed errors for oversize or undecodable bodies.

    Call it only once the client is authenticated: reading is what costs memory. The body
    must arrive within ``body_timeout`` seconds (:class:`RequestTimeout`); a Content-Length
    over ``max_body`` is refused before reading. aiohttp's own decompression is off
    (``auto_decompress=False``): its failures bypass the handler with an untyped answer.
    Here a body is inflated with a hard cap of ``max_body`` bytes (a zip bomb stops at the
    cap), must end exactly at the end of its stream, and an encoding other than identity,
    deflate or gzip is refused with ``unsupported_encoding``.
    """
    config = request.app[SERVICES].config
    limit = config.max_body
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if not decodable(encoding):
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not accepted",
                                  {"accepted": accepted_encodings()})
    if (request.content_length or 0) > limit:  # refused before a byte is read
        raise BodyTooLarge(f"body over {limit} bytes", {"max_body": limit})
    try:
        raw = await read_within(request, config.body_timeout)
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"body over {limit} bytes", {"max_body": limit}) from exc
    return decode_body(raw, encoding, limit)


def decodable(encoding: str) -> bool:
    """True for a Content-Encoding (lower case) that :func:`decode_body` takes."""
    return encoding in _DECODERS


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """``raw`` decoded from ``encoding`` (one :func:`decodable` says yes to), to at most
    ``limit`` bytes (:class:`BodyTooLarge`); :class:`MalformedRequest` for bytes that do
    not decode."""
    if encoding == "zstd":
        return unzstd(raw, limit)
    wbits = _DECODERS[encoding]
    return raw if wbits is None else inflate(raw, wbits, limit)


_DECODERS: dict[str, int | None] = {"identity": None, "deflate": zlib.MAX_WBITS,
                                    "gzip": 16 + zlib.MAX_WBITS}
if zstandard is not None:
    _DECODERS["zstd"] = None
_PREFERENCE = ("zstd", "deflate", "gzip", "identity")
"""Request body codings, best first: smallest and fastest to decode first, none last."""


def accepted_encodings() -> list[str]:
    """The Content-Encodings this server takes, best first (``detail.accepted`` of
    ``unsupported_encoding``, so a client can take the first one it speaks)."""
    return [e for e in _PREFERENCE if e in _DECODERS]


ACCEPT_ENCODING = ", ".join(e for e in accepted_encodings() if e != "identity")
BEST_ENCODING = ACCEPT_ENCODING.split(", ")[0]
"""What request bodies may be compressed with; sent as ``Accept-Encoding`` on sync
responses (RFC 7694) so a client can pick the best both sides speak."""


def unzstd(data: bytes, limit: int) -> bytes:
    """Decompress a zstd frame to at most ``limit`` bytes: a frame that claims or produces
    more is refused without being expanded; a truncated or padded one is malformed."""
    assert zstandard is not None
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit or (declared < 0 and _zstd_size_over(data, limit)):
            raise BodyTooLarge(f"decompressed body over {limit} bytes", {"max_body": limit})
        # A frame that declares its size cannot produce more (the decoder checks it).
        decoder = _zstd().decompressobj()
        out = bytes(decoder.decompress(data))
    except zstandard.ZstdError as exc:
        raise MalformedRequest(f"body does not decompress: {exc}") from exc
    if not decoder.eof or decoder.unused_data:
        raise MalformedRequest("compressed body is truncated or has trailing bytes")
    return out

def _zstd_size_over(data: bytes, limit: int) -> bool:
    """For a frame that does not declare its size: expand it up to ``limit + 1`` bytes."""
    with _zstd().stream_reader(io.BytesIO(data), read_across_frames=False,
                               closefd=False) as reader:
        return len(reader.read(limit + 1)) > limit


@functools.cache
def _zstd() -> Any:
    """One decompressor for the process (building one allocates its context); used from
    the event loop thread only."""
    assert zstandard is not None
    return zstandard.ZstdDecompressor()


def inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress ``data`` to at most ``limit`` bytes; typed errors for bombs and garbage."""
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MalformedRequest(f"body does not decompress: {exc}") from exc
    if len(out) > limit:
        raise BodyTooLarge(f"decompressed body over {limit} bytes", {"max_body": limit})
    if not decoder.eof or decoder.unused_data:
        raise MalformedRequest("compressed body is truncated or has trailing bytes")
    return out
