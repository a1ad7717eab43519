"""The wake log in memory (the :class:`~crdtsync_server.store.roles.WakeStore` role); the
entries themselves are appended by the writes they announce (``MemoryState._append_wakes``)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from ..records import WakeEntry
from ..rules import check_limit
from .state import MemoryState


class MemoryWakes(MemoryState):
    """The :class:`WakeStore` role over :class:`MemoryState`."""

    def on_wakes(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(head)`` after each write of this store that appended entries."""
        self._wake_listeners.append(callback)

    async def add_wakes(self, targets: Sequence[str], now: int) -> int:
        """Append one entry per target; returns the head."""
        self._check_open()
        self._append_wakes(targets, now)
        return self._wake_head

    async def wake_head(self) -> int:
        """The highest cursor ever given out (0: none)."""
        self._check_open()
        return self._wake_head

    async def read_wakes(self, after: int, limit: int) -> list[WakeEntry]:
        """Entries with cursor > ``after`` in cursor order, at most ``limit`` (>= 0)."""
        self._check_open()
        check_limit(limit)
        start = bisect.bisect_right(self._wakes, after, key=lambda entry: entry.cursor)
        return self._wakes[start:start + limit]

    async def wake_pending(self, targets: Sequence[str], after: int) -> bool:
        """See ``WakeStore.wake_pending``."""
        self._check_open()
        if after < self._wake_floor or after > self._wake_head:
            return True
        wanted = set(targets)
        entries = await self.read_wakes(after, len(self._wakes))
        return any(entry.target in wanted for entry in entries)

    async def purge_wakes(self, before: int) -> int:
        """Delete the oldest entries, in cursor order, up to the first one written at or
        after ``before`` (ms); the head stays."""
        self._check_open()
        gone = next((i for i, entry in enumerate(self._wakes) if entry.at >= before),
                    len(self._wakes))
        if gone:
            self._wake_floor = self._wakes[gone - 1].cursor
            del self._wakes[:gone]
        return gone
