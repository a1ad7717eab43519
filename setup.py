"""The optional native code (everything else is in pyproject.toml): the C accelerator
``crdtsync._speedups``, the log syncer ``crdtsync._logsync`` (Linux), and the modules of a
sync's hot path compiled with mypyc (``crdtsync._compiled.MODULES``).

Both build where a C compiler (and, for the second, mypyc) is found; where none is, or with
``CRDTSYNC_NO_EXTENSIONS=1``, the install goes on without them and crdtsync runs its
pure-Python code, with the same results (docs/architecture.md, "Native speedups")."""

import ast
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup

HERE = Path(__file__).parent


def compiled_setting(name: str) -> Any:
    """The literal ``name`` (``MODULES``, ``ROOTS``) of ``crdtsync/_compiled.py``, read from
    its text (importing crdtsync here would need its dependencies in the build environment)."""
    tree = ast.parse((HERE / "crdtsync" / "_compiled.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"crdtsync/_compiled.py has no {name}")


def mypyc_extensions() -> list[Extension]:
    """The compiled modules, or none where mypyc cannot build them (a warning says why)."""
    roots = compiled_setting("ROOTS")
    files = [os.path.normpath(os.path.join(roots[name.split(".")[0]], *name.split(".")))
             + ".py" for name in compiled_setting("MODULES")]
    try:
        from mypyc.build import mypycify

        extensions = mypycify(files, opt_level="3", group_name="crdtsync._mypyc")
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        print(f"crdtsync: not compiling {len(files)} modules with mypyc ({exc!r}); "
              "they run as Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the install goes on, as Python
    return extensions


extensions = [] if os.environ.get("CRDTSYNC_NO_EXTENSIONS") else [
    Extension("crdtsync._speedups", ["crdtsync/_speedups.c"], optional=True,
              extra_compile_args=["-O2"]),
    *([Extension("crdtsync._logsync", ["crdtsync/_logsync.c"], optional=True,
                 extra_compile_args=["-O2"])] if sys.platform.startswith("linux") else []),
    *mypyc_extensions(),
]
setup(ext_modules=extensions)
