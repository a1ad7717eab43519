"""The one exception tree of crdtsync, shared by the device library and the server.

Every error has a stable wire ``code``, the HTTP ``status`` the server answers with, and a
``retryable`` flag, so a sync loop asks the error what to do instead of chaining
``isinstance`` checks. The server sends errors as frames ``{code, msg, detail, retry}``
(see docs/protocol.md); the device maps a frame back to the same class with
:func:`error_from_code`.

    CrdtsyncError                  code                  HTTP
    ├── RequestError               the request is wrong; resending it unchanged fails again
    │   ├── MalformedRequest       malformed_request     400  envelope does not decode
    │   ├── UnsupportedVersion     unsupported_version   400  protocol version not spoken
    │   ├── UnsupportedEncoding    unsupported_encoding  415  Content-Type not accepted
    │   ├── CorruptUpdate          corrupt_update        400  CRDT update fails CRC or apply
    │   ├── InvalidStateVector     invalid_state_vector  400  state vector garbage/out of range
    │   ├── InvalidValue           invalid_value         400  value a CRDT cannot hold
    │   │   └── SchemaViolation    schema_violation      422  write the fleet's schema refuses
    │   ├── BodyTooLarge           body_too_large        413  body over the server's limit
    │   ├── TooManyEvents          too_many_events       413  too many events in one request
    │   ├── BatchTooLarge          batch_too_large       413  too many entries in one batch
    │   ├── NotFound               not_found             404  no such device / resource
    │   ├── UnknownDocument        unknown_document      404  document not served to device
    │   ├── AlreadyExists          already_exists        409  e.g. device id taken
    │   ├── SeqGap                 seq_gap               409  events skip unseen seqs
    │   ├── SeqConflict            seq_conflict          409  seq reused with other content
    │   ├── GenerationMismatch     generation_mismatch   409  document generation differs
    │   ├── CursorExpired          cursor_expired        410  feed items after it were purged
    │   ├── FileTooLarge           file_too_large        413  file over the server's max size
    │   ├── QuotaExceeded          quota_exceeded        413  device's files over its quota
    │   ├── OffsetMismatch         offset_mismatch       409  upload chunk not at the stored end
    │   └── DigestMismatch         digest_mismatch       422  chunk or file fails its SHA-256
    ├── AuthError
    │   ├── Unauthorized           unauthorized          401  missing or wrong credential
    │   └── Forbidden              forbidden             403  valid credential, not allowed
    ├── RequestTimeout             request_timeout       408  retryable; body came too slowly
    ├── ServerError                internal              500  retryable; nothing committed
    ├── TooManyRequests            too_many_requests     429  retryable after ``retry_after`` s
    ├── Unavailable                unavailable           503  retryable; overloaded/stopping
    ├── TransportError             (local)                    retryable; outcome unknown
    ├── OutboxFull                 (local)                    outbox bound hit ("reject")
    ├── StoreError                 (local)                    local database failed / newer
    │   └── StoreBusy              (local)                    not now in this thread; no write
    ├── SyncStalled                (local)                    a sync did not settle in max_rounds
    ├── ClosedError                (local)                    used after ``aclose()``
    ├── RouteFailed                (local)                    a proxied request's route failed
    ├── ExportError                (local)                    ``crdtsync export`` cannot run
    ├── UsageError                 (local)                    a CLI line that cannot be run
    ├── FramingError               (local)                    test proxy: HTTP not delimitable
    ├── SinkError                  (server, local)            sink delivery failed; retried
    │   └── SinkRejected           (server, local)            refused for good; dead-lettered
    ├── LeaseLost                  (server, local)            another process delivers the sink
    └── WorkersFailed              (server, local)            serve --workers: a worker failed
                                                              to start (and would again)

Only ``crdtsync.testing.faults.Crash`` stands outside the tree, a ``BaseException`` on purpose
(a simulated process death that no ``except Exception`` may swallow). The local classes are
defined here, except ``UsageError`` (``crdtsync.cli``), ``FramingError``
(``crdtsync.testing.fault_proxy``), ``LeaseLost`` (``crdtsync_server.sinks.delivery``) and
``WorkersFailed`` (``crdtsync_server.api.workers``) and ``StoreBusy``
(``crdtsync._sqlite_worker``), which live with the one module that
raises them; tests/test_layering.py keeps them in the tree.
"""

