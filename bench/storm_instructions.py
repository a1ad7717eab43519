"""Instructions per reconnect in the isolated reconnect storm, crdtsync against
pycrdt-websocket: the storm's figure that the machine's noise does not move (issue 17).

``bench/storm.py`` times the storm and reads each server's CPU. Their ratio moves with the
machine: the same code read 0.31-0.41x on one AMD EPYC machine and 0.50x on an Intel Xeon
the next day, the peer's work running relatively slower on the first. This script counts
instructions instead. Each server runs under valgrind's callgrind with its instrumentation
off (``--instr-atstart=no``). The same devices as ``storm.py``'s isolated storm are set up
(their prior state synced, their offline edits made, every request built beforehand and
sent on a raw connection). Instrumentation is switched on for the storm only
(``callgrind_control -i on``, then ``off`` once the server is idle again, its closes
handled). The instructions the server executed in that window, every thread, are divided
by the devices. crdtsync's count repeats to 1-2 % (its group commits batch fewer syncs when
the machine is busy, 0.3 % on a quiet one). The peer's moves far more: 4.8-4.9 M in one
session, 5.5-9.1 M in the next with the same versions, mostly its cyclic garbage collector
(whether a full collection of the rooms falls into the counted window): count it several
times (``--only peer``) before reading a ratio.

    python bench/storm_instructions.py [--devices 2000] [--concurrency 500] [--quick]
                                       [--only crdtsync|peer] [--keep DIR] [--write FILE]

``--keep DIR`` keeps callgrind's files (``callgrind_annotate --inclusive=yes`` reads them:
where a reconnect's instructions go, mypyc-compiled functions by name).

Needs ``valgrind`` (``apt-get install valgrind``); about 3 minutes on 2 CPUs (both servers
run about 50 times slower under callgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import storm
from common import Child, machine, report, serve_argv

from crdtsync import crdt

SEED = 6
"""The storm's devices: the client ids of ``storm.py``'s first round with its default seed."""


def under_callgrind(argv: list[str], out: Path) -> list[str]:
    """``argv`` run by callgrind, instrumentation off until switched on, its counts written
    to ``out.<pid>`` (and ``out.<pid>.<n>`` per dump)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p", *argv]


def control(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True,
                   capture_output=True)


@contextlib.contextmanager
def instrumented(pid: int) -> Iterator[None]:
    """Callgrind counts the process ``pid`` inside the block only (then dumps)."""
    control(pid, "-i", "on")
    try:
        yield
    finally:
        control(pid, "-i", "off")
        control(pid, "-d")


def counted(out: Path) -> int:
    """Instructions in every file callgrind wrote for ``out`` (the dump and the exit)."""
    total = 0
    for path in out.parent.glob(out.name + ".*"):
        with path.open(errors="replace") as lines:
            total += next((int(line.split()[1]) for line in lines
                           if line.startswith("totals:")), 0)
    return total


async def idle(server: Child, quiet: float = 0.05, step: float = 0.5) -> None:
    """Wait until ``server`` used less than ``quiet`` CPU seconds over ``step`` s: the storm's
    last closes handled (under callgrind they trail the clients by seconds)."""
    for _ in range(240):
        before = server.cpu()
        await asyncio.sleep(step)
        if server.cpu() - before < quiet:
            return
    raise RuntimeError(f"{server.name} did not go idle after the storm")


def checked(run: storm.Run) -> None:
    if run.errors:
        raise RuntimeError(f"{run.system}: {len(run.errors)} devices failed: {run.errors[:3]}")


async def crdtsync_side(ids: list[int], tmp: Path, concurrency: int, limit: float) -> int:
    """Instructions of ``crdtsync serve`` per device of the storm."""
    out = tmp / "crdtsync.cg"
    argv, env = serve_argv(tmp, db="storm.db")
    server = Child("crdtsync serve", under_callgrind(argv, out), tmp / "crdtsync.log", env)
    await server.start(patience=600)
    try:
        clients = await storm.offline_clients(server.url, ids)
        run = storm.Run("crdtsync", len(ids), isolated=True)
        await idle(server)
        with instrumented(server.pid):
            await storm.raw_crdtsync_storm(run, clients, server, concurrency, limit)
            await idle(server)
        checked(run)
    finally:
        await server.stop(grace=120)
    return counted(out) // len(ids)


