"""Events, the change feed and the projection of the memory store (the
:class:`~crdtsync_server.store.roles.FeedStore` role), and their part of a commit."""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_right
from collections.abc import Sequence

from ..feed import (
    Changes,
    ConflictRecord,
    FeedFilter,
    FeedItem,
    FeedRow,
    ProjectionRow,
    StateChange,
    change_row,
    conflict_row,
    event_json,
    item_from_row,
    json_text,
    projection_writes,
    purgeable_prefix,
)
from ..records import DeviceRecord, StoredEvent, SyncWrite
from ..rules import EventPlan, check_limit, event_digest, plan_events
from .state import EventRow, MemoryState


class MemoryFeed(MemoryState):
    """The :class:`FeedStore` role over :class:`MemoryState`."""

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        found: list[StoredEvent] = []
        start = bisect_right(self._events, after, key=lambda e: e.cursor)
        for e in self._events[start:]:
            if len(found) >= limit:
                break
            if (device is None or e.device == device) and (topic is None or e.topic == topic):
                found.append(e.stored())
        return found

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""
        self._check_open()
        check_limit(limit)
        where = where or FeedFilter()
        start = bisect_right(self._feed, after, key=lambda item: item.cursor)
        found: list[FeedItem] = []
        for item in self._feed[start:]:
            if len(found) >= limit:
                break
            if where.matches(item):
                found.append(item)
        return found

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any)."""
        self._check_open()
        return self._last_cursor

    async def feed_floor(self) -> int:
        """The highest purged cursor (0 when nothing was purged)."""
        self._check_open()
        return self._feed_floor

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items (see ``Store.purge_feed``); returns how many."""
        self._check_open()
        count = purgeable_prefix([(i.cursor, i.received) for i in self._feed], before,
                                 keep_after)
        if not count:
            return 0
        gone, self._feed = self._feed[:count], self._feed[count:]
        self._feed_floor = gone[-1].cursor
        purged = {(i.device, i.seq) for i in gone if i.seq is not None}
        self._events = [e for e in self._events if (e.device, e.seq) not in purged]
        for device, seq in purged:
            self._digests.pop((device, seq), None)
        return count

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows ordered by (device, doc, map, key), after ``after``."""
        self._check_open()
        check_limit(limit)
        keys = sorted(k for k in self._projection
                      if (device is None or k[0] == device) and k > after)[:limit]
        return [ProjectionRow(*k, json.loads(self._projection[k][0]), self._projection[k][1])
                for k in keys]

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows``."""
        self._check_open()
        for stale in [k for k in self._projection if k[:2] == (device, doc)]:
            del self._projection[stale]
        for name, keys in rows.items():
            for key, value in keys.items():
                if value is not None:
                    self._projection[(device, doc, name, key)] = (json_text(value), now)

    def _plan(self, device: DeviceRecord, write: SyncWrite) -> EventPlan:
        stored = {
            e.seq: self._digests[(device.id, e.seq)]
            for e in write.events
            if e.seq <= device.last_seq and (device.id, e.seq) in self._digests
        }
        return plan_events(device.id, device.last_seq, write.purged, write.events, stored,
                           seq_floor=device.seq_floor)

    def _store_events(self, device: DeviceRecord, received: int, plan: EventPlan) -> DeviceRecord:
        for e in plan.new:
            cursor = self._events[-1].cursor + 1 if self._events else 1
            self._events.append(
                EventRow(cursor, device.id, e.seq, e.topic, e.time, received, event_json(e))
            )
            self._digests[(device.id, e.seq)] = event_digest(e)
        last_seq = max(device.last_seq, plan.new[-1].seq) if plan.new else device.last_seq
        updated = dataclasses.replace(
            device, last_seq=last_seq, events_lost=device.events_lost + plan.lost,
            last_sync=received,
        )
        self._devices[device.id] = updated
        return updated

    def _append_feed(self, rows: Sequence[FeedRow]) -> None:
        for row in rows:
            self._last_cursor += 1
            self._feed.append(item_from_row(self._last_cursor, row))

    def _record_changes(self, changes: Sequence[StateChange], now: int) -> None:
        for change in changes:
            owner = self._devices.get(change.device)
            self._append_feed([change_row(change, owner.fleet if owner else None, now)])
            for name, key, value in projection_writes(change):
                row_key = (change.device, change.doc, name, key)
                if value is None:
                    self._projection.pop(row_key, None)
                else:
                    self._projection[row_key] = (value, now)

    def _record_conflicts(self, conflicts: Sequence[ConflictRecord], now: int) -> None:
        for record in conflicts:
            owner = self._devices.get(record.device)
            self._append_feed([conflict_row(record, owner.fleet if owner else None, now)])
