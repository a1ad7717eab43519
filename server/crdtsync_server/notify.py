"""In-process wake-ups keyed by device, for long polls that wait on one device's commits.

``GET /v1/commands/{id}?wait=S`` waits for the command's result. Rather than re-reading the
database on a short timer (1,500 such waiters once saturated a server), a waiter holds a
:class:`Watch` on its device and re-reads only when the sync path called
:meth:`DeviceNotifier.notify` after a commit that stored results of the device's commands,
or after ``poll`` seconds: that slow fallback is how it sees a result committed by another
server process on the same database.

No wake-up is lost: a notification that arrives while the watcher is busy (reading the
store) is kept until its next :meth:`Watch.wait`, which then returns at once. A waiter
learns its device only from its first read; it compares :attr:`DeviceNotifier.notified`
around that read and reads again if a notification came in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from crdtsync._aio import wait_event


class Watch:
    """One waiter's registration on a device (see :meth:`DeviceNotifier.watch`)."""

    def __init__(self, poll: float) -> None:
        self._poll = poll
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """Return ``True`` once woken since the previous wait (at once if that already
        happened), ``False`` after ``min(seconds, poll)`` seconds without a wake-up."""
        woken = await wait_event(self._event, min(seconds, self._poll))
        self._event.clear()
        return woken


class DeviceNotifier:
    """Wakes the coroutines of this process that watch a device for commits concerning it.
    Holds nothing for devices nobody watches."""

    def __init__(self, poll: float = 1.0) -> None:
        self.poll = poll
        """Seconds after which a watcher's wait returns anyway, to re-read (other
        processes' commits)."""
        self.closed = False
        """Set at server shutdown: every watch is woken and waiters should answer."""
        self.notified = 0
        """How many notifications were sent so far, for any device."""
        self._watches: dict[str, set[Watch]] = {}

    def notify(self, device: str | None) -> None:
        """Called after a commit that stored results of ``device``'s commands: wakes every
        watch on it (``None``: on every device, when news may have been missed)."""
        self.notified += 1
        watched = self._watches.values() if device is None else [self._watches.get(device, ())]
        for watches in watched:
            for watch in watches:
                watch.wake()

    def waiting(self, device: str) -> int:
        """How many watches ``device`` has now."""
        return len(self._watches.get(device, ()))

    @contextlib.contextmanager
    def watch(self, device: str) -> Iterator[Watch]:
        """A :class:`Watch` on ``device``, registered until the block ends."""
        watch = Watch(self.poll)
        self._watches.setdefault(device, set()).add(watch)
        if self.closed:
            watch.wake()
        try:
            yield watch
        finally:
            watches = self._watches[device]
            watches.discard(watch)
            if not watches:
                del self._watches[device]

    def close(self) -> None:
        """Server shutdown: wake every watch now."""
        self.closed = True
        for watches in self._watches.values():
            for watch in watches:
                watch.wake()
