"""``FaultProxy``: a TCP proxy on loopback that breaks HTTP exchanges on purpose.

Put it between a real device and a real server (``Device(..., url=proxy.url)``) to test what
the simulation in :mod:`crdtsync.testing.simulation` models: requests lost on the way, the
classic "committed but the response was lost", stalled connections and resets.

The proxy reads one HTTP/1.1 message at a time (bodies framed by ``Content-Length`` or
chunked, as aiohttp sends them; no ``Expect: 100-continue``, no upgrades), so it decides a
fault per *request*, also on keep-alive connections. Per request it applies one mode:

    pass          forward the request and its response unchanged
    cut_request   forward only a prefix of the request, then close both sides
    cut_response  forward the request, let the server answer, forward only a prefix of the
                  response, then close both sides (the server has committed; the client
                  cannot know)
    stall         hold the request for ``stall`` seconds without forwarding it, then close
    reset         close the client's socket with an RST (``SO_LINGER`` 1, 0); for half of
                  these requests (seeded) the server first received and answered the request
    hold_request  forward only a prefix of the request (the server cannot have committed
                  anything of it), then hold the connection until the client or the server
                  closes its side; then close both sides
    hold_response forward the request, read the server's whole answer (it has committed)
                  without forwarding it, then hold as ``hold_request`` does

Independently of the mode, ``cut_every`` (bytes) cuts the stream every that many bytes
forwarded, counted over requests and responses of every connection: the message that
crosses the budget is forwarded up to it, then both sides are closed (counted as
``cut_every`` in :attr:`FaultProxy.stats`). Large transfers (files) see a cut every few
megabytes, wherever in a message it falls.

Either one fixed mode (``proxy.mode = "reset"``) or a seeded random plan of probabilities
per request (``proxy.plan = {"cut_request": 0.1, "stall": 0.05}``; the rest passes). Every
random choice comes from ``random.Random(seed)``, drawn when a request arrives, so a client
that sends its requests one after another sees the same faults on every run.

The hold modes make a fault land at a known point of an exchange, whatever the timing: a
test sets ``proxy.mode = "hold_response"``, awaits :meth:`FaultProxy.wait_held`, and then
kills the server (or the client) while that request is in flight. They are fixed modes
only (a plan cannot draw them: someone must end a held exchange).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CrdtsyncError

log = logging.getLogger("crdtsync.testing.fault_proxy")

FAULT_MODES = ("cut_request", "cut_response", "stall", "reset")
"""The faults a random :attr:`FaultProxy.plan` may draw."""
HOLD_MODES = ("hold_request", "hold_response")
"""Modes that hold an exchange at a known point until one side closes (fixed modes only)."""
MODES = ("pass", *FAULT_MODES, *HOLD_MODES)
"""Every mode the proxy knows."""


class FramingError(CrdtsyncError, ValueError):
    """An HTTP message the proxy cannot delimit (a bad Content-Length or chunk size)."""

    code = "framing"
    status = 0


_DROPPED = (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            FramingError)
"""What ends a proxied connection early: a peer went away or spoke something else."""


# --- HTTP/1.1 framing ---------------------------------------------------------------------


async def read_message(reader: asyncio.StreamReader, *, response: bool) -> bytes | None:
    """Read one HTTP/1.1 message, head and body, and return its raw bytes.

    Returns ``None`` when the stream ends cleanly before the message starts. A response with
    neither ``Content-Length`` nor chunked encoding runs to the end of the stream (responses
    to ``HEAD`` are not recognised). Raises :class:`asyncio.IncompleteReadError` when the
    stream ends mid-message and :class:`FramingError` for a body it cannot delimit.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    headers = _headers(head)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return head + await _read_chunked(reader)
    if "content-length" in headers:
        return head + await reader.readexactly(_content_length(headers["content-length"]))
    if response and not _bodiless(head):
        return head + await reader.read()
    return head


def _headers(head: bytes) -> dict[str, str]:
    """The header fields of a message head, names lower-cased (the last one wins)."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


def _content_length(value: str) -> int:
    if not value.isdigit():
        raise FramingError(f"bad Content-Length {value!r}")
    return int(value)


def _bodiless(head: bytes) -> bool:
    """True for responses that never have a body: 1xx, 204 and 304."""
    parts = head.split(b" ", 2)
    status = parts[1] if len(parts) > 1 else b""
    return status.startswith(b"1") or status in (b"204", b"304")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The raw bytes of a chunked body: chunks, the last chunk and the trailer section."""
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        size = _chunk_size(line)
        if size == 0:
            break
        out += await reader.readexactly(size + 2)
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        if line == b"\r\n":
            return bytes(out)


