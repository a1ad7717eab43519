"""Server memory: RSS per idle device and per hot document, and what holds it.

Runs real ``crdtsync serve`` subprocesses (SQLite in a temp folder) and drives them with a
cheap protocol-level client (an in-memory pycrdt ``Doc`` per device, the ``crdtsync.protocol``
codec and one aiohttp session), not ``crdtsync.Device``, so only the server's memory counts.

- *Idle fleet*: RSS after start, then after N devices were provisioned and synced once each
  (N = 1,000, 5,000, 10,000; ``--quick``: 40, 100, 200). Idle documents should leave memory,
  so the per-device figure that counts is the slope between two N (Python's allocator rarely
  returns memory, so RSS over baseline divided by N mixes in one-off growth: SQLite's page
  cache, aiohttp buffers, allocator arenas). Servers: as shipped, ``--cache-idle 2`` (every
  document idle, and closed, when RSS is read), and ``--cache-docs 100`` (LRU eviction) with
  ``--cache-idle 10`` (the idle sweep, which also closes the evicted documents, runs every
  second) and the retire grace (``RETIRE_GRACE``, 60 s) cut to 2 s in that server
  subprocess only (``bench/_serve.py``), so that RSS is read once the evicted documents were
  closed rather than a minute later.
- *Hot documents*: devices join a hot set in steps (250, 500, 1,000) and every hot device
  syncs one changed key per round, several rounds, so their documents stay in the cache; RSS
  per hot document is the slope between steps. As shipped, with ``--cache-docs 1000``, and
  with ``--cache-docs 1000`` and the short retire grace.
- *Attribution*: a server started in a child process with ``tracemalloc`` (the load comes
  from another process, so only server allocations are traced; LRU cache, idle sweep every
  second, short retire grace, as above): top allocation sites per idle device, live
  ``LiveDoc`` objects against the cache's capacity, and a probe of one cached document's size
  (RSS vs Python-visible bytes; the rest is pycrdt's Rust heap) and whether
  ``LiveDoc.close()`` lets it go.

    python bench/memory.py [--repeat 3] [--quick] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import tempfile
import time
import tracemalloc
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _serve import apply_knobs
from common import (
    GRACE_ENV,
    Child,
    arg_parser,
    files_size,
    gather_limited,
    headers,
    in_process_server,
    machine,
    post_sync,
    provision,
    remember_sources,
    report,
    rss,
    run_child,
    settled_rss,
    spread,
    start_server,
    top_sites,
    traced_bytes,
)
from pycrdt import Doc, Map

from crdtsync.errors import Unavailable
from crdtsync.protocol import (
    SYNC_PATH,
    DocSync,
    SyncRequest,
    decode_response,
    encode_request,
)

EMPTY_UPDATE = b"\x00\x00"
EMPTY_SV = b"\x00"
DEVICE_STATE: dict[str, Any] = {
    "fw": "1.4.2", "model": "th-sensor-2", "voltage": 3.71, "temp": 21.5, "hum": 40,
    "online": True, "rssi": -67, "uptime": 86400,
}
"""A device's state: 8 keys, about 150 bytes as a Yjs update."""
KB = 1024
MB = 1024 * 1024
SETTLE = 1.2
"""Seconds to wait before reading RSS (the server flushes ``last_sync`` every second)."""
PROBE_DOCS = 2000
ONE = "{:.1f}"
"""The figures' format: one decimal."""


# --- the cheap protocol-level client -------------------------------------------------------


@dataclass
class ProtoDevice:
    """One simulated device: its document in memory and the server's last state vector."""

    id: str
    token: str
    doc: Doc[Any] = field(default_factory=lambda: Doc(client_id=random.randrange(1, 2**32)))
    server_sv: bytes = b""
    changes: int = 0

    def write(self, values: dict[str, Any]) -> None:
        state = self.doc.get("state", type=Map)
        with self.doc.transaction():
            for key, value in values.items():
                state[key] = value

    def request(self) -> bytes:
        update = self.doc.get_update(self.server_sv) if self.server_sv else self.doc.get_update()
        own = DocSync("state", self.doc.get_state(), b"" if update == EMPTY_UPDATE else update)
        return encode_request(SyncRequest(device=self.id, docs=(
            own, DocSync("fleet", EMPTY_SV), DocSync("project", EMPTY_SV))))

    def apply(self, raw: bytes) -> None:
        for part in decode_response(raw).docs:
            if part.doc == "state":
                if part.update:
                    self.doc.apply_update(part.update)
                self.server_sv = part.sv


