"""The wire codec of the crdtsync sync protocol: pure functions, no I/O.

Device and server both use this module; docs/protocol.md is its specification. A sync
message is one msgpack map; CRDT payloads inside it are raw Yjs v1 updates and state
vectors. Decoding validates every field (types, ranges, checksums, state-vector syntax) and
raises a :mod:`crdtsync.errors` exception with a stable code, so nothing malformed reaches a
document or a database.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from ._accel import speedups
from ._fastinit import fast_init, slot_filler
from .errors import (
    BatchTooLarge,
    BodyTooLarge,
    CorruptUpdate,
    CrdtsyncError,
    InvalidStateVector,
    InvalidValue,
    MalformedRequest,
    RequestError,
    TooManyEvents,
    UnsupportedVersion,
    error_from_code,
)
from .values import MAX_KEY_LENGTH, check_event_body, check_value, event_body_ok

PROTOCOL_VERSION = 1
MEDIA_TYPE = "application/vnd.crdtsync+msgpack"
SYNC_PATH = "/v1/sync"
WAKE_PATH = "/v1/wake"
BATCH_PATH = "/v1/sync/batch"
"""Many devices' syncs in one request, for a gateway (docs/protocol.md 18)."""
"""The live channel: a long poll answered when the cloud queued something for the device
(docs/protocol.md 14a)."""

STATE_DOC = "state"
"""The document a device owns and writes (docs/protocol.md section 8)."""
STATE_MAP = "state"
"""The root map of :data:`STATE_DOC` that ``Device.state`` reads and writes."""
FLEET_DOC = "fleet"
"""The shared document of a device's fleet (read-only for the device)."""
PROJECT_DOC = "project"
"""The shared document of the whole project (read-only for the device)."""
SHARED_DOC_NAMES = (FLEET_DOC, PROJECT_DOC)
"""Documents shared with a device, read-only for it, in the order a device syncs them."""
DEVICE_DOC_NAMES = frozenset({STATE_DOC, *SHARED_DOC_NAMES})
"""Every document name a sync request may carry."""

MAX_CLIENT_ID = 2**53 - 1
MAX_CLOCK = 2**32 - 1
MAX_SEQ = 2**63 - 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
"""Device ids, document names and topics: 1-64 chars, letters, digits and ``_ . : -``."""

FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
"""File names (docs/protocol.md 19), to ``fullmatch``: 1-128 of ``A-Z a-z 0-9 . _ -``, not
starting with ``.`` or ``-`` (safe in a URL path segment and as a file name anywhere)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a decoder enforces. The server's are authoritative; see docs/protocol.md."""

    max_docs: int = 8
    max_events: int = 1000
    max_event_body: int = 64 * 1024
    """One event body, in msgpack bytes (a templated event: its decoded size)."""
    max_decoded_bytes: int = 4 * 1024 * 1024
    """All event bodies of one request together, templated events counted decoded (the
    same default as the server's ``max_body``: a few bytes of template batch can stand for
    many large events, docs/protocol.md section 6)."""
    max_sv_entries: int = 100_000
    max_items: int = 100
    """Command results, proxied requests and acknowledged outcomes per request; downlink
    items per response."""
    max_item_body: int = 64 * 1024
    """Largest msgpack-encoded body of one item other than an event: a message body, a
    command's params or result, a proxied request's body or its outcome. The server refuses
    to queue bigger ones; a receiver skips a bigger one it meets (docs/protocol.md 14)."""
    max_stamps: int = 10_000
    """Stamped writes in one document entry (``s``) and conflicts in one response (``cf``)."""
    max_batch_entries: int = 1000
    """Entries (device sync requests) in one gateway batch (docs/protocol.md 18)."""

    def __reduce__(self) -> tuple[type[Limits], tuple[int, ...]]:
        """Pickled as its fields (a server's worker processes get the limits): compiled
        with mypyc (``crdtsync._compiled``), a frozen class refuses pickle's own way."""
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class StampedWrite:
    """A device's write of one root-map key with its hybrid-logical-clock stamp
    (:mod:`crdtsync.hlc`, in the device's clock): ``value`` is the JSON value written, or
    ``None`` with ``deleted`` for a delete. Sent for every key written since the cloud last
    acknowledged the device's writes (key ``s`` of a request's document entry), so the
    server can decide "latest write wins" by time, not by Yjs client id (protocol
    section 13)."""

    map: str
    key: str
    stamp: int
    value: Any = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class WriteInfo:
    """One side of a conflict: who wrote (``device`` or ``cloud``), when (ms since the
    epoch, in the server's clock, device clocks corrected), and the value (``None`` with
    ``deleted`` for a delete)."""

    writer: str
    time: int
    value: Any = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two concurrent writes of key ``key`` of root map ``map``: ``winner`` is what the key
    holds, ``loser`` the write that was overruled (protocol section 13)."""

    map: str
    key: str
    winner: WriteInfo
    loser: WriteInfo


@fast_init
@dataclass(frozen=True, slots=True)
class DocSync:
    """One document's part of a sync message.

    ``sv`` is the sender's state vector after everything in ``update``; ``update`` is a Yjs v1
    update with what the receiver may lack (``b""`` when there is nothing). ``gen`` is the
    document's generation, bumped when a document is rebuilt to drop history. ``adopt``
    (requests only, key ``a``) says the client can adopt a newer generation of the document
    instead of being refused with ``generation_mismatch`` (protocol section 8).
    """

    doc: str
    sv: bytes
    update: bytes = b""
    gen: int = 0
    adopt: bool = False
    stamps: tuple[StampedWrite, ...] | None = None
    """Requests only (key ``s``): the stamped writes of keys the cloud has not acknowledged.
    ``None`` (key absent): the client does not stamp its writes (a client older than
    protocol section 13), and its writes are merged by Yjs as they arrive."""


@fast_init
@dataclass(frozen=True, slots=True)
class Event:
    """A device event: ``seq`` is 1, 2, 3, ... per device; ``time`` is the device clock in ms."""

    seq: int
    topic: str
    time: int
    body: Any


DOWN_KINDS = ("message", "command")
WRITERS = ("device", "cloud")
"""Who wrote a value: the device (a sync) or the cloud (the management API)."""


ITEM_TOO_LARGE = "item_too_large"
"""Why a receiver skipped an item whose body is over ``Limits.max_item_body`` bytes."""
INVALID_ITEM = "invalid_item"
"""Why a receiver skipped an item whose body is not msgpack of JSON data."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the receiver cannot take one item of a message: ``code`` is
    :data:`ITEM_TOO_LARGE` or :data:`INVALID_ITEM`, ``message`` says what was wrong."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class DownItem:
    """A cloud-to-device item in a response: a ``message`` (``name`` = topic) or a
    ``command`` (``name`` = method, ``body`` = params). ``expires`` is a command's deadline
    in ms since the epoch (0: none). ``refused`` is set (and ``body`` is None) when the body
    cannot be taken: the receiver skips this item only (docs/protocol.md 14)."""

    seq: int
    kind: str
    name: str
    body: Any
    expires: int = 0
    refused: Refusal | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A device's result for command ``seq``: ``value`` when ``ok``, else ``error``
    ``{"code": str, "message": str}``."""

    seq: int
    ok: bool
    value: Any = None
    error: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ProxyCall:
    """A device's request for the cloud to call route ``route`` with ``body``; ``id`` is the
    device's, unique per device, and makes resending safe (performed at most once)."""

    id: str
    route: str
    body: Any


