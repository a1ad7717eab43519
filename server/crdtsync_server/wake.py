"""The live channel's server side: :class:`WakeHub` answers each device's held wake request
(``GET /v1/wake``, docs/protocol.md section 14a) as soon as the wake log holds an entry for
it, so an online device syncs within moments of a cloud write, a message, a command or a
proxied request's outcome instead of at its next interval.

One hub per server process. It follows the wake log (``store/roles.py``: :class:`WakeStore`)
from one tail task, never per device:

- entries this process commits are announced by the store (``on_wakes``) and read at once;
- entries other processes commit (several servers on one database) are found by re-reading
  the head every ``poll`` seconds, and only while some device is waiting. Nothing runs for
  an idle device: a waiter is a future in a dict (a few hundred bytes beside its HTTP
  connection).

A request names the last cursor its device saw (``after``). The hub remembers, per target,
the newest cursor it read since it started (``_last``); a cursor older than that (a device
that kept its cursor across a server restart) is checked against the store's index once.
Wake-ups of a whole fleet or of everyone are spread: each woken device is told to wait
``in`` ms before it syncs, so that ``rate`` devices per second sync, not all at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from crdtsync._aio import cancel_and_wait, log_crash, wait_event
from crdtsync.errors import CrdtsyncError, TooManyRequests
from crdtsync.protocol import MAX_WAKE_DELAY_MS, WakeSignal

from .store import DeviceRecord, WakeEntry, WakeStore, wake_device, wake_targets

log = logging.getLogger("crdtsync.server")

READ_BATCH = 1000
"""Entries read from the log per store call."""
REMEMBERED_TARGETS = 100_000
"""Targets whose newest cursor the hub keeps; beyond, it forgets them all and checks older
cursors against the store (bounded memory on a fleet of millions)."""
CLOSED = -1
"""What a held request's future is resolved with when the hub closes (answer ``wake: false``)."""
DEVICE_PREFIX = wake_device("")
RETRY_AFTER = (5, 30)
"""Seconds a device refused with ``too_many_requests`` is told to wait: random in this range,
so refused devices do not come back together."""


@dataclass(eq=False, slots=True)
class _Waiter:
    targets: tuple[str, ...]
    after: int
    answer: asyncio.Future[int] = field(default_factory=asyncio.Future)
    """Resolved with the delay (ms) before the device syncs, or :data:`CLOSED`."""


