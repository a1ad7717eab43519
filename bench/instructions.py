"""Instructions per sync, server against the floor's direct work: a figure the machine's noise
does not move (issue 17).

CPU time per sync moves by +-10-20 % from run to run on a shared 2-CPU machine, more than most
single levers buy. Instructions executed do not: this script counts them with valgrind's
callgrind (deterministic to about 0.3 %), in process and without HTTP, for

- **server**: ``process_sync`` (authentication, decoding, validation, merge, the group
  commit into SQLite, the answer) on the services of a real server (``open_services``, a
  SQLite file in a temp folder), ``--concurrency`` syncs at once;
- **direct**: the floor's direct work (``throughput.DirectStore``: msgpack decode, pycrdt
  apply, the rows written into a copy of the server's database, a commit per 12 syncs),

on the same request bodies (``throughput.direct_requests``: ``--devices`` simulated devices,
two warm-up passes, then ``--passes`` timed ones, 5 state changes and 10 events per sync).
Each side runs twice, once through the timed passes and once stopping after the warm-up;
instructions per sync = (whole run - warm-up run) / timed syncs. So everything else a
process does (start-up, imports, building the bodies, the warm-up) cancels out.

The ratio leaves out what the HTTP layer costs (the bare handler of ``throughput.py``'s floor
and the server's own middlewares): it is the server's sync work against the durable work,
instruction for instruction. It is not the CPU-time ratio of ``throughput.py``: Python code
spread over many functions misses the caches more than a tight loop, so the server's CPU
time is further from the direct work's than its instructions are.

    python bench/instructions.py [--devices 100] [--passes 4] [--concurrency 32] [--quick]
                                 [--write FILE]

Needs ``valgrind`` (``apt-get install valgrind``); about 5 minutes on 2 CPUs.
``--child server|direct [--warm-up-only]`` is the measured process (runs without valgrind
too: the smoke test does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, report
from throughput import DirectStore, Settings, direct_requests

from crdtsync import crdt
from crdtsync.cli import SERVE_GC_YOUNG
from crdtsync_server import ServerConfig
from crdtsync_server.api.server import tune_gc
from crdtsync_server.auth import hash_token
from crdtsync_server.core import Services, open_services, process_sync
from crdtsync_server.proxied.executor import RouteExecutor
from crdtsync_server.store import DeviceRecord

SEED = 17
WARM_PASSES = 2


def settings(devices: int, passes: int) -> Settings:
    return Settings(devices=devices, concurrency=1, duration=0, rounds=1, shared_docs=False,
                    encoding="identity", quick=False, profile=None, seed=SEED,
                    direct_passes=passes)


def device_ids(devices: int) -> list[str]:
    return [f"device-{n:05}" for n in range(devices)]


async def provisioned(services: Services, ids: list[str]) -> dict[str, str]:
    """Each device added straight to the store; ``{id: token}``."""
    tokens = {}
    for n, device in enumerate(ids):
        token = f"instructions-token-{n:08}"
        await services.store.add_device(DeviceRecord(
            id=device, token_hash=hash_token(token), created=services.config.clock(), meta={}))
        tokens[device] = token
    return tokens


async def run_passes(services: Services, tokens: dict[str, str], bodies: list[bytes],
                     concurrency: int) -> int:
    """Each pass's bodies (one per device, in device order) as concurrent syncs, at most
    ``concurrency`` at once, pass after pass; the syncs done."""
    per_pass = len(tokens)
    ids = list(tokens)
    limit = asyncio.Semaphore(concurrency)

    async def one(device: str, body: bytes) -> None:
        async with limit:
            await process_sync(services, tokens[device], body)

    for start in range(0, len(bodies), per_pass):
        chunk = bodies[start:start + per_pass]
        await asyncio.gather(*(one(d, b) for d, b in zip(ids, chunk, strict=True)))
    return len(bodies)


async def server_child(folder: Path, devices: int, passes: int, concurrency: int,
                       warm_only: bool) -> dict[str, float]:
    ids = device_ids(devices)
    bodies = direct_requests(ids, settings(devices, passes), SEED)
    warm = WARM_PASSES * devices
    config = ServerConfig(db=str(folder / "server.db"), admin_token="instructions-admin")
    async with open_services(config, executor=RouteExecutor(), loops=False) as services:
        tokens = await provisioned(services, ids)
        await run_passes(services, tokens, bodies[:warm], concurrency)
        tune_gc(SERVE_GC_YOUNG)
        if warm_only:
            return {"syncs": 0, "cpu": 0.0}
        started = time.process_time()
        syncs = await run_passes(services, tokens, bodies[warm:], concurrency)
        cpu = time.process_time() - started
        stored = {d.id: d.last_seq for d in await services.store.list_devices("", devices)}
    expected = (WARM_PASSES + passes) * 10
    if any(seq != expected for seq in stored.values()) or len(stored) != devices:
        raise RuntimeError(f"events not all stored: {stored}")
    return {"syncs": syncs, "cpu": cpu}


async def direct_child(folder: Path, devices: int, passes: int, concurrency: int,
                       warm_only: bool) -> dict[str, float]:
    """The direct work into the database the server's warm-up leaves (its devices, their
    first two passes), as ``throughput.direct_round`` does into a snapshot of the server's."""
    ids = device_ids(devices)
    bodies = direct_requests(ids, settings(devices, passes), SEED)
    warm = WARM_PASSES * devices
    config = ServerConfig(db=str(folder / "server.db"), admin_token="instructions-admin")
    async with open_services(config, executor=RouteExecutor(), loops=False) as services:
        await run_passes(services, await provisioned(services, ids), bodies[:warm],
                         concurrency)
    store = DirectStore(folder / "server.db")
    try:
        for body in bodies[:warm]:
            store.sync(body)
        store.commit()
        tune_gc(SERVE_GC_YOUNG)
        if warm_only:
            return {"syncs": 0, "cpu": 0.0}
        started = time.process_time()
        for body in bodies[warm:]:
            store.sync(body)
        store.commit()
        return {"syncs": len(bodies) - warm, "cpu": time.process_time() - started}
    finally:
        store.close()


