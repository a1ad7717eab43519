"""Console helpers shared by the ``crdtsync`` commands: output lines and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from ._aio import wait_event


def out(text: str) -> None:
    """Print a line on stdout, flushed at once (a pipe reader sees every line as it comes)."""
    print(text, flush=True)


def err(text: str) -> None:
    """Print a line on stderr (information that must not mix with a command's output)."""
    print(text, file=sys.stderr, flush=True)


def pretty(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def stop_event() -> asyncio.Event:
    """An event the first SIGINT or SIGTERM sets, so the caller can shut down cleanly.

    The handlers remove themselves when they fire: a second Ctrl-C interrupts at once.
    Where the loop cannot handle signals (Windows), Ctrl-C raises ``KeyboardInterrupt``
    instead and :func:`main` exits with status 130.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def fire() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stop.set()

    with contextlib.suppress(NotImplementedError):
        for sig in signals:
            loop.add_signal_handler(sig, fire)
    return stop


async def wait_or_stop(stop: asyncio.Event, seconds: float | None) -> bool:
    """Wait ``seconds`` (``None``: forever); return True as soon as ``stop`` is set."""
    return await wait_event(stop, seconds)
