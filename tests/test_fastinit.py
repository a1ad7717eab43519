"""``crdtsync._fastinit.fast_init``: every record it speeds up is built exactly as the
dataclass's own ``__init__`` builds it, and stays frozen."""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

import crdtsync._fastinit
import crdtsync.protocol
import crdtsync_server.stamps
import crdtsync_server.store.feed
import crdtsync_server.store.records
import crdtsync_server.store.rules
import crdtsync_server.sync
from crdtsync._accel import speedups
from crdtsync._fastinit import ORIGINAL_INITS, fast_init

MODULES = (crdtsync.protocol, crdtsync_server.sync, crdtsync_server.stamps,
           crdtsync_server.store.records, crdtsync_server.store.feed,
           crdtsync_server.store.rules)
SPED_UP = sorted((cls for cls in ORIGINAL_INITS if cls.__module__ in
                  {m.__name__ for m in MODULES}), key=lambda cls: cls.__qualname__)


def test_the_records_of_a_sync_are_sped_up() -> None:
    assert {cls.__name__ for cls in SPED_UP} >= {
        "DocSync", "SyncRequest", "SyncResponse", "Event", "Applied", "Merge", "Clocks",
        "Inputs", "DeviceRecord", "DocWrite", "KeyStamp", "SyncWrite", "CommandResult",
        "CommitResult", "StateChange", "ConflictRecord", "EventPlan"}


def test_with_the_accelerator_one_call_sets_every_slot() -> None:
    if speedups is None and os.environ.get("CI") != "true":  # CI builds it: fails there
        pytest.skip("crdtsync._speedups is not built")
    for cls in SPED_UP:
        assert "_fill" in cls.__init__.__globals__, cls
    assert not isinstance(crdtsync.protocol._FILL_EVENT, type(lambda: None))


def _parameters(init: Any, fields: tuple[dataclasses.Field[Any], ...]) -> list[Any]:
    """Names, kinds and defaults (a factory's: only that there is one), not annotations."""
    factories = {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
    return [(p.name, p.kind, p.default is inspect.Parameter.empty if p.name in factories
             else p.default) for p in inspect.signature(init).parameters.values()]


def _values(obj: Any) -> list[Any]:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


@pytest.mark.parametrize("path", ["as installed", "pure"])
@pytest.mark.parametrize("cls", SPED_UP, ids=lambda cls: cls.__qualname__)
def test_fast_init_builds_what_the_dataclass_init_builds(
        cls: type, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of setting the slots: one C slot filler where ``crdtsync._speedups`` is
    built (as installed), each slot's descriptor (pure)."""
    original = ORIGINAL_INITS[cls]
    fields = dataclasses.fields(cls)
    if path == "pure":
        monkeypatch.setattr(crdtsync._fastinit, "slot_filler", lambda cls, names: None)
        monkeypatch.setattr(cls, "__init__", crdtsync._fastinit._init_for(cls, fields))
        assert "_fill" not in cls.__init__.__globals__
    assert _parameters(cls.__init__, fields) == _parameters(original, fields)
    required = [f for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    # Only the required fields, positionally: the defaults and factories fill the rest.
    args = [object() for _ in required]
    fast = cls(*args)
    slow = object.__new__(cls)
    original(slow, *args)
    assert _values(fast) == _values(slow)
    for f in fields:  # a factory's value is fresh for each record, as the dataclass's
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(fast, f.name) is not getattr(cls(*args), f.name)
    # Every field by keyword, in reverse order.
    kwargs = {f.name: object() for f in reversed(fields)}
    fast = cls(**kwargs)
    slow = object.__new__(cls)
    original(slow, **kwargs)
    assert _values(fast) == _values(slow) == [kwargs[f.name] for f in fields]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.__setattr__(fields[0].name, None)
    with pytest.raises(TypeError):
        cls(*args, **{required[0].name: 1}) if required else cls(object(), *(
            object() for _ in fields))


def test_what_fast_init_cannot_reproduce_is_refused() -> None:
    @dataclass
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Hidden:
        x: int
        y: list[int] = field(default_factory=list, init=False)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        x: int

    for cls in (Mutable, NoSlots, PostInit, Hidden, KeywordOnly):
        with pytest.raises(TypeError):
            fast_init(cls)
