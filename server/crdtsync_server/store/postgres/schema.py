"""The PostgreSQL schema: :data:`MIGRATIONS`, applied in order by
:meth:`~.connection.PostgresConnection._migrate` when the store opens (table
``schema_version`` holds the versions applied; a newer database is refused untouched).

The same data as the SQLite schema (``store/sqlite/schema.py``), in PostgreSQL's types:
``BIGINT`` times, ids and counters, ``BYTEA`` updates and digests, ``TEXT`` JSON (kept as
the exact text that was stored, like SQLite), ``BOOLEAN`` flags. Every ``TEXT`` column is
``COLLATE "C"``: ids and keys compare and sort by code point, as in SQLite and in memory,
whatever collation the database was created with (paging by ``id > $1 ORDER BY id`` and
the order of stamps and projection rows are the same on every backend). Ids read by cursor come
from ``BIGSERIAL`` sequences, appended under the sequence lock (``connection.py``). Heads
and floors that a purge must not move back live in ``marks``.

Each role's tables are one constant, so the modules of a role and its tables read together.
"""

from __future__ import annotations

DOCUMENTS = """
    CREATE TABLE docs (
        key TEXT COLLATE "C" PRIMARY KEY,
        gen BIGINT NOT NULL DEFAULT 0,
        snapshot BYTEA NOT NULL DEFAULT '\\x',
        snapshot_id BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE updates (
        id BIGSERIAL PRIMARY KEY,
        key TEXT COLLATE "C" NOT NULL,
        gen BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX updates_key_id ON updates (key, id);
    CREATE TABLE stamps (
        doc TEXT COLLATE "C" NOT NULL,
        map TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        stamp BIGINT NOT NULL,
        writer TEXT COLLATE "C" NOT NULL,
        raw BIGINT NOT NULL,
        PRIMARY KEY (doc, map, key)
    );
"""
"""Documents: generation and snapshot per key, the update log, one stamp per key (stamps
are unsigned 64-bit, stored as the signed ``BIGINT`` with the same bits)."""

DEVICES = """
    CREATE TABLE fleets (
        id TEXT COLLATE "C" PRIMARY KEY,
        created BIGINT NOT NULL,
        meta TEXT COLLATE "C" NOT NULL DEFAULT '{}'
    );
    CREATE TABLE devices (
        id TEXT COLLATE "C" PRIMARY KEY,
        token_hash TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        last_sync BIGINT,
        last_seq BIGINT NOT NULL DEFAULT 0,
        events_lost BIGINT NOT NULL DEFAULT 0,
        meta TEXT COLLATE "C" NOT NULL DEFAULT '{}',
        down_seq BIGINT NOT NULL DEFAULT 0,
        down_done BIGINT NOT NULL DEFAULT 0,
        fleet TEXT COLLATE "C",
        fleet_gen BIGINT NOT NULL DEFAULT 0,
        disabled BOOLEAN NOT NULL DEFAULT FALSE,
        seq_floor BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX devices_fleet_id ON devices (fleet, id);
    CREATE INDEX devices_token_hash ON devices (token_hash, id);
    CREATE TABLE deleted_devices (
        id TEXT COLLATE "C" PRIMARY KEY,
        last_seq BIGINT NOT NULL
    );
"""
"""Devices (with their downlink counters ``down_seq``, ``down_done``) and fleets."""

SETTINGS = """
    CREATE TABLE settings (
        key TEXT COLLATE "C" PRIMARY KEY,
        value TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE marks (
        name TEXT COLLATE "C" PRIMARY KEY,
        value BIGINT NOT NULL
    );
"""
"""Named settings, and ``marks``: counters such as the feed's and the wake log's heads and
floors (``connection.mark``)."""

DOWNLINK = """
    CREATE TABLE downlink (
        id BIGSERIAL PRIMARY KEY,
        device TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        body TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT,
        status TEXT COLLATE "C" NOT NULL DEFAULT 'queued',
        result TEXT COLLATE "C",
        error TEXT COLLATE "C",
        updated BIGINT NOT NULL,
        UNIQUE (device, seq)
    );
    CREATE INDEX downlink_device_status_seq ON downlink (device, status, seq);
    CREATE TABLE requests (
        device TEXT COLLATE "C" NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        route TEXT COLLATE "C" NOT NULL,
        body TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        status TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
        outcome TEXT COLLATE "C",
        updated BIGINT NOT NULL,
        runner TEXT COLLATE "C",
        PRIMARY KEY (device, id)
    );
    CREATE INDEX requests_device_status ON requests (device, status);
    CREATE INDEX requests_running ON requests (runner) WHERE status = 'running';
"""
"""Messages and commands to devices; proxied requests from them (``runner``: the instance
that claimed a running request)."""

FEED = """
    CREATE TABLE feed (
        cursor BIGSERIAL PRIMARY KEY,
        kind TEXT COLLATE "C" NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        fleet TEXT COLLATE "C",
        doc TEXT COLLATE "C",
        topic TEXT COLLATE "C",
        seq BIGINT,
        time BIGINT NOT NULL,
        received BIGINT NOT NULL,
        body TEXT COLLATE "C" NOT NULL,
        source TEXT COLLATE "C",
        digest BYTEA
    );
    CREATE UNIQUE INDEX feed_event_seq ON feed (device, seq) WHERE kind = 'event';
    CREATE INDEX feed_device_cursor ON feed (device, cursor);
    CREATE INDEX feed_topic_cursor ON feed (topic, cursor) WHERE kind = 'event';
    CREATE VIEW events AS
        SELECT cursor, device, seq, topic, time, received, body, digest
        FROM feed WHERE kind = 'event';
    CREATE TABLE projection (
        device TEXT COLLATE "C" NOT NULL,
        doc TEXT COLLATE "C" NOT NULL,
        map TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value TEXT COLLATE "C" NOT NULL,
        updated BIGINT NOT NULL,
        PRIMARY KEY (device, doc, map, key)
    );
"""
"""The change feed (events, state changes, conflicts) and the state projection."""

