"""The device side of proxied requests: the device asks, the cloud performs, at most once.

``await dev.request("weather", {"city": "Oslo"})`` stores the request durably with a fresh id
and returns when its outcome arrives, whether the device is online now or only tomorrow, and
across restarts (``dev.pending_requests()``, ``await dev.wait_request(id)``). Requests travel
in sync requests until the cloud accepted them; the cloud performs each id at most once and
sends the outcome in the same response when the target answers within a short budget,
otherwise on a later sync; the device stores it, then acknowledges it on its next sync.

A request states: ``pending`` (queued, not yet accepted) -> ``accepted`` -> ``done``
(outcome stored here) -> ``acked`` (the cloud was told, it may forget).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from . import hlc
from ._device_store import DeviceStore, StoredCall
from .errors import BodyTooLarge, InvalidValue, NotFound, RouteFailed
from .protocol import NAME_RE, Outcome, ProxyCall, item_body
from .values import check_value


class Calls:
    """Proxied requests of one device: the durable queue and the waiting callers."""

    def __init__(self, store: DeviceStore, wall: Callable[[], int] = hlc.wall_ms) -> None:
        self.store = store
        self.wall = wall
        """The device's wall clock in ms: when a request was queued."""
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._sent_acks: tuple[str, ...] = ()

    async def add(self, route: str, body: Any, request_id: str | None) -> str:
        """Queue a request durably and return its id (a given id makes the call idempotent:
        the same id is performed once). :class:`InvalidValue` (nothing queued) for a bad
        route or id, a body that is not JSON data or is over ``Limits.max_item_body``
        bytes (the cloud would refuse every sync carrying it)."""
        if not isinstance(route, str) or not NAME_RE.match(route):
            raise InvalidValue(f"route {route!r} is not a valid name")
        check_value(body, where="request body", max_int=2**63 - 1)
        try:
            data = item_body(body, what="request body")
        except BodyTooLarge as exc:
            raise InvalidValue(exc.message, exc.detail) from exc
        call_id = request_id or secrets.token_hex(16)
        if not NAME_RE.match(call_id):
            raise InvalidValue(f"request id {call_id!r} is not a valid name")
        await self.store.add_call(call_id, route, data, self.wall())
        return call_id

    async def wait(self, call_id: str) -> dict[str, Any]:
        """The outcome of ``call_id`` once it is here; raises :class:`RouteFailed` for a
        failed route, :class:`NotFound` for an unknown id."""
        stored = await self.store.get_call(call_id)
        if stored is None:
            raise NotFound(f"no request {call_id!r} on this device")
        if stored.outcome is None:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(call_id, []).append(future)
            outcome = await future
        else:
            outcome = msgpack.unpackb(stored.outcome, raw=False)
        if not outcome.get("ok"):
            raise RouteFailed(str(outcome.get("message") or outcome.get("error")), outcome)
        return outcome

    async def pending(self) -> list[str]:
        """Ids of requests whose outcome has not arrived yet, oldest first."""
        return [c.id for status in ("pending", "accepted")
                for c in await self.store.calls(status)]

    async def to_send(self, limit: int) -> tuple[tuple[ProxyCall, ...], tuple[str, ...]]:
        """Requests the cloud has not accepted yet, and outcomes to acknowledge."""
        calls = await self.store.calls("pending", limit)
        done = await self.store.calls("done", limit)
        self._sent_acks = tuple(c.id for c in done)
        return tuple(_proxy_call(c) for c in calls), self._sent_acks

    async def apply(self, accepted: Sequence[str], outcomes: Sequence[Outcome]) -> None:
        """Record a response: accepted ids, new outcomes (durably, then wake the callers),
        and the acknowledgements this request carried."""
        if self._sent_acks:
            await self.store.set_calls(self._sent_acks, "acked", only="done")
            self._sent_acks = ()
        if accepted:
            await self.store.set_calls(accepted, "accepted", only="pending")
        for outcome in outcomes:
            await self._store_outcome(outcome)

    async def _store_outcome(self, outcome: Outcome) -> None:
        stored = await self.store.get_call(outcome.id)
        if stored is None or stored.outcome is not None:
            return
        await self.store.set_calls([outcome.id], "done", outcome=_pack(dict(outcome.outcome)))
        for future in self._waiters.pop(outcome.id, []):
            if not future.done():
                future.set_result(dict(outcome.outcome))


def _proxy_call(stored: StoredCall) -> ProxyCall:
    return ProxyCall(stored.id, stored.route, msgpack.unpackb(stored.body, raw=False))


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
