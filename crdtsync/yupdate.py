"""A pure, bounded reader of Yjs v1 updates: what an update inserts, before pycrdt sees it.

pycrdt (Yrs) trusts the bytes it is given: an ``any`` value nested 20,000 deep overflows the C
stack (SIGSEGV), a 5-byte update that declares 2**32 clients makes it try to allocate 352 GB,
and an update that builds on items it lacks stays pending, where nothing can be checked
(PYCRDT_NOTES 18-20). This module reads the update format itself (lib0 ``decoding.js`` is the
reference) and never allocates from a declared count: every count is checked against the bytes
that remain, every nesting level against a bound, and values are built one by one.

:func:`read_update` walks every struct and every content value and raises

- :class:`~crdtsync.errors.CorruptUpdate` for bytes that are not a Yjs v1 update (truncated,
  an over-long or out-of-range number, trailing bytes, invalid UTF-8, an unknown content kind);
- :class:`~crdtsync.errors.InvalidValue` (with ``detail.where``) for a well-formed update that
  writes what a crdtsync document may not hold: values that are not JSON data (bytes,
  ``undefined``, BigInt, non-finite or unsafe numbers, empty or over-long keys), content that
  nests deeper than :data:`~crdtsync.values.MAX_DEPTH`, a root that is not a map (items of a
  root ``Y.Array``/``Y.Text``), a root named ``""``, XML types, sub-documents, rich-text
  embeds and formatting, and the legacy ``ContentJSON`` encoding.

It returns an :class:`UpdateInfo` that tells, given the receiver's state vector, whether the
update can integrate completely (:meth:`UpdateInfo.missing`). The wire layout is in
docs/protocol.md, section 7a.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import isfinite
from typing import TypeAlias

from ._accel import speedups
from .errors import CorruptUpdate, InvalidValue
from .values import MAX_DEPTH, MAX_KEY_LENGTH, MAX_SAFE_INTEGER

MAX_CLIENT = 2**53 - 1
"""Largest Yjs client id (a JavaScript safe integer)."""
MAX_CLOCK = 2**32 - 1
"""Yrs keeps clocks in 32 bits: an item's last clock must stay at or below this."""

# Content kinds: the low 5 bits of a struct's info byte (lib0/yjs ``contentRefs``).
GC, DELETED, JSON, BINARY, STRING, EMBED, FORMAT, TYPE, ANY, DOC, SKIP = range(11)
# Type refs of ``ContentType`` (yjs ``typeRefs``).
Y_ARRAY, Y_MAP, Y_TEXT = 0, 1, 2
TYPE_NAMES = {0: "Y.Array", 1: "Y.Map", 2: "Y.Text", 3: "Y.XmlElement", 4: "Y.XmlFragment",
              5: "Y.XmlHook", 6: "Y.XmlText"}
_REFUSED_CONTENT = {
    JSON: "the legacy ContentJSON encoding (Yjs < 13) is not accepted",
    BINARY: "Uint8Array values are not JSON data",
    EMBED: "Y.Text embeds are not supported",
    FORMAT: "Y.Text formatting attributes are not supported",
    DOC: "sub-documents are not supported",
}
_REFUSED_VALUES = {127: "undefined", 122: "a BigInt", 116: "a Uint8Array"}
_BIT8, _BIT7, _BIT6 = 0x80, 0x40, 0x20
_ORIGINS = _BIT8 | _BIT7
_FLOAT32 = struct.Struct(">f").unpack_from
_FLOAT64 = struct.Struct(">d").unpack_from

ID = tuple[int, int]
"""A Yjs item id: ``(client, clock)``."""

# Where a value sits, kept as a chain of tuples built in O(1) per item or value and rendered
# only when an error names it (most updates are valid: formatting every place eagerly was a
# good part of the reading time). A chain ends in a root map's name or in
# ``("item" | "type", client, clock)``, an item known only by its id; each link
# ``(parent, segment)`` adds a map key (a ``str``) or an array index (an ``int``).
_Where: TypeAlias = "str | tuple[str, int, int] | tuple[_Where, str | int]"


