"""``GET /v1/metrics``: the server's metrics in the Prometheus text exposition format
(version 0.0.4), written by hand (no client library). Needs the admin token: give it to the
scraper as a bearer token (``authorization`` in a Prometheus scrape config)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from ..store.sinks import SinkRecord
from .common import require_admin
from .keys import SERVICES

routes = web.RouteTableDef()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class SinkMetric:
    """One metric with a sample per sink (label ``sink``); ``value`` None: no sample."""

    name: str
    type: str
    help: str
    value: Callable[[SinkRecord, int], float | None]


SINK_METRICS = (
    SinkMetric("crdtsync_sink_lag", "gauge",
               "Feed items after the sink's cursor (feed head - cursor).",
               lambda r, head: max(0, head - r.cursor)),
    SinkMetric("crdtsync_sink_cursor", "gauge", "The sink's feed cursor.",
               lambda r, head: r.cursor),
    SinkMetric("crdtsync_sink_delivered_total", "counter",
               "Feed items the destination accepted.", lambda r, head: r.delivered),
    SinkMetric("crdtsync_sink_failures_total", "counter", "Failed delivery attempts.",
               lambda r, head: r.failures),
    SinkMetric("crdtsync_sink_consecutive_failures", "gauge",
               "Failed attempts since the last delivery or dead letter.",
               lambda r, head: r.consecutive_failures),
    SinkMetric("crdtsync_sink_dead_letters_total", "counter", "Feed items ever dead-lettered.",
               lambda r, head: r.dead_lettered),
    SinkMetric("crdtsync_sink_dead_letters", "gauge", "Dead letters currently stored.",
               lambda r, head: r.dead_letters),
    SinkMetric("crdtsync_sink_last_delivered_timestamp_seconds", "gauge",
               "When the destination last accepted items (Unix time).",
               lambda r, head: None if r.last_delivered_at is None
               else r.last_delivered_at / 1000),
)


def label_value(text: str) -> str:
    """``text`` escaped for a label value (backslash, double quote, newline)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def header(name: str, type_: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {type_}"]


def render_metrics(head: int, sinks: Sequence[SinkRecord], floor: int = 0, *,
                   rebuilds: int = 0, rebuild_failures: int = 0, waiting: int = 0) -> str:
    """The exposition text: the feed head and floor, this process's document rebuilds and
    held live channels, then each sink metric for every sink."""
    lines = [*header("crdtsync_feed_head", "gauge", "Highest cursor of the change feed."),
             f"crdtsync_feed_head {head}",
             *header("crdtsync_feed_floor", "gauge",
                     "Highest purged cursor of the change feed (feed retention)."),
             f"crdtsync_feed_floor {floor}",
             *header("crdtsync_doc_rebuilds_total", "counter",
                     "Documents this process rebuilt into a new generation."),
             f"crdtsync_doc_rebuilds_total {rebuilds}",
             *header("crdtsync_doc_rebuild_failures_total", "counter",
                     "Document rebuilds this process failed to store (retried later)."),
             f"crdtsync_doc_rebuild_failures_total {rebuild_failures}",
             *header("crdtsync_wake_waiting", "gauge",
                     "Live channels (GET /v1/wake) this process holds now."),
             f"crdtsync_wake_waiting {waiting}"]
    for metric in SINK_METRICS:
        lines += header(metric.name, metric.type, metric.help)
        for record in sinks:
            value = metric.value(record, head)
            if value is not None:
                lines.append(f'{metric.name}{{sink="{label_value(record.name)}"}} '
                             f"{number(value)}")
    return "\n".join(lines) + "\n"


@routes.get("/v1/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of the change feed, document rebuilds, live channels and the
    sinks."""
    require_admin(request)
    services = request.app[SERVICES]
    store = services.store
    text = render_metrics(await store.feed_head(), await store.list_sinks(),
                          await store.feed_floor(), rebuilds=services.docs.rebuilds,
                          rebuild_failures=services.docs.rebuild_failures,
                          waiting=services.wakes.waiting)
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})
