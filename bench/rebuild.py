"""Server-side size of a device document under alternating writers, with and without
rebuilds (issue 12).

A real server (SQLite in a temp folder, in this process) and a client written from
protocol.md that sends ``a`` (it adopts a new generation; the device library does not yet):
10 keys overwritten ``--overwrites`` times by the device, 1,000 overwrites per sync, and the
cloud overwriting all 10 keys (``PATCH /v1/devices/d1/state``) after each sync. Reported for
rebuilds off (``rebuild_factor=0``) and on (the defaults): the document the server holds in
memory (encoded bytes), the stored log (snapshot + rows), the generation, and the memory one
cached copy costs (RSS of a child process that loads the stored document 50 times, per copy).

    python bench/rebuild.py [--overwrites 300000] [--quick]
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
from common import ADMIN_TOKEN, arg_parser, in_process_server, rss, run_child

from crdtsync import AdminClient, crdt
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    DocSync,
    SyncRequest,
    decode_response,
    encode_request,
)

PER_SYNC = 1000
COPIES = 50


class Client:
    """One document, its generation and the server's last state vector; adopts a new
    generation (it has no local change in flight when it does: it syncs before writing)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.doc = crdt.new_doc(crdt.random_client_id())
        self.gen = 0
        self.server_sv = b"\x00"

    async def sync(self) -> None:
        update = self.doc.get_update(self.server_sv)
        entry = DocSync("state", self.doc.get_state(),
                        b"" if update == b"\x00\x00" else update, self.gen, True)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": MEDIA_TYPE}
        async with self.http.post(self.url + SYNC_PATH, headers=headers,
                                  data=encode_request(SyncRequest("d1", (entry,)))) as resp:
            answer = decode_response(await resp.read()).docs[0]
        if answer.gen != self.gen:
            self.doc = crdt.new_doc(crdt.random_client_id(), answer.update)
            self.gen = answer.gen
        elif answer.update:
            self.doc.apply_update(answer.update)
        self.server_sv = answer.sv


def stored(db: Path) -> tuple[int, int]:
    """(generation, stored bytes: snapshot + rows) of ``d1/state``."""
    with closing(sqlite3.connect(db)) as conn:
        gen, snapshot = conn.execute(
            "SELECT gen, length(snapshot) FROM docs WHERE key = 'd1/state'").fetchone()
        rows = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM updates"
                            " WHERE key = 'd1/state'").fetchone()[0]
    return int(gen), int(snapshot + rows)


async def run(folder: Path, overwrites: int, **config: Any) -> dict[str, Any]:
    async with in_process_server(folder, **config) as server, \
            AdminClient(server.url, ADMIN_TOKEN) as admin, aiohttp.ClientSession() as http:
        client = Client(http, server.url, (await admin.add_device("d1"))["token"])
        started = time.perf_counter()
        for n in range(0, overwrites, PER_SYNC):
            await client.sync()  # adopt first, if the server rebuilt
            with client.doc.transaction():
                for i in range(n, n + PER_SYNC):
                    crdt.write(client.doc, "state", {f"k{i % 10}": i})
            await client.sync()
            await admin.patch_state("d1", {f"k{k}": -n for k in range(10)})
        elapsed = time.perf_counter() - started
        docs = server.services.docs
        live = await docs.get("d1/state")
        held = len(live.doc.get_update())
        fresh = len(crdt.rebuilt(live.doc, 1).get_update())
        rebuilds = docs.rebuilds
    gen, size = stored(folder / "server.db")
    per_copy = await run_child(__file__, "--child-probe", str(folder / "server.db"))
    return {"held": held, "fresh": fresh, "stored": size, "gen": gen, "rebuilds": rebuilds,
            "copy_rss": per_copy, "seconds": elapsed}


def probe(db: str) -> None:
    """Print the RSS one loaded copy of the stored document costs (JSON)."""
    with closing(sqlite3.connect(db)) as conn:
        snapshot = conn.execute("SELECT snapshot FROM docs WHERE key = 'd1/state'").fetchone()[0]
        rows = [r[0] for r in conn.execute(
            "SELECT data FROM updates WHERE key = 'd1/state' ORDER BY id")]
    before = rss()
    copies = [crdt.new_doc(i + 1, snapshot, rows) for i in range(COPIES)]
    print(json.dumps((rss() - before) / len(copies)))


async def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--overwrites", type=int, default=300_000)
    parser.add_argument("--quick", action="store_true", help="10,000 overwrites")
    parser.add_argument("--child-probe", metavar="DB")
    args = parser.parse_args()
    if args.child_probe:
        probe(args.child_probe)
        return
    if args.quick:
        args.overwrites = 10_000
    print(f"{args.overwrites:,} overwrites of 10 keys, {PER_SYNC:,} per sync, the cloud"
          " overwriting all 10 after each sync")
    print("| rebuilds | server doc in memory (encoded) | fresh doc | stored log | generation"
          " | RSS per cached copy | run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, config in (("off", {"rebuild_factor": 0}), ("on (defaults)", {})):
        with tempfile.TemporaryDirectory() as tmp:
            r = await run(Path(tmp), args.overwrites, **config)
        print(f"| {name} | {r['held']:,} B | {r['fresh']:,} B | {r['stored']:,} B | {r['gen']}"
              f" | {r['copy_rss'] / 1024:,.0f} KB | {r['seconds']:.1f} s |")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
