"""Real faults between real processes and sockets, and fuzzing of ``POST /v1/sync``.

A TCP fault proxy (:class:`crdtsync.testing.FaultProxy`) between devices and the server,
``kill -9`` of a ``crdtsync serve`` process and of device processes, and Hypothesis fuzzing of
the sync endpoint. After each, the invariants hold: every replica equal after a final
fault-free sync; every emitted event stored by the cloud exactly once, in per-device seq
order; every outbox empty; no acknowledged write missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import http.client
import os
import random
import signal
import sys
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crdtsync import AdminClient, Device, TransportError, crdt
from crdtsync.errors import CrdtsyncError
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    decode_error,
    decode_request,
    decode_response,
    encode_state_vector,
)
from crdtsync.testing import FaultProxy
from crdtsync.testing.fault_proxy import FAULT_MODES, HOLD_MODES
from crdtsync.transport import HttpTransport
from crdtsync_server import Server

from .conftest import ADMIN_TOKEN
from .realworld import (
    Ledger,
    Progress,
    ServeProcess,
    check_invariants,
    device_loops,
    events_of,
    free_port,
    log_file,
    outbox_rows,
)

pytestmark = pytest.mark.timeout(60)


# --- the fault proxy -------------------------------------------------------------------------


MODE_CASES = [
    # (mode, seed, events stored before the client saw the fault)
    ("cut_request", 3, 0),
    ("cut_response", 3, 1),  # committed, the answer lost
    ("stall", 3, 0),
    ("reset", 3, 0),  # seed 3 draws point < 0.5: reset before forwarding
    ("reset", 5, 1),  # seed 5 draws point >= 0.5: the server answered, the client gets an RST
]


@pytest.mark.parametrize(("mode", "seed", "stored"), MODE_CASES,
                         ids=["cut_request", "cut_response", "stall", "reset-before",
                              "reset-after"])
async def test_each_proxy_mode_breaks_the_exchange_as_documented(
        mode: str, seed: int, stored: int, server: Server, admin: AdminClient,
        tmp_path: Path) -> None:
    """Each fault fails the sync with a retryable TransportError of the right kind and
    commits exactly what the mode says; then pass-through delivers everything once."""
    token = (await admin.add_device("d1"))["token"]
    # A stall outlasts the client's timeout; the timeout leaves the sync through
    # pass-through below room on a loaded machine (0.3 s once timed out in CI).
    async with FaultProxy(server.port, mode=mode, stall=3.0, seed=seed) as proxy:
        transport = HttpTransport(proxy.url, token, timeout=1.5)
        async with Device("d1", transport=transport, path=tmp_path / "d1.db",
                          interval=None) as dev:
            await dev.emit("t", {"n": 1})
            with pytest.raises(TransportError) as info:
                await dev.sync()
            assert info.value.retryable and dev.pending_events == 1
            cause = info.value.__cause__
            if mode == "reset":  # a real RST, not an orderly close
                assert isinstance(cause, aiohttp.ClientOSError)
                assert cause.errno == errno.ECONNRESET
            elif mode == "stall":
                assert isinstance(cause, TimeoutError)
            assert len(await events_of(admin, "d1")) == stored
            proxy.mode = "pass"
            await dev.sync()
            assert dev.pending_events == 0
        assert proxy.stats[mode] == 1 and proxy.stats["pass"] >= 1
    assert [e["body"] for e in await events_of(admin, "d1")] == [{"n": 1}]


async def test_proxy_decisions_are_deterministic_and_follow_the_plan() -> None:
    """Same seed, same decisions; frequencies follow the plan; bad plans are refused."""
    plan = {"cut_request": 0.2, "cut_response": 0.2, "stall": 0.1, "reset": 0.2}
    first, second = FaultProxy(1, seed=42, plan=plan), FaultProxy(1, seed=42, plan=plan)
    drawn = [first.decide() for _ in range(2000)]
    assert drawn == [second.decide() for _ in range(2000)]
    counts = Counter(d.mode for d in drawn)
    assert abs(counts["pass"] / 2000 - 0.3) < 0.05 and abs(counts["stall"] / 2000 - 0.1) < 0.03
    with pytest.raises(ValueError):
        first.plan = {"explode": 0.5}
    with pytest.raises(ValueError):
        first.plan = {"stall": 0.7, "reset": 0.7}
    first.mode = "reset"
    assert first.mode == "reset" and first.plan is None and first.decide().mode == "reset"


@pytest.mark.parametrize("mode", ["stall", *HOLD_MODES])
async def test_proxy_close_ends_held_connections_and_leaves_no_task(
        server: Server, mode: str) -> None:
    """Leaving the proxy's block while it stalls (for an hour) or holds a request closes
    that connection at once and leaves none of its tasks behind."""
    async with aiohttp.ClientSession() as http:
        async with FaultProxy(server.port, mode=mode, stall=3600) as proxy:
            client = asyncio.create_task(http.get(proxy.url + "/v1/health"))
            async with asyncio.timeout(20):
                await proxy.wait_held()
            assert proxy.stats[mode] == 1 and not client.done()
        with pytest.raises(aiohttp.ClientError):
            async with asyncio.timeout(20):  # a guard far below the stall
                await client
        assert proxy.held == 0
    leftovers = [t for t in asyncio.all_tasks() if "FaultProxy" in repr(t.get_coro())]
    assert leftovers == []


async def test_hold_lasts_until_a_side_closes_and_plans_cannot_draw_it(
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    """``hold_response``: the server commits and answers, the client gets nothing while the
    exchange is held; ``hold_request``: nothing is committed. Closing the proxy ends a held
    exchange (the client sees a transport failure). A plan cannot draw a hold mode."""
    token = (await admin.add_device("d1"))["token"]
    for mode, stored in (("hold_request", 0), ("hold_response", 1)):
        proxy = FaultProxy(server.port, mode=mode, seed=3)
        await proxy.start()
        async with Device("d1", transport=HttpTransport(proxy.url, token, timeout=30),
                          path=tmp_path / f"{mode}.db", interval=None) as dev:
            await dev.emit("t", {"mode": mode})
            syncing = asyncio.create_task(dev.sync())
            async with asyncio.timeout(20):
                await proxy.wait_held()
            assert len(await events_of(admin, "d1")) == stored and not syncing.done()
            await proxy.aclose()
            with pytest.raises(TransportError):  # closing the proxy ended the exchange
                await syncing
    with pytest.raises(ValueError):
        FaultProxy(1, plan={"hold_request": 0.1})


PROXY_PLAN = {"cut_request": 0.1, "cut_response": 0.12, "stall": 0.04, "reset": 0.1}
PROXY_DEVICES = ("p1", "p2", "p3")


async def proxy_step(rng: random.Random, step: int, dev: Device, ledger: Ledger,
                     admin: AdminClient) -> None:
    """One step of the workload: device-owned, shared and cloud-owned writes, events."""
    ledger.own(dev, f"{dev.id}-{step}")
    if rng.random() < 0.5:
        dev.state["shared"] = f"device-{dev.id}-{step}"
    if rng.random() < 0.3:
        await admin.patch_state(dev.id, {"shared": f"cloud-{step}", "cloud": step})
        ledger.cloud.setdefault("state", {})["cloud"] = step
    if rng.random() < 0.15:
        await admin.patch_state(dev.id, {"mode": f"m{step}"}, map_name="config")
        ledger.cloud.setdefault("config", {})["mode"] = f"m{step}"
    for k in range(rng.randint(0, 3)):
        await ledger.emit(dev, {"id": f"{dev.id}-{step}-{k}"})


async def test_random_proxy_faults_keep_the_invariants(server: Server, admin: AdminClient,
                                                       tmp_path: Path) -> None:
    """150 sync steps of 3 devices through a proxy that cuts requests and responses, stalls
    and resets; then each device restarts and syncs through the proxy in pass-through mode
    (with the default timeout, so a slow machine cannot fail it), and the invariants hold."""
    rng = random.Random(20240601)
    tokens = {d: (await admin.add_device(d))["token"] for d in PROXY_DEVICES}
    ledgers = {d: Ledger(d) for d in PROXY_DEVICES}
    failed = 0
    async with FaultProxy(server.port, seed=7, plan=PROXY_PLAN, stall=0.6) as proxy:
        async with contextlib.AsyncExitStack() as stack:
            devices = {d: await stack.enter_async_context(Device(
                d, transport=HttpTransport(proxy.url, tokens[d], timeout=0.5),
                path=tmp_path / f"{d}.db", interval=None)) for d in PROXY_DEVICES}
            for step in range(150):
                dev_id = rng.choice(PROXY_DEVICES)
                await proxy_step(rng, step, devices[dev_id], ledgers[dev_id], admin)
                try:
                    await devices[dev_id].sync()
                except TransportError:
                    failed += 1
        faults = {mode: proxy.stats[mode] for mode in FAULT_MODES}
        proxy.mode = "pass"
        for dev_id in PROXY_DEVICES:
            async with Device(dev_id, proxy.url, token=tokens[dev_id],
                              path=tmp_path / f"{dev_id}.db", interval=None) as dev:
                await dev.sync()
                await check_invariants(admin, dev, ledgers[dev_id])
        assert all(proxy.stats[mode] == n for mode, n in faults.items())
    assert all(n >= 2 for n in faults.values()), faults
    assert failed >= sum(faults.values()), (failed, faults)  # no fault went unnoticed
    assert all(outbox_rows(tmp_path / f"{d}.db") == 0 for d in PROXY_DEVICES)
    assert all(len(ledger.emitted) > 20 for ledger in ledgers.values())


# --- kill -9 of the server -------------------------------------------------------------------


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    proc = ServeProcess(tmp_path / "server.db", free_port(), tmp_path)
    try:
        await proc.start()
        yield proc
    finally:
        await proc.close()


KILLS = 6


async def hold_one(proxy: FaultProxy, mode: str) -> None:
    """Hold the next requests through ``proxy`` at the point ``mode`` names; return once
    one is held there (a request is then in flight, whatever the timing)."""
    proxy.mode = mode
    async with asyncio.timeout(20):
        await proxy.wait_held()


async def test_server_killed_repeatedly_mid_sync_loses_and_duplicates_nothing(
        serve_process: ServeProcess, tmp_path: Path) -> None:
    """Three devices write, emit and sync in a loop (through a pass-through FaultProxy)
    while a ``crdtsync serve`` process is killed with SIGKILL six times and restarted on the
    same port and database. Every kill lands while a request is in flight, at a known point
    (the proxy holds it there): alternately when the server has received only part of the
    request, and when it has committed and answered but the device has not got the answer.
    After a final sync, the invariants hold."""
    rng = random.Random(99)
    names = ("k1", "k2", "k3")
    ledgers = {d: Ledger(d) for d in names}
    progress = Progress()
    async with FaultProxy(serve_process.port) as proxy, \
            AdminClient(serve_process.url, ADMIN_TOKEN) as admin, \
            contextlib.AsyncExitStack() as stack:
        tokens = {d: (await admin.add_device(d))["token"] for d in names}
        devices = {d: await stack.enter_async_context(Device(
            d, transport=HttpTransport(proxy.url, tokens[d], timeout=5),
            path=tmp_path / f"{d}.db", interval=None)) for d in names}
        async with device_loops(devices, ledgers, progress):
            for kill in range(KILLS):
                await progress.wait_ok(progress.ok + rng.randint(3, 12))
                await hold_one(proxy, HOLD_MODES[kill % 2])
                await serve_process.kill()
                proxy.mode = "pass"
                await asyncio.sleep(rng.uniform(0, 0.2))  # the devices meet a dead server
                await serve_process.start()
        for d in names:
            await devices[d].sync()
            await check_invariants(admin, devices[d], ledgers[d])
        held = [proxy.stats[mode] for mode in HOLD_MODES]
    assert serve_process.starts == KILLS + 1
    assert progress.ok >= 3 * KILLS
    assert min(held) >= KILLS // 2  # each kill held at least one request at its point
    assert progress.failed >= sum(held)  # and no held request was answered
    assert not any("Traceback" in serve_process.log(n) for n in range(1, KILLS + 2))
    assert all(outbox_rows(tmp_path / f"{d}.db") == 0 for d in names)


# --- kill -9 of a device process -------------------------------------------------------------


DEVICE_SCRIPT = '''
import asyncio
import sys

from crdtsync import CrdtsyncError, Device


async def main(url, token, path, start, stop):
    async with Device("dk", url, token=token, path=path, interval=None) as dev:
        for i in range(start, stop):
            dev.state["counter"] = i
            await dev.emit("count", {"i": i})
            print(f"EMITTED {i}", flush=True)
            try:
                await dev.sync()
            except CrdtsyncError as exc:
                if not exc.retryable:
                    raise
            print(f"SYNCED {i}", flush=True)
        await dev.sync()
    print("DONE", flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
'''


@dataclass
class DeviceRun:
    """One run of the device script: what it printed and how it ended."""

    emitted: list[int]
    done: bool
    returncode: int


async def run_device(script: Path, args: list[str], *, kill_after: int | None,
                     before_kill: Callable[[], Awaitable[None]] | None = None,
                     log: Path) -> DeviceRun:
    """Run the device script; with ``kill_after``, SIGKILL it once it printed that many
    ``EMITTED`` lines and ``before_kill()`` returned. Every line it printed is collected,
    also those after the kill."""
    with log_file(log) as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), *args, stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    lines: list[str] = []
    reading: asyncio.Task[bytes] | None = None
    try:
        while kill_after is not None and sum(ln[0] == "E" for ln in lines) < kill_after:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.endswith(b"\n"), f"device ended early: {log.read_text()}"
            lines.append(line.decode())
        if kill_after is not None:
            # Keep reading while waiting: a device blocked on a full pipe never syncs.
            reading = asyncio.create_task(proc.stdout.read())
            if before_kill is not None:
                await before_kill()
            os.kill(proc.pid, signal.SIGKILL)
            rest = await asyncio.wait_for(reading, 30)
        else:
            rest = await asyncio.wait_for(proc.stdout.read(), 30)
        lines += [ln + "\n" for ln in rest.decode().split("\n")[:-1]]
        returncode = await proc.wait()
    finally:
        if reading is not None and not reading.done():
            reading.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    emitted = [int(ln.split()[1]) for ln in lines if ln.startswith("EMITTED ")]
    return DeviceRun(emitted, "DONE\n" in lines, returncode)


DEVICE_KILLS = 6


async def test_device_killed_mid_sync_loses_and_duplicates_nothing(
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    """A device process, syncing through a pass-through FaultProxy, is killed with SIGKILL
    six times (seeded: after some printed emits), restarted on its database, then runs to
    the end: every event whose emit returned is stored once, in order; the outbox ends
    empty. Every other kill lands at a random moment; the others land inside a sync, at a
    known point (the proxy holds the request there): after the server received part of the
    request, or after it committed and answered but before the device got the answer."""
    rng = random.Random(5)
    token = (await admin.add_device("dk"))["token"]
    script = tmp_path / "device_script.py"
    script.write_text(DEVICE_SCRIPT)
    db, log = tmp_path / "dk.db", tmp_path / "device.log"
    printed: list[int] = []
    maybe_unprinted: set[int] = set()
    start = 0
    async with FaultProxy(server.port) as proxy:
        for kill in range(DEVICE_KILLS):
            mode = HOLD_MODES[kill // 2 % 2] if kill % 2 else None
            delay = rng.uniform(0, 0.03)
            run = await run_device(
                script, [proxy.url, token, str(db), str(start), str(10**6)],
                kill_after=rng.randint(1, 12), log=log,
                before_kill=(functools.partial(hold_one, proxy, mode) if mode
                             else functools.partial(asyncio.sleep, delay)))
            proxy.mode = "pass"
            assert run.returncode == -signal.SIGKILL and not run.done
            assert run.emitted == list(range(start, start + len(run.emitted)))
            printed += run.emitted
            last = run.emitted[-1]
            # The kill may land after `emit` returned and before the line was printed: that
            # event is durable too. Skip its number so it can appear at most once.
            maybe_unprinted.add(last + 1)
            start = last + 2
        final = await run_device(
            script, [proxy.url, token, str(db), str(start), str(start + 10)],
            kill_after=None, log=log)
        held = [proxy.stats[mode] for mode in HOLD_MODES]
    assert final.done and final.returncode == 0, log.read_text()
    printed += final.emitted

    events = await events_of(admin, "dk")
    numbers = [e["body"]["i"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert numbers == sorted(set(numbers))  # each once, in emit order
    assert set(printed) <= set(numbers)
    assert set(numbers) - set(printed) <= maybe_unprinted
    assert (await admin.state("dk"))["state"] == {"counter": start + 9}
    assert outbox_rows(db) == 0
    assert held == [2, 1]  # three kills landed inside a sync: each held one request


# --- fuzzing POST /v1/sync -------------------------------------------------------------------


def wire_codes() -> set[str]:
    """Every error code that may cross the wire (classes with an HTTP status)."""
    codes: set[str] = set()
    pending: list[type[CrdtsyncError]] = [CrdtsyncError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.status:
            codes.add(cls.code)
    return codes


WIRE_CODES = wire_codes()
FUZZ_STATUSES = {200, 400, 401, 403, 404, 409, 413, 415}
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


@dataclass
class Fuzzer:
    """Posts bodies to ``/v1/sync`` from a worker thread (the server runs on the test's event
    loop) and checks each answer; records what a 200 accepted."""

    port: int
    token: str
    accepted: list[bytes] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)

    def post(self, body: bytes, encoding: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": MEDIA_TYPE}
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", SYNC_PATH, body=body, headers=headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        finally:
            conn.close()
        assert time.monotonic() - started < 10
        self.check(status, data)
        if status == 200:
            self.accepted.append(zlib.decompress(body) if encoding == "deflate" else body)

    def check(self, status: int, data: bytes) -> None:
        self.statuses[status] += 1
        if status != 200:
            self.codes[decode_error(data, status).code] += 1
        assert status in FUZZ_STATUSES, (status, data[:200])
        if status == 200:
            decode_response(data)
            return
        frame = msgpack.unpackb(data, raw=False)
        assert isinstance(frame, dict) and frame["t"] == "error", frame
        assert frame["code"] in WIRE_CODES and frame["retry"] is False, frame
        assert decode_error(data, status).code == frame["code"]


def often(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] | None = None
          ) -> st.SearchStrategy[Any]:
    """``good`` nine times out of ten, ``bad`` (default: any msgpack value) otherwise."""
    chosen = values if bad is None else bad
    return st.sampled_from(range(10)).flatmap(lambda n: good if n else chosen)


values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=12), st.binary(max_size=24)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(often(st.text(max_size=6), st.integers(0, 9)), inner, max_size=4)),
    max_leaves=12)


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value half of the time, any msgpack value otherwise."""
    return st.one_of(good, values)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=4)),
    max_leaves=10)
