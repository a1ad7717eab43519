"""The settings of one server process (:class:`ServerConfig`), free of any transport: the
core (``core.py``), the HTTP app (``api/``) and the simulator all read the same object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from crdtsync import hlc
from crdtsync.protocol import DEFAULT_LIMITS, Limits

from .documents import DEFAULT_REBUILD_FACTOR, DEFAULT_REBUILD_SLACK


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
    gc_young: int = 0
    """Python's cyclic garbage collector, tuned once the server listens: the objects alive
    then are frozen (never scanned again) and a young collection runs only once this many
    more container objects are alive than were freed (Python's default: 700). Under load a
    collection ran every dozen syncs, scanning the requests in flight: about a sixth of the
    server's CPU in the throughput benchmark (the memory it walks, more than its
    instructions). 0 leaves the collector as the process set it (the default for an
    embedded server: the process is its host's); ``crdtsync serve`` sets
    ``crdtsync.cli.SERVE_GC_YOUNG``."""
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
    worker: int | None = None
    """This process's number (1..N) among the workers of ``crdtsync serve --workers N``
    (crdtsync_server.api.workers), ``None`` for a lone server. A worker listens with
    ``SO_REUSEPORT`` beside its siblings, names itself in the ``X-Crdtsync-Worker`` header
    of every answer, and leaves what must happen once per start to its supervisor
    (migrating, the admin credential, proxied requests a dead process left ``running``)."""
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
    instance_ttl: float = 30.0
    """Seconds after its last heartbeat (sent every third of it) that a server instance
    counts as gone: the proxied requests it was running are then finished as
    ``interrupted`` by another instance, or by itself after a restart (at once after a
    clean shutdown). Matters when several instances share a database."""
    touch_every: float = 1.0
    """Seconds between batched writes of ``last_sync`` for syncs that changed nothing (a
    crash loses at most this much of that bookkeeping, never data)."""
    header_timeout: float = 10.0
    """Seconds a connection has to deliver a complete request head (from its opening, or
    from the first byte of a later request); then it is closed (crdtsync_server.api.deadlines)."""
    plain_syncs: bool = True
    """Serve a plain ``POST /v1/sync`` (head and body received together, nothing unusual in
    the head) on the connection's own protocol instead of through aiohttp's request
    machinery: the same answer for a fifth less work per reconnect
    (crdtsync_server.api.fastsync). ``False``: aiohttp serves every request."""
    body_timeout: float = 30.0
    """Seconds a client has to deliver a whole request body once the server reads it; then
    ``408 request_timeout`` and the connection is closed. A device on a slow link needs
    ``max_body / rate`` at least (the reference client gives a request 30 s)."""
    wake_hold: float = 50.0
    """Seconds a live channel's request (``GET /v1/wake``) is held at most before it is
    answered ``wake: false``: below the 60 s idle timeout of common proxies and load
    balancers, so the answer itself is the heartbeat."""
    wake_poll: float = 0.25
    """Seconds between reads of the wake log while devices wait, for entries another
    process committed (this process's own are read at once)."""
    wake_rate: float = 500.0
    """Devices per second a wake-up of a whole fleet or of everyone lets sync: each woken
    device is told to wait its slot (``in``) first."""
    max_waiters: int = 100_000
    """Live channels one process holds at most; beyond, ``429 too_many_requests`` with a
    ``Retry-After`` of 5-30 s."""
    wake_retention_ms: int = 3600 * 1000
    """Wake log entries are purged this long after they were written (with the other
    purges); a device whose cursor is older syncs once when it reconnects."""
    files_dir: str | None = None
    """Directory of the file blobs (content-addressed, ``crdtsync_server.blobs``). ``None``:
    ``<db>.files`` next to a SQLite database, the database itself on PostgreSQL (so every
    instance serves the same bytes), memory with a ``memory:`` store."""
    max_file_size: int = 1024 * 1024 * 1024
    """Bytes one file may have at most, either way (``413 file_too_large``)."""
    file_quota: int | None = 4 * 1024 * 1024 * 1024
    """Bytes of files one device may hold in the cloud at most, stored and being uploaded
    together (``413 quota_exceeded``); ``None``: no quota."""
    file_chunk: int = 4 * 1024 * 1024
    """Bytes of the largest upload chunk the server takes (and tells devices to send); a
    larger Content-Length is refused before a byte is read."""
    file_retention_ms: int | None = None
    """Files devices uploaded are deleted this long after they were stored (with the other
    purges); ``None`` keeps them until deleted through the API."""
    upload_retention_ms: int = 7 * 24 * 3600 * 1000
    """An upload not finished this long after it started is dropped with its bytes."""
    clock: Callable[[], int] = hlc.wall_ms
    """The server's wall clock, ms since the epoch: the times syncs record and answer, and
    the stamps that decide which write of a key is the latest (protocol section 13).
    Injectable so tests and simulations move time instead of sleeping."""

    @property
    def instance_stale_ms(self) -> int:
        """:attr:`instance_ttl` in ms."""
        return int(self.instance_ttl * 1000)