SINKS = """
    CREATE TABLE sinks (
        name TEXT COLLATE "C" PRIMARY KEY,
        type TEXT COLLATE "C" NOT NULL,
        options TEXT COLLATE "C" NOT NULL,
        filter TEXT COLLATE "C" NOT NULL,
        batch BIGINT NOT NULL,
        max_attempts BIGINT NOT NULL,
        backoff DOUBLE PRECISION NOT NULL,
        max_backoff DOUBLE PRECISION NOT NULL,
        origin TEXT COLLATE "C" NOT NULL,
        paused BOOLEAN NOT NULL DEFAULT FALSE,
        cursor BIGINT NOT NULL DEFAULT 0,
        delivered BIGINT NOT NULL DEFAULT 0,
        failures BIGINT NOT NULL DEFAULT 0,
        consecutive_failures BIGINT NOT NULL DEFAULT 0,
        dead_lettered BIGINT NOT NULL DEFAULT 0,
        last_error TEXT COLLATE "C",
        last_error_at BIGINT,
        last_delivered_at BIGINT,
        created BIGINT NOT NULL,
        updated BIGINT NOT NULL,
        owner TEXT COLLATE "C",
        lease_until BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE dead_letters (
        id BIGSERIAL PRIMARY KEY,
        sink TEXT COLLATE "C" NOT NULL,
        cursor BIGINT NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        item TEXT COLLATE "C" NOT NULL,
        error TEXT COLLATE "C" NOT NULL,
        attempts BIGINT NOT NULL,
        retry BOOLEAN NOT NULL DEFAULT FALSE,
        created BIGINT NOT NULL
    );
    CREATE INDEX dead_letters_sink_id ON dead_letters (sink, id);
"""
"""Downstream sinks (configuration, progress, the delivery lease) and dead letters."""

WAKES = """
    CREATE TABLE wakes (
        cursor BIGSERIAL PRIMARY KEY,
        target TEXT COLLATE "C" NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX wakes_target_cursor ON wakes (target, cursor);
"""
"""The wake log of the live channel (head and floor in ``marks``)."""

INSTANCES = """
    CREATE TABLE instances (
        id TEXT COLLATE "C" PRIMARY KEY,
        started BIGINT NOT NULL,
        seen BIGINT NOT NULL
    );
"""
"""Server instances on this database and when each was last seen alive (heartbeat): a
running proxied request whose runner is gone is finished as ``interrupted``."""

FILES = """
    CREATE TABLE files (
        owner TEXT COLLATE "C" NOT NULL,
        direction TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        sha256 TEXT COLLATE "C" NOT NULL,
        size BIGINT NOT NULL,
        meta TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL,
        PRIMARY KEY (owner, direction, name)
    );
    CREATE INDEX files_sha256 ON files (sha256);
    CREATE INDEX files_direction_created ON files (direction, created);
    CREATE TABLE uploads (
        id TEXT COLLATE "C" PRIMARY KEY,
        device TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        sha256 TEXT COLLATE "C" NOT NULL,
        size BIGINT NOT NULL,
        meta TEXT COLLATE "C" NOT NULL,
        created BIGINT NOT NULL
    );
    CREATE INDEX uploads_device_name ON uploads (device, name);
    CREATE INDEX uploads_sha256 ON uploads (sha256);
    CREATE TABLE blob_chunks (
        sha256 TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (sha256, pos)
    );
    CREATE TABLE part_chunks (
        part TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (part, pos)
    );
"""
"""Files (``store/files.py``) and, so that every instance sharing the database serves the
same bytes, the blobs themselves as ``BYTEA`` chunks (``store/postgres/blobs.py``): complete
blobs by SHA-256 in ``blob_chunks``, uploads in progress in ``part_chunks``
(docs/architecture.md explains why chunks, not large objects)."""

LOGGED_STAMPS = """
    ALTER TABLE updates ADD COLUMN stamps BYTEA;
    ALTER TABLE stamps ADD COLUMN upto BIGINT NOT NULL DEFAULT 0;
"""
"""The stamps a commit decides for a document it also updates are logged in that update's
row (``updates.stamps``); ``stamps`` keeps the others and those moved out of update rows
that compaction or a rebuild deletes, each superseded by a stamp logged in an update row of
its document with a higher id than its ``upto`` (``store/columns.py``; SQLite's v10). Rows
from before have ``upto`` 0 and no update row logs a stamp yet: every stamp reads as it
did."""

MIGRATIONS: tuple[str, ...] = (
    # v1: everything of SQLite schema v7, plus marks, requests.runner and instances
    DOCUMENTS + DEVICES + SETTINGS + DOWNLINK + FEED + SINKS + WAKES + INSTANCES,
    # v2: files, uploads and their blobs (issue 19)
    FILES,
    # v3: stamps logged with their update row (issue 17)
    LOGGED_STAMPS,
)
"""Schema migrations in order; ``MIGRATIONS[n]`` takes a database from v``n`` to v``n+1``.
Append only: a released script is never edited."""

SCHEMA_VERSION = len(MIGRATIONS)
