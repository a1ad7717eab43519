"""Files both ways (issue 19): throughput against a plain HTTP download, and memory that does
not grow with the file.

A `crdtsync serve` process (SQLite and blobs in a temp folder) and, for the floor, a bare
aiohttp static server in another process (this script with `--static-server`) serving the
same bytes with `web.FileResponse`. Each transfer runs in a fresh child process (this script
with `--child`), so its peak RSS (`ru_maxrss`) is the device's alone:

- up: `Device.send_file` (a copy into the device's store while hashing: timed apart as
  "queue") then `Device.sync_files` (the resumable upload in chunks; the server checks
  each chunk's and the whole file's SHA-256): timed as the transfer;
- down: the file was put for the device through the management API; `Device.sync` then
  `Device.sync_files` (range download into the device's store, SHA-256 checked): timed;
- plain: an aiohttp GET of the same file from the static server, streamed to disk.

Throughput is the median over `--repeat` runs of each; the ratio is crdtsync over plain
(goal >= 0.5). The server's RSS is sampled every 10 ms during each transfer (its peak over
the baseline before); memory is compared between two file sizes, the small and the large.

    python bench/files.py [--sizes 20 100] [--repeat 3] [--chunk BYTES] [--quick]
                          [--write FILE]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from common import (
    ADMIN_TOKEN,
    Child,
    arg_parser,
    machine,
    median,
    provision,
    report,
    rss,
    run_child,
    start_server,
)

from crdtsync import AdminClient, Device

MB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    """``size`` random bytes at ``path``, written 1 MiB at a time."""
    with open(path, "wb") as out:
        for at in range(0, size, MB):
            out.write(os.urandom(min(MB, size - at)))


# --- child processes ------------------------------------------------------------------------


async def child(url: str, device: str, token: str, folder: str, direction: str,
                source: str) -> None:
    """One transfer in this process; prints ``{"queue", "seconds", "maxrss"}``."""
    queue = 0.0
    async with Device(device, url, token=token, path=Path(folder) / "dev.db",
                      interval=None, live=False) as dev:
        if direction == "up":
            started = time.perf_counter()
            await dev.send_file("blob.bin", Path(source))
            queue = time.perf_counter() - started
            started = time.perf_counter()
            await dev.sync_files()
            assert not dev.pending_files, dev.file_errors
        else:
            started = time.perf_counter()
            await dev.sync()
            await dev.sync_files()
            assert "blob.bin" in dev.files, dev.file_errors
        seconds = time.perf_counter() - started
    print(json.dumps({"queue": queue, "seconds": seconds,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


async def plain_child(url: str, dest: str) -> None:
    """A plain aiohttp download of ``url`` streamed to ``dest``."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        with open(dest, "wb") as out:  # noqa: ASYNC230 (as a plain client would)
            async for block in resp.content.iter_chunked(MB):
                out.write(block)
    print(json.dumps({"queue": 0.0, "seconds": time.perf_counter() - started,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def static_server(folder: str) -> None:
    """A bare aiohttp server of the files in ``folder`` (the floor)."""
    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(Path(folder) / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", serve)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the measurement ------------------------------------------------------------------------


class PeakRss:
    """Samples a process's RSS every 10 ms while the block runs; :attr:`peak` is the
    highest reading."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> PeakRss:
        self.peak = rss(self.pid)
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss(self.pid))


async def one_size(size: int, repeat: int, folder: Path, server: Child, static: Child
                   ) -> dict[str, Any]:
    """Every measurement of one file size."""
    source = folder / f"src-{size}.bin"
    make_file(source, size)
    os.link(source, folder / "static" / source.name)
    fresh = folder / f"fresh-{size}.bin"  # new bytes per upload: none is deduplicated
    results: dict[str, list[dict[str, Any]]] = {"up": [], "down": [], "plain": []}
    server_peak = {"up": 0, "down": 0}
    for run in range(repeat):
        tokens = await provision(server.url, [f"u{size}-{run}", f"d{size}-{run}"])
        for direction in ("up", "down"):
            device = f"{direction[0]}{size}-{run}"
            work = folder / f"{device}"
            work.mkdir()
            if direction == "down":
                async with AdminClient(server.url, ADMIN_TOKEN) as admin:
                    await admin.put_file("blob.bin", source, device=device)
            else:
                make_file(fresh, size)
            base = rss(server.pid)
            async with PeakRss(server.pid) as peak:
                results[direction].append(await run_child(
                    __file__, "--child", server.url, device, tokens[device], str(work),
                    direction, str(fresh if direction == "up" else source)))
            server_peak[direction] = max(server_peak[direction], peak.peak - base)
        results["plain"].append(await run_child(
            __file__, "--plain", f"{static.url}/{source.name}", str(folder / "plain.out")))
        (folder / "plain.out").unlink()
    throughput = {k: size / MB / median([r["seconds"] for r in v]) for k, v in results.items()}
    return {"size": size, "throughput": throughput,
            "queue": size / MB / median([r["queue"] for r in results["up"]]),
            "device_rss": {k: max(r["maxrss"] for r in v) for k, v in results.items()},
            "server_rss": server_peak}


def render(rows: list[dict[str, Any]], repeat: int) -> str:
    lines = [f"Machine: {machine(('aiohttp',))}; median of {repeat} runs per figure, "
             "loopback, SQLite server with blobs on the same disk.", "",
             "| file | up (MB/s) | down (MB/s) | plain download (MB/s) | up / plain | "
             "down / plain | queue copy (MB/s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        t = row["throughput"]
        lines.append(f"| {row['size'] // MB} MB | {t['up']:.0f} | {t['down']:.0f} | "
                     f"{t['plain']:.0f} | {t['up'] / t['plain']:.2f}x | "
                     f"{t['down'] / t['plain']:.2f}x | {row['queue']:.0f} |")
    lines += ["", "| file | device peak RSS up | device peak RSS down | plain client peak RSS |"
              " server RSS growth up | server RSS growth down |", "|---|---|---|---|---|---|"]
    for row in rows:
        d, s = row["device_rss"], row["server_rss"]
        lines.append(f"| {row['size'] // MB} MB | {d['up'] / MB:.0f} MB | "
                     f"{d['down'] / MB:.0f} MB | {d['plain'] / MB:.0f} MB | "
                     f"{s['up'] / MB:.1f} MB | {s['down'] / MB:.1f} MB |")
    return "\n".join(lines)


async def bench(sizes: list[int], repeat: int, chunk: int | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "static").mkdir()
        static = Child("static server", [sys.executable, __file__, "--static-server",
                                         str(folder / "static")], folder / "static.log")
        await static.start()
        try:
            flags = ["--file-chunk", str(chunk)] if chunk else []
            async with await start_server(folder, *flags) as server:
                rows = [await one_size(size, repeat, folder, server, static) for size in sizes]
        finally:
            await static.stop()
    return render(rows, repeat)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        asyncio.run(child(*sys.argv[2:8]))
        return
    if sys.argv[1:2] == ["--plain"]:
        asyncio.run(plain_child(*sys.argv[2:4]))
        return
    if sys.argv[1:2] == ["--static-server"]:
        static_server(sys.argv[2])
        return
    parser = arg_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20, 100], metavar="MB",
                        help="the small and the large file, MB (default 20 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure")
    parser.add_argument("--chunk", type=int, metavar="BYTES",
                        help="the server's --file-chunk (default: its default, 4 MiB)")
    parser.add_argument("--quick", action="store_true", help="CI: 2 and 8 MB, one run")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="put the report in the files block of FILE")
    args = parser.parse_args()
    sizes, repeat = ([2, 8], 1) if args.quick else (args.sizes, args.repeat)
    text = asyncio.run(bench([s * MB for s in sizes], repeat, args.chunk))
    report(text, args.write, "files")


if __name__ == "__main__":
    main()
