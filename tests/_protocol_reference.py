"""A frozen copy of the sync-request decoder as it was before issue 17's decode pass
(``crdtsync.protocol.decode_request`` and the value checks it uses, from commit 2c6aeea):
the reference the differential tests compare the optimised decoder with. Do not optimise
this file: its worth is that it is the old, obviously-checked code."""

# ruff: noqa
from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from crdtsync.errors import (
    CorruptUpdate,
    InvalidStateVector,
    InvalidValue,
    MalformedRequest,
    TooManyEvents,
    UnsupportedVersion,
)
from crdtsync.protocol import (
    DEFAULT_LIMITS,
    MAX_CLIENT_ID,
    MAX_CLOCK,
    MAX_SEQ,
    NAME_RE,
    PROTOCOL_VERSION,
    DocSync,
    Event,
    Limits,
    MsgpackExtension,
    ProxyCall,
    Result,
    StampedWrite,
    SyncRequest,
    TemplateBatch,
)
from crdtsync.values import MAX_DEPTH, MAX_KEY_LENGTH, MAX_SAFE_INTEGER


def check_event_body(value: Any, *, where: str = "event body") -> None:
    """Raise :class:`InvalidValue` unless ``value`` can be an event body: JSON data with
    64-bit integers, and ``bytes`` (an event is not a CRDT; readers of the JSON API see
    bytes as base64 text, :func:`json_default`)."""
    if not event_body_ok(value):
        _check(value, where, 2**63 - 1, 0, allow_bytes=True)


def event_body_ok(value: Any) -> bool:
    """The fast check of :func:`check_event_body` (no message built): ``True`` means the
    body is valid; ``False`` means "call :func:`check_event_body`", which names the fault
    (or accepts a subclass of an allowed type)."""
    return _valid(value, 2**63 - 1, 0, True)


def check_value(value: Any, *, where: str = "value", max_int: int = MAX_SAFE_INTEGER) -> None:
    """Raise :class:`InvalidValue` unless ``value`` is JSON data a CRDT can hold exactly.

    Allowed: ``None``, ``bool``, ``int`` with ``abs(v) <= max_int``, finite ``float``,
    ``str``, ``list``/``tuple`` and ``dict`` with ``str`` keys, nested at most 32 deep.
    """
    if not _valid(value, max_int, 0, False):
        _check(value, where, max_int, 0)


def _valid(value: Any, max_int: int, depth: int, allow_bytes: bool) -> bool:
    """The fast path of :func:`_check` for the plain types: no path strings are built.
    ``False`` means "look closer": :func:`_check` then raises with the exact place (or
    accepts a subclass of an allowed type)."""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-max_int <= value <= max_int)
    if kind is float:
        return math.isfinite(value)
    inner = depth < MAX_DEPTH  # a member may sit at depth + 1: the scalar fast path holds
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key or len(key) > MAX_KEY_LENGTH:
                return False
            if not (inner and _plain_scalar(item, max_int)) and not _valid(
                    item, max_int, depth + 1, allow_bytes):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:  # a loop: no generator on the hot path
            if not (inner and _plain_scalar(item, max_int)) and not _valid(
                    item, max_int, depth + 1, allow_bytes):
                return False
        return True
    return allow_bytes and kind is bytes


def _plain_scalar(value: Any, max_int: int) -> bool:
    """True for a valid ``str``, ``bool``, ``None``, in-range ``int`` or finite ``float``: the
    members of most bodies, checked without a recursive call; ``False`` means "ask
    :func:`_valid`" (which gives the same answer for these types)."""
    kind = type(value)
    if kind is float:
        return bool(value - value == 0.0)  # finite: inf - inf and nan - nan are nan
    if kind is str or kind is bool or value is None:
        return True
    return kind is int and bool(-max_int <= value <= max_int)


