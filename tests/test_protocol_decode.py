"""The request decoder against a frozen copy of its plain version (tests/_protocol_reference.py).

``decode_request`` and the event-body check take fast paths (one loop over the events,
remembered topics and key shapes, slot setters); every input must still give what the plain
decoder gives: the same :class:`SyncRequest`, or the same error (type, code, message,
detail). Inputs are random requests built field by field, valid and not, and random bytes
flipped, cut or appended in encoded requests.
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtsync import values
from crdtsync.errors import CrdtsyncError
from crdtsync.protocol import (
    DEFAULT_LIMITS,
    DocSync,
    Event,
    Limits,
    SyncRequest,
    TemplateBatch,
    decode_request,
    encode_request,
    encode_state_vector,
)

from . import _protocol_reference as reference

SMALL_LIMITS = Limits(max_docs=2, max_events=6, max_event_body=40, max_items=3,
                      max_sv_entries=3, max_item_body=40, max_stamps=3)

# --- values: scalars at and past every bound, containers, keys of every kind --------------

wire_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
"""Every integer msgpack carries."""
BIG_INTS = [2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63 - 1), -(2**63)]
scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=5),
    wire_ints, st.sampled_from(BIG_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=4),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2)),
    st.just(msgpack.Timestamp(1, 0)),
)
keys = st.one_of(st.text(max_size=4), st.sampled_from(["", "k" * 256, "k" * 257, "a" * 40]),
                 st.binary(max_size=3), st.integers(-2, 2))
bodies = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=5)),
    max_leaves=12,
)


def nested(depth: int, leaf: Any) -> Any:
    """``leaf`` inside ``depth`` levels of maps and arrays, in turn."""
    for level in range(depth):
        leaf = {"k": leaf} if level % 2 else [leaf]
    return leaf


deep_bodies = st.builds(nested, st.integers(values.MAX_DEPTH - 2, values.MAX_DEPTH + 2),
                        st.sampled_from([1, {}, [], {"a": 1}, [1]]))


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


flat_bodies = st.dictionaries(st.sampled_from(["temp", "hum", "voltage", "ts", "motion"]),
                              scalars, max_size=5)
"""The shape of most real event bodies (a few scalar members), the path the fast loop takes."""

body_bytes = st.one_of(
    st.builds(pack, st.one_of(flat_bodies, bodies, deep_bodies)),
    st.builds(lambda v, cut: pack(v)[:cut], bodies, st.integers(0, 6)),  # truncated
    st.builds(lambda v, tail: pack(v) + tail, bodies, st.binary(min_size=1, max_size=2)),
    st.binary(max_size=6),
)

# --- requests: every field valid, missing, of the wrong type or out of range --------------

seqs = st.one_of(st.integers(-1, 8), st.sampled_from([2**63 - 1, 2**63, True, 1.0, "1", None]))
times = st.one_of(st.integers(-1, 2**63 + 1), st.sampled_from([True, 1.5, None, "0"]))
topics = st.one_of(st.sampled_from(["readings", "alarms", "t", "x" * 64, "x" * 65, "bad topic",
                                    "t\n", "", "é"]),
                   wire_ints, st.none(), st.lists(st.text(max_size=1), max_size=1))
events = st.one_of(
    st.builds(lambda *f: list(f), seqs, topics, times, body_bytes),
    st.lists(st.integers(1, 3), max_size=5),  # wrong length
    st.sampled_from([None, 5, "ev", b"ev", {"seq": 1}]),
)


def consecutive_events(start: int, bodies_: list[bytes], topic: str) -> list[list[Any]]:
    return [[start + i, topic, 1_700_000_000_000 + i, b] for i, b in enumerate(bodies_)]


event_lists = st.one_of(
    st.builds(consecutive_events, st.integers(1, 3), st.lists(body_bytes, max_size=7),
              st.sampled_from(["readings", "alarms"])),
    st.lists(events, max_size=7),
    st.sampled_from([None, {}, "x", 3]),
)

state_vectors = st.one_of(
    st.builds(encode_state_vector, st.dictionaries(st.integers(0, 2**53), st.integers(0, 2**32),
                                                   max_size=4)),
    st.binary(max_size=12),
)
docs = st.fixed_dictionaries(
    {"d": st.sampled_from(["state", "fleet", "project", "other", "bad name", 5, None])},
    optional={"g": st.one_of(st.integers(-1, 3), st.just(True)),
              "sv": st.one_of(state_vectors, st.none(), st.text(max_size=2)),
              "u": st.one_of(st.binary(max_size=4), st.none(), wire_ints),
              "c": st.one_of(st.integers(0, 2**32), st.just(True), st.none()),
              "a": st.one_of(st.booleans(), st.integers(0, 1)),
              "s": st.one_of(st.lists(st.lists(st.one_of(st.text(max_size=3), st.integers(0, 5),
                                                         st.builds(pack, flat_bodies)),
                                               min_size=3, max_size=5), max_size=3),
                             st.none())},
)
uints = st.one_of(st.integers(-1, 5), st.sampled_from([2**63 - 1, 2**63, True, None, "1"]))
items = st.lists(st.one_of(st.integers(0, 3), st.booleans(), st.text(max_size=3),
                           st.builds(pack, flat_bodies), st.none()), max_size=4)

requests = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 1, 1, 1, 2, True, None]),
     "t": st.sampled_from(["sync"] * 8 + ["error", None]),
     "dev": st.sampled_from(["d1"] * 8 + ["", "bad dev", None, 7])},
    optional={"ev": event_lists,
              "docs": st.one_of(st.lists(docs, max_size=3), st.just("docs")),
              "tev": st.one_of(st.lists(st.one_of(
                  st.lists(st.one_of(st.just("readings"), st.binary(max_size=3)),
                           min_size=2, max_size=2), wire_ints), max_size=2), st.none()),
              "pg": uints, "dn": uints, "rqw": uints, "ck": uints,
              "res": st.one_of(st.lists(items, max_size=2), st.none()),
              "rq": st.one_of(st.lists(items, max_size=2), st.none()),
              "rqk": st.one_of(st.lists(st.one_of(st.text(max_size=3), wire_ints),
                                        max_size=2), st.none())},
)


def outcome(decode: Any, data: bytes, limits: Limits) -> Any:
    """What ``decode`` gives: its result, or the error's type, code, message and detail."""
    try:
        return decode(data, limits)
    except CrdtsyncError as exc:
        return (type(exc), exc.code, exc.message, exc.detail)


