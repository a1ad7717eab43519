"""PostgreSQL sinks (need ``crdtsync[postgres]``, i.e. asyncpg).

``postgres``: every feed item as one row of a table keyed by the item's idempotency key, for
hot queries (``INSERT ... ON CONFLICT (key) DO NOTHING``: redelivery never duplicates).

``postgres-projection``: the current state of device documents, one row per device,
document, map and key. Deleted keys stay as tombstone rows (``value`` NULL, ``deleted``
true) and every row remembers the feed cursor that wrote it, so a write only lands when its
cursor is higher than the row's: a redelivered old batch, in any order, never moves a value
back nor resurrects a deleted key. The view ``<table>_current`` hides the tombstones.

Each batch is one SQL statement (``unnest`` of column arrays), hence one transaction and one
round trip. Times are ``BIGINT`` milliseconds since the epoch, exactly as in the feed
(``to_timestamp(time / 1000.0)`` gives a ``timestamptz``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from crdtsync.errors import SinkError, SinkRejected

from ..store.feed import FeedItem, json_text
from .base import SinkConfig, register
from .config import invalid, number_field

__all__ = ["PostgresOptions", "PostgresProjectionSink", "PostgresTableSink", "TableName"]

PERMANENT_SQLSTATE_CLASSES = frozenset({"22", "23", "3F", "42"})
"""Data exceptions, integrity violations, a missing schema, syntax errors / undefined
objects / missing privileges: the same batch would fail again, so it is rejected."""

URL_SCHEMES = ("postgresql", "postgres")
MAX_TIMEOUT_S = 120.0
_IDENT = r"[A-Za-z_][A-Za-z0-9_]{0,47}"
_TABLE_RE = re.compile(rf"(?:({_IDENT})\.)?({_IDENT})\Z")


def _asyncpg() -> ModuleType:
    """asyncpg, imported when first needed (the server runs without it; untyped, hence
    used as a module of ``Any`` attributes)."""
    return importlib.import_module("asyncpg")


@dataclass(frozen=True, slots=True)
class TableName:
    """A validated table name, optionally schema-qualified. Names are at most 48 characters
    so that the derived names (``<table>_current``, ``<table>_device_seq``) fit PostgreSQL's
    63-byte identifiers; they are quoted, hence case-sensitive."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, text: object) -> TableName:
        match = _TABLE_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError("must be [schema.]name, each of letters, digits and '_', not "
                             "starting with a digit, up to 48 characters")
        return cls(match[1], match[2])

    def sql(self, suffix: str = "") -> str:
        """The quoted, schema-qualified name of this table (``suffix`` appended: a view)."""
        name = f'"{self.name}{suffix}"'
        return f'"{self.schema}".{name}' if self.schema else name

    def local(self, suffix: str) -> str:
        """The quoted, unqualified name of an index of this table."""
        return f'"{self.name}{suffix}"'


@dataclass(frozen=True)  # no slots: the defaults stay readable as class attributes
class PostgresOptions:
    """The ``options`` of the PostgreSQL sinks (see :meth:`from_config`)."""

    url: str | None
    """A ``postgresql://`` URL; ``None`` uses the libpq environment (PGHOST, PGUSER...)."""
    table: TableName
    create_table: bool = True
    """Create the table (and its index or view) when missing; when false, a missing table
    rejects the items."""
    timeout: float = 10.0
    """Seconds for connecting and for each statement."""

    @classmethod
    def from_config(cls, config: SinkConfig, default_table: str) -> PostgresOptions:
        """The options of ``config``; :class:`MalformedRequest` naming an invalid one."""
        options, name = config.options, config.name
        url = options.get("url")
        if url is not None and not (isinstance(url, str)
                                    and url.partition("://")[0] in URL_SCHEMES):
            raise invalid(name, "options.url", "must be a postgresql:// URL")
        try:
            table = TableName.parse(options.get("table", default_table))
        except ValueError as error:
            raise invalid(name, "options.table", str(error)) from None
        create = options.get("create_table", True)
        if not isinstance(create, bool):
            raise invalid(name, "options.create_table", "must be true or false")
        return cls(url, table, create, number_field(name, options, "timeout", cls.timeout,
                                                    0.001, MAX_TIMEOUT_S, prefix="options."))


