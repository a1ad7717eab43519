"""Server-side failures in the middle of a sync: before and after the commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient, CrdtsyncError, Device, StoreError
from crdtsync_server import Server, ServerConfig
from crdtsync_server.store import CommitResult, SQLiteStore, SyncWrite

from .conftest import ADMIN_TOKEN


class FailingStore(SQLiteStore):
    """A real SQLite store whose next commit fails before writing, or after writing."""

    fail_before = 0
    fail_after = 0

    async def commit(self, write: SyncWrite) -> CommitResult:
        if write.device is not None and self.fail_before:
            self.fail_before -= 1
            raise StoreError("disk full (test)")
        result = await super().commit(write)
        if write.device is not None and self.fail_after:
            self.fail_after -= 1
            raise RuntimeError("process died after commit, before answering (test)")
        return result


@pytest.fixture
async def faulty(tmp_path: Path) -> Any:
    store = FailingStore(tmp_path / "server.db")
    config = ServerConfig(db="unused", port=0, admin_token=ADMIN_TOKEN)
    async with Server(config, store=store) as server, AdminClient(server.url, ADMIN_TOKEN) as adm:
        token = (await adm.add_device("d1"))["token"]
        async with Device("d1", server.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            yield store, server, adm, dev


async def test_commit_failure_stores_nothing_and_keeps_serving(faulty: Any) -> None:
    store, _server, admin, dev = faulty
    dev.state["a"] = 1
    await dev.emit("t", {"n": 1})
    store.fail_before = 1
    with pytest.raises(CrdtsyncError) as info:
        await dev.sync()
    assert info.value.code == "internal" and info.value.retryable
    assert dev.pending_events == 1
    assert (await admin.state("d1"))["state"] == {}  # memory did not keep the unstored write
    assert (await admin.events(device="d1"))["events"] == []
    report = await dev.sync()
    assert report.events_acked == 1
    assert (await admin.state("d1"))["state"] == {"a": 1}


async def test_crash_after_commit_before_answer_neither_loses_nor_duplicates(faulty: Any
                                                                              ) -> None:
    store, _server, admin, dev = faulty
    dev.state["a"] = 1
    for n in range(3):
        await dev.emit("t", {"n": n})
    store.fail_after = 1
    with pytest.raises(CrdtsyncError):
        await dev.sync()
    assert dev.pending_events == 3  # never acknowledged, so still queued
    report = await dev.sync()  # the replay finds everything already stored
    assert report.events_acked == 3 and dev.pending_events == 0
    events = (await admin.events(device="d1"))["events"]
    assert [e["body"]["n"] for e in events] == [0, 1, 2]
    assert (await admin.state("d1"))["state"] == {"a": 1}
    log = await store.load_doc("d1/state")
    assert len(log.updates) == 1  # the replayed update was a no-op and was not logged again


class PanicException(BaseException):
    """Stands in for pyo3_runtime.PanicException, which pycrdt raises on a Rust panic."""


def test_a_pycrdt_panic_on_input_is_a_corrupt_update(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycrdt import Doc

    from crdtsync import crdt
    from crdtsync.errors import CorruptUpdate

    def panic(self: Any, update: bytes) -> None:
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(Doc, "apply_update", panic)
    with pytest.raises(CorruptUpdate):
        crdt.apply_remote(Doc(), b"\x00\x00", name="state")


async def test_a_panic_inside_a_sync_answers_500_and_the_server_keeps_serving(
        faulty: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from crdtsync_server.sync import SyncService

    _store, _server, admin, dev = faulty
    real_sync = SyncService.sync
    calls = {"n": 0}

    async def panicking(self: SyncService, device: Any, request: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise PanicException("boom")
        return await real_sync(self, device, request)

    monkeypatch.setattr(SyncService, "sync", panicking)
    dev.state["a"] = 1
    with pytest.raises(CrdtsyncError) as info:
        await dev.sync()
    assert info.value.code == "internal"
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"a": 1}
