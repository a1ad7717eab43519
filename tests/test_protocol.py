"""The wire codec (crdtsync.protocol) and value rules (crdtsync.values), without I/O.

Golden fixtures live in ``tests/data/protocol/<case>.bin``. They were written by
:func:`write_fixtures` from the fixed inputs in :data:`CASES`; rewrite them only on purpose,
after a deliberate wire-format change, with ``CRDTSYNC_REGEN_FIXTURES=1 pytest
tests/test_protocol.py`` (and say so in docs/protocol.md and the CHANGELOG).
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtsync import crdt
from crdtsync.errors import (
    BodyTooLarge,
    CorruptUpdate,
    CrdtsyncError,
    InvalidStateVector,
    InvalidValue,
    MalformedRequest,
    SeqConflict,
    TooManyEvents,
    UnsupportedVersion,
)
from crdtsync.protocol import (
    DEFAULT_LIMITS,
    INVALID_ITEM,
    ITEM_TOO_LARGE,
    MAX_CLIENT_ID,
    MAX_CLOCK,
    MAX_SEQ,
    DocSync,
    Event,
    SyncRequest,
    SyncResponse,
    decode_error,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
    encode_state_vector,
    item_body,
    parse_state_vector,
)
from crdtsync.values import MAX_DEPTH, MAX_SAFE_INTEGER, check_value, normalize

FIXTURES = Path(__file__).parent / "data" / "protocol"
REGEN = os.environ.get("CRDTSYNC_REGEN_FIXTURES") == "1"

# Yjs v1 updates made once with pycrdt 0.14.13 and frozen here, so the fixtures do not depend
# on how a later pycrdt happens to encode the same edits:
#   Doc(client_id=7): state["x"] = 1; state["y"] = "hi"
DEVICE_UPDATE = bytes.fromhex(
    "0102070028010573746174650178017c3f80000028010573746174650179017702686900")
DEVICE_SV = bytes.fromhex("010702")
#   Doc(client_id=1234): state["interval"] = 30; state["mode"] = "eco"
CLOUD_UPDATE = bytes.fromhex(
    "0102d20900280105737461746508696e74657276616c017c41f000002801057374617465046d6f64650177"
    "0365636f00")
CLOUD_SV = bytes.fromhex("01d20902")
T0 = 1_700_000_000_000

CASES: dict[str, tuple[str, Any]] = {
    "request_empty": ("request", SyncRequest(device="dev-1")),
    "request_state_only": ("request", SyncRequest(
        device="dev-1", docs=(DocSync("state", DEVICE_SV, DEVICE_UPDATE),))),
    "request_with_update_and_events": ("request", SyncRequest(
        device="sensor-7",
        docs=(DocSync("state", DEVICE_SV, DEVICE_UPDATE, gen=0),),
        events=(
            Event(41, "readings", T0, {"temp": 21.5, "ok": True, "n": -3}),
            Event(42, "alarms.high", T0 + 1, {"tags": ["a", "b"], "none": None,
                                              "big": 2**62, "s": "é"}),
        ),
        purged=40,
    )),
    "request_generation": ("request", SyncRequest(
        device="gw:01", docs=(DocSync("state", encode_state_vector({}), b"", gen=3),))),
    "response_empty": ("response", SyncResponse(acked=0, time=T0)),
    "response_with_update": ("response", SyncResponse(
        docs=(DocSync("state", encode_state_vector({7: 2, 1234: 2}), CLOUD_UPDATE),),
        acked=42, time=T0 + 5)),
    "error_seq_conflict": ("error", SeqConflict(
        "device 'sensor-7' reused seq 5 with different content", {"seq": 5, "last_seq": 3})),
    "error_body_too_large": ("error", BodyTooLarge("body over 4096 bytes",
                                                   {"max_body": 4096})),
}


def encode_case(kind: str, value: Any) -> bytes:
    if kind == "request":
        return encode_request(value)
    if kind == "response":
        return encode_response(value)
    return encode_error(value)


def write_fixtures(directory: Path = FIXTURES) -> None:
    """Write every case of :data:`CASES` as ``<case>.bin`` (the fixture generator)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (kind, value) in CASES.items():
        (directory / f"{name}.bin").write_bytes(encode_case(kind, value))


