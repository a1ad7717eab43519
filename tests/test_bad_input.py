"""Bad input end to end: raw requests against the real server on 127.0.0.1 and SQLite.

Each case asserts the HTTP status and the typed error code, then that the server still serves
a real device and that nothing acknowledged was lost and nothing of the bad request stored.
The device-library half checks that bad values are refused before anything is persisted.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from pycrdt import Doc, Map

from crdtsync import AdminClient, Device
from crdtsync.errors import InvalidValue
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    decode_error,
    decode_response,
)
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory

T0 = 1_700_000_000_000
BASELINE_EVENT = ("t", {"n": 1})


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh connection per request: after an undecodable deflate body aiohttp closes the
    # connection behind the answer, and a pooled client would trip over that on its next call.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def code(self) -> str:
        return decode_error(self.body, self.status).code

    def detail(self) -> dict[str, Any]:
        return decode_error(self.body, self.status).detail

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def call(http: aiohttp.ClientSession, method: str, url: str, *, token: str | None,
               body: bytes | None = None, content_type: str | None = MEDIA_TYPE,
               headers: dict[str, str] | None = None) -> Reply:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    skip = () if content_type is not None else ("Content-Type",)  # None: no such header
    async with http.request(method, url, data=body, headers=all_headers,
                            skip_auto_headers=skip) as resp:
        return Reply(resp.status, await resp.read(), resp.content_type)


def update_setting(key: str, value: Any, client_id: int = 424242) -> bytes:
    """A valid Yjs update from a foreign replica that sets ``state[key] = value``."""
    doc: Doc[Any] = Doc(client_id=client_id)
    doc.get("state", type=Map)[key] = value
    return doc.get_update()


def raw_doc(update: bytes = b"", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"d": "state", "g": 0, "sv": b"\x00"}
    if update:
        doc.update(u=update, c=zlib.crc32(update))
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not ...}


def raw_event(seq: int, body: Any = None, topic: str = "t", time: int = T0) -> list[Any]:
    return [seq, topic, time, msgpack.packb({"n": seq} if body is None else body)]


def raw_request(device: str = "d1", **fields: Any) -> bytes:
    msg: dict[str, Any] = {"v": 1, "t": "sync", "dev": device}
    msg.update(fields)
    return msgpack.packb({k: v for k, v in msg.items() if v is not ...})  # type: ignore[no-any-return]


EVIL = update_setting("evil", 666)
"""A valid update every bad request smuggles in: it must never show up in the state."""


@dataclass
class Victim:
    """Device ``d1`` with acknowledged state ``{"a": 1}`` and event seq 1 in the cloud."""

    dev: Device
    token: str
    url: str
    admin: AdminClient

    async def post(self, http: aiohttp.ClientSession, body: bytes, **kwargs: Any) -> Reply:
        kwargs.setdefault("token", self.token)
        return await call(http, "POST", self.url + SYNC_PATH, body=body, **kwargs)

    async def assert_intact(self) -> None:
        """Everything acknowledged is there, nothing of the bad request is."""
        assert await self.admin.state("d1") == {"state": {"a": 1}}
        page = await self.admin.events(device="d1")
        assert [(e["seq"], e["topic"], e["body"]) for e in page["events"]] == [
            (1, *BASELINE_EVENT)]
        assert (await self.admin.device("d1"))["last_seq"] == 1

    async def assert_serving(self) -> None:
        """The server still syncs a real device, state and events, from where it was."""
        self.dev.state["b"] = 2
        assert await self.dev.emit("t", {"n": 2}) == 2
        report = await self.dev.sync()
        assert report.events_acked == 1 and self.dev.pending_events == 0
        assert await self.admin.state("d1") == {"state": {"a": 1, "b": 2}}
        page = await self.admin.events(device="d1")
        assert [e["seq"] for e in page["events"]] == [1, 2]
        assert "evil" not in self.dev.state

    async def assert_survived(self) -> None:
        await self.assert_intact()
        await self.assert_serving()


@pytest.fixture
async def victim(make_device: DeviceFactory, admin: AdminClient, server: Server) -> Victim:
    dev = await make_device("d1")
    dev.state["a"] = 1
    await dev.emit(*BASELINE_EVENT, time_ms=T0)
    report = await dev.sync()
    assert report.events_acked == 1
    v = Victim(dev, make_device.tokens["d1"], server.url, admin)  # type: ignore[attr-defined]
    await v.assert_intact()
    return v


# --- the sync endpoint: envelope -----------------------------------------------------------

VALID_PARTS: dict[str, Any] = {"docs": [raw_doc(EVIL)], "ev": [raw_event(2)]}
"""A doc update and a new event: stored if any part of a bad request slipped through."""

SYNC_CASES: list[Any] = [
    pytest.param(b"\xc1 this is not msgpack", 400, "malformed_request", id="not-msgpack"),
    pytest.param(b"", 400, "malformed_request", id="empty-body"),
    pytest.param(msgpack.packb([1, 2, 3]), 400, "malformed_request", id="msgpack-array"),
    pytest.param(msgpack.packb("sync"), 400, "malformed_request", id="msgpack-string"),
    pytest.param(raw_request(**VALID_PARTS) + b"\x00", 400, "malformed_request",
                 id="trailing-bytes"),
    pytest.param(raw_request(v=2, **VALID_PARTS), 400, "unsupported_version", id="version-2"),
    pytest.param(raw_request(v=0, **VALID_PARTS), 400, "unsupported_version", id="version-0"),
    pytest.param(raw_request(v=..., **VALID_PARTS), 400, "unsupported_version",
                 id="version-missing"),
    pytest.param(raw_request(v="1", **VALID_PARTS), 400, "unsupported_version",
                 id="version-string"),
    pytest.param(raw_request(t="hello", **VALID_PARTS), 400, "malformed_request",
                 id="wrong-type"),
    pytest.param(raw_request(docs={"d": "state"}, ev=VALID_PARTS["ev"]), 400,
                 "malformed_request", id="docs-not-a-list"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, d="../state")], ev=VALID_PARTS["ev"]), 400,
                 "malformed_request", id="bad-doc-name"),
    # CRDT payloads
    pytest.param(raw_request(docs=[raw_doc(EVIL, c=zlib.crc32(EVIL) ^ 1)],
                             ev=VALID_PARTS["ev"]), 400, "corrupt_update", id="wrong-crc"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, c=...)], ev=VALID_PARTS["ev"]), 400,
                 "corrupt_update", id="missing-crc"),
    pytest.param(raw_request(docs=[raw_doc(b"\xde\xad\xbe\xef" * 4)], ev=VALID_PARTS["ev"]),
                 400, "corrupt_update", id="garbage-update-good-crc"),
    pytest.param(raw_request(docs=[raw_doc(EVIL[: len(EVIL) // 2])], ev=VALID_PARTS["ev"]),
                 400, "corrupt_update", id="truncated-update-half"),
    pytest.param(raw_request(docs=[raw_doc(EVIL[:-1])], ev=VALID_PARTS["ev"]), 400,
                 "corrupt_update", id="truncated-update-last-byte"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, sv=b"\x05\x01")], ev=VALID_PARTS["ev"]), 400,
                 "invalid_state_vector", id="truncated-state-vector"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, sv=b"\x00junk")], ev=VALID_PARTS["ev"]), 400,
                 "invalid_state_vector", id="state-vector-trailing-garbage"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, sv=b"\x01\x07\x80\x80\x80\x80\x10")],
                             ev=VALID_PARTS["ev"]), 400, "invalid_state_vector",
                 id="state-vector-clock-2**32"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, sv=b"\x02\x07\x01\x07\x02")],
                             ev=VALID_PARTS["ev"]), 400, "invalid_state_vector",
                 id="state-vector-repeated-client"),
    # events
    pytest.param(raw_request(docs=[raw_doc(EVIL)],
                             ev=[raw_event(s) for s in range(2, 1003)]),
                 413, "too_many_events", id="too-many-events"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, {"n": 2**63})]), 400,
                 "invalid_value", id="event-int-2**63"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, {"n": 2**64 - 1})]), 400,
                 "invalid_value", id="event-int-2**64-1"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, {"n": -(2**63)})]), 400,
                 "invalid_value", id="event-int-minus-2**63"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, [math.inf])]), 400,
                 "invalid_value", id="event-infinity"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, "x" * 70_000)]), 400,
                 "invalid_value", id="event-body-too-big"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[[2, "t", T0, b"\xc1"]]), 400,
                 "malformed_request", id="event-body-not-msgpack"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)],
                             ev=[raw_event(2, {"x": msgpack.ExtType(5, b"")})]),
                 400, "invalid_value", id="event-ext-type"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, msgpack.ExtType(127, b"x"))]),
                 400, "invalid_value", id="event-ext-type-whole-body"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)],
                             ev=[raw_event(2, {"x": [msgpack.Timestamp(1, 0)]})]),
                 400, "invalid_value", id="event-timestamp-ext"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2), raw_event(4)]), 400,
                 "malformed_request", id="non-consecutive-seqs"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(3), raw_event(2)]), 400,
                 "malformed_request", id="descending-seqs"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(0)]), 400,
                 "malformed_request", id="seq-zero"),
    pytest.param(raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2, topic="a/b")]), 400,
                 "malformed_request", id="bad-topic"),
    # documents the server refuses after decoding (atomicity: the valid parts are dropped too)
    pytest.param(raw_request(docs=[raw_doc(EVIL), raw_doc(d="secrets")],
                             ev=VALID_PARTS["ev"]), 404, "unknown_document",
                 id="unknown-document"),
    pytest.param(raw_request(docs=[raw_doc(EVIL, g=1)], ev=VALID_PARTS["ev"]), 409,
                 "generation_mismatch", id="generation-mismatch"),
]


@pytest.mark.parametrize(("body", "status", "code"), SYNC_CASES)
async def test_bad_sync_request(victim: Victim, http: aiohttp.ClientSession, body: bytes,
                                status: int, code: str) -> None:
    reply = await victim.post(http, body)
    assert (reply.status, reply.code()) == (status, code)
    assert reply.content_type == MEDIA_TYPE
    await victim.assert_survived()


def test_event_int_2_64_cannot_be_encoded() -> None:
    # msgpack has no integer wider than 64 bits, so 2**64 cannot reach the server at all.
    with pytest.raises(OverflowError):
        msgpack.packb(2**64)


async def test_error_details(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await victim.post(http, raw_request(v=2))
    assert reply.detail() == {"supported": [1]}
    reply = await victim.post(http, raw_request(docs=[raw_doc(EVIL, g=1)]))
    assert reply.detail() == {"doc": "state", "gen": 0}
    reply = await victim.post(http, raw_request(docs=[raw_doc(d="secrets")]))
    assert reply.detail() == {"doc": "secrets"}
    reply = await victim.post(http, raw_request(ev=[raw_event(s) for s in range(2, 1003)]))
    assert reply.detail() == {"max_events": 1000}
    await victim.assert_survived()


@pytest.mark.parametrize(("value", "where"), [
    (msgpack.ExtType(5, b""), "event 2 body.x"),
    ([1, msgpack.ExtType(0, b"\x01\x02")], "event 2 body.x[1]"),
    (msgpack.Timestamp(1_700_000_000, 0), "event 2 body.x"),
])
async def test_extension_types_are_refused_with_where(victim: Victim, http: aiohttp.ClientSession,
                                                      value: Any, where: str) -> None:
    """Finding 9 of issue 11: an extension type was stored as ``[5, ""]`` although section
    3.2 refuses them; now it is invalid_value naming its place, like any non-JSON value."""
    reply = await victim.post(http, raw_request(ev=[raw_event(2, {"x": value})]))
    assert (reply.status, reply.code()) == (400, "invalid_value")
    assert reply.detail() == {"where": where}
    await victim.assert_survived()


@pytest.mark.parametrize("content_type", [
    "application/json", "text/plain", "application/octet-stream", ""])
async def test_wrong_content_type(victim: Victim, http: aiohttp.ClientSession,
                                  content_type: str) -> None:
    reply = await victim.post(http, raw_request(**VALID_PARTS), content_type=content_type)
    assert (reply.status, reply.code()) == (415, "unsupported_encoding")
    assert reply.detail() == {  # best first: a client takes the first one it speaks
        "accepted": [MEDIA_TYPE, "application/msgpack", "application/x-msgpack"]}
    await victim.assert_survived()


@pytest.mark.parametrize("content_type", [None, MEDIA_TYPE, "application/msgpack",
                                          "application/x-msgpack; charset=binary"])
async def test_accepted_content_types_and_none(victim: Victim, http: aiohttp.ClientSession,
                                               content_type: str | None) -> None:
    """No Content-Type at all is taken as the crdtsync media type (the reference client
    sends none: protocol.md section 2)."""
    body = raw_request(ev=[raw_event(2, body={"ok": True})])
    reply = await victim.post(http, body, content_type=content_type)
    assert reply.status == 200 and reply.content_type == MEDIA_TYPE
    page = await victim.admin.events(device="d1")
    assert [e["body"] for e in page["events"]][-1] == {"ok": True}


async def test_corrupt_deflate_body(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await victim.post(http, b"\x78\x9c" + b"\xff" * 64,
                              headers={"Content-Encoding": "deflate"})
    assert (reply.status, reply.code()) == (400, "malformed_request")
    await victim.assert_survived()


@pytest.mark.parametrize("encoding", ["br", "compress", "x-custom"])
async def test_unsupported_content_encoding(victim: Victim, http: aiohttp.ClientSession,
                                           encoding: str) -> None:
    reply = await victim.post(http, raw_request(**VALID_PARTS),
                              headers={"Content-Encoding": encoding})
    assert (reply.status, reply.code()) == (415, "unsupported_encoding")
    assert reply.detail() == {"accepted": ["zstd", "deflate", "gzip", "identity"]}  # best first
    await victim.assert_survived()


async def test_corrupt_deflate_keeps_the_connection_usable(victim: Victim) -> None:
    """A keep-alive client (like HttpTransport) can reuse its connection after a bad body."""
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            reply = await victim.post(session, b"not deflate at all",
                                      headers={"Content-Encoding": "deflate"})
            assert (reply.status, reply.code()) == (400, "malformed_request")
    await victim.assert_survived()


async def test_truncated_deflate_body(victim: Victim, http: aiohttp.ClientSession) -> None:
    body = zlib.compress(raw_request(**VALID_PARTS))[:-6]
    reply = await victim.post(http, body, headers={"Content-Encoding": "deflate"})
    assert reply.status == 400
    assert reply.content_type == MEDIA_TYPE
    assert reply.code() == "malformed_request"
    await victim.assert_survived()


async def test_deflate_body_is_accepted(victim: Victim, http: aiohttp.ClientSession) -> None:
    # The control for the corrupt-deflate cases: the same encoding, intact, is served.
    good = raw_request(docs=[raw_doc(update_setting("z", 1))])
    reply = await victim.post(http, zlib.compress(good), headers={"Content-Encoding": "deflate"})
    assert reply.status == 200
    assert decode_response(reply.body).acked == 1
    assert (await victim.admin.state("d1"))["state"] == {"a": 1, "z": 1}


# --- events across requests: gaps, conflicts, replays --------------------------------------


async def test_seq_gap_across_requests(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await victim.post(http, raw_request(docs=[raw_doc(EVIL)],
                                                ev=[raw_event(3), raw_event(4)]))
    assert (reply.status, reply.code()) == (409, "seq_gap")
    assert reply.detail() == {"seq": 3, "last_seq": 1}
    await victim.assert_survived()


async def test_gap_below_purged_is_accepted(victim: Victim, http: aiohttp.ClientSession
                                            ) -> None:
    # The contrast to seq_gap: a device that says it purged seqs 2-4 may continue at 5.
    reply = await victim.post(http, raw_request(ev=[raw_event(5)], pg=4))
    assert reply.status == 200
    assert decode_response(reply.body).acked == 5
    device = await victim.admin.device("d1")
    assert (device["last_seq"], device["events_lost"]) == (5, 3)


@pytest.mark.parametrize("events", [
    pytest.param([raw_event(1, {"n": 999})], id="body-differs"),
    pytest.param([raw_event(1, {"n": 1}, topic="other")], id="topic-differs"),
    pytest.param([raw_event(1, {"n": 1}, time=T0 - 1)], id="time-differs"),
    pytest.param([raw_event(1, {"n": 999}), raw_event(2)], id="with-new-event"),
])
async def test_reused_seq_with_other_content(victim: Victim, http: aiohttp.ClientSession,
                                             events: list[Any]) -> None:
    reply = await victim.post(http, raw_request(docs=[raw_doc(EVIL)], ev=events))
    assert (reply.status, reply.code()) == (409, "seq_conflict")
    assert reply.detail() == {"seq": 1, "last_seq": 1}
    await victim.assert_survived()


async def test_identical_replay_is_acknowledged_once(victim: Victim, admin: AdminClient,
                                                     http: aiohttp.ClientSession) -> None:
    """The lost-response case: a device resends the very same request."""
    token = (await admin.add_device("raw1"))["token"]
    body = raw_request("raw1", docs=[raw_doc(update_setting("r", 1))],
                       ev=[raw_event(1), raw_event(2, {"x": [1, 2.5, None]})])
    first = await victim.post(http, body, token=token)
    second = await victim.post(http, body, token=token)
    assert first.status == second.status == 200
    one, two = decode_response(first.body), decode_response(second.body)
    assert one.acked == two.acked == 2
    assert one.docs[0].sv == two.docs[0].sv
    page = await admin.events(device="raw1")
    assert [(e["seq"], e["body"]) for e in page["events"]] == [
        (1, {"n": 1}), (2, {"x": [1, 2.5, None]})]
    assert await admin.state("raw1") == {"state": {"r": 1}}
    # A replay of only the older part is acknowledged with the newest seq, and stores nothing.
    third = await victim.post(http, raw_request("raw1", ev=[raw_event(1)]), token=token)
    assert decode_response(third.body).acked == 2
    assert len((await admin.events(device="raw1"))["events"]) == 2
    await victim.assert_survived()


# --- body limits (a server with a small max_body) -------------------------------------------

SMALL_BODY = 4096


@pytest.fixture
async def small_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = ServerConfig(db=str(tmp_path / "small.db"), port=0, admin_token=ADMIN_TOKEN,
                          max_body=SMALL_BODY)
    async with Server(config) as srv:
        yield srv


@pytest.mark.parametrize("make_body", [
    pytest.param(lambda ok: (ok + b"\x00" * SMALL_BODY, {}), id="plain"),
    pytest.param(lambda ok: (zlib.compress(b"\x00" * (SMALL_BODY * 256), 9),
                             {"Content-Encoding": "deflate"}), id="deflate-zip-bomb"),
    pytest.param(lambda ok: (zlib.compress(ok + b"\x00" * SMALL_BODY * 4),
                             {"Content-Encoding": "deflate"}), id="deflate-just-over"),
])
async def test_body_over_the_limit(small_server: Server, http: aiohttp.ClientSession,
                                   tmp_path: Path,
                                   make_body: Callable[[bytes], tuple[bytes, dict[str, str]]]
                                   ) -> None:
    async with AdminClient(small_server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", small_server.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            dev.state["a"] = 1
            await dev.emit(*BASELINE_EVENT, time_ms=T0)
            await dev.sync()
            ok = raw_request(docs=[raw_doc(EVIL)], ev=[raw_event(2)])
            body, headers = make_body(ok)
            assert len(body) <= SMALL_BODY or "Content-Encoding" not in headers
            reply = await call(http, "POST", small_server.url + SYNC_PATH, token=token,
                               body=body, headers=headers)
            assert (reply.status, reply.code()) == (413, "body_too_large")
            assert reply.detail() == {"max_body": SMALL_BODY}
            victim = Victim(dev, token, small_server.url, admin)
            await victim.assert_survived()


# --- the management API --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "code"), [
    pytest.param(b'{"x": 9007199254740992}', 400, "invalid_value", id="int-2**53"),
    pytest.param(b'{"x": -9007199254740992}', 400, "invalid_value", id="int-minus-2**53"),
    pytest.param(b'{"x": 9223372036854775808}', 400, "invalid_value", id="int-2**63"),
    pytest.param(b'{"x": {"y": [18446744073709551616]}}', 400, "invalid_value",
                 id="nested-int-2**64"),
    pytest.param(b'{"x": NaN}', 400, "invalid_value", id="nan"),
    pytest.param(b'{"x": Infinity}', 400, "invalid_value", id="infinity"),
    pytest.param(b'{"x": 1e999}', 400, "invalid_value", id="overflowing-float"),
    pytest.param(b'{"x": 1, "bad": 2, "y": 9007199254740992}', 400, "invalid_value",
                 id="one-bad-key-of-three"),
    pytest.param(b'{"x": ', 400, "malformed_request", id="invalid-json"),
    pytest.param(b"\xff\xfe", 400, "malformed_request", id="not-utf8"),
    pytest.param(b"[1, 2]", 400, "malformed_request", id="array"),
    pytest.param(b'"x"', 400, "malformed_request", id="string"),
    pytest.param(b"", 400, "malformed_request", id="empty"),
    pytest.param(b'{"": 1}', 400, "invalid_value", id="empty-key"),
])
async def test_bad_state_patch(victim: Victim, http: aiohttp.ClientSession, body: bytes,
                               status: int, code: str) -> None:
    reply = await call(http, "PATCH", victim.url + "/v1/devices/d1/state/state",
                       token=ADMIN_TOKEN, body=body, content_type="application/json")
    assert reply.status == status
    assert reply.content_type == "application/json"
    assert reply.json()["error"]["code"] == code
    await victim.assert_survived()


async def test_bad_map_name(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await call(http, "PATCH", victim.url + "/v1/devices/d1/state/" + "m" * 257,
                       token=ADMIN_TOKEN, body=b'{"x": 1}', content_type="application/json")
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_value")
    await victim.assert_survived()


async def test_patch_unknown_device(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await call(http, "PATCH", victim.url + "/v1/devices/nobody/state/state",
                       token=ADMIN_TOKEN, body=b'{"x": 1}', content_type="application/json")
    assert (reply.status, reply.json()["error"]["code"]) == (404, "not_found")
    await victim.assert_survived()


@pytest.mark.parametrize("query", [
    "after=abc", "after=-1", "after=1.5", "after=0x10", f"after={2**63}", "after=%201",
    "limit=abc", "limit=1001", "limit=-5",
    "after=%C2%B2",
])
async def test_bad_event_query(victim: Victim, http: aiohttp.ClientSession, query: str) -> None:
    reply = await call(http, "GET", victim.url + "/v1/events?" + query, token=ADMIN_TOKEN)
    assert (reply.status, reply.json()["error"]["code"]) == (400, "malformed_request")
    await victim.assert_survived()


DEEP_JSON = b"[" * 5000 + b"]" * 5000
"""Deeper than the recursion of Python's JSON parser (about 1,000 levels)."""
LONE_SURROGATE = b'"\\ud800"'
"""A JSON string escape that is not Unicode text (no UTF-8 encoder or store takes it)."""


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    pytest.param("GET", "/v1/projection?after=5", None, 400, "malformed_request",
                 id="projection-after-number"),
    pytest.param("GET", "/v1/projection?after=-1", None, 400, "malformed_request",
                 id="projection-after-negative"),
    pytest.param("GET", "/v1/projection?after=null", None, 400, "malformed_request",
                 id="projection-after-null"),
    pytest.param("GET", "/v1/projection?after=" + "%5B" * 1300 + "%5D" * 1300, None, 400,
                 "malformed_request", id="projection-after-deep"),
    pytest.param("GET", "/v1/commands/%C2%B2", None, 404, "not_found", id="command-id-²"),
    pytest.param("GET", "/v1/commands/99999999999999999999", None, 404, "not_found",
                 id="command-id-2**66"),
    pytest.param("GET", f"/v1/commands/{2**63}", None, 404, "not_found", id="command-id-2**63"),
    pytest.param("GET", "/v1/messages/%C2%B2", None, 404, "not_found", id="message-id-²"),
    pytest.param("PATCH", "/v1/devices/d1/state/state", b'{"x": ' + DEEP_JSON + b"}", 400,
                 "invalid_value", id="state-deep"),
    pytest.param("PATCH", "/v1/devices/d1/state/state", b'{"x": ' + LONE_SURROGATE + b"}",
                 400, "invalid_value", id="state-lone-surrogate"),
    pytest.param("PATCH", "/v1/devices/d1/state/state", b"{" + LONE_SURROGATE + b": 1}", 400,
                 "invalid_value", id="state-key-lone-surrogate"),
    pytest.param("POST", "/v1/devices", b'{"id": "d2", "meta": {"m": ' + LONE_SURROGATE
                 + b"}}", 400, "invalid_value", id="meta-lone-surrogate"),
    pytest.param("POST", "/v1/devices", b'{"id": "d2", "meta": {"m": ' + DEEP_JSON + b"}}",
                 400, "invalid_value", id="meta-deep"),
    pytest.param("PATCH", "/v1/devices/d1/env", b'{"E": ' + LONE_SURROGATE + b"}", 400,
                 "invalid_value", id="device-env-lone-surrogate"),
    pytest.param("PATCH", "/v1/env", b'{"E": ' + LONE_SURROGATE + b"}", 400,
                 "invalid_value", id="project-env-lone-surrogate"),
    pytest.param("POST", "/v1/devices/d1/messages", b'{"topic": "t", "body": '
                 + LONE_SURROGATE + b"}", 400, "invalid_value", id="message-lone-surrogate"),
    pytest.param("POST", "/v1/devices/d1/messages", b'{"topic": "t", "body": ' + DEEP_JSON
                 + b"}", 400, "invalid_value", id="message-deep"),
    pytest.param("POST", "/v1/fleets", b'{"id": "f1", "meta": ' + DEEP_JSON + b"}", 400,
                 "invalid_value", id="fleet-deep"),
    pytest.param("PUT", "/v1/sinks/s1", DEEP_JSON, 400, "invalid_value", id="sink-deep"),
])
async def test_bad_admin_input_is_a_typed_4xx(victim: Victim, http: aiohttp.ClientSession,
                                              method: str, path: str, body: bytes | None,
                                              status: int, code: str) -> None:
    reply = await call(http, method, victim.url + path, token=ADMIN_TOKEN, body=body,
                       content_type="application/json")
    assert (reply.status, reply.json()["error"]["code"]) == (status, code)
    assert (await victim.admin.request("GET", "/v1/devices"))["devices"][0]["id"] == "d1"
    await victim.assert_survived()


