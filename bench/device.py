"""Device footprint: durable emit rate, batched inserts, CPU per sync, RSS of a gateway.

(a) ``Device.emit`` with every event durable before it returns (SQLite WAL,
    ``synchronous=FULL``, a fresh store per run in a temp folder): sequential emits in one
    task, and several concurrent emitters. Reference in the same run, on the same disk: raw
    ``sqlite3`` single-row autocommit inserts (the disk's durable-commit ceiling), and the
    steps in between (the store's transaction called directly; through its worker thread).
(b) Batched: ``DeviceStore.push_events`` of N events, one transaction (what
    ``Device.emit_many`` commits), through the store's worker thread.
(c) CPU time of one ``Device.sync`` (``time.process_time``: every thread of this process)
    for a no-change sync and for a sync carrying 5 state changes and 10 events. The server runs
    in a subprocess (``crdtsync serve``) so its CPU is not counted; a second figure with the
    server in this process shows device + server together.
(d) RSS of a gateway process hosting N ``Device`` instances (500; ``--quick`` 50), each with
    its own store file, opened and synced once (one shared aiohttp session, as a gateway
    should): RSS of that process minus its baseline before the first device, in a fresh
    process per run; threads, and what ``aclose()`` gives back.

    python bench/device.py [--repeat 5] [--quick] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import (
    arg_parser,
    files_size,
    in_process_server,
    machine,
    provision,
    remember_sources,
    report,
    rss,
    run_child,
    spread,
    start_server,
    top_sites,
    traced_bytes,
)

from crdtsync import Device, OutboxLimits
from crdtsync import _device_store as ds
from crdtsync._sqlite_worker import connect
from crdtsync.protocol import encode_event_body

READING: dict[str, Any] = {"temp": 21.5, "hum": 40, "voltage": 3.71, "ts": 1764000000,
                           "motion": False}
BIG_OUTBOX = OutboxLimits(max_events=10_000_000, max_bytes=2**40)
MB = 1024 * 1024
SOURCES = r"crdtsync|pycrdt|concurrent|sqlite3|asyncio"
"""Modules whose source is kept for the allocation sites (see ``common.remember_sources``)."""
OURS = r"crdtsync|pycrdt|sqlite|concurrent"
SHORT = r".*/((?:crdtsync|pycrdt|aiohttp|asyncio|concurrent|sqlite3|threading))"


def offline_device(path: Path) -> Device:
    """A device that never syncs (emit needs no server)."""
    return Device("bench-dev", "http://127.0.0.1:9", token="unused", path=path, interval=None,
                  outbox=BIG_OUTBOX)


# --- (a) durable emit rate and its reference ----------------------------------------------


def raw_commits(path: Path, n: int) -> float:
    """Single-row autocommit inserts per second: the disk's durable-commit ceiling."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                     "time INTEGER NOT NULL, body BLOB NOT NULL) STRICT")
        body = encode_event_body(READING)
        start = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO outbox VALUES (?, ?, ?, ?)", (i + 1, "readings", i, body))
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


def store_txn_direct(path: Path, n: int) -> float:
    """The device store's emit transaction (``_push_events`` with one event: BEGIN IMMEDIATE,
    the outbox row, COMMIT) called directly on a connection, without its worker thread."""
    conn = connect(str(path), "FULL", ds.MIGRATIONS)
    try:
        mirror = ds._Mirror()
        ds._load_mirror(conn, mirror)
        body = encode_event_body(READING)
        start = time.perf_counter()
        for i in range(n):
            ds._push_events(conn, mirror, [("readings", i, body, None)], BIG_OUTBOX)
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


async def store_push(path: Path, n: int) -> float:
    """``DeviceStore.push_event``: the same transaction through the store's worker thread."""
    async with ds.DeviceStore(path) as store:
        body = encode_event_body(READING)
        start = time.perf_counter()
        for i in range(n):
            await store.push_event("readings", i, body, BIG_OUTBOX)
        return n / (time.perf_counter() - start)


