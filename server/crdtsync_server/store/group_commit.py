"""Group commit: the syncs that arrive together share one database transaction.

A durable commit costs one fsync, whatever it holds. While one group is being written, the
commits that arrive queue up; the next group takes them all. Nobody waits for a timer, so a
lone sync pays nothing extra, and under load the fsyncs per second stay flat while the
syncs per second grow.

A write that fails (``SeqGap``, a constraint) fails alone and raises to its own caller only;
the others commit (on SQLite the group runs again with a savepoint per write once one is
refused, :func:`crdtsync_server.store.sqlite.store._commit_group`). When the transaction
itself fails (the disk is full, the database is locked too long, its log cannot be synced),
every caller of the group gets that error and none of them is acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

W = TypeVar("W")
R = TypeVar("R")


class GroupCommitter(Generic[W, R]):
    """Batches concurrent :meth:`submit` calls into calls of ``run_group(writes)``, which
    returns one result or exception per write, in order, all stored in one transaction."""

    def __init__(self, run_group: Callable[[list[W]], Awaitable[Sequence[R | BaseException]]],
                 *, max_group: int = 256) -> None:
        self._run_group = run_group
        self.max_group = max_group
        self._pending: list[tuple[W, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.groups = 0
        """Transactions run so far (for benchmarks and tests)."""
        self.writes = 0
        """Writes committed or refused so far."""

    async def submit(self, write: W) -> R:
        """Commit ``write`` with whatever else is pending; return its result or raise its
        error once its group's transaction ended."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="crdtsync-group-commit")
        return await future  # cancelling a caller cancels its future: the flush skips it

    async def drain(self) -> None:
        """Wait until every submitted write has been run (before closing the database)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait({self._flusher})

    async def _flush(self) -> None:
        while self._pending:
            group = self._pending[:self.max_group]
            del self._pending[:self.max_group]
            try:
                outcomes = await self._run_group([write for write, _ in group])
            except asyncio.CancelledError:
                for _, future in group + self._pending:
                    future.cancel()
                raise
            except Exception as exc:  # the transaction failed: the whole group did
                outcomes = [exc] * len(group)
            self.groups += 1
            self.writes += len(group)
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
