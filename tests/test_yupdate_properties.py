"""Property test of the update reader and pycrdt together, on structurally random Yjs updates.

Hypothesis builds updates struct by struct with ``crdtsync.testing.yjs``: every content kind,
every parent form (root names including ``""``, parent ids of earlier or unknown items), origins
and right origins pointing anywhere, ``any`` values of every tag nested up to 40 deep, delete
sets. Whatever it builds, the server's path (``read_update``, the completeness check,
``apply_remote``, ``check_changes``, ``to_json``) ends in a typed error or a document whose JSON
view is readable: never another exception, never a crash of the process.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from crdtsync import crdt
from crdtsync.errors import CorruptUpdate, InvalidValue
from crdtsync.protocol import parse_state_vector
from crdtsync.testing import yjs
from crdtsync.yupdate import read_update

CLIENTS = [7, 8, 2**32 + 5]
GOOD_ROOTS = ["state", "config"]
ROOTS = [*GOOD_ROOTS, "", "r" * 257]
GOOD_KEYS = ["a", "b", "é😀"]
KEYS = [*GOOD_KEYS, "", "k" * 257]

valid_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
hostile_scalars = st.one_of(
    st.integers(2**53, 2**60).map(yjs.Varint), st.sampled_from([math.nan, math.inf]),
    st.binary(max_size=3), st.just(yjs.Undefined()), st.integers(-5, 5).map(yjs.BigInt),
    st.floats(width=32).map(yjs.Float32))


def values(clean: bool) -> st.SearchStrategy[Any]:
    """JSON data a document may hold (``clean``), or with some values it may not."""
    scalars = valid_scalars if clean else st.one_of(valid_scalars, hostile_scalars)
    keys = GOOD_KEYS if clean else KEYS
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(keys), inner,
                                                     max_size=3)), max_leaves=8)


CLEAN_KINDS = ["any"] * 6 + ["type"] * 3 + ["string", "deleted"]
HOSTILE_KINDS = [*CLEAN_KINDS, "deep", "binary", "json", "embed", "format", "doc"]


@st.composite
def contents(draw: st.DrawFn, clean: bool) -> yjs.Content:
    kind = draw(st.sampled_from(CLEAN_KINDS if clean else HOSTILE_KINDS))
    if kind == "any":
        return yjs.any_content(*draw(st.lists(values(clean), min_size=1, max_size=3)))
    if kind == "deep":
        return yjs.any_content(raw=yjs.nested_array(draw(st.integers(1, 40))))
    if kind == "type":
        return yjs.type_content(draw(st.sampled_from([0, 1, 2] if clean else range(7))), "p")
    if kind == "string":
        return yjs.string_content(draw(st.text(min_size=1, max_size=4)))
    if kind == "deleted":
        return yjs.deleted_content(draw(st.integers(1, 3)))
    if kind == "binary":
        return yjs.binary_content(b"\x01")
    if kind == "json":
        return yjs.json_content("1")
    if kind == "embed":
        return yjs.embed_content("{}")
    if kind == "format":
        return yjs.format_content("bold", "true")
    return yjs.doc_content("sub")


@st.composite
def updates(draw: st.DrawFn) -> bytes:
    """Half of them clean (only what a conforming client writes, placed anywhere), half with
    hostile parts."""
    clean = draw(st.booleans())
    roots, keys = (GOOD_ROOTS, GOOD_KEYS) if clean else (ROOTS, KEYS)
    runs = []
    for client in draw(st.lists(st.sampled_from(CLIENTS), min_size=1, max_size=2,
                                unique=True)):
        clock = draw(st.sampled_from([0, 0, 0, 1]))
        structs, at = [], clock
        for _ in range(draw(st.integers(1, 6))):
            ids = st.tuples(st.sampled_from(CLIENTS), st.integers(0, max(at, 1)))
            placement = draw(st.sampled_from(["root"] * 4 + ["parent", "origin", "right"]))
            content = draw(contents(clean))
            if placement == "root":
                key = draw(st.sampled_from(keys if clean else [*keys, None]))
                struct = yjs.item(content, root=draw(st.sampled_from(roots)), key=key)
            elif placement == "parent":
                struct = yjs.item(content, parent=draw(ids),
                                  key=draw(st.one_of(st.none(), st.sampled_from(keys))))
            elif placement == "origin":
                struct = yjs.item(content, origin=draw(ids))
            else:
                struct = yjs.item(content, right=draw(ids))
            structs.append(struct)
            at += struct.length
        runs.append(yjs.client(client, clock, *structs))
    deletes = draw(st.lists(st.tuples(st.sampled_from(CLIENTS), st.lists(
        st.tuples(st.integers(0, 8), st.integers(1, 3)), max_size=2)), max_size=2))
    return yjs.update(*runs, deletes=deletes)


def base_doc() -> Doc[Any]:
    doc: Doc[Any] = Doc(client_id=7)
    doc.get("state", type=Map)["a"] = 1
    doc.get("state", type=Map)["n"] = Map({"x": 1})
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(updates(), st.booleans())
def test_any_structure_ends_in_a_typed_error_or_a_readable_document(
        update: bytes, on_base: bool) -> None:
    doc = base_doc() if on_base else Doc(client_id=99)
    doc = crdt.new_doc(99, doc.get_update())
    tracker = crdt.ChangeTracker(doc)
    try:
        info = read_update(update, doc="state")
    except (CorruptUpdate, InvalidValue) as exc:
        event(f"reader: {exc.code}")
        return
    if info.missing(parse_state_vector(doc.get_state())) is not None:
        event("not applied: builds on missing items")
        return  # not applied (protocol 7a)
    try:
        crdt.apply_remote(doc, update, name="state")
        crdt.check_changes(tracker.take(), name="state")
    except (CorruptUpdate, InvalidValue) as exc:
        event(f"after apply: {exc.code}")
        return
    event("applied")
    view = crdt.to_json(doc)
    for root, entries in view.items():
        assert root and len(root) <= 256
        for value in entries.values():
            assert not (isinstance(value, float) and not math.isfinite(value))
