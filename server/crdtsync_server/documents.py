"""Live documents: the server's bounded in-memory cache of CRDT documents over the store.

A :class:`LiveDoc` is a pycrdt ``Doc`` rebuilt from the store plus the id of the last logged
update it reflects, and the stamps of its keys (who wrote each key last, and when: the
latest-write-wins decision, ``crdtsync_server.stamps``). Before every use it catches up with
rows other writers appended (``read_since``) and rereads the stamps when another process
may have written, so several server processes can share one database. Updates are applied in
memory first (that validates them), committed by the caller, and the document is evicted if
the commit fails, so memory never holds what the store does not. Compaction by id range is
triggered here once enough rows piled up, and so is the rebuild of a document (a device's
``state`` or a shared one) into its next generation once its history outweighs its content
(:meth:`DocumentCache.maybe_rebuild`, docs/architecture.md "Generations").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from pycrdt import Doc, TransactionEvent, merge_updates

from crdtsync import crdt
from crdtsync.errors import CrdtsyncError, Unavailable

from .store import DocumentStore, DocWrite, KeyStamp

log = logging.getLogger("crdtsync.server")


RETIRE_GRACE = 60.0
"""Seconds an evicted document keeps its observers, for a sync that still holds it."""

DEFAULT_REBUILD_FACTOR = 2.0
DEFAULT_REBUILD_SLACK = 1024
"""A document is rebuilt when its encoded size exceeds ``factor * fresh + slack`` bytes,
``fresh`` being the size of a fresh document with the same content."""

GENERATION_LIMIT = 2**32
"""Documents are rebuilt only into generations below this: the ``g`` answered for a shared
document packs its stored generation into 32 bits (``sync.shared_generation``). No real
document gets near it (each rebuild needs ``max(slack, fresh)`` bytes of new history)."""


ANSWER_MEMO_BYTES = 512
"""Largest diff a document keeps as its last answer (:attr:`LiveDoc.answered`): the answer
of a device that is up to date is the document's delete set, tens of bytes; a whole
document, answered to a device that adopts it, is not kept (memory per hot document)."""


class LiveDoc:
    """One document held in memory. ``capture()`` returns the effective update of the writes
    since the last call: a replayed update changes nothing and yields ``b""``."""

    def __init__(self, key: str, doc: Doc[Any], gen: int, last_id: int, rows: int,
                 stamps: Iterable[KeyStamp] = ()) -> None:
        self.key = key
        self.doc = doc
        self.gen = gen
        self.last_id = last_id
        self.rows = rows  # logged rows not folded into the snapshot
        self.stamps: dict[tuple[str, str], KeyStamp] = {}
        """The stored stamp of each ``(map, key)`` that has one, as of the last read or
        commit: changed only by :meth:`stamped` after a commit returned, and reread from the
        store by the cache when another process may have written."""
        self.stamped(stamps)
        self.seen: int | None = None
        """The store's ``external_writes`` before this document was last read from it."""
        self.used = 0.0
        """When the cache last handed this document out (its clock)."""
        self.closed = False
        self.state: bytes | None = None
        """The document's state vector as last answered to a device, while the document has
        not changed since (every change clears it, :meth:`_on_update`): the next sync's
        check of its update's dependencies reads it from here instead of the document."""
        self.answered: tuple[bytes, bytes, bytes] | None = None
        """``(base, update, state)``: the last answer's diff against the state vector
        ``base`` and the document's state vector, while the document has not changed since
        (every change clears it, :meth:`_on_update`), and only when the diff is at most
        :data:`ANSWER_MEMO_BYTES`: a device that holds what the last one held is answered
        without reading the document again (``sync.answer_entry``)."""
        self._captured: list[bytes] = []
        self._subscription = doc.observe(self._on_update)  # once per document lifetime
        self.changes = crdt.ChangeTracker(doc)
        """Keys changed since the last capture: what the feed and the projection record."""
        self.adopts = gen > 0
        """Every holder of this document can take a new generation. For a device's document:
        the latest sync of it through this process carried ``a``, or, until one did, the
        document was rebuilt before (a device that cannot adopt cannot sync it at all then).
        For a shared document: always (every device replaces its copy when the ``g``
        answered changes, protocol section 8), set by ``SyncService.write_shared``. Only
        such a document is rebuilt, also by cloud writes alone and after a restart."""
        self.grown = 0
        """Bytes of updates captured since the last rebuild check."""
        self.fresh_size: int | None = None
        """Size of the rebuilt document as last measured (at the first check after a load,
        then whenever the size passed the bound it gave, :meth:`DocumentCache.maybe_rebuild`);
        ``None``: not checked since loaded (the next check is due at once)."""

    def _on_update(self, event: TransactionEvent) -> None:
        self.state = None
        self.answered = None
        self._captured.append(event.update)

    def close(self) -> None:
        """Remove the observers, which would otherwise keep the document in memory forever
        (pycrdt holds them on the Rust side). A closed document cannot capture writes."""
        if not self.closed:
            self.closed = True
            self.doc.unobserve(self._subscription)
            self.changes.close()

    def capture(self) -> bytes:
        if self.closed:  # never acknowledge a write that was not captured
            raise Unavailable("the document was evicted while in use; sync again",
                              {"doc": self.key})
        captured, self._captured = self._captured, []
        if not captured:
            return b""
        update = captured[0] if len(captured) == 1 else merge_updates(*captured)
        self.grown += len(update)
        return update

    def write(self, update: bytes | None = None) -> DocWrite:
        """The store write of ``update`` (default: :meth:`capture`) at this document's
        generation, with the highest update id it reflects (when it was ever stored)."""
        return DocWrite(self.key, self.capture() if update is None else update, self.gen,
                        self.last_id or None)

    def catch_up(self, rows: tuple[tuple[int, bytes], ...]) -> None:
        for row_id, update in rows:
            self.doc.apply_update(update)
            self.last_id = max(self.last_id, row_id)
            self.rows += 1
        self.capture()  # what we just read is already stored
        self.changes.discard()  # and its changes were fed by their writer

    def stamped(self, rows: Iterable[KeyStamp]) -> None:
        """Record stamp rows the store holds (read, or just committed)."""
        for row in rows:
            self.stamps[(row.map, row.key)] = row

    def committed(self, update_id: int, prev_id: int) -> None:
        """Record that the captured write was stored as row ``update_id`` when the stored
        document reflected rows up to ``prev_id``.

        ``last_id`` moves only when no other writer slipped a row in between (``prev_id`` is
        what we hold); otherwise the next use catches up, re-reading our own row too, which
        is harmless (updates are idempotent).
        """
        if prev_id <= self.last_id:
            self.last_id = update_id
        else:
            self.seen = None  # force the catch-up
        self.rows += 1