@pytest.fixture(scope="module", autouse=True)
def _regenerate_fixtures() -> None:
    if REGEN:
        write_fixtures()


def error_fields(error: CrdtsyncError) -> tuple[Any, ...]:
    return type(error), error.code, error.message, error.detail, error.retryable


# --- golden fixtures -----------------------------------------------------------------------


def test_fixture_files_match_cases() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.bin")) == sorted(CASES)


def test_frozen_updates_are_what_they_claim() -> None:
    doc: Doc[Any] = Doc(client_id=99)
    doc.apply_update(DEVICE_UPDATE)
    doc.apply_update(CLOUD_UPDATE)
    assert crdt.to_json(doc) == {"state": {"x": 1, "y": "hi", "interval": 30, "mode": "eco"}}
    assert parse_state_vector(doc.get_state()) == {7: 2, 1234: 2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_fixture(name: str) -> None:
    kind, expected = CASES[name]
    data = (FIXTURES / f"{name}.bin").read_bytes()
    assert encode_case(kind, expected) == data, "encoder output changed for fixed input"
    if kind == "request":
        decoded = decode_request(data)
        assert decoded == expected
        assert encode_request(decoded) == data
    elif kind == "response":
        decoded_resp = decode_response(data)
        assert decoded_resp == expected
        assert encode_response(decoded_resp) == data
    else:
        error = decode_error(data, expected.status)
        assert error_fields(error) == error_fields(expected)
        assert encode_error(error) == data
        with pytest.raises(type(expected)) as info:
            decode_response(data)
        assert info.value.detail == expected.detail


# --- round trips ---------------------------------------------------------------------------


def test_request_carries_crc_of_update() -> None:
    msg = msgpack.unpackb(encode_request(CASES["request_state_only"][1]))
    assert msg["v"] == 1 and msg["t"] == "sync" and msg["dev"] == "dev-1"
    assert msg["docs"][0]["c"] == zlib.crc32(DEVICE_UPDATE)


def test_request_with_preencoded_bodies() -> None:
    req = SyncRequest(device="d", events=(Event(1, "t", 0, None),))
    data = encode_request(req, bodies=[msgpack.packb({"a": 1})])
    assert decode_request(data).events[0].body == {"a": 1}


def test_every_error_class_round_trips_through_a_frame() -> None:
    from crdtsync import errors

    wire = [c for c in vars(errors).values() if isinstance(c, type)
            and issubclass(c, CrdtsyncError) and c.status and c is not CrdtsyncError]
    assert len(wire) >= 20
    for cls in wire:
        original = cls("why", {"k": [1, "v"]})
        back = decode_error(encode_error(original), cls.status)
        assert error_fields(back) == error_fields(original)


def test_items_a_receiver_cannot_take_are_refused_one_by_one() -> None:
    """One downlink item or outcome over the limit or not JSON data is marked refused; the
    rest of the response decodes (docs/protocol.md 14)."""
    big = msgpack.packb("x" * DEFAULT_LIMITS.max_item_body)
    fits = msgpack.packb({"n": 1})
    data = msgpack.packb({"v": 1, "t": "sync", "ack": 3, "time": 1, "down": [
        [1, 0, "t", big, 0], [2, 1, "m", b"\xc1", 0], [3, 0, "t", fits, 0]],
        "out": [["r1", big], ["r2", msgpack.packb([1])], ["r3", msgpack.packb({"ok": True})]]})
    resp = decode_response(data)
    assert resp.acked == 3
    assert [(d.seq, d.body, d.refused and d.refused.code) for d in resp.down] == [
        (1, None, ITEM_TOO_LARGE), (2, None, INVALID_ITEM), (3, {"n": 1}, None)]
    assert [(o.id, o.outcome["ok"], o.outcome.get("error"), o.refused and o.refused.code)
            for o in resp.outcomes] == [("r1", False, ITEM_TOO_LARGE, ITEM_TOO_LARGE),
                                        ("r2", False, INVALID_ITEM, INVALID_ITEM),
                                        ("r3", True, None, None)]
    assert resp.outcomes[2].outcome == {"ok": True}


def test_item_body_limit_is_exact() -> None:
    fits = "x" * (DEFAULT_LIMITS.max_item_body - 3)  # a str16: 3 bytes of header
    assert len(item_body(fits)) == DEFAULT_LIMITS.max_item_body
    with pytest.raises(BodyTooLarge) as info:
        item_body(fits + "x")
    assert info.value.detail == {"max_item_body": DEFAULT_LIMITS.max_item_body,
                                 "size": DEFAULT_LIMITS.max_item_body + 1}


def test_unknown_error_code_keeps_its_code() -> None:
    frame = msgpack.packb({"v": 1, "t": "error", "code": "from_the_future", "msg": "m"})
    assert decode_error(frame, 429).detail == {"code": "from_the_future"}
    assert decode_error(frame, 503).retryable
    assert decode_error(b"<html>bad gateway</html>", 502).code == "internal"
    assert decode_error(b"", 400).code == "bad_request"


# --- decode errors (unit level; end to end in test_bad_input.py) -------------------------------


def _msg(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "t": "sync", "dev": "d1"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


def _doc(update: bytes = DEVICE_UPDATE, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"d": "state", "g": 0, "sv": DEVICE_SV, "u": update,
                           "c": zlib.crc32(update)}
    doc.update(fields)
    return doc


def _event(seq: int, body: Any = None, topic: Any = "t", time: Any = 0) -> list[Any]:
    return [seq, topic, time, msgpack.packb(body)]


@pytest.mark.parametrize(("data", "error"), [
    (b"", MalformedRequest),
    (b"\xc1", MalformedRequest),
    (msgpack.packb([1, 2]), MalformedRequest),
    (msgpack.packb({"v": 1}) + b"x", MalformedRequest),
    (msgpack.packb({1: 2}), MalformedRequest),
    (_msg(v=2), UnsupportedVersion),
    (_msg(v=...), UnsupportedVersion),
    (_msg(v="1"), UnsupportedVersion),
    (_msg(t="hello"), MalformedRequest),
    (_msg(dev=...), MalformedRequest),
    (_msg(dev="a/b"), MalformedRequest),
    (_msg(dev="x" * 65), MalformedRequest),
    (_msg(docs={}), MalformedRequest),
    (_msg(docs=[_doc(c=0)]), CorruptUpdate),
    (_msg(docs=[_doc(c="x")]), CorruptUpdate),
    (_msg(docs=[_doc(sv=b"\x05")]), InvalidStateVector),
    (_msg(docs=[_doc(sv="010702")]), MalformedRequest),
    (_msg(docs=[_doc(d="../etc")]), MalformedRequest),
    (_msg(docs=[_doc(g=-1)]), MalformedRequest),
    (_msg(docs=[_doc(), _doc()]), MalformedRequest),
    (_msg(docs=[_doc(d=f"d{i}") for i in range(9)]), MalformedRequest),
    (_msg(ev=[_event(1), _event(3)]), MalformedRequest),
    (_msg(ev=[_event(2), _event(1)]), MalformedRequest),
    (_msg(ev=[_event(0)]), MalformedRequest),
    (_msg(ev=[_event(-1)]), MalformedRequest),
    (_msg(ev=[_event(True)]), MalformedRequest),
    (_msg(ev=[[1, "t", 0]]), MalformedRequest),
    (_msg(ev=[[1, "t", 0, {"not": "bytes"}]]), MalformedRequest),
    (_msg(ev=[[1, "t", 0, b"\xc1"]]), MalformedRequest),
    (_msg(ev=[_event(1, topic="")]), MalformedRequest),
    (_msg(ev=[_event(1, time=-5)]), MalformedRequest),
    (_msg(ev=[_event(1, time=True)]), MalformedRequest),
    (_msg(ev=[_event(1, time=2**64 - 1)]), MalformedRequest),
    (_msg(ev=[_event(1, topic=["t"])]), MalformedRequest),  # unhashable: not a cached topic
    (_msg(ev=[_event(1, topic=5)]), MalformedRequest),
    (_msg(ev=[_event(1), _event(2, topic="t" * 65)]), MalformedRequest),
    (_msg(ev=[_event(1, {"n": 2**63})]), InvalidValue),
    (_msg(ev=[_event(1, {"n": 2**64 - 1})]), InvalidValue),
    (_msg(ev=[_event(1, {"n": -(2**63)})]), InvalidValue),
    (_msg(ev=[_event(1, {"n": math.nan})]), InvalidValue),
    (_msg(ev=[[1, "t", 0, b"\x81\xc4\x01k\x01"]]), InvalidValue),  # bytes map key
    (_msg(ev=[_event(1, "x" * (64 * 1024))]), InvalidValue),
    (_msg(ev=[_event(i) for i in range(1, 1002)]), TooManyEvents),
    (_msg(pg=-1), MalformedRequest),
    (_msg(pg=2**64 - 1), MalformedRequest),
])
def test_decode_request_rejects(data: bytes, error: type[CrdtsyncError]) -> None:
    with pytest.raises(CrdtsyncError) as info:
        decode_request(data)
    assert type(info.value) is error


@pytest.mark.parametrize("field", ["dev", "topic", "doc"])
def test_names_with_trailing_newline_are_rejected(field: str) -> None:
    bad = "d1\n"
    data = {
        "dev": _msg(dev=bad),
        "topic": _msg(ev=[_event(1, topic=bad)]),
        "doc": _msg(docs=[_doc(d=bad)]),
    }[field]
    with pytest.raises(MalformedRequest):
        decode_request(data)


def test_event_body_ints_up_to_int64_pass_the_codec() -> None:
    # Event bodies never enter a CRDT, so the codec allows the whole int64 range.
    req = decode_request(_msg(ev=[_event(1, {"a": 2**63 - 1, "b": -(2**63 - 1)})]))
    assert req.events[0].body == {"a": 2**63 - 1, "b": -(2**63 - 1)}


def test_error_frame_of_unknown_status_without_frame() -> None:
    assert decode_error(msgpack.packb({"t": "sync"}), 500).code == "internal"


# --- state vectors -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, MAX_CLIENT_ID), st.integers(1, 5)), max_size=5,
                unique_by=lambda t: t[0]))
