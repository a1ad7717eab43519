"""Files (docs/protocol.md section 19): the device's resumable upload and its downloads
(device token), and the management API's listings, range downloads and streamed puts
(admin token). Bodies of files are raw bytes (``application/octet-stream``), bounded before
they are read and never held whole in memory: a device's chunk is at most ``file_chunk``
bytes, a put is streamed into the blob store while it is hashed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from crdtsync.errors import (
    BodyTooLarge,
    FileTooLarge,
    MalformedRequest,
    NotFound,
    RequestTimeout,
    UnsupportedEncoding,
)

from ..auth import authenticate_device
from ..files import FileService
from ..store import DeviceRecord
from ..store.files import (
    DOWN,
    FILE_DIRECTIONS,
    UP,
    FileRecord,
    check_file_name,
    device_owner,
    fleet_owner,
)
from .common import (
    admin_services,
    bearer,
    fleet_param,
    found,
    id_page,
    int_param,
    json_response,
    name_param,
    read_object,
)
from .input import parse_json
from .keys import SERVICES
from .requestlog import DEVICE

routes = web.RouteTableDef()

UPLOAD_RE = re.compile(r"[0-9a-f]{32}")
META_HEADER = "X-File-Meta"
"""Optional header of a put: the file's ``meta`` as JSON."""
CHUNK_SHA_HEADER = "X-Chunk-Sha256"
"""Optional header of an upload chunk: the SHA-256 (hex) of its bytes."""
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


async def _device(request: web.Request) -> DeviceRecord:
    device = await authenticate_device(request.app[SERVICES].store, bearer(request))
    request[DEVICE] = device.id  # for the log of a failure (requestlog)
    return device


