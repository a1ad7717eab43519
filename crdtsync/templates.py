"""Event templates: a field-by-field schema for the body of events on one topic, and the
compact binary batch codec built on it. Pure functions, no I/O; device and server share it.
docs/protocol.md section 15b is the specification (types, Notecard codes, the byte layout of
a batch with a worked example, how decoded sizes are counted); this docstring summarises it.

A template is a JSON object ``{field: type}``; field order is the wire order. Types:

    crdtsync name             Notecard code    value
    int8 int16 int24 int32    11 12 13 14      signed integer of 1, 2, 3, 4 bytes
    int64                     18               signed integer of 8 bytes
    uint8 uint16 uint24       21 22 23         unsigned integer of 1, 2, 3 bytes
    uint32 uint64             24 (28)          unsigned integer of 4, 8 bytes
    float16 float32 float64   12.1 14.1 18.1   IEEE 754 binary16/32/64
    bool                      true (or false)  boolean, one bit on the wire
    string:N  (string)        "N"  ("0")       UTF-8 text of at most N bytes (65535)
    bytes:N   (bytes)         -                binary of at most N bytes (65535)
    T[K], e.g. int16[4]       -                exactly K values of scalar type T
    {nested template}         -                an object with exactly those fields

Notecard codes are those of note-c's ``TINT8``..``TFLOAT64`` and ``TSTRING(N)``: a string of
decimal digits ``"N"`` is a string field of at most N bytes and ``"0"`` (``TSTRINGV``) a
variable-length one. Any other type, including Notecard's older sample-value style
(``"text"``) and near misses (``"flaot32"``, ``"number"``, ``"double"``), is refused with
:class:`InvalidValue` naming the valid types: a misspelt numeric type must not silently become
a string. 28 (uint64) is our extension; note-c stops at 24. Notecard's ``_time``/``_lat``
keywords are ordinary fields here.

Values: integers must be ``int`` (not ``bool``, not ``float``) within the type's range. Float
fields take ``int`` or ``float``; NaN and infinities are refused (event bodies are JSON), as
is a value that overflows the width once rounded. A float field stores the value rounded to
its width: a ``float32`` field decodes to the float32 nearest the input, a ``float16`` one to
the nearest float16 (21.5 stays 21.5; 3.71 becomes 3.7109375). Arrays decode as lists.

:attr:`Template.hash` is the first 8 bytes of BLAKE2b (personalised with the format version)
of the canonical definition: the normalized type names, nested objects kept, keys in the
order given, compact JSON. Equivalent spellings (``12`` and ``"int16"``, ``"string"`` and
``"string:65535"``) hash alike; the same fields in another order are another template.

Batch format (all integers little-endian; *uv* = unsigned LEB128 varint of at most 10 bytes,
*sv* = zigzag then uv)::

    hash[8]  count:uv
    count >= 1:  seq0:uv   time0:sv         (first seq - ref_seq - 1, first time - ref_time)
    count >= 2:  seqs:uv   0 = consecutive, 1 = then count-1 gaps:uv (seq[i]-seq[i-1]-1)
                 times     numeric column, its first value being time0
    per non-bool leaf, in order (an array field is one leaf per element):
      numeric: count == 1: the value at fixed width
               count >= 2: mode:u8, then
                 0  all values at fixed width
                 1  first at fixed width, then count-1 deltas:sv
                 2  first at fixed width, first delta:sv, then count-2 deltas of deltas:sv
                 5, 6  as 1, 2, but the trailing residuals are zigzagged, bit-packed
                       LSB-first at width w:u8 (w <= 72, zero padding)
      string/bytes: per value uv 0 = same as the previous value, else len+1:uv and the bytes
    bools: every bool leaf's values, leaf after leaf, one bit each, LSB-first, zero padding

A float's column works on an order-preserving integer key of its IEEE bits (key = bits for
positive numbers, ``2**(b-1) - 1 - bits`` for negative ones), so slowly drifting readings have
small deltas and every value round-trips bit-exactly. The encoder picks the shortest mode per
column. Decoding checks everything (ranges, UTF-8, finite floats, padding, trailing bytes)
and raises :class:`MalformedRequest`, never another exception.

Sizes: a few bytes of batch can stand for many large events (a string repeated with one 0
byte), so a decoder given a :class:`SizeBudget` counts what it is about to build, column by
column, before building it: each event's **decoded size** is the length of the msgpack
encoding of its decoded body (what the same body weighs as a plain event; a float field
counts 9 bytes, msgpack float 64), see :meth:`Template.body_size`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import BodyTooLarge, InvalidValue, MalformedRequest
from .values import check_key

HASH_SIZE = 8
MAX_SEQ = 2**63 - 1
"""Largest event seq and time, as in :mod:`crdtsync.protocol` (not imported: protocol will
import this module)."""
MAX_TEXT = 65535
MAX_ARRAY = 1024
MAX_LEAVES = 1024
MAX_DEPTH = 8
MAX_BATCH = 65536
"""Default bound on the event count a decoder accepts (pass the server's own limit)."""

_PERSON = b"crdtsync.tmpl.v1"
_INT_SIZES = {"8": 1, "16": 2, "24": 3, "32": 4, "64": 8}
_FLOAT_FORMATS = {2: "<e", 4: "<f", 8: "<d"}
_TYPE_RE = re.compile(
    r"(?P<base>u?int(?:8|16|24|32|64)|float(?:16|32|64)|bool|(?:string|bytes)(?::(?P<n>\d+))?)"
    r"(?:\[(?P<k>\d+)\])?\Z"
)
TYPE_NAMES = ("int8", "int16", "int24", "int32", "int64", "uint8", "uint16", "uint24",
              "uint32", "uint64", "float16", "float32", "float64", "bool", "string",
              "string:N", "bytes", "bytes:N")
"""Every scalar type name (``N`` a length 1..65535); ``T[K]`` is an array of one of them."""
NOTECARD_CODES = "11-14, 18, 21-24, 28, 12.1, 14.1, 18.1, true, \"N\" (\"0\": any length)"
_NOTECARD_INTS = {11: "int8", 12: "int16", 13: "int24", 14: "int32", 18: "int64",
                  21: "uint8", 22: "uint16", 23: "uint24", 24: "uint32", 28: "uint64"}
_NOTECARD_FLOATS = {12.1: "float16", 14.1: "float32", 18.1: "float64"}

_RAW, _DELTA, _DELTA2, _DELTA_BITS, _DELTA2_BITS = 0, 1, 2, 5, 6


# --- types -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scalar:
    """A scalar field type. ``size`` is the byte width of a number, the maximum length of a
    string or bytes, 0 for ``bool``."""

    kind: str  # "int" | "uint" | "float" | "bool" | "string" | "bytes"
    size: int

    @property
    def name(self) -> str:
        if self.kind in ("int", "uint"):
            return f"{self.kind}{self.size * 8}"
        if self.kind == "float":
            return f"float{self.size * 8}"
        return "bool" if self.kind == "bool" else f"{self.kind}:{self.size}"

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "uint", "float")