async def proto_sync(session: aiohttp.ClientSession, url: str, dev: ProtoDevice) -> None:
    """One sync of ``dev``; again (up to 3 times) if its document was evicted while the sync
    held it (``unavailable``: the server closed it after the retire grace), as a device does."""
    for attempt in range(4):
        try:
            raw = await post_sync(session, url + SYNC_PATH, dev.request(), headers(dev.token))
            break
        except Unavailable:
            if attempt == 3:
                raise
    dev.apply(raw)


def device_id(i: int) -> str:
    return f"dev-{i:06d}"


class Load:
    """Provisions devices and syncs them against ``url``."""

    def __init__(self, url: str, concurrency: int = 8) -> None:
        self.url = url
        self.concurrency = concurrency
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

    async def aclose(self) -> None:
        await self.session.close()

    async def join(self, first: int, count: int, keep: bool = False) -> list[ProtoDevice]:
        """Provision devices ``first .. first+count-1`` and sync each once with its state."""
        tokens = await provision(self.url, [device_id(i) for i in range(first, first + count)],
                                 self.concurrency)

        async def one(i: int) -> ProtoDevice | None:
            dev = ProtoDevice(device_id(i), tokens[device_id(i)])
            dev.write({**DEVICE_STATE, "serial": f"SN{i:08d}"})
            await proto_sync(self.session, self.url, dev)
            return dev if keep else None

        out = await gather_limited(range(first, first + count), one, self.concurrency)
        return [d for d in out if d is not None]

    async def round(self, devices: list[ProtoDevice]) -> None:
        """Every device changes one key and syncs."""
        async def one(dev: ProtoDevice) -> None:
            dev.changes += 1
            dev.write({"uptime": DEVICE_STATE["uptime"] + dev.changes})
            await proto_sync(self.session, self.url, dev)

        await gather_limited(devices, one, self.concurrency)


