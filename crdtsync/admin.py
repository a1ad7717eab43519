"""``AdminClient``: the management API from Python (the CLI and tests use it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

import aiohttp

from .errors import CrdtsyncError, TransportError, error_from_code
from .protocol import STATE_MAP
from .transport import describe, origin


class AdminClient:
    """Calls the server's JSON management API with the admin token.

    ``async with AdminClient(url, token) as admin``. Every method raises the typed
    :mod:`crdtsync.errors` exception of an error response, or :class:`TransportError`.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _unreachable(self, method: str, path: str, exc: BaseException) -> TransportError:
        """One short line for a request that got no answer; a refused connection asks
        whether the server runs at that address at all (the usual first-hour mistake)."""
        reason = describe(exc, self.url)
        if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
                exc, aiohttp.ClientSSLError):
            return TransportError(f"{reason}: is `crdtsync serve` running at {origin(self.url)}?"
                                  " (--url or CRDTSYNC_URL name the server)")
        return TransportError(f"{method} {path} failed: {reason}")

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None) -> Any:
        """One call; returns the decoded JSON body."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            async with self._session.request(method, self.url + path, json=json,
                                             params=params) as resp:
                data = None if resp.status == 204 else await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(method, path, exc) from exc
        except ValueError as exc:
            raise CrdtsyncError(f"{method} {path}: response is not JSON") from exc
        if status >= 400:
            raise error_from_body(data, status)
        return data

    async def add_device(self, device_id: str, meta: Mapping[str, Any] | None = None,
                         fleet: str | None = None) -> dict[str, Any]:
        """Provision a device (optionally in ``fleet``); the result holds its ``token``
        (shown only once)."""
        return await self.request("POST", "/v1/devices",  # type: ignore[no-any-return]
                                  json={"id": device_id, "meta": dict(meta or {}),
                                        "fleet": fleet})

    async def list_devices(self, after: str = "", limit: int = 100) -> dict[str, Any]:
        return await self.request("GET", "/v1/devices",  # type: ignore[no-any-return]
                                  params={"after": after, "limit": str(limit)})

    async def device(self, device_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/devices/{quote(device_id)}")  # type: ignore[no-any-return]

    async def rotate_token(self, device_id: str) -> dict[str, Any]:
        """Give the device a new token; the old one stops working at once. The result is the
        device with its new ``token`` (shown only once). :class:`NotFound` if unknown."""
        return await self.request(  # type: ignore[no-any-return]
            "POST", f"/v1/devices/{quote(device_id)}/token")

    async def set_disabled(self, device_id: str, disabled: bool) -> dict[str, Any]:
        """Disable the device (its syncs are refused with :class:`Forbidden`, it loses
        nothing) or enable it again; returns the device. :class:`NotFound` if unknown."""
        return await self.request(  # type: ignore[no-any-return]
            "PATCH", f"/v1/devices/{quote(device_id)}", json={"disabled": disabled})

    async def delete_device(self, device_id: str, *, events: bool = False) -> None:
        """Delete the device, its documents and queues; its events and state changes stay
        in the feed unless ``events``. :class:`NotFound` if unknown."""
        await self.request("DELETE", f"/v1/devices/{quote(device_id)}",
                           params={"events": "true" if events else "false"})

    async def add_fleet(self, fleet_id: str, meta: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
        """Create a fleet; :class:`AlreadyExists` if the id is taken."""
        return await self.request("POST", "/v1/fleets",  # type: ignore[no-any-return]
                                  json={"id": fleet_id, "meta": dict(meta or {})})

    async def list_fleets(self, after: str = "", limit: int = 100) -> dict[str, Any]:
        """One page of fleets in id order: ``{"fleets": [...], "next": id | None}``."""
        return await self.request("GET", "/v1/fleets",  # type: ignore[no-any-return]
                                  params={"after": after, "limit": str(limit)})

    async def fleet(self, fleet_id: str) -> dict[str, Any]:
        """One fleet; :class:`NotFound` if it does not exist."""
        return await self.request("GET", f"/v1/fleets/{quote(fleet_id)}")  # type: ignore[no-any-return]

    async def fleet_devices(self, fleet_id: str, after: str = "", limit: int = 100
                            ) -> dict[str, Any]:
        """One page of the fleet's devices: ``{"devices": [...], "next": id | None}``."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/fleets/{quote(fleet_id)}/devices",
            params={"after": after, "limit": str(limit)})

    async def set_fleet(self, device_id: str, fleet_id: str | None) -> dict[str, Any]:
        """Move the device into ``fleet_id`` (``None``: out of every fleet); returns the
        device with its ``fleet`` and ``fleet_gen``. :class:`NotFound` for an unknown device
        or fleet."""
        return await self.request(  # type: ignore[no-any-return]
            "PUT", f"/v1/devices/{quote(device_id)}/fleet", json={"fleet": fleet_id})

    async def put_schema(self, fleet_id: str, schema: Mapping[str, Any]) -> dict[str, Any]:
        """Set the fleet's state schema (docs/protocol.md 15c); returns ``{"hash",
        "schema"}``, the version and the normalized definition. :class:`InvalidValue`
        (``detail.where``) for a schema that is not valid."""
        return await self.request(  # type: ignore[no-any-return]
            "PUT", f"/v1/fleets/{quote(fleet_id)}/schema", json=dict(schema))

    async def schema(self, fleet_id: str) -> dict[str, Any]:
        """The fleet's state schema: ``{"hash", "schema"}`` (both ``None`` without one)."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/fleets/{quote(fleet_id)}/schema")

    async def delete_schema(self, fleet_id: str) -> None:
        """Remove the fleet's state schema (its versions stay readable by hash)."""
        await self.request("DELETE", f"/v1/fleets/{quote(fleet_id)}/schema")

    async def schema_version(self, version: str) -> dict[str, Any]:
        """Any schema version ever set, by hash: ``{"hash", "schema"}``; :class:`NotFound`
        for a hash the server never issued."""
        return await self.request("GET", f"/v1/schemas/{quote(version)}")  # type: ignore[no-any-return]

    async def state(self, device_id: str, *, meta: bool = False) -> dict[str, Any]:
        """The device's document as ``{map: {key: value}}``; with ``meta``, ``{"state":
        <the document>, "meta": {map: {key: {"time", "writer"}}}}``: when and by whom each
        key was last written (protocol section 13)."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/devices/{quote(device_id)}/state",
            params={"meta": "1"} if meta else None)

    async def patch_state(self, device_id: str, changes: Mapping[str, Any],
                          map_name: str = STATE_MAP) -> dict[str, Any]:
        """Cloud write: merge ``changes`` into a map (``None`` deletes); returns the map."""
        return await self.request(  # type: ignore[no-any-return]
            "PATCH", f"/v1/devices/{quote(device_id)}/state/{quote(map_name)}",
            json=dict(changes))

    async def events(self, *, after: str = "0", limit: int = 100, device: str | None = None,
                     topic: str | None = None) -> dict[str, Any]:
        """One page of events: ``{"events": [...], "next": cursor}``."""
        params = {"after": after, "limit": str(limit)}
        if device:
            params["device"] = device
        if topic:
            params["topic"] = topic
        return await self.request("GET", "/v1/events", params=params)  # type: ignore[no-any-return]

    async def iter_events(self, *, after: str = "0", **filters: Any
                          ) -> AsyncIterator[dict[str, Any]]:
        """Every event after ``after``, page by page, until none is left."""
        while True:
            page = await self.events(after=after, limit=1000, **filters)
            for event in page["events"]:
                yield event
            if not page["events"]:
                return
            after = page["next"]

    # --- downstream sinks (docs/downstream.md) ------------------------------------------------

    async def put_sink(self, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Create or reconfigure sink ``name`` from its JSON form (``{"type", "options",
        "filter", "batch", ...}``); returns it with its status, secrets redacted."""
        return await self.request(  # type: ignore[no-any-return]
            "PUT", f"/v1/sinks/{quote(name)}", json=dict(config))

    async def sinks(self) -> list[dict[str, Any]]:
        """Every sink with its status (state, cursor, lag, counters, last error)."""
        return (await self.request("GET", "/v1/sinks"))["sinks"]  # type: ignore[no-any-return]

    async def sink(self, name: str) -> dict[str, Any]:
        """One sink; :class:`NotFound` if there is none."""
        return await self.request("GET", f"/v1/sinks/{quote(name)}")  # type: ignore[no-any-return]

    async def delete_sink(self, name: str) -> None:
        """Stop and forget a sink and its dead letters."""
        await self.request("DELETE", f"/v1/sinks/{quote(name)}")

    async def dead_letters(self, name: str, after: int = 0, limit: int = 100
                           ) -> dict[str, Any]:
        """One page of the sink's dead letters: ``{"dead_letters": [...], "next": id}``."""
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/sinks/{quote(name)}/dead-letters",
            params={"after": str(after), "limit": str(limit)})

    async def retry_dead_letters(self, name: str, ids: list[int] | None = None) -> int:
        """Deliver the sink's dead letters (or those ``ids``) again; returns how many."""
        body = None if ids is None else {"ids": ids}
        result = await self.request("POST", f"/v1/sinks/{quote(name)}/dead-letters/retry",
                                    json=body)
        return int(result["retrying"])

    # --- the change feed ------------------------------------------------------------------

    async def feed(self, after: int | str = 0, limit: int = 100, wait: int = 0,
                   device: str | None = None, fleet: str | None = None,
                   topic: str | None = None, kind: str | None = None
                   ) -> tuple[list[dict[str, Any]], int]:
        """One page of the change feed after cursor ``after``: ``(items, next)``, ``next``
        the cursor to pass as ``after`` to read on. With ``wait=S`` (at most 60) the server
        holds the request up to S seconds until an item arrives (a long poll). Filters:
        ``device``, ``fleet``, ``topic`` (events only) and ``kind`` (``event``, ``state``,
        ``conflict`` or ``file``)."""
        params = query_params(after=after, limit=limit, wait=wait, device=device,
                              fleet=fleet, topic=topic, kind=kind)
        total = self._timeout.total
        timeout = aiohttp.ClientTimeout(total=None if total is None else total + wait)
        async with self._open("/v1/feed", params, timeouts=timeout) as resp:
            data = await resp.json(content_type=None)
        return data["items"], int(data["next"])

    async def follow(self, after: int | str = 0, *, device: str | None = None,
                     fleet: str | None = None, topic: str | None = None,
                     kind: str | None = None, max_delay: float = 30.0
                     ) -> AsyncGenerator[dict[str, Any], None]:
        """Every feed item after cursor ``after``, then each new one as it is stored, from
        the Server-Sent Events stream; never ends by itself. A dropped connection (or a
        retryable error) reconnects with ``Last-Event-ID`` = the last item's cursor, after
        the delay the server asked for, doubling while reconnecting fails (up to
        ``max_delay`` seconds): no item is skipped or repeated. Other errors (a bad token,
        a bad filter, items purged after the cursor: ``CursorExpired``) raise. Close it
        with ``contextlib.aclosing`` (or ``aclose()``) to hang up at once."""
        params = query_params(device=device, fleet=fleet, topic=topic, kind=kind)
        parser = SseParser(str(after))
        idle = max(STREAM_IDLE_S, self._timeout.total or 0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=idle, sock_read=idle)
        failures = 0
        while True:
            try:
                async with self._open("/v1/feed/stream", params, timeouts=timeout,
                                      headers={"Last-Event-ID": parser.last_id}) as resp:
                    failures = 0
                    async for line in sse_lines(resp.content):
                        if (event := parser.line(line)) is None:
                            continue
                        if event.event == "error":  # e.g. the stream fell behind a purge
                            raise error_from_body(json.loads(event.data))
                        yield json.loads(event.data)
            except CrdtsyncError as exc:
                if not exc.retryable:
                    raise
            parser.reset()
            failures += 1
            await asyncio.sleep(min(max_delay, parser.retry * 2 ** (failures - 1)))

    async def projection(self, device: str | None = None) -> list[dict[str, Any]]:
        """Every row of the current-state projection (``device``, ``doc``, ``map``, ``key``,
        ``value``, ``updated``), all pages, optionally of one device only."""
        rows: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self.request("GET", "/v1/projection", params=query_params(
                device=device, after=after, limit=MAX_PAGE))
            rows += page["rows"]
            if page["next"] is None:
                return rows
            after = page["next"]

    # --- files (docs/protocol.md section 19) ---------------------------------------------

    async def put_file(self, name: str, source: str | os.PathLike[str], *,
                       device: str | None = None, fleet: str | None = None,
                       meta: Any = None) -> dict[str, Any]:
        """Put the file at ``source`` as ``name`` for ``device`` or ``fleet`` (streamed from
        disk, never read whole); returns the stored record. The device (every device of
        the fleet) downloads it after its next sync."""
        headers = {"Content-Type": "application/octet-stream"}
        if meta is not None:
            headers["X-File-Meta"] = json.dumps(meta)
        path = f"{_files_path(device, fleet)}/{name}"
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            with open(source, "rb") as body:  # noqa: ASYNC230 (aiohttp streams it)
                async with self._session.put(self.url + path, data=body, headers=headers,
                                             timeout=FILE_TIMEOUT) as resp:
                    if resp.status >= 400:
                        raise await response_error(resp)
                    result: dict[str, Any] = await resp.json()
                    return result
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable("PUT", path, exc) from exc

    async def get_file(self, name: str, dest: IO[bytes], *, device: str | None = None,
                       fleet: str | None = None, direction: str | None = None) -> int:
        """Write the bytes of file ``name`` of ``device`` (default: what it sent) or
        ``fleet`` into ``dest`` as they arrive; returns how many."""
        size = 0
        async with self._open(f"{_files_path(device, fleet)}/{name}",
                              query_params(direction=direction), timeouts=FILE_TIMEOUT) as resp:
            try:
                async for block in resp.content.iter_chunked(1024 * 1024):
                    dest.write(block)
                    size += len(block)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._unreachable("GET", name, exc) from exc
        return size

    async def files(self, *, device: str | None = None, fleet: str | None = None,
                    direction: str | None = None) -> list[dict[str, Any]]:
        """Every file of ``device`` or ``fleet`` (optionally of one direction), all pages."""
        found: list[dict[str, Any]] = []
        after = ""
        while True:
            page = (await self.request("GET", _files_path(device, fleet), params=query_params(
                direction=direction, after=after, limit=MAX_PAGE)))["files"]
            found += page
            if len(page) < MAX_PAGE:
                return found
            after = page[-1]["name"]

    @contextlib.asynccontextmanager
    async def _open(self, path: str, params: Mapping[str, str], *,
                    timeouts: aiohttp.ClientTimeout, headers: Mapping[str, str] | None = None
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET path`` as a response to read (a long poll, a stream); an error status
        raises its typed error, a network failure (also while reading) TransportError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            async with self._session.get(self.url + path, params=params, headers=headers,
                                         timeout=timeouts) as resp:
                if resp.status >= 400:
                    raise await response_error(resp)
                yield resp
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable("GET", path, exc) from exc


MAX_PAGE = 1000
"""The largest page the management API serves."""
FILE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
"""A file moves for as long as it takes, as long as bytes keep coming."""


def _files_path(device: str | None, fleet: str | None) -> str:
    """``/v1/devices/{device}/files`` or ``/v1/fleets/{fleet}/files``: exactly one."""
    if (device is None) == (fleet is None):
        raise ValueError("give device or fleet")
    return f"/v1/devices/{device}/files" if device is not None else f"/v1/fleets/{fleet}/files"
STREAM_IDLE_S = 45.0
"""Seconds without a byte before a feed stream counts as dropped (the server sends a
keep-alive every 15 seconds)."""


def query_params(**values: object) -> dict[str, str]:
    """Query parameters from keyword arguments, leaving out the ``None`` ones."""
    return {name: str(value) for name, value in values.items() if value is not None}


async def response_error(resp: aiohttp.ClientResponse) -> CrdtsyncError:
    """The typed error an error response carries (``{"error": {"code", "message"}}``)."""
    try:
        data = await resp.json(content_type=None)
    except ValueError:
        data = None
    return error_from_body(data, resp.status)


def error_from_body(data: Any, status: int = 0) -> CrdtsyncError:
    """The typed error of an error body ``{"error": {"code", "message", "detail"}}``."""
    err = data.get("error", {}) if isinstance(data, dict) else {}
    return error_from_code(str(err.get("code", "internal")), str(err.get("message", "")),
                           err.get("detail") or None, status)


async def sse_lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The lines of an event stream as they arrive (any length; ``\\n`` or ``\\r\\n``)."""
    pending = b""
    async for chunk in content.iter_any():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()


@dataclass(frozen=True, slots=True)
class SseEvent:
    id: str
    event: str
    data: str


class SseParser:
    """Server-Sent Events interpretation, one line at a time (the HTML standard's rules):
    ``last_id`` is the id of the last dispatched event, the ``Last-Event-ID`` to reconnect
    with; ``retry`` the reconnection delay the server asked for, in seconds."""

    def __init__(self, last_id: str = "") -> None:
        self.last_id = last_id
        self.retry = 1.0
        self._id = last_id
        self._event = ""
        self._data: list[str] = []

    def line(self, text: str) -> SseEvent | None:
        """Take one line; returns the event a blank line completes."""
        if not text:
            return self._dispatch()
        name, _, value = text.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
        return None  # comments (":...") and unknown fields are ignored

    def reset(self) -> None:
        """Forget a partly received event (the connection dropped in the middle of it)."""
        self._id, self._event, self._data = self.last_id, "", []

    def _dispatch(self) -> SseEvent | None:
        self.last_id = self._id
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        return SseEvent(self.last_id, event, "\n".join(data)) if data else None