@dataclass(frozen=True, slots=True)
class Array:
    """Exactly ``length`` values of ``item``."""

    item: Scalar
    length: int

    @property
    def name(self) -> str:
        return f"{self.item.name}[{self.length}]"


Node: TypeAlias = "Scalar | Array | tuple[tuple[str, Node], ...]"
"""A field type: a scalar, an array, or a nested object as ``((name, node), ...)``."""


def _parse_type_name(text: str, where: str) -> Scalar | Array | None:
    m = _TYPE_RE.match(text)
    if m is None:
        return None
    base, n, k = m.group("base"), m.group("n"), m.group("k")
    if base.startswith(("string", "bytes")):
        size = MAX_TEXT if n is None else int(n)
        if not 1 <= size <= MAX_TEXT:
            raise InvalidValue(f"template {where}: {base.split(':')[0]} length must be "
                               f"1..{MAX_TEXT}", {"field": where})
        scalar = Scalar(base.split(":")[0], size)
    elif base == "bool":
        scalar = Scalar("bool", 0)
    elif base.startswith("float"):
        scalar = Scalar("float", int(base[5:]) // 8)
    else:
        kind = "uint" if base.startswith("u") else "int"
        scalar = Scalar(kind, _INT_SIZES[base.removeprefix("u")[3:]])
    if k is None:
        return scalar
    if not 1 <= int(k) <= MAX_ARRAY:
        raise InvalidValue(f"template {where}: array length must be 1..{MAX_ARRAY}",
                           {"field": where})
    return Array(scalar, int(k))


def _parse_node(spec: Any, where: str, depth: int) -> Node:
    if isinstance(spec, bool):
        return Scalar("bool", 0)
    if isinstance(spec, int) and spec in _NOTECARD_INTS:
        return _parse_node(_NOTECARD_INTS[spec], where, depth)
    if isinstance(spec, float) and spec in _NOTECARD_FLOATS:
        return _parse_node(_NOTECARD_FLOATS[spec], where, depth)
    if isinstance(spec, str):
        parsed = _parse_type_name(spec, where)
        if parsed is not None:
            return parsed
        if spec.isascii() and spec.isdigit():  # Notecard TSTRING(N); "0" is TSTRINGV
            size = int(spec) or MAX_TEXT
            if size > MAX_TEXT:
                raise InvalidValue(f"template {where}: string length must be 1..{MAX_TEXT}",
                                   {"field": where})
            return Scalar("string", size)
        raise _unknown_type(spec, where)
    if isinstance(spec, Mapping):
        if depth >= MAX_DEPTH:
            raise InvalidValue(f"template {where}: nested more than {MAX_DEPTH} levels",
                               {"field": where})
        return _parse_struct(spec, where, depth + 1)
    if isinstance(spec, list):
        raise InvalidValue(f"template {where}: declare arrays as a type name such as "
                           "'int16[4]', not as a JSON array", {"field": where})
    raise _unknown_type(spec, where)


def _unknown_type(spec: Any, where: str) -> InvalidValue:
    """The error for a field type that is no type: it names the valid ones (and the nearest,
    for a typo), so ``"flaot32"`` or Notecard's old sample-string style cannot slip through
    as a string field."""
    guess = difflib.get_close_matches(spec, TYPE_NAMES, n=1) if isinstance(spec, str) else []
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    return InvalidValue(
        f"template {where}: unknown type {spec!r}{hint}; valid types: "
        f"{', '.join(TYPE_NAMES)}, an array T[K] such as 'uint8[3]', a nested object, or a "
        f"Notecard code {NOTECARD_CODES}",
        {"field": where,
         "type": spec if spec is None or isinstance(spec, (str, int, float)) else repr(spec),
         "valid": list(TYPE_NAMES)})


def _parse_struct(spec: Mapping[Any, Any], where: str, depth: int) -> Node:
    if not spec:
        raise InvalidValue(f"template {where}: an object needs at least one field",
                           {"field": where})
    fields = []
    for key, sub in spec.items():
        check_key(key, where=f"template {where}")
        if not key.isascii() and not _is_utf8(key):  # the canonical form is UTF-8
            raise InvalidValue(f"template {where}: field name {key!r} is not valid Unicode "
                               "text (a lone surrogate)", {"field": where})
        path = key if where == "root" else f"{where}.{key}"
        fields.append((key, _parse_node(sub, path, depth)))
    return tuple(fields)


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _to_json(node: Node) -> Any:
    if isinstance(node, tuple):
        return {key: _to_json(sub) for key, sub in node}
    return node.name


def _leaves(node: Node) -> Iterator[Scalar]:
    if isinstance(node, Scalar):
        yield node
    elif isinstance(node, Array):
        yield from [node.item] * node.length
    else:
        for _, sub in node:
            yield from _leaves(sub)


class Template:
    """A parsed, immutable event template.

    ``Template(definition)`` takes a mapping ``{field: type}`` (see the module docstring);
    :meth:`from_json` takes JSON text. Both raise :class:`InvalidValue` on an unknown type, an
    empty object, a bad field name or a definition that is too large. Two templates are
    equal when their hashes are.
    """

    __slots__ = ("_root", "bools", "canonical", "fixed_size", "hash", "leaves",
                 "min_body_size")

    def __init__(self, definition: Mapping[str, Any]) -> None:
        if not isinstance(definition, Mapping):
            raise InvalidValue("a template is a JSON object {field: type}")
        self._root = _parse_struct(definition, "root", 0)
        self.leaves: tuple[Scalar, ...] = tuple(_leaves(self._root))
        if len(self.leaves) > MAX_LEAVES:
            raise InvalidValue(f"template has {len(self.leaves)} values (max {MAX_LEAVES})")
        self.bools = sum(leaf.kind == "bool" for leaf in self.leaves)
        self.canonical: bytes = json.dumps(
            self.definition, separators=(",", ":"), ensure_ascii=False).encode()
        self.hash: bytes = hashlib.blake2b(
            self.canonical, digest_size=HASH_SIZE, person=_PERSON).digest()
        self.fixed_size: int = _fixed_size(self._root)
        """Decoded size of everything in a body that does not depend on its values: map
        and array headers, keys, floats and bools (see :meth:`body_size`)."""
        self.min_body_size: int = self.fixed_size + sum(
            _value_size(leaf, 0 if leaf.numeric else b"") for leaf in self.leaves)
        """The smallest decoded size a body can have (every integer small, every string
        and bytes value empty)."""

    @classmethod
    def from_json(cls, text: str | bytes) -> Template:
        """Parse a JSON definition; duplicate keys and malformed JSON raise InvalidValue."""
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            if len({k for k, _ in items}) != len(items):
                raise InvalidValue("template repeats a field name")
            return dict(items)
        try:
            definition = json.loads(text, object_pairs_hook=pairs)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, InvalidValue):
                raise
            raise InvalidValue(f"template is not JSON: {exc}") from exc
        return cls(definition)

    @property
    def definition(self) -> dict[str, Any]:
        """The normalized definition: crdtsync type names, nested objects, given order."""
        return _to_json(self._root)  # type: ignore[no-any-return]

    def validate(self, body: Any) -> None:
        """Raise :class:`InvalidValue`, naming the field, unless ``body`` fits the template:
        no missing or unknown field, right types, integers in range, floats finite and within
        the width, strings and bytes not too long, arrays of the right length."""
        self._flatten(body)

    def body_size(self, body: Any) -> int:
        """Validate ``body`` like :meth:`validate` and return its **decoded size**: the
        length of the msgpack encoding of the body the cloud decodes from it (each float
        field a float 64 of 9 bytes, each integer in its shortest msgpack form, strings and
        bytes with their msgpack header). The cloud bounds this size per event and per
        request (docs/protocol.md 15b), so a device checks it before queueing."""
        row = self._flatten(body)
        return self.fixed_size + sum(
            _value_size(leaf, wire) for leaf, wire in zip(self.leaves, row, strict=True))

    def _flatten(self, body: Any) -> list[Any]:
        """Validate ``body`` and return its leaf values as wire keys (ints for numbers, bytes
        for strings, bools)."""
        out: list[Any] = []
        _flatten_struct(self._root, body, "", out)
        return out

    def _rebuild(self, values: Iterator[Any]) -> dict[str, Any]:
        return _rebuild(self._root, values)  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"Template({self.definition!r})"


