"""Helpers of the gateway and batch tests: devices provisioned through the admin API, and
the events stored per device."""

from __future__ import annotations

from typing import Any

from crdtsync import AdminClient


async def provision(admin: AdminClient, count: int, prefix: str = "s") -> dict[str, str]:
    """``count`` devices ``<prefix>0``, ``<prefix>1``, ...; returns ``{id: token}``."""
    return {f"{prefix}{n}": (await admin.add_device(f"{prefix}{n}"))["token"]
            for n in range(count)}


async def events_by_device(admin: AdminClient) -> dict[str, list[tuple[int, Any]]]:
    """Every stored event as ``{device: [(seq, body), ...]}`` in feed order."""
    seen: dict[str, list[tuple[int, Any]]] = {}
    async for event in admin.iter_events():
        seen.setdefault(event["device"], []).append((event["seq"], event["body"]))
    return seen
