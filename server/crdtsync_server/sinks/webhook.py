"""The HTTP webhook sink (type ``webhook``): each batch is one signed JSON POST.

Options: ``url`` (required; http or https, no credentials in it), ``secret`` (required; the
shared secret of the signature), ``timeout`` (seconds per request, default 10, at most 120),
``headers`` (extra request headers, e.g. an ``Authorization``; redacted in the API).

The request::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <hex SHA-256 of the batch's item keys joined by "\\n">
    X-Crdtsync-Sink: <sink name>
    X-Crdtsync-Timestamp: <Unix time of sending, seconds>
    X-Crdtsync-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + the exact body,
                          keyed by the secret>

    {"items": [<feed item JSON>, ...]}

The answer decides: 2xx delivered; 408, 429, 5xx, a timeout or a connection failure are
retried (:class:`SinkError`); a redirect (never followed) or another 4xx is final
(:class:`SinkRejected`: dead letters). A batch may arrive more than once (a retry after a
lost answer, a server restart): receivers deduplicate on each item's ``key``. A receiver
checks the signature with :func:`verify_signature` on the raw body, before parsing it; the
signature covers the timestamp, so a receiver can also refuse stale (replayed) requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from crdtsync import __version__
from crdtsync.errors import SinkError, SinkRejected

from ..store.feed import FeedItem
from ..validation import headers_problem, url_problem
from .base import SinkConfig, register
from .config import invalid, number_field

if TYPE_CHECKING:
    import aiohttp

SIGNATURE_HEADER = "X-Crdtsync-Signature"
TIMESTAMP_HEADER = "X-Crdtsync-Timestamp"
SINK_HEADER = "X-Crdtsync-Sink"
MAX_TIMEOUT_S = 120.0
RETRYABLE_STATUSES = frozenset({408, 429})
_SNIPPET = 200


SIGNATURE_TOLERANCE_S = 300.0
"""How far from the receiver's clock :func:`verify_signature` accepts a timestamp."""


def sign(secret: str, body: bytes, timestamp: str) -> str:
    """The ``X-Crdtsync-Signature`` value of a request: ``sha256=`` and the hex
    HMAC-SHA256, keyed by ``secret``, of ``timestamp`` (the ``X-Crdtsync-Timestamp``
    value), a ``.`` and ``body``."""
    signed = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, signature: str | None,
                     timestamp: str | None, *, tolerance: float | None = SIGNATURE_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """Whether ``signature`` and ``timestamp`` (the request's ``X-Crdtsync-Signature`` and
    ``X-Crdtsync-Timestamp``) sign ``body`` (the raw request body, before any parsing)
    with ``secret``, compared in constant time, and the timestamp is within ``tolerance``
    seconds of ``now`` (default: this machine's clock; ``tolerance=None``: any age)."""
    if signature is None or timestamp is None:
        return False
    timestamp = timestamp.strip()
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if tolerance is not None and abs((time.time() if now is None else now)
                                     - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp).encode(),
                               signature.strip().encode())


def batch_key(items: Sequence[FeedItem]) -> str:
    """The ``Idempotency-Key`` of a batch: the same items always give the same key."""
    return hashlib.sha256("\n".join(item.key for item in items).encode()).hexdigest()


def encode_batch(items: Sequence[FeedItem]) -> bytes:
    """The request body: ``{"items": [...]}`` as compact UTF-8 JSON."""
    return json.dumps({"items": [item.to_json() for item in items]}, separators=(",", ":"),
                      ensure_ascii=False).encode()


@register("webhook")
class WebhookSink:
    """POSTs batches to ``options["url"]`` over one ``aiohttp`` session (no cookies, no proxy
    from the environment, redirects never followed)."""

    def __init__(self, config: SinkConfig) -> None:
        options = config.options
        problem = url_problem(options.get("url"))
        if problem is not None:
            raise invalid(config.name, "options.url", problem)
        secret = options.get("secret")
        if not isinstance(secret, str) or not secret:
            raise invalid(config.name, "options.secret", "must be a non-empty string")
        headers = options.get("headers", {})
        header_problem = headers_problem(headers)
        if header_problem is not None:
            field, message = header_problem
            raise invalid(config.name, f"options.{field}", message)
        self.name = config.name
        self.url: str = options["url"]
        self.secret = secret
        self.timeout = number_field(config.name, options, "timeout", 10.0, 0.001,
                                    MAX_TIMEOUT_S, prefix="options.")
        self.headers: Mapping[str, str] = dict(headers)
        self._host = urlsplit(self.url).hostname
        self._session: aiohttp.ClientSession | None = None
        self._unreachable: tuple[type[Exception], ...] = (OSError,)
        """What a failed exchange raises: OSError, and aiohttp's ClientError once open."""

    async def open(self) -> None:
        # The HTTP client is imported here, as the NATS and PostgreSQL sinks import theirs:
        # the server core that loads the sink types stays free of any HTTP library.
        import aiohttp

        if self._session is None:
            self._unreachable = (aiohttp.ClientError, OSError)
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": f"crdtsync/{__version__}"})

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def request_headers(self, items: Sequence[FeedItem], body: bytes) -> dict[str, str]:
        """The headers of one attempt: a retry is signed again with a fresh timestamp."""
        timestamp = str(int(time.time()))
        return {**self.headers, "Content-Type": "application/json",
                "Idempotency-Key": batch_key(items), SINK_HEADER: self.name,
                TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self.secret, body, timestamp)}

    async def deliver(self, items: Sequence[FeedItem]) -> None:
        if self._session is None:
            raise SinkError(f"webhook sink {self.name!r} is not open")
        body = encode_batch(items)
        try:
            async with self._session.post(self.url, data=body, allow_redirects=False,
                                          headers=self.request_headers(items, body)) as resp:
                status = resp.status
                snippet = (await resp.content.read(_SNIPPET)).decode("utf-8", "replace")
        except TimeoutError:  # before OSError: TimeoutError is one
            raise SinkError(f"{self._host}: no answer within {self.timeout:g} s") from None
        except self._unreachable as exc:
            # The URL may hold a secret (a token in its path): only the host is named.
            raise SinkError(f"{self._host}: cannot reach the receiver"
                            f" ({type(exc).__name__})") from None
        _check_status(self._host, status, snippet)


def _check_status(host: str | None, status: int, snippet: str) -> None:
    if 200 <= status < 300:
        return
    message = f"{host}: answered {status}" + (f": {snippet.strip()}" if snippet.strip() else "")
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise SinkError(message, {"status": status})
    if 300 <= status < 400:
        message += " (redirects are not followed)"
    raise SinkRejected(message, {"status": status})