def _chunk_size(line: bytes) -> int:
    text = line.split(b";", 1)[0].strip()
    try:
        return int(text, 16)
    except ValueError as exc:
        raise FramingError(f"bad chunk size {text!r}") from exc


def _closes(message: bytes) -> bool:
    """True when a message asks to close the connection after it."""
    head = message.split(b"\r\n\r\n", 1)[0]
    return "close" in _headers(head).get("connection", "").lower()


def cut_point(size: int, fraction: float) -> int:
    """Where to cut a message of ``size`` bytes: strictly inside it when it has 2 bytes or
    more (at least one byte forwarded, at least one withheld)."""
    if size < 2:
        return 0
    return min(size - 1, max(1, int(size * fraction)))


# --- the proxy ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What the proxy does with one request: ``mode``, and ``point`` in [0, 1), where a cut
    falls (a fraction of the message) or, for ``reset``, whether the server got the request
    first (``point >= 0.5``)."""

    mode: str
    point: float


def _check_plan(plan: Mapping[str, float]) -> dict[str, float]:
    unknown = set(plan) - {"pass", *FAULT_MODES}
    if unknown:
        raise ValueError(f"modes {sorted(unknown)} cannot be drawn by a plan; it draws "
                         f"{FAULT_MODES}")
    if any(not 0.0 <= p <= 1.0 for p in plan.values()) or sum(plan.values()) > 1.0 + 1e-9:
        raise ValueError("plan probabilities must be in [0, 1] and sum to at most 1")
    return {mode: float(plan[mode]) for mode in MODES if mode in plan}


class FaultProxy:
    """A TCP proxy from ``host:port`` (port 0 picks a free one) to ``target_host:target_port``
    that injects faults into HTTP/1.1 exchanges (see the module docstring for the modes).

    ``async with FaultProxy(server_port, seed=1) as proxy``; point clients at ``proxy.url``.
    ``mode`` and ``plan`` may be changed at any time and apply from the next request.
    ``stats`` counts the requests handled in each mode. Leaving the block closes every
    connection and awaits every task the proxy started. Raises :class:`ValueError` for an
    unknown mode, a plan with a mode other than ``pass`` and the :data:`FAULT_MODES`, or
    probabilities outside [0, 1] or summing above 1. :attr:`held` is how many exchanges are
    stalled or held by a hold mode right now.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", seed: int = 0,
                 mode: str = "pass", plan: Mapping[str, float] | None = None,
                 stall: float = 1.0, host: str = "127.0.0.1", port: int = 0,
                 cut_every: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.cut_every = cut_every
        """Bytes forwarded between two cuts of the stream (``None``: no such cuts)."""
        self._budget = cut_every or 0
        self.host = host
        self.port = port
        self.stall = stall
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._mode = "pass"
        self._plan: dict[str, float] | None = None
        self.mode = mode
        if plan is not None:
            self.plan = plan
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "new"
        self.held = 0
        """Exchanges stalled, or held at the point of a hold mode, right now."""
        self._held_changed = asyncio.Event()

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening side (valid once started)."""
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        """The fixed mode for every request, or ``"random"`` while a :attr:`plan` is set.
        Setting a mode drops the plan."""
        return "random" if self._plan is not None else self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; known: {MODES}")
        self._mode = mode
        self._plan = None

    @property
    def plan(self) -> dict[str, float] | None:
        """Probabilities per mode, drawn per request from the seeded generator; the rest of
        the probability passes. ``None`` when a fixed :attr:`mode` applies."""
        return None if self._plan is None else dict(self._plan)

    @plan.setter
    def plan(self, plan: Mapping[str, float] | None) -> None:
        self._plan = None if plan is None else _check_plan(plan)

    def decide(self) -> Decision:
        """Draw the decision for the next request (both draws happen in every mode, so a
        change of mode does not shift the random sequence of later requests)."""
        point, roll = self._rng.random(), self._rng.random()
        if self._plan is None:
            return Decision(self._mode, point)
        for mode, probability in self._plan.items():
            if roll < probability:
                return Decision(mode, point)
            roll -= probability
        return Decision("pass", point)

    async def wait_held(self, count: int = 1) -> None:
        """Wait until at least ``count`` exchanges are held at their hold point or stalled
        (set such a mode first). Bound it with ``asyncio.timeout()``."""
        while self.held < count:
            self._held_changed.clear()
            await self._held_changed.wait()

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """Count an exchange as held for the duration of the block."""
        self.held += 1
        self._held_changed.set()
        try:
            yield
        finally:
            self.held -= 1

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start listening; :attr:`port` is then the port actually bound."""
        if self._state != "new":
            raise RuntimeError(f"FaultProxy is {self._state}; it starts once")
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._state = "open"

    async def aclose(self) -> None:
        """Stop listening, close every proxied connection and await every task."""
        if self._state != "open":
            self._state = "closed"
            return
        self._state = "closed"
        assert self._server is not None
        self._server.close()
        # Connections accepted while closing register late: loop until none is left.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(self, reader, writer)
        try:
            if self._state == "open":
                await link.run()
        except _DROPPED as exc:
            log.debug("proxy connection dropped: %r", exc)
        finally:
            try:
                # Cancelled by aclose() while closing: closing was all that was left, and
                # the task must still leave the set (else aclose() loops for ever).
                with contextlib.suppress(asyncio.CancelledError):
                    await link.close()
            finally:
                self._tasks.discard(task)


