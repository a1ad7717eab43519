"""State schemas on the server (docs/protocol.md section 15c).

A fleet's schema lives in its shared document, root map ``schema`` (``{"hash", "json"}``,
canonical JSON text, like templates), so it reaches every device of the fleet at its next
sync, and that document is the source of truth for the server too: :class:`FleetSchemas`
reads the current schema from the live fleet document, which ``DocumentCache`` catches up
with what other server processes committed, and parses each version once. Every version
ever set is also kept by hash (:class:`SchemaRegistry`, store settings ``schema:<hash>``),
so a version a device or a log names can still be looked up.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from pycrdt import Doc, Map

from crdtsync.errors import InvalidValue
from crdtsync.schema import SCHEMA_MAP, StateSchema

from .documents import DocumentCache
from .store import DeviceRecord, SettingsStore
from .sync import fleet_key

log = logging.getLogger("crdtsync.server")

PREFIX = "schema:"
"""Store setting of a schema version: ``schema:<hash hex>`` = canonical JSON text."""


class SchemaRegistry:
    """Every schema version the cloud set, by hash, persisted in the store's settings."""

    def __init__(self, store: SettingsStore) -> None:
        self.store = store

    async def put(self, schema: StateSchema) -> None:
        """Keep ``schema`` for good (rewriting an existing version stores the same text)."""
        await self.store.set_setting(PREFIX + schema.version, schema.canonical.decode())

    async def get(self, version: str) -> StateSchema | None:
        """The schema whose hash is ``version`` (hex), or ``None``."""
        text = await self.store.get_setting(PREFIX + version)
        return None if text is None else StateSchema.from_json(text)


class FleetSchemas:
    """The current :class:`StateSchema` of each fleet, for the checks of a sync or a cloud
    write. Each call reads the version (hash) the fleet document holds now, under that
    document's lock, so a schema set or deleted through any server process is in force at
    the next sync that process serves; parsing happens once per version (an LRU of
    ``capacity`` versions)."""

    def __init__(self, docs: DocumentCache, *, capacity: int = 256) -> None:
        self.docs = docs
        self.capacity = capacity
        self._parsed: OrderedDict[str, StateSchema] = OrderedDict()

    async def schema_for(self, device: DeviceRecord) -> StateSchema:
        """The schema ``device`` is held to: its fleet's, or the empty schema (everything
        allowed) for a device without a fleet or a fleet without a schema."""
        if not device.fleet:
            return StateSchema.empty()
        return await self.for_fleet(device.fleet)

    async def for_fleet(self, fleet: str) -> StateSchema:
        """The fleet's current schema (the empty one when it has none)."""
        key = fleet_key(fleet)
        async with self.docs.lock(key):
            return self.current((await self.docs.get(key)).doc)

    def current(self, doc: Doc[Any]) -> StateSchema:
        """The schema a fleet document holds. A version that does not parse (written by a
        newer server during a rolling upgrade, say) is logged once and enforces nothing
        here; the processes that understand it still enforce it."""
        if SCHEMA_MAP not in doc.keys():  # noqa: SIM118 (a pycrdt Doc is not a Mapping)
            return StateSchema.empty()  # never create the root by reading it
        entry: Map[Any] = doc.get(SCHEMA_MAP, type=Map)
        version = entry.get("hash")
        if not isinstance(version, str):
            return StateSchema.empty()
        schema = self._parsed.get(version)
        if schema is None:
            schema = self._parse(version, entry.get("json"))
            self._parsed[version] = schema
            while len(self._parsed) > self.capacity:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(version)
        return schema

    @staticmethod
    def _parse(version: str, text: Any) -> StateSchema:
        try:
            return StateSchema.from_entry({"hash": version, "json": text})
        except InvalidValue as exc:
            log.error("fleet schema %s does not parse here (%s); not enforced by this "
                      "process", version, exc.message)
            return StateSchema.empty()
