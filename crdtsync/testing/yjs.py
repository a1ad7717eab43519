"""Hand-built Yjs v1 updates, for tests that need what no well-behaved client writes.

pycrdt only writes valid updates of the values it accepts. Conflict and hostile-input tests
need the rest too: ``undefined``, BigInts, NaN, values nested 20,000 deep, nested shared
types, root arrays, legacy content kinds, huge declared counts, items that build on items
the receiver lacks. This module writes them, byte for byte as lib0 and Yjs do (the format is
in docs/protocol.md, section 7a), from small explicit pieces::

    update(client(7, 0, item(any_content({"temp": 21.5}), root="state", key="temp")))

Nothing here validates: that is the point.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Undefined:
    """JavaScript ``undefined`` as a lib0 ``any`` value."""


@dataclass(frozen=True)
class BigInt:
    """A JavaScript ``BigInt`` (lib0 tag 122)."""

    value: int


@dataclass(frozen=True)
class Float32:
    """A number written as a 32-bit float (lib0 tag 124)."""

    value: float


@dataclass(frozen=True)
class Varint:
    """An integer written as a lib0 varint whatever its size (tag 125)."""

    value: int


@dataclass(frozen=True)
class Content:
    """An item's content: its kind (the low 5 bits of the info byte), encoded payload and
    clock length."""

    kind: int
    payload: bytes
    length: int = 1


def varuint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint(value: int) -> bytes:
    """A lib0 signed varint: sign in bit 6 of the first byte, 6 value bits there."""
    magnitude = abs(value)
    first = (magnitude & 0x3F) | (0x40 if value < 0 else 0)
    magnitude >>= 6
    if not magnitude:
        return bytes([first])
    return bytes([first | 0x80]) + varuint(magnitude)


def string(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return varuint(len(raw)) + raw


def any_value(value: Any) -> bytes:
    """A value in lib0's ``writeAny`` encoding (Python ints as varints when they fit 53 bits,
    as float64 otherwise, like JavaScript numbers)."""
    if isinstance(value, Undefined):
        return b"\x7f"
    if value is None:
        return b"\x7e"
    if value is True or value is False:
        return b"\x78" if value else b"\x79"
    if isinstance(value, Varint):
        return b"\x7d" + varint(value.value)
    if isinstance(value, int):
        if abs(value) <= 2**31:
            return b"\x7d" + varint(value)
        return b"\x7b" + struct.pack(">d", float(value))
    if isinstance(value, float):
        return b"\x7b" + struct.pack(">d", value)
    if isinstance(value, Float32):
        return b"\x7c" + struct.pack(">f", value.value)
    if isinstance(value, BigInt):
        return b"\x7a" + struct.pack(">q", value.value)
    if isinstance(value, str):
        return b"\x77" + string(value)
    if isinstance(value, dict):
        return b"\x76" + varuint(len(value)) + b"".join(
            string(k) + any_value(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return b"\x75" + varuint(len(value)) + b"".join(any_value(v) for v in value)
    if isinstance(value, (bytes, bytearray)):
        return b"\x74" + varuint(len(value)) + bytes(value)
    raise TypeError(f"no lib0 encoding for {type(value).__name__}")


def nested_array(depth: int, leaf: Any = 1) -> bytes:
    """An ``any`` array nested ``depth`` deep, built iteratively (no recursion limit)."""
    return b"\x75\x01" * depth + any_value(leaf)


# --- contents ------------------------------------------------------------------------------

def any_content(*values: Any, raw: bytes | None = None) -> Content:
    """``ContentAny``: what ``map.set`` and ``array.insert`` write (``raw`` for one value
    already encoded, e.g. :func:`nested_array`)."""
    if raw is not None:
        return Content(8, varuint(1) + raw, 1)
    return Content(8, varuint(len(values)) + b"".join(any_value(v) for v in values),
                   len(values))


def type_content(ref: int, name: str = "") -> Content:
    """``ContentType``: 0 Y.Array, 1 Y.Map, 2 Y.Text, 3 Y.XmlElement (with ``name``),
    4 Y.XmlFragment, 5 Y.XmlHook (with ``name``), 6 Y.XmlText."""
    return Content(7, varuint(ref) + (string(name) if ref in (3, 5) else b""))


def string_content(text: str) -> Content:
    """``ContentString`` (Y.Text), its length in UTF-16 code units."""
    return Content(4, string(text), len(text.encode("utf-16-le")) // 2)


def deleted_content(length: int) -> Content:
    return Content(1, varuint(length), length)


def binary_content(data: bytes) -> Content:
    return Content(3, varuint(len(data)) + data)


def json_content(*texts: str) -> Content:
    """The legacy ``ContentJSON`` (each entry a JSON text)."""
    return Content(2, varuint(len(texts)) + b"".join(string(t) for t in texts), len(texts))


def embed_content(json_text: str) -> Content:
    return Content(5, string(json_text))


def format_content(key: str, json_text: str) -> Content:
    return Content(6, string(key) + string(json_text))


def doc_content(guid: str) -> Content:
    return Content(9, string(guid) + any_value({}))


# --- structs and updates ----------------------------------------------------------------------

@dataclass(frozen=True)
class Struct:
    data: bytes
    length: int


def item(content: Content, *, root: str | None = None, parent: tuple[int, int] | None = None,
         key: str | None = None, origin: tuple[int, int] | None = None,
         right: tuple[int, int] | None = None) -> Struct:
    """An item. Parent info (``root`` name or ``parent`` type id, and ``key``) is written
    only without ``origin`` and ``right``, as in Yjs."""
    info = content.kind
    out = bytearray()
    if origin is not None:
        info |= 0x80
        out += varuint(origin[0]) + varuint(origin[1])
    if right is not None:
        info |= 0x40
        out += varuint(right[0]) + varuint(right[1])
    if origin is None and right is None:
        if key is not None:
            info |= 0x20
        if root is not None:
            out += varuint(1) + string(root)
        elif parent is not None:
            out += varuint(0) + varuint(parent[0]) + varuint(parent[1])
        else:
            raise ValueError("an item without neighbours needs a root or a parent")
        if key is not None:
            out += string(key)
    return Struct(bytes([info]) + bytes(out) + content.payload, content.length)


def gc(length: int) -> Struct:
    return Struct(b"\x00" + varuint(length), length)


def skip(length: int) -> Struct:
    return Struct(b"\x0a" + varuint(length), length)


def client(client_id: int, clock: int, *structs: Struct) -> bytes:
    """One client's run of structs starting at ``clock``."""
    return (varuint(len(structs)) + varuint(client_id) + varuint(clock)
            + b"".join(s.data for s in structs))


def update(*clients: bytes, deletes: Iterable[tuple[int, Iterable[tuple[int, int]]]] = ()
           ) -> bytes:
    """A v1 update of ``clients`` (from :func:`client`) and a delete set
    ``[(client, [(clock, length), ...]), ...]``."""
    ds = [(c, list(ranges)) for c, ranges in deletes]
    out = bytearray(varuint(len(clients)) + b"".join(clients))
    out += varuint(len(ds))
    for client_id, ranges in ds:
        out += varuint(client_id) + varuint(len(ranges))
        for clock, length in ranges:
            out += varuint(clock) + varuint(length)
    return bytes(out)


def set_key(client_id: int, clock: int, key: str, value: Any = None, *, root: str = "state",
            raw: bytes | None = None) -> bytes:
    """The update of a fresh replica writing ``root[key] = value``: one item, no origin."""
    return update(client(client_id, clock, item(
        any_content(value) if raw is None else any_content(raw=raw), root=root, key=key)))
