"""The ``nats`` sink: publish feed items to a NATS JetStream stream (needs ``crdtsync[nats]``).

Each item becomes one message on a subject naming its fleet, device and topic (events) or
document (state changes and conflicts), with the item's JSON as payload and its idempotency
key as the ``Nats-Msg-Id`` header, so JetStream drops a redelivered item inside the stream's
duplicate window. Items are published one at a time, each publish acknowledged by JetStream
before the next, so the stream holds every device's items in cursor order even when a batch
fails half way and is delivered again.

Subjects (``_`` stands for "no fleet"; ``_state`` marks state changes, ``_conflict``
conflicts, ``_file`` files)::

    <subject_prefix>.<fleet or _>.<device>.<topic>            an event
    <subject_prefix>.<fleet or _>.<device>._state.<doc>       a state change
    <subject_prefix>.<fleet or _>.<device>._conflict.<doc>    a conflict
    <subject_prefix>.<fleet or _>.<device>._file.<name>       a file the device sent

Names become single subject tokens by :func:`subject_token` (percent-encoding, reversible
with ``urllib.parse.unquote``), so names holding ``.`` never add subject levels.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from crdtsync.errors import SinkError, SinkRejected

from ..store.feed import FeedItem, json_text
from .base import SinkConfig, register
from .config import invalid, number_field

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

__all__ = ["NatsOptions", "NatsSink", "item_subject", "subject_token"]

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
URL_SCHEMES = ("nats", "tls", "ws", "wss")
STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,255}\Z")
MAX_DUPLICATE_WINDOW_S = 86400.0
MAX_TIMEOUT_S = 120.0
NO_FLEET = "_"
STATE_TOKEN = "_state"
CONFLICT_TOKEN = "_conflict"
FILE_TOKEN = "_file"
MSG_ID = "Nats-Msg-Id"


def subject_token(name: str | None) -> str:
    """``name`` as one NATS subject token: ASCII letters, digits, ``-``, ``_`` and ``~``
    stay, every other character (``.``, ``:``, spaces, ``*``, ``>``, ``%``, non-ASCII...)
    becomes ``%XX`` per UTF-8 byte, and so does a leading ``_`` (tokens starting with ``_``
    are the sink's own: ``_`` for no name, ``_state``, ``_conflict``). ``None`` or ``""``
    gives ``_``. Injective: ``urllib.parse.unquote`` gives the name back."""
    if not name:
        return NO_FLEET
    token = quote(name, safe="").replace(".", "%2E")
    return "%5F" + token[1:] if token.startswith("_") else token


def item_subject(prefix: str, item: FeedItem) -> str:
    """The subject ``item`` is published on (see the module docstring)."""
    tokens = [prefix, subject_token(item.fleet), subject_token(item.device)]
    if item.kind == "event":
        tokens.append(subject_token(item.topic))
    elif item.kind == "file":
        tokens += [FILE_TOKEN, subject_token(item.body.get("name"))]
    else:
        marker = CONFLICT_TOKEN if item.kind == "conflict" else STATE_TOKEN
        tokens += [marker, subject_token(item.doc)]
    return ".".join(tokens)


def _valid_subject(subject: object) -> bool:
    """A literal subject: non-empty tokens without whitespace or wildcards, not ``$...``."""
    return isinstance(subject, str) and not subject.startswith("$") and all(
        token and not any(c.isspace() or c in "*>" for c in token)
        for token in subject.split("."))


@dataclass(frozen=True)  # no slots: the defaults stay readable as class attributes
class NatsOptions:
    """The ``options`` of a ``nats`` sink (see :meth:`from_config`)."""

    url: str = DEFAULT_URL
    stream: str = "CRDTSYNC"
    subject_prefix: str = "crdtsync"
    create_stream: bool = True
    """Create the stream (subjects ``<subject_prefix>.>``) when it does not exist; when
    false, a missing stream rejects the items."""
    duplicate_window: float = 120.0
    """Seconds JetStream remembers message ids (only used when creating the stream)."""
    timeout: float = 5.0
    """Seconds to wait for the connection and for each publish acknowledgement."""

    @classmethod
    def from_config(cls, config: SinkConfig) -> NatsOptions:
        """The options of ``config``; :class:`MalformedRequest` naming an invalid one."""
        options, name = config.options, config.name
        url = options.get("url", DEFAULT_URL)
        if not isinstance(url, str) or url.partition("://")[0] not in URL_SCHEMES:
            raise invalid(name, "options.url", "must be a nats://, tls://, ws:// or wss:// URL")
        stream = options.get("stream", cls.stream)
        if not isinstance(stream, str) or not STREAM_RE.match(stream):
            raise invalid(name, "options.stream", "must be 1-255 of A-Za-z0-9_-")
        prefix = options.get("subject_prefix", cls.subject_prefix)
        if not _valid_subject(prefix):
            raise invalid(name, "options.subject_prefix",
                          "must be a subject without spaces or wildcards, not starting with $")
        create = options.get("create_stream", True)
        if not isinstance(create, bool):
            raise invalid(name, "options.create_stream", "must be true or false")
        return cls(url, stream, prefix, create,
                   number_field(name, options, "duplicate_window", cls.duplicate_window, 1.0,
                                MAX_DUPLICATE_WINDOW_S, prefix="options."),
                   number_field(name, options, "timeout", cls.timeout, 0.001, MAX_TIMEOUT_S,
                                prefix="options."))


@contextmanager
def nats_errors(what: str) -> Iterator[None]:
    """Turn NATS failures while doing ``what`` into :class:`SinkRejected` (a message NATS
    will never accept: too large, a bad subject, a 4xx JetStream answer) or
    :class:`SinkError` (unreachable, timeout, 5xx: worth retrying)."""
    from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
    from nats.errors import Error as NatsError
    from nats.js.errors import APIError

    try:
        yield
    except SinkError:
        raise
    except (MaxPayloadError, BadSubjectError, BadHeaderError) as error:
        raise SinkRejected(f"NATS: {what} refused: {_text(error)}") from error
    except APIError as error:
        if error.code is not None and 400 <= error.code < 500:
            raise SinkRejected(f"JetStream: {what} refused: {_text(error)}") from error
        raise SinkError(f"JetStream: {what} failed: {_text(error)}") from error
    except (NatsError, OSError) as error:  # OSError covers TimeoutError
        raise SinkError(f"NATS: {what} failed: {_text(error)}") from error


def _text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def _log_error(error: Exception) -> None:
    log.debug("nats client error: %r", error)


@register("nats")
class NatsSink:
    """Publishes feed items to JetStream (see the module docstring)."""

    def __init__(self, config: SinkConfig) -> None:
        if importlib.util.find_spec("nats") is None:
            raise invalid(config.name, "type", "nats needs nats-py: pip install 'crdtsync[nats]'")
        self.name = config.name
        self.options = NatsOptions.from_config(config)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def open(self) -> None:
        with nats_errors("connecting"):
            await self._jetstream()

    async def deliver(self, items: Sequence[FeedItem]) -> None:
        with nats_errors("publishing"):
            js = await self._jetstream()
            for item in items:
                await self._publish(js, item)

    async def aclose(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with nats_errors("closing"):
                await nc.close()

    async def _jetstream(self) -> JetStreamContext:
        """The JetStream context, (re)connecting when the connection was lost (the client
        does not reconnect by itself: the runner's retries do) and making sure the stream
        exists."""
        if self._nc is not None and self._nc.is_closed:
            self._nc = self._js = None
        if self._nc is None:
            self._nc = await self._connect()
        if self._js is None:
            js = self._nc.jetstream(timeout=self.options.timeout)
            await self._ensure_stream(js)
            self._js = js
        return self._js

    async def _connect(self) -> Client:
        import nats

        return await nats.connect(
            self.options.url, name=f"crdtsync-sink-{self.name}", error_cb=_log_error,
            connect_timeout=self.options.timeout, allow_reconnect=False,
            max_reconnect_attempts=1, reconnect_time_wait=0.1)

    async def _ensure_stream(self, js: JetStreamContext) -> bool:
        """Make sure the stream exists; ``True`` if it was created now."""
        from nats.js.errors import NotFoundError

        try:
            await js.stream_info(self.options.stream)
            return False
        except NotFoundError:
            if not self.options.create_stream:
                raise SinkRejected(f"JetStream stream {self.options.stream!r} does not exist "
                                   "and create_stream is false") from None
        await js.add_stream(name=self.options.stream,
                            subjects=[f"{self.options.subject_prefix}.>"],
                            duplicate_window=self.options.duplicate_window)
        log.info("created JetStream stream %s", self.options.stream)
        return True

    async def _publish(self, js: JetStreamContext, item: FeedItem) -> None:
        """Publish one item and wait for its ack (a duplicate ack counts as delivered)."""
        from nats.js.errors import NoStreamResponseError

        subject = item_subject(self.options.subject_prefix, item)
        try:
            await js.publish(subject, json_text(item.to_json()).encode(),
                             stream=self.options.stream, headers={MSG_ID: item.key})
        except NoStreamResponseError:
            created = await self._ensure_stream(js)  # rejects when it is gone for good
            raise SinkError(f"no JetStream stream answered on {subject!r}"
                            + (" (the stream was missing: created it)" if created else ""),
                            {"key": item.key}) from None
