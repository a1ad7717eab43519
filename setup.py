"""The optional C accelerator ``crdtsync._speedups`` (everything else is in pyproject.toml).

It builds where a C compiler is found; where none is (or with ``CRDTSYNC_NO_EXTENSIONS=1``)
the install goes on without it and crdtsync runs its pure-Python code, with the same results
(docs/architecture.md, "Native speedups")."""

import os

from setuptools import Extension, setup

extensions = [] if os.environ.get("CRDTSYNC_NO_EXTENSIONS") else [
    Extension("crdtsync._speedups", ["crdtsync/_speedups.c"], optional=True,
              extra_compile_args=["-O2"]),
]
setup(ext_modules=extensions)
