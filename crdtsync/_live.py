"""The live channel of a device: a long poll (``GET /v1/wake``) that tells the device to sync
as soon as the cloud committed something for it (docs/protocol.md 14a).

No data moves here: an answer only says *when* to sync, and the sync is the device's normal
round trip, run by its background loop (so syncs never overlap). The channel keeps the
server's cursor between requests, through failures too: after a backoff the server answers
at once if something happened meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from .errors import CrdtsyncError, NotFound, TooManyRequests
from .protocol import WakeSignal
from .transport import LiveTransport

log = logging.getLogger("crdtsync.device")

BACKOFF = (1.0, 60.0)
"""First and longest pause (seconds) after a failed wake request; full jitter."""
NO_CHANNEL_RETRY = 300.0
"""Seconds between wake requests to a server without the live channel (``404``): an older
server, where the device syncs at its interval only."""
RETRY_AFTER_JITTER = 0.2
"""A ``429``'s ``Retry-After`` is stretched by up to this fraction, at random, so that the
devices the server turned away do not come back all at once."""
MAX_LOGGED = 120
"""Characters of an error message a log line keeps."""

_sleep = asyncio.sleep
"""Every pause of the channel (tests replace it to observe the pauses chosen)."""


class LiveChannel:
    """The wake loop of one device: :meth:`run` until cancelled.

    ``sync_now`` asks the device's sync loop for a sync without its ``min_spacing`` and
    returns once that sync started: the next wake request goes out only then, so whatever
    the cloud commits after the answer is either in that sync or wakes the device again.
    """

    def __init__(self, device_id: str, transport: LiveTransport,
                 sync_now: Callable[[], Awaitable[None]], wait: float) -> None:
        self.device_id = device_id
        self.cursor: int | None = None
        """The cursor of the last answer, sent as ``after``; ``None`` until the first."""
        self.available = True
        """False once the server answered ``404`` (it has no live channel), until it has."""
        self.failures = 0
        self._reported: str | None = None
        """The failure last logged at warning level: its repeats are logged at debug."""
        self.resets = 0
        """Answers in a row that moved the cursor back (or woke without moving it)."""
        self._transport = transport
        self._sync_now = sync_now
        self._wait = wait

    async def run(self) -> None:
        """Send wake requests one after the other, until cancelled. Never raises: failures
        are logged (one short line each: a warning, then debug while the same failure
        repeats) and retried after a backoff."""
        while True:
            pause = await self.step()
            if pause > 0:
                await _sleep(pause)

    async def step(self) -> float:
        """One wake request and what its answer asks for (a sync, after its ``in``);
        returns the seconds to pause before the next request."""
        after = self.cursor
        try:
            signal = await self._transport.wake(after, self._wait)
        except NotFound:
            return self._no_channel()
        except CrdtsyncError as exc:
            return self._failed(exc)
        except Exception:  # a bug: logged with its traceback, the channel goes on
            log.exception("device %s: unexpected error in the live channel", self.device_id)
            return self._failed(None)
        if self.failures:
            log.info("device %s: live channel recovered after %d failed requests",
                     self.device_id, self.failures)
        self.failures, self._reported = 0, None
        self.available = True
        self.cursor = signal.cursor
        if self._wants_sync(signal, after):
            await self._before_sync(signal)
            await self._sync_now()
        return 0.0

    def _wants_sync(self, signal: WakeSignal, after: int | None) -> bool:
        """A sync after the first answer (things may have happened before it), after a
        wake, and after a reset: a cursor that went back, or a wake that did not move it
        (the server lost track, e.g. restored or replaced)."""
        if after is None:
            return True
        reset = signal.cursor < after or (signal.wake and signal.cursor == after)
        self.resets = self.resets + 1 if reset else 0
        return signal.wake or reset

    async def _before_sync(self, signal: WakeSignal) -> None:
        """Wait the ``in`` the server asked for (it spreads a fleet-wide wake), and back
        off on resets in a row: a server that keeps losing track must not make the device
        sync in a loop."""
        pause = signal.delay_ms / 1000
        if self.resets > 1:
            pause += full_jitter(self.resets - 1)
        if pause > 0:
            await _sleep(pause)

    def _no_channel(self) -> float:
        if self.available:
            log.info("device %s: the server has no live channel (404 on the wake request); "
                     "syncing at the interval, asking again every %.0fs", self.device_id,
                     NO_CHANNEL_RETRY)
        self.available = False
        return NO_CHANNEL_RETRY

    def _failed(self, exc: CrdtsyncError | None) -> float:
        """Count a failure and return the pause before the next request: a ``429``'s
        ``retry_after`` plus up to 20 %, else exponential backoff with full jitter (at
        once the longest for an error that resending does not heal: a revoked token, a
        disabled device)."""
        self.failures += 1
        retry_after = exc.retry_after if isinstance(exc, TooManyRequests) else None
        if retry_after is not None:
            delay = retry_after * (1 + random.uniform(0, RETRY_AFTER_JITTER))
        else:
            delay = full_jitter(self.failures if exc is None or exc.retryable else 64)
        if exc is not None:
            self._log_failure(f"{exc.code}: {exc.message[:MAX_LOGGED]}", delay)
        return delay

    def _log_failure(self, reason: str, delay: float) -> None:
        """One short line per failed request: at warning when ``reason`` differs from the
        failure logged before, at debug while it repeats (a server that stays down costs
        one warning, not one per retry)."""
        level = logging.DEBUG if reason == self._reported else logging.WARNING
        log.log(level, "device %s: live channel down (%s); retry in %.1fs", self.device_id,
                reason, delay)
        self._reported = reason


def full_jitter(failures: int) -> float:
    """Exponential backoff with full jitter: uniform in 0 .. min(60, 2**(failures-1)) s."""
    base, cap = BACKOFF
    return random.uniform(0, min(cap, base * 2.0 ** min(failures - 1, 32)))
