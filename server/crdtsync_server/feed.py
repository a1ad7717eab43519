"""The change feed on the server side: waking readers when it grows, reading it with long
polls, and building the state projection of documents stored before the feed existed.

The feed itself lives in the store (``store/feed.py``), written in the sync transaction.
A :class:`FeedNotifier` wakes this process's readers (long polls, SSE streams, sinks) right
after a commit that added items; readers also re-read every ``poll`` seconds, which is how
they see items committed by another server process on the same database.
"""

from __future__ import annotations

import asyncio
import time

from crdtsync import crdt
from crdtsync._aio import wait_event
from crdtsync.errors import CursorExpired
from crdtsync.protocol import STATE_DOC

from .documents import DocumentCache
from .store import FeedStore, Store
from .store.feed import FeedFilter, FeedItem

PROJECTION_SETTING = "projection_built"
"""Set once the projection holds every document stored before schema v4."""


class FeedNotifier:
    """Wakes the coroutines waiting for new feed items in this process."""

    def __init__(self, poll: float = 1.0) -> None:
        self.poll = poll
        """Seconds between re-reads when nothing wakes a reader (other processes' items)."""
        self._event = asyncio.Event()
        self.closed = False
        """Set at server shutdown: waiting readers return at once, streams end."""

    def close(self) -> None:
        """Server shutdown: release every waiting reader now (they would otherwise hold the
        shutdown for up to their wait time)."""
        self.closed = True
        self.notify()

    def notify(self) -> None:
        """Called after a commit that appended feed items."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        """Return at the next notification, or after ``min(seconds, poll)`` seconds."""
        await wait_event(self._event, min(seconds, self.poll))


async def check_cursor(store: FeedStore, after: int) -> None:
    """:class:`CursorExpired` when items after ``after`` were purged (0 means "from the
    oldest item kept" and never expires)."""
    if after > 0 and after < (floor := await store.feed_floor()):
        raise CursorExpired(f"feed items after cursor {after} were purged (up to {floor}):"
                            " resume from 0 or a cursor at or above the floor",
                            {"after": str(after), "floor": str(floor)})


async def read_feed(store: FeedStore, notifier: FeedNotifier, after: int, limit: int,
                    where: FeedFilter, wait: float) -> list[FeedItem]:
    """Items after ``after``; when there are none, wait up to ``wait`` seconds for some.
    :class:`CursorExpired` if items after ``after`` were purged (checked after each read:
    the floor only grows, so a read it does not expire missed nothing)."""
    deadline = time.monotonic() + wait
    while True:
        items = await store.read_feed(after, limit, where)
        await check_cursor(store, after)
        remaining = deadline - time.monotonic()
        if items or remaining <= 0 or notifier.closed:
            return items
        await notifier.wait(remaining)


async def build_projection(store: Store, docs: DocumentCache, now: int,
                           page: int = 500) -> int:
    """Fill the projection from every device's stored document, once (after an upgrade to
    schema v4); later changes keep it up to date. Returns how many documents were read."""
    if await store.get_setting(PROJECTION_SETTING) is not None:
        return 0
    count, after = 0, ""
    while batch := await store.list_devices(after=after, limit=page):
        for device in batch:
            key = f"{device.id}/{STATE_DOC}"
            async with docs.lock(device.id):
                state = crdt.to_json((await docs.get(key)).doc)
                await store.replace_projection(device.id, STATE_DOC, state, now)
            count += 1
        after = batch[-1].id
    await store.set_setting(PROJECTION_SETTING, str(now))
    return count
