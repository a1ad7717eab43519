"""Read-only documents the cloud shares with a device: its fleet's document and the project's.

The device keeps a copy of each in its store and syncs it with the same envelope entry as
its own document, but never writes it: a request carries only the copy's state vector and
generation, and the cloud answers with what the copy lacks. When the generation the cloud
answers with differs from the copy's (the device moved to another fleet, or the document
was rebuilt), the copy is dropped and replaced by the full document in that answer.

Environment variables live in the ``env`` map of three documents, with precedence device >
fleet > project: :class:`Env` is the merged, read-only view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pycrdt import Doc, Map, TransactionEvent

from . import crdt
from ._device_store import DeviceStore
from .errors import Forbidden, InvalidValue
from .protocol import DocSync
from .schema import SCHEMA_MAP, StateSchema
from .values import normalize

log = logging.getLogger("crdtsync.device")

ENV_MAP = "env"
TEMPLATES = "templates"
"""Root map of the fleet document: ``{topic: {"hash": hex, "json": definition text}}``."""
EnvCallback = Callable[[str, Any, Any], None]


class SharedDoc:
    """The device's copy of one read-only document."""

    def __init__(self, name: str, store: DeviceStore) -> None:
        self.name = name
        self.store = store
        self.doc: Doc[Any] = Doc()
        self._captured: list[bytes] = []
        self._maps: dict[str, dict[str, Any]] = {}
        self._subscription: Any = None

    @property
    def gen(self) -> int:
        return int(self.store.meta.get(f"gen:{self.name}", 0))

    async def load(self, client_id: int) -> None:
        """Build the copy from the store (at start)."""
        local = await self.store.load_doc(self.name)
        self._install(crdt.new_doc(client_id, local.snapshot, (u for _, u in local.updates)))

    def _install(self, doc: Doc[Any]) -> None:
        self.close()
        self.doc = doc
        self._captured = []
        self._maps = {}
        self._subscription = doc.observe(self._capture)  # once per document lifetime

    def close(self) -> None:
        """Remove the observer (it would keep the document alive); idempotent."""
        if self._subscription is not None:
            self.doc.unobserve(self._subscription)
            self._subscription = None

    def _capture(self, event: TransactionEvent) -> None:
        self._captured.append(event.update)
        self._maps = {}

    def part(self) -> DocSync:
        """The request entry: state vector and generation only, never an update."""
        return DocSync(self.name, self.doc.get_state(), b"", self.gen)

    async def apply(self, part: DocSync) -> None:
        """Apply the cloud's answer; replace the copy when the generation changed."""
        replaced = part.gen != self.gen
        if replaced:
            log.info("shared document %s: generation %d -> %d, replacing the local copy",
                     self.name, self.gen, part.gen)
            self._install(crdt.new_doc(self.doc.client_id))
        if part.update:
            crdt.apply_remote(self.doc, part.update, name=self.name)
        if self._captured or replaced:
            self._captured = []
            # Shared documents are small and change rarely: store each new state whole.
            await self.store.replace_doc(self.name, self.doc.get_update(),
                                         {f"gen:{self.name}": part.gen})

    def get(self, map_name: str) -> dict[str, Any]:
        """One root map as JSON data; read-only (it is cached until the document changes:
        ``emit`` looks up its template here every time)."""
        cached = self._maps.get(map_name)
        if cached is None:
            value = self.doc.get(map_name, type=Map).to_py()
            cached = self._maps[map_name] = normalize(value) if value else {}
        return cached


class FleetSchema:
    """The state schema held by the device's copy of its fleet document (docs/protocol.md
    15c), parsed once per version. A device without a fleet, or whose fleet has no schema,
    gets the empty schema (everything allowed)."""

    def __init__(self, fleet: SharedDoc) -> None:
        self._fleet = fleet
        self._version: Any = None
        self._schema = StateSchema.empty()

    def current(self) -> StateSchema:
        """The schema in force on the device now (a dictionary lookup unless the fleet
        document brought another version). One that does not parse (a newer cloud's
        format) is logged and not enforced locally: the cloud still enforces it."""
        entry = self._fleet.get(SCHEMA_MAP)
        version = entry.get("hash")
        if version != self._version:
            try:
                self._schema = StateSchema.from_entry(entry)
            except InvalidValue as exc:
                log.warning("the fleet's state schema %r is not understood here (%s); "
                            "not checked on the device", version, exc.message)
                self._schema = StateSchema.empty()
            self._version = version
        return self._schema


class ReadOnlyMap(Mapping[str, Any]):
    """A root map of a shared document, read-only: writing raises :class:`Forbidden`."""

    def __init__(self, shared: SharedDoc, name: str) -> None:
        self._shared = shared
        self._name = name

    def _data(self) -> dict[str, Any]:
        return self._shared.get(self._name)

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __setitem__(self, key: str, value: Any) -> None:
        raise Forbidden(f"the {self._shared.name} document is read-only on a device",
                        {"doc": self._shared.name})

    def __repr__(self) -> str:
        return f"ReadOnlyMap({self._shared.name}.{self._name}, {self._data()!r})"


class Env(Mapping[str, Any]):
    """Environment variables: the device's own (set by the cloud in its document's ``env``
    map), over its fleet's, over the project defaults."""

    def __init__(self, own: Callable[[], Mapping[str, Any]], fleet: SharedDoc,
                 project: SharedDoc) -> None:
        self._own = own
        self._fleet = fleet
        self._project = project
        self._callbacks: list[EnvCallback] = []
        self._last: dict[str, Any] = {}

    def merged(self) -> dict[str, Any]:
        return {**self._project.get(ENV_MAP), **self._fleet.get(ENV_MAP), **self._own()}

    def source(self, key: str) -> str | None:
        """Where ``key`` comes from: ``"device"``, ``"fleet"``, ``"project"`` or ``None``."""
        for name, layer in (("device", self._own()), ("fleet", self._fleet.get(ENV_MAP)),
                            ("project", self._project.get(ENV_MAP))):
            if key in layer:
                return name
        return None

    def __getitem__(self, key: str) -> Any:
        return self.merged()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.merged())

    def __len__(self) -> int:
        return len(self.merged())

    def on_change(self, callback: EnvCallback) -> EnvCallback:
        """Call ``callback(key, old, new)`` when a merged value changes after a sync."""
        self._callbacks.append(callback)
        return callback

    def remember(self) -> None:
        self._last = self.merged()

    def announce(self) -> int:
        """Compare with the last remembered view; call the callbacks; return the count."""
        now = self.merged()
        changed = [k for k in {*now, *self._last} if now.get(k) != self._last.get(k)]
        for key in sorted(changed):
            for callback in self._callbacks:
                try:
                    callback(key, self._last.get(key), now.get(key))
                except Exception:
                    log.exception("env callback failed for %r", key)
        self._last = now
        return len(changed)
