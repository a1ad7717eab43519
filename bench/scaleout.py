"""Scale-out on PostgreSQL: sync throughput of 1, 2 and 4 server instances sharing one
PostgreSQL schema against 1 instance on SQLite, and a reconnect storm over 2 PostgreSQL
instances against 1 on SQLite.

Every configuration gets fresh servers: `crdtsync serve` processes on their own ports
(SQLite in a temp folder, default durability; or `--database postgresql://...?schema=NAME`,
a fresh random schema per configuration, dropped afterwards). The load generator is this
process and spreads requests over the instances itself, round robin per request, as a
balancer without sticky routing does.

- Throughput: the workload and the load generator of `bench/throughput.py` (each sync 5
  state changes + 10 events, a fixed number of requests in flight), rounds of a fixed time.
  CPU from /proc: every server process (all threads), the PostgreSQL backends serving the
  schema (`pg_stat_activity.application_name = 'crdtsync.<schema>'`; the WAL writer,
  checkpointer and other shared PostgreSQL processes are left out: they land in "others"),
  the load generator, and the rest of the machine.
- Storm: the crdtsync side of `bench/storm.py` (each device holds 20 offline edits and
  reconnects at once on a new connection, at most `--storm-concurrency` at a time), device
  i sent to instance i mod N, without the byte-counting proxy; every server document is
  compared with its device's afterwards.

    python bench/scaleout.py [--devices 200] [--concurrency 32] [--duration 8] [--rounds 3]
                             [--storm-devices 2000] [--storm-rounds 2] [--quick]
                             [--database postgresql://postgres@127.0.0.1:5432/test]
                             [--write docs/benchmarks.md]
    python bench/scaleout.py --profile server.prof [--profile-instances N]
                             (the PostgreSQL throughput only, its first server under cProfile)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from common import (
    POSTGRES_URL,
    Child,
    PgBackends,
    check_last_seq,
    client_session,
    machine,
    median,
    nproc,
    percentile,
    postgres_schema,
    print_profile,
    provision,
    report,
    spread,
    start_server,
)
from storm import Run, count_mismatched, crdtsync_storm, offline_clients
from throughput import (
    EVENTS_PER_SYNC,
    STATE_CHANGES,
    RoundResult,
    Settings,
    SimDevice,
    fleet,
    per_sync,
    run_round,
    warm_up,
)

from crdtsync import crdt
from crdtsync.protocol import SYNC_PATH

NAME = "scaleout"
LIBS = ("aiohttp", "pycrdt", "asyncpg")
SERIAL = 0.8
"""Mean backends waiting for the commit-order lock from which it counts as always taken."""
STORM_TIMEOUT = 120.0
"""Seconds a storm device may take (as ``bench/storm.py``)."""


@dataclass(frozen=True)
class Setup:
    """One configuration: ``instances`` server processes on SQLite or on PostgreSQL."""

    postgres: bool
    instances: int

    @property
    def label(self) -> str:
        return f"{'PostgreSQL' if self.postgres else 'SQLite'} x{self.instances}"

    @property
    def key(self) -> str:
        return f"{'pg' if self.postgres else 'sqlite'}{self.instances}"


THROUGHPUT = (Setup(False, 1), Setup(True, 1), Setup(True, 2), Setup(True, 4))
STORM = (Setup(False, 1), Setup(True, 2))


@contextlib.asynccontextmanager
async def cluster(setup: Setup, tmp: Path, database: str, profile: Path | None = None
                  ) -> AsyncIterator[tuple[list[Child], PgBackends | None]]:
    """The servers of ``setup``, started and accepting connections, and the PostgreSQL
    backends serving them (None on SQLite); stopped (and the schema dropped) afterwards.
    ``profile``: the first server runs under cProfile, its stats to that file."""
    if not setup.postgres:
        server = await start_server(tmp, db=f"{setup.key}.db", profile=profile)
        try:
            yield [server], None
        finally:
            await server.stop()
        return
    async with postgres_schema(database, prefix=f"bench_{setup.key}") as (url, schema):
        print(f"PostgreSQL schema: {schema}", flush=True)
        servers: list[Child] = []
        try:
            for n in range(setup.instances):
                servers.append(await start_server(
                    tmp, db=f"{setup.key}-{n}", database=url,
                    profile=profile if n == 0 else None))
            yield servers, PgBackends(database, schema)
        finally:
            for server in reversed(servers):
                await server.stop()


# --- throughput -----------------------------------------------------------------------------


@dataclass
class Round:
    """One throughput round and, on PostgreSQL, what its backends were doing
    (:meth:`PgBackends.waits`)."""

    result: RoundResult
    waits: dict[str, float]


async def watched_round(session: aiohttp.ClientSession, urls: list[str],
                        devices: Sequence[SimDevice], s: Settings, setup: Setup,
                        servers: list[Child], backends: PgBackends | None) -> Round:
    """:func:`throughput.run_round`, with the backends' waits sampled meanwhile."""
    stop = asyncio.Event()
    watch = (asyncio.create_task(backends.waits(stop)) if backends is not None else None)
    try:
        result = await run_round(session, urls, devices, s.concurrency, s.duration,
                                 setup.key, servers, backends)
    finally:
        stop.set()
    return Round(result, await watch if watch is not None else {})


