"""The aiohttp application of the reference sync server: configuration, lifecycle, errors.

``create_app(config)`` builds the app; its ``cleanup_ctx`` opens the store, settles the admin
credential and builds the services, and closes everything on shutdown. Every error leaves as
a typed frame: msgpack on ``/v1/sync`` (devices), JSON elsewhere (management API), with the
HTTP status of its class (crdtsync.errors).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from crdtsync import crdt, hlc
from crdtsync.aio import cancel_and_wait, spawn
from crdtsync.crdt import rejects_input
from crdtsync.errors import (
    BodyTooLarge,
    CrdtsyncError,
    MalformedRequest,
    NotFound,
    RequestError,
    ServerError,
    UnsupportedEncoding,
)
from crdtsync.protocol import DEFAULT_LIMITS, MEDIA_TYPE, SYNC_PATH, Limits, encode_error

from .auth import admin_token_hash
from .deadlines import HeadDeadline, read_within
from .documents import DEFAULT_REBUILD_FACTOR, DEFAULT_REBUILD_SLACK, DocumentCache
from .feed import FeedNotifier, build_projection
from .notify import DeviceNotifier
from .proxy import ProxyRunner, load_route_table
from .routes import RouteExecutor, RouteTable
from .schemas import FleetSchemas
from .sinks.manager import SinkManager, read_sinks_file
from .store import Store, open_store
from .sync import SyncService
from .template_registry import TemplateRegistry

zstandard: Any
try:  # optional: `pip install crdtsync[zstd]`
    import zstandard
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None

log = logging.getLogger("crdtsync.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class ServerConfig:
    """Settings of one server process. ``db`` is a file path, ``sqlite:///path`` or ``memory:``."""

    db: str = "crdtsync.db"
    host: str = "127.0.0.1"
    port: int = 8787
    admin_token: str | None = None
    max_body: int = 4 * 1024 * 1024
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    cache_docs: int = 10_000
    """Documents kept in memory at most (LRU); a sync of a document not in the cache reloads
    it from the store (about 14 KB each for a 30-key state)."""
    cache_idle: float = 600.0
    """Seconds after which a document nobody used leaves memory: idle devices cost none."""
    backlog: int = 2048
    """TCP listen backlog: aiohttp's default (128) drops connections when a fleet reconnects
    at once, and each drop costs the client a 1 s SYN retry."""
    compact_every: int = 500
    rebuild_factor: float = DEFAULT_REBUILD_FACTOR
    """A device's ``state`` document is rebuilt into its next generation (its history
    dropped) when its encoded size exceeds ``rebuild_factor`` times that of a fresh
    document with the same content plus ``rebuild_slack`` bytes; 0 disables rebuilds. Only
    documents whose device can adopt a new generation (it sends ``a``) are rebuilt."""
    rebuild_slack: int = DEFAULT_REBUILD_SLACK
    """Bytes of history a document may carry beyond ``rebuild_factor`` before a rebuild."""
    on_admin_token: Callable[[str], None] | None = None
    """Called once with a newly created admin token (the CLI prints it)."""
    routes_file: str | None = None
    """JSON file of proxied-request routes (``{"routes": {alias: {...}}}``); its routes
    override routes set through the API with the same alias."""
    sinks_file: str | None = None
    """JSON file of downstream sinks (``{"sinks": {name: {...}}}``, ``${ENV}`` references in
    options); these sinks cannot be changed through the API (docs/downstream.md)."""
    proxy_budget: float = 1.0
    """Seconds a sync waits for the proxied requests it brought (answer in the same round)."""
    proxy_grace: float = 5.0
    """At shutdown, seconds running proxied requests may finish before being interrupted."""
    retention_ms: int = 7 * 24 * 3600 * 1000
    """Finished messages, commands and acknowledged requests are purged this long after
    they finished."""
    purge_every: float = 3600.0
    """Seconds between purges."""
    feed_retention_ms: int | None = None
    """Feed items (and the events among them) are purged this long after they were stored,
    once every sink delivered them; ``None`` keeps the feed for ever (docs/downstream.md)."""
    feed_poll: float = 1.0
    """Seconds between re-reads of the feed by waiting readers (long polls, streams, sinks)
    when nothing in this process woke them: how soon they see another process's items."""
    command_poll: float = 1.0
    """Seconds between re-reads of a command by a ``GET /v1/commands/{id}?wait=`` long
    poll when no commit of this process woke it: how soon it sees a result another
    process on the same database stored."""
    sink_lease_ttl: float = 30.0
    """Seconds a process's lease on a sink lasts unless renewed (every third of it): when
    several processes share the database, how long after one dies another delivers its
    sinks (docs/downstream.md)."""
    touch_every: float = 1.0
    """Seconds between batched writes of ``last_sync`` for syncs that changed nothing (a
    crash loses at most this much of that bookkeeping, never data)."""
    header_timeout: float = 10.0
    """Seconds a connection has to deliver a complete request head (from its opening, or
    from the first byte of a later request); then it is closed (crdtsync_server.deadlines)."""
    body_timeout: float = 30.0
    """Seconds a client has to deliver a whole request body once the server reads it; then
    ``408 request_timeout`` and the connection is closed. A device on a slow link needs
    ``max_body / rate`` at least (the reference client gives a request 30 s)."""
    clock: Callable[[], int] = hlc.wall_ms
    """The server's wall clock, ms since the epoch: the times syncs record and answer, and
    the stamps that decide which write of a key is the latest (protocol section 13).
    Injectable so tests and simulations move time instead of sleeping."""


