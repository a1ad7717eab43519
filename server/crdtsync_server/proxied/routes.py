"""Proxied requests: the routes the server may call for a device, and what performs them.

A device never names an address, only a route *alias*; the server looks the alias up in its
own :class:`RouteTable` (filled from :func:`load_routes_file` or the management API), so a
device can never make the server call anything but a configured route. Secrets (API keys,
tokens in the URL) live on the server only: :meth:`Route.to_json` shows header values as
``"***"`` and the URL redacted, and :meth:`Route.from_json` with ``keep=`` takes a value sent
back as shown to mean the stored one (the rules of sinks: :func:`..validation.redact_options`).

An :class:`Executor` performs a route; the HTTP one is
:class:`~crdtsync_server.proxied.executor.RouteExecutor` (an adapter: this module and the
dispatcher import no HTTP client). ``perform`` makes one request for a route and always
answers with a :class:`RouteOutcome`; whatever the target does (time out, refuse, answer
5xx, redirect, stream too much) becomes a stable error code, never an exception:

    code                       meaning                                           retried
    route_timeout              no complete answer within ``route.timeout``        yes
    route_unreachable          connection refused, DNS failure, reset             yes
    route_http_error           target answered 5xx (after retries), 4xx or 3xx    5xx only
    route_response_too_large   body over ``route.max_response`` (reading stops),  no
                               or (set by the ProxyRunner) an outcome over the
                               ``Limits.max_item_body`` a device takes
    route_bad_payload          payload does not fit the route's method            no
    route_not_allowed          the device is not in ``route.devices``             no
    unknown_route              no route has that alias (:meth:`perform_alias`)    no

Redirects are never followed: a route cannot be bounced to an address nobody configured.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from crdtsync.errors import MalformedRequest, NotFound
from crdtsync.protocol import NAME_RE

from ..validation import (
    headers_problem,
    keep_redacted,
    missing_env,
    read_config_file,
    redact_options,
    substitute_env,
    url_problem,
)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods that send the payload as a JSON body; the others send it as query parameters."""

MAX_TIMEOUT = 120.0
MAX_RESPONSE_LIMIT = 16 * 1024 * 1024
DEFAULT_MAX_RESPONSE = 1024 * 1024
MAX_RETRIES = 5
MAX_RETRY_BACKOFF = 60.0

ROUTE_TIMEOUT = "route_timeout"
ROUTE_UNREACHABLE = "route_unreachable"
ROUTE_HTTP_ERROR = "route_http_error"
ROUTE_RESPONSE_TOO_LARGE = "route_response_too_large"
ROUTE_BAD_PAYLOAD = "route_bad_payload"
ROUTE_NOT_ALLOWED = "route_not_allowed"
UNKNOWN_ROUTE = "unknown_route"



def _invalid(alias: object, name: str, problem: str) -> MalformedRequest:
    return MalformedRequest(f"route {alias!r}: {name} {problem}",
                            {"route": alias, "field": name})