state_vectors = st.dictionaries(st.integers(0, 2**53 - 1), st.integers(0, 2**32 - 1),
                                max_size=3).map(encode_state_vector)


mutations = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]),
                               st.integers(0, 2**16), st.binary(min_size=1, max_size=8),
                               st.integers(0, 7)), min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, bytes, int]]) -> bytes:
    """Apply bit flips, truncations, insertions, deletions and overwrites."""
    buf = bytearray(data)
    for kind, pos, blob, bit in ops:
        at = pos % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= 1 << bit
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = blob
        elif kind == "delete":
            del buf[at:at + bit + 1]
        elif kind == "set" and at < len(buf):
            buf[at] = blob[0]
    return bytes(buf)


def fuzz_map_update(client: int, changes: dict[str, Any]) -> bytes:
    """A valid update of a foreign replica writing root map ``fuzz`` (never ``state``)."""
    doc = crdt.new_doc(client)
    crdt.write(doc, "fuzz", changes)
    return doc.get_update()


VALID_UPDATES = [fuzz_map_update(7, {"a": 1}),
                 fuzz_map_update(2**40, {"a": "text", "b": [1, 2.5, None], "c": {"x": True}})]


@st.composite
def checked_updates(draw: st.DrawFn) -> dict[str, Any]:
    """Random bytes or a mutated valid update, with a correct CRC: they reach the CRDT
    decoder and the value checks."""
    if draw(st.booleans()):
        update = mutate(draw(st.sampled_from(VALID_UPDATES)), draw(mutations))
    else:
        update = draw(st.binary(min_size=1, max_size=48))
    return {"u": update, "c": zlib.crc32(update)}