def _render(doc: str, where: _Where) -> str:
    """``where`` as ``detail.where`` spells it: ``<doc>:<root>.<key>[<index>]...``."""
    parts: list[str] = []
    while isinstance(where, tuple) and len(where) == 2:
        where, segment = where
        parts.append(f"[{segment}]" if isinstance(segment, int) else f".{segment}")
    if isinstance(where, str):
        base = f"{doc}:{where}"
    else:
        base = f"{doc}:<{where[0]} {where[1]}:{where[2]}>"
    return base + "".join(reversed(parts))


@dataclass(slots=True)
class UpdateInfo:
    """What :func:`read_update` learnt about an update."""

    structs: int = 0
    """Structs (items, GC and skip ranges) in the update."""
    starts: dict[int, int] = field(default_factory=dict)
    """Per client, the clock of its first struct in the update."""
    ends: dict[int, int] = field(default_factory=dict)
    """Per client, the clock after its last struct in the update."""
    refs: set[ID] = field(default_factory=set)
    """Ids the update's items build on (origins and parents) that lie outside its own runs
    (:func:`outside_refs`): only those can be what a receiver lacks."""
    skips: bool = False
    """The update holds a skip range: it has a hole and cannot integrate completely."""

    def missing(self, sv: Mapping[int, int]) -> ID | None:
        """Why the update cannot be applied as it is at a replica with state vector ``sv``:
        the id of an item it needs that the replica lacks, or the replica's clock of a client
        whose run the update starts below that clock and ends above it; ``None`` when it
        integrates completely and exactly there.

        The second case is legitimate only as a resend that overlaps what the replica already
        has, and then it is safe to send again from the replica's clock. Applied, Yrs would
        slice the struct that straddles the clock and keep the slice's *own* parent while
        giving it the replica's item before it as origin: with a forged or corrupted history
        (other content under ids the replica has) the document then holds an item where its
        own encoding, and so every other replica, places it elsewhere."""
        if self.skips:
            return next(((c, s) for c, s in self.starts.items()), (0, 0))
        for client, start in self.starts.items():
            known = sv.get(client, 0)
            if start > known or start < known < self.ends[client]:
                return client, known
        for client, clock in self.refs:
            if clock >= max(sv.get(client, 0), self.ends.get(client, 0)):
                return client, clock
        return None


def outside_refs(refs: set[ID], ends: Mapping[int, int]) -> set[ID]:
    """The ids of ``refs`` at or after their client's end in ``ends`` (0 for a client the
    update does not hold). An id below that end is an item of the update itself, or one the
    receiver must hold for the update's run of that client to begin where it does, which
    :meth:`UpdateInfo.missing` checks through ``starts``: it can never be the one missing.
    Most of an update's references are such (an overwrite builds on the device's own earlier
    items), and checking them on every sync was the larger part of ``missing``'s cost."""
    return {(client, clock) for client, clock in refs if clock >= ends.get(client, 0)}


# lib0 decoding, as functions of ``(data, pos)`` that return ``(value, pos after)``. The
# readers index ``data`` without checking the length first: reading past the end raises
# IndexError, which :func:`read_update` reports as truncated data (always at the end: no
# read skips ahead unchecked). A one-byte varuint, the common case, is read inline by the
# callers (``value = data[pos]; pos += 1; if value > 0x7F: ... _uint_tail``).

def _corrupt(what: str, pos: int) -> CorruptUpdate:
    return CorruptUpdate(f"not a Yjs v1 update: {what} at byte {pos}")


def _uint_tail(data: bytes, pos: int, first: int, maximum: int) -> tuple[int, int]:
    """The rest of a lib0 varuint whose first byte ``first`` (at ``pos - 1``) had its
    continuation bit; refused above ``maximum`` (which is at least ``2**28 - 1``)."""
    # Up to four bytes (28 bits: every clock below 2**28 and most client ids) unrolled, with
    # no range check: no maximum is that small.
    byte = data[pos]
    value = first & 0x7F | (byte & 0x7F) << 7
    if byte < 0x80:
        return value, pos + 1
    byte = data[pos + 1]
    value |= (byte & 0x7F) << 14
    if byte < 0x80:
        return value, pos + 2
    byte = data[pos + 2]
    value |= (byte & 0x7F) << 21
    if byte < 0x80:
        return value, pos + 3
    pos += 3
    shift = 28
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if value > maximum:
            raise _corrupt("number out of range", pos)
        if byte < 0x80:
            return value, pos
        shift += 7