@dataclass(frozen=True)
class Route:
    """One configured target: where a request for ``alias`` goes, and how.

    Constructing a route validates every field and raises :class:`MalformedRequest`
    (``detail = {"route", "field"}``) for a bad one: ``alias`` is a name (1-64 of
    ``A-Za-z0-9_.:-``), ``url`` an absolute http(s) URL with a host and no credentials (put
    those in ``headers``), ``0 < timeout <= 120`` seconds per attempt,
    ``1 <= max_response <= 16 MiB``, ``0 <= retries <= 5``, ``0 <= retry_backoff <= 60``.
    ``devices`` None lets every device use the route, else only the listed device ids
    (fleets will be added here once they exist). Routes compare by value; ``headers`` is
    stored read-only and left out of the hash.
    """

    alias: str
    url: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    timeout: float = 10.0
    max_response: int = DEFAULT_MAX_RESPONSE
    retries: int = 0
    retry_backoff: float = 0.5
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.alias, str) or not NAME_RE.match(self.alias):
            raise _invalid(self.alias, "alias", "is not a valid name (1-64 of A-Za-z0-9_.:-)")
        _check_url(self.alias, self.url)
        if self.method not in METHODS:
            raise _invalid(self.alias, "method", f"must be one of {', '.join(METHODS)}")
        _check_headers(self.alias, self.headers)
        _check_number(self.alias, "timeout", self.timeout, 0.0, MAX_TIMEOUT, low_open=True)
        _check_int(self.alias, "max_response", self.max_response, 1, MAX_RESPONSE_LIMIT)
        _check_int(self.alias, "retries", self.retries, 0, MAX_RETRIES)
        _check_number(self.alias, "retry_backoff", self.retry_backoff, 0.0, MAX_RETRY_BACKOFF)
        _check_devices(self.alias, self.devices)
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "retry_backoff", float(self.retry_backoff))

    @classmethod
    def from_json(cls, alias: str, obj: Any, *, keep: Route | None = None) -> Route:
        """Build the route ``alias`` from its JSON form (the inverse of :meth:`to_json`).

        ``url`` is required; other keys default as on the class; ``devices`` is a list or
        null. With ``keep`` (the route stored so far), a ``url`` or header value sent exactly
        as :meth:`to_json` shows it for ``keep`` (or ``"***"``) keeps ``keep``'s value, so a
        route read and put back keeps its secrets; anything else is taken as sent.
        Raises :class:`MalformedRequest` naming the route and field for a non-object,
        an unknown key, a missing url or any invalid value.
        """
        if not isinstance(obj, Mapping):
            raise _invalid(alias, "route", "must be a JSON object")
        if keep is not None:
            obj = keep_redacted(obj, keep.to_json(redact=False))
        unknown = sorted(str(key) for key in obj if key not in _JSON_FIELDS)
        if unknown:
            raise _invalid(alias, unknown[0], f"is not a route field (known: "
                                              f"{', '.join(sorted(_JSON_FIELDS))})")
        if "url" not in obj:
            raise _invalid(alias, "url", "is required")
        values = dict(obj)
        if isinstance(values.get("devices"), list):
            values["devices"] = tuple(values["devices"])
        return cls(alias=alias, **values)

    def to_json(self, *, redact: bool = True) -> dict[str, Any]:
        """The JSON form, without the alias. Unless ``redact`` is False (persistence only:
        the unredacted form holds secrets), header values read ``"***"`` and the URL reads
        as :func:`.validation.redact_url` shows it (scheme, host, port and first path segment;
        later segments, query values and fragment ``***``)."""
        shown = {
            "url": self.url,
            "method": self.method,
            "headers": dict(self.headers),
            "timeout": self.timeout,
            "max_response": self.max_response,
            "retries": self.retries,
            "retry_backoff": self.retry_backoff,
            "devices": None if self.devices is None else list(self.devices),
        }
        return redact_options(shown) if redact else shown

    def allows(self, device_id: str) -> bool:
        """True if ``device_id`` may use this route."""
        return self.devices is None or device_id in self.devices


_JSON_FIELDS = frozenset(f.name for f in fields(Route)) - {"alias"}


def _check_url(alias: str, url: object) -> None:
    problem = url_problem(url)
    if problem is not None:
        raise _invalid(alias, "url", problem)


def _check_headers(alias: str, headers: object) -> None:
    problem = headers_problem(headers)
    if problem is not None:
        raise _invalid(alias, *problem)


def _check_number(alias: str, name: str, value: object, low: float, high: float, *,
                  low_open: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and value <= high)
    if not ok:
        bound = "<" if low_open else "<="
        raise _invalid(alias, name, f"must be a number with {low:g} {bound} {name} <= {high:g}")