@st.composite
def good_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Well-typed document entries: a name, a valid state vector, maybe a generation and a
    checked update."""
    doc: dict[str, Any] = {"d": draw(st.sampled_from(["state", "state", "fleet", "other"])),
                           "sv": draw(state_vectors)}
    if draw(st.booleans()):
        doc["g"] = draw(st.sampled_from([0, 0, 1, 2]))
    doc.update(draw(often(checked_updates(), st.just({}))))
    return doc


fuzzed_docs = st.fixed_dictionaries({}, optional={
    "d": maybe(st.sampled_from(["state", "fleet", "other", "bad name"])),
    "g": maybe(st.integers(0, 3)),
    "sv": maybe(st.one_of(st.just(b"\x00"), st.binary(max_size=12))),
    "u": maybe(st.binary(max_size=32)),
    "c": maybe(st.integers(0, 2**32 - 1)),
})
good_events = st.tuples(st.integers(1, 8), st.sampled_from(["t", "x.y"]),
                        st.integers(0, 2**41), json_values.map(msgpack.packb)).map(list)
fuzzed_events = st.tuples(
    maybe(st.integers(0, 12)), maybe(st.just("t")), maybe(st.integers(0, 2**63)),
    maybe(st.one_of(st.binary(max_size=16), values.map(msgpack.packb)))).map(list)


def event_lists(draw: st.DrawFn) -> list[Any]:
    """Mostly consecutive valid events, sometimes anything."""
    first = draw(st.integers(1, 8))
    count = draw(st.integers(0, 4))
    listed = [draw(good_events) for _ in range(count)]
    for offset, event in enumerate(listed):
        event[0] = first + offset
    return listed

ENVELOPE_KEYS = ["v", "t", "dev", "docs", "ev", "pg"]
ENVELOPE_PARTS: dict[str, st.SearchStrategy[Any]] = {
    "v": often(st.just(1)),
    "t": often(st.just("sync")),
    "dev": often(st.sampled_from(["victim", "victim", "keeper", "nobody"])),
    "docs": often(st.lists(often(good_docs(), st.one_of(fuzzed_docs, values)), min_size=1,
                           max_size=3, unique_by=repr), st.lists(values, max_size=2)),
    "ev": often(st.composite(event_lists)(),
                st.lists(st.one_of(good_events, fuzzed_events, values), max_size=4)),
    "pg": often(st.integers(0, 8), st.integers(0, 2**64 - 1)),
}


@st.composite
def structured_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Envelopes whose keys are each present nine times out of ten, mostly well-typed."""
    return {key: draw(part) for key, part in ENVELOPE_PARTS.items()
            if draw(st.sampled_from(range(10)))}


