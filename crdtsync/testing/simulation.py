"""``Simulation``: devices, server instances and a faulty network in one process, from a seed.

Devices are real :class:`~crdtsync.Device` objects on real SQLite files; server instances are
the real server core, built as a server process builds it (``open_services``, then
``process_sync`` per request; the maintenance chores run every ``CHORE_EVERY`` steps of
virtual time, heartbeats every third of ``instance_ttl``), each with its own store object
on one shared database: a real SQLite file in a temporary folder, or a fresh schema of a
real PostgreSQL database (``database=``, :mod:`crdtsync.testing.database`); the network
between them is simulated (:mod:`crdtsync.testing.faults`). Every step runs to completion
before the next, so a run is a pure function of its seed: a failure prints the seed, and
the same seed replays it.

    async with Simulation(devices=3, seed=7, faults=FaultPlan.everything()) as sim:
        report = await sim.run(steps=500)
    assert report.ok, report.describe()
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdtsync_server.auth import DEVICE_TOKEN_BYTES, hash_token, new_token
from crdtsync_server.config import ServerConfig
from crdtsync_server.core import Services, open_services, process_sync
from crdtsync_server.proxied.routes import Executor, Route, RouteOutcome
from crdtsync_server.store import DeviceRecord

from .. import crdt
from .._inbox import Message
from ..device import Device
from ..errors import CrdtsyncError, TransportError
from ..hlc import HybridClock, stamp_ms
from ..protocol import STATE_MAP
from .clocks import ClockPlan, SkewedClock, device_takes_clock, server_takes_clock
from .database import SQLITE, SimDatabase, SimStore
from .faults import Crash, FaultPlan, Network
from .invariants import Model, check_all
from .latest import WriteLog, check_corrections, check_latest
from .live import LiveChannel, WakeAnswer

DeviceOp = Callable[["SimDevice", random.Random], Awaitable[None]]
Invariant = Callable[["Simulation"], Awaitable[list[str]]]

ADMIN_TOKEN = "simulation-admin"


@dataclass
class SimReport:
    """What a run did and whether every invariant held (``ok``)."""

    seed: int
    steps: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    syncs_ok: int = 0
    syncs_failed: int = 0
    events_delivered: int = 0
    converged: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latest_checked: int = 0
    """Keys the latest-write invariant checked (0: it was off)."""
    latest_decided: int = 0
    """Of those, keys written by the device and the cloud far enough apart (beyond the
    correction error) that one write had to win."""
    corrections_checked: int = 0
    """Deliveries of device writes whose correction error was checked against its bound."""
    corrections_unchecked: int = 0
    """Deliveries left unchecked (clock set, restart, clock ahead: the documented limits)."""
    wakes_checked: int = 0
    """Answers of the live channel's hub checked for a lost wake-up."""
    woken: int = 0
    """Syncs started by a live-channel answer."""

    @property
    def ok(self) -> bool:
        return self.converged and not self.failures

    def describe(self) -> str:
        """A short human report; on failure it names the seed that replays the run."""
        lines = [
            f"seed {self.seed}: {self.steps} steps, {sum(self.operations.values())} operations "
            f"({_counts(self.operations)})",
            f"faults injected: {sum(self.faults.values())} ({_counts(self.faults) or 'none'})",
            f"syncs: {self.syncs_ok} ok, {self.syncs_failed} failed; "
            f"events delivered exactly once: {self.events_delivered}",
            f"converged: {'yes' if self.converged else 'NO'}; invariants: "
            f"{'all held' if not self.failures else f'{len(self.failures)} FAILED'}; "
            f"{self.seconds:.2f} s",
        ]
        if self.latest_checked:
            lines.append(f"latest write: {self.latest_checked} keys checked, "
                         f"{self.latest_decided} written by both sides with a write that "
                         f"had to win; corrections "
                         f"checked {self.corrections_checked}, beyond the documented limits "
                         f"{self.corrections_unchecked}")
        if self.wakes_checked:
            lines.append(f"live channel: {self.wakes_checked} answers checked, "
                         f"{self.woken} syncs woken")
        lines += [f"  FAIL {f}" for f in self.failures]
        if self.failures:
            lines.append(f"replay with seed={self.seed}")
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


