"""Small asyncio helpers that stay correct on Python 3.11.

On 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
iteration as its inner awaitable's result (it returns the result; fixed in 3.12). Third-party
clients built on it (nats-py's request, for one) inherit the race, so a task cancelled at
that moment keeps running. :func:`wait_event` is the race-free replacement for waiting on an
event with a timeout, and :func:`cancel_and_wait` stops a task even when a cancellation is
swallowed, by cancelling again until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["CANCEL_RETRY_S", "cancel_and_wait", "log_crash", "spawn", "wait_event"]

log = logging.getLogger("crdtsync")


CANCEL_RETRY_S = 0.5
"""Seconds to wait for a cancelled task before cancelling it again."""


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until ``event`` is set (``True``) or ``seconds`` pass (``False``;
    ``None`` waits forever). A cancellation always propagates, unlike with
    ``asyncio.wait_for`` on Python 3.11."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
            return True
    return False


async def cancel_and_wait(*tasks: asyncio.Future[Any],
                          retry: float = CANCEL_RETRY_S) -> None:
    """Cancel ``tasks`` and wait until all are done, cancelling again every ``retry``
    seconds those that run on (a cancellation they swallowed). Results and exceptions are
    dropped (log a crash where the task is created). If the caller is cancelled, the tasks
    have been cancelled too."""
    while running := [task for task in tasks if not task.done()]:
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=retry)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning


def log_crash(task: asyncio.Future[Any]) -> None:
    """A done callback: log the exception a background task died of."""
    if not task.cancelled() and task.exception() is not None:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.error("%s stopped", name, exc_info=task.exception())


def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start background task ``name``; its crash is logged (see :func:`log_crash`)."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(log_crash)
    return task