# --- values ------------------------------------------------------------------------------


def _bad(where: str, message: str) -> InvalidValue:
    return InvalidValue(f"event body field {where!r}: {message}", {"field": where})


def _flatten_struct(node: Node, body: Any, where: str, out: list[Any]) -> None:
    if not isinstance(node, tuple):
        _flatten_node(node, body, where, out)
        return
    what = f"field {where!r}" if where else "event body"
    if not isinstance(body, Mapping):
        raise InvalidValue(f"{what} must be an object, not {type(body).__name__}",
                           {"field": where})
    names = [key for key, _ in node]
    missing = [k for k in names if k not in body]
    unknown = [k for k in body if k not in names]
    if missing or unknown:
        parts = [f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else ""]
        raise InvalidValue(
            f"{what} does not fit the template: " + ", ".join(p for p in parts if p),
            {"field": where, "missing": missing, "unknown": [str(k) for k in unknown]})
    for key, sub in node:
        _flatten_struct(sub, body[key], f"{where}.{key}" if where else key, out)


def _flatten_node(node: Scalar | Array, value: Any, where: str, out: list[Any]) -> None:
    if isinstance(node, Scalar):
        out.append(_to_wire(node, value, where))
        return
    if not isinstance(value, (list, tuple)) or len(value) != node.length:
        raise _bad(where, f"must be an array of {node.length} values ({node.name})")
    for i, item in enumerate(value):
        out.append(_to_wire(node.item, item, f"{where}[{i}]"))


