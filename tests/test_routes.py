"""Routes and the executor of proxied requests, against a real target server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from crdtsync import AdminClient
from crdtsync.errors import ClosedError, MalformedRequest, NotFound
from crdtsync_server import Server
from crdtsync_server.proxied.dispatch import load_route_table
from crdtsync_server.proxied.executor import RouteExecutor
from crdtsync_server.proxied.routes import (
    Route,
    RouteOutcome,
    RouteTable,
    load_routes_file,
)

from .conftest import local_app

SECRET = "s3cr3t-key"
CAP = 100_000


@dataclass
class Target:
    """A real HTTP server the routes point at; records what reached it."""

    url: str = ""
    calls: Counter[str] = field(default_factory=Counter)
    fail_times: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    big_closed: asyncio.Event = field(default_factory=asyncio.Event)
    big_sent: int = 0

    def route(self, path: str, **kwargs: Any) -> Route:
        return Route(alias=kwargs.pop("alias", "r1"), url=self.url + path, **kwargs)


def target_app(t: Target) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        t.calls["echo"] += 1
        body = await request.json() if request.can_read_body else None
        return web.json_response({"method": request.method, "json": body,
                                  "query": dict(request.query),
                                  "key": request.headers.get("X-Api-Key"),
                                  "type": request.headers.get("Content-Type")})

    async def slow(request: web.Request) -> web.Response:
        t.calls["slow"] += 1
        await asyncio.wait_for(t.release.wait(), 10)
        return web.Response(text="late")

    async def flaky(request: web.Request) -> web.Response:
        t.calls["flaky"] += 1
        if t.calls["flaky"] <= t.fail_times:
            return web.Response(status=503, text="busy")
        return web.json_response({"n": t.calls["flaky"]})

    async def missing(request: web.Request) -> web.Response:
        t.calls["missing"] += 1
        return web.json_response({"why": "no such city"}, status=404)

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.query["n"]), content_type="text/plain")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)  # chunked: no Content-Length to refuse up front
        try:
            while t.big_sent < 256 * 1024 * 1024:
                await response.write(b"y" * 65536)
                t.big_sent += 65536
        except ConnectionError:
            t.big_closed.set()
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/landing")

    async def landing(request: web.Request) -> web.Response:
        t.calls["landing"] += 1
        return web.Response(text="landed")

    async def query(request: web.Request) -> web.Response:
        return web.json_response({"query_string": request.query_string})

    async def hook(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "query": dict(request.query),
                                  "key": request.headers.get("X-Api-Key"),
                                  "accept": request.headers.get("Accept")})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="hello, Oslo", content_type="text/plain")

    async def bad_json(request: web.Request) -> web.Response:
        return web.Response(text='{"n": NaN}', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/slow", slow)
    app.router.add_post("/flaky", flaky)
    app.router.add_post("/missing", missing)
    app.router.add_get("/sized", sized)
    app.router.add_get("/big", big)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/landing", landing)
    app.router.add_get("/text", text)
    app.router.add_get("/hook/{secret}", hook)
    app.router.add_route("*", "/query", query)
    app.router.add_get("/bad-json", bad_json)
    return app


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    async with local_app(target_app(t), shutdown_timeout=1) as url:
        t.url = url
        yield t
        t.release.set()


@pytest.fixture
async def executor() -> AsyncIterator[RouteExecutor]:
    async with RouteExecutor() as ex:
        yield ex


# --- performing requests ---------------------------------------------------------------

async def test_post_sends_json_and_secret_header(target: Target, executor: RouteExecutor
                                                 ) -> None:
    route = target.route("/echo", headers={"X-Api-Key": SECRET})
    out = await executor.perform(route, "d1", {"city": "Oslo", "n": [1, 2]})
    assert out == RouteOutcome(True, 200, {"method": "POST", "json": {"city": "Oslo", "n": [1, 2]},
                                      "query": {}, "key": SECRET, "type": "application/json"},
                          None, "target answered 200", 1)


async def test_get_sends_payload_as_query(target: Target, executor: RouteExecutor) -> None:
    route = target.route("/echo", method="GET", headers={"X-Api-Key": SECRET})
    out = await executor.perform(route, "d1", {"city": "Oslo", "days": 3, "metric": True})
    assert out.ok
    assert out.body["query"] == {"city": "Oslo", "days": "3", "metric": "true"}
    assert out.body["json"] is None and out.body["key"] == SECRET


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_route_query_parameters_win_over_the_payload(
        target: Target, executor: RouteExecutor, method: str) -> None:
    """The admin's ``?account=alice`` is sent once, whatever the device's payload says;
    the payload's other keys are added."""
    route = target.route("/query?account=alice&scope=", method=method)
    out = await executor.perform(route, "d1", {"account": "bob", "scope": "all", "n": 2})
    assert out.ok
    assert out.body["query_string"] == "account=alice&scope=&n=2"


