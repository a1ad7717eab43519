"""Settings in PostgreSQL (the :class:`~crdtsync_server.store.roles.SettingsStore` role):
table ``settings``."""

from __future__ import annotations

import asyncpg

from .connection import PostgresConnection


class PostgresSettings(PostgresConnection):
    """The :class:`SettingsStore` role."""

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        return await self._read(_get_setting, key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        await self._write(_set_setting, key, value)


async def _get_setting(conn: asyncpg.Connection, key: str) -> str | None:
    value = await conn.fetchval("SELECT value FROM settings WHERE key = $1", key)
    return None if value is None else str(value)


async def _set_setting(conn: asyncpg.Connection, key: str, value: str) -> None:
    await conn.execute(
        "INSERT INTO settings (key, value) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, value)
