"""Records of the change feed and the current-state projection, shared by every backend.

The feed is one durable, ordered log of everything downstream consumers need: each stored
event (``kind="event"``), each change of a device document (``kind="state"``: the keys
that changed with their new values, ``None`` for a deleted key) and each conflict between
a device's write and the cloud's (``kind="conflict"``: both writes, and which one the key
holds), and each file a device finished uploading (``kind="file"``, ``store/files.py``).
Its ``cursor`` grows in commit order, so a reader that saw cursor ``c`` never later
finds a new item below ``c`` (one writer at a time: SQLite's write lock). Items are written
in the same transaction as the data they describe, so the feed never misses nor invents a
change.

The projection is a relational view of the documents: one row per device, document, map and
key holding the current value as JSON, updated in the same transaction as the document.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from crdtsync._fastinit import fast_init
from crdtsync.protocol import Conflict, Event, WriteInfo
from crdtsync.values import json_default

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False,
                         default=json_default)
"""The reference encoder of every JSON column, and the fallback of :func:`json_text`. No
circular check: stored values come from msgpack or JSON decoding, or were checked as trees
(``crdtsync.values``)."""

_ORJSON_OPTIONS = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME)
"""Everything but the plain JSON types goes to ``default`` (:func:`json_default`), which
accepts only bytes: a value orjson would write on its own but ``_JSON`` refuses (a
dataclass, a datetime) raises and takes the fallback, so it is refused as before."""


def json_text(value: Any) -> str:
    """``value`` as the compact JSON text stored in a JSON column (UTF-8, not ASCII-escaped;
    bytes as base64 text).

    orjson writes it, several times faster than ``_JSON``; for the values it refuses (an
    integer beyond 64 bits, a non-string key, a subclass of a JSON type, a lone surrogate,
    nesting deeper than 254) ``_JSON`` decides, so the same values are accepted and refused
    as before and the stored text decodes to the same values. The text may differ in
    spelling only: ``1e-5`` for ``1e-05``, ``1e16`` for ``1e+16``. A NaN or an infinity
    would become ``null`` where ``_JSON`` writes the invalid ``NaN``: none reaches here
    (``crdtsync.values`` refuses them in device input, ``json_view`` replaces them in
    stored documents)."""
    try:
        return orjson.dumps(value, default=json_default, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _JSON.encode(value)


def json_texts(values: Iterable[Any]) -> list[str]:
    """:func:`json_text` of each of ``values``, in one comprehension (a sync's 10 event
    bodies or 20 state values: a Python call per value was most of the encoding's cost)."""
    values = list(values)
    dumps = orjson.dumps
    try:
        return [dumps(v, default=json_default, option=_ORJSON_OPTIONS).decode()
                for v in values]
    except TypeError:  # one of them takes the fallback: each decides alone
        return [json_text(v) for v in values]


def event_json(event: Event) -> str:
    """The event body as stored JSON text (bytes become base64 text)."""
    return json_text(event.body)

FEED_KINDS = ("event", "state", "conflict", "file")

FEED_FLOOR_SETTING = "feed_floor"
"""Setting holding the highest purged feed cursor (backends that keep settings)."""


def purgeable_prefix(items: Sequence[tuple[int, int]], before: int, keep_after: int) -> int:
    """How many of ``items`` (``(cursor, received)`` in cursor order, the oldest of the feed)
    a purge deletes: the leading ones received before ``before`` with a cursor up to
    ``keep_after``. The feed is only ever cut as a prefix, so everything above the floor is
    still there."""
    count = 0
    for cursor, received in items:
        if received >= before or cursor > keep_after:
            break
        count += 1
    return count

Changes = Mapping[str, Mapping[str, Any]]
"""``{map: {key: new value or None (deleted)}}``."""


@fast_init
@dataclass(frozen=True, slots=True)
class StateChange:
    """Keys of device ``device``'s document ``doc`` changed by one write (device or cloud)."""

    device: str
    doc: str
    changes: Changes
    source: str = "device"
    """``device`` (a sync) or ``cloud`` (the management API)."""


@fast_init
@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """A conflict decided in a sync of device ``device``'s document ``doc``: two writes of
    one key, ``conflict.winner`` the one the key holds (docs/protocol.md section 13)."""

    device: str
    doc: str
    conflict: Conflict


def write_json(side: WriteInfo) -> dict[str, Any]:
    """One side of a conflict as JSON: ``{"writer", "time", "value"}``, or ``"deleted":
    true`` instead of ``value`` for a delete."""
    data: dict[str, Any] = {"writer": side.writer, "time": side.time}
    if side.deleted:
        data["deleted"] = True
    else:
        data["value"] = side.value
    return data


def conflict_json(conflict: Conflict) -> dict[str, Any]:
    """The body of a ``conflict`` feed item: ``{"map", "key", "winner", "loser"}``."""
    return {"map": conflict.map, "key": conflict.key, "winner": write_json(conflict.winner),
            "loser": write_json(conflict.loser)}


@dataclass(frozen=True, slots=True)
class FeedFilter:
    """Which feed items a reader wants; ``None`` fields match everything. ``topic`` matches
    events only (state changes have no topic). ``kind`` is one kind or several separated by
    commas (``"event,file"``: what the export reads)."""

    device: str | None = None
    fleet: str | None = None
    topic: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and not (self.kinds and set(self.kinds) <= set(FEED_KINDS)):
            raise ValueError(f"feed kind must be one or more of {FEED_KINDS} separated by "
                             f"commas, not {self.kind!r}")

    @property
    def kinds(self) -> tuple[str, ...] | None:
        """The kinds ``kind`` names (``None``: every kind)."""
        return None if self.kind is None else tuple(
            part for part in self.kind.split(",") if part)

    def matches(self, item: FeedItem) -> bool:
        kinds = self.kinds
        return ((self.device is None or item.device == self.device)
                and (self.fleet is None or item.fleet == self.fleet)
                and (self.topic is None or item.topic == self.topic)
                and (kinds is None or item.kind in kinds))

    def columns(self) -> dict[str, str | tuple[str, ...]]:
        """``{column: value}`` of the fields set, for :func:`cursor_page`: ``kind`` as the
        tuple of its kinds (one or more)."""
        equal: dict[str, str | tuple[str, ...]] = {
            name: value for name, value in self.to_json().items() if name != "kind"}
        if self.kinds is not None:
            equal["kind"] = self.kinds
        return equal

    def to_json(self) -> dict[str, str]:
        return {name: value for name in ("device", "fleet", "topic", "kind")
                if (value := getattr(self, name)) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeedFilter:
        """From ``{"device": ..., "fleet": ..., "topic": ..., "kind": ...}`` (all optional);
        ``ValueError`` for an unknown field or a value that is not a string."""
        unknown = set(data) - {"device", "fleet", "topic", "kind"}
        if unknown:
            raise ValueError(f"unknown filter fields: {sorted(unknown)}")
        for name, value in data.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"filter field {name!r} must be a string")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One feed entry. Events: ``topic``, ``seq``, ``time`` (device clock) and ``body`` (the
    event body). State changes: ``doc`` and ``body`` = ``{map: {key: value or None}}``,
    ``time`` the server clock. Conflicts: ``doc`` and ``body`` = :func:`conflict_json`,
    ``time`` the server clock. ``received`` is when the server stored it, ``fleet`` the
    device's fleet at that moment."""

    cursor: int
    kind: str
    device: str
    fleet: str | None
    time: int
    received: int
    body: Any
    topic: str | None = None
    seq: int | None = None
    doc: str | None = None
    source: str | None = None

    @property
    def key(self) -> str:
        """A stable idempotency key: ``ev:<device>:<seq>`` for an event (the same event
        always gets the same key), ``st:<cursor>`` for a state change, ``cf:<cursor>`` for
        a conflict, ``fi:<cursor>`` for a file."""
        if self.kind == "event":
            return f"ev:{self.device}:{self.seq}"
        return f"{_KEY_PREFIX.get(self.kind, 'st')}:{self.cursor}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cursor": str(self.cursor), "key": self.key, "kind": self.kind,
            "device": self.device, "fleet": self.fleet, "time": self.time,
            "received": self.received,
        }
        if self.kind == "event":
            data.update(topic=self.topic, seq=self.seq, body=self.body)
        elif self.kind == "conflict":
            data.update(doc=self.doc, conflict=self.body)
        elif self.kind == "file":
            data.update(file=self.body)
        else:
            data.update(doc=self.doc, source=self.source, changes=self.body)
        return data


