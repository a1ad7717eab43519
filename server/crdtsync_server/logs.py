"""How ``crdtsync serve`` writes its log: one line per record on stderr, as text (the
default) or as one JSON object per line (``--log-format json``), for log shippers.

Standard :mod:`logging` only: :func:`configure_logging` installs one handler on the root
logger, in the supervisor and in every worker process alike. A JSON line carries ``time``
(RFC 3339, UTC), ``level``, ``logger``, ``message``, every field a record was given with
``extra=`` as a top-level key (the failed-request records of
:mod:`crdtsync_server.api.requestlog`), and ``exc`` (the traceback as one string) when the
record has an exception.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
"""The values of ``crdtsync serve --log-format``."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text line of every record (a worker process adds its number to the logger name)."""

_STANDARD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
"""Attributes every ``LogRecord`` has; any other attribute came from ``extra=``."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring). ``static`` fields
    are added to every line (a worker's number). A value JSON cannot hold is written as its
    ``str``, so a record never fails to format."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = dict(self._static)
        entry.update((key, value) for key, value in vars(record).items()
                     if key not in _STANDARD_FIELDS and not key.startswith("_"))
        entry.update(time=rfc3339(record.created), level=record.levelname.lower(),
                     logger=record.name, message=record.getMessage())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def rfc3339(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as RFC 3339 in UTC, to the millisecond:
    ``2026-12-05T20:18:37.123Z``."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: str, log_format: str = "text", worker: int | None = None
                      ) -> None:
    """Send every record at ``level`` or above to stderr in ``log_format`` (one of
    :data:`LOG_FORMATS`), replacing the root logger's handlers. ``worker`` is the number of
    a worker process: text lines name it after the logger (``crdtsync.server[2]``), JSON
    lines carry it as ``worker``. Raises ``ValueError`` for an unknown format."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter({} if worker is None else {"worker": worker}))
    elif log_format == "text":
        name = "%(name)s" if worker is None else f"%(name)s[{worker}]"
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", name)))
    else:
        raise ValueError(f"unknown log format {log_format!r}; use one of {LOG_FORMATS}")
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
