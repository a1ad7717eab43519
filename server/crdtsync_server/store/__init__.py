"""Storage backends of the sync server behind one narrow interface, :class:`Store`.

:func:`open_store` picks a backend from a URL: ``memory:`` (:class:`MemoryStore`),
``sqlite:///path.db`` or a plain file path (:class:`SQLiteStore`, the default).
"""

from __future__ import annotations

from .base import (
    DOWNLINK_KINDS,
    DOWNLINK_STATUSES,
    REQUEST_STATUSES,
    CommandResult,
    CommitResult,
    DeviceRecord,
    DocLog,
    DocWrite,
    Downlink,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    Store,
    StoredEvent,
    SyncWrite,
    plan_events,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = [
    "DOWNLINK_KINDS",
    "DOWNLINK_STATUSES",
    "REQUEST_STATUSES",
    "CommandResult",
    "CommitResult",
    "DeviceRecord",
    "DocLog",
    "DocWrite",
    "Downlink",
    "FleetRecord",
    "KeyStamp",
    "MemoryStore",
    "ProxyRequest",
    "SQLiteStore",
    "Store",
    "StoredEvent",
    "SyncWrite",
    "open_store",
    "plan_events",
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
