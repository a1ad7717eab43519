"""Sync throughput and latency: many devices against a real `crdtsync serve` process.

The server runs in its own process (`python -m crdtsync serve`, SQLite in a temp folder,
default durability); the load generator runs in this process. Each simulated device keeps
one in-memory pycrdt document (random client id) and a small outbox, no SQLite: every sync
makes 5 writes into its `state` map, sends the update since its last acknowledged state
vector plus 10 new events (consecutive seqs, `pg` = the highest acknowledged seq), and
adopts each new generation of `state` the server answers, as the reference client does
(protocol section 8: the server rebuilds a document whose history outweighs its content,
so the devices' history stays bounded as real devices' does). The
warm-up sends them through aiohttp and applies the answers; the rounds send requests built
before each round (:class:`LeanFleet`, :func:`lean_round`), so that the load generator takes
little of the machine. A fixed number of requests is kept in flight (one per device at
most); each round runs for a fixed time.

The ceiling is a bare aiohttp server in a third process (this script with `--bare-server`):
its handler reads the body and answers a valid sync response of the same size as the real
server's typical one, with an `ack` covering every seq. It is driven by prebuilt
requests of simulated devices of its own (:func:`lean_round`: raw HTTP/1.1 on keep-alive
connections, a few µs of this process's CPU per request, no pycrdt or aiohttp client work),
in rounds interleaved with the real ones (real, bare, real, bare, ...); the ratio is crdtsync
syncs/s over bare syncs/s. Until 2026-12-06 the simulated devices drove it too: on 2 CPUs
that left the ceiling client-bound (the load generator at 100 % of a CPU, the bare server
about a third idle), a ceiling of a fifth of its real rate and a CPU per request 1.5x its
cost when busy. The report says whether either side is client-bound.

The floor (issue 17), from the same run: server process CPU per sync (every thread, from
``/proc``) of the real and of the bare server during their rounds, and, after each bare
round, the durable work of the same kind of requests done directly in this process
(:class:`DirectStore`: msgpack decode, pycrdt apply, SQLite inserts into a snapshot of the
server's database, ``time.process_time``). Floor = bare + direct; the report gives crdtsync / floor.

    python bench/throughput.py [--devices 200] [--concurrency 32] [--duration 10]
                               [--rounds 5] [--direct-passes 10] [--shared-docs] [--quick]
                               [--write FILE]
    python bench/throughput.py --profile server.prof   (server under cProfile, no ceiling)
    python bench/throughput.py --sample loop.pkl       (sampling profile of the server's loop)
    python bench/throughput.py --sql-stats DIR         (CPU per SQL statement, server and floor)
    python bench/throughput.py --against TREE          (this server against TREE's, A/B)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web
from common import (
    Child,
    CpuMeter,
    CpuUse,
    PgBackends,
    SqlStats,
    add_encoding_option,
    check_last_seq,
    client_session,
    compress,
    exit_on_sigterm,
    headers,
    machine,
    percentile,
    print_profile,
    print_samples,
    provision,
    report,
    spread,
    sql_kind,
    sql_per_sync,
    start_server,
)
from ingest import event_digests, event_json, events_table, open_ceiling
from pycrdt import Doc, Map

from crdtsync.cli import SERVE_GC_YOUNG
from crdtsync.crdt import random_client_id
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    DocSync,
    Event,
    SyncRequest,
    decode_error,
    decode_response,
    encode_request,
)
from crdtsync_server.api.server import tune_gc
from crdtsync_server.store.feed import json_text

NAME = "throughput"
STATE_CHANGES = 5
EVENTS_PER_SYNC = 10
ALL_ACKED = 2**32 - 1
"""The bare server's `ack`: covers every seq a run can reach, so its devices drop their
events exactly as after a real acknowledgement."""
EMPTY_SV = b"\x00"
SCRIPT = Path(__file__).resolve()
KEEP_HEADERS = ("Server", "Accept-Encoding")
"""Response headers of the real server that the bare one repeats (aiohttp adds the rest)."""
LIBS = ("aiohttp", "pycrdt", "msgpack")


def reading(rng: random.Random, ts: int) -> bytes:
    """A sensor reading event body, msgpack-encoded (what the device outbox stores)."""
    return msgpack.packb({"temp": round(21 + rng.uniform(-2, 2), 1), "hum": rng.randint(30, 50),
                          "voltage": round(3.7 + rng.uniform(-0.05, 0.05), 2), "ts": ts,
                          "motion": rng.random() < 0.05}, use_bin_type=True)


# --- the simulated device -----------------------------------------------------------------


class SimDevice:
    """One device: an in-memory pycrdt document, an outbox, and the protocol bookkeeping."""

    def __init__(self, device_id: str, token: str, seed: int, shared_docs: bool,
                 encoding: str, adopts: bool = True) -> None:
        self.id = device_id
        self.encoding = encoding
        self.headers = headers(token, encoding)
        self.response_headers: dict[str, str] = {}
        self.doc: Doc[Any] = Doc(client_id=random_client_id())
        self.state: Map[Any] = self.doc.get("state", type=Map)
        self.rng = random.Random(seed)
        self.base_sv = EMPTY_SV
        """Our state vector as of the last acknowledged sync: the server has all of it."""
        self.next_seq = 1
        self.acked = 0
        self.outbox: deque[tuple[int, int, bytes]] = deque()
        self.syncs = 0
        self.shared = ((DocSync("fleet", EMPTY_SV), DocSync("project", EMPTY_SV))
                       if shared_docs else ())
        self.adopts = adopts
        self.gen = 0
        """The generation of ``state`` this device holds (protocol section 8)."""
        self.adoptions = 0

    def request(self, events: Sequence[tuple[int, int, bytes]] = ()
                ) -> tuple[bytes, bytes, int]:
        """The next request: ``(body, state vector sent, last seq sent)``. Its events are
        the outbox plus ``events`` if given (those of a request dropped when the device
        adopted a new generation, :meth:`LeanFleet.answered`), else 10 new ones."""
        rng, now = self.rng, int(time.time() * 1000)
        with self.doc.transaction():
            self.state["temp"] = round(21 + rng.uniform(-2, 2), 1)
            self.state["hum"] = rng.randint(30, 50)
            self.state["voltage"] = round(3.7 + rng.uniform(-0.05, 0.05), 2)
            self.state["uptime"] = self.syncs * 60
            self.state["rssi"] = -rng.randint(40, 90)
        sv = self.doc.get_state()
        update = self.doc.get_update(self.base_sv)
        self.outbox.extend(events)
        for _ in range(0 if events else EVENTS_PER_SYNC):
            self.outbox.append((self.next_seq, now, reading(rng, now // 1000)))
            self.next_seq += 1
        state = DocSync("state", sv, update, gen=self.gen, adopt=self.adopts)
        request = SyncRequest(
            device=self.id, docs=(state, *self.shared),
            events=tuple(Event(seq, "readings", t, None) for seq, t, _ in self.outbox),
            purged=self.acked)
        body = encode_request(request, bodies=[b for _, _, b in self.outbox])
        return compress(body, self.encoding), sv, self.outbox[-1][0]

    def apply(self, raw: bytes, sent_sv: bytes) -> int:
        """Apply a 200 response; returns how many outbox events it acknowledged."""
        response = decode_response(raw)
        for part in response.docs:
            if part.doc != "state":
                continue
            if part.gen != self.gen:
                self.adopt(part.gen, part.sv, part.update)
                sent_sv = part.sv
            elif part.update:
                self.doc.apply_update(part.update)
        # a 200 comes after the commit: the server has our update
        return self.acknowledge(sent_sv, response.acked)

    def adopt(self, gen: int, sv: bytes, whole: bytes) -> None:
        """Replace ``state`` by the cloud's generation ``gen`` (its whole document
        ``whole``, state vector ``sv``) as the reference client does (protocol 8.1): a new
        document with a new client id holding the cloud's content, and every key of this
        device's map written into it again (each request writes them all, so all are
        dirty: the request the cloud answered with ``gen`` was not applied). The next
        request sends them with its own writes; its diff base is ``sv``."""
        carried = self.state.to_py() or {}
        self.doc = Doc(client_id=random_client_id())
        if whole:
            self.doc.apply_update(whole)
        self.state = self.doc.get("state", type=Map)
        with self.doc.transaction():
            for key, value in carried.items():
                self.state[key] = value
        self.base_sv, self.gen = sv, gen
        self.adoptions += 1

    def acknowledge(self, sent_sv: bytes, acked: int) -> int:
        """Record a sync that stored our state as of ``sent_sv`` and acknowledged the events
        up to seq ``acked``; returns how many outbox events that drops."""
        self.base_sv = sent_sv
        self.syncs += 1
        self.acked = max(self.acked, acked)
        done = 0
        while self.outbox and self.outbox[0][0] <= self.acked:
            self.outbox.popleft()
            done += 1
        return done


def fleet(tokens: dict[str, str], s: Settings, seed: int) -> list[SimDevice]:
    return [SimDevice(i, tokens[i], seed * 1_000_003 + n, s.shared_docs, s.encoding)
            for n, i in enumerate(sorted(tokens))]


# --- the load generator -------------------------------------------------------------------


@dataclass
class RoundResult:
    side: str
    seconds: float = 0.0
    syncs: int = 0
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cpu: CpuUse = field(default_factory=CpuUse)
    adoptions: int = 0
    """Answers that carried a new generation of a device's ``state`` (it adopted it)."""

    @property
    def syncs_per_s(self) -> float:
        return self.syncs / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000

    def line(self) -> str:
        c = self.cpu
        return (f"{self.side:>8}: {self.syncs_per_s:8,.0f} syncs/s {self.events_per_s:9,.0f} "
                f"events/s  p50 {self.p(0.5):6.2f} ms  p99 {self.p(0.99):6.2f} ms  "
                f"req {self.bytes_up / max(self.syncs, 1):4.0f} B  resp "
                f"{self.bytes_down / max(self.syncs, 1):3.0f} B  CPU server "
                f"{c.server_main:3.0f}%+{c.server_other:2.0f}% "
                + (f"database {c.database:3.0f}% " if c.database else "")
                + f"load {c.load:3.0f}% others {c.others:3.0f}%"
                + (f"  adopted {self.adoptions}" if self.adoptions else "")
                + (f"  ERRORS {dict(self.errors)}" if self.errors else ""))


