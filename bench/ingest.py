"""Event ingestion: batches of 1,000 events per sync into a real `crdtsync serve` process.

The server runs in its own process (`python -m crdtsync serve`, SQLite in a temp folder,
default durability). A few devices (default 4) each send requests of 1,000 events with
consecutive seqs (and a `state` document entry without changes, as a device sends), one
request in flight per device; request bodies are built before the timed part. events/s =
events acknowledged / wall time of the round.

The ceiling, in the same run: the same rows (device, seq, topic, time, received, body JSON,
digest) inserted from Python with `sqlite3` into a file of its own, with the schema of the
server's table that stores events and its indexes (read from the server's database: `feed`,
of which `events` is a view, since schema v4), WAL,
`synchronous=FULL`, one transaction per 1,000 rows. Two variants: with the per-event work the
server does when it stores an event (the body as JSON text and its 16-byte BLAKE2b digest, as
`crdtsync_server.store.rules` computes them), which is the ceiling of the ratio, and with
rows prepared in advance (SQLite alone). Rounds are interleaved: server, ceiling, server, ...

    python bench/ingest.py [--devices 4] [--batches 50] [--rounds 5]
                           [--encoding identity|deflate|zstd] [--quick] [--write FILE]
    python bench/ingest.py --profile server.prof   (server under cProfile, every thread)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from common import (
    Child,
    CpuMeter,
    CpuUse,
    add_encoding_option,
    check_last_seq,
    client_session,
    compress,
    exit_on_sigterm,
    headers,
    machine,
    percentile,
    post_sync,
    print_profile,
    provision,
    report,
    spread,
    start_server,
    table_schema,
)

from crdtsync.protocol import (
    DEFAULT_LIMITS,
    SYNC_PATH,
    DocSync,
    Event,
    SyncRequest,
    decode_response,
    encode_request,
)
from crdtsync_server.store.feed import json_text
from crdtsync_server.store.rules import event_digests as server_digests

NAME = "ingest"
BATCH = 1000
TOPIC = "readings"
MAX_BODY = 4 * 1024 * 1024
"""The server's default ``max_body`` (``ServerConfig.max_body``)."""
LIBS = ("aiohttp", "pycrdt", "msgpack")


def event_json(event: Event) -> str:
    """The stored JSON text of an event body, made as the server makes it."""
    return json_text(event.body)


def event_digests(events: Sequence[Event]) -> list[bytes]:
    """The stored digests of a batch of events, made as the server makes them."""
    return server_digests(events)


@dataclass
class Batch:
    device: str
    events: list[Event]
    body: bytes
    """The request body as sent (compressed when an encoding is chosen)."""
    raw_size: int


class Feeder:
    """One device's event stream: drifting sensor readings, seqs 1, 2, 3, ..."""

    def __init__(self, device: str, token: str, seed: int, encoding: str) -> None:
        self.device = device
        self.headers = headers(token, encoding)
        self.rng = random.Random(seed)
        self.next_seq = 1
        self.acked = 0
        self.temp, self.hum, self.volt = 21.0, 40, 3.70
        self.ts = 1_764_000_000

    def batch(self, encoding: str) -> Batch:
        rng, events, bodies = self.rng, [], []
        for _ in range(BATCH):
            self.temp = round(self.temp + rng.choice((-0.1, 0, 0.1)), 1)
            self.hum += rng.choice((-1, 0, 1))
            self.volt = round(self.volt + rng.choice((-0.01, 0, 0.01)), 2)
            self.ts += 60
            body = {"temp": self.temp, "hum": self.hum, "voltage": self.volt, "ts": self.ts,
                    "motion": rng.random() < 0.05}
            event = Event(self.next_seq, TOPIC, self.ts * 1000 + rng.randint(0, 30), body)
            events.append(event)
            bodies.append(msgpack.packb(body, use_bin_type=True))
            self.next_seq += 1
        request = SyncRequest(device=self.device, docs=(DocSync("state", b"\x00"),),
                              events=tuple(events), purged=self.acked)
        raw = encode_request(request, bodies=bodies)
        return Batch(self.device, events, compress(raw, encoding), len(raw))


@dataclass
class ServerRound:
    seconds: float = 0.0
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    cpu: CpuUse = field(default_factory=CpuUse)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def server_round(session: aiohttp.ClientSession, url: str, feeders: Sequence[Feeder],
                       work: dict[str, list[Batch]],
                       server: Child) -> ServerRound:
    result = ServerRound()

    async def device(feeder: Feeder) -> None:
        for batch in work[feeder.device]:
            start = time.perf_counter()
            raw = await post_sync(session, url, batch.body, feeder.headers)
            result.latencies.append(time.perf_counter() - start)
            acked = decode_response(raw).acked
            if acked != batch.events[-1].seq:
                raise RuntimeError(f"{feeder.device}: ack {acked}, sent up to "
                                   f"{batch.events[-1].seq}")
            feeder.acked = acked
            result.events += len(batch.events)

    meter = CpuMeter(server)
    await asyncio.gather(*(device(f) for f in feeders))
    result.cpu = meter.stop()
    result.seconds = meter.seconds
    return result