envelopes = often(structured_envelopes(),
                  st.dictionaries(st.sampled_from(ENVELOPE_KEYS), values))


def fuzz_random_bytes(fuzzer: Fuzzer, _template: bytes) -> None:
    @FUZZ_SETTINGS
    @given(st.binary(max_size=300), st.sampled_from([None, "deflate", "gzip", "br"]),
           st.booleans())
    def run(data: bytes, encoding: str | None, compress: bool) -> None:
        if compress and encoding == "deflate":
            data = zlib.compress(data)
        fuzzer.post(data, encoding)

    run()


def _envelope(**parts: Any) -> dict[str, Any]:
    return {"v": 1, "t": "sync", "dev": "victim", "docs": [{"d": "state", "sv": b"\x00"}],
            **parts}


REACHING = [
    _envelope(ev=[[1, "t", 0, msgpack.packb({"other": "content"})]]),  # seq_conflict
    _envelope(docs=[{"d": "state", "sv": b"\x00", "g": 3}]),            # generation_mismatch
    _envelope(docs=[{"d": "other", "sv": b"\x00"}]),                    # unknown_document
    _envelope(docs=[{"d": "fleet", "sv": b"\x00", "u": b"\x01\x00", "c": zlib.crc32(b"\x01\x00")}]),
    _envelope(docs=[{"d": "state", "sv": b"\x00", "u": b"\x05", "c": zlib.crc32(b"\x05")}]),
    _envelope(dev="nobody"),                                              # unauthorized
]
"""One envelope per error the fuzz must reach past the decoder. Derandomized draws change
whenever the test's code does, so the paths are not left to chance; the random envelopes
still have to be answered with typed errors or a 200 (and some must be accepted)."""


