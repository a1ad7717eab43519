"""The live channel in the simulation (``GET /v1/wake``, protocol section 14a).

A ``live`` step: a random live device asks a random live server instance's
:class:`~crdtsync_server.wake.WakeHub` (``catch_up`` then ``wait(record, cursor, 0)``); the
answer travels the faulty network: lost (``wake_lost``), duplicated (``wake_dup``), held
back 1-20 steps (``wake_delayed``) so that an older answer may arrive after a newer one
(``wake_reordered``, counted when it happens). A device syncs on ``wake: true`` or a first
answer, then adopts the answer's cursor; on ``wake: false`` it only adopts it. A crash
forgets its cursor and the answers in flight.

Invariants (each failure message starts with its name):

- ``lost-wake`` (at every answer): the hub answered ``wake: false`` to ``after=c`` with
  cursor ``w`` although a cloud operation for the device was acknowledged with the wake
  log's head in ``(c, w]``;
- ``wake-log``: an acknowledged cloud operation for a device appended no entry naming it;
- ``live`` (at settle, before the unconditional syncs): with a perfect network, devices
  that sync only when they have something to send, after a failed sync, or when woken,
  hold the cloud's document, every message and command and every request outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crdtsync_server.store import WakeEntry, wake_device, wake_targets

from ..protocol import WakeSignal
from .invariants import check_convergence

if TYPE_CHECKING:
    from .simulation import SimDevice, Simulation

LIVE_ROUNDS = 10
"""Rounds of the live phase at settle before it counts as not quiescing."""


@dataclass(frozen=True, slots=True)
class CloudOp:
    """An acknowledged cloud operation for ``device``, with the wake head right after."""

    device: str
    kind: str
    head: int
    step: int


@dataclass(slots=True)
class WakeAnswer:
    """One answer of the hub on its way to a device."""

    after: int | None
    signal: WakeSignal
    order: int
    due: int = 0


@dataclass
class LiveChannel:
    """The live channel of a simulation: its model of cloud operations and its failures."""

    sim: Simulation
    ops: dict[str, list[CloudOp]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    # --- recording --------------------------------------------------------------------

    async def recorded(self, store: Any, devices: Iterable[str], kind: str, before: int
                       ) -> None:
        """Record an acknowledged cloud operation for ``devices`` (``before``: the wake head
        just before it) and check that it appended an entry naming each of them."""
        head = await store.wake_head()
        entries: list[WakeEntry] = []
        after = before
        while after < head and (page := await store.read_wakes(after, 1000)):
            entries += [e for e in page if e.cursor <= head]
            after = page[-1].cursor
        step = self.sim.network.step
        for device in devices:
            record = await store.get_device(device)
            targets = wake_targets(record) if record is not None else (wake_device(device),)
            if not any(e.target in targets for e in entries):
                self.failures.append(f"wake-log: step {step}: {kind} for {device} appended "
                                     f"no wake entry for it in ({before}, {head}]")
            self.ops.setdefault(device, []).append(CloudOp(device, kind, head, step))

    def check_answer(self, device: str, after: int | None, signal: WakeSignal) -> None:
        """Soundness: ``wake: false`` must not skip an operation for the device."""
        self.sim.report.wakes_checked += 1
        if after is None or signal.wake:
            return
        for op in self.ops.get(device, ()):
            if after < op.head <= signal.cursor:
                self.failures.append(
                    f"lost-wake: step {self.sim.network.step}: {device} asked after "
                    f"{after}, the hub answered wake=false at cursor {signal.cursor}, but "
                    f"{op.kind} (step {op.step}) was acknowledged at wake head {op.head}")

    # --- the device side --------------------------------------------------------------

    async def ask(self, device: SimDevice) -> WakeAnswer | None:
        """The device's wake request, answered at once by a random live instance."""
        sim = self.sim
        if sim.network.is_partitioned(device.id):
            return None
        services = sim.pick_server().services
        if services is None:
            return None
        record = await services.store.get_device(device.id)
        assert record is not None
        await services.wakes.catch_up()
        after = device.wake_cursor
        signal = await services.wakes.wait(record, after, 0)
        self.check_answer(device.id, after, signal)
        device.asked += 1
        return WakeAnswer(after, signal, device.asked)

    async def step_op(self) -> None:
        """The ``live`` step: ask, and let the network lose, duplicate or delay the answer."""
        sim = self.sim
        device = sim._live_device()
        if device is None:
            return
        answer = await self.ask(device)
        net, plan = sim.network, sim.plan
        if answer is None or net.chance(plan.drop_response, "wake_lost"):
            return
        if net.chance(plan.delay, "wake_delayed"):
            answer.due = net.step + sim.rng.randint(1, 20)
            device.in_flight.append(answer)
            return
        copies = 2 if net.chance(plan.duplicate, "wake_dup") else 1
        for _ in range(copies):
            await self.take(device, answer)

    async def deliver_due(self) -> None:
        """Deliver held answers whose time came (all of them once the network is perfect)."""
        net = self.sim.network
        for device in self.sim.devices:
            due = [a for a in device.in_flight if net.perfect or a.due <= net.step]
            device.in_flight = [a for a in device.in_flight if a not in due]
            for answer in due:
                await self.take(device, answer)

    async def take(self, device: SimDevice, answer: WakeAnswer) -> bool:
        """The device acts on an answer; returns whether it synced."""
        dev = device.device
        if dev is None:
            return False
        if answer.order < device.taken:
            self.sim.network.injected["wake_reordered"] += 1
        device.taken = max(device.taken, answer.order)
        synced = answer.after is None or answer.signal.wake
        if synced:
            self.sim.report.woken += 1
            await self.sim.sync_device(device)
            if device.device is not dev:
                return True  # it died during the sync: its cursor is gone
        device.wake_cursor = answer.signal.cursor
        return synced

    # --- settle -----------------------------------------------------------------------

    async def settle(self) -> None:
        """The live phase (network perfect): rounds in which a device syncs only with
        something to send or when woken, until a round syncs nothing; then liveness."""
        await self.deliver_due()
        for _ in range(LIVE_ROUNDS):
            synced = 0
            for device in self.sim.devices:
                if device.device is None:
                    continue
                if _has_local_work(device):
                    await self.sim.sync_device(device)
                    synced += 1
                answer = await self.ask(device)
                if answer is not None:
                    synced += await self.take(device, answer)
            if not synced:
                break
        else:
            self.failures.append(f"live: devices still synced after {LIVE_ROUNDS} rounds")
        self.failures += await check_liveness(self.sim)


