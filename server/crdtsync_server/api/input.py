"""Parsing untrusted management-API input: JSON texts and decimal integers, pure functions.

Every JSON body and JSON-valued parameter of the management API goes through
:func:`parse_json`, every integer parameter (query or path) through :func:`parse_uint`, so a
malformed one is a typed 4xx wherever it arrives, never an exception from the parser:

- JSON is strict (no ``NaN``/``Infinity``), nested at most :data:`MAX_JSON_DEPTH` levels
  (measured before the recursive parser runs, so a deep document cannot exhaust its
  recursion), and its strings are Unicode text: a lone surrogate escape such as ``"\\ud800"``
  (which no UTF-8 store or encoder accepts) is refused.
- Integers are 1 to 19 ASCII decimal digits within the caller's bounds (``"²"`` is a digit to
  :meth:`str.isdigit`, not here; 20 digits never reach ``int``).
"""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

from crdtsync.errors import InvalidValue, MalformedRequest

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a management API JSON text: room for the
32 levels of a value (``crdtsync.values.MAX_DEPTH``) and the objects around it."""

_DIGITS_RE = re.compile(r"[0-9]{1,19}")
# A JSON string, or the unterminated rest of one: possessive, so the scan is linear in the
# length of the text whatever it holds.
_STRING_RE = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# An opening bracket counts 2, a closing one 0: minus 1 per bracket, the running sum is
# the nesting depth (see _depth).
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_uint(raw: str, minimum: int, maximum: int) -> int | None:
    """``raw`` as an integer if it is 1-19 ASCII decimal digits with a value from
    ``minimum`` to ``maximum``; ``None`` otherwise (the caller picks the error)."""
    if not _DIGITS_RE.fullmatch(raw):
        return None
    value = int(raw)
    return value if minimum <= value <= maximum else None


def parse_json(text: bytes | str, what: str = "body") -> Any:
    """The value of the JSON text ``text`` (UTF-8 if bytes).

    Raises :class:`MalformedRequest` if it is not JSON, and :class:`InvalidValue` for
    ``NaN``/``Infinity``, nesting deeper than :data:`MAX_JSON_DEPTH` (``detail.max_depth``)
    or a string holding a lone surrogate. ``what`` names the input in messages."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = _depth(data)
    if depth > MAX_JSON_DEPTH:
        raise InvalidValue(f"{what}: JSON nested {depth} levels deep (max {MAX_JSON_DEPTH})",
                           {"max_depth": MAX_JSON_DEPTH})
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InvalidValue):
            raise
        raise MalformedRequest(f"{what} is not JSON: {exc}") from exc
    if _SURROGATE_ESCAPE_RE.search(data):
        _check_text(value, what)
    return value


def _depth(data: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings (0 for a scalar), in C-speed
    passes: strings removed, brackets kept, then the running depth's maximum."""
    brackets = _STRING_RE.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    depth: int = max(map(operator.sub, accumulate(brackets.translate(_STEPS)), count(1)))
    return depth


def _check_text(value: Any, what: str) -> None:
    """:class:`InvalidValue` if a string or key of ``value`` holds a lone surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidValue(f"{what}: a string holds a lone surrogate (\\ud800-\\udfff "
                           "without its pair), which is not Unicode text") from exc


def _reject_constant(name: str) -> Any:
    raise InvalidValue(f"{name} is not a JSON number crdtsync accepts")