@dataclass(frozen=True, slots=True)
class Outcome:
    """The outcome of proxied request ``id``: ``{"ok", "status", "body", "error",
    "message", "attempts"}``. When the receiver could not take the outcome sent,
    ``refused`` says why and ``outcome`` is the failed outcome that stands for it
    (:func:`refused_outcome`)."""

    id: str
    outcome: Mapping[str, Any]
    refused: Refusal | None = None


@dataclass(frozen=True, slots=True)
class TemplateBatch:
    """Events of one topic encoded with a template (:mod:`crdtsync.templates`); ``data``
    starts with the template's hash. The receiver decodes it into :class:`Event` s."""

    topic: str
    data: bytes


@fast_init
@dataclass(frozen=True, slots=True)
class SyncRequest:
    """What a device sends on ``POST /v1/sync``.

    ``purged`` is the highest event seq the device has deleted from its outbox (acknowledged
    or dropped by its outbox policy): the server accepts a gap only below it. ``down_done``
    is the highest downlink seq the device processed; ``results`` carries results of
    commands up to it; ``calls`` new proxied requests; ``outcomes_acked`` the ids of
    outcomes the device stored.
    """

    device: str
    docs: tuple[DocSync, ...] = ()
    events: tuple[Event, ...] = ()
    purged: int = 0
    down_done: int = 0
    results: tuple[Result, ...] = ()
    calls: tuple[ProxyCall, ...] = ()
    outcomes_acked: tuple[str, ...] = ()
    awaiting: int = 0
    """How many accepted proxied requests still wait for their outcome (the server looks
    outcomes up only when this or ``calls`` is non-zero)."""
    batches: tuple[TemplateBatch, ...] = ()
    """Templated events; with ``events`` they form one run of consecutive seqs."""
    clock: int | None = None
    """The device's clock when it sent the request, in ms since the epoch (key ``ck``): the
    server corrects the device's stamps by how far this is from its own clock (protocol
    section 13). ``None``: not sent (no stamped writes)."""


