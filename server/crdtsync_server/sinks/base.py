"""What every sink (a downstream destination fed from the change feed) implements.

A sink receives feed items in cursor order, in batches, and must make delivering the same
batch twice harmless: each item carries a stable idempotency key (``FeedItem.key``) that the
destination deduplicates on (a webhook receiver, JetStream's ``Nats-Msg-Id``, a primary key
in PostgreSQL). The runner (``sinks/delivery.py``) owns cursors, retries, backoff and dead
letters; a sink only delivers or raises.

:class:`SinkConfig` is defined with the other stored sink records (``store/sinks.py``: the
store persists it) and re-exported here. A factory registered with :func:`register` builds
a sink from its config without any I/O (``open`` connects) and raises
:class:`~crdtsync.errors.MalformedRequest` (``detail = {"sink", "field"}``, see
``sinks/config.py``'s ``invalid``) for options it cannot use: the management API builds one
to validate a configuration before storing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from crdtsync.errors import SinkError, SinkRejected

from ..store.feed import FeedItem
from ..store.sinks import SinkConfig

__all__ = ["SINK_TYPES", "Sink", "SinkConfig", "SinkError", "SinkFactory", "SinkRejected",
           "register"]


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