@pytest.mark.parametrize("payload", [{"city": {"name": "Oslo"}}, ["Oslo"], {"n": None},
                                     {"x": float("nan")}])
async def test_get_refuses_payload_that_is_not_flat(target: Target, executor: RouteExecutor,
                                                    payload: Any) -> None:
    out = await executor.perform(target.route("/echo", method="GET"), "d1", payload)
    assert (out.ok, out.error, out.attempts) == (False, "route_bad_payload", 0)
    assert target.calls["echo"] == 0


async def test_timeout_is_retried_then_reported(target: Target, executor: RouteExecutor
                                                ) -> None:
    route = target.route("/slow", method="GET", timeout=0.2, retries=1, retry_backoff=0.01)
    out = await executor.perform(route, "d1", None)  # the target holds its answer 10 s
    assert (out.ok, out.error, out.status, out.attempts) == (False, "route_timeout", None, 2)
    assert target.calls["slow"] == 2


async def test_5xx_is_retried_until_success(target: Target, executor: RouteExecutor) -> None:
    target.fail_times = 2
    out = await executor.perform(target.route("/flaky", retries=3, retry_backoff=0.01), "d1",
                                 {})
    assert (out.ok, out.status, out.body, out.attempts) == (True, 200, {"n": 3}, 3)


async def test_5xx_after_all_retries_is_http_error(target: Target, executor: RouteExecutor
                                                   ) -> None:
    target.fail_times = 5
    out = await executor.perform(target.route("/flaky", retries=1, retry_backoff=0.01), "d1",
                                 {})
    assert (out.error, out.status, out.body, out.attempts) == ("route_http_error", 503,
                                                              "busy", 2)
    assert target.calls["flaky"] == 2


async def test_4xx_is_not_retried(target: Target, executor: RouteExecutor) -> None:
    out = await executor.perform(target.route("/missing", retries=3, retry_backoff=0.01),
                                 "d1", {})
    assert (out.ok, out.error, out.status, out.attempts) == (False, "route_http_error", 404, 1)
    assert out.body == {"why": "no such city"}
    assert target.calls["missing"] == 1


async def test_body_at_the_cap_is_read_and_one_byte_more_is_refused(
        target: Target, executor: RouteExecutor) -> None:
    route = target.route("/sized", method="GET", max_response=CAP)
    at_cap = await executor.perform(route, "d1", {"n": CAP})
    assert at_cap.ok and at_cap.body == "x" * CAP
    over = await executor.perform(route, "d1", {"n": CAP + 1})
    assert (over.ok, over.error, over.status, over.body) == (
        False, "route_response_too_large", 200, None)


async def test_endless_body_stops_reading_at_the_cap(target: Target, executor: RouteExecutor
                                                     ) -> None:
    route = target.route("/big", method="GET", max_response=CAP, retries=2)
    out = await executor.perform(route, "d1", None)
    assert (out.error, out.attempts) == ("route_response_too_large", 1)
    # The executor dropped the connection: the target's writes fail long before 256 MiB.
    await asyncio.wait_for(target.big_closed.wait(), 10)
    assert target.big_sent < 64 * 1024 * 1024


async def test_redirect_is_not_followed(target: Target, executor: RouteExecutor) -> None:
    out = await executor.perform(target.route("/redirect", method="GET", retries=2), "d1", None)
    assert (out.ok, out.error, out.status, out.attempts) == (False, "route_http_error", 302, 1)
    assert "not followed" in out.message
    assert target.calls["landing"] == 0


@pytest.mark.parametrize(("path", "body"), [("/text", "hello, Oslo"),
                                            ("/bad-json", '{"n": NaN}')])
async def test_non_json_body_is_text(target: Target, executor: RouteExecutor, path: str,
                                     body: str) -> None:
    out = await executor.perform(target.route(path, method="GET"), "d1", None)
    assert (out.ok, out.body) == (True, body)


