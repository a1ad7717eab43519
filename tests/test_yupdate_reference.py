"""The update reader against a frozen copy of its plain version (tests/_yupdate_reference.py).

``crdtsync.yupdate`` was made faster for issue 17 (local reads instead of a method call per
byte, error locations rendered only when an error names them). Every input must still give
what the plain reader gives: the same :class:`UpdateInfo`, or the same error (type, code,
message, detail). Inputs: the structurally random updates of test_yupdate_properties
(clean and hostile), real pycrdt updates, and both with bytes flipped, cut or appended.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from crdtsync.errors import CrdtsyncError
from crdtsync.yupdate import read_update

from . import _yupdate_reference as reference
from .test_yupdate_properties import updates


def outcome(reader: Any, data: bytes) -> Any:
    """What ``reader`` makes of ``data``: the info's fields, or the error's identity."""
    try:
        info = reader(data, doc="state")
    except CrdtsyncError as exc:
        return ("error", type(exc).__name__, exc.code, exc.message, exc.detail)
    return ("info", dataclasses.asdict(info))


def same(data: bytes) -> None:
    assert outcome(read_update, data) == outcome(reference.read_update, data)


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
