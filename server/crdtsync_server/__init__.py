"""crdtsync reference sync server (installed as ``crdtsync_server``; source in ``server/``).

Run it with ``crdtsync serve``; embed it with :func:`create_app` or :class:`Server`.
"""

from __future__ import annotations

from .app import ServerConfig, create_app
from .runner import Server

__all__ = ["Server", "ServerConfig", "create_app"]
