"""In-process wake-ups keyed by device, for long polls that wait on one device's commits.

``GET /v1/commands/{id}?wait=S`` waits for the command's result. Rather than re-reading the
database on a short timer (1,500 such waiters once saturated a server), a waiter sleeps on
:meth:`DeviceNotifier.wait` for its device and re-reads only when the sync path called
:meth:`DeviceNotifier.notify` after a commit that may have finished one of the device's
commands, or after ``poll`` seconds: that slow fallback is how it sees a result committed by
another server process on the same database.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from crdtsync.aio import wait_event


@dataclass(slots=True)
class _Waiters:
    """The coroutines waiting on one device, and the event that wakes them all."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


class DeviceNotifier:
    """Wakes the coroutines of this process that wait for a commit concerning a device.
    Holds nothing for devices nobody waits on."""

    def __init__(self, poll: float = 1.0) -> None:
        self.poll = poll
        """Seconds after which a waiter returns anyway, to re-read (other processes)."""
        self.closed = False
        """Set at server shutdown: waiters return at once."""
        self._waiting: dict[str, _Waiters] = {}

    def notify(self, device: str) -> None:
        """Called after a commit that may have finished a command of ``device``: wakes
        every coroutine waiting on it (later waiters wait for the next notification)."""
        waiters = self._waiting.pop(device, None)
        if waiters is not None:
            waiters.event.set()

    def waiting(self, device: str) -> int:
        """How many coroutines wait on ``device`` now."""
        waiters = self._waiting.get(device)
        return 0 if waiters is None else waiters.count

    async def wait(self, device: str, seconds: float) -> bool:
        """Wait for the next :meth:`notify` of ``device`` (``True``), or at most
        ``min(seconds, poll)`` seconds (``False``); returns at once when closed."""
        if self.closed:
            return True
        waiters = self._waiting.setdefault(device, _Waiters())
        waiters.count += 1
        try:
            return await wait_event(waiters.event, min(seconds, self.poll))
        finally:
            waiters.count -= 1
            if waiters.count == 0 and self._waiting.get(device) is waiters:
                del self._waiting[device]

    def close(self) -> None:
        """Server shutdown: release every waiter now."""
        self.closed = True
        for waiters in self._waiting.values():
            waiters.event.set()
        self._waiting.clear()