async def test_admin_json_takes_surrogate_pairs_and_64_levels(
        victim: Victim, http: aiohttp.ClientSession) -> None:
    """What the limits must not refuse: a character outside the BMP (an escaped surrogate
    pair), an escaped backslash before "ud800", and nesting up to 64 levels."""
    body = b'{"emoji": "\\ud83d\\ude00", "text": "\\\\ud800", "deep": ' \
        + b"[" * 30 + b"]" * 30 + b"}"
    reply = await call(http, "PATCH", victim.url + "/v1/devices/d1/state/state",
                       token=ADMIN_TOKEN, body=body, content_type="application/json")
    assert reply.status == 200
    assert reply.json()["emoji"] == "\U0001f600" and reply.json()["text"] == "\\ud800"
    sink = b'{"type": "webhook", "paused": true, "options": {"url": "https://h/x", ' \
        b'"secret": "s", "x": ' + b"[" * 61 + b"]" * 61 + b"}}"  # 64 levels with the envelope
    reply = await call(http, "PUT", victim.url + "/v1/sinks/s1", token=ADMIN_TOKEN,
                       body=sink, content_type="application/json")
    assert reply.status == 201


@pytest.mark.parametrize(("method", "path", "token"), [
    ("GET", "/v1/nope", None),
    ("GET", "/v1/nope", ADMIN_TOKEN),
    ("POST", "/v1/sync/extra", None),
    ("GET", "/", None),
    ("GET", "/v1/devices/d1/nothing", ADMIN_TOKEN),
])
async def test_unknown_route(victim: Victim, http: aiohttp.ClientSession, method: str,
                             path: str, token: str | None) -> None:
    reply = await call(http, method, victim.url + path, token=token)
    assert reply.status == 404
    assert reply.content_type == "application/json"
    assert reply.json()["error"]["code"] == "not_found"
    await victim.assert_survived()


