"""What the benchmark scripts of bench/ share (not a benchmark: ``bench/run.py`` skips it).

- the machine line every report starts with (:func:`machine`);
- figures: :func:`median`, :func:`percentile`, :func:`spread`, :func:`summary_ms`;
- the report and its generated block of docs/benchmarks.md (:func:`report`,
  :func:`write_block`); argument parsing (:func:`arg_parser`, :func:`add_encoding_option`);
- servers: in this process (:func:`in_process_server`) or ``crdtsync serve`` in a
  subprocess on a free port (:func:`start_server`, :func:`serve_argv`; with benchmark knobs
  through ``bench/_serve.py``);
- subprocesses (:class:`Child`: output to a log file, ready once it matches a pattern, stopped
  at exit, on SIGTERM with :func:`exit_on_sigterm`, and when this process dies), helper
  processes that print one JSON line (:func:`run_child`), server profiles
  (:func:`print_profile`);
- the admin API (:func:`provision`, :func:`check_last_seq`); bounded concurrency
  (:func:`gather_limited`);
- requests as the reference client sends them (:func:`headers`, :func:`compress`,
  :func:`client_session`, :func:`post_sync`), and the CPU servers, their database and the
  load used during a span (:class:`CpuMeter`);
- SQLite: the CREATE statements of a server database's tables (:func:`table_schema`);
- PostgreSQL: a fresh schema dropped afterwards (:func:`postgres_schema`), the CPU of the
  backends serving it (:class:`PgBackends`);
- memory: :func:`rss`, :func:`settled_rss`, :func:`files_size`, and allocation sites between
  two ``tracemalloc`` snapshots (:func:`remember_sources`, :func:`top_sites`,
  :func:`traced_bytes`).

The scripts import it as ``common`` (their folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import linecache
import math
import os
import platform
import re
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import aiohttp
import psutil

from crdtsync import AdminClient, transport
from crdtsync.protocol import decode_error

if TYPE_CHECKING:
    from crdtsync_server import Server

T = TypeVar("T")
BENCH = Path(__file__).resolve().parent
ADMIN_TOKEN = "bench-admin"
"""The admin token of every server a benchmark starts."""
LISTENING = r"listening on (http://[\d.]+:(\d+))"
"""What ``crdtsync serve`` prints once it accepts connections: its URL and port."""
GRACE_ENV = "CRDTSYNC_BENCH_RETIRE_GRACE"
PROFILE_ENV = "CRDTSYNC_BENCH_PROFILE"
SAMPLE_ENV = "CRDTSYNC_BENCH_SAMPLE"
SQL_STATS_ENV = "CRDTSYNC_BENCH_SQL_STATS"
SERVER_TREE_ENV = "CRDTSYNC_BENCH_SERVER_TREE"
"""A checkout whose ``crdtsync`` and ``crdtsync_server`` the benchmark's servers run (the
load generator and the floor stay this checkout's): how one harness measures several
commits."""
"""Read by ``bench/_serve.py`` in a benchmark's server subprocess, nowhere else."""


# --- the machine ----------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def nproc() -> int:
    """CPUs this process may run on (``nproc``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def fs_type(path: str) -> str:
    """The file system type of ``path`` (longest matching mount point), or ``?``."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def machine(libs: Sequence[str] = ("pycrdt", "aiohttp"), *, sqlite: bool = True,
            model: bool = False, temp_dir: bool = False, sep: str = ", ") -> str:
    """One line: CPUs (with their ``model``), Python, whether crdtsync's hot path runs
    compiled (``crdtsync._compiled``), SQLite, the versions of ``libs`` (after ``sep``) and,
    with ``temp_dir``, the file system of the temp folder."""
    name = cpu_model() if model else ""
    line = (f"{nproc()} CPUs (nproc){f' ({name})' if name else ''}, "
            f"Python {platform.python_version()} ({server_build()})")
    if sqlite:
        line += f", SQLite {sqlite3.sqlite_version}"
    if libs:
        line += sep + ", ".join(f"{lib} {version(lib)}" for lib in libs)
    if temp_dir:
        tmp = tempfile.gettempdir()
        line += f"; temp dir {tmp} on {fs_type(tmp)}"
    return line


