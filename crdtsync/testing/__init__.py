"""Tools to test apps built on crdtsync: a deterministic simulation of devices, server
instances and a faulty network (:class:`Simulation`), the faults it injects
(:class:`FaultPlan`), the clocks of devices and servers (:class:`ClockPlan`,
:class:`SkewedClock`), and the model its invariants check against.

Needs the reference server package (``crdtsync_server``), installed with crdtsync.
See docs/testing.md.
"""

from __future__ import annotations

from .clocks import ClockPlan, SkewedClock
from .faults import FAULT_NAMES, Crash, FaultPlan
from .invariants import Model
from .proxy import FaultProxy
from .simulation import SimDevice, SimReport, Simulation

__all__ = [
    "FAULT_NAMES",
    "ClockPlan",
    "Crash",
    "FaultPlan",
    "FaultProxy",
    "Model",
    "SimDevice",
    "SimReport",
    "Simulation",
    "SkewedClock",
]
