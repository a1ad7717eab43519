"""server/crdtsync_server/openapi.json is served by the real server and cannot drift from
the code: every registered route is documented, nothing else is, and every wire error code
is in its enum."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from crdtsync import errors
from crdtsync_server import Server

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _normalize(path: str) -> str:
    """``/v1/devices/{device_id}`` and ``/v1/devices/{device}`` are the same route."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def _app_routes(server: Server) -> set[tuple[str, str]]:
    """(method, path) of every route of the aiohttp app. aiohttp adds a HEAD route for every
    GET (``allow_head``); HTTP implies HEAD for GET, so OpenAPI does not list those."""
    routes = {(r.method.lower(), _normalize(r.resource.canonical))
              for r in server.app.router.routes() if r.resource is not None}
    return {(m, p) for m, p in routes if not (m == "head" and ("get", p) in routes)}


def _documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, _normalize(path))
            for path, item in doc["paths"].items()
            for method in item if method in HTTP_METHODS}


def _wire_codes() -> set[str]:
    """Codes of every error class that has an HTTP status (those that can cross the wire)."""
    found: set[str] = set()
    pending: list[type[errors.CrdtsyncError]] = [errors.CrdtsyncError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.status:
            found.add(cls.code)
    return found


async def _fetch(server: Server) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(server.url + "/v1/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
    assert isinstance(doc, dict)
    return doc


async def test_openapi_is_served_without_credentials(server: Server) -> None:
    doc = await _fetch(server)
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"])
    assert doc["info"]["title"] and doc["info"]["version"]


async def test_openapi_documents_exactly_the_registered_routes(server: Server) -> None:
    doc = await _fetch(server)
    app_routes = _app_routes(server)
    assert ("post", "/v1/sync") in app_routes  # the comparison sees the real router
    assert _documented_routes(doc) == app_routes


async def test_openapi_error_enum_holds_every_wire_code(server: Server) -> None:
    doc = await _fetch(server)
    enum = set(doc["components"]["schemas"]["ErrorCode"]["enum"])
    wire = _wire_codes()
    assert {"seq_conflict", "unauthorized", "internal"} <= wire
    assert wire <= enum, f"missing from ErrorCode: {sorted(wire - enum)}"
    assert enum <= wire, f"not declared in crdtsync.errors: {sorted(enum - wire)}"


async def test_openapi_security_matches_the_handlers(server: Server) -> None:
    doc = await _fetch(server)
    schemes = doc["components"]["securitySchemes"]
    assert {name: s["scheme"] for name, s in schemes.items()} == {
        "adminToken": "bearer", "deviceToken": "bearer"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            names = {name for requirement in op.get("security", []) for name in requirement}
            if path.startswith("/console"):  # static files; their data calls need the token
                assert names == set(), (method, path)
                continue
            if path in ("/v1/health", "/v1/openapi.json", "/healthz", "/readyz"):
                expected: set[str] = set()
            elif path in ("/v1/sync", "/v1/sync/batch", "/v1/wake") or path.startswith(
                    "/v1/files/"):
                expected = {"deviceToken"}
            else:
                expected = {"adminToken"}
            assert names == expected, (method, path)


async def test_every_documented_admin_route_answers_401_without_a_token(server: Server) -> None:
    """The documented 401 is real: each admin route refuses a request without a token."""
    doc = await _fetch(server)
    async with aiohttp.ClientSession() as session:
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in HTTP_METHODS or not op.get("security"):
                    continue
                assert "401" in op["responses"], (method, path)
                url = server.url + re.sub(r"\{[^}]+\}", "x1", path)
                async with session.request(method.upper(), url) as resp:
                    assert resp.status == 401, (method, path)