@contextmanager
def postgres_errors(what: str) -> Iterator[None]:
    """Turn database failures while doing ``what`` into :class:`SinkRejected` (see
    :data:`PERMANENT_SQLSTATE_CLASSES`) or :class:`SinkError` (unreachable, timeouts,
    serialization failures, shutdowns, authentication: worth retrying)."""
    asyncpg = _asyncpg()
    try:
        yield
    except SinkError:
        raise
    except asyncpg.PostgresError as error:
        detail = {"sqlstate": error.sqlstate}
        if (error.sqlstate or "")[:2] in PERMANENT_SQLSTATE_CLASSES:
            raise SinkRejected(f"PostgreSQL: {what} refused: {error}", detail) from error
        raise SinkError(f"PostgreSQL: {what} failed: {error}", detail) from error
    except (asyncpg.InterfaceError, OSError) as error:  # OSError covers TimeoutError
        raise SinkError(f"PostgreSQL: {what} failed: {type(error).__name__}: {error}"
                        ) from error


class PostgresSink:
    """What both PostgreSQL sinks share: the connection (reopened after a loss), the table
    creation and one statement per batch. Subclasses give the schema and the rows."""

    default_table: ClassVar[str]
    columns: ClassVar[tuple[tuple[str, str], ...]]
    """``(column, PostgreSQL type)`` of the values each row gives, in order."""

    def __init__(self, config: SinkConfig) -> None:
        if importlib.util.find_spec("asyncpg") is None:
            raise invalid(config.name, "type",
                          f"{config.type} needs asyncpg: pip install 'crdtsync[postgres]'")
        self.name = config.name
        self.options = PostgresOptions.from_config(config, self.default_table)
        self.table = self.options.table
        self._conn: Any = None

    def schema(self) -> list[str]:
        """The statements creating the table and its companions (idempotent)."""
        raise NotImplementedError

    def conflict(self) -> str:
        """The ``ON CONFLICT`` clause of the batch insert."""
        raise NotImplementedError

    def rows(self, items: Sequence[FeedItem]) -> list[tuple[Any, ...]]:
        """The rows (``columns`` order) that deliver ``items``."""
        raise NotImplementedError

    def insert_sql(self) -> str:
        names = ", ".join(name for name, _ in self.columns)
        arrays = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(self.columns, 1))
        return (f"INSERT INTO {self.table.sql()} AS cur ({names}) "
                f"SELECT * FROM unnest({arrays}) {self.conflict()}")

    async def open(self) -> None:
        with postgres_errors("connecting"):
            await self._connection()

    async def deliver(self, items: Sequence[FeedItem]) -> None:
        rows = self.rows(items)
        if not rows:
            return
        with postgres_errors(f"writing {len(rows)} rows into {self.table.sql()}"):
            conn = await self._connection()
            await conn.execute(self.insert_sql(), *map(list, zip(*rows, strict=True)))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with postgres_errors("closing"):
                await conn.close(timeout=self.options.timeout)

    async def _connection(self) -> Any:
        """The open connection, (re)connecting (and checking the schema) when needed."""
        if self._conn is None or self._conn.is_closed():
            conn = await _asyncpg().connect(
                self.options.url, timeout=self.options.timeout,
                command_timeout=self.options.timeout,
                server_settings={"application_name": f"crdtsync-sink-{self.name}"[:63]})
            try:
                await self._prepare(conn)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    async def _prepare(self, conn: Any) -> None:
        """Create the table (serialized between processes by an advisory lock) or check
        that it exists."""
        if not self.options.create_table:
            if await conn.fetchval("SELECT to_regclass($1)", self.table.sql()) is None:
                raise SinkRejected(f"table {self.table.sql()} does not exist and "
                                   "create_table is false")
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"crdtsync-sink:{self.table.sql()}")
            for statement in self.schema():
                await conn.execute(statement)


