"""``SinkRunner``: delivers the change feed to one sink, at least once, in cursor order.

One runner (an asyncio task owned by :class:`~crdtsync_server.sinks.manager.SinkManager`)
per sink. Each step reads the next page of feed items after the sink's cursor that match
its filter (at most ``batch``) and hands it to the sink:

- delivered: the cursor moves past the page (after ``deliver`` returned, never before: a
  crash in between delivers the page again, and the destination deduplicates by key);
- :class:`SinkError` (or any unexpected exception of the sink): the same page is tried
  again after ``backoff * 2**(n-1)`` seconds (at most ``max_backoff``, with jitter), up to
  ``max_attempts`` attempts; then its items become dead letters and the cursor moves past
  them (one transaction), and delivery goes on;
- :class:`SinkRejected`: no retry. A page of several items is split and its items are
  delivered one by one, so that only the items the destination refuses become dead letters.

A later page is never handed over before an earlier one was delivered or dead-lettered, so
each device's items arrive in their feed order. With a filter, the cursor also moves past
the items that do not match (up to the feed head read before the page), so they are not
scanned again (when only skipped items follow, that move is stored at most once a second).

Dead letters marked for a retry (``POST .../dead-letters/retry``) are tried again, between
two pages, with the same retry rules; they arrive after items that followed them in the
feed.

A runner delivers only while its process holds the sink's lease (see
:mod:`~crdtsync_server.sinks.lease`); otherwise it waits (``standby``). Each time it takes
the lease it reads the stored cursor again (another process may have moved it) and looks
for dead letters to retry (a retry may have been asked of another process). When the store
refuses to move the cursor because another process took the lease, it stops delivering
and waits again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from crdtsync._aio import cancel_and_wait
from crdtsync.errors import CrdtsyncError, SinkRejected
from crdtsync.hlc import wall_ms

from ..feed import FeedNotifier
from ..store import DownstreamStore
from ..store.feed import FeedItem
from .base import Sink, SinkConfig
from .lease import LEASE_TTL_S, SinkLease, new_owner_id

log = logging.getLogger("crdtsync.server.sinks")

STORE_RETRY_S = 1.0
"""Seconds before a runner tries again after its store failed."""
SKIP_WRITE_S = 1.0
"""Moving the stored cursor past items the filter skips is written at most this often (a
busy feed would otherwise cost one write per commit per filtered sink); a restart only
scans those items again."""
MAX_EXPONENT = 60
WAKE_SPACING_S = 0.05
"""An idle runner reads the feed at most this often (the delivery latency it may add)."""
CLOSE_TIMEOUT_S = 10.0
"""Seconds a stopping runner waits for its sink to close (a hung destination must not hold
a shutdown)."""

__all__ = ["Backoff", "Failure", "LeaseLost", "SinkRunner", "error_text"]


class LeaseLost(CrdtsyncError):
    """The store refused to move the cursor: another process holds the sink's lease (the
    runner stands by; not retryable, the other process delivers)."""

    code = "lease_lost"
    status = 0


def error_text(exc: BaseException) -> str:
    """What a failure reads as in a sink's ``last_error`` and dead letters."""
    return exc.message if isinstance(exc, CrdtsyncError) else f"{type(exc).__name__}: {exc}"


class Backoff:
    """Delays before retries: ``base * 2**(attempt-1)`` seconds capped at ``cap``, then a
    random point between half of it and all of it (jitter: runners that failed together do
    not retry together)."""

    def __init__(self, base: float, cap: float, rand: Callable[[], float] = random.random
                 ) -> None:
        self.base = base
        self.cap = cap
        self._rand = rand

    def delay(self, attempt: int) -> float:
        """The delay after failed attempt number ``attempt`` (1, 2, ...)."""
        full = min(self.cap, self.base * 2.0 ** min(attempt - 1, MAX_EXPONENT))
        return full / 2 + self._rand() * full / 2


