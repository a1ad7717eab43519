"""Packing queued events into a sync request: plain events, and runs of templated events
encoded as template batches (:mod:`crdtsync.templates`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import msgpack

from ._device_store import OutboxEvent
from .protocol import Event, TemplateBatch
from .templates import Template, encode_batch


def pack(batch: Sequence[OutboxEvent], template: Callable[[str], Template | None]
         ) -> tuple[list[OutboxEvent], list[TemplateBatch]]:
    """Split ``batch`` (consecutive seqs) into plain events and template batches: each run
    of consecutive events with the same topic and template becomes one batch. An event whose
    template definition is unknown here travels plain."""
    plain: list[OutboxEvent] = []
    batches: list[TemplateBatch] = []
    runs = itertools.groupby(batch, key=lambda e: (e.topic, e.template))
    for (topic, digest), run in runs:
        events = list(run)
        found = template(digest) if digest else None
        if found is None:
            plain += events
            continue
        records = [(e.seq, e.time, msgpack.unpackb(e.body, raw=False)) for e in events]
        batches.append(TemplateBatch(topic, encode_batch(found, records)))
    return plain, batches


def plain_events(events: Sequence[OutboxEvent]) -> tuple[Event, ...]:
    """Protocol events for plain outbox events (bodies travel pre-encoded)."""
    return tuple(Event(e.seq, e.topic, e.time, None) for e in events)