async def emit_rate(path: Path, n: int, emitters: int = 1) -> float:
    """``Device.emit`` per second, ``emitters`` tasks sharing ``n`` events."""
    async with offline_device(path) as dev:
        async def emitter(count: int) -> None:
            for i in range(count):
                await dev.emit("readings", {**READING, "ts": READING["ts"] + i})

        start = time.perf_counter()
        await asyncio.gather(*(emitter(n // emitters) for _ in range(emitters)))
        elapsed = time.perf_counter() - start
        assert dev.pending_events == n // emitters * emitters
        return n // emitters * emitters / elapsed


PROFILED = (
    ("total, main thread", "", ""),
    ("waiting for the store thread (`epoll.poll`: SQLite + fsync there)", "",
     "<method 'poll' of 'select.epoll' objects>"),
    ("`Device.emit` and everything it runs on the main thread", "device.py", "emit"),
    ("`check_event_body` (validation)", "values.py", "check_event_body"),
    ("`encode_event_body` (msgpack)", "protocol.py", "encode_event_body"),
    ("`Device._template_for` (reads the fleet document's templates map)", "device.py",
     "_template_for"),
    ("`DeviceStore.push_event` (hand-off to the worker thread)", "device_store.py",
     "push_event"),
)


async def profile_emit(path: Path, n: int) -> tuple[str, list[tuple[str, float]]]:
    """cProfile of ``n`` sequential emits (main thread only: the store thread's SQLite time
    shows as the loop waiting in ``epoll.poll``): the top functions by own time, and the
    cumulative ms per emit of the steps in :data:`PROFILED`."""
    async with offline_device(path) as dev:
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(n):
            await dev.emit("readings", {**READING, "ts": READING["ts"] + i})
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(12)
    table = stats.stats  # type: ignore[attr-defined]
    rows = []
    for label, filename, func in PROFILED:
        if not func:
            cum = stats.total_tt  # type: ignore[attr-defined]
        else:
            cum = sum(v[3] for (f, _, name), v in table.items()
                      if name == func and f.endswith(filename))
        rows.append((label, cum / n * 1000))
    return out.getvalue(), rows


# --- (b) one transaction of N events -------------------------------------------------------


async def batch_rate(path: Path, batch: int, total: int) -> tuple[float, float]:
    """(events/s, ms per transaction) for ``DeviceStore.push_events`` of ``batch`` events."""
    async with ds.DeviceStore(path) as store:
        body = encode_event_body(READING)
        events: list[ds.QueuedEvent] = [("readings", i, body, None) for i in range(batch)]
        txns = max(1, total // batch)
        start = time.perf_counter()
        for _ in range(txns):
            await store.push_events(events, BIG_OUTBOX)
        elapsed = time.perf_counter() - start
    return txns * batch / elapsed, elapsed / txns * 1000


# --- (c) CPU per sync -----------------------------------------------------------------------


async def sync_cpu(url: str, folder: Path, rounds: int) -> dict[str, list[float]]:
    """process_time and wall time (ms) of no-change syncs and of syncs with 5 state changes
    and 10 events, alternating."""
    name = f"cpu-{folder.name}"
    token = (await provision(url, [name]))[name]
    out: dict[str, list[float]] = {"idle_cpu": [], "idle_wall": [], "busy_cpu": [],
                                   "busy_wall": []}
    async with Device(name, url, token=token, path=folder / f"{name}.db", interval=None) as dev:
        dev.state.update({f"k{i}": i for i in range(5)})
        await dev.sync()
        await dev.sync()
        for r in range(rounds):
            for kind in ("idle", "busy"):
                if kind == "busy":
                    for i in range(5):
                        dev.state[f"k{i}"] = r * 10 + i
                    for i in range(10):
                        await dev.emit("readings", {**READING, "ts": READING["ts"] + i})
                cpu, wall = time.process_time(), time.perf_counter()
                report = await dev.sync()
                out[f"{kind}_cpu"].append((time.process_time() - cpu) * 1000)
                out[f"{kind}_wall"].append((time.perf_counter() - wall) * 1000)
                if kind == "busy":
                    assert report.events_acked == 10, report
    return out


async def sync_cpu_subprocess(folder: Path, rounds: int) -> dict[str, list[float]]:
    async with await start_server(folder, db="s.db") as server:
        return await sync_cpu(server.url, folder, rounds)


async def sync_cpu_in_process(folder: Path, rounds: int) -> dict[str, list[float]]:
    async with in_process_server(folder, "inproc.db") as server:
        return await sync_cpu(server.url, folder, rounds)


# --- (d) gateway RSS ------------------------------------------------------------------------


async def gateway(n: int, trace: bool) -> dict[str, Any]:
    """In this (fresh) process: RSS growth for ``n`` devices opened and synced once."""
    ps = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with await start_server(folder, db="s.db") as server:
            names = [f"gw-{i:04d}" for i in range(n)]
            tokens = await provision(server.url, names)
            async with aiohttp.ClientSession() as session:
                # warm up code paths with one device, so imports are in the baseline
                warm = Device(names[0], server.url, token=tokens[names[0]],
                              path=folder / "warm.db", interval=None, session=session)
                await warm.start()
                await warm.sync()
                await warm.aclose()
                await asyncio.sleep(0.5)
                base = rss()
                threads0 = ps.num_threads()
                if trace:
                    remember_sources(SOURCES)
                    tracemalloc.start(10)
                    snap0 = tracemalloc.take_snapshot()
                devices = [Device(name, server.url, token=tokens[name],
                                  path=folder / f"{name}.db", interval=None,
                                  session=session) for name in names]
                start = time.perf_counter()
                for dev in devices:
                    await dev.start()
                    dev.state.update({"fw": "1.4.2", "voltage": 3.71, "online": True})
                    await dev.sync()
                elapsed = time.perf_counter() - start
                await asyncio.sleep(0.5)
                result: dict[str, Any] = {
                    "n": n, "rss_base": base, "rss_open": rss(),
                    "threads": ps.num_threads() - threads0, "seconds": elapsed,
                    "store_bytes": files_size(folder, "gw-*.db*") / n,
                }
                if trace:
                    snap1 = tracemalloc.take_snapshot()
                    result["sites"] = top_sites(snap0, snap1, n, ours=OURS, short=SHORT)
                    result["py_per_device"] = (traced_bytes(snap1) - traced_bytes(snap0)) / n
                    tracemalloc.stop()
                for dev in devices:
                    await dev.aclose()
                refs = [weakref.ref(dev) for dev in devices]
                del devices, dev
                gc.collect()
                result["alive_after_close"] = sum(r() is not None for r in refs)
                await asyncio.sleep(0.5)
                result["rss_closed"] = rss()
                result["threads_closed"] = ps.num_threads() - threads0
    return result


async def stores_only(n: int) -> dict[str, Any]:
    """In this (fresh) process: RSS growth for ``n`` bare ``DeviceStore`` instances (the
    SQLite connection and its worker thread), each file written as a synced device's is."""
    ps = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = ds.DeviceStore(folder / "warm.db")
        await warm.open()
        await warm.aclose()
        base = rss()
        threads0 = ps.num_threads()
        stores = [ds.DeviceStore(folder / f"st-{i:04d}.db") for i in range(n)]
        for store in stores:
            await store.open()
            await store.set_meta(client_id=12345, server_sv=b"\x01" * 8)
            await store.load_doc("state")
            store.append_update("state", b"\x01" * 120)
            await store.load_doc("fleet")
            await store.load_doc("project")
        await asyncio.sleep(0.5)
        result = {"n": n, "rss_base": base, "rss_open": rss(),
                  "threads": ps.num_threads() - threads0}
        for store in stores:
            await store.aclose()
    return result


async def gateway_in_child(n: int, trace: bool, stores: bool = False) -> dict[str, Any]:
    flags = (["--child-stores", str(n)] if stores
             else ["--child-gateway", str(n), *(["--trace"] if trace else [])])
    data: dict[str, Any] = await run_child(__file__, *flags, what="gateway child")
    return data


# --- main -----------------------------------------------------------------------------------


async def repeat(times: int, fn: Callable[[int], Awaitable[float]]) -> list[float]:
    return [await fn(i) for i in range(times)]


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    reps = 2 if quick else args.repeat
    n = 300 if quick else args.events
    sync_rounds = 10 if quick else 200
    gw = 50 if quick else args.gateway
    print(f"Machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        counter = iter(range(10**6))

        def fresh() -> Path:
            return folder / f"s{next(counter)}.db"

        rates: dict[str, list[float]] = {}
        batches = (1, 10, 100, 1000)
        batch: dict[int, list[tuple[float, float]]] = {b: [] for b in batches}
        for _ in range(reps):  # interleaved, so drift hits every variant alike
            rates.setdefault("raw", []).append(raw_commits(fresh(), n))
            rates.setdefault("direct", []).append(store_txn_direct(fresh(), n))
            rates.setdefault("store", []).append(await store_push(fresh(), n))
            for k in (1, 4, 16):
                rates.setdefault(f"emit{k}", []).append(await emit_rate(fresh(), n, k))
            for b in batches:
                batch[b].append(await batch_rate(fresh(), b, max(n, b * 5)))
        for key, values in rates.items():
            print(f"{key}: {spread(values)} /s", flush=True)
        ratio = [e / r for e, r in zip(rates["emit1"], rates["raw"], strict=True)]
        for b in batches:
            print(f"batch {b}: {spread([r for r, _ in batch[b]])} events/s, "
                  f"{spread([t for _, t in batch[b]], '{:.2f}')} ms/txn", flush=True)
        profile, profiled = await profile_emit(fresh(), min(n, 3000))
        cpu_folder = folder / "cpu"
        cpu_folder.mkdir()
        cpu = await sync_cpu_subprocess(cpu_folder, sync_rounds)
        cpu_in = await sync_cpu_in_process(cpu_folder, sync_rounds)
        for key in cpu:
            print(f"sync {key}: {spread(cpu[key], '{:.2f}')} ms (server in-process: "
                  f"{spread(cpu_in[key], '{:.2f}')} ms)", flush=True)
    gws = [await gateway_in_child(gw, False) for _ in range(1 if quick else 3)]
    for g in gws:
        print(f"gateway {g['n']} devices: +{(g['rss_open'] - g['rss_base']) / MB:.1f} MB, "
              f"{g['threads']} threads, closed: +{(g['rss_closed'] - g['rss_base']) / MB:.1f} "
              f"MB, {g['threads_closed']} threads", flush=True)
    traced = None if quick else await gateway_in_child(gw, True)
    bare = [await gateway_in_child(gw, False, stores=True) for _ in range(1 if quick else 3)]

    per_event_ms = [1000 / r for r in rates["emit1"]]
    lines = [
        f"Machine: {machine()}. {'Quick mode. ' if quick else ''}Median of {reps} runs "
        f"(min-max); {n:,} events per run, fresh store each run.", "",
        "| what (one durable commit per event, WAL + synchronous=FULL) | events/s | "
        "vs raw sqlite3 |", "|---|---:|---:|",
        f"| raw `sqlite3`: single-row autocommit insert (disk ceiling) | "
        f"{spread(rates['raw'])} | 1.00 |",
    ]
    labels = {"direct": "device store transaction (`_push_events`), called directly",
              "store": "`DeviceStore.push_event` (through its worker thread)",
              "emit1": "`Device.emit`, sequential, one task",
              "emit4": "`Device.emit`, 4 concurrent emitters",
              "emit16": "`Device.emit`, 16 concurrent emitters"}
    for key, label in labels.items():
        rel = [v / r for v, r in zip(rates[key], rates["raw"], strict=True)]
        lines.append(f"| {label} | {spread(rates[key])} | {spread(rel, '{:.2f}')} |")
    goal = statistics.median(rates["emit1"])
    lines += ["", f"Sequential `emit`: {spread(per_event_ms, '{:.3f}')} ms per event; "
              f"ratio to the raw ceiling {spread(ratio, '{:.2f}')}. Goal >= 5,000 durable "
              f"events/s: {'met' if goal >= 5000 else 'missed'} ({goal:,.0f}/s).", "",
              "Batched: `DeviceStore.push_events`, N outbox rows in one transaction (what "
              "`Device.emit_many` commits), through the store's worker thread:", "",
              "| events per transaction | events/s | ms per transaction |",
              "|---:|---:|---:|"]
    for b in batches:
        lines.append(f"| {b:,} | {spread([r for r, _ in batch[b]])} | "
                     f"{spread([t for _, t in batch[b]], '{:.2f}')} |")
    lines += ["", f"Where a sequential emit's time goes (cProfile of {min(n, 3000):,} emits, main "
              "thread; the profiler adds overhead, so read the shares):", "",
              "| step | ms per emit |", "|---|---:|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in profiled]
    lines += ["", f"CPU per `Device.sync` (`time.process_time`, all threads of the device "
              f"process; median of {sync_rounds} (min-max)), server in a subprocess; in "
              "brackets, with the server in the same process (device + server):", "",
              "| sync | device CPU, ms | wall, ms | device + server CPU, ms |",
              "|---|---:|---:|---:|"]
    for kind, label in (("idle", "no change"), ("busy", "5 state changes + 10 events")):
        lines.append(f"| {label} | {spread(cpu[f'{kind}_cpu'], '{:.2f}')} | "
                     f"{spread(cpu[f'{kind}_wall'], '{:.2f}')} | "
                     f"{spread(cpu_in[f'{kind}_cpu'], '{:.2f}')} |")
    grow = [(g["rss_open"] - g["rss_base"]) / MB for g in gws]
    closed = [(g["rss_closed"] - g["rss_base"]) / MB for g in gws]
    lines += ["", f"Gateway: {gw} `Device` instances in one process (shared aiohttp session), "
              f"each opened and synced once; fresh process per run, {len(gws)} run(s):", "",
              "| figure | value |", "|---|---:|",
              f"| RSS over the process baseline, MB | {spread(grow, '{:.1f}')} |",
              f"| per device, KB | {spread([x * 1024 / gw for x in grow], '{:.0f}')} |",
              f"| threads added | {spread([g['threads'] for g in gws])} |",
              f"| store file per device (db + WAL), KB | "
              f"{spread([g['store_bytes'] / 1024 for g in gws], '{:.0f}')} |",
              f"| open + first sync, ms per device | "
              f"{spread([g['seconds'] * 1000 / gw for g in gws], '{:.1f}')} |",
              f"| RSS still held after `aclose()` of all, MB | {spread(closed, '{:.1f}')} |",
              f"| threads left after `aclose()` | "
              f"{spread([g['threads_closed'] for g in gws])} |",
              f"| `Device` objects still alive after `aclose()`, dropped, `gc.collect()` | "
              f"{spread([g['alive_after_close'] for g in gws])} of {gw} |"]
    bare_grow = [(b["rss_open"] - b["rss_base"]) / MB for b in bare]
    lines += [f"| of which the {gw} bare `DeviceStore`s alone (SQLite connection + worker "
              f"thread; separate process), MB | {spread(bare_grow, '{:.1f}')} |"]
    scaled = statistics.median(grow) * 500 / gw
    lines += ["", f"Goal: 500 devices under 150 MB: "
              f"{'met' if scaled < 150 else 'missed'} ({scaled:.1f} MB"
              f"{' extrapolated from ' + str(gw) if gw != 500 else ''})."]
    if traced is not None:
        lines += ["", f"Python-visible bytes per device (tracemalloc, one more run): "
                  f"{traced['py_per_device'] / 1024:.1f} KB; top sites:", "",
                  "| allocation site (innermost crdtsync/pycrdt/stdlib frame) | source line | "
                  "bytes per device |", "|---|---|---:|"]
        lines += [f"| `{site}` | `{code}` | {size:,.0f} |"
                  for site, code, size, _ in traced["sites"]]
    text = "\n".join(lines)
    report(text, args.write, "device")
    print("\ncProfile of sequential emits (main thread, by own time):")
    print("\n".join(profile.splitlines()[:30]))


def parse() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small N (CI smoke test)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each rate")
    parser.add_argument("--events", type=int, default=5000, help="events per run")
    parser.add_argument("--gateway", type=int, default=500, help="devices in the gateway")
    parser.add_argument("--write", type=Path, help="replace the device block of this file")
    parser.add_argument("--child-gateway", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-stores", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.child_gateway:
        print(json.dumps(asyncio.run(gateway(ARGS.child_gateway, ARGS.trace))))
    elif ARGS.child_stores:
        print(json.dumps(asyncio.run(stores_only(ARGS.child_stores))))
    else:
        asyncio.run(main(ARGS))