async def test_wrong_method_on_sync(victim: Victim, http: aiohttp.ClientSession) -> None:
    reply = await call(http, "GET", victim.url + SYNC_PATH, token=victim.token)
    assert reply.status == 405
    assert reply.content_type == MEDIA_TYPE
    assert reply.code() == "bad_request"
    await victim.assert_survived()


# --- the device library refuses bad values before storing anything --------------------------


async def reopen(dev: Device, make_device: DeviceFactory) -> Device:
    """Close ``dev`` and open its store again, to see what was really persisted."""
    await dev.aclose()
    return await make_device(dev.id)


@pytest.mark.parametrize("value", [2**53, -(2**53), 2**63, 2**64, [1, 2**63], {"a": 2**63},
                                   math.nan, math.inf, b"bytes", {1: "a"}, object()])
async def test_device_refuses_bad_state_value(victim: Victim, make_device: DeviceFactory,
                                              value: Any) -> None:
    dev = victim.dev
    # pytest.raises(InvalidValue) would not catch pycrdt's PanicException (a BaseException).
    with pytest.raises(InvalidValue):
        dev.state["x"] = value
    with pytest.raises(InvalidValue):
        dev.state.update({"ok": 1, "x": value})
    assert dev.state.to_dict() == {"a": 1}
    victim.dev = await reopen(dev, make_device)
    assert victim.dev.state.to_dict() == {"a": 1}
    await victim.dev.sync()
    await victim.assert_survived()


