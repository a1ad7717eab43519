"""Latest write wins, as a property: Hypothesis interleaves device writes and deletes, cloud
writes and deletes, syncs, the passing of time, device clocks set to other offsets and device
restarts, for two devices with random client ids and clocks off by up to an hour, against the
real device and server code (``crdtsync.testing.Simulation``, perfect network). At the end
everything syncs, and on the cloud and on both devices every key holds the write that came
last in true time, wherever the gap exceeds the correction error of the device's write
(``crdtsync.testing.latest``); every correction within the documented limits is within its
bound."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from crdtsync.testing import ClockPlan, SimDevice, Simulation

HOUR = 3_600_000
OFFSETS = st.sampled_from([-HOUR, -60_000, -1_000, 0, 1_000, 60_000, HOUR])
KEYS = st.integers(0, 1)
WAITS = st.sampled_from([0, 1, 250, 1000, 4000])


class LatestMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sim: Simulation | None = None
        self.writes = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize(seed=st.integers(0, 2**16), servers=st.integers(1, 2),
                offsets=st.tuples(OFFSETS, OFFSETS),
                drift=st.sampled_from([-200.0, 0.0, 200.0]),
                latency=st.sampled_from([(0, 0), (1, 200)]))
    def start(self, seed: int, servers: int, offsets: tuple[int, int], drift: float,
              latency: tuple[int, int]) -> None:
        """Two devices with random client ids (drawn from the seed) and wrong clocks; each
        syncs once first (it was online before: a write made before a device ever synced
        is stamped before it knew its offset, a documented limit)."""
        self.sim = Simulation(devices=2, servers=servers, seed=seed, concurrent_writes=0.0,
                              clocks=ClockPlan(latency_ms=latency), latest=True)
        self.run(self.sim.start())
        for device, offset in zip(self.sim.devices, offsets, strict=True):
            device.clock.set_offset(offset)
            device.clock.drift_ppm = drift
        self.sim.advance(1)
        for device in self.sim.devices:
            assert self.run(self.sim.sync_device(device))

    def device(self, index: int) -> SimDevice:
        assert self.sim is not None
        return self.sim.devices[index]

    @rule(i=st.integers(0, 1), k=KEYS, delete=st.booleans())
    def device_write(self, i: int, k: int, delete: bool) -> None:
        assert self.sim is not None
        device, key = self.device(i), f"shared.{k}"
        if device.device is None or (delete and key not in device.device.state):
            return
        self.sim.device_write(device, key, None if delete else self.sim.unique(f"{device.id}:"))
        self.writes += 1

    @rule(i=st.integers(0, 1), k=KEYS, delete=st.booleans())
    def cloud_write(self, i: int, k: int, delete: bool) -> None:
        assert self.sim is not None
        value = None if delete else self.sim.unique("cloud:")
        self.run(self.sim.cloud_write(self.device(i).id, f"shared.{k}", value))
        self.writes += 1

    @rule(i=st.integers(0, 1), k=KEYS, device_first=st.booleans(), gap=WAITS,
          delete=st.booleans())
    def both_write(self, i: int, k: int, device_first: bool, gap: int, delete: bool) -> None:
        """The device (offline) and the cloud write one key ``gap`` ms apart, either first:
        the interleaving that decides a conflict, made common."""
        first, second = ((self.device_write, self.cloud_write) if device_first
                         else (self.cloud_write, self.device_write))
        first(i, k, delete and not device_first)
        self.wait(gap)
        second(i, k, delete and device_first)

    @rule(i=st.integers(0, 1))
    def sync(self, i: int) -> None:
        assert self.sim is not None
        assert self.run(self.sim.sync_device(self.device(i)))

    @rule(ms=WAITS)
    def wait(self, ms: int) -> None:
        assert self.sim is not None
        self.sim.advance(ms)

    @rule(i=st.integers(0, 1), offset=OFFSETS)
    def set_clock(self, i: int, offset: int) -> None:
        self.device(i).clock.set_offset(offset)

    @rule(i=st.integers(0, 1))
    def restart(self, i: int) -> None:
        device = self.device(i)
        self.run(device.crash())
        self.run(device.start())

    def teardown(self) -> None:
        if self.sim is not None:
            try:
                self.run(self.sim.settle())
                self.run(self.sim.check())
                report = self.sim.report
                assert report.ok, report.describe()
                assert report.latest_checked > 0 or self.writes == 0, report.describe()
            finally:
                self.run(self.sim.aclose())
        self.loop.close()


TestLatestMachine = LatestMachine.TestCase
TestLatestMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                      derandomize=True,
                                      suppress_health_check=[HealthCheck.too_slow])
