"""The update reader as it was before it was made faster (issue 17), kept verbatim as the
reference that tests/test_yupdate_reference.py compares ``crdtsync.yupdate`` against.

Original docstring: a pure, bounded reader of Yjs v1 updates: what an update inserts, before
pycrdt sees it.

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

import math
import struct
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field

from crdtsync.errors import CorruptUpdate, InvalidValue
from crdtsync.values import MAX_DEPTH, MAX_KEY_LENGTH, MAX_SAFE_INTEGER

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
_FLOAT32 = struct.Struct(">f")
_FLOAT64 = struct.Struct(">d")

ID = tuple[int, int]
"""A Yjs item id: ``(client, clock)``."""
_Path = tuple["_Path | str", str]
"""Where a value sits, as a chain ``(parent, segment)`` built in O(1) per value."""


def _render(path: _Path | str) -> str:
    parts: list[str] = []
    while not isinstance(path, str):
        path, segment = path
        parts.append(segment)
    return path + "".join(reversed(parts))


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
    """Ids the update's items build on (origins and parents)."""
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


class _Reader:
    """lib0 decoding over ``data`` with every read bounded by the bytes that remain."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def corrupt(self, what: str) -> CorruptUpdate:
        return CorruptUpdate(f"not a Yjs v1 update: {what} at byte {self.pos}")

    def remaining(self) -> int:
        return self.end - self.pos

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.corrupt("truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uint(self, maximum: int = MAX_CLIENT) -> int:
        """A lib0 varuint, at most ``maximum``."""
        value = self.byte()
        if value < 0x80:
            return value
        value &= 0x7F
        shift = 7
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if value > maximum:
                raise self.corrupt("number out of range")
            if byte < 0x80:
                return value
            shift += 7

    def count(self, least_bytes: int = 1) -> int:
        """A declared number of elements, each taking at least ``least_bytes``: refused when
        the bytes that remain cannot hold them (nothing is allocated from it)."""
        value = self.uint()
        if value * least_bytes > self.remaining():
            raise self.corrupt(f"declares {value} elements in {self.remaining()} bytes")
        return value

    def varint(self) -> int:
        """A lib0 signed varint (sign in bit 6 of the first byte)."""
        first = self.byte()
        value = first & 0x3F
        negative = first & 0x40
        shift = 6
        byte = first
        while byte & 0x80:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise self.corrupt("over-long integer")
        return -value if negative else value

    def raw(self, size: int) -> bytes:
        if size > self.remaining():
            raise self.corrupt("truncated")
        start = self.pos
        self.pos += size
        return self.data[start:self.pos]

    def string(self) -> str:
        raw = self.raw(self.count())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.corrupt("invalid UTF-8 in a string") from exc


def utf16_length(text: str) -> int:
    """The length of ``text`` in UTF-16 code units: how Yjs counts a string's clock length."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


@dataclass(slots=True)
class _Item:
    """Where a struct of the update sits, as far as the update itself tells."""

    client: int
    clock: int
    length: int
    level: int
    """Nesting level of its parent: 0 for a root map, n for a type n levels below a root."""
    where: str


