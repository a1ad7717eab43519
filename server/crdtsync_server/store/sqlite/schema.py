"""The SQLite schema: :data:`MIGRATIONS`, applied in order by
:class:`~crdtsync._sqlite_worker.SQLiteWorker` when the store opens.

``PRAGMA user_version`` is the number of migrations applied. Opening applies the missing
ones, each in its own transaction. A database from a newer crdtsync raises
:class:`StoreError` and is left exactly as it was; it is never moved aside.

Tables by role (``store/roles.py``): documents ``docs``, ``updates`` (with the stamps logged
in them), ``stamps``; devices ``devices``, ``deleted_devices``, ``fleets``; settings
``settings``; downlink ``downlink``, ``requests`` (and ``devices.down_seq``, ``down_done``);
feed ``feed`` (and the ``events`` view), ``projection``; sinks ``sinks``, ``dead_letters``;
wakes ``wakes``; files ``files``, ``uploads``.
"""

from __future__ import annotations

FEED_V4 = """
    CREATE TABLE feed (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        fleet TEXT,
        doc TEXT,
        topic TEXT,
        seq INTEGER,
        time INTEGER NOT NULL,
        received INTEGER NOT NULL,
        body TEXT NOT NULL,
        source TEXT,
        digest BLOB
    );
    INSERT INTO feed (cursor, kind, device, fleet, topic, seq, time, received, body, digest)
        SELECT e.cursor, 'event', e.device, d.fleet, e.topic, e.seq, e.time, e.received,
               e.body, e.digest
        FROM events e LEFT JOIN devices d ON d.id = e.device ORDER BY e.cursor;
    DROP TABLE events;
    CREATE UNIQUE INDEX feed_event_seq ON feed (device, seq) WHERE kind = 'event';
    CREATE INDEX feed_device_cursor ON feed (device, cursor);
    CREATE INDEX feed_topic_cursor ON feed (topic, cursor) WHERE kind = 'event';
    CREATE VIEW events AS
        SELECT cursor, device, seq, topic, time, received, body, digest
        FROM feed WHERE kind = 'event';
    CREATE TABLE projection (
        device TEXT NOT NULL,
        doc TEXT NOT NULL,
        map TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated INTEGER NOT NULL,
        PRIMARY KEY (device, doc, map, key)
    ) WITHOUT ROWID;
    CREATE TABLE sinks (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        options TEXT NOT NULL,
        filter TEXT NOT NULL,
        batch INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        backoff REAL NOT NULL,
        max_backoff REAL NOT NULL,
        origin TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        cursor INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at INTEGER,
        last_delivered_at INTEGER,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        owner TEXT,
        lease_until INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sink TEXT NOT NULL,
        cursor INTEGER NOT NULL,
        key TEXT NOT NULL,
        item TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        retry INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_sink_id ON dead_letters (sink, id);
"""
"""Schema v4: the feed (backfilled with the events already stored), the projection (built
from the documents by the server at its first start on v4), and the downstream sinks with
their dead letters (``store/sqlite/sinks.py``)."""


STAMPS_V6 = """
    CREATE TABLE stamps (
        doc TEXT NOT NULL,
        map TEXT NOT NULL,
        key TEXT NOT NULL,
        stamp INTEGER NOT NULL,
        writer TEXT NOT NULL,
        raw INTEGER NOT NULL,
        PRIMARY KEY (doc, map, key)
    ) WITHOUT ROWID;
"""
"""Schema v6: one row per key of a document, the write that decides it (docs/protocol.md
section 13). Documents written before v6 have no rows: their keys count as never stamped
(the next stamped write of a key wins)."""


WAKES_V7 = """
    CREATE TABLE wakes (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        target TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX wakes_target_cursor ON wakes (target, cursor);
"""
"""Schema v7: the wake log of the live channel (docs/protocol.md section 14a), one row per
commit a device must hear of; ``AUTOINCREMENT`` so a cursor is never reused after a purge
(the head is ``sqlite_sequence``'s)."""


INSTANCES_V8 = """
    ALTER TABLE requests ADD COLUMN runner TEXT;
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        started INTEGER NOT NULL,
        seen INTEGER NOT NULL
    );
"""
"""Schema v8: server instances sharing the database (``crdtsync serve --workers``, or
several hosts on PostgreSQL) with their last heartbeat, and the runner of each running
proxied request, so one instance's running requests are interrupted only once it is gone.
Requests left running by v7 have no runner: they count as a gone instance's."""