class WakeHub:
    """Holds the live channels of this process's devices (see the module docstring).

    ``hold``: longest a request is held (s); ``poll``: seconds between reads of the head
    while devices wait (other processes' entries); ``rate``: devices per second a fleet-wide
    wake-up lets sync; ``max_waiters``: channels held at most, then ``429``. ``clock`` is
    monotonic seconds (the spreading's time)."""

    def __init__(self, store: WakeStore, *, hold: float = 50.0, poll: float = 0.25,
                 rate: float = 500.0, max_waiters: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.hold = hold
        self.poll = poll
        self.rate = rate
        self.max_waiters = max_waiters
        self._clock = clock
        self.cursor = 0
        """The highest cursor read from the log."""
        self._since = 0
        """``_last`` knows every entry above this cursor."""
        self._last: dict[str, int] = {}
        self._waiting: dict[str, set[_Waiter]] = {}
        self._count = 0
        self._news = asyncio.Event()
        self._next_slot = 0.0
        self._reading = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def waiting(self) -> int:
        """Requests held now."""
        return self._count

    async def start(self) -> None:
        """Start at the log's head and follow it."""
        self.cursor = self._since = await self.store.wake_head()
        self.store.on_wakes(self._heard)
        self._task = asyncio.create_task(self._tail(), name="crdtsync-wake-tail")
        self._task.add_done_callback(log_crash)

    def _heard(self, head: int) -> None:
        if head > self.cursor:
            self._news.set()

    async def aclose(self) -> None:
        """Answer every held request and stop following the log."""
        self.release()
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    def release(self) -> None:
        """Server shutdown: every held request is answered now (``wake: false``), and so is
        every later one."""
        self.closed = True
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.answer.done():
                    waiter.answer.set_result(CLOSED)

    async def wait(self, device: DeviceRecord, after: int | None, seconds: float
                   ) -> WakeSignal:
        """Answer one wake request of ``device`` (protocol section 14a): at once when
        ``after`` is ``None`` (``wake: false``, the cursor to start from) or something for
        it was logged after ``after``; else once something is, or after ``seconds`` (at most
        :attr:`hold`). Raises :class:`TooManyRequests` when :attr:`max_waiters` are held."""
        if after is None or self.closed:
            return WakeSignal(False, self.cursor, 0)
        targets = wake_targets(device)
        delay = await self._due(targets, after)
        if delay is not None:
            return WakeSignal(True, self.cursor, delay)
        if self._count >= self.max_waiters:
            raise TooManyRequests(
                "this server holds as many live channels as it may; retry later",
                {"retry_after": random.randint(*RETRY_AFTER)})
        return await self._hold(_Waiter(targets, after), min(seconds, self.hold))

    async def _due(self, targets: tuple[str, ...], after: int) -> int | None:
        """The delay (ms) if the device must sync now, ``None`` if it may wait."""
        if after > self.cursor:
            await self._read()  # another process may have logged more than this one read
            if after > self.cursor:
                return self._spread()  # a cursor the log never gave out: a replaced database
        if after < self._since and await self.store.wake_pending(targets, after):
            return self._spread()
        due = [target for target in targets if self._last.get(target, 0) > after]
        return self._delay_for(due[0]) if due else None

    async def _hold(self, waiter: _Waiter, seconds: float) -> WakeSignal:
        """Hold ``waiter`` until the tail resolves it, the hold ends or the hub closes."""
        if not self._count:
            self._news.set()  # the tail now polls for other processes' entries
        for target in waiter.targets:
            self._waiting.setdefault(target, set()).add(waiter)
        self._count += 1
        try:
            async with asyncio.timeout(seconds):
                delay = await waiter.answer
        except TimeoutError:
            delay = CLOSED
        finally:
            self._count -= 1
            for target in waiter.targets:
                waiters = self._waiting[target]
                waiters.discard(waiter)
                if not waiters:
                    del self._waiting[target]
        return WakeSignal(delay != CLOSED, self.cursor, max(delay, 0))

    async def _tail(self) -> None:
        """Read the log whenever this process committed entries, and every :attr:`poll`
        seconds while devices wait; a failing read is logged and tried again."""
        while True:
            await wait_event(self._news, self.poll if self._count else None)
            self._news.clear()
            try:
                await self._read()
            except CrdtsyncError as exc:
                log.warning("live channel: reading the wake log failed (%s: %s)",
                            exc.code, exc.message)
                await asyncio.sleep(self.poll)

    async def catch_up(self) -> None:
        """Read the log up to its head now (the tail does so by itself; the simulator calls
        this to make a step's answer independent of when the tail task ran)."""
        await self._read()

    async def _read(self) -> None:
        """Take every entry above :attr:`cursor` (one reader at a time)."""
        async with self._reading:
            while entries := await self.store.read_wakes(self.cursor, READ_BATCH):
                self._take(entries)
                if len(entries) < READ_BATCH:
                    return

    def _take(self, entries: list[WakeEntry]) -> None:
        """Remember the entries and resolve the waiters they concern."""
        woken: dict[_Waiter, str] = {}
        for entry in entries:
            self._last[entry.target] = entry.cursor
            for waiter in self._waiting.get(entry.target, ()):
                if entry.cursor > waiter.after and not waiter.answer.done():
                    woken.setdefault(waiter, entry.target)
        self.cursor = entries[-1].cursor
        if len(self._last) > REMEMBERED_TARGETS:
            self._last.clear()
            self._since = self.cursor
        for waiter, target in woken.items():
            if not waiter.answer.done():
                waiter.answer.set_result(self._delay_for(target))

    def _delay_for(self, target: str) -> int:
        """No delay for a device's own wake-up; a slot of the spread for a fleet's or
        everyone's."""
        return 0 if target.startswith(DEVICE_PREFIX) else self._spread()

    def _spread(self) -> int:
        """The next free slot, ``1 / rate`` s after the previous one, as ms from now
        (at most ``MAX_WAKE_DELAY_MS``)."""
        now = self._clock()
        slot = min(max(now, self._next_slot), now + MAX_WAKE_DELAY_MS / 1000)
        self._next_slot = slot + 1 / self.rate
        return round((slot - now) * 1000)