def child(side: str, devices: int, passes: int, concurrency: int, warm_only: bool) -> None:
    """The measured process: prints one JSON line, ``{"syncs", "cpu"}``. Yjs client ids come
    from a seeded generator here (the product draws them from the system's), so that every
    run encodes the same ids in the same number of bytes."""
    crdt._ids = random.Random(SEED)
    run = server_child if side == "server" else direct_child
    with tempfile.TemporaryDirectory(prefix="crdtsync-instructions-") as tmp:
        result = asyncio.run(run(Path(tmp), devices, passes, concurrency, warm_only))
    print(json.dumps(result), flush=True)


COLLECTED = re.compile(rb"Collected : (\d+)")


def counted(side: str, args: argparse.Namespace, warm_only: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--child", side, "--devices", str(args.devices),
            "--passes", str(args.passes), "--concurrency", str(args.concurrency)]
    if warm_only:
        argv.append("--warm-up-only")
    # One hash seed: dict and set layouts, and so their probes, the same in every run.
    return subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONHASHSEED": "0"})


def instructions(proc: subprocess.Popen[bytes]) -> int:
    _out, err = proc.communicate()
    found = COLLECTED.search(err)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed (exit {proc.returncode}):\n"
                           f"{err.decode(errors='replace')[-2000:]}")
    return int(found.group(1))


def measure(args: argparse.Namespace) -> dict[str, int]:
    """Instructions per timed sync of each side (two processes at a time)."""
    timed = args.devices * args.passes
    per_sync = {}
    for side in ("server", "direct"):
        whole, warm = counted(side, args, False), counted(side, args, True)
        per_sync[side] = (instructions(whole) - instructions(warm)) // timed
    return per_sync


def render(args: argparse.Namespace, per_sync: dict[str, int]) -> str:
    ratio = per_sync["server"] / per_sync["direct"]
    return "\n".join([
        f"Machine: {machine(('pycrdt', 'msgpack'), model=True)}.",
        f"{args.devices} devices, {args.passes} timed passes after {WARM_PASSES} of warm-up, "
        f"{args.concurrency} syncs at once, 5 state changes + 10 events per sync; callgrind, "
        "in process, no HTTP.",
        "",
        "| | instructions per sync |",
        "|---|---:|",
        f"| server (`process_sync`) | {per_sync['server']:,} |",
        f"| the durable work done directly | {per_sync['direct']:,} |",
        f"| **server / direct** | **{ratio:.2f}x** |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true",
                        help="4 devices, 1 timed pass, 4 at once (CI smoke, about 1 minute)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    parser.add_argument("--child", choices=("server", "direct"), help=argparse.SUPPRESS)
    parser.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.passes, args.concurrency = 4, 1, 4
    if args.child:
        child(args.child, args.devices, args.passes, args.concurrency, args.warm_up_only)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (apt-get install valgrind)")
    report(render(args, measure(args)), args.write, "instructions")


if __name__ == "__main__":
    main()
