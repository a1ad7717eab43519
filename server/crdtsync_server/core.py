"""The server core: every service of one server process, wired in one place, with no
transport. The aiohttp app (``api/``) and the simulator (``crdtsync.testing``) both build it
with :func:`open_services`; a sync request body in, a sync response body out is
:func:`process_sync`.

Adapters plug in at the edges: the :class:`~.proxied.routes.Executor` that performs proxied
requests (HTTP in the app, in-process in the simulator) and the :class:`~.store.Store`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from crdtsync import crdt
from crdtsync._aio import cancel_and_wait
from crdtsync.errors import Unauthorized
from crdtsync.protocol import decode_request, encode_response

from .auth import UNAUTHORIZED_DEVICE, admin_token_hash, authenticate_device
from .config import ServerConfig
from .documents import DocumentCache
from .feed import FeedNotifier, build_projection
from .files import FileService, open_blobs
from .maintenance import Maintenance
from .notify import DeviceNotifier
from .proxied.dispatch import ProxyRunner, load_route_table
from .proxied.routes import Executor, RouteTable
from .schemas import FleetSchemas
from .sinks.manager import SinkManager, read_sinks_file
from .store import DeviceRecord, Store, open_store
from .sync import SyncService
from .template_registry import TemplateRegistry
from .wake import WakeHub

log = logging.getLogger("crdtsync.server")

SAFETY_POLL = 60.0
"""Seconds between re-reads of waiting readers when the store announces every instance's
commits (``Store.hears_others``): they are woken by those announcements, and this slow
re-read is only a safety net."""


@dataclass(slots=True)
class Services:
    """Every service of one server process; built by :func:`open_services`."""

    config: ServerConfig
    store: Store
    docs: DocumentCache
    sync: SyncService
    admin_hash: str
    routes: RouteTable
    proxy: ProxyRunner
    templates: TemplateRegistry
    feed: FeedNotifier
    sinks: SinkManager
    results: DeviceNotifier
    """Wakes long polls of command results (``GET /v1/commands/{id}?wait=``)."""
    maintenance: Maintenance
    wakes: WakeHub
    """Holds the devices' live channels (``GET /v1/wake``)."""
    files: FileService
    """Files both ways: uploads, the cloud's puts, downloads, retention."""

    def release_waiters(self) -> None:
        """Wake every long poll and stream for good (at shutdown, before the close)."""
        self.feed.close()
        self.results.close()
        self.wakes.release()


@asynccontextmanager
async def open_services(config: ServerConfig, *, executor: Executor,
                        store: Store | None = None, loops: bool = True
                        ) -> AsyncIterator[Services]:
    """Open the store (``store``, else one for ``config.db``), settle the admin credential,
    build every service, recover interrupted proxied requests, build the state projection,
    start the sinks and (with ``loops``) the maintenance tasks; on exit close all of it in
    reverse order. ``loops=False`` leaves the chores to the caller
    (``services.maintenance.run_once()``: the simulator runs them on its virtual time).
    A worker (``config.worker`` set) recovers no proxied requests: its siblings may be
    running them, and its supervisor did it once (:func:`settle_database`)."""
    backend = store if store is not None else open_store(config.db)
    await backend.open()
    proxy: ProxyRunner | None = None
    try:
        await executor.start()
        proxy = ProxyRunner(backend, await load_route_table(backend, config.routes_file),
                            executor, config.limits, clock=config.clock)
        await proxy.recover(config.instance_stale_ms)
        services = await _build(config, backend, proxy)
        async with _running(services, loops):
            yield services
    finally:
        if proxy is not None:
            await proxy.aclose(config.proxy_grace)
        await executor.aclose()
        await backend.aclose()