class _UpdateReader:
    def __init__(self, data: bytes, doc: str) -> None:
        self.r = _Reader(data)
        self.doc = doc
        self.info = UpdateInfo()
        self._items: dict[int, list[_Item]] = {}
        """Per client, the items read so far, in clock order."""
        self._clocks: dict[int, list[int]] = {}
        """Per client, the first clock of each of those items."""
        self._types: dict[ID, tuple[int, str]] = {}
        """Types created by the update: id -> (its level, where)."""

    def read(self) -> UpdateInfo:
        r = self.r
        for _ in range(r.count(3)):
            structs = r.count()
            client = r.uint()
            clock = r.uint(MAX_CLOCK)
            self.info.starts.setdefault(client, clock)
            for _ in range(structs):
                clock = self._struct(client, clock)
            self.info.ends[client] = clock
        self._delete_set()
        if r.remaining():
            raise r.corrupt("trailing bytes after the update")
        return self.info

    def _delete_set(self) -> None:
        r = self.r
        for _ in range(r.count(2)):
            r.uint()
            for _ in range(r.count(2)):
                start = r.uint(MAX_CLOCK)
                if start + r.uint(MAX_CLOCK) > MAX_CLOCK + 1:
                    raise r.corrupt("deleted range out of range")

    def _struct(self, client: int, clock: int) -> int:
        """Read one struct starting at ``clock``; return the clock after it."""
        r = self.r
        self.info.structs += 1
        info = r.byte()
        kind = info & 0x1F
        if kind in (GC, SKIP):
            length = r.uint(MAX_CLOCK)
            self.info.skips |= kind == SKIP
            return self._advance(clock, length)
        origin = self._id() if info & _BIT8 else None
        right = self._id() if info & _BIT7 else None
        level, where = 0, f"{self.doc}:<item {client}:{clock}>"
        if origin is None and right is None:
            level, where = self._parent(info & _BIT6)
        else:
            level, where = self._inherit(origin or right, where)  # type: ignore[arg-type]
        length = self._content(kind, level, where, (client, clock))
        self._items.setdefault(client, []).append(_Item(client, clock, length, level, where))
        self._clocks.setdefault(client, []).append(clock)
        return self._advance(clock, length)

    def _advance(self, clock: int, length: int) -> int:
        if length < 1 or clock + length > MAX_CLOCK + 1:
            raise self.r.corrupt("struct length out of range")
        return clock + length

    def _id(self) -> ID:
        ref = (self.r.uint(), self.r.uint(MAX_CLOCK))
        self.info.refs.add(ref)
        return ref

    def _parent(self, has_key: int) -> tuple[int, str]:
        """Explicit parent info: a root name or the id of a type; then the map key."""
        r = self.r
        if r.uint() == 1:
            name = r.string()
            if not name or len(name) > MAX_KEY_LENGTH:
                raise self._invalid(f"{self.doc}:", "root map names are non-empty strings of "
                                    f"at most {MAX_KEY_LENGTH} characters")
            level, where = 0, f"{self.doc}:{name}"
        else:
            parent = self._id()
            level, where = self._type_level(parent)
        if not has_key:
            if level == 0:
                raise self._invalid(where, "a root must be a Y.Map: items of a root "
                                    "Y.Array or Y.Text are not accepted")
            return level, where
        key = r.string()
        if not key or len(key) > MAX_KEY_LENGTH:
            raise self._invalid(where, f"keys are non-empty strings of at most "
                                f"{MAX_KEY_LENGTH} characters")
        return level, f"{where}.{key}"

    def _type_level(self, parent: ID) -> tuple[int, str]:
        """Level and place of a parent type: known when the update created it; a type the
        receiver already has counts as level 1, the least it can be (the receiver checks the
        total depth in the real document)."""
        return self._types.get(parent, (1, f"{self.doc}:<type {parent[0]}:{parent[1]}>"))

    def _inherit(self, neighbour: ID, where: str) -> tuple[int, str]:
        """An item placed next to ``neighbour`` has the same parent; next to an item the
        receiver already has, level 0 is the least it can be."""
        item = self._find(neighbour)
        return (item.level, item.where) if item is not None else (0, where)

    def _find(self, ref: ID) -> _Item | None:
        items = self._items.get(ref[0])
        if not items:
            return None
        i = bisect_right(self._clocks[ref[0]], ref[1]) - 1
        if i < 0 or ref[1] >= items[i].clock + items[i].length:
            return None
        return items[i]

    def _content(self, kind: int, level: int, where: str, item: ID) -> int:
        """Read and check one item's content; return its clock length."""
        r = self.r
        if kind == DELETED:
            return r.uint(MAX_CLOCK)
        if kind == STRING:
            return utf16_length(r.string())
        if kind == ANY:
            length = r.count()
            for i in range(length):
                self._any(level + 1, (where, "") if length == 1 else (where, f"[{i}]"))
            return length
        if kind == TYPE:
            return self._type(level, where, item)
        if kind in _REFUSED_CONTENT:
            raise self._invalid(where, _REFUSED_CONTENT[kind])
        raise r.corrupt(f"unknown content kind {kind}")

    def _type(self, level: int, where: str, item: ID) -> int:
        ref = self.r.uint()
        if ref not in (Y_ARRAY, Y_MAP, Y_TEXT):
            raise self._invalid(where, f"{TYPE_NAMES.get(ref, f'type {ref}')} is not "
                                "supported (only Y.Map, Y.Array and Y.Text)")
        if level + 1 > MAX_DEPTH:
            raise self._invalid(where, f"nested more than {MAX_DEPTH} levels")
        self._types[item] = (level + 1, where)
        return 1

    def _any(self, depth: int, path: _Path) -> None:
        """Check one lib0 ``any`` value at nesting ``depth`` (1 = a map's value); ``path``
        locates it, rendered only for an error."""
        if depth > MAX_DEPTH:
            raise self._invalid(_render(path), f"nested more than {MAX_DEPTH} levels")
        r = self.r
        tag = r.byte()
        if tag in (126, 121, 120):  # null, false, true
            return
        if tag == 119:
            r.string()
        elif tag == 125:
            value = r.varint()
            if abs(value) > MAX_SAFE_INTEGER:
                raise self._invalid(_render(path),
                                    f"integer {value} is outside +/-{MAX_SAFE_INTEGER}")
        elif tag in (124, 123):
            number = (_FLOAT32.unpack(r.raw(4)) if tag == 124 else _FLOAT64.unpack(r.raw(8)))[0]
            if not math.isfinite(number):
                raise self._invalid(_render(path), f"{number} is not a finite number")
        elif tag == 118:
            for _ in range(r.count(2)):
                key = r.string()
                if not key or len(key) > MAX_KEY_LENGTH:
                    raise self._invalid(_render(path), "keys are non-empty strings of at most "
                                        f"{MAX_KEY_LENGTH} characters")
                self._any(depth + 1, (path, f".{key}"))
        elif tag == 117:
            for i in range(r.count()):
                self._any(depth + 1, (path, f"[{i}]"))
        elif tag in _REFUSED_VALUES:
            raise self._invalid(_render(path), f"{_REFUSED_VALUES[tag]} is not JSON data")
        else:
            raise r.corrupt(f"unknown value tag {tag}")

    @staticmethod
    def _invalid(where: str, problem: str) -> InvalidValue:
        return InvalidValue(f"{where}: {problem}", {"where": where})


def read_update(data: bytes, *, doc: str = "") -> UpdateInfo:
    """Read and check the Yjs v1 update ``data`` (see the module docstring); ``doc`` names
    the document in error messages and ``detail.where`` (``"<doc>:<map>.<key>..."``).

    Costs time linear in ``len(data)`` and memory linear in the number of items it holds;
    recursion is bounded by :data:`~crdtsync.values.MAX_DEPTH`.
    """
    return _UpdateReader(data, doc).read()
