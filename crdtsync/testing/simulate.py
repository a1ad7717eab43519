"""``crdtsync simulate``: run seeded simulations from the command line with a progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .clocks import ClockPlan
from .faults import FaultPlan
from .simulation import SimReport, Simulation


class Progress:
    """A one-line progress bar on a terminal (plain periodic lines when not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream: TextIO = stream or sys.stderr
        self.width = width
        self.started = time.perf_counter()
        self._last = -1.0
        self._tty = self.stream.isatty()

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if done < self.total and now - self._last < (0.1 if self._tty else 2.0):
            return
        self._last = now
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {done}/{self.total} steps {now - self.started:5.1f}s {note}"
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        if self._tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


async def simulate(*, devices: int, servers: int, steps: int, seeds: Sequence[int],
                   faults: Sequence[str], rate: float, progress: bool = True,
                   out: TextIO | None = None, skew: bool = False,
                   database: str = "sqlite") -> int:
    """Run one simulation per seed; print each report; 0 only if every invariant held.
    ``skew``: with :meth:`ClockPlan.skewed` clocks. ``database``: ``"sqlite"`` or a
    ``postgresql://`` URL (``Simulation(database=)``).

    Raises ``ValueError`` for an unknown fault name or database."""
    out = out or sys.stdout
    plan = FaultPlan.from_names(faults, rate)
    clocks = ClockPlan.skewed() if skew else None
    bar = Progress(steps * len(seeds)) if progress else None
    failed = 0
    for index, seed in enumerate(seeds):
        report = await _one(devices, servers, steps, seed, plan, bar, index * steps, clocks,
                            database)
        out.write(report.describe() + "\n")
        failed += not report.ok
    if len(seeds) > 1:
        out.write(f"{len(seeds) - failed}/{len(seeds)} seeds held every invariant\n")
    return 1 if failed else 0


async def _one(devices: int, servers: int, steps: int, seed: int, plan: FaultPlan,
               bar: Progress | None, offset: int, clocks: ClockPlan | None, database: str
               ) -> SimReport:
    started = time.perf_counter()
    async with Simulation(devices=devices, servers=servers, seed=seed, faults=plan,
                          clocks=clocks, database=database) as sim:
        for done in range(1, steps + 1):
            await sim.step()
            if bar is not None:
                bar.update(offset + done, f"seed {seed}")
        await sim.settle()
        await sim.check()
        sim.report.seconds = time.perf_counter() - started
        return sim.report
