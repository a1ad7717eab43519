"""The keys under which the app holds its parts (a leaf module: every handler imports it)."""

from __future__ import annotations

from aiohttp import web

from ..core import Services
from ..metrics import ProcessMetrics
from .deadlines import HeadDeadline

SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
METRICS: web.AppKey[ProcessMetrics] = web.AppKey("metrics", ProcessMetrics)
"""The process's metrics (``crdtsync_server.metrics``): set with :data:`SERVICES`."""
HEADS: web.AppKey[HeadDeadline] = web.AppKey("heads", HeadDeadline)
"""The app's request-head deadline; its runner guards connections with it (server.py)."""
