"""``POST /v1/sync/batch`` spoken directly against a real server on 127.0.0.1 (docs/protocol.md
18): per-entry outcomes, limits, authentication, metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import msgpack
import pytest

from crdtsync import AdminClient
from crdtsync.errors import (
    CorruptUpdate,
    Forbidden,
    MalformedRequest,
    SeqConflict,
    Unauthorized,
)
from crdtsync.protocol import (
    BATCH_PATH,
    DEFAULT_LIMITS,
    BatchAnswer,
    BatchEntry,
    DocSync,
    Event,
    SyncRequest,
    decode_batch_response,
    decode_error,
    decode_response,
    encode_batch_request,
    encode_batch_response,
    encode_request,
)
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN
from .provisioning import events_by_device, provision
from .scrape import scrape, value

UPDATE = bytes.fromhex("0101f0b0950a00280105737461746501610177016200")
"""A Yjs v1 update: ``state["a"] = "b"`` by client 21321840."""


def sync_body(device: str, *, events: int = 0, update: bytes = b"", crc: int | None = None
              ) -> bytes:
    """A sync request of ``device`` with ``events`` events (seqs 1..) and an update."""
    body = encode_request(SyncRequest(
        device=device, docs=(DocSync("state", b"\x00", update),),
        events=tuple(Event(n, "t", 1000 + n, {"n": n}) for n in range(1, events + 1))))
    if crc is None:
        return body
    obj = msgpack.unpackb(body, raw=False)
    obj["docs"][0]["c"] = crc
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


async def post_batch(url: str, entries: list[BatchEntry], *, gate: str | None = None,
                     body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/vnd.crdtsync+msgpack"}
    if gate is not None:
        headers["Authorization"] = f"Bearer {gate}"
    async with aiohttp.ClientSession() as http, http.post(
            url + BATCH_PATH, data=encode_batch_request(entries) if body is None else body,
            headers=headers) as resp:
        return resp.status, await resp.read()


async def test_one_bad_entry_never_fails_the_others(server: Server, admin: AdminClient) -> None:
    """Good entries sync; a wrong token, a corrupt update, a seq conflict, a ``dev`` that is
    not the token's device, a disabled device and a second entry of one device each get
    their own typed error frame, in order, and nothing of theirs is stored."""
    tokens = await provision(admin, 6)
    status, raw = await post_batch(server.url, [BatchEntry(tokens["s5"], sync_body("s5",
                                                                               events=1))],
                                   gate=tokens["s5"])
    assert status == 200
    await admin.set_disabled("s4", True)
    entries = [
        BatchEntry(tokens["s0"], sync_body("s0", events=2)),
        BatchEntry("not-a-token", sync_body("s1", events=1)),
        BatchEntry(tokens["s1"], sync_body("s1", update=UPDATE, crc=1)),
        BatchEntry(tokens["s2"], sync_body("s3", events=1)),
        BatchEntry(tokens["s4"], sync_body("s4", events=1)),
        BatchEntry(tokens["s5"], encode_request(SyncRequest(  # seq 1 again, other content
            device="s5", events=(Event(1, "t", 5, {"other": True}),)))),
        BatchEntry(tokens["s3"], sync_body("s3", update=UPDATE, events=3)),
        BatchEntry(tokens["s3"], sync_body("s3", events=1)),
    ]
    status, raw = await post_batch(server.url, entries, gate=tokens["s0"])
    assert status == 200
    answers = decode_batch_response(raw, len(entries))
    assert [a.status for a in answers] == [200, 401, 400, 401, 403, 409, 200, 400]
    assert decode_response(answers[0].body).acked == 2
    assert isinstance(decode_error(answers[1].body, 401), Unauthorized)
    assert isinstance(decode_error(answers[2].body, 400), CorruptUpdate)
    assert isinstance(decode_error(answers[4].body, 403), Forbidden)
    assert isinstance(decode_error(answers[5].body, 409), SeqConflict)
    assert decode_response(answers[6].body).acked == 3
    stored = await events_by_device(admin)
    assert {d: [s for s, _ in e] for d, e in stored.items()} == {
        "s0": [1, 2], "s3": [1, 2, 3], "s5": [1]}
    assert (await admin.state("s3"))["state"] == {"a": "b"}
    assert (await admin.state("s1"))["state"] == {}


async def test_the_request_itself_is_bounded_and_authenticated(
        tmp_path: Path) -> None:
    """Without a device token in the header the body is not read (401); more entries than
    ``max_batch_entries`` is ``413 batch_too_large`` before an entry is read; a body over
    ``max_body`` is ``413 body_too_large``; broken framing is ``400``. Each is an error
    frame, and the server keeps serving."""
    limits = dataclasses.replace(DEFAULT_LIMITS, max_batch_entries=3)
    config = ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                          limits=limits, max_body=64 * 1024)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        one = [BatchEntry(token, sync_body("d1"))]
        for gate in (None, "wrong"):
            status, raw = await post_batch(server.url, one, gate=gate)
            assert status == 401 and decode_error(raw, status).code == "unauthorized"
        status, raw = await post_batch(server.url, one * 4, gate=token)
        error = decode_error(raw, status)
        assert (status, error.code, error.detail) == (413, "batch_too_large",
                                                      {"max_entries": 3})
        big = [BatchEntry(token, b"\x00" * 70_000)]
        status, raw = await post_batch(server.url, big, gate=token)
        assert (status, decode_error(raw, status).code) == (413, "body_too_large")
        for body in (b"\x93\x01\x02", msgpack.packb({"v": 1, "t": "batch", "e": [[1, b""]]}),
                     encode_batch_request(one) + b"\x00"):
            status, raw = await post_batch(server.url, [], gate=token, body=body)
            assert (status, decode_error(raw, status).code) == (400, "malformed_request")
        status, raw = await post_batch(server.url, one, gate=token)
        assert status == 200 and decode_batch_response(raw, 1)[0].status == 200
        metrics = await scrape(server)
        assert value(metrics, "crdtsync_batch_requests_total", outcome="ok", code="none") == 1
        assert value(metrics, "crdtsync_batch_requests_total", outcome="client_error",
                     code="batch_too_large") == 1
        assert value(metrics, "crdtsync_batch_entries_total") == 1
        assert value(metrics, "crdtsync_sync_requests_total", outcome="ok", code="none") == 1


async def test_the_answer_is_compressed_only_when_the_client_takes_it(
        server: Server, admin: AdminClient) -> None:
    """``Accept-Encoding: zstd`` (or ``deflate``) gets a compressed answer that decodes to
    the same entries; none, or ``q=0``, gets it plain."""
    import zlib

    import zstandard

    tokens = await provision(admin, 20)
    entries = [BatchEntry(t, sync_body(i)) for i, t in tokens.items()]
    seen = {}
    for accept in ("", "zstd", "deflate", "zstd;q=0, deflate;q=0"):
        headers = {"Authorization": f"Bearer {tokens['s0']}", "Accept-Encoding": accept,
                   "Content-Type": "application/vnd.crdtsync+msgpack"}
        async with aiohttp.ClientSession(auto_decompress=False) as http, http.post(
                server.url + BATCH_PATH, data=encode_batch_request(entries),
                headers=headers) as resp:
            assert resp.status == 200
            coding, raw = resp.headers.get("Content-Encoding", "identity"), await resp.read()
        plain = (zstandard.ZstdDecompressor().decompress(raw) if coding == "zstd"
                 else zlib.decompress(raw) if coding == "deflate" else raw)
        answers = decode_batch_response(plain, len(entries))
        assert all(a.status == 200 for a in answers)
        seen[accept] = (coding, len(raw), len(plain))
    assert seen[""][0] == "identity" and seen["zstd;q=0, deflate;q=0"][0] == "identity"
    assert seen["zstd"][0] == "zstd" and seen["deflate"][0] == "deflate"
    assert seen["zstd"][1] < seen["zstd"][2] / 2


def test_a_batch_answer_of_the_wrong_shape_is_refused_whole() -> None:
    """The client's decoder: exactly one ``[status, bin]`` per entry, else nothing of it."""
    good = encode_batch_response([BatchAnswer(200, b"x"), BatchAnswer(409, b"y")])
    assert [a.status for a in decode_batch_response(good, 2)] == [200, 409]
    for data, count in ((good, 3), (good, 1),
                        (encode_batch_response([BatchAnswer(99, b"x")]), 1),
                        (msgpack.packb({"v": 1, "t": "sync", "r": []}), 0)):
        with pytest.raises(MalformedRequest):
            decode_batch_response(data, count)