async def test_closed_port_is_unreachable(executor: RouteExecutor) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    route = Route("r1", f"http://127.0.0.1:{port}/x", retries=1, retry_backoff=0.01)
    out = await executor.perform(route, "d1", {})
    assert (out.ok, out.error, out.status, out.attempts) == (False, "route_unreachable", None, 2)
    assert str(port) not in out.message  # the device learns no address


async def test_device_not_listed_is_not_allowed(target: Target, executor: RouteExecutor
                                                ) -> None:
    route = target.route("/echo", devices=("d1",))
    assert route.allows("d1") and not route.allows("d2")
    out = await executor.perform(route, "d2", {})
    assert (out.ok, out.error, out.attempts) == (False, "route_not_allowed", 0)
    assert target.calls["echo"] == 0
    assert (await executor.perform(route, "d1", {})).ok


async def test_unknown_alias(target: Target, executor: RouteExecutor) -> None:
    table = RouteTable([target.route("/echo", alias="weather")])
    assert (await executor.perform_alias(table, "weather", "d1", {})).ok
    out = await executor.perform_alias(table, "nope", "d1", {})
    assert (out.ok, out.error) == (False, "unknown_route")


async def test_executor_lifecycle(target: Target) -> None:
    executor = RouteExecutor()
    route = target.route("/echo")
    with pytest.raises(ClosedError, match="not started"):
        await executor.perform(route, "d1", {})
    async with executor:
        assert (await executor.perform(route, "d1", {})).ok
    with pytest.raises(ClosedError, match="closed"):
        await executor.perform(route, "d1", {})
    with pytest.raises(ClosedError):
        await executor.start()


def test_outcome_json_round_trip() -> None:
    out = RouteOutcome(False, 503, "busy", "route_http_error", "target answered 503", 2)
    wire = out.to_json()
    assert wire == {"ok": False, "status": 503, "body": "busy", "error": "route_http_error",
                    "message": "target answered 503", "attempts": 2}
    assert RouteOutcome.from_json(json.loads(json.dumps(wire))) == out
    with pytest.raises(MalformedRequest):
        RouteOutcome.from_json({"ok": True})


# --- route validation ------------------------------------------------------------------

GOOD = {"url": "https://api.example.com/v1/weather"}


@pytest.mark.parametrize(("alias", "obj", "bad_field"), [
    ("r", {"url": "file:///etc/passwd"}, "url"),
    ("r", {"url": "ftp://example.com/x"}, "url"),
    ("r", {"url": "http:///path"}, "url"),
    ("r", {"url": "example.com/x"}, "url"),
    ("r", {"url": "http://user:pw@example.com/"}, "url"),
    ("r", {"url": "http://example.com:99999/"}, "url"),
    ("r", {"url": 5}, "url"),
    ("r", {}, "url"),
    ("r", {**GOOD, "proxy": "x"}, "proxy"),
    ("r", {**GOOD, "timeout": 0}, "timeout"),
    ("r", {**GOOD, "timeout": 121}, "timeout"),
    ("r", {**GOOD, "timeout": "10"}, "timeout"),
    ("r", {**GOOD, "method": "TRACE"}, "method"),
    ("r", {**GOOD, "max_response": 16 * 1024 * 1024 + 1}, "max_response"),
    ("r", {**GOOD, "retries": 6}, "retries"),
    ("r", {**GOOD, "retries": True}, "retries"),
    ("r", {**GOOD, "retry_backoff": -1}, "retry_backoff"),
    ("r", {**GOOD, "headers": {"X-Key": 5}}, "headers.X-Key"),
    ("r", {**GOOD, "headers": {"X-Key": "a\r\nHost: evil"}}, "headers.X-Key"),
    ("r", {**GOOD, "headers": {"Bad Name": "v"}}, "headers"),
    ("r", {**GOOD, "devices": "d1"}, "devices"),
    ("r", {**GOOD, "devices": ["d 1"]}, "devices"),
    ("bad alias", GOOD, "alias"),
    ("", GOOD, "alias"),
    ("r", ["not", "an", "object"], "route"),
])
def test_route_validation(alias: str, obj: Any, bad_field: str) -> None:
    with pytest.raises(MalformedRequest) as info:
        Route.from_json(alias, obj)
    assert info.value.detail == {"route": alias, "field": bad_field}
    assert repr(alias) in info.value.message