def _uint(data: bytes, pos: int, maximum: int = MAX_CLIENT) -> tuple[int, int]:
    """A lib0 varuint, at most ``maximum``."""
    value = data[pos]
    if value < 0x80:
        return value, pos + 1
    return _uint_tail(data, pos + 1, value, maximum)


def _count(data: bytes, pos: int, least_bytes: int = 1) -> tuple[int, int]:
    """A declared number of elements, each taking at least ``least_bytes``: refused when
    the bytes that remain cannot hold them (nothing is allocated from it)."""
    value = data[pos]
    pos += 1
    if value > 0x7F:
        value, pos = _uint_tail(data, pos, value, MAX_CLIENT)
    if value * least_bytes > len(data) - pos:
        raise _corrupt(f"declares {value} elements in {len(data) - pos} bytes", pos)
    return value, pos


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A lib0 string: its UTF-8 byte length (bounded by the bytes that remain), the bytes."""
    size, pos = _count(data, pos)
    end = pos + size
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError as exc:
        raise _corrupt("invalid UTF-8 in a string", end) from exc


def _id(data: bytes, pos: int) -> tuple[ID, int]:
    """An item id: varuint client, varuint clock."""
    client = data[pos]
    pos += 1
    if client > 0x7F:
        client, pos = _uint_tail(data, pos, client, MAX_CLIENT)
    clock = data[pos]
    pos += 1
    if clock > 0x7F:
        clock, pos = _uint_tail(data, pos, clock, MAX_CLOCK)
    return (client, clock), pos


def _varint_tail(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a lib0 signed varint (sign in bit 6 of ``first``) that continues."""
    value = first & 0x3F
    shift = 6
    byte = first
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise _corrupt("over-long integer", pos)
    return (-value if first & 0x40 else value), pos


def utf16_length(text: str) -> int:
    """The length of ``text`` in UTF-16 code units: how Yjs counts a string's clock length."""
    if text.isascii():
        return len(text)
    # Decoded UTF-8 holds no lone surrogates, so this encodes every character.
    return len(text.encode("utf-16-le")) // 2


