"""Request body compression: deflate by default, zstd once the server says it takes it;
zstd bodies get the same typed errors and zip-bomb cap as deflate ones."""

from __future__ import annotations

import zlib

import aiohttp
import pytest
import zstandard

from crdtsync import AdminClient
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, SyncRequest, decode_error, encode_request
from crdtsync.transport import HttpTransport
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory


async def test_device_compresses_with_zstd_when_it_shrinks_the_body(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1")
    transport = dev._transport
    assert isinstance(transport, HttpTransport) and transport.encoding == "zstd"
    before = transport.wire_bytes_up
    report = await dev.sync()  # a small body: sent as it is
    assert transport.wire_bytes_up - before == report.bytes_up
    for n in range(200):
        await dev.emit("t", {"n": n, "text": "reading " * 5})
    before = transport.wire_bytes_up
    report = await dev.sync()
    assert report.events_acked == 200 and transport.encoding == "zstd"
    assert transport.wire_bytes_up - before < report.bytes_up / 5  # it was compressed
    stored = [e["body"]["n"] async for e in admin.iter_events(device="d1")]
    assert stored == list(range(200))


async def test_device_falls_back_to_deflate_for_a_server_without_zstd(
        make_device: DeviceFactory, admin: AdminClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server without zstandard answers ``unsupported_encoding`` with what it takes; the
    transport sends the same request again at once as deflate, and stays with deflate."""
    from crdtsync_server.api import body, sync

    monkeypatch.delitem(body._DECODERS, "zstd")
    monkeypatch.setattr(sync, "BEST_ENCODING", "deflate")
    dev = await make_device("d1")
    transport = dev._transport
    assert isinstance(transport, HttpTransport)
    for n in range(50):
        await dev.emit("t", {"n": n, "text": "reading " * 5})
    report = await dev.sync()
    assert report.events_acked == 50 and transport.encoding == "deflate"
    stored = [e["body"]["n"] async for e in admin.iter_events(device="d1")]
    assert stored == list(range(50))


async def test_accept_encoding_is_sent_only_to_clients_that_can_do_better(
        server: Server, admin: AdminClient) -> None:
    token = (await admin.add_device("d1"))["token"]
    body = encode_request(SyncRequest(device="d1", docs=()))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession() as session:
        for encoding, packed, offered in [("identity", body, False),
                                          ("deflate", zlib.compress(body), True),
                                          ("zstd", zstandard.compress(body), False)]:
            async with session.post(server.url + SYNC_PATH, data=packed,
                                    headers={**headers, "Content-Encoding": encoding}) as resp:
                assert resp.status == 200, await resp.read()
                assert ("Accept-Encoding" in resp.headers) is offered, encoding
                assert resp.headers["Server"] == "crdtsync"


@pytest.fixture
async def small_server(server_config: ServerConfig) -> Server:  # type: ignore[misc]
    config = ServerConfig(db=server_config.db, port=0, admin_token=ADMIN_TOKEN, max_body=4096)
    async with Server(config) as srv:
        yield srv


@pytest.mark.parametrize(("case", "status", "code"), [
    ("bomb", 413, "body_too_large"),
    ("truncated", 400, "malformed_request"),
    ("trailing", 400, "malformed_request"),
    ("garbage", 400, "malformed_request"),
])
async def test_bad_zstd_bodies_are_typed_errors(small_server: Server, case: str, status: int,
                                                code: str) -> None:
    async with AdminClient(small_server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
    frame = zstandard.ZstdCompressor().compress(b"\x81" + b"\x00" * 100)
    body = {"bomb": zstandard.ZstdCompressor().compress(b"\x00" * 10_000_000),
            "truncated": frame[:-3], "trailing": frame + b"junk",
            "garbage": b"not zstd at all"}[case]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE,
               "Content-Encoding": "zstd"}
    async with aiohttp.ClientSession() as session, session.post(
            small_server.url + SYNC_PATH, data=body, headers=headers) as resp:
        error = decode_error(await resp.read(), resp.status)
        assert (resp.status, error.code) == (status, code)
        assert resp.headers.get("Accept-Encoding") is None  # only on 200 answers
    async with aiohttp.ClientSession() as session, session.get(
            small_server.url + "/v1/health") as resp:
        assert resp.status == 200  # still serving


@pytest.mark.parametrize(("size", "status", "message"), [
    (3000, 400, "not a msgpack message"), (10_000_000, 413, "decompressed body over")])
async def test_zstd_frames_without_a_declared_size_are_capped_too(
        small_server: Server, size: int, status: int, message: str) -> None:
    """A streamed frame does not say how large it expands: the server expands it only up to
    ``max_body`` to find out (a small one is decompressed and reaches the msgpack decoder;
    a bomb stops at the cap)."""
    async with AdminClient(small_server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
    streamer = zstandard.ZstdCompressor().compressobj()
    frame = streamer.compress(b"\x80" + b"\x00" * (size - 1)) + streamer.flush()
    assert zstandard.frame_content_size(frame) == -1
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE,
               "Content-Encoding": "zstd"}
    async with aiohttp.ClientSession() as session, session.post(
            small_server.url + SYNC_PATH, data=frame, headers=headers) as resp:
        assert resp.status == status
        assert message in decode_error(await resp.read(), resp.status).message


async def test_a_server_without_zstd_lists_what_it_takes_best_first(
        server: Server, admin: AdminClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from crdtsync_server.api import body

    monkeypatch.delitem(body._DECODERS, "zstd")
    token = (await admin.add_device("d1"))["token"]
    body = zstandard.compress(encode_request(SyncRequest(device="d1", docs=())))
    headers = {"Authorization": f"Bearer {token}", "Content-Encoding": "zstd",
               "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession() as session, \
            session.post(server.url + SYNC_PATH, data=body, headers=headers) as resp:
        error = decode_error(await resp.read(), resp.status)
    assert (resp.status, error.code) == (415, "unsupported_encoding")
    assert error.detail == {"accepted": ["deflate", "gzip", "identity"]}