def test_parse_state_vector_matches_pycrdt(writers: list[tuple[int, int]]) -> None:
    merged: Doc[Any] = Doc(client_id=MAX_CLIENT_ID - 1 if writers else 1)
    for client, writes in writers:
        doc: Doc[Any] = Doc(client_id=client)
        root = doc.get("state", type=Map)
        for i in range(writes):
            root[f"k{client}-{i}"] = i
        merged.apply_update(doc.get_update())
    sv = merged.get_state()
    parsed = parse_state_vector(sv)
    assert parsed == dict(writers)
    # Our encoding of the same clocks is one pycrdt understands the same way.
    ours = encode_state_vector(parsed)
    assert parse_state_vector(ours) == parsed
    assert merged.get_update(ours) == merged.get_update(sv)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(st.integers(0, MAX_CLIENT_ID), st.integers(0, MAX_CLOCK), max_size=20))
def test_state_vector_round_trip(clocks: dict[int, int]) -> None:
    assert parse_state_vector(encode_state_vector(clocks)) == clocks


VALID_SV = encode_state_vector({7: 2, 2**40: 3, MAX_CLIENT_ID: MAX_CLOCK})


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    *(pytest.param(VALID_SV[:n], id=f"truncated-{n}") for n in range(1, len(VALID_SV))),
    pytest.param(VALID_SV + b"\x00", id="trailing-zero"),
    pytest.param(DEVICE_SV + b"garbage", id="trailing-garbage"),
    pytest.param(b"\x01" + b"\x80" * 7 + b"\x10" + b"\x01", id="client-2**53"),
    pytest.param(encode_state_vector({2**60: 1}), id="client-2**60"),
    pytest.param(b"\x01\x07" + b"\x80\x80\x80\x80\x10", id="clock-2**32"),
    pytest.param(b"\x02\x07\x01\x07\x02", id="repeated-client"),
    pytest.param(b"\x01\x07" + b"\x80" * 10 + b"\x01", id="over-long-varint"),
    pytest.param(b"\xff" * 20, id="over-long-count"),
    pytest.param(b"\x80\x80\x80\x80\x80\x01", id="too-many-entries"),
    pytest.param(b"\x01\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", id="clock-2**64"),
])
def test_parse_state_vector_rejects(data: bytes) -> None:
    with pytest.raises(InvalidStateVector):
        parse_state_vector(data)


