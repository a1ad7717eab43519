"""Whether this store object is the only one writing its SQLite file (:class:`Writers`).

The document cache skips its catch-up read of a cached document while the store's
``external_writes`` stands still, and that counter only moves when the store observes
``PRAGMA data_version`` on its own connection. A sync used to observe it on every call,
including its device lookup, which costs a hop to the connection's thread. Now the lookup
reads on the event loop (``SQLiteWorker.read``) whenever no other store object can have
written since the last observation, which this module tells cheaply:

- every store object opens ``<db>-writers`` and holds a shared open-file-description lock
  on it (Linux ``F_OFD_SETLK``: owned by the open file, so two stores in one process count
  as two) for as long as it is open, and appends one byte when it opens;
- :meth:`Writers.alone` converts its lock to an exclusive one without waiting, which works
  only if no other store holds the file (the conversion is atomic), converts it back, and
  also checks that the file did not grow since the last check: a store that opened, wrote
  and closed between two checks left its byte behind.
- Once a check found it alone, the next ones only check the size (one ``fstat``, not two
  more ``fcntl``): another store registers by appending its byte before it writes anything,
  so a file that did not grow has had no other writer since. Under load the full check cost
  about 4 % of the event loop's time.

Where open-file-description locks do not exist, :meth:`Writers.alone` is always false and
every lookup observes, as before.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX)
    fcntl = None  # type: ignore[assignment]

_SUPPORTED = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK")


class Writers:
    """The presence of one store object on the SQLite file ``path`` (see the module)."""

    def __init__(self, path: str) -> None:
        self.path = f"{path}-writers"
        self._fd: int | None = None
        self._size = -1
        self._alone = False
        """What the last check found; while true, a check is one ``fstat``."""

    def open(self) -> None:
        """Register: take the shared lock (waiting out another store's check) and append a
        byte. Without support for the locks, nothing is opened."""
        if not _SUPPORTED or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _lock(fd, fcntl.F_RDLCK, wait=True)
            os.write(fd, b".")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def alone(self) -> bool:
        """True when no other store object has the file open now, and none opened it since
        the previous call; two ``fcntl`` and one ``fstat``, or only the ``fstat`` after a
        true answer. False at the first call: the caller observes once, then knows where it
        stands."""
        if self._fd is None:
            return False
        if self._alone:
            if os.fstat(self._fd).st_size == self._size:
                return True
            self._alone = False  # somebody registered since: the full check
        try:
            _lock(self._fd, fcntl.F_WRLCK)
        except OSError:
            self._size = -1  # whoever is there may write: observe again once alone
            return False
        _lock(self._fd, fcntl.F_RDLCK)
        size = os.fstat(self._fd).st_size
        self._alone, self._size = size == self._size, size
        return self._alone

    def close(self) -> None:
        """Unregister (closing the file drops the lock); idempotent."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _lock(fd: int, kind: int, *, wait: bool = False) -> None:
    """Set an open-file-description lock of ``kind`` on the whole file."""
    request = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for these locks), padding
    fcntl.fcntl(fd, request, struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))
