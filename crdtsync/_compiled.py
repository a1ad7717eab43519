"""The modules of a sync's hot path that ``pip install`` compiles with mypyc, and the switch
that runs their source instead.

Where mypyc and a C compiler are found at install time (setup.py), each module of
:data:`MODULES` is also built as an extension module beside its source
(``sync.cpython-311-x86_64-linux-gnu.so`` next to ``sync.py``), all of them sharing one
library (``crdtsync/_mypyc__mypyc...so``); Python imports such a module before the source.
The source stays the reference: the compiled module is the same code, type-checked, its
Python steps turned into C calls (docs/architecture.md, "Native speedups").

Two cases must not run the compiled modules, and :func:`choose` sends the imports of every
module of :data:`MODULES` to its source in both:

- ``CRDTSYNC_NO_EXTENSIONS`` is set (to any non-empty value) when crdtsync is imported: the
  pure-Python reference, as for ``crdtsync._speedups``;
- a source is newer than its compiled module (an editable install whose source was edited,
  or a checkout of another commit, since the last ``pip install``): the compiled module
  would run the old code, silently. A warning says so; ``pip install -e .`` compiles again.

All of them or none: compiled modules call each other directly, in C, and a module run from
its source beside compiled ones would not be the one they call.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

MODULES = (
    "crdtsync.hlc",
    "crdtsync.crdt",
    "crdtsync.protocol",
    "crdtsync_server.documents",
    "crdtsync_server.sync",
    "crdtsync_server.stamps",
    "crdtsync_server.api.fastsync",
)
"""The compiled modules (setup.py reads this tuple from this file's text: keep it a literal
of strings)."""

ROOTS = {"crdtsync": ".", "crdtsync_server": "server"}
"""Where each top-level package lies in the source tree, relative to setup.py (which reads
this literal too)."""


def source_file(name: str, package_dir: Path) -> Path:
    """The source of module ``name`` in the installed top-level package at ``package_dir``."""
    return package_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")


def compiled_file(source: Path) -> Path | None:
    """The extension module built from ``source``, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = source.with_name(source.stem + suffix)
        if built.exists():
            return built
    return None


def _package_dirs() -> dict[str, Path]:
    dirs = {}
    for top in ROOTS:
        spec = importlib.util.find_spec(top)
        if spec is not None and spec.origin is not None:
            dirs[top] = Path(spec.origin).parent
    return dirs


def stale(sources: Sequence[Path], library: Path | None) -> list[Path]:
    """The sources edited since ``library`` (the compiled code of them all; each module's
    own extension is a stub that loads it, rebuilt only when missing) was built, or without
    a compiled module while another has one; nothing when none of them is compiled."""
    built = [compiled_file(source) for source in sources]
    if not any(built):
        return []
    if library is None:
        return list(sources)
    since = library.stat().st_mtime
    return [source for source, ext in zip(sources, built, strict=True)
            if ext is None or source.stat().st_mtime > since]


class _Sources(importlib.abc.MetaPathFinder):
    """Finds each module of :data:`MODULES` as its source file, ahead of the compiled one."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        return None if file is None else importlib.util.spec_from_file_location(fullname, file)


LIBRARY = "crdtsync._mypyc__mypyc"
"""The library every compiled module loads (mypyc's ``group_name`` in setup.py)."""


def _library_file(dirs: dict[str, Path]) -> Path | None:
    top, _, name = LIBRARY.partition(".")
    return compiled_file(dirs[top] / f"{name}.py") if top in dirs else None


def _library_loads() -> bool:
    try:
        importlib.import_module(LIBRARY)
    except ImportError:
        return False
    return True


_state: list[bool] = []
"""Whether the compiled modules run, once :func:`choose` decided."""


def choose() -> bool:
    """Decide, once per process and before any module of :data:`MODULES` is imported,
    whether their compiled builds run; True when they do."""
    if _state:
        return _state[0]
    dirs = _package_dirs()
    files = {name: source_file(name, dirs[top]) for name in MODULES
             if (top := name.split(".")[0]) in dirs}
    compiled = bool(files) and compiled_file(next(iter(files.values()))) is not None
    if compiled and os.environ.get("CRDTSYNC_NO_EXTENSIONS"):
        compiled = False
    elif compiled and not _library_loads():
        compiled = False  # a build that failed half-way: the sources run
    elif compiled and (old := stale(list(files.values()), _library_file(dirs))):
        warnings.warn(
            f"crdtsync: {len(old)} compiled module(s) are older than their source "
            f"({', '.join(str(p) for p in old[:3])}...); running every compiled module from "
            "its source instead. `pip install -e .` compiles them again.",
            RuntimeWarning, stacklevel=2)
        compiled = False
    if not compiled and any(compiled_file(f) for f in files.values()):
        sys.meta_path.insert(0, _Sources(files))
    _state.append(compiled)
    return compiled


def active() -> bool:
    """True when this process runs the compiled modules (benchmarks name it)."""
    return choose()
