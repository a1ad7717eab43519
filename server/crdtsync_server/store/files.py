"""Records of the :class:`~crdtsync_server.store.roles.FileStore` role, shared by every
backend: which device or fleet holds which file name, and the uploads in progress.

The bytes are not here: they are content-addressed blobs (``crdtsync_server.blobs``), found by
the SHA-256 a record names, so the same bytes are stored once whatever names point at them.
A file record only ever names a blob that is complete and verified; an upload in progress is
its own record (:class:`UploadRecord`) and is invisible to every listing and download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from crdtsync.errors import MalformedRequest
from crdtsync.protocol import FILE_NAME_RE

from .feed import FeedRow, json_text
from .records import wake_device, wake_fleet

UP = "up"
"""A file the device sent to the cloud (``Device.send_file``)."""
DOWN = "down"
"""A file the cloud put for a device or a fleet (``PUT /v1/devices/{id}/files/{name}``)."""
FILE_DIRECTIONS = (UP, DOWN)


SHA256_RE = re.compile(r"[0-9a-f]{64}")
"""A SHA-256 as 64 lowercase hex digits."""


def check_file_name(name: str) -> str:
    """``name`` if it is a valid file name (``crdtsync.protocol.FILE_NAME_RE``), else
    :class:`MalformedRequest`."""
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name):
        raise MalformedRequest(f"{name!r} is not a valid file name (1-128 of A-Z a-z 0-9 . _ -,"
                               " not starting with . or -)", {"name": str(name)[:200]})
    return name


def check_sha256(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex digits, else :class:`MalformedRequest`."""
    if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
        raise MalformedRequest("sha256 must be 64 lowercase hex digits")
    return digest


def device_owner(device: str) -> str:
    """The owner of a device's files: ``d:<device>`` (the wake target's spelling)."""
    return wake_device(device)


def fleet_owner(fleet: str) -> str:
    """The owner of a fleet's files: ``f:<fleet>``."""
    return wake_fleet(fleet)


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A complete, verified file: ``owner`` (``d:<device>`` or ``f:<fleet>``) holds ``name``
    in ``direction`` (:data:`UP` or :data:`DOWN`); its bytes are the blob ``sha256``."""

    owner: str
    direction: str
    name: str
    sha256: str
    size: int
    meta: Any = None
    created: int = 0

    def to_json(self) -> dict[str, Any]:
        kind, _, owner = self.owner.partition(":")
        return {"name": self.name, "direction": self.direction, "size": self.size,
                "sha256": self.sha256, "meta": self.meta, "created": self.created,
                "device" if kind == "d" else "fleet": owner}


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """An upload in progress of ``device``'s file ``name``, declared as ``size`` bytes
    hashing to ``sha256``; its bytes so far are the blob store's part ``id``."""

    id: str
    device: str
    name: str
    sha256: str
    size: int
    meta: Any = None
    created: int = 0


def file_url(record: FileRecord) -> str:
    """Where the management API serves ``record``'s bytes (admin token)."""
    kind, _, owner = record.owner.partition(":")
    base = "devices" if kind == "d" else "fleets"
    path = f"/v1/{base}/{quote(owner, safe='')}/files/{record.name}"
    return path if record.direction == UP else f"{path}?direction=down"


def file_feed_row(record: FileRecord, device: str, fleet: str | None, received: int
                  ) -> FeedRow:
    """The feed row announcing a complete upload (``kind="file"``): its body is ``{"name",
    "size", "sha256", "meta", "url"}``."""
    body = {"name": record.name, "size": record.size, "sha256": record.sha256,
            "meta": record.meta, "url": file_url(record)}
    return ("file", device, fleet, None, None, None, received, received, json_text(body), None)


def quota_used(files: list[tuple[str, int]], uploads: list[tuple[str, str, int]],
               name: str, upload_id: str) -> int:
    """Bytes counted against a device's quota when it starts uploading ``name``: its stored
    files (``(name, size)``) except ``name`` (the new one replaces it), and its uploads in
    progress (``(id, name, size)``) except ``upload_id`` and those of ``name`` (replaced)."""
    return (sum(size for file_name, size in files if file_name != name)
            + sum(size for uid, file_name, size in uploads
                  if uid != upload_id and file_name != name))
