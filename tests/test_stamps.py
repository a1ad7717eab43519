"""Unit tests of the latest-write-wins decision (``crdtsync_server.stamps``), pure parts.

The end-to-end behaviour (a real server, both client-id orders, skewed clocks) is in
``test_latest_wins.py``; these pin the rules that are easy to get subtly wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
from pycrdt import Doc, Map, Text

from crdtsync import hlc
from crdtsync.protocol import StampedWrite
from crdtsync_server import stamps
from crdtsync_server.stamps import MISSING, SHARED, Clocks, Inputs
from crdtsync_server.store import KeyStamp

NOW = hlc.stamp(1_000_000)
K = ("state", "k")


@pytest.mark.parametrize("a, b, equal", [
    (True, 1, False), (1, True, False), (False, 0, False), (1, 1, True), (1.5, 1.5, True),
    ({"a": [1, True]}, {"a": [1, True]}, True), ({"a": [1, True]}, {"a": [1, 1]}, False),
    ([1], (1,), False), (None, MISSING, False), (MISSING, MISSING, True), ("x", MISSING, False),
    ({"a": 1}, {"a": 1, "b": 2}, False), ({}, [], False),
])
def test_same_tells_json_values_apart_exactly(a: Any, b: Any, equal: bool) -> None:
    assert stamps.same(a, b) is equal


def test_correct_moves_by_the_offset_and_clamps_to_now() -> None:
    assert stamps.correct(hlc.stamp(500, 3), 100, NOW) == hlc.stamp(600, 3)
    assert stamps.correct(hlc.stamp(500), -1_000, NOW) == 0  # never below 0
    assert stamps.correct(hlc.stamp(999_999), 10, NOW) == NOW  # from the future: now


def decide(w: StampedWrite, row: KeyStamp | None, before: Any, after: Any,
           last_sync: int = 0) -> stamps.Decision:
    given = Inputs("d/state", {K: row} if row else {}, {K: "latest"}, {K: before},
                   {K: after}, [K])
    return stamps.decide([w], given, Clocks(NOW, 0, last_sync))


def write(at: int, value: Any = "device") -> StampedWrite:
    if value is MISSING:
        return StampedWrite("state", "k", hlc.stamp(at), None, True)
    return StampedWrite("state", "k", hlc.stamp(at), value)


def test_a_replay_of_an_overruled_write_reports_nothing_again() -> None:
    cloud = KeyStamp("d/state", "state", "k", hlc.stamp(900), "cloud")
    first = decide(write(800), cloud, "cloud", "device")  # Yjs took the device's
    assert first.fixes == {K: "cloud"}
    assert first.rows == [KeyStamp("d/state", "state", "k", hlc.stamp(900), "cloud",
                                   hlc.stamp(800))]
    assert [(c.winner.writer, c.loser.time) for c in first.conflicts] == [("cloud", 800)]
    again = decide(write(800), first.rows[0], "cloud", "cloud")
    assert (again.fixes, again.rows, again.conflicts) == ({}, [], [])


def test_a_device_win_over_a_seen_cloud_write_is_no_conflict() -> None:
    cloud = KeyStamp("d/state", "state", "k", hlc.stamp(900), "cloud")
    unseen = decide(write(950), cloud, "cloud", "cloud", last_sync=800)
    assert unseen.fixes == {K: "device"} and len(unseen.conflicts) == 1
    seen = decide(write(950), cloud, "cloud", "device", last_sync=900)
    assert seen.fixes == {} and seen.conflicts == []
    assert seen.rows == [KeyStamp("d/state", "state", "k", hlc.stamp(950), "device",
                                  hlc.stamp(950))]


def test_a_tie_goes_to_the_cloud_and_equal_values_are_no_conflict() -> None:
    cloud = KeyStamp("d/state", "state", "k", hlc.stamp(900), "cloud")
    tie = decide(write(900, "same"), cloud, "same", "same")
    assert tie.rows[0].writer == "cloud" and tie.conflicts == [] and tie.fixes == {}


def test_a_delete_that_wins_removes_the_key() -> None:
    decision = decide(write(950, MISSING), None, "x", "x")
    assert decision.fixes == {K: MISSING}
    doc: Doc[Any] = Doc(client_id=1)
    doc.get("state", type=Map)["k"] = "x"
    stamps.write_fixes(doc, decision.fixes)
    assert stamps.read_keys(doc, [K, ("other", "k")]) == {K: MISSING, ("other", "k"): MISSING}
    assert "other" not in doc.keys()  # noqa: SIM118 (reading never creates a root)


def test_shared_types_and_crdt_keys_are_left_to_yjs() -> None:
    doc: Doc[Any] = Doc(client_id=1)
    doc.get("state", type=Map)["k"] = Text("note")
    assert stamps.read_keys(doc, [K]) == {K: SHARED}
    row = KeyStamp("d/state", "state", "k", hlc.stamp(900), "cloud", 7)
    shared = decide(write(950), row, SHARED, SHARED)
    assert (shared.fixes, shared.decided, shared.conflicts) == ({}, set(), [])
    assert shared.rows == [KeyStamp("d/state", "state", "k", NOW, "device", 7)]  # raw kept
    given = Inputs("d/state", {}, {K: "crdt"}, {K: 1}, {K: 2}, [K])
    crdt = stamps.decide([write(950)], given, Clocks(NOW))
    assert crdt.fixes == {} and crdt.decided == set()


def test_cloud_rows_are_later_than_what_the_key_held() -> None:
    ahead = KeyStamp("d/state", "state", "a", NOW + 50, "device", 9)
    rows = stamps.cloud_rows("d/state", "state", ["a", "b"], {("state", "a"): ahead}, NOW)
    assert [(r.key, r.stamp, r.writer, r.raw) for r in rows] == [
        ("a", NOW + 51, "cloud", 9), ("b", NOW, "cloud", 0)]


def test_only_contested_keys_are_read_before_the_update() -> None:
    rows = {("state", "mine"): KeyStamp("d/state", "state", "mine", 5, "device", 5),
            ("state", "old"): KeyStamp("d/state", "state", "old", 5, "device", 9),
            ("state", "cloud"): KeyStamp("d/state", "state", "cloud", 5, "cloud")}
    writes = [StampedWrite("state", key, 7, 1) for key in ("mine", "old", "cloud", "new", "c")]
    kinds = stamps.policies(writes, lambda m, k: "cloud" if k == "c" else "latest")
    assert stamps.contested(writes, rows, kinds) == [
        ("state", "old"), ("state", "cloud"), ("state", "c")]


def test_meta_json_marks_deleted_keys() -> None:
    rows = [KeyStamp("d/state", "state", "b", hlc.stamp(5, 1), "cloud"),
            KeyStamp("d/state", "state", "a", hlc.stamp(7), "device", 3)]
    assert stamps.meta_json(rows, {"state": {"a": 1}}) == {"state": {
        "a": {"time": 7, "writer": "device"},
        "b": {"time": 5, "writer": "cloud", "deleted": True}}}