class _Link:
    """One client connection and its upstream connection (opened when first needed)."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.reset = False

    async def run(self) -> None:
        """Serve requests one by one until a fault or either side ends the connection."""
        while (request := await read_message(self.client[0], response=False)) is not None:
            decision = self.proxy.decide()
            self.proxy.stats[decision.mode] += 1
            if not await self._apply(decision, request):
                return

    async def _apply(self, decision: Decision, request: bytes) -> bool:
        """Handle one request; True when the connection carries on."""
        if decision.mode == "pass":
            return await self._pass(request)
        if decision.mode == "cut_request":
            await self._send_upstream(request[:cut_point(len(request), decision.point)])
        elif decision.mode == "cut_response":
            response = await self._exchange(request)
            if response is not None:
                await _send(self.client[1], response[:cut_point(len(response), decision.point)])
        elif decision.mode == "stall":
            with self.proxy._holding():
                await asyncio.sleep(self.proxy.stall)
        elif decision.mode in HOLD_MODES:
            await self._hold(decision, request)
        else:
            if decision.point >= 0.5:
                await self._exchange(request)
            self.reset = True
        return False

    async def _hold(self, decision: Decision, request: bytes) -> None:
        """Forward a prefix of the request (``hold_request``) or the whole request and read
        the whole answer (``hold_response``), then wait until either side closes."""
        if decision.mode == "hold_request":
            upstream = await self._send_upstream(request[:cut_point(len(request),
                                                                    decision.point)])
        else:
            upstream = await self._send_upstream(request)
            if await read_message(upstream, response=True) is None:
                return
        with self.proxy._holding():
            await _first_end(self.client[0], upstream)

    async def _pass(self, request: bytes) -> bool:
        if not await self._within_budget(self._send_upstream, request):
            return False
        assert self.upstream is not None
        response = await read_message(self.upstream[0], response=True)
        if response is None:
            return False
        if not await self._within_budget(functools.partial(_send, self.client[1]), response):
            return False
        return not (_closes(request) or _closes(response))

    async def _within_budget(self, forward: Callable[[bytes], Awaitable[object]],
                             message: bytes) -> bool:
        """Forward ``message``, or only its part within the proxy's ``cut_every`` budget
        (then renew the budget and return False: the caller closes both sides)."""
        proxy = self.proxy
        if proxy.cut_every is None or len(message) < proxy._budget:
            proxy._budget -= len(message)
            await forward(message)
            return True
        await forward(message[:proxy._budget])
        proxy._budget = proxy.cut_every
        proxy.stats["cut_every"] += 1
        return False

    async def _send_upstream(self, data: bytes) -> asyncio.StreamReader:
        if self.upstream is None:
            self.upstream = await asyncio.open_connection(*self.proxy.target)
        await _send(self.upstream[1], data)
        return self.upstream[0]

    async def _exchange(self, request: bytes) -> bytes | None:
        """Forward a whole request; the whole response, or None if upstream closed first."""
        reader = await self._send_upstream(request)
        return await read_message(reader, response=True)

    async def close(self) -> None:
        """Close both sides; with :attr:`reset`, the client side with an RST."""
        writers = [self.client[1]] + ([self.upstream[1]] if self.upstream else [])
        if self.reset:
            _abort_with_rst(self.client[1])
        for writer in writers:
            writer.close()
        for writer in writers:
            # The peer may have reset first; closing is all that is left to do either way.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _first_end(*readers: asyncio.StreamReader) -> None:
    """Return once one of ``readers`` reached its end (bytes read meanwhile are dropped)."""
    waits = [asyncio.create_task(_drain_until_end(r)) for r in readers]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _drain_until_end(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(*_DROPPED):
        while await reader.read(65536):
            pass


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP RST: linger on, timeout 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