def server_build(tree: str | None = None) -> str:
    """Whether the server's hot path runs compiled: this checkout's, or with ``tree`` (default
    ``$CRDTSYNC_BENCH_SERVER_TREE``) that checkout's, asked of a Python started as its
    server is (:func:`serve_argv`), and named."""
    tree = tree or os.environ.get(SERVER_TREE_ENV)
    if not tree:
        from crdtsync import _compiled
        compiled = _compiled.active()
    else:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "server")]))
        asked = subprocess.run(
            [sys.executable, "-c", "import crdtsync._compiled as c; print(c.active())"],
            env=env, cwd=tree, capture_output=True, text=True, timeout=60)
        compiled = asked.stdout.strip() == "True"
    build = "hot path compiled with mypyc" if compiled else "no mypyc"
    return f"{build}; server of {tree}" if tree else build


# --- figures --------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) by rank: the value below which ``int(n * q)`` values lie;
    NaN for no values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else math.nan


def _fmt(value: float, fmt: str) -> str:
    return fmt.format(value) if "{" in fmt else format(value, fmt)


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)``, or just the median of one value. ``fmt`` is a ``str.format``
    pattern (``"{:.1f}"``) or a format spec (``".1f"``)."""
    text = _fmt(median(values), fmt)
    if len(values) > 1:
        text += f" ({_fmt(min(values), fmt)}-{_fmt(max(values), fmt)})"
    return text


def summary_ms(samples: Sequence[float]) -> str:
    """``median X ms, p99 Y ms (n=N)`` of durations in seconds."""
    ms = [s * 1000 for s in samples]
    return f"median {median(ms):.3f} ms, p99 {percentile(ms, 0.99):.3f} ms (n={len(ms)})"


# --- docs/benchmarks.md ---------------------------------------------------------------------


def write_block(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``
    (nothing else), or exit with an error if the markers are missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    if begin not in doc or end not in doc:
        sys.exit(f"{path} has no {begin} ... {end} block to replace")
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    path.write_text(re.sub(pattern, lambda _: f"{begin}\n{text}\n{end}", doc, count=1,
                           flags=re.S))
    print(f"wrote the {name} block of {path}")


def report(text: str, path: Path | None, name: str) -> None:
    """Print a benchmark's report (after a blank line) and, given ``path`` (its ``--write``),
    put it in the ``name`` block of that file."""
    print()
    print(text)
    if path is not None:
        write_block(path, name, text)


# --- concurrency and the admin API ----------------------------------------------------------


async def gather_limited(items: Iterable[T], fn: Callable[[T], Awaitable[Any]], limit: int
                         ) -> list[Any]:
    """``fn(item)`` for every item, at most ``limit`` at a time; the results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(item: T) -> Any:
        async with sem:
            return await fn(item)

    return await asyncio.gather(*(one(i) for i in items))


async def provision(url: str, ids: Iterable[str], parallel: int = 8) -> dict[str, str]:
    """Provision the devices ``ids`` through the admin API; returns ``{id: token}``."""
    async with AdminClient(url, ADMIN_TOKEN) as admin:
        async def one(device_id: str) -> tuple[str, str]:
            return device_id, (await admin.add_device(device_id))["token"]

        return dict(await gather_limited(ids, one, parallel))


async def check_last_seq(url: str, expected: dict[str, int]) -> None:
    """Every acknowledged event is stored: the server's ``last_seq`` of each device is the
    seq expected of it (``{id: seq}``), else RuntimeError."""
    async with AdminClient(url, ADMIN_TOKEN) as admin:
        for device_id, seq in expected.items():
            stored = (await admin.device(device_id))["last_seq"]
            if stored != seq:
                raise RuntimeError(f"{device_id}: server last_seq {stored}, expected {seq}")


# --- requests as the reference client sends them -------------------------------------------


SKIP_HEADERS = transport.SKIP_AUTO_HEADERS
"""Request headers aiohttp adds by itself that the reference client leaves out (pass as an
``aiohttp.ClientSession``'s ``skip_auto_headers``)."""
headers = transport.request_headers
"""The request headers of the reference client."""