from __future__ import annotations

from typing import Any, ClassVar

MAX_RETRY_AFTER = 3600
"""The longest ``retry_after`` (seconds) a client takes from a server."""


class CrdtsyncError(Exception):
    """Base of every crdtsync error.

    ``code`` is stable and part of the wire protocol; ``detail`` carries machine-readable
    context (for example ``{"last_seq": 41}`` on :class:`SeqConflict`).
    """

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", detail: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail: dict[str, Any] = dict(detail or {})


class RequestError(CrdtsyncError):
    """The request is wrong; sending it again unchanged fails the same way."""

    code = "bad_request"
    status = 400


class MalformedRequest(RequestError):
    code = "malformed_request"


class UnsupportedVersion(RequestError):
    code = "unsupported_version"


class UnsupportedEncoding(RequestError):
    code = "unsupported_encoding"
    status = 415


class CorruptUpdate(RequestError):
    code = "corrupt_update"


class InvalidStateVector(RequestError):
    code = "invalid_state_vector"


class InvalidValue(RequestError, ValueError):
    code = "invalid_value"


class SchemaViolation(InvalidValue):
    """A write the fleet's state schema refuses: wrong type, out of range, not in the enum,
    too long, or a key the schema does not list when it refuses unknown keys (``detail``:
    ``map``, ``key``, ``rule``, ``schema`` and, for a device's update, ``doc``). Raised by
    the device at assignment and answered by the server with nothing applied."""

    code = "schema_violation"
    status = 422


class BodyTooLarge(RequestError):
    code = "body_too_large"
    status = 413


class TooManyEvents(RequestError):
    code = "too_many_events"
    status = 413


class BatchTooLarge(RequestError):
    """A gateway batch (``POST /v1/sync/batch``) with more entries than the server takes
    (``detail.max_entries``); nothing of it was processed."""

    code = "batch_too_large"
    status = 413


class NotFound(RequestError):
    code = "not_found"
    status = 404


class UnknownDocument(RequestError):
    code = "unknown_document"
    status = 404


class AlreadyExists(RequestError):
    code = "already_exists"
    status = 409


class SeqGap(RequestError):
    code = "seq_gap"
    status = 409


class SeqConflict(RequestError):
    code = "seq_conflict"
    status = 409


class GenerationMismatch(RequestError):
    code = "generation_mismatch"
    status = 409


class CursorExpired(RequestError):
    """A feed reader resumed from a cursor older than the feed's retention: items after it
    were purged (``detail``: ``after`` and ``floor``, the highest purged cursor)."""

    code = "cursor_expired"
    status = 410


class FileTooLarge(RequestError):
    """A file over the server's ``max_file_size`` (``detail``: ``max_file_size``, ``size``);
    nothing of it is stored."""

    code = "file_too_large"
    status = 413


class QuotaExceeded(RequestError):
    """A device's files (stored and being uploaded) would exceed its quota (``detail``:
    ``quota``, ``used``, ``size``); nothing of the new file is stored."""

    code = "quota_exceeded"
    status = 413


class OffsetMismatch(RequestError):
    """An upload chunk that does not start where the stored part of the file ends
    (``detail.offset``: where it ends); nothing of the chunk is stored. Resend from there."""

    code = "offset_mismatch"
    status = 409


class DigestMismatch(RequestError):
    """Bytes that fail their SHA-256 (``detail.scope``: ``chunk`` for one upload chunk,
    nothing of which is stored; ``file`` for a whole file, whose upload starts over from
    offset 0)."""

    code = "digest_mismatch"
    status = 422


