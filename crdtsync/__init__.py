"""crdtsync: offline-first sync of device state (CRDT) and events with the cloud.

``Device`` is what a device app embeds, ``Gateway`` hosts many of them synced in batches;
``AdminClient`` calls the management API; the reference server is the ``crdtsync_server``
package (``crdtsync serve``).

Public names load on first access (``crdtsync._lazy``): ``import crdtsync.protocol`` must not
pull in aiohttp or sqlite3 through this file (docs/architecture.md, Layering).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._compiled import choose
from ._lazy import lazy_exports

choose()  # before any compiled module is imported (crdtsync._compiled)

if TYPE_CHECKING:  # what mypy and IDEs see; at run time __getattr__ imports on first access
    from ._device_store import OutboxLimits
    from ._files import FileInfo, FileTransfer
    from ._inbox import Message
    from ._state import StateMap
    from .admin import AdminClient
    from .device import Device, SyncReport
    from .errors import (
        ClosedError,
        CrdtsyncError,
        InvalidValue,
        OutboxFull,
        RouteFailed,
        SchemaViolation,
        StoreError,
        SyncStalled,
        TransportError,
    )
    from .gateway import Gateway
    from .protocol import Conflict, WriteInfo
    from .schema import StateSchema
    from .transport import HttpTransport, Transport

__version__ = "0.1.0.dev0"

__all__ = [
    "AdminClient",
    "ClosedError",
    "Conflict",
    "CrdtsyncError",
    "Device",
    "FileInfo",
    "FileTransfer",
    "Gateway",
    "HttpTransport",
    "InvalidValue",
    "Message",
    "OutboxFull",
    "OutboxLimits",
    "RouteFailed",
    "SchemaViolation",
    "StateMap",
    "StateSchema",
    "StoreError",
    "SyncReport",
    "SyncStalled",
    "Transport",
    "TransportError",
    "WriteInfo",
    "__version__",
]

if not TYPE_CHECKING:  # hidden from mypy, which would type a misspelt name as object
    __getattr__, __dir__ = lazy_exports(__name__, {
        "admin": ["AdminClient"],
        "device": ["Device", "SyncReport"],
        "_device_store": ["OutboxLimits"],
        "_files": ["FileInfo", "FileTransfer"],
        "errors": ["ClosedError", "CrdtsyncError", "InvalidValue", "OutboxFull", "RouteFailed",
                   "SchemaViolation", "StoreError", "SyncStalled", "TransportError"],
        "gateway": ["Gateway"],
        "_inbox": ["Message"],
        "protocol": ["Conflict", "WriteInfo"],
        "schema": ["StateSchema"],
        "_state": ["StateMap"],
        "transport": ["HttpTransport", "Transport"],
    })
