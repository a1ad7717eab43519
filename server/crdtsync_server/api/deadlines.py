"""Deadlines for slow clients: how long the server waits for a request head and for a body.

aiohttp bounds the *size* of a request head (8 KiB lines, 128 headers) but not the time a
client takes to send it, and it waits for a body as long as the client keeps the connection
open; hundreds of clients trickling bytes would each hold a connection, and what they sent,
for ever. Two deadlines bound that:

- **Head** (:class:`HeadDeadline`): a connection must deliver a complete request head within
  ``timeout`` seconds of opening, and each later head within ``timeout`` seconds of its first
  byte, else it is closed without an answer (there is no request to answer yet). An idle
  keep-alive connection, one that sends nothing after an answer, is aiohttp's
  ``keepalive_timeout``'s business, not this one's; one that served only plain syncs
  (``api/fastsync.py``, which aiohttp never saw) is closed by the same timer after
  :data:`KEEPALIVE` seconds. The clock stops when the head is parsed
  and the request reaches the application; it is enforced by wrapping the protocol of each
  connection (:meth:`HeadDeadline.wrap`, used by :class:`GuardedSite`) and noticing requests
  in a middleware (:meth:`HeadDeadline.middleware`), so it holds on every aiohttp version.
  A connection only notes when its head clock started; one timer for all of them checks
  every ``timeout / 4`` seconds, so a late head is cut off between ``timeout`` and
  ``1.25 * timeout``. (A timer per request, armed and cancelled around each one, cost
  about 1-2 % of a sync's CPU.)
- **Body** (:func:`read_within`): once a handler starts reading a body, the whole body must
  arrive within ``timeout`` seconds, else :class:`~crdtsync.errors.RequestTimeout` (408).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from crdtsync.errors import MalformedRequest, RequestTimeout

if TYPE_CHECKING:
    from .fastsync import FastSync

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ProtocolFactory = Callable[[], asyncio.Protocol]

MAX_WAITING = 1 << 20
"""Bytes a connection may buffer while its plain sync is served (pipelined requests); past
it, reading pauses until the answer is written."""
KEEPALIVE = 75.0
"""Seconds an idle kept-alive connection that only served plain syncs stays open (aiohttp's
``keepalive_timeout`` default, which closes its own)."""


async def read_within(request: web.Request, seconds: float) -> bytes:
    """The whole body of ``request``, or :class:`RequestTimeout` (``detail.body_timeout``)
    when it did not arrive within ``seconds``; :class:`MalformedRequest` when the client
    broke it off. aiohttp's ``HTTPRequestEntityTooLarge`` passes through."""
    try:
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            return await request.read()  # (and no timer to arm and cancel on every sync)
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {seconds:g} s",
                             {"body_timeout": seconds}) from exc
    except RequestPayloadError as exc:
        raise MalformedRequest(f"cannot read body: {exc}") from exc


