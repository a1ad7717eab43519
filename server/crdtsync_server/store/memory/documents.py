"""Documents of the memory store: update logs, snapshots, generations and stamps (the
:class:`~crdtsync_server.store.roles.DocumentStore` role), and the document part of a commit."""

from __future__ import annotations

from collections.abc import Sequence

from ..records import DocLog, DocWrite, KeyStamp
from ..rules import stale_generation
from .state import DocRow, MemoryState


class MemoryDocuments(MemoryState):
    """The :class:`DocumentStore` role over :class:`MemoryState`."""

    async def load_doc(self, key: str, *, stamps: bool = False) -> DocLog:
        """The stored log of ``key`` (with its stamp rows if ``stamps``); an empty
        ``DocLog`` if it was never written."""
        self._check_open()
        rows = tuple(await self.read_stamps(key)) if stamps else ()
        doc = self._docs.get(key)
        if doc is None:
            return DocLog(stamps=rows)
        return DocLog(doc.gen, doc.snapshot, doc.snapshot_id, tuple(doc.updates.items()),
                      rows)

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` if compacted
        past ``after_id``."""
        self._check_open()
        doc = self._docs.get(key)
        if doc is None:
            return ()
        if after_id < doc.snapshot_id:
            return None
        return tuple((i, data) for i, data in doc.updates.items() if i > after_id)

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Install ``snapshot`` as covering ids <= ``upto_id`` and delete exactly those rows.

        A no-op unless ``upto_id`` is above the current ``snapshot_id`` (a stale compaction
        never replaces a newer snapshot)."""
        self._check_open()
        doc = self._docs.get(key, DocRow())
        if upto_id <= doc.snapshot_id:
            return
        self._docs[key] = doc
        doc.snapshot, doc.snapshot_id = snapshot, upto_id
        doc.updates = {i: data for i, data in doc.updates.items() if i > upto_id}

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        """Replace ``key`` by generation ``gen + 1`` holding ``snapshot`` if it is still at
        ``gen`` with nothing above ``upto_id`` (see ``Store.rebuild``)."""
        self._check_open()
        doc = self._docs.get(key, DocRow())
        if doc.gen != gen or doc.last_id > upto_id:
            return None
        return self._replace_doc(key, gen + 1, snapshot)

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key``, ordered by map and key."""
        self._check_open()
        rows = self._stamps.get(key, {})
        return [rows[where] for where in sorted(rows)]

    def _write_stamps(self, rows: Sequence[KeyStamp]) -> None:
        for row in rows:
            self._stamps.setdefault(row.doc, {})[(row.map, row.key)] = row

    def _replace_doc(self, key: str, gen: int, snapshot: bytes) -> int:
        """Make ``key`` generation ``gen`` holding only ``snapshot``, at a fresh update id
        (every cached copy must reload); returns that id."""
        self._last_update_id += 1
        self._docs[key] = DocRow(gen=gen, snapshot=snapshot, snapshot_id=self._last_update_id)
        return self._last_update_id

    def _check_generations(self, docs: Sequence[DocWrite]) -> None:
        for w in docs:
            doc = self._docs.get(w.key)
            if doc is not None and doc.gen != w.gen:
                raise stale_generation(w.key, doc.gen, w.gen)

    def _append_updates(self, docs: Sequence[DocWrite]
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ids: list[int] = []
        prevs: list[int] = []
        for w in docs:
            doc = self._docs.setdefault(w.key, DocRow(gen=w.gen))
            prevs.append(doc.last_id)
            self._last_update_id += 1
            doc.updates[self._last_update_id] = w.update
            ids.append(self._last_update_id)
        return tuple(ids), tuple(prevs)
