"""What the stores write for a value: the JSON text of every JSON column (``json_text``, orjson
with the stdlib encoder as fallback) and the event digest (``event_digests``). Stored data
written by earlier versions must keep its meaning: the JSON decodes to the same values as the
stdlib encoder's text, and the digest of an event is byte-for-byte the one stored before, so
a device resending it after an upgrade is still recognised as replaying it."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdtsync.protocol import Event
from crdtsync.values import json_default
from crdtsync_server.store.feed import json_text, json_texts
from crdtsync_server.store.rules import event_digest, event_digests

_REFERENCE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False,
                              default=json_default)
"""The encoder every JSON column used before orjson."""


def reference_digest(event: Event) -> bytes:
    """The digest as every earlier version computed and stored it."""
    packed = msgpack.packb([event.topic, event.time, event.body], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=16).digest()


def same_json(value: Any) -> None:
    text = json_text(value)
    assert json.loads(text) == json.loads(_REFERENCE.encode(value))
    assert isinstance(text, str)
    assert "\n" not in text and ": " not in text.replace('": "', "")  # compact


SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 + 5)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text() | st.binary())
VALUES = st.recursive(
    SCALARS,
    lambda inner: (st.lists(inner, max_size=5) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_json_text_decodes_like_the_stdlib_encoder(value: Any) -> None:
    same_json(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(VALUES, max_size=6))
def test_json_texts_is_json_text_of_each(values: list[Any]) -> None:
    """Also when one of them takes the fallback (an integer beyond 64 bits, a tuple key)."""
    assert json_texts(iter(values)) == [json_text(v) for v in values]
    assert json_texts([*values, 2**70]) == [json_text(v) for v in [*values, 2**70]]


@pytest.mark.parametrize("value", [
    1e-5, 1e16, 1e-7, 123456789.125, -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2,
    2**53 - 1, -(2**53) + 1, 2**63 - 1, -(2**63), 2**64 - 1,
    2**64, -(2**63) - 1, 2**100,  # beyond orjson: the stdlib encoder writes them
    "", "é", "日本語", "😀", "\x00\x1f\x7f", "\u2028\u2029", '"\\/', "\ud800",  # lone surrogate
    b"", b"\x00\xff", bytearray(b"abc"), {"bytes": [b"\x01"]},
    {1: "a", 2.5: "b", None: "c", False: "d"},  # non-string keys: the stdlib encoder's rules
    (1, (2, 3)), {"a": {"b": {"c": [1, 2.5, None, True, "x"]}}},
])
def test_json_text_edges(value: Any) -> None:
    same_json(value)


def test_json_text_deeper_than_orjson_goes() -> None:
    value: Any = 1
    for _ in range(300):
        value = [value]
    same_json(value)


class Level(enum.IntEnum):
    HIGH = 2


class Name(str):
    pass


def test_json_text_subclasses_of_json_types() -> None:
    same_json({Name("k"): Name("v"), "level": Level.HIGH, "flag": True})
    assert json_text({"n": Level.HIGH}) == '{"n":2}'


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize("value", [
    Point(1), datetime.datetime(2026, 1, 1), datetime.date(2026, 1, 1), {1, 2}, object(),
    memoryview(b"x"), {"deep": [Point(1)]},
])
def test_json_text_refuses_what_the_stdlib_encoder_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        _REFERENCE.encode(value)
    with pytest.raises(TypeError):
        json_text(value)


def test_json_text_bytes_are_base64_and_text_is_utf8() -> None:
    assert json_text({"b": b"\x00\xff", "s": "é😀"}) == '{"b":"AP8=","s":"é😀"}'


def test_json_text_non_finite_floats_cannot_be_stored_as_json() -> None:
    """None reaches a JSON column (``crdtsync.values`` refuses them); if one did, the text
    stays JSON (``null``) rather than the stdlib encoder's invalid ``NaN``."""
    assert json_text([math.nan, math.inf, -math.inf]) == "[null,null,null]"


BODIES = st.recursive(  # what an event body may hold (crdtsync.values.check_event_body)
    st.none() | st.booleans() | st.integers(-(2**63) + 1, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30,
)
EVENTS = st.builds(Event, seq=st.integers(1, 2**63 - 1), topic=st.text(max_size=20),
                   time=st.integers(0, 2**63 - 1), body=BODIES)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=6))
def test_event_digests_are_the_stored_ones(events: list[Event]) -> None:
    digests = event_digests(events)
    assert digests == [reference_digest(e) for e in events]
    assert [event_digest(e) for e in events] == digests


def test_event_digests_after_a_refused_body() -> None:
    """A body msgpack cannot pack raises as before, and leaves the packer shared by the
    batch clean for the events after it."""
    good = Event(seq=2, topic="t", time=1, body={"a": [1, b"x"]})
    with pytest.raises(OverflowError):
        event_digests([good, Event(seq=1, topic="t", time=1, body=2**64)])
    with pytest.raises(OverflowError):
        reference_digest(Event(seq=1, topic="t", time=1, body=2**64))
    assert event_digests([good, good]) == [reference_digest(good)] * 2


def test_event_digest_golden() -> None:
    """Pinned bytes: stores of every version hold these digests; changing them would turn
    every replay of an already-stored event into a ``SeqConflict``."""
    event = Event(seq=7, topic="readings", time=1796497911230,
                  body={"temp": 21.3, "raw": b"\x01\x02", "tags": ["a", "é"], "n": None})
    assert event_digest(event).hex() == reference_digest(event).hex() == GOLDEN


GOLDEN = "11cebcd9f57ceabea52e5acbafab2c8a"
