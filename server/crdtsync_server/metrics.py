"""The server's Prometheus metrics (docs/operations.md lists every series).

One :class:`ProcessMetrics` per server process owns a ``prometheus_client`` registry of its
own (never the library's global one: tests run several servers in one process). The hot path
never touches ``prometheus_client``: its ``Counter.inc`` takes a thread lock and costs about
0.25 µs, a ``Histogram.observe`` 0.5 µs, while every counting here happens on the one event
loop thread. So each component tallies its own work in plain attributes (:class:`Histogram`,
:class:`Level`, ``DocumentCache.rebuilds``, ``SyncService.events`` ...), and
:class:`ServerCollector` turns them into metric families when a scraper asks. What lives in
the store (feed head, sinks, devices) is read at scrape time by :meth:`ProcessMetrics.refresh`,
one pass over the devices table included.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from crdtsync.errors import CrdtsyncError

from .store.sinks import SinkRecord

if TYPE_CHECKING:
    from .core import Services

SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; a sync costs about 0.5 ms of CPU, a slow one waits for its proxied requests
(``proxy_budget``, 1 s by default) or a large update."""
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0)
"""Seconds; a store commit is a fraction of a millisecond to a few (an fsync)."""
ACTIVE_WINDOW_MS = 300_000
"""A device counts as active when its last sync is this recent (5 minutes)."""
DEVICE_PAGE = 1000
"""Devices read per query while a scrape counts them."""


class Histogram:
    """A lock-free histogram: :meth:`observe` is one bisect and two additions. Only the
    event loop thread may observe (no lock guards the counts)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        """The cumulative ``le`` buckets, ``_sum`` and ``_count`` of this histogram."""
        running, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


class Level:
    """A gauge of things held open (long polls, streams): ``with level:`` around the hold."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def __enter__(self) -> None:
        self.value += 1

    def __exit__(self, *exc: object) -> None:
        self.value -= 1


def sync_outcome(exc: BaseException) -> tuple[str, str]:
    """``(outcome, code)`` of a refused sync, as the device was answered: ``client_error``
    with the error's code, ``server_error`` with ``internal`` (or ``unavailable``...), and
    ``cancelled`` when the client left before the answer."""
    if isinstance(exc, CrdtsyncError):
        if exc.status == 0 or exc.status >= 500:
            return "server_error", exc.code if exc.status else "internal"
        return "client_error", exc.code
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", "cancelled"
    status = getattr(exc, "status", 500)  # aiohttp's HTTPException (a 413 while reading)
    if isinstance(status, int) and 400 <= status < 500:
        return "client_error", "body_too_large" if status == 413 else "bad_request"
    return "server_error", "internal"


class SyncTally:
    """What ``POST /v1/sync`` counts: answers, refusals by code, latency, bytes."""

    __slots__ = ("ok", "refused", "request_bytes", "response_bytes", "seconds")

    def __init__(self) -> None:
        self.ok = 0
        self.refused: dict[tuple[str, ...], int] = {}
        self.seconds = Histogram(SYNC_BUCKETS)
        self.request_bytes = 0
        self.response_bytes = 0

    def served(self, received: int, sent: int, seconds: float) -> None:
        """One answered sync: ``received`` body bytes (as sent, maybe compressed),
        ``sent`` answer bytes, ``seconds`` from the handler's start to the encoded answer."""
        self.ok += 1
        self.request_bytes += received
        self.response_bytes += sent
        self.seconds.observe(seconds)

    def failed(self, exc: BaseException) -> None:
        """One refused or failed sync (rare: a lookup by outcome and code is fine here)."""
        key = sync_outcome(exc)
        self.refused[key] = self.refused.get(key, 0) + 1


class BatchTally:
    """What ``POST /v1/sync/batch`` counts besides its entries (each entry is a sync, counted
    by the :class:`SyncTally` like one of ``POST /v1/sync``): batches answered and refused
    whole, by code, and the entries of the answered ones."""

    __slots__ = ("entries", "ok", "refused")

    def __init__(self) -> None:
        self.ok = 0
        self.entries = 0
        self.refused: dict[tuple[str, ...], int] = {}

    def served(self, entries: int) -> None:
        self.ok += 1
        self.entries += entries

    def failed(self, exc: BaseException) -> None:
        key = sync_outcome(exc)
        self.refused[key] = self.refused.get(key, 0) + 1


@dataclass(slots=True)
class StoreView:
    """What a scrape reads from the store: shared by every instance on the database."""

    head: int = 0
    floor: int = 0
    sinks: Sequence[SinkRecord] = ()
    devices: int = 0
    active: int = 0
    downlink: int = 0


