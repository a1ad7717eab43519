"""Hybrid logical clocks: the stamps that decide which write of a key is the latest.

A stamp is one unsigned 64-bit integer, ``ms << 16 | counter``: milliseconds since the
Unix epoch in the high 48 bits (enough until the year 10889) and a 16-bit counter that
orders writes within one millisecond. Comparing two stamps as integers compares them by
time, then by counter. A clock never issues the same stamp twice and never goes backwards,
whatever its wall clock does (a wall clock stepping back keeps the last millisecond and
counts on; a counter overflow carries into the millisecond). :meth:`HybridClock.observe`
moves the clock past a stamp seen from elsewhere, so a write made after seeing another one
gets a greater stamp even when the two wall clocks disagree: causality holds when clocks
tie or lag (docs/protocol.md, "Conflicts").

The wall clock is injected (``wall``: a function returning milliseconds), so tests and the
simulator can run devices with skewed and drifting clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_STAMP = 2**64 - 1


def wall_ms() -> int:
    """The system clock in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def stamp(ms: int, counter: int = 0) -> int:
    """The stamp for ``ms`` milliseconds and ``counter``."""
    return (max(0, ms) << COUNTER_BITS) | (counter & COUNTER_MASK)


def stamp_ms(value: int) -> int:
    """The milliseconds of stamp ``value``."""
    return value >> COUNTER_BITS


def shift(value: int, ms: int) -> int:
    """Stamp ``value`` moved by ``ms`` milliseconds (counter kept, never below 0)."""
    return max(0, value + (ms << COUNTER_BITS))


class HybridClock:
    """Issues strictly increasing stamps from ``wall`` (milliseconds) plus ``offset``.

    ``last`` is the greatest stamp issued or observed; persist it and pass it back after a
    restart so stamps keep increasing across restarts even if the wall clock was reset.
    """

    def __init__(self, wall: Callable[[], int] = wall_ms, *, last: int = 0,
                 offset: int = 0) -> None:
        self.wall = wall
        self.last = last
        self.offset = offset
        """Milliseconds added to the wall clock (a device's estimate of the server's clock
        minus its own)."""

    def physical(self) -> int:
        """The clock's time in ms without issuing a stamp: the wall clock plus ``offset``,
        or the last stamp's millisecond if that is later."""
        return max(self.wall() + self.offset, stamp_ms(self.last))

    def now(self) -> int:
        """A new stamp, greater than every stamp issued or observed so far."""
        candidate = stamp(self.wall() + self.offset)
        self.last = candidate if candidate > self.last else self.last + 1
        return self.last

    def observe(self, seen: int) -> None:
        """Make every later stamp greater than ``seen`` (a stamp from another clock)."""
        if seen > self.last:
            self.last = min(seen, MAX_STAMP - 1)