async def throughput(setup: Setup, s: Settings, tmp: Path, database: str) -> list[Round]:
    """``s.rounds`` rounds of the throughput load on fresh servers of ``setup``; checks that
    every acknowledged event of a sample of devices is stored. With ``s.profile``, the first
    server runs under cProfile."""
    rounds: list[Round] = []
    async with cluster(setup, tmp, database, s.profile) as (servers, backends):
        ids = [f"bench-{n:04d}" for n in range(s.devices)]
        tokens = await provision(servers[0].url, ids)
        urls = [server.url + SYNC_PATH for server in servers]
        devices = fleet(tokens, s, s.seed)
        async with client_session(s.concurrency, 60) as session:
            await warm_up(session, urls, devices, s.concurrency)
            for n in range(s.rounds):
                r = await watched_round(session, urls, devices, s, setup, servers, backends)
                rounds.append(r)
                waits = " ".join(f"{k} {v:.1f}" for k, v in r.waits.items())
                print(f"{setup.label} round {n + 1}/{s.rounds} {r.result.line()}"
                      + (f"  backends: {waits}" if waits else ""), flush=True)
        sample = devices[::max(1, len(devices) // 20)]
        await check_last_seq(servers[-1].url, {d.id: d.acked for d in sample})
    return rounds


# --- storm ----------------------------------------------------------------------------------


async def storm_run(setup: Setup, ids: Sequence[int], tmp: Path, args: argparse.Namespace
                    ) -> Run:
    """The reconnect storm of ``len(ids)`` devices on fresh servers of ``setup``."""
    run = Run(setup.label, len(ids))
    async with cluster(setup, tmp, args.database) as (servers, backends):
        started = time.perf_counter()
        clients = await offline_clients(servers[0].url, ids)
        run.setup = time.perf_counter() - started
        await crdtsync_storm(run, clients, [s.url for s in servers], servers, None,
                             concurrency=args.storm_concurrency, limit=STORM_TIMEOUT,
                             database=backends)
        await count_mismatched(servers[-1].url, clients, run)
    print(f"storm {setup.label}: {run.elapsed:.2f} s to converge, server CPU "
          f"{run.server_cpu:.2f} s, PostgreSQL backends {run.database_cpu:.2f} s, load "
          f"{run.client_cpu:.2f} s, setup {run.setup:.1f} s, errors {len(run.errors)}, "
          f"mismatched {run.mismatched}", flush=True)
    for error in sorted(set(run.errors))[:5]:
        print(f"    error: {error}", flush=True)
    return run


# --- report ---------------------------------------------------------------------------------


Results = dict[Setup, list[Round]]


def throughput_table(results: Results) -> list[str]:
    setups = list(results)
    lines = ["| figure | " + " | ".join(s.label for s in setups) + " |",
             "|---|" + "---:|" * len(setups)]

    def row(name: str, fn: Callable[[RoundResult], float], fmt: str = "{:,.0f}") -> None:
        lines.append(f"| {name} | "
                     + " | ".join(spread([fn(r.result) for r in results[s]], fmt)
                                  for s in setups) + " |")

    def waits(name: str, kind: str) -> None:
        lines.append(f"| {name} | " + " | ".join(
            spread([r.waits[kind] for r in results[s]], "{:.1f}") if s.postgres else "-"
            for s in setups) + " |")

    row("syncs/s", lambda r: r.syncs_per_s)
    row("events/s", lambda r: r.events_per_s)
    row("latency p50 (ms)", lambda r: r.p(0.5), "{:.1f}")
    row("latency p99 (ms)", lambda r: r.p(0.99), "{:.1f}")
    row("server CPU, all instances (% of a CPU)", lambda r: r.cpu.server)
    row("PostgreSQL backends CPU (%)", lambda r: r.cpu.database)
    row("load generator CPU (%)", lambda r: r.cpu.load)
    row("other processes CPU (%)", lambda r: r.cpu.others)
    row("server CPU per sync (ms)", lambda r: per_sync(r, r.cpu.server), "{:.2f}")
    row("PostgreSQL CPU per sync (ms)", lambda r: per_sync(r, r.cpu.database), "{:.2f}")
    row("load generator CPU per sync (ms)", lambda r: per_sync(r, r.cpu.load), "{:.2f}")
    row("server + PostgreSQL + load per sync (ms)",
        lambda r: per_sync(r, r.cpu.server + r.cpu.database + r.cpu.load), "{:.2f}")
    waits("PostgreSQL backends waiting for the commit-order lock (mean)", "lock")
    waits("... in a transaction, waiting for the server (mean)", "server")
    waits("... running a statement (mean)", "running")
    waits("... idle (mean)", "idle")
    return lines


def median_of(rounds: Sequence[RoundResult], fn: Callable[[RoundResult], float]) -> float:
    return median([fn(r) for r in rounds])


def bottleneck(results: Results, cpus: int) -> list[str]:
    """Per configuration: what limits it, and what one more CPU would buy. Caps on syncs/s:
    the machine ``cpus / (server + PostgreSQL + load CPU per sync)``; the load generator
    (one process) ``1 / (its CPU per sync)``; the servers (one GIL each)
    ``instances / (server CPU per sync)``; one more CPU buys at most the lowest cap with
    ``cpus + 1`` over the syncs/s measured."""
    lines = []
    lock = 0.0
    serial_note = ""
    for setup, rounds in results.items():
        rs = [r.result for r in rounds]
        syncs = median_of(rs, lambda r: r.syncs_per_s)
        load = median_of(rs, lambda r: r.cpu.load)
        busy = median_of(rs, lambda r: r.cpu.server + r.cpu.database + r.cpu.load + r.cpu.others)
        work_ms = median_of(rs, lambda r: per_sync(r, r.cpu.server + r.cpu.database + r.cpu.load))
        client_cap = 1000 / median_of(rs, lambda r: per_sync(r, r.cpu.load))
        server_cap = setup.instances * 1000 / median_of(rs, lambda r: per_sync(r, r.cpu.server))
        more = min((cpus + 1) * 1000 / work_ms, client_cap, server_cap)
        server = median_of(rs, lambda r: r.cpu.server)
        bound = ("client-bound: the load generator uses about one CPU" if load >= 85 else
                 f"CPU-bound: the machine is busy ({busy:.0f} % of {cpus * 100} %)"
                 if busy >= 90 * cpus else
                 f"server-bound: {server:.0f} % of a CPU for {setup.instances} process(es), "
                 "one GIL each" if server >= 85 * setup.instances else
                 f"not CPU-bound ({busy:.0f} % of {cpus * 100} % busy): waits (commits, "
                 "locks, round trips) limit it")
        if setup.postgres:
            lock = median([r.waits["lock"] for r in rounds])
            held = median([r.waits["server"] for r in rounds])
            bound += (f"; on average {lock:.1f} PostgreSQL backends wait for the commit-order "
                      f"lock and {held:.1f} hold a transaction open waiting for the server")
            serial_note = (
                ", but only if the commits' hold on the lock gets shorter: someone waits for it "
                "nearly all the time, so commits run one group after another across the "
                "instances and more CPU helps only as far as the holder's server process "
                "waited to be scheduled")
        lines.append(
            f"- {setup.label} ({syncs:,.0f} syncs/s): {bound}. {work_ms:.2f} ms of CPU per "
            f"sync: {cpus} CPUs allow {cpus * 1000 / work_ms:,.0f} syncs/s, "
            f"{cpus + 1} CPUs {(cpus + 1) * 1000 / work_ms:,.0f}; caps: load generator "
            f"{client_cap:,.0f}, {setup.instances} server process(es) {server_cap:,.0f}; "
            f"one more CPU: at most {more:,.0f} syncs/s ({more / syncs:.2f}x)"
            + (serial_note if setup.postgres and lock >= SERIAL else "") + ".")
    return lines


def storm_table(storms: dict[Setup, list[Run]], devices: int) -> list[str]:
    setups = list(storms)
    lines = ["| figure | " + " | ".join(s.label for s in setups) + " |",
             "|---|" + "---:|" * len(setups)]

    def row(name: str, fn: Callable[[Run], float], fmt: str) -> None:
        lines.append(f"| {name} | "
                     + " | ".join(spread([fn(r) for r in storms[s]], fmt) for s in setups)
                     + " |")

    row("time to all converged (s)", lambda r: r.elapsed, ".2f")
    row("per-device latency, median (ms)", lambda r: median(r.latencies) * 1000, ".0f")
    row("per-device latency, p99 (ms)", lambda r: percentile(r.latencies, 0.99) * 1000, ".0f")
    row("server CPU, all instances (s)", lambda r: r.server_cpu, ".2f")
    row("PostgreSQL backends CPU (s)", lambda r: r.database_cpu, ".2f")
    row("server + PostgreSQL CPU per device (ms)",
        lambda r: (r.server_cpu + r.database_cpu) * 1000 / devices, ".2f")
    row("load generator CPU (s)", lambda r: r.client_cpu, ".2f")
    row("failed devices", lambda r: len(r.errors), ".0f")
    row("documents differing afterwards", lambda r: r.mismatched, ".0f")
    return lines


def render(args: argparse.Namespace, s: Settings, results: Results,
           storms: dict[Setup, list[Run]], pg_version: str) -> str:
    mode = " (quick mode: not representative)" if args.quick else ""
    lines = [
        f"Machine: {machine(LIBS, model=True, temp_dir=True)}, PostgreSQL {pg_version} on "
        "the same machine.",
        "",
        f"Throughput{mode}: {s.devices} devices, {s.concurrency} requests in flight spread "
        f"round robin over the instances, {STATE_CHANGES} state changes + {EVENTS_PER_SYNC} "
        f"events per sync; fresh servers per configuration, {s.rounds} round(s) of "
        f"{s.duration:g} s each; median over rounds, (min-max) across rounds. CPU in % of "
        "one CPU; PostgreSQL: its backends serving the instances only.",
        "",
        *throughput_table(results),
        "",
        "Where the CPU goes (medians):",
        "",
        *bottleneck(results, args.cpus),
        "",
        f"Reconnect storm{mode}: {args.storm_devices:,} devices x 20 offline edits reconnect "
        f"at once (at most {args.storm_concurrency} connections), device i to instance i mod "
        f"N, no proxy; {args.storm_rounds} round(s) per configuration"
        + (", median (min-max)" if args.storm_rounds > 1 else "") + ".",
        "",
        *storm_table(storms, args.storm_devices),
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


async def postgres_version(url: str) -> str:
    """The server version of the database at ``url``; exits if it cannot be reached."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        sys.exit(f"scaleout needs PostgreSQL at {url} (--database or CRDTSYNC_TEST_POSTGRES): "
                 f"{type(exc).__name__}: {exc}")
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def main(args: argparse.Namespace, s: Settings) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # run finally:s
    pg_version = await postgres_version(args.database)
    print(f"Machine: {machine(LIBS, model=True, temp_dir=True)}, PostgreSQL {pg_version}",
          flush=True)
    results: Results = {}
    storms: dict[Setup, list[Run]] = {setup: [] for setup in STORM}
    with tempfile.TemporaryDirectory(prefix="crdtsync-scaleout-") as tmp_name:
        tmp = Path(tmp_name)
        if s.profile is not None:
            await throughput(Setup(True, args.profile_instances), s, tmp, args.database)
            print_profile(s.profile)
            return 0
        for setup in THROUGHPUT:
            results[setup] = await throughput(setup, s, tmp, args.database)
        for n in range(args.storm_rounds):
            rng = random.Random(args.seed + n)
            ids = [rng.randrange(1, crdt.MAX_CLIENT_ID + 1) for _ in range(args.storm_devices)]
            for setup in (STORM if n % 2 == 0 else STORM[::-1]):
                with tempfile.TemporaryDirectory(dir=tmp) as folder:
                    storms[setup].append(await storm_run(setup, ids, Path(folder), args))
    errors = sum(sum(r.result.errors.values()) for rs in results.values() for r in rs)
    failed = [r for runs in storms.values() for r in runs if not r.ok]
    text = render(args, s, results, storms, pg_version)
    if errors or failed:
        print(text)
        print(f"{errors} failed requests, {len(failed)} storm runs with failures: "
              "not writing the report", file=sys.stderr)
        return 1
    report(text, args.write, NAME)
    return 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    parser.add_argument("--storm-devices", type=int, default=2000)
    parser.add_argument("--storm-rounds", type=int, default=2)
    parser.add_argument("--storm-concurrency", type=int,
                        default=500, help="connections open at once in the storm")
    parser.add_argument("--database", default=POSTGRES_URL,
                        help="PostgreSQL database (a schema of it per configuration)")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--quick", action="store_true",
                        help="20 devices, 1 round of 1.5 s; storm of 50 devices (CI smoke)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--profile", type=Path, metavar="OUT",
                        help="only the PostgreSQL throughput, its first server under cProfile "
                             "(stats to OUT and OUT.threads), then print the top functions")
    parser.add_argument("--profile-instances", type=int, default=1, metavar="N",
                        help="PostgreSQL instances with --profile (default 1)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.concurrency, args.duration, args.rounds = 20, 8, 1.5, 1
        args.storm_devices, args.storm_rounds = 50, 1
    args.cpus = nproc()
    s = Settings(devices=args.devices, concurrency=args.concurrency, duration=args.duration,
                 rounds=args.rounds, shared_docs=False, encoding="identity", quick=args.quick,
                 profile=args.profile.resolve() if args.profile else None, seed=args.seed)
    try:
        sys.exit(asyncio.run(main(args, s)))
    except asyncio.CancelledError:  # SIGTERM: children stopped by the finally blocks
        sys.exit(143)


if __name__ == "__main__":
    cli()