FILES_V9 = """
    CREATE TABLE files (
        owner TEXT NOT NULL,
        direction TEXT NOT NULL,
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        meta TEXT NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY (owner, direction, name)
    ) WITHOUT ROWID;
    CREATE INDEX files_sha256 ON files (sha256);
    CREATE INDEX files_direction_created ON files (direction, created);
    CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        meta TEXT NOT NULL,
        created INTEGER NOT NULL
    );
    CREATE INDEX uploads_device_name ON uploads (device, name);
    CREATE INDEX uploads_sha256 ON uploads (sha256);
"""
"""Schema v9: files (``store/files.py``): which device or fleet holds which name, by the
SHA-256 of its bytes (the blobs themselves are outside the database, ``crdtsync_server.blobs``),
and the uploads in progress."""


LOGGED_STAMPS_V10 = """
    ALTER TABLE updates ADD COLUMN stamps BLOB;
    ALTER TABLE stamps ADD COLUMN upto INTEGER NOT NULL DEFAULT 0;
"""
"""Schema v10: the stamps a sync decides are logged in the update row written with them
(``updates.stamps``) instead of one ``stamps`` row each; ``stamps`` keeps the others (written
without an update of their document) and those folded out of update rows that compaction or a
rebuild deletes, each row superseded by a logged stamp of a higher update id than its
``upto`` (``store/sqlite/documents.py``). Rows from before v10 have ``upto`` 0 and no update
row logs a stamp yet, so every stamp reads as it did."""


MIGRATIONS: tuple[str, ...] = (
    # v1
    """
    CREATE TABLE docs (
        key TEXT PRIMARY KEY,
        gen INTEGER NOT NULL DEFAULT 0,
        snapshot BLOB NOT NULL DEFAULT x'',
        snapshot_id INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE updates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        gen INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX updates_key_id ON updates (key, id);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_sync INTEGER,
        last_seq INTEGER NOT NULL DEFAULT 0,
        events_lost INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE events (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        time INTEGER NOT NULL,
        received INTEGER NOT NULL,
        body TEXT NOT NULL,
        digest BLOB NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX events_device_cursor ON events (device, cursor);
    CREATE INDEX events_topic_cursor ON events (topic, cursor);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # v2: downlink (messages and commands to devices) and proxied requests
    """
    ALTER TABLE devices ADD COLUMN down_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN down_done INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE downlink (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER,
        status TEXT NOT NULL DEFAULT 'queued',
        result TEXT,
        error TEXT,
        updated INTEGER NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX downlink_device_status_seq ON downlink (device, status, seq);
    CREATE TABLE requests (
        device TEXT NOT NULL,
        id TEXT NOT NULL,
        route TEXT NOT NULL,
        body TEXT NOT NULL,
        created INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        outcome TEXT,
        updated INTEGER NOT NULL,
        PRIMARY KEY (device, id)
    );
    CREATE INDEX requests_device_status ON requests (device, status);
    """,
    # v3: fleets; a device belongs to at most one
    """
    CREATE TABLE fleets (
        id TEXT PRIMARY KEY,
        created INTEGER NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}'
    );
    ALTER TABLE devices ADD COLUMN fleet TEXT;
    ALTER TABLE devices ADD COLUMN fleet_gen INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX devices_fleet_id ON devices (fleet, id);
    """,
    # v4: the change feed and the state projection
    FEED_V4,
    # v5: credential lifecycle: devices found by token hash, disabled, deleted, re-created
    """
    ALTER TABLE devices ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN seq_floor INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX devices_token_hash ON devices (token_hash, id);
    CREATE TABLE deleted_devices (
        id TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL
    );
    """,
    # v6: per-key stamps, the latest-write-wins decision (issue 13)
    STAMPS_V6,
    # v7: the wake log of the live channel (issue 15)
    WAKES_V7,
    # v8: instances and request runners (issue 16)
    INSTANCES_V8,
    # v9: files and uploads (issue 19)
    FILES_V9,
    # v10: stamps logged with their update row (issue 17)
    LOGGED_STAMPS_V10,
)
"""Schema migrations in order; ``MIGRATIONS[n]`` takes a database from v``n`` to v``n+1``.
Append only: a released script is never edited."""


SCHEMA_VERSION = len(MIGRATIONS)
