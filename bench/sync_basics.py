"""Basic sync figures: round-trip time on loopback, bytes of a no-change sync, bytes per event.

Runs a real server (SQLite in a temp folder) and one device in this process. The ceiling for
the round trip is a bare aiohttp handler answering the same bytes, measured in the same run,
so the ratio stays meaningful on a noisy machine.

    python bench/sync_basics.py [--rounds 300] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from common import in_process_server, provision, summary_ms

from crdtsync import Device
from crdtsync.transport import HttpTransport


async def bare_ceiling(request_body: bytes, response_body: bytes, rounds: int) -> list[float]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=response_body, content_type="application/vnd.crdtsync+msgpack")

    app = web.Application()
    app.router.add_post("/v1/sync", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    samples = []
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            start = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/v1/sync", data=request_body) as r:
                await r.read()
            samples.append(time.perf_counter() - start)
    await runner.cleanup()
    return samples


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with in_process_server(Path(tmp), "s.db") as server:
            token = (await provision(server.url, ["bench-1"]))["bench-1"]
            async with Device("bench-1", server.url, token=token, path=Path(tmp) / "d.db",
                              interval=None) as dev:
                dev.state.update({"voltage": 3.71, "temp": 21.5, "fw": "1.0.0"})
                await dev.sync()
                # no-change sync: bytes and time
                samples = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    report = await dev.sync()
                    samples.append(time.perf_counter() - start)
                no_change_up = report.bytes_up
                print(f"no-change sync request body:  {report.bytes_up} bytes")
                print(f"no-change sync response body: {report.bytes_down} bytes")
                print(f"no-change sync round trip:     {summary_ms(samples)}")
                # one state change per sync
                change = []
                for i in range(rounds):
                    dev.state["voltage"] = 3.0 + i / 1000
                    start = time.perf_counter()
                    await dev.sync()
                    change.append(time.perf_counter() - start)
                print(f"1-key change sync round trip:  {summary_ms(change)}")
                # bytes per event
                for batch in (1, 10, 100, 500):
                    for i in range(batch):
                        await dev.emit("readings", {"temp": 21.5 + i % 7 / 10, "hum": 40,
                                                    "voltage": 3.71, "ts": 1764000000 + i,
                                                    "motion": False})
                    transport = dev._transport
                    assert isinstance(transport, HttpTransport)
                    before = transport.wire_bytes_up
                    report = await dev.sync()
                    per_event = (report.bytes_up - no_change_up) / batch
                    wire = (transport.wire_bytes_up - before - no_change_up) / batch
                    print(f"{batch:>4} events in one sync: {report.bytes_up} message bytes up, "
                          f"{per_event:.1f} bytes/event; on the wire (compressed when smaller) "
                          f"{wire:.1f} bytes/event")
        ceiling = await bare_ceiling(b"x" * no_change_up, b"y" * report.bytes_down, rounds)
        print(f"bare aiohttp ceiling (same sizes): {summary_ms(ceiling)}")
        ratio = statistics.median(samples) / statistics.median(ceiling)
        print(f"no-change sync / bare aiohttp handler: {ratio:.2f}x the time")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a few rounds (CI smoke test)")
    args = parser.parse_args()
    asyncio.run(main(10 if args.quick else args.rounds))