async def settle_database(config: ServerConfig) -> str | None:
    """Open the store of ``config.db`` once, alone, and close it again: the start-up work
    that must happen exactly once, done by the supervisor of ``crdtsync serve --workers``
    before any worker starts. Opening migrates the schema; then the admin credential is
    settled. (Proxied requests a dead process left ``running`` are each instance's
    business: every worker's recovery finishes those of instances that are gone, see
    ``ProxyRunner.recover``.) Returns a newly created admin token (to print, the only time it can
    be seen), else ``None``. Raises what ``Store.open`` raises (``StoreError``, ...)."""
    store = open_store(config.db)
    await store.open()
    try:
        _hash, created = await admin_token_hash(store, config.admin_token)
        return created
    finally:
        await store.aclose()


async def _build(config: ServerConfig, store: Store, proxy: ProxyRunner) -> Services:
    admin_hash, created = await admin_token_hash(store, config.admin_token)
    if created and config.on_admin_token:
        config.on_admin_token(created)
    docs = DocumentCache(store, crdt.random_client_id(), capacity=config.cache_docs,
                         compact_every=config.compact_every,
                         rebuild_factor=config.rebuild_factor,
                         rebuild_slack=config.rebuild_slack)
    hears = store.hears_others  # PostgreSQL: every instance's commits are announced
    feed = FeedNotifier(SAFETY_POLL if hears else config.feed_poll)
    results = DeviceNotifier(SAFETY_POLL if hears else config.command_poll)
    store.on_feed(feed.notify)
    store.on_results(results.notify)
    sync = SyncService(store, docs, proxy, proxy_budget=config.proxy_budget,
                       max_items=config.limits.max_items, notifier=feed, results=results,
                       clock=config.clock, schema_for=FleetSchemas(docs).schema_for)
    built = await build_projection(store, docs, config.clock())
    if built:
        log.info("built the state projection of %d stored documents", built)
    sinks = SinkManager(store, feed, await read_sinks_file(config.sinks_file),
                        lease_ttl=config.sink_lease_ttl)
    wakes = WakeHub(store, hold=config.wake_hold,
                    poll=SAFETY_POLL if hears else config.wake_poll,
                    rate=config.wake_rate, max_waiters=config.max_waiters)
    files = FileService(config, store, open_blobs(config, store), sync, feed)
    return Services(config, store, docs, sync, admin_hash, proxy.routes, proxy,
                    TemplateRegistry(store), feed, sinks, results,
                    Maintenance(config, store, docs, sync, proxy, files), wakes, files)


@asynccontextmanager
async def _running(services: Services, loops: bool) -> AsyncIterator[None]:
    """Sinks, the live channels' hub and maintenance tasks run while the block runs; at its
    end they stop and the pending ``last_sync`` times are written."""
    tasks: list[asyncio.Task[None]] = services.maintenance.spawn() if loops else []
    try:
        await services.wakes.start()
        await services.sinks.start()
        yield
    finally:
        await services.wakes.aclose()
        await services.sinks.aclose()
        await cancel_and_wait(*tasks)
        await services.sync.flush_touches()
        await services.files.drain()


async def process_sync(services: Services, token: str, body: bytes) -> bytes:
    """Authenticate, decode and run one sync request body; return the encoded response.

    The transport-free core of ``POST /v1/sync`` (the simulator calls it directly). Raises a
    :class:`~crdtsync.errors.CrdtsyncError` with nothing committed.
    """
    return await run_sync(services, await authenticate_device(services.store, token), body)


async def run_sync(services: Services, device: DeviceRecord, body: bytes) -> bytes:
    """Decode and run a sync request body of the authenticated ``device``.

    The envelope's ``dev`` must name that device, else :class:`Unauthorized` with the same
    answer as a wrong token (a token is good for its own device only; ids are not
    disclosed)."""
    sync_request = decode_request(body, services.config.limits)
    if sync_request.device != device.id:
        raise Unauthorized(UNAUTHORIZED_DEVICE)
    sync_request = await services.templates.expand(sync_request, services.config.limits)
    response = await services.sync.sync(device, sync_request)
    return encode_response(response)