class SimServer:
    """One server instance over the shared database; ``crash()`` drops its caches."""

    def __init__(self, sim: Simulation, index: int, clock: SkewedClock) -> None:
        self.sim = sim
        self.index = index
        self.clock = clock
        """This instance's wall clock (the true time plus its offset)."""
        self.services: Services | None = None
        self.store: SimStore | None = None
        """This instance's store object (a new one, with a new instance id, per start)."""
        self.doomed = False
        """The process died while a proxied request ran: the running sync's answer is lost
        and the instance crashes as soon as it returns."""
        self.beat_at = 0
        """True time of the instance's last heartbeat."""

    @property
    def alive(self) -> bool:
        return self.services is not None

    async def start(self) -> None:
        """Build the instance's services exactly as a server process does
        (:func:`~crdtsync_server.core.open_services`), over its own crashing store object on
        the shared database and an in-process executor, with the chores left to the
        simulation's virtual time."""
        sim = self.sim
        self.store = SimStore(sim, self.index, sim.database.open_store())
        config = ServerConfig(db=sim.database.url, admin_token=ADMIN_TOKEN,
                              cache_docs=sim.cache_docs, compact_every=sim.compact_every,
                              proxy_budget=5.0, proxy_grace=0,
                              instance_ttl=sim.instance_ttl)
        if server_takes_clock():
            config.clock = self.clock
        self.doomed = False
        self._stack = AsyncExitStack()
        self.services = await self._stack.enter_async_context(
            open_services(config, executor=SimExecutor(self), store=self.store.as_store(),
                          loops=False))
        self.services.routes.put(Route(ECHO_ROUTE, "http://127.0.0.1:9/echo"))
        self.beat_at = sim.now_ms()

    async def crash(self) -> None:
        """Lose everything in memory; the database keeps what was committed. The store
        closes first, as a killed process (:meth:`SimStore.die`: it writes nothing more and
        leaves its instance row to age), so the orderly shutdown that follows only releases
        what the instance held; its running proxied requests stay ``running`` until another
        instance finds its heartbeat older than ``instance_ttl``."""
        if self.services is not None:
            services, self.services = self.services, None
            await services.proxy.aclose(grace=0)
            assert self.store is not None
            self.sim.model.last_beats[self.store.instance] = self.beat_at
            await self.store.die()
            with contextlib.suppress(CrdtsyncError):
                await self._stack.aclose()

    async def stop(self) -> None:
        """An orderly shutdown of the instance (the end of a run)."""
        if self.services is not None:
            self.services = None
            await self._stack.aclose()

    async def chores(self) -> None:
        """The instance's maintenance chores, once (heartbeat and recovery of the requests
        of gone instances, purges, last-sync times, evictions)."""
        if self.services is not None:
            await self.services.maintenance.run_once()
            self.beat_at = self.sim.now_ms()

    async def beat(self) -> None:
        """The heartbeat loop of a server process (``Maintenance.spawn``): every third of
        ``instance_ttl`` of virtual time, prove the instance alive and finish as
        interrupted the running requests of instances gone for longer than that."""
        if self.services is not None and \
                self.sim.now_ms() - self.beat_at >= self.sim.instance_ttl * 1000 / 3:
            await self.services.maintenance.heartbeat()
            self.beat_at = self.sim.now_ms()

    async def handle(self, token: str, body: bytes) -> bytes:
        """One sync request; :class:`Crash` instead of its answer when the instance died
        while a proxied request ran (:class:`SimExecutor`)."""
        if self.services is None:
            raise TransportError("connection refused (server instance down)")
        if self.sim.latest:
            self.sim.writes.received(body, self.sim.now_ms(), self.clock)
        try:
            return await process_sync(self.services, token, body)
        finally:
            if self.sim.latest:
                self.sim.writes.done()
            if self.doomed:
                raise Crash("server", self.index)


ECHO_ROUTE = "echo"

CHORE_EVERY = 25
"""Steps between two runs of the instances' maintenance chores."""

INSTANCE_TTL = 30.0
"""``ServerConfig.instance_ttl`` of the instances (seconds of virtual time): a crashed
instance's running proxied requests are finished as interrupted once its last heartbeat is
older than that."""


