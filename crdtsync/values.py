"""Which values may enter a CRDT document or an event body, and how numbers read back.

Yjs stores numbers with JavaScript semantics: every number is a double, so an integer is
exact only up to 2**53 - 1, and pycrdt panics (a ``BaseException``) on integers of 2**63 or
more. Everything that comes from outside (library calls, API bodies, event bodies) passes
:func:`check_value` before it reaches a ``Doc`` or the wire.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

from ._accel import speedups
from .errors import InvalidValue

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer a Yjs document holds exactly (``Number.MAX_SAFE_INTEGER``)."""

MAX_DEPTH = 32
MAX_KEY_LENGTH = 256
_INF = math.inf
_MAX_EVENT_INT = 2**63 - 1
"""Event bodies never enter a CRDT: they take any signed 64-bit integer but -2**63 (the
range is symmetric, as for :func:`check_value`)."""
_MIN_EVENT_INT = -_MAX_EVENT_INT


def check_event_body(value: Any, *, where: str = "event body") -> None:
    """Raise :class:`InvalidValue` unless ``value`` can be an event body: JSON data with
    64-bit integers, and ``bytes`` (an event is not a CRDT; readers of the JSON API see
    bytes as base64 text, :func:`json_default`)."""
    if not event_body_ok(value):
        _check(value, where, _MAX_EVENT_INT, 0, allow_bytes=True)


def event_body_ok_py(value: Any) -> bool:
    """The fast check of :func:`check_event_body` (no message built): ``True`` means the
    body is valid; ``False`` means "call :func:`check_event_body`", which names the fault
    (or accepts a subclass of an allowed type).

    The usual body, a map of a few scalars, is checked in one loop here, in one call per
    body: the rules of :func:`_valid`'s member loop, spelled out again for that shape (the
    server runs this for every event); other members and bodies go to :func:`_valid`."""
    if type(value) is not dict:
        return _valid_py(value, _MAX_EVENT_INT, 0, True)
    keys = tuple(value)
    if keys not in _KEYS_SEEN and not _keys_ok(keys):
        return False
    for item in value.values():
        kind = type(item)
        if kind is float:
            if not -_INF < item < _INF:  # NaN compares false
                return False
        elif kind is int:
            if not _MIN_EVENT_INT <= item <= _MAX_EVENT_INT:
                return False
        elif (kind is not str and kind is not bool and item is not None
              and not _valid_py(item, _MAX_EVENT_INT, 1, True)):
            return False
    return True


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for event bodies: bytes become base64 text."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON data")


def check_value(value: Any, *, where: str = "value", max_int: int = MAX_SAFE_INTEGER) -> None:
    """Raise :class:`InvalidValue` unless ``value`` is JSON data a CRDT can hold exactly.

    Allowed: ``None``, ``bool``, ``int`` with ``abs(v) <= max_int``, finite ``float``,
    ``str``, ``list``/``tuple`` and ``dict`` with ``str`` keys, nested at most 32 deep.
    """
    if not _valid(value, max_int, 0, False):
        _check(value, where, max_int, 0)


def _valid_py(value: Any, max_int: int, depth: int, allow_bytes: bool) -> bool:
    """The fast path of :func:`_check` for the plain types: no path strings are built.
    ``False`` means "look closer": :func:`_check` then raises with the exact place (or
    accepts a subclass of an allowed type)."""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if kind is dict:  # first: most event bodies are maps
        keys = tuple(value)
        if keys not in _KEYS_SEEN and not _keys_ok(keys):
            return False
        members: Any = value.values()
    elif kind is list or kind is tuple:
        members = value
    elif kind is str or kind is bool or value is None:
        return True
    elif kind is int:
        return bool(-max_int <= value <= max_int)
    elif kind is float:
        return math.isfinite(value)
    else:
        return allow_bytes and kind is bytes
    if depth == MAX_DEPTH:
        return not members  # a member would sit one level too deep
    # The members of most bodies are scalars: checked here, without a recursive call
    # (the same answers :func:`_valid` gives for them) nor a new number per member.
    min_int = -max_int
    for item in members:
        kind = type(item)
        if kind is float:
            if not -_INF < item < _INF:  # NaN compares false
                return False
        elif kind is int:
            if not min_int <= item <= max_int:
                return False
        elif (kind is not str and kind is not bool and item is not None
              and not _valid_py(item, max_int, depth + 1, allow_bytes)):
            return False
    return True


