"""Storage backends of the sync server behind role-sized interfaces (``store/roles.py``):
:class:`DocumentStore`, :class:`DeviceStore`, :class:`SettingsStore`, :class:`DownlinkStore`,
:class:`FeedStore` and :class:`SinkStore`; :class:`Store` is all of them with the lifecycle
and the two writes that span roles (``commit``, ``delete_device``). Records are in
``store/records.py``, ``store/feed.py`` and ``store/sinks.py``; each backend is a package
with one module per role (``store/memory/``, ``store/sqlite/``).

:func:`open_store` picks a backend from a URL: ``memory:`` (:class:`MemoryStore`),
``sqlite:///path.db`` or a plain file path (:class:`SQLiteStore`, the default).
"""

from __future__ import annotations

from .memory import MemoryStore
from .records import (
    DOWNLINK_KINDS,
    DOWNLINK_STATUSES,
    REQUEST_STATUSES,
    WAKE_EVERYONE,
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Downlink,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    StoredEvent,
    SyncWrite,
    WakeEntry,
    wake_device,
    wake_fleet,
    wake_targets,
)
from .roles import (
    DeviceStore,
    DocumentStore,
    DownlinkStore,
    DownstreamStore,
    FeedStore,
    SettingsStore,
    SinkStore,
    Store,
    WakeStore,
)
from .rules import plan_events
from .sqlite import SQLiteStore

__all__ = [
    "DOWNLINK_KINDS",
    "DOWNLINK_STATUSES",
    "REQUEST_STATUSES",
    "WAKE_EVERYONE",
    "CommandResult",
    "CommitResult",
    "DeviceRecord",
    "DeviceStore",
    "DocLog",
    "DocWrite",
    "DocumentStore",
    "Downlink",
    "DownlinkStore",
    "DownstreamStore",
    "FeedStore",
    "FleetRecord",
    "KeyStamp",
    "MemoryStore",
    "ProxyRequest",
    "SQLiteStore",
    "SettingsStore",
    "SinkStore",
    "Store",
    "StoredEvent",
    "SyncWrite",
    "WakeEntry",
    "WakeStore",
    "open_store",
    "plan_events",
    "wake_device",
    "wake_fleet",
    "wake_targets",
]

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str) -> Store:
    """A new, not yet opened store for ``url``; call ``open()`` or use ``async with``.

    - ``memory:``: a :class:`MemoryStore` (nothing persists).
    - ``sqlite:///data/sync.db`` (relative) or ``sqlite:////var/lib/sync.db`` (absolute):
      what follows ``sqlite:///`` is the path, as in SQLAlchemy.
    - any string without ``://``: a file path for a :class:`SQLiteStore`.

    Raises ``ValueError`` for an empty string or another scheme.
    """
    if url == "memory:":
        return MemoryStore()
    if url.startswith(_SQLITE_PREFIX) and len(url) > len(_SQLITE_PREFIX):
        return SQLiteStore(url[len(_SQLITE_PREFIX):])
    if url and "://" not in url:
        return SQLiteStore(url)
    raise ValueError(
        f"unsupported store URL {url!r}: use 'memory:', 'sqlite:///path.db' or a file path"
        " (postgresql:// comes later)"
    )
