"""Pipe events from the change feed into your own database (here SQLite), exactly once.

Against a running server, with the admin token::

    python examples/pipe_events.py --url http://127.0.0.1:8787 --token "$CRDTSYNC_ADMIN_TOKEN" \\
        --db readings.db [--topic readings] [--count N]

(``--url`` and ``--token`` may also come from ``CRDTSYNC_URL`` and ``CRDTSYNC_ADMIN_TOKEN``.)
It long-polls ``GET /v1/feed`` for events and writes each page into the table ``readings``
in ONE transaction together with the feed cursor it reached (table ``pipe_cursor``). So a
crash or a Ctrl-C at any point loses nothing and repeats nothing: the next run resumes from
the cursor stored with the last committed rows. The primary key is the event's idempotency
key (``ev:<device>:<seq>``) and rows go in with ``INSERT OR IGNORE``, so an event delivered
twice (another pipe, a restored backup) is still stored once. Stop it with Ctrl-C or
``--count``.

Without ``--url`` it runs on its own, as CI does: it starts a server in this process on a
temporary SQLite file, lets a device emit readings, pipes some of them, stops as if it were
restarted, pipes the rest into the same file, checks that every reading arrived exactly once
and prints ``ok: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from crdtsync import AdminClient, CrdtsyncError, Device
from crdtsync_server import Server, ServerConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    key TEXT PRIMARY KEY,           -- the feed's idempotency key: ev:<device>:<seq>
    device TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,          -- device clock, ms since the epoch
    body TEXT NOT NULL              -- JSON
);
CREATE TABLE IF NOT EXISTS pipe_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cursor TEXT NOT NULL            -- the last feed cursor committed with the rows above
);
"""
WAIT_S = 30
"""Seconds the server may hold a poll while there is nothing new."""


class Destination:
    """The SQLite file the events go to. (Its writes are quick and local, so they run on
    the event loop; a remote database would take an async driver.)"""

    def __init__(self, path: str | Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(SCHEMA)

    def cursor(self) -> str:
        row = self.db.execute("SELECT cursor FROM pipe_cursor WHERE id = 1").fetchone()
        return row[0] if row else "0"

    def store(self, items: list[dict[str, Any]], cursor: int) -> int:
        """Insert ``items`` and move the cursor, in one transaction; returns how many rows
        were new."""
        with self.db:  # commits, or rolls back if anything fails
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?)",
                [(i["key"], i["device"], i["topic"], i["seq"], i["time"],
                  json.dumps(i["body"])) for i in items])
            new = self.db.total_changes - before
            self.db.execute("INSERT OR REPLACE INTO pipe_cursor VALUES (1, ?)", (str(cursor),))
        return new

    def keys(self) -> list[str]:
        return [key for (key,) in self.db.execute("SELECT key FROM readings ORDER BY key")]

    def close(self) -> None:
        self.db.close()


async def pipe(admin: AdminClient, dest: Destination, count: int | None = None,
               topic: str | None = None) -> int:
    """Copy events from the feed into ``dest``, from its stored cursor on, until ``count``
    were received (``None``: forever); returns how many were received."""
    received = 0
    while count is None or received < count:
        limit = 500 if count is None else min(500, count - received)
        try:
            items, cursor = await admin.feed(dest.cursor(), limit, WAIT_S, kind="event",
                                             topic=topic)
        except CrdtsyncError as exc:
            if not exc.retryable:
                raise
            print(f"feed unreachable ({exc.code}); retrying in 5 s", file=sys.stderr)
            await asyncio.sleep(5)
            continue
        if items:
            new = dest.store(items, cursor)
            received += len(items)
            print(f"piped {len(items)} event(s) ({new} new), up to cursor {cursor}")
    return received


async def emit_readings(device: Device, first: int, count: int) -> None:
    for n in range(first, first + count):
        await device.emit("readings", {"kwh": round(0.25 * n, 2)})
    await device.sync()


async def self_contained() -> int:
    """Own server, a device, two pipe runs into one file, then verify."""
    admin_token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(db=str(Path(tmp) / "server.db"), port=0, admin_token=admin_token)
        async with Server(config) as server, AdminClient(server.url, admin_token) as admin:
            print(f"no --url given: started a server on {server.url}")
            token = (await admin.add_device("meter-1"))["token"]
            async with Device("meter-1", server.url, token=token, interval=None,
                              path=Path(tmp) / "meter.db") as device:
                await emit_readings(device, 1, 5)
                dest = Destination(Path(tmp) / "readings.db")
                await pipe(admin, dest, count=3)
                dest.close()
                print("pipe stopped after 3 events (as if restarted); 3 more readings come in")
                await emit_readings(device, 6, 3)
                dest = Destination(Path(tmp) / "readings.db")
                print(f"pipe resumed after cursor {dest.cursor()}")
                await pipe(admin, dest, count=5)
                replayed, _ = await admin.feed(0, 2, kind="event")
                new = dest.store(replayed, int(dest.cursor()))
                print(f"events delivered again: {new} new row(s)")
                keys = dest.keys()
                dest.close()
        expected = sorted(f"ev:meter-1:{n}" for n in range(1, 9))
        if keys != expected:
            print(f"FAILED: expected {expected}, the table holds {keys}")
            return 1
        print(f"ok: {len(keys)} readings piped into SQLite exactly once across a restart")
        return 0


async def connected(args: argparse.Namespace) -> int:
    """Pipe from the server at ``--url`` into ``--db``."""
    token = args.token or os.environ.get("CRDTSYNC_ADMIN_TOKEN")
    if not token:
        print("error: give --token or set CRDTSYNC_ADMIN_TOKEN", file=sys.stderr)
        return 2
    dest = Destination(args.db)
    try:
        async with AdminClient(args.url, token) as admin:
            print(f"piping events into {args.db} from cursor {dest.cursor()}")
            await pipe(admin, dest, args.count, args.topic)
    finally:
        dest.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRDTSYNC_URL"),
                        help="server URL (env CRDTSYNC_URL); none: self-contained run")
    parser.add_argument("--token", help="admin token (env CRDTSYNC_ADMIN_TOKEN)")
    parser.add_argument("--db", default="readings.db", help="SQLite file (default %(default)s)")
    parser.add_argument("--topic", help="only events of this topic")
    parser.add_argument("--count", type=int, help="stop after this many events")
    args = parser.parse_args()
    try:
        return asyncio.run(connected(args) if args.url else self_contained())
    except KeyboardInterrupt:
        return 130  # the last page is either fully stored with its cursor, or not at all


if __name__ == "__main__":
    raise SystemExit(main())