@register("postgres")
class PostgresTableSink(PostgresSink):
    """Every feed item as one row, unique by its idempotency key."""

    default_table = "crdtsync_events"
    columns = (("key", "text"), ("cursor", "bigint"), ("kind", "text"), ("device", "text"),
               ("fleet", "text"), ("topic", "text"), ("seq", "bigint"), ("doc", "text"),
               ("source", "text"), ("time", "bigint"), ("received", "bigint"),
               ("body", "jsonb"))

    def schema(self) -> list[str]:
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.table.sql()} (
                key TEXT PRIMARY KEY, cursor BIGINT NOT NULL, kind TEXT NOT NULL,
                device TEXT NOT NULL, fleet TEXT, topic TEXT, seq BIGINT, doc TEXT,
                source TEXT, time BIGINT NOT NULL, received BIGINT NOT NULL,
                body JSONB NOT NULL)""",
            f"CREATE INDEX IF NOT EXISTS {self.table.local('_device_seq')} "
            f"ON {self.table.sql()} (device, seq)",
        ]

    def conflict(self) -> str:
        return "ON CONFLICT (key) DO NOTHING"

    def rows(self, items: Sequence[FeedItem]) -> list[tuple[Any, ...]]:
        return [(item.key, item.cursor, item.kind, item.device, item.fleet, item.topic,
                 item.seq, item.doc, item.source, item.time, item.received,
                 json_text(item.body)) for item in items]


@register("postgres-projection")
class PostgresProjectionSink(PostgresSink):
    """The current state of device documents; ignores events."""

    default_table = "crdtsync_state"
    columns = (("device", "text"), ("doc", "text"), ("map", "text"), ("key", "text"),
               ("value", "jsonb"), ("updated", "bigint"), ("cursor", "bigint"))

    def schema(self) -> list[str]:
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.table.sql()} (
                device TEXT NOT NULL, doc TEXT NOT NULL, map TEXT NOT NULL,
                key TEXT NOT NULL, value JSONB,
                deleted BOOLEAN GENERATED ALWAYS AS (value IS NULL) STORED,
                updated BIGINT NOT NULL, cursor BIGINT NOT NULL,
                PRIMARY KEY (device, doc, map, key))""",
            f"""CREATE OR REPLACE VIEW {self.table.sql('_current')} AS
                SELECT device, doc, map, key, value, updated, cursor
                FROM {self.table.sql()} WHERE NOT deleted""",
        ]

    def conflict(self) -> str:
        return ("ON CONFLICT (device, doc, map, key) DO UPDATE SET value = excluded.value, "
                "updated = excluded.updated, cursor = excluded.cursor "
                "WHERE cur.cursor < excluded.cursor")

    def rows(self, items: Sequence[FeedItem]) -> list[tuple[Any, ...]]:
        """One row per changed key, the last change of a key in the batch winning (one
        statement cannot update a row twice)."""
        latest: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        for item in items:
            if item.kind != "state":
                continue
            for name, key, value in _state_writes(item):
                where = (item.device, item.doc or "", name, key)
                latest[where] = (*where, None if value is None else json_text(value),
                                 item.time, item.cursor)
        return list(latest.values())


def _state_writes(item: FeedItem) -> Iterator[tuple[str, str, Any]]:
    """``(map, key, new value or None)`` of a state item; rejects a malformed body."""
    if not isinstance(item.body, Mapping):
        raise SinkRejected(f"state change {item.key} has no {{map: {{key: value}}}} body")
    for name, keys in item.body.items():
        if not isinstance(keys, Mapping):
            raise SinkRejected(f"state change {item.key}: map {name!r} is not an object")
        for key, value in keys.items():
            yield name, key, value
