"""The template codec: exact round trips over random templates and values, range errors per
type, Notecard codes, hash stability, and decoding of damaged batches (MalformedRequest only)."""

from __future__ import annotations

import json
import math
import re
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from crdtsync.errors import BodyTooLarge, InvalidValue, MalformedRequest
from crdtsync.templates import (
    MAX_SEQ,
    MAX_TEXT,
    TYPE_NAMES,
    SizeBudget,
    Template,
    batch_hash,
    decode_batch,
    decode_one,
    encode_batch,
    encode_one,
)

SAMPLE = {"temp": 21.5, "hum": 40, "voltage": 3.71, "ts": 1764000000, "motion": False}
SENSOR = {"temp": "float16", "hum": "uint8", "voltage": "float16", "ts": "uint32",
          "motion": "bool"}
INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1), "int16": (-(2**15), 2**15 - 1),
    "int24": (-(2**23), 2**23 - 1), "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1),
    "uint24": (0, 2**24 - 1), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
}
FLOAT_FORMAT = {"float16": "<e", "float32": "<f", "float64": "<d"}
FLOAT_MAX = {"float16": 65504.0, "float32": 3.4028234663852886e38, "float64": 1.7e308}
SCALARS = [*INT_RANGES, *FLOAT_FORMAT, "bool", "string:1", "string:7", "string:300",
           "bytes:1", "bytes:9"]


def rounded(type_name: str, value: float) -> float:
    fmt = FLOAT_FORMAT[type_name]
    return float(struct.unpack(fmt, struct.pack(fmt, float(value)))[0])


# --- strategies --------------------------------------------------------------------------

names = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)


