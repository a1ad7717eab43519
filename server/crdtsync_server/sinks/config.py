"""Sink configurations: their JSON form (management API and sinks file), validation,
secret redaction, and the sinks file with its ``${ENV}`` references.

JSON form of one sink (every field but ``type`` optional)::

    {"type": "webhook", "options": {...}, "filter": {"device", "fleet", "topic", "kind"},
     "batch": 100, "max_attempts": 10, "backoff": 0.5, "max_backoff": 300,
     "paused": false, "start": "beginning"}

``start`` only matters when the sink is created: ``beginning`` delivers the whole feed,
``head`` only what is stored from then on. Options whose name says they are secret
(``secret``, ``password``, ``token``, ``api_key``...) and every value of a ``headers`` object
read ``"***"`` in responses; URLs are shown as :func:`~crdtsync_server.validation.redact_url`
does (user info, path after the first segment, query values and fragment read ``***``) and a
DSN's ``password=`` too. An option sent back in a PUT exactly as a response showed it keeps
the stored value. Both rules are :func:`~crdtsync_server.validation.redact_options` and
:func:`~crdtsync_server.validation.keep_redacted`, shared with proxied-request routes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crdtsync.errors import MalformedRequest
from crdtsync.protocol import NAME_RE

from ..store.feed import FeedFilter
from ..validation import missing_env, read_config_file, redact_options, substitute_env
from .base import SINK_TYPES, SinkConfig

MAX_BATCH = 1000
MAX_ATTEMPTS = 1000
MIN_BACKOFF_S = 0.001
MAX_BACKOFF_S = 86400.0
STARTS = ("beginning", "head")
_FIELDS = frozenset({"type", "options", "filter", "batch", "max_attempts", "backoff",
                     "max_backoff", "paused", "start"})


def invalid(sink: object, name: str, problem: str) -> MalformedRequest:
    """The error for an invalid field ``name`` of sink ``sink`` (options: ``options.x``)."""
    return MalformedRequest(f"sink {sink!r}: {name} {problem}", {"sink": sink, "field": name})


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """A sink as configured: its :class:`SinkConfig` plus how the server manages it."""

    config: SinkConfig
    paused: bool = False
    start: str = "beginning"


def parse_sink(name: str, obj: Any) -> SinkSpec:
    """A :class:`SinkSpec` from the JSON form; :class:`MalformedRequest` naming the sink
    and field for anything invalid. The options are checked by :func:`check_options`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise invalid(name, "name", "is not a valid name (1-64 of A-Za-z0-9_.:-)")
    if not isinstance(obj, Mapping):
        raise invalid(name, "sink", "must be a JSON object")
    unknown = sorted(str(key) for key in obj if key not in _FIELDS)
    if unknown:
        known = ", ".join(sorted(_FIELDS))
        raise invalid(name, unknown[0], f"is not a sink field (known: {known})")
    type_ = obj.get("type")
    if not isinstance(type_, str) or type_ not in SINK_TYPES:
        raise invalid(name, "type", f"must be one of {', '.join(sorted(SINK_TYPES))}")
    options = obj.get("options", {})
    if not isinstance(options, Mapping):
        raise invalid(name, "options", "must be an object")
    backoff = number_field(name, obj, "backoff", 0.5, MIN_BACKOFF_S, MAX_BACKOFF_S)
    max_backoff = number_field(name, obj, "max_backoff", max(300.0, backoff), backoff,
                               MAX_BACKOFF_S)
    config = SinkConfig(
        name, type_, dict(options), _filter(name, obj.get("filter", {})),
        int(number_field(name, obj, "batch", 100, 1, MAX_BATCH, integer=True)),
        int(number_field(name, obj, "max_attempts", 10, 1, MAX_ATTEMPTS, integer=True)),
        backoff, max_backoff)
    paused = obj.get("paused", False)
    if not isinstance(paused, bool):
        raise invalid(name, "paused", "must be true or false")
    start = obj.get("start", "beginning")
    if start not in STARTS:
        raise invalid(name, "start", f"must be one of {', '.join(STARTS)}")
    return SinkSpec(config, paused, start)


def _filter(name: str, value: Any) -> FeedFilter:
    if not isinstance(value, Mapping):
        raise invalid(name, "filter", "must be an object of device, fleet, topic, kind")
    try:
        return FeedFilter.from_json(value)
    except (ValueError, TypeError) as exc:
        raise invalid(name, "filter", f"is invalid: {exc}") from None


def number_field(sink: str, obj: Mapping[str, Any], key: str, default: float, low: float,
                 high: float, *, integer: bool = False, prefix: str = "") -> float:
    """``obj[key]`` (``default`` if absent), a number (an integer with ``integer``) from
    ``low`` to ``high``; else :func:`invalid` names the field ``prefix + key`` (sink types
    check their options with ``prefix="options."``)."""
    value = obj.get(key, default)
    ok = (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and low <= value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise invalid(sink, prefix + key, f"must be {kind} from {low:g} to {high:g}")
    return float(value)


def check_options(config: SinkConfig) -> None:
    """Build the sink (no I/O) so that its factory validates the options; raises
    :class:`MalformedRequest` for options it cannot use."""
    SINK_TYPES[config.type](config)


def spec_json(config: SinkConfig, paused: bool) -> dict[str, Any]:
    """The JSON form of a configuration with its options redacted (what
    :func:`parse_sink` reads, ``start`` aside)."""
    return {"type": config.type, "options": redact_options(config.options),
            "filter": config.where.to_json(), "batch": config.batch,
            "max_attempts": config.max_attempts, "backoff": config.backoff,
            "max_backoff": config.max_backoff, "paused": paused}


# --- the sinks file ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileSink:
    """A sink of the sinks file: ``spec`` as written (``${ENV}`` references kept: this is
    what the database stores) and ``config`` with them expanded (what the runner uses)."""

    spec: SinkSpec
    config: SinkConfig


def load_sinks_file(path: str | os.PathLike[str], *,
                    environ: Mapping[str, str] | None = None) -> dict[str, FileSink]:
    """Read ``{"sinks": {name: sink_json, ...}}`` from the JSON file ``path``.

    ``${NAME}`` in any option string is replaced by the environment variable ``NAME``
    (from ``environ``, default ``os.environ``). Raises :class:`MalformedRequest` naming the
    sink and field for a missing variable or any invalid sink, or for a file that is not
    such JSON; ``OSError`` if it cannot be read. Blocking: call it at startup."""
    env = os.environ if environ is None else environ
    sinks: dict[str, FileSink] = {}
    for name, obj in read_config_file(path, "sinks", "name: sink").items():
        spec = parse_sink(name, obj)
        config = dataclasses.replace(
            spec.config, options=_expand(name, "options", spec.config.options, env))
        check_options(config)
        sinks[name] = FileSink(spec, config)
    return sinks


def _expand(sink: str, where: str, value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        try:
            return substitute_env(value, env)
        except KeyError as exc:
            raise invalid(sink, where, missing_env(exc.args[0])) from None
    if isinstance(value, Mapping):
        return {key: _expand(sink, f"{where}.{key}", item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(sink, f"{where}[{n}]", item, env) for n, item in enumerate(value)]
    return value
