"""The HTTP :class:`~crdtsync_server.proxied.routes.Executor`: performs proxied requests with
aiohttp (an adapter of the core, like the handlers in ``api/``; see ``proxied/routes.py`` for
the stable outcome codes)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, Self

import aiohttp
from multidict import CIMultiDict

from crdtsync.errors import ClosedError, InvalidValue
from crdtsync.values import check_value

from ..validation import query_names
from .routes import (
    BODY_METHODS,
    ROUTE_BAD_PAYLOAD,
    ROUTE_HTTP_ERROR,
    ROUTE_NOT_ALLOWED,
    ROUTE_RESPONSE_TOO_LARGE,
    ROUTE_TIMEOUT,
    ROUTE_UNREACHABLE,
    Executor,
    Route,
    RouteOutcome,
)

log = logging.getLogger("crdtsync.server.routes")

_READ_CHUNK = 64 * 1024


class RouteExecutor(Executor):
    """Performs proxied requests over one ``aiohttp.ClientSession``.

    Use ``async with RouteExecutor() as executor`` (or :meth:`start` / :meth:`aclose`).
    :meth:`perform` before start or after close raises :class:`ClosedError`. The session
    keeps no cookies (requests of different devices share nothing) and ignores proxy
    environment variables.
    """

    def __init__(self) -> None:
        self.state: Literal["new", "open", "closed"] = "new"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session; a no-op if open. Raises :class:`ClosedError` after close."""
        if self.state == "closed":
            raise ClosedError("RouteExecutor is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                                  trust_env=False)
            self.state = "open"

    async def aclose(self) -> None:
        """Close the session; idempotent."""
        self.state = "closed"
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


    async def perform(self, route: Route, device_id: str, payload: Any) -> RouteOutcome:
        """Call ``route`` for ``device_id`` with ``payload``; never raises for the target.

        Nothing is sent if the device may not use the route (``route_not_allowed``) or the
        payload does not fit (``route_bad_payload``): POST/PUT/PATCH send it as a JSON body,
        GET/DELETE as query parameters, so there it must be a flat object of str, number or
        bool, and a parameter the route's URL already sets keeps the URL's value (the payload's
        is dropped); None sends no body or parameters. Each attempt has ``route.timeout`` seconds
        in total; timeouts, unreachable targets and 5xx are retried ``route.retries`` times
        after ``retry_backoff * 2**n`` seconds. A retry after a timeout or reset may reach
        the target a second time: give retries only to routes whose target tolerates that.
        """
        session = self._open_session()
        if not route.allows(device_id):
            return RouteOutcome.failure(ROUTE_NOT_ALLOWED,
                                   f"device {device_id!r} may not use route {route.alias!r}")
        try:
            request = _request_kwargs(route, payload)
        except InvalidValue as exc:
            return RouteOutcome.failure(ROUTE_BAD_PAYLOAD, f"route {route.alias!r}: {exc.message}")
        attempt = 1
        while True:
            outcome = await _attempt(session, route, request, attempt)
            if attempt > route.retries or not _retryable(outcome):
                return outcome
            await asyncio.sleep(route.retry_backoff * 2 ** (attempt - 1))
            attempt += 1

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            what = "closed" if self.state == "closed" else "not started"
            raise ClosedError(f"RouteExecutor is {what}")
        return self._session


def _request_kwargs(route: Route, payload: Any) -> dict[str, Any]:
    """The aiohttp arguments carrying ``payload``; :class:`InvalidValue` if it cannot."""
    headers: CIMultiDict[str] = CIMultiDict(route.headers)
    if payload is None:
        return {"headers": headers}
    if route.method not in BODY_METHODS:
        return {"headers": headers, "params": _query_params(route, payload)}
    try:
        data = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"payload is not JSON data: {exc}") from exc
    headers.setdefault("Content-Type", "application/json")
    return {"headers": headers, "data": data}


def _query_params(route: Route, payload: Any) -> dict[str, str]:
    """The payload as query parameters added to the route URL's own; a parameter the URL
    already sets keeps the route's value (the admin's parameters win, never duplicated)."""
    if not isinstance(payload, Mapping):
        raise InvalidValue("payload of a GET or DELETE route must be an object (query params)")
    fixed = query_names(route.url)
    params: dict[str, str] = {}
    for key, value in payload.items():
        if (not isinstance(key, str) or not isinstance(value, (str, int, float))
                or (isinstance(value, float) and not math.isfinite(value))):
            raise InvalidValue(f"query parameter {key!r} must be a str, finite number or bool")
        if key not in fixed:
            params[key] = value if isinstance(value, str) else json.dumps(value,
                                                                          allow_nan=False)
    return params


async def _attempt(session: aiohttp.ClientSession, route: Route, request: dict[str, Any],
                   attempt: int) -> RouteOutcome:
    """One request to ``route``; every failure of the target becomes an :class:`RouteOutcome`."""
    timeout = aiohttp.ClientTimeout(total=route.timeout)
    try:
        async with session.request(route.method, route.url, timeout=timeout,
                                   allow_redirects=False, **request) as response:
            return await _read_outcome(route, response, attempt)
    except TimeoutError:  # before OSError: TimeoutError is one, and so is aiohttp's
        return RouteOutcome.failure(ROUTE_TIMEOUT, f"route {route.alias!r}: no answer within "
                               f"{route.timeout:g} s", attempts=attempt)
    except (aiohttp.ClientError, OSError) as exc:
        # The exception text may name the target; it stays in the server log.
        log.info("route %r attempt %d: %r", route.alias, attempt, exc)
        return RouteOutcome.failure(ROUTE_UNREACHABLE, f"route {route.alias!r}: cannot reach the "
                               f"target ({type(exc).__name__})", attempts=attempt)


async def _read_outcome(route: Route, response: aiohttp.ClientResponse,
                        attempt: int) -> RouteOutcome:
    status = response.status
    declared = response.content_length
    raw = None if declared is not None and declared > route.max_response else \
        await _read_capped(response.content, route.max_response)
    if raw is None:
        response.close()  # drop the connection rather than drain an oversized body
        return RouteOutcome.failure(ROUTE_RESPONSE_TOO_LARGE, f"route {route.alias!r}: response "
                               f"over {route.max_response} bytes", status=status,
                               attempts=attempt)
    body = _decode_body(response.content_type, raw)
    if 200 <= status < 300:
        return RouteOutcome(True, status, body, None, f"target answered {status}", attempt)
    note = " (redirects are not followed)" if 300 <= status < 400 else ""
    return RouteOutcome.failure(ROUTE_HTTP_ERROR, f"route {route.alias!r}: target answered "
                           f"{status}{note}", status=status, body=body, attempts=attempt)


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The whole body if it has at most ``cap`` bytes, else None after reading cap + 1."""
    buffer = bytearray()
    while len(buffer) <= cap:
        chunk = await stream.read(min(_READ_CHUNK, cap + 1 - len(buffer)))
        if not chunk:
            return bytes(buffer)
        buffer += chunk
    return None


def _decode_body(content_type: str, raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if content_type != "application/json" and not content_type.endswith("+json"):
        return text
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
        check_value(value, where="response")
    except (ValueError, RecursionError):  # not JSON a device can receive: hand over the text
        return text
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON data")


def _retryable(outcome: RouteOutcome) -> bool:
    if outcome.error in (ROUTE_TIMEOUT, ROUTE_UNREACHABLE):
        return True
    return outcome.error == ROUTE_HTTP_ERROR and (outcome.status or 0) >= 500
