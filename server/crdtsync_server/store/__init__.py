"""Storage backends of the sync server behind role-sized interfaces (``store/roles.py``):
:class:`DocumentStore`, :class:`DeviceStore`, :class:`SettingsStore`, :class:`DownlinkStore`,
:class:`FeedStore`, :class:`SinkStore`, :class:`WakeStore` and :class:`FileStore`;
:class:`Store` is all of them with the lifecycle and the two writes that span roles
(``commit``, ``delete_device``). Records are in ``store/records.py``, ``store/feed.py``,
``store/sinks.py`` and ``store/files.py``; each backend is a package
with one module per role (``store/memory/``, ``store/sqlite/``, ``store/postgres/``).

:func:`open_store` picks a backend from a URL: ``memory:`` (:class:`MemoryStore`),
``sqlite:///path.db`` or a plain file path (:class:`SQLiteStore`, the default),
``postgresql://...`` (``PostgresStore``, for several server instances on one database;
imported only then, as it needs the optional ``asyncpg``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from crdtsync.errors import StoreError

from .files import FileRecord, UploadRecord
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
    FileStore,
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
    "FileRecord",
    "FileStore",
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
    "UploadRecord",
    "WakeEntry",
    "WakeStore",
    "open_store",
    "plan_events",
    "wake_device",
    "wake_fleet",
    "wake_targets",
]

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(url: str) -> Store:
    """A new, not yet opened store for ``url``; call ``open()`` or use ``async with``.

    - ``memory:``: a :class:`MemoryStore` (nothing persists).
    - ``sqlite:///data/sync.db`` (relative) or ``sqlite:////var/lib/sync.db`` (absolute):
      what follows ``sqlite:///`` is the path, as in SQLAlchemy.
    - any string without ``://``: a file path for a :class:`SQLiteStore`.
    - ``postgresql://user@host:5432/dbname`` (or ``postgres://``): a ``PostgresStore``
      (``crdtsync_server.store.postgres``); raises :class:`StoreError` when ``asyncpg`` is
      not installed (``pip install 'crdtsync[postgres]'``). Query parameters of the store
      (:data:`STORE_PARAMETERS`) are taken out of the URL: ``schema`` (the PostgreSQL
      schema holding the tables, created if missing), ``pool_min`` and ``pool_max``
      (connections per process), ``statement_timeout`` and ``acquire_timeout`` (seconds);
      the others (``sslmode``, ...) are left for the driver.

    Raises ``ValueError`` for an empty string or another scheme.
    """
    if url == "memory:":
        return MemoryStore()
    if url.startswith(_SQLITE_PREFIX) and len(url) > len(_SQLITE_PREFIX):
        return SQLiteStore(url[len(_SQLITE_PREFIX):])
    if url.startswith(_POSTGRES_SCHEMES):
        return _postgres_store(url)
    if url and "://" not in url:
        return SQLiteStore(url)
    raise ValueError(
        f"unsupported store URL {url!r}: use 'memory:', 'sqlite:///path.db', a file path or"
        " 'postgresql://user@host/dbname'"
    )


STORE_PARAMETERS: dict[str, tuple[str, type]] = {
    "schema": ("schema", str),
    "pool_min": ("min_size", int),
    "pool_max": ("max_size", int),
    "statement_timeout": ("statement_timeout", float),
    "acquire_timeout": ("acquire_timeout", float),
}
"""Query parameters of a ``postgresql://`` URL that configure the store, not the driver:
name -> (``PostgresStore`` keyword, type)."""


def _postgres_store(url: str) -> Store:
    """A ``PostgresStore`` for ``url``, importing the backend (and ``asyncpg``) now."""
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreError(f"a postgresql:// store needs asyncpg ({exc}); install it with"
                         " pip install 'crdtsync[postgres]'") from exc
    driver_url, options = store_parameters(url)
    return PostgresStore(driver_url, **options)


def store_parameters(url: str) -> tuple[str, dict[str, Any]]:
    """Split the store's own query parameters (:data:`STORE_PARAMETERS`) off ``url``;
    ``ValueError`` for a value of the wrong type."""
    parts = urlsplit(url)
    driver: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in STORE_PARAMETERS:
            driver.append((name, value))
            continue
        keyword, kind = STORE_PARAMETERS[name]
        try:
            options[keyword] = kind(value)
        except ValueError:
            raise ValueError(f"store URL parameter {name}={value!r} is not"
                             f" {kind.__name__}") from None
    return urlunsplit(parts._replace(query=urlencode(driver))), options