class AuthError(CrdtsyncError):
    code = "auth"
    status = 401


class Unauthorized(AuthError):
    code = "unauthorized"
    status = 401


class Forbidden(AuthError):
    code = "forbidden"
    status = 403


class RequestTimeout(CrdtsyncError):
    """The request body did not arrive within the server's body timeout (a slow or stalled
    link); nothing was applied, and sending it again is safe."""

    code = "request_timeout"
    status = 408
    retryable = True


class ServerError(CrdtsyncError):
    code = "internal"
    status = 500
    retryable = True


class TooManyRequests(CrdtsyncError):
    """The server holds as many live channels (``GET /v1/wake``) as it takes; try again
    after :attr:`retry_after` seconds (``detail.retry_after``, also the ``Retry-After``
    header; docs/protocol.md 14a)."""

    code = "too_many_requests"
    status = 429
    retryable = True

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again: ``detail.retry_after`` when it is a number
        in 0..3600, else ``None`` (back off as after any retryable error)."""
        value = self.detail.get("retry_after")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if 0 <= value <= MAX_RETRY_AFTER else None


class Unavailable(CrdtsyncError):
    code = "unavailable"
    status = 503
    retryable = True


class TransportError(CrdtsyncError):
    """The request may or may not have reached the server; replaying it is safe."""

    code = "transport"
    status = 0
    retryable = True


class OutboxFull(CrdtsyncError):
    code = "outbox_full"
    status = 0


class StoreError(CrdtsyncError):
    code = "store"
    status = 0


class SyncStalled(CrdtsyncError):
    """A sync kept needing more rounds (a peer that never converges); retryable later."""

    code = "sync_stalled"
    status = 0
    retryable = True


class ClosedError(CrdtsyncError):
    code = "closed"
    status = 0


class RouteFailed(CrdtsyncError):
    """A proxied request reached the cloud but its route failed; ``detail`` holds the
    outcome, ``reason`` its stable code: ``route_timeout``, ``route_unreachable``,
    ``route_http_error``, ``route_response_too_large``, ``route_bad_payload``,
    ``route_not_allowed``, ``unknown_route`` or ``interrupted``; or ``item_too_large`` /
    ``invalid_item`` when this device could not take the outcome the cloud sent. Not
    retryable: the cloud performs a request id at most once, so the same id fails again."""

    code = "route_failed"
    status = 0

    @property
    def reason(self) -> str:
        return str(self.detail.get("error") or "route_failed")


class ExportError(CrdtsyncError):
    """The export cannot run as asked: pyarrow missing for Parquet, a state file written
    with another format or other filters, an unreadable state file."""

    code = "export_failed"
    status = 0


class SinkError(CrdtsyncError):
    """Delivery to a downstream destination failed (unreachable, 5xx, timeout): the sink
    runner retries with backoff, then dead-letters. Local to the server, never on the wire."""

    code = "sink_failed"
    status = 0
    retryable = True


class SinkRejected(SinkError):
    """The destination refused the items for good (a 4xx, a constraint): dead-lettered at
    once, without retries."""

    code = "sink_rejected"
    retryable = False


def _wire_classes() -> dict[str, type[CrdtsyncError]]:
    found: dict[str, type[CrdtsyncError]] = {}
    pending: list[type[CrdtsyncError]] = [CrdtsyncError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.status:
            found[cls.code] = cls
    return found


_BY_CODE = _wire_classes()


def error_from_code(
    code: str, message: str = "", detail: dict[str, Any] | None = None, status: int = 0
) -> CrdtsyncError:
    """Rebuild the exception a server sent as an error frame.

    An unknown code (from a newer server) becomes a :class:`ServerError` for 5xx statuses,
    otherwise a :class:`RequestError`, keeping the code in ``detail["code"]``.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = ServerError if status >= 500 else RequestError
        detail = {**(detail or {}), "code": code}
    return cls(message, detail)
