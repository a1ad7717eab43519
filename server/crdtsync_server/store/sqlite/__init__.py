"""The SQLite store: :class:`SQLiteStore`, one part per storage role (see
``store/sqlite/store.py``), and its schema."""

from .schema import MIGRATIONS, SCHEMA_VERSION
from .store import SQLiteStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]