def test_state_vector_bounds_are_inclusive() -> None:
    assert parse_state_vector(encode_state_vector({MAX_CLIENT_ID: MAX_CLOCK})) == {
        MAX_CLIENT_ID: MAX_CLOCK}
    assert parse_state_vector(b"\x00") == {}


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    None, True, False, 0, MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 1.5, -0.0, 1e308, "", "é",
    [], (), {}, [1, "a", None], {"a": {"b": [1, 2, {"c": 3.5}]}}, {"k" * 256: 1},
])
def test_check_value_accepts(value: Any) -> None:
    check_value(value)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [
    2**53, -(2**53), 2**63, -(2**63), 2**64, 10**100, [2**53], {"a": {"b": 2**63}},
    math.nan, math.inf, -math.inf, [math.nan],
    {1: "a"}, {b"k": 1}, {None: 1}, {"": 1}, {"k" * 257: 1}, {"a": {(1, 2): 1}},
    _nested(MAX_DEPTH + 1), b"bytes", bytearray(b"x"), {1, 2}, frozenset(), object(),
    Decimal("1.5"), 1j, Path("x"), msgpack.ExtType(1, b"x"),
])
def test_check_value_rejects(value: Any) -> None:
    with pytest.raises(InvalidValue):
        check_value(value)


