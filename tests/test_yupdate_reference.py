"""The update reader against a frozen copy of its plain version (tests/_yupdate_reference.py).

``crdtsync.yupdate`` was made faster for issue 17 (local reads instead of a method call per
byte, error locations rendered only when an error names them). Every input must still give
what the plain reader gives: the same :class:`UpdateInfo`, or the same error (type, code,
message, detail). Inputs: the structurally random updates of test_yupdate_properties
(clean and hostile), real pycrdt updates, and both with bytes flipped, cut or appended.
Both the public reader (the C accelerator first where it was built, tests/test_speedups.py)
and the Python reader alone are held to it.

One field differs by design: ``refs`` keeps only the ids outside the update's own runs
(``outside_refs``, issue 17), so the plain reader's refs are compared through that filter,
and :meth:`UpdateInfo.missing` must decide as the plain reader's does for state vectors
around every client's start and end.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from crdtsync.errors import CrdtsyncError
from crdtsync.yupdate import outside_refs, read_update, read_update_py

from . import _yupdate_reference as reference
from .test_yupdate_properties import updates


def outcome(reader: Any, data: bytes) -> Any:
    """What ``reader`` makes of ``data``: the info's fields, or the error's identity."""
    try:
        info = reader(data, doc="state")
    except CrdtsyncError as exc:
        return ("error", type(exc).__name__, exc.code, exc.message, exc.detail)
    fields = dataclasses.asdict(info)
    fields["refs"] = outside_refs(fields["refs"], fields["ends"])
    return ("info", fields)


def same(data: bytes) -> None:
    expected = outcome(reference.read_update, data)
    assert outcome(read_update, data) == expected  # the C reader first, where built
    assert outcome(read_update_py, data) == expected
    if expected[0] == "info":
        decides_alike(reference.read_update(data, doc="state"), read_update(data))


def decides_alike(plain: Any, info: Any) -> None:
    """``info.missing`` finds an item missing wherever the plain reader's info (all its refs
    kept) does, and only one that the plain reader's would report too."""
    clocks = {clock for ids in (plain.starts, plain.ends) for clock in ids.values()}
    clocks |= {max(clock - 1, 0) for clock in clocks} | {clock for _, clock in plain.refs}
    clients = set(plain.starts) | {client for client, _ in plain.refs}
    svs = [{}] + [{c: clock for c in clients} for clock in sorted(clocks)]
    svs += [{**plain.ends, client: clock} for client, clock in sorted(plain.refs)]
    for sv in svs:
        found = info.missing(sv)
        if plain.missing(sv) is None:
            assert found is None, sv
        else:
            assert found is not None, sv
            assert found in plain.refs | {(c, sv.get(c, 0)) for c in plain.starts}, sv


