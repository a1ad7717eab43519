"""The C accelerator (``crdtsync._speedups``) against the pure-Python reference.

``read_update`` must return the fields of the :class:`UpdateInfo` the Python reader returns
for every update that reader accepts, and ``None`` for every update it refuses (the caller
then reads it in Python, which raises the typed error): never accept what Python refuses,
never crash, whatever the bytes. ``event_body_ok`` and ``valid`` must answer exactly what
``values.event_body_ok_py`` and ``values._valid_py`` answer.

Inputs: the structurally random updates of test_yupdate_properties (clean and hostile), the
pycrdt updates of test_yupdate_reference, arbitrary bytes, every cut and byte change of
those, and hand-made edges of the lib0 encodings (varint lengths and ranges, UTF-8, floats,
nesting, many clients and types). Where the module was not built these tests skip, except
with ``CI=true``: CI builds it, so a missing module there fails.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import sys
import weakref
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtsync import protocol, values, yupdate
from crdtsync._accel import speedups
from crdtsync.errors import CrdtsyncError, InvalidStateVector
from crdtsync.testing import yjs

from .test_protocol_decode import checked_values, nested
from .test_yupdate_properties import updates
from .test_yupdate_reference import every_cut_and_changes, mutations, pycrdt_updates, real_updates


def test_ci_builds_the_accelerator() -> None:
    """`pip install -e .` compiles it where a C compiler is (CI's machine has one)."""
    if speedups is None and os.environ.get("CI") != "true":
        pytest.skip("crdtsync._speedups was not built (no C compiler?)")
    assert speedups is not None
    assert values.event_body_ok is speedups.event_body_ok


needs_speedups = pytest.mark.skipif(
    speedups is None and os.environ.get("CI") != "true",
    reason="crdtsync._speedups was not built")


def python_fields(data: bytes) -> tuple[Any, ...] | None:
    try:
        info = yupdate.read_update_py(data, doc="state")
    except CrdtsyncError:
        return None
    return (info.structs, info.starts, info.ends, info.refs, info.skips)


def agree(data: bytes) -> None:
    assert speedups is not None
    native = speedups.read_update(data)
    expected = python_fields(data)
    assert native == expected, data.hex()
    if native is not None:  # the same insertion order: `missing` reports the first client
        assert list(native[1]) == list(expected[1])  # type: ignore[index]
        assert list(native[2]) == list(expected[2])  # type: ignore[index]


@needs_speedups
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(updates(), st.randoms(use_true_random=False))
def test_random_structures_and_their_mutations(update: bytes, rng: random.Random) -> None:
    for data in (update, *mutations(update, rng), *every_cut_and_changes(update, rng)):
        agree(data)


@needs_speedups
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(pycrdt_updates(), st.randoms(use_true_random=False))
def test_pycrdt_updates_and_their_mutations(update: bytes, rng: random.Random) -> None:
    for data in (update, *mutations(update, rng), *every_cut_and_changes(update, rng)):
        agree(data)


@needs_speedups
def test_real_updates_of_two_clients() -> None:
    rng = random.Random(5)
    for seed in range(5):
        for update in real_updates(seed):
            for data in (update, *mutations(update, rng)):
                agree(data)


@needs_speedups
@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.binary(max_size=64))
def test_arbitrary_bytes(data: bytes) -> None:
    agree(data)


def ok_key(key_value: Any) -> bytes:
    return yjs.set_key(9, 0, "x", key_value)


