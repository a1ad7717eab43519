"""The server side of one sync, and cloud-side state writes, over the document cache and store.

Order of one sync (docs/protocol.md, "Server processing"): take the device's lock; for each
document check name and generation and apply the device's update to the live document
(rejects corrupt updates with nothing applied); commit the effective updates, the new events
and the device's bookkeeping in one transaction; only then answer with the server's delta
against the device's state vector and the highest stored seq. Any failure before the commit
returns an error and evicts the touched documents, so nothing unstored is ever acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from crdtsync import crdt
from crdtsync.errors import GenerationMismatch, NotFound, UnknownDocument
from crdtsync.protocol import DocSync, SyncRequest, SyncResponse

from .documents import DocumentCache, LiveDoc
from .store import DeviceRecord, DocWrite, Store, SyncWrite

DEVICE_DOCS = frozenset({"state"})
"""Documents a device syncs. A shared read-only fleet document joins later."""

EMPTY_UPDATE = b"\x00\x00"


def doc_key(device_id: str, doc: str) -> str:
    """Store key of a device's document: ``"<device>/<doc>"``."""
    return f"{device_id}/{doc}"


def now_ms() -> int:
    return int(time.time() * 1000)


class SyncService:
    """Applies sync requests and cloud writes; the HTTP layer only authenticates and codes."""

    def __init__(self, store: Store, docs: DocumentCache) -> None:
        self.store = store
        self.docs = docs

    async def sync(self, device: DeviceRecord, request: SyncRequest) -> SyncResponse:
        """Run one sync for an authenticated ``device``; raises a typed error with nothing
        stored, or returns a response describing only committed data."""
        for part in request.docs:
            if part.doc not in DEVICE_DOCS:
                raise UnknownDocument(f"document {part.doc!r} is not served to devices",
                                      {"doc": part.doc})
        async with self.docs.lock(device.id):
            lives = [await self.docs.get(doc_key(device.id, p.doc)) for p in request.docs]
            try:
                writes = [self._apply(live, part) for live, part in zip(lives, request.docs,
                                                                        strict=True)]
                result = await self.store.commit(SyncWrite(
                    device=device.id, time=now_ms(),
                    docs=[w for w in writes if w.update], events=request.events,
                    purged=request.purged,
                ))
            except BaseException:
                for live in lives:
                    self.docs.evict(live.key)
                raise
            self._committed(lives, writes, result.update_ids)
            response = SyncResponse(
                docs=tuple(self._answer(live, part) for live, part in zip(lives, request.docs,
                                                                          strict=True)),
                acked=result.last_seq, time=now_ms(),
            )
            for live in lives:
                await self.docs.maybe_compact(live)
        return response

    @staticmethod
    def _apply(live: LiveDoc, part: DocSync) -> DocWrite:
        if part.gen != live.gen:
            raise GenerationMismatch(
                f"document {part.doc!r} is at generation {live.gen}, not {part.gen}",
                {"doc": part.doc, "gen": live.gen},
            )
        if part.update:
            crdt.check_update(part.update, name=part.doc)
            crdt.apply_remote(live.doc, part.update, name=part.doc)
        return DocWrite(live.key, live.capture(), live.gen)

    @staticmethod
    def _committed(lives: list[LiveDoc], writes: list[DocWrite], ids: tuple[int, ...]) -> None:
        stored = iter(ids)
        for live, write in zip(lives, writes, strict=True):
            if write.update:
                live.committed(next(stored))

    @staticmethod
    def _answer(live: LiveDoc, part: DocSync) -> DocSync:
        update = live.doc.get_update(part.sv)
        return DocSync(part.doc, live.doc.get_state(),
                       b"" if update == EMPTY_UPDATE else update, live.gen)

    async def write_state(self, device_id: str, name: str,
                          changes: Mapping[str, Any]) -> dict[str, Any]:
        """Cloud-side write into root map ``name`` of a device's document (``None`` deletes a
        key); durable on return, delivered at the device's next sync. Returns the new map."""
        if await self.store.get_device(device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        key = doc_key(device_id, "state")
        async with self.docs.lock(device_id):
            live = await self.docs.get(key)
            try:
                crdt.write(live.doc, name, changes)
                update = live.capture()
                if update:
                    stored = await self.store.commit(
                        SyncWrite(device=None, time=now_ms(), docs=[DocWrite(key, update,
                                                                             live.gen)]))
                    live.committed(stored.update_ids[0])
            except BaseException:
                self.docs.evict(key)
                raise
            await self.docs.maybe_compact(live)
            state: dict[str, Any] = crdt.to_json(live.doc).get(name, {})
            return state

    async def read_state(self, device_id: str) -> dict[str, Any]:
        """The device document as JSON (``{map: {key: value}}``)."""
        if await self.store.get_device(device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        async with self.docs.lock(device_id):
            live = await self.docs.get(doc_key(device_id, "state"))
            return {"state": {}, **crdt.to_json(live.doc)}
