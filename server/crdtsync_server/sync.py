"""The server side of one sync, and cloud-side state writes, over the document cache and store.

Order of one sync (docs/protocol.md, "Server processing"): read each update with the bounded
reader (``crdtsync.yupdate``, before pycrdt sees it); take the device's lock; for each
document check name and generation and apply the device's update to the live document
unless it builds on items the document lacks, then check what it changed (rejects corrupt
or invalid updates with nothing applied); commit the effective updates, the new events
and the device's bookkeeping in one transaction; only then answer with the server's delta
against the device's state vector and the highest stored seq. Any failure before the commit
returns an error and evicts the touched documents, so nothing unstored is ever acknowledged.
A ``state`` entry of another generation than the stored one is refused
(``generation_mismatch``) unless it carries ``a`` (the device can adopt): then its update
is left out and its answer is the whole stored generation (protocol section 8). After the
answer, the document cache may compact or rebuild the documents (``DocumentCache``); after a
cloud write, shared documents too (their ``g``: :func:`shared_generation`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from crdtsync import crdt, hlc
from crdtsync._fastinit import fast_init
from crdtsync.errors import Forbidden, GenerationMismatch, NotFound, UnknownDocument
from crdtsync.protocol import (
    DEVICE_DOC_NAMES,
    FLEET_DOC,
    PROJECT_DOC,
    SHARED_DOC_NAMES,
    STATE_DOC,
    STATE_MAP,
    DocSync,
    DownItem,
    Outcome,
    SyncRequest,
    SyncResponse,
    parse_state_vector,
)
from crdtsync.schema import StateSchema
from crdtsync.yupdate import UpdateInfo, read_update

from . import stamps
from .documents import ANSWER_MEMO_BYTES, GENERATION_LIMIT, DocumentCache, LiveDoc
from .feed import FeedNotifier
from .metrics import COMMIT_BUCKETS, Histogram
from .notify import DeviceNotifier
from .proxied.dispatch import ProxyRunner
from .store import (
    WAKE_EVERYONE,
    CommitResult,
    DeviceRecord,
    DocWrite,
    KeyStamp,
    Store,
    SyncWrite,
    wake_device,
    wake_fleet,
)
from .store.feed import ConflictRecord, StateChange
from .store.records import CommandResult, ProxyRequest

log = logging.getLogger("crdtsync.server")

EMPTY_UPDATE = b"\x00\x00"
EMPTY_STATE_VECTOR = b"\x00"


def doc_key(device_id: str, doc: str) -> str:
    """Store key of a device's document: ``"<device>/<doc>"``."""
    return f"{device_id}/{doc}"


def fleet_key(fleet: str) -> str:
    """Store key of a fleet's shared document."""
    return f"fleet:{fleet}"


def wake_target(key: str) -> str:
    """Whose live channel a cloud write of document ``key`` wakes: the device of
    ``"<device>/<doc>"``, the fleet of ``"fleet:<f>"``, everyone for ``"project"``."""
    if key == PROJECT_DOC:
        return WAKE_EVERYONE
    if key.startswith("fleet:"):
        return wake_fleet(key.removeprefix("fleet:"))
    return wake_device(key.partition("/")[0])


def shared_key(device: DeviceRecord, name: str) -> str | None:
    """Store key of the shared document ``name`` for ``device`` (None: it has no fleet)."""
    if name == PROJECT_DOC:
        return PROJECT_DOC
    return fleet_key(device.fleet) if device.fleet else None


def shared_generation(name: str, fleet_gen: int, doc_gen: int) -> int:
    """The ``g`` answered to a device for shared document ``name`` stored at generation
    ``doc_gen``: ``fleet_gen * 2**32 + doc_gen`` for ``fleet`` (``fleet_gen`` is the
    device's fleet assignment counter; a device without a fleet has ``doc_gen`` 0), and
    ``doc_gen`` for ``project``.

    A device holds a copy under the ``g`` it was answered and replaces it whenever the
    ``g`` answered differs (protocol section 8), so ``g`` must differ for every other
    document or generation: each fleet assignment of one device has its own ``fleet_gen``
    and each rebuild its own ``doc_gen``, and the pair maps to ``g`` one to one while
    ``doc_gen < 2**32`` (the cache rebuilds no further: ``GENERATION_LIMIT``) and
    ``fleet_gen < 2**31`` (fewer moves of one device than that), which also keeps ``g`` within
    the protocol's ``2**63 - 1``. A sum would not do: fleet A at (1, 3) and fleet B at
    (2, 2) would share ``g``."""
    return fleet_gen * GENERATION_LIMIT + doc_gen if name == FLEET_DOC else doc_gen