def test_route_defaults_and_json_round_trip() -> None:
    route = Route.from_json("weather", {**GOOD, "headers": {"X-Api-Key": SECRET},
                                        "devices": ["d1", "d2"], "timeout": 5})
    assert (route.method, route.timeout, route.max_response, route.retries,
            route.retry_backoff) == ("POST", 5.0, 1024 * 1024, 0, 0.5)
    assert route.devices == ("d1", "d2")
    assert Route.from_json("weather", json.loads(json.dumps(route.to_json(redact=False)))
                           ) == route
    with pytest.raises(TypeError):
        route.headers["X-Api-Key"] = "changed"  # type: ignore[index]


def test_to_json_redacts_header_values() -> None:
    route = Route("weather", GOOD["url"], headers={"X-Api-Key": SECRET, "Accept": "x"})
    public = route.to_json()
    assert public["headers"] == {"X-Api-Key": "***", "Accept": "***"}
    assert SECRET not in json.dumps(public)
    assert route.to_json(redact=False)["headers"]["X-Api-Key"] == SECRET


def test_keep_takes_only_values_sent_as_shown() -> None:
    stored = Route("weather", GOOD["url"] + "/x?token=t", headers={"X-Api-Key": SECRET},
                   retries=1)
    shown = stored.to_json()
    assert Route.from_json("weather", shown, keep=stored) == stored
    # a value equal to the stored one is still checked as sent: true is not an integer
    with pytest.raises(MalformedRequest) as info:
        Route.from_json("weather", {**shown, "retries": True}, keep=stored)
    assert info.value.detail == {"route": "weather", "field": "retries"}
    assert Route.from_json("weather", shown).headers == {"X-Api-Key": "***"}  # no keep: as sent


def test_route_table() -> None:
    table = RouteTable()
    b, a = Route("b", GOOD["url"]), Route("a", GOOD["url"])
    table.put(b)
    table.put(a)
    assert table.list() == (a, b) and table.get("a") is a
    a2 = Route("a", GOOD["url"], method="GET")
    table.put(a2)
    assert table.get("a") is a2 and len(table) == 2
    table.delete("a")
    for call in (table.get, table.delete):
        with pytest.raises(NotFound) as info:
            call("a")
        assert info.value.detail == {"route": "a"}


# --- routes file -----------------------------------------------------------------------

def write_routes(tmp_path: Path, routes: Any) -> Path:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(routes))
    return path


