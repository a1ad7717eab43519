"""The :class:`SettingsStore` contract.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). A test whose
``store`` is annotated with the role needs nothing else of a backend; one annotated
:class:`Store` also needs another role to set up what it checks.
"""

from __future__ import annotations

from crdtsync_server.store import SettingsStore


async def test_settings_roundtrip(store: SettingsStore) -> None:
    assert await store.get_setting("admin_token_hash") is None
    await store.set_setting("admin_token_hash", "abc")
    await store.set_setting("other", "1")
    assert await store.get_setting("admin_token_hash") == "abc"
    await store.set_setting("admin_token_hash", "def")
    assert await store.get_setting("admin_token_hash") == "def"
    assert await store.get_setting("other") == "1"
