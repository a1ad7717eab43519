"""Helpers of the file tests: the management API's view of files, through plain HTTP with
the admin token."""

from __future__ import annotations

import io
from typing import Any

import aiohttp

from .conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def feed_files(url: str) -> list[dict[str, Any]]:
    """The ``file`` descriptions of every file item in the feed, in feed order."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/v1/feed?kind=file&limit=1000", headers=ADMIN) as resp:
        return [i["file"] for i in (await resp.json())["items"] if i["kind"] == "file"]


async def cloud_bytes(url: str, path: str) -> bytes:
    """The bytes the management route ``path`` serves (200 expected)."""
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=ADMIN) as resp:
        assert resp.status == 200
        return await resp.read()


async def put_down(url: str, path: str, data: bytes, meta: str | None = None) -> None:
    """Put ``data`` for a device or fleet at ``path`` (201 expected), with ``X-File-Meta``."""
    headers = dict(ADMIN, **({"X-File-Meta": meta} if meta else {}))
    async with aiohttp.ClientSession() as http, http.put(
            url + path, data=io.BytesIO(data), headers=headers) as resp:
        assert resp.status == 201, await resp.text()
