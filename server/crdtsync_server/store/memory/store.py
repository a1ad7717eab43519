"""An in-memory :class:`~crdtsync_server.store.roles.Store` for unit tests and simulations,
put together from one mixin per role over one :class:`~.state.MemoryState`.

It keeps the same contract as the SQLite store (the contract suites run against both):
monotonic update ids and event cursors that are never reused, compaction by id range,
rebuilds compared-and-set on generation and last update id, commits refused for a stale
generation, ``(device, seq)`` deduplication through
:func:`~crdtsync_server.store.rules.plan_events`, and all-or-nothing commits. Event bodies,
device and fleet metadata, downlink bodies and results, and request bodies and outcomes go
through JSON on the way in and out, exactly as they do in a database. The downlink, request
and fleet rules are those of :mod:`crdtsync_server.store.sqlite` (each in its role module).

Every method runs synchronously between two awaits, so each one is atomic on its event loop.
Nothing survives :meth:`MemoryStore.aclose`. Unlike a database store, a ``MemoryStore`` may
be used without calling :meth:`~MemoryStore.open` (it has nothing to connect to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..feed import event_rows, json_text
from ..records import CommitResult, SyncWrite
from ..rules import check_write, result_columns
from .devices import MemoryDevices
from .documents import MemoryDocuments
from .downlink import MemoryDownlink
from .feed import MemoryFeed
from .files import MemoryFiles
from .settings import MemorySettings
from .sinks import MemorySinks
from .wakes import MemoryWakes


class MemoryStore(MemoryDocuments, MemoryDevices, MemorySettings, MemoryDownlink, MemoryFiles,
                  MemoryFeed, MemorySinks, MemoryWakes):
    """A :class:`Store` held in dicts. Raises :class:`ClosedError` after :meth:`aclose`."""

    async def __aenter__(self) -> MemoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Nothing to connect to; raises :class:`ClosedError` after :meth:`aclose`."""
        self._check_open()

    async def aclose(self) -> None:
        """Drop everything; idempotent."""
        self._closed = True
        self._docs.clear()
        self._devices.clear()
        self._by_token.clear()
        self._fleets.clear()
        self._events.clear()
        self._digests.clear()
        self._settings.clear()
        self._items.clear()
        self._downlink.clear()
        self._requests.clear()
        self._sinks.clear()
        self._letters.clear()
        self._deleted_devices.clear()
        self._stamps.clear()
        self._wakes.clear()
        self._files.clear()
        self._uploads.clear()

    # the writes that span roles

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates and store new events atomically (see ``Store.commit``).

        Raises :class:`NotFound` for an unknown device, :class:`SeqGap` /
        :class:`SeqConflict` from :func:`plan_events`, and :class:`Unavailable` for a
        ``DocWrite`` of another generation than the stored one (``stale_generation``), in
        every case with nothing written;
        ``ValueError`` for device parts without a device, or a request whose ``device`` is
        not the write's."""
        self._check_open()
        check_write(write)
        self._check_generations(write.docs)
        if write.device is None:
            self._record_changes(write.changes, write.time)
            self._record_conflicts(write.conflicts, write.time)
            self._write_stamps(write.stamps)
            update_ids, prev_ids = self._append_updates(write.docs)
            self._append_wakes(write.wakes, write.time)
            return CommitResult(update_ids=update_ids, prev_ids=prev_ids)
        device = self._require_device(write.device)
        plan = self._plan(device, write)
        results = [(r, *result_columns(r)) for r in write.results]
        bodies = [json_text(r.body) for r in write.requests]
        # Everything that can fail has been checked: from here on the commit cannot half-apply.
        update_ids, prev_ids = self._append_updates(write.docs)
        fleet = device.fleet
        device = self._store_events(device, write.time, plan)
        self._append_feed(event_rows(device.id, fleet, write.time, plan.new))
        self._record_changes(write.changes, write.time)
        self._record_conflicts(write.conflicts, write.time)
        self._write_stamps(write.stamps)
        down_done = self._ack_downlink(device, write, results)
        new_requests = self._insert_requests(device.id, write, bodies)
        self._ack_outcomes(device.id, write)
        self._devices[device.id] = dataclasses.replace(device, down_done=down_done)
        self._append_wakes(write.wakes, write.time)
        return CommitResult(update_ids, device.last_seq, len(plan.new), down_done, new_requests,
                            prev_ids)

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device and what belongs to it (see ``Store.delete_device``).
        :class:`NotFound` for an unknown device."""
        self._check_open()
        device = self._devices.pop(self._require_device(device_id).id)
        self._unindex(device)
        for key in docs:
            self._replace_doc(key, 0, b"")
            self._stamps.pop(key, None)
        self._projection = {k: v for k, v in self._projection.items() if k[0] != device.id}
        for item in self._downlink.pop(device.id, {}).values():
            del self._items[item.id]
        self._requests = {k: r for k, r in self._requests.items() if k[0] != device.id}
        if events:
            self._feed = [item for item in self._feed if item.device != device.id]
            self._events = [e for e in self._events if e.device != device.id]
            self._digests = {k: d for k, d in self._digests.items() if k[0] != device.id}
        self._deleted_devices[device.id] = max(device.last_seq,
                                               self._deleted_devices.get(device.id, 0))