@dataclass(slots=True)
class Services:
    """What handlers use; built at startup, stored under :data:`SERVICES`."""

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


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
HEADS: web.AppKey[HeadDeadline] = web.AppKey("heads", HeadDeadline)
"""The app's request-head deadline; its runner guards connections with it (runner.py)."""


def create_app(config: ServerConfig, store: Store | None = None) -> web.Application:
    """Build the server app. ``store`` overrides ``config.db`` (tests, simulations)."""
    from .admin_api import routes as admin_routes
    from .downlink_api import routes as downlink_routes
    from .env_api import routes as env_routes
    from .feed_api import routes as feed_routes
    from .fleets_api import routes as fleets_routes
    from .metrics_api import routes as metrics_routes
    from .schemas_api import routes as schemas_routes
    from .sinks_api import routes as sinks_routes
    from .sync_api import routes as sync_routes
    from .templates_api import routes as templates_routes

    heads = HeadDeadline(config.header_timeout)
    app = web.Application(client_max_size=config.max_body,
                          middlewares=[heads.middleware, unread_body_middleware,
                                       error_middleware],
                          handler_args={"auto_decompress": False})
    app[HEADS] = heads
    app.add_routes(sync_routes)
    app.add_routes(admin_routes)
    app.add_routes(downlink_routes)
    app.add_routes(env_routes)
    app.add_routes(templates_routes)
    app.add_routes(schemas_routes)
    app.add_routes(fleets_routes)
    app.add_routes(feed_routes)
    app.add_routes(sinks_routes)
    app.add_routes(metrics_routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        backend = store if store is not None else open_store(config.db)
        await backend.open()
        executor = RouteExecutor()
        proxy: ProxyRunner | None = None
        try:
            admin_hash, created = await admin_token_hash(backend, config.admin_token)
            if created and config.on_admin_token:
                config.on_admin_token(created)
            docs = DocumentCache(backend, crdt.random_client_id(), capacity=config.cache_docs,
                                 compact_every=config.compact_every,
                                 rebuild_factor=config.rebuild_factor,
                                 rebuild_slack=config.rebuild_slack)
            table = await load_route_table(backend, config.routes_file)
            await executor.start()
            proxy = ProxyRunner(backend, table, executor, config.limits, clock=config.clock)
            await proxy.recover()
            notifier = FeedNotifier(config.feed_poll)
            results = DeviceNotifier(config.command_poll)
            sync = SyncService(backend, docs, proxy, proxy_budget=config.proxy_budget,
                               max_items=config.limits.max_items, notifier=notifier,
                               results=results, clock=config.clock,
                               schema_for=FleetSchemas(docs).schema_for)
            built = await build_projection(backend, docs, config.clock())
            if built:
                log.info("built the state projection of %d stored documents", built)
            sinks = SinkManager(backend, notifier, await read_sinks_file(config.sinks_file),
                                lease_ttl=config.sink_lease_ttl)
            app[SERVICES] = Services(config, backend, docs, sync, admin_hash, table, proxy,
                                     TemplateRegistry(backend), notifier, sinks, results)
            loops = [spawn(purge_loop(backend, config), "crdtsync-purge"),
                     spawn(touch_loop(sync, config), "crdtsync-touch"),
                     spawn(idle_loop(docs, config), "crdtsync-idle")]
            try:
                await sinks.start()
                yield
            finally:
                await sinks.aclose()
                await cancel_and_wait(*loops)
                await sync.flush_touches()
        finally:
            if proxy is not None:
                await proxy.aclose(config.proxy_grace)
            await executor.aclose()
            await backend.aclose()

    async def release_feed_readers(app: web.Application) -> None:
        if SERVICES in app:
            app[SERVICES].feed.close()
            app[SERVICES].results.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(release_feed_readers)
    return app


async def touch_loop(sync: SyncService, config: ServerConfig) -> None:
    """Store the ``last_sync`` of no-change syncs every ``touch_every`` seconds."""
    while True:
        await asyncio.sleep(config.touch_every)
        try:
            await sync.flush_touches()
        except CrdtsyncError as exc:
            log.error("recording last sync times failed, will retry: %s", exc.message)


async def idle_loop(docs: DocumentCache, config: ServerConfig) -> None:
    """Evict documents idle for ``cache_idle`` seconds, checking a tenth as often."""
    while True:
        await asyncio.sleep(max(config.cache_idle / 10, 0.01))
        docs.evict_idle(config.cache_idle)


async def purge_loop(store: Store, config: ServerConfig) -> None:
    """Purge finished downlink items and acknowledged requests older than the retention,
    and feed items older than the feed retention (see :func:`purge_feed`), every
    ``purge_every`` seconds; a failure is logged and retried next time."""
    while True:
        now = config.clock()
        try:
            gone = await store.purge_finished(now - config.retention_ms)
            if gone:
                log.info("purged %d finished messages, commands and requests", gone)
            if config.feed_retention_ms is not None:
                gone = await purge_feed(store, now - config.feed_retention_ms)
                if gone:
                    log.info("purged %d feed items", gone)
        except CrdtsyncError as exc:
            log.error("purge failed: %s", exc.message)
        await asyncio.sleep(config.purge_every)


async def purge_feed(store: Store, before: int) -> int:
    """Purge the feed items stored before ``before`` (ms) that every sink has delivered (a
    paused or failing sink holds them back); returns how many went."""
    cursors = [sink.cursor for sink in await store.list_sinks()]
    keep_after = min(cursors) if cursors else await store.feed_head()
    return await store.purge_feed(before, keep_after)


def error_response(request: web.Request, error: CrdtsyncError) -> web.Response:
    """Render ``error`` as a frame in the format the endpoint speaks."""
    if request.path == SYNC_PATH:
        return web.Response(status=error.status, body=encode_error(error),
                            content_type=MEDIA_TYPE, headers={"Server": "crdtsync"})
    return web.Response(status=error.status, text=json.dumps(error_json(error)),
                        content_type="application/json")


def error_json(error: CrdtsyncError) -> dict[str, Any]:
    """The JSON body of an error answer of the management API."""
    return {"error": {"code": error.code, "message": error.message, "detail": error.detail,
                      "retryable": error.retryable}}


_HTTP_CODES: dict[int, type[CrdtsyncError]] = {404: NotFound, 413: BodyTooLarge}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a typed error frame; the server keeps serving."""
    try:
        return await handler(request)
    except CrdtsyncError as exc:
        if exc.status == 0:  # a local error (StoreError, ...): to the client, an internal one
            log.error("%s %s failed: %s: %s", request.method, request.path, exc.code,
                      exc.message)
            return error_response(request, ServerError("internal error; nothing was committed"))
        if exc.status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc.message)
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = _HTTP_CODES.get(exc.status, RequestError)
        error = cls(exc.reason, {"http": exc.status})
        response = error_response(request, error)
        response.set_status(exc.status if exc.status != 400 else error.status)
        return response
    except BaseException as exc:
        # Exception, and a Rust panic from pycrdt (a BaseException): answer, keep serving.
        if not isinstance(exc, Exception) and not rejects_input(exc):
            raise
        log.exception("%s %s: unexpected error", request.method, request.path)
        return error_response(request, ServerError("internal error; nothing was committed"))


@web.middleware
async def unread_body_middleware(request: web.Request, handler: Handler
                                 ) -> web.StreamResponse:
    """Close the connection after answering a request whose body was not read to its end
    (refused before reading: a wrong token, a timeout, an oversized Content-Length). The
    rest of that body is never read into memory: aiohttp only drains and drops it for at
    most its ``lingering_time`` (10 s), so that the client gets the answer, not a reset."""
    response = await handler(request)
    if not request.content.is_eof():
        response.force_close()
    return response


async def read_body(request: web.Request) -> bytes:
    """The request body, decompressed; typed errors for oversize or undecodable bodies.

    Call it only once the client is authenticated: reading is what costs memory. The body
    must arrive within ``body_timeout`` seconds (:class:`RequestTimeout`); a Content-Length
    over ``max_body`` is refused before reading. aiohttp's own decompression is off
    (``auto_decompress=False``): its failures bypass the handler with an untyped answer.
    Here a body is inflated with a hard cap of ``max_body`` bytes (a zip bomb stops at the
    cap), must end exactly at the end of its stream, and an encoding other than identity,
    deflate or gzip is refused with ``unsupported_encoding``.
    """
    config = request.app[SERVICES].config
    limit = config.max_body
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in _DECODERS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not accepted",
                                  {"accepted": accepted_encodings()})
    if (request.content_length or 0) > limit:  # refused before a byte is read
        raise BodyTooLarge(f"body over {limit} bytes", {"max_body": limit})
    try:
        raw = await read_within(request, config.body_timeout)
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"body over {limit} bytes", {"max_body": limit}) from exc
    if encoding == "zstd":
        return unzstd(raw, limit)
    wbits = _DECODERS[encoding]
    return raw if wbits is None else inflate(raw, wbits, limit)


_DECODERS: dict[str, int | None] = {"identity": None, "deflate": zlib.MAX_WBITS,
                                    "gzip": 16 + zlib.MAX_WBITS}
if zstandard is not None:
    _DECODERS["zstd"] = None
_PREFERENCE = ("zstd", "deflate", "gzip", "identity")
"""Request body codings, best first: smallest and fastest to decode first, none last."""


def accepted_encodings() -> list[str]:
    """The Content-Encodings this server takes, best first (``detail.accepted`` of
    ``unsupported_encoding``, so a client can take the first one it speaks)."""
    return [e for e in _PREFERENCE if e in _DECODERS]


ACCEPT_ENCODING = ", ".join(e for e in accepted_encodings() if e != "identity")
BEST_ENCODING = ACCEPT_ENCODING.split(", ")[0]
"""What request bodies may be compressed with; sent as ``Accept-Encoding`` on sync
responses (RFC 7694) so a client can pick the best both sides speak."""


def unzstd(data: bytes, limit: int) -> bytes:
    """Decompress a zstd frame to at most ``limit`` bytes: a frame that claims or produces
    more is refused without being expanded; a truncated or padded one is malformed."""
    assert zstandard is not None
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit or (declared < 0 and _zstd_size_over(data, limit)):
            raise BodyTooLarge(f"decompressed body over {limit} bytes", {"max_body": limit})
        # A frame that declares its size cannot produce more (the decoder checks it).
        decoder = _zstd().decompressobj()
        out = bytes(decoder.decompress(data))
    except zstandard.ZstdError as exc:
        raise MalformedRequest(f"body does not decompress: {exc}") from exc
    if not decoder.eof or decoder.unused_data:
        raise MalformedRequest("compressed body is truncated or has trailing bytes")
    return out

def _zstd_size_over(data: bytes, limit: int) -> bool:
    """For a frame that does not declare its size: expand it up to ``limit + 1`` bytes."""
    with _zstd().stream_reader(io.BytesIO(data), read_across_frames=False,
                               closefd=False) as reader:
        return len(reader.read(limit + 1)) > limit


@functools.cache
def _zstd() -> Any:
    """One decompressor for the process (building one allocates its context); used from
    the event loop thread only."""
    assert zstandard is not None
    return zstandard.ZstdDecompressor()


def inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress ``data`` to at most ``limit`` bytes; typed errors for bombs and garbage."""
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MalformedRequest(f"body does not decompress: {exc}") from exc
    if len(out) > limit:
        raise BodyTooLarge(f"decompressed body over {limit} bytes", {"max_body": limit})
    if not decoder.eof or decoder.unused_data:
        raise MalformedRequest("compressed body is truncated or has trailing bytes")
    return out
