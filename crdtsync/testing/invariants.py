"""What must hold after a simulation settles, and the model of writes it is checked against.

Keys are named by owner: ``dev.N`` only the device writes, ``cloud.N`` only the cloud writes,
``shared.N`` both write. Every written value is unique, so the final value of a key tells
which write won.

Built-in invariants (each failure message starts with its name):

- ``diverged``: every replica of a device document (the device, every server instance's
  live document, a fresh load from the database) is equal after the final fault-free sync.
- ``lost-write``: an owned key holds its last acknowledged write (or a later write whose
  outcome was unknown, e.g. the server died mid-request); a shared key holds some value
  that was really written.
- ``events``: the cloud stores every acknowledged event of a device exactly once, in seq
  order, with its body; nothing that was never acknowledged appears twice.
- ``outbox``: every device outbox is empty once everything was acknowledged.
- ``replay``: each server's stored log replays to the same state as its live document.
- ``downlink``: messages delivered, commands finished and run at most once.
- ``requests``: each proxied request performed at most once, finally acknowledged with an
  outcome the device holds (``interrupted`` if it was never performed: its instance died).
- ``recovery`` (checked whenever requests are interrupted): only requests left running (their
  route called, no outcome stored) are interrupted, only once the instance running them
  crashed and its last heartbeat is ``instance_ttl`` old (less twice the instances' clock
  offset bound), never while their runner lives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import crdt
from ..protocol import STATE_DOC, STATE_MAP

if TYPE_CHECKING:
    from .simulation import Simulation

ABSENT = object()


@dataclass
class KeyHistory:
    """Writes to one key: the last acknowledged value, and every value attempted after it
    whose outcome is unknown."""

    written: bool = False
    acknowledged: Any = ABSENT
    unknown_after: list[Any] = field(default_factory=list)
    attempted: list[Any] = field(default_factory=list)


@dataclass
class Model:
    """The writes and events a simulation made, for the invariants to check against."""

    keys: dict[tuple[str, str], KeyHistory] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    downlink: list[tuple[str, int, str, str]] = field(default_factory=list)
    """(device, item id, kind, body id) of every message and command queued."""
    handled: Counter[tuple[str, int]] = field(default_factory=Counter)
    """Message handler runs per (device, seq)."""
    ran: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Command handler runs per (device, body id)."""
    rerun_allowed: Counter[str] = field(default_factory=Counter)
    """Per device: crashes after a handler returned and before its record (a rerun is
    allowed for messages)."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(device, request id) of every proxied request queued."""
    performed: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Route calls per (device, request id)."""
    runners: dict[tuple[str, str], str] = field(default_factory=dict)
    """Instance id that called the route, per (device, request id)."""
    running: set[tuple[str, str]] = field(default_factory=set)
    """(device, request id) of the requests whose route was called and whose outcome was
    not stored yet (their instance died meanwhile)."""
    last_beats: dict[str, int] = field(default_factory=dict)
    """Per instance id of a crashed instance: the true time of its last heartbeat."""
    recovery: list[str] = field(default_factory=list)
    """Failures of ``recovery``, found when requests were interrupted."""

    def wrote(self, device: str, key: str, value: Any, *, acknowledged: bool) -> None:
        """Record a write to ``key`` of ``device``'s state (``None`` deletes)."""
        history = self.keys.setdefault((device, key), KeyHistory())
        value = ABSENT if value is None else value
        if acknowledged:
            if history.unknown_after and history.unknown_after[-1] is value:
                history.unknown_after.pop()
            history.acknowledged = value
            history.unknown_after.clear()
            history.written = True
        else:
            history.unknown_after.append(value)
        history.attempted.append(value)

    def emitted(self, device: str, body: dict[str, Any]) -> None:
        """Record an acknowledged emit (``emit`` returned a seq)."""
        self.events.setdefault(device, []).append(body)


async def check_all(sim: Simulation) -> list[str]:
    failures: list[str] = []
    for check in (check_convergence, check_writes, check_events, check_outboxes,
                  check_replay, check_downlink, check_requests, check_feed):
        failures += await check(sim)
    return failures


