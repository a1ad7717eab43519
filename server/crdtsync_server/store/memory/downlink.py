"""Downlink and proxied requests of the memory store (the
:class:`~crdtsync_server.store.roles.DownlinkStore` role), and their part of a commit. The
rules are those of the SQLite store (``store/sqlite/downlink.py`` spells them out)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..feed import json_text
from ..records import (
    FINISHED_DOWNLINK,
    CommandResult,
    DeviceRecord,
    Downlink,
    ProxyRequest,
    SyncWrite,
    wake_device,
)
from ..rules import check_kind, check_limit
from .state import ItemRow, MemoryState, RequestRow


class MemoryDownlink(MemoryState):
    """The :class:`DownlinkStore` role over :class:`MemoryState`."""

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item with the device's next seq (see ``Store.queue_downlink``).

        Raises ``ValueError`` for a kind not in ``DOWNLINK_KINDS``, ``TypeError`` for a body
        that is not JSON, :class:`NotFound` for an unknown device; nothing is written then."""
        self._check_open()
        check_kind(kind)
        body_json = json_text(body)
        record = self._require_device(device)
        seq = record.down_seq + 1
        self._devices[device] = dataclasses.replace(record, down_seq=seq)
        self._last_item_id += 1  # never reused, even after purges and deletions
        item = ItemRow(self._last_item_id, device, seq, kind, name, body_json, now, expires, now)
        self._items[item.id] = item
        self._downlink.setdefault(device, {})[seq] = item
        self._append_wakes([wake_device(device)], now)
        return item.record()

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""
        self._check_open()
        item = self._items.get(item_id)
        return None if item is None else item.record()

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, at most ``limit`` (>= 0),
        optionally of one ``kind`` (``ValueError`` if unknown); empty for an unknown device."""
        self._check_open()
        if kind is not None:
            check_kind(kind)
        check_limit(limit)
        items = [i for i in self._downlink.get(device, {}).values()
                 if i.seq > after and (kind is None or i.kind == kind)]
        return [i.record() for i in items[:limit]]

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Up to ``limit`` items to send, in seq order, as stored after this call (see
        :mod:`crdtsync_server.store.sqlite.downlink`). :class:`NotFound` for an unknown device."""
        self._check_open()
        check_limit(limit)
        record = self._require_device(device)
        picked: list[Downlink] = []
        for item in self._downlink.get(device, {}).values():
            if len(picked) >= limit:
                break
            if item.seq <= record.down_done or item.status not in ("queued", "delivered"):
                continue
            if item.status == "queued" and item.expires is not None and item.expires <= now:
                item.set_status("expired", now)
                continue
            if item.kind == "command" and item.status == "queued":
                item.set_status("delivered", now)
            picked.append(item.record())
        return picked

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """``pending`` -> ``running``; ``None`` unless this call moved it."""
        self._check_open()
        request = self._requests.get((device, request_id))
        if request is None or request.status != "pending":
            return None
        request.set_status("running", now)
        request.runner = self.instance
        return request.record()

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """``running`` -> ``done`` with ``outcome``; does nothing if the request is not
        running (unknown, never claimed, or already finished: the first outcome stays)."""
        self._check_open()
        outcome_json = json_text(dict(outcome))
        request = self._requests.get((device, request_id))
        if request is not None and request.status == "running":
            request.set_status("done", now, outcome_json)
            self._append_wakes([wake_device(device)], now)

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""
        self._check_open()
        request = self._requests.get((device, request_id))
        return None if request is None else request.record()

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device by ``updated`` then id, at most ``limit``."""
        self._check_open()
        check_limit(limit)
        done = sorted((r for r in self._requests.values()
                       if r.device == device and r.status == "done"),
                      key=lambda r: (r.updated, r.id))
        return [r.record() for r in done[:limit]]

    async def heartbeat(self, now: int) -> None:
        """Record that this instance is alive at ``now`` (ms)."""
        self._check_open()
        self._instances[self.instance] = max(now, self._instances.get(self.instance, now))

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int,
                                stale_ms: int = 0) -> int:
        """Finish the ``running`` requests whose runner is gone with ``outcome`` (see
        ``DownlinkStore.interrupt_running``); returns how many."""
        self._check_open()
        outcome_json = json_text(dict(outcome))
        alive = {i for i, seen in self._instances.items() if seen >= now - stale_ms}
        alive.add(self.instance)
        running = [r for r in self._requests.values()
                   if r.status == "running" and r.runner not in alive]
        for request in running:
            request.set_status("done", now, outcome_json)
        self._append_wakes(sorted({wake_device(r.device) for r in running}), now)
        return len(running)

    async def purge_finished(self, before: int) -> int:
        """Delete finished downlink items and acknowledged requests older than ``before``."""
        self._check_open()
        gone = 0
        for items in self._downlink.values():
            for seq in [s for s, i in items.items()
                        if i.status in FINISHED_DOWNLINK and i.updated < before]:
                del self._items[items.pop(seq).id]
                gone += 1
        for key in [k for k, r in self._requests.items()
                    if r.status == "acked" and r.updated < before]:
            del self._requests[key]
            gone += 1
        return gone

    def _ack_downlink(
        self, device: DeviceRecord, write: SyncWrite,
        results: Sequence[tuple[CommandResult, str, str | None, str | None]],
    ) -> int:
        done = max(device.down_done, min(write.down_done, device.down_seq))
        items = self._downlink.get(device.id, {})
        if done > device.down_done:
            for item in items.values():
                if item.seq > done:
                    break
                if item.kind == "message" and item.status == "queued":
                    item.set_status("delivered", write.time)
        for r, status, result, error in results:
            command = items.get(r.seq)
            if (r.seq <= done and command is not None and command.kind == "command"
                    and command.status in ("queued", "delivered")):
                command.set_status(status, write.time)
                command.result, command.error = result, error
        return done

    def _insert_requests(self, device: str, write: SyncWrite, bodies: Sequence[str]
                         ) -> tuple[str, ...]:
        new: list[str] = []
        for r, body in zip(write.requests, bodies, strict=True):
            if (device, r.id) not in self._requests:
                self._requests[(device, r.id)] = RequestRow(
                    device, r.id, r.route, body, r.created, updated=write.time)
                new.append(r.id)
        return tuple(new)

    def _ack_outcomes(self, device: str, write: SyncWrite) -> None:
        """Move the requests whose outcome the device stored from ``done`` to ``acked``."""
        for request_id in write.outcomes_acked:
            request = self._requests.get((device, request_id))
            if request is not None and request.status == "done":
                request.set_status("acked", write.time)