@dataclass(frozen=True, slots=True)
class Failure:
    """A delivery given up on: the last ``error`` after ``attempts`` attempts; ``rejected``
    when the destination refused it for good."""

    error: str
    attempts: int
    rejected: bool = False


class SinkRunner:
    """Delivers the feed to ``sink`` from feed cursor ``cursor`` until cancelled.

    ``sleep`` and ``rand`` are injectable for tests (delays are recorded, not waited). The
    runner owns ``sink``: it opens it (retrying with backoff) and closes it when it stops.
    ``state`` says what it is doing: ``opening``, ``standby`` (another process holds the
    lease), ``idle``, ``delivering``, ``backoff`` (waiting to retry), ``store error`` or
    ``stopped``. ``owner`` identifies this process's leases (default: a new id), ``lease_ttl``
    is their duration in seconds."""

    def __init__(self, store: DownstreamStore, notifier: FeedNotifier, config: SinkConfig,
                 sink: Sink, cursor: int, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random, owner: str | None = None,
                 lease_ttl: float = LEASE_TTL_S) -> None:
        self.store = store
        self.notifier = notifier
        self.config = config
        self.sink = sink
        self.cursor = cursor
        """Where reading goes on from; the stored cursor may trail it by skipped items."""
        self.state = "opening"
        self.backoff = Backoff(config.backoff, config.max_backoff, rand)
        self._sleep = sleep
        self._retry_pending = True  # dead letters a previous process was asked to retry
        self._stored = cursor
        self._skip_written = -SKIP_WRITE_S
        self.lease = SinkLease(store, config.name, owner or new_owner_id(), lease_ttl)
        self._term = 0  # the lease term the runner's cursor was read in
        self._last_read = -WAKE_SPACING_S  # monotonic time of the last read of the feed

    @property
    def name(self) -> str:
        return self.config.name

    def request_retry(self) -> None:
        """Dead letters were marked for a retry: look for them at the next step."""
        self._retry_pending = True

    async def run(self) -> None:
        """Open the sink, then deliver (renewing the lease) until cancelled; releases the
        lease and closes the sink on the way out."""
        keeper = asyncio.create_task(self.lease.keep(), name=f"crdtsync-lease-{self.name}")
        try:
            await self._open()
            while True:
                await self.step()
        finally:
            self.state = "stopped"
            await cancel_and_wait(keeper)
            await self._close()

    async def _close(self) -> None:
        try:
            await self.lease.release()
        except Exception:
            log.exception("sink %r: releasing the lease failed", self.name)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):  # a stop never hangs on a destination
                await self.sink.aclose()
        except Exception:
            log.exception("sink %r: closing failed", self.name)

    async def _open(self) -> None:
        attempt = 0
        while True:
            try:
                await self.sink.open()
                return
            except Exception as exc:
                attempt += 1
                with contextlib.suppress(CrdtsyncError):  # a failing store: still retry
                    await self._failed(exc)
            self.state = "backoff"
            await self._sleep(self.backoff.delay(attempt))
            self.state = "opening"

    async def step(self) -> bool:
        """Deliver (or dead-letter) one page, or wait for the feed to grow when there is
        nothing to deliver, or for the lease while another process holds it. Returns whether
        it handled items."""
        try:
            if not await self._hold_lease():
                return await self._stand_by()
            if await self._retry_dead_letters() or await self._deliver_page():
                return True
        except LeaseLost:  # before CrdtsyncError, its base
            log.warning("sink %r: another process took over its delivery", self.name)
            self.lease.lost()
            return await self._stand_by()
        except CrdtsyncError as exc:  # the store failed; nothing was lost: try again
            log.error("sink %r: %s", self.name, exc.message)
            self.state = "store error"
            await self._sleep(STORE_RETRY_S)
            return False
        self.state = "idle"
        await self._idle()
        return False

    async def _idle(self) -> None:
        """Wait for the feed to grow (a notification, or the poll interval), then let
        ``WAKE_SPACING_S`` pass since the last read: on a busy server one read serves the
        commits of that interval, instead of one read per commit per sink."""
        await self.notifier.wait(self.notifier.poll)
        rest = self._last_read + WAKE_SPACING_S - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)

    async def _hold_lease(self) -> bool:
        """Whether the lease is held (taken or renewed when due); once taken again, go on
        from the stored cursor and look for dead letters to retry."""
        if not await self.lease.hold():
            return False
        if self._term != self.lease.term:
            record = await self.store.get_sink(self.name)
            if record is None:  # deleted under the runner: its manager stops it
                self.lease.lost()
                return False
            self.cursor = self._stored = record.cursor
            self._retry_pending = True
            self._term = self.lease.term
        return True

    async def _stand_by(self) -> bool:
        self.state = "standby"
        await self._sleep(self.lease.period)
        return False

    async def _deliver_page(self) -> bool:
        self._last_read = time.monotonic()
        head = await self.store.feed_head()  # before the page: every item up to it is stored
        items = await self.store.read_feed(self.cursor, self.config.batch, self.config.where)
        if not items:  # at most items the filter skips: move past them
            self.cursor = max(self.cursor, head)
            await self._write_skip()
            return False
        full = len(items) == self.config.batch
        upto = items[-1].cursor if full else max(items[-1].cursor, head)
        await self._progress(upto, await self._handle(items))
        return True

    async def _progress(self, cursor: int, delivered: int) -> None:
        if not await self.store.sink_delivered(self.name, cursor, delivered, wall_ms(),
                                               self.lease.owner):
            raise LeaseLost
        self.cursor = self._stored = max(self.cursor, cursor)

    async def _write_skip(self) -> None:
        now = time.monotonic()
        if self.cursor > self._stored and now - self._skip_written >= SKIP_WRITE_S:
            self._skip_written = now
            await self._progress(self.cursor, 0)

    async def _handle(self, items: Sequence[FeedItem]) -> int:
        """Deliver ``items`` or dead-letter them; returns how many were delivered."""
        failure = await self._attempts(items)
        if failure is None:
            return len(items)
        if failure.rejected and len(items) > 1:
            delivered = 0
            for item in items:  # in order: only the refused items become dead letters
                delivered += await self._handle([item])
            return delivered
        if not await self.store.add_dead_letters(self.name, items, failure.error,
                                                 failure.attempts, wall_ms(), self.lease.owner):
            raise LeaseLost
        log.warning("sink %r: %d items dead-lettered after %d attempts: %s", self.name,
                    len(items), failure.attempts, failure.error)
        return 0

    async def _attempts(self, items: Sequence[FeedItem]) -> Failure | None:
        """Deliver ``items``, retrying with backoff; ``None`` once delivered."""
        attempt = 0
        while True:
            attempt += 1
            self.state = "delivering"
            try:
                await self.sink.deliver(items)
                return None
            except SinkRejected as exc:
                return Failure(await self._failed(exc), attempt, rejected=True)
            except Exception as exc:  # SinkError, or a sink's bug: both are retried
                error = await self._failed(exc)
                if attempt >= self.config.max_attempts:
                    return Failure(error, attempt)
            self.state = "backoff"
            await self._sleep(self.backoff.delay(attempt))

    async def _failed(self, exc: Exception) -> str:
        error = error_text(exc)
        if isinstance(exc, CrdtsyncError):
            log.warning("sink %r: %s", self.name, error)
        else:
            log.error("sink %r: unexpected error", self.name, exc_info=exc)
        await self.store.sink_failed(self.name, error, wall_ms())
        return error

    async def _retry_dead_letters(self) -> bool:
        if not self._retry_pending:
            return False
        letters = await self.store.list_dead_letters(self.name, limit=self.config.batch,
                                                     retrying=True)
        if not letters:
            self._retry_pending = False
            return False
        failure = await self._attempts([letter.item for letter in letters])
        ids = [letter.id for letter in letters]
        if failure is None:
            await self.store.finish_dead_letters(self.name, ids, wall_ms())
        else:
            await self.store.finish_dead_letters(self.name, ids, wall_ms(), failure.error,
                                                 failure.attempts)
        return True
