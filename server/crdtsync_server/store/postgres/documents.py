"""STUB: to be written (see the SQLite module of the same name)."""

from __future__ import annotations

from .connection import PostgresConnection


class PostgresDocuments(PostgresConnection):
    pass
