"""Simulated clocks: every device's wall clock and every server instance's, all wrong in
planned ways, over the simulation's own true time.

A :class:`Simulation` keeps one true time (milliseconds; it moves forward between steps and,
with ``latency``, while a request or response travels). Each device reads it through a
:class:`SkewedClock`: an offset, a drift (parts per million of the time since the clock was
last set), and, drawn per step, a step to another offset (an NTP correction, a user setting
the clock) or a reset to 1970-01-01 (a device whose real-time clock lost power). The device's
clock survives a crash of its process, as hardware does. A server instance reads the true
time plus its own fixed offset. Which devices and servers take an injected clock is the
simulation's business (``Device(..., clock=)``, ``SyncService(..., clock=)``); the clocks
also answer what the invariants need to know: how wrong a clock was at a given time, and
whether it was set between two times.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class ClockPlan:
    """How wrong the simulated clocks are. All zero (the default): every clock reads the
    true time, and nothing is drawn from the random generator."""

    offset_ms: int = 0
    """Each device's clock starts off by a uniform draw in ``[-offset_ms, offset_ms]``."""
    drift_ppm: float = 0.0
    """Each device's clock runs fast or slow by a uniform draw in ``[-drift_ppm,
    drift_ppm]`` parts per million (quartz: tens of ppm; a cheap RTC: hundreds)."""
    step: float = 0.0
    """Per simulation step and device: the clock is set to a new offset (drawn as above)."""
    reset: float = 0.0
    """Per simulation step and device: the clock restarts from 1970-01-01 00:00 UTC."""
    server_offset_ms: int = 0
    """Each server instance's clock is off by a uniform draw in ``[-x, x]`` (fixed)."""
    latency_ms: tuple[int, int] = (0, 0)
    """Each request, and each response, takes a uniform draw of this many ms of true time."""

    @classmethod
    def skewed(cls, *, offset_ms: int = HOUR_MS, drift_ppm: float = 200.0,
               step: float = 0.002, reset: float = 0.0, server_offset_ms: int = 0,
               latency_ms: tuple[int, int] = (2, 300)) -> ClockPlan:
        """Device clocks up to an hour off, drifting, now and then set to another offset;
        requests and responses taking 2-300 ms. ``reset`` is off by default: a clock back at
        1970 is a documented limit of the correction (its offline writes are stamped at
        their sync), not something the latest-write invariant can hold through."""
        return cls(offset_ms=offset_ms, drift_ppm=drift_ppm, step=step, reset=reset,
                   server_offset_ms=server_offset_ms, latency_ms=latency_ms)

    @property
    def enabled(self) -> bool:
        return bool(self.offset_ms or self.drift_ppm or self.step or self.reset
                    or self.server_offset_ms or any(self.latency_ms))

    def draw_offset(self, rng: random.Random) -> int:
        return rng.randint(-self.offset_ms, self.offset_ms) if self.offset_ms else 0

    def draw_drift(self, rng: random.Random) -> float:
        return rng.uniform(-self.drift_ppm, self.drift_ppm) if self.drift_ppm else 0.0

    def draw_latency(self, rng: random.Random) -> int:
        low, high = self.latency_ms
        return rng.randint(low, high) if high else 0


@dataclass
class SkewedClock:
    """A wall clock (call it: milliseconds since the epoch) that reads ``true()`` wrong.

    Since it was last set (at true time ``anchor``) it reads ``base + (t - anchor) * (1 +
    drift_ppm / 1e6)``; setting it to an offset makes ``base = anchor + offset``, a reset
    makes ``base = 0``. ``settings`` lists the true times it was set after its creation."""

    true: Callable[[], int]
    offset: int = 0
    drift_ppm: float = 0.0
    anchor: int = 0
    base: int = 0
    settings: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.anchor = self.true()
        self.base = self.anchor + self.offset

    def __call__(self) -> int:
        elapsed = self.true() - self.anchor
        return self.base + elapsed + round(elapsed * self.drift_ppm / 1e6)

    def set_offset(self, offset: int) -> None:
        """The clock is set to read the true time plus ``offset`` from now on."""
        self.anchor = self.true()
        self.base = self.anchor + offset
        self.offset = offset
        self.settings.append(self.anchor)

    def reset(self) -> None:
        """The clock restarts at 0 (1970-01-01) now."""
        self.anchor = self.true()
        self.base = 0
        self.offset = -self.anchor
        self.settings.append(self.anchor)

    def error(self) -> int:
        """How far the clock reads from the true time now (ms; positive: ahead)."""
        return self() - self.true()

    def set_between(self, start: int, end: int) -> bool:
        """True when the clock was set (stepped or reset) at a true time in
        ``[start, end]``."""
        return any(start <= t <= end for t in self.settings)


def device_takes_clock() -> bool:
    """True when :class:`~crdtsync.Device` takes ``clock=`` (a wall clock in ms)."""
    from ..device import Device

    return _takes_clock(Device.__init__)


def server_takes_clock() -> bool:
    """True when the server's ``SyncService`` takes ``clock=`` (a wall clock in ms)."""
    from crdtsync_server.sync import SyncService

    return _takes_clock(SyncService.__init__)


def _takes_clock(init: Any) -> bool:
    """True when ``init`` takes ``clock=``: names it, or takes any keyword (a class compiled
    with mypyc shows only ``*args, **kwargs``)."""
    parameters = inspect.signature(init).parameters.values()
    return any(p.name == "clock" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
