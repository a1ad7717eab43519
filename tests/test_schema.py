"""State schemas, unit level (crdtsync/schema.py): parsing and its typed errors, rule by
rule; the canonical form and hash; the checks of values, writers and whole changes; the
server's per-fleet view over a fleet document (server/crdtsync_server/schemas.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pycrdt import Doc

from crdtsync import crdt
from crdtsync.errors import Forbidden, InvalidValue, SchemaViolation
from crdtsync.protocol import StampedWrite
from crdtsync.schema import COUNTER_REFUSED, MAX_SCHEMA_BYTES, SCHEMA_MAP, StateSchema
from crdtsync_server.schemas import FleetSchemas

EXAMPLE: dict[str, Any] = {
    "unknown": "allow",
    "maps": {"state": {
        "policy": "latest", "unknown": "refuse",
        "keys": {
            "voltage": {"type": "number", "min": 0, "max": 5, "default": 3.3,
                        "policy": "device"},
            "mode": {"type": "string", "enum": ["eco", "boost"], "policy": "cloud"},
            "note": {"policy": "crdt"},
            "count": {"type": "integer", "min": 0},
            "tags": {"type": "list", "max_length": 2},
            "label": {"type": "string", "max_length": 3},
            "extra": {"type": "object", "max_length": 1},
            "on": {"type": "bool", "default": False},
            "level": {"enum": [1, "high", [1, 2]]},
        }}},
}


@pytest.fixture(scope="module")
def schema() -> StateSchema:
    return StateSchema(EXAMPLE)


def violation(schema: StateSchema, key: str, value: Any, map_name: str = "state"
              ) -> SchemaViolation:
    with pytest.raises(SchemaViolation) as info:
        schema.check(map_name, key, value)
    assert info.value.detail["map"] == map_name and info.value.detail["key"] == key
    assert info.value.detail["schema"] == schema.version
    assert isinstance(info.value, InvalidValue) and info.value.status == 422
    return info.value


# --- parsing ------------------------------------------------------------------------------


def test_policies_resolve_key_then_map_then_schema(schema: StateSchema) -> None:
    assert schema.policy("state", "voltage") == "device"
    assert schema.policy("state", "mode") == "cloud"
    assert schema.policy("state", "note") == "crdt"
    assert schema.policy("state", "count") == "latest"  # the map's
    assert schema.policy("state", "not-listed") == "latest"
    assert schema.policy("config", "x") == "latest"  # the schema's default
    crdt_maps = StateSchema({"policy": "crdt", "maps": {"a": {}, "b": {"policy": "cloud",
                                                                   "keys": {"k": {}}}}})
    assert crdt_maps.policy("other", "k") == "crdt"
    assert crdt_maps.policy("a", "k") == "crdt"
    assert crdt_maps.policy("b", "k") == crdt_maps.policy("b", "unlisted") == "cloud"


def test_the_empty_schema_allows_everything() -> None:
    empty = StateSchema.empty()
    assert empty.trivial and StateSchema({}) == empty
    assert StateSchema({"policy": "latest", "unknown": "allow", "maps": {}}) == empty
    empty.check_changes({"state": {"any": {"thing": [1]}}, "x": {"y": None}}, writer="device")
    empty.check_changes({"state": {"any": 1}}, writer="cloud")
    assert empty.policy("state", "k") == "latest" and empty.default("state", "k") is None
    assert not StateSchema({"unknown": "refuse"}).trivial


BAD: list[tuple[Any, str, str]] = [
    ([], "schema", "a schema is a JSON object"),
    ({"mapz": {}}, "schema.mapz", "unknown field 'mapz'"),
    ({"policy": "newest"}, "schema.policy", "is not one of latest, crdt, device, cloud"),
    ({"policy": "counter"}, "schema.policy", "'counter' is not supported"),
    ({"unknown": "deny"}, "schema.unknown", "unknown must be 'allow' or 'refuse'"),
    ({"maps": []}, "schema.maps", "maps is an object"),
    ({"maps": {"": {}}}, "schema.maps", "non-empty strings"),
    ({"maps": {"state": 1}}, "maps.state", "a map is an object"),
    ({"maps": {"state": {"key": {}}}}, "maps.state.key", "unknown field 'key'"),
    ({"maps": {"state": {"unknown": True}}}, "maps.state.unknown", "not true"),
    ({"maps": {"state": {"keys": []}}}, "maps.state.keys", "keys is an object"),
    ({"maps": {"state": {"keys": {"k" * 257: {}}}}}, "maps.state.keys", "at most 256"),
    ({"maps": {"s": {"keys": {"v": "number"}}}}, "maps.s.keys.v", "a key is an object"),
    ({"maps": {"s": {"keys": {"v": {"maximum": 1}}}}}, "maps.s.keys.v.maximum",
     "unknown field 'maximum'"),
    ({"maps": {"s": {"keys": {"v": {"type": "float"}}}}}, "maps.s.keys.v.type",
     "type \"float\" is not one of number, integer, string, bool, object, list"),
    ({"maps": {"s": {"keys": {"v": {"policy": "counter"}}}}}, "maps.s.keys.v.policy",
     "'counter' is not supported"),
    ({"maps": {"s": {"keys": {"v": {"type": "string", "min": 1}}}}}, "maps.s.keys.v.min",
     "min needs type number or integer"),
    ({"maps": {"s": {"keys": {"v": {"max": 1}}}}}, "maps.s.keys.v.max",
     "max needs type number or integer"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "min": "0"}}}}}, "maps.s.keys.v.min",
     "must be a finite number"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "max": True}}}}}, "maps.s.keys.v.max",
     "must be a finite number"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "max": float("inf")}}}}},
     "maps.s.keys.v.max", "must be a finite number"),
    ({"maps": {"s": {"keys": {"v": {"type": "integer", "max": 2**60}}}}},
     "maps.s.keys.v.max", "within +/-9007199254740991"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "min": 6, "max": 5}}}}},
     "maps.s.keys.v", "min 6 is above max 5"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "max_length": 3}}}}},
     "maps.s.keys.v.max_length", "max_length needs type string, list or object"),
    ({"maps": {"s": {"keys": {"v": {"max_length": 3}}}}},
     "maps.s.keys.v.max_length", "max_length needs type string, list or object"),
    ({"maps": {"s": {"keys": {"v": {"type": "string", "max_length": -1}}}}},
     "maps.s.keys.v.max_length", "an integer from 0"),
    ({"maps": {"s": {"keys": {"v": {"type": "list", "max_length": 1.5}}}}},
     "maps.s.keys.v.max_length", "an integer from 0"),
    ({"maps": {"s": {"keys": {"v": {"type": "list", "max_length": True}}}}},
     "maps.s.keys.v.max_length", "an integer from 0"),
    ({"maps": {"s": {"keys": {"v": {"enum": []}}}}}, "maps.s.keys.v.enum",
     "non-empty list"),
    ({"maps": {"s": {"keys": {"v": {"enum": "eco"}}}}}, "maps.s.keys.v.enum",
     "non-empty list"),
    ({"maps": {"s": {"keys": {"v": {"type": "string", "enum": ["a", 1]}}}}},
     "maps.s.keys.v.enum[1]", "1 does not conform: it must be a string, not an integer"),
    ({"maps": {"s": {"keys": {"v": {"type": "integer", "max": 3, "enum": [1, 4]}}}}},
     "maps.s.keys.v.enum[1]", "must be at most 3, not 4"),
    ({"maps": {"s": {"keys": {"v": {"enum": [1, 1.0]}}}}}, "maps.s.keys.v.enum",
     "enum repeats a value"),
    ({"maps": {"s": {"keys": {"v": {"enum": ["a", None]}}}}}, "maps.s.keys.v.enum[1]",
     "null is not a value"),
    ({"maps": {"s": {"keys": {"v": {"type": "bool", "default": 1}}}}},
     "maps.s.keys.v.default", "must be a bool, not an integer"),
    ({"maps": {"s": {"keys": {"v": {"type": "number", "max": 5, "default": 7}}}}},
     "maps.s.keys.v.default", "must be at most 5, not 7"),
    ({"maps": {"s": {"keys": {"v": {"enum": ["eco"], "default": "boost"}}}}},
     "maps.s.keys.v.default", "must be one of \"eco\", not \"boost\""),
    ({"maps": {"s": {"keys": {"v": {"default": None}}}}}, "maps.s.keys.v.default",
     "null is not a value"),
    ({"maps": {"s": {"keys": {"v": {"default": 2**60}}}}}, "maps.s.keys.v.default",
     "outside +/-9007199254740991"),
    ({"maps": {"s": {"keys": {"v": {"default": {"a": b"x"}}}}}}, "maps.s.keys.v.default",
     "bytes is not JSON data"),
    ({"maps": {"s\ud800": {}}}, "schema", "not valid Unicode"),
]


@pytest.mark.parametrize(("document", "where", "message"), BAD,
                         ids=[f"{i}:{w}" for i, (_, w, _) in enumerate(BAD)])
def test_bad_schemas_name_the_fault(document: Any, where: str, message: str) -> None:
    with pytest.raises(InvalidValue) as info:
        StateSchema(document)
    assert type(info.value) is InvalidValue  # 400 invalid_value, not a schema violation
    assert info.value.detail["where"] == where
    assert message in info.value.message, info.value.message
    assert info.value.message.startswith(where + ":")


def test_counter_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidValue) as info:
        StateSchema({"maps": {"state": {"policy": "counter"}}})
    assert info.value.detail["where"] == "maps.state.policy"
    assert COUNTER_REFUSED in info.value.message


def test_a_schema_over_the_size_limit_is_refused() -> None:
    keys = {f"key-{i:05}": {"type": "string", "enum": ["x" * 60]} for i in range(2000)}
    with pytest.raises(InvalidValue) as info:
        StateSchema({"maps": {"state": {"keys": keys}}})
    assert info.value.detail == {"where": "schema", "max_bytes": MAX_SCHEMA_BYTES}


def test_from_json_refuses_repeated_names_and_non_json() -> None:
    with pytest.raises(InvalidValue, match="repeated"):
        StateSchema.from_json('{"maps": {"state": {}, "state": {}}}')
    with pytest.raises(InvalidValue, match="not JSON"):
        StateSchema.from_json('{"maps": ')
    with pytest.raises(InvalidValue, match="not JSON"):
        StateSchema.from_json("[" * 100_000)


# --- canonical form and hash --------------------------------------------------------------


def test_the_hash_ignores_spelling_and_is_pinned(schema: StateSchema) -> None:
    respelled = {
        "maps": {"state": {"keys": {
            name: dict(reversed(rule.items())) for name, rule in
            reversed(EXAMPLE["maps"]["state"]["keys"].items())},
            "unknown": "refuse"}},  # the map's "latest" policy is the schema's default
    }
    respelled["maps"]["state"]["keys"]["voltage"]["max"] = 5.0
    respelled["maps"]["state"]["keys"]["count"]["policy"] = "latest"  # as its map's
    text = json.dumps(respelled, indent=4)
    assert StateSchema.from_json(text).hash == schema.hash
    assert StateSchema(json.loads(schema.canonical)).canonical == schema.canonical
    # Pinned: a change of the canonical form changes every fleet's version.
    assert StateSchema({"maps": {"state": {"keys": {"v": {"type": "number"}}}}}).version \
        == "c7b722797ec4032e"
    assert StateSchema.empty().canonical == b'{"maps":{},"policy":"latest","unknown":"allow"}'


@pytest.mark.parametrize("change", [
    {"unknown": "refuse"}, {"policy": "crdt"},
    {"maps": {"state": {"keys": {"v": {"type": "number", "max": 6}}}}},
    {"maps": {"state": {"keys": {"v": {"type": "integer", "max": 5}}}}},
    {"maps": {"state": {"keys": {"v": {"type": "number", "max": 5, "policy": "device"}}}}},
    {"maps": {"state": {"keys": {"w": {"type": "number", "max": 5}}}}},
])
def test_every_meaningful_change_changes_the_hash(change: dict[str, Any]) -> None:
    base = StateSchema({"maps": {"state": {"keys": {"v": {"type": "number", "max": 5}}}}})
    assert StateSchema({**{"maps": base.definition["maps"]}, **change}).hash != base.hash


def test_the_fleet_entry_round_trips_and_is_verified(schema: StateSchema) -> None:
    assert StateSchema.from_entry(schema.entry) == schema
    assert StateSchema.from_entry(None) == StateSchema.from_entry({}) == StateSchema.empty()
    assert StateSchema.from_entry({"hash": None, "json": None}).trivial
    with pytest.raises(InvalidValue, match="does not match its hash"):
        StateSchema.from_entry({**schema.entry, "hash": "0" * 16})
    with pytest.raises(InvalidValue, match="not JSON text"):
        StateSchema.from_entry({"hash": schema.version, "json": 5})


# --- checks -------------------------------------------------------------------------------


def test_values_that_conform_pass(schema: StateSchema) -> None:
    for key, value in [("voltage", 0), ("voltage", 5), ("voltage", 3.3), ("count", 7),
                       ("count", 7.0), ("tags", ["a", "b"]), ("tags", ()), ("label", "née"),
                       ("extra", {"a": 1}), ("on", True), ("level", "high"),
                       ("level", [1.0, 2]), ("note", {"any": "thing"})]:
        schema.check("state", key, value)
    schema.check("config", "anything", {"at": "all"})  # an unlisted map under "allow"


@pytest.mark.parametrize(("key", "value", "rule", "message"), [
    ("voltage", "high", "type", 'state.voltage must be a number, not a string ("high")'),
    ("voltage", True, "type", "state.voltage must be a number, not a bool (true)"),
    ("voltage", -0.5, "min", "state.voltage must be at least 0, not -0.5"),
    ("voltage", 5.01, "max", "state.voltage must be at most 5, not 5.01"),
    ("count", 1.5, "type", "state.count must be an integer, not a number (1.5)"),
    ("mode", "turbo", "enum", 'state.mode must be one of "eco", "boost", not "turbo"'),
    ("tags", ["a", "b", "c"], "max_length", "state.tags must have at most 2 items, not 3"),
    ("label", "néee", "max_length", "state.label must have at most 3 characters, not 4"),
    ("extra", {"a": 1, "b": 2}, "max_length", "state.extra must have at most 1 key, not 2"),
    ("on", 1, "type", "state.on must be a bool, not an integer (1)"),
    ("level", True, "enum", 'state.level must be one of 1, "high", [1,2], not true'),
    ("level", [2, 1], "enum", 'state.level must be one of 1, "high", [1,2], not [2,1]'),
    ("colour", "red", "unknown", "state.colour is not in the fleet's schema, which refuses "
                                 "keys of 'state' it does not list"),
])
def test_each_rule_refuses_with_a_message_and_the_rule(schema: StateSchema, key: str,
                                                       value: Any, rule: str,
                                                       message: str) -> None:
    exc = violation(schema, key, value)
    assert exc.detail["rule"] == rule
    assert exc.message == message


def test_deletes_are_always_allowed_by_value_rules(schema: StateSchema) -> None:
    schema.check("state", "colour", None)  # unknown, refused as a value
    schema.check("state", "voltage", "bad", deleted=True)
    StateSchema({"unknown": "refuse"}).check("other", "k", None, deleted=True)


def test_unknown_maps_follow_the_schema_default() -> None:
    closed = StateSchema({"unknown": "refuse", "maps": {
        "state": {"keys": {"v": {}}}, "open": {"unknown": "allow"}}})
    exc = violation(closed, "k", 1, map_name="config")
    assert exc.detail["rule"] == "unknown" and "map 'config' is not in" in exc.message
    violation(closed, "w", 1)  # a listed map inherits "refuse"
    closed.check("state", "v", {"anything": 1})
    closed.check("open", "anything", 1)


def test_writers_are_checked_before_values(schema: StateSchema) -> None:
    with pytest.raises(Forbidden) as info:
        schema.check_write("state", "mode", "eco", writer="device", doc="state")
    assert info.value.status == 403
    assert info.value.detail == {"map": "state", "key": "mode", "policy": "cloud",
                                 "schema": schema.version, "doc": "state"}
    assert info.value.message == ("state.mode is set by the cloud only (policy 'cloud'); "
                                  "the device cannot write it")
    with pytest.raises(Forbidden, match="reported by the device only"):
        schema.check_write("state", "voltage", 1, writer="cloud")
    with pytest.raises(Forbidden):  # a delete is a write too
        schema.check_write("state", "voltage", None, writer="cloud", deleted=True)
    with pytest.raises(Forbidden):  # even a value the key would refuse: the writer first
        schema.check_write("state", "mode", 42, writer="device")
    schema.check_write("state", "mode", "eco", writer="cloud")
    schema.check_write("state", "voltage", 1, writer="device")
    for writer in ("device", "cloud"):
        schema.check_write("state", "count", 1, writer=writer)
        schema.check_write("state", "note", "x", writer=writer)


def test_check_changes_reports_the_first_fault_in_sorted_order(schema: StateSchema) -> None:
    with pytest.raises(SchemaViolation) as info:
        schema.check_changes({"state": {"voltage": 9, "count": -1, "on": True}},
                             writer="device", doc="state")
    assert (info.value.detail["key"], info.value.detail["doc"]) == ("count", "state")
    schema.check_changes({"state": {"count": 4, "colour": None}}, writer="cloud")
    with pytest.raises(InvalidValue):  # mixed key types still give a typed error
        schema.check_changes({"state": {1: 2, "colour": 3}}, writer="device")  # type: ignore[dict-item]


def test_device_updates_are_checked_by_changes_and_stamped_values(schema: StateSchema
                                                                 ) -> None:
    ok = StampedWrite("state", "voltage", 1 << 16, 4)
    schema.check_device_update({"state": {"voltage": 4}}, [ok], doc="state")
    schema.check_device_update({}, None, doc="state")
    # Yjs may keep a conforming value where the device wrote one the schema refuses; the
    # stamped value is what "latest write wins" would put back: refused too.
    with pytest.raises(SchemaViolation) as info:
        schema.check_device_update({"state": {"voltage": 4}},
                                   [StampedWrite("state", "voltage", 2 << 16, 9)], doc="state")
    assert info.value.detail["rule"] == "max"
    with pytest.raises(Forbidden):
        schema.check_device_update({}, [StampedWrite("state", "mode", 1, None, True)],
                                   doc="state")
    with pytest.raises(Forbidden):
        schema.check_device_update({"state": {"mode": None}}, [], doc="state")


def test_defaults_are_fresh_copies() -> None:
    schema = StateSchema({"maps": {"state": {"keys": {"tags": {"default": ["a"]}}}}})
    first = schema.default("state", "tags")
    first.append("b")
    assert schema.default("state", "tags") == ["a"]
    assert schema.default("state", "other") is None
    assert schema.default("nomap", "tags") is None
    assert StateSchema(EXAMPLE).default("state", "on") is False


# --- the server's view of a fleet document ------------------------------------------------


class FakeDocs:
    """Only what ``FleetSchemas.current`` needs: nothing (it reads a Doc directly)."""


def test_fleet_schemas_parse_each_version_once(caplog: pytest.LogCaptureFixture) -> None:
    schemas = FleetSchemas(FakeDocs(), capacity=2)  # type: ignore[arg-type]
    doc: Doc[Any] = crdt.new_doc(1)
    assert schemas.current(doc).trivial and SCHEMA_MAP not in doc.keys()  # noqa: SIM118
    v1 = StateSchema(EXAMPLE)
    crdt.write(doc, SCHEMA_MAP, v1.entry)
    first = schemas.current(doc)
    assert first == v1 and schemas.current(doc) is first  # parsed once
    v2 = StateSchema({"unknown": "refuse"})
    crdt.write(doc, SCHEMA_MAP, v2.entry)
    assert schemas.current(doc) == v2
    crdt.write(doc, SCHEMA_MAP, {"hash": None, "json": None})
    assert schemas.current(doc).trivial
    crdt.write(doc, SCHEMA_MAP, {"hash": "00" * 8, "json": '{"maps": 1}'})
    with caplog.at_level(logging.ERROR, logger="crdtsync.server"):
        assert schemas.current(doc).trivial
        assert schemas.current(doc).trivial
    assert [r.message.count("not enforced") for r in caplog.records] == [1]  # logged once
