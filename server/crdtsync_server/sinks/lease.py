"""``SinkLease``: one server process at a time delivers a sink.

Several server processes may share one database. Each sink has a lease in the store (its
``owner`` until ``lease_until``): a runner delivers only while its process holds it, takes
it when it is free or expired, renews it every ``ttl / 3`` seconds (also while a delivery
waits or retries) and releases it when it stops. A process that dies keeps it until it
expires: another process takes over after at most ``ttl`` (plus one check interval). The
store moves a cursor only for the owner, so a runner that lost its lease cannot move it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from crdtsync.errors import CrdtsyncError
from crdtsync.hlc import wall_ms

from ..store import SinkStore

log = logging.getLogger("crdtsync.server.sinks")

LEASE_TTL_S = 30.0
"""Default seconds a lease lasts unless renewed: how long a sink waits after its process
died before another process delivers it."""


def new_owner_id() -> str:
    """An id for this process's leases: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class SinkLease:
    """``owner``'s lease on sink ``name``, as this process last saw it."""

    def __init__(self, store: SinkStore, name: str, owner: str, ttl: float = LEASE_TTL_S
                 ) -> None:
        self.store = store
        self.name = name
        self.owner = owner
        self.ttl = ttl
        self._expires = 0.0  # monotonic: when a lease taken or renewed at the latest ends
        self._due = 0.0  # monotonic: when to ask the store again
        self.term = 0
        """Counts the times the lease was taken (renewals do not count)."""

    @property
    def period(self) -> float:
        """Seconds between renewals (and between tries to take a lease held elsewhere)."""
        return self.ttl / 3

    @property
    def held(self) -> bool:
        """Whether this process holds the lease (as far as it knows: until it expires)."""
        return time.monotonic() < self._expires

    async def hold(self) -> bool:
        """Take or renew the lease when a check is due; returns whether it is held."""
        if time.monotonic() >= self._due:
            await self.acquire()
        return self.held

    async def acquire(self) -> bool:
        """Take or renew the lease now."""
        start, renewing = time.monotonic(), self.held
        self._due = start + self.period
        taken = await self.store.acquire_sink_lease(self.name, self.owner, wall_ms(),
                                                    int(self.ttl * 1000))
        self._expires = start + self.ttl if taken else 0.0
        if taken and not renewing:
            self.term += 1
        return taken

    def lost(self) -> None:
        """The store refused this owner: the lease is held elsewhere."""
        self._expires = 0.0

    async def keep(self) -> None:
        """Renew the lease every :attr:`period` while it is held (runs until cancelled)."""
        while True:
            await asyncio.sleep(self.period)
            if self.held:
                try:
                    await self.acquire()
                except Exception as exc:  # the lease may expire; the runner then waits
                    log.error("sink %r: renewing the lease failed: %s", self.name,
                              exc.message if isinstance(exc, CrdtsyncError) else repr(exc))

    async def release(self) -> None:
        """Give the lease up (at a clean stop: another process may take it at once)."""
        self.lost()
        await self.store.release_sink_lease(self.name, self.owner)
