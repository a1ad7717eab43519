"""Work the server does on its own, apart from requests: purging finished items and old feed
items, writing the batched ``last_sync`` of no-change syncs, evicting idle documents.

:class:`Maintenance` offers each chore as one call (the simulator runs them at steps of its
virtual time) and :meth:`Maintenance.spawn` runs them on their intervals in a server process.
Retention is decided here, above the store: the store only deletes what it is told to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from crdtsync._aio import spawn
from crdtsync.errors import CrdtsyncError

from .config import ServerConfig
from .documents import DocumentCache
from .files import FileService
from .proxied.dispatch import ProxyRunner
from .store import Store
from .sync import SyncService

log = logging.getLogger("crdtsync.server")


class Maintenance:
    """The periodic chores of one server process over its store, cache and sync service."""

    def __init__(self, config: ServerConfig, store: Store, docs: DocumentCache,
                 sync: SyncService, proxy: ProxyRunner, files: FileService | None = None
                 ) -> None:
        self.config = config
        self.store = store
        self.docs = docs
        self.sync = sync
        self.proxy = proxy
        self.files = files
        self.purged = {"finished": 0, "wakes": 0, "feed": 0, "files": 0}
        """Rows purged by retention, by log (a metric)."""

    async def heartbeat(self) -> int:
        """Prove this instance alive and finish the proxied requests of instances that are
        gone (``instance_ttl`` without a heartbeat) as ``interrupted``; returns how many."""
        return await self.proxy.recover(self.config.instance_stale_ms)

    async def purge(self) -> int:
        """Purge finished downlink items and acknowledged requests older than the retention,
        wake log entries older than theirs, uploaded files and abandoned uploads older than
        theirs (``FileService.purge``), and feed items older than the feed retention
        (:meth:`purge_feed`); returns how many rows went. Raises a :class:`CrdtsyncError`
        of the store."""
        now = self.config.clock()
        gone = await self.store.purge_finished(now - self.config.retention_ms)
        self.purged["finished"] += gone
        if gone:
            log.info("purged %d finished messages, commands and requests", gone)
        wakes = await self.store.purge_wakes(now - self.config.wake_retention_ms)
        self.purged["wakes"] += wakes
        gone += wakes
        if self.files is not None:
            files = await self.files.purge(now)
            self.purged["files"] += files
            gone += files
        if self.config.feed_retention_ms is not None:
            feed = await self.purge_feed(now - self.config.feed_retention_ms)
            self.purged["feed"] += feed
            if feed:
                log.info("purged %d feed items", feed)
            gone += feed
        return gone

    async def purge_feed(self, before: int) -> int:
        """Purge the feed items stored before ``before`` (ms) that every sink has delivered
        (a paused or failing sink holds them back); returns how many went."""
        cursors = [sink.cursor for sink in await self.store.list_sinks()]
        keep_after = min(cursors) if cursors else await self.store.feed_head()
        return await self.store.purge_feed(before, keep_after)

    async def flush_touches(self) -> None:
        """Store the ``last_sync`` of the no-change syncs since the last flush."""
        await self.sync.flush_touches()

    def evict_idle(self) -> None:
        """Drop documents nobody used for ``cache_idle`` seconds from memory."""
        self.docs.evict_idle(self.config.cache_idle)

    async def run_once(self) -> None:
        """Every chore once; a failing chore is logged and the others still run."""
        await _logged("heartbeat", self.heartbeat)
        await _logged("purge", self.purge)
        await _logged("recording last sync times", self.flush_touches)
        self.evict_idle()

    def spawn(self) -> list[asyncio.Task[None]]:
        """Run each chore on its interval until the tasks are cancelled: purges every
        ``purge_every`` s (first at once), touches every ``touch_every`` s, heartbeats three
        times per ``instance_ttl``, evictions ten times per ``cache_idle``."""
        config = self.config
        return [spawn(_every(config.instance_ttl / 3, "heartbeat", self.heartbeat),
                      "crdtsync-heartbeat"),
                spawn(_every(config.purge_every, "purge", self.purge, first=True),
                      "crdtsync-purge"),
                spawn(_every(config.touch_every, "recording last sync times",
                             self.flush_touches), "crdtsync-touch"),
                spawn(_every(max(config.cache_idle / 10, 0.01), "eviction", self._evict),
                      "crdtsync-idle")]

    async def _evict(self) -> None:
        self.evict_idle()


async def _every(seconds: float, what: str, chore: Callable[[], Awaitable[object]], *,
                 first: bool = False) -> None:
    if not first:
        await asyncio.sleep(seconds)
    while True:
        await _logged(what, chore)
        await asyncio.sleep(seconds)


async def _logged(what: str, chore: Callable[[], Awaitable[object]]) -> None:
    try:
        await chore()
    except CrdtsyncError as exc:
        log.error("%s failed, will retry: %s", what, exc.message)