def compress(body: bytes, encoding: str) -> bytes:
    """``body`` as sent with ``Content-Encoding: encoding`` (the reference client's levels)."""
    if encoding == "deflate":
        return zlib.compress(body, 6)
    if encoding == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=3).compress(body))
    return body


def client_session(limit: int, timeout: float) -> aiohttp.ClientSession:
    """A load generator's session: at most ``limit`` connections, ``timeout`` s per request,
    no request header the reference client leaves out."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=timeout),
                                 skip_auto_headers=SKIP_HEADERS)


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, with ``doc`` (its docstring) as written for ``--help``."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_encoding_option(parser: argparse.ArgumentParser) -> None:
    """``--encoding identity|deflate|zstd``: the ``Content-Encoding`` of request bodies."""
    parser.add_argument("--encoding", choices=["identity", "deflate", "zstd"],
                        default="identity", help="Content-Encoding of request bodies")


async def post_sync(session: aiohttp.ClientSession, url: str, body: bytes,
                    request_headers: dict[str, str]) -> bytes:
    """``POST`` a sync request to ``url`` (the server's sync URL); the response body, or the
    server's error raised."""
    async with session.post(url, data=body, headers=request_headers,
                            skip_auto_headers=SKIP_HEADERS) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise decode_error(raw, resp.status)
    return raw


# --- CPU use during a span ------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU seconds the machine's processes used so far (user, nice and system time of every
    CPU; interrupt handling, such as loopback TCP in softirq, and steal are left out)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system)


@dataclass
class CpuUse:
    """CPU used during a span, in % of one CPU: the servers' event-loop threads, their other
    threads, the database's processes serving them (:class:`PgBackends`; 0 for SQLite),
    this process (the load generator) and every other process of the machine."""

    server_main: float = 0.0
    server_other: float = 0.0
    load: float = 0.0
    others: float = 0.0
    database: float = 0.0

    @property
    def server(self) -> float:
        """All threads of the servers."""
        return self.server_main + self.server_other


class CpuMeter:
    """``meter = CpuMeter(servers)`` ... ``use = meter.stop()``; the span lasted
    ``meter.seconds`` (wall time, from ``meter.t0``, a ``perf_counter()``). ``servers``: one
    server process or several (their CPU summed); ``database``: a reading of the database's
    CPU seconds so far (:meth:`PgBackends.seconds`), left out of ``others``."""

    def __init__(self, servers: Child | Sequence[Child],
                 database: Callable[[], float] | None = None) -> None:
        self.servers = [servers] if isinstance(servers, Child) else list(servers)
        self.database = database or (lambda: 0.0)
        self.me = psutil.Process()
        self.start = (self._server_cpu(), self.database(), self.me.cpu_times(),
                      busy_seconds())
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def _server_cpu(self) -> tuple[float, float]:
        threads = [s.thread_cpu() for s in self.servers]
        return sum(m for m, _ in threads), sum(o for _, o in threads)

    def stop(self) -> CpuUse:
        self.seconds = time.perf_counter() - self.t0
        (main0, other0), db0, me0, busy0 = self.start
        main1, other1 = self._server_cpu()
        db1, me1, busy1 = self.database(), self.me.cpu_times(), busy_seconds()
        load = me1.user + me1.system - me0.user - me0.system
        server = main1 - main0 + other1 - other0
        others = max(0.0, busy1 - busy0 - load - server - (db1 - db0))
        return CpuUse(*(100 * x / self.seconds for x in (main1 - main0, other1 - other0, load,
                                                         others, db1 - db0)))


# --- PostgreSQL -----------------------------------------------------------------------------


POSTGRES_URL = os.environ.get("CRDTSYNC_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/test")
"""The database of the PostgreSQL benchmarks (the tests' one; CI runs it)."""


@contextlib.asynccontextmanager
async def postgres_schema(base: str = POSTGRES_URL, prefix: str = "bench"
                          ) -> AsyncIterator[tuple[str, str]]:
    """A fresh PostgreSQL schema ``<prefix>_<random>`` as ``(store URL, schema)`` (the URL:
    ``base?schema=NAME``, created by the first server that opens it); dropped afterwards."""
    import asyncpg

    schema = f"{prefix}_{secrets.token_hex(5)}"
    try:
        yield f"{base}?schema={schema}", schema
    finally:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