# --- server subprocesses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One server set-up: ``crdtsync serve`` with ``--cache-docs``/``--cache-idle`` as given,
    and with ``grace``, ``RETIRE_GRACE`` set to it in that subprocess (``bench/_serve.py``)."""

    cache_docs: int | None = None
    cache_idle: float | None = None
    grace: float | None = None
    wait: float = 0.0
    """Seconds before reading RSS, if more than :data:`SETTLE`."""

    @property
    def flags(self) -> tuple[str, ...]:
        flags: tuple[str, ...] = ()
        if self.cache_docs is not None:
            flags += ("--cache-docs", str(self.cache_docs))
        if self.cache_idle is not None:
            flags += ("--cache-idle", f"{self.cache_idle:g}")
        return flags

    @property
    def label(self) -> str:
        text = f"`crdtsync serve{''.join(' ' + f for f in self.flags)}`"
        if not self.flags:
            text += " as shipped"
        if self.grace is not None:
            text += f", retire grace {self.grace:g} s (bench)"
        return text

    @property
    def settle(self) -> float:
        return max(SETTLE, self.wait)


def idle_config(idle: float) -> Config:
    """Documents idle for ``idle`` s leave the cache (closed); RSS is read once they did (the
    sweep runs every ``idle / 10`` s)."""
    return Config(cache_idle=idle, wait=idle * 1.3 + 0.5)


def retire_config(docs: int, idle: float, grace: float) -> Config:
    """An LRU cache of ``docs`` whose evicted documents are closed ``grace`` s after they left
    it, by the idle sweep (every ``idle / 10`` s); RSS is read once they were."""
    return Config(cache_docs=docs, cache_idle=idle, grace=grace, wait=grace + idle / 5 + 0.5)


async def start(folder: Path, config: Config) -> Child:
    return await start_server(folder, *config.flags, grace=config.grace)


@dataclass
class Curve:
    """RSS over baseline at a series of counts (devices or hot documents)."""

    baseline: int
    points: dict[int, int] = field(default_factory=dict)  # count -> RSS bytes
    db_bytes: dict[int, int] = field(default_factory=dict)

    def per_item(self, n: int) -> float:
        return (self.points[n] - self.baseline) / n

    def slope(self, a: int, b: int) -> float:
        return (self.points[b] - self.points[a]) / (b - a)


async def idle_fleet(folder: Path, counts: Sequence[int], config: Config) -> Curve:
    async with await start(folder, config) as server:
        load = Load(server.url)
        try:
            curve = Curve(await settled_rss(server.pid, config.settle))
            joined = 0
            for n in counts:
                await load.join(joined, n - joined)
                joined = n
                curve.points[n] = await settled_rss(server.pid, config.settle)
                curve.db_bytes[n] = files_size(folder, "server.db*")
        finally:
            await load.aclose()
    return curve


async def hot_docs(folder: Path, steps: Sequence[int], rounds: int, config: Config
                   ) -> tuple[Curve, list[int]]:
    """RSS with ``steps`` hot devices; also RSS after each round at the last step."""
    async with await start(folder, config) as server:
        load = Load(server.url)
        try:
            curve = Curve(await settled_rss(server.pid, config.settle))
            hot: list[ProtoDevice] = []
            last_rounds: list[int] = []
            for n in steps:
                hot += await load.join(len(hot), n - len(hot), keep=True)
                for _ in range(rounds):
                    await load.round(hot)
                    if n == steps[-1]:
                        last_rounds.append(await settled_rss(server.pid, config.settle))
                curve.points[n] = (last_rounds[-1] if n == steps[-1]
                                   else await settled_rss(server.pid, config.settle))
        finally:
            await load.aclose()
    return curve, last_rounds


# --- attribution: in-process server with tracemalloc ---------------------------------------


async def child_client(args: argparse.Namespace) -> None:
    load = Load(args.url)
    try:
        await load.join(args.first, args.count)
    finally:
        await load.aclose()


async def run_client(url: str, first: int, count: int) -> None:
    await run_child(__file__, "--child-client", "--url", url, "--first", str(first),
                    "--count", str(count), what="load client")


@dataclass
class Attribution:
    first: int
    second: int
    capacity: int
    py_per_device: float
    rss_per_device: float
    live_docs: int
    cached_docs: int
    docs_objects: int
    sites: list[tuple[str, str, float, float]]


async def traced_server(folder: Path, first: int, second: int, config: Config
                        ) -> Attribution:
    """In-process server: Python bytes and RSS per idle device between ``first`` and
    ``first + second`` devices, live ``LiveDoc`` objects, top allocation sites."""
    from crdtsync_server.documents import LiveDoc

    assert config.cache_docs is not None and config.cache_idle is not None
    async with in_process_server(folder, cache_docs=config.cache_docs,
                                 cache_idle=config.cache_idle) as server:
        remember_sources()
        await run_client(server.url, 0, first)
        await asyncio.sleep(config.settle)
        gc.collect()
        snap1, rss1 = tracemalloc.take_snapshot(), rss()
        await run_client(server.url, first, second)
        await asyncio.sleep(config.settle)
        gc.collect()
        snap2, rss2 = tracemalloc.take_snapshot(), rss()
        objects = gc.get_objects()
        live = sum(1 for o in objects if isinstance(o, LiveDoc))
        docs = sum(1 for o in objects if isinstance(o, Doc))
        del objects
        cached = len(server.services.docs)
    return Attribution(first, second, config.cache_docs,
                       (traced_bytes(snap2) - traced_bytes(snap1)) / second,
                       (rss2 - rss1) / second, live, cached, docs,
                       top_sites(snap1, snap2, second))


async def attribution(folder: Path, first: int, second: int, config: Config) -> Attribution:
    from crdtsync_server import ServerConfig, create_app

    create_app(ServerConfig())  # imports every module of the app before tracing starts
    tracemalloc.start(12)
    try:
        return await traced_server(folder, first, second, config)
    finally:
        tracemalloc.stop()


def child_attribution(args: argparse.Namespace) -> None:
    """Run :func:`attribution` in a fresh process (the retire grace from the environment, as
    ``bench/_serve.py`` sets it) and print it as JSON."""
    global SETTLE
    SETTLE = args.settle
    apply_knobs()
    config = Config(cache_docs=args.cache_docs, cache_idle=args.cache_idle, wait=args.settle)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(attribution(Path(tmp), args.first, args.count, config))
    print(json.dumps(result.__dict__))


async def attribution_in_child(first: int, second: int, config: Config) -> dict[str, Any]:
    assert config.cache_docs is not None and config.cache_idle is not None
    data: dict[str, Any] = await run_child(
        __file__, "--child-attribution", "--first", str(first), "--count", str(second),
        "--cache-docs", str(config.cache_docs), "--cache-idle", f"{config.cache_idle:g}",
        "--settle", str(config.settle),
        env={GRACE_ENV: f"{config.grace:g}"} if config.grace is not None else None,
        what="attribution child")
    return data


def close_all(lives: list[Any]) -> None:
    for live in lives:
        live.close()


def doc_probe(n: int) -> dict[str, float]:
    """Cost of one cached document as the server builds it (``crdt.new_doc`` from the stored
    update, plus its ``LiveDoc`` observers): RSS and Python-visible bytes per document, and
    how many survive ``LiveDoc.close()`` and being dropped."""
    from crdtsync import crdt
    from crdtsync_server.documents import LiveDoc

    src = ProtoDevice("probe", "")
    src.write({**DEVICE_STATE, "serial": "SN00000001"})
    update = src.doc.get_update()
    gc.collect()
    rss0 = rss()
    tracemalloc.start()
    lives = [LiveDoc(f"d{i}/state", crdt.new_doc(i + 1, update), 0, 1, 1) for i in range(n)]
    gc.collect()
    py = tracemalloc.get_traced_memory()[0] / n
    tracemalloc.stop()
    result = {"update_bytes": len(update), "rss_per_doc": (rss() - rss0) / n,
              "py_per_doc": py}
    refs = [weakref.ref(live.doc) for live in lives]  # (a compiled LiveDoc takes no weak reference)
    close_all(lives)
    lives.clear()
    gc.collect()
    result["closed_alive"] = sum(r() is not None for r in refs)
    return result


def child_probe(args: argparse.Namespace) -> None:
    print(json.dumps(doc_probe(args.count)))


async def probe_in_child(n: int) -> dict[str, float]:
    data: dict[str, float] = await run_child(__file__, "--child-probe", "--count", str(n),
                                             what="probe child")
    return data


# --- report ----------------------------------------------------------------------------------


def kb(value: float) -> str:
    return f"{value / KB:.1f}"


def curve_rows(label: str, curves: list[Curve], counts: Sequence[int]) -> list[str]:
    rows = []
    for i, n in enumerate(counts):
        growth = [(c.points[n] - c.baseline) / MB for c in curves]
        per = [c.per_item(n) / KB for c in curves]
        slope = ([c.slope(counts[i - 1], n) / KB for c in curves] if i else [])
        rows.append(f"| {label} | {n:,} | {spread(growth, ONE)} | {spread(per, ONE)} | "
                    f"{spread(slope, ONE) if slope else '-'} |")
    return rows


async def main(args: argparse.Namespace) -> None:
    global SETTLE, PROBE_DOCS
    quick = args.quick
    if quick:
        SETTLE, PROBE_DOCS = 0.2, 1000
    counts = (40, 100, 200) if quick else (1_000, 5_000, 10_000)
    steps = (40, 80, 160) if quick else (250, 500, 1_000)
    repeat = 1 if quick else args.repeat
    rounds = 2 if quick else args.rounds
    print(f"Machine: {machine()}")
    if quick:
        configs = [idle_config(1.0), retire_config(20, 3.0, 0.5)]
        hot_configs = [Config()]
        traced = retire_config(20, 3.0, 0.5)
    else:
        configs = [Config(), idle_config(2.0), retire_config(100, 10.0, 2.0)]
        hot_configs = [Config(), Config(cache_docs=1000), retire_config(1000, 10.0, 2.0)]
        traced = retire_config(1000, 10.0, 2.0)
    idle_curves: dict[str, list[Curve]] = {}
    hot_curves: dict[str, list[Curve]] = {}
    hot_rounds: dict[str, list[list[int]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = 0
        for r in range(repeat):
            for config in configs:
                run += 1
                folder = Path(tmp) / f"run-{run}"
                folder.mkdir()
                curve = await idle_fleet(folder, counts, config)
                idle_curves.setdefault(config.label, []).append(curve)
                print(f"idle run {r + 1}/{repeat}, {config.label}: baseline "
                      f"{curve.baseline / MB:.1f} MB, " + ", ".join(
                          f"N={n}: +{(v - curve.baseline) / MB:.1f} MB"
                          for n, v in curve.points.items()), flush=True)
            for config in hot_configs:
                run += 1
                folder = Path(tmp) / f"run-{run}"
                folder.mkdir()
                curve, per_round = await hot_docs(folder, steps, rounds, config)
                hot_curves.setdefault(config.label, []).append(curve)
                hot_rounds.setdefault(config.label, []).append(per_round)
                print(f"hot run {r + 1}/{repeat}, {config.label}: " + ", ".join(
                    f"{n}: +{(v - curve.baseline) / MB:.1f} MB"
                    for n, v in curve.points.items())
                    + "; RSS after each round at the last step: "
                    + ", ".join(f"{v / MB:.1f}" for v in per_round) + " MB", flush=True)
        probe = await probe_in_child(PROBE_DOCS)
        print(f"doc probe: {probe}", flush=True)
        first, second = (40, 100) if quick else (1_000, 2_000)
        attr = await attribution_in_child(first, second, traced)
        print(f"attribution: {attr}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")

    lines = [f"Machine: {machine()}. {'Quick mode. ' if quick else ''}"
             f"Medians of {repeat} run(s), (min-max) across runs.", "",
             "Idle fleet: devices provisioned and synced once each (8-key state document); "
             "with `--cache-idle`, RSS is read once their documents were idle for longer; "
             "with a retire grace, once the documents evicted by LRU were closed.", "",
             "| server | devices | RSS over baseline, MB | per device, KB | per device since "
             "previous N (slope), KB |", "|---|---:|---:|---:|---:|"]
    for label, curves in idle_curves.items():
        lines += curve_rows(label, curves, counts)
    baselines = [c.baseline / MB for cs in idle_curves.values() for c in cs]
    dbs = [c.db_bytes[counts[-1]] / MB for cs in idle_curves.values() for c in cs]
    lines += ["", f"Baseline RSS after start: {spread(baselines, ONE)} MB; server "
              f"database at {counts[-1]:,} devices: {spread(dbs, ONE)} MB.", ""]
    lines += [f"Hot documents: every hot device changes one key and syncs, {rounds} rounds "
              "per step.", "",
              "| server | hot docs | RSS over baseline, MB | per doc, KB | per doc since "
              "previous step (slope), KB |", "|---|---:|---:|---:|---:|"]
    for label, curves in hot_curves.items():
        lines += curve_rows(label, curves, steps)
    lines.append("")
    for label, runs in hot_rounds.items():
        growth = [(rs[-1] - rs[0]) / max(1, len(rs) - 1) / MB for rs in runs]
        lines.append(f"RSS growth per round once {steps[-1]:,} devices are hot, {label}: "
                     f"{spread(growth, '{:.2f}')} MB per round.")
    assert traced.cache_docs is not None and traced.cache_idle is not None
    lines += ["", f"Attribution (server in-process, tracemalloc, cache {traced.cache_docs:,}, "
              f"`--cache-idle {traced.cache_idle:g}`, retire grace {traced.grace:g} s): between "
              f"{first:,} and {first + second:,} idle devices, Python-visible bytes per device: "
              f"{kb(attr['py_per_device'])} KB; live `LiveDoc` objects {attr['live_docs']:,} "
              f"(cache holds {attr['cached_docs']:,}), pycrdt `Doc` objects "
              f"{attr['docs_objects']:,}.", "",
              "| allocation site (innermost crdtsync/pycrdt frame) | source line | bytes per "
              "idle device | blocks per idle device |", "|---|---|---:|---:|"]
    lines += [f"| `{site}` | `{code}` | {size:.0f} | {count:.2f} |"
              for site, code, size, count in attr["sites"]]
    lines += ["", f"One cached document (8-key state, {probe['update_bytes']:.0f}-byte update, "
              f"`crdt.new_doc` + `LiveDoc`): RSS {kb(probe['rss_per_doc'])} KB, of which "
              f"Python-visible {kb(probe['py_per_doc'])} KB (the rest is pycrdt's Rust heap). "
              f"After `LiveDoc.close()` and dropping them: {probe['closed_alive']:,.0f} of "
              f"{PROBE_DOCS:,} stay alive."]
    text = "\n".join(lines)
    report(text, args.write, "memory")


def parse() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small N (CI smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="sync rounds per hot step")
    parser.add_argument("--write", type=Path, help="replace the memory block of this file")
    # internal: the processes this script starts
    parser.add_argument("--child-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-attribution", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-docs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-idle", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=SETTLE, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.child_client:
        asyncio.run(child_client(ARGS))
    elif ARGS.child_attribution:
        child_attribution(ARGS)
    elif ARGS.child_probe:
        child_probe(ARGS)
    else:
        asyncio.run(main(ARGS))
