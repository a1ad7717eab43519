"""Downstream sinks of the memory store (the :class:`~crdtsync_server.store.roles.SinkStore`
role): configuration, progress, leases and dead letters."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from crdtsync.errors import NotFound

from ..feed import FeedItem
from ..rules import check_limit
from ..sinks import DeadLetter, SinkConfig, SinkRecord, check_origin, item_text
from .state import LetterRow, MemoryState, copy_config


class MemorySinks(MemoryState):
    """The :class:`SinkStore` role over :class:`MemoryState`."""

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create or reconfigure a sink, keeping its progress (see ``Store.put_sink``)."""
        self._check_open()
        check_origin(origin)
        copy = copy_config(config)
        old = self._sinks.get(config.name)
        self._sinks[config.name] = (
            SinkRecord(copy, origin, paused, cursor=start, created=now, updated=now)
            if old is None else
            dataclasses.replace(old, config=copy, origin=origin, paused=paused, updated=now))
        return self._sink_record(config.name)

    def _sink_record(self, name: str) -> SinkRecord:
        record = self._sinks[name]
        return dataclasses.replace(record, config=copy_config(record.config),
                                   dead_letters=len(self._sink_letters(name)))

    def _sink_letters(self, name: str) -> list[LetterRow]:
        return [letter for letter in self._letters.values() if letter.sink == name]

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""
        self._check_open()
        return self._sink_record(name) if name in self._sinks else None

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""
        self._check_open()
        return [self._sink_record(name) for name in sorted(self._sinks)]

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""
        self._check_open()
        if self._sinks.pop(name, None) is None:
            raise NotFound(f"no sink {name!r}", {"sink": name})
        for letter in self._sink_letters(name):
            del self._letters[letter.id]

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Take or renew the sink's lease (see ``Store``)."""
        self._check_open()
        record = self._sinks.get(name)
        if record is None or (record.owner not in (None, owner) and record.lease_until > now):
            return False
        self._sinks[name] = dataclasses.replace(record, owner=owner, lease_until=now + ttl_ms)
        return True

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it."""
        self._check_open()
        record = self._owned(name, owner)
        if record is not None:
            self._sinks[name] = dataclasses.replace(record, owner=None, lease_until=0)

    def _owned(self, name: str, owner: str | None) -> SinkRecord | None:
        """The stored sink, if ``owner`` (unless ``None``) holds its lease."""
        record = self._sinks.get(name)
        return record if record is not None and owner in (None, record.owner) else None

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """Move the cursor forward and count delivered items (see ``Store``)."""
        self._check_open()
        record = self._owned(name, owner)
        if record is None:
            return False
        record = dataclasses.replace(record, cursor=max(record.cursor, cursor),
                                     delivered=record.delivered + count)
        if count > 0:
            record = dataclasses.replace(record, consecutive_failures=0, last_delivered_at=now)
        self._sinks[name] = record
        return True

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed attempt and keep ``error``."""
        self._check_open()
        record = self._sinks.get(name)
        if record is not None:
            self._sinks[name] = dataclasses.replace(
                record, failures=record.failures + 1,
                consecutive_failures=record.consecutive_failures + 1, last_error=error,
                last_error_at=now)

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store dead letters and move the cursor past them, atomically."""
        self._check_open()
        record = self._owned(name, owner)
        if record is None:
            return False
        texts = [item_text(item) for item in items]
        for text in texts:
            self._last_letter_id += 1
            self._letters[self._last_letter_id] = LetterRow(self._last_letter_id, name, text,
                                                          error, attempts, now)
        self._sinks[name] = dataclasses.replace(
            record, cursor=max(record.cursor, items[-1].cursor),
            dead_lettered=record.dead_lettered + len(items), consecutive_failures=0)
        return True

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, at most ``limit``."""
        self._check_open()
        check_limit(limit)
        found = [letter for letter in self._sink_letters(name) if letter.id > after
                 and (retrying is None or letter.retry == retrying)]
        return [letter.record() for letter in found[:limit]]

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark dead letters for a retry; returns how many exist."""
        self._check_open()
        wanted = None if ids is None else set(ids)
        marked = [letter for letter in self._sink_letters(name)
                  if wanted is None or letter.id in wanted]
        for letter in marked:
            letter.retry = True
        return len(marked)

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """Delete delivered dead letters, or record another failure (see ``Store``)."""
        self._check_open()
        wanted = set(ids)
        letters = [letter for letter in self._sink_letters(name) if letter.id in wanted]
        for letter in letters:
            if error is None:
                del self._letters[letter.id]
            else:
                letter.retry, letter.error = False, error
                letter.attempts += attempts
        if error is None:
            await self.sink_delivered(name, 0, len(letters), now)