async def peer_side(ids: list[int], tmp: Path, concurrency: int, limit: float) -> int:
    """Instructions of the pycrdt-websocket server per device of the storm."""
    out = tmp / "peer.cg"
    clients = [storm.PeerClient(i, f"/storm-{i:05d}", storm.initial_doc(i, cid))
               for i, cid in enumerate(ids)]
    rooms = tmp / "rooms.msgpack"
    storm.write_bytes(rooms, msgpack.packb({c.path: c.doc.get_update() for c in clients}))
    argv = [sys.executable, str(storm.HERE), "--peer-server", str(rooms)]
    server = Child("pycrdt-websocket server", under_callgrind(argv, out), tmp / "peer.log")
    port = int((await server.start(r"READY (\d+)", patience=600)).group(1))
    try:
        held = {c.path: c.doc.get_state() for c in clients}
        for c in clients:
            storm.offline_edits(c.doc, c.index)
        built = {c.path: storm.raw_peer_request(c, port, held[c.path]) for c in clients}

        async def reconnect(c: storm.PeerClient) -> float:
            handshake, frames = built[c.path]
            at, _ = await storm.raw_exchange(port, handshake,
                                             storm.peer_reader(c.doc.client_id, frames),
                                             storm.CLOSE_FRAME)
            return at

        run = storm.Run("pycrdt-websocket", len(ids), isolated=True)
        await idle(server)
        with instrumented(server.pid):
            await storm.storm(run, clients, reconnect, None, server, concurrency, limit)
            await idle(server)
        checked(run)
    finally:
        await server.stop(grace=120)
    return counted(out) // len(ids)


def render(args: argparse.Namespace, ours: int, peer: int) -> str:
    ratio = ours / peer
    verdict = "holds" if ratio <= 1 / 3 else "missed"
    return "\n".join([
        f"Machine: {machine(('pycrdt', 'aiohttp', 'pycrdt-websocket'), model=True)}.",
        f"{args.devices} devices x 20 offline edits, each reconnecting once on a new "
        f"connection, {args.concurrency} at once, requests built beforehand (`storm.py`'s "
        "isolated storm); each server under callgrind, counted from the storm's start until "
        "it is idle again, every thread.",
        "",
        "| | instructions per reconnect |",
        "|---|---:|",
        f"| crdtsync serve | {ours:,} |",
        f"| pycrdt-websocket | {peer:,} |",
        f"| **crdtsync / peer** | **{ratio:.2f}x** (goal <= 0.33: {verdict}) |",
    ])


SIDES = {"crdtsync": crdtsync_side, "peer": peer_side}


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)  # storm.py's first round
    ids = [rng.randrange(1, crdt.MAX_CLIENT_ID + 1) for _ in range(args.devices)]
    with tempfile.TemporaryDirectory(prefix="crdtsync-storm-cg-") as folder:
        tmp = Path(folder)
        counts = {}
        for name, side in SIDES.items():
            if args.only in (None, name):
                (tmp / name).mkdir()
                counts[name] = await side(ids, tmp / name, args.concurrency, args.timeout)
                print(f"{name}: {counts[name]:,} instructions per reconnect", flush=True)
        if args.keep is not None:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.db*", "*.msgpack"))
    if args.only is None:
        report(render(args, counts["crdtsync"], counts["peer"]), args.write,
               "storm-instructions")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600.0, help="per device, seconds")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--quick", action="store_true", help="50 devices (CI smoke)")
    parser.add_argument("--only", choices=sorted(SIDES), help="count one server, print it")
    parser.add_argument("--keep", type=Path, help="copy callgrind's files to this folder")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    args = parser.parse_args()
    if args.only is not None and args.write is not None:
        parser.error("--write needs both servers")
    if args.quick:
        args.devices = 50
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench/storm_instructions.py needs valgrind (apt-get install valgrind)")
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
