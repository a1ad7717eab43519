"""``crdt.ChangeTracker`` and ``crdt.plain``: what a sync reports as changed, value by value,
including the fast path for scalars (no pycrdt wrapper built, integral doubles as ints)."""

from __future__ import annotations

from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtsync import crdt
from crdtsync.values import MAX_SAFE_INTEGER


def remote_write(target: Doc[Any], write: Any) -> None:
    """Apply to ``target`` what ``write(doc)`` does on a fresh replica of it."""
    source: Doc[Any] = Doc()
    source.apply_update(target.get_update())
    before = source.get_state()
    write(source)
    target.apply_update(source.get_update(before))


@pytest.mark.parametrize(("value", "expected"), [
    (5.0, 5), (-0.0, 0), (2.5, 2.5), (float(MAX_SAFE_INTEGER), MAX_SAFE_INTEGER),
    (float(2**60), float(2**60)), (True, True), (False, False), ("x", "x"), (None, None),
    (7, 7), ({"a": 1.0, "b": [2.0, "c"]}, {"a": 1, "b": [2, "c"]}),
])
def test_plain_keeps_json_values_and_turns_integral_doubles_into_ints(
        value: Any, expected: Any) -> None:
    got = crdt.plain(value)
    assert got == expected and type(got) is type(expected)


def test_take_reports_each_changed_key_with_its_current_plain_value() -> None:
    doc: Doc[Any] = Doc()
    state = doc.get("state", type=Map)
    state["gone"] = 1
    state["kept"] = "same"
    tracker = crdt.ChangeTracker(doc)

    def write(d: Doc[Any]) -> None:
        m = d.get("state", type=Map)
        with d.transaction():
            m["f"] = 3.0
            m["g"] = 0.25
            m["b"] = True
            m["s"] = "text"
            m["nested"] = Map({"x": 1.0, "y": Array([1.0, "two"])})
            m["list"] = Array([4.0])
            m["text"] = Text("hello")
            del m["gone"]

    remote_write(doc, write)
    raw: dict[tuple[str, str], Any] = {}
    changes = tracker.take(raw)
    assert changes == {"state": {"f": 3, "g": 0.25, "b": True, "s": "text",
                                 "nested": {"x": 1, "y": [1, "two"]}, "list": [4],
                                 "text": "hello", "gone": None}}
    assert type(changes["state"]["f"]) is int
    assert raw[("state", "gone")] is crdt.ABSENT
    assert isinstance(raw[("state", "nested")], Map) and raw[("state", "f")] == 3.0
    assert tracker.take() == {}  # taken once


def test_take_counts_a_root_that_appeared_with_all_its_keys_and_an_inner_change_by_its_root_key(
        ) -> None:
    doc: Doc[Any] = Doc()
    doc.get("state", type=Map)["cfg"] = Map({"a": 1})
    tracker = crdt.ChangeTracker(doc)
    remote_write(doc, lambda d: d.get("config", type=Map).update({"p": 1, "q": "r"}))
    assert tracker.take() == {"config": {"p": 1, "q": "r"}}
    remote_write(doc, lambda d: d.get("state", type=Map)["cfg"].__setitem__("b", 2.0))
    assert tracker.take() == {"state": {"cfg": {"a": 1, "b": 2}}}


def test_a_replayed_update_changes_nothing() -> None:
    doc: Doc[Any] = Doc()
    source: Doc[Any] = Doc()
    source.get("state", type=Map)["k"] = 1
    doc.apply_update(source.get_update())
    tracker = crdt.ChangeTracker(doc)
    doc.apply_update(source.get_update())
    assert tracker.take() == {}
