"""What a sync costs the server, and the bytes it moves: the baseline of the policy layer.

The server runs as ``crdtsync serve`` in a subprocess (SQLite, ``synchronous=FULL``); one
device runs in this process on loopback with a state of 10 plain keys. Three kinds of sync,
alternating within each round so drift hits them alike:

- **no change**: nothing to send either way;
- **5 keys**: the device changed 5 of its keys since the last sync;
- **5 keys, cloud too**: the cloud PATCHed the same 5 keys (other values) and then the device
  changed them and synced: every key conflicts. Its figures are per cycle (PATCH + sync).

Server CPU is the subprocess's user + system time (``/proc/<pid>/stat`` through psutil,
every thread: the event loop and the SQLite worker) over a batch of ``--syncs`` syncs of one
kind, divided by the batch; the process is otherwise idle (its 1-second bookkeeping loop
included). Measuring the whole process rather than ``time.process_time`` around
``SyncService.sync`` in this process counts everything a sync costs on the server: decoding
the request (stamps included once devices send them), the HTTP layer, encoding the answer,
and the store's thread, without counting the device. Device CPU is this process's
``time.process_time`` over the same batch (for the third kind it includes the admin
client's PATCH). Bytes are protocol message bytes (``SyncReport.bytes_up`` / ``bytes_down``,
before HTTP compression).

    python bench/policy_cost.py [--rounds 5] [--syncs 300] [--json] [--quick]
                                [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ADMIN_TOKEN,
    Child,
    arg_parser,
    machine,
    median,
    provision,
    report,
    spread,
    start_server,
)

from crdtsync import AdminClient, Device, SyncReport

KEYS = 10
CHANGED = 5
KINDS = {"idle": "no change", "five": f"{CHANGED} keys",
         "conflict": f"{CHANGED} keys, cloud too (per PATCH + sync)"}


async def batch(kind: str, dev: Device, admin: AdminClient, server: Child, syncs: int,
                serial: list[int]) -> dict[str, float]:
    """``syncs`` syncs of ``kind``: server and device CPU (ms per sync), wall (ms per sync),
    the median bytes up and down."""
    ups: list[int] = []
    downs: list[int] = []
    server0, device0, wall0 = server.cpu(), time.process_time(), time.perf_counter()
    for _ in range(syncs):
        serial[0] += 1
        if kind == "conflict":
            await admin.patch_state(dev.id, {f"k{i}": -serial[0] for i in range(CHANGED)})
        if kind != "idle":
            for i in range(CHANGED):
                dev.state[f"k{i}"] = serial[0] * 10 + i
        result: SyncReport = await dev.sync()
        ups.append(result.bytes_up)
        downs.append(result.bytes_down)
    return {"server_ms": (server.cpu() - server0) * 1000 / syncs,
            "device_ms": (time.process_time() - device0) * 1000 / syncs,
            "wall_ms": (time.perf_counter() - wall0) * 1000 / syncs,
            "up": median(ups), "down": median(downs)}


async def run(rounds: int, syncs: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="crdtsync-policy-cost-") as tmp:
        folder = Path(tmp)
        async with await start_server(folder, db="s.db") as server:
            token = (await provision(server.url, ["cost-1"]))["cost-1"]
            async with Device("cost-1", server.url, token=token, path=folder / "d.db",
                              interval=None) as dev, AdminClient(server.url, ADMIN_TOKEN) as admin:
                dev.state.update({f"k{i}": i for i in range(KEYS)})
                await dev.sync()
                serial = [0]
                for kind in KINDS:  # warm-up: caches, first-use paths
                    await batch(kind, dev, admin, server, max(5, syncs // 10), serial)
                for _ in range(rounds):
                    for kind in KINDS:
                        samples[kind].append(await batch(kind, dev, admin, server, syncs,
                                                         serial))
    return {"machine": machine(), "rounds": rounds, "syncs": syncs, "samples": samples}


def render(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}. Server `crdtsync serve` in a subprocess, one "
             f"device in the bench process (10 plain keys); {result['rounds']} rounds of "
             f"{result['syncs']} syncs per kind, median of the rounds (min-max).", "",
             "| sync | server CPU, ms per sync | device CPU, ms | wall, ms | bytes up | "
             "bytes down |", "|---|---:|---:|---:|---:|---:|"]
    for kind, label in KINDS.items():
        runs = result["samples"][kind]

        def col(name: str, fmt: str = "{:.3f}", runs: Any = runs) -> str:
            return spread([r[name] for r in runs], fmt)

        lines.append(f"| {label} | {col('server_ms')} | {col('device_ms')} | "
                     f"{col('wall_ms', '{:.2f}')} | {col('up', '{:.0f}')} | "
                     f"{col('down', '{:.0f}')} |")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (batches per kind)")
    parser.add_argument("--syncs", type=int, default=300, help="syncs per batch")
    parser.add_argument("--quick", action="store_true", help="1 round of 20 (CI smoke test)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--write", type=Path, help="replace the policy_cost block of this file")
    return parser.parse_args()


def main() -> None:
    args = parse()
    rounds, syncs = (1, 20) if args.quick else (args.rounds, args.syncs)
    result = asyncio.run(run(rounds, syncs))
    if args.json:
        print(json.dumps(result))
    else:
        report(render(result), args.write, "policy_cost")


if __name__ == "__main__":
    main()
