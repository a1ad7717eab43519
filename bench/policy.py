"""What the latest-write-wins layer costs the server per sync (issue 13).

Times ``SyncService.sync`` in this process over a real SQLite store (no HTTP, no codec):
the server's whole share of a sync from the decoded request to the response object. Four
kinds of sync, one device each, run in turn so that drift hits them alike:

- no-change sync of a client that stamps (``s: []`` and ``ck``) and of one that does not;
- 5-key sync: the device sets 5 keys of ``state`` and syncs, with its 5 stamped writes and
  ``ck``, and the same without ``s``/``ck`` (an old client: the Yjs merge alone).

Each figure is the median wall time of one ``sync`` call and the process CPU per call (every
thread: the store's worker too). The store runs with ``synchronous=OFF`` by default so that
the fsync of each commit (milliseconds, noisy) does not hide a cost of microseconds; pass
``--synchronous FULL`` for the production setting. The script only uses what every version
since the protocol groundwork has, so an A/B against another checkout is::

    PYTHONPATH=/path/to/other:/path/to/other/server python bench/policy.py

    python bench/policy.py [--rounds 2000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import arg_parser, machine
from pycrdt import Doc, Map

from crdtsync import hlc
from crdtsync.protocol import DocSync, StampedWrite, SyncRequest, SyncResponse
from crdtsync_server.documents import DocumentCache
from crdtsync_server.store import DeviceRecord, SQLiteStore
from crdtsync_server.sync import SyncService

KINDS = ("no-change, stamped", "no-change, old client", "5 keys, stamped",
         "5 keys, old client")


class Bench:
    """One device's document and the requests it sends."""

    def __init__(self, device: str, client_id: int, stamped: bool, keys: int) -> None:
        self.device, self.stamped, self.keys = device, stamped, keys
        self.doc: Doc[Any] = Doc(client_id=client_id)
        self.server_sv = b"\x00"
        self.round = 0

    def request(self) -> SyncRequest:
        self.round += 1
        now = hlc.wall_ms()
        writes = []
        state = self.doc.get("state", type=Map)
        for i in range(self.keys):
            value = self.round * 10 + i
            state[f"k{i}"] = value
            writes.append(StampedWrite("state", f"k{i}", hlc.stamp(now, i), value))
        update = self.doc.get_update(self.server_sv)
        part = DocSync("state", self.doc.get_state(), b"" if update == b"\x00\x00" else update,
                       stamps=tuple(writes) if self.stamped else None)
        return SyncRequest(self.device, (part,), clock=now if self.stamped else None)

    def apply(self, response: SyncResponse) -> None:
        (entry,) = response.docs
        if entry.update:
            self.doc.apply_update(entry.update)
        self.server_sv = entry.sv


async def run(folder: Path, rounds: int, synchronous: str) -> dict[str, tuple[float, float]]:
    """``{kind: (median wall us, CPU us per sync)}`` of one fresh store."""
    async with SQLiteStore(folder / "server.db", synchronous=synchronous) as store:
        service = SyncService(store, DocumentCache(store, 1_000_000))
        benches: dict[str, Bench] = {}
        for n, kind in enumerate(KINDS):
            await store.add_device(DeviceRecord(f"d{n}", f"h{n}", created=1))
            benches[kind] = Bench(f"d{n}", 2_000_000 + n, "stamped" in kind,
                                  5 if kind.startswith("5") else 0)
            if benches[kind].keys == 0:  # a document with content, synced once
                benches[kind].doc.get("state", type=Map).update({"a": 1, "b": "x"})
                await one(service, store, benches[kind], record=True)
        walls: dict[str, list[float]] = {kind: [] for kind in KINDS}
        cpus: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        for _ in range(rounds):
            for kind in KINDS:
                wall, cpu = await one(service, store, benches[kind])
                walls[kind].append(wall)
                cpus[kind] += cpu
        await service.flush_touches()
    return {kind: (statistics.median(walls[kind]) * 1e6, cpus[kind] / rounds * 1e6)
            for kind in KINDS}


async def one(service: SyncService, store: SQLiteStore, bench: Bench, record: bool = False
              ) -> tuple[float, float]:
    """One sync of ``bench``: (wall s, process CPU s) of ``SyncService.sync``."""
    device = await store.get_device(bench.device)
    assert device is not None
    request = bench.request()
    clocks: tuple[Callable[[], float], ...] = (time.perf_counter, time.process_time)
    start = [c() for c in clocks]
    response = await service.sync(device, request)
    wall, cpu = (c() - s for c, s in zip(clocks, start, strict=True))
    bench.apply(response)
    return wall, cpu


async def main(rounds: int, repeat: int, synchronous: str) -> None:
    results: list[dict[str, tuple[float, float]]] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(await run(Path(tmp), rounds, synchronous))
    print(machine(("pycrdt",)))
    print(f"SyncService.sync in process, SQLite synchronous={synchronous}, {rounds} syncs of"
          f" each kind per run, {repeat} runs (median of the run medians; min-max)")
    print()
    print("| sync | wall, us | CPU per sync, us |")
    print("|---|---:|---:|")
    for kind in KINDS:
        walls = [r[kind][0] for r in results]
        cpus = [r[kind][1] for r in results]
        print(f"| {kind} | {statistics.median(walls):,.0f} ({min(walls):,.0f}-"
              f"{max(walls):,.0f}) | {statistics.median(cpus):,.0f} ({min(cpus):,.0f}-"
              f"{max(cpus):,.0f}) |")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--synchronous", default="OFF", choices=["OFF", "NORMAL", "FULL"])
    parser.add_argument("--quick", action="store_true", help="a few rounds (CI smoke test)")
    args = parser.parse_args()
    asyncio.run(main(20 if args.quick else args.rounds, 1 if args.quick else args.repeat,
                     args.synchronous))