def definitions(depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    scalar = st.sampled_from(SCALARS)
    array = st.tuples(st.sampled_from(SCALARS), st.integers(1, 4)).map(lambda p: f"{p[0]}[{p[1]}]")
    node = st.one_of(scalar, scalar, array, definitions(depth + 1)) if depth < 2 else scalar
    return st.dictionaries(names, node, min_size=1, max_size=6)


def scalar_values(type_name: str) -> st.SearchStrategy[Any]:
    if type_name in INT_RANGES:
        lo, hi = INT_RANGES[type_name]
        edges = st.sampled_from([lo, hi, 0, lo + 1, hi - 1])
        return st.one_of(edges, st.integers(lo, hi))
    if type_name in FLOAT_FORMAT:
        width = int(type_name[5:])
        limit = FLOAT_MAX[type_name]
        return st.one_of(
            st.floats(width=width, allow_nan=False, allow_infinity=False),  # type: ignore[arg-type]
            st.floats(-limit, limit),  # rounded to the width on the way
            st.integers(-1000, 1000),
        )
    if type_name == "bool":
        return st.booleans()
    kind, size = type_name.split(":")
    if kind == "bytes":
        return st.binary(max_size=int(size))
    text = st.text(st.characters(codec="utf-8"), max_size=int(size))
    return text.filter(lambda s: len(s.encode()) <= int(size))


def values(spec: Any) -> st.SearchStrategy[Any]:
    if isinstance(spec, dict):
        return st.fixed_dictionaries({k: values(v) for k, v in spec.items()})
    if spec.endswith("]"):
        base, length = spec[:-1].split("[")
        return st.lists(scalar_values(base), min_size=int(length), max_size=int(length))
    return scalar_values(spec)


def expected(spec: Any, value: Any) -> Any:
    """What the decoder must return: floats rounded to their width, arrays as lists."""
    if isinstance(spec, dict):
        return {k: expected(spec[k], value[k]) for k in spec}
    if spec.endswith("]"):
        return [expected(spec[:-1].split("[")[0], v) for v in value]
    return rounded(spec, value) if spec in FLOAT_FORMAT else value


def identical(a: Any, b: Any) -> bool:
    """Equal values of equal types, floats compared bit for bit (so -0.0 != 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@st.composite
def batches(draw: st.DrawFn, min_size: int = 0) -> tuple[dict[str, Any], list[Any], int, int]:
    spec = draw(definitions())
    bodies = draw(st.lists(values(spec), min_size=min_size, max_size=12))
    seq = draw(st.integers(1, 2**40))
    records = []
    for body in bodies:
        records.append((seq, draw(st.integers(0, MAX_SEQ)), body))
        seq += 1 + draw(st.sampled_from([0, 0, 0, 1, 2**20]))
    assume(not records or records[-1][0] <= MAX_SEQ)
    ref_seq = draw(st.sampled_from([0, records[0][0] - 1 if records else 0]))
    ref_time = draw(st.sampled_from([0, records[0][1] if records else 0]))
    return spec, records, ref_seq, ref_time


# --- round trips -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_round_trip_is_exact(case: tuple[dict[str, Any], list[Any], int, int]) -> None:
    spec, records, ref_seq, ref_time = case
    template = Template(spec)
    data = encode_batch(template, records, ref_seq=ref_seq, ref_time=ref_time)
    decoded = decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time)
    assert len(decoded) == len(records)
    for (seq, time, body), (dseq, dtime, dbody) in zip(records, decoded, strict=True):
        assert (dseq, dtime) == (seq, time)
        assert identical(dbody, expected(spec, body)), (dbody, body)
    # decoding then encoding gives the same bytes
    assert encode_batch(template, decoded, ref_seq=ref_seq, ref_time=ref_time) == data


def random_walk(n: int, seed: int) -> list[tuple[int, int, dict[str, Any]]]:
    import random

    rng = random.Random(seed)
    temp, hum, volt, records = 210, 40, 370, []
    for i in range(n):
        temp += rng.choice([-1, 0, 0, 1])
        hum = min(255, max(0, hum + rng.choice([-1, 0, 0, 1])))
        volt += rng.choice([-1, 0, 0, 0, 1])
        body = {"temp": temp / 10, "hum": hum, "voltage": volt / 100,
                "ts": 1764000000 + 60 * i, "motion": rng.random() < 0.05}
        records.append((1000 + i, 1764000000000 + 60000 * i + rng.randint(0, 30), body))
    return records


@pytest.mark.parametrize("float_type", ["float16", "float32", "float64"])
def test_drifting_readings_are_small_and_exact(float_type: str) -> None:
    spec = {**SENSOR, "temp": float_type, "voltage": float_type}
    template = Template(spec)
    records = random_walk(500, seed=1)
    data = encode_batch(template, records)
    fixed_row = {"float16": 10, "float32": 14, "float64": 22}[float_type]
    assert len(data) < 500 * fixed_row / 2  # delta coding pays off
    for (_, _, body), (_, _, got) in zip(records, decode_batch(template, data), strict=True):
        assert identical(got, expected(spec, body))


def test_sample_event_sizes_and_float_rounding() -> None:
    template = Template(SENSOR)
    single = encode_one(template, 1000, 1764000000000, SAMPLE)
    # hash 8, count 1, seq 2 (999), time 6, row 2+1+2+4+1
    assert len(single) == 8 + 1 + 2 + 6 + 10
    assert decode_one(template, single) == (1000, 1764000000000, {
        "temp": 21.5, "hum": 40, "voltage": 3.7109375, "ts": 1764000000, "motion": False})
    # against what both peers know (the previous event): seq 1 byte, time 3 bytes
    after = encode_one(template, 1001, 1764000060012, SAMPLE, ref_seq=1000,
                       ref_time=1764000000000)
    assert len(after) == 8 + 1 + 1 + 3 + 10
    assert decode_one(template, after, ref_seq=1000, ref_time=1764000000000)[:2] == (
        1001, 1764000060012)
    f32 = Template({**SENSOR, "voltage": "float32"})
    got = decode_one(f32, encode_one(f32, 1, 0, SAMPLE))[2]["voltage"]
    assert got == rounded("float32", 3.71) == 3.7100000381469727


def test_golden_batch_bytes() -> None:
    """Pins the wire format: decode then encode is byte-identical, and the bytes don't move."""
    template = Template(SENSOR)
    records = [(7, 1000, SAMPLE), (8, 61000, {**SAMPLE, "hum": 41, "motion": True}),
               (10, 120999, {**SAMPLE, "temp": 21.25})]
    data = encode_batch(template, records)
    assert data.hex() == GOLDEN
    assert encode_batch(template, decode_batch(template, data)) == data


GOLDEN = ("4f555958a6c12575" "03" "06" "d00f"  # hash, count 3, seq 7 (1 + 6), time 1000
          "010001"  # seqs have gaps: 0, 1
          "02c0a90701"  # times: deltas of deltas; first delta 60000, then -1
          "01604d001f"  # temp: first 21.5, deltas 0 and -16 (keys of float16 bits)
          "00282928"  # hum: fixed width 40 41 40
          "056c4300" "050081246900"  # voltage, ts: first value, deltas packed at 0 bits
          "02")  # motion: False True False


def test_empty_batch() -> None:
    template = Template(SENSOR)
    data = encode_batch(template, [])
    assert data == template.hash + b"\x00"
    assert decode_batch(template, data) == []


def test_seq_gaps_and_unordered_times() -> None:
    template = Template({"n": "int32"})
    records = [(5, 900, {"n": 1}), (6, 100, {"n": -1}), (9, 100, {"n": 2}),
               (2**40, 0, {"n": 3}), (2**40 + 1, MAX_SEQ, {"n": 4})]
    assert decode_batch(template, encode_batch(template, records)) == records


@pytest.mark.parametrize("records", [
    [(2, 0, {"n": 1}), (2, 0, {"n": 1})],
    [(3, 0, {"n": 1}), (2, 0, {"n": 1})],
    [(0, 0, {"n": 1})],
    [(1, -1, {"n": 1})],
    [(1, MAX_SEQ + 1, {"n": 1})],
    [(True, 0, {"n": 1})],
    [(1, 0)],
])
def test_bad_envelopes_are_refused(records: list[Any]) -> None:
    with pytest.raises(InvalidValue):
        encode_batch(Template({"n": "int32"}), records)


def test_references_must_precede_the_batch() -> None:
    template = Template({"n": "int32"})
    for ref_seq, ref_time in ((5, 0), (6, 0), (-1, 0), (0, -1), (0, MAX_SEQ + 1)):
        with pytest.raises(InvalidValue):
            encode_batch(template, [(5, 0, {"n": 1})], ref_seq=ref_seq, ref_time=ref_time)
    data = encode_batch(template, [(5, 0, {"n": 1})], ref_seq=4, ref_time=MAX_SEQ)
    assert len(data) == 8 + 1 + 1 + 10 + 4  # time -(2**63 - 1) costs 10 bytes
    assert decode_batch(template, data, ref_seq=4, ref_time=MAX_SEQ) == [(5, 0, {"n": 1})]
    # decoded against other references: another (still valid) batch, or MalformedRequest
    with pytest.raises(MalformedRequest):
        decode_batch(template, data, ref_seq=MAX_SEQ, ref_time=MAX_SEQ)


def test_nesting_depth_limit() -> None:
    eight: Any = "int8"
    for name in "hgfedcba":
        eight = {name: eight}
    template = Template(eight)  # eight nested objects are fine
    body: Any = 1
    for name in "hgfedcba":
        body = {name: body}
    assert decode_one(template, encode_one(template, 1, 0, body))[2] == body


def test_nested_objects_and_arrays() -> None:
    spec = {"pos": {"lat": "float64", "lon": "float64", "fix": {"sats": "uint8"}},
            "chan": "int16[4]", "tags": "string:4[2]"}
    template = Template(spec)
    body: dict[str, Any] = {"pos": {"lat": 52.52, "lon": 13.405, "fix": {"sats": 7}},
                            "chan": [1, -2, 3, -4], "tags": ["a", "bcd"]}
    assert decode_one(template, encode_one(template, 1, 2, body))[2] == body
    with pytest.raises(InvalidValue, match=r"pos\.fix\.sats"):
        template.validate({**body, "pos": {**body["pos"], "fix": {"sats": 256}}})
    with pytest.raises(InvalidValue, match=r"pos\.fix"):
        template.validate({**body, "pos": {**body["pos"], "fix": 3}})
    with pytest.raises(InvalidValue, match=r"chan\[2\]"):
        template.validate({**body, "chan": [1, 2, 70000, 4]})


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", list(INT_RANGES))
def test_integer_ranges(type_name: str) -> None:
    lo, hi = INT_RANGES[type_name]
    template = Template({"x": type_name})
    template.validate({"x": lo})
    template.validate({"x": hi})
    for bad in (lo - 1, hi + 1):
        with pytest.raises(InvalidValue, match=rf"'x'.*out of range for {type_name}"):
            template.validate({"x": bad})
    for wrong in (1.0, True, "1", None):
        with pytest.raises(InvalidValue, match="'x'"):
            template.validate({"x": wrong})


@pytest.mark.parametrize(("type_name", "ok", "too_big"), [
    ("float16", 65504.0, 65520.0),
    ("float32", 3.4028234663852886e38, 3.4028236e38),
    ("float64", 1.7976931348623157e308, 10**400),
])
def test_float_ranges(type_name: str, ok: float, too_big: float) -> None:
    template = Template({"x": type_name})
    template.validate({"x": ok})
    template.validate({"x": -ok})
    template.validate({"x": 1e-30})  # underflows to zero: rounding, not an error
    for bad in (too_big, -too_big, math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidValue, match="'x'"):
            template.validate({"x": bad})
    for wrong in (True, "1.5", None, [1.0]):
        with pytest.raises(InvalidValue, match="'x'"):
            template.validate({"x": wrong})


def test_text_bool_and_array_errors() -> None:
    template = Template({"s": "string:5", "b": "bytes:2", "f": "bool", "a": "uint8[3]"})
    good: dict[str, Any] = {"s": "héllo"[:4], "b": b"ab", "f": True, "a": [1, 2, 3]}
    template.validate(good)
    cases = [
        ("s", "ééé", "6 bytes long"), ("s", "\ud800", "Unicode"), ("s", b"x", "string"),
        ("b", b"abc", "3 bytes long"), ("b", "ab", "bytes"), ("f", 1, "boolean"),
        ("a", [1, 2], "array of 3"), ("a", [1, 2, 3, 4], "array of 3"), ("a", 1, "array"),
        ("a", [1, 2, 256], r"a\[2\]"),
    ]
    for field, value, message in cases:
        with pytest.raises(InvalidValue, match=message) as info:
            template.validate({**good, field: value})
        assert info.value.detail["field"].startswith(field)


def test_missing_and_unknown_fields() -> None:
    template = Template(SENSOR)
    missing = {k: v for k, v in SAMPLE.items() if k != "hum"}
    with pytest.raises(InvalidValue, match=r"missing \['hum'\]"):
        template.validate(missing)
    with pytest.raises(InvalidValue, match=r"unknown \['extra'\]"):
        template.validate({**SAMPLE, "extra": 1})
    with pytest.raises(InvalidValue, match="must be an object"):
        template.validate([SAMPLE])
    with pytest.raises(InvalidValue, match="'hum'"):
        encode_batch(template, [(1, 0, {**SAMPLE, "hum": -1})])


# --- definitions, Notecard codes, hash ---------------------------------------------------


@pytest.mark.parametrize(("code", "name"), [
    (11, "int8"), (12, "int16"), (13, "int24"), (14, "int32"), (18, "int64"),
    (21, "uint8"), (22, "uint16"), (23, "uint24"), (24, "uint32"), (28, "uint64"),
    (12.1, "float16"), (14.1, "float32"), (18.1, "float64"), (True, "bool"), (False, "bool"),
    ("10", "string:10"), ("0", f"string:{MAX_TEXT}"),
    ("string", f"string:{MAX_TEXT}"), ("bytes", f"bytes:{MAX_TEXT}"),
])
def test_notecard_codes_and_names(code: Any, name: str) -> None:
    template = Template({"x": code})
    assert template.definition == {"x": name}
    assert template.hash == Template({"x": name}).hash


def test_notecard_template_is_the_same_template() -> None:
    notecard = Template.from_json(
        '{"new_vals":true,"temperature":14.1,"humidity":11,"pump_state":"4"}')
    ours = Template({"new_vals": "bool", "temperature": "float32", "humidity": "int8",
                     "pump_state": "string:4"})
    assert notecard == ours and notecard.hash == ours.hash


@pytest.mark.parametrize("definition", [
    {}, {"x": 15}, {"x": 14.0}, {"x": 12.5}, {"x": None}, {"x": [12, 12]}, {"x": {}},
    {"x": "int17"}, {"x": "Float32"}, {"x": "uint8[]"}, {"x": "int8[0]"}, {"x": "int8[1025]"},
    {"x": "string:0"}, {"x": "string:65536"}, {"x": "99999"}, {"": "int8"}, {"x": "bool[2][2]"},
    {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": "int8"}}}}}}}}}},
    {"x": "uint8[1024]", "y": "int8"}, {"\ud800": "int8"}, {"a": {"b\udfff": "int8"}},
])
def test_bad_definitions_are_refused(definition: dict[str, Any]) -> None:
    with pytest.raises(InvalidValue):
        Template(definition)


@pytest.mark.parametrize("name", ["flaot32", "number", "double", "text", "float", "int",
                                  "String", "uint8 ", "14.1", "float32[2]x"])
def test_unknown_type_names_are_refused_with_the_valid_ones(name: str) -> None:
    """Finding 11 of issue 11: a typo used to become a string:65535 field, and devices then
    refused every numeric reading."""
    with pytest.raises(InvalidValue) as info:
        Template({"temp": name})
    assert info.value.detail["field"] == "temp"
    assert info.value.detail["type"] == name
    assert info.value.detail["valid"] == list(TYPE_NAMES)
    for valid in ("float32", "uint16", "string:N", "bool", "T[K]", "14.1"):
        assert valid in info.value.message
    if name == "flaot32":
        assert "did you mean 'float32'" in info.value.message


def test_bad_json_definitions_are_refused() -> None:
    for text in ('{"x": "int8", "x": "int16"}', "[1]", "{", '{"a": {"x": 1, "x": 2}}'):
        with pytest.raises(InvalidValue):
            Template.from_json(text)


def test_hash_is_stable_and_order_sensitive() -> None:
    template = Template(SENSOR)
    assert template.hash.hex() == "4f555958a6c12575"  # pinned: changing it breaks devices
    assert template.canonical == (b'{"temp":"float16","hum":"uint8","voltage":"float16",'
                                  b'"ts":"uint32","motion":"bool"}')
    assert Template.from_json(template.canonical) == template
    assert Template({"temp": 12.1, "hum": 21, "voltage": 12.1, "ts": 24, "motion": True}
                    ) == template
    reordered = Template(dict(reversed(list(SENSOR.items()))))
    assert reordered.hash != template.hash
    assert Template({**SENSOR, "hum": "uint16"}).hash != template.hash
    assert len({Template({"a": {"b": "int8"}}).hash, Template({"a": "int8"}).hash,
                Template({"b": "int8"}).hash}) == 3


# --- decoding damaged data ---------------------------------------------------------------


def assert_valid_or_malformed(template: Template, data: bytes, **kw: Any) -> None:
    """Decoding either fails with MalformedRequest or yields records that re-encode."""
    try:
        records = decode_batch(template, data, **kw)
    except MalformedRequest:
        return
    encode_batch(template, records, **kw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(min_size=1), st.data())
def test_truncated_batches_are_malformed(case: Any, data: st.DataObject) -> None:
    spec, records, ref_seq, ref_time = case
    template = Template(spec)
    encoded = encode_batch(template, records, ref_seq=ref_seq, ref_time=ref_time)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(MalformedRequest):
        decode_batch(template, encoded[:cut], ref_seq=ref_seq, ref_time=ref_time)
    with pytest.raises(MalformedRequest, match="trailing"):
        decode_batch(template, encoded + b"\x00", ref_seq=ref_seq, ref_time=ref_time)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(min_size=1), st.data())
def test_mutated_batches_never_crash(case: Any, data: st.DataObject) -> None:
    spec, records, ref_seq, ref_time = case
    template = Template(spec)
    encoded = bytearray(encode_batch(template, records, ref_seq=ref_seq, ref_time=ref_time))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            encoded[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            encoded[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            encoded.insert(pos, data.draw(st.integers(0, 255)))
        elif len(encoded) > 1:
            del encoded[pos]
    assert_valid_or_malformed(template, bytes(encoded), ref_seq=ref_seq, ref_time=ref_time)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([SENSOR, {"s": "string:3", "b": "bool", "n": "uint64[2]"}]),
       st.binary(max_size=64))
def test_garbage_after_a_valid_hash_never_crashes(spec: dict[str, Any], tail: bytes) -> None:
    template = Template(spec)
    assert_valid_or_malformed(template, template.hash + tail)


def test_wrong_template_and_limits() -> None:
    template = Template(SENSOR)
    other = Template({**SENSOR, "hum": "uint16"})
    data = encode_batch(template, random_walk(3, seed=2))
    assert batch_hash(data) == template.hash
    with pytest.raises(MalformedRequest) as info:
        decode_batch(other, data)
    assert info.value.detail == {"expected": other.hash.hex(), "got": template.hash.hex()}
    with pytest.raises(MalformedRequest, match="max 2"):
        decode_batch(template, data, max_count=2)
    with pytest.raises(MalformedRequest):
        decode_one(template, data)
    for short in (b"", b"1234567"):
        with pytest.raises(MalformedRequest):
            batch_hash(short)
    # a huge claimed count with no data behind it fails before allocating anything
    with pytest.raises(MalformedRequest):
        decode_batch(template, template.hash + b"\xff\xff\x03")
    # values out of their type's range, non-finite floats, bad padding
    uint8 = Template({"x": "uint8", "f": "float16", "b": "bool"})
    base = encode_one(uint8, 1, 0, {"x": 1, "f": 1.0, "b": False})
    assert decode_one(uint8, base)[2] == {"x": 1, "f": 1.0, "b": False}
    for tail in (b"\x01\x00\x7c\x00", b"\x01\x00\x3c\x02", b"\x01\x00\x3c\x00\x00"):
        with pytest.raises(MalformedRequest):
            decode_batch(uint8, base[:-4] + tail)


# --- decoded sizes and the size budget (finding 6 of issue 11) ----------------------------


def packed_size(body: Any) -> int:
    """What the server's re-encoding of a decoded body weighs: the measure of the limits."""
    return len(msgpack.packb(body, use_bin_type=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(min_size=1))
def test_decoded_size_is_the_msgpack_size_of_the_decoded_body(
        case: tuple[dict[str, Any], list[Any], int, int]) -> None:
    spec, records, ref_seq, ref_time = case
    template = Template(spec)
    data = encode_batch(template, records, ref_seq=ref_seq, ref_time=ref_time)
    decoded = decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time)
    sizes = [packed_size(body) for _, _, body in decoded]
    assert [template.body_size(body) for _, _, body in records] == sizes
    assert all(template.min_body_size <= size for size in sizes)
    exact = SizeBudget(max(sizes), sum(sizes))
    assert decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time,
                        budget=exact) == decoded
    assert exact.used == sum(sizes)
    with pytest.raises(BodyTooLarge) as info:
        decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time,
                     budget=SizeBudget(max(sizes), sum(sizes) - 1))
    assert info.value.detail == {"max_decoded_bytes": sum(sizes) - 1}
    biggest = sizes.index(max(sizes))
    with pytest.raises(InvalidValue) as one:
        decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time,
                     budget=SizeBudget(max(sizes) - 1, sum(sizes)))
    assert one.value.detail == {"seq": decoded[biggest][0], "max_event_body": max(sizes) - 1}