class _UpdateReader:
    """One read of one update: the bytes, and what the structs read so far tell."""

    __slots__ = ("clocks", "data", "doc", "places", "refs", "types")

    def __init__(self, data: bytes, doc: str) -> None:
        self.data = data
        self.doc = doc
        self.refs: set[ID] = set()
        self.clocks: dict[int, list[int]] = {}
        """Per client, the first clock of each item read so far, in read order."""
        self.places: dict[int, list[tuple[int, int, _Where]]] = {}
        """Per client and in the same order, each item's (end clock, level, where): level
        is the nesting level of its parent, 0 for a root map, n for a type n levels down."""
        self.types: dict[ID, tuple[int, _Where]] = {}
        """Types created by the update: id -> (its level, where)."""

    def read(self) -> UpdateInfo:
        # One loop over every struct, with the item header read inline: most of the reading
        # time of a small update went into calls per byte and per struct.
        data, refs = self.data, self.refs
        info = UpdateInfo(refs=refs)
        starts, ends = info.starts, info.ends
        clients, pos = _count(data, 0, 3)
        for _ in range(clients):
            structs, pos = _count(data, pos)
            client, pos = _uint(data, pos)
            clock, pos = _uint(data, pos, MAX_CLOCK)
            starts.setdefault(client, clock)
            clocks = self.clocks.setdefault(client, [])
            places = self.places.setdefault(client, [])
            info.structs += structs
            for _ in range(structs):
                head = data[pos]
                pos += 1
                kind = head & 0x1F
                if kind in (GC, SKIP):
                    length, pos = _uint(data, pos, MAX_CLOCK)
                    info.skips |= kind == SKIP
                else:
                    if head & _ORIGINS:
                        # origin, right origin or both: the first one read is the neighbour
                        neighbour, pos = _id(data, pos)
                        refs.add(neighbour)
                        if head & _ORIGINS == _ORIGINS:
                            right, pos = _id(data, pos)
                            refs.add(right)
                        level, where = self._inherit(neighbour, client, clock)
                    else:
                        pos, level, where = self._parent(pos, head & _BIT6)
                    pos, length = self._content(pos, kind, level, where, client, clock)
                    clocks.append(clock)
                    places.append((clock + length, level, where))
                if length < 1 or clock + length > MAX_CLOCK + 1:
                    raise _corrupt("struct length out of range", pos)
                clock += length
            ends[client] = clock
        pos = _delete_set(data, pos)
        if pos != len(data):
            raise _corrupt("trailing bytes after the update", pos)
        info.refs = outside_refs(refs, ends)
        return info

    def _content(self, pos: int, kind: int, level: int, where: _Where,
                 client: int, clock: int) -> tuple[int, int]:
        """Read and check the content of the item ``(client, clock)``; return (pos after
        it, its clock length)."""
        data = self.data
        if kind == ANY:
            length = data[pos]
            pos += 1
            if length > 0x7F:
                length, pos = _uint_tail(data, pos, length, MAX_CLIENT)
            if length > len(data) - pos:
                raise _corrupt(f"declares {length} elements in {len(data) - pos} bytes", pos)
            if length == 1:
                return self._any(pos, level + 1, where), 1
            for i in range(length):
                pos = self._any(pos, level + 1, (where, i))
            return pos, length
        if kind == STRING:
            text, pos = _string(data, pos)
            return pos, utf16_length(text)
        if kind == DELETED:
            length, pos = _uint(data, pos, MAX_CLOCK)
            return pos, length
        if kind == TYPE:
            return self._type(pos, level, where, (client, clock))
        if kind in _REFUSED_CONTENT:
            raise self._invalid(where, _REFUSED_CONTENT[kind])
        raise _corrupt(f"unknown content kind {kind}", pos)

    def _parent(self, pos: int, has_key: int) -> tuple[int, int, _Where]:
        """Explicit parent info: a root name or the id of a type; then the map key. Returns
        (pos after it, the parent's level, where)."""
        data = self.data
        form, pos = _uint(data, pos)
        where: _Where
        if form == 1:
            name, pos = _string(data, pos)
            if not name or len(name) > MAX_KEY_LENGTH:
                raise self._invalid("", "root map names are non-empty strings of "
                                    f"at most {MAX_KEY_LENGTH} characters")
            level, where = 0, name
        else:
            parent, pos = _id(data, pos)
            self.refs.add(parent)
            # A type the receiver already has counts as level 1, the least it can be (the
            # receiver checks the total depth in the real document).
            level, where = self.types.get(parent) or (1, ("type", *parent))
        if not has_key:
            if level == 0:
                raise self._invalid(where, "a root must be a Y.Map: items of a root "
                                    "Y.Array or Y.Text are not accepted")
            return pos, level, where
        key, pos = _string(data, pos)
        if not key or len(key) > MAX_KEY_LENGTH:
            raise self._invalid(where, f"keys are non-empty strings of at most "
                                f"{MAX_KEY_LENGTH} characters")
        return pos, level, (where, key)

    def _inherit(self, neighbour: ID, client: int, clock: int) -> tuple[int, _Where]:
        """An item placed next to ``neighbour`` has the same parent; next to an item the
        receiver already has, level 0 is the least it can be, and the item's own id
        ``(client, clock)`` is all that tells where it is."""
        clocks = self.clocks.get(neighbour[0])
        if clocks:
            i = bisect_right(clocks, neighbour[1]) - 1
            if i >= 0:
                end, level, where = self.places[neighbour[0]][i]
                if neighbour[1] < end:
                    return level, where
        return 0, ("item", client, clock)

    def _type(self, pos: int, level: int, where: _Where, item: ID) -> tuple[int, int]:
        ref, pos = _uint(self.data, pos)
        if ref not in (Y_ARRAY, Y_MAP, Y_TEXT):
            raise self._invalid(where, f"{TYPE_NAMES.get(ref, f'type {ref}')} is not "
                                "supported (only Y.Map, Y.Array and Y.Text)")
        if level + 1 > MAX_DEPTH:
            raise self._invalid(where, f"nested more than {MAX_DEPTH} levels")
        self.types[item] = (level + 1, where)
        return pos, 1

    def _any(self, pos: int, depth: int, where: _Where) -> int:
        """Check the lib0 ``any`` value at ``pos``, at nesting ``depth`` (1 = a map's value);
        return the position after it. Tags in the order of how often documents hold them."""
        if depth > MAX_DEPTH:
            raise self._invalid(where, f"nested more than {MAX_DEPTH} levels")
        data = self.data
        tag = data[pos]
        pos += 1
        if tag == 125:
            first = data[pos]
            if first < 0x80:
                return pos + 1  # six bits: always a safe integer
            value, pos = _varint_tail(data, pos + 1, first)
            if abs(value) > MAX_SAFE_INTEGER:
                raise self._invalid(where, f"integer {value} is outside +/-{MAX_SAFE_INTEGER}")
            return pos
        if tag == 123 or tag == 124:
            size, unpack = (8, _FLOAT64) if tag == 123 else (4, _FLOAT32)
            if pos + size > len(data):
                raise _corrupt("truncated", pos)
            number = unpack(data, pos)[0]
            if not isfinite(number):
                raise self._invalid(where, f"{number} is not a finite number")
            return pos + size
        if tag == 119:
            return _string(data, pos)[1]
        if tag == 126 or tag == 121 or tag == 120:  # null, false, true
            return pos
        if tag == 118:
            entries, pos = _count(data, pos, 2)
            for _ in range(entries):
                key, pos = _string(data, pos)
                if not key or len(key) > MAX_KEY_LENGTH:
                    raise self._invalid(where, "keys are non-empty strings of at most "
                                        f"{MAX_KEY_LENGTH} characters")
                pos = self._any(pos, depth + 1, (where, key))
            return pos
        if tag == 117:
            items, pos = _count(data, pos)
            for i in range(items):
                pos = self._any(pos, depth + 1, (where, i))
            return pos
        if tag in _REFUSED_VALUES:
            raise self._invalid(where, f"{_REFUSED_VALUES[tag]} is not JSON data")
        raise _corrupt(f"unknown value tag {tag}", pos)

    def _invalid(self, where: _Where, problem: str) -> InvalidValue:
        rendered = _render(self.doc, where)
        return InvalidValue(f"{rendered}: {problem}", {"where": rendered})


