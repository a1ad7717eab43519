"""Helpers around pycrdt documents shared by device and server.

A crdtsync document is a pycrdt ``Doc`` whose roots are all ``Map``s (``state``, ``config``,
...). This module owns the few operations both sides do the same way: building a document
from a stored log, compacting a log through a ``Doc`` (PYCRDT_NOTES 3), rebuilding a
document without its history, carrying keys into a new generation (adoption), applying a
remote update with errors translated, writing validated values, and reading a document as
JSON.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

from pycrdt import Array, Doc, Map, Text

from .errors import CorruptUpdate
from .values import MAX_SAFE_INTEGER, check_key, check_value, json_view, normalize

MAX_CLIENT_ID = 2**32 - 1


_ids: random.Random = secrets.SystemRandom()


def random_client_id() -> int:
    """A fresh random Yjs client id (32 bits, like Yjs itself, never 0).

    Each replica must own its id: two live documents sharing one diverge silently
    (PYCRDT_NOTES 14), so ids are never derived from a device id.
    """
    return _ids.randrange(1, MAX_CLIENT_ID + 1)


@contextmanager
def seeded_client_ids(seed: int) -> Iterator[None]:
    """Draw client ids from ``random.Random(seed)`` inside the block (deterministic
    simulations only; never in production, where ids must be unpredictable)."""
    global _ids
    saved, _ids = _ids, random.Random(seed)
    try:
        yield
    finally:
        _ids = saved


def new_doc(client_id: int, snapshot: bytes = b"", updates: Iterable[bytes] = ()) -> Doc[Any]:
    """Build a document from a snapshot and the updates logged after it."""
    doc: Doc[Any] = Doc(client_id=client_id)
    if snapshot:
        doc.apply_update(snapshot)
    for update in updates:
        doc.apply_update(update)
    return doc


def compact(snapshot: bytes, updates: Iterable[bytes]) -> bytes:
    """Merge a snapshot and updates into one update, through a ``Doc`` (fast, garbage-collected)."""
    return new_doc(1, snapshot, updates).get_update()


def rebuilt(doc: Doc[Any], client_id: int) -> Doc[Any]:
    """A new document with client id ``client_id`` holding the content of ``doc`` and none
    of its history (tombstones of overwritten and deleted values): what a rebuild stores as
    the next generation (docs/architecture.md, "Generations").

    Every root map keeps its keys; a nested ``Y.Map``, ``Y.Array`` or ``Y.Text`` is
    recreated as the same shared type (so later edits inside it still merge), a plain value
    is copied with numbers normalized (:func:`~crdtsync.values.normalize`; JSON does not
    tell ``5`` from ``5.0``). Only what a crdtsync document may hold is expected (root maps,
    JSON values, those three types without formatting; ``crdtsync.yupdate`` refuses the
    rest). ``client_id`` must be new to the content: pass :func:`random_client_id`.
    """
    fresh: Doc[Any] = Doc(client_id=client_id)
    with doc.transaction(), fresh.transaction():
        for name in sorted(doc.keys()):
            target = fresh.get(name, type=Map)
            for key, value in doc.get(name, type=Map).items():
                target[key] = _fresh(value)
    return fresh


def _fresh(value: Any) -> Any:
    """``value`` as a new, unintegrated value of the same kind (see :func:`rebuilt`)."""
    if isinstance(value, Map):
        return Map({key: _fresh(item) for key, item in value.items()})
    if isinstance(value, Array):
        return Array([_fresh(item) for item in value])
    if isinstance(value, Text):
        return Text(str(value))
    return normalize(value)


def apply_remote(doc: Doc[Any], update: bytes, *, name: str = "") -> None:
    """Apply an update from the network; raise :class:`CorruptUpdate` if it does not decode.

    Failed applies are atomic in Yrs: nothing of a rejected update is integrated.
    """
    try:
        doc.apply_update(update)
    except BaseException as exc:
        if not rejects_input(exc):
            raise
        raise CorruptUpdate(f"CRDT update rejected: {exc}", {"doc": name}) from exc


def rejects_input(exc: BaseException) -> bool:
    """True for the errors pycrdt raises on bad input: ``ValueError``, ``RuntimeError``, and
    a Rust panic surfacing as ``pyo3_runtime.PanicException`` (a ``BaseException`` that
    ``except Exception`` would let through and take the server down)."""
    return isinstance(exc, (ValueError, RuntimeError)) or type(exc).__name__ == "PanicException"


def check_changes(changes: Mapping[str, Mapping[str, Any]], *, name: str = "") -> None:
    """Raise :class:`~crdtsync.errors.InvalidValue` unless every changed value (as
    :class:`ChangeTracker` reports them, after a remote update was applied) is JSON data
    within the limits, nested types counted as levels: the check of what an update actually
    wrote into the real document, whatever it built on."""
    for root, values in changes.items():
        check_value(dict(values), where=f"{name}:{root}")


def root_map(doc: Doc[Any], name: str) -> Map[Any]:
    """The root map ``name`` of ``doc`` (created empty if absent)."""
    check_key(name, where="map name")
    root: Map[Any] = doc.get(name, type=Map)
    return root


def write(doc: Doc[Any], name: str, changes: Mapping[str, Any]) -> None:
    """Set keys of root map ``name`` in one transaction; a ``None`` value deletes the key.

    Everything is validated first (:class:`~crdtsync.errors.InvalidValue`), so a bad value
    changes nothing.
    """
    for key, value in changes.items():
        check_key(key, where=f"{name} key")
        check_value(value, where=f"{name}.{key}")
    target = root_map(doc, name)
    with doc.transaction():
        for key, value in changes.items():
            if value is None:
                if key in target:
                    del target[key]
            else:
                target[key] = value


_MISSING = object()
ABSENT: Any = _MISSING
"""The value :meth:`ChangeTracker.take` reports in ``raw`` for a key that was deleted."""


def root_keys(doc: Doc[Any]) -> list[tuple[str, str]]:
    """Every ``(map, key)`` of ``doc``, sorted."""
    names = list(doc.keys())
    return sorted((name, key) for name in names for key in doc.get(name, type=Map))


def differences(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
                ) -> list[tuple[str, str]]:
    """The ``(map, key)`` whose value differs between two :func:`to_json` readings (a key
    absent on one side differs from any value on the other), sorted."""
    empty: Mapping[str, Any] = {}
    out = []
    for name in sorted({*before, *after}):
        old, new = before.get(name, empty), after.get(name, empty)
        out += [(name, key) for key in sorted({*old, *new})
                if key not in old or key not in new or old[key] != new[key]]
    return out


def carry(source: Doc[Any], target: Doc[Any], keys: Iterable[tuple[str, str]]) -> None:
    """Write the value ``source`` holds for each ``(map, key)`` into ``target``, in one
    transaction of ``target``: a copy when ``source`` has the key (nested types recreated as
    the same types, as :func:`rebuilt` does), a delete when it has not. A root is created in
    neither document only to find a key absent."""
    roots, targets = set(source.keys()), set(target.keys())
    with target.transaction():
        for name, key in keys:
            value = source.get(name, type=Map).get(key, _MISSING) if name in roots else _MISSING
            if value is not _MISSING:
                root_map(target, name)[key] = _fresh(value)
            elif name in targets and key in (root := root_map(target, name)):
                del root[key]


def root_names(doc: Doc[Any]) -> list[str]:
    """The names of ``doc``'s roots, without the wrapper pycrdt's ``Doc.keys`` builds for
    each root (it runs several times per sync)."""
    with doc.transaction() as txn:
        assert txn._txn is not None  # inside the block
        return list(doc._doc.roots(txn._txn))


def map_values(root: Map[Any], keys: Iterable[str], missing: Any = None) -> dict[str, Any]:
    """The value ``root`` holds at each of ``keys`` (``missing`` when absent; a shared type as
    pycrdt wraps it), read in one transaction through the integrated map. pycrdt's own
    ``Map.get`` opens three nested transactions per key (about 3 µs); this runs on every
    sync for every key it changed."""
    with root.doc.transaction() as txn:
        return _read_keys(root, txn._txn, keys, missing)


_SCALARS = frozenset({float, int, str, bool, type(None)})
"""Types a document hands out as themselves: no wrapper to build, nothing to convert."""


def _read_keys(root: Map[Any], handle: Any, keys: Iterable[str], missing: Any
               ) -> dict[str, Any]:
    """:func:`map_values` inside the open transaction ``handle``. A scalar skips pycrdt's
    ``_maybe_as_type_or_doc`` (an ``isinstance`` per shared type, about 1 µs a value)."""
    raw, out = root.integrated, {}
    for key in keys:
        if not raw.has(handle, key):
            out[key] = missing
            continue
        value = raw.get(handle, key)
        out[key] = value if type(value) in _SCALARS else root._maybe_as_type_or_doc(value)
    return out


class ChangeTracker:
    """Records which keys of which root maps of ``doc`` change, by any means (a local write,
    a remote update), from its creation on. Observers are attached once per root for the
    document's lifetime (PYCRDT_NOTES 5 and 9), never per write.

    :meth:`take` returns ``{map: {key: current value, or None if deleted}}`` for the keys
    changed since the last :meth:`take` or :meth:`discard`; a replayed update changes nothing
    and yields ``{}``. A root map that appeared meanwhile counts with all its keys."""

    def __init__(self, doc: Doc[Any]) -> None:
        self.doc = doc
        self._changed: dict[str, set[str]] = {}
        self._observed: dict[str, tuple[Map[Any], Any]] = {}
        self._adopt_roots(mark=False)

    def _adopt_roots(self, *, mark: bool) -> None:
        for name in root_names(self.doc):
            if name not in self._observed:
                root = self.doc.get(name, type=Map)
                # On the integrated map: pycrdt's ``observe_deep`` wraps every event and
                # computes all its fields first (about 13 µs per sync); this reads two.
                self._observed[name] = (
                    root, root.integrated.observe_deep(partial(self._on_change, name)))
                if mark:
                    self._changed.setdefault(name, set()).update(root.keys())

    def _on_change(self, name: str, events: list[Any]) -> None:
        """Called by Yrs with its own event objects, inside the transaction; must not
        raise."""
        keys = self._changed.setdefault(name, set())
        for event in events:
            # A change inside a nested type counts for the root key that holds it.
            path = event.path
            if path:
                keys.add(path[0])
            else:
                keys.update(event.keys)

    def take(self, raw: dict[tuple[str, str], Any] | None = None
             ) -> dict[str, dict[str, Any]]:
        """The changes since the last call, with current values, read in one transaction.
        With ``raw``, also put there each changed ``(map, key)``'s value as the document
        holds it (a shared type as itself; :data:`ABSENT` for a deleted key), for a caller
        that must tell those apart without reading the keys again."""
        self._adopt_roots(mark=True)
        changed, self._changed = self._changed, {}
        if not changed:
            return {}
        result: dict[str, dict[str, Any]] = {}
        with self.doc.transaction() as txn:
            for name in sorted(changed):
                values = _read_keys(self._observed[name][0], txn._txn, sorted(changed[name]),
                                    _MISSING)
                result[name] = {key: None if value is _MISSING else plain(value)
                                for key, value in values.items()}
                if raw is not None:
                    raw.update(((name, key), value) for key, value in values.items())
        return result

    def discard(self) -> None:
        """Forget the changes so far (they are already accounted for elsewhere)."""
        self._adopt_roots(mark=False)
        self._changed = {}

    def close(self) -> None:
        """Unsubscribe: a pycrdt observer keeps its document alive (the callback is held on
        the Rust side, out of reach of Python's garbage collector) until it is removed."""
        for _root, subscription in self._observed.values():
            subscription.drop()
        self._observed = {}
        self._changed = {}


def plain(value: Any) -> Any:
    """A value read from a document as JSON data: nested shared types as what they hold
    (``Y.Map`` an object, ``Y.Array`` a list, ``Y.Text`` its string), numbers normalized."""
    kind = type(value)
    if kind is float:  # the common case, without the ``isinstance`` calls below
        return int(value) if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER else value
    if kind in _SCALARS:
        return value
    if isinstance(value, (Map, Array, Text)):
        value = value.to_py()
    return normalize(value)


def to_json(doc: Doc[Any]) -> dict[str, Any]:
    """The whole document as JSON data: ``{map_name: {key: value}}``, nested shared types
    as plain values, numbers normalized, and values an older version let in shown as
    :func:`~crdtsync.values.json_view` does (the view is always valid JSON)."""
    return {name: json_view(normalize(doc.get(name, type=Map).to_py()))
            for name in sorted(doc.keys())}