INT_EDGES = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, -1, -32, -33,
             -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]


@pytest.mark.parametrize(("spec", "body"), [
    *[({"n": "int64"}, {"n": v}) for v in INT_EDGES],
    ({"n": "uint64"}, {"n": 2**64 - 1}),
    *[({"s": "string"}, {"s": "é" * (n // 2) + "x" * (n % 2)}) for n in (0, 31, 32, 255, 256,
                                                                         65535)],
    *[({"b": "bytes"}, {"b": b"\x00" * n}) for n in (0, 255, 256, 65535)],
    ({"f": "float16", "g": "float64[3]", "h": "bool[15]"},
     {"f": 1, "g": [0, -0.0, 1e300], "h": [True] * 15}),
    ({"a": "uint8[16]"}, {"a": list(range(16))}),
    ({f"k{i}": "bool" for i in range(16)}, {f"k{i}": False for i in range(16)}),
    ({"k" * 31: "int8", "K" * 32: "int8", "ключ": {"x" * 256: "int8"}},
     {"k" * 31: 1, "K" * 32: -1, "ключ": {"x" * 256: -100}}),
])
def test_decoded_size_at_every_msgpack_width(spec: dict[str, Any], body: Any) -> None:
    template = Template(spec)
    data = encode_one(template, 1, 0, body)
    decoded = decode_one(template, data)[2]
    assert template.body_size(body) == packed_size(decoded)
    budget = SizeBudget(2**20, 2**20)
    decode_batch(template, data, budget=budget)
    assert budget.used == packed_size(decoded)


@pytest.mark.parametrize("column", [INT_EDGES, [0, 127], [-32, 127], [128, 255], [-33, -128],
                                    [-100, 200], [-1, 65536], [2**32, 2**63 - 1], [5, -5, 300]])
def test_decoded_size_of_integer_columns(column: list[int]) -> None:
    template = Template({"n": "int64"})
    records = [(i + 1, 0, {"n": value}) for i, value in enumerate(column)]
    budget = SizeBudget(2**20, 2**20)
    decode_batch(template, encode_batch(template, records), budget=budget)
    assert budget.used == sum(packed_size(body) for _, _, body in records)


def repeated_text_batch(template: Template, count: int, length: int,
                        first_seq: int = 1) -> bytes:
    """A batch of ``count`` consecutive events (from ``first_seq``, time 0) of a template
    whose fields are all strings, each field ``length`` bytes in the first event and repeated
    (one 0 byte) in the others: a few bytes on the wire standing for ``count * length`` per
    field. Made by hand: the encoder would need every event in memory."""
    out = bytearray(template.hash)
    out += uv(count) + uv(first_seq - 1) + uv(0)  # count, seq0 - ref_seq - 1, time0
    if count > 1:
        out += b"\x00" + b"\x01" + bytes(count - 1)  # consecutive seqs; times: deltas 0
    for index, _ in enumerate(template.leaves):
        out += uv(length + 1) + bytes([ord("a") + index]) * length + bytes(count - 1)
    return bytes(out)


def uv(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_a_small_batch_of_huge_events_is_refused_before_it_is_built() -> None:
    """A 66 KB batch standing for 1,000 events of 65,000 bytes (65 MB once decoded): the
    budget refuses it having built next to nothing."""
    template = Template({"s0": "string"})
    data = repeated_text_batch(template, 1000, 65_000)
    assert len(data) < 68_000
    assert decode_batch(template, repeated_text_batch(template, 2, 10))[1][2] == {"s0": "a" * 10}
    budget = SizeBudget(64 * 1024, 4 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge) as info:
            decode_batch(template, data, budget=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.detail == {"max_decoded_bytes": 4 * 1024 * 1024}
    assert peak < 1024 * 1024, peak  # what the decoder held: about the input, not 65 MB


def test_one_event_over_the_body_limit_is_refused_with_its_seq() -> None:
    template = Template({"a": "string", "b": "string"})
    data = repeated_text_batch(template, 3, 40_000)  # each event decodes to ~80 KB
    with pytest.raises(InvalidValue) as info:
        decode_batch(template, data, ref_seq=41, budget=SizeBudget(64 * 1024, 2**30))
    assert info.value.detail == {"seq": 42, "max_event_body": 64 * 1024}


def test_min_body_size() -> None:
    assert Template({"a": "string", "n": "uint64", "f": "float32"}).min_body_size == len(
        msgpack.packb({"a": "", "n": 0, "f": 0.0}))
    assert Template({f"{i:0>250}": "bool" for i in range(300)}).min_body_size > 64 * 1024


# --- docs/protocol.md section 15b.4 stays true ---------------------------------------------

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """``(info string, content)`` of every fenced code block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_protocol_md_batch_example_is_what_the_encoder_writes() -> None:
    """The worked example of section 15b.4: the bytes, the annotated listing (offsets
    included), the hash, the sizes and the tev prefix are what the reference code gives."""
    text = PROTOCOL_MD.read_text()
    start = text.index("### 15b.4 Worked example")
    section = text[start:text.index("\n## ", start)]  # up to the next section
    (_, source), (_, hex_block), (_, listing) = fenced_blocks(section)
    example = json.loads(source)
    template = Template(example["template"])
    records = [(seq, time, body) for seq, time, body in example["events"]]
    data = encode_batch(template, records)
    assert hex_block.strip() == data.hex()
    offset = 0
    for line in listing.splitlines():
        match = re.match(r"([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})  ", line)
        if match:
            assert int(match[1], 16) == offset, line
            chunk = bytes.fromhex(match[2])
            assert data[offset:offset + len(chunk)] == chunk, line
            offset += len(chunk)
    assert offset == len(data)
    assert decode_batch(template, data) == records
    plain = sum(len(msgpack.packb([seq, "readings", time, msgpack.packb(body)]))
                for seq, time, body in records)
    sizes = {template.body_size(body) for _, _, body in records}
    tev = msgpack.packb([["readings", data]], use_bin_type=True)
    for claim in (f"Canonical definition `{template.canonical.decode()}`",
                  f"hash `{template.hash.hex()}`",
                  f"The batch, {len(data)} bytes (the same events as plain `ev` entries take "
                  f"{plain})", f"`{tev[:-len(data)].hex(' ')}`",
                  f"Each event decodes to {sizes.pop()} bytes"):
        assert claim in " ".join(section.split()), claim
    assert not sizes