async def read_store(services: Services) -> StoreView:
    """The feed, the sinks, and one pass over the devices: how many there are, how many
    synced within :data:`ACTIVE_WINDOW_MS` (this process's no-change syncs not yet written
    count too), and their downlink items not yet processed (``down_seq - down_done``)."""
    store = services.store
    view = StoreView(await store.feed_head(), await store.feed_floor(),
                     await store.list_sinks())
    since, after = services.config.clock() - ACTIVE_WINDOW_MS, ""
    while batch := await store.list_devices(after=after, limit=DEVICE_PAGE):
        for device in batch:
            view.devices += 1
            view.active += services.sync.last_sync(device) >= since
            view.downlink += max(0, device.down_seq - device.down_done)
        after = batch[-1].id
    return view


@dataclass(frozen=True, slots=True)
class SinkMetric:
    """One metric with a sample per sink (label ``sink``), read from ``SinkRecord.<attr>``
(``lag`` and ``last_delivered`` are derived)."""

    name: str
    kind: str
    help: str
    attr: str


SINK_METRICS = (
    SinkMetric("crdtsync_sink_lag", "gauge",
               "Feed items after the sink's cursor (feed head - cursor).", "lag"),
    SinkMetric("crdtsync_sink_cursor", "gauge", "The sink's feed cursor.", "cursor"),
    SinkMetric("crdtsync_sink_delivered", "counter", "Feed items the destination accepted.",
               "delivered"),
    SinkMetric("crdtsync_sink_failures", "counter", "Failed delivery attempts.", "failures"),
    SinkMetric("crdtsync_sink_consecutive_failures", "gauge",
               "Failed attempts since the last delivery or dead letter.",
               "consecutive_failures"),
    SinkMetric("crdtsync_sink_dead_letters", "counter", "Feed items ever dead-lettered.",
               "dead_lettered"),
    SinkMetric("crdtsync_sink_dead_letters_stored", "gauge",
               "Dead letters currently stored.", "dead_letters"),
    SinkMetric("crdtsync_sink_last_delivered_timestamp_seconds", "gauge",
               "When the destination last accepted items (Unix time).", "last_delivered"),
)
"""The names of the hand-written exposition before prometheus-client, but one: the gauge of
dead letters stored is ``crdtsync_sink_dead_letters_stored``, no longer
``crdtsync_sink_dead_letters`` (the counter ``crdtsync_sink_dead_letters_total`` is one family
with that name in the library's model)."""


def _sink_value(record: SinkRecord, attr: str, head: int) -> float | None:
    if attr == "lag":
        return max(0, head - record.cursor)
    if attr == "last_delivered":
        at = record.last_delivered_at
        return None if at is None else at / 1000
    value: int = getattr(record, attr)
    return value