def _has_local_work(device: SimDevice) -> bool:
    """What makes a device client sync without a wake-up: unsent writes, events, command
    results or requests, outcome acknowledgements, or a failed sync to retry."""
    dev = device.device
    assert dev is not None
    store = dev._store
    return bool(device.owes_sync or store.dirty_count or dev.pending_events
                or store.result_count or store.call_count("pending", "done"))


async def check_liveness(sim: Simulation) -> list[str]:
    """Every device holds what the cloud has for it: its document, its messages and
    commands, its requests' outcomes."""
    failures = [f"live: {f}" for f in await check_convergence(sim)]
    services = sim.pick_server().services
    assert services is not None
    store = services.store
    by_id = {d.id: d for d in sim.devices}
    for device, item_id, kind, _ in sim.model.downlink:
        item = await store.get_downlink(item_id)
        assert item is not None
        reached = (sim.model.handled[(device, item.seq)] >= 1 if kind == "message"
                   else item.status in ("succeeded", "failed"))
        if not reached:
            failures.append(f"live: {device} {kind} {item.seq} never reached it "
                            f"(cloud status {item.status})")
    for device, request_id in sim.model.requests:
        dev = by_id[device].device
        call = await dev._store.get_call(request_id) if dev is not None else None
        if call is None or call.outcome is None:
            failures.append(f"live: {device} request {request_id} outcome never reached it")
    return failures
