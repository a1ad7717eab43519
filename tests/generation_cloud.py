"""``GenerationCloud``: a minimal sync server for one device's ``state`` document whose
generation the test controls, for device-side tests of adoption (docs/protocol.md 8.1).

It speaks the real wire protocol over HTTP on 127.0.0.1 and answers a ``state`` entry the way
section 8 specifies: the diff against the entry's ``sv`` when the generations match, the
whole document when they differ and the entry says ``a: true``, ``409 generation_mismatch``
otherwise. Everything else is as small as possible: no authentication, every event is
acknowledged, shared documents are not served. For the device side of "latest write wins"
(docs/protocol.md 9), the test also sets the response ``time``, conflicts to send, and can
make the cloud lose device updates; it decides nothing itself (Yjs merges).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web
from pycrdt import Doc

from crdtsync import crdt
from crdtsync.errors import CrdtsyncError, GenerationMismatch
from crdtsync.protocol import (
    MEDIA_TYPE,
    SYNC_PATH,
    Conflict,
    DocSync,
    SyncRequest,
    SyncResponse,
    decode_request,
    encode_error,
    encode_response,
)
from crdtsync.transport import HttpTransport

from .conftest import local_app

EMPTY_UPDATE = b"\x00\x00"


class GenerationCloud:
    """The cloud's copy of one device document, at generation :attr:`gen`."""

    def __init__(self, client_id: int | None = None) -> None:
        self.gen = 0
        self.doc: Doc[Any] = crdt.new_doc(client_id or crdt.random_client_id())
        self.requests: list[SyncRequest] = []
        self.url = ""
        self.time = 0
        """The ``time`` of every response (0: not sent)."""
        self.conflicts: list[Conflict] = []
        """Conflicts sent with the next response (then forgotten)."""
        self.drop_updates = 0
        """How many of the next device updates the cloud ignores (a cloud losing data)."""

    def write(self, name: str, changes: Mapping[str, Any]) -> None:
        """A cloud-side write into the current generation (``None`` deletes)."""
        crdt.write(self.doc, name, changes)

    def rebuild(self, gen: int | None = None) -> None:
        """Replace the document by a fresh one with the same content and a new client id, at
        generation ``gen`` (default: one more). A lower ``gen`` plays a restored backup."""
        self.doc = crdt.rebuilt(self.doc, crdt.random_client_id())
        self.gen = self.gen + 1 if gen is None else gen

    def json(self) -> dict[str, Any]:
        return crdt.to_json(self.doc)

    def transport(self) -> HttpTransport:
        """A device transport to this cloud (bodies uncompressed: the fake does not inflate)."""
        return HttpTransport(self.url, "token", compress_threshold=1 << 30)

    def _answer(self, entry: DocSync) -> DocSync:
        if entry.gen != self.gen:
            if not entry.adopt:
                raise GenerationMismatch(f"document is at generation {self.gen}",
                                         {"doc": "state", "gen": self.gen})
            base = b"\x00"  # the whole document; the entry's update is not applied
        else:
            if entry.update and self.drop_updates:
                self.drop_updates -= 1
            elif entry.update:
                crdt.apply_remote(self.doc, entry.update, name="state")
            base = entry.sv
        update = self.doc.get_update(base)
        return DocSync("state", self.doc.get_state(),
                       b"" if update == EMPTY_UPDATE else update, self.gen)

    async def _sync(self, request: web.Request) -> web.Response:
        sync = decode_request(await request.read())
        self.requests.append(sync)
        try:
            docs = tuple(self._answer(d) for d in sync.docs if d.doc == "state")
        except CrdtsyncError as exc:
            return web.Response(status=exc.status, body=encode_error(exc),
                                content_type=MEDIA_TYPE)
        acked = sync.events[-1].seq if sync.events else 0
        conflicts, self.conflicts = tuple(self.conflicts), []
        response = SyncResponse(docs=docs, acked=acked, time=self.time, conflicts=conflicts)
        return web.Response(body=encode_response(response), content_type=MEDIA_TYPE)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[GenerationCloud]:
        """Serve on a free port of 127.0.0.1 (sets :attr:`url`)."""
        app = web.Application()
        app.router.add_post(SYNC_PATH, self._sync)
        async with local_app(app) as url:
            self.url = url
            yield self