def _identity(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedEncoding("file bytes are sent as they are (no Content-Encoding)",
                                  {"accepted": ["identity"]})


# --- device: upload and download -----------------------------------------------------------


@routes.post("/v1/files/uploads")
async def begin_upload(request: web.Request) -> web.Response:
    """Declare a file to send (``{"name", "size", "sha256", "meta"}``): the upload id and
    the offset to send from (``complete`` when the cloud holds it already)."""
    device = await _device(request)
    body = await read_object(request, 'body must be {"name", "size", "sha256", "meta"}')
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise MalformedRequest("size must be an integer >= 0")
    answer = await request.app[SERVICES].files.begin_upload(
        device, str(body.get("name")), size, str(body.get("sha256")), body.get("meta"))
    return json_response(answer)


@routes.put("/v1/files/uploads/{upload}")
async def upload_chunk(request: web.Request) -> web.Response:
    """Append the body (one chunk, at most ``chunk`` bytes) at ``?offset=``."""
    device = await _device(request)
    services = request.app[SERVICES]
    upload_id = request.match_info["upload"]
    if not UPLOAD_RE.fullmatch(upload_id):
        raise NotFound(f"no upload {upload_id!r}", {"upload": upload_id})
    offset = int_param(request, "offset", -1, 2**62)
    if offset < 0:
        raise MalformedRequest("query parameter 'offset' is required")
    _identity(request)
    length = _chunk_length(request, services.config.file_chunk)
    seconds = services.config.body_timeout
    return json_response(await services.files.write_chunk(
        device, upload_id, offset, length, lambda: _chunk(request, length, seconds),
        request.headers.get(CHUNK_SHA_HEADER, "").strip().lower() or None))


def _chunk_length(request: web.Request, limit: int) -> int:
    """The declared Content-Length of a chunk, at most ``limit``."""
    length = request.content_length
    if length is None:
        raise MalformedRequest("an upload chunk needs a Content-Length")
    if length > limit:
        raise BodyTooLarge(f"chunk over {limit} bytes", {"max_body": limit, "chunk": limit})
    return length


async def _chunk(request: web.Request, length: int, seconds: float) -> bytes:
    """The whole body of ``length`` bytes."""
    if length == 0:  # aiohttp's reader of an empty body raises even for 0 bytes
        return b""
    try:
        async with asyncio.timeout(seconds):
            return await request.content.readexactly(length)
    except TimeoutError as exc:
        raise RequestTimeout(f"the chunk did not arrive within {seconds:g} s",
                             {"body_timeout": seconds}) from exc
    except asyncio.IncompleteReadError as exc:
        raise MalformedRequest("the chunk was cut off") from exc


@routes.get("/v1/files/blobs/{sha256}")
async def download(request: web.Request) -> web.StreamResponse:
    """A file announced to this device (its own or its fleet's), by SHA-256, with ranges."""
    device = await _device(request)
    files = request.app[SERVICES].files
    return await _serve(request, files, await files.readable(device,
                                                             request.match_info["sha256"]))


# --- management: a device's or a fleet's files ------------------------------------------


def _direction(request: web.Request, default: str | None) -> str | None:
    value = request.query.get("direction", "") or default
    if value is not None and value not in FILE_DIRECTIONS:
        raise MalformedRequest(f"direction must be one of {list(FILE_DIRECTIONS)}")
    return value


async def _owner(request: web.Request) -> tuple[FileService, str]:
    services = admin_services(request)
    if "fleet" in request.match_info:
        return services.files, fleet_owner(await fleet_param(services, request))
    device_id = name_param(request)
    found(await services.store.get_device(device_id), "device", device_id)
    return services.files, device_owner(device_id)


@routes.get("/v1/devices/{device}/files")
@routes.get("/v1/fleets/{fleet}/files")
async def list_files(request: web.Request) -> web.Response:
    """The files (``?direction=up|down``, both by default), by name, paged by ``after``."""
    files, owner = await _owner(request)
    after, limit = id_page(request)
    records = await files.store.list_files(owner, _direction(request, None), after, limit)
    return json_response({"files": [r.to_json() for r in records]})


async def _record(request: web.Request) -> tuple[FileService, FileRecord]:
    files, owner = await _owner(request)
    name = check_file_name(request.match_info["name"])
    direction = _direction(request, UP if owner.startswith("d:") else DOWN)
    assert direction is not None
    record = await files.store.get_file(owner, direction, name)
    return files, found(record, "file", name)


@routes.get("/v1/devices/{device}/files/{name}")
@routes.get("/v1/fleets/{fleet}/files/{name}")
async def get_file(request: web.Request) -> web.StreamResponse:
    """The file's bytes (``?direction=``, ``up`` for a device by default), with ranges."""
    files, record = await _record(request)
    return await _serve(request, files, record)


@routes.put("/v1/devices/{device}/files/{name}")
@routes.put("/v1/fleets/{fleet}/files/{name}")
async def put_file(request: web.Request) -> web.Response:
    """Store the body as the device's or fleet's file ``name`` (replacing one) and announce
    it to the device or fleet; ``X-File-Meta`` may carry its meta as JSON."""
    files, owner = await _owner(request)
    name = check_file_name(request.match_info["name"])
    _identity(request)
    limit = files.config.max_file_size
    if (request.content_length or 0) > limit:  # refused before a byte is read
        raise FileTooLarge(f"file over {limit} bytes", {"max_file_size": limit,
                                                        "size": request.content_length})
    meta = parse_json(request.headers[META_HEADER].encode()) \
        if META_HEADER in request.headers else None
    record = await files.put(owner, name, _stream(request, files.config.body_timeout), meta)
    return json_response(record.to_json(), status=201)


async def _stream(request: web.Request, seconds: float) -> AsyncIterator[bytes]:
    """The body as it arrives; :class:`RequestTimeout` when nothing came for ``seconds``,
    :class:`MalformedRequest` when the client broke it off."""
    while True:
        try:
            async with asyncio.timeout(seconds):
                block = await request.content.readany()
        except TimeoutError as exc:
            raise RequestTimeout(f"no body bytes within {seconds:g} s",
                                 {"body_timeout": seconds}) from exc
        if not block:
            if request.content_length is not None and not request.content.is_eof():
                raise MalformedRequest("the body was cut off")
            return
        yield block


@routes.delete("/v1/devices/{device}/files/{name}")
@routes.delete("/v1/fleets/{fleet}/files/{name}")
async def delete_file(request: web.Request) -> web.Response:
    """Delete the file (``?direction=``); a ``down`` file is withdrawn from devices."""
    files, owner = await _owner(request)
    name = check_file_name(request.match_info["name"])
    direction = _direction(request, UP if owner.startswith("d:") else DOWN)
    assert direction is not None
    return json_response((await files.delete(owner, direction, name)).to_json())


# --- serving bytes ------------------------------------------------------------------------


def _headers(record: FileRecord) -> dict[str, Any]:
    return {"ETag": f'"{record.sha256}"', "X-Content-Sha256": record.sha256,
            "Accept-Ranges": "bytes", "Cache-Control": "no-store"}


async def _serve(request: web.Request, files: FileService, record: FileRecord
                 ) -> web.StreamResponse:
    """``record``'s bytes, all of them (200) or the one range asked (206, RFC 9110), with
    the same answer to a ``Range`` header whatever stores the bytes (:func:`byte_range`).
    A whole file on local disk goes out with ``sendfile``."""
    path = files.local_path(record)
    if path is not None and "Range" not in request.headers:
        sent = web.FileResponse(path, headers=_headers(record))
        sent.content_type = "application/octet-stream"
        return sent
    span = byte_range(request.headers.get("Range"), record.size)
    start, end = span or (0, record.size)
    response = web.StreamResponse(status=206 if span else 200, headers=_headers(record))
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    if span:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}"
    await response.prepare(request)
    async for block in files.blobs.read_blob(record.sha256, start, end):
        await response.write(block)
    await response.write_eof()
    return response


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single ``Range: bytes=`` header over ``size``
    bytes; ``None`` for no header or one this server ignores (several ranges, another
    unit, a last byte before the first: the whole file is sent). ``416`` when the range
    starts beyond the end, or asks for the last 0 bytes."""
    match = _RANGE_RE.fullmatch((header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "" and int(last) > 0:  # the last N bytes
        return max(0, size - int(last)), size
    if first == "":
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    start = int(first)
    if last != "" and int(last) < start:  # not a valid range (RFC 9110 14.1.1): ignored
        return None
    end = size if last == "" else min(size, int(last) + 1)
    if start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end
