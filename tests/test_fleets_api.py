"""Fleets through the management API and the ``crdtsync fleet`` commands, end to end against
a real server on loopback over a real SQLite file."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient
from crdtsync.cli import main
from crdtsync.errors import AlreadyExists, MalformedRequest, NotFound
from crdtsync_server import Server

from .conftest import ADMIN_TOKEN

NO_BODY = object()


async def call(server: Server, method: str, path: str, body: Any = NO_BODY,
               token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    """One raw request; returns ``(status, decoded JSON body)``."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    kwargs: dict[str, Any] = {} if body is NO_BODY else {"json": body}
    async with aiohttp.ClientSession(headers=headers) as session, \
            session.request(method, server.url + path, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def code(answer: tuple[int, Any]) -> tuple[int, str]:
    status, data = answer
    return status, data["error"]["code"]


# --- fleets -----------------------------------------------------------------------------------


async def test_create_get_and_list_fleets(server: Server, admin: AdminClient) -> None:
    created = await admin.add_fleet("north", {"region": "eu", "tags": ["a"]})
    assert created["id"] == "north" and created["meta"] == {"region": "eu", "tags": ["a"]}
    assert isinstance(created["created"], int) and created["created"] > 1_700_000_000_000
    assert await admin.fleet("north") == created
    status, data = await call(server, "POST", "/v1/fleets", {"id": "south"})
    assert (status, data["id"], data["meta"]) == (201, "south", {})

    for name in ["c", "a", "b"]:
        await admin.add_fleet(f"f-{name}")
    first = await admin.list_fleets(limit=2)
    assert [f["id"] for f in first["fleets"]] == ["f-a", "f-b"] and first["next"] == "f-b"
    rest = await admin.list_fleets(after=first["next"], limit=10)
    assert [f["id"] for f in rest["fleets"]] == ["f-c", "north", "south"]
    assert rest["next"] is None
    assert rest["fleets"][1] == created


async def test_duplicate_fleet_is_409_already_exists(server: Server, admin: AdminClient
                                                     ) -> None:
    await admin.add_fleet("north", {"v": 1})
    answer = await call(server, "POST", "/v1/fleets", {"id": "north", "meta": {"v": 2}})
    assert code(answer) == (409, "already_exists")
    assert answer[1]["error"]["detail"] == {"fleet": "north"}
    with pytest.raises(AlreadyExists):
        await admin.add_fleet("north")
    assert (await admin.fleet("north"))["meta"] == {"v": 1}


@pytest.mark.parametrize("body", [
    {"id": "bad id"}, {"id": ""}, {"id": "x" * 65}, {"id": 7}, {"meta": {}},
    {"id": "ok", "meta": [1]}, ["ok"], None,
])
async def test_bad_fleet_is_400(server: Server, admin: AdminClient, body: Any) -> None:
    assert code(await call(server, "POST", "/v1/fleets", body)) == (400, "malformed_request")
    assert (await admin.list_fleets())["fleets"] == []


async def test_unknown_fleet_is_404_and_bad_fleet_id_400(server: Server) -> None:
    for path in ["/v1/fleets/nope", "/v1/fleets/nope/devices"]:
        answer = await call(server, "GET", path)
        assert code(answer) == (404, "not_found")
        assert answer[1]["error"]["detail"] == {"fleet": "nope"}
    assert code(await call(server, "GET", "/v1/fleets/bad%20id")) == (400, "malformed_request")
    assert code(await call(server, "GET", "/v1/fleets?limit=0")) == (400, "malformed_request")


# --- assignment -------------------------------------------------------------------------------


async def test_assign_reassign_and_unassign(admin: AdminClient) -> None:
    await admin.add_fleet("north")
    await admin.add_fleet("south")
    await admin.add_device("d1", {"site": "x"})
    steps = [("north", 1), ("north", 1), ("south", 2), (None, 3), (None, 3), ("north", 4)]
    for fleet, gen in steps:
        device = await admin.set_fleet("d1", fleet)
        assert (device["id"], device["fleet"], device["fleet_gen"]) == ("d1", fleet, gen)
        assert device["meta"] == {"site": "x"} and device["last_seq"] == 0
        assert "token" not in device and "token_hash" not in device


async def test_assign_unknown_fleet_or_device_is_404(server: Server, admin: AdminClient) -> None:
    await admin.add_fleet("north")
    await admin.add_device("d1")
    await admin.set_fleet("d1", "north")
    answer = await call(server, "PUT", "/v1/devices/d1/fleet", {"fleet": "nope"})
    assert code(answer) == (404, "not_found")
    assert answer[1]["error"]["detail"] == {"fleet": "nope"}
    answer = await call(server, "PUT", "/v1/devices/ghost/fleet", {"fleet": "north"})
    assert code(answer) == (404, "not_found")
    assert answer[1]["error"]["detail"] == {"device": "ghost"}
    with pytest.raises(NotFound):
        await admin.set_fleet("ghost", None)
    devices = await admin.fleet_devices("north")
    assert [(d["id"], d["fleet_gen"]) for d in devices["devices"]] == [("d1", 1)]


@pytest.mark.parametrize("body", [{}, {"fleet": 5}, {"fleet": "bad id"}, {"fleet": ""},
                                  {"fleet": ["north"]}, "north", None])
async def test_bad_assignment_is_400(server: Server, admin: AdminClient, body: Any) -> None:
    await admin.add_fleet("north")
    await admin.add_device("d1")
    answer = await call(server, "PUT", "/v1/devices/d1/fleet", body)
    assert code(answer) == (400, "malformed_request")
    answer = await call(server, "PUT", "/v1/devices/bad%20id/fleet", {"fleet": "north"})
    assert code(answer) == (400, "malformed_request")
    assert (await admin.fleet_devices("north"))["devices"] == []


async def test_list_devices_of_a_fleet(admin: AdminClient) -> None:
    await admin.add_fleet("north")
    await admin.add_fleet("south")
    for name in ["d3", "d1", "d5", "d2", "d4", "other"]:
        await admin.add_device(name)
    for name in ["d3", "d1", "d5", "d4"]:
        await admin.set_fleet(name, "north")
    await admin.set_fleet("d2", "south")
    first = await admin.fleet_devices("north", limit=2)
    assert [d["id"] for d in first["devices"]] == ["d1", "d3"] and first["next"] == "d3"
    assert all((d["fleet"], d["fleet_gen"]) == ("north", 1) for d in first["devices"])
    rest = await admin.fleet_devices("north", after="d3", limit=2)
    assert [d["id"] for d in rest["devices"]] == ["d4", "d5"] and rest["next"] == "d5"
    assert (await admin.fleet_devices("north", after="d5"))["devices"] == []
    assert [d["id"] for d in (await admin.fleet_devices("south"))["devices"]] == ["d2"]

    await admin.set_fleet("d3", None)
    assert [d["id"] for d in (await admin.fleet_devices("north"))["devices"]] == [
        "d1", "d4", "d5"]


# --- auth -------------------------------------------------------------------------------------


ROUTES = [("POST", "/v1/fleets", {"id": "north"}), ("GET", "/v1/fleets", NO_BODY),
          ("GET", "/v1/fleets/north", NO_BODY), ("GET", "/v1/fleets/north/devices", NO_BODY),
          ("PUT", "/v1/devices/d1/fleet", {"fleet": None})]


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_every_fleet_route_needs_the_admin_token(server: Server, admin: AdminClient,
                                                       token: str | None) -> None:
    await admin.add_fleet("north")
    await admin.add_device("d1")
    await admin.set_fleet("d1", "north")
    for method, path, body in ROUTES:
        answer = await call(server, method, path, body, token=token)
        assert code(answer) == (401, "unauthorized"), (method, path)
    device = (await admin.fleet_devices("north"))["devices"]
    assert [(d["id"], d["fleet_gen"]) for d in device] == [("d1", 1)]


# --- the crdtsync fleet commands --------------------------------------------------------------


async def run_cli(server: Server, *args: str) -> int:
    """``crdtsync ARGS --url ... --admin-token ...`` in-process; ``main`` runs its own event
    loop, so it runs in a thread while this loop serves."""
    argv = [*args, "--url", server.url, "--admin-token", ADMIN_TOKEN]
    return await asyncio.to_thread(main, argv)


async def test_cli_fleet_commands(server: Server, admin: AdminClient,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    await admin.add_device("d1")
    assert await run_cli(server, "fleet", "add", "north", "--meta", '{"region": "eu"}') == 0
    created = json.loads(capsys.readouterr().out)
    assert (created["id"], created["meta"]) == ("north", {"region": "eu"})
    assert await run_cli(server, "fleet", "add", "south") == 0
    capsys.readouterr()

    assert await run_cli(server, "fleet", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "META"]
    assert [line.split()[0] for line in lines[1:]] == ["north", "south"]
    assert lines[1].split()[-1] == '{"region":"eu"}'

    assert await run_cli(server, "fleet", "show", "north") == 0
    assert json.loads(capsys.readouterr().out) == created

    assert await run_cli(server, "fleet", "assign", "d1", "north") == 0
    device = json.loads(capsys.readouterr().out)
    assert (device["id"], device["fleet"], device["fleet_gen"]) == ("d1", "north", 1)
    assert await run_cli(server, "fleet", "devices", "north") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ID", "FLEET"], ["d1", "1"]]

    assert await run_cli(server, "fleet", "assign", "d1", "--none") == 0
    device = json.loads(capsys.readouterr().out)
    assert (device["fleet"], device["fleet_gen"]) == (None, 2)
    assert (await admin.fleet_devices("north"))["devices"] == []


async def test_cli_fleet_errors(server: Server, admin: AdminClient,
                                capsys: pytest.CaptureFixture[str]) -> None:
    await admin.add_device("d1")
    await admin.add_fleet("north")
    assert await run_cli(server, "fleet", "add", "north") == 1
    assert "error: already_exists:" in capsys.readouterr().err
    assert await run_cli(server, "fleet", "assign", "d1", "nope") == 1
    assert "error: not_found:" in capsys.readouterr().err
    assert await run_cli(server, "fleet", "show", "nope") == 1
    assert "error: not_found:" in capsys.readouterr().err
    for args in (["d1"], ["d1", "north", "--none"]):
        assert await run_cli(server, "fleet", "assign", *args) == 2
        assert "give either FLEET or --none" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        await run_cli(server, "fleet", "add", "x", "--meta", "[1]")
    assert info.value.code == 2
    assert (await admin.list_fleets())["fleets"] == [await admin.fleet("north")]
    assert (await admin.device("d1"))["id"] == "d1"


async def test_client_validates_nothing_the_server_refuses(admin: AdminClient) -> None:
    """The client sends what it is given; the server is the one place that validates."""
    with pytest.raises(MalformedRequest):
        await admin.add_fleet("bad id")
    with pytest.raises(MalformedRequest):
        await admin.set_fleet("d1", "bad id")


async def test_cli_env_and_template_commands(server: Server, admin: AdminClient,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    await admin.add_fleet("north")
    await admin.add_device("d1", fleet="north")
    assert await run_cli(server, "env", "set", "UNIT=C", "SAMPLE=60") == 0
    assert await run_cli(server, "env", "set", "--fleet", "north", "SAMPLE=30") == 0
    assert await run_cli(server, "env", "set", "--device", "d1", "LED=on") == 0
    capsys.readouterr()
    assert await run_cli(server, "env", "show", "--device", "d1") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"env": {"UNIT": "C", "SAMPLE": 30, "LED": "on"},
                     "source": {"UNIT": "project", "SAMPLE": "fleet", "LED": "device"}}
    assert await run_cli(server, "env", "set", "UNIT=null") == 0
    assert await admin.request("GET", "/v1/env") == {"SAMPLE": 60}
    assert await run_cli(server, "env", "show", "--device", "d1", "--fleet", "north") == 2

    assert await run_cli(server, "template", "north", "readings",
                         '{"temp": "float32", "hum": 21}') == 0
    capsys.readouterr()
    assert await run_cli(server, "template", "north") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["readings"]["def"] == {"temp": "float32", "hum": "uint8"}
    assert await run_cli(server, "template", "north", "readings", "not json") == 2
    assert await run_cli(server, "template", "north", "readings", '{"a": "int99"}') == 1
    assert await run_cli(server, "template", "north", "readings", "--delete") == 0
    assert await admin.request("GET", "/v1/fleets/north/templates") == {}