async def _cloud_json(sim: Simulation, device: str) -> dict[str, Any]:
    server = next(s for s in sim.servers if s.services is not None)
    assert server.services is not None
    log = await server.services.store.load_doc(f"{device}/{STATE_DOC}")
    doc = crdt.new_doc(1, log.snapshot, (u for _, u in log.updates))
    return {STATE_MAP: {}, **crdt.to_json(doc)}


async def check_convergence(sim: Simulation) -> list[str]:
    failures = []
    for device in sim.devices:
        assert device.device is not None
        local = {STATE_MAP: {}, **crdt.to_json(device.device.doc)}
        stored = await _cloud_json(sim, device.id)
        if local != stored:
            failures.append(f"diverged: {device.id} device {local} != cloud {stored}")
        for server in sim.servers:
            assert server.services is not None
            live = await server.services.sync.read_state(device.id)
            if live != stored:
                failures.append(f"diverged: {device.id} server {server.index} live {live} "
                                f"!= stored {stored}")
    return failures


async def check_writes(sim: Simulation) -> list[str]:
    failures = []
    for (device, key), history in sorted(sim.model.keys.items()):
        state = (await _cloud_json(sim, device))[STATE_MAP]
        final = state.get(key, ABSENT)
        owner = key.split(".", 1)[0]
        if owner == "shared":
            allowed = [ABSENT, *history.attempted]
        else:
            allowed = [history.acknowledged, *history.unknown_after]
        if not any(final is v or final == v for v in allowed):
            shown = [None if v is ABSENT else v for v in allowed]
            failures.append(f"lost-write: {device} {key} = "
                            f"{None if final is ABSENT else final!r}, expected one of {shown}")
    return failures


async def check_events(sim: Simulation) -> list[str]:
    failures = []
    server = next(s for s in sim.servers if s.services is not None)
    assert server.services is not None
    total = 0
    for device in sim.devices:
        stored = []
        after = 0
        while page := await server.services.store.read_events(after, 1000, device=device.id):
            stored += page
            after = page[-1].cursor
        seqs = [e.seq for e in stored]
        if seqs != sorted(set(seqs)):
            failures.append(f"events: {device.id} seqs not strictly increasing: {seqs}")
        bodies = [e.body for e in stored]
        expected = sim.model.events.get(device.id, [])
        if bodies != expected:
            failures.append(f"events: {device.id} stored {len(bodies)} events, emitted "
                            f"{len(expected)}; first difference at "
                            f"{_first_difference(bodies, expected)}")
        total += len(stored)
    sim.report.events_delivered = total
    return failures


async def check_feed(sim: Simulation) -> list[str]:
    """The change feed holds each stored event once, in seq order; folding its state changes
    in cursor order gives the stored document; the projection equals the document."""
    store = _live_store(sim)
    items, after = [], 0
    while page := await store.read_feed(after, 1000):
        items += page
        after = page[-1].cursor
    failures = []
    for device in sim.devices:
        mine = [i for i in items if i.device == device.id]
        events = [(i.seq, i.body) for i in mine if i.kind == "event"]
        stored, after = [], 0
        while page := await store.read_events(after, 1000, device=device.id):
            stored += [(e.seq, e.body) for e in page]
            after = page[-1].cursor
        if events != stored:
            failures.append(f"feed: {device.id} feed events {len(events)} != stored "
                            f"{len(stored)}, first difference at "
                            f"{_first_difference(events, stored)}")
        folded: dict[str, dict[str, Any]] = {}
        for item in mine:
            if item.kind == "state":
                for name, keys in item.body.items():
                    for key, value in keys.items():
                        folded.setdefault(name, {})[key] = value
        expected = {name: keys for name, keys in (await _cloud_json(sim, device.id)).items()
                    if keys}
        replayed = {name: {k: v for k, v in keys.items() if v is not None}
                    for name, keys in folded.items()}
        replayed = {name: keys for name, keys in replayed.items() if keys}
        if replayed != expected:
            failures.append(f"feed: {device.id} state changes fold to {replayed}, "
                            f"document is {expected}")
        projected: dict[str, dict[str, Any]] = {}
        for row in await store.read_projection(device=device.id, limit=100_000):
            projected.setdefault(row.map, {})[row.key] = row.value
        if projected != expected:
            failures.append(f"projection: {device.id} rows {projected} != document {expected}")
    return failures


