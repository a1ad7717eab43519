"""State schemas end to end (docs/protocol.md 15c): set per fleet through the API and the
CLI, delivered to devices in the fleet document, enforced by the device at assignment and
by the server on syncs and cloud writes, with typed errors; a real server on a real SQLite
file, real Device objects."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Map

from crdtsync import AdminClient, Device
from crdtsync.errors import (
    Forbidden,
    InvalidValue,
    MalformedRequest,
    NotFound,
    SchemaViolation,
    Unauthorized,
)
from crdtsync.schema import StateSchema
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory

SCHEMA: dict[str, Any] = {
    "maps": {"state": {
        "unknown": "refuse",
        "keys": {
            "voltage": {"type": "number", "min": 0, "max": 5, "default": 3.3,
                        "policy": "device"},
            "mode": {"type": "string", "enum": ["eco", "boost"], "policy": "cloud"},
            "note": {"policy": "crdt"},
            "count": {"type": "integer"},
        }},
        "config": {"unknown": "allow"}},
}


async def fleet_device(make_device: DeviceFactory, admin: AdminClient, device_id: str,
                       fleet: str = "sensors", **kwargs: Any) -> Device:
    """A started device assigned to ``fleet`` (created if needed), synced once."""
    if not any(f["id"] == fleet for f in (await admin.list_fleets())["fleets"]):
        await admin.add_fleet(fleet)
    dev = await make_device(device_id, **kwargs)
    await admin.set_fleet(device_id, fleet)
    await dev.sync()
    return dev


def write_directly(dev: Device, key: str, value: Any, map_name: str = "state") -> None:
    """A write made on ``dev.doc``, which the device does not check: what a client without
    the schema (or another implementation) sends."""
    root: Map[Any] = dev.doc.get(map_name, type=Map)
    if value is None:
        del root[key]
    else:
        root[key] = value


async def state_items(admin: AdminClient, device: str) -> list[dict[str, Any]]:
    items, _ = await admin.feed(device=device, kind="state")
    return items


# --- the API and the CLI ------------------------------------------------------------------


async def test_schema_api_round_trip(admin: AdminClient, server: Server) -> None:
    await admin.add_fleet("sensors")
    assert await admin.schema("sensors") == {"hash": None, "schema": None}
    put = await admin.put_schema("sensors", SCHEMA)
    v1 = StateSchema(SCHEMA)
    assert put == {"hash": v1.version, "schema": v1.definition}
    assert await admin.schema("sensors") == put
    assert await admin.put_schema("sensors", json.loads(v1.canonical)) == put  # same version
    v2 = await admin.put_schema("sensors", {"unknown": "refuse"})
    assert v2["hash"] != v1.version and (await admin.schema("sensors"))["hash"] == v2["hash"]
    assert await admin.schema_version(v1.version) == put  # every version kept by hash
    await admin.delete_schema("sensors")
    await admin.delete_schema("sensors")  # deleting nothing succeeds too
    assert await admin.schema("sensors") == {"hash": None, "schema": None}
    assert (await admin.schema_version(v2["hash"]))["schema"] == {
        "maps": {}, "policy": "latest", "unknown": "refuse"}
    with pytest.raises(NotFound):
        await admin.schema_version("0123456789abcdef")
    with pytest.raises(MalformedRequest):
        await admin.schema_version("not-a-hash")


async def test_bad_schemas_are_refused_with_where(admin: AdminClient, server: Server) -> None:
    await admin.add_fleet("sensors")
    bad = {"maps": {"state": {"keys": {"voltage": {"type": "number", "min": 6, "max": 5}}}}}
    with pytest.raises(InvalidValue) as info:
        await admin.put_schema("sensors", bad)
    assert info.value.code == "invalid_value"
    assert info.value.detail == {"where": "maps.state.keys.voltage"}
    with pytest.raises(MalformedRequest):
        await admin.request("PUT", "/v1/fleets/sensors/schema", json=["not", "an object"])
    with pytest.raises(NotFound):
        await admin.put_schema("no-such-fleet", SCHEMA)
    assert await admin.schema("sensors") == {"hash": None, "schema": None}  # nothing set
    async with AdminClient(server.url, "wrong-token") as intruder:
        with pytest.raises(Unauthorized):
            await intruder.put_schema("sensors", SCHEMA)
        with pytest.raises(Unauthorized):
            await intruder.schema("sensors")


async def run_cli(url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTSYNC_")}
    env.update(CRDTSYNC_URL=url, CRDTSYNC_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crdtsync.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_sets_shows_and_deletes_a_schema(admin: AdminClient, server: Server,
                                                   tmp_path: Path) -> None:
    await admin.add_fleet("sensors")
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    code, out, err = await run_cli(server.url, "schema", "set", "--fleet", "sensors", str(path))
    assert code == 0, err
    version = StateSchema(SCHEMA).version
    assert json.loads(out)["hash"] == version
    assert (await admin.schema("sensors"))["hash"] == version
    code, out, _ = await run_cli(server.url, "schema", "show", "--fleet", "sensors")
    assert (code, json.loads(out)["schema"]) == (0, StateSchema(SCHEMA).definition)
    code, out, _ = await run_cli(server.url, "schema", "delete", "--fleet", "sensors")
    assert (code, out) == (0, "")
    code, out, _ = await run_cli(server.url, "schema", "show", "--fleet", "sensors",
                                 "--version", version)
    assert (code, json.loads(out)["hash"]) == (0, version)
    assert (await admin.schema("sensors"))["hash"] is None
    path.write_text('{"policy": "counter"}')
    code, out, err = await run_cli(server.url, "schema", "set", "--fleet", "sensors", str(path))
    assert (code, out) == (1, "")
    assert err.startswith("error: invalid_value: schema.policy: policy 'counter' is not")
    code, _, err = await run_cli(server.url, "schema", "set", "--fleet", "sensors",
                                 str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


# --- delivery and the device's checks -----------------------------------------------------


async def test_a_schema_reaches_the_device_and_is_checked_at_assignment(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    version = (await admin.put_schema("sensors", SCHEMA))["hash"]
    assert dev.schema.trivial  # not synced yet
    await dev.sync()
    assert dev.schema.version == version
    assert dev.fleet("schema")["hash"] == version
    with pytest.raises(SchemaViolation) as info:
        dev.state["voltage"] = 7
    assert info.value.detail["map"] == "state" and info.value.detail["key"] == "voltage"
    assert info.value.message == "state.voltage must be at most 5, not 7"
    with pytest.raises(Forbidden) as forbidden:
        dev.state["mode"] = "eco"
    assert forbidden.value.detail["policy"] == "cloud"
    with pytest.raises(SchemaViolation):  # one bad key refuses the whole update
        dev.state.update({"count": 1, "colour": "red"})
    assert "voltage" not in dev.state and dev.state["voltage"] == 3.3  # the default
    assert dev.state.get("voltage") == 3.3 and dev.state.to_dict() == {}
    with pytest.raises(KeyError):
        dev.state["count"]  # no default
    dev.state["voltage"] = 4.5
    dev.state["count"] = 2
    dev.map("config")["anything"] = {"goes": True}  # unknown: allow
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"voltage": 4.5, "count": 2}
    await admin.patch_state("d1", {"mode": "boost"})
    await dev.sync()
    assert dev.state["mode"] == "boost"
    with pytest.raises(Forbidden):
        del dev.state["mode"]
    assert dev.state["mode"] == "boost"


async def test_no_schema_means_everything_as_before(make_device: DeviceFactory,
                                                    admin: AdminClient) -> None:
    loose = await fleet_device(make_device, admin, "in-fleet")
    alone = await make_device("no-fleet")
    for dev in (loose, alone):
        assert dev.schema.trivial
        dev.state.update({"voltage": 99, "mode": "turbo", "colour": [1]})
        await dev.sync()
        await admin.patch_state(dev.id, {"voltage": -1})
        await dev.sync()
        assert dev.state.to_dict() == {"voltage": -1, "mode": "turbo", "colour": [1]}
    # A schema on another fleet changes nothing for them.
    await admin.add_fleet("strict")
    await admin.put_schema("strict", {"unknown": "refuse"})
    await admin.patch_state("no-fleet", {"more": 1})
    alone.state["again"] = 2
    await alone.sync()
    assert (await admin.state("no-fleet"))["state"]["again"] == 2


async def test_schema_changes_and_deletion_reach_the_device(make_device: DeviceFactory,
                                                            admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await admin.put_schema("sensors", SCHEMA)
    await dev.sync()
    with pytest.raises(SchemaViolation):
        dev.state["colour"] = "red"
    relaxed = {"maps": {"state": {"keys": SCHEMA["maps"]["state"]["keys"]}}}
    await admin.put_schema("sensors", relaxed)
    with pytest.raises(SchemaViolation):
        dev.state["colour"] = "red"  # the device still holds the old version
    await dev.sync()
    assert dev.schema == StateSchema(relaxed)
    dev.state["colour"] = "red"
    with pytest.raises(SchemaViolation):
        dev.state["voltage"] = 6  # its rules still hold
    await admin.delete_schema("sensors")
    await dev.sync()
    assert dev.schema.trivial
    dev.state["voltage"] = 6
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"colour": "red", "voltage": 6}


async def test_moving_a_device_to_another_fleet_changes_its_schema(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await admin.put_schema("sensors", SCHEMA)
    await admin.add_fleet("free")
    await dev.sync()
    with pytest.raises(SchemaViolation):
        dev.state["voltage"] = 9
    await admin.set_fleet("d1", "free")
    await admin.patch_state("d1", {"voltage": 9})  # the cloud checks the new fleet's at once
    await dev.sync()
    assert dev.schema.trivial and dev.state["voltage"] == 9


# --- the server's checks ------------------------------------------------------------------


async def test_the_server_refuses_a_device_update_that_breaks_the_schema(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await admin.put_schema("sensors", SCHEMA)
    await dev.sync()
    dev.state["voltage"] = 1
    await dev.sync()
    before, items = await admin.state("d1"), await state_items(admin, "d1")
    write_directly(dev, "voltage", 9)
    write_directly(dev, "count", 5)
    with pytest.raises(SchemaViolation) as info:
        await dev.sync()
    assert info.value.status == 422
    assert info.value.detail == {"doc": "state", "map": "state", "key": "voltage",
                                 "rule": "max", "schema": StateSchema(SCHEMA).version}
    assert await admin.state("d1") == before  # nothing applied, "count" included
    assert await state_items(admin, "d1") == items  # nothing in the feed
    # The device repairs by writing a value that conforms: the refused one is overwritten.
    dev.state["voltage"] = 2
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"voltage": 2, "count": 5}


async def test_the_server_refuses_a_device_write_of_a_cloud_key(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await admin.put_schema("sensors", SCHEMA)
    await dev.sync()
    write_directly(dev, "mode", "eco")
    write_directly(dev, "count", 1)
    with pytest.raises(Forbidden) as info:
        await dev.sync()
    assert info.value.status == 403
    assert info.value.detail == {"doc": "state", "map": "state", "key": "mode",
                                 "policy": "cloud", "schema": StateSchema(SCHEMA).version}
    assert (await admin.state("d1"))["state"] == {}
    other = await fleet_device(make_device, admin, "d2")
    write_directly(other, "colour", "red")  # unknown key, map refuses
    with pytest.raises(SchemaViolation) as unknown:
        await other.sync()
    assert (unknown.value.detail["key"], unknown.value.detail["rule"]) == ("colour", "unknown")


async def test_cloud_writes_are_checked(make_device: DeviceFactory,
                                        admin: AdminClient) -> None:
    dev = await fleet_device(make_device, admin, "d1")
    await admin.put_schema("sensors", SCHEMA)
    dev.state["voltage"] = 1
    await dev.sync()
    with pytest.raises(Forbidden) as info:
        await admin.patch_state("d1", {"voltage": 2, "mode": "eco"})
    assert info.value.status == 403
    assert info.value.detail == {"doc": "state", "map": "state", "key": "voltage",
                                 "policy": "device", "schema": StateSchema(SCHEMA).version}
    with pytest.raises(Forbidden):
        await admin.patch_state("d1", {"voltage": None})  # deleting is writing
    with pytest.raises(SchemaViolation) as bad:
        await admin.patch_state("d1", {"mode": "turbo"})
    assert bad.value.status == 422
    assert (bad.value.detail["key"], bad.value.detail["rule"]) == ("mode", "enum")
    assert "state.mode must be one of" in bad.value.message
    with pytest.raises(SchemaViolation):
        await admin.patch_state("d1", {"mode": "eco", "colour": "red"})
    assert (await admin.state("d1"))["state"] == {"voltage": 1}  # nothing written
    assert await admin.patch_state("d1", {"mode": "eco", "count": 3}) == {
        "voltage": 1, "mode": "eco", "count": 3}
    await admin.put_schema("sensors", {"unknown": "refuse"})
    with pytest.raises(SchemaViolation) as env:
        await admin.request("PATCH", "/v1/devices/d1/env", json={"LEVEL": "debug"})
    assert env.value.detail["map"] == "env"


async def test_several_server_processes_follow_the_fleet_document(
        admin: AdminClient, server_config: ServerConfig, tmp_path: Path) -> None:
    """The fleet document is the source of truth: a process that cached it before another
    process set the schema enforces the new schema at its next sync of a fleet device."""
    async with Server(ServerConfig(db=server_config.db, port=0,
                                   admin_token=ADMIN_TOKEN)) as second, \
            AdminClient(second.url, ADMIN_TOKEN) as admin2:
        token = (await admin.add_device("d1"))["token"]
        await admin.add_fleet("sensors")
        await admin.set_fleet("d1", "sensors")
        dev = Device("d1", second.url, token=token, path=tmp_path / "d1.db",
                     interval=None)
        async with dev:
            dev.state["voltage"] = 9
            await dev.sync()  # the second process caches the fleet document, no schema
            await admin.put_schema("sensors", SCHEMA)  # through the first process
            write_directly(dev, "voltage", 8)
            with pytest.raises(SchemaViolation):
                await dev.sync()
            with pytest.raises(Forbidden):
                await admin2.patch_state("d1", {"voltage": 1})
            await admin.delete_schema("sensors")
            await dev.sync()
            assert (await admin2.state("d1"))["state"] == {"voltage": 8}
