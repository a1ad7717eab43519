"""The storage interfaces of the sync server, one protocol per role, and :class:`Store`, all
of them together.

Each role owns some tables (SQLite names; another backend keeps the same data its own way)
and is implemented and tested on its own (``tests/test_store_<role>.py``):

- :class:`DocumentStore`: ``docs``, ``updates`` and ``stamps``. Per document a generation, an
  append-only update log keyed by a monotonic id and one snapshot covering every row up to
  ``snapshot_id``; one stamp per key (:class:`KeyStamp`).
- :class:`DeviceStore`: ``devices``, ``deleted_devices`` and ``fleets``. Devices with hashed
  tokens (found by that hash too); fleets, a device belongs to at most one.
- :class:`SettingsStore`: ``settings``, named strings the server keeps (the admin token
  hash, routes, schemas and templates by hash, markers).
- :class:`DownlinkStore`: ``downlink`` and ``requests``, and a device's downlink counters
  (``down_seq``, ``down_done`` of its ``devices`` row): messages and commands to devices,
  proxied requests from them.
- :class:`FeedStore`: ``feed`` (with the ``events`` view) and ``projection``: every stored
  event, document change and conflict in one ordered log, and the current value of every
  key.
- :class:`FileStore`: ``files`` and ``uploads``: which device or fleet holds which file
  name (its SHA-256, size, meta), and the uploads in progress (records in
  ``store/files.py``; the bytes are blobs, ``crdtsync_server.blobs``).
- :class:`SinkStore`: ``sinks`` and ``dead_letters``: downstream consumers of the feed,
  their progress, leases and dead letters. :class:`DownstreamStore` is the feed and the
  sinks together, what a sink runner needs.

Writes stay inside their role, with two exceptions that :class:`Store` itself declares:
:meth:`Store.commit`, the sync transaction (documents, stamps, events, feed, projection,
device bookkeeping, downlink progress and requests, atomically: one sync is one transaction,
never split by role), and :meth:`Store.delete_device`, which deletes a device with
everything of it in every role. Reads of another role's tables inside a role are allowed
(the feed records a device's fleet; the downlink checks its device).

Policy stays above the store: when to compact or rebuild a document
(``crdtsync_server.documents``), what a device may touch (``crdtsync_server.sync``), how long
to keep the feed and finished downlink (``crdtsync_server.app``). The store only offers the
mechanisms. Every backend passes the same contract suites, ``tests/test_store_<role>.py``;
``tests/test_store_roles.py`` checks that each backend class has every member of every role.

All methods are coroutines; a backend may serialise them. Nothing is acknowledged to a
device unless :meth:`Store.commit` returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .feed import Changes, FeedFilter, FeedItem, ProjectionRow
from .files import FileRecord, UploadRecord
from .records import (
    CommitResult,
    DeviceRecord,
    DocLog,
    Downlink,
    FleetRecord,
    KeyStamp,
    ProxyRequest,
    StoredEvent,
    SyncWrite,
    WakeEntry,
)
from .sinks import DeadLetter, SinkConfig, SinkRecord


class DocumentStore(Protocol):
    """Documents: generations, update logs, snapshots and per-key stamps (tables ``docs``,
    ``updates``, ``stamps``). Updates and stamps are written by :meth:`Store.commit` only;
    this role reads them and compacts or rebuilds a document when the server decides to
    (``crdtsync_server.documents`` holds that policy)."""

    @property
    def external_writes(self) -> int | None:
        """A counter that moves whenever the backend notices that another writer (another
        process) committed; ``None`` if it cannot tell. Read it before a read: when it has
        not moved since, nobody else wrote in between (the document cache then skips
        catching up)."""

    async def load_doc(self, key: str, *, stamps: bool = False) -> DocLog:
        """The stored log of ``key``; an empty ``DocLog`` if it was never written. With
        ``stamps``, its ``stamps`` are :meth:`read_stamps` read in the same call, from the
        same committed state as the log (one store round trip where a document is loaded)."""

    async def read_since(self, key: str, after_id: int) -> tuple[tuple[int, bytes], ...] | None:
        """Updates of ``key`` with id > ``after_id`` in id order; ``None`` when rows after
        ``after_id`` were already folded into the snapshot (``after_id < snapshot_id``): the
        caller must reload the document with :meth:`load_doc`. That includes every copy read
        before a :meth:`rebuild` or a :meth:`delete_device` (both leave a ``snapshot_id``
        above every id such a copy can hold), so a copy of an older generation is never
        caught up, only reloaded."""

    async def compact(self, key: str, upto_id: int, snapshot: bytes) -> None:
        """Replace the snapshot of ``key`` by ``snapshot`` (which must reflect every update
        with id <= ``upto_id``) and delete exactly those rows, in one transaction."""

    async def rebuild(self, key: str, gen: int, upto_id: int, snapshot: bytes) -> int | None:
        """Replace document ``key`` by generation ``gen + 1`` whose whole content is
        ``snapshot`` (a full Yjs update of a fresh document with the content of generation
        ``gen`` up to update ``upto_id``), in one transaction, if and only if the stored
        generation is ``gen`` and the stored document reflects no update id above
        ``upto_id`` (nobody appended, compacted past it or rebuilt meanwhile; an unknown
        document is generation 0 with nothing logged). Every update row of ``key`` is
        deleted and the snapshot gets a fresh, never reused update id as ``snapshot_id``, so
        :meth:`read_since` answers ``None`` to every cached copy. Returns that
        ``snapshot_id`` if it happened (the caller may cache generation ``gen + 1`` at it
        without reading it back); ``None`` changes nothing."""

    async def read_stamps(self, key: str) -> list[KeyStamp]:
        """Every stamp row of document ``key`` (:class:`KeyStamp`), ordered by map and key;
        empty if it has none. Rows are written by :meth:`commit` only."""


class DeviceStore(Protocol):
    """Devices and fleets (tables ``devices``, ``deleted_devices``, ``fleets``). A device's
    ``last_seq``, ``events_lost`` and ``last_sync`` move with :meth:`Store.commit`, its
    downlink counters with :class:`DownlinkStore`; it goes with :meth:`Store.delete_device`."""

    async def add_device(self, device: DeviceRecord) -> None:
        """Insert a device; raises ``AlreadyExists`` if the id is taken and ``NotFound`` if
        its ``fleet`` does not exist. When a device with this id was deleted before, the new
        one starts above the seqs the old one used: its ``seq_floor`` and ``last_seq`` are
        raised to the old device's ``last_seq`` (see :attr:`DeviceRecord.seq_floor`)."""

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or ``None`` if it does not exist."""

    async def device_by_token(self, token_hash: str) -> DeviceRecord | None:
        """The device whose ``token_hash`` this is, or ``None``; a database backend answers
        from an index (every sync calls it). Hashes of random tokens do not collide; should
        two devices share one anyway, the one with the lowest id is returned."""

    async def update_device(self, device_id: str, *, token_hash: str | None = None,
                            disabled: bool | None = None) -> DeviceRecord:
        """Replace the device's ``token_hash`` and/or ``disabled`` flag (``None``: keep) in
        one transaction; returns the stored record. The old hash stops matching at once for
        every reader of the store. ``NotFound`` for an unknown device."""

    async def list_devices(self, after: str = "", limit: int = 100) -> list[DeviceRecord]:
        """Devices with id > ``after`` in id order."""

    async def touch_devices(self, last_sync: Mapping[str, int]) -> None:
        """Record ``{device: time}`` as the devices' ``last_sync`` (never moving it back);
        unknown devices are ignored. Syncs that change nothing are recorded this way, in
        batches, instead of each paying a durable commit."""

    async def add_fleet(self, fleet: FleetRecord) -> None:
        """Insert a fleet; raises ``AlreadyExists`` if the id is taken."""

    async def get_fleet(self, fleet_id: str) -> FleetRecord | None:
        """The fleet, or ``None`` if it does not exist."""

    async def list_fleets(self, after: str = "", limit: int = 100) -> list[FleetRecord]:
        """Fleets with id > ``after`` in id order."""

    async def set_device_fleet(self, device_id: str, fleet: str | None, now: int
                               ) -> DeviceRecord:
        """Put the device in ``fleet`` (``None``: in no fleet) and return it as stored.
        ``fleet_gen`` goes up by one only when the fleet actually changes. ``now`` (ms) is
        the time of the change; no backend records it yet. Raises ``NotFound`` for an
        unknown device or fleet, with nothing written."""

    async def devices_in_fleet(self, fleet: str, after: str = "", limit: int = 100
                               ) -> list[DeviceRecord]:
        """Devices of ``fleet`` with id > ``after`` in id order; empty for an unknown
        fleet."""


class SettingsStore(Protocol):
    """Named server settings (table ``settings``): small strings the server keeps under keys
    of its choosing (the admin token hash, the route table, schemas and templates by hash,
    whether the projection was built)."""

    async def get_setting(self, key: str) -> str | None:
        """A server setting (e.g. the admin token hash), or ``None``."""

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""


class DownlinkStore(Protocol):
    """Messages and commands to devices, and proxied requests from them (tables ``downlink``,
    ``requests``; a device's ``down_seq`` and ``down_done``). A device's acknowledgements,
    command results and new requests arrive with :meth:`Store.commit`; this role queues,
    hands out, claims and finishes them. When to purge is the server's decision.

    Several server instances may share one database. Each store object is one instance,
    named by :attr:`instance`: it claims requests as their runner and proves it is alive
    with :meth:`heartbeat`; the requests of an instance that died while running them are
    finished as interrupted by whichever instance calls :meth:`interrupt_running` next, and
    never run twice."""

    instance: str
    """This server instance's id (random per store object unless set): the runner of the
    proxied requests it claims. Changing it makes the object a new instance."""

    async def queue_downlink(self, device: str, kind: str, name: str, body: Any, now: int,
                             expires: int | None) -> Downlink:
        """Append an item to the device's downlink with the next seq; ``NotFound`` if the
        device does not exist."""

    async def get_downlink(self, item_id: int) -> Downlink | None:
        """One item by id, or ``None``."""

    async def list_downlink(self, device: str, kind: str | None = None, after: int = 0,
                            limit: int = 100) -> list[Downlink]:
        """The device's items with seq > ``after`` in seq order, optionally of one kind."""

    async def pending_downlink(self, device: str, now: int, limit: int) -> list[Downlink]:
        """Items to send to the device: seq above its ``down_done``, not expired, in seq
        order. Marks queued items whose ``expires`` passed ``expired`` (not returned) and
        the returned queued items ``delivered`` (commands) in the same transaction."""

    async def claim_request(self, device: str, request_id: str, now: int) -> ProxyRequest | None:
        """Move a ``pending`` request to ``running`` with this :attr:`instance` as its
        runner and return it; ``None`` if it is not pending (already claimed by another
        worker or instance, or finished): at most once, across instances too."""

    async def heartbeat(self, now: int) -> None:
        """Record that this :attr:`instance` is alive at ``now`` (ms). The server calls it
        at start and then several times per its instance time-to-live."""

    async def finish_request(self, device: str, request_id: str, outcome: Mapping[str, Any],
                             now: int) -> None:
        """Store the outcome of a running request (status ``done``)."""

    async def get_request(self, device: str, request_id: str) -> ProxyRequest | None:
        """One request, or ``None``."""

    async def undelivered_outcomes(self, device: str, limit: int) -> list[ProxyRequest]:
        """``done`` requests of the device (outcome not yet acknowledged), oldest first."""

    async def interrupt_running(self, outcome: Mapping[str, Any], now: int,
                                stale_ms: int = 0) -> int:
        """Finish with ``outcome`` (status ``done``, and a wake entry for each device) every
        ``running`` request whose runner is gone: not this :attr:`instance`, and without a
        :meth:`heartbeat` at or after ``now - stale_ms`` (a runner that never sent one, or
        that closed its store, is gone). Such a request is never run again; returns how
        many were finished. Two instances calling it at once finish each request once."""

    async def purge_finished(self, before: int) -> int:
        """Delete downlink items that are finished (``delivered``, ``succeeded``,
        ``failed``, ``expired``) and requests that are ``acked``, last updated before
        ``before`` (ms); returns how many rows went."""


class FeedStore(Protocol):
    """The change feed and the state projection (tables ``feed`` with the ``events`` view,
    ``projection``; records in ``store/feed.py``). Items are appended by
    :meth:`Store.commit` only, in the sync's transaction; this role reads them, purges the
    oldest (when: the server decides) and rebuilds a document's projection."""

    async def read_events(
        self, after: int = 0, limit: int = 100, device: str | None = None,
        topic: str | None = None,
    ) -> list[StoredEvent]:
        """Events with cursor > ``after`` in cursor order, optionally filtered."""

    async def read_feed(self, after: int = 0, limit: int = 100,
                        where: FeedFilter | None = None) -> list[FeedItem]:
        """Feed items with cursor > ``after`` matching ``where``, in cursor order."""

    async def feed_head(self) -> int:
        """The highest cursor the feed ever held (0 when it never held any): a purge does
        not move it back."""

    async def feed_floor(self) -> int:
        """The highest cursor :meth:`purge_feed` deleted (0 when nothing was): every item
        above it is still there, so a reader resuming from a cursor below it missed some."""

    async def purge_feed(self, before: int, keep_after: int) -> int:
        """Delete the oldest feed items: in cursor order, those received before ``before``
        (ms), stopping at the first one received later or with a cursor above
        ``keep_after`` (the lowest cursor of the sinks: what one has not delivered stays).
        The feed is cut as a prefix; the events among the items go too (the events view),
        and so do their digests, so a replay of a purged seq is not compared any more.
        Raises the floor to the last deleted cursor; returns how many items went. May run
        as several transactions."""

    async def read_projection(self, device: str | None = None, after: tuple[str, ...] = (),
                              limit: int = 1000) -> list[ProjectionRow]:
        """Projection rows (optionally of one device) ordered by (device, doc, map, key),
        after the row whose key tuple is ``after``."""

    async def replace_projection(self, device: str, doc: str, rows: Changes, now: int
                                 ) -> None:
        """Make the projection of ``device``'s ``doc`` exactly ``rows`` (``{map: {key:
        value}}``): used to (re)build it from a document, e.g. after an upgrade."""


class SinkStore(Protocol):
    """Downstream sinks (tables ``sinks``, ``dead_letters``; records in ``store/sinks.py``):
    configuration, delivery progress, the delivery lease and dead letters."""

    async def put_sink(self, config: SinkConfig, now: int, *, origin: str = "api",
                       paused: bool = False, start: int = 0) -> SinkRecord:
        """Create sink ``config.name``, or replace its configuration, ``origin`` and
        ``paused`` flag keeping its cursor, counters and dead letters; returns it as stored.
        A new sink's cursor starts at ``start`` (0: the whole feed). ``ValueError`` for an
        origin not in ``SINK_ORIGINS``, ``TypeError`` for options that are not JSON."""

    async def get_sink(self, name: str) -> SinkRecord | None:
        """One sink, or ``None``."""

    async def list_sinks(self) -> list[SinkRecord]:
        """Every sink, in name order."""

    async def delete_sink(self, name: str) -> None:
        """Delete a sink and its dead letters; :class:`NotFound` if there is none."""

    async def acquire_sink_lease(self, name: str, owner: str, now: int, ttl_ms: int) -> bool:
        """Atomically take the sink's delivery lease for ``owner`` until ``now + ttl_ms``
        when nobody holds it, it expired (``lease_until <= now``) or ``owner`` holds it
        already (a renewal); returns whether ``owner`` holds it. ``False`` for an unknown
        sink."""

    async def release_sink_lease(self, name: str, owner: str) -> None:
        """Give up the sink's lease if ``owner`` holds it (anyone may take it at once)."""

    async def sink_delivered(self, name: str, cursor: int, count: int, now: int,
                             owner: str | None = None) -> bool:
        """The destination accepted ``count`` items up to feed cursor ``cursor``: move the
        cursor there (never back) and add ``count`` to ``delivered``; when ``count`` > 0 also
        reset ``consecutive_failures`` and set ``last_delivered_at``. ``count`` 0 only moves
        the cursor (past items the filter skips). With ``owner``, only if ``owner`` holds
        the sink's lease (checked atomically with the update). Returns whether it was
        updated: nothing happens for an unknown sink or another owner's."""

    async def sink_failed(self, name: str, error: str, now: int) -> None:
        """Count one failed delivery attempt and keep ``error`` as the last error."""

    async def add_dead_letters(self, name: str, items: Sequence[FeedItem], error: str,
                               attempts: int, now: int, owner: str | None = None) -> bool:
        """Store ``items`` (non-empty, cursor order) as dead letters of the sink and move its
        cursor past the last one, in one transaction; resets ``consecutive_failures``.
        ``owner`` as for :meth:`sink_delivered`; returns whether anything was stored
        (nothing is for an unknown sink or another owner's)."""

    async def list_dead_letters(self, name: str, after: int = 0, limit: int = 100,
                                retrying: bool | None = None) -> list[DeadLetter]:
        """The sink's dead letters with id > ``after`` in id order, optionally only those
        marked (or not marked) for a retry."""

    async def retry_dead_letters(self, name: str, ids: Sequence[int] | None = None) -> int:
        """Mark the sink's dead letters ``ids`` (``None``: all of them) for a retry; returns
        how many exist. Unknown ids are ignored."""

    async def finish_dead_letters(self, name: str, ids: Sequence[int], now: int,
                                  error: str | None = None, attempts: int = 0) -> None:
        """After retrying dead letters ``ids``: with ``error`` None they were delivered and
        go (counted in ``delivered``); else they stay, unmarked, with ``error`` and
        ``attempts`` more attempts."""


class WakeStore(Protocol):
    """The wake log (table ``wakes``): one entry per commit that a device's live channel
    must hear of (docs/protocol.md section 14a), naming a target (``store/records.py``:
    :func:`~.records.wake_device`, :func:`~.records.wake_fleet`,
    :data:`~.records.WAKE_EVERYONE`). Entries are appended in the transaction of the write
    they announce: by :meth:`Store.commit` (``SyncWrite.wakes``),
    :meth:`DownlinkStore.queue_downlink`, :meth:`DownlinkStore.finish_request`,
    :meth:`DownlinkStore.interrupt_running` (each for the request's device) and
    :meth:`DeviceStore.set_device_fleet` (when the fleet changes), or by :meth:`add_wakes`.
    The log is read by cursor; old entries are purged (when: the server decides)."""

    def on_wakes(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(head)`` on the event loop after each transaction of this store
        object that appended wake entries has committed (``head``: the highest cursor it
        gave out). Another writer's entries (another process) are not announced: readers
        find those with :meth:`wake_head` / :meth:`read_wakes`."""

    async def add_wakes(self, targets: Sequence[str], now: int) -> int:
        """Append one entry per target at time ``now`` (ms) in one transaction; returns the
        head after it."""

    async def wake_head(self) -> int:
        """The highest cursor the log ever held (0: never any); a purge does not lower it."""

    async def read_wakes(self, after: int, limit: int) -> list[WakeEntry]:
        """Entries with cursor > ``after``, in cursor order, at most ``limit``."""

    async def wake_pending(self, targets: Sequence[str], after: int) -> bool:
        """Whether a device woken by ``targets`` has to sync to be sure it holds everything
        up to the head, given that it synced after seeing cursor ``after``: ``True`` if an
        entry above ``after`` names one of ``targets``, if ``after`` is below the floor (a
        purge may have taken such an entry), or if ``after`` is above the head (a cursor
        this database never gave out: it was restored or replaced)."""

    async def purge_wakes(self, before: int) -> int:
        """Delete the entries written before ``before`` (ms), except that the head is never
        lowered; raises the floor to the highest cursor deleted. Returns how many went."""


class FileStore(Protocol):
    """Files and uploads in progress (tables ``files``, ``uploads``; records in
    ``store/files.py``). A file record names a complete, verified blob by its SHA-256; an
    upload is a separate record until :meth:`finish_upload` turns it into a file, in one
    transaction with its ``file`` feed item, so nothing half-stored is ever listed. Which
    blobs may go once no record names them is the server's decision
    (``crdtsync_server.files``)."""

    async def begin_upload(self, upload: UploadRecord, quota: int | None
                           ) -> tuple[UploadRecord, list[str]]:
        """Start (or resume) ``upload.device``'s upload of ``upload.name``: when an upload
        of the same device, name and SHA-256 exists, it is returned unchanged (resume);
        otherwise ``upload`` is stored, replacing the device's other uploads of that name,
        whose ids are returned (their parts are the caller's to drop). With ``quota``, raises
        :class:`QuotaExceeded` (nothing written) when the device's files (except one of this
        name, which the upload replaces) and other uploads in progress plus ``upload.size``
        exceed it. :class:`NotFound` for an unknown device."""

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        """One upload in progress, or ``None``."""

    async def finish_upload(self, upload_id: str, now: int) -> tuple[FileRecord, str | None]:
        """In one transaction: delete the upload, store its file (direction ``up``, owner
        the device, ``created`` = ``now``) replacing one of the same name, and append its
        ``file`` feed item (``store/files.py``: :func:`~.files.file_feed_row`). Returns the
        file and the SHA-256 the replaced file named (``None`` if none). :class:`NotFound`
        when the upload is gone (finished or dropped meanwhile), with nothing written."""

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload in progress; whether it existed."""

    async def put_file(self, record: FileRecord) -> str | None:
        """Store ``record`` (a file the cloud put, direction ``down``), replacing one of the
        same owner, direction and name; returns the SHA-256 the replaced one named."""

    async def get_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """One file, or ``None``."""

    async def list_files(self, owner: str, direction: str | None = None, after: str = "",
                         limit: int = 100) -> list[FileRecord]:
        """The owner's files (of one direction, or both) with name > ``after``, ordered by
        name then direction."""

    async def find_file(self, owners: Sequence[str], direction: str, sha256: str
                        ) -> FileRecord | None:
        """A file of one of ``owners`` in ``direction`` whose blob is ``sha256``, or
        ``None`` (does this device may read that blob)."""

    async def delete_file(self, owner: str, direction: str, name: str) -> FileRecord | None:
        """Delete one file; returns it, or ``None`` if there was none."""

    async def purge_files(self, before: int, uploads_before: int
                          ) -> tuple[list[str], list[str]]:
        """Delete the ``up`` files stored before ``before`` (ms) and the uploads started
        before ``uploads_before``; returns the SHA-256s the deleted files named and the ids
        of the deleted uploads."""

    async def digests_in_use(self, digests: Sequence[str]) -> set[str]:
        """Those of ``digests`` that a file or an upload in progress still names."""


class DownstreamStore(FeedStore, SinkStore, Protocol):
    """The feed and the sinks that deliver it: what a sink runner reads and moves."""


class Store(DocumentStore, DeviceStore, SettingsStore, DownlinkStore, DownstreamStore,
            WakeStore, FileStore, Protocol):
    """What the server needs from a database: every role, the lifecycle, and the two writes
    that span roles. Backends: memory, SQLite (default), PostgreSQL (several server
    instances on one database)."""

    @property
    def hears_others(self) -> bool:
        """Whether this store hears every instance's commits (PostgreSQL: ``LISTEN`` /
        ``NOTIFY``): then :meth:`on_wakes`, :meth:`on_feed` and :meth:`on_results` announce
        other instances' writes too, and the server's waiters need no polling. ``False``
        (memory, SQLite): :meth:`on_feed` and :meth:`on_results` are never called; the
        server wakes its own waiters and re-reads on a timer for other processes."""

    def on_feed(self, callback: Callable[[], None]) -> None:
        """With :attr:`hears_others`: call ``callback()`` on the event loop after any
        instance committed feed items (and when news may have been missed)."""

    def on_results(self, callback: Callable[[str | None], None]) -> None:
        """With :attr:`hears_others`: call ``callback(device)`` after any instance stored
        command results of ``device`` (``None``: news may have been missed, re-read all)."""

    async def open(self) -> None:
        """Connect and migrate the schema. Raises ``StoreError`` for a newer schema."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""

    async def commit(self, write: SyncWrite) -> CommitResult:
        """Append doc updates, store new events (deduplicated by ``(device, seq)``), replace
        the stamp rows of ``write.stamps``, append the changes and conflicts to the feed and
        update the device's bookkeeping, atomically. Raises :class:`SeqGap` / :class:`SeqConflict`
        (see :func:`plan_events`), and :class:`Unavailable` (retryable) when a ``DocWrite``
        names a generation other than its document's stored one (another process rebuilt it
        since the writer read it: :func:`stale_generation`), with nothing written. The first
        write of a document sets its generation."""

    async def delete_device(self, device_id: str, docs: Sequence[str], *,
                            events: bool = False) -> None:
        """Delete the device, its documents ``docs`` (store keys) with their stamp rows, its
        projection rows, its downlink items and proxied requests, in one transaction; with
        ``events`` also every feed item naming it (its events, state changes and conflicts),
        else those stay. Its ``last_seq`` is remembered for a later device with the same id
        (see :meth:`add_device`). A deleted document is left as an empty snapshot whose
        ``snapshot_id`` is a new, never reused update id, so :meth:`read_since` answers
        ``None`` to every reader holding a copy: other processes' caches reload it empty.
        ``NotFound`` for an unknown device, with nothing deleted."""