_KEY_PREFIX = {"conflict": "cf", "file": "fi"}


@dataclass(frozen=True, slots=True)
class ProjectionRow:
    """The current value of one key of a device document (``value`` is JSON data)."""

    device: str
    doc: str
    map: str
    key: str
    value: Any
    updated: int

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "doc": self.doc, "map": self.map, "key": self.key,
                "value": self.value, "updated": self.updated}


FeedRow = tuple[str, str, str | None, str | None, str | None, int | None, int, int, str,
                str | None]
"""A feed row as stored: ``(kind, device, fleet, doc, topic, seq, time, received, body JSON
text, source)`` (the cursor is given by the store)."""

FEED_COLUMNS = "kind, device, fleet, doc, topic, seq, time, received, body, source"


def event_rows(device: str, fleet: str | None, received: int, events: Sequence[Event]
               ) -> list[FeedRow]:
    """Feed rows of newly stored events."""
    return [("event", device, fleet, None, e.topic, e.seq, e.time, received, body, None)
            for e, body in zip(events, json_texts(e.body for e in events), strict=True)]


def change_row(change: StateChange, fleet: str | None, received: int) -> FeedRow:
    """The feed row of one document change."""
    return ("state", change.device, fleet, change.doc, None, None, received, received,
            json_text(change.changes), change.source)


