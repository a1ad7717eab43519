"""The state every part of :class:`~crdtsync_server.store.memory.MemoryStore` shares: one
object of dicts, and the rows kept in them.

JSON columns are kept as JSON text, exactly as a database keeps them, so a test cannot pass
here and fail on SQLite because of a shared object. Each role's part
(``memory/documents.py``, ``devices.py``, ``settings.py``, ``downlink.py``, ``feed.py``,
``sinks.py``) is a mixin over :class:`MemoryState`; ``memory/store.py`` puts them together.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from crdtsync.errors import ClosedError, NotFound

from ..feed import FeedItem
from ..files import FileRecord, UploadRecord
from ..records import (
    DeviceRecord,
    Downlink,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    StoredEvent,
    WakeEntry,
)
from ..sinks import (
    DeadLetter,
    SinkConfig,
    SinkRecord,
    config_columns,
    config_from_columns,
    item_from_text,
)


@dataclass(slots=True)
class DocRow:
    gen: int = 0
    snapshot: bytes = b""
    snapshot_id: int = 0
    updates: dict[int, bytes] = field(default_factory=dict)  # insertion order is id order

    @property
    def last_id(self) -> int:
        """The highest update id this document reflects (logged rows and snapshot)."""
        return max([self.snapshot_id, *self.updates])


@dataclass(frozen=True, slots=True)
class EventRow:
    cursor: int
    device: str
    seq: int
    topic: str
    time: int
    received: int
    body_json: str

    def stored(self) -> StoredEvent:
        return StoredEvent(
            cursor=self.cursor, device=self.device, seq=self.seq, topic=self.topic,
            time=self.time, received=self.received, body=json.loads(self.body_json),
        )


@dataclass(slots=True)
class ItemRow:
    """A downlink row; JSON columns are kept as text, as a database keeps them."""

    id: int
    device: str
    seq: int
    kind: str
    name: str
    body: str
    created: int
    expires: int | None
    updated: int
    status: str = "queued"
    result: str | None = None
    error: str | None = None

    def record(self) -> Downlink:
        return Downlink(
            id=self.id, device=self.device, seq=self.seq, kind=self.kind, name=self.name,
            body=json.loads(self.body), created=self.created, expires=self.expires,
            status=self.status, result=loads(self.result), error=loads(self.error),
            updated=self.updated,
        )

    def set_status(self, status: str, now: int) -> None:
        self.status, self.updated = status, now


@dataclass(slots=True)
class RequestRow:
    device: str
    id: str
    route: str
    body: str
    created: int
    updated: int
    status: str = "pending"
    outcome: str | None = None
    runner: str | None = None

    def record(self) -> ProxyRequest:
        return ProxyRequest(
            device=self.device, id=self.id, route=self.route, body=json.loads(self.body),
            created=self.created, status=self.status, outcome=loads(self.outcome),
            updated=self.updated,
        )

    def set_status(self, status: str, now: int, outcome: str | None = None) -> None:
        self.status, self.updated = status, now
        if outcome is not None:
            self.outcome = outcome


@dataclass(slots=True)
class LetterRow:
    """A dead letter; the item is kept as JSON text, as a database keeps it."""

    id: int
    sink: str
    item: str
    error: str
    attempts: int
    created: int
    retry: bool = False

    def record(self) -> DeadLetter:
        return DeadLetter(self.id, self.sink, item_from_text(self.item), self.error,
                          self.attempts, self.created, self.retry)


def copy_config(config: SinkConfig) -> SinkConfig:
    return config_from_columns(*config_columns(config))


def copy_device(device: DeviceRecord) -> DeviceRecord:
    return dataclasses.replace(device, meta=json.loads(json.dumps(dict(device.meta))))


def copy_fleet(fleet: FleetRecord) -> FleetRecord:
    return dataclasses.replace(fleet, meta=json.loads(json.dumps(dict(fleet.meta))))


def loads(text: str | None) -> Any:
    """A nullable JSON text as data (``None`` stays ``None``)."""
    return None if text is None else json.loads(text)


class MemoryState:
    """Everything a :class:`MemoryStore` holds, and the checks every role makes."""

    def __init__(self) -> None:
        self._closed = False
        self.external_writes: int | None = None
        """Unknown: a memory store may be shared, so the document cache always catches up."""
        self._docs: dict[str, DocRow] = {}
        self._last_update_id = 0
        self._devices: dict[str, DeviceRecord] = {}
        self._by_token: dict[str, set[str]] = {}  # token hash -> device ids (the index)
        self._fleets: dict[str, FleetRecord] = {}
        self._events: list[EventRow] = []  # cursor order
        self._digests: dict[tuple[str, int], bytes] = {}
        self._settings: dict[str, str] = {}
        self._items: dict[int, ItemRow] = {}
        self._last_item_id = 0
        self._downlink: dict[str, dict[int, ItemRow]] = {}  # device -> seq -> item, seq order
        self._requests: dict[tuple[str, str], RequestRow] = {}
        self._feed: list[FeedItem] = []  # cursor order
        self._feed_floor = 0  # the highest purged cursor
        self._last_cursor = 0  # cursors are never reused, even after a purge
        self._projection: dict[tuple[str, str, str, str], tuple[str, int]] = {}
        self._sinks: dict[str, SinkRecord] = {}
        self._letters: dict[int, LetterRow] = {}  # id order
        self._last_letter_id = 0
        self._deleted_devices: dict[str, int] = {}  # id -> last_seq when deleted
        self._stamps: dict[str, dict[tuple[str, str], KeyStamp]] = {}  # doc -> (map, key)
        self._wakes: list[WakeEntry] = []  # cursor order
        self._wake_head = 0  # cursors are never reused, even after a purge
        self._wake_floor = 0  # the highest purged cursor
        self._wake_listeners: list[Callable[[int], None]] = []
        self._instances: dict[str, int] = {}  # instance id -> last heartbeat (ms)
        self._files: dict[tuple[str, str, str], FileRecord] = {}  # (owner, direction, name)
        self._uploads: dict[str, UploadRecord] = {}  # id -> upload in progress
        self.instance = secrets.token_hex(8)
        """This server instance's id: the runner of the proxied requests it claims."""

    hears_others = False
    """Only this object's own commits are announced (``on_wakes``)."""

    def on_feed(self, callback: Callable[[], None]) -> None:
        """Never called (``hears_others`` is false)."""

    def on_results(self, callback: Callable[[str | None], None]) -> None:
        """Never called (``hears_others`` is false)."""

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("MemoryStore is closed")

    def _append_wakes(self, targets: Sequence[str], now: int) -> None:
        """Append wake entries and announce them (the caller's write is already applied:
        every method runs between two awaits, so announcing here is after its commit)."""
        if not targets:
            return
        for target in targets:
            self._wake_head += 1
            self._wakes.append(WakeEntry(self._wake_head, target, now))
        for listener in self._wake_listeners:
            listener(self._wake_head)

    def _require_device(self, device_id: str) -> DeviceRecord:
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}", {"device": device_id})
        return device
