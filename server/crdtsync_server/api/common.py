"""What the handler modules share: the admin check, JSON in and out, query and path
parameters. Handlers import this module and ``keys``, never ``app.py`` (which imports them)."""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any, TypeVar

from aiohttp import web

from crdtsync.errors import AlreadyExists, MalformedRequest, NotFound, Unauthorized
from crdtsync.protocol import NAME_RE

from ..auth import token_matches
from ..core import Services
from ..store import DeviceRecord
from ..sync import fleet_key
from .body import read_body
from .input import parse_json, parse_uint
from .keys import SERVICES

T = TypeVar("T")

MAX_PAGE = 1000
"""The largest page any list endpoint answers."""


def bearer(request: web.Request) -> str:
    """The bearer token of a request; :class:`Unauthorized` when absent or malformed."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


def require_admin(request: web.Request) -> None:
    """Raise :class:`Unauthorized` unless the admin token is presented."""
    token = bearer(request)
    if not token_matches(token, request.app[SERVICES].admin_hash):
        raise Unauthorized("this endpoint needs the admin token")


async def read_json(request: web.Request) -> Any:
    """The JSON body (``None`` if empty), parsed by :func:`.input.parse_json`:
    :class:`MalformedRequest` if it is not JSON, :class:`InvalidValue` for NaN, deep
    nesting or a lone surrogate."""
    return parse_json(await read_body(request) or b"null")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(
        ",", ":")))


def int_param(request: web.Request, name: str, default: int, maximum: int,
               minimum: int = 0) -> int:
    """The query parameter ``name`` as an integer from ``minimum`` to ``maximum``
    (``default`` when absent or empty); :class:`MalformedRequest` otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = parse_uint(raw, minimum, maximum)
    if value is None:
        raise MalformedRequest(
            f"query parameter {name!r} must be an integer {minimum}..{maximum}")
    return value


def bool_param(request: web.Request, name: str) -> bool:
    """Query parameter ``name``: ``true`` or ``1``, ``false`` or ``0`` (absent or empty:
    false)."""
    raw = request.query.get(name, "") or "false"
    if raw not in ("true", "false", "1", "0"):
        raise MalformedRequest(f"query parameter {name!r} must be true, false, 1 or 0")
    return raw in ("true", "1")


def name_param(request: web.Request, key: str = "device") -> str:
    """The path parameter ``key`` (a device id, fleet id, topic...), checked as a name."""
    value = request.match_info[key]
    if not NAME_RE.match(value):
        raise MalformedRequest(f"{value!r} is not a valid {key} name")
    return value


async def fleet_param(services: Services, request: web.Request) -> str:
    fleet = request.match_info["fleet"]
    if not NAME_RE.match(fleet) or await services.store.get_fleet(fleet) is None:
        raise NotFound(f"no fleet {fleet!r}")
    return fleet


def device_json(device: DeviceRecord) -> dict[str, Any]:
    return {"id": device.id, "created": device.created, "last_sync": device.last_sync,
            "last_seq": device.last_seq, "events_lost": device.events_lost,
            "meta": dict(device.meta), "fleet": device.fleet, "fleet_gen": device.fleet_gen,
            "disabled": device.disabled,
            "downlink_pending": max(0, device.down_seq - device.down_done)}


def admin_services(request: web.Request) -> Services:
    """The services, once the admin token is checked (how management handlers start)."""
    require_admin(request)
    return request.app[SERVICES]


async def admin_fleet(request: web.Request) -> tuple[Services, str]:
    """For an admin call on ``/v1/fleets/{fleet}/...``: the services and the document key
    of that (existing) fleet."""
    services = admin_services(request)
    return services, fleet_key(await fleet_param(services, request))


async def read_object(request: web.Request, message: str) -> dict[str, Any]:
    """The JSON body, which must be an object; else :class:`MalformedRequest` ``message``."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise MalformedRequest(message)
    return body


def not_from_file(kind: str, name: str, defined_in_file: Container[str]) -> None:
    """Refuse to change a ``kind`` (route, sink) that its file defines: it is changed there
    (its ``${ENV}`` secrets must not be copied into the database)."""
    if name in defined_in_file:
        raise AlreadyExists(f"{kind} {name!r} is defined in the {kind}s file; change it there",
                            {kind: name, "origin": "file"})


def limit_param(request: web.Request, default: int = 100) -> int:
    """The page size ``limit``: 1 to :data:`MAX_PAGE`, ``default`` when absent."""
    return int_param(request, "limit", default, MAX_PAGE, minimum=1)


def id_page(request: web.Request) -> tuple[str, int]:
    """``(after, limit)`` of a list paged by id: the last id seen (``""`` for the first
    page) and the page size."""
    return request.query.get("after", ""), limit_param(request)


def found(value: T | None, kind: str, name: str) -> T:
    """``value``, unless it is None: then :class:`NotFound` ``no <kind> '<name>'`` with
    ``detail={kind: name}``."""
    if value is None:
        raise NotFound(f"no {kind} {name!r}", {kind: name})
    return value
