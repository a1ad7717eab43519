"""Credentials: random tokens stored as SHA-256 hashes.

Tokens carry 128 (device) or 256 (admin) bits of randomness, so a fast hash is enough (no
password-style KDF): the database never holds a usable credential, and a leaked hash cannot
be replayed. A device is found by the hash of its token alone (:func:`authenticate_device`),
so a sync is authenticated from its headers, before a byte of its body is read. A rotated,
disabled or deleted credential stops working at the next request, in every server process
sharing the database (the SQLite store answers from the rows it knows only while no other
process writes its file, and forgets them at each change: docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from crdtsync.errors import Forbidden, Unauthorized

from .store import DeviceRecord, DeviceStore, SettingsStore

ADMIN_TOKEN_SETTING = "admin_token_hash"


DEVICE_TOKEN_BYTES = 16
"""Random bytes of a device token: 128 bits (22 URL-safe characters), as much as a UUID and
far beyond guessing through a rate of HTTP requests; a device sends it on every sync."""


def new_token(nbytes: int = 32) -> str:
    """A fresh random token, ``nbytes`` random bytes as URL-safe base64 (default 256 bits,
    43 characters: the admin token)."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """The stored form of a token (hex SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """True when ``token`` hashes to ``stored_hash``; constant time in the hash."""
    return hmac.compare_digest(hash_token(token).encode(), stored_hash.encode())


UNAUTHORIZED_DEVICE = "unknown device or wrong token"
"""The one message of every failed device authentication: ids are not disclosed."""


async def authenticate_device(store: DeviceStore, token: str) -> DeviceRecord:
    """The device this bearer token belongs to; :class:`Unauthorized` when none does,
    :class:`Forbidden` (``detail.disabled``) when it is disabled.

    The lookup is an index search for the token's SHA-256, not a constant-time comparison,
    and that is safe: timing can at best reveal how much of a *hash* an attacker's guess
    shares with a stored one, which tells nothing about a 128-bit random token (finding a
    token whose hash has a chosen prefix is a preimage search, and a shared prefix does not
    bring a guess closer to the token)."""
    device = await store.device_by_token(hash_token(token))
    if device is None:
        raise Unauthorized(UNAUTHORIZED_DEVICE)
    if device.disabled:
        raise Forbidden(f"device {device.id!r} is disabled; its syncs are refused until an "
                        "admin enables it", {"device": device.id, "disabled": True})
    return device


async def admin_token_hash(store: SettingsStore, given: str | None) -> tuple[str, str | None]:
    """Decide the admin credential at start: returns ``(hash, token_to_print)``.

    A token given on the command line or in the environment wins for this run. Otherwise the
    stored hash is used; on first start a token is created, its hash stored, and the token
    returned once so the caller can print it (it cannot be recovered later).
    """
    if given:
        return hash_token(given), None
    stored = await store.get_setting(ADMIN_TOKEN_SETTING)
    if stored:
        return stored, None
    token = new_token()
    await store.set_setting(ADMIN_TOKEN_SETTING, hash_token(token))
    return hash_token(token), token