def reaching_examples(test: Any) -> Any:
    for envelope in REACHING:
        test = example(envelope)(test)
    return test


def fuzz_envelopes(fuzzer: Fuzzer, _template: bytes) -> None:
    @FUZZ_SETTINGS
    @reaching_examples
    @given(envelopes)
    def run(envelope: dict[str, Any]) -> None:
        fuzzer.post(msgpack.packb(envelope, use_bin_type=True))

    run()


def with_update(template: bytes, update: bytes) -> bytes:
    """``template`` (a device's sync request) carrying ``update``, with its correct CRC."""
    request = msgpack.unpackb(template, raw=False)
    request["docs"][0].update(u=update, c=zlib.crc32(update))
    return msgpack.packb(request, use_bin_type=True)  # type: ignore[no-any-return]


def fuzz_mutations(fuzzer: Fuzzer, template: bytes) -> None:
    """Half the bodies are the device's request mutated anywhere; the other half carry a
    mutated valid update of a foreign replica with a correct CRC, so the mutation reaches the
    CRDT decoder instead of the checksum."""
    @FUZZ_SETTINGS
    @given(mutations, st.booleans(), st.sampled_from(VALID_UPDATES))
    def run(ops: list[tuple[str, int, bytes, int]], whole: bool, update: bytes) -> None:
        if whole:
            fuzzer.post(mutate(template, ops))
        else:
            fuzzer.post(with_update(template, mutate(update, ops)))

    run()


