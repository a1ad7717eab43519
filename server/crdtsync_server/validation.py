"""Checks shared by the server's configuration objects (proxied-request routes, sinks): target
URLs, ``${ENV}`` references in configuration files, and how secrets are shown redacted
(:func:`redact_options`) and kept when sent back as shown (:func:`keep_redacted`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from crdtsync.errors import MalformedRequest

REDACTED = "***"
"""What a secret reads in API responses."""

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_RE = re.compile(r"secret|passw|token|credential|creds|api[_-]?key|private",
                        re.IGNORECASE)
_DSN_PASSWORD_RE = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
_URL_PASSWORD_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):\S*@")


def substitute_env(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` replaced by ``env["NAME"]``; ``KeyError(NAME)`` for a
    variable that is not set."""
    return ENV_REF_RE.sub(lambda match: env[match.group(1)], text)


def missing_env(name: str) -> str:
    """The complaint about a ``${NAME}`` whose variable is not set."""
    return f"references ${{{name}}} but environment variable {name} is not set"


def read_config_file(path: str | os.PathLike[str], key: str, shape: str) -> dict[str, Any]:
    """The object under ``key`` of the JSON file ``path``, which must be ``{key: {...}}``
    (``shape`` describes the entries in the error message). :class:`MalformedRequest` for a
    file that is not such JSON; ``OSError`` if it cannot be read. Blocking."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"{os.fspath(path)}: not a JSON file: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {key} or not isinstance(data[key], dict):
        raise MalformedRequest(f'{os.fspath(path)}: expected {{"{key}": {{{shape}}}}}')
    entries: dict[str, Any] = data[key]
    return entries


def url_problem(url: object) -> str | None:
    """Why ``url`` cannot be a target (``None`` if it can): it must be an absolute http(s)
    URL with a host and without credentials (those go in headers)."""
    if not isinstance(url, str):
        return "must be a string"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is what validates it
    except ValueError as exc:
        return f"does not parse: {exc}"
    if parts.scheme not in ("http", "https"):
        return "must be an absolute http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials; put them in headers"
    return None


def redact_url(text: str) -> str:
    """``text`` as the API shows it when it is a URL (``scheme://...``): the scheme, host
    and port, the user name of ``user:password@`` and the first path segment stay; the
    password (or a lone ``token@``), the path after the first segment, every query value
    and the fragment read ``***``. For example
    ``https://u:p@hooks.example.com/services/T0/B1/XyZ?token=abc&v=2#x`` reads
    ``https://u:***@hooks.example.com/services/***?token=***&v=***#***``. Other text is
    returned unchanged."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    shown = f"{parts.scheme}://{_redacted_netloc(parts.netloc)}{_redacted_path(parts.path)}"
    if parts.query:
        names = (pair.partition("=")[0] for pair in parts.query.split("&"))
        shown += "?" + "&".join(f"{name}={REDACTED}" for name in names)
    if parts.fragment:
        shown += "#" + REDACTED
    return shown


def redact_dsn(text: str) -> str:
    """``text`` (a store URL, a libpq DSN, or a message quoting one) as logs and banners may
    show it: the password of every ``scheme://user:password@`` reads ``***`` (the user
    stays), and so does every ``password=`` value (``?password=`` in a URL, a keyword DSN).
    Unlike :func:`redact_url`, host, port, database name and other parameters stay, so the
    reader can tell which database it is. A password holding an unencoded ``@`` is hidden
    whole (up to the last ``@``); text without a password is returned unchanged:
    ``postgresql://app:s3cret@db:5432/sync`` reads ``postgresql://app:***@db:5432/sync``."""
    shown = _URL_PASSWORD_RE.sub(rf"\g<1>:{REDACTED}@", text)
    return _DSN_PASSWORD_RE.sub(rf"\g<1>{REDACTED}", shown)


def _redacted_netloc(netloc: str) -> str:
    """``user:***@host:port``; a lone ``token@`` is all secret: ``***@host:port``."""
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return host
    user, colon, _password = userinfo.partition(":")
    return f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"


def _redacted_path(path: str) -> str:
    """The first segment of ``path``, then ``/***`` if anything follows it."""
    segments = path.split("/")  # "/a/b" -> ["", "a", "b"]
    if len(segments) < 2:
        return path  # "" (no path)
    if any(segments[2:]):
        return f"/{segments[1]}/{REDACTED}"
    return "/" + "/".join(segments[1:])  # "/a" or "/a/": nothing after the first segment


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (a sink's options, a route's JSON form) as the API shows them:
    secret-looking keys and every value of a ``headers`` object read ``"***"``, URLs (also
    in lists and nested objects) are redacted by :func:`redact_url`, DSN passwords read
    ``"***"``; other values are shown as they are."""
    return {key: _redacted(key, value) for key, value in options.items()}


def _redacted(key: str, value: Any) -> Any:
    if _SECRET_RE.search(key):
        return REDACTED
    if key.lower() == "headers" and isinstance(value, Mapping):
        return {name: REDACTED for name in value}
    if isinstance(value, Mapping):
        return redact_options(value)
    if isinstance(value, list):
        return [_redacted(key, item) for item in value]
    if isinstance(value, str):
        return _DSN_PASSWORD_RE.sub(rf"\g<1>{REDACTED}", redact_url(value))
    return value


def keep_redacted(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` (as sent in a PUT) where each value sent back as :func:`redact_options`
    shows the stored one in ``old`` (a ``"***"``, a redacted URL, a ``headers`` object of
    ``"***"``) is replaced by the value stored in ``old`` under that key; objects are merged
    key by key, so one changed header keeps the others. Anything else is taken as sent
    (a value equal to the stored one too, so that its type is checked as sent)."""
    merged: dict[str, Any] = {}
    for key, value in new.items():
        prior = old.get(key)
        if key in old and value != prior and (value == REDACTED
                                              or value == _redacted(key, prior)):
            merged[key] = prior
        elif isinstance(value, Mapping) and isinstance(prior, Mapping):
            merged[key] = keep_redacted(value, prior)
        else:
            merged[key] = value
    return merged


def query_names(url: str) -> frozenset[str]:
    """The names of the query parameters of ``url`` (decoded)."""
    return frozenset(name for name, _ in parse_qsl(urlsplit(url).query,
                                                   keep_blank_values=True))


def headers_problem(headers: object) -> tuple[str, str] | None:
    """``(field, problem)`` if ``headers`` is not an object of valid HTTP header names to
    string values without CR, LF or NUL; ``None`` if it is."""
    if not isinstance(headers, Mapping):
        return "headers", "must be an object of strings"
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            return "headers", f"has an invalid header name {name!r}"
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            return f"headers.{name}", "must be a string without CR, LF or NUL"
    return None
