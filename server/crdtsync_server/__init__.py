"""crdtsync reference sync server (installed as ``crdtsync_server``; source in ``server/``).

Run it with ``crdtsync serve``; embed it with :func:`create_app` or :class:`Server`, or
build the transport-free core with :func:`open_services` (as the simulator does).

Public names load on first access (``crdtsync._lazy``): importing ``crdtsync_server.core``
must not load the HTTP adapters in ``api/`` (tests/test_layering.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crdtsync._lazy import lazy_exports

if TYPE_CHECKING:  # what mypy and IDEs see; at run time __getattr__ imports on first access
    from .api.app import create_app
    from .api.server import Server
    from .config import ServerConfig
    from .core import Services, open_services, process_sync

__all__ = ["Server", "ServerConfig", "Services", "create_app", "open_services", "process_sync"]

if not TYPE_CHECKING:  # hidden from mypy, which would type a misspelt name as object
    __getattr__, __dir__ = lazy_exports(__name__, {
        "api.app": ["create_app"],
        "api.server": ["Server"],
        "config": ["ServerConfig"],
        "core": ["Services", "open_services", "process_sync"],
    })
