"""Records of downstream sinks as every backend stores them: a sink's configuration, its
delivery progress (cursor and counters) and its dead letters.

A sink's ``cursor`` is the highest feed cursor it is done with: every item at or below it
was delivered, dead-lettered, or did not match the sink's filter. It only moves forward,
and only after the destination accepted the items (at least once: a crash in between
delivers them again, and the destination deduplicates by ``FeedItem.key``). Dead letters
are written in the same transaction that moves the cursor past them, so an item is never
both lost and undelivered. The runner that drives this lives in ``crdtsync_server.sinks``.

Several server processes may share one database: a sink's *lease* (``owner`` until
``lease_until``) lets one of them deliver it at a time, and a cursor only moves for the
owner that asks (``sink_delivered`` and ``add_dead_letters`` with ``owner``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .feed import FeedFilter, FeedItem, json_text

SINK_ORIGINS = ("api", "file")


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """A configured sink: ``type`` picks the implementation, ``options`` are its settings
    (URL, subject, table, secret...), ``where`` selects feed items."""

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)
    where: FeedFilter = field(default_factory=FeedFilter)
    batch: int = 100
    """Items per delivery."""
    max_attempts: int = 10
    """Failed deliveries of one batch before its items go to the dead letters."""
    backoff: float = 0.5
    """Seconds before the first retry; doubles each time (with jitter) up to ``max_backoff``."""
    max_backoff: float = 300.0


@dataclass(frozen=True, slots=True)
class SinkRecord:
    """A stored sink: its configuration and where its delivery stands.

    ``origin`` is ``api`` (set through the management API; options stored as given) or
    ``file`` (from the server's sinks file; options stored as written there, with their
    ``${ENV}`` references unexpanded, so secrets never reach the database). Counters:
    ``delivered`` items accepted by the destination, ``failures`` failed attempts,
    ``consecutive_failures`` failed attempts since the last success or dead letter,
    ``dead_lettered`` items ever dead-lettered, ``dead_letters`` those still stored. Times
    are ms since the epoch."""

    config: SinkConfig
    origin: str = "api"
    paused: bool = False
    cursor: int = 0
    delivered: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    dead_lettered: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_at: int | None = None
    last_delivered_at: int | None = None
    created: int = 0
    updated: int = 0
    owner: str | None = None
    """The server process holding the sink's delivery lease (``None``: nobody)."""
    lease_until: int = 0
    """When that lease expires unless renewed (ms since the epoch)."""

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A feed item sink ``sink`` gave up on after ``attempts`` failed deliveries, with the
    last ``error``. ``retrying`` is set by a retry request until the runner has tried it
    again (delivered: the dead letter goes; failed again: it stays, unmarked)."""

    id: int
    sink: str
    item: FeedItem
    error: str
    attempts: int
    created: int
    retrying: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "sink": self.sink, "cursor": str(self.item.cursor),
                "key": self.item.key, "item": self.item.to_json(), "error": self.error,
                "attempts": self.attempts, "created": self.created, "retrying": self.retrying}


def check_origin(origin: str) -> None:
    """Raise ``ValueError`` unless ``origin`` is one of :data:`SINK_ORIGINS`."""
    if origin not in SINK_ORIGINS:
        raise ValueError(f"sink origin must be one of {SINK_ORIGINS}, not {origin!r}")


SinkColumns = tuple[str, str, str, str, int, int, float, float]
"""A configuration as stored: ``(name, type, options JSON, filter JSON, batch,
max_attempts, backoff, max_backoff)``."""


def config_columns(config: SinkConfig) -> SinkColumns:
    """``config`` as stored columns (``TypeError`` if its options are not JSON data)."""
    return (config.name, config.type, json_text(dict(config.options)),
            json_text(config.where.to_json()), config.batch, config.max_attempts,
            config.backoff, config.max_backoff)


def config_from_columns(name: str, type_: str, options: str, where: str, batch: int,
                        max_attempts: int, backoff: float, max_backoff: float) -> SinkConfig:
    """The inverse of :func:`config_columns`."""
    return SinkConfig(name, type_, json.loads(options), FeedFilter.from_json(json.loads(where)),
                      batch, max_attempts, float(backoff), float(max_backoff))


def item_text(item: FeedItem) -> str:
    """A feed item as the JSON text a dead letter stores (its ``to_json`` form)."""
    return json_text(item.to_json())


def item_from_text(text: str) -> FeedItem:
    """The inverse of :func:`item_text`."""
    data = json.loads(text)
    event = data["kind"] == "event"
    return FeedItem(
        cursor=int(data["cursor"]), kind=data["kind"], device=data["device"],
        fleet=data["fleet"], time=data["time"], received=data["received"],
        body=data["body"] if event else data["changes"],
        topic=data.get("topic"), seq=data.get("seq"), doc=data.get("doc"),
        source=data.get("source"))
