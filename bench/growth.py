"""Cost growth: sync time, server memory and stored bytes against document size, history
length and fleet size.

A real server (SQLite in a temp folder) and a real ``Device`` run in this process (sync times
are device + server on loopback, as in ``bench/sync_basics.py``); the server's store and
document cache are reached directly to read stored sizes, force a compaction and provision
a large fleet quickly.

(i)   Document size: 1 ... 100,000 keys in the device's ``state`` map. Time of a no-change
      sync and of a 1-key-change sync, bytes of the whole document update and of a 1-key
      change, the document as stored (bytes) and the server database file.
(ii)  History: 10 keys overwritten round-robin, 1,000 overwrites per transaction and per sync
      (1,000 syncs: 1,000,000 overwrites; ``--quick``: 10,000). At checkpoints: the stored log
      and snapshot as the server left them (it compacts every ``compact_every`` = 500 rows),
      then after a forced compaction (what ``DocumentCache.maybe_compact`` stores), and sync
      times after it. Yjs keeps a tombstone per overwritten map entry: bytes per overwrite.
(iii) Fleet size: sync time of one device with 1, 100, 1,000, 10,000 devices provisioned
      (each with a small stored document, as after one sync).
(iv)  A device's lifetime: 10 keys overwritten by the device and, between syncs, by the cloud
      (alternating writers), up to 1,000,000 overwrites; at checkpoints the no-change sync
      against a fresh document's, the bytes a replacement device downloads, the server's
      memory for the document, stored bytes, the device's database and the generation.

Server memory per document (i, ii) is measured in a fresh child process that loads the stored
document the way the cache does (``crdt.new_doc``) several times: RSS per copy and load time
(the cost of a cache miss).

    python bench/growth.py [--rounds 30] [--quick] [--sections ...] [--write docs/benchmarks.md]

(i)-(iii) fill the ``growth`` block of docs/benchmarks.md, (iv) the ``lifetime`` block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import re
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    arg_parser,
    files_size,
    in_process_server,
    machine,
    median,
    percentile,
    provision,
    report,
    rss,
    run_child,
)
from pycrdt import Doc, Map

from crdtsync import Device, crdt
from crdtsync_server import Server
from crdtsync_server.auth import hash_token
from crdtsync_server.store import DeviceRecord, DocWrite, SyncWrite
from crdtsync_server.sync import doc_key

KB = 1024
MB = 1024 * 1024
WARMUP = 3
"""Untimed syncs before each timed series."""


def ms(samples: Sequence[float]) -> str:
    """Median (p10-p90) of samples in seconds, as ms."""
    s = [x * 1000 for x in samples]
    return f"{median(s):.2f} ({percentile(s, 0.1):.2f}-{percentile(s, 0.9):.2f})"


def file_size(path: Path) -> int:
    """Bytes of ``path`` with its companions (``-wal``, ``-shm``)."""
    return files_size(path.parent, path.name + "*")


@dataclass
class Rig:
    """A server in this process and one device, both on SQLite in ``folder``."""

    folder: Path
    server: Server
    device: Device
    db: Path
    key: str
    token: str = ""
    conn: sqlite3.Connection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = sqlite3.connect(self.db, isolation_level=None)

    def stored(self) -> tuple[int, int, int]:
        """(snapshot bytes, log rows, log bytes) of the device document as stored."""
        row = self.conn.execute("SELECT LENGTH(snapshot) FROM docs WHERE key = ?",
                                (self.key,)).fetchone()
        rows, size = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM updates WHERE key = ?",
            (self.key,)).fetchone()
        return (int(row[0]) if row else 0, int(rows), int(size))

    def gen(self) -> int:
        """The stored generation of the device document."""
        row = self.conn.execute("SELECT gen FROM docs WHERE key = ?", (self.key,)).fetchone()
        return int(row[0]) if row else 0

    async def replacement_download(self, tag: str) -> int:
        """Bytes a replacement device (new database, same id and token) downloads in its
        first sync to restore the state."""
        async with Device(self.device.id, self.server.url, token=self.token,
                          path=self.folder / f"replacement-{tag}.db", interval=None) as dev:
            report = await dev.sync()
            assert dev.state.to_dict() == self.device.state.to_dict()
            return report.bytes_down

    async def memory(self) -> dict[str, float]:
        """The server's document, loaded in a fresh child process: RSS per copy."""
        live = self.server.services.docs._docs[self.key]
        snapshot = live.doc.get_update()
        return await probe_in_child(self.folder, snapshot, copies_for(len(snapshot)))

    def db_file(self) -> int:
        """Bytes of the server database after a WAL checkpoint (free pages included)."""
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return file_size(self.db)

    async def compact(self) -> None:
        """Fold the document's log into a snapshot now, as ``DocumentCache.maybe_compact``
        does once ``compact_every`` rows piled up."""
        docs = self.server.services.docs
        async with docs.lock(self.device.id):
            live = await docs.get(self.key)
            await docs.store.compact(live.key, live.last_id, live.doc.get_update())
            live.rows = 0

    async def sync_times(self, rounds: int, change: str | None
                         ) -> tuple[list[float], int, int]:
        """Wall times of ``rounds`` syncs (after changing key ``change`` each time, outside
        the timed part), the median request and response bytes; a few untimed syncs first
        (warm-up)."""
        times, sizes, down = [], [], []
        for i in range(-WARMUP, rounds):
            if change is not None:
                self.device.state[change] = -1 - i - WARMUP
            start = time.perf_counter()
            report = await self.device.sync()
            if i >= 0:
                times.append(time.perf_counter() - start)
                sizes.append(report.bytes_up)
                down.append(report.bytes_down)
        return times, int(median(sizes)), int(median(down))