class SimExecutor(Executor):
    """Performs the simulation's one route in process (no HTTP) and counts every call, so
    the invariants can check that each request ran at most once. The instance may die
    while the route runs (``crash_server during proxied request``, before or after the
    call): the request stays ``running`` under the dead instance, the sync's answer is
    lost."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.sim = server.sim

    async def perform(self, route: Route, device_id: str, payload: Any) -> RouteOutcome:
        key = (device_id, str(payload.get("id")) if isinstance(payload, dict) else "")
        assert self.server.store is not None
        self.sim.model.runners[key] = self.server.store.instance
        self.sim.model.running.add(key)
        if self.server.doomed:
            raise asyncio.CancelledError  # the process is dead: nothing more runs
        self._maybe_die("before the route call")
        self.sim.model.performed[key] += 1
        self._maybe_die("after the route call")
        return RouteOutcome(True, 200, {"echo": payload}, None, "", 1)

    def _maybe_die(self, where: str) -> None:
        """Perhaps the process dies here: the task ends as if killed (cancelled, so no
        outcome is stored), and the instance crashes once the sync returns."""
        try:
            self.sim.maybe_crash_server(self.server.index, f"during proxied request, {where}")
        except Crash:
            self.server.doomed = True
            raise asyncio.CancelledError from None


class SimDevice:
    """A simulated device: its id, token and SQLite file survive crashes, its memory not."""

    def __init__(self, sim: Simulation, device_id: str, token: str, clock: SkewedClock
                 ) -> None:
        self.sim = sim
        self.id = device_id
        self.token = token
        self.clock = clock
        """The device's wall clock: kept across crashes of its process, like hardware."""
        self.created = sim.now_ms()
        self.synced_at = self.created
        """True time at which the device's last successful sync started (or it was made)."""
        self.crashes: list[int] = []
        """True times at which its process died."""
        self.path = sim.workdir / f"{device_id}.db"
        self.device: Device | None = None
        self.down_until = -1
        self.wake_cursor: int | None = None
        """The live channel's cursor (``None``: ask for one; after a crash too)."""
        self.in_flight: list[WakeAnswer] = []
        """Answers of the hub held back by the network."""
        self.asked = 0
        self.taken = 0
        """Order of the newest answer acted on (an older one arriving later is reordered)."""
        self.owes_sync = False
        """The last sync failed: the client's retry will sync again."""

    @property
    def alive(self) -> bool:
        return self.device is not None

    async def start(self) -> None:
        clock: dict[str, Any] = {"clock": self.clock} if device_takes_clock() else {}
        dev = Device(self.id, transport=_SimTransport(self), path=self.path, interval=None,
                     durability="OFF", compact_every=self.sim.compact_every, **clock)
        await dev.start()
        store = dev._store
        for name in ("ack", "set_meta", "push_event", "renumber", "finish_down", "replace_doc",
                     "clear_dirty"):
            setattr(store, name, self._crash_point(getattr(store, name), name))
        dev.on("*")(self._on_message)
        dev.command("work")(self._on_command)
        self.device = dev

    def _on_message(self, message: Message) -> None:
        self.sim.model.handled[(self.id, message.seq)] += 1

    def _on_command(self, params: Any) -> Any:
        self.sim.model.ran[(self.id, params["id"])] += 1
        return {"done": params["id"]}

    def _crash_point(self, method: Callable[..., Awaitable[Any]], name: str
                     ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                self.sim.maybe_crash_device(self, f"before {name}")
            except Crash:
                if name == "finish_down":  # the handler ran; the record of it is lost
                    self.sim.model.rerun_allowed[self.id] += 1
                raise
            return await method(*args, **kwargs)
        return wrapper

    async def crash(self) -> None:
        """The process dies: memory is gone, the SQLite file stays."""
        if self.device is not None:
            dev, self.device = self.device, None
            self.crashes.append(self.sim.now_ms())
            self.wake_cursor, self.in_flight = None, []
            await dev.aclose()
            self.down_until = self.sim.network.step + self.sim.rng.randint(1, 10)


class _SimTransport:
    def __init__(self, device: SimDevice) -> None:
        self.device = device

    async def exchange(self, body: bytes) -> bytes:
        sim = self.device.sim
        server = sim.pick_server()
        if sim.latest:
            sim.writes.sent(self.device.id, body, sim.now_ms())

        async def travel(token: str, request: bytes) -> bytes:
            sim.advance(sim.clocks.draw_latency(sim.clock_rng))  # the request's way there
            return await server.handle(token, request)

        try:
            answer = await sim.network.send(self.device.id, self.device.token, body, travel)
            sim.advance(sim.clocks.draw_latency(sim.clock_rng))  # the answer's way back
        except Crash as crash:
            if crash.args and crash.args[0] == "server":
                await sim.servers[crash.args[1]].crash()
                raise TransportError("connection reset (server instance died)") from None
            raise
        if not sim.network.perfect and sim.rng.random() < sim.concurrent_writes:
            # The app keeps writing while a request is in flight.
            sim.report.operations["write_during_sync"] += 1
            if sim.rng.random() < 0.3:
                sim.delete_on(self.device)  # a delete moves no state vector: a harder case
            else:
                sim.write_on(self.device)
        sim.maybe_crash_device(self.device, "after response, before processing it")
        return answer

    async def aclose(self) -> None:
        return None


class Simulation:
    """N devices, M server instances on one database, a faulty network, a seeded workload.

    ``workdir`` holds the SQLite files (a temporary folder by default, removed on exit).
    Register app-specific operations with :meth:`device_op` and checks with
    :meth:`invariant`; both receive the seeded ``random.Random`` so runs stay replayable.
    """

    def __init__(self, *, devices: int = 3, servers: int = 1, seed: int = 0,
                 faults: FaultPlan | None = None, workdir: str | Path | None = None,
                 keys: int = 4, compact_every: int = 50, cache_docs: int = 1000,
                 concurrent_writes: float = 0.2, clocks: ClockPlan | None = None,
                 latest: bool | None = None, database: str = SQLITE) -> None:
        self.seed = seed
        self.instance_ttl = INSTANCE_TTL
        """``ServerConfig.instance_ttl`` of every instance (seconds of virtual time)."""
        self.database = SimDatabase(database)
        """The instances' shared database: one SQLite file in ``workdir`` (``"sqlite"``)
        or a fresh schema of the PostgreSQL database at a ``postgresql://`` URL, dropped
        at the end."""
        self.rng = random.Random(seed)
        self._clock_ms = 1_764_000_000_000
        self.clocks = clocks or ClockPlan()
        self.clock_rng = random.Random(seed + 3)
        """Draws of clock offsets, drifts, steps and latencies (none when ``clocks`` is
        off, so runs without skew replay exactly as before it existed)."""
        self.latest = (device_takes_clock() and server_takes_clock()) if latest is None \
            else latest
        """Check the latest-write invariant (:mod:`crdtsync.testing.latest`); by default
        when devices and servers take clocks (the code stamps writes)."""
        self.writes = WriteLog()
        self.plan = faults or FaultPlan()
        self.network = Network(self.plan, random.Random(seed + 1))
        self.keys = keys
        self.concurrent_writes = concurrent_writes
        self.compact_every = compact_every
        self.cache_docs = cache_docs
        self.report = SimReport(seed)
        self.model = Model()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir_arg = workdir
        self.workdir = Path(".")
        self.servers = [SimServer(self, i, SkewedClock(self.now_ms, self._server_offset()))
                        for i in range(servers)]
        self.devices: list[SimDevice] = []
        self._device_count = devices
        self._device_ops: list[tuple[str, DeviceOp, float]] = []
        self._invariants: list[Invariant] = []
        self._ids = crdt.seeded_client_ids(seed + 2)
        self._counter = 0
        self.live = LiveChannel(self)

    def _server_offset(self) -> int:
        limit = self.clocks.server_offset_ms
        return self.clock_rng.randint(-limit, limit) if limit else 0

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Simulation:
        try:
            await self.start()
        except BaseException:
            with contextlib.suppress(Exception):  # the start's error is the one to see
                await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the database, provision the devices, start every instance and device."""
        self._ids.__enter__()
        if self._workdir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="crdtsync-sim-")
            self.workdir = Path(self._tmp.name)
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.database.place(self.workdir)
        for server in self.servers:
            await server.start()
        for i in range(self._device_count):
            self.devices.append(await self._provision(f"sim-{i}"))

    async def _provision(self, device_id: str) -> SimDevice:
        token = new_token(DEVICE_TOKEN_BYTES)
        assert self.servers[0].services is not None
        await self.servers[0].services.store.add_device(
            DeviceRecord(id=device_id, token_hash=hash_token(token), created=self._clock_ms))
        clock = SkewedClock(self.now_ms, self.clocks.draw_offset(self.clock_rng),
                            self.clocks.draw_drift(self.clock_rng))
        sim_device = SimDevice(self, device_id, token, clock)
        await sim_device.start()
        return sim_device

    async def aclose(self) -> None:
        """Close every device and instance, drop the PostgreSQL schema, remove the
        temporary folder (all of it attempted even if a step fails)."""
        try:
            for device in self.devices:
                if device.device is not None:
                    await device.device.aclose()
                    device.device = None
            for server in self.servers:
                await server.stop()
        finally:
            try:
                await self.database.drop()
            finally:
                self._ids.__exit__(None, None, None)
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None

    # --- extension points ---------------------------------------------------------------

    def device_op(self, fn: DeviceOp | None = None, *, weight: float = 1.0,
                  name: str | None = None) -> Any:
        """Register an app operation ``async fn(sim_device, rng)`` run on random live
        devices (usable as a decorator). It reaches the device through ``sim_device.device``
        and should record what it expects in :attr:`model` for its own invariants."""
        def register(op: DeviceOp) -> DeviceOp:
            self._device_ops.append((name or op.__name__, op, weight))
            return op
        return register(fn) if fn is not None else register

    def invariant(self, fn: Invariant) -> Invariant:
        """Register ``async fn(sim) -> list of failure messages``, checked after settling."""
        self._invariants.append(fn)
        return fn

    # --- crash points -------------------------------------------------------------------

    def maybe_crash_server(self, index: int, where: str) -> None:
        if self.network.chance(self.plan.crash_server, f"crash_server {where}"):
            raise Crash("server", index)

    def maybe_crash_device(self, device: SimDevice, where: str) -> None:
        if self.network.chance(self.plan.crash_device, f"crash_device {where}"):
            raise Crash("device", device.id)

    def pick_server(self) -> SimServer:
        live = [s for s in self.servers if s.alive] or self.servers
        return self.rng.choice(live)

    # --- operations ---------------------------------------------------------------------

    def now_ms(self) -> int:
        """The true time (ms): what no device or server clock reads exactly."""
        return self._clock_ms

    def advance(self, ms: int) -> None:
        """Move the true time forward by ``ms``."""
        self._clock_ms += ms

    def unique(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    async def run(self, steps: int) -> SimReport:
        """Run ``steps`` random steps, then settle and check every invariant."""
        started = time.perf_counter()
        for _ in range(steps):
            await self.step()
        await self.settle()
        await self.check()
        self.report.seconds += time.perf_counter() - started
        return self.report

    async def step(self) -> None:
        """One random operation, with the faults the plan draws."""
        self.network.step += 1
        self.report.steps += 1
        self._clock_ms += self.rng.randint(1, 5000)
        self._set_clocks()
        await self._heal()
        for server in self.servers:
            await server.beat()
        self.network.maybe_partition([d.id for d in self.devices])
        await self._deliver_held()
        await self.live.deliver_due()
        ops: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
            ("device_write", self.op_device_write, 3.0),
            ("device_delete", self.op_device_delete, 0.5),
            ("cloud_write", self.op_cloud_write, 2.0),
            ("emit", self.op_emit, 3.0),
            ("sync", self.op_sync, 4.0),
            ("cloud_message", self.op_cloud_message, 0.7),
            ("cloud_command", self.op_cloud_command, 0.7),
            ("device_request", self.op_device_request, 0.7),
            ("rebuild", self.op_rebuild, 0.7),
            ("live", self.live.step_op, 3.0),
        ]
        ops += [(name, self._user_op(op), weight) for name, op, weight in self._device_ops]
        name, op, _ = self.rng.choices(ops, weights=[w for _, _, w in ops])[0]
        self.report.operations[name] += 1
        await op()
        if self.report.steps % CHORE_EVERY == 0:
            await self._chores()

    async def _chores(self) -> None:
        """Every live instance runs its maintenance chores once."""
        for server in self.servers:
            await server.chores()

    def _set_clocks(self) -> None:
        """Per device, with the plan's chances: its clock is set to another offset, or
        restarts at 1970 (counted with the faults)."""
        plan, rng = self.clocks, self.clock_rng
        if not (plan.step or plan.reset):
            return
        for device in self.devices:
            if plan.step and rng.random() < plan.step:
                device.clock.set_offset(plan.draw_offset(rng))
                self.network.injected["clock_step"] += 1
            if plan.reset and rng.random() < plan.reset:
                device.clock.reset()
                self.network.injected["clock_reset"] += 1

    def _user_op(self, op: DeviceOp) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            device = self._live_device()
            if device is not None:
                await self._guard(device, op(device, self.rng))
        return run

    def _live_device(self) -> SimDevice | None:
        live = [d for d in self.devices if d.alive]
        return self.rng.choice(live) if live else None

    async def _guard(self, device: SimDevice, action: Awaitable[Any]) -> Any:
        """Run a device action; a simulated crash kills the device instead of the run."""
        try:
            return await action
        except Crash as crash:
            if crash.args and crash.args[0] == "device":
                await device.crash()
                return None
            raise

    async def _heal(self) -> None:
        """Restart crashed devices whose downtime is over, and dead server instances."""
        for server in self.servers:
            if not server.alive:
                await server.start()
        for device in self.devices:
            if not device.alive and device.down_until <= self.network.step:
                await device.start()

    async def _deliver_held(self) -> None:
        for held in self.network.due():
            server = self.pick_server()
            try:
                await server.handle(held.token, held.body)
            except CrdtsyncError:
                pass  # a stale request may be refused; the device has long moved on
            except Crash as crash:
                await self.servers[crash.args[1]].crash()

    def _key(self, owner: str) -> str:
        return f"{owner}.{self.rng.randrange(self.keys)}"

    async def op_device_write(self) -> None:
        device = self._live_device()
        if device is not None:
            self.write_on(device)

    def write_on(self, device: SimDevice) -> None:
        """The app on ``device`` writes a unique value to a device-owned or shared key."""
        if device.device is None:
            return
        key = self._key(self.rng.choice(["dev", "shared"]))
        self.device_write(device, key, self.unique(f"{device.id}:"))

    def device_write(self, device: SimDevice, key: str, value: Any) -> None:
        """The app on ``device`` sets ``key`` of ``state`` to ``value`` (``None``:
        deletes it), recorded for the invariants with its true time."""
        assert device.device is not None
        frozen = _clock_ahead(device.device)
        if value is None:
            del device.device.state[key]
        else:
            device.device.state[key] = value
        self.model.wrote(device.id, key, value, acknowledged=True)
        self.writes.wrote(device.id, key, value, writer="device", time=self.now_ms(),
                          after_sync=device.synced_at, frozen=frozen)

    async def op_device_delete(self) -> None:
        device = self._live_device()
        if device is not None:
            self.delete_on(device)

    def delete_on(self, device: SimDevice) -> None:
        """The app on ``device`` deletes a device-owned or shared key, if present."""
        if device.device is None:
            return
        key = self._key(self.rng.choice(["dev", "shared"]))
        if key in device.device.state:
            self.device_write(device, key, None)

    async def op_cloud_write(self) -> None:
        device = self.rng.choice(self.devices)
        key = self._key(self.rng.choice(["cloud", "shared"]))
        value = None if self.rng.random() < 0.1 else self.unique("cloud:")
        await self.cloud_write(device.id, key, value)

    async def cloud_write(self, device_id: str, key: str, value: Any) -> None:
        """The cloud sets ``key`` of a device's ``state`` (``None`` deletes) through a
        random live instance, which may die mid-write (the outcome is then unknown)."""
        server = self.pick_server()
        if server.services is None:
            return
        self.model.wrote(device_id, key, value, acknowledged=False)
        write = self.writes.wrote(device_id, key, value, writer="cloud", time=self.now_ms(),
                                  acknowledged=None)
        store = server.services.store
        before = await store.wake_head()
        try:
            await server.services.sync.write_state(device_id, STATE_MAP, {key: value})
        except Crash:
            await server.crash()
            return
        await self.live.recorded(store, [device_id], "cloud write", before)
        self.model.wrote(device_id, key, value, acknowledged=True)
        write.acknowledged = True

    async def op_rebuild(self) -> None:
        """The cloud rebuilds a random device's state document into its next generation
        (what the server does by itself once history outweighs content), whatever its
        size; the store may crash just before or after."""
        server = self.pick_server()
        if server.services is None:
            return
        device = self.rng.choice(self.devices)
        docs = server.services.docs
        try:
            async with docs.lock(device.id):
                if await docs.rebuild(await docs.get(f"{device.id}/state")):
                    self.report.operations["rebuilt"] += 1
        except Crash:
            await server.crash()

    async def op_cloud_message(self) -> None:
        """The cloud queues a message for a random device (through a live instance)."""
        await self._queue_down("message", "note", {"id": self.unique("m")})

    async def op_cloud_command(self) -> None:
        """The cloud sends the command ``work`` to a random device."""
        await self._queue_down("command", "work", {"id": self.unique("c")})

    async def _queue_down(self, kind: str, name: str, body: dict[str, Any]) -> None:
        server = self.pick_server()
        if server.services is None:
            return
        device = self.rng.choice(self.devices)
        store = server.services.store
        before = await store.wake_head()
        item = await store.queue_downlink(device.id, kind, name, body, self.now_ms(), None)
        await self.live.recorded(store, [device.id], kind, before)
        self.model.downlink.append((device.id, item.id, kind, body["id"]))

    async def op_device_request(self) -> None:
        """The device queues a proxied request (it will not wait for it here)."""
        device = self._live_device()
        if device is None or device.device is None:
            return
        request_id = self.unique("r")
        await self._guard(device, device.device.queue_request(
            ECHO_ROUTE, {"id": request_id}, request_id=request_id))
        if device.device is not None and request_id in await device.device.pending_requests():
            self.model.requests.append((device.id, request_id))

    async def op_emit(self) -> None:
        device = self._live_device()
        if device is None or device.device is None:
            return
        body = {"id": self.unique(f"{device.id}#"), "v": self.rng.random()}
        seq = await self._guard(device, device.device.emit("readings", body,
                                                           time_ms=self.now_ms()))
        if seq is not None:
            self.model.emitted(device.id, body)

    async def op_sync(self) -> None:
        device = self._live_device()
        if device is None or device.device is None:
            return
        await self.sync_device(device)

    async def sync_device(self, device: SimDevice) -> bool:
        """One ``dev.sync()``; counts it; returns whether it succeeded."""
        assert device.device is not None
        started = self.now_ms()
        try:
            result = await self._guard(device, device.device.sync())
        except CrdtsyncError:
            self.report.syncs_failed += 1
            device.owes_sync = True
            return False
        if result is None:
            self.report.syncs_failed += 1
            device.owes_sync = True
            return False
        self.report.syncs_ok += 1
        device.owes_sync = False
        device.synced_at = started
        return True

    # --- the end --------------------------------------------------------------------------

    async def settle(self) -> None:
        """Heal everything; let ``instance_ttl`` pass (the running proxied requests of
        crashed instances are interrupted); without faults, run the live phase (devices
        sync only when they have something to send or are woken) and check liveness; then
        sync every device three times."""
        self.network.perfect = True
        for device in self.devices:
            device.down_until = -1
        await self._heal()
        await self._deliver_held()
        await self._outlive_the_dead()
        await self.live.settle()
        for _ in range(3):
            for device in self.devices:
                await self.sync_device(device)
        await self._chores()

    async def _outlive_the_dead(self) -> None:
        """Let ``instance_ttl`` of virtual time pass, with the live instances beating, so
        that every instance that crashed is gone for the others: its running proxied
        requests are finished as interrupted and their outcomes can reach the devices."""
        for _ in range(4):
            self.advance(int(self.instance_ttl * 1000 / 3) + 1)
            for server in self.servers:
                await server.beat()

    async def check(self) -> None:
        """Check the built-in and registered invariants; fill ``report``."""
        failures = await check_all(self)
        if self.latest:
            failures += await check_latest(self) + await check_corrections(self)
        for invariant in self._invariants:
            failures += await invariant(self)
        failures += self.live.failures + self.model.recovery
        self.report.failures += failures
        self.report.converged = not any(f.startswith("diverged") for f in failures)
        self.report.faults = Counter(self.network.injected)


def _clock_ahead(device: Device) -> bool:
    """True when the device's hybrid clock is ahead of its corrected wall clock (its next
    stamp counts on from its last one instead of reading the wall clock)."""
    clock = getattr(device, "_clock", None)
    if not isinstance(clock, HybridClock):
        return False
    return stamp_ms(clock.last) > clock.wall() + clock.offset