def test_check_value_depth_limit_is_exact() -> None:
    check_value(_nested(MAX_DEPTH))
    with pytest.raises(InvalidValue):
        check_value(_nested(MAX_DEPTH + 1))


def test_check_value_max_int_for_event_bodies() -> None:
    check_value(2**63 - 1, max_int=2**63 - 1)
    check_value(-(2**63 - 1), max_int=2**63 - 1)
    with pytest.raises(InvalidValue):
        check_value(2**63, max_int=2**63 - 1)


@pytest.mark.parametrize("value", [2**53, 2**63, -(2**63), 2**64, [2**63], {"n": 2**70}])
def test_huge_ints_never_reach_pycrdt(value: Any) -> None:
    # pycrdt panics (a BaseException that pytest.raises(InvalidValue) would not catch) on
    # ints of 2**63 or more; crdt.write must stop them first, with nothing written.
    doc: Doc[Any] = Doc(client_id=1)
    crdt.write(doc, "state", {"ok": 1})
    before = doc.get_update()
    with pytest.raises(InvalidValue):
        crdt.write(doc, "state", {"fine": 2, "bad": value})
    assert doc.get_update() == before
    assert crdt.to_json(doc) == {"state": {"ok": 1}}


@pytest.mark.parametrize(("raw", "expected"), [
    (5.0, 5), (5.5, 5.5), (-0.0, 0), (float(MAX_SAFE_INTEGER), MAX_SAFE_INTEGER),
    (2.0**53, 2.0**53), (1e300, 1e300), (True, True), ("5.0", "5.0"), (None, None),
    ([1.0, [2.0, 2.5]], [1, [2, 2.5]]), ({"a": 3.0, "b": {"c": 4.0}}, {"a": 3, "b": {"c": 4}}),
])
def test_normalize(raw: Any, expected: Any) -> None:
    result = normalize(raw)
    assert result == expected
    assert type(result) is type(expected)


def test_numbers_read_back_as_written() -> None:
    doc: Doc[Any] = Doc(client_id=1)
    crdt.write(doc, "state", {"i": 5, "f": 2.5, "max": MAX_SAFE_INTEGER, "n": [1, 2.0]})
    copy: Doc[Any] = Doc(client_id=2)
    copy.apply_update(doc.get_update())
    state = crdt.to_json(copy)["state"]
    assert state == {"i": 5, "f": 2.5, "max": MAX_SAFE_INTEGER, "n": [1, 2]}
    assert type(state["i"]) is int and type(state["max"]) is int


