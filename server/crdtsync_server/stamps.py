"""Latest write wins: the server's decision for each key a device or the cloud writes.

A device sends, with its update, the stamped writes of the keys it changed (``s``, protocol
section 13): for each key the value it wrote (or a delete) and a hybrid-logical-clock stamp
in its own clock. The server keeps one :class:`~crdtsync_server.store.KeyStamp` per key: the
stamp, in the server's frame, of the write the key holds, who made it, and the highest of
the device's own stamps decided for the key (``raw``). This module decides, after the Yjs
update was applied, which write each key keeps, whatever Yjs picked by client id:

- a device stamp is moved into the server's frame by the device's clock offset
  (``e = received - ck``, :func:`correct`), then clamped to the server's current stamp, so
  a stamp from the future never freezes a key;
- a device write whose raw stamp is at or below the row's ``raw`` was decided before (a
  replay after a lost response, or older than the device's own decided write): the key
  keeps what it held;
- against the device's own row (or no row) the device's newer write wins: a device's writes
  are ordered by its own clock, never by corrected stamps (the correction moves between
  syncs);
- against a cloud row the device wins iff its corrected stamp is greater (a tie goes to the
  cloud);
- keys of policy ``crdt``, keys holding a shared type (``Y.Map``, ``Y.Array``, ``Y.Text``)
  and keys the update changed without a stamped write (a client that does not stamp, a
  nested edit) are left to Yjs: their row becomes the server's stamp of this sync.

The result is a :class:`Decision`: values to write into the document so that it holds the
winner (``fixes``, written by the server before the update is captured, so the committed
update is the device's plus the fix-ups), the rows to store and the conflicts to report.
Everything here is pure except :func:`read_keys` and :func:`write_fixes`, which touch the
live document. Cloud writes are stamped by :func:`cloud_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Map, Text

from crdtsync import crdt, hlc
from crdtsync._fastinit import fast_init
from crdtsync.protocol import Conflict, StampedWrite, WriteInfo
from crdtsync.values import normalize

from .store import KeyStamp


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Marker("MISSING")
"""What :func:`read_keys` gives for a key the map does not hold (deleted or never set)."""
SHARED: Any = _Marker("SHARED")
"""What :func:`read_keys` gives for a key holding a shared type (merged by Yjs)."""
_UNREAD: Any = _Marker("UNREAD")
"""A value before the update that :func:`contested` did not ask for."""

Where = tuple[str, str]
"""``(map, key)``."""
Policy = Callable[[str, str], str]
"""``policy(map, key)``: ``latest``, ``crdt``, ``device`` or ``cloud`` (``StateSchema``)."""



def read_keys(doc: Doc[Any], keys: Iterable[Where]) -> dict[Where, Any]:
    """The value of each ``(map, key)`` as plain JSON data (numbers normalized),
    :data:`MISSING` when absent, :data:`SHARED` for a shared type; in one transaction, each
    root looked up once (pycrdt reads cost microseconds each: this runs on every sync) and
    never created only to find a key absent."""
    keys = list(keys)
    if not keys:
        return {}
    by_root: dict[str, list[str]] = {}
    for name, key in keys:
        by_root.setdefault(name, []).append(key)
    out: dict[Where, Any] = {}
    with doc.transaction():
        roots = set(crdt.root_names(doc))
        for name, names in by_root.items():
            if name not in roots:
                out.update(((name, key), MISSING) for key in names)
                continue
            values = crdt.map_values(doc.get(name, type=Map), names, crdt.ABSENT)
            out.update(((name, key), held(value)) for key, value in values.items())
    return out


def held(value: Any) -> Any:
    """A value as a document holds it (``crdt.ChangeTracker.take``'s ``raw``) in the terms
    of this module: :data:`MISSING`, :data:`SHARED` or plain JSON data."""
    if value is crdt.ABSENT:
        return MISSING
    if isinstance(value, (Map, Array, Text)):
        return SHARED
    return normalize(value)


def same(a: Any, b: Any) -> bool:
    """Whether two plain values (or :data:`MISSING`) are the same JSON value: unlike ``==``,
    ``True`` is not ``1``; numbers are compared after normalization (``5`` is ``5.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    return a is b if MISSING in (a, b) else bool(a == b)


def _correct(stamp: int, offset: int, now: int) -> int:
    return min(hlc.shift(stamp, offset), now)


correct = _correct
"""Device stamp ``stamp`` in the server's frame: moved by ``offset`` ms (the server's
receive time minus the device's clock ``ck``), then clamped to ``now`` (the server's stamp
of this sync). A variable, not a ``def``: this module is compiled (``crdtsync._compiled``),
where a function is called directly, and tests/test_simulation.py plants bugs here."""


def written(w: StampedWrite) -> Any:
    """The value a stamped write leaves: its value normalized, or :data:`MISSING`."""
    return MISSING if w.deleted else normalize(w.value)


def info(writer: str, stamp: int, value: Any) -> WriteInfo:
    """One side of a conflict: ``value`` may be :data:`MISSING` (a delete)."""
    if value is MISSING:
        return WriteInfo(writer, hlc.stamp_ms(stamp), None, True)
    return WriteInfo(writer, hlc.stamp_ms(stamp), value)


@fast_init
@dataclass(frozen=True, slots=True)
class Clocks:
    """The timing of one sync: ``now`` the server's stamp for it (the clamp, and the stamp of
    keys left to Yjs), ``offset`` the device's clock correction in ms (0 without ``ck``),
    ``last_sync`` the device's previous sync time in ms (0 if none): a cloud write after it
    was not seen by the device."""

    now: int
    offset: int = 0
    last_sync: int = 0


@dataclass(slots=True)
class Decision:
    """What a sync does beyond the Yjs merge: ``fixes`` (value or :data:`MISSING` per key)
    to write into the document, ``rows`` to store, ``conflicts`` to report."""

    fixes: dict[Where, Any] = field(default_factory=dict)
    rows: list[KeyStamp] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    decided: set[Where] = field(default_factory=set)
    """Keys whose stamped write was decided here (the others are left to Yjs)."""


@fast_init
@dataclass(frozen=True, slots=True)
class Inputs:
    """What :func:`decide` reads: the document key, the stored rows, each stamped key's
    policy (``kinds``), the values the stamped keys held ``before`` the update (only those
    :func:`contested` names) and hold ``after`` it, and the keys the update changed."""

    doc: str
    stored: Mapping[Where, KeyStamp]
    kinds: Mapping[Where, str]
    before: Mapping[Where, Any]
    after: Mapping[Where, Any]
    changed: Iterable[Where]


def policies(writes: Iterable[StampedWrite], policy: Policy) -> dict[Where, str]:
    """The policy of each stamped key."""
    return {(w.map, w.key): policy(w.map, w.key) for w in writes}


def contested(writes: Iterable[StampedWrite], stored: Mapping[Where, KeyStamp],
              kinds: Mapping[Where, str]) -> list[Where]:
    """The stamped keys whose value before the update the decision needs: those facing a
    cloud row or a ``cloud`` policy (the cloud may keep its value, or lose it in a
    conflict), and writes decided before (the key keeps its value). A device's newer write
    of a key it wrote last, or that nobody stamped, wins whatever the key held: its read,
    microseconds per key, is skipped (then the feed lists the key if the update changed
    it, even to the same value)."""
    out = []
    for w in writes:
        where = (w.map, w.key)
        row = stored.get(where)
        if kinds[where] == "cloud" or (row is not None and (row.writer == "cloud"
                                                            or w.stamp <= row.raw)):
            out.append(where)
    return out


def after_values(doc: Doc[Any], keys: Iterable[Where], before: Mapping[Where, Any],
                 landed: Mapping[Where, Any]) -> dict[Where, Any]:
    """The values ``keys`` hold after the update: what the update wrote (``landed``, from
    ``crdt.ChangeTracker.take``), else what they held before; read only when neither is
    known (a stamped key the update did not change and whose value was not read)."""
    out = {where: held(landed[where]) if where in landed else before.get(where, _UNREAD)
           for where in keys}
    out.update(read_keys(doc, [where for where, value in out.items() if value is _UNREAD]))
    return out



def decide(writes: Sequence[StampedWrite], given: Inputs, clocks: Clocks) -> Decision:
    """Decide each stamped write, then stamp the changed keys left to Yjs (module
    docstring). A key of policy ``device`` goes to the device's write and one of policy
    ``cloud`` keeps the cloud's, whatever the times (the schema refuses such writes before
    they get here; this is the rule should one pass)."""
    out = Decision()
    for w in writes:
        where = (w.map, w.key)
        kind = given.kinds[where]
        if kind == "crdt" or SHARED in (given.before.get(where), given.after[where]):
            continue
        out.decided.add(where)
        _decide_one(w, kind, given, clocks, out)
    for where in given.changed:
        if where not in out.decided:
            row = given.stored.get(where)
            out.rows.append(KeyStamp(given.doc, *where, clocks.now, "device",
                                     row.raw if row is not None else 0))
    return out


def _decide_one(w: StampedWrite, kind: str, given: Inputs, clocks: Clocks,
                out: Decision) -> None:
    where = (w.map, w.key)
    row, before, mine = given.stored.get(where), given.before.get(where, _UNREAD), written(w)
    if row is not None and w.stamp <= row.raw:  # decided before: keep what the key held
        _hold(out, where, before, given.after[where])
        return
    corrected = correct(w.stamp, clocks.offset, clocks.now)
    if kind == "device" or (kind != "cloud" and (row is None or row.writer == "device"
                                                 or corrected > row.stamp)):
        _hold(out, where, mine, given.after[where])
        out.rows.append(KeyStamp(given.doc, *where, corrected, "device", w.stamp))
        if (row is not None and row.writer == "cloud" and not same(before, mine)
                and hlc.stamp_ms(row.stamp) > clocks.last_sync):
            out.conflicts.append(Conflict(*where, info("device", corrected, mine),
                                          info("cloud", row.stamp, before)))
        return
    _hold(out, where, before, given.after[where])
    if row is not None:
        out.rows.append(dataclasses.replace(row, raw=w.stamp))
    if row is not None and not same(before, mine):
        out.conflicts.append(Conflict(*where, info("cloud", row.stamp, before),
                                      info("device", corrected, mine)))


def _hold(out: Decision, where: Where, value: Any, current: Any) -> None:
    """Make the key hold ``value``: a fix-up unless it already does."""
    if not same(value, current):
        out.fixes[where] = value


def write_fixes(doc: Doc[Any], fixes: Mapping[Where, Any]) -> None:
    """Write the fix-ups into ``doc`` in one transaction (a server write, so it is ordered
    after both the device's and the cloud's writes wherever it is merged)."""
    if not fixes:
        return
    with doc.transaction():
        for (name, key), value in fixes.items():
            target = crdt.root_map(doc, name)
            if value is MISSING:
                if key in target:
                    del target[key]
            else:
                target[key] = value


def cloud_rows(doc: str, name: str, keys: Iterable[str], stored: Mapping[Where, KeyStamp],
               now: int) -> list[KeyStamp]:
    """Rows of a cloud write of ``keys`` of root map ``name`` at server stamp ``now``: each
    key gets ``max(now, stored + 1)`` (a cloud write is later than everything the key held,
    even a stamp from a faster clock), writer ``cloud``; ``raw`` is kept (the device writes
    decided before stay decided)."""
    rows = []
    for key in keys:
        row = stored.get((name, key))
        stamp = now if row is None else max(now, row.stamp + 1)
        rows.append(KeyStamp(doc, name, key, min(stamp, hlc.MAX_STAMP), "cloud",
                             row.raw if row is not None else 0))
    return rows


def meta_json(rows: Iterable[KeyStamp], doc: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{map: {key: {"time": ms, "writer": ...}}}`` of a document's rows, with
    ``"deleted": true`` for a key the document (``doc``, its JSON) does not hold."""
    meta: dict[str, dict[str, dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r.map, r.key)):
        entry: dict[str, Any] = {"time": hlc.stamp_ms(row.stamp), "writer": row.writer}
        if row.key not in doc.get(row.map, {}):
            entry["deleted"] = True
        meta.setdefault(row.map, {})[row.key] = entry
    return meta
