"""Fault plans and the simulated network between simulated devices and server instances.

The network is a :class:`~crdtsync.transport.Transport` per device that hands request bodies
to an in-process server instance (the real ``process_sync``), and injects faults decided by
the simulation's seeded random generator: a request lost before the server saw it, a
response lost after the server committed, a request delivered twice, a request held back and
delivered later (delay) or out of order (reorder), a device partitioned for many steps, and
crashes of devices and servers at chosen points.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, fields

from ..errors import CrdtsyncError, TransportError
from ..protocol import decode_error, encode_error

FAULT_NAMES = ("drop", "dup", "reorder", "delay", "partition", "crash")
"""Names accepted by :meth:`FaultPlan.from_names` and ``crdtsync simulate --faults``."""


class Crash(BaseException):
    """Raised at a crash point to kill a simulated device or server instance.

    A ``BaseException`` on purpose: library code that handles ``Exception`` must not be able
    to swallow a simulated process death.
    """


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Probabilities of each fault, per request or per step. All zero: a perfect network."""

    drop_request: float = 0.0
    """A request is lost before the server sees it."""
    drop_response: float = 0.0
    """The server commits, then the response is lost."""
    duplicate: float = 0.0
    """The server receives the same request twice."""
    delay: float = 0.0
    """A request is held back and delivered some steps later (the device times out)."""
    reorder: float = 0.0
    """Held-back requests are delivered in shuffled order."""
    partition: float = 0.0
    """Per step: a device loses the network for several steps."""
    partition_steps: tuple[int, int] = (3, 30)
    crash_device: float = 0.0
    """Per crash point: the device process dies (memory lost, SQLite file kept)."""
    crash_server: float = 0.0
    """Per crash point: a server instance dies (caches lost, database kept)."""

    @classmethod
    def from_names(cls, names: Iterable[str], rate: float = 0.05) -> FaultPlan:
        """A plan enabling the named faults (see :data:`FAULT_NAMES`) at ``rate`` each."""
        values: dict[str, float] = {}
        for name in names:
            if name not in FAULT_NAMES:
                raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULT_NAMES)}")
            keys = {"drop": ("drop_request", "drop_response"), "dup": ("duplicate",),
                    "reorder": ("reorder", "delay"), "delay": ("delay",),
                    "partition": ("partition",),
                    "crash": ("crash_device", "crash_server")}[name]
            for key in keys:
                values[key] = rate
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def everything(cls, rate: float = 0.05) -> FaultPlan:
        return cls.from_names(FAULT_NAMES, rate)

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self)
                if f.name != "partition_steps" and getattr(self, f.name) > 0]


ServerCall = Callable[[str, bytes], Awaitable[bytes]]


@dataclass
class Held:
    """A request held back by the network, delivered at or after ``due`` (a step number)."""

    device: str
    token: str
    body: bytes
    due: int


@dataclass
class Network:
    """Decides the fate of every request; counts what it did in ``injected``."""

    plan: FaultPlan
    rng: random.Random
    step: int = 0
    partitioned_until: dict[str, int] = field(default_factory=dict)
    held: list[Held] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    perfect: bool = False
    """Settling: no new faults (held requests are still delivered)."""

    def chance(self, probability: float, fault: str) -> bool:
        if self.perfect or probability <= 0 or self.rng.random() >= probability:
            return False
        self.injected[fault] += 1
        return True

    def maybe_partition(self, devices: list[str]) -> None:
        """Per step: perhaps cut one device off for a while."""
        if devices and self.chance(self.plan.partition, "partition"):
            device = self.rng.choice(devices)
            low, high = self.plan.partition_steps
            self.partitioned_until[device] = self.step + self.rng.randint(low, high)

    def is_partitioned(self, device: str) -> bool:
        return not self.perfect and self.partitioned_until.get(device, -1) > self.step

    async def send(self, device: str, token: str, body: bytes, server: ServerCall) -> bytes:
        """Carry one request to ``server`` and its answer back, with the planned faults."""
        if self.is_partitioned(device):
            raise TransportError("network unreachable (simulated partition)")
        if self.chance(self.plan.drop_request, "drop_request"):
            raise TransportError("request lost (simulated)")
        if self.chance(self.plan.delay, "delay"):
            self.held.append(Held(device, token, body, self.step + self.rng.randint(1, 20)))
            raise TransportError("request timed out (simulated delay)")
        answer = await call(server, token, body)
        if self.chance(self.plan.duplicate, "duplicate"):
            await call(server, token, body)
        if self.chance(self.plan.drop_response, "drop_response"):
            raise TransportError("response lost after the server committed (simulated)")
        return answer

    def due(self) -> list[Held]:
        """Held requests to deliver now (all of them once settling)."""
        ready = [h for h in self.held if self.perfect or h.due <= self.step]
        self.held = [h for h in self.held if h not in ready]
        if len(ready) > 1 and self.chance(self.plan.reorder, "reorder"):
            self.rng.shuffle(ready)
        return ready


async def call(server: ServerCall, token: str, body: bytes) -> bytes:
    """Call the server; an error leaves as the device would see it over HTTP (through an
    error frame), so the simulated device handles exactly what a real one gets."""
    try:
        return await server(token, body)
    except CrdtsyncError as exc:
        raise decode_error(encode_error(exc), exc.status) from None