def _check(value: Any, where: str, max_int: int, depth: int, *,
           allow_bytes: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise InvalidValue(f"{where}: nested more than {MAX_DEPTH} levels", {"where": where})
    if value is None or isinstance(value, (bool, str)):
        return
    if allow_bytes and isinstance(value, bytes):
        return
    if isinstance(value, int):
        if abs(value) > max_int:
            raise InvalidValue(
                f"{where}: integer {value} is outside +/-{max_int}; "
                "a CRDT number is a double and cannot hold it exactly",
                {"where": where},
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"{where}: {value} is not a finite number", {"where": where})
        return
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        # (a named tuple such as msgpack's ExtType is a record, not an array)
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", max_int, depth + 1, allow_bytes=allow_bytes)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_key(key, where=where)
            _check(item, f"{where}.{key}", max_int, depth + 1, allow_bytes=allow_bytes)
        return
    raise InvalidValue(
        f"{where}: {type(value).__name__} is not JSON data (use None, bool, number, str, "
        "list or dict)",
        {"where": where},
    )


def check_key(key: Any, *, where: str = "key") -> None:
    """Raise :class:`InvalidValue` unless ``key`` is a non-empty ``str`` of at most 256 chars."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidValue(f"{where}: keys are non-empty strings of at most {MAX_KEY_LENGTH} "
                           "characters (code points)", {"where": where})


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


def parse_state_vector(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[int, int]:
    """Decode a Yjs v1 state vector into ``{client_id: clock}``.

    Raises :class:`InvalidStateVector` on truncation, trailing bytes, a client id above
    2**53 - 1, a clock of 2**32 or more, a repeated client, or too many entries. Yrs itself
    accepts such garbage silently (it would answer with a useless update), so every state
    vector from the network passes here first.
    """
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
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise MalformedRequest(f"{what} must be an integer in 0..{maximum}")
    return value


def _decode_doc(obj: Any, limits: Limits) -> DocSync:
    if not isinstance(obj, dict):
        raise MalformedRequest("each entry of 'docs' must be a map")
    name = _name(obj.get("d"), "document")
    gen = _uint(obj.get("g", 0), "generation")
    sv = _get(obj, "sv", bytes, where="document")
    parse_state_vector(sv, limits)
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


def _decode_docs(obj: Mapping[str, Any], limits: Limits) -> tuple[DocSync, ...]:
    raw = _get(obj, "docs", list, [])
    if len(raw) > limits.max_docs:
        raise MalformedRequest(f"at most {limits.max_docs} documents per message")
    docs = tuple(_decode_doc(d, limits) for d in raw)
    if len({d.doc for d in docs}) != len(docs):
        raise MalformedRequest("a document appears twice in one message")
    return docs


def _unpack_body(data: bytes, what: str) -> Any:
    """Decode a nested msgpack body; :class:`MalformedRequest` if it is not msgpack. The
    value is not checked yet (extension types come back as :class:`MsgpackExtension`)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=MsgpackExtension)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
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


def _topic(value: Any) -> str:
    topic = _name(value, "topic")
    if len(_TOPICS_SEEN) < _TOPICS_REMEMBERED:
        _TOPICS_SEEN.add(topic)
    return topic


def _unbody(data: Any, what: str, limits: Limits) -> Any:
    """Decode a nested msgpack body (bytes) and check it is JSON data."""
    if not isinstance(data, bytes):
        raise MalformedRequest(f"{what} must be msgpack bytes")
    if len(data) > limits.max_item_body:
        raise InvalidValue(f"{what} is {len(data)} bytes, over {limits.max_item_body}")
    value = _unpack_body(data, what)
    check_value(value, where=what, max_int=2**63 - 1)
    return value


def _items(obj: Mapping[str, Any], key: str, limits: Limits, width: int) -> list[list[Any]]:
    raw = _get(obj, key, list, [])
    if len(raw) > limits.max_items:
        raise MalformedRequest(f"at most {limits.max_items} entries in {key!r}")
    for item in raw:
        if not isinstance(item, list) or len(item) != width:
            raise MalformedRequest(f"each entry of {key!r} must be an array of {width}")
    return raw


def _items_flat(obj: Mapping[str, Any], key: str, limits: Limits) -> list[Any]:
    raw = _get(obj, key, list, [])
    if len(raw) > limits.max_items:
        raise MalformedRequest(f"at most {limits.max_items} entries in {key!r}")
    return raw


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
    if obj.get("t") != "sync":
        raise MalformedRequest(f"message type {obj.get('t')!r} is not 'sync'")
    device = _name(obj.get("dev"), "device")
    raw_events = _get(obj, "ev", list, [])
    if len(raw_events) > limits.max_events:
        raise TooManyEvents(
            f"{len(raw_events)} events in one request (max {limits.max_events})",
            {"max_events": limits.max_events},
        )
    events = tuple(_decode_event(e, limits) for e in raw_events)
    batches = tuple(_decode_batch(i) for i in _items(obj, "tev", limits, 2))
    if not batches:
        check_consecutive(events)
    return SyncRequest(
        device=device,
        docs=_decode_docs(obj, limits),
        events=events,
        purged=_uint(obj.get("pg", 0), "purged"),
        down_done=_uint(obj.get("dn", 0), "dn"),
        results=tuple(_decode_result(i, limits) for i in _items(obj, "res", limits, 3)),
        calls=tuple(_decode_call(i, limits) for i in _items(obj, "rq", limits, 3)),
        outcomes_acked=tuple(_request_id(i) for i in _items_flat(obj, "rqk", limits)),
        awaiting=_uint(obj.get("rqw", 0), "rqw"),
        batches=batches,
        clock=_uint(obj["ck"], "ck") if "ck" in obj else None,
    )


def _decode_batch(item: list[Any]) -> TemplateBatch:
    topic, data = item
    if not isinstance(data, bytes) or not data:
        raise MalformedRequest("a template batch must be non-empty bytes")
    return TemplateBatch(_name(topic, "topic"), data)


def check_consecutive(events: Sequence[Event]) -> None:
    """Raise :class:`MalformedRequest` unless ``events`` have consecutive seqs, in order."""
    for prev, nxt in itertools.pairwise(events):
        if nxt.seq != prev.seq + 1:
            raise MalformedRequest("events in one request must have consecutive seqs")

_TOPICS_SEEN: set[str] = set()
_TOPICS_REMEMBERED = 4096