class PgBackends:
    """The CPU of the PostgreSQL backend processes serving the crdtsync stores of one schema
    (``pg_stat_activity.application_name`` is ``crdtsync.<schema>``: the pooled connections
    and the ``LISTEN`` one), read from ``/proc`` (the database runs on this machine).

    :meth:`refresh` (async) finds the current backends; :meth:`seconds` is the CPU they used
    so far: a backend seen by a refresh counts its whole life, one that has exited since
    keeps its last reading. Refresh just before a span starts and before it ends, so a
    backend opened during the span counts too. PostgreSQL's shared processes (WAL writer,
    checkpointer, background writer) are left out."""

    def __init__(self, base: str, schema: str) -> None:
        self.base = base
        self.application_name = f"crdtsync.{schema}"
        self.last: dict[int, float] = {}
        self.procs: dict[int, psutil.Process] = {}

    async def refresh(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.base)
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity"
                                    " WHERE application_name = $1", self.application_name)
        finally:
            await conn.close()
        for row in rows:
            pid = int(row["pid"])
            if pid not in self.procs:
                with contextlib.suppress(psutil.Error):
                    self.procs[pid] = psutil.Process(pid)
        self.seconds()

    @property
    def count(self) -> int:
        """Backends seen so far."""
        return len(self.procs)

    async def waits(self, stop: asyncio.Event, every: float = 0.05) -> dict[str, float]:
        """Until ``stop`` is set, look at what the backends do every ``every`` s; the mean
        number of them per look that were ``lock`` (waiting for a lock: on crdtsync's
        commits, the advisory lock that orders cursors), ``server`` (in a transaction,
        waiting for the crdtsync server's next statement), ``running`` (running a
        statement, or waiting for I/O) and ``idle`` (no transaction open)."""
        import asyncpg

        seen = {"lock": 0, "server": 0, "running": 0, "idle": 0}
        looks = 0
        conn = await asyncpg.connect(self.base)
        try:
            while not stop.is_set():
                for row in await conn.fetch(
                        "SELECT state, wait_event_type FROM pg_stat_activity"
                        " WHERE application_name = $1", self.application_name):
                    kind = ("lock" if row["wait_event_type"] == "Lock" else
                            "running" if row["state"] == "active" else
                            "server" if str(row["state"]).startswith("idle in transaction")
                            else "idle")
                    seen[kind] += 1
                looks += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
        finally:
            await conn.close()
        return {kind: n / max(looks, 1) for kind, n in seen.items()}

    def seconds(self) -> float:
        for pid, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                self.last[pid] = float(times.user + times.system)
        return sum(self.last.values())


# --- SQLite ---------------------------------------------------------------------------------


def table_schema(db: Path, tables: Sequence[str]) -> list[str]:
    """The CREATE statements of ``tables`` of the SQLite database ``db`` and of their
    indexes (tables first, in the order given), read without writing; a missing table
    raises RuntimeError."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: list[str] = []
        for table in tables:
            rows = conn.execute("SELECT sql FROM sqlite_master WHERE tbl_name = ?"
                                " AND type IN ('table', 'index') AND sql IS NOT NULL"
                                " ORDER BY type = 'index'", (table,)).fetchall()
            if not rows:
                raise RuntimeError(f"{db} has no {table} table")
            out += [sql for (sql,) in rows]
    finally:
        conn.close()
    return out


# --- memory ---------------------------------------------------------------------------------


def files_size(folder: Path, pattern: str) -> int:
    """Bytes of the files of ``folder`` matching ``pattern`` (``server.db*``: with its WAL)."""
    return sum(p.stat().st_size for p in folder.glob(pattern))


def rss(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (this one by default), bytes."""
    return int(psutil.Process(pid).memory_info().rss)


async def settled_rss(pid: int, settle: float, readings: int = 3, gap: float = 0.1) -> int:
    """RSS of ``pid`` after ``settle`` seconds: the median of ``readings`` readings."""
    await asyncio.sleep(settle)
    values = []
    for i in range(readings):
        if i:
            await asyncio.sleep(gap)
        values.append(rss(pid))
    return int(statistics.median(values))