class Capture:
    """A transport that keeps the request body a device would send, and sends nothing."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def exchange(self, body: bytes) -> bytes:
        self.bodies.append(body)
        raise TransportError("captured (test)")

    async def aclose(self) -> None:
        return None


async def synced_device(admin: AdminClient, server: Server, path: Path, name: str,
                        events_count: int) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Provision ``name``, write state and events, sync; its token, cloud state, events."""
    token = (await admin.add_device(name))["token"]
    async with Device(name, server.url, token=token, path=path, interval=None) as dev:
        dev.state.update({"mode": "eco", "v": 3.5, "name": name})
        for k in range(events_count):
            await dev.emit("t", {"k": k})
        await dev.sync()
    return token, await admin.state(name), await events_of(admin, name)


FUZZ_CASES = [
    # (fuzz, codes it must reach: proof that it got past the layers in front)
    (fuzz_random_bytes, {"malformed_request", "unsupported_encoding"}),
    (fuzz_envelopes, {"unauthorized", "unknown_document", "generation_mismatch", "forbidden",
                      "seq_conflict", "corrupt_update"}),
    (fuzz_mutations, {"corrupt_update", "malformed_request"}),
]


@pytest.mark.parametrize(("fuzz", "reached"), FUZZ_CASES,
                         ids=["random-bytes", "random-envelopes", "mutated-requests"])