EDGES = [
    # varuints: lengths around 2**7, 2**28 (where the checks start), clock and client ranges
    *(yjs.update(yjs.client(client, 0, yjs.item(yjs.any_content(1), root="state", key="x")))
      for client in (0, 127, 128, 2**28 - 1, 2**28, 2**32, 2**53 - 1, 2**53)),
    *(yjs.update(yjs.client(9, clock, yjs.item(yjs.any_content(1), root="state", key="x")))
      for clock in (0, 2**28, 2**32 - 2, 2**32 - 1, 2**32)),
    # over-long varuints: zero bits in extra bytes read as the number, set bits past 2**53 not
    b"\x81\x80\x80\x80\x80\x80\x80\x80\x00" + yjs.varuint(0),
    b"\x81\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00" + yjs.varuint(0),
    b"\x81\x80\x80\x80\x80\x80\x80\x80\x10" + yjs.varuint(0),
    b"\x01\x01\x89\x80\x80\x80\x80\x00\x00\x28\x01\x05state\x01x\x08\x01\x7d\x01\x00",
    # signed varints around 2**53 and over-long ones
    *(ok_key(yjs.Varint(v)) for v in (63, 64, -64, 2**53 - 1, -(2**53 - 1), 2**53, -(2**53),
                                      2**56, 2**62)),
    yjs.set_key(9, 0, "x", raw=b"\x7d\xc1\x80\x80\x80\x80\x80\x80\x80\x80\x00"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\xc1\x80\x80\x80\x80\x80\x80\x80\x00"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\xc1\x80\x80\x80\x80\x80\x80\x00"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\x81\x80\x80\x80\x80\x80\x80\x03"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\x81\x80\x80\x80\x80\x80\x80\x04"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\xbf\xff\xff\xff\xff\xff\xff\x03"),
    yjs.set_key(9, 0, "x", raw=b"\x7d\xbf\xff\xff\xff\xff\xff\xff\x07"),
    # floats
    *(ok_key(v) for v in (0.5, -0.0, 1e308, math.inf, -math.inf, math.nan)),
    *(ok_key(yjs.Float32(v)) for v in (0.5, math.inf, math.nan)),
    yjs.set_key(9, 0, "x", raw=b"\x7b\x00\x00\x00"),
    # strings: UTF-8 and its errors, lengths in code points and UTF-16 units
    ok_key("é😀"), ok_key({"é" * 256: 1}), ok_key({"é" * 257: 1}), ok_key({"😀" * 256: 1}),
    yjs.set_key(9, 0, "é" * 256, 1), yjs.set_key(9, 0, "😀" * 257, 1),
    yjs.set_key(9, 0, "x", 1, root="é" * 256), yjs.set_key(9, 0, "x", 1, root="é" * 257),
    yjs.set_key(9, 0, "x", raw=b"\x77\x03\xed\xa0\x80"),  # a surrogate
    yjs.set_key(9, 0, "x", raw=b"\x77\x02\xc0\x80"),  # over-long NUL
    yjs.set_key(9, 0, "x", raw=b"\x77\x04\xf4\x90\x80\x80"),  # above U+10FFFF
    yjs.set_key(9, 0, "x", raw=b"\x77\x01\x00"),
    yjs.update(yjs.client(9, 0, yjs.item(yjs.string_content("a😀b"), parent=(9, 5)))),
    yjs.update(yjs.client(9, 0, yjs.item(yjs.type_content(2), root="state", key="t"),
                          yjs.item(yjs.string_content("😀😀"), parent=(9, 0)),
                          yjs.item(yjs.string_content("x"), origin=(9, 2)))),
    # nesting: any values and types at 32 and 33 levels
    yjs.set_key(9, 0, "x", raw=yjs.nested_array(31)),
    yjs.set_key(9, 0, "x", raw=yjs.nested_array(32)),
    yjs.set_key(9, 0, "x", raw=yjs.nested_array(33)),
]


def nested_types(depth: int, value_depth: int = 0) -> bytes:
    structs = [yjs.item(yjs.type_content(1), root="state", key="m")]
    structs += [yjs.item(yjs.type_content(1), parent=(9, i), key="m") for i in range(depth - 1)]
    if value_depth:
        structs.append(yjs.item(yjs.any_content(raw=yjs.nested_array(value_depth)),
                                parent=(9, depth - 1), key="v"))
    return yjs.update(yjs.client(9, 0, *structs))


def many_clients(count: int) -> bytes:
    return yjs.update(*(yjs.client(c * 7919, 0, yjs.item(yjs.any_content(c), root="state",
                                                        key="k"))
                        for c in range(1, count + 1)))


def same_client_twice() -> bytes:
    """One client's runs in two parts, the later part first: the clocks read are not
    sorted, and an item placed next to either part inherits its level."""
    high = yjs.client(9, 10, yjs.item(yjs.type_content(1), root="state", key="a"),
                      yjs.item(yjs.any_content(1), parent=(9, 10), key="b"))
    low = yjs.client(9, 0, yjs.item(yjs.type_content(1), parent=(9, 10), key="c"),
                     yjs.item(yjs.any_content(raw=yjs.nested_array(30)), origin=(9, 10)),
                     yjs.item(yjs.any_content(raw=yjs.nested_array(31)), origin=(9, 0)))
    return yjs.update(high, low)


EDGES += [nested_types(32), nested_types(33), nested_types(31, 1), nested_types(31, 2),
          nested_types(30, 2), many_clients(1), many_clients(40), many_clients(500),
          same_client_twice(),
          yjs.update(yjs.client(9, 0, yjs.gc(3), yjs.skip(2),
                                yjs.item(yjs.any_content(1), origin=(9, 1)))),
          yjs.update(yjs.client(9, 0, yjs.item(yjs.deleted_content(4), root="state",
                                               key="x")), deletes=[(9, [(0, 4)])]),
          yjs.update(deletes=[(9, [(2**32 - 5, 5)]), (2**53 - 1, [(0, 1)])]),
          yjs.update(deletes=[(9, [(2**32 - 5, 6)])])]


@needs_speedups
@pytest.mark.parametrize("update", EDGES)
def test_edges_of_the_encoding(update: bytes) -> None:
    agree(update)
    rng = random.Random(len(update))
    for data in every_cut_and_changes(update, rng):
        agree(data)


@needs_speedups
def test_many_types_and_a_large_update() -> None:
    """The hash tables grow (thousands of types, hundreds of clients) and a 2.7 MB update
    reads the same."""
    structs = [yjs.item(yjs.type_content(1), root="state", key="m0")]
    structs += [yjs.item(yjs.type_content(1), parent=(9, i % 7), key=f"m{i}")
                for i in range(1, 5000)]
    agree(yjs.update(yjs.client(9, 0, *structs)))
    from pycrdt import Doc, Map

    doc: Doc[Any] = Doc(client_id=9)
    root = doc.get("state", type=Map)
    with doc.transaction():
        for i in range(20_000):
            root[f"key{i}"] = [i, "x" * 100, {"a": i * 0.5}]
    agree(doc.get_update())


@needs_speedups
def test_the_public_reader_uses_it_and_keeps_the_python_errors() -> None:
    """A refused update is read again in Python: the same typed error, message and place."""
    bad = yjs.set_key(9, 0, "x", {"a": [math.nan]})
    assert speedups is not None and speedups.read_update(bad) is None
    with pytest.raises(CrdtsyncError) as caught:
        yupdate.read_update(bad, doc="state")
    assert caught.value.detail == {"where": "state:state.x.a[0]"}
    good = yjs.set_key(9, 0, "x", 1)
    assert yupdate.read_update(good) == yupdate.read_update_py(good)


@needs_speedups
def test_bytes_like_input_is_read() -> None:
    assert speedups is not None
    data = yjs.set_key(9, 0, "x", 1)
    assert speedups.read_update(memoryview(data)) == speedups.read_update(data)
    with pytest.raises(TypeError):
        speedups.read_update("not bytes")  # type: ignore[arg-type]


# --- value checks ------------------------------------------------------------------------


def checks_agree(value: Any) -> None:
    assert speedups is not None
    assert speedups.event_body_ok(value) == values.event_body_ok_py(value)
    for max_int in (values.MAX_SAFE_INTEGER, 2**63 - 1):
        for allow_bytes in (False, True):
            for depth in (0, 1, values.MAX_DEPTH, values.MAX_DEPTH + 1):
                assert (speedups.valid(value, max_int, depth, allow_bytes)
                        == values._valid_py(value, max_int, depth, allow_bytes))


@needs_speedups
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(checked_values)
def test_value_checks(value: Any) -> None:
    checks_agree(value)


class Text(str):
    pass


class Number(int):
    pass


class Table(dict):  # type: ignore[type-arg]
    pass


@needs_speedups
@pytest.mark.parametrize("value", [
    None, True, 0, 2**53 - 1, 2**53, -(2**53), 2**63 - 1, -(2**63 - 1), 2**63, -(2**63), 2**64,
    10**30, 0.5, math.nan, math.inf, -math.inf, "", "x", b"", b"x", bytearray(b"x"), [], (),
    {}, {"a": 1}, {"": 1}, {"k" * 256: 1}, {"k" * 257: 1}, {"é" * 256: 1}, {"😀" * 257: 1},
    {1: 1}, {b"k": 1}, {"a": b"x"}, {"a": [b"x"]}, {"a": 2**63}, {"a": -(2**63)},
    {"a": math.nan}, {"a": [math.inf]}, {"a": Text("x")}, {"a": Number(1)}, Table(a=1),
    {"a": Table(a=1)}, [Text("x")], {"a": {1, 2}}, {"a": object()}, [1, "x", None, 2.5],
    nested(values.MAX_DEPTH - 1, 1), nested(values.MAX_DEPTH, 1), nested(values.MAX_DEPTH + 1, 1),
    nested(values.MAX_DEPTH, {}), nested(values.MAX_DEPTH + 1, {}),
    nested(values.MAX_DEPTH, []), nested(values.MAX_DEPTH, [1]), nested(values.MAX_DEPTH, {"a": 1}),
    nested(5000, 1),
])
def test_value_check_edges(value: Any) -> None:
    checks_agree(value)


# --- slot_filler: the records' __init__ (crdtsync._fastinit) -------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    left: Any
    right: Any = None


class Triple(Pair):
    __slots__ = ("third",)


@needs_speedups
def test_a_slot_filler_sets_each_named_slot_and_keeps_counts_right() -> None:
    assert speedups is not None
    fill = speedups.slot_filler(Pair, ("right", "left"))  # any order of names
    pair = object.__new__(Pair)
    value = object()
    before = sys.getrefcount(value)
    fill(pair, value, "l")
    assert (pair.left, pair.right) == ("l", value)
    assert sys.getrefcount(value) == before + 1
    fill(pair, "r", "l")  # overwriting releases the old value
    assert sys.getrefcount(value) == before
    sub = object.__new__(Triple)  # a subclass shares the layout
    fill(sub, 1, 2)
    assert (sub.left, sub.right) == (2, 1)
    assert speedups.slot_filler(Pair, ())(pair) is None


@needs_speedups
def test_a_slot_filler_refuses_what_it_cannot_fill() -> None:
    assert speedups is not None
    fill = speedups.slot_filler(Pair, ("left", "right"))
    pair = object.__new__(Pair)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        fill(pair, 1)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        fill(pair, 1, 2, 3)
    with pytest.raises(TypeError, match="cannot fill"):
        fill(object(), 1, 2)
    with pytest.raises(TypeError, match="keyword"):
        fill(pair, 1, right=2)
    with pytest.raises(AttributeError):
        speedups.slot_filler(Pair, ("missing",))
    for name in ("__init__", "__doc__", "__slots__"):  # not slots of the record
        with pytest.raises(TypeError, match="not a writable slot"):
            speedups.slot_filler(Pair, (name,))
    with pytest.raises(AttributeError):  # a subclass's slot
        speedups.slot_filler(Pair, ("third",))

    class Borrowing:  # another class's slot descriptor: its offset means nothing here
        __slots__ = ()
        third = Triple.third  # type: ignore[attr-defined]

    with pytest.raises(TypeError, match="not a writable slot"):
        speedups.slot_filler(Borrowing, ("third",))
    with pytest.raises(TypeError):
        speedups.slot_filler(Pair, ["left"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.slot_filler(Pair, (1,))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.slot_filler("Pair", ("left",))  # type: ignore[arg-type]


@needs_speedups
def test_a_slot_filler_keeps_its_class_alive() -> None:
    assert speedups is not None

    @dataclasses.dataclass(frozen=True, slots=True)
    class Passing:
        x: Any

    fill = speedups.slot_filler(Passing, ("x",))
    ref = weakref.ref(Passing)
    del Passing
    gc.collect()
    cls = ref()
    assert cls is not None
    obj = object.__new__(cls)
    fill(obj, 5)
    assert obj.x == 5
    del fill, obj, cls
    gc.collect()
    assert ref() is None  # and the filler releases it (a cycle through its type, collected)


# --- state vectors -------------------------------------------------------------------------


def sv_agree(data: bytes, max_entries: int = protocol.DEFAULT_LIMITS.max_sv_entries) -> None:
    """The C parser answers the Python parser's dict, in the same order, or ``None`` exactly
    where it raises ``InvalidStateVector``."""
    assert speedups is not None
    limits = dataclasses.replace(protocol.DEFAULT_LIMITS, max_sv_entries=max_entries)
    try:
        expected: dict[int, int] | None = protocol.parse_state_vector_py(data, limits)
    except InvalidStateVector:
        expected = None
    native = speedups.parse_state_vector(data, max_entries)
    assert native == expected, data.hex()
    if native is not None:
        assert list(native.items()) == list(expected.items())  # type: ignore[union-attr]


def varuint(value: int, pad: int = 0) -> bytes:
    """lib0's varuint of ``value``, with ``pad`` extra bytes of zero bits (over-long)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte | (0x80 if pad else 0))
            break
        out.append(byte | 0x80)
    for n in range(pad):
        out.append(0x80 if n < pad - 1 else 0)
    return bytes(out)


SV_EDGES = [
    b"", b"\x00", b"\x00\x00", b"\x01", b"\x80", b"\xff" * 12,
    varuint(1) + varuint(2**53 - 1) + varuint(2**32 - 1),
    varuint(1) + varuint(2**53) + varuint(1),
    varuint(1) + varuint(5) + varuint(2**32),
    varuint(2) + varuint(5) + varuint(1) + varuint(5) + varuint(2),  # a repeated client
    varuint(2) + varuint(5) + varuint(1) + varuint(6),  # truncated
    *(varuint(1) + varuint(7, pad) + varuint(3) for pad in range(12)),  # over-long numbers
    *(varuint(1) + varuint(7) + varuint(3, pad) for pad in range(12)),
    *(varuint(1, pad) + varuint(7) + varuint(3) for pad in range(12)),
    varuint(3) + b"".join(varuint(c) + varuint(c * 7) for c in (2**40, 2**20, 1)),
]


@needs_speedups
@pytest.mark.parametrize("data", SV_EDGES, ids=lambda d: d.hex()[:40] or "empty")
def test_state_vector_edges(data: bytes) -> None:
    for max_entries in (0, 1, 2, 3, 100_000):
        sv_agree(data, max_entries)


@needs_speedups
@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.dictionaries(st.integers(0, 2**53 + 5), st.integers(0, 2**32 + 5), max_size=8),
       st.randoms(use_true_random=False))
def test_state_vectors_and_their_mutations(clocks: dict[int, int], rng: random.Random) -> None:
    data = b"".join([varuint(len(clocks)), *(varuint(c) + varuint(k) for c, k in clocks.items())])
    for variant in (data, *mutations(data, rng)):
        sv_agree(variant)


@needs_speedups
@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.binary(max_size=40))
def test_state_vector_arbitrary_bytes(data: bytes) -> None:
    sv_agree(data)


@needs_speedups
def test_the_public_parser_uses_it_and_keeps_the_python_errors() -> None:
    assert speedups is not None
    assert protocol._parse_sv is speedups.parse_state_vector
    repeated = varuint(2) + varuint(5) + varuint(1) + varuint(5) + varuint(2)
    with pytest.raises(InvalidStateVector, match="repeats a client id"):
        protocol.parse_state_vector(repeated)
    good = protocol.encode_state_vector({2**40: 9, 3: 1})
    assert protocol.parse_state_vector(good) == {2**40: 9, 3: 1}
    # The C parser reads any buffer (the public one takes bytes: compiled, it checks so).
    assert speedups.parse_state_vector(memoryview(good), 10) == {2**40: 9, 3: 1}
    with pytest.raises(TypeError):
        speedups.parse_state_vector("not bytes", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        speedups.parse_state_vector(good, -1)


# --- decode_events: a sync's events on the fast path ---------------------------------------

event_entries = st.lists(st.one_of(
    st.tuples(st.integers(-2, 2**64), st.sampled_from(["t", "reading", "x" * 70, "new"]),
              st.integers(-2, 2**64),
              st.one_of(checked_values.map(lambda v: _packed(v)), st.binary(max_size=12)))
    .map(list),
    st.lists(st.integers(0, 3), max_size=5),  # not [seq, topic, time, data]
    st.integers(), st.none()), max_size=12)


def _packed(value: Any) -> bytes:
    try:
        return protocol.encode_event_body(value)
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"  # never used by msgpack: not a body


def decoded(decode: Any, raw: list[Any], limits: protocol.Limits) -> Any:
    try:
        return decode(raw, limits)
    except CrdtsyncError as exc:
        return (type(exc), exc.message)


def events_agree(raw: list[Any], limits: protocol.Limits) -> None:
    """The public decoder (C first) and the pure-Python one give the same events in the same
    order with the same flag, or the same error."""
    fast, python = decoded(protocol._decode_events, raw, limits), decoded(
        protocol._decode_events_py, raw, limits)
    assert fast == python
    if isinstance(python, tuple) and python and isinstance(python[0], tuple):
        assert [type(e) for e in fast[0]] == [protocol.Event] * len(python[0])


@needs_speedups
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(event_entries, st.integers(0, 40))
def test_events_decode_as_in_python(raw: list[Any], max_body: int) -> None:
    protocol._TOPICS_SEEN.update(["t", "reading"])  # "new" and the long one are not known
    events_agree(raw, dataclasses.replace(protocol.Limits(), max_event_body=max_body))
    events_agree(raw, protocol.Limits())


@needs_speedups
def test_the_fast_path_decodes_a_sync_s_events_in_c() -> None:
    assert speedups is not None
    protocol._TOPICS_SEEN.add("reading")
    raw = [[seq, "reading", 1_700_000_000_000 + seq,
            protocol.encode_event_body({"t": 21.5, "n": seq, "ok": True, "l": [1, None]})]
           for seq in (1, 2, 4)]
    native = speedups.decode_events(raw, 1024, protocol._TOPICS_SEEN, msgpack.unpackb,
                                    *protocol._UNPACK_BODY_KW, protocol._FILL_EVENT)
    python = protocol._decode_events_py(raw, protocol.Limits())
    assert native == python
    assert native is not None and native[1] is False  # 2 -> 4 is a gap
    for ours, theirs in zip(native[0], python[0], strict=True):  # no reference leaked
        assert [sys.getrefcount(getattr(ours, name)) for name in ("body", "topic")] == [
            sys.getrefcount(getattr(theirs, name)) for name in ("body", "topic")]
    for refused in ([[1, "reading", 5, b"\xc1"]], [[1, "unknown topic", 5, b"\x80"]],
                    [[0, "reading", 5, b"\x80"]], [(1, "reading", 5, b"\x80")],
                    [[1, "reading", 2**63, b"\x80"]], [[1, "reading", 5, b"\x81\x01\x02"]]):
        assert speedups.decode_events(refused, 1024, protocol._TOPICS_SEEN, msgpack.unpackb,
                                      *protocol._UNPACK_BODY_KW, protocol._FILL_EVENT) is None
