"""The device side of cloud-to-device messages and commands (the "downlink").

The cloud numbers a device's downlink 1, 2, 3, ...; every sync response carries the items
above the seq the device reported processed (``down_done``). The device processes them in
order:

- a **message** goes to the handler registered for its topic (``@dev.on("topic")``, or
  ``@dev.on("*")`` for any topic). Once the handler returned, ``down_done`` moves past it
  durably and the next sync acknowledges it. Guarantee: the acknowledgement happens exactly
  once; the handler runs at least once, and again only if the device dies after the handler
  returned and before that one local commit (or if the handler raised). ``message.seq`` is
  unique per device, so a handler can make its effect idempotent. A message with no handler
  waits (and everything after it) until one is registered.
- a **command** runs at most once, across restarts: ``down_started`` is stored before the
  handler runs, and a command found started but not finished after a restart is answered
  with the error ``interrupted`` instead of being run again. A command past its deadline is
  answered ``expired`` without running. The handler's return value (or exception) is stored
  with ``down_done`` in one transaction and sent on the next round, which the device starts
  at once.
- an item whose body the device cannot take (``DownItem.refused``: over
  ``Limits.max_item_body``, or not JSON data; only an older or foreign server sends one) is
  skipped alone and logged: a message is acknowledged without a handler, a command is
  answered with the error ``item_too_large`` (or ``invalid_item``) without running. The
  skipped items of a :meth:`Inbox.process` call are in :attr:`Inbox.skipped`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from . import hlc
from ._device_store import DeviceStore
from .errors import BodyTooLarge, CrdtsyncError, InvalidValue
from .protocol import DownItem, Result, item_body
from .values import check_value

log = logging.getLogger("crdtsync.device")

MessageHandler = Callable[["Message"], Awaitable[None] | None]
CommandHandler = Callable[[Any], Awaitable[Any] | Any]


@dataclass(frozen=True, slots=True)
class Message:
    """A message from the cloud: ``seq`` is unique and increasing per device."""

    seq: int
    topic: str
    body: Any


class Inbox:
    """Handlers and the processing of downlink items for one device."""

    def __init__(self, store: DeviceStore, device_id: str,
                 wall: Callable[[], int] = hlc.wall_ms) -> None:
        self.store = store
        self.device_id = device_id
        self.wall = wall
        """The device's wall clock in ms: a command past its deadline is not run."""
        self.message_handlers: dict[str, MessageHandler] = {}
        self.command_handlers: dict[str, CommandHandler] = {}
        self.waiting = 0
        """Items held back because no handler is registered for them."""
        self.skipped: list[DownItem] = []
        """Items the last :meth:`process` skipped because their body could not be taken."""

    @property
    def done(self) -> int:
        return int(self.store.meta.get("down_done", 0))

    async def process(self, items: tuple[DownItem, ...]) -> int:
        """Process items in seq order; stop at the first one that cannot be processed now.
        Returns how many command results were produced (to send promptly)."""
        results = 0
        self.waiting = 0
        self.skipped = []
        for item in items:
            if item.seq <= self.done:
                continue  # already processed; the cloud has not seen our acknowledgement yet
            if item.refused is not None:
                results += await self._skip(item)
            elif item.kind == "message":
                if not await self._message(item):
                    break
            else:
                await self._command(item)
                results += 1
        return results

    async def _skip(self, item: DownItem) -> int:
        """Acknowledge an item whose body cannot be taken, without a handler (a command is
        answered with the refusal's code); returns how many results that produced."""
        assert item.refused is not None
        log.warning("device %s: skipped %s %r (downlink seq %d): %s: %s", self.device_id,
                    item.kind, item.name, item.seq, item.refused.code, item.refused.message)
        self.skipped.append(item)
        if item.kind == "message":
            await self.store.finish_down(item.seq)
            return 0
        await self.store.finish_down(item.seq, _error(item.refused.code, item.refused.message))
        return 1

    async def _message(self, item: DownItem) -> bool:
        handler = self.message_handlers.get(item.name) or self.message_handlers.get("*")
        if handler is None:
            self.waiting += 1
            log.warning("device %s: no handler for message topic %r (seq %d); it waits",
                        self.device_id, item.name, item.seq)
            return False
        try:
            await _call(handler, Message(item.seq, item.name, item.body))
        except Exception:
            log.exception("device %s: handler for %r failed on message %d; retried at the "
                          "next sync", self.device_id, item.name, item.seq)
            return False
        await self.store.finish_down(item.seq)
        return True

    async def _command(self, item: DownItem) -> None:
        if int(self.store.meta.get("down_started", 0)) >= item.seq:
            result = _error("interrupted", "the device restarted while the command ran; "
                                           "it is not run twice")
        elif item.expires and self.wall() > item.expires:
            result = _error("expired", "the command's deadline passed before it could run")
        else:
            await self.store.set_meta(down_started=item.seq)
            result = await self._run_command(item)
        await self.store.finish_down(item.seq, result)

    async def _run_command(self, item: DownItem) -> tuple[bool, bytes]:
        handler = self.command_handlers.get(item.name)
        if handler is None:
            return _error("unknown_method", f"no handler for command {item.name!r}")
        try:
            value = await _call(handler, item.body)
            check_value(value, where="command result", max_int=2**63 - 1)
            return True, item_body(value, what="command result")
        except (InvalidValue, BodyTooLarge) as exc:
            # Sent as it is, the cloud would refuse every later sync: answer an error.
            return _error("invalid_result", exc.message)
        except Exception as exc:
            code = exc.code if isinstance(exc, CrdtsyncError) else type(exc).__name__
            return _error(code, str(exc))

    async def results(self, limit: int) -> tuple[Result, ...]:
        """Stored command results to send, decoded."""
        out = []
        for seq, ok, body in await self.store.results(limit):
            value = msgpack.unpackb(body, raw=False)
            out.append(Result(seq, ok, value if ok else None, None if ok else value))
        return tuple(out)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


MAX_ERROR_MESSAGE = 1024
"""Characters of an error result's message kept: a result must stay far below
``Limits.max_item_body``, whatever a handler's exception says."""


def _error(code: str, message: str) -> tuple[bool, bytes]:
    return False, _pack({"code": code, "message": message[:MAX_ERROR_MESSAGE]})


async def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    result = fn(arg)
    if inspect.isawaitable(result):
        result = await result
    return result
