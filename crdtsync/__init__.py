"""crdtsync: offline-first sync of device state (CRDT) and events with the cloud.

``Device`` is what a device or gateway app embeds; ``AdminClient`` calls the management API;
the reference server is the ``crdtsync_server`` package (``crdtsync serve``).
"""

from __future__ import annotations

from .admin import AdminClient
from .device import Device, SyncReport
from .device_store import OutboxLimits
from .errors import (
    ClosedError,
    CrdtsyncError,
    InvalidValue,
    OutboxFull,
    SchemaViolation,
    StoreError,
    TransportError,
)
from .protocol import Conflict, WriteInfo
from .schema import StateSchema
from .state import StateMap

__version__ = "0.1.0.dev0"

__all__ = [
    "AdminClient",
    "ClosedError",
    "Conflict",
    "CrdtsyncError",
    "Device",
    "InvalidValue",
    "OutboxFull",
    "OutboxLimits",
    "SchemaViolation",
    "StateMap",
    "StateSchema",
    "StoreError",
    "SyncReport",
    "TransportError",
    "WriteInfo",
    "__version__",
]