def _check_int(alias: str, name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(alias, name, f"must be an integer from {low} to {high}")


def _check_devices(alias: str, devices: object) -> None:
    if devices is None:
        return
    if not isinstance(devices, tuple):
        raise _invalid(alias, "devices", "must be a list of device ids or null")
    for device_id in devices:
        if not isinstance(device_id, str) or not NAME_RE.match(device_id):
            raise _invalid(alias, "devices", f"holds an invalid device id {device_id!r}")


def load_routes_file(path: str | os.PathLike[str], *,
                     environ: Mapping[str, str] | None = None) -> dict[str, Route]:
    """Read ``{"routes": {alias: route_json, ...}}`` from the JSON file ``path``.

    ``${NAME}`` in a header value is replaced by the environment variable ``NAME`` (from
    ``environ``, default ``os.environ``), so secrets need not sit in the file. Raises
    :class:`MalformedRequest` naming the route and field for a missing variable or any
    invalid route, or for a file that is not such JSON; ``OSError`` if it cannot be read.
    Blocking: call it at startup, not on a running loop's hot path.
    """
    env = os.environ if environ is None else environ
    return {alias: Route.from_json(alias, _expand_env(alias, obj, env))
            for alias, obj in read_config_file(path, "routes", "alias: route").items()}


def _expand_env(alias: str, obj: Any, env: Mapping[str, str]) -> Any:
    """``obj`` with ``${NAME}`` references in its header values expanded."""
    if not isinstance(obj, dict) or not isinstance(obj.get("headers"), dict):
        return obj  # Route.from_json reports what is wrong with it
    headers = {name: _expand_value(alias, name, value, env) if isinstance(value, str) else value
               for name, value in obj["headers"].items()}
    return {**obj, "headers": headers}


def _expand_value(alias: str, header: str, value: str, env: Mapping[str, str]) -> str:
    try:
        return substitute_env(value, env)
    except KeyError as exc:
        raise _invalid(alias, f"headers.{header}", missing_env(exc.args[0])) from None


@dataclass(frozen=True)
class RouteOutcome:
    """What came of one proxied request; the result a device receives.

    ``ok`` is True only for a 2xx answer. ``status`` is the target's HTTP status (None when
    none arrived). ``body`` is the parsed JSON when the target's Content-Type is JSON
    (``application/json`` or ``*+json``) and the body parses to values a CRDT can hold
    (:func:`crdtsync.values.check_value`), otherwise the body as text (UTF-8,
    ``errors="replace"``); None when no body was read. ``error`` is one of the stable codes in
    this module's docstring (None on success); ``message`` is for humans and never holds
    route secrets; ``attempts`` counts requests actually started (0 if none was).
    """

    ok: bool
    status: int | None
    body: Any
    error: str | None
    message: str
    attempts: int

    @classmethod
    def failure(cls, error: str, message: str, *, status: int | None = None,
                body: Any = None, attempts: int = 0) -> RouteOutcome:
        """A failed outcome with the stable code ``error``."""
        return cls(False, status, body, error, message, attempts)

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``{ok, status, body, error, message, attempts}``."""
        return {"ok": self.ok, "status": self.status, "body": self.body, "error": self.error,
                "message": self.message, "attempts": self.attempts}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RouteOutcome:
        """The inverse of :meth:`to_json`; raises :class:`MalformedRequest` on missing keys."""
        try:
            return cls(*(obj[f.name] for f in fields(cls)))
        except KeyError as exc:
            raise MalformedRequest(f"outcome lacks {exc.args[0]!r}") from exc


class RouteTable:
    """The configured routes, in memory, by alias. Not persisted: the owner stores them."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes = {route.alias: route for route in routes}
        self.from_file: set[str] = set()
        """Aliases defined by the routes file: changed there, not through the API (their
        secrets come from ``${ENV}`` and must not be copied into the database)."""

    def get(self, alias: str) -> Route:
        """The route ``alias``; raises :class:`NotFound` (``detail={"route": alias}``)."""
        route = self.find(alias)
        if route is None:
            raise NotFound(f"unknown route {alias!r}", {"route": alias})
        return route

    def find(self, alias: str) -> Route | None:
        """The route ``alias``, or None if there is none."""
        return self._routes.get(alias)

    def put(self, route: Route) -> None:
        """Add ``route``, replacing any route with the same alias."""
        self._routes[route.alias] = route

    def delete(self, alias: str) -> None:
        """Remove the route ``alias``; raises :class:`NotFound` if there is none."""
        self.get(alias)
        del self._routes[alias]

    def list(self) -> tuple[Route, ...]:
        """Every route, sorted by alias."""
        return tuple(self._routes[alias] for alias in sorted(self._routes))

    def __len__(self) -> int:
        return len(self._routes)


class Executor:
    """Performs proxied requests: the port the dispatcher calls. Subclasses implement
    :meth:`perform` (the HTTP one in ``proxied/executor.py``, an in-process one in the
    simulator); ``start`` and ``aclose`` open and release what they hold."""

    async def start(self) -> None:
        """Open what performing needs; a no-op here."""

    async def aclose(self) -> None:
        """Release it; idempotent; a no-op here."""

    async def perform(self, route: Route, device_id: str, payload: Any) -> RouteOutcome:
        """Call ``route`` for ``device_id`` with ``payload``; never raises for the target."""
        raise NotImplementedError

    async def perform_alias(self, table: RouteTable, alias: str, device_id: str,
                            payload: Any) -> RouteOutcome:
        """:meth:`perform` for the route ``alias`` of ``table``; ``unknown_route`` if none."""
        try:
            route = table.get(alias)
        except NotFound as exc:
            return RouteOutcome.failure(UNKNOWN_ROUTE, exc.message)
        return await self.perform(route, device_id, payload)