event_body_ok: Callable[[Any], bool] = (
    speedups.event_body_ok if speedups is not None else event_body_ok_py)
"""What :func:`event_body_ok_py` answers: the C version where crdtsync was built with it
(:mod:`crdtsync._accel`), else that function."""
_valid: Callable[[Any, int, int, bool], bool] = (
    speedups.valid if speedups is not None else _valid_py)


_KEYS_SEEN: set[tuple[str, ...]] = set()
"""The keys of maps already seen valid, in order: a fleet's event bodies come in a handful
of shapes, whose keys :func:`_valid` then checks with one lookup. Only small shapes, and
at most :data:`_SHAPES_REMEMBERED` of them, so that it holds a few hundred kB at most."""
_SHAPES_REMEMBERED = 1024
_SHAPE_KEYS = 16
_SHAPE_KEY_LENGTH = 32


def _keys_ok(keys: tuple[Any, ...]) -> bool:
    """True when every key is a non-empty ``str`` of at most 256 chars (remembering small
    shapes in :data:`_KEYS_SEEN`); ``False`` means "ask :func:`_check`"."""
    small = len(keys) <= _SHAPE_KEYS
    for key in keys:
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
            return False
        small = small and len(key) <= _SHAPE_KEY_LENGTH
    if small and len(_KEYS_SEEN) < _SHAPES_REMEMBERED:
        _KEYS_SEEN.add(keys)
    return True


def _check(value: Any, where: str, max_int: int, depth: int, *,
           allow_bytes: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise InvalidValue(f"{where}: nested more than {MAX_DEPTH} levels", {"where": where})
    if value is None or isinstance(value, (bool, str)):
        return
    if allow_bytes and isinstance(value, bytes):
        return
    if isinstance(value, int):
        if abs(value) > max_int:
            raise InvalidValue(
                f"{where}: integer {value} is outside +/-{max_int}; "
                "a CRDT number is a double and cannot hold it exactly",
                {"where": where},
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"{where}: {value} is not a finite number", {"where": where})
        return
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        # (a named tuple such as msgpack's ExtType is a record, not an array)
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", max_int, depth + 1, allow_bytes=allow_bytes)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_key(key, where=where)
            _check(item, f"{where}.{key}", max_int, depth + 1, allow_bytes=allow_bytes)
        return
    raise InvalidValue(
        f"{where}: {type(value).__name__} is not JSON data (use None, bool, number, str, "
        "list or dict)",
        {"where": where},
    )


def check_key(key: Any, *, where: str = "key") -> None:
    """Raise :class:`InvalidValue` unless ``key`` is a non-empty ``str`` of at most 256 chars."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidValue(f"{where}: keys are non-empty strings of at most {MAX_KEY_LENGTH} "
                           "characters (code points)", {"where": where})


def normalize(value: Any) -> Any:
    """Return ``value`` as read from a document, with integral doubles turned back into ints.

    A document returns ``5`` as ``5.0`` (JavaScript numbers). JSON does not tell the two
    apart either, so reads give ``5``; a non-integral double stays a float.
    """
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
            return int(value)
        return value
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def json_view(value: Any) -> Any:
    """``value`` (as :func:`normalize` returns it) with what JSON cannot carry replaced:
    bytes by their base64 text, ``NaN`` and infinities by ``None``. Nothing written since
    updates are read before they apply (``crdtsync.yupdate``) holds such values, but a
    document stored by an older version may: its JSON view must still be readable, so that
    an operator can see the key and repair it (protocol.md 7a)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [json_view(v) for v in value]
    if isinstance(value, dict):
        return {k: json_view(v) for k, v in value.items()}
    return value
