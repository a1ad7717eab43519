"""What the metrics add to one sync (issue 18), in CPU microseconds.

A sync costs about 500 µs of CPU; the metrics' share is too small to see in a whole sync's
noise, so each piece of code the metrics put on the sync path is timed alone, on the real
objects, and added up:

a. the handler (``api/sync.py``): the app-key lookup of the tallies, two
   ``time.perf_counter()`` calls and ``SyncTally.served`` (three additions and a histogram
   observation);
b. the timed commit (``SyncService._commit`` around ``Store.commit``): the wrapper coroutine,
   two ``perf_counter()`` calls and a histogram observation, as the difference between
   awaiting it and awaiting the store's ``commit`` directly (a store whose commit returns at
   once);
c. the three tallies after the commit (events, state changes, conflicts).

For comparison, the same counting with ``prometheus_client``'s own ``Counter.inc`` and
``Histogram.observe`` (bound children, as the library recommends) is timed too.

    python bench/metrics_overhead.py [--rounds 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as LibHistogram

from crdtsync_server.documents import DocumentCache
from crdtsync_server.metrics import COMMIT_BUCKETS, SYNC_BUCKETS, Histogram, SyncTally
from crdtsync_server.store import CommitResult, MemoryStore, SyncWrite
from crdtsync_server.sync import SyncService


def per_call(fn: Callable[[], object], rounds: int) -> float:
    """CPU µs per call of ``fn``, the empty loop's cost taken off."""
    def loop(body: Callable[[], object]) -> float:
        start = time.process_time()
        for _ in range(rounds):
            body()
        return time.process_time() - start
    return max(0.0, loop(fn) - loop(lambda: None)) / rounds * 1e6


def handler_part(rounds: int) -> float:
    key: web.AppKey[SyncTally] = web.AppKey("tally", SyncTally)
    app = web.Application()
    app[key] = SyncTally()

    def counted() -> None:
        tally = app[key]
        started = time.perf_counter()
        tally.served(240, 180, time.perf_counter() - started)
    return per_call(counted, rounds)


class InstantStore(MemoryStore):
    """A store whose commit returns at once: only the wrapper's cost is left to see."""

    result = CommitResult(last_seq=1, stored=1)

    async def commit(self, write: SyncWrite) -> CommitResult:
        return self.result


async def commit_part(rounds: int) -> float:
    store = InstantStore()
    service = SyncService(store, DocumentCache(store, 1))
    write = SyncWrite(device="d1", time=0)

    async def loop(timed: bool) -> float:
        start = time.process_time()
        for _ in range(rounds):
            await (service._commit(write) if timed else store.commit(write))
        return time.process_time() - start

    await loop(True)  # warm up
    bare, timed = await loop(False), await loop(True)
    return max(0.0, timed - bare) / rounds * 1e6


def tallies_part(rounds: int) -> float:
    store = MemoryStore()
    service = SyncService(store, DocumentCache(store, 1))
    result, write = CommitResult(stored=2), SyncWrite(device="d1", time=0)

    def counted() -> None:
        service.events += result.stored
        service.device_changes += len(write.changes)
        service.conflicts += len(write.conflicts)
    return per_call(counted, rounds)


def library_part(rounds: int) -> float:
    """The same counting through prometheus_client's metric objects (bound children)."""
    registry = CollectorRegistry()
    ok = Counter("s", "s", ["outcome", "code"], registry=registry).labels("ok", "none")
    request_bytes = Counter("rq", "rq", registry=registry)
    response_bytes = Counter("rs", "rs", registry=registry)
    events = Counter("e", "e", registry=registry)
    changes = Counter("c", "c", registry=registry)
    conflicts = Counter("f", "f", registry=registry)
    latency = LibHistogram("l", "l", buckets=SYNC_BUCKETS, registry=registry)
    commit = LibHistogram("m", "m", buckets=COMMIT_BUCKETS, registry=registry)

    def counted() -> None:
        ok.inc()
        request_bytes.inc(240)
        response_bytes.inc(180)
        latency.observe(0.0007)
        commit.observe(0.0002)
        events.inc(2)
        changes.inc(0)
        conflicts.inc(0)
    return per_call(counted, rounds)


def plain_part(rounds: int) -> float:
    """The counting of :func:`library_part` with this server's plain tallies."""
    tally, commit = SyncTally(), Histogram(COMMIT_BUCKETS)
    store = MemoryStore()
    service = SyncService(store, DocumentCache(store, 1))

    def counted() -> None:
        tally.served(240, 180, 0.0007)
        commit.observe(0.0002)
        service.events += 2
        service.device_changes += 0
        service.conflicts += 0
    return per_call(counted, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200_000)
    rounds = parser.parse_args().rounds
    parts = {"a. handler (lookup, clock, SyncTally.served)": handler_part(rounds),
             "b. timed Store.commit (wrapper, clock, histogram)":
                 asyncio.run(commit_part(rounds)),
             "c. tallies after the commit": tallies_part(rounds)}
    for name, micros in parts.items():
        print(f"{name:55} {micros:6.3f} us")
    print(f"{'added CPU per sync (a + b + c)':55} {sum(parts.values()):6.3f} us")
    print(f"{'counting alone, plain tallies':55} {plain_part(rounds):6.3f} us")
    print(f"{'counting alone, prometheus_client Counter/Histogram':55} "
          f"{library_part(rounds):6.3f} us")


if __name__ == "__main__":
    main()