OFF_LOOP_BYTES = 64 * 1024
"""Updates at least this large are read on a worker thread: a 4 MiB update takes the pure
reader about 2 s, which must not stall every other connection (the C reader of
``crdtsync._speedups``, where built, takes about 10 ms and holds the GIL either way)."""


async def read_bounded(part: DocSync) -> UpdateInfo | None:
    """``read_update`` of the part's update (``None`` when it has none), large ones off the
    event loop. Raises ``CorruptUpdate``/``InvalidValue`` (protocol 7a)."""
    if not part.update:
        return None
    if len(part.update) < OFF_LOOP_BYTES:
        return read_update(part.update, doc=part.doc)
    return await asyncio.to_thread(read_update, part.update, doc=part.doc)


def answer_entry(part: DocSync, live: LiveDoc, gen: int) -> DocSync:
    """The response entry for request entry ``part`` of the document ``live`` answered at
    generation ``gen``: the server's state vector, and what the device lacks, that is the
    diff against ``part.sv`` when the device holds generation ``gen``, else the whole
    document (the diff against an empty one; the ``sv`` sent belongs to another
    generation). ``u`` is left out when empty. A device that sends the state vector the
    last answer of the unchanged document was computed for gets that answer again
    (:attr:`LiveDoc.answered`: the shared documents, held alike by every device, and
    no-change syncs)."""
    base = part.sv if part.gen == gen else EMPTY_STATE_VECTOR
    memo = live.answered
    if memo is not None and memo[0] == base:
        update, state = memo[1], memo[2]
    else:
        doc = live.doc
        with doc.transaction():  # one transaction for both reads, not one each
            update = doc.get_update(base)
            state = doc.get_state()
        if len(update) <= ANSWER_MEMO_BYTES:
            live.answered = (base, update, state)
    return DocSync(part.doc, state, b"" if update == EMPTY_UPDATE else update, gen)


@fast_init
@dataclass(frozen=True, slots=True)
class Applied:
    """What one document entry of a sync did: the effective update to store, the keys whose
    value it changed (``None``: none), the stamps it decided and the conflicts it found."""

    write: DocWrite
    change: StateChange | None = None
    stamps: tuple[KeyStamp, ...] = ()
    conflicts: tuple[ConflictRecord, ...] = ()


SchemaSource = Callable[[DeviceRecord], Awaitable[StateSchema]]
"""The state schema a device is held to: each key's merge policy and allowed values."""


async def no_schema(device: DeviceRecord) -> StateSchema:
    """Every device is held to the empty schema: everything allowed, every key ``latest``."""
    return StateSchema.empty()


@fast_init
@dataclass(frozen=True, slots=True)
class Merge:
    """What deciding the stamped writes of one sync needs: the device's schema (each key's
    policy) and the sync's clocks."""

    schema: StateSchema
    clocks: stamps.Clocks


