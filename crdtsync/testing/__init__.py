"""Tools to test apps built on crdtsync: a deterministic simulation of devices, server
instances and a faulty network (:class:`Simulation`), the faults it injects
(:class:`FaultPlan`), the clocks of devices and servers (:class:`ClockPlan`,
:class:`SkewedClock`), and the model its invariants check against.

Needs the reference server package (``crdtsync_server``), installed with crdtsync.
See docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # at run time __getattr__ imports on first access: FAULT_NAMES alone (the
    # CLI's parser) must not load the server, which only the simulation needs
    from .clocks import ClockPlan, SkewedClock
    from .fault_proxy import FaultProxy
    from .faults import FAULT_NAMES, Crash, FaultPlan
    from .invariants import Model
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

if not TYPE_CHECKING:  # hidden from mypy, which would type a misspelt name as object
    __getattr__, __dir__ = lazy_exports(__name__, {
        "clocks": ["ClockPlan", "SkewedClock"],
        "faults": ["FAULT_NAMES", "Crash", "FaultPlan"],
        "invariants": ["Model"],
        "fault_proxy": ["FaultProxy"],
        "simulation": ["SimDevice", "SimReport", "Simulation"],
    })