def assert_same(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    assert outcome(decode_request, data, limits) == outcome(reference.decode_request, data,
                                                            limits)


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests, st.booleans())
def test_random_requests_decode_as_the_reference_does(request: dict[str, Any],
                                                      small: bool) -> None:
    assert_same(pack(request), SMALL_LIMITS if small else DEFAULT_LIMITS)


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(body_bytes, max_size=4), st.sampled_from(["readings", "new-topic", "t:1"]))
def test_event_bodies_decode_as_the_reference_does(raw_bodies: list[bytes], topic: str) -> None:
    assert_same(pack({"v": 1, "t": "sync", "dev": "d1",
                      "ev": consecutive_events(1, raw_bodies, topic)}))


def typical_request(rng: random.Random, events_count: int) -> bytes:
    """A request like bench/throughput.py's devices send: a state update and readings."""
    readings = [Event(seq, "readings", 1_700_000_000_000 + seq,
                      {"temp": round(rng.uniform(19, 23), 1), "hum": rng.randint(30, 50),
                       "voltage": round(rng.uniform(3.6, 3.8), 2), "ts": 1_700_000_000 + seq,
                       "motion": rng.random() < 0.5})
                for seq in range(1, events_count + 1)]
    sv = encode_state_vector({rng.randrange(2**32): rng.randrange(100)})
    return encode_request(SyncRequest("d1", (DocSync("state", sv, b"\x00\x00"),),
                                      tuple(readings), batches=()))