@fast_init
@dataclass(frozen=True, slots=True)
class SyncResponse:
    """What the server answers: its deltas, its state vectors, and ``acked``, the highest event
    seq of this device that is durably stored."""

    docs: tuple[DocSync, ...] = ()
    acked: int = 0
    time: int = 0
    down: tuple[DownItem, ...] = ()
    down_done: int = 0
    accepted: tuple[str, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    """Conflicts decided in this sync between the device's writes and the cloud's (key
    ``cf``)."""


# --- state vectors -----------------------------------------------------------------------


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise InvalidStateVector("state vector is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise InvalidStateVector("state vector has an over-long number")


def _write_varuint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


_parse_sv: Callable[[bytes, int], dict[int, int] | None] | None = (
    None if speedups is None else speedups.parse_state_vector)


def parse_state_vector(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[int, int]:
    """Decode a Yjs v1 state vector into ``{client_id: clock}``.

    Raises :class:`InvalidStateVector` on truncation, trailing bytes, a client id above
    2**53 - 1, a clock of 2**32 or more, a repeated client, or too many entries. Yrs itself
    accepts such garbage silently (it would answer with a useless update), so every state
    vector from the network passes here first.

    Where ``crdtsync._speedups`` is built, its parser answers first (a dict for a vector
    this function accepts, ``None`` otherwise); only a refused vector is read again here,
    to raise the error that names what is wrong.
    """
    if _parse_sv is not None:
        clocks = _parse_sv(data, limits.max_sv_entries)
        if clocks is not None:
            return clocks
    return parse_state_vector_py(data, limits)


def parse_state_vector_py(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[int, int]:
    """:func:`parse_state_vector` in Python alone: the reference the C parser must agree
    with, and what names the fault of a refused vector."""
    count, pos = _read_varuint(data, 0)
    if count > limits.max_sv_entries:
        raise InvalidStateVector(f"state vector has {count} entries (max {limits.max_sv_entries})")
    clocks: dict[int, int] = {}
    for _ in range(count):
        client, pos = _read_varuint(data, pos)
        clock, pos = _read_varuint(data, pos)
        if client > MAX_CLIENT_ID or clock > MAX_CLOCK:
            raise InvalidStateVector("state vector entry out of range")
        if client in clocks:
            raise InvalidStateVector("state vector repeats a client id")
        clocks[client] = clock
    if pos != len(data):
        raise InvalidStateVector("state vector has trailing bytes")
    return clocks


def encode_state_vector(clocks: Mapping[int, int]) -> bytes:
    """Encode ``{client_id: clock}`` as a Yjs v1 state vector (the inverse of parsing)."""
    out = bytearray()
    _write_varuint(len(clocks), out)
    for client, clock in sorted(clocks.items(), reverse=True):
        _write_varuint(client, out)
        _write_varuint(clock, out)
    return bytes(out)


def covers(sv: Mapping[int, int], other: Mapping[int, int]) -> bool:
    """True when a replica at state ``sv`` has every insertion counted in ``other``."""
    return all(sv.get(client, 0) >= clock for client, clock in other.items())


# --- envelope ----------------------------------------------------------------------------


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data))
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedRequest(f"body is not a msgpack message: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedRequest("body must be a msgpack map")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})",
            {"supported": [PROTOCOL_VERSION]},
        )
    return obj


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None,
         where: str = "message") -> Any:
    value = obj.get(key, default)
    if value is None and default is None:
        raise MalformedRequest(f"{where}: missing field {key!r}")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MalformedRequest(f"{where}: field {key!r} has the wrong type")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise MalformedRequest(f"{what} {value!r} is not a valid name (1-64 of A-Za-z0-9_.:-)")
    return value


def _uint(value: Any, what: str, maximum: int = MAX_SEQ) -> int:
    if type(value) is int and 0 <= value <= maximum:  # the common case, one test
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise MalformedRequest(f"{what} must be an integer in 0..{maximum}")
    return value


def _encode_doc(d: DocSync) -> dict[str, Any]:
    out: dict[str, Any] = {"d": d.doc, "g": d.gen, "sv": d.sv}
    if d.update:
        out["u"] = d.update
        out["c"] = zlib.crc32(d.update)
    if d.adopt:
        out["a"] = True
    if d.stamps is not None:
        out["s"] = [[w.map, w.key, w.stamp, None if w.deleted else _body(w.value)]
                    for w in d.stamps]
    return out


def _decode_doc(obj: Any, limits: Limits) -> DocSync:
    if not isinstance(obj, dict):
        raise MalformedRequest("each entry of 'docs' must be a map")
    name = obj.get("d")
    if type(name) is not str or name not in DEVICE_DOC_NAMES:  # the usual names: no regex
        name = _name(name, "document")
    gen = _uint(obj.get("g", 0), "generation")
    sv = obj.get("sv")
    if type(sv) is not bytes:
        sv = _get(obj, "sv", bytes, where="document")
    parse_state_vector(sv, limits)
    update = obj.get("u", b"")
    if type(update) is not bytes:
        update = _get(obj, "u", bytes, b"", where="document")
    if update:
        crc = obj.get("c")
        if not isinstance(crc, int) or isinstance(crc, bool) or zlib.crc32(update) != crc:
            raise CorruptUpdate(f"update for {name!r} fails its CRC-32 check", {"doc": name})
    adopt = obj.get("a", False)
    if not isinstance(adopt, bool):
        raise MalformedRequest(f"'a' of document {name!r} must be a boolean")
    stamps = _decode_stamps(obj["s"], name, limits) if "s" in obj else None
    return DocSync(doc=name, sv=sv, update=update, gen=gen, adopt=adopt, stamps=stamps)


def _decode_stamps(raw: Any, doc: str, limits: Limits) -> tuple[StampedWrite, ...]:
    """Key ``s`` of document ``doc``: ``[[map, key, stamp, body or nil], ...]``, each key
    once. Values are checked like state values (``check_value``)."""
    if not isinstance(raw, list):
        raise MalformedRequest(f"'s' of document {doc!r} must be an array")
    if len(raw) > limits.max_stamps:
        raise MalformedRequest(f"at most {limits.max_stamps} entries in 's'")
    writes: list[StampedWrite] = []
    seen: set[tuple[str, str]] = set()
    for item in raw:
        if not isinstance(item, list) or len(item) != 4:
            raise MalformedRequest("each entry of 's' must be an array of 4")
        name, key, when, data = item
        where = f"{doc}:{_map_key(name, 'map')}.{_map_key(key, 'key')}"
        if (name, key) in seen:
            raise MalformedRequest(f"{where} appears twice in 's'")
        seen.add((name, key))
        stamp = _uint(when, f"stamp of {where}", 2**64 - 1)
        if data is None:
            writes.append(StampedWrite(name, key, stamp, None, True))
            continue
        value = _unbody(data, where, limits)
        check_value(value, where=where)
        writes.append(StampedWrite(name, key, stamp, value))
    return tuple(writes)


def _map_key(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise MalformedRequest(f"a {what} in 's' must be a non-empty string of at most "
                               f"{MAX_KEY_LENGTH} characters")
    return value


def _encode_write(w: WriteInfo) -> list[Any]:
    return [w.writer, w.time, None if w.deleted else _body(w.value)]


def _decode_write(item: Any, limits: Limits) -> WriteInfo:
    if not isinstance(item, list) or len(item) != 3 or item[0] not in WRITERS:
        raise MalformedRequest("each side of a conflict must be [writer, time, body or nil]")
    writer, when, data = item
    if data is None:
        return WriteInfo(writer, _uint(when, "conflict time"), None, True)
    value, _ = _take_body(data, "conflict value", limits)
    return WriteInfo(writer, _uint(when, "conflict time"), value)


def _decode_conflict(item: list[Any], limits: Limits) -> Conflict:
    name, key, winner, loser = item
    return Conflict(_map_key(name, "map"), _map_key(key, "key"),
                    _decode_write(winner, limits), _decode_write(loser, limits))


def _decode_docs(obj: Mapping[str, Any], limits: Limits) -> tuple[DocSync, ...]:
    raw = _get(obj, "docs", list, [])
    if len(raw) > limits.max_docs:
        raise MalformedRequest(f"at most {limits.max_docs} documents per message")
    docs = tuple(_decode_doc(d, limits) for d in raw)
    if len({d.doc for d in docs}) != len(docs):
        raise MalformedRequest("a document appears twice in one message")
    return docs


class MsgpackExtension:
    """What a msgpack extension value (``msgpack.ExtType``, code 0..127 or -2..-128) decodes
    to inside a body: no value check accepts it, so the body is refused with
    :class:`InvalidValue` and ``detail.where`` naming its place (section 3.2). A timestamp
    (code -1) decodes to ``msgpack.Timestamp``, which is refused the same way."""

    __slots__ = ("code",)

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code


_NOT_MSGPACK = (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError)
"""What ``msgpack.unpackb`` raises for bytes that are not one msgpack value."""


def _unpack_body(data: bytes, what: str) -> Any:
    """Decode a nested msgpack body; :class:`MalformedRequest` if it is not msgpack. The
    value is not checked yet (extension types come back as :class:`MsgpackExtension`).
    msgpack bounds every length it reads by ``len(data)`` before it allocates: callers
    bound ``len(data)`` first."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=MsgpackExtension)
    except _NOT_MSGPACK as exc:
        raise MalformedRequest(f"{what} is not msgpack") from exc


def decode_event_body(data: bytes, *, where: str = "event body") -> Any:
    """Decode an event body's msgpack bytes and check it is JSON data (section 3.2): the
    server's check of every plain event, and the device's check of what it queues (so a
    body the device accepts is one the server accepts). Raises :class:`MalformedRequest`
    when ``data`` is not one msgpack value, :class:`InvalidValue` (``detail.where``) when
    the value breaks a rule, an extension type included."""
    body = _unpack_body(data, where)
    check_event_body(body, where=where)
    return body


def _decode_event(obj: Any, limits: Limits) -> Event:
    """One ``[seq, topic, time, body]`` entry. The common case runs without building a
    message (a request carries up to ``max_events`` of them): plain type checks, a topic
    already seen valid, a body the fast value check accepts; anything else takes the path
    that names what is wrong."""
    if type(obj) is not list or len(obj) != 4:
        raise MalformedRequest("each event must be [seq, topic, time, body]")
    seq, topic, time, body_bytes = obj
    if type(body_bytes) is not bytes:
        raise MalformedRequest("event body must be msgpack bytes")
    if len(body_bytes) > limits.max_event_body:
        raise InvalidValue(f"event body over {limits.max_event_body} bytes",
                           {"seq": seq, "max_event_body": limits.max_event_body})
    try:
        body = _unpack_body(body_bytes, "event body")
    except MalformedRequest:
        body = decode_event_body(body_bytes, where=f"event {seq!r} body")  # raises, named
    if not event_body_ok(body):
        check_event_body(body, where=f"event {seq!r} body")
    if (type(seq) is not int or not 0 < seq <= MAX_SEQ) and _uint(seq, "event seq") == 0:
        raise MalformedRequest("event seq starts at 1")
    if type(time) is not int or not 0 <= time <= MAX_SEQ:
        _uint(time, "event time")
    known = type(topic) is str and topic in _TOPICS_SEEN
    return Event(seq, topic if known else _topic(topic), time, body)


_TOPICS_SEEN: set[str] = set()
"""Topics that passed :func:`_name` (a fleet uses a handful): the regex runs once each."""
_TOPICS_REMEMBERED = 4096


def _topic(value: Any) -> str:
    topic = _name(value, "topic")
    if len(_TOPICS_SEEN) < _TOPICS_REMEMBERED:
        _TOPICS_SEEN.add(topic)
    return topic


def _set_event_fields(event: Event, seq: int, topic: str, time: int, body: Any) -> None:
    set_seq, set_topic, set_time, set_body = _SET_EVENT_FIELDS
    set_seq(event, seq)
    set_topic(event, topic)
    set_time(event, time)
    set_body(event, body)


_SET_EVENT_FIELDS = tuple(getattr(Event, name).__set__ for name in Event.__slots__)
_FILL_EVENT: Callable[[Event, int, str, int, Any], None] = (
    slot_filler(Event, Event.__slots__) or _set_event_fields)
"""Sets the slots of :class:`Event` (``seq``, ``topic``, ``time``, ``body``) of a new event:
one C call where ``crdtsync._speedups`` is built, else each slot's setter. Either skips the
frozen dataclass's ``object.__setattr__`` calls, a third of the cost of a small event."""

_DECODE_EVENTS = None if speedups is None else speedups.decode_events


_UNPACK_BODY_KW = (("raw", "strict_map_key", "ext_hook"), (False, True, MsgpackExtension))
"""How an event body is unpacked (:func:`_decode_events`), as keyword names and values."""


def _decode_events(raw: list[Any], limits: Limits) -> tuple[tuple[Event, ...], bool]:
    """The entries of ``ev``, and whether their seqs are consecutive: by
    ``crdtsync._speedups.decode_events`` where it is built and every entry is on the fast
    path below (the same events), else by :func:`_decode_events_py`."""
    if _DECODE_EVENTS is not None and type(raw) is list and _FILL_EVENT is not _set_event_fields:
        fast: tuple[tuple[Event, ...], bool] | None = _DECODE_EVENTS(
            raw, limits.max_event_body, _TOPICS_SEEN, msgpack.unpackb, *_UNPACK_BODY_KW,
            _FILL_EVENT)
        if fast is not None:
            return fast
    return _decode_events_py(raw, limits)


def _decode_events_py(raw: list[Any], limits: Limits) -> tuple[tuple[Event, ...], bool]:
    """The entries of ``ev``, and whether their seqs are consecutive.

    One loop, no call per check: an entry whose seq, time, topic (one already seen valid)
    and body size pass plain checks is decoded here, its body unpacked exactly as
    :func:`_unpack_body` does and checked by the fast value check; any other entry goes to
    :func:`_decode_event`, whose checks run in the same order. A body that is not msgpack
    or not JSON data takes the same calls as in :func:`_decode_event`, which name the
    fault. So every entry gives the event, or the error, that decoding it alone gives."""
    max_body = limits.max_event_body
    topics = _TOPICS_SEEN
    unpackb = msgpack.unpackb
    new = object.__new__
    fill = _FILL_EVENT
    events: list[Event] = []
    append = events.append
    consecutive = True
    after = 0  # the seq that follows the previous event (seqs start at 1: 0 means none)
    for entry in raw:
        if not (type(entry) is list and len(entry) == 4):
            event = _decode_event(entry, limits)
        else:
            seq, topic, time, data = entry
            if not (type(data) is bytes and len(data) <= max_body
                    and type(seq) is int and 0 < seq <= MAX_SEQ
                    and type(time) is int and 0 <= time <= MAX_SEQ
                    and type(topic) is str and topic in topics):
                event = _decode_event(entry, limits)
            else:
                try:
                    body = unpackb(data, raw=False, strict_map_key=True,
                                   ext_hook=MsgpackExtension)
                except _NOT_MSGPACK:
                    body = decode_event_body(data, where=f"event {seq!r} body")  # raises
                if not event_body_ok(body):
                    check_event_body(body, where=f"event {seq!r} body")
                event = new(Event)
                fill(event, seq, topic, time, body)
        if after and event.seq != after:
            consecutive = False
        after = event.seq + 1
        append(event)
    return tuple(events), consecutive


def encode_event_body(body: Any) -> bytes:
    """Encode an event body (JSON data) as msgpack bytes; validation is the caller's."""
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def encode_request(req: SyncRequest, *, bodies: Sequence[bytes] | None = None) -> bytes:
    """Encode a :class:`SyncRequest`. ``bodies`` may pass pre-encoded event bodies (the
    device outbox stores them encoded) in the order of ``req.events``."""
    if bodies is None:
        bodies = [encode_event_body(e.body) for e in req.events]
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": "sync", "dev": req.device}
    if req.docs:
        msg["docs"] = [_encode_doc(d) for d in req.docs]
    if req.events:
        msg["ev"] = [[e.seq, e.topic, e.time, b] for e, b in zip(req.events, bodies, strict=True)]
    if req.purged:
        msg["pg"] = req.purged
    if req.down_done:
        msg["dn"] = req.down_done
    if req.results:
        msg["res"] = [[r.seq, r.ok, _body(r.value if r.ok else dict(r.error or {}))]
                      for r in req.results]
    if req.calls:
        msg["rq"] = [[c.id, c.route, _body(c.body)] for c in req.calls]
    if req.outcomes_acked:
        msg["rqk"] = list(req.outcomes_acked)
    if req.awaiting:
        msg["rqw"] = req.awaiting
    if req.batches:
        msg["tev"] = [[b.topic, b.data] for b in req.batches]
    if req.clock is not None:
        msg["ck"] = req.clock
    return _pack(msg)


def _body(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unbody(data: Any, what: str, limits: Limits) -> Any:
    """Decode a nested msgpack body (bytes) and check it is JSON data."""
    if not isinstance(data, bytes):
        raise MalformedRequest(f"{what} must be msgpack bytes")
    if len(data) > limits.max_item_body:
        raise InvalidValue(f"{what} is {len(data)} bytes, over {limits.max_item_body}")
    value = _unpack_body(data, what)
    check_value(value, where=what, max_int=2**63 - 1)
    return value


def item_body(value: Any, limits: Limits = DEFAULT_LIMITS, *, what: str = "body") -> bytes:
    """``value`` encoded as the msgpack body of an item (message, command params or result,
    proxied request or outcome). Raises :class:`BodyTooLarge` (``detail``: ``max_item_body``
    and ``size``) when it is over ``limits.max_item_body`` bytes, which a receiver would
    not take; checking JSON data is the caller's."""
    data = _body(value)
    if len(data) > limits.max_item_body:
        raise BodyTooLarge(
            f"{what} is {len(data)} bytes as msgpack, over the {limits.max_item_body} "
            "bytes a device takes",
            {"max_item_body": limits.max_item_body, "size": len(data)})
    return data


def _take_body(data: Any, what: str, limits: Limits) -> tuple[Any, Refusal | None]:
    """Decode the body of an item the receiver may skip alone: ``(body, None)``, or
    ``(None, refusal)`` when it is too large or not JSON data."""
    try:
        return _unbody(data, what, limits), None
    except RequestError as exc:  # InvalidValue, MalformedRequest: this item only
        too_large = isinstance(data, bytes) and len(data) > limits.max_item_body
        return None, Refusal(ITEM_TOO_LARGE if too_large else INVALID_ITEM, exc.message)


def refused_outcome(refusal: Refusal) -> dict[str, Any]:
    """The failed outcome a client stores for an outcome it could not take."""
    return {"ok": False, "status": None, "body": None, "error": refusal.code,
            "message": f"the device could not take the outcome: {refusal.message}",
            "attempts": 0}


def _items(obj: Mapping[str, Any], key: str, limits: Limits, width: int) -> list[list[Any]]:
    raw = _get(obj, key, list, [])
    if len(raw) > limits.max_items:
        raise MalformedRequest(f"at most {limits.max_items} entries in {key!r}")
    for item in raw:
        if not isinstance(item, list) or len(item) != width:
            raise MalformedRequest(f"each entry of {key!r} must be an array of {width}")
    return raw  # type: ignore[no-any-return]


def _items_flat(obj: Mapping[str, Any], key: str, limits: Limits) -> list[Any]:
    raw = _get(obj, key, list, [])
    if len(raw) > limits.max_items:
        raise MalformedRequest(f"at most {limits.max_items} entries in {key!r}")
    return raw  # type: ignore[no-any-return]


def _decode_result(item: list[Any], limits: Limits) -> Result:
    seq, ok, data = item
    if not isinstance(ok, bool):
        raise MalformedRequest("a result's ok flag must be a boolean")
    value = _unbody(data, f"result {seq!r}", limits)
    if not ok and (not isinstance(value, dict) or not isinstance(value.get("code"), str)):
        raise MalformedRequest("a failed result carries {\"code\": str, \"message\": str}")
    return Result(_uint(seq, "result seq"), ok, value if ok else None, None if ok else value)


def _request_id(value: Any) -> str:
    return _name(value, "request id")


def _decode_call(item: list[Any], limits: Limits) -> ProxyCall:
    call_id, route, data = item
    return ProxyCall(_request_id(call_id), _name(route, "route"),
                     _unbody(data, f"request {call_id!r}", limits))


def decode_request(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SyncRequest:
    """Decode and validate a sync request; raises a :class:`RequestError` subclass."""
    obj = _unpack(data)
    get = obj.get
    if get("t") != "sync":
        raise MalformedRequest(f"message type {obj.get('t')!r} is not 'sync'")
    device = _name(get("dev"), "device")
    # Keys a request leaves out (most of them) cost one lookup each: an absent list is
    # empty; a present one, whatever it holds, takes the checking path.
    raw_events = get("ev", _ABSENT)
    events: tuple[Event, ...] = ()
    consecutive = True
    if raw_events is not _ABSENT:
        if type(raw_events) is not list:
            raw_events = _get(obj, "ev", list, [])
        if len(raw_events) > limits.max_events:
            raise TooManyEvents(
                f"{len(raw_events)} events in one request (max {limits.max_events})",
                {"max_events": limits.max_events},
            )
        events, consecutive = _decode_events(raw_events, limits)
    batches = (() if get("tev", _ABSENT) is _ABSENT
               else tuple(_decode_batch(i) for i in _items(obj, "tev", limits, 2)))
    if not batches and not consecutive:
        raise MalformedRequest(_NOT_CONSECUTIVE)
    return SyncRequest(
        device=device,
        docs=_decode_docs(obj, limits),
        events=events,
        purged=_uint(get("pg", 0), "purged"),
        down_done=_uint(get("dn", 0), "dn"),
        results=(() if get("res", _ABSENT) is _ABSENT else
                 tuple(_decode_result(i, limits) for i in _items(obj, "res", limits, 3))),
        calls=(() if get("rq", _ABSENT) is _ABSENT else
               tuple(_decode_call(i, limits) for i in _items(obj, "rq", limits, 3))),
        outcomes_acked=(() if get("rqk", _ABSENT) is _ABSENT else
                        tuple(_request_id(i) for i in _items_flat(obj, "rqk", limits))),
        awaiting=_uint(get("rqw", 0), "rqw"),
        batches=batches,
        clock=_uint(obj["ck"], "ck") if "ck" in obj else None,
    )


_ABSENT: Any = object()
"""``obj.get(key, _ABSENT)``: the key is not in the message (``nil`` is not absence)."""


def _decode_batch(item: list[Any]) -> TemplateBatch:
    topic, data = item
    if not isinstance(data, bytes) or not data:
        raise MalformedRequest("a template batch must be non-empty bytes")
    return TemplateBatch(_name(topic, "topic"), data)


def check_consecutive(events: Sequence[Event]) -> None:
    """Raise :class:`MalformedRequest` unless ``events`` have consecutive seqs, in order."""
    for prev, nxt in itertools.pairwise(events):
        if nxt.seq != prev.seq + 1:
            raise MalformedRequest(_NOT_CONSECUTIVE)


_NOT_CONSECUTIVE = "events in one request must have consecutive seqs"


def encode_response(resp: SyncResponse) -> bytes:
    """Encode a :class:`SyncResponse`."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": "sync", "ack": resp.acked, "time": resp.time}
    if resp.docs:
        msg["docs"] = [_encode_doc(d) for d in resp.docs]
    if resp.down:
        msg["down"] = [[d.seq, DOWN_KINDS.index(d.kind), d.name, _body(d.body), d.expires]
                       for d in resp.down]
    if resp.down_done:
        msg["dn"] = resp.down_done
    if resp.accepted:
        msg["rqa"] = list(resp.accepted)
    if resp.outcomes:
        msg["out"] = [[o.id, _body(dict(o.outcome))] for o in resp.outcomes]
    if resp.conflicts:
        msg["cf"] = [[c.map, c.key, _encode_write(c.winner), _encode_write(c.loser)]
                     for c in resp.conflicts]
    return _pack(msg)


def _decode_down(item: list[Any], limits: Limits) -> DownItem:
    seq, kind, name, data, expires = item
    if kind not in (0, 1) or isinstance(kind, bool):
        raise MalformedRequest(f"unknown downlink kind {kind!r}")
    seq = _uint(seq, "downlink seq")
    body, refused = _take_body(data, f"downlink {seq}", limits)
    return DownItem(seq, DOWN_KINDS[kind], _name(name, "downlink name"), body,
                    _uint(expires, "expires"), refused)


def _decode_outcome(item: list[Any], limits: Limits) -> Outcome:
    call_id, data = item
    call_id = _request_id(call_id)
    outcome, refused = _take_body(data, f"outcome {call_id!r}", limits)
    if refused is None and not isinstance(outcome, dict):
        refused = Refusal(INVALID_ITEM, f"outcome {call_id!r} is not a map")
    if refused is not None:
        return Outcome(call_id, refused_outcome(refused), refused)
    return Outcome(call_id, outcome)


def decode_response(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SyncResponse:
    """Decode a sync response, or raise the error an error frame carries.

    A downlink item or outcome whose body the receiver cannot take (over
    ``limits.max_item_body``, not msgpack, not JSON data) does not fail the response: it
    comes back with ``refused`` set, for the client to skip that item alone."""
    obj = _unpack(data)
    if obj.get("t") == "error":
        raise decode_error_obj(obj)
    if obj.get("t") != "sync":
        raise MalformedRequest(f"message type {obj.get('t')!r} is not 'sync'")
    return SyncResponse(
        docs=_decode_docs(obj, limits),
        acked=_uint(obj.get("ack", 0), "ack"),
        time=_uint(obj.get("time", 0), "time"),
        down=tuple(_decode_down(i, limits) for i in _items(obj, "down", limits, 5)),
        down_done=_uint(obj.get("dn", 0), "dn"),
        accepted=tuple(_request_id(i) for i in _get(obj, "rqa", list, [])),
        outcomes=tuple(_decode_outcome(i, limits) for i in _items(obj, "out", limits, 2)),
        conflicts=tuple(_decode_conflict(i, limits)
                        for i in _items(obj, "cf", dataclasses.replace(
                            limits, max_items=limits.max_stamps), 4)),
    )


# --- error frames ------------------------------------------------------------------------


def encode_error(error: CrdtsyncError) -> bytes:
    """Encode an error as a frame: ``{v, t: "error", code, msg, detail, retry}``."""
    return _pack({
        "v": PROTOCOL_VERSION,
        "t": "error",
        "code": error.code,
        "msg": error.message,
        "detail": error.detail,
        "retry": error.retryable,
    })


def decode_error_obj(obj: Mapping[str, Any], status: int = 0) -> CrdtsyncError:
    """Map a decoded error frame (msgpack or JSON) back to its exception."""
    code = obj.get("code")
    message = obj.get("msg", obj.get("message", ""))
    detail = obj.get("detail")
    return error_from_code(
        code if isinstance(code, str) else "internal",
        message if isinstance(message, str) else "",
        detail if isinstance(detail, dict) else None,
        status,
    )


def decode_error(data: bytes, status: int) -> CrdtsyncError:
    """Turn a non-200 response body into its exception, whatever the body holds: a msgpack
    error frame (``/v1/sync``) or the JSON error body of the other endpoints
    (``{"error": {"code", "message", "detail", "retryable"}}``, ``/v1/wake`` included)."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        obj = _json_error(data)
    if isinstance(obj, dict) and obj.get("t") == "error":
        return decode_error_obj(obj, status)
    return error_from_code("internal" if status >= 500 else "bad_request",
                           f"HTTP {status} without an error frame", None, status)


def _json_error(data: bytes) -> dict[str, Any] | None:
    """The error of a JSON error body ``{"error": {...}}`` as a frame-like map, else None."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    return {**err, "t": "error"} if isinstance(err, dict) else None


# --- gateway batches (POST /v1/sync/batch) -----------------------------------------------

MAX_BATCH_TOKEN = 256
"""The longest token an entry of a batch may carry (device tokens have 22 or 43 characters)."""


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One device's part of a gateway batch: its bearer ``token`` and the body of its sync
    request, exactly as ``POST /v1/sync`` would carry it (uncompressed msgpack)."""

    token: str
    body: bytes


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    """One device's part of a batch answer: ``status`` 200 with the body of its sync
    response, or the HTTP status of its error with the error frame as ``body``."""

    status: int
    body: bytes


def encode_batch_request(entries: Sequence[BatchEntry]) -> bytes:
    """A batch request body: ``{v: 1, t: "batch", e: [[token, body], ...]}``."""
    return _pack({"v": PROTOCOL_VERSION, "t": "batch",
                  "e": [[entry.token, entry.body] for entry in entries]})


def decode_batch_request(data: bytes, limits: Limits = DEFAULT_LIMITS) -> list[BatchEntry]:
    """Read the outer framing of a batch request, and only that: each entry's token and its
    body as bytes, not decoded (the server authenticates an entry before it reads its
    body). The entry count is checked before any entry is read: over
    ``limits.max_batch_entries`` raises :class:`BatchTooLarge` (``detail.max_entries``).
    Anything else that is not the framing of section 18 raises :class:`MalformedRequest`
    (:class:`UnsupportedVersion` for a ``v`` other than 1)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(data), 1),
                                max_bin_len=len(data), max_str_len=len(data))
    unpacker.feed(data)
    fields: dict[str, Any] = {}
    entries: list[BatchEntry] | None = None
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "e":
                entries = _batch_entries(unpacker, limits.max_batch_entries)
            else:
                fields[key] = unpacker.unpack()
    except (*_NOT_MSGPACK, msgpack.OutOfData) as exc:
        raise MalformedRequest(f"batch body is not a batch message: {exc}") from exc
    if unpacker.tell() != len(data):
        raise MalformedRequest("batch body has bytes after its message")
    _check_header(fields, "batch")
    if entries is None:
        raise MalformedRequest("batch: missing field 'e'")
    return entries


def _batch_entries(unpacker: msgpack.Unpacker, limit: int) -> list[BatchEntry]:
    count = unpacker.read_array_header()
    if count > limit:
        raise BatchTooLarge(f"a batch carries at most {limit} entries, not {count}",
                            {"max_entries": limit})
    entries = []
    for n in range(count):
        if unpacker.read_array_header() != 2:
            raise MalformedRequest(f"batch entry {n} must be [token, body]")
        token, body = unpacker.unpack(), unpacker.unpack()
        if not isinstance(token, str) or not 0 < len(token) <= MAX_BATCH_TOKEN:
            raise MalformedRequest(f"batch entry {n}: the token must be a string of 1 to "
                                   f"{MAX_BATCH_TOKEN} characters")
        if not isinstance(body, bytes):
            raise MalformedRequest(f"batch entry {n}: the body must be bin")
        entries.append(BatchEntry(token, body))
    return entries


def _check_header(fields: Mapping[str, Any], kind: str) -> None:
    """``v`` must be the protocol version and ``t`` ``kind``."""
    version = fields.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this peer speaks {PROTOCOL_VERSION})",
            {"supported": [PROTOCOL_VERSION]})
    if fields.get("t") != kind:
        raise MalformedRequest(f"message type must be {kind!r}")


def encode_batch_response(answers: Sequence[BatchAnswer]) -> bytes:
    """A batch answer body: ``{v: 1, t: "batch", r: [[status, body], ...]}``, one per entry
    of the request, in its order."""
    return _pack({"v": PROTOCOL_VERSION, "t": "batch",
                  "r": [[answer.status, answer.body] for answer in answers]})


def decode_batch_response(data: bytes, count: int) -> list[BatchAnswer]:
    """The answers of a batch of ``count`` entries, in order; :class:`MalformedRequest` when
    the body is not a batch answer of exactly ``count`` entries (then nothing of it may be
    used: each device handles it as a lost response)."""
    obj = _unpack(data)
    _check_header(obj, "batch")
    raw = obj.get("r")
    if not isinstance(raw, list) or len(raw) != count:
        raise MalformedRequest(f"batch answer must carry {count} entries")
    answers = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or not 100 <= item[0] <= 599 or not isinstance(item[1], bytes)):
            raise MalformedRequest("batch answer entries must be [status, bin]")
        answers.append(BatchAnswer(item[0], item[1]))
    return answers


# --- the live channel (GET /v1/wake) -----------------------------------------------------


MAX_WAKE_WAIT = 3600
"""The longest hold (seconds) a client may ask for with ``wait``."""
DEFAULT_WAKE_WAIT = 50.0
"""The hold a client asks for by default, and the server's default cap: under the 60 s
idle timeout of typical proxies and load balancers."""
MAX_WAKE_DELAY_MS = 60_000
"""The longest ``in`` (ms) a client waits before syncing; longer values are clamped."""
MAX_WAKE_BODY = 4096
"""The largest wake answer a client reads (a real one is about 40 bytes)."""


@dataclass(frozen=True, slots=True)
class WakeSignal:
    """One answer of ``GET /v1/wake`` (docs/protocol.md 14a): ``wake`` is true when
    something for the device was committed after the cursor the request sent (or the server
    cannot tell); ``cursor`` (``w``) is what the next request sends as ``after``;
    ``delay_ms`` (``in``) how long the client waits before it syncs (0..60,000)."""

    wake: bool
    cursor: int
    delay_ms: int = 0


def wake_query(after: int | None, wait: float) -> dict[str, str]:
    """The query of a wake request: ``after`` (left out when the client has no cursor yet)
    and ``wait``, decimal seconds (at most millisecond precision). Raises ``ValueError``
    when ``after`` is not in 0..2**63-1 or ``wait`` not in 0..3600."""
    if after is not None and (isinstance(after, bool) or not 0 <= after <= MAX_SEQ):
        raise ValueError(f"after must be an integer in 0..{MAX_SEQ}")
    if not (math.isfinite(wait) and 0 <= wait <= MAX_WAKE_WAIT):
        raise ValueError(f"wait must be seconds in 0..{MAX_WAKE_WAIT}")
    query = {} if after is None else {"after": str(after)}
    query["wait"] = f"{wait:.3f}".rstrip("0").rstrip(".")
    return query


def encode_wake(signal: WakeSignal) -> bytes:
    """The JSON body of a wake answer: ``{"wake": bool, "w": int, "in": int}``. Raises
    ``ValueError`` for a cursor outside 0..2**63-1 or a delay outside 0..60,000 ms."""
    if not 0 <= signal.cursor <= MAX_SEQ or not 0 <= signal.delay_ms <= MAX_WAKE_DELAY_MS:
        raise ValueError(f"wake cursor or delay out of range: {signal!r}")
    return json.dumps({"wake": bool(signal.wake), "w": signal.cursor, "in": signal.delay_ms},
                      separators=(",", ":")).encode()


def decode_wake(body: bytes) -> WakeSignal:
    """Decode a wake answer, strictly: a JSON object (at most 4 KiB) whose ``wake`` is a
    boolean, ``w`` an integer in 0..2**63-1 and ``in`` an integer (clamped to 0..60,000);
    other keys are ignored. Raises :class:`MalformedRequest`, as for a malformed sync
    response: the answer is not used."""
    if len(body) > MAX_WAKE_BODY:
        raise MalformedRequest(f"wake answer over {MAX_WAKE_BODY} bytes")
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest(f"wake answer is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedRequest("wake answer must be a JSON object")
    where = "wake answer"
    delay = _get(obj, "in", int, where=where)
    return WakeSignal(_get(obj, "wake", bool, where=where),
                      _uint(_get(obj, "w", int, where=where), f"{where}: 'w'"),
                      min(max(delay, 0), MAX_WAKE_DELAY_MS))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
