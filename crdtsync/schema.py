"""Typed state schemas and merge policies (docs/protocol.md section 15c).

A :class:`StateSchema` says, per root map and key of a device's ``state`` document, how
concurrent writes merge (the key's *policy*), who may write it, and which values it takes.
A fleet has at most one schema, set by the cloud (``PUT /v1/fleets/{fleet}/schema``) and
delivered in the fleet's shared document; the device checks its own writes against it when
they are made, the server checks every write again, the device's and the cloud's. Without a
schema (:meth:`StateSchema.empty`) every key is ``latest`` and any JSON value is allowed.

A schema document::

    {"unknown": "allow" | "refuse",    maps not listed; the default of listed maps
     "policy": POLICY,                  maps not listed; the default of listed maps
     "maps": {MAP: {"unknown": "allow" | "refuse",   keys not listed
                    "policy": POLICY,                 the default of its keys
                    "keys": {KEY: {"type": TYPE, "min": n, "max": n, "enum": [v, ...],
                                   "max_length": n, "default": v, "policy": POLICY}}}}}

Every field is optional (``{}`` is a valid schema that allows everything). ``POLICY`` is one
of :data:`POLICIES`, ``TYPE`` one of :data:`TYPES`. ``min``/``max`` (inclusive) need type
``number`` or ``integer``; ``max_length`` needs ``string`` (characters), ``list`` (items) or
``object`` (keys); ``enum`` lists the only values allowed (each must itself conform, compared
as JSON: ``1`` and ``1.0`` are one value, ``1`` and ``true`` are not); ``default`` must
conform too. ``unknown: "refuse"`` refuses a write of a key (or of any key of a map) the
schema does not list; deleting such a key is always allowed (it makes the document conform).

Identity: :attr:`StateSchema.hash` is the first 8 bytes of BLAKE2b (personalised with the
format version) of the canonical form: the normalized definition (every map's ``policy`` and
``unknown`` resolved, a key's ``policy`` only when it differs from its map's, integral
numbers as integers) as compact JSON with sorted keys. Documents that say the same thing
in other words (key order, whitespace, ``3.0`` for ``3``, an inherited value repeated)
hash alike.

Pure: no I/O; the device library and the server share it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Forbidden, InvalidValue, SchemaViolation
from .protocol import StampedWrite
from .values import MAX_SAFE_INTEGER, check_key, check_value, normalize

POLICIES = ("latest", "crdt", "device", "cloud")
"""``latest``: the write with the latest stamp wins (default); ``crdt``: Yjs merges (for
nested collaborative types); ``device``: only the device writes it (a cloud write is
refused); ``cloud``: only the cloud writes it (a device write is refused)."""
TYPES = ("number", "integer", "string", "bool", "object", "list")
UNKNOWN = ("allow", "refuse")
WRITERS = ("device", "cloud")
"""Who writes: the device (a sync) or the cloud (the management API)."""

SCHEMA_MAP = "schema"
"""Root map of the fleet document that holds the fleet's schema: ``{"hash": hex, "json":
canonical text}`` (both keys absent: no schema)."""
HASH_SIZE = 8
MAX_SCHEMA_BYTES = 128 * 1024
"""Largest canonical schema: it is delivered to every device of the fleet."""

_PERSON = b"crdtsync.schm.v1"
_NUMERIC = ("number", "integer")
_SIZED = {"string": "characters", "list": "items", "object": "keys"}
_TOP_FIELDS = ("maps", "policy", "unknown")
_MAP_FIELDS = ("keys", "policy", "unknown")
_KEY_FIELDS = ("default", "enum", "max", "max_length", "min", "policy", "type")
_ABSENT: Any = object()
COUNTER_REFUSED = (
    "policy 'counter' is not supported: a counter needs increments from every writer added "
    "up, but a key of a Yjs map holds one value that writes replace, and latest-write "
    "stamps pick one write; use an event per increment, or a 'device' key the device sums")


def _digest(data: bytes) -> bytes:
    """A schema's version: BLAKE2b-64 of its canonical bytes, personalised."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE, person=_PERSON).digest()


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON text: sorted keys, no spaces, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _show(value: Any, limit: int = 60) -> str:
    """A value as a user reads it in a message: JSON, cut at ``limit`` characters."""
    try:
        text = canonical_json(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_of(value: Any) -> str:
    """The schema type name of a JSON value (``integer`` counts as a ``number`` too)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _fits_type(value: Any, kind: str) -> bool:
    found = _type_of(value)
    return found == kind or (kind == "number" and found == "integer")


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


@dataclass(frozen=True, slots=True)
class KeyRule:
    """What one listed key takes, and its policy."""

    policy: str
    type: str | None = None
    min: int | float | None = None
    max: int | float | None = None
    enum: tuple[Any, ...] | None = None
    max_length: int | None = None
    default: Any = _ABSENT
    enum_texts: frozenset[str] = frozenset()
    """The ``enum`` values as canonical JSON text, for membership tests."""

    def problem(self, value: Any) -> tuple[str, str] | None:
        """``(rule, message)`` for the first rule ``value`` breaks (the message completes
        "KEY ..."), or ``None`` when it conforms."""
        if self.type is not None and not _fits_type(value, self.type):
            return "type", f"must be {_a(self.type)}, not {_a(_type_of(value))} ({_show(value)})"
        if self.min is not None and value < self.min:
            return "min", f"must be at least {_show(self.min)}, not {_show(value)}"
        if self.max is not None and value > self.max:
            return "max", f"must be at most {_show(self.max)}, not {_show(value)}"
        if self.max_length is not None and len(value) > self.max_length:
            unit = _SIZED[self.type or "string"][:-1 if self.max_length == 1 else None]
            return "max_length", (f"must have at most {self.max_length} {unit}, not "
                                  f"{len(value)}")
        if self.enum is not None and canonical_json(normalize(value)) not in self.enum_texts:
            shown = ", ".join(_show(v, 30) for v in self.enum[:10])
            more = ", ..." if len(self.enum) > 10 else ""
            return "enum", f"must be one of {shown}{more}, not {_show(value)}"
        return None

    def to_json(self, map_policy: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("type", "min", "max", "max_length"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.default is not _ABSENT:
            out["default"] = self.default
        if self.policy != map_policy:
            out["policy"] = self.policy
        return out


@dataclass(frozen=True, slots=True)
class MapRule:
    """One listed root map: the policy and unknown-key rule of its keys, and its keys."""

    policy: str
    unknown: str
    keys: Mapping[str, KeyRule]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "unknown": self.unknown,
                "keys": {key: rule.to_json(self.policy) for key, rule in self.keys.items()}}


class StateSchema:
    """A parsed, immutable state schema (see the module docstring for the format).

    ``StateSchema(document)`` takes the schema as JSON data and raises
    :class:`~crdtsync.errors.InvalidValue` (``detail.where``: the path of the fault, such as
    ``maps.state.keys.voltage.min``) for anything that is not a valid schema. Two schemas are
    equal when their hashes are.
    """

    __slots__ = ("_maps", "_trivial", "canonical", "hash", "policy_default",
                 "unknown")

    def __init__(self, document: Mapping[str, Any]) -> None:
        if not isinstance(document, Mapping):
            raise _bad("schema", "a schema is a JSON object")
        _only(document, _TOP_FIELDS, "schema")
        self.policy_default = _policy(document.get("policy", "latest"), "schema.policy")
        """The policy of maps the schema does not list."""
        self.unknown = _unknown(document.get("unknown", "allow"), "schema.unknown")
        """``refuse``: a write to a map the schema does not list is refused."""
        maps = document.get("maps", {})
        if not isinstance(maps, Mapping):
            raise _bad("schema.maps", "maps is an object {map name: map}")
        self._maps: dict[str, MapRule] = {
            name: _parse_map(name, spec, self.policy_default, self.unknown)
            for name, spec in maps.items()}
        try:
            self.canonical: bytes = canonical_json(self.definition).encode()
        except UnicodeEncodeError as exc:
            raise _bad("schema", "a name or value is not valid Unicode (a lone surrogate)"
                       ) from exc
        if len(self.canonical) > MAX_SCHEMA_BYTES:
            raise InvalidValue(f"the schema is {len(self.canonical)} bytes as canonical JSON "
                               f"(max {MAX_SCHEMA_BYTES})",
                               {"where": "schema", "max_bytes": MAX_SCHEMA_BYTES})
        self.hash: bytes = _digest(self.canonical)
        self._trivial = (not self._maps and self.unknown == "allow"
                         and self.policy_default == "latest")

    @classmethod
    def empty(cls) -> StateSchema:
        """No schema: every key ``latest``, every JSON value allowed."""
        return _EMPTY

    @classmethod
    def from_json(cls, text: str | bytes) -> StateSchema:
        """Parse a schema from JSON text; a repeated name or malformed JSON raises
        :class:`InvalidValue` like a bad schema."""
        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            if len({k for k, _ in items}) != len(items):
                raise _bad("schema", "a name is repeated in one object")
            return dict(items)
        try:
            document = json.loads(text, object_pairs_hook=pairs)
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, InvalidValue):
                raise
            raise _bad("schema", f"not JSON: {exc}") from exc
        return cls(document)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any] | None) -> StateSchema:
        """The schema a fleet document's ``schema`` map holds (:attr:`entry`): the empty
        schema when it holds none; :class:`InvalidValue` when its text does not match its
        hash (checked on the bytes as received, before parsing) or does not parse."""
        if not entry or entry.get("json") is None:
            return _EMPTY
        text, digest = entry.get("json"), entry.get("hash")
        if not isinstance(text, str):
            raise _bad("schema", "the fleet document's schema is not JSON text")
        if _digest(text.encode("utf-8", "surrogatepass")).hex() != digest:
            raise _bad("schema", f"the fleet document's schema does not match its hash "
                                 f"{digest!r}")
        return cls.from_json(text)

    @property
    def version(self) -> str:
        """The hash as hex text: the schema's version, as the API and the fleet document
        name it."""
        return self.hash.hex()

    @property
    def definition(self) -> dict[str, Any]:
        """The normalized definition (what :attr:`canonical` encodes)."""
        return {"policy": self.policy_default, "unknown": self.unknown,
                "maps": {name: spec.to_json() for name, spec in self._maps.items()}}

    @property
    def entry(self) -> dict[str, str]:
        """What the fleet document's ``schema`` map holds for this schema."""
        return {"hash": self.version, "json": self.canonical.decode()}

    @property
    def trivial(self) -> bool:
        """True when the schema allows everything and every key is ``latest``."""
        return self._trivial

    def maps(self) -> list[str]:
        """The listed root maps, sorted."""
        return sorted(self._maps)

    def keys(self, map_name: str) -> list[str]:
        """The listed keys of root map ``map_name``, sorted (none for an unlisted map)."""
        spec = self._maps.get(map_name)
        return sorted(spec.keys) if spec else []

    def rule(self, map_name: str, key: str) -> KeyRule | None:
        """The rule of a listed key, or ``None``."""
        spec = self._maps.get(map_name)
        return spec.keys.get(key) if spec else None

    def policy(self, map_name: str, key: str) -> str:
        """The merge policy of ``key`` in root map ``map_name`` (one of :data:`POLICIES`):
        the key's own, else its map's, else the schema's default."""
        spec = self._maps.get(map_name)
        if spec is None:
            return self.policy_default
        rule = spec.keys.get(key)
        return rule.policy if rule is not None else spec.policy

    def default(self, map_name: str, key: str) -> Any:
        """A fresh copy of the key's ``default``, or ``None`` when it has none."""
        rule = self.rule(map_name, key)
        if rule is None or rule.default is _ABSENT:
            return None
        return copy.deepcopy(rule.default)

    def check(self, map_name: str, key: str, value: Any, *, deleted: bool = False,
              doc: str | None = None) -> None:
        """Raise :class:`~crdtsync.errors.SchemaViolation` (an ``InvalidValue``; detail:
        ``map``, ``key``, ``rule``, ``schema``, and ``doc`` when given) unless ``value`` may
        be written at ``key``. A delete (``deleted``, or ``value`` ``None``) is always
        allowed. Who writes is not checked here: :meth:`check_write`."""
        if self._trivial or deleted or value is None:
            return
        spec = self._maps.get(map_name)
        if spec is None:
            if self.unknown == "refuse":
                raise self._violation(map_name, key, "unknown", doc, (
                    f"map {map_name!r} is not in the fleet's schema, which refuses maps it "
                    f"does not list ({map_name}.{key})"))
            return
        rule = spec.keys.get(key)
        if rule is None:
            if spec.unknown == "refuse":
                raise self._violation(map_name, key, "unknown", doc, (
                    f"{map_name}.{key} is not in the fleet's schema, which refuses keys of "
                    f"{map_name!r} it does not list"))
            return
        problem = rule.problem(value)
        if problem is not None:
            raise self._violation(map_name, key, problem[0], doc,
                                  f"{map_name}.{key} {problem[1]}")

    def check_write(self, map_name: str, key: str, value: Any, *, writer: str,
                    deleted: bool = False, doc: str | None = None) -> None:
        """:meth:`check`, after the writer rule: a ``device`` key written (or deleted) by
        the cloud, or a ``cloud`` key by the device, raises
        :class:`~crdtsync.errors.Forbidden` (detail: ``map``, ``key``, ``policy``,
        ``schema``, and ``doc`` when given)."""
        if self._trivial:
            return
        policy = self.policy(map_name, key)
        if policy in WRITERS and policy != writer:
            detail = {"map": map_name, "key": key, "policy": policy, "schema": self.version}
            if doc is not None:
                detail["doc"] = doc
            owner = "set by the cloud" if policy == "cloud" else "reported by the device"
            raise Forbidden(f"{map_name}.{key} is {owner} only (policy {policy!r}); the "
                            f"{writer} cannot write it", detail)
        self.check(map_name, key, value, deleted=deleted, doc=doc)

    def check_changes(self, changes: Mapping[str, Mapping[str, Any]], *, writer: str,
                      doc: str | None = None) -> None:
        """:meth:`check_write` for every ``{map: {key: value}}`` of ``changes`` (``None``:
        the key is deleted), in sorted order, so the first fault reported is the same
        whatever the order of the input."""
        if self._trivial:
            return
        for map_name in sorted(changes, key=str):
            values = changes[map_name]
            for key in sorted(values, key=str):
                self.check_write(map_name, key, values[key], writer=writer, doc=doc)

    def check_device_update(self, changes: Mapping[str, Mapping[str, Any]],
                            stamps: Iterable[StampedWrite] | None, *, doc: str) -> None:
        """The server's check of a device's update to document ``doc``: the keys it changed
        (``{map: {key: value after the apply, or None}}``, as ``crdt.ChangeTracker``
        reports them) and the writes it declares in ``s`` (their own values: "latest
        write wins" may make the document hold one of them) must all be writes the device
        may make. Raises :class:`~crdtsync.errors.Forbidden` or
        :class:`~crdtsync.errors.SchemaViolation` with ``detail.doc``."""
        if self._trivial:
            return
        self.check_changes(changes, writer="device", doc=doc)
        for write in stamps or ():
            self.check_write(write.map, write.key, write.value, writer="device",
                             deleted=write.deleted, doc=doc)

    def _violation(self, map_name: str, key: str, rule: str, doc: str | None,
                   message: str) -> SchemaViolation:
        detail = {"map": map_name, "key": key, "rule": rule, "schema": self.version}
        if doc is not None:
            detail["doc"] = doc
        return SchemaViolation(message, detail)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateSchema) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"StateSchema({self.version}, maps={self.maps()})"