class HeadDeadline:
    """Closes connections whose request head takes more than ``timeout`` seconds.

    ``wrap(factory)`` makes the protocol factory given to ``loop.create_server`` (the
    runner's ``web.Server``) guard each connection; the app must carry :meth:`middleware`
    so the guard learns when a head was complete. Connections accepted by any other
    listener pass through the middleware untouched.
    """

    SWEEPS = 4
    """Checks per ``timeout``: a late head is closed at most ``timeout / SWEEPS`` late."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.fast: FastSync | None = None
        """Serves plain syncs on the guarded connections (``api/fastsync.py``); ``None``:
        aiohttp serves every request."""
        self._guards: dict[asyncio.BaseTransport, _Guard] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        """A protocol factory whose protocols guard ``factory()``'s (made when a request
        needs aiohttp: with :attr:`fast`, not before)."""
        return lambda: _Guard(self, factory)

    async def shutdown(self) -> None:
        """Wait for the plain syncs being served to be answered, then close the connections
        that served only plain syncs (aiohttp closes its own): the app's ``on_shutdown``,
        before the services close."""
        if self.fast is not None:
            await self.fast.drain()
        for guard in list(self._guards.values()):
            guard.close_if_plain()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Stop the connection's head clock while the request is handled."""
        guard = self._guards.get(request.transport) if request.transport else None
        if guard is None:
            return await handler(request)
        guard.handling(True)
        try:
            return await handler(request)
        finally:
            guard.handling(False)

    def _watch(self, transport: asyncio.BaseTransport, guard: _Guard) -> None:
        self._guards[transport] = guard
        if self._sweeper is None:
            self._schedule()

    def _schedule(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(
            self.timeout / self.SWEEPS, self._sweep)

    def _sweep(self) -> None:
        """Close what is late; run again while any connection is open."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for guard in list(self._guards.values()):
            guard.check(now, self.timeout)
        if self._guards:
            self._schedule()


def release(transport: asyncio.BaseTransport) -> None:
    """Let reference counting free a closed connection's transport and socket.

    asyncio's selector transports hold a bound method of themselves (``_read_ready_cb``),
    a reference cycle: once closed, each connection's transport, socket and their
    dictionaries waited for the garbage collector, which found them with their finalizers.
    Under a storm of short connections that was most of what its young collections
    scanned, and they ran about 1.4 times as often. The connection is lost (its reader is
    removed), so the callback is never called again; a no-op stands in for it all the
    same. Other transports (uvloop's, TLS) have no such attribute and are left alone."""
    if hasattr(transport, "_read_ready_cb"):
        transport._read_ready_cb = _closed


def _closed() -> None:
    """The read callback of a transport whose connection is lost (:func:`release`)."""


class _Guard(asyncio.Protocol):
    """One connection: notes when its head clock started, for :meth:`HeadDeadline._sweep`
    to close the transport when a head is not complete in time; hands plain syncs to the
    owner's :class:`~.fastsync.FastSync` and every other request to aiohttp's protocol,
    made (by ``factory``) when the first such request comes and then given every event."""

    def __init__(self, owner: HeadDeadline, factory: ProtocolFactory) -> None:
        self._owner = owner
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._since: float | None = None
        """When the current head's clock started (``None``: no head is awaited)."""
        self._awaiting_head = True
        self.buffer = b""
        """Bytes received and not yet served (while no aiohttp protocol is made)."""
        self._busy = False
        """A plain sync is being served."""
        self._eof = False
        self._paused = False
        self._idle: float | None = None
        """Since when a connection that served only plain syncs waits for a request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's are `asyncio.Transport`s, uvloop's only have its
        # methods (a check of the class failed every connection on uvloop).
        self._transport = cast(asyncio.Transport, transport)
        self._clock = asyncio.get_running_loop().time
        self._since = self._clock()  # the first head's clock starts with the connection
        self._owner._watch(transport, self)
        if self._owner.fast is None:
            self._start_inner()

    def _start_inner(self) -> asyncio.Protocol:
        inner = self._inner = self._factory()
        inner.connection_made(cast(asyncio.Transport, self._transport))
        return inner

    def connection_lost(self, exc: Exception | None) -> None:
        self._since = None
        self.buffer = b""
        transport, self._transport = self._transport, None
        if transport is not None:
            self._owner._guards.pop(transport, None)
            release(transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._since is None:
            self._since = self._clock()  # the first byte of a later head
        if self._inner is not None:
            self._inner.data_received(data)
            return
        self.buffer += data
        self._idle = None
        if not self._busy:
            cast("FastSync", self._owner.fast).received(self)
        elif len(self.buffer) > MAX_WAITING and self._transport is not None:
            self._transport.pause_reading()  # pipelined requests wait for the answer
            self._paused = True

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        self._eof = True
        return True if self._busy else None  # keep the transport open for the answer

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # --- plain syncs (FastSync) -------------------------------------------------------

    def take(self, size: int) -> bytes:
        """The buffer's first ``size`` bytes, a plain sync now being served."""
        raw, self.buffer = self.buffer[:size], self.buffer[size:]
        self._busy = True
        self.handling(True)
        return raw

    def answer(self, data: bytes, close: bool) -> None:
        """Write a plain sync's answer; then serve what came meanwhile, or wait idle."""
        self._busy = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if close or self._eof:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self.handling(False)
        if self.buffer:
            self._since = self._clock()
            cast("FastSync", self._owner.fast).received(self)
        else:
            self._idle = self._clock()

    def delegate(self) -> None:
        """From now on aiohttp serves this connection, starting with the buffer."""
        inner = self._start_inner()
        data, self.buffer = self.buffer, b""
        if data:
            inner.data_received(data)
        if self._eof:
            inner.eof_received()

    def close_if_plain(self) -> None:
        """Close the connection unless aiohttp serves it (shutdown)."""
        if self._inner is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """A plain sync was cancelled (the loop is going down): close without an answer."""
        self._busy = False
        if self._transport is not None:
            self._transport.close()

    # --- deadlines ----------------------------------------------------------------------

    def handling(self, active: bool) -> None:
        """A request reached the application (``True``: its head was complete) or its
        handler returned (``False``: the next bytes start a new head)."""
        self._awaiting_head = not active
        self._since = None

    def check(self, now: float, timeout: float) -> None:
        """Close the connection if its head is ``timeout`` seconds late at ``now``, or if it
        served only plain syncs and has been idle :data:`KEEPALIVE` seconds."""
        if self._idle is not None and now - self._idle >= KEEPALIVE and self._transport:
            self._transport.close()
            return
        if self._since is None or now - self._since < timeout:
            return
        transport = self._transport
        if transport is None or transport.is_closing() or not self._awaiting_head:
            self._since = None
            return
        if transport.get_write_buffer_size():  # an answer is still going out: not idle
            self._since = now
            return
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP listener like ``web.TCPSite`` whose connections are guarded by ``deadline``
    (``port`` 0 picks a free one: see :attr:`port`). With ``reuse_port`` the socket sets
    ``SO_REUSEPORT``, so that sibling processes listen on the same port and the kernel
    spreads new connections over them (crdtsync_server.api.workers)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, backlog: int,
                 deadline: HeadDeadline, reuse_port: bool = False) -> None:
        super().__init__(runner, backlog=backlog)
        server = runner.server
        assert server is not None  # BaseSite checked runner.setup() was called
        self._factory = deadline.wrap(server)
        self._host = host
        self._listen_backlog = backlog
        self._reuse_port = reuse_port
        self.port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        listener = await asyncio.get_running_loop().create_server(
            self._factory, self._host, self.port, backlog=self._listen_backlog,
            reuse_port=self._reuse_port)
        self._server = listener
        if listener.sockets:
            self.port = listener.sockets[0].getsockname()[1]