# --- property tests ------------------------------------------------------------------------

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
keys = st.text(min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63 - 1), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children,
                                                                      max_size=4),
    max_leaves=12,
)
state_vectors = st.dictionaries(st.integers(0, MAX_CLIENT_ID), st.integers(0, MAX_CLOCK),
                                max_size=4).map(encode_state_vector)
doc_syncs = st.builds(DocSync, doc=names, sv=state_vectors, update=st.binary(max_size=64),
                      gen=st.integers(0, MAX_SEQ))


@st.composite
def sync_requests(draw: st.DrawFn) -> SyncRequest:
    count = draw(st.integers(0, 5))
    first = draw(st.integers(1, MAX_SEQ - count))
    events = tuple(
        Event(first + i, draw(names), draw(st.integers(0, MAX_SEQ)), draw(json_values))
        for i in range(count))
    docs = draw(st.lists(doc_syncs, max_size=3, unique_by=lambda d: d.doc))
    return SyncRequest(device=draw(names), docs=tuple(docs), events=events,
                       purged=draw(st.integers(0, MAX_SEQ)))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(sync_requests())
def test_any_valid_request_round_trips(req: SyncRequest) -> None:
    data = encode_request(req)
    decoded = decode_request(data)
    assert decoded == req
    assert encode_request(decoded) == data


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.builds(SyncResponse, docs=st.lists(doc_syncs, max_size=3, unique_by=lambda d: d.doc)
                 .map(tuple), acked=st.integers(0, MAX_SEQ), time=st.integers(0, MAX_SEQ)))
def test_any_valid_response_round_trips(resp: SyncResponse) -> None:
    data = encode_response(resp)
    assert decode_response(data) == resp
    assert encode_response(decode_response(data)) == data


def _decode_only_typed_errors(data: bytes) -> None:
    """The fuzz oracle: decoding either succeeds or raises a crdtsync error, nothing else."""
    try:
        req = decode_request(data)
    except CrdtsyncError:
        pass
    else:
        assert decode_request(encode_request(req)) == req
    with contextlib.suppress(CrdtsyncError):
        decode_response(data)
    assert isinstance(decode_error(data, 400), CrdtsyncError)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_only_typed_errors(data)


SEEDS = [encode_case(kind, value) for kind, value in CASES.values() if kind == "request"]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(mutated_messages())
def test_fuzz_mutated_messages(data: bytes) -> None:
    _decode_only_typed_errors(data)


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=10,
)


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, any wire value otherwise."""
    return st.one_of(good, good, good, wire_values)


@st.composite
def structured_messages(draw: st.DrawFn) -> bytes:
    """Well-formed msgpack maps with plausible fields, each sometimes of a wrong type or
    range: reaches the field checks that random bytes rarely get past."""
    doc = st.fixed_dictionaries({"d": _mostly(st.sampled_from(["state", "other"]))}, optional={
        "g": _mostly(st.integers(0, 2)),
        "sv": _mostly(state_vectors | st.binary(max_size=12)),
        "u": _mostly(st.binary(max_size=12) | st.just(DEVICE_UPDATE)),
        "c": _mostly(st.integers(0, 2**32))})
    event = st.tuples(_mostly(st.integers(-1, 4)), _mostly(names), _mostly(st.integers(-1, 9)),
                      _mostly(json_values.map(msgpack.packb) | wire_values.map(msgpack.packb)))
    msg = draw(st.fixed_dictionaries({"v": st.just(1), "t": st.just("sync"),
                                      "dev": _mostly(names)}, optional={
        "docs": _mostly(st.lists(_mostly(doc), max_size=3)),
        "ev": _mostly(st.lists(_mostly(event.map(list)), max_size=3)),
        "pg": _mostly(st.integers(-1, 5))}))
    return msgpack.packb(msg)  # type: ignore[no-any-return]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(structured_messages())
def test_fuzz_structured_messages(data: bytes) -> None:
    _decode_only_typed_errors(data)