def test_refs_inside_the_update_are_left_out() -> None:
    """An overwrite builds on the writer's own earlier items: none of those ids is kept, and
    the update is still found to need them by a replica that lacks them (through
    ``starts``)."""
    doc: Doc[Any] = Doc(client_id=7)
    doc["m"] = Map()
    doc["m"]["a"] = 1
    before = doc.get_state()
    doc["m"]["a"] = 2
    doc["m"]["b"] = 3
    update = doc.get_update(before)
    plain = reference.read_update(update, doc="state")
    assert plain.refs  # the overwrite's origin: the first write of "a"
    info = read_update(update)
    assert info.refs == set()
    assert info.missing({}) == (7, 0)  # it starts at clock 2: the replica has nothing
    assert info.missing({7: plain.starts[7]}) is None


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` with a byte flipped, cut short, and with bytes appended."""
    out = []
    if data:
        at = rng.randrange(len(data))
        out.append(data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:])
        out.append(data[:rng.randrange(len(data))])
    out.append(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(updates(), st.randoms(use_true_random=False))
def test_random_structures_and_their_mutations_read_the_same(
        update: bytes, rng: random.Random) -> None:
    for data in (update, *mutations(update, rng)):
        same(data)


def real_updates(seed: int) -> list[bytes]:
    """Updates pycrdt writes: maps of scalars, nested maps, arrays and text, deletes, two
    clients, full documents and diffs."""
    rng = random.Random(seed)
    a: Doc[Any] = Doc(client_id=11)
    b: Doc[Any] = Doc(client_id=2**40 + 3)
    out = []
    for step in range(30):
        doc = a if rng.random() < 0.6 else b
        before = doc.get_state()
        state = doc.get("state", type=Map)
        with doc.transaction():
            kind = rng.randrange(6)
            key = f"k{rng.randrange(8)}"
            if kind == 0:
                state[key] = rng.choice([rng.random(), rng.randrange(-10**9, 10**9), "s" * 3,
                                         True, None])
            elif kind == 1:
                state[key] = Map({"x": rng.random(), "y": Array([1, "two", 3.5])})
            elif kind == 2:
                state[key] = Text("hello" * rng.randint(1, 4))
            elif kind == 3 and key in state:
                del state[key]
            elif kind == 4:
                doc.get("config", type=Map)[key] = [rng.random() for _ in range(3)]
            else:
                state.update({f"m{i}": step * i for i in range(5)})
        out += [doc.get_update(before), doc.get_update()]
        other = b if doc is a else a
        other.apply_update(doc.get_update(other.get_state()))
    return out


def test_real_updates_and_their_mutations_read_the_same() -> None:
    rng = random.Random(17)
    for seed in range(5):
        for update in real_updates(seed):
            for data in (update, *mutations(update, rng)):
                same(data)


def every_cut_and_changes(data: bytes, rng: random.Random) -> list[bytes]:
    """Every truncation of ``data`` and a few dozen changes of one to three bytes to values
    that matter to varints (0, 1, 0x7F, 0x80, 0xFF) or random ones."""
    out = [data[:i] for i in range(len(data))]
    for _ in range(40):
        changed = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            if changed:
                changed[rng.randrange(len(changed))] = rng.choice(
                    [0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        out.append(bytes(changed))
    return out


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(min_size=1, max_size=4), inner,
                                            max_size=3)), max_leaves=10)


@st.composite
def pycrdt_updates(draw: st.DrawFn) -> bytes:
    """A diff between two states of a document edited by up to three clients: map
    writes, nested maps, arrays, text, deletes."""
    docs = [Doc(client_id=c) for c in draw(st.lists(
        st.sampled_from([1, 300, 2**31 + 7, 2**40]), min_size=1, max_size=3, unique=True))]
    since = b"\x00"
    for round_ in range(draw(st.integers(1, 3))):
        for doc in docs:
            root = doc.get("state", type=Map)
            with doc.transaction():
                for _ in range(draw(st.integers(0, 4))):
                    key = draw(st.sampled_from(["a", "b", "m", "l", "t", "é😀"]))
                    op = draw(st.sampled_from(["value", "map", "array", "text", "del",
                                               "edit"]))
                    if op == "value":
                        root[key] = draw(values)
                    elif op == "map":
                        root[key] = Map({"x": draw(values), "n": Map({"y": draw(values)})})
                    elif op == "array":
                        root[key] = Array(draw(st.lists(values, max_size=3)))
                    elif op == "text":
                        root[key] = Text(draw(st.text(max_size=5)))
                    elif op == "del" and key in root:
                        del root[key]
                    elif op == "edit" and key in root:
                        target = root[key]
                        if isinstance(target, Array):
                            target.append(draw(values))
                        elif isinstance(target, Text):
                            target.insert(0, draw(st.text(min_size=1, max_size=3)))
                        elif isinstance(target, Map):
                            target["x"] = draw(values)
        for doc in docs:  # exchange, so later edits build on other clients' items
            for other in docs:
                if other is not doc:
                    doc.apply_update(other.get_update(doc.get_state()))
        if round_ == 0 and draw(st.booleans()):
            since = docs[0].get_state()
    return docs[0].get_update(since)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(pycrdt_updates(), st.randoms(use_true_random=False))
def test_same_result_on_pycrdt_updates_and_their_mutations(
        update: bytes, rng: random.Random) -> None:
    for data in (update, *mutations(update, rng), *every_cut_and_changes(update, rng)):
        same(data)