def _int_range(t: Scalar) -> tuple[int, int]:
    bits = t.size * 8
    return (0, 2**bits - 1) if t.kind == "uint" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _to_wire(t: Scalar, value: Any, where: str) -> Any:
    if t.kind == "bool":
        if not isinstance(value, bool):
            raise _bad(where, f"must be a boolean, not {type(value).__name__}")
        return value
    if t.kind in ("string", "bytes"):
        return _text_to_wire(t, value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, f"must be a number ({t.name}), not {type(value).__name__}")
    if t.kind == "float":
        return _float_key(t, value, where)
    if not isinstance(value, int):
        raise _bad(where, f"{value!r} is not an integer ({t.name})")
    lo, hi = _int_range(t)
    if not lo <= value <= hi:
        raise _bad(where, f"{value} is out of range for {t.name} ({lo}..{hi})")
    return value


def _text_to_wire(t: Scalar, value: Any, where: str) -> bytes:
    if t.kind == "string":
        if not isinstance(value, str):
            raise _bad(where, f"must be a string, not {type(value).__name__}")
        try:
            data = value.encode()
        except UnicodeEncodeError as exc:
            raise _bad(where, "is not valid Unicode text") from exc
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise _bad(where, f"must be bytes, not {type(value).__name__}")
    if len(data) > t.size:
        raise _bad(where, f"is {len(data)} bytes long (max {t.size})")
    return data


def _float_key(t: Scalar, value: int | float, where: str) -> int:
    try:
        number = float(value)
        if not math.isfinite(number):
            raise _bad(where, f"{value} is not a finite number")
        bits = int.from_bytes(struct.pack(_FLOAT_FORMATS[t.size], number), "little")
    except (OverflowError, struct.error) as exc:
        raise _bad(where, f"{value} does not fit in {t.name}") from exc
    half = 1 << (t.size * 8 - 1)
    return bits if bits < half else half - 1 - bits


def _float_from_key(t: Scalar, key: int) -> float:
    half = 1 << (t.size * 8 - 1)
    bits = key if key >= 0 else half - 1 - key
    number: float = struct.unpack(_FLOAT_FORMATS[t.size], bits.to_bytes(t.size, "little"))[0]
    if not math.isfinite(number):
        raise MalformedRequest("template batch holds a non-finite float")
    return number