def _first_difference(a: list[Any], b: list[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


async def check_outboxes(sim: Simulation) -> list[str]:
    return [f"outbox: {d.id} still holds {d.device.pending_events} events"
            for d in sim.devices if d.device is not None and d.device.pending_events]


async def check_replay(sim: Simulation) -> list[str]:
    failures = []
    for server in sim.servers:
        assert server.services is not None
        for key, live in list(server.services.docs._docs.items()):
            log = await server.services.store.load_doc(key)
            replayed = _content(crdt.new_doc(1, log.snapshot, (u for _, u in log.updates)))
            if replayed != _content(live.doc):
                failures.append(f"replay: server {server.index} {key} stored log replays to "
                                f"{replayed}, live is {_content(live.doc)}")
    return failures


def _content(doc: Any) -> dict[str, Any]:
    """A document as JSON without empty root maps: a root exists in a document once it is
    named (a cloud delete of a key never set names it) but is not part of any update."""
    return {name: value for name, value in crdt.to_json(doc).items() if value != {}}


def _live_store(sim: Simulation) -> Any:
    server = next(s for s in sim.servers if s.services is not None)
    assert server.services is not None
    return server.services.store


async def check_downlink(sim: Simulation) -> list[str]:
    """Messages delivered (handled at least once, twice only after a crash between the
    handler and its record); commands finished and run at most once."""
    failures = []
    store = _live_store(sim)
    for device, item_id, kind, body_id in sim.model.downlink:
        item = await store.get_downlink(item_id)
        if kind == "message":
            runs = sim.model.handled[(device, item.seq)]
            if item.status != "delivered" or not 1 <= runs <= 1 + sim.model.rerun_allowed[device]:
                failures.append(f"downlink: {device} message {item.seq} is {item.status}, "
                                f"handled {runs} times")
            continue
        runs = sim.model.ran[(device, body_id)]
        ok = (item.status == "succeeded" and runs == 1 and item.result == {"done": body_id}) or (
            item.status == "failed" and runs <= 1
            and (item.error or {}).get("code") == "interrupted")
        if not ok:
            failures.append(f"downlink: {device} command {item.seq} is {item.status} "
                            f"({item.result or item.error}), ran {runs} times")
    return failures


async def check_requests(sim: Simulation) -> list[str]:
    """Each proxied request performed at most once, its outcome stored by the device and
    acknowledged to the cloud."""
    failures = []
    store = _live_store(sim)
    by_device = {d.id: d for d in sim.devices}
    for device, request_id in sim.model.requests:
        performed = sim.model.performed[(device, request_id)]
        stored = await store.get_request(device, request_id)
        dev = by_device[device].device
        local = await dev._store.get_call(request_id) if dev is not None else None
        if performed > 1 or stored is None or stored.status != "acked":
            failures.append(f"requests: {device} {request_id} performed {performed} times, "
                            f"cloud status {stored.status if stored else None}")
        elif local is None or local.outcome is None:
            failures.append(f"requests: {device} {request_id} has no outcome on the device")
        elif performed == 0 and (stored.outcome or {}).get("error") != "interrupted":
            failures.append(f"requests: {device} {request_id} never performed, not interrupted")
    return failures


def check_interrupted(sim: Simulation, device: str, request_ids: Iterable[str]) -> None:
    """``recovery``: the requests ``request_ids`` of ``device`` were just finished as
    interrupted: each runner must be a crashed instance whose last heartbeat is at least
    ``sim.instance_ttl`` old (failures go to ``sim.model.recovery``)."""
    ttl_ms = int(sim.instance_ttl * 1000)
    live = {s.store.instance: s.index for s in sim.servers
            if s.alive and s.store is not None}
    slack = 2 * sim.clocks.server_offset_ms
    for request_id in request_ids:
        runner = sim.model.runners[(device, request_id)]
        step = sim.network.step
        if runner in live:
            sim.model.recovery.append(
                f"recovery: step {step}: {device} {request_id} interrupted while its "
                f"runner (server {live[runner]}) is alive")
        elif (age := sim.now_ms() - sim.model.last_beats.get(runner, 0)) < ttl_ms - slack:
            sim.model.recovery.append(
                f"recovery: step {step}: {device} {request_id} interrupted {age} ms after "
                f"its dead runner's last heartbeat (instance_ttl {ttl_ms} ms)")