class SyncService:
    """Applies sync requests and cloud writes; the HTTP layer only authenticates and codes.

    ``clock`` is the server's wall clock in ms (injectable: tests move it instead of
    sleeping); every time the service records or answers comes from it, and so do the
    stamps of its hybrid logical clock (:attr:`hlc`), which decide "latest write wins"
    (``crdtsync_server.stamps``)."""

    def __init__(self, store: Store, docs: DocumentCache, proxy: ProxyRunner | None = None,
                 *, proxy_budget: float = 1.0, max_items: int = 100,
                 notifier: FeedNotifier | None = None,
                 results: DeviceNotifier | None = None,
                 clock: Callable[[], int] = hlc.wall_ms,
                 schema_for: SchemaSource = no_schema) -> None:
        self.clock = clock
        self.schema_for = schema_for
        """The schema of a device: the merge policy of each key of its ``state`` document
        (``crdtsync_server.stamps.decide``). Only asked for a sync that writes something."""
        self.hlc = hlc.HybridClock(clock)
        """Stamps cloud writes and bounds device stamps; every answered ``time`` is the
        millisecond of one of its stamps, so it is at or after every stamp issued before."""
        self.store = store
        self.notifier = notifier
        """Woken after a commit that added feed items (events or document changes)."""
        self.results = results
        """Woken for a device after a commit that stored results of its commands (a command
        that expires is seen by waiters at their next fallback poll)."""
        self.docs = docs
        self.proxy = proxy
        self.proxy_budget = proxy_budget
        """Seconds a sync waits for the requests it brought, to answer with their outcome."""
        self.max_items = max_items
        self.events = 0
        """Events stored by syncs (replays not counted): a metric, like the next three."""
        self.device_changes = 0
        self.cloud_changes = 0
        self.conflicts = 0
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        """Time of each :meth:`Store.commit` (``crdtsync_store_commit_duration_seconds``)."""
        self._touched: dict[str, int] = {}
        """``last_sync`` of syncs that changed nothing, not yet in the store."""

    async def sync(self, device: DeviceRecord, request: SyncRequest) -> SyncResponse:
        """Run one sync for an authenticated ``device``; raises a typed error with nothing
        stored, or returns a response describing only committed data."""
        received = self.clock()
        for part in request.docs:
            if part.doc not in DEVICE_DOC_NAMES:
                raise UnknownDocument(f"document {part.doc!r} is not served to devices",
                                      {"doc": part.doc})
        own = [p for p in request.docs if p.doc == STATE_DOC]
        shared = [p for p in request.docs if p.doc in SHARED_DOC_NAMES]
        for part in shared:
            if part.update:
                raise Forbidden(f"the {part.doc} document is read-only for devices; nothing "
                                "was applied", {"doc": part.doc})
        infos = [await read_bounded(part) for part in own]  # before any lock or document
        # A sync that writes nothing (most of them) pays for no schema and no stamp.
        merges = any(p.update or p.stamps for p in own)
        schema = await self.schema_for(device) if merges else None
        async with self.docs.lock(device.id):
            lives = [await self.docs.get(doc_key(device.id, p.doc)) for p in own]
            context = None if schema is None else Merge(schema, stamps.Clocks(
                self.hlc.now(), 0 if request.clock is None else received - request.clock,
                self.last_sync(device)))
            try:
                applied = [self._apply(device.id, live, part, info, context)
                           for live, part, info in zip(lives, own, infos, strict=True)]
                write = self._write(device, request, applied)
                if schema is not None:
                    for live, part, done in zip(lives, own, applied, strict=True):
                        if part.gen == live.gen:  # refused whole: the caller evicts below
                            schema.check_device_update(
                                done.change.changes if done.change else {}, part.stamps,
                                doc=part.doc)
                result = (self._unchanged(device, write) if self._idle(device, write)
                          else await self._commit(write))
            except BaseException:
                for live in lives:
                    self.docs.evict(live.key)
                raise
            self._committed(lives, applied, result)
            self.events += result.stored
            self.device_changes += len(write.changes)
            self.conflicts += len(write.conflicts)
            if self.notifier is not None and (result.stored or write.changes):
                self.notifier.notify()
            if write.results and self.results is not None:
                self.results.notify(device.id)
            if request.calls and self.proxy is not None:
                # All of them, not only the new ones: a request stored by a commit whose
                # process died before claiming it is still pending, and is claimed now.
                await self.proxy.run(device.id, [c.id for c in request.calls],
                                     self.proxy_budget)
            answers = [self._answer(live, part) for live, part in zip(lives, own, strict=True)]
            answers += [await self._answer_shared(device, part) for part in shared]
            response = SyncResponse(
                docs=tuple(answers),
                acked=result.last_seq, time=hlc.stamp_ms(self.hlc.now()),
                down=await self._downlink(device, result.down_done),
                down_done=result.down_done,
                accepted=tuple(call.id for call in request.calls),
                outcomes=await self._outcomes(device, request),
                conflicts=tuple(c.conflict for a in applied for c in a.conflicts),
            )
            for live in lives:
                await self.docs.after_commit(live)
        return response

    async def _commit(self, write: SyncWrite) -> CommitResult:
        """``Store.commit``, timed: the store transaction latency, measured at the interface
        so that every backend is measured alike."""
        started = time.perf_counter()
        try:
            return await self.store.commit(write)
        finally:
            self.commit_seconds.observe(time.perf_counter() - started)

    def _write(self, device: DeviceRecord, request: SyncRequest, applied: list[Applied]
               ) -> SyncWrite:
        now = self.clock()
        return SyncWrite(
            device=device.id, time=now, docs=[a.write for a in applied if a.write.update],
            events=request.events, purged=request.purged, down_done=request.down_done,
            results=[CommandResult(r.seq, r.ok, r.value, r.error) for r in request.results],
            requests=[ProxyRequest(device.id, c.id, c.route, c.body, now)
                      for c in request.calls],
            outcomes_acked=request.outcomes_acked,
            changes=[a.change for a in applied if a.change is not None],
            stamps=[row for a in applied for row in a.stamps],
            conflicts=[c for a in applied for c in a.conflicts],
        )

    async def _answer_shared(self, device: DeviceRecord, part: DocSync) -> DocSync:
        """The device's copy of a shared document: a diff, or the whole document when its
        ``g`` changed (:func:`shared_generation`: the device changed fleet, or the document
        was rebuilt)."""
        key = shared_key(device, part.doc)
        if key is None:
            return DocSync(part.doc, EMPTY_STATE_VECTOR, b"",
                           shared_generation(part.doc, device.fleet_gen, 0))
        async with self.docs.lock(key):
            live = await self.docs.get(key)
            return answer_entry(part, live,
                                shared_generation(part.doc, device.fleet_gen, live.gen))

    @staticmethod
    def _idle(device: DeviceRecord, write: SyncWrite) -> bool:
        """True when committing ``write`` would only move ``last_sync`` (a no-change sync)."""
        return not (write.docs or write.events or write.results or write.requests
                    or write.outcomes_acked or write.down_done > device.down_done
                    or write.stamps or write.conflicts)

    def _unchanged(self, device: DeviceRecord, write: SyncWrite) -> CommitResult:
        """What the commit would have answered; ``last_sync`` is recorded in batches by
        :meth:`flush_touches` instead of paying an fsync per no-change sync."""
        self._touched[device.id] = write.time
        return CommitResult(last_seq=device.last_seq, down_done=device.down_done)

    async def flush_touches(self) -> None:
        """Store the ``last_sync`` of recent no-change syncs (one transaction)."""
        if self._touched:
            touched, self._touched = self._touched, {}
            try:
                await self.store.touch_devices(touched)
            except BaseException:
                for device, time in touched.items():
                    self._touched[device] = max(time, self._touched.get(device, 0))
                raise

    def last_sync(self, device: DeviceRecord) -> int:
        """The device's ``last_sync`` (ms, 0 if never) counting a no-change sync not yet
        flushed."""
        return max(device.last_sync or 0, self._touched.get(device.id, 0))

    def with_recent_sync(self, device: DeviceRecord) -> DeviceRecord:
        """``device`` with a no-change sync not yet flushed counted in ``last_sync``."""
        touched = self._touched.get(device.id)
        if touched is None or (device.last_sync or 0) >= touched:
            return device
        return dataclasses.replace(device, last_sync=touched)

    async def _outcomes(self, device: DeviceRecord, request: SyncRequest
                        ) -> tuple[Outcome, ...]:
        """Outcomes the device has not acknowledged: only looked up when it sent requests or
        says it awaits some (a no-change sync costs no query)."""
        if not (request.calls or request.awaiting):
            return ()
        rows = await self.store.undelivered_outcomes(device.id, self.max_items)
        return tuple(Outcome(r.id, r.outcome or {}) for r in rows)

    async def _downlink(self, device: DeviceRecord, down_done: int) -> tuple[DownItem, ...]:
        """Messages and commands to send: only looked up when the device has any (as of
        this request's start; an item queued meanwhile rides on the next sync)."""
        if device.down_seq <= down_done:
            return ()
        items = await self.store.pending_downlink(device.id, self.clock(), self.max_items)
        return tuple(DownItem(i.seq, i.kind, i.name, i.body, i.expires or 0) for i in items)

    def _apply(self, device: str, live: LiveDoc, part: DocSync, info: UpdateInfo | None,
               context: Merge | None) -> Applied:
        """Apply the device's update (read and checked as ``info``) to ``live``, then decide
        its stamped writes (``crdtsync_server.stamps``): the effective update to store (the
        device's and the server's fix-ups), the keys whose value changed, their stamps and
        the conflicts. Nothing of an entry of another generation than the stored one is
        applied: :class:`GenerationMismatch`, unless it carries ``adopt``, in which case
        :meth:`_answer` sends the whole stored generation for the device to adopt (its
        stamped writes come again, on the new generation)."""
        live.adopts = part.adopt
        if part.gen != live.gen:
            if not part.adopt:
                raise GenerationMismatch(
                    f"document {part.doc!r} is at generation {live.gen}, not {part.gen}",
                    {"doc": part.doc, "gen": live.gen},
                )
            log.info("%s: the device holds generation %d of %d; it gets the whole document",
                     live.key, part.gen, live.gen)
            return Applied(live.write())
        if info is not None:
            missing = info.missing(parse_state_vector(live.state or live.doc.get_state()))
            if missing is not None:
                # It builds on items this document lacks (the device's diff base is ahead
                # of what is stored, e.g. after a restore): applied, it would stay pending
                # where no check sees it. Nothing is applied, nor decided; the answer's
                # state vector makes the device send what is missing (protocol 7a and 9.2,
                # step 5.4).
                log.info("update for %s builds on missing item %s:%s; not applied",
                         live.key, *missing)
                return Applied(live.write())
        elif not part.stamps:
            return Applied(live.write())
        assert context is not None  # the part brings an update or stamped writes
        return self._merge(device, live, part, context)

    @staticmethod
    def _merge(device: str, live: LiveDoc, part: DocSync, context: Merge) -> Applied:
        """:meth:`_apply` once the update may apply: Yjs merges it, each stamped write is
        decided against the stored stamps, the document is fixed up to hold each winner, and
        the feed leaves out the keys a cloud write kept or a replay left as they were."""
        writes = part.stamps or ()
        kinds = stamps.policies(writes, context.schema.policy)
        before = stamps.read_keys(live.doc, stamps.contested(writes, live.stamps, kinds))
        if part.update:
            crdt.apply_remote(live.doc, part.update, name=part.doc)
        landed: dict[tuple[str, str], Any] = {}
        with live.doc.transaction():  # the reads below share it (each would open its own)
            changed = live.changes.take(landed)
            # What landed, checked in the real document (the caller evicts it on error).
            crdt.check_changes(changed, name=part.doc)
            after = stamps.after_values(live.doc, kinds, before, landed)
        decision = stamps.decide(writes, stamps.Inputs(live.key, live.stamps, kinds, before,
                                                       after, landed), context.clocks)
        if decision.fixes:  # what the fix-ups changed (nothing else was written since)
            stamps.write_fixes(live.doc, decision.fixes)
            for name, values in live.changes.take().items():
                changed.setdefault(name, {}).update(values)
        for where in decision.decided.intersection(before):
            if stamps.same(decision.fixes.get(where, after[where]), before[where]):
                changed.get(where[0], {}).pop(where[1], None)
        changed = {name: values for name, values in changed.items() if values}
        return Applied(
            live.write(),
            StateChange(device, part.doc, changed) if changed else None,
            tuple(decision.rows),
            tuple(ConflictRecord(device, part.doc, c) for c in decision.conflicts))

    @staticmethod
    def _committed(lives: list[LiveDoc], applied: list[Applied], result: CommitResult
                   ) -> None:
        """Record the commit in the live documents: update ids, and stamps only now that
        they are stored."""
        stored = iter(zip(result.update_ids, result.prev_ids, strict=True))
        for live, done in zip(lives, applied, strict=True):
            if done.write.update:
                live.committed(*next(stored))
            live.stamped(done.stamps)

    @staticmethod
    def _answer(live: LiveDoc, part: DocSync) -> DocSync:
        answer = answer_entry(part, live, live.gen)
        live.state = answer.sv  # until it changes: what the next update is checked against
        return answer

    async def write_state(self, device_id: str, name: str,
                          changes: Mapping[str, Any]) -> dict[str, Any]:
        """Cloud-side write into root map ``name`` of a device's document (``None`` deletes a
        key); durable on return, delivered at the device's next sync. Returns the new map.
        Each key written is stamped later than everything it held (protocol section 13).
        A write the device's fleet schema refuses raises ``Forbidden`` (a ``device`` key)
        or ``SchemaViolation``, with nothing written."""
        device = await self.store.get_device(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        (await self.schema_for(device)).check_changes({name: changes}, writer="cloud",
                                                      doc=STATE_DOC)
        return await self.write_doc(doc_key(device_id, STATE_DOC), device_id, name, changes,
                                    device=device_id, stamped=True)

    async def write_shared(self, key: str, name: str,
                           changes: Mapping[str, Any]) -> dict[str, Any]:
        """Cloud-side write into a shared document (``fleet_key(...)`` or ``"project"``);
        every device that shares it receives it at its next sync. The document is rebuilt
        by the cache's policy like a device's that adopts: every device replaces its copy
        when the ``g`` answered changes (protocol section 8)."""
        return await self.write_doc(key, key, name, changes, shared=True)

    async def read_doc(self, key: str, lock: str) -> dict[str, Any]:
        """A stored document as JSON, read under ``lock``."""
        async with self.docs.lock(lock):
            return crdt.to_json((await self.docs.get(key)).doc)

    async def write_doc(self, key: str, lock: str, name: str, changes: Mapping[str, Any],
                        *, device: str | None = None, shared: bool = False,
                        stamped: bool = False) -> dict[str, Any]:
        """Merge ``changes`` into root map ``name`` of document ``key`` under ``lock``;
        durable on return; returns the new map. For a document of ``device`` the changed
        keys enter the feed and the projection, and with ``stamped`` each key written is
        stamped (``crdtsync_server.stamps.cloud_rows``), even one whose value did not change
        (a delete of an absent key is a write with a time); a ``shared`` document is always
        eligible for a rebuild (:attr:`LiveDoc.adopts`). Raises ``Unavailable`` (retryable,
        nothing stored) when another process rebuilt the document between its read and the
        commit (``Store.commit``)."""
        async with self.docs.lock(lock):
            live = await self.docs.get(key)
            live.adopts = live.adopts or shared
            try:
                crdt.write(live.doc, name, changes)
                changed = live.changes.take()
                update = live.capture()
                rows = (stamps.cloud_rows(key, name, changes, live.stamps, self.hlc.now())
                        if stamped else [])
                if update or rows:
                    await self._commit_cloud(live, update, rows, [
                        StateChange(device, STATE_DOC, changed, "cloud")]
                        if device is not None and changed else [])
            except BaseException:
                self.docs.evict(key)
                raise
            await self.docs.after_commit(live)
            state: dict[str, Any] = crdt.to_json(live.doc).get(name, {})
            return state

    async def _commit_cloud(self, live: LiveDoc, update: bytes, rows: list[KeyStamp],
                            feed: list[StateChange]) -> None:
        """Commit a cloud write of ``live`` and record it in the live document."""
        stored = await self._commit(SyncWrite(
            device=None, time=self.clock(), changes=feed, stamps=rows,
            docs=[live.write(update)] if update else [],
            wakes=[wake_target(live.key)]))
        self.cloud_changes += len(feed)
        if update:
            live.committed(stored.update_ids[0], stored.prev_ids[0])
        for row in rows:  # a stamp above the clock (stored + 1) moves the clock past it
            self.hlc.observe(row.stamp)
        live.stamped(rows)
        if feed and self.notifier is not None:
            self.notifier.notify()

    async def delete_device(self, device_id: str, *, events: bool = False) -> None:
        """Delete the device with its documents, projection rows, downlink and proxied
        requests (with ``events``, its feed items too: ``Store.delete_device``), under its
        lock so that no sync or cloud write of it runs meanwhile. This process's cached
        copies of its documents are dropped (other processes reload them, see the store), so
        a device created again with this id starts from empty documents. ``NotFound`` for
        an unknown device, with nothing deleted."""
        keys = [doc_key(device_id, STATE_DOC)]
        async with self.docs.lock(device_id):
            await self.store.delete_device(device_id, keys, events=events)
            for key in keys:
                self.docs.evict(key)
            self._touched.pop(device_id, None)

    async def read_state(self, device_id: str, *, meta: bool = False) -> dict[str, Any]:
        """The device document as JSON (``{map: {key: value}}``, ``state`` always present).
        With ``meta``: ``{"state": <that>, "meta": {map: {key: {"time", "writer"}}}}``, each
        key's stamp (``"deleted": true`` for a key deleted last), wrapped so that no root map
        name can clash with ``meta``."""
        if await self.store.get_device(device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        async with self.docs.lock(device_id):
            live = await self.docs.get(doc_key(device_id, STATE_DOC))
            state = {STATE_MAP: {}, **crdt.to_json(live.doc)}
            if not meta:
                return state
            return {"state": state, "meta": stamps.meta_json(live.stamps.values(), state)}