def test_mutated_typical_requests_decode_as_the_reference_does() -> None:
    """Seeded byte flips, cuts and insertions in realistic requests: every result agrees."""
    rng = random.Random(17)
    for _ in range(3000):
        data = bytearray(typical_request(rng, rng.randint(0, 12)))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            match rng.randrange(4):
                case 0:
                    data[pos] = rng.randrange(256)
                case 1:
                    data[pos] ^= 1 << rng.randrange(8)
                case 2:
                    del data[pos:pos + rng.randint(1, 4)]
                case _:
                    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        for limits in (DEFAULT_LIMITS, SMALL_LIMITS):
            assert_same(bytes(data), limits)


def test_valid_typical_requests_decode_to_the_same_events() -> None:
    rng = random.Random(3)
    for count in (0, 1, 10, 100):
        data = typical_request(rng, count)
        decoded = decode_request(data)
        assert decoded == reference.decode_request(data)
        assert len(decoded.events) == count
        assert all(type(e) is Event for e in decoded.events)


def test_templated_requests_decode_as_the_reference_does() -> None:
    """Templated batches lift the consecutive-seq rule on plain events; the rest holds."""
    for ev in ([], [[1, "readings", 5, pack({"a": 1})], [3, "readings", 5, pack({"a": 2})]]):
        for tev in ([], [["readings", b"\x01\x02"]], [["readings", b""]], [["bad topic", b"x"]]):
            assert_same(pack({"v": 1, "t": "sync", "dev": "d1", "ev": ev, "tev": tev}))
    request = SyncRequest("d1", batches=(TemplateBatch("readings", b"\x01"),))
    assert decode_request(encode_request(request)) == request


def test_a_gap_anywhere_is_refused_as_before() -> None:
    body = pack({"a": 1})
    for seq_list in ([1, 2, 4], [2, 1], [1, 1], [5, 6, 7], [1, 2, 3]):
        ev = [[seq, "readings", 5, body] for seq in seq_list]
        assert_same(pack({"v": 1, "t": "sync", "dev": "d1", "ev": ev}))


# --- the value checks alone -----------------------------------------------------------------


def check_outcome(check: Any, value: Any, **kw: Any) -> Any:
    try:
        check(value, **kw)
    except CrdtsyncError as exc:
        return (type(exc), exc.message, exc.detail)
    return None


checked_values = st.one_of(bodies, deep_bodies, flat_bodies,
                           st.builds(tuple, st.lists(scalars, max_size=3)))
"""Event bodies of every shape, nesting around the limit, and tuples (test_speedups too)."""


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(checked_values)
def test_value_checks_agree_with_the_reference(value: Any) -> None:
    assert_checks_agree(value)


def assert_checks_agree(value: Any) -> None:
    """The fast checks only say "valid" when the full check accepts, and the checks raise
    exactly what the reference raises, for event bodies and for document values."""
    if values.event_body_ok(value):
        assert check_outcome(reference.check_event_body, value) is None
    assert values.event_body_ok(value) == reference.event_body_ok(value)
    assert values.event_body_ok_py(value) == reference.event_body_ok(value)
    assert (check_outcome(values.check_event_body, value)
            == check_outcome(reference.check_event_body, value))
    assert (check_outcome(values.check_value, value)
            == check_outcome(reference.check_value, value))


@pytest.mark.parametrize("value", [
    {"a": math.nan}, {"a": math.inf}, {"a": -math.inf}, {"a": 2**63}, {"a": -(2**63)},
    {"a": 2**63 - 1}, {"a": -(2**63 - 1)}, {"": 1}, {"k" * 257: 1}, {"k" * 256: 1},
    {b"k": 1}, {1: 1}, {"a": b"x"}, {"a": [b"x"]}, {"a": msgpack.ExtType(1, b"")},
    nested(values.MAX_DEPTH, 1), nested(values.MAX_DEPTH + 1, 1),
    nested(values.MAX_DEPTH, {}), nested(values.MAX_DEPTH + 1, {}),
])
def test_edge_values_agree_with_the_reference(value: Any) -> None:
    for _ in range(2):  # the second time, the map's key shape is remembered
        assert_checks_agree(value)