def _from_wire(t: Scalar, value: Any) -> Any:
    if t.kind == "float":
        return _float_from_key(t, value)
    if t.kind == "string":
        try:
            return value.decode()
        except UnicodeDecodeError as exc:
            raise MalformedRequest("template batch holds invalid UTF-8") from exc
    return value


def _rebuild(node: Node, values: Iterator[Any]) -> Any:
    if isinstance(node, Scalar):
        return _from_wire(node, next(values))
    if isinstance(node, Array):
        return [_from_wire(node.item, next(values)) for _ in range(node.length)]
    return {key: _rebuild(sub, values) for key, sub in node}


# --- decoded sizes -----------------------------------------------------------------------


_FLOAT_SIZE = 9
"""A decoded float is a Python float, which msgpack encodes as a float 64."""


def _str_header(n: int) -> int:
    return 1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5


def _bin_header(n: int) -> int:
    return 2 if n < 256 else 3 if n < 65536 else 5


def _container_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _int_size(value: int) -> int:
    """Bytes of ``value`` in its shortest msgpack form (fixint, then 8, 16, 32, 64 bits)."""
    if -32 <= value < 128:
        return 1
    if -128 <= value < 256:
        return 2
    if -32768 <= value < 65536:
        return 3
    return 5 if -(2**31) <= value < 2**32 else 9


def _fixed_size(node: Node) -> int:
    """Decoded msgpack bytes of ``node`` that do not depend on its values."""
    if isinstance(node, Scalar):
        return _FLOAT_SIZE if node.kind == "float" else int(node.kind == "bool")
    if isinstance(node, Array):
        return _container_header(node.length) + node.length * _fixed_size(node.item)
    return _container_header(len(node)) + sum(
        _str_header(len(key.encode())) + len(key.encode()) + _fixed_size(sub)
        for key, sub in node)


def _value_size(leaf: Scalar, wire: Any) -> int:
    """Decoded msgpack bytes of one value beyond :func:`_fixed_size`, from its wire form: an
    integer's shortest form, a string's or bytes' header and length; 0 for floats, bools."""
    if leaf.kind in ("int", "uint"):
        return _int_size(wire)
    if leaf.kind == "string":
        return _str_header(len(wire)) + len(wire)
    if leaf.kind == "bytes":
        return _bin_header(len(wire)) + len(wire)
    return 0


class SizeBudget:
    """Bounds on the decoded size of event bodies (see :meth:`Template.body_size`): at most
    ``max_event_body`` bytes for one body, ``max_total`` for every body charged to the budget
    (one budget per request: its plain events and all its batches).

    :func:`decode_batch` charges a batch column by column, before it builds any body, so a
    small batch that stands for huge events is refused having built nothing; past a bound it
    raises :class:`InvalidValue` (``detail.seq``, ``detail.max_event_body``) for one body and
    :class:`BodyTooLarge` (``detail.max_decoded_bytes``) for the total.
    """

    __slots__ = ("max_event_body", "max_total", "used")

    def __init__(self, max_event_body: int, max_total: int) -> None:
        self.max_event_body = max_event_body
        self.max_total = max_total
        self.used = 0

    def charge(self, size: int) -> None:
        """Count ``size`` more bytes; :class:`BodyTooLarge` once the total is over."""
        self.used += size
        if self.used > self.max_total:
            raise BodyTooLarge(
                f"the events of this request decode to more than {self.max_total} bytes; "
                "send fewer events per request", {"max_decoded_bytes": self.max_total})

    def check_event(self, seq: int, size: int) -> None:
        """:class:`InvalidValue` if one event's decoded size ``size`` is over the bound."""
        if size > self.max_event_body:
            raise InvalidValue(
                f"event {seq} body decodes to {size} bytes (max {self.max_event_body})",
                {"seq": seq, "max_event_body": self.max_event_body})


class _Meter:
    """The running decoded sizes of one batch's events, charged to a budget."""

    __slots__ = ("budget", "seqs", "sizes")

    def __init__(self, budget: SizeBudget, template: Template, seqs: list[int]) -> None:
        self.budget = budget
        self.seqs = seqs
        self.sizes = [template.fixed_size] * len(seqs)
        budget.check_event(seqs[0], template.fixed_size)
        budget.charge(template.fixed_size * len(seqs))

    def add(self, leaf: Scalar, column: list[Any]) -> None:
        """Charge one decoded column (wire values): each event's size, then the total."""
        if leaf.kind in ("float", "bool"):
            return  # counted in fixed_size
        same = _same_int_size(column) if leaf.kind in ("int", "uint") else None
        if same is not None:
            self.sizes = [size + same for size in self.sizes]
            added = same * len(column)
        else:
            values = [_value_size(leaf, wire) for wire in column]
            self.sizes = [size + value for size, value in zip(self.sizes, values, strict=True)]
            added = sum(values)
        biggest = max(self.sizes)
        if biggest > self.budget.max_event_body:
            index = self.sizes.index(biggest)
            self.budget.check_event(self.seqs[index], biggest)
        self.budget.charge(added)


