"""``AdminClient``: the management API from Python (the CLI and tests use it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from .errors import CrdtsyncError, TransportError, error_from_code


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

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None) -> Any:
        """One call; returns the decoded JSON body."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            async with self._session.request(method, self.url + path, json=json,
                                             params=params) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{method} {path} failed: {exc!r}") from exc
        except ValueError as exc:
            raise CrdtsyncError(f"{method} {path}: response is not JSON") from exc
        if status >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise error_from_code(str(err.get("code", "internal")), str(err.get("message", "")),
                                  err.get("detail") or None, status)
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

    async def state(self, device_id: str) -> dict[str, Any]:
        """The device's document as ``{map: {key: value}}``."""
        return await self.request("GET", f"/v1/devices/{quote(device_id)}/state")  # type: ignore[no-any-return]

    async def patch_state(self, device_id: str, changes: Mapping[str, Any],
                          map_name: str = "state") -> dict[str, Any]:
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
