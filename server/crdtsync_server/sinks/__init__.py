"""Downstream sinks: deliver the change feed to webhooks, NATS JetStream and PostgreSQL.

Importing this package registers the built-in sink types in :data:`SINK_TYPES`.
"""

from __future__ import annotations

from . import nats, postgres, webhook  # noqa: F401 -- register their sink types
from .base import SINK_TYPES, Sink, SinkConfig, SinkError, SinkRejected, register

__all__ = ["SINK_TYPES", "Sink", "SinkConfig", "SinkError", "SinkRejected", "register"]
