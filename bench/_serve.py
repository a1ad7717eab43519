"""The ``crdtsync`` command line in a benchmark's server subprocess, with benchmark knobs.

    CRDTSYNC_BENCH_RETIRE_GRACE=1 python bench/_serve.py serve ...

Started by ``common.start_server`` when a benchmark asks for a knob (never otherwise; no
product code changes):

- ``CRDTSYNC_BENCH_RETIRE_GRACE=S``: ``crdtsync_server.documents.RETIRE_GRACE``, the seconds a
  document evicted from the cache by LRU keeps its observers for a sync still holding it
  before the idle sweep closes it (60 s in the product), so that a benchmark need not wait a
  minute to see evicted documents leave memory;
- ``CRDTSYNC_BENCH_PROFILE=OUT``: run under cProfile; the main thread's stats go to ``OUT``,
  those of every other thread (the SQLite store's, ...) merged into ``OUT.threads``
  (``python -m cProfile`` sees the main thread only). Times are each thread's CPU time
  (``time.thread_time``), not wall time: a thread waiting for the GIL, the disk or the
  network is not charged for it.
- ``CRDTSYNC_BENCH_SAMPLE=OUT``: a sampling profile of the event loop's thread, for where the
  CPU goes without cProfile's overhead (which inflates small Python functions several times):
  every 0.5 ms of the process's CPU time (``ITIMER_PROF``) the loop thread's Python stack is
  counted; at exit ``{stack: samples}`` is pickled to ``OUT`` (innermost frame first). Samples
  taken while the loop waits in ``select`` are the other threads' CPU (or idle):
  :func:`common.print_samples` sets them apart. The signal is handled when the thread next
  returns from the kernel, so frames that make system calls (``fstat``, socket writes) are
  over-counted: compare shares of pure Python code, and time system calls directly.
- ``CRDTSYNC_BENCH_SQL_STATS=OUT``: the CPU time of every SQL statement the server runs, by
  statement (``common.SqlStats``), written to ``OUT`` as JSON at exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def apply_knobs() -> None:
    """Set what ``CRDTSYNC_BENCH_RETIRE_GRACE`` asks for in this process."""
    grace = os.environ.get("CRDTSYNC_BENCH_RETIRE_GRACE")
    if grace:
        from crdtsync_server import documents

        documents.RETIRE_GRACE = float(grace)


def sampled(out: Path, interval: float = 0.0005) -> None:
    """Count the main thread's stack every ``interval`` s of process CPU time; pickle the
    counts to ``out`` at exit (see the module's doc)."""
    import atexit
    import pickle
    import signal
    from collections import Counter
    from types import FrameType

    samples: Counter[tuple[tuple[str, str], ...]] = Counter()

    def on_sample(_signum: int, frame: FrameType | None) -> None:
        stack = []
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        samples[tuple(stack)] += 1

    def dump() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        out.write_bytes(pickle.dumps(dict(samples)))

    signal.signal(signal.SIGPROF, on_sample)
    signal.setitimer(signal.ITIMER_PROF, interval, interval)
    atexit.register(dump)


def counted_sql(out: Path) -> None:
    """Count the CPU time of every SQL statement (``common.SqlStats``); dump it at exit."""
    import atexit

    from common import SqlStats

    stats = SqlStats()
    stats.install()
    atexit.register(stats.dump, out)


def profiled(out: Path, main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """``main(argv)`` under cProfile, every thread (see the module's doc)."""
    import cProfile
    import pstats
    import threading
    import time

    finished: list[cProfile.Profile] = []
    lock = threading.Lock()
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()
            with lock:
                finished.append(prof)

    threading.Thread.run = run  # type: ignore[method-assign]
    profile = cProfile.Profile(time.thread_time)
    try:
        code: int = profile.runcall(main, argv)
    finally:
        profile.dump_stats(str(out))
        for thread in threading.enumerate():  # executors stopped without waiting
            if thread is not threading.current_thread():
                thread.join(10)
        with lock:
            profs = list(finished)
        if profs:
            stats = pstats.Stats(profs[0])
            for prof in profs[1:]:
                stats.add(prof)
            stats.dump_stats(f"{out}.threads")
    return code


def serve() -> int:
    from crdtsync.cli import main

    apply_knobs()
    sample = os.environ.get("CRDTSYNC_BENCH_SAMPLE")
    if sample:
        sampled(Path(sample))
    sql_stats = os.environ.get("CRDTSYNC_BENCH_SQL_STATS")
    if sql_stats:
        counted_sql(Path(sql_stats))
    profile = os.environ.get("CRDTSYNC_BENCH_PROFILE")
    if profile:
        return profiled(Path(profile), main, sys.argv[1:])
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(serve())
