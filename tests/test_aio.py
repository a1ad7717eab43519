"""``crdtsync._aio``: waiting on an event never swallows a cancellation, and stopping a task
works even when the task swallowed one (as Python 3.11's ``asyncio.wait_for`` does when its
inner awaitable finishes in the same loop iteration as the cancellation)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from crdtsync._aio import cancel_and_wait, wait_event


async def test_wait_event_returns_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 30) is True
    assert await wait_event(event, None) is True


async def test_a_cancellation_racing_the_event_propagates() -> None:
    """The event is set and the waiter cancelled in the same loop iteration."""
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 30))
    await asyncio.sleep(0)  # the task waits
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def swallow_first_cancel(entered: asyncio.Event) -> None:
    """Runs on after the first cancellation, as a task hit by the wait_for race does."""
    entered.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
    await asyncio.sleep(30)


async def test_cancel_and_wait_stops_a_task_that_swallowed_a_cancellation() -> None:
    entered = asyncio.Event()
    task = asyncio.create_task(swallow_first_cancel(entered))
    await entered.wait()
    async with asyncio.timeout(10):
        await cancel_and_wait(task, retry=0.01)
    assert task.cancelled()


async def test_cancel_and_wait_drops_the_result_or_exception_of_a_finished_task() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fail())
    await asyncio.wait([task])
    await cancel_and_wait(task)  # neither raises nor warns
    assert isinstance(task.exception(), ValueError)
