"""Gateway batches: many devices' syncs in one request, each one a whole sync of its own.

The transport-free core of ``POST /v1/sync/batch`` (docs/protocol.md 18). Each entry of a
batch goes through exactly the path of ``POST /v1/sync``: its token is authenticated
(:func:`~.auth.authenticate_device`) before its body is read, then :func:`~.core.run_sync`
decodes it, checks that ``dev`` is the token's device and runs the sync. So every guarantee
of a single sync holds per entry (durable before the answer, exactly once, validation,
policies), and an entry that fails (a wrong token, a corrupt update, a seq conflict, an
oversized entry) answers its own typed error frame while the others go on.

The entries run concurrently. That is what amortises the database: their commits reach the
store together, and its group commit (:mod:`.store.group_commit`) stores them in a few
transactions instead of one each (2 for 500 entries in bench/gateway.py). Entries of one
device would only wait for each other (the device lock), so a token given twice is refused
in its later entries.

Memory: the batch body is bounded by ``max_body`` and its entry count before any entry is
read; each entry is then bounded by the single sync's limits (``max_decoded_bytes`` for
what its template batches decode to, for one). Since a token counts once per batch, what a
batch can make the server hold at once is what as many devices syncing concurrently on
their own connections could: a client needs one valid token per entry to get there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from crdtsync.crdt import rejects_input
from crdtsync.errors import CrdtsyncError, MalformedRequest, ServerError
from crdtsync.protocol import BatchAnswer, BatchEntry, encode_error

from .auth import authenticate_device
from .core import Services, run_sync

log = logging.getLogger("crdtsync.server")


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """What one entry of a batch did: its ``answer``, the ``error`` it was refused with
    (``None`` when it synced), the ``device`` its token named (``None`` when it named
    none) and the ``seconds`` from its start to its encoded answer."""

    answer: BatchAnswer
    error: BaseException | None
    device: str | None
    seconds: float


async def process_batch(services: Services, entries: list[BatchEntry]) -> list[EntryOutcome]:
    """Run every entry of a batch (concurrently) and return their outcomes in order.

    Never raises for one entry's failure: a :class:`CrdtsyncError` becomes that entry's
    error frame with its status, anything else (a bug, a Rust panic on hostile input) the
    frame of ``internal``, logged. Cancellation (the client left) cancels every entry; an
    entry cancelled before its commit stored nothing, one cancelled after it is a lost
    answer, which the device's next sync replays harmlessly."""
    seen: set[str] = set()
    runs = []
    for entry in entries:
        twice = entry.token in seen
        seen.add(entry.token)
        runs.append(_duplicate(entry) if twice else _run_entry(services, entry))
    return list(await asyncio.gather(*runs))


async def _duplicate(entry: BatchEntry) -> EntryOutcome:
    error = MalformedRequest("this device already has an entry in this batch; one sync per "
                             "device and batch")
    return EntryOutcome(BatchAnswer(error.status, encode_error(error)), error, None, 0.0)


async def _run_entry(services: Services, entry: BatchEntry) -> EntryOutcome:
    started = time.perf_counter()
    device: str | None = None
    try:
        record = await authenticate_device(services.store, entry.token)
        device = record.id
        body = await run_sync(services, record, entry.body)
    except CrdtsyncError as exc:
        return _refused(exc, exc if exc.status else ServerError(
            "internal error; nothing was committed"), device, started)
    except BaseException as exc:
        # Exception, and a Rust panic from pycrdt (a BaseException): answer, keep serving.
        if not isinstance(exc, Exception) and not rejects_input(exc):
            raise
        log.error("batch entry of device %s failed", device, exc_info=True)
        return _refused(exc, ServerError("internal error; nothing was committed"), device,
                        started)
    return EntryOutcome(BatchAnswer(200, body), None, device, time.perf_counter() - started)


def _refused(exc: BaseException, answered: CrdtsyncError, device: str | None,
             started: float) -> EntryOutcome:
    if answered.status >= 500:
        log.error("batch entry of device %s: %s: %s", device, answered.code, exc)
    else:
        log.info("batch entry of device %s refused: %s: %s", device, answered.code, exc)
    return EntryOutcome(BatchAnswer(answered.status, encode_error(answered)), exc, device,
                        time.perf_counter() - started)