def sink_families(head: int, sinks: Sequence[SinkRecord]) -> Iterator[Metric]:
    """One family per :data:`SINK_METRICS` entry, one sample per sink."""
    for metric in SINK_METRICS:
        family: Metric
        if metric.kind == "counter":
            family = CounterMetricFamily(metric.name, metric.help, labels=["sink"])
        else:
            family = GaugeMetricFamily(metric.name, metric.help, labels=["sink"])
        for record in sinks:
            value = _sink_value(record, metric.attr, head)
            if value is not None:
                family.add_metric([record.name], value)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str,
              labels: list[str], values: dict[tuple[str, ...], int]) -> Metric:
    family = kind(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class ServerCollector:
    """Turns the tallies of one process and the last :class:`StoreView` into families."""

    def __init__(self, metrics: ProcessMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield from self._syncs(m.syncs)
        yield from self._batches(m.batches)
        yield from self._store(m.view)
        yield from self._process(m)

    @staticmethod
    def _syncs(tally: SyncTally) -> Iterator[Metric]:
        outcomes: dict[tuple[str, ...], int] = {("ok", "none"): tally.ok}
        outcomes.update(tally.refused)
        yield _labelled(CounterMetricFamily, "crdtsync_sync_requests",
                        "Sync requests (POST /v1/sync) by outcome (ok, client_error, "
                        "server_error, cancelled) and error code (none when ok).",
                        ["outcome", "code"], outcomes)
        yield tally.seconds.family("crdtsync_sync_duration_seconds",
                                   "Time to answer a successful sync, from the request's "
                                   "handler to the encoded answer.")
        yield _counter("crdtsync_sync_request_bytes", "Body bytes of answered syncs, as "
                       "received (compressed if the device compressed).", tally.request_bytes)
        yield _counter("crdtsync_sync_response_bytes", "Body bytes of sync answers.",
                       tally.response_bytes)

    @staticmethod
    def _batches(tally: BatchTally) -> Iterator[Metric]:
        outcomes: dict[tuple[str, ...], int] = {("ok", "none"): tally.ok}
        outcomes.update(tally.refused)
        yield _labelled(CounterMetricFamily, "crdtsync_batch_requests",
                        "Gateway batches (POST /v1/sync/batch) by outcome of the whole "
                        "request (ok, client_error, server_error, cancelled) and error code; "
                        "each entry is also counted in crdtsync_sync_requests.",
                        ["outcome", "code"], outcomes)
        yield _counter("crdtsync_batch_entries", "Entries (device syncs) of answered "
                       "gateway batches, whatever each entry's outcome.", tally.entries)

    @staticmethod
    def _store(view: StoreView) -> Iterator[Metric]:
        yield _gauge("crdtsync_feed_head", "Highest cursor of the change feed.", view.head)
        yield _gauge("crdtsync_feed_floor",
                     "Highest purged cursor of the change feed (feed retention).", view.floor)
        yield _gauge("crdtsync_devices", "Provisioned devices (database-wide).", view.devices)
        yield _gauge("crdtsync_devices_active", "Devices whose last sync is less than 5 "
                     "minutes old (database-wide, read at scrape time).", view.active)
        yield _gauge("crdtsync_downlink_pending", "Messages and commands queued for devices "
                     "and not yet processed by them (database-wide).", view.downlink)
        yield from sink_families(view.head, view.sinks)

    @staticmethod
    def _process(m: ProcessMetrics) -> Iterator[Metric]:
        services = m.services
        docs, sync = services.docs, services.sync
        yield _counter("crdtsync_events_ingested", "Device events stored (replays not "
                       "counted).", sync.events)
        yield _labelled(CounterMetricFamily, "crdtsync_state_changes",
                        "State-change feed items written, by writer (device, cloud).",
                        ["writer"], {("device",): sync.device_changes,
                                     ("cloud",): sync.cloud_changes})
        yield _counter("crdtsync_conflicts", "Conflicts decided (latest-write-wins keys).",
                       sync.conflicts)
        yield sync.commit_seconds.family("crdtsync_store_commit_duration_seconds",
                                         "Time of Store.commit (the sync or cloud write "
                                         "transaction), failed ones included.")
        yield _gauge("crdtsync_docs_cached", "Documents this process holds in memory.",
                     len(docs))
        yield _counter("crdtsync_doc_compactions", "Document logs this process folded into "
                       "a snapshot.", docs.compactions)
        yield _counter("crdtsync_doc_compaction_failures", "Compactions this process failed "
                       "to store (retried later).", docs.compaction_failures)
        yield _counter("crdtsync_doc_rebuilds",
                       "Documents this process rebuilt into a new generation.", docs.rebuilds)
        yield _counter("crdtsync_doc_rebuild_failures", "Document rebuilds this process "
                       "failed to store (retried later).", docs.rebuild_failures)
        yield _labelled(CounterMetricFamily, "crdtsync_purged_rows",
                        "Rows this process's retention purged, by log (finished: downlink "
                        "items and acknowledged requests; wakes; feed).", ["log"],
                        {(k,): v for k, v in services.maintenance.purged.items()})
        yield _labelled(CounterMetricFamily, "crdtsync_proxied_requests",
                        "Proxied requests this process finished, by outcome (ok, or the "
                        "route error code; interrupted).", ["outcome"],
                        {(k,): v for k, v in services.proxy.outcomes.items()})
        yield _labelled(GaugeMetricFamily, "crdtsync_long_polls",
                        "Long polls this process holds now, by endpoint (feed: GET "
                        "/v1/feed?wait=; command: GET /v1/commands/{id}?wait=).", ["endpoint"],
                        {("feed",): m.feed_polls.value, ("command",): m.command_polls.value})
        yield _gauge("crdtsync_feed_streams", "Server-Sent Events streams (GET "
                     "/v1/feed/stream) this process holds now.", m.feed_streams.value)
        yield _gauge("crdtsync_wake_waiting",
                     "Live channels (GET /v1/wake) this process holds now.",
                     services.wakes.waiting)


@dataclass(eq=False)
class ProcessMetrics:
    """The metrics of one server process: its registry (this collector, the process
    collector: CPU, memory, file descriptors, and the garbage collector's), the HTTP
    adapters' tallies, and the store's view as of the last :meth:`refresh`."""

    services: Services
    syncs: SyncTally = field(default_factory=SyncTally)
    batches: BatchTally = field(default_factory=BatchTally)
    feed_polls: Level = field(default_factory=Level)
    command_polls: Level = field(default_factory=Level)
    feed_streams: Level = field(default_factory=Level)
    view: StoreView = field(default_factory=StoreView)
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(self))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # the collections `--gc-young` spaces out

    async def refresh(self) -> None:
        """Read the store's part (:func:`read_store`); raises what the store raises."""
        self.view = await read_store(self.services)

    async def exposition(self) -> bytes:
        """Refresh, then the whole registry in the Prometheus text format."""
        await self.refresh()
        return generate_latest(self.registry)