def make_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


@contextlib.asynccontextmanager
async def rig(folder: Path, name: str = "grow-1") -> AsyncIterator[Rig]:
    make_dir(folder)
    async with in_process_server(folder) as server:
        token = (await provision(server.url, [name]))[name]
        async with Device(name, server.url, token=token, path=folder / "device.db",
                          interval=None) as dev:
            r = Rig(folder, server, dev, folder / "server.db", doc_key(name, "state"), token)
            try:
                yield r
            finally:
                r.conn.close()


# --- server memory of one document, in a fresh process --------------------------------------


def probe(path: Path, copies: int) -> dict[str, float]:
    """Load the document in ``path`` ``copies`` times as the cache does: RSS per copy and
    load time."""
    data = path.read_bytes()
    keep = []
    rss0 = rss()
    start = time.perf_counter()
    for _ in range(copies):
        keep.append(crdt.new_doc(crdt.random_client_id(), data))
    elapsed = time.perf_counter() - start
    return {"rss_per_doc": (rss() - rss0) / copies,
            "load_ms": elapsed / copies * 1000}


async def probe_in_child(folder: Path, update: bytes, copies: int) -> dict[str, float]:
    path = folder / "probe.bin"
    path.write_bytes(update)
    data: dict[str, float] = await run_child(__file__, "--child-probe", str(path), "--copies",
                                             str(copies), what="probe child")
    return data