def remember_sources(pattern: str = r"crdtsync|pycrdt") -> None:
    """Read the source of the loaded modules whose file matches ``pattern`` into
    ``linecache`` now, so the source lines shown match the code that ran even if a file is
    edited meanwhile."""
    for module in list(sys.modules.values()):
        filename = getattr(module, "__file__", None) or ""
        if re.search(pattern, filename):
            linecache.getlines(filename)


def top_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, per: int, *,
              ours: str = r"crdtsync|pycrdt",
              short: str = r".*/((?:crdtsync_server|crdtsync|pycrdt|aiohttp|asyncio)/)",
              limit: int = 8) -> list[tuple[str, str, float, float]]:
    """The biggest growths from ``before`` to ``after`` as (site, its source line, bytes per
    item, blocks per item), grouped by the innermost frame whose file matches ``ours`` (else
    the innermost frame); a site's path is cut to ``short``'s first group onwards."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for stat in after.compare_to(before, "traceback"):
        frames = list(stat.traceback)
        if not frames:
            continue
        frame = ([f for f in frames if re.search(ours, f.filename)] or frames)[-1]
        path = re.sub(short, r"\1", frame.filename)
        site = (f"{path}:{frame.lineno}",
                linecache.getline(frame.filename, frame.lineno).strip()[:70])
        acc = grouped.setdefault(site, [0, 0])
        acc[0] += stat.size_diff
        acc[1] += stat.count_diff
    ranked = sorted(grouped.items(), key=lambda kv: -kv[1][0])[:limit]
    return [(site, code, size / per, count / per) for (site, code), (size, count) in ranked]


def traced_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Python-visible bytes in a ``tracemalloc`` snapshot."""
    return sum(s.size for s in snapshot.statistics("filename"))


# --- servers -------------------------------------------------------------------------------


def in_process_server(folder: Path, db: str = "server.db", **config: Any) -> Server:
    """A server in this process (use ``async with``) on SQLite ``folder/db``, on a free port,
    with the admin token :data:`ADMIN_TOKEN` and ``config`` (``ServerConfig`` fields)."""
    from crdtsync_server import Server, ServerConfig

    return Server(ServerConfig(db=str(folder / db), port=0, admin_token=ADMIN_TOKEN,
                               **config))


# --- subprocesses ---------------------------------------------------------------------------


_LIVE: list[Child] = []
"""Every child started and not yet stopped: stopped at exit at the latest."""


def _stop_all() -> None:
    for child in list(_LIVE):
        child.stop_now()