COLUMNS = "device, seq, topic, time, received, body, digest"


def events_table(server_db: Path) -> tuple[str, list[str]]:
    """How the server stores an event: the INSERT of one row (:data:`COLUMNS`), and the
    CREATE statements of its table and that table's indexes. Since schema v4 the table is
    ``feed`` (rows of kind ``event``; ``events`` is a view over it), before it was
    ``events``."""
    conn = sqlite3.connect(f"file:{server_db}?mode=ro", uri=True)
    try:
        kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'events'").fetchone()
    finally:
        conn.close()
    table = "events" if kind and kind[0] == "table" else "feed"
    if table == "feed":
        insert = f"INSERT INTO feed (kind, {COLUMNS}) VALUES ('event', ?, ?, ?, ?, ?, ?, ?)"
    else:
        insert = f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
    return insert, table_schema(server_db, [table])


def open_ceiling(path: Path, schema: Sequence[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for sql in schema:
        conn.execute(sql)
    return conn


def ceiling_round(conn: sqlite3.Connection, insert: str, batches: Sequence[Batch],
                  digest: bool) -> float:
    """Insert the rows of ``batches`` with ``insert``, one transaction each; returns seconds
    taken."""
    prepared: list[list[tuple[Any, ...]]] = []
    if not digest:  # rows prepared before the clock starts: SQLite alone
        now = int(time.time() * 1000)
        prepared = [[(b.device, e.seq, e.topic, e.time, now, event_json(e), fingerprint)
                     for e, fingerprint in zip(b.events, event_digests(b.events), strict=True)]
                    for b in batches]
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        if digest:
            now = int(time.time() * 1000)
            rows = [(batch.device, e.seq, e.topic, e.time, now, event_json(e), fingerprint)
                    for e, fingerprint in zip(batch.events, event_digests(batch.events),
                                              strict=True)]
        else:
            rows = prepared[n]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, rows)
        conn.execute("COMMIT")
    return time.perf_counter() - start


@dataclass
class Settings:
    devices: int
    batches: int
    rounds: int
    encoding: str
    quick: bool
    seed: int
    profile: Path | None = None


@dataclass
class Results:
    server: list[ServerRound] = field(default_factory=list)
    with_work: list[float] = field(default_factory=list)
    """Ceiling events/s with JSON + digest work, per round."""
    rows_only: list[float] = field(default_factory=list)
    body_raw: int = 0
    body_sent: int = 0


async def benchmark(s: Settings) -> Results:
    out = Results()
    with tempfile.TemporaryDirectory(prefix="crdtsync-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server: Child | None = None
        conns: list[sqlite3.Connection] = []
        try:
            server = await start_server(tmp, profile=s.profile)
            ids = [f"ingest-{n:02d}" for n in range(s.devices)]
            tokens = await provision(server.url, ids)
            feeders = [Feeder(i, tokens[i], s.seed * 1000 + n, s.encoding)
                       for n, i in enumerate(ids)]
            url = server.url + SYNC_PATH
            async with client_session(s.devices, 120) as session:
                # warm-up: one batch per device (first document load, first pages of the file)
                warm = {f.device: [f.batch(s.encoding)] for f in feeders}
                await server_round(session, url, feeders, warm, server)
                insert, schema = events_table(tmp / "server.db")
                conns = [open_ceiling(tmp / "ceiling-work.db", schema),
                         open_ceiling(tmp / "ceiling-rows.db", schema)]
                for c in conns:
                    ceiling_round(c, insert, [b for bs in warm.values() for b in bs],
                                  digest=False)
                for n in range(s.rounds):
                    work = {f.device: [f.batch(s.encoding) for _ in range(s.batches)]
                            for f in feeders}
                    batches = [b for bs in work.values() for b in bs]
                    out.body_raw = max(b.raw_size for b in batches)
                    out.body_sent = max(len(b.body) for b in batches)
                    r = await server_round(session, url, feeders, work, server)
                    out.server.append(r)
                    events = sum(len(b.events) for b in batches)
                    out.with_work.append(
                        events / ceiling_round(conns[0], insert, batches, digest=True))
                    out.rows_only.append(
                        events / ceiling_round(conns[1], insert, batches, digest=False))
                    print(f"round {n + 1}/{s.rounds}: crdtsync {r.rate:9,.0f} events/s "
                          f"(p50 {percentile(r.latencies, 0.5) * 1000:.1f} ms/batch, CPU server "
                          f"{r.cpu.server_main:.0f}%+{r.cpu.server_other:.0f}%, load "
                          f"{r.cpu.load:.0f}%, others {r.cpu.others:.0f}%)  sqlite3 with "
                          "JSON+digest "
                          f"{out.with_work[-1]:9,.0f}  rows only {out.rows_only[-1]:9,.0f}",
                          flush=True)
            await check_last_seq(server.url, {f.device: f.next_seq - 1 for f in feeders})
        finally:
            for c in conns:
                c.close()
            if server is not None:
                await server.stop()
    return out


def render(s: Settings, r: Results) -> str:
    rates = [x.rate for x in r.server]
    p50 = [percentile(x.latencies, 0.5) * 1000 for x in r.server]
    p99 = [percentile(x.latencies, 0.99) * 1000 for x in r.server]
    med = statistics.median(rates)
    work, rows = statistics.median(r.with_work), statistics.median(r.rows_only)
    per_round_work = [a / b for a, b in zip(rates, r.with_work, strict=True)]
    per_round_rows = [a / b for a, b in zip(rates, r.rows_only, strict=True)]
    events = s.devices * s.batches * BATCH
    lines = [
        f"Machine: {machine(LIBS, model=True, temp_dir=True)}.",
        "",
        f"Load: {s.devices} devices, one request of {BATCH:,} events in flight per device, "
        f"{s.batches} requests per device per round ({events:,} events), {s.rounds} rounds "
        f"per side, interleaved; request bodies {r.body_raw:,} bytes"
        + ("" if s.encoding == "identity" else f", sent as {s.encoding} ({r.body_sent:,} "
           "bytes)")
        + f" (limits: max_body {MAX_BODY:,} bytes, max_events "
        f"{DEFAULT_LIMITS.max_events:,} per request)"
        + (" (quick mode: not representative)" if s.quick else "") + ".",
        "",
        "Medians over rounds, (min-max) across rounds:",
        "",
        "| figure | value | ratio crdtsync / ceiling |",
        "|---|---:|---:|",
        f"| crdtsync serve, events/s stored | {spread(rates)} | |",
        f"| ceiling: sqlite3, JSON + digest per event, events/s | {spread(r.with_work)} | "
        f"**{med / work:.2f}** ({min(per_round_work):.2f}-{max(per_round_work):.2f}) |",
        f"| sqlite3, rows prepared in advance, events/s | {spread(r.rows_only)} | "
        f"{med / rows:.2f} ({min(per_round_rows):.2f}-{max(per_round_rows):.2f}) |",
        f"| crdtsync latency per 1,000-event request, p50 (ms) | {spread(p50, '{:.1f}')} | |",
        f"| crdtsync latency per 1,000-event request, p99 (ms) | {spread(p99, '{:.1f}')} | |",
        f"| server CPU, event-loop thread (%) | "
        f"{spread([x.cpu.server_main for x in r.server])} | |",
        f"| server CPU, other threads (%) | {spread([x.cpu.server_other for x in r.server])} | |",
        f"| load generator CPU (%) | {spread([x.cpu.load for x in r.server])} | |",
        f"| CPU of other processes on the machine, during the server rounds (%) | "
        f"{spread([x.cpu.others for x in r.server])} | |",
        "",
        f"Goal (issue 6): at least 0.5x the sqlite3 ceiling with the same per-event work: "
        f"{'met' if med / work >= 0.5 else 'not met'} ({med / work:.2f}).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--batches", type=int, default=50,
                        help="requests of 1,000 events per device per round")
    parser.add_argument("--rounds", type=int, default=5)
    add_encoding_option(parser)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--quick", action="store_true",
                        help="2 devices, 3 requests each, 2 rounds (CI smoke test)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--profile", type=Path, metavar="OUT",
                        help="run the server under cProfile (stats to OUT, OUT.threads)")
    args = parser.parse_args()
    exit_on_sigterm()
    s = Settings(devices=2 if args.quick else args.devices,
                 batches=3 if args.quick else args.batches,
                 rounds=2 if args.quick else args.rounds, encoding=args.encoding,
                 quick=args.quick, seed=args.seed,
                 profile=args.profile.resolve() if args.profile else None)
    print(f"Machine: {machine(LIBS, model=True, temp_dir=True)}", flush=True)
    results = asyncio.run(benchmark(s))
    if s.profile is not None:
        print_profile(s.profile)
        return
    report(render(s, results), args.write, NAME)


if __name__ == "__main__":
    sys.exit(main())
