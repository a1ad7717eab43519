"""Disk helpers the device and the server share: ``fsync`` of a directory after a rename in
it, and writing a large file behind its appends (:func:`write_behind`) so that the
``fsync`` making it durable does not find all of it still to write, and it does not fill
the page cache."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
"""``SYNC_FILE_RANGE_*`` of ``<fcntl.h>``: wait for writeback in progress, start writing the
dirty pages, wait for that writing."""


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range`` from the C library (Python has no binding), or ``None``
    elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_RANGE = _sync_file_range()


def write_behind(descriptor: int, offset: int, length: int) -> None:
    """After ``length`` bytes were appended at ``offset`` of the open file ``descriptor``:
    start writing them to disk now, and wait for the bytes before ``offset`` to be on disk
    (their writing started at the previous call, so it is mostly done) and drop them from
    the page cache (Linux; nothing elsewhere). A file written this way is on disk but for its
    last append when it is ``fsync``-ed (which then waits for little), and it occupies two
    appends of page cache instead of its whole size: the pages dropped are reused by the
    next append, where fresh pages cost several times the copy itself (measured: 100 MB in
    4 MiB appends, 0.06 s instead of 0.3 s, and the ``fsync`` 0 instead of 0.05 s; see
    docs/benchmarks.md, files). Only a hint, errors ignored: durability still comes from
    ``fsync``. It blocks for the disk: call it from a worker thread. (PostgreSQL's
    ``*_flush_after`` settings do the same.)"""
    if _SYNC_RANGE is None or length <= 0:
        return
    _SYNC_RANGE(descriptor, offset, length, _WRITE)
    if offset > 0:
        _SYNC_RANGE(descriptor, 0, offset, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
        with contextlib.suppress(OSError):
            os.posix_fadvise(descriptor, 0, offset, os.POSIX_FADV_DONTNEED)


def size_or_zero(path: str | os.PathLike[str]) -> int:
    """The size of the file ``path``, 0 when there is none."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def unlink_missing_ok(path: str | os.PathLike[str]) -> None:
    """Remove the file ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` the directory ``path``: a rename or a new file in it is durable after (a
    directory cannot be opened on Windows, where NTFS journals its entries itself)."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