atexit.register(_stop_all)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks (and the exit handler) stop the
    children."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the benchmark process dies, even by
    SIGKILL (Linux; elsewhere the exit handler is the only cleanup)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """A subprocess whose stdout and stderr go to the file ``log``; ready once that output
    matches a pattern. Stopped by :meth:`stop`, at exit, and when this process dies."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.url = ""
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc is not None and self.proc.stdin is not None
        return self.proc.stdin

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def launch(self, stdin: bool = False) -> None:
        """Start the process (see :meth:`start`)."""
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                env={**os.environ, **self.env} if self.env else None,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        _LIVE.append(self)
        self.ps = psutil.Process(self.proc.pid)

    async def start(self, ready: str = LISTENING, patience: float = 30.0,
                    stdin: bool = False) -> re.Match[str]:
        """Launch and wait up to ``patience`` s for ``ready`` in the output; its match (for
        :data:`LISTENING`, also ``url`` and ``port``). With ``stdin``, a pipe to write to."""
        self.launch(stdin)
        assert self.proc is not None
        deadline = time.monotonic() + patience
        while True:
            match = re.search(ready, self.output())
            if match:
                if ready == LISTENING:
                    self.url, self.port = match.group(1), int(match.group(2))
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop_now()
                raise RuntimeError(f"{self.name} did not start (exit {code}):\n{self.tail()}")
            await asyncio.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds (user + system) the child used so far; 0 once it is gone."""
        if self.ps is None:
            return 0.0
        try:
            times = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def thread_cpu(self) -> tuple[float, float]:
        """(CPU seconds of the main thread, CPU seconds of the other threads) so far."""
        assert self.ps is not None
        main = other = 0.0
        for t in self.ps.threads():
            if t.id == self.ps.pid:
                main += t.user_time + t.system_time
            else:
                other += t.user_time + t.system_time
        return main, other

    def _terminate(self) -> subprocess.Popen[bytes] | None:
        proc, self.proc = self.proc, None
        if self in _LIVE:
            _LIVE.remove(self)
        if proc is None or proc.poll() is not None:
            return None
        proc.terminate()
        return proc

    def _report(self, code: int | None) -> None:
        if code not in (0, None, -signal.SIGTERM, 143):
            print(f"warning: {self.name} exited with {code}:\n{self.tail(1500)}",
                  file=sys.stderr)

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
        proc = self._terminate()
        if proc is None:
            return
        for _ in range(int(grace / 0.02)):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        self._report(proc.wait())

    def stop_now(self, grace: float = 10.0) -> None:
        """:meth:`stop` without an event loop (at exit)."""
        proc = self._terminate()
        if proc is None:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_argv(folder: Path, *flags: str, db: str = "server.db",
               grace: float | None = None, profile: Path | None = None,
               database: str | None = None, sample: Path | None = None,
               sql_stats: Path | None = None, tree: str | None = None
               ) -> tuple[list[str], dict[str, str]]:
    """Command line and extra environment of ``crdtsync serve`` on SQLite ``folder/db`` (or
    on the ``database`` URL, a PostgreSQL one say), on a
    free port, with the admin token :data:`ADMIN_TOKEN` and ``flags``. With ``grace`` (the
    seconds an LRU-evicted document keeps its observers, ``RETIRE_GRACE``) or ``profile`` (a
    file for cProfile stats), through ``bench/_serve.py``: benchmark knobs, no product code
    changed. ``tree``: the checkout whose server runs (default: ``$CRDTSYNC_BENCH_SERVER_TREE``,
    else this one)."""
    env: dict[str, str] = {}
    if grace is not None:
        env[GRACE_ENV] = f"{grace:g}"
    if profile is not None:
        env[PROFILE_ENV] = str(profile)
    if sample is not None:
        env[SAMPLE_ENV] = str(sample)
    if sql_stats is not None:
        env[SQL_STATS_ENV] = str(sql_stats)
    tree = tree or os.environ.get(SERVER_TREE_ENV)
    if tree:  # that checkout's server, this checkout's harness (per-commit comparisons)
        env["PYTHONPATH"] = os.pathsep.join([tree, os.path.join(tree, "server")])
    prefix = ([sys.executable, str(BENCH / "_serve.py")] if env
              else [sys.executable, "-m", "crdtsync"])
    return [*prefix, "serve", "--db", database or str(folder / db), "--port", "0",
            "--admin-token",
            ADMIN_TOKEN, "--log-level", "warning", *flags], env


async def start_server(folder: Path, *flags: str, name: str = "crdtsync serve",
                       db: str = "server.db", grace: float | None = None,
                       profile: Path | None = None, patience: float = 30.0,
                       database: str | None = None, sample: Path | None = None,
                       sql_stats: Path | None = None, tree: str | None = None) -> Child:
    """``crdtsync serve`` (see :func:`serve_argv`) started and accepting connections; its
    output in ``folder/<db>.log``. Stop it with ``await server.stop()`` (or ``async with``)."""
    argv, env = serve_argv(folder, *flags, db=db, grace=grace, profile=profile,
                           database=database, sample=sample, sql_stats=sql_stats, tree=tree)
    server = Child(name, argv, folder / f"{db}.log", env)
    await server.start(patience=patience)
    return server


