"""``crdtsync._logsync.LogSyncer``: ``fdatasync`` in rounds, in a C thread that never takes the
GIL, and ``SQLiteWorker.durable`` on top of it (``_sqlite_worker._LogSync``).

What must hold: a round starts after its request, so it covers every write made before it;
requests made meanwhile share a round; a failed ``fdatasync`` fails exactly the requests its
round covered (a pipe refuses ``fdatasync`` with ``EINVAL``: a real failure, not a spy);
replacing the file never closes it under a running round; closing finishes the rounds asked
for. Through the store: a commit on the loop returns only once a round that started after it
finished, and a failed round fails its group with a typed error while the retry is a
replay. Where the module was not built these tests skip, except with ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import select
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crdtsync import _accel, _sqlite_worker
from crdtsync.errors import StoreError
from crdtsync_server.store import DeviceRecord, SyncWrite
from crdtsync_server.store.sqlite import SQLiteStore

from .store_backends import evs

LogSyncer = _accel.log_syncer

needs_syncer = pytest.mark.skipif(
    LogSyncer is None and os.environ.get("CI") != "true",
    reason="crdtsync._logsync was not built (no C compiler, or not Linux)")


def test_ci_builds_the_log_syncer() -> None:
    """`pip install -e .` compiles it on Linux with a C compiler (CI's machine)."""
    if LogSyncer is None and os.environ.get("CI") != "true":
        pytest.skip("crdtsync._logsync was not built")
    assert LogSyncer is not None


def wait_rounds(syncer: Any, upto: int) -> tuple[int, int, int, int, int]:
    """Block until the syncer reports ``upto`` rounds finished (its eventfd), then collect."""
    for _ in range(500):
        select.select([syncer.fileno()], [], [], 0.1)
        counts: tuple[int, int, int, int, int] = syncer.collect()
        if counts[0] >= upto:
            return counts
    raise AssertionError(f"round {upto} never finished: {syncer.collect()}")


def open_file(tmp_path: Path) -> int:
    return os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)


@needs_syncer
def test_rounds_finish_and_a_failed_one_reports_what_it_covered(tmp_path: Path) -> None:
    assert LogSyncer is not None
    fd = open_file(tmp_path)
    syncer = LogSyncer(fd)
    try:
        assert syncer.fd == fd
        assert [syncer.request() for _ in range(3)] == [1, 2, 3]
        assert wait_rounds(syncer, 3) == (3, 0, 0, 0, 0)
        read_end, write_end = os.pipe()
        os.close(write_end)
        syncer.set_fd(read_end)  # fdatasync on a pipe: EINVAL; the file is closed
        assert syncer.request() == 4
        assert wait_rounds(syncer, 4) == (4, 1, 3, 4, errno.EINVAL)
        syncer.set_fd(open_file(tmp_path))
        assert syncer.request() == 5
        finished, failures, *_ = wait_rounds(syncer, 5)
        assert (finished, failures) == (5, 1)  # the failure stays the one of round 4
    finally:
        syncer.close()
    assert syncer.fd == -1
    with pytest.raises(ValueError, match="closed"):
        syncer.request()
    syncer.close()  # idempotent


@needs_syncer
def test_close_finishes_the_rounds_asked_for_and_closes_the_file(tmp_path: Path) -> None:
    assert LogSyncer is not None
    fd = open_file(tmp_path)
    syncer = LogSyncer(fd)
    rounds = [syncer.request() for _ in range(50)]
    syncer.close()
    assert syncer.collect()[0] == rounds[-1] == 50
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the syncer


@needs_syncer
def test_many_syncers_leak_no_descriptor(tmp_path: Path) -> None:
    assert LogSyncer is not None
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        syncer = LogSyncer(os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT))
        syncer.request()
        syncer.set_fd(os.open(tmp_path / "f", os.O_RDWR))  # replaced while a round may run
        syncer.close()
        del syncer
    assert len(os.listdir("/proc/self/fd")) == before