def _delete_set(data: bytes, pos: int) -> int:
    """Check the delete set at ``pos``; return the position after it."""
    clients, pos = _count(data, pos, 2)
    for _ in range(clients):
        _, pos = _uint(data, pos)
        ranges, pos = _count(data, pos, 2)
        for _ in range(ranges):
            start, pos = _uint(data, pos, MAX_CLOCK)
            length, pos = _uint(data, pos, MAX_CLOCK)
            if start + length > MAX_CLOCK + 1:
                raise _corrupt("deleted range out of range", pos)
    return pos


def read_update(data: bytes, *, doc: str = "") -> UpdateInfo:
    """Read and check the Yjs v1 update ``data`` (see the module docstring); ``doc`` names
    the document in error messages and ``detail.where`` (``"<doc>:<map>.<key>..."``).

    Costs time linear in ``len(data)`` and memory linear in the number of items it holds;
    recursion is bounded by :data:`~crdtsync.values.MAX_DEPTH`. Where crdtsync was built
    with its C accelerator (:mod:`crdtsync._accel`), that reads the update first; an update
    it does not accept is read again here, which raises the typed error.
    """
    if speedups is not None:
        fields = speedups.read_update(data)
        if fields is not None:
            return UpdateInfo(*fields)
    return read_update_py(data, doc=doc)


def read_update_py(data: bytes, *, doc: str = "") -> UpdateInfo:
    """:func:`read_update` in Python only: the reference the C reader is held to."""
    try:
        return _UpdateReader(data, doc).read()
    except IndexError:
        # Every read past the end stops there: see the lib0 decoding functions above.
        raise _corrupt("truncated", len(data)) from None
