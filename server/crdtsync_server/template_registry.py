"""``TemplateRegistry``: every template the cloud ever issued, by hash, to decode events.

A device encodes an event with the template its fleet document held when the event was
emitted; it may reach the cloud after the template changed. The registry keeps each version
(in the store's settings, ``template:<hash hex>``), so an old batch still decodes.
"""

from __future__ import annotations

import dataclasses

from crdtsync.errors import MalformedRequest, TooManyEvents
from crdtsync.protocol import (
    Event,
    Limits,
    SyncRequest,
    check_consecutive,
    encode_event_body,
)
from crdtsync.templates import SizeBudget, Template, batch_hash, decode_batch

from .store import SettingsStore

PREFIX = "template:"


class TemplateRegistry:
    """Templates by hash, persisted in the store, cached in memory."""

    def __init__(self, store: SettingsStore) -> None:
        self.store = store
        self._cache: dict[bytes, Template] = {}

    async def put(self, template: Template) -> None:
        """Remember ``template`` for good (it may decode events for a long time)."""
        await self.store.set_setting(PREFIX + template.hash.hex(), template.canonical.decode())
        self._cache[template.hash] = template

    async def get(self, digest: bytes) -> Template | None:
        """The template with this hash, or ``None``."""
        template = self._cache.get(digest)
        if template is None:
            text = await self.store.get_setting(PREFIX + digest.hex())
            if text is not None:
                template = self._cache[digest] = Template.from_json(text)
        return template

    async def expand(self, request: SyncRequest, limits: Limits) -> SyncRequest:
        """Decode the request's template batches into events and merge them with its plain
        events: one run of consecutive seqs, or :class:`MalformedRequest`.

        The decoded bodies are bounded like plain ones, and checked before they are built:
        one body over ``limits.max_event_body`` is :class:`InvalidValue` (``detail.seq``),
        all bodies of the request (plain ones re-encoded: the same measure) over
        ``limits.max_decoded_bytes`` are :class:`BodyTooLarge` (``detail.max_decoded_bytes``)."""
        if not request.batches:
            return request
        budget = SizeBudget(limits.max_event_body, limits.max_decoded_bytes)
        for event in request.events:
            budget.charge(len(encode_event_body(event.body)))
        events = list(request.events)
        for batch in request.batches:
            digest = batch_hash(batch.data)
            template = await self.get(digest)
            if template is None:
                raise MalformedRequest(f"unknown template {digest.hex()} for {batch.topic!r}",
                                       {"template": digest.hex(), "topic": batch.topic})
            events += [Event(seq, batch.topic, time, body) for seq, time, body in
                       decode_batch(template, batch.data, max_count=limits.max_events,
                                    budget=budget)]
            if len(events) > limits.max_events:
                raise TooManyEvents(f"more than {limits.max_events} events in one request",
                                    {"max_events": limits.max_events})
        events.sort(key=lambda e: e.seq)
        check_consecutive(events)
        return dataclasses.replace(request, events=tuple(events), batches=())
