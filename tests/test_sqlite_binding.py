"""``bind_blobs_and_nulls_as_is``: ``bytes`` and ``None`` parameters reach SQLite without
CPython's adaptation protocol (issue 17), stored exactly as before, and an adapter the
application registered itself is left in place."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

from crdtsync import _sqlite_worker


def test_blobs_and_nulls_have_an_adapter_once_crdtsync_is_imported() -> None:
    for kind in (bytes, type(None)):
        adapter = sqlite3.adapters.get((kind, sqlite3.PrepareProtocol))
        assert adapter is not None, kind
        value = b"\x00\xff body" if kind is bytes else None
        assert adapter(value) is value


def test_blobs_and_nulls_are_stored_and_read_back_unchanged() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (b BLOB, n TEXT, s TEXT)")
    rows = [(bytes(range(256)), None, "x"), (b"", None, None)]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    assert conn.execute("SELECT b, n, s, typeof(b), typeof(n) FROM t").fetchall() == [
        (bytes(range(256)), None, "x", "blob", "null"),
        (b"", None, None, "blob", "null"),
    ]
    # A subclass of bytes is not the exact type: it keeps CPython's own path.
    class Tagged(bytes):
        pass
    assert conn.execute("SELECT typeof(?)", (Tagged(b"t"),)).fetchone() == ("blob",)


def test_an_adapter_the_application_registered_first_is_kept() -> None:
    script = textwrap.dedent("""
        import sqlite3
        def mine(value):
            return b"mine:" + value
        sqlite3.register_adapter(bytes, mine)
        import crdtsync._sqlite_worker
        conn = sqlite3.connect(":memory:")
        assert conn.execute("SELECT ?", (b"x",)).fetchone() == (b"mine:x",)
        assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)] is not None
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_registering_again_changes_nothing() -> None:
    before = dict(sqlite3.adapters)
    _sqlite_worker.bind_blobs_and_nulls_as_is()
    assert sqlite3.adapters == before
