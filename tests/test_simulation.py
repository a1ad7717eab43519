"""The simulation harness: thousands of faulted operations across seeds, determinism, user
hooks, a planted bug it must catch, and a Hypothesis state machine that shrinks schedules."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from crdtsync.testing import (
    FAULT_NAMES,
    ClockPlan,
    FaultPlan,
    SimDevice,
    Simulation,
    SkewedClock,
)
from crdtsync.testing.latest import DELETED, Delivery, TimedWrite, allowed_finals
from crdtsync_server.store import rules as store_base

from .services import require_postgres

SWEEP = [
    # (seed, devices, servers, faults, rate, steps)
    *[(seed, 3, 1, FAULT_NAMES, 0.05, 300) for seed in range(8)],
    *[(100 + seed, 4, 2, FAULT_NAMES, 0.05, 300) for seed in range(8)],
    *[(200 + seed, 3, 3, ("crash",), 0.15, 250) for seed in range(4)],
    *[(300 + seed, 2, 1, ("drop", "dup", "reorder", "delay"), 0.2, 250) for seed in range(4)],
    *[(400 + seed, 5, 2, ("partition", "crash"), 0.08, 250) for seed in range(4)],
]


@pytest.mark.parametrize(("seed", "devices", "servers", "faults", "rate", "steps"), SWEEP,
                         ids=[f"seed{s[0]}-{s[1]}dev-{s[2]}srv-{'+'.join(s[3])}" for s in SWEEP])
async def test_invariants_hold_under_faults(seed: int, devices: int, servers: int,
                                            faults: tuple[str, ...], rate: float,
                                            steps: int) -> None:
    async with Simulation(devices=devices, servers=servers, seed=seed,
                          faults=FaultPlan.from_names(faults, rate)) as sim:
        report = await sim.run(steps)
    assert report.ok, report.describe()
    assert sum(report.faults.values()) > 0  # the run really was faulted
    assert report.syncs_ok > 0 and report.events_delivered > 0


async def test_rebuilds_under_faults_keep_every_invariant() -> None:
    """The cloud rebuilds documents into new generations while devices are offline,
    partitioned, crash (also just before adopting or clearing their dirty keys) and server
    instances crash just before or after the rebuild's transaction: every invariant holds
    (no lost write, no resurrected delete, convergence, feed and log replay). Four seeds, so
    that every crash point is drawn in some run."""
    faults: Counter[str] = Counter()
    rebuilt = 0
    for seed in (12, 15, 21, 25):
        async with Simulation(devices=3, servers=2, seed=seed,
                              faults=FaultPlan.everything(0.08)) as sim:
            report = await sim.run(400)
            store = sim.pick_server().services.store  # type: ignore[union-attr]
            generations = [(await store.load_doc(f"{d.id}/state")).gen for d in sim.devices]
        assert report.ok, report.describe()
        assert report.operations["rebuilt"] >= 5 and min(generations) >= 2
        faults += report.faults
        rebuilt += report.operations["rebuilt"]
    assert rebuilt >= 40
    assert faults["crash_server before rebuild"] and faults["crash_server after rebuild"]
    assert faults["crash_device before replace_doc"] and faults["crash_device before clear_dirty"]


async def test_same_seed_same_run() -> None:
    reports = []
    for _ in range(2):
        async with Simulation(devices=3, servers=2, seed=42,
                              faults=FaultPlan.everything(0.08)) as sim:
            reports.append(await sim.run(150))
    first, second = reports
    assert first.operations == second.operations
    assert first.faults == second.faults
    assert (first.syncs_ok, first.syncs_failed, first.events_delivered) == (
        second.syncs_ok, second.syncs_failed, second.events_delivered)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_planted_duplicate_bug_is_caught(backend: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """If the server stopped deduplicating replayed events, the harness must say so, on
    either backend (on PostgreSQL with three instances, each with its own pool)."""
    original = store_base.plan_events

    def no_dedup(device: str, last_seq: int, purged: int, events: Any, digests: Any,
                 **kwargs: Any) -> store_base.EventPlan:
        plan = original(device, last_seq, purged, events, digests, **kwargs)
        return store_base.EventPlan(tuple(events), plan.lost)

    if backend == "sqlite":
        from crdtsync_server.store.sqlite import store
        database, servers = "sqlite", 1
    else:
        from crdtsync_server.store.postgres import store  # type: ignore[no-redef]
        database, servers = require_postgres(), 3

    monkeypatch.setattr(store, "plan_events", no_dedup)
    async with Simulation(devices=2, servers=servers, seed=3, database=database,
                          faults=FaultPlan(drop_response=0.3, duplicate=0.3)) as sim:
        report = await sim.run(120)
    assert not report.ok
    assert any(f.startswith("events:") for f in report.failures)
    assert "replay with seed=3" in report.describe()


async def test_user_operations_and_invariants() -> None:
    """An app plugs in its own edits and its own invariant (docs/testing.md)."""
    async with Simulation(devices=3, seed=9, faults=FaultPlan.everything(0.05)) as sim:
        last_mode: dict[str, str] = {}

        @sim.device_op(weight=2)
        async def set_mode(device: SimDevice, rng: random.Random) -> None:
            assert device.device is not None
            mode = rng.choice(["eco", "boost", "off"]) + sim.unique("-")
            device.device.map("config")["mode"] = mode
            last_mode[device.id] = mode

        @sim.invariant
        async def config_reaches_cloud(sim: Simulation) -> list[str]:
            failures = []
            for device in sim.devices:
                assert device.device is not None
                cloud = await sim.servers[0].services.sync.read_state(device.id)  # type: ignore[union-attr]
                if device.id in last_mode and cloud["config"]["mode"] != last_mode[device.id]:
                    failures.append(f"config: {device.id} cloud has {cloud['config']}")
            return failures

        report = await sim.run(200)
    assert report.operations["set_mode"] > 0
    assert report.ok, report.describe()


# --- Hypothesis: schedules chosen and shrunk by Hypothesis -----------------------------------

FAULTS = st.sampled_from(["none", "drop_request", "drop_response", "duplicate", "delay"])


class SyncMachine(RuleBasedStateMachine):
    """Hypothesis picks the operations and the faults; at teardown everything settles and
    every invariant must hold. A failure shrinks to a minimal schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sim: Simulation | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize(servers=st.integers(1, 2), seed=st.integers(0, 2**16))
    def start(self, servers: int, seed: int) -> None:
        self.sim = Simulation(devices=2, servers=servers, seed=seed, concurrent_writes=0.0)
        self.run(self.sim.start())

    def device(self, index: int) -> SimDevice:
        assert self.sim is not None
        return self.sim.devices[index % len(self.sim.devices)]

    @rule(i=st.integers(0, 1), owner=st.sampled_from(["dev", "shared"]),
          k=st.integers(0, 2))
    def device_write(self, i: int, owner: str, k: int) -> None:
        device = self.device(i)
        if device.device is not None:
            assert self.sim is not None
            self.sim.device_write(device, f"{owner}.{k}", self.sim.unique(f"{device.id}:"))

    @rule(i=st.integers(0, 1), owner=st.sampled_from(["cloud", "shared"]), k=st.integers(0, 2),
          delete=st.booleans())
    def cloud_write(self, i: int, owner: str, k: int, delete: bool) -> None:
        assert self.sim is not None
        value = None if delete else self.sim.unique("cloud:")
        self.run(self.sim.cloud_write(self.device(i).id, f"{owner}.{k}", value))

    @rule(i=st.integers(0, 1))
    def emit(self, i: int) -> None:
        assert self.sim is not None
        device = self.device(i)
        if device.device is not None:
            body = {"id": self.sim.unique("e")}
            self.run(device.device.emit("t", body, time_ms=self.sim.now_ms()))
            self.sim.model.emitted(device.id, body)

    @rule(i=st.integers(0, 1), fault=FAULTS)
    def sync(self, i: int, fault: str) -> None:
        assert self.sim is not None
        device = self.device(i)
        if device.device is None:
            return
        self.sim.plan = self.sim.network.plan = (
            FaultPlan() if fault == "none" else FaultPlan(**{fault: 1.0}))
        self.sim.network.step += 1
        self.run(self.sim.sync_device(device))
        self.sim.network.plan = FaultPlan()

    @rule(i=st.integers(0, 1))
    def crash_device(self, i: int) -> None:
        device = self.device(i)
        self.run(device.crash())
        self.run(device.start())

    @rule(s=st.integers(0, 1))
    def crash_server(self, s: int) -> None:
        assert self.sim is not None
        server = self.sim.servers[s % len(self.sim.servers)]
        self.run(server.crash())
        self.run(server.start())

    def teardown(self) -> None:
        if self.sim is not None:
            try:
                self.run(self.sim.settle())
                self.run(self.sim.check())
                assert self.sim.report.ok, self.sim.report.describe()
            finally:
                self.run(self.sim.aclose())
        self.loop.close()