async def sync_once(session: aiohttp.ClientSession, url: str, dev: SimDevice,
                    result: RoundResult | None = None) -> bytes:
    """One sync of ``dev``; records into ``result`` or raises on any failure."""
    body, sv, last = dev.request()
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=dev.headers) as resp:
            raw = await resp.read()
            status = resp.status
            if result is None:
                dev.response_headers = {k: v for k, v in resp.headers.items()
                                        if k in KEEP_HEADERS}
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if result is None:
            raise
        result.errors[type(exc).__name__] += 1
        return b""
    elapsed = time.perf_counter() - start
    if status != 200:
        error = decode_error(raw, status)
        if result is None:
            raise error
        result.errors[f"{status} {error.code}"] += 1
        return raw
    adoptions = dev.adoptions
    acked = dev.apply(raw, sv)
    if result is not None:
        result.adoptions += dev.adoptions - adoptions
        if dev.acked < last:
            result.errors["events not acknowledged"] += 1
        result.latencies.append(elapsed)
        result.syncs += 1
        result.events += acked
        result.bytes_up += len(body)
        result.bytes_down += len(raw)
    return raw


def round_robin(urls: str | Sequence[str]) -> Callable[[], str]:
    """The URL of each next request: ``urls`` in turn (one URL: always that one), as a
    balancer without sticky routing spreads requests over instances."""
    turn = itertools.cycle([urls] if isinstance(urls, str) else urls)
    return lambda: next(turn)