def test_load_routes_file_expands_environment(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHER_KEY", SECRET)
    path = write_routes(tmp_path, {"routes": {
        "weather": {**GOOD, "method": "GET", "headers": {"Authorization": "Bearer ${WEATHER_KEY}",
                                                         "X-Literal": "$HOME"}},
        "echo": {"url": "http://localhost:9000/echo"},
    }})
    routes = load_routes_file(path)
    assert sorted(routes) == ["echo", "weather"]
    assert routes["weather"].headers == {"Authorization": f"Bearer {SECRET}",
                                         "X-Literal": "$HOME"}
    assert routes["weather"].method == "GET" and routes["echo"].method == "POST"


def test_load_routes_file_missing_variable(tmp_path: Path) -> None:
    path = write_routes(tmp_path, {"routes": {
        "weather": {**GOOD, "headers": {"X-Api-Key": "${NOT_SET_ANYWHERE}"}}}})
    with pytest.raises(MalformedRequest, match="NOT_SET_ANYWHERE") as info:
        load_routes_file(path, environ={})
    assert info.value.detail == {"route": "weather", "field": "headers.X-Api-Key"}


@pytest.mark.parametrize("content", ['{"routes": []}', '{"weather": {}}', "not json"])
def test_load_routes_file_bad_shape(tmp_path: Path, content: str) -> None:
    path = tmp_path / "routes.json"
    path.write_text(content)
    with pytest.raises(MalformedRequest, match=r"routes\.json"):
        load_routes_file(path)


def test_load_routes_file_bad_route_names_it(tmp_path: Path) -> None:
    path = write_routes(tmp_path, {"routes": {"weather": {**GOOD, "timeout": 500}}})
    with pytest.raises(MalformedRequest, match="'weather': timeout"):
        load_routes_file(path)


# --- the management API: secrets are shown redacted and kept when sent back -----------------

PATH_SECRET = "p4th-s3cret"
QUERY_SECRET = "qu3ry-t0ken"


async def put_secret_route(admin: AdminClient, target: Target) -> dict[str, Any]:
    shown: dict[str, Any] = await admin.request("PUT", "/v1/routes/hook", json={
        "url": f"{target.url}/hook/{PATH_SECRET}?token={QUERY_SECRET}&v=2", "method": "GET",
        "headers": {"X-Api-Key": SECRET, "Accept": "application/json"}})
    return shown


async def call_hook(server: Server, executor: RouteExecutor) -> Any:
    outcome = await executor.perform(server.services.routes.get("hook"), "d1", None)
    assert outcome.ok, outcome
    return outcome.body


async def test_routes_api_shows_no_secret(server: Server, admin: AdminClient, target: Target
                                          ) -> None:
    answers = [await put_secret_route(admin, target), await admin.request("GET", "/v1/routes"),
               await admin.request("GET", "/v1/routes/hook")]
    for answer in answers:
        text = json.dumps(answer)
        assert SECRET not in text and PATH_SECRET not in text and QUERY_SECRET not in text
    assert answers[2]["url"] == f"{target.url}/hook/***?token=***&v=***"
    assert answers[2]["headers"] == {"X-Api-Key": "***", "Accept": "***"}
    with pytest.raises(MalformedRequest) as info:  # a password in the URL is refused, unechoed
        await admin.request("PUT", "/v1/routes/pw", json={"url": "https://u:pw0rd@h.example/x"})
    assert info.value.detail == {"route": "pw", "field": "url"}
    assert "pw0rd" not in info.value.message


async def test_route_read_and_put_back_keeps_its_secrets(
        server: Server, admin: AdminClient, target: Target, executor: RouteExecutor) -> None:
    await put_secret_route(admin, target)
    before = server.services.routes.get("hook")
    shown = await admin.request("GET", "/v1/routes/hook")
    del shown["alias"]
    await admin.request("PUT", "/v1/routes/hook", json=shown)
    assert server.services.routes.get("hook") == before  # it used to store "***"
    assert (await load_route_table(server.services.store, None)).get("hook") == before
    assert await call_hook(server, executor) == {
        "path": f"/hook/{PATH_SECRET}", "query": {"token": QUERY_SECRET, "v": "2"},
        "key": SECRET, "accept": "application/json"}


async def test_changing_one_header_keeps_the_others(
        server: Server, admin: AdminClient, target: Target, executor: RouteExecutor) -> None:
    shown = await put_secret_route(admin, target)
    del shown["alias"]
    shown["headers"]["Accept"] = "text/plain"
    await admin.request("PUT", "/v1/routes/hook", json=shown)
    body = await call_hook(server, executor)
    assert (body["key"], body["accept"], body["query"]["token"]) == (
        SECRET, "text/plain", QUERY_SECRET)
    # a URL that is not the one shown is taken as sent, the headers still kept
    new_url = f"{target.url}/hook/other?token=new"
    await admin.request("PUT", "/v1/routes/hook", json={**shown, "url": new_url})
    route = server.services.routes.get("hook")
    assert (route.url, route.headers["X-Api-Key"]) == (new_url, SECRET)


async def test_routes_of_the_routes_file_are_changed_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file route's secrets come from ``${ENV}``: the API shows it redacted and refuses to
    replace or delete it (409, ``origin: file``), so keeping "as shown" values can never copy
    the expanded secret into the database."""
    from crdtsync.errors import AlreadyExists
    from crdtsync_server import ServerConfig

    from .conftest import ADMIN_TOKEN

    monkeypatch.setenv("WEATHER_KEY", "s3cr3t-from-env")
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps({"routes": {"weather": {
        "url": "https://api.example.com/v1/forecast", "method": "POST",
        "headers": {"X-Api-Key": "${WEATHER_KEY}"}}}}))
    config = ServerConfig(db=str(tmp_path / "s.db"), port=0, admin_token=ADMIN_TOKEN,
                          routes_file=str(routes_file))
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        shown = await admin.request("GET", "/v1/routes/weather")
        assert shown["headers"] == {"X-Api-Key": "***"}
        body = {k: v for k, v in shown.items() if k != "alias"}
        for method, payload in (("PUT", body), ("DELETE", None)):
            with pytest.raises(AlreadyExists) as caught:
                await admin.request(method, "/v1/routes/weather", json=payload)
            assert caught.value.detail == {"route": "weather", "origin": "file"}
        assert server.services.routes.get("weather").headers["X-Api-Key"] == "s3cr3t-from-env"
        saved = await server.services.store.get_setting("routes")
        assert "s3cr3t-from-env" not in (saved or "")