def _same_int_size(column: list[int]) -> int | None:
    """The msgpack size every integer of ``column`` shares, when its bounds show one (the
    usual case: readings of one magnitude); ``None`` when it must be counted per value."""
    lo, hi = min(column), max(column)
    size = _int_size(lo)
    # on one side of zero the size grows with the magnitude, so equal bounds mean equal sizes
    return size if (lo >= 0 or hi < 0) and _int_size(hi) == size else None


# --- primitive coding --------------------------------------------------------------------


def _uv(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zz(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzz(value: int) -> int:
    return value >> 1 if not value & 1 else -(value >> 1) - 1


class _Reader:
    """Bounds-checked reads; every failure is a MalformedRequest."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise MalformedRequest("template batch is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uv(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise MalformedRequest("template batch has a non-minimal varint")
                return value
        raise MalformedRequest("template batch has an over-long varint")

    def sv(self) -> int:
        return _unzz(self.uv())


# --- numeric columns ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lane:
    """How a numeric column is stored: keys in lo..hi, ``size`` bytes at fixed width."""

    lo: int
    hi: int
    size: int
    float_kind: bool = False

    def raw(self, key: int, out: bytearray) -> None:
        if self.float_kind:  # fixed width is the plain IEEE bit pattern
            half = 1 << (self.size * 8 - 1)
            key = key if key >= 0 else half - 1 - key
            out += key.to_bytes(self.size, "little")
        else:
            out += key.to_bytes(self.size, "little", signed=self.lo < 0)

    def unraw(self, data: bytes) -> int:
        if self.float_kind:
            bits = int.from_bytes(data, "little")
            half = 1 << (self.size * 8 - 1)
            return bits if bits < half else half - 1 - bits
        return int.from_bytes(data, "little", signed=self.lo < 0)


_TIME_LANE = _Lane(0, MAX_SEQ, 8)


def _lane(t: Scalar) -> _Lane:
    if t.kind == "float":
        half = 1 << (t.size * 8 - 1)
        return _Lane(-half, half - 1, t.size, float_kind=True)
    lo, hi = _int_range(t)
    return _Lane(lo, hi, t.size)


def _residual_block(values: list[int], bits: bool) -> bytes:
    out = bytearray()
    zz = [_zz(v) for v in values]
    if not bits:
        for v in zz:
            _uv(v, out)
        return bytes(out)
    width = max(zz, default=0).bit_length()
    out.append(width)
    packed = 0
    for i, v in enumerate(zz):
        packed |= v << (i * width)
    out += packed.to_bytes(-(-len(zz) * width // 8), "little")
    return bytes(out)


def _encode_column(keys: list[int], lane: _Lane, out: bytearray, first_known: bool) -> None:
    """Write a numeric column of ``len(keys) >= 1`` values in its shortest mode."""
    if len(keys) == 1:
        if not first_known:
            lane.raw(keys[0], out)
        return
    head = bytearray()
    if not first_known:
        lane.raw(keys[0], head)
    raw = bytearray()
    for key in keys[1:] if first_known else keys:
        lane.raw(key, raw)
    best = bytes([_RAW]) + raw
    deltas = [b - a for a, b in itertools.pairwise(keys)]
    dd_head = bytearray(head)
    _uv(_zz(deltas[0]), dd_head)
    dds = [b - a for a, b in itertools.pairwise(deltas)]
    for mode, prefix, residuals, bits in (
        (_DELTA, head, deltas, False), (_DELTA2, dd_head, dds, False),
        (_DELTA_BITS, head, deltas, True), (_DELTA2_BITS, dd_head, dds, True),
    ):
        candidate = bytes([mode]) + prefix + _residual_block(residuals, bits)
        if len(candidate) < len(best):
            best = candidate
    out += best


def _read_residuals(r: _Reader, count: int, bits: bool) -> list[int]:
    if not bits:
        return [r.sv() for _ in range(count)]
    width = r.take(1)[0]
    if width > 72:
        raise MalformedRequest("template batch has a bad bit width")
    packed = int.from_bytes(r.take(-(-count * width // 8)), "little")
    if packed >> (count * width):
        raise MalformedRequest("template batch has non-zero padding bits")
    mask = (1 << width) - 1
    return [_unzz((packed >> (i * width)) & mask) for i in range(count)]


def _decode_column(r: _Reader, n: int, lane: _Lane, first: int | None) -> list[int]:
    if n == 1:
        keys = [first if first is not None else lane.unraw(r.take(lane.size))]
    else:
        mode = r.take(1)[0]
        if mode == _RAW:
            keys = [] if first is None else [first]
            keys += [lane.unraw(r.take(lane.size)) for _ in range(n - len(keys))]
        elif mode in (_DELTA, _DELTA2, _DELTA_BITS, _DELTA2_BITS):
            keys = _decode_deltas(r, n, lane, first, mode)
        else:
            raise MalformedRequest(f"template batch has unknown column mode {mode}")
    for key in keys:
        if not lane.lo <= key <= lane.hi:
            raise MalformedRequest("template batch holds a number out of its type's range")
    return keys


def _decode_deltas(r: _Reader, n: int, lane: _Lane, first: int | None, mode: int) -> list[int]:
    key = first if first is not None else lane.unraw(r.take(lane.size))
    bits = mode in (_DELTA_BITS, _DELTA2_BITS)
    keys = [key]
    if mode in (_DELTA, _DELTA_BITS):
        for delta in _read_residuals(r, n - 1, bits):
            key += delta
            _check_key(key, lane)
            keys.append(key)
        return keys
    delta = r.sv()
    key += delta
    keys.append(key)
    for dd in _read_residuals(r, n - 2, bits):
        _check_key(key, lane)
        delta += dd
        key += delta
        keys.append(key)
    return keys


def _check_key(key: int, lane: _Lane) -> None:
    # checked as we go, so garbage deltas cannot grow numbers without bound
    if not lane.lo <= key <= lane.hi:
        raise MalformedRequest("template batch holds a number out of its type's range")


# --- text and bool columns ---------------------------------------------------------------


def _encode_text(values: list[bytes], out: bytearray) -> None:
    previous: bytes | None = None
    for value in values:
        if value == previous:
            out.append(0)
        else:
            _uv(len(value) + 1, out)
            out += value
        previous = value


def _decode_text(r: _Reader, n: int, t: Scalar) -> list[bytes]:
    values: list[bytes] = []
    for _ in range(n):
        length = r.uv()
        if length == 0:
            if not values:
                raise MalformedRequest("template batch repeats a value that does not exist")
            values.append(values[-1])
            continue
        if length - 1 > t.size:
            raise MalformedRequest(f"template batch holds a {t.kind} over {t.size} bytes")
        values.append(r.take(length - 1))
    return values


def _encode_bools(values: list[bool], out: bytearray) -> None:
    packed = sum(1 << i for i, v in enumerate(values) if v)
    out += packed.to_bytes(-(-len(values) // 8), "little")


def _decode_bools(r: _Reader, n: int) -> list[bool]:
    packed = int.from_bytes(r.take(-(-n // 8)), "little")
    if packed >> n:
        raise MalformedRequest("template batch has non-zero padding bits")
    return [bool(packed >> i & 1) for i in range(n)]


# --- batches -----------------------------------------------------------------------------

Record: TypeAlias = tuple[int, int, dict[str, Any]]
"""``(seq, time_ms, body)``."""


def encode_batch(template: Template, records: Sequence[tuple[int, int, Any]], *,
                 ref_seq: int = 0, ref_time: int = 0) -> bytes:
    """Encode events ``(seq, time_ms, body)`` of one topic as one template batch.

    Seqs must be strictly increasing in 1..2**63-1, times in 0..2**63-1 (in any order);
    every body must fit ``template``. ``ref_seq``/``ref_time`` are values both peers already
    know (say, the last acknowledged event: ``ref_seq`` must be below the first seq); the
    first seq and time are stored as differences from them, and the decoder must be given
    the same. Raises :class:`InvalidValue`.
    """
    n = len(records)
    for name, ref in (("ref_seq", ref_seq), ("ref_time", ref_time)):
        if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref <= MAX_SEQ:
            raise InvalidValue(f"{name} must be an integer in 0..{MAX_SEQ}")
    if n > MAX_BATCH:
        raise InvalidValue(f"{n} events in one template batch (max {MAX_BATCH})")
    seqs, times = _check_envelopes(records)
    if seqs and seqs[0] <= ref_seq:
        raise InvalidValue(f"ref_seq {ref_seq} must be below the first seq {seqs[0]}")
    rows = [template._flatten(body) for _, _, body in records]
    out = bytearray(template.hash)
    _uv(n, out)
    if n == 0:
        return bytes(out)
    _uv(seqs[0] - ref_seq - 1, out)
    _uv(_zz(times[0] - ref_time), out)
    if n > 1:
        gaps = [b - a - 1 for a, b in itertools.pairwise(seqs)]
        out.append(1 if any(gaps) else 0)
        for gap in gaps if any(gaps) else ():
            _uv(gap, out)
        _encode_column(times, _TIME_LANE, out, first_known=True)
    bools: list[bool] = []
    for i, leaf in enumerate(template.leaves):
        column = [row[i] for row in rows]
        if leaf.kind == "bool":
            bools += column
        elif leaf.numeric:
            _encode_column(column, _lane(leaf), out, first_known=False)
        else:
            _encode_text(column, out)
    _encode_bools(bools, out)
    return bytes(out)


def _check_envelopes(records: Sequence[tuple[int, int, Any]]) -> tuple[list[int], list[int]]:
    seqs: list[int] = []
    times: list[int] = []
    for record in records:
        if not isinstance(record, (tuple, list)) or len(record) != 3:
            raise InvalidValue("each record is (seq, time_ms, body)")
        seq, time, _ = record
        for name, value, low in (("seq", seq, 1), ("time", time, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SEQ:
                raise InvalidValue(f"event {name} must be an integer in {low}..{MAX_SEQ}")
        if seqs and seq <= seqs[-1]:
            raise InvalidValue(f"event seqs must increase ({seqs[-1]} then {seq})")
        seqs.append(seq)
        times.append(time)
    return seqs, times


def batch_hash(data: bytes) -> bytes:
    """The template hash a batch was encoded with, to pick the template to decode it."""
    if len(data) < HASH_SIZE:
        raise MalformedRequest("template batch is truncated")
    return bytes(data[:HASH_SIZE])


def decode_batch(template: Template, data: bytes, *, ref_seq: int = 0, ref_time: int = 0,
                 max_count: int = MAX_BATCH, budget: SizeBudget | None = None
                 ) -> list[Record]:
    """Decode a batch made by :func:`encode_batch` with the same template and references.

    Returns ``[(seq, time_ms, body), ...]``. Raises :class:`MalformedRequest` (with
    ``detail["expected"]``/``["got"]`` on a template mismatch) for anything that is not
    exactly such a batch: wrong template, truncation, trailing bytes, out-of-range values,
    more than ``max_count`` events. With a ``budget``, the events' decoded sizes are charged
    to it as each column is read, before any body is built: :class:`InvalidValue` or
    :class:`BodyTooLarge` (see :class:`SizeBudget`) when they do not fit.
    """
    r = _Reader(bytes(data))
    got = r.take(HASH_SIZE)
    if got != template.hash:
        raise MalformedRequest("template batch was encoded with another template",
                               {"expected": template.hash.hex(), "got": got.hex()})
    n = r.uv()
    if n > max_count:
        raise MalformedRequest(f"template batch holds {n} events (max {max_count})")
    if n == 0:
        _finish(r)
        return []
    seqs, times = _decode_envelopes(r, n, ref_seq, ref_time)
    meter = _Meter(budget, template, seqs) if budget is not None else None
    columns: list[list[Any]] = []
    bool_slots: list[int] = []
    for leaf in template.leaves:
        if leaf.kind == "bool":
            bool_slots.append(len(columns))
            columns.append([])
            continue
        if leaf.numeric:
            columns.append(_decode_column(r, n, _lane(leaf), None))
        else:
            columns.append(_decode_text(r, n, leaf))
        if meter is not None:
            meter.add(leaf, columns[-1])
    bools = _decode_bools(r, n * len(bool_slots))
    for j, slot in enumerate(bool_slots):
        columns[slot] = bools[j * n:(j + 1) * n]
    _finish(r)
    return [(seqs[i], times[i], template._rebuild(col[i] for col in columns))
            for i in range(n)]


def _decode_envelopes(r: _Reader, n: int, ref_seq: int,
                      ref_time: int) -> tuple[list[int], list[int]]:
    seqs = [ref_seq + 1 + r.uv()]
    time0 = ref_time + r.sv()
    if not 0 <= time0 <= MAX_SEQ:
        raise MalformedRequest("template batch has an out-of-range time")
    if n > 1:
        flag = r.uv()
        if flag not in (0, 1):
            raise MalformedRequest("template batch has a bad seq flag")
        for _ in range(n - 1):
            seqs.append(seqs[-1] + 1 + (r.uv() if flag else 0))
    if seqs[-1] > MAX_SEQ:
        raise MalformedRequest("template batch has an out-of-range seq")
    return seqs, _decode_column(r, n, _TIME_LANE, time0)


def _finish(r: _Reader) -> None:
    if r.pos != len(r.data):
        raise MalformedRequest("template batch has trailing bytes")


def encode_one(template: Template, seq: int, time: int, body: Any, *,
               ref_seq: int = 0, ref_time: int = 0) -> bytes:
    """Encode a single event: a batch of one (its values at fixed width)."""
    return encode_batch(template, [(seq, time, body)], ref_seq=ref_seq, ref_time=ref_time)


def decode_one(template: Template, data: bytes, *, ref_seq: int = 0,
               ref_time: int = 0) -> Record:
    """Decode a batch that must hold exactly one event."""
    records = decode_batch(template, data, ref_seq=ref_seq, ref_time=ref_time, max_count=1)
    if len(records) != 1:
        raise MalformedRequest("template batch does not hold exactly one event")
    return records[0]