def conflict_row(record: ConflictRecord, fleet: str | None, received: int) -> FeedRow:
    """The feed row of one conflict."""
    return ("conflict", record.device, fleet, record.doc, None, None, received, received,
            json_text(conflict_json(record.conflict)), None)


def item_from_row(cursor: int, row: Sequence[Any]) -> FeedItem:
    """A :class:`FeedItem` from a stored row (``FEED_COLUMNS`` order)."""
    kind, device, fleet, doc, topic, seq, time, received, body, source = row
    return FeedItem(cursor, kind, device, fleet, time, received, json.loads(body), topic, seq,
                    doc, source)


def cursor_page(after: int, limit: int, equal: Mapping[str, Any],
                param: Callable[[int], str]) -> tuple[str, list[Any]]:
    """The tail of a query paging by cursor, shared by the SQL backends: ``WHERE cursor >
    after AND column = value ... ORDER BY cursor LIMIT limit`` for each ``column: value`` of
    ``equal`` whose value is not ``None`` (e.g. ``FeedFilter.columns()``; a tuple value is
    ``column IN (...)``), and its parameters. ``param(n)`` writes the n-th parameter (from
    1): ``?`` in SQLite, ``$n`` in PostgreSQL."""
    params: list[Any] = [after]
    clauses = [f"cursor > {param(1)}"]
    for column, value in equal.items():
        if isinstance(value, tuple):
            marks = []
            for one in value:
                params.append(one)
                marks.append(param(len(params)))
            clauses.append(f"{column} IN ({', '.join(marks)})")
        elif value is not None:
            params.append(value)
            clauses.append(f"{column} = {param(len(params))}")
    params.append(limit)
    return f"WHERE {' AND '.join(clauses)} ORDER BY cursor LIMIT {param(len(params))}", params


def projection_writes(change: StateChange) -> Iterator[tuple[str, str, str | None]]:
    """``(map, key, value JSON text or None to delete)`` for each key of ``change``."""
    for name, keys in change.changes.items():
        texts = json_texts(keys.values())  # a deleted key's None is "null", not used
        for (key, value), text in zip(keys.items(), texts, strict=True):
            yield name, key, None if value is None else text