# --- parsing -----------------------------------------------------------------------------


def _bad(where: str, message: str) -> InvalidValue:
    return InvalidValue(f"{where}: {message}", {"where": where})


def _only(spec: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for name in spec:
        if name not in allowed:
            raise _bad(f"{where}.{name}" if isinstance(name, str) else where,
                       f"unknown field {name!r} (allowed: {', '.join(allowed)})")


def _policy(value: Any, where: str) -> str:
    if value == "counter":
        raise _bad(where, COUNTER_REFUSED)
    if not isinstance(value, str) or value not in POLICIES:
        raise _bad(where, f"policy {_show(value)} is not one of {', '.join(POLICIES)}")
    return value


def _unknown(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in UNKNOWN:
        raise _bad(where, f"unknown must be 'allow' or 'refuse', not {_show(value)}")
    return value


def _name(name: Any, where: str) -> str:
    try:
        check_key(name, where=where)
    except InvalidValue as exc:
        raise _bad(where, exc.message.split(": ", 1)[-1]) from exc
    return str(name)


def _parse_map(name: Any, spec: Any, policy: str, unknown: str) -> MapRule:
    where = f"maps.{_name(name, 'schema.maps')}"
    if not isinstance(spec, Mapping):
        raise _bad(where, "a map is an object {\"keys\": {...}, \"policy\", \"unknown\"}")
    _only(spec, _MAP_FIELDS, where)
    map_policy = _policy(spec.get("policy", policy), f"{where}.policy")
    keys = spec.get("keys", {})
    if not isinstance(keys, Mapping):
        raise _bad(f"{where}.keys", "keys is an object {key name: key}")
    return MapRule(
        policy=map_policy, unknown=_unknown(spec.get("unknown", unknown), f"{where}.unknown"),
        keys={_name(key, f"{where}.keys"): _parse_key(f"{where}.keys.{key}", rule, map_policy)
              for key, rule in keys.items()})


def _parse_key(where: str, spec: Any, map_policy: str) -> KeyRule:
    if not isinstance(spec, Mapping):
        raise _bad(where, "a key is an object {\"type\", \"min\", \"max\", \"enum\", "
                          "\"max_length\", \"default\", \"policy\"}")
    _only(spec, _KEY_FIELDS, where)
    kind = spec.get("type")
    if kind is not None and (not isinstance(kind, str) or kind not in TYPES):
        raise _bad(f"{where}.type", f"type {_show(kind)} is not one of {', '.join(TYPES)}")
    low, high = (_bound(spec, name, kind, where) for name in ("min", "max"))
    if low is not None and high is not None and low > high:
        raise _bad(where, f"min {_show(low)} is above max {_show(high)}")
    rule = KeyRule(policy=_policy(spec.get("policy", map_policy), f"{where}.policy"),
                   type=kind, min=low, max=high,
                   max_length=_max_length(spec, kind, where))
    if "enum" in spec:
        values = _enum(spec["enum"], rule, where)
        rule = dataclasses.replace(rule, enum=values, enum_texts=frozenset(
            canonical_json(v) for v in values))
    if "default" in spec:
        rule = dataclasses.replace(rule, default=_conforming(spec["default"], rule,
                                                             f"{where}.default"))
    return rule


def _bound(spec: Mapping[str, Any], name: str, kind: str | None, where: str
           ) -> int | float | None:
    value = spec.get(name)
    if value is None:
        return None
    if kind not in _NUMERIC:
        raise _bad(f"{where}.{name}", f"{name} needs type number or integer")
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or abs(value) > MAX_SAFE_INTEGER):
        raise _bad(f"{where}.{name}", f"{name} must be a finite number within "
                                      f"+/-{MAX_SAFE_INTEGER}, not {_show(value)}")
    normalized: int | float = normalize(value)
    return normalized


def _max_length(spec: Mapping[str, Any], kind: str | None, where: str) -> int | None:
    value = spec.get("max_length")
    if value is None:
        return None
    if kind not in _SIZED:
        raise _bad(f"{where}.max_length", "max_length needs type string, list or object")
    value = normalize(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAFE_INTEGER:
        raise _bad(f"{where}.max_length", f"max_length must be an integer from 0, not "
                                          f"{_show(value)}")
    return value


def _conforming(value: Any, rule: KeyRule, where: str) -> Any:
    """``value`` normalized, if it is JSON data a document can hold and fits ``rule``."""
    if value is None:
        raise _bad(where, "null is not a value (a key without a value is absent)")
    try:
        check_value(value, where=where)
    except InvalidValue as exc:
        raise _bad(where, exc.message) from exc
    value = normalize(value)
    problem = rule.problem(value)
    if problem is not None:
        raise _bad(where, f"{_show(value)} does not conform: it {problem[1]}")
    return value


def _enum(values: Any, rule: KeyRule, where: str) -> tuple[Any, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise _bad(f"{where}.enum", "enum is a non-empty list of the values allowed")
    out = tuple(_conforming(v, rule, f"{where}.enum[{i}]") for i, v in enumerate(values))
    if len({canonical_json(v) for v in out}) != len(out):
        raise _bad(f"{where}.enum", "enum repeats a value")
    return out


_EMPTY = StateSchema({})
