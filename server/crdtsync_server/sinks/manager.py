"""``SinkManager``: one :class:`~crdtsync_server.sinks.delivery.SinkRunner` task per sink.

At server start the sinks of the sinks file are stored (created, or reconfigured keeping
their cursor) and a runner starts for every stored sink that is not paused. A sink whose
origin is the sinks file but which the file no longer defines is kept (its cursor and dead
letters too) but not run until the file names it again or the API deletes it. The
management API calls :meth:`SinkManager.apply` after each change.

Several server processes may share one database: every process runs a runner per sink, but
only the one holding the sink's lease delivers it (see :mod:`~crdtsync_server.sinks.lease`);
``owner`` identifies this manager's process in those leases. A sink created, changed or
deleted through another process's API reaches this one by :meth:`SinkManager.reconcile`,
which runs every third of the lease time (as do dead letters marked for a retry there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from crdtsync._aio import cancel_and_wait, spawn
from crdtsync.errors import CrdtsyncError, MalformedRequest
from crdtsync.hlc import wall_ms

from ..feed import FeedNotifier
from ..store import DownstreamStore
from ..store.sinks import SinkRecord
from .base import SINK_TYPES, Sink, SinkConfig
from .config import FileSink, SinkSpec, load_sinks_file
from .delivery import SinkRunner
from .lease import LEASE_TTL_S, new_owner_id

log = logging.getLogger("crdtsync.server.sinks")


async def read_sinks_file(path: str | None) -> dict[str, FileSink]:
    """The sinks of the sinks file ``path`` (none without one); see :func:`load_sinks_file`."""
    return await asyncio.to_thread(load_sinks_file, path) if path else {}


async def start_cursor(store: DownstreamStore, spec: SinkSpec) -> int:
    """Where a new sink's cursor starts: 0 (the whole feed) or the current feed head."""
    return 0 if spec.start == "beginning" else await store.feed_head()


class SinkManager:
    """Starts, restarts and stops the runners of the stored sinks."""

    def __init__(self, store: DownstreamStore, notifier: FeedNotifier,
                 file_sinks: Mapping[str, FileSink] | None = None, *,
                 owner: str | None = None, lease_ttl: float = LEASE_TTL_S) -> None:
        self.store = store
        self.owner = owner or new_owner_id()
        self.lease_ttl = lease_ttl
        self.notifier = notifier
        self.file_sinks = dict(file_sinks or {})
        self._runners: dict[str, tuple[SinkRunner, asyncio.Task[None]]] = {}
        self._problems: dict[str, str] = {}
        self._applied: dict[str, tuple[object, ...]] = {}  # what each runner was started from
        self._lock = asyncio.Lock()
        self._reconciler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Store the sinks file's sinks, then start a runner for every runnable sink."""
        for file_sink in self.file_sinks.values():
            spec = file_sink.spec
            await self.store.put_sink(spec.config, wall_ms(), origin="file",
                                      paused=spec.paused,
                                      start=await start_cursor(self.store, spec))
        async with self._lock:
            for record in await self.store.list_sinks():
                self._start(record)
        self._reconciler = spawn(self._reconcile_every(self.lease_ttl / 3),
                                 "crdtsync-sinks-reconcile")

    async def apply(self, name: str) -> None:
        """Sink ``name`` changed in the store (created, reconfigured, paused, deleted):
        stop its runner and start a new one from the stored record if it should run."""
        async with self._lock:
            await self._stop(name)
            record = await self.store.get_sink(name)
            if record is not None:
                self._start(record)

    async def reconcile(self) -> None:
        """Bring the runners in line with the stored sinks, which another process sharing
        the database may have created, changed or deleted through its API, and let every
        runner look for dead letters marked for a retry (perhaps through another process)."""
        async with self._lock:
            records = {record.name: record for record in await self.store.list_sinks()}
            for name in [n for n in self._applied if n not in records]:
                await self._stop(name)
            for name, record in records.items():
                if self._applied.get(name) != _applied_key(record):
                    await self._stop(name)
                    self._start(record)
            for runner, _ in self._runners.values():
                runner.request_retry()

    async def _reconcile_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.reconcile()
            except CrdtsyncError as exc:
                log.warning("reading the sinks failed, will retry: %s", exc.message)

    def retry(self, name: str) -> None:
        """Dead letters of ``name`` were marked for a retry: wake its runner."""
        entry = self._runners.get(name)
        if entry is not None:
            entry[0].request_retry()
            self.notifier.notify()

    @property
    def running(self) -> set[str]:
        """The sinks this process runs a runner for now (delivering or standing by)."""
        return set(self._runners)

    def state(self, record: SinkRecord) -> str:
        """What the sink's runner is doing (see ``SinkRunner.state``), or why none runs:
        ``paused``, ``not in the sinks file``, ``stopped``, or a configuration problem."""
        if record.paused:
            return "paused"
        if record.origin == "file" and record.name not in self.file_sinks:
            return "not in the sinks file"
        entry = self._runners.get(record.name)
        if entry is not None:
            return entry[0].state
        return self._problems.get(record.name, "stopped")

    def _runtime_config(self, record: SinkRecord) -> SinkConfig | None:
        if record.origin != "file":
            return record.config
        file_sink = self.file_sinks.get(record.name)
        return None if file_sink is None else file_sink.config

    def _start(self, record: SinkRecord) -> None:
        config = self._runtime_config(record)
        self._problems.pop(record.name, None)
        self._applied[record.name] = _applied_key(record)
        if record.paused or config is None:
            return
        sink = self._build(record.name, config)
        if sink is None:
            return
        runner = SinkRunner(self.store, self.notifier, config, sink, record.cursor,
                            owner=self.owner, lease_ttl=self.lease_ttl)
        self._runners[record.name] = (runner, spawn(runner.run(), f"crdtsync-sink-{record.name}"))

    def _build(self, name: str, config: SinkConfig) -> Sink | None:
        factory = SINK_TYPES.get(config.type)
        try:
            if factory is None:
                raise MalformedRequest(f"unknown sink type {config.type!r}")
            return factory(config)
        except CrdtsyncError as exc:  # a type this build lacks, options it cannot use
            self._problems[name] = f"cannot start: {exc.message}"
            log.error("sink %r %s", name, self._problems[name])
            return None

    async def _stop(self, name: str) -> None:
        self._applied.pop(name, None)
        entry = self._runners.pop(name, None)
        if entry is not None:
            await cancel_and_wait(entry[1])

    async def aclose(self) -> None:
        """Stop every runner (items being delivered are delivered again at the next start)."""
        if self._reconciler is not None:
            await cancel_and_wait(self._reconciler)
            self._reconciler = None
        async with self._lock:
            for name in list(self._runners):
                await self._stop(name)



def _applied_key(record: SinkRecord) -> tuple[object, ...]:
    """What a runner is started from: a change of any of it means a new runner."""
    return (record.config, record.paused, record.origin)