async def run_child(script: str | Path, *args: str, env: dict[str, str] | None = None,
                    what: str = "child") -> Any:
    """Run ``python script args`` to its end, its output captured; the JSON value of the
    last line it printed (None if it printed nothing). Raises if it fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **env} if env else None)
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode})")
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


class SqlStats:
    """CPU time of every SQL statement a process runs through ``sqlite3``, by statement.

    :meth:`install` makes every later ``sqlite3.connect`` of the process return a connection
    whose ``execute`` and ``executemany`` add the calling thread's CPU time
    (``time.thread_time``) and a count to the statement's entry: SQLite's work on that
    thread (parsing is cached; the statement runs while the GIL is released, still on the
    thread), plus about a microsecond of wrapper. ``executescript`` and cursors' own
    ``execute`` are not counted (the store uses neither on its hot path)."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        """``{statement: [calls, cpu seconds]}``; the text with its whitespace collapsed."""

    def install(self) -> None:
        stats = self.stats

        def timed(method: Callable[..., Any], prefix: str) -> Callable[..., Any]:
            def run(conn: sqlite3.Connection, sql: str, *args: Any) -> Any:
                start = time.thread_time()
                try:
                    return method(conn, sql, *args)
                finally:
                    entry = stats.setdefault(prefix + " ".join(sql.split()), [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.thread_time() - start
            return run

        class Timed(sqlite3.Connection):
            execute = timed(sqlite3.Connection.execute, "")  # type: ignore[assignment]
            executemany = timed(sqlite3.Connection.executemany,  # type: ignore[assignment]
                                "many: ")

        original = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            kwargs.setdefault("factory", Timed)
            return original(*args, **kwargs)

        sqlite3.connect = connect  # type: ignore[assignment]

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.stats))

    @staticmethod
    def load(path: Path) -> dict[str, list[float]]:
        loaded: dict[str, list[float]] = json.loads(path.read_text())
        return loaded


def sql_kind(statement: str) -> str:
    """A statement's short name for a report: its verb and table (``INSERT feed``,
    ``SELECT devices``), or its first words (``COMMIT``, ``PRAGMA data_version``)."""
    words = statement.removeprefix("many: ").replace("(", " ").split()
    verb = words[0].upper() if words else ""
    after = {"INSERT": "INTO", "SELECT": "FROM", "UPDATE": "UPDATE", "DELETE": "FROM"}
    if verb in after and after[verb] in (w.upper() for w in words):
        upper = [w.upper() for w in words]
        table = words[upper.index(after[verb]) + 1] if verb != "UPDATE" else words[1]
        return f"{verb} {table}"
    return " ".join(words[:2])


def sql_per_sync(stats: dict[str, list[float]], syncs: int) -> dict[str, tuple[float, float]]:
    """``{kind: (calls per sync, µs of CPU per sync)}`` of ``stats`` over ``syncs`` syncs."""
    out: dict[str, list[float]] = {}
    for statement, (calls, cpu) in stats.items():
        entry = out.setdefault(sql_kind(statement), [0.0, 0.0])
        entry[0] += calls
        entry[1] += cpu
    return {kind: (calls / syncs, cpu * 1e6 / syncs) for kind, (calls, cpu) in out.items()}


def print_samples(path: Path, top: int = 40) -> None:
    """The sampling profile a server under ``bench/_serve.py`` wrote (``CRDTSYNC_BENCH_SAMPLE``):
    each function's inclusive share of the samples where the event loop was busy, and how
    many samples found it waiting in ``select`` (its idle time and the other threads' CPU)."""
    import pickle
    samples: dict[tuple[tuple[str, str], ...], int] = pickle.loads(path.read_bytes())
    total = sum(samples.values())
    waiting = sum(n for stack, n in samples.items() if stack and stack[0][1] == "select")
    busy = total - waiting
    inclusive: Counter[str] = Counter()
    for stack, n in samples.items():
        if stack and stack[0][1] == "select":
            continue
        for name in {f"{Path(file).parent.name}/{Path(file).name}:{fn}" for file, fn in stack}:
            inclusive[name] += n
    print(f"{total:,} samples: loop busy {busy:,}, waiting in select {waiting:,}")
    for name, n in inclusive.most_common(top):
        print(f"{n * 100 / max(busy, 1):6.1f} %  {name}")


def print_profile(path: Path, top: int = 25) -> None:
    """The cProfile stats a server under ``bench/_serve.py`` wrote (``path``: its main
    thread, ``path.threads``: the others), top functions by own and cumulative time."""
    import pstats

    for name, file in (("event-loop thread", path), ("other threads", Path(f"{path}.threads"))):
        if not file.exists():
            print(f"\n(no profile of the {name}: {file} is missing)")
            continue
        stats = pstats.Stats(str(file))
        stats.strip_dirs()
        for key in ("tottime", "cumulative"):
            print(f"\n--- server profile, {name}, top {top} by {key} ---")
            stats.sort_stats(key).print_stats(top)
