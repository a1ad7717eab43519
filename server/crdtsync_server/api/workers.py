"""``crdtsync serve --workers N``: a supervisor process and N worker processes on one host,
sharing the listening port through ``SO_REUSEPORT`` (the kernel spreads new connections
over the workers' sockets).

- The **supervisor** (:class:`Supervisor`, in the ``crdtsync serve`` process) serves nothing.
  It checks that nothing listens on the port (:func:`check_port_free`: with ``SO_REUSEPORT``
  alone, the workers would silently share a port another server of the same user holds),
  then opens the database once, alone (:func:`~crdtsync_server.core.settle_database`:
  migration, the admin token, interrupted proxied requests), and closes it. Then it
  starts the workers (``multiprocessing``, ``spawn``: a fresh interpreter each, nothing
  inherited from its event loop), waits until each reports that it listens, restarts one
  that dies (after 0.5 s, doubling up to 30 s while it keeps dying within 30 s of its
  start), and gives up (:class:`WorkersFailed`, after stopping the others) when a worker
  fails before it listens: at once at the first start (a taken port, a bad file: a
  configuration error), after :data:`MAX_START_FAILURES` attempts in a row later. On SIGINT
  or SIGTERM it sends SIGTERM to every worker and waits for them (:data:`SHUTDOWN_GRACE`,
  then SIGKILL).
- A **worker** (:func:`run_worker`) is a normal server process (:class:`~.server.Server`
  with ``config.worker`` set): its own socket with ``SO_REUSEPORT``, its own store
  connection, caches and tasks; processes share only the database, as several servers on
  one database always could (docs/architecture.md, Concurrency). It stops on SIGTERM,
  ignores SIGINT (a Ctrl-C reaches the whole process group; its supervisor forwards it),
  and stops too when its supervisor dies, so no worker outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from crdtsync._aio import cancel_and_wait, wait_event
from crdtsync.errors import CrdtsyncError

from ..config import ServerConfig
from ..core import settle_database
from ..logs import configure_logging
from ..validation import redact_dsn
from .server import Server

log = logging.getLogger("crdtsync.supervisor")
worker_log = logging.getLogger("crdtsync.worker")

MAX_START_FAILURES = 5
"""Restarts in a row that may fail before the worker listens; then the supervisor gives up."""
FIRST_DELAY = 0.5
"""Seconds before restarting a worker that died; doubled for each death in a row."""
MAX_DELAY = 30.0
"""The longest wait before a restart."""
STABLE_AFTER = 30.0
"""A worker that ran this long before dying is restarted after :data:`FIRST_DELAY` again."""
SHUTDOWN_GRACE = 90.0
"""Seconds workers have to stop after SIGTERM (a worker closes connections within
aiohttp's 60 s shutdown timeout); then they are killed."""


class WorkersFailed(CrdtsyncError):
    """A worker failed before it listened: at the first start, or
    :data:`MAX_START_FAILURES` times in a row later. The message says which and why."""

    code = "workers_failed"
    status = 0


def workers_problem(config: ServerConfig, workers: int) -> str | None:
    """Why ``config`` cannot run as ``workers`` processes (``None`` if it can)."""
    if workers < 2:
        return None
    if config.db == "memory:":
        return ("--workers needs a database every worker opens: with memory: each process "
                "would have its own; use a file or a postgresql:// URL")
    if config.port == 0:
        return "--workers needs a fixed --port: with 0 each worker would pick another port"
    if not hasattr(socket, "SO_REUSEPORT"):
        return "--workers needs SO_REUSEPORT, which this platform lacks (use Linux)"
    return None


async def check_port_free(host: str, port: int) -> None:
    """Return if ``host:port`` can be bound without ``SO_REUSEPORT``; raise ``OSError``
    (address in use) if any socket holds it, also one of another supervisor's workers
    that the new workers would otherwise silently share it with."""
    loop = asyncio.get_running_loop()
    probe = await loop.create_server(asyncio.Protocol, host, port, reuse_address=True,
                                     start_serving=False)
    probe.close()
    await probe.wait_closed()


def run_worker(config: ServerConfig, log_level: str, ready: Connection,
               log_format: str = "text") -> None:
    """The body of a worker process (a top-level function: ``spawn`` finds it by name).

    Runs :class:`Server` for ``config`` until SIGTERM or the supervisor's death. Sends one
    message on ``ready``: ``None`` once it listens, else why it could not start (a
    ``CrdtsyncError``, ``OSError`` or ``ValueError``, as ``crdtsync serve`` prints it; other
    exceptions propagate with their traceback, and the pipe just closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards Ctrl-C as SIGTERM
    configure_logging(log_level, log_format, worker=config.worker)
    raise SystemExit(asyncio.run(_serve(config, ready)))


async def _serve(config: ServerConfig, ready: Connection) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = multiprocessing.parent_process()
    if parent is not None:  # its sentinel turns readable when the supervisor dies
        loop.add_reader(parent.sentinel, orphaned, loop, parent.sentinel, stop)
    server = Server(config)
    try:
        await server.start()
    except (CrdtsyncError, OSError, ValueError) as exc:
        ready.send(redact_dsn(describe(exc)))
        return 1
    ready.send(None)
    ready.close()
    try:
        await stop.wait()
    finally:
        await server.aclose()
    return 0


def orphaned(loop: asyncio.AbstractEventLoop, sentinel: int, stop: asyncio.Event) -> None:
    """The supervisor died: stop (once; the sentinel stays readable)."""
    loop.remove_reader(sentinel)
    worker_log.warning("the supervisor died: stopping")
    stop.set()


def describe(exc: BaseException) -> str:
    """``exc`` as ``crdtsync`` prints an error: ``code: message`` for the tree's errors."""
    if isinstance(exc, CrdtsyncError):
        return f"{exc.code}: {exc.message}"
    return str(exc)


def exit_text(code: int | None) -> str:
    """How a process ended, from its ``exitcode``: ``exit status 1``, ``killed by SIGKILL``."""
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def stopped_cleanly(code: int | None) -> bool:
    """Whether a worker that was told to stop ended well: exit status 0, or killed by the
    SIGTERM itself, which only happens before it installed its handler (so before it
    served anything); ``None``: no process was running (a restart was pending)."""
    return code in (0, None, -signal.SIGTERM)


def restart_delay(deaths: int) -> float:
    """Seconds before the restart that follows ``deaths`` quick deaths in a row (1, 2, ...)."""
    return min(FIRST_DELAY * 2.0 ** (deaths - 1), MAX_DELAY)


async def readable(fd: int) -> None:
    """Return once ``fd`` is readable (data, end of file, or a process sentinel's exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)


@dataclass(slots=True)
class _Slot:
    """Worker number ``number``: its current process, and how its starts went."""

    number: int
    process: BaseProcess | None = None
    listened: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a process of this slot listened (the first start is over)."""
    deaths: int = 0
    """Quick deaths (or failed restarts) in a row."""
    failed_starts: int = 0
    """Restarts in a row that ended before the worker listened."""
    exit_code: int | None = None
    """How the last process ended (set at shutdown)."""


class Supervisor:
    """Runs ``workers`` worker processes of ``config`` (see the module docstring) until
    ``stop`` is set; ``ValueError`` if :func:`workers_problem` objects. ``log_level`` and
    ``log_format`` are the workers' logging level (``"info"``) and line format
    (:func:`~crdtsync_server.logs.configure_logging`)."""

    def __init__(self, config: ServerConfig, workers: int, *, stop: asyncio.Event,
                 log_level: str = "info", log_format: str = "text") -> None:
        if problem := workers_problem(config, workers):
            raise ValueError(problem)
        self.config = replace(config, on_admin_token=None)  # a worker pickles it
        self._slots = [_Slot(number) for number in range(1, workers + 1)]
        self._stop = stop
        self._halt = asyncio.Event()
        """Set when the workers must stop: ``stop``, or a slot gave up."""
        self._log_level = log_level
        self._log_format = log_format
        self._context = multiprocessing.get_context("spawn")
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    async def run(self, on_settled: Callable[[str | None], None] = lambda token: None,
                  on_listening: Callable[[], None] = lambda: None) -> int:
        """Check that the port is free, settle the database (:func:`settle_database`;
        ``on_settled`` gets the admin token it created, else ``None``), start the workers,
        call ``on_listening`` once every one listens, keep them running until ``stop`` is
        set, then stop them. Returns 0 when every worker exited cleanly, 1 otherwise.
        Raises ``OSError`` if the port is taken (before the database is touched), what
        the store raises if it cannot be opened, and :class:`WorkersFailed` (after
        stopping the other workers) as the module docstring says."""
        await check_port_free(self.config.host, self.config.port)
        on_settled(await settle_database(self.config))
        self._tasks = [asyncio.create_task(self._keep(slot), name=f"worker-{slot.number}")
                       for slot in self._slots]
        try:
            await self._until(self._all_listening())
            if not self._stop.is_set():
                on_listening()
            await self._until(self._stop.wait())
        finally:
            await self._shutdown()
        return 0 if all(stopped_cleanly(slot.exit_code) for slot in self._slots) else 1

    async def _all_listening(self) -> None:
        for slot in self._slots:
            await slot.listened.wait()

    async def _until(self, goal: Awaitable[object]) -> None:
        """Wait for ``goal`` or ``stop``; raise the error of a slot that gave up."""
        waiters = [asyncio.ensure_future(goal), asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait([*waiters, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*waiters)
        for task in self._tasks:
            if task.done():
                task.result()  # a slot returns only once halted: this raises its failure

    async def _keep(self, slot: _Slot) -> None:
        """Run worker ``slot``, restarting it when it dies, until halted; raise
        :class:`WorkersFailed` when it gives up."""
        while not self._halt.is_set():
            process, failure = await self._start(slot)
            started = time.monotonic()
            if failure is None:
                slot.listened.set()
                slot.failed_starts = 0
                log.info("worker %d listening (pid %d)", slot.number, process.pid)
            code = await self._exited(process)
            if self._halt.is_set() or self._stop.is_set():  # stopping: not a death
                slot.exit_code = code
                return
            if failure is None:
                quick = time.monotonic() - started < STABLE_AFTER
                slot.deaths = slot.deaths + 1 if quick else 1
                log.warning("worker %d (pid %d) died (%s)", slot.number, process.pid,
                            exit_text(code))
            else:
                self._failed_start(slot, process, failure or exit_text(code))
            delay = restart_delay(slot.deaths)
            log.warning("restarting worker %d in %.1f s", slot.number, delay)
            await wait_event(self._halt, delay)

    def _failed_start(self, slot: _Slot, process: BaseProcess, why: str) -> None:
        """Count a start that ended before the worker listened; raise :class:`WorkersFailed`
        at the first start or when restarts keep failing."""
        text = f"worker {slot.number} (pid {process.pid}) failed to start: {why}"
        if not slot.listened.is_set():
            raise WorkersFailed(text)
        slot.failed_starts += 1
        slot.deaths += 1
        if slot.failed_starts >= MAX_START_FAILURES:
            raise WorkersFailed(f"{text} ({slot.failed_starts} restarts in a row failed; "
                                "giving up)")
        log.warning("%s", text)

    async def _start(self, slot: _Slot) -> tuple[BaseProcess, str | None]:
        """Start a process for ``slot``; return it with ``None`` once it listens, or with
        why it could not start (``""``: it ended without saying)."""
        reader, writer = self._context.Pipe(duplex=False)
        config = replace(self.config, worker=slot.number)
        process = self._context.Process(target=run_worker, name=f"crdtsync-worker-{slot.number}",
                                        args=(config, self._log_level, writer, self._log_format))
        process.start()
        slot.process = process
        writer.close()  # the child holds the only writer: its exit ends the pipe
        try:
            await readable(reader.fileno())
            try:
                message: str | None = reader.recv()
            except EOFError:
                message = ""
        finally:
            reader.close()
        return process, message

    @staticmethod
    async def _exited(process: BaseProcess) -> int | None:
        """Wait for ``process`` to end; reap it and return its exit code."""
        await readable(process.sentinel)
        process.join()
        return process.exitcode

    async def _shutdown(self) -> None:
        """Halt every slot: SIGTERM to every worker, wait :data:`SHUTDOWN_GRACE` seconds
        for all to exit, SIGKILL what is left, and wait for the slots to return."""
        self._halt.set()
        log.info("stopping the workers")
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()
        _done, late = await asyncio.wait(self._tasks, timeout=SHUTDOWN_GRACE)
        if late:
            log.warning("workers still running after %.0f s: killing them", SHUTDOWN_GRACE)
            for slot in self._slots:
                if slot.process is not None and slot.process.is_alive():
                    slot.process.kill()
            await asyncio.wait(late)
        for task in self._tasks:  # the failure of a slot that gave up was raised by _until
            if not task.cancelled():
                task.exception()
        for slot in self._slots:
            if not stopped_cleanly(slot.exit_code):
                log.warning("worker %d stopped (%s)", slot.number, exit_text(slot.exit_code))