async def test_sync_endpoint_survives_fuzzing(fuzz: Callable[[Fuzzer, bytes], None],
                                              reached: set[str], server: Server,
                                              admin: AdminClient, tmp_path: Path) -> None:
    """Malformed and random bodies with the victim's real token: only typed 4xx answers or
    a 200; afterwards the server serves, the keeper's data is untouched, and the victim holds
    only what a 200 accepted."""
    keeper_path = tmp_path / "k.db"
    keeper_token, keeper_state, keeper_events = await synced_device(admin, server, keeper_path,
                                                                    "keeper", 5)
    victim_path = tmp_path / "v.db"
    token, victim_state, victim_events = await synced_device(admin, server, victim_path,
                                                             "victim", 3)
    capture = Capture()
    async with Device("victim", transport=capture, path=victim_path, interval=None) as dev:
        dev.state["pending"] = "x"
        await dev.emit("t", {"k": "pending"})
        with pytest.raises(TransportError):
            await dev.sync()
    fuzzer = Fuzzer(server.port, token)
    await asyncio.to_thread(fuzz, fuzzer, capture.bodies[0])
    assert sum(fuzzer.statuses.values()) >= 300
    assert reached <= set(fuzzer.codes), fuzzer.codes
    assert (fuzzer.statuses[200] > 0) == (fuzz is not fuzz_random_bytes), fuzzer.statuses

    # The server still serves; the keeper's data is intact and it syncs on.
    assert (await admin.state("keeper")) == keeper_state
    assert await events_of(admin, "keeper") == keeper_events
    async with Device("keeper", server.url, token=keeper_token, path=keeper_path,
                      interval=None) as dev:
        await dev.emit("t", {"k": "after"})
        await dev.sync()
        assert dev.pending_events == 0
    assert [e["body"] for e in await events_of(admin, "keeper")][-2:] == [{"k": 4}, {"k": "after"}]
    # The victim: what was stored before is intact; extra events came from accepted bodies.
    after = await events_of(admin, "victim")
    assert after[:len(victim_events)] == victim_events
    accepted = {(e.seq, e.topic, e.time, msgpack.packb(e.body))
                for body in fuzzer.accepted for e in decode_request(body).events}
    for event in after[len(victim_events):]:
        key = (event["seq"], event["topic"], event["time"], msgpack.packb(event["body"]))
        assert key in accepted, event
    # Its state: as before, plus "pending", plus what accepted stamped writes wrote (``s``
    # makes the key hold the value written: a mutated key name is a write of another key).
    state = (await admin.state("victim"))["state"]
    stamped = {w.key for body in fuzzer.accepted for d in decode_request(body).docs
               if d.doc == "state" for w in d.stamps or () if w.map == "state"}
    expected = {**victim_state["state"], "pending": "x"}
    assert {k for k in {*state, *expected} if state.get(k) != expected.get(k)} <= stamped | {
        "pending"}
    async with Device("victim", server.url, token=token, path=victim_path,
                      interval=None) as dev:
        await dev.sync()
        assert dev.pending_events == 0
        assert crdt.to_json(dev.doc) == await admin.state("victim")
        assert dev.state["pending"] == "x"