async def warm_up(session: aiohttp.ClientSession, urls: str | Sequence[str],
                  devices: Sequence[SimDevice], concurrency: int, passes: int = 2
                  ) -> list[bytes]:
    """``passes`` syncs of every device (the first carries its whole document), spread over
    ``urls`` (:func:`round_robin`); returns the last response of each."""
    sem = asyncio.Semaphore(concurrency)
    last: list[bytes] = []
    next_url = round_robin(urls)

    async def one(dev: SimDevice) -> None:
        async with sem:
            raw = b""
            for _ in range(passes):
                raw = await sync_once(session, next_url(), dev)
            last.append(raw)

    await asyncio.gather(*(one(d) for d in devices))
    return last


async def run_round(session: aiohttp.ClientSession, urls: str | Sequence[str],
                    devices: Sequence[SimDevice], concurrency: int, duration: float,
                    side: str, servers: Child | Sequence[Child],
                    database: PgBackends | None = None) -> RoundResult:
    """``concurrency`` workers, each syncing the next idle device through the next of
    ``urls`` (:func:`round_robin`), for ``duration`` s; the CPU of ``servers`` (and of the
    ``database`` backends serving them) during it."""
    idle = deque(devices)
    result = RoundResult(side)
    next_url = round_robin(urls)
    if database is not None:
        await database.refresh()
    meter = CpuMeter(servers, database.seconds if database is not None else None)
    deadline = meter.t0 + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            dev = idle.popleft()
            try:
                await sync_once(session, next_url(), dev, result)
            finally:
                idle.append(dev)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(devices)))))
    if database is not None:
        await database.refresh()
    result.cpu = meter.stop()
    result.seconds = meter.seconds
    return result


# --- the bare ceiling ---------------------------------------------------------------------


def canned_response(real: bytes) -> bytes:
    """A valid sync response of exactly ``len(real)`` bytes when possible: the real one
    with ``ack`` covering every seq, ``time`` 0, and an unknown key ``x`` (receivers ignore
    it) padding it to the same size."""
    msg = msgpack.unpackb(real, raw=False)
    msg["ack"], msg["time"] = ALL_ACKED, 0
    base = msgpack.packb(msg, use_bin_type=True)
    for pad in range(len(real)):
        msg["x"] = b"\x00" * pad
        body = msgpack.packb(msg, use_bin_type=True)
        if len(body) >= len(real):
            return bytes(body)
    return bytes(base)