class Recorder:
    """A real ``LogSyncer`` (its C thread, its fdatasync) with its calls recorded, and
    ``fail_next`` rounds synced on a pipe instead of the log (``EINVAL``)."""

    made: list[Recorder] = []

    def __init__(self, fd: int) -> None:
        assert LogSyncer is not None
        self.real = LogSyncer(fd)
        self.steps: list[str] = []
        self.fail_next = 0
        self.log: int | None = None
        Recorder.made.append(self)

    @property
    def fd(self) -> int:
        return int(self.real.fd)

    def request(self) -> int:
        if self.fail_next and self.log is None:
            self.fail_next -= 1
            self.log = os.open(f"/proc/self/fd/{self.real.fd}", os.O_RDWR)
            read_end, write_end = os.pipe()
            os.close(write_end)
            self.real.set_fd(read_end)  # until a round on it finished (collect)
        ticket = int(self.real.request())
        self.steps.append(f"request {ticket}")
        return ticket

    def collect(self) -> tuple[int, int, int, int, int]:
        counts: tuple[int, int, int, int, int] = self.real.collect()
        self.steps.append(f"finished {counts[0]}")
        if self.log is not None and counts[1]:  # the round on the pipe failed
            self.real.set_fd(self.log)  # the next rounds sync the log again
            self.log = None
        return counts

    def set_fd(self, fd: int) -> None:
        self.real.set_fd(fd)

    def fileno(self) -> int:
        return int(self.real.fileno())

    def close(self) -> None:
        self.real.close()


def _write(seq: int) -> SyncWrite:
    return SyncWrite("d", time=1000 + seq, events=evs(seq, seq))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Recorder]:
    """The syncers the stores make from now on (each a :class:`Recorder`)."""
    Recorder.made = []
    monkeypatch.setattr(_accel, "log_syncer", Recorder)
    return Recorder.made


@contextlib.asynccontextmanager
async def store_of_one_device(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.add_device(DeviceRecord("d", "h", created=1))
        yield store


@needs_syncer
async def test_a_commit_returns_after_a_round_that_started_after_it(
        tmp_path: Path, recorded: list[Recorder]) -> None:
    async with store_of_one_device(tmp_path) as store:
        for seq in (1, 2):
            await store.commit(_write(seq))
            recorded[0].steps.append("returned")
        await asyncio.gather(*(store.commit(_write(seq)) for seq in range(3, 8)))
        assert [e.seq for e in await store.read_events()] == list(range(1, 8))
    [recorder] = recorded
    segments = " ".join(recorder.steps).split("returned")
    assert len(segments) == 3, recorder.steps
    for segment in segments[:2]:  # before each return: a request, then its round finished
        words = segment.split()
        asked = [int(n) for step, n in itertools.pairwise(words) if step == "request"]
        done = [int(n) for step, n in itertools.pairwise(words) if step == "finished"]
        assert asked and done and max(done) >= asked[-1], recorder.steps


@needs_syncer
async def test_a_failed_round_fails_its_group_and_the_retry_is_a_replay(
        tmp_path: Path, recorded: list[Recorder]) -> None:
    async with store_of_one_device(tmp_path) as store:
        await store.commit(_write(1))  # starts the syncer
        recorded[0].fail_next = 1
        with pytest.raises(StoreError, match=r"cannot sync the write-ahead log: .*Errno 22"):
            await store.commit(_write(2))
        retried = await store.commit(_write(2))
        assert (retried.last_seq, retried.stored) == (2, 0)
        assert (await store.commit(_write(3))).stored == 1
        assert [e.seq for e in await store.read_events()] == [1, 2, 3]



@needs_syncer
async def test_a_log_that_cannot_be_opened_fails_the_group_with_a_typed_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The syncer opens the log at the first sync; if it cannot (here: a refused
    ``open``), the group gets a typed ``StoreError``, nothing is reported stored, and the
    device's retry is a replay once the log opens."""
    real_open = _sqlite_worker._open_log

    def refused(path: str) -> int:
        raise PermissionError(13, "Permission denied (injected)")

    async with store_of_one_device(tmp_path) as store:
        monkeypatch.setattr(_sqlite_worker, "_open_log", refused)
        with pytest.raises(StoreError, match=r"cannot sync the write-ahead log.*Permission"):
            await store.commit(_write(1))
        monkeypatch.setattr(_sqlite_worker, "_open_log", real_open)
        retried = await store.commit(_write(1))
        assert (retried.last_seq, retried.stored) == (1, 0)
        assert [e.seq for e in await store.read_events()] == [1]

def test_without_the_module_the_python_thread_syncs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No C syncer (not built, or another platform): the log is synced by the Python
    thread, as the tests that spy on ``_fdatasync`` check in detail."""
    monkeypatch.setattr(_accel, "log_syncer", None)
    synced: list[int] = []
    monkeypatch.setattr(_sqlite_worker, "_fdatasync", synced.append)

    async def main() -> None:
        async with store_of_one_device(tmp_path) as store:
            await store.commit(_write(1))

    asyncio.run(main())
    assert len(synced) == 1
