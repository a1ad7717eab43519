"""Settings in SQLite (the :class:`~crdtsync_server.store.roles.SettingsStore` role): table
``settings``."""

from __future__ import annotations

import sqlite3

from .connection import SQLiteConnection


class SQLiteSettings(SQLiteConnection):
    """The :class:`SettingsStore` role."""

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        return await self._run(_get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        await self._run(_set_setting, key, value)


def _get_setting(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
