"""Public names that a package imports on first access (PEP 562).

``import crdtsync.protocol`` runs ``crdtsync/__init__.py`` first; if that file imported every
public name eagerly, the pure codec would drag in aiohttp and sqlite3 (and ``crdtsync.testing``
the whole server). A package instead lists where each name lives and gets its module-level
``__getattr__`` and ``__dir__`` from :func:`lazy_exports`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, homes: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose submodule ``homes[m]`` defines
    the names listed for it; a name imports its submodule once, then stays in the package."""
    home_of = {name: module for module, names in homes.items() for name in names}

    def get(name: str) -> object:
        module = home_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home_of))

    return get, names
