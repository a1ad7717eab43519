"""``StateMap``: the validated, durable key-value view a device app writes its state through."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Protocol

from pycrdt import Doc, Map

from . import crdt
from .schema import StateSchema
from .values import normalize


class StateOwner(Protocol):
    """Who holds the document and persists writes (a :class:`~crdtsync.Device`)."""

    @property
    def doc(self) -> Doc[Any]: ...

    @property
    def schema(self) -> StateSchema: ...

    def write_state(self, name: str, changes: Mapping[str, Any]) -> None: ...


class StateMap(MutableMapping[str, Any]):
    """One root map of a device document, as a ``MutableMapping`` of JSON values.

    Every assignment is validated (:class:`~crdtsync.errors.InvalidValue` for values a CRDT
    cannot hold, such as integers beyond 2**53; against the fleet's state schema, when it has
    one: :class:`~crdtsync.errors.SchemaViolation` for a value it refuses,
    :class:`~crdtsync.errors.Forbidden` for a key only the cloud writes) and is durable in
    the device store before the statement returns. Reads give JSON data with integral
    numbers as ``int``; a key that is absent but has a ``default`` in the schema reads as
    that default (``state[key]``, ``state.get(key)``), while ``in``, ``len``, iteration and
    :meth:`to_dict` show only the keys the document holds.
    ``update({...})`` writes several keys in one transaction (one durable write).
    Concurrent writes to one key by device and cloud are merged by Yjs: see docs/protocol.md.
    """

    def __init__(self, owner: StateOwner, name: str) -> None:
        self._owner = owner
        self.name = name

    @property
    def _map(self) -> Map[Any]:
        return crdt.root_map(self._owner.doc, self.name)

    def __getitem__(self, key: str) -> Any:
        root = self._map
        if key in root:
            return crdt.plain(root[key])
        default = self._owner.schema.default(self.name, key)
        if default is None:
            raise KeyError(key)
        return default

    def __setitem__(self, key: str, value: Any) -> None:
        if value is None:
            raise TypeError("None is not storable as a value; use `del state[key]` to remove")
        self._owner.write_state(self.name, {key: value})

    def __delitem__(self, key: str) -> None:
        if key not in self._map:
            raise KeyError(key)
        self._owner.write_state(self.name, {key: None})

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._map.keys()))

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._map

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set several keys in one transaction; a ``None`` value deletes that key."""
        changes = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        self._owner.write_state(self.name, changes)

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy of the map."""
        return normalize(self._map.to_py()) or {}

    def __repr__(self) -> str:
        return f"StateMap({self.name!r}, {self.to_dict()!r})"