def bare_server(port: int, response_file: Path) -> None:
    """The ceiling: read the body, answer the canned response (``--bare-server`` mode)
    with the real server's ``Server`` and ``Accept-Encoding`` headers (``FILE.headers``)."""
    body = response_file.read_bytes()
    extra = json.loads(Path(f"{response_file}.headers").read_text())

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type=MEDIA_TYPE, headers=extra)

    async def main() -> None:
        # as the real server: bodies up to 4 MiB, read as they come (no decompression)
        app = web.Application(client_max_size=4 * 1024 * 1024,
                              handler_args={"auto_decompress": False})
        app.router.add_post(SYNC_PATH, handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        tune_gc(SERVE_GC_YOUNG)  # the collector as `crdtsync serve` runs it
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"bare aiohttp server listening on http://127.0.0.1:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# --- the lean load generator of the rounds -----------------------------------------------


def raw_request(host: str, body: bytes, request_headers: dict[str, str]) -> bytes:
    """One sync request as the reference client puts it on the wire: request line, ``Host``,
    its headers, ``Content-Length``, then ``body``."""
    lines = [f"POST {SYNC_PATH} HTTP/1.1", f"Host: {host}",
             *(f"{name}: {value}" for name, value in request_headers.items()),
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


Events = tuple[tuple[int, int, bytes], ...]
"""Outbox events: ``(seq, time, body)``."""
Prebuilt = tuple[bytes, int, int, Events]
"""A prebuilt request: the whole request as sent, its body's size, the highest event seq it
carries, its events. ``b""`` as the request: not built yet, to be built with these events
when its turn comes (its device adopted a new generation after it was queued)."""


class LeanFleet:
    """The load of :func:`lean_round`: simulated devices whose requests are built before a
    round (:meth:`top_up`), each acknowledged in full when built, as :func:`direct_requests`
    makes them, and sent in order, one request per device in flight, each device's next
    one after its previous answer. A request left unsent at the end of a round is the first
    of the next. With ``ring``, the bare server's load: the last request built for each device
    at the first :meth:`top_up`, sent over and over by any connection (it reads nothing but
    their size).

    The devices adopt new generations of ``state`` as the reference client does (protocol
    section 8), so the server rebuilds their documents and their history stays bounded, as
    it does for real devices (until 2026-12-07 they did not: the documents' history grew
    through a run, and the server's CPU per sync with it, by a third over five rounds). An
    answer with a new generation drops the device's queued requests, built on the old one:
    they are built again, with the same events, when their turn comes, in the round."""

    def __init__(self, host: str, devices: Sequence[SimDevice], ring: bool = False) -> None:
        self.host = host
        self.devices = {dev.id: dev for dev in devices}
        self.ring = ring
        self.pending: dict[str, deque[Prebuilt]] = {dev.id: deque() for dev in devices}
        self.idle: deque[str] = deque(self.devices)
        self.acked = {dev.id: 0 for dev in devices}
        """Per device, the highest ``ack`` the server answered."""
        self._ring: list[tuple[str, Prebuilt]] = []
        self._turn = 0

    def top_up(self, per_device: int) -> None:
        """Build requests until each device has ``per_device`` waiting (untimed)."""
        for device, queue in self.pending.items():  # those an adoption dropped first
            for n, request in enumerate(queue):
                if not request[0]:
                    queue[n] = self._build(device, request[3])
        for _ in range(per_device - min(len(q) for q in self.pending.values())):
            for dev in self.devices.values():
                if len(self.pending[dev.id]) < per_device:
                    self.pending[dev.id].append(self._build(dev.id))
        if self.ring and not self._ring:
            self._ring = [(device, queue[-1]) for device, queue in self.pending.items()]

    def _build(self, device: str, events: Events = ()) -> Prebuilt:
        """``device``'s next request (with ``events``: those of a dropped one), taken as
        acknowledged in full."""
        dev = self.devices[device]
        body, sv, last = dev.request(events)
        built = tuple(dev.outbox)
        dev.acknowledge(sv, last)
        return raw_request(self.host, body, dev.headers), len(body), last, built

    def take(self) -> tuple[str, Prebuilt] | None:
        """The next request to send and its device; ``None`` when no idle device has one."""
        if self.ring:
            self._turn += 1
            return self._ring[self._turn % len(self._ring)]
        for _ in range(len(self.idle)):
            device = self.idle.popleft()
            if self.pending[device]:
                request = self.pending[device].popleft()
                if not request[0]:
                    request = self._build(device, request[3])
                return device, request
            self.idle.append(device)
        return None

    def answered(self, device: str, request: Prebuilt, status: bytes, body: bytes,
                 result: RoundResult) -> None:
        """Record the answer to ``device``'s ``request``: a 200 whose ``ack`` covers the
        request's events counts as a sync, anything else as an error."""
        if not self.ring:
            self.idle.append(device)
        if status != b"200":
            result.errors[status.decode()] += 1
            return
        if not self.ring:
            answer = msgpack.unpackb(body, raw=False)
            ack = answer["ack"]
            self.acked[device] = max(self.acked[device], ack)
            self._adopt(device, answer, result)
            if ack < request[2]:
                result.errors["events not acknowledged"] += 1
                return
        result.syncs += 1
        result.events += EVENTS_PER_SYNC
        result.bytes_up += request[1]
        result.bytes_down += len(body)

    def _adopt(self, device: str, answer: dict[str, Any], result: RoundResult) -> None:
        """If ``answer``'s ``state`` entry is of another generation than ``device`` holds,
        adopt it and turn the device's queued requests into events to build again."""
        dev = self.devices[device]
        entry = next((d for d in answer.get("docs", ()) if d["d"] == "state"), None)
        if entry is None or entry.get("g", 0) == dev.gen:
            return
        dev.adopt(entry["g"], entry["sv"], entry.get("u", b""))
        result.adoptions += 1
        self.pending[device] = deque((b"", 0, last, events)
                                     for _, _, last, events in self.pending[device])


class _LeanConnection(asyncio.Protocol):
    """One keep-alive connection of :func:`lean_round`: sends the next request of ``fleet``
    as soon as the previous answer is complete (``Content-Length`` framing), until the
    deadline or until ``fleet`` has none; records into ``result``."""

    def __init__(self, fleet: LeanFleet, result: RoundResult, deadline: float,
                 done: asyncio.Future[None]) -> None:
        self.fleet, self.result, self.deadline, self.done = fleet, result, deadline, done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sent_at = 0.0
        self.sent: tuple[str, Prebuilt] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent = self.fleet.take()
        if self.sent is None:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.sent[1][0])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        at = self.buffer.find(b"Content-Length: ", 0, head_end) + 16
        end = head_end + 4 + int(self.buffer[at:self.buffer.index(b"\r\n", at)])
        if len(self.buffer) < end:
            return
        now = time.perf_counter()
        assert self.sent is not None
        self.result.latencies.append(now - self.sent_at)
        self.fleet.answered(*self.sent, self.buffer[9:12], self.buffer[head_end + 4:end],
                            self.result)
        self.buffer = self.buffer[end:]
        if now < self.deadline:
            self._send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent is not None and time.perf_counter() < self.deadline:
            self.result.errors["connection lost"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def lean_round(url: str, fleet: LeanFleet, concurrency: int, duration: float,
                     side: str, server: Child | Sequence[Child]) -> RoundResult:
    """``concurrency`` keep-alive connections to ``url``'s host sending ``fleet``'s
    prebuilt requests for ``duration`` s: a load generator that costs a few µs per request
    in this process. The simulated devices' own pycrdt and aiohttp client work per request
    left the bare server idle a third of the time, where each request costs it more (one
    wake-up of its loop per request instead of one per several), and took a CPU's worth of
    the machine the servers run on. The CPU of ``server`` during it."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    loop = asyncio.get_running_loop()
    result = RoundResult(side)
    meter = CpuMeter(server)
    deadline = meter.t0 + duration
    dones = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda done=done: _LeanConnection(fleet, result, deadline, done), host, int(port))
        dones.append(done)
    await asyncio.wait_for(asyncio.gather(*dones), duration + 60)  # a server that hangs
    result.cpu = meter.stop()
    result.seconds = meter.seconds
    if time.perf_counter() < deadline:
        result.errors["requests ran out before the round's end"] += 1
    return result


# --- the durable work done directly -------------------------------------------------------


COMMIT_EVERY = 12
"""Syncs per transaction of the direct store (about the server's group commit under load)."""
UPSERT_PROJECTION = (
    "INSERT INTO projection (device, doc, map, key, value, updated) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device, doc, map, key) DO UPDATE SET value = excluded.value,"
    " updated = excluded.updated")


class DirectStore:
    """The durable work of a sync done directly, in this process, as a lower bound of what a
    server must do: msgpack-decode the request body (event bodies included), apply the
    ``state`` update to a pycrdt document per device, and write to SQLite (WAL,
    ``synchronous=FULL``) the events (body as JSON text and digest, as the server stores
    them), one ``updates`` row and one projection upsert per key of the ``state`` map (its
    values as JSON text); one commit per :data:`COMMIT_EVERY` syncs.

    ``path`` is a snapshot of the server's database (:func:`snapshot`): the rows go into the
    same ``feed``, ``updates`` and ``projection`` tables, indexes and rows the server is
    writing, for the same device ids, each device's events numbered on from its stored
    ``last_seq``. Inserting into a B-tree of 50 MB costs more than into an empty file (about
    1.5x per commit, bench-style, on 33 MB), so a floor measured on a fresh file would be
    lower than the same work done where the server does it."""

    def __init__(self, path: Path) -> None:
        self.insert_event, _schema = events_table(path)
        self.conn = open_ceiling(path, [])
        self.seq_base = dict(self.conn.execute("SELECT id, last_seq FROM devices"))
        self.docs: dict[str, tuple[Doc[Any], Map[Any]]] = {}
        self.pending = 0

    def _doc(self, device: str) -> tuple[Doc[Any], Map[Any]]:
        if device not in self.docs:
            doc: Doc[Any] = Doc()
            self.docs[device] = doc, doc.get("state", type=Map)
        return self.docs[device]

    def sync(self, body: bytes) -> None:
        """Do the durable work of one (uncompressed) sync request ``body``."""
        msg = msgpack.unpackb(body, raw=False)
        device = msg["dev"]
        doc, state = self._doc(device)
        updates = [entry["u"] for entry in msg.get("docs", ()) if entry.get("u")
                   and entry["d"] == "state"]
        for update in updates:
            doc.apply_update(update)
        now = int(time.time() * 1000)
        base = self.seq_base.get(device, 0)
        events = [Event(base + seq, topic, at, msgpack.unpackb(raw, raw=False))
                  for seq, topic, at, raw in msg.get("ev", ())]
        if not self.pending:
            self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(self.insert_event, [
            (device, e.seq, e.topic, e.time, now, event_json(e), digest)
            for e, digest in zip(events, event_digests(events), strict=True)])
        self.conn.executemany("INSERT INTO updates (key, gen, data) VALUES (?, 0, ?)",
                              [(f"{device}/state", u) for u in updates])
        self.conn.executemany(UPSERT_PROJECTION, [
            (device, "state", "state", key, json_text(value), now)
            for key, value in state.items()])
        self.pending += 1
        if self.pending == COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        if self.pending:
            self.conn.execute("COMMIT")
            self.pending = 0

    def close(self) -> None:
        self.commit()
        self.conn.close()


def snapshot(server_db: Path, path: Path) -> None:
    """A consistent copy of the server's database at ``path`` (SQLite's online backup, page
    by page: the same layout, not a vacuumed one), taken between rounds."""
    with contextlib.closing(sqlite3.connect(f"file:{server_db}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(path)) as dst:
        src.backup(dst)


@dataclass
class DirectResult:
    """Process CPU seconds (``time.process_time``) of ``syncs`` syncs done directly."""

    syncs: int
    cpu: float

    @property
    def ms_per_sync(self) -> float:
        return self.cpu * 1000 / self.syncs


def direct_requests(ids: Sequence[str], s: Settings, seed: int) -> list[bytes]:
    """Request bodies (uncompressed) of fresh simulated devices with the ids ``ids``, as the
    load generator makes them, each acknowledged in full when made: two warm-up passes of
    every device (the first carries its whole document) then ``s.direct_passes`` passes."""
    devices = [SimDevice(device, "", seed * 1_000_003 + n, s.shared_docs, "identity")
               for n, device in enumerate(ids)]
    bodies = []
    for _ in range(2 + s.direct_passes):
        for dev in devices:
            body, sv, last = dev.request()
            dev.acknowledge(sv, last)
            bodies.append(body)
    return bodies


@contextlib.contextmanager
def server_collector() -> Iterator[None]:
    """Python's garbage collector as ``crdtsync serve`` runs it (``tune_gc``) while the
    block runs, then as it was: the floor gets the server's collector settings."""
    threshold = gc.get_threshold()
    tune_gc(SERVE_GC_YOUNG)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def direct_round(path: Path, server_db: Path, ids: Sequence[str], s: Settings,
                 seed: int) -> DirectResult:
    """The durable work of the requests of :func:`direct_requests` for the server's devices
    ``ids``, in a snapshot of the server's database ``server_db`` taken now at ``path``
    (:class:`DirectStore`): the warm-up passes untimed, the others timed (process CPU time,
    every thread, the last commit included); the files are removed after."""
    bodies = direct_requests(ids, s, seed)
    warm = 2 * len(ids)
    snapshot(server_db, path)
    store = DirectStore(path)
    try:
        with server_collector():
            for body in bodies[:warm]:
                store.sync(body)
            store.commit()
            start = time.process_time()
            for body in bodies[warm:]:
                store.sync(body)
            store.commit()
            cpu = time.process_time() - start
    finally:
        store.close()
        for file in path.parent.glob(f"{path.name}*"):
            file.unlink()
    return DirectResult(len(bodies) - warm, cpu)


# --- the benchmark ------------------------------------------------------------------------


@dataclass
class Settings:
    devices: int
    concurrency: int
    duration: float
    rounds: int
    shared_docs: bool
    encoding: str
    quick: bool
    profile: Path | None
    seed: int
    direct_passes: int = 10
    """Timed syncs per device of the direct work, per round."""
    sample: Path | None = None
    """Where the server's sampling profile goes (``--sample``)."""
    sql_stats: Path | None = None
    """Folder of the SQL statement counts (``--sql-stats``): ``server.json`` by the server."""


@dataclass
class Results:
    real: list[RoundResult] = field(default_factory=list)
    bare: list[RoundResult] = field(default_factory=list)
    direct: list[DirectResult] = field(default_factory=list)
    real_size: int = 0
    """Bytes of the real server's typical response."""
    bare_size: int = 0


async def benchmark(s: Settings) -> Results:
    """Run the rounds: crdtsync, bare, direct work, crdtsync, ... (only crdtsync when
    profiling)."""
    results = Results()
    servers: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            real = await start_server(
                tmp, profile=s.profile, sample=s.sample,
                sql_stats=None if s.sql_stats is None else s.sql_stats / "server.json")
            servers.append(real)
            ids = [f"bench-{n:04d}" for n in range(s.devices)]
            tokens = await provision(real.url, ids)
            async with client_session(s.concurrency, 60) as session:
                real_devs = fleet(tokens, s, s.seed)
                real_url = real.url + SYNC_PATH
                started = time.perf_counter()
                last = await warm_up(session, real_url, real_devs, s.concurrency)
                rate = 2 * len(real_devs) / (time.perf_counter() - started)
                real_fleet = LeanFleet(real.url.split("//", 1)[1], real_devs)
                typical = sorted(last, key=len)[len(last) // 2]
                bare_url = ""
                bare: Child | None = None
                bare_fleet = LeanFleet("", [])
                canned = b""
                if s.profile is None:
                    canned = canned_response(typical)
                    (tmp / "response.bin").write_bytes(canned)
                    (tmp / "response.bin.headers").write_text(
                        json.dumps(real_devs[0].response_headers))
                    bare = Child(
                        "bare-aiohttp",
                        [sys.executable, str(SCRIPT), "--bare-server",
                         "--port", "0", "--response", str(tmp / "response.bin")],
                        tmp / "bare-aiohttp.log")
                    servers.append(bare)
                    await bare.start()
                    bare_url = bare.url + SYNC_PATH
                    bare_fleet = LeanFleet(bare.url.split("//", 1)[1],
                                           fleet(tokens, s, s.seed + 1), ring=True)
                    bare_fleet.top_up(3)  # the third request of each: no whole document
                    await lean_round(bare_url, bare_fleet, s.concurrency, 0.5, "warm-up",
                                     bare)
                for n in range(s.rounds):
                    # enough for twice the best rate so far (five times the warm-up's: a
                    # warm-up slowed by the machine once left the first round short)
                    real_fleet.top_up(math.ceil((5 if n == 0 else 2) * rate * s.duration
                                                / len(real_devs)))
                    r = await lean_round(real_url, real_fleet, s.concurrency, s.duration,
                                         "crdtsync", real)
                    rate = max(rate, r.syncs_per_s)
                    results.real.append(r)
                    print(f"round {n + 1}/{s.rounds} {r.line()}", flush=True)
                    if bare is not None:
                        b = await lean_round(bare_url, bare_fleet, s.concurrency,
                                             s.duration, "bare", bare)
                        results.bare.append(b)
                        print(f"round {n + 1}/{s.rounds} {b.line()}", flush=True)
                        d = direct_round(tmp / "direct.db", tmp / "server.db", ids, s,
                                         s.seed + 2 + n)
                        results.direct.append(d)
                        print(f"round {n + 1}/{s.rounds}   direct: {d.syncs:,} syncs, "
                              f"{d.ms_per_sync:.3f} ms CPU per sync", flush=True)
            # every acknowledged event is stored (checked on a sample of the devices)
            sample = real_devs[::max(1, len(real_devs) // 20)]
            await check_last_seq(real.url, {d.id: real_fleet.acked[d.id] for d in sample})
        finally:
            for server in reversed(servers):
                await server.stop()
    results.real_size, results.bare_size = len(typical), len(canned)
    return results


async def ab_benchmark(s: Settings, against: Path) -> tuple[list[RoundResult],
                                                           list[RoundResult]]:
    """``--against TREE``: this checkout's server (A; ``$CRDTSYNC_BENCH_SERVER_TREE``'s when
    set) and the checkout ``against``'s (B), each
    on its own database with the same devices and load, in rounds that alternate which goes
    first (A B, B A, ...): a comparison paired within seconds, so that a machine whose speed
    drifts (as these do, by a fifth within an hour) moves both sides alike. No floor."""
    sides: tuple[list[RoundResult], list[RoundResult]] = ([], [])
    with tempfile.TemporaryDirectory(prefix="crdtsync-ab-") as tmp_name:
        tmp = Path(tmp_name)
        async with contextlib.AsyncExitStack() as stack, \
                client_session(s.concurrency, 60) as session:
            runs = []
            rates: list[float] = []
            for name, tree in (("A", None), ("B", str(against))):
                server = await start_server(tmp, db=f"{name}.db", tree=tree)
                stack.push_async_callback(server.stop)
                tokens = await provision(server.url, [f"bench-{n:04d}" for n in
                                                      range(s.devices)])
                devs = fleet(tokens, s, s.seed)
                started = time.perf_counter()
                await warm_up(session, server.url + SYNC_PATH, devs, s.concurrency)
                rates.append(2 * len(devs) / (time.perf_counter() - started))
                runs.append((name, server, LeanFleet(server.url.split("//", 1)[1], devs)))
            for n in range(s.rounds):
                for side in (0, 1) if n % 2 == 0 else (1, 0):
                    name, server, lean = runs[side]
                    lean.top_up(math.ceil((5 if n == 0 else 2) * rates[side] * s.duration
                                          / s.devices))
                    r = await lean_round(server.url + SYNC_PATH, lean, s.concurrency,
                                         s.duration, f"crdtsync {name}", server)
                    rates[side] = max(rates[side], r.syncs_per_s)
                    sides[side].append(r)
                    print(f"round {n + 1}/{s.rounds} {r.line()}", flush=True)
    return sides


def failed(rounds: Sequence[RoundResult]) -> int:
    """Requests that failed over ``rounds``."""
    return sum(sum(r.errors.values()) for r in rounds)


def render_ab(s: Settings, a: Sequence[RoundResult], b: Sequence[RoundResult],
              against: Path) -> str:
    """The A/B table: per round and median, B over A."""
    def cpu(r: RoundResult) -> float:
        return per_sync(r, r.cpu.server)

    lines = [f"A: this checkout's server; B: the server of {against}. {s.devices} devices, "
             f"{s.concurrency} requests in flight, {s.rounds} rounds of {s.duration:g} s "
             "per side, alternating which side goes first.", "",
             "| round | A CPU per sync (ms) | B CPU per sync (ms) | B / A | A syncs/s | "
             "B syncs/s |", "|---:|---:|---:|---:|---:|---:|"]
    for n, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        lines.append(f"| {n} | {cpu(x):.3f} | {cpu(y):.3f} | {cpu(y) / cpu(x):.2f} | "
                     f"{x.syncs_per_s:,.0f} | {y.syncs_per_s:,.0f} |")
    ratios = [cpu(y) / cpu(x) for x, y in zip(a, b, strict=True)]
    lines.append(f"| median | {statistics.median(map(cpu, a)):.3f} | "
                 f"{statistics.median(map(cpu, b)):.3f} | **{statistics.median(ratios):.2f}** "
                 f"({min(ratios):.2f}-{max(ratios):.2f}) | "
                 f"{statistics.median(r.syncs_per_s for r in a):,.0f} | "
                 f"{statistics.median(r.syncs_per_s for r in b):,.0f} |")
    return "\n".join(lines)


SERVER_SYNC_STATEMENT = "UPDATE devices"
"""Run once per device write the server commits: its count is the server's syncs that wrote
(no-change syncs write nothing), warm-ups included."""
DIRECT_SYNC_STATEMENT = "INSERT updates"
"""Run once per sync of the direct work (``executemany``), warm-up passes included."""


def sql_table(server: dict[str, list[float]], direct: dict[str, list[float]]) -> list[str]:
    """Calls and µs of CPU per sync of each kind of SQL statement, the server's (per device
    write it committed) beside the direct work's (per sync), most expensive first."""
    def syncs(stats: dict[str, list[float]], kind: str) -> int:
        return max(1, int(sum(calls for statement, (calls, _) in stats.items()
                              if sql_kind(statement) == kind)))

    ours = sql_per_sync(server, syncs(server, SERVER_SYNC_STATEMENT))
    floor = sql_per_sync(direct, syncs(direct, DIRECT_SYNC_STATEMENT))
    lines = ["", "SQL statements per sync (calls, µs of the calling thread's CPU; "
             "`--sql-stats`):", "",
             "| statement | server calls | server µs | direct calls | direct µs |",
             "|---|---:|---:|---:|---:|"]
    for kind in sorted(ours.keys() | floor.keys(),
                       key=lambda k: -max(ours.get(k, (0, 0))[1], floor.get(k, (0, 0))[1])):
        a, b = ours.get(kind, (0.0, 0.0)), floor.get(kind, (0.0, 0.0))
        if max(a[1], b[1]) >= 0.05:
            lines.append(f"| {kind} | {a[0]:.2f} | {a[1]:.1f} | {b[0]:.2f} | {b[1]:.1f} |")
    total = [sum(v[1] for v in side.values()) for side in (ours, floor)]
    lines.append(f"| **all** | | **{total[0]:.1f}** | | **{total[1]:.1f}** |")
    return lines


def per_sync(r: RoundResult, percent: float) -> float:
    """CPU ms per sync of a figure in % of one CPU over round ``r``."""
    return percent * 10 / r.syncs_per_s if r.syncs else float("nan")


CLIENT_BOUND = 90.0
"""Load generator CPU (% of one CPU) from which a round's syncs/s are bounded by the load
generator (one Python process: one CPU at most) rather than by the server."""


def floor_table(real: Sequence[RoundResult], bare: Sequence[RoundResult],
                direct: Sequence[DirectResult]) -> list[str]:
    """Server CPU per sync and per event of crdtsync, of the bare handler, of the durable
    work done directly, of the floor (bare + direct) and crdtsync over the floor (medians
    over rounds, min-max across rounds; the ratio of the medians, per-round ratios in
    brackets), then whether each side's syncs/s are bounded by the load generator."""
    a = [per_sync(r, r.cpu.server) for r in real]
    b = [per_sync(r, r.cpu.server) for r in bare]
    c = [d.ms_per_sync for d in direct]
    floor = [x + y for x, y in zip(b, c, strict=True)]
    pairs = [x / y for x, y in zip(a, floor, strict=True)]
    ratio = statistics.median(a) / statistics.median(floor)

    def row(name: str, values: Sequence[float]) -> str:
        events = [v / EVENTS_PER_SYNC for v in values]
        return f"| {name} | {spread(values, '{:.3f}')} | {spread(events, '{:.4f}')} |"

    lines = [
        "", "Server CPU per sync against the floor (user + system CPU time; servers: every "
        "thread of their process from `/proc`, during the rounds above; direct work: "
        "`time.process_time` of this process; per event = per sync / "
        f"{EVENTS_PER_SYNC}):", "",
        "| | CPU per sync (ms) | CPU per event (ms) |", "|---|---:|---:|",
        row("(a) crdtsync serve", a),
        row("(b) bare aiohttp handler, same body sizes", b),
        row(f"(c) the durable work done directly ({direct[0].syncs:,} syncs per round)", c),
        row("floor = (b) + (c)", floor),
        f"| **(a) / floor** | **{ratio:.1f}x** ({min(pairs):.1f}-{max(pairs):.1f}) | |",
        "",
    ]
    for side, rounds in (("crdtsync", real), ("bare", bare)):
        load = statistics.median([r.cpu.load for r in rounds])
        bound = load >= CLIENT_BOUND
        lines.append(
            f"- Load generator in the {side} rounds: {load:.0f} % of a CPU (median): the "
            f"{side} syncs/s {'ARE' if bound else 'are not'} client-bound (bound from "
            f"{CLIENT_BOUND:.0f} %)"
            + ("; the bare syncs/s is no true ceiling and the syncs/s ratio flatters "
               "crdtsync." if bound and side == "bare" else "."))
    lines.append("- CPU per sync is the server's own CPU divided by the syncs it served. It "
                 "falls as the server gets busier (one wake-up of its loop serves several "
                 "requests), so both servers are measured busy, driven by prebuilt requests "
                 "on keep-alive connections (`lean_round`): the simulated devices' own work "
                 "per request left the bare server idle a third of the time, at 1.5x its "
                 "CPU per request when busy.")
    lines.append(f"- (b) and (c) run with the garbage collector as `crdtsync serve` tunes it "
                 f"(start-up frozen, young collections every {SERVE_GC_YOUNG:,} net "
                 "allocations), so the floor gets what the server gets.")
    return lines


def render(s: Settings, res: Results) -> str:
    real, bare = res.real, res.bare

    def row(name: str, fn: Callable[[RoundResult], float], fmt: str = "{:,.0f}",
            ratio: bool = False) -> str:
        a = [fn(r) for r in real]
        b = [fn(r) for r in bare]
        if not ratio:
            return f"| {name} | {spread(a, fmt)} | {spread(b, fmt)} | |"
        pairs = [x / y for x, y in zip(a, b, strict=True)]
        return (f"| {name} | {spread(a, fmt)} | {spread(b, fmt)} | "
                f"**{statistics.median(a) / statistics.median(b):.2f}** "
                f"({min(pairs):.2f}-{max(pairs):.2f}) |")

    mean_up = sum(r.bytes_up for r in real) / sum(r.syncs for r in real)
    lines = [
        f"Machine: {machine(LIBS, model=True, temp_dir=True)}.",
        "",
        f"Load: {s.devices} devices, {s.concurrency} requests in flight, {STATE_CHANGES} state "
        f"changes + {EVENTS_PER_SYNC} events per sync"
        + (", plus fleet and project document entries" if s.shared_docs else
           ", state document only")
        + f"; {s.rounds} rounds of {s.duration:g} s per side, interleaved"
        + (" (quick mode: not representative)" if s.quick else "")
        + f". Mean body sizes: request {mean_up:.0f} B"
        + ("" if s.encoding == "identity" else f" (sent as {s.encoding})")
        + f", response {res.real_size} B (typical real) / {res.bare_size} B (bare).",
        "",
        "Medians over rounds, (min-max) across rounds; ratio = crdtsync / bare "
        "(of the medians; per-round pairs in brackets):",
        "",
        "| figure | crdtsync serve | bare aiohttp (ceiling) | ratio |",
        "|---|---:|---:|---:|",
        row("syncs/s", lambda r: r.syncs_per_s, ratio=True),
        row("events/s", lambda r: r.events_per_s, ratio=True),
        row("latency p50 (ms)", lambda r: r.p(0.5), "{:.2f}"),
        row("latency p99 (ms)", lambda r: r.p(0.99), "{:.2f}"),
        row("server CPU, event-loop thread (%)", lambda r: r.cpu.server_main),
        row("server CPU, other threads (%)", lambda r: r.cpu.server_other),
        row("server CPU per sync (ms)", lambda r: per_sync(r, r.cpu.server), "{:.3f}",
            ratio=True),
        row("load generator CPU (%)", lambda r: r.cpu.load),
        row("load generator CPU per sync (ms)", lambda r: per_sync(r, r.cpu.load), "{:.3f}"),
        row("CPU of other processes on the machine (%)", lambda r: r.cpu.others),
    ]
    lines += floor_table(real, bare, res.direct)
    goal = statistics.median([r.syncs_per_s for r in real]) / statistics.median(
        [r.syncs_per_s for r in bare])
    cpu = statistics.median([per_sync(r, r.cpu.server) for r in real]) / statistics.median(
        [per_sync(r, r.cpu.server) + d.ms_per_sync for r, d in zip(bare, res.direct,
                                                                  strict=True)])
    lines += ["", f"Goal (issue 6): crdtsync at least 0.5x the bare syncs/s: "
              f"{'met' if goal >= 0.5 else 'not met'} ({goal:.2f}).",
              f"Goal (issue 17): crdtsync server CPU per sync at most 2x the floor: "
              f"{'met' if cpu <= 2 else 'not met'} ({cpu:.1f}x)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side")
    parser.add_argument("--shared-docs", action="store_true",
                        help="also send fleet and project entries, as the reference client")
    add_encoding_option(parser)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--direct-passes", type=int, default=10,
                        help="timed syncs per device of the direct work, per round")
    parser.add_argument("--quick", action="store_true",
                        help="20 devices, 2 rounds of 2 s (CI smoke test)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--profile", type=Path, metavar="OUT",
                        help="run the server under cProfile (stats to OUT), no ceiling")
    parser.add_argument("--sample", type=Path, metavar="OUT",
                        help="sampling profile of the server's event loop (to OUT), printed")
    parser.add_argument("--sql-stats", type=Path, metavar="DIR",
                        help="CPU time per SQL statement of the server and of the direct "
                        "work (JSON in DIR), printed per sync")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="compare this checkout's server with the one of the checkout "
                        "TREE (a `git worktree`), rounds alternating; prints B / A per round")
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--response", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.port, args.response)
        return
    exit_on_sigterm()
    s = Settings(devices=20 if args.quick else args.devices,
                 concurrency=8 if args.quick else args.concurrency,
                 duration=2.0 if args.quick else args.duration,
                 rounds=2 if args.quick else args.rounds, shared_docs=args.shared_docs,
                 encoding=args.encoding,
                 quick=args.quick,
                 profile=args.profile.resolve() if args.profile else None, seed=args.seed,
                 direct_passes=5 if args.quick else args.direct_passes,
                 sample=args.sample.resolve() if args.sample else None,
                 sql_stats=args.sql_stats.resolve() if args.sql_stats else None)
    print(f"Machine: {machine(LIBS, model=True, temp_dir=True)}", flush=True)
    if args.against is not None:
        a, b = asyncio.run(ab_benchmark(s, args.against.resolve()))
        print(render_ab(s, a, b, args.against))
        if failed(a + b):
            sys.exit("requests failed (see the ERRORS columns)")
        return
    direct_sql = SqlStats()
    if s.sql_stats is not None:
        s.sql_stats.mkdir(parents=True, exist_ok=True)
        direct_sql.install()  # this process's SQLite work is the floor's direct work
    results = asyncio.run(benchmark(s))
    if s.sql_stats is not None:
        direct_sql.dump(s.sql_stats / "direct.json")
        print("\n".join(sql_table(SqlStats.load(s.sql_stats / "server.json"),
                                  direct_sql.stats)))
    errors = failed(results.real + results.bare)
    if s.sample is not None:
        print_samples(s.sample)
    if s.profile is not None:
        print_profile(s.profile)
    else:
        if errors and args.write:
            sys.exit(f"{errors} failed requests: not writing {args.write}")
        report(render(s, results), args.write, NAME)
    if errors:
        sys.exit(f"{errors} requests failed (see the ERRORS columns)")


if __name__ == "__main__":
    main()
