"""Typed state schemas and merge policies (issue 13; being built).

A :class:`StateSchema` says, per root map and key of a device's ``state`` document, how
concurrent writes merge (its *policy*) and which values are allowed. Without a schema
(:meth:`StateSchema.empty`) every key is ``latest`` and any JSON value is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POLICIES = ("latest", "crdt", "device", "cloud")
"""``latest``: the write with the latest stamp wins (default); ``crdt``: Yjs merges (for
nested collaborative types); ``device``: only the device writes it (a cloud write is
refused); ``cloud``: only the cloud writes it (a device write is refused)."""


@dataclass(frozen=True)
class StateSchema:
    """The schema of a fleet's devices' state (placeholder until the schema work lands)."""

    @classmethod
    def empty(cls) -> StateSchema:
        """No schema: every key ``latest``, every JSON value allowed."""
        return cls()

    def policy(self, map_name: str, key: str) -> str:
        """The merge policy of ``key`` in root map ``map_name`` (one of :data:`POLICIES`)."""
        return "latest"

    def check(self, map_name: str, key: str, value: Any, *, deleted: bool = False) -> None:
        """Raise ``InvalidValue`` (detail: map, key) unless the write is allowed."""