@pytest.mark.parametrize(("topic", "body"), [
    pytest.param("", {}, id="empty-topic"),
    pytest.param("a/b", {}, id="slash-topic"),
    pytest.param("x" * 65, {}, id="long-topic"),
    pytest.param(5, {}, id="int-topic"),
    pytest.param("t", object(), id="object-body"),
    pytest.param("t", {1: "a"}, id="int-key"),
    pytest.param("t", {"b": bytearray(b"mutable")}, id="bytearray-value"),
    pytest.param("t", {"x": math.nan}, id="nan"),
    pytest.param("t", {"x": 2**63}, id="int-2**63"),
    pytest.param("t", {1, 2}, id="set"),
    pytest.param("t", "x" * 70_000, id="oversized"),
    pytest.param("t", {"x": msgpack.ExtType(5, b"")}, id="ext-type"),
    pytest.param("t", [msgpack.ExtType(42, b"data")], id="ext-type-in-list"),
    pytest.param("t", {"x": msgpack.Timestamp(1, 0)}, id="timestamp"),
])
async def test_device_refuses_bad_event(victim: Victim, make_device: DeviceFactory,
                                        topic: Any, body: Any) -> None:
    dev = victim.dev
    with pytest.raises(InvalidValue):
        await dev.emit(topic, body)
    assert dev.pending_events == 0
    victim.dev = await reopen(dev, make_device)
    assert victim.dev.pending_events == 0
    report = await victim.dev.sync()
    assert report.events_sent == 0
    await victim.assert_survived()  # the next good event still gets seq 2


async def test_device_event_body_int64_is_fine(victim: Victim) -> None:
    # Event bodies never enter a CRDT: the whole int64 range goes through, exactly.
    assert await victim.dev.emit("t", {"big": 2**63 - 1}) == 2
    await victim.dev.sync()
    page = await victim.admin.events(device="d1")
    assert page["events"][-1]["body"] == {"big": 2**63 - 1}
