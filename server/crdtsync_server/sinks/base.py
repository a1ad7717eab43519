"""What every sink (a downstream destination fed from the change feed) implements.

A sink receives feed items in cursor order, in batches, and must make delivering the same
batch twice harmless: each item carries a stable idempotency key (``FeedItem.key``) that the
destination deduplicates on (a webhook receiver, JetStream's ``Nats-Msg-Id``, a primary key
in PostgreSQL). The runner (``sinks/runner.py``) owns cursors, retries, backoff and dead
letters; a sink only delivers or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from crdtsync.errors import SinkError, SinkRejected

from ..store.feed import FeedFilter, FeedItem

__all__ = ["SINK_TYPES", "Sink", "SinkConfig", "SinkError", "SinkFactory", "SinkRejected",
           "register"]


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


class Sink(Protocol):
    """One destination. Created from a :class:`SinkConfig` by the factory registered for its
    type; ``open`` before the first ``deliver``, ``aclose`` at the end."""

    async def open(self) -> None:
        """Connect; raise :class:`SinkError` if the destination is unreachable."""

    async def deliver(self, items: Sequence[FeedItem]) -> None:
        """Deliver ``items`` (cursor order, one batch) or raise :class:`SinkError`
        (retried) / :class:`SinkRejected` (dead-lettered at once). May be called again with
        the same items after a failure or a restart: idempotent by key."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""


SinkFactory = Callable[[SinkConfig], Sink]

SINK_TYPES: dict[str, SinkFactory] = {}
"""Implementations by type name (``webhook``, ``nats``, ``postgres``, ...)."""


def register(type_name: str) -> Callable[[SinkFactory], SinkFactory]:
    """Class decorator: make ``type_name`` sinks be built by the decorated factory."""
    def add(factory: SinkFactory) -> SinkFactory:
        SINK_TYPES[type_name] = factory
        return factory
    return add
