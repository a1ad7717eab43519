"""Settings of the memory store (the :class:`~crdtsync_server.store.roles.SettingsStore`
role)."""

from __future__ import annotations

from .state import MemoryState


class MemorySettings(MemoryState):
    """The :class:`SettingsStore` role over :class:`MemoryState`."""

    async def get_setting(self, key: str) -> str | None:
        """A server setting, or ``None``."""
        self._check_open()
        return self._settings.get(key)

    async def set_setting(self, key: str, value: str) -> None:
        """Create or replace a server setting."""
        self._check_open()
        self._settings[key] = value