class _KeyLock:
    """One key's lock of :meth:`DocumentCache.lock`, counting who holds or awaits it: the
    last one out removes it from ``locks``. A class, not a generator-based context manager:
    every sync takes one, and this costs a third of that."""

    __slots__ = ("key", "lock", "locks", "users")

    def __init__(self, locks: dict[str, _KeyLock], key: str) -> None:
        self.locks = locks
        self.key = key
        self.lock = asyncio.Lock()
        self.users = 0

    async def __aenter__(self) -> None:
        try:
            await self.lock.acquire()
        except BaseException:  # cancelled while waiting: no longer a user
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.lock.release()
        self._leave()

    def _leave(self) -> None:
        self.users -= 1
        if not self.users:
            del self.locks[self.key]


class DocumentCache:
    """LRU cache of :class:`LiveDoc` keyed by document key, with one lock per key.

    All writes to a document go through ``async with cache.use(key) as live`` so that syncs
    of one device are serialised and the cache never holds two instances of one document.
    """

    def __init__(self, store: DocumentStore, client_id: int, *, capacity: int = 1000,
                 compact_every: int = 500, rebuild_factor: float = DEFAULT_REBUILD_FACTOR,
                 rebuild_slack: int = DEFAULT_REBUILD_SLACK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.client_id = client_id
        self.capacity = capacity
        self.compact_every = compact_every
        if 0 < rebuild_factor < 1 or rebuild_slack < 0:
            raise ValueError("rebuild_factor must be 0 (off) or at least 1, rebuild_slack"
                             " at least 0")
        self.rebuild_factor = rebuild_factor
        """A document is rebuilt when it is over ``rebuild_factor * fresh + rebuild_slack``
        bytes; 0 (or less) disables rebuilds."""
        self.rebuild_slack = rebuild_slack
        self.rebuilds = 0
        """Documents this cache rebuilt into a new generation (a metric)."""
        self.rebuild_failures = 0
        """Rebuilds the store failed (an error, not a lost race); each is retried later."""
        self.compactions = 0
        """Logs this cache folded into a snapshot (a metric)."""
        self.compaction_failures = 0
        self._clock = clock
        self._docs: OrderedDict[str, LiveDoc] = OrderedDict()  # least recently used first
        self._retired: list[LiveDoc] = []
        """Dropped from the cache but perhaps still in use by a sync in flight: closed once
        they have been out of the cache for ``RETIRE_GRACE`` seconds."""
        self._locks: dict[str, _KeyLock] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def lock(self, key: str) -> _KeyLock:
        """``async with cache.lock(key):`` holds the lock of ``key`` (serialises every writer
        of one device or document). A key's lock exists while someone holds or awaits it."""
        held = self._locks.get(key)
        if held is None:
            held = self._locks[key] = _KeyLock(self._locks, key)
        held.users += 1
        return held

    async def get(self, key: str) -> LiveDoc:
        """The live document ``key``, loaded or caught up with the store. Call under its lock."""
        live = self._docs.get(key)
        if live is None:
            live = await self._load(key)
            self._docs[key] = live
            self._evict_over_capacity()
            return live
        self._docs.move_to_end(key)
        live.used = self._clock()
        seen = self.store.external_writes
        if seen is not None and seen == live.seen:
            return live  # nobody else wrote since we last read: nothing to catch up
        rows = await self.store.read_since(key, live.last_id)
        if rows is None:  # another writer compacted past what we hold: reload
            self._retire(live)
            live = self._docs[key] = await self._load(key)
        else:
            live.catch_up(rows)
            # Reread even without new rows: a cloud write of another process may have
            # stamped keys without changing the document (a delete of an absent key).
            live.stamps = {}
            live.stamped(await self.store.read_stamps(key))
            live.seen = seen
        return live

    async def _load(self, key: str) -> LiveDoc:
        seen = self.store.external_writes
        log = await self.store.load_doc(key, stamps=True)  # one store call, not two
        doc = crdt.new_doc(self.client_id, log.snapshot, (u for _, u in log.updates))
        live = LiveDoc(key, doc, log.gen, log.last_id, len(log.updates), log.stamps)
        live.seen = seen
        live.used = self._clock()
        return live

    def _evict_over_capacity(self) -> None:
        while len(self._docs) > self.capacity:
            self._retire(self._docs.popitem(last=False)[1])

    def _retire(self, live: LiveDoc) -> None:
        live.used = self._clock()
        self._retired.append(live)

    def evict_idle(self, idle: float) -> int:
        """Drop the documents not used for ``idle`` seconds (they are in the store; the next
        sync reloads them): idle devices cost no document memory. Returns how many went."""
        now = self._clock()
        gone = 0
        while self._docs:
            key, live = next(iter(self._docs.items()))
            if live.used > now - idle:
                break
            del self._docs[key]
            live.close()
            gone += 1
        keep = [live for live in self._retired if live.used > now - RETIRE_GRACE]
        for live in self._retired:
            if live.used <= now - RETIRE_GRACE:
                live.close()
        self._retired = keep
        return gone

    def evict(self, key: str) -> None:
        """Forget ``key`` (after a failed commit: memory may hold what the store does not)."""
        live = self._docs.pop(key, None)
        if live is not None:
            self._retire(live)

    async def after_commit(self, live: LiveDoc) -> None:
        """Maintenance after a write to ``live`` was committed (or a sync found nothing to
        commit), under the document's lock: rebuild it if due, else compact it if due.
        Never raises for a store failure: both are logged and retried later."""
        if not await self.maybe_rebuild(live):
            await self.maybe_compact(live)

    def _rebuild_due(self, live: LiveDoc) -> bool:
        """The cheap test before a rebuild check: rebuilds are on, the document's holders can
        adopt, its next generation is below ``GENERATION_LIMIT``, it is still the cached
        copy, and it grew by at least ``max(slack, fresh)`` bytes since the last check (or
        was not checked since loaded). Until then the document cannot have gone much over
        ``factor * fresh + slack``, so a check, which costs about one encoding of the
        document, is paid once per that many bytes."""
        if (self.rebuild_factor <= 0 or not live.adopts or live.gen + 1 >= GENERATION_LIMIT
                or self._docs.get(live.key) is not live):
            return False
        return live.fresh_size is None or live.grown >= max(self.rebuild_slack, live.fresh_size)

    async def maybe_rebuild(self, live: LiveDoc) -> bool:
        """Rebuild ``live`` into generation ``gen + 1`` when its encoded size is over
        ``rebuild_factor * fresh + rebuild_slack`` bytes, ``fresh`` being the size of
        ``crdt.rebuilt(doc)`` (the same content, none of the history, a new random client
        id) as last measured: building it costs several times the size's encoding, so it
        is built at the first check after a load and then only when the size passes the
        bound the last measure gave (a document whose content shrank since is rebuilt once
        its size passes its former content's bound; with devices that adopt, 3.5 checks
        per rebuild had built it each time). Call under the document's lock with ``live``
        equal to what the store holds (after a commit). Only documents whose holders can
        take a new generation are rebuilt (:attr:`LiveDoc.adopts`: a device's document
        whose device adopts, and every shared document).

        The store's compare-and-set (:meth:`Store.rebuild`) is the only step that changes
        anything, so a crash at any point leaves either generation ``gen`` or ``gen + 1``
        whole. On success the old document is retired and the cache holds generation
        ``gen + 1`` as stored; returns ``True``. A lost race (another writer appended) or a
        store error is logged and retried at the next check (after as many bytes again, so
        a store that keeps failing costs no more than the checks), never reported to a
        device."""
        if not self._rebuild_due(live):
            return False
        size = len(live.doc.get_update())
        live.grown = 0
        if live.fresh_size is not None and size <= self._bound(live.fresh_size):
            return False  # under the bound of the fresh size last measured
        fresh = crdt.rebuilt(live.doc, crdt.random_client_id()).get_update()
        live.fresh_size = len(fresh)
        if size <= self._bound(len(fresh)):
            return False
        return await self.rebuild(live, fresh, size)

    def _bound(self, fresh_size: int) -> float:
        """The size over which a document whose content encodes in ``fresh_size`` bytes is
        rebuilt."""
        return self.rebuild_factor * fresh_size + self.rebuild_slack

    async def rebuild(self, live: LiveDoc, fresh: bytes | None = None,
                      size: int | None = None) -> bool:
        """Rebuild ``live`` into generation ``gen + 1`` now, whatever its size (``fresh``:
        the new generation's update if already built; ``size``: the document's encoded size
        if already measured, for the log). The same contract as :meth:`maybe_rebuild` once
        it decided; the simulator forces rebuilds through it."""
        if fresh is None:
            fresh = crdt.rebuilt(live.doc, crdt.random_client_id()).get_update()
        if size is None:
            size = len(live.doc.get_update())
        seen = self.store.external_writes
        try:
            snapshot_id = await self.store.rebuild(live.key, live.gen, live.last_id, fresh)
        except CrdtsyncError as exc:
            self.rebuild_failures += 1
            log.error("rebuild of %s failed, will retry: %s", live.key, exc.message)
            return False
        if snapshot_id is None:
            log.info("rebuild of %s lost to another writer, will retry", live.key)
            return False
        self.rebuilds += 1
        log.info("rebuilt %s into generation %d: %d -> %d bytes", live.key, live.gen + 1,
                 size, len(fresh))
        self.evict(live.key)
        self._cache_rebuilt(live, fresh, snapshot_id, seen)
        return True

    def _cache_rebuilt(self, old: LiveDoc, fresh: bytes, snapshot_id: int,
                       seen: int | None) -> None:
        """Cache generation ``old.gen + 1`` as just stored: ``fresh`` at ``snapshot_id``,
        with the stamps of ``old`` (stamps are per key and survive a rebuild), as a load
        would give it, without reading it back. ``seen`` is the store's
        ``external_writes`` before the rebuild: another writer's commit noticed meanwhile
        makes the next use catch up."""
        live = LiveDoc(old.key, crdt.new_doc(self.client_id, fresh), old.gen + 1, snapshot_id,
                       0, old.stamps.values())
        live.seen, live.used = seen, self._clock()
        live.adopts, live.fresh_size = True, len(fresh)
        self._docs[old.key] = live
        self._evict_over_capacity()

    async def maybe_compact(self, live: LiveDoc) -> bool:
        """Fold the log of ``live`` into a snapshot once ``compact_every`` rows piled up.

        Runs after a sync committed: a failure is logged and retried at the next write, never
        reported to the device (its data is stored; only the log stays longer)."""
        if live.rows < self.compact_every:
            return False
        try:
            await self.store.compact(live.key, live.last_id, live.doc.get_update())
        except CrdtsyncError as exc:
            self.compaction_failures += 1
            log.error("compaction of %s failed, will retry: %s", live.key, exc.message)
            return False
        self.compactions += 1
        live.rows = 0
        return True
