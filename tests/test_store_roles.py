"""Every backend class of ``tests/store_backends.py`` has every member of every storage role,
with the role's signature, so a new backend (PostgreSQL) learns what it still misses role by
role, before any contract suite runs. Checked on the class, structurally (the protocols are
not runtime-checkable, and ``isinstance`` would only look at names)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from crdtsync_server.store import (
    DeviceStore,
    DocumentStore,
    DownlinkStore,
    FeedStore,
    FileStore,
    SettingsStore,
    SinkStore,
    Store,
    WakeStore,
)

from .store_backends import BACKENDS

ROLES: tuple[type[Any], ...] = (DocumentStore, DeviceStore, SettingsStore, DownlinkStore,
                                FeedStore, SinkStore, WakeStore, FileStore, Store)
"""The role protocols, and :class:`Store` for what only the whole store declares (the
lifecycle, ``commit`` and ``delete_device``)."""


def own_members(protocol: type[Any]) -> dict[str, Any]:
    """The members ``protocol`` itself declares (not those of the roles it combines)."""
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def parameters(function: Any) -> str:
    """The parameters of ``function`` but ``self``, with their kinds and defaults, as text:
    what a caller relies on. Annotations are left out (they are strings under ``from
    __future__ import annotations``, and mypy compares them)."""
    signature = inspect.signature(function)
    return str(inspect.Signature([
        p.replace(annotation=inspect.Parameter.empty)
        for p in list(signature.parameters.values())[1:]]))


def mismatches(backend: object, protocol: type[Any]) -> list[str]:
    """What ``backend`` (a store, built, not opened) lacks or declares differently from
    ``protocol``'s own members: coroutines are looked up on its class, attributes such as
    ``external_writes`` on the store (a backend may set them in ``__init__``)."""
    found: list[str] = []
    for name, expected in own_members(protocol).items():
        if isinstance(expected, property):
            if not hasattr(backend, name):
                found.append(f"{name}: missing")
            continue
        actual = inspect.getattr_static(type(backend), name, None)
        if actual is None:
            found.append(f"{name}: missing")
        elif inspect.iscoroutinefunction(expected) and not inspect.iscoroutinefunction(actual):
            found.append(f"{name}: must be a coroutine function")
        elif parameters(actual) != parameters(expected):
            found.append(f"{name}{parameters(actual)}, the role has"
                         f" {name}{parameters(expected)}")
    return found


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.__name__)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_backend_implements_each_role(backend: str, role: type[Any],
                                          tmp_path: Path) -> None:
    assert mismatches(BACKENDS[backend](tmp_path), role) == []


def test_the_roles_together_are_the_whole_store() -> None:
    """Each member of :class:`Store` is declared by exactly one role or by ``Store`` itself."""
    declared = [name for role in ROLES for name in own_members(role)]
    assert sorted(declared) == sorted(set(declared))
    assert set(declared) == {name for name in dir(Store) if not name.startswith("_")}


class _Incomplete:
    """A backend that forgot a member, took another's parameters wrong and made one
    synchronous: what :func:`mismatches` must report."""

    external_writes = None

    async def load_doc(self, key: str, *, stamps: bool = False) -> None: ...

    async def read_since(self, key: str) -> None: ...

    def compact(self, key: str, upto_id: int, snapshot: bytes) -> None: ...

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        return None


def test_mismatches_names_what_a_backend_misses() -> None:
    assert mismatches(_Incomplete(), DocumentStore) == [
        "read_since(key), the role has read_since(key, after_id)",
        "compact: must be a coroutine function",
        "read_stamps: missing",
    ]
    assert mismatches(_Incomplete(), SettingsStore) == ["get_setting: missing",
                                                      "set_setting: missing"]