TestSyncMachine = SyncMachine.TestCase
TestSyncMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                    derandomize=True,
                                    suppress_health_check=[HealthCheck.too_slow])


# --- the command line --------------------------------------------------------------------------

def test_simulate_command_reports_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from crdtsync.cli import main

    code = main(["simulate", "--devices", "3", "--steps", "200", "--seed", "5", "--seeds", "2",
                 "--faults", "drop,dup,reorder,partition,crash", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2/2 seeds held every invariant" in out
    assert "faults injected" in out and "converged: yes" in out


def test_simulate_command_fails_on_a_broken_invariant(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from crdtsync.cli import main
    from crdtsync_server.store.sqlite import store as sqlite_store

    original = sqlite_store.plan_events

    def no_dedup(*args: Any, **kwargs: Any) -> store_base.EventPlan:
        return store_base.EventPlan(tuple(args[3]), original(*args, **kwargs).lost)

    monkeypatch.setattr(sqlite_store, "plan_events", no_dedup)
    code = main(["simulate", "--steps", "150", "--seed", "3", "--faults", "drop,dup",
                 "--rate", "0.3", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL events:" in out and "replay with seed=3" in out


def test_simulate_command_rejects_unknown_faults(capsys: pytest.CaptureFixture[str]) -> None:
    from crdtsync.cli import main

    assert main(["simulate", "--faults", "meteor", "--no-progress"]) == 2
    assert "meteor" in capsys.readouterr().err


def test_simulate_command_rejects_another_database(capsys: pytest.CaptureFixture[str]) -> None:
    from crdtsync.cli import main

    assert main(["simulate", "--database", "mysql://u:secret@db/x", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--database" in err and "mysql://" in err and "secret" not in err


async def test_a_planted_resurrection_bug_in_adoption_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If adoption carried every local key instead of the dirty ones, keys the cloud deleted
    (or overwrote) meanwhile would come back: the harness must say so."""
    from crdtsync import crdt, device

    real_carry = crdt.carry

    def carry_everything(old: Any, new: Any, keys: Any) -> None:
        real_carry(old, new, crdt.root_keys(old))

    monkeypatch.setattr(device.crdt, "carry", carry_everything)
    async with Simulation(devices=3, servers=2, seed=12,
                          faults=FaultPlan.everything(0.08)) as sim:
        report = await sim.run(400)
    assert not report.ok
    assert any(f.startswith("lost-write") for f in report.failures), report.failures


# --- clocks: skewed device clocks, server clocks, latency ------------------------------------

def test_a_skewed_clock_drifts_steps_and_resets() -> None:
    true = [1_764_000_000_000]
    clock = SkewedClock(lambda: true[0], offset=3_600_000, drift_ppm=100.0)
    assert clock() == true[0] + 3_600_000
    true[0] += 1_000_000  # 1000 s at +100 ppm: 100 ms fast
    assert clock.error() == 3_600_000 + 100
    clock.set_offset(-5_000)
    stepped = true[0]
    assert clock() == true[0] - 5_000
    true[0] += 10_000
    assert clock.error() == -5_000 + 1  # drift keeps running from the new setting
    clock.reset()
    true[0] += 2_000
    assert clock() == 2_000  # 1970-01-01 00:00:02 UTC
    assert clock.set_between(stepped, stepped) and not clock.set_between(0, stepped - 1)


def test_a_clock_plan_of_zeros_draws_nothing() -> None:
    """Runs without clock skew replay exactly as before skew existed: no draw is made."""
    rng = random.Random(1)
    state = rng.getstate()
    plan = ClockPlan()
    assert not plan.enabled
    assert (plan.draw_offset(rng), plan.draw_drift(rng), plan.draw_latency(rng)) == (0, 0.0, 0)
    assert rng.getstate() == state


async def test_skewed_clocks_and_latency_keep_every_invariant() -> None:
    """Device clocks up to an hour off, drifting, stepped and reset to 1970 now and then,
    server instances off by up to a second, requests and answers taking up to 300 ms: every
    invariant still holds; each device keeps one clock across its crashes; clock steps and
    resets are reported with the faults; the true time moved with the latency."""
    plan = ClockPlan.skewed(step=0.01, reset=0.005, server_offset_ms=1000)
    async with Simulation(devices=3, servers=2, seed=31, clocks=plan,
                          faults=FaultPlan.everything(0.05)) as sim:
        clocks = [d.clock for d in sim.devices]
        errors = {d.clock.error() for d in sim.devices} | {s.clock.error() for s in sim.servers}
        report = await sim.run(300)
        assert [d.clock for d in sim.devices] == clocks
    assert report.ok, report.describe()
    assert len(errors) == 5 and max(abs(e) for e in errors) > 1000
    assert report.faults["clock_step"] > 0 and report.faults["clock_reset"] > 0
    assert any(k.startswith("crash_device") for k in report.faults)


async def test_requests_and_answers_take_simulated_time() -> None:
    async with Simulation(devices=1, seed=2, clocks=ClockPlan(latency_ms=(150, 150))) as sim:
        before = sim.now_ms()
        assert await sim.sync_device(sim.devices[0])
        assert sim.now_ms() - before >= 300  # at least one round trip of 2 x 150 ms


# --- the latest-write rule of the invariant, on its own ------------------------------------------

def _device_write(time: int, corrected: list[int], value: str = "dev") -> TimedWrite:
    write = TimedWrite("device", value, time)
    write.deliveries = [Delivery(0, 0, time, c, c, committed=True) for c in corrected]
    return write


def test_the_later_write_must_win_only_beyond_the_correction_error() -> None:
    cloud = TimedWrite("cloud", "cloud", 10_000)
    # the device wrote 1 s later, and every delivery corrected it to later than the cloud
    assert allowed_finals([cloud, _device_write(11_000, [10_990, 11_200])], 1) == [
        _device_write(11_000, [10_990, 11_200])]
    # 1 s earlier, corrected earlier: the cloud's
    assert allowed_finals([_device_write(9_000, [9_100]), cloud], 1) == [cloud]
    # later in truth, but one delivery corrected it before the cloud's: either may hold
    either = allowed_finals([cloud, _device_write(10_500, [9_900, 10_600])], 1)
    assert either is not None and {w.writer for w in either} == {"device", "cloud"}
    # within the servers' frames margin: either
    either = allowed_finals([cloud, _device_write(10_400, [10_400])], 500)
    assert either is not None and len(either) == 2


def test_unknown_cloud_writes_and_undelivered_device_writes() -> None:
    landed = TimedWrite("cloud", "a", 1_000)
    unknown = TimedWrite("cloud", "b", 2_000, acknowledged=None)
    assert allowed_finals([landed, unknown], 1) == [landed, unknown]
    only_unknown = allowed_finals([unknown], 1)
    assert only_unknown is not None and only_unknown[0].value is DELETED  # may never have landed
    assert allowed_finals([TimedWrite("device", "x", 5)], 1) is None  # never reached a server


async def test_a_cloud_delete_of_a_key_never_set_is_no_replay_difference() -> None:
    """The cloud deleting a key nobody set names the root map in the live document only (no
    update is stored): the replay check must not call that a difference (found by the
    latest-write property test)."""
    async with Simulation(devices=1, seed=0, concurrent_writes=0.0) as sim:
        await sim.cloud_write(sim.devices[0].id, "shared.0", None)
        await sim.settle()
        await sim.check()
        assert sim.report.ok, sim.report.describe()


# --- latest write wins, with wrong clocks (issue 13) ------------------------------------------

@pytest.mark.parametrize("seed", range(700, 706))
async def test_the_latest_write_wins_with_skewed_clocks_under_faults(seed: int) -> None:
    """Device clocks up to an hour off, drifting 200 ppm, now and then set to another
    offset; two server instances up to half a second apart; requests and answers taking
    2-300 ms; every network and crash fault: after quiescence every key of ``state`` holds,
    on the cloud and on every device, the write that came last in true time wherever the gap
    exceeds the device write's correction error, and every correction within the documented
    limits stays within its bound (crdtsync.testing.latest)."""
    async with Simulation(devices=3, servers=2, seed=seed, faults=FaultPlan.everything(0.05),
                          clocks=ClockPlan.skewed(server_offset_ms=500)) as sim:
        report = await sim.run(300)
    assert report.ok, report.describe()
    assert report.latest_checked >= 20 and report.latest_decided >= 5, report.describe()
    assert report.corrections_checked >= 5, report.describe()


async def test_the_latest_write_wins_without_skew() -> None:
    """Right clocks, no latency: the same invariant, and most keys both sides wrote are
    decided (the correction error is within a millisecond)."""
    # seed 711: a seed whose device crashes leave most corrections checkable (seed 710 did
    # until the instances could also die while a proxied request ran, which moved the draws)
    async with Simulation(devices=3, servers=2, seed=711,
                          faults=FaultPlan.everything(0.05)) as sim:
        report = await sim.run(400)  # 400: the live op (issue 15) takes a share of the steps
    assert report.ok, report.describe()
    assert report.latest_decided >= 10 and report.corrections_unchecked < \
        report.corrections_checked, report.describe()


async def test_the_server_dates_writes_by_time_not_by_arrival(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: if the server dated every device write at its arrival ("the last to sync
    wins", what latest-write-wins replaces), the invariant must catch it."""
    from crdtsync_server import stamps

    monkeypatch.setattr(stamps, "correct", lambda stamp, offset, now: now)
    async with Simulation(devices=3, servers=1, seed=721,  # 721: the live op (issue 15)
                          faults=FaultPlan.everything(0.05)) as sim:  # changed seed 720's run
        report = await sim.run(300)
    assert not report.ok
    assert any(f.startswith("latest:") for f in report.failures), report.describe()


@pytest.mark.parametrize("planted", [False, True], ids=["corrected", "planted-uncorrected"])
async def test_a_clock_an_hour_behind_is_corrected_at_the_first_sync(
        planted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose clock is an hour behind and that never synced writes a key 1 s after
    the cloud wrote it, then syncs: the server corrects its stamp by the offset the request
    shows (``ck``) and the device's write wins on both sides. With the correction left out
    (planted bug) its write looks an hour old and loses: the invariant catches it."""
    from crdtsync_server import stamps

    if planted:
        monkeypatch.setattr(stamps, "correct", lambda stamp, offset, now: min(stamp, now))
    async with Simulation(devices=1, seed=3, concurrent_writes=0.0, latest=True) as sim:
        device = sim.devices[0]
        device.clock.set_offset(-3_600_000)
        await sim.cloud_write(device.id, "shared.0", "cloud:1")
        sim.advance(1000)
        sim.device_write(device, "shared.0", "device:2")
        sim.advance(1000)
        assert await sim.sync_device(device)
        await sim.settle()
        await sim.check()
        report = sim.report
        assert device.device is not None
        final = device.device.state.get("shared.0")
    assert report.latest_decided == 1, report.describe()
    if planted:
        assert final == "cloud:1" and any(f.startswith("latest:") for f in report.failures)
    else:
        assert final == "device:2" and report.ok, report.describe()


# --- the live channel (issue 15) ---------------------------------------------------------------

async def test_live_delivery_holds_under_every_fault() -> None:
    """30 seeds: no hub answer skips a cloud operation for its device, every operation
    appended a wake entry, and devices that sync only when woken (or with something to
    send) end up with everything; wake answers were lost, duplicated, delayed, reordered."""
    faults: Counter[str] = Counter()
    checked = 0
    for seed in range(30):
        async with Simulation(devices=3, servers=2, seed=900 + seed,
                              faults=FaultPlan.everything()) as sim:
            report = await sim.run(150)
        assert report.ok, report.describe()
        faults += report.faults
        checked += report.wakes_checked
    assert checked > 500
    for name in ("wake_lost", "wake_dup", "wake_delayed", "wake_reordered"):
        assert faults[name] > 0, faults


@pytest.mark.parametrize("planted", ["never_wake", "forget_devices"])
async def test_a_hub_that_forgets_a_wake_up_is_caught(planted: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bugs in the hub: answering wake=false always, or not remembering entries
    for a device's own target: the simulation reports lost wake-ups."""
    from crdtsync.protocol import WakeSignal
    from crdtsync_server import wake

    if planted == "never_wake":
        original = wake.WakeHub.wait

        async def never(self: Any, device: Any, after: Any, seconds: float) -> WakeSignal:
            signal = await original(self, device, after, seconds)
            return WakeSignal(False, signal.cursor, 0)
        monkeypatch.setattr(wake.WakeHub, "wait", never)
    else:
        take = wake.WakeHub._take

        def forget(self: Any, entries: Any) -> None:
            take(self, entries)
            for target in [t for t in self._last if t.startswith("d:")]:
                del self._last[target]
        monkeypatch.setattr(wake.WakeHub, "_take", forget)
    async with Simulation(devices=3, seed=5, faults=FaultPlan.everything()) as sim:
        report = await sim.run(150)
    assert not report.ok
    assert any(f.startswith("lost-wake") for f in report.failures), report.describe()