def copies_for(size: int) -> int:
    """Enough copies for RSS to be measurable, without loading gigabytes."""
    return max(1, min(2000, 20 * MB // max(size * 40, 1)))


# --- (i) document size ---------------------------------------------------------------------


async def doc_size(folder: Path, keys: int, rounds: int) -> dict[str, Any]:
    async with rig(folder) as r:
        r.device.state.update({f"key{i:06d}": i for i in range(keys)})
        first = await r.device.sync()
        update = r.device.doc.get_update()
        snapshot, rows, log = r.stored()
        idle, idle_bytes, _ = await r.sync_times(rounds, None)
        change, change_bytes, _ = await r.sync_times(rounds, "key000000")
        out = {"keys": keys, "doc_bytes": len(update), "first_up": first.bytes_up,
               "idle": idle, "idle_bytes": idle_bytes, "change": change,
               "change_bytes": change_bytes, "stored": snapshot + log, "rows": rows}
    out["db_file"] = file_size(folder / "server.db")
    out["device_file"] = file_size(folder / "device.db")
    out.update(await probe_in_child(folder, update, copies_for(len(update))))
    return out


# --- (ii) history ---------------------------------------------------------------------------


async def history(folder: Path, syncs: int, per_sync: int, checkpoints: Sequence[int],
                  rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with rig(folder) as r:
        keys = [f"k{i}" for i in range(10)]
        r.device.state.update(dict.fromkeys(keys, 0))
        await r.device.sync()
        written = 0
        carry: list[float] = []

        async def checkpoint() -> None:
            before = r.stored()
            db_before = r.db_file()
            await r.compact()
            after = r.stored()
            idle, _, idle_down = await r.sync_times(rounds, None)
            change, change_bytes, _ = await r.sync_times(rounds, "k0")
            snapshot = r.server.services.docs._docs[r.key].doc.get_update()
            row = {"overwrites": written, "before": before, "after": after,
                   "db_before": db_before, "db_after": r.db_file(), "idle": idle,
                   "idle_down": idle_down, "change": change, "change_bytes": change_bytes,
                   "device_doc": len(r.device.doc.get_update()),
                   "carry": list(carry), "snapshot": len(snapshot)}
            row.update(await probe_in_child(folder, snapshot, copies_for(len(snapshot))))
            if written == checkpoints[-1]:
                row["profile"] = {kind: await profile_syncs(r, 10, change)
                                  for kind, change in (("no-change", None), ("1-key", "k0"))}
            rows.append(row)
            print(f"  history {written:,} overwrites: stored before compaction "
                  f"{before[0] + before[2]:,} B ({before[1]} log rows), after {after[0]:,} B; "
                  f"no-change sync {ms(idle)} ms; 1-key sync {ms(change)} ms; "
                  f"sync carrying {per_sync} overwrites {ms(carry) if carry else '-'} ms; "
                  f"doc in memory {row['rss_per_doc'] / KB:,.0f} KB", flush=True)
            carry.clear()

        await checkpoint()
        root = r.device.doc.get("state", type=Map)
        for _ in range(syncs):
            with r.device.doc.transaction():
                for j in range(per_sync):
                    root[keys[j % len(keys)]] = written + j
            written += per_sync
            start = time.perf_counter()
            await r.device.sync()
            carry.append(time.perf_counter() - start)
            if written in checkpoints:
                await checkpoint()
    return rows


# --- (iv) a device's lifetime: alternating writers ----------------------------------------


LIFE_KEYS = [f"k{i}" for i in range(10)]
SECTIONS = ["size", "history", "fleet", "lifetime"]


async def idle_pair(a: Rig, b: Rig, rounds: int) -> tuple[list[float], list[float]]:
    """No-change sync times of ``a`` and ``b`` taken in turn, so that both see the same
    machine (a slower patch of a noisy machine slows both)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(-WARMUP, rounds):
        for side, r in enumerate((a, b)):
            start = time.perf_counter()
            await r.device.sync()
            if i >= 0:
                times[side].append(time.perf_counter() - start)
    return times


async def lifetime_point(r: Rig, fresh: Rig, overwrites: int, rounds: int
                         ) -> dict[str, Any]:
    """What a long-lived document costs now: no-change sync (and a fresh document's, taken
    in turn), replacement download, server memory and stored bytes, the device's database,
    the generation."""
    idle, fresh_idle = await idle_pair(r, fresh, rounds)
    snapshot, rows, log = r.stored()
    point = {"overwrites": overwrites, "idle": idle, "fresh_idle": fresh_idle,
             "replacement": await r.replacement_download(str(overwrites)),
             "stored": snapshot + log, "rows": rows, "gen": r.gen(),
             "device_file": file_size(r.folder / "device.db")}
    point.update(await r.memory())
    return point


async def lifetime(folder: Path, syncs: int, per_sync: int, checkpoints: Sequence[int],
                   rounds: int) -> list[dict[str, Any]]:
    """Ten keys overwritten by the device ``per_sync`` times per sync and each once more by
    the cloud in between (alternating writers: the tombstones Yjs cannot collect). The first
    row is a fresh document with the same ten keys, measured in the same run; every row's
    no-change sync is timed in turn with that fresh document's."""
    async with rig(folder / "fresh", "life-fresh") as fresh, \
            rig(folder / "life", "life-1") as r:
        for each in (fresh, r):
            each.device.state.update(dict.fromkeys(LIFE_KEYS, 0))
            await each.device.sync()
        rows = [await lifetime_point(fresh, r, 0, rounds)]
        rows[0]["idle"], rows[0]["fresh_idle"] = rows[0]["fresh_idle"], rows[0]["idle"]
        sync = r.server.services.sync
        root = r.device.doc.get("state", type=Map)
        written = 0
        for n in range(syncs):
            with r.device.doc.transaction():
                for j in range(per_sync):
                    root[LIFE_KEYS[j % len(LIFE_KEYS)]] = written + j
            written += per_sync
            await sync.write_state(r.device.id, "state", {k: -n for k in LIFE_KEYS})
            written += len(LIFE_KEYS)
            await r.device.sync()
            if (n + 1) * per_sync in checkpoints:
                rows.append(await lifetime_point(r, fresh, written, rounds))
                row = rows[-1]
                print(f"  lifetime {written:,} overwrites: gen {row['gen']}, no-change sync "
                      f"{ms(row['idle'])} ms (fresh {ms(row['fresh_idle'])} ms), replacement "
                      f"download {row['replacement']:,} B, server doc "
                      f"{row['rss_per_doc'] / KB:,.0f} KB, stored {row['stored']:,} B, "
                      f"device db {row['device_file'] / KB:,.0f} KB", flush=True)
    return rows


PROFILED = (("pycrdt/_doc.py", "get_update"), ("crdtsync/crdt.py", "apply_remote"))


async def profile_syncs(r: Rig, n: int, change: str | None) -> list[tuple[str, float]]:
    """cProfile of ``n`` syncs (device and server, one process): ms per sync spent in
    ``Doc.get_update`` and in ``crdt.apply_remote``, by caller, and the total."""
    profiler = cProfile.Profile()
    profiler.enable()
    await r.sync_times(n, change)
    profiler.disable()
    stats = pstats.Stats(profiler)
    table = stats.stats  # type: ignore[attr-defined]
    out = [("total (profiled)", stats.total_tt / (n + WARMUP) * 1000)]  # type: ignore[attr-defined]
    for filename, func in PROFILED:
        for (f, _, name), value in table.items():
            if name != func or not f.endswith(filename):
                continue
            for (cf, _, cname), caller in value[4].items():
                where = re.sub(r".*/(crdtsync_server|crdtsync)/", r"\1/", cf)
                out.append((f"`{func}` from `{where}:{cname}`", caller[3] / (n + WARMUP) * 1000))
    return out


# --- (iii) fleet size -----------------------------------------------------------------------


def small_update(i: int) -> bytes:
    doc: Doc[Any] = Doc(client_id=1000 + i)
    state = doc.get("state", type=Map)
    with doc.transaction():
        for key, value in {"fw": "1.4.2", "voltage": 3.71, "temp": 21.5, "hum": 40,
                           "online": True, "serial": f"SN{i:08d}"}.items():
            state[key] = value
    return doc.get_update()


async def fleet(folder: Path, sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    out = []
    async with rig(folder, "probe-dev") as r:
        r.device.state.update({"fw": "1.4.2", "voltage": 3.71})
        await r.device.sync()
        store = r.server.services.store
        have = 1
        hashed = hash_token("unused")
        for size in sizes:
            start = time.perf_counter()
            for i in range(have, size):
                name = f"fleet-{i:06d}"
                now = int(time.time() * 1000)
                await store.add_device(DeviceRecord(name, hashed, now))
                await store.commit(SyncWrite(device=name, time=now, docs=[
                    DocWrite(doc_key(name, "state"), small_update(i))]))
            have = max(have, size)
            fill = time.perf_counter() - start
            idle, _, _ = await r.sync_times(rounds, None)
            change, _, _ = await r.sync_times(rounds, "voltage")
            out.append({"devices": size, "idle": idle, "change": change,
                        "db_file": r.db_file(), "fill": fill})
            print(f"  fleet {size:,}: no-change {ms(idle)} ms, 1-key {ms(change)} ms",
                  flush=True)
    return out


# --- report ----------------------------------------------------------------------------------


def render_lifetime(life: list[dict[str, Any]], per_sync: int) -> list[str]:
    fresh = life[0]
    lines = ["", f"**A device's lifetime** (10 keys; per sync the device overwrites them "
             f"{per_sync:,} times and the cloud once each: alternating writers; the first row is "
             "a fresh document with the same keys; each row's no-change syncs are timed in "
             "turn with the fresh document's, and the ratio is to those):", "",
             "| overwrites | generation | no-change sync, ms (vs fresh) | replacement device "
             "downloads, bytes | server memory for the document, KB | stored on server, bytes "
             "| device database, KB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in life:
        lines.append(
            f"| {row['overwrites']:,}{' (fresh)' if row is fresh else ''} | {row['gen']} | "
            f"{ms(row['idle'])} ({median(row['idle']) / median(row['fresh_idle']):.2f}x) | "
            f"{row['replacement']:,} | {row['rss_per_doc'] / KB:,.1f} | {row['stored']:,} | "
            f"{row['device_file'] / KB:,.0f} |")
    return lines


def header(quick: bool, rounds: int) -> str:
    return (f"Machine: {machine()}. {'Quick mode. ' if quick else ''}Sync times: median "
            f"(p10-p90) of {rounds} syncs, ms, device + server in one process on loopback.")


def render(quick: bool, rounds: int, sizes: list[dict[str, Any]], hist: list[dict[str, Any]],
           per_sync: int, fleets: list[dict[str, Any]]) -> str:
    lines = [header(quick, rounds)]
    if sizes:
        lines += render_sizes(sizes)
    if hist:
        lines += render_history(hist, per_sync)
    if fleets:
        lines += render_fleet(fleets)
    return "\n".join(lines)


def render_sizes(sizes: list[dict[str, Any]]) -> list[str]:
    lines = ["", "**(i) Document size** (keys in the device's `state` map, integer values):",
             "", "| keys | doc update, bytes | no-change sync, ms | 1-key sync, ms | "
             "1-key request, bytes | stored on server after the first sync, bytes | "
             "server db file at the end, KB | "
             "doc in server memory, KB | load (cache miss), ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = median(sizes[0]["idle"])
    for s in sizes:
        lines.append(f"| {s['keys']:,} | {s['doc_bytes']:,} | {ms(s['idle'])} | "
                     f"{ms(s['change'])} | {s['change_bytes']:,} | {s['stored']:,} | "
                     f"{s['db_file'] / KB:,.0f} | {s['rss_per_doc'] / KB:,.1f} | "
                     f"{s['load_ms']:.2f} |")
    big = sizes[-1]
    lines += ["", f"No-change sync at {big['keys']:,} keys vs 1 key: "
              f"{median(big['idle']) / base:.2f}x; 1-key sync: "
              f"{median(big['change']) / median(sizes[0]['change']):.2f}x."]
    return lines


def render_history(hist: list[dict[str, Any]], per_sync: int) -> list[str]:
    lines = ["", f"**(ii) History** (10 keys overwritten round-robin, {per_sync:,} overwrites "
             "per transaction and per sync; the server compacts every 500 log rows; 'after' is "
             "right after a forced compaction):", "",
             "| overwrites | stored before: log rows / bytes | stored after compaction, "
             "bytes | bytes per overwrite | no-change sync, ms (response bytes) | "
             "1-key sync, ms | "
             f"sync carrying {per_sync:,} overwrites, ms | doc in server memory, KB | "
             "load (cache miss), ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = hist[0]
    for h in hist:
        before = h["before"]
        per = ((h["after"][0] - first["after"][0]) / h["overwrites"]
               if h["overwrites"] else 0.0)
        lines.append(
            f"| {h['overwrites']:,} | {before[1]} / {before[0] + before[2]:,} | "
            f"{h['after'][0]:,} | {per:.2f} | {ms(h['idle'])} ({h['idle_down']}) | "
            f"{ms(h['change'])} | "
            f"{ms(h['carry']) if h['carry'] else '-'} | {h['rss_per_doc'] / KB:,.0f} | "
            f"{h['load_ms']:.2f} |")
    last = hist[-1]
    n = last["overwrites"]
    lines += ["", f"After {n:,} overwrites and compaction: stored "
              f"{(last['after'][0] - first['after'][0]) / n:.2f} bytes per overwrite, server "
              f"memory {(last['rss_per_doc'] - first['rss_per_doc']) / n:.0f} bytes per "
              f"overwrite, no-change sync {median(last['idle']) / median(first['idle']):.2f}x and "
              f"1-key sync {median(last['change']) / median(first['change']):.2f}x the fresh "
              f"document's; device document {last['device_doc']:,} bytes; server db file "
              f"{last['db_after'] / MB:.1f} MB (free pages included)."]
    if "profile" in last:
        lines += ["", f"Where a sync's time goes at {n:,} overwrites (cProfile, device + "
                  "server, ms per sync; the profiler adds overhead):", "",
                  "| sync | step | ms per sync |", "|---|---|---:|"]
        for kind, steps in last["profile"].items():
            lines += [f"| {kind} | {label} | {value:.2f} |"
                      for label, value in steps if value >= 0.05]
    return lines


def render_fleet(fleets: list[dict[str, Any]]) -> list[str]:
    lines = ["", "**(iii) Fleet size** (devices provisioned, each with a stored 6-key "
             "document):", "", "| devices | no-change sync, ms | 1-key sync, ms | vs 1 device | "
             "server db file, MB |", "|---:|---:|---:|---:|---:|"]
    for f in fleets:
        lines.append(f"| {f['devices']:,} | {ms(f['idle'])} | {ms(f['change'])} | "
                     f"{median(f['idle']) / median(fleets[0]['idle']):.2f} / "
                     f"{median(f['change']) / median(fleets[0]['change']):.2f} | "
                     f"{f['db_file'] / MB:.1f} |")
    return lines


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    rounds = 10 if quick else args.rounds
    key_counts = (1, 10, 100, 1_000) if quick else (1, 10, 100, 1_000, 10_000, 100_000)
    syncs, per_sync = (10, 1_000) if quick else (1_000, 1_000)
    checkpoints = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
    fleet_sizes = (1, 10, 100) if quick else (1, 100, 1_000, 10_000)
    life_points = (1_000, 10_000) if quick else (10_000, 100_000, 300_000, 1_000_000)
    print(f"Machine: {machine()}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = []
        for k in key_counts if "size" in args.sections else ():
            sizes.append(await doc_size(folder / f"keys-{k}", k, rounds))
            s = sizes[-1]
            print(f"  {k:,} keys: doc {s['doc_bytes']:,} B, no-change {ms(s['idle'])} ms, "
                  f"1-key {ms(s['change'])} ms", flush=True)
        hist = (await history(folder / "history", syncs, per_sync, checkpoints, rounds)
                if "history" in args.sections else [])
        fleets = (await fleet(folder / "fleet", fleet_sizes, rounds)
                  if "fleet" in args.sections else [])
        life = (await lifetime(folder / "lifetime", life_points[-1] // per_sync, per_sync,
                               life_points, rounds) if "lifetime" in args.sections else [])
    print(f"total {time.perf_counter() - started:.0f} s")
    if sizes or hist or fleets:
        report(render(quick, rounds, sizes, hist, per_sync, fleets), args.write, "growth")
    if life:
        report("\n".join([header(quick, rounds), *render_lifetime(life, per_sync)]),
               args.write, "lifetime")


def parse() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke test)")
    parser.add_argument("--rounds", type=int, default=30, help="syncs per timing")
    parser.add_argument("--write", type=Path, help="replace the growth block of this file")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="which sections to run (all by default)")
    parser.add_argument("--child-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.child_probe:
        print(json.dumps(probe(ARGS.child_probe, ARGS.copies)))
    else:
        asyncio.run(main(ARGS))
