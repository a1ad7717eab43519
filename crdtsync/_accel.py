"""The optional C modules, each ``None`` where it is missing: the accelerator
``crdtsync._speedups`` (:data:`speedups`) and the log syncer ``crdtsync._logsync``
(:data:`log_syncer`).

Built by ``pip install`` where a C compiler is found (setup.py; the log syncer on Linux
only). The accelerator speeds up two checks the server runs on every sync: the bounded read
of a Yjs update (:mod:`crdtsync.yupdate`) and the event-body check (:mod:`crdtsync.values`);
and it sets the slots of the records built on every sync in one call
(:mod:`crdtsync._fastinit`). Their pure-Python versions stay the reference, give the same
answers (tests/test_speedups.py) and run where the module is missing or
``CRDTSYNC_NO_EXTENSIONS`` is set (to any non-empty value) when crdtsync is imported; so
does a Python thread instead of the log syncer."""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._logsync import LogSyncer


def _load() -> ModuleType | None:
    if os.environ.get("CRDTSYNC_NO_EXTENSIONS"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()


def _load_log_syncer() -> type[LogSyncer] | None:
    if os.environ.get("CRDTSYNC_NO_EXTENSIONS"):
        return None
    try:
        from ._logsync import LogSyncer
    except ImportError:
        return None
    return LogSyncer


log_syncer = _load_log_syncer()
"""``crdtsync._logsync.LogSyncer`` (Linux, built by ``pip install`` with a C compiler), or
``None``: the thread that syncs SQLite's write-ahead log without taking the GIL
(``crdtsync._sqlite_worker._LogSync``)."""
