"""The :class:`WakeStore` contract: the wake log of the live channel.

Runs against every backend of ``tests/store_backends.py`` (the ``store`` fixture). Entries are
appended in the transaction of the write they announce: a cloud commit (``SyncWrite.wakes``),
a queued downlink item, a finished or interrupted proxied request, a fleet change; a write
that fails appends nothing. Cursors are never reused, the head survives purges, and
``wake_pending`` answers ``True`` whenever the reader cannot be sure it missed nothing.
"""

from __future__ import annotations

import pytest

from crdtsync.errors import NotFound, SeqGap
from crdtsync_server.store import (
    WAKE_EVERYONE,
    DeviceRecord,
    DocWrite,
    FleetRecord,
    ProxyRequest,
    Store,
    SyncWrite,
    WakeEntry,
    WakeStore,
    wake_device,
    wake_fleet,
    wake_targets,
)

from .store_backends import ev


async def _announced(store: Store) -> list[int]:
    heads: list[int] = []
    store.on_wakes(heads.append)
    return heads


async def test_empty_log(store: WakeStore) -> None:
    assert await store.wake_head() == 0
    assert await store.read_wakes(0, 10) == []
    assert await store.wake_pending([wake_device("d1")], 0) is False


async def test_add_read_and_pending(store: WakeStore) -> None:
    assert await store.add_wakes([wake_device("d1"), wake_fleet("west")], 5) == 2
    assert await store.add_wakes([WAKE_EVERYONE], 6) == 3
    assert await store.read_wakes(0, 10) == [
        WakeEntry(1, "d:d1", 5), WakeEntry(2, "f:west", 5), WakeEntry(3, "*", 6)]
    assert await store.read_wakes(1, 1) == [WakeEntry(2, "f:west", 5)]
    assert await store.read_wakes(3, 10) == []
    assert await store.wake_pending([wake_device("d1")], 0) is True
    assert await store.wake_pending([wake_device("d1")], 1) is False
    assert await store.wake_pending([wake_device("d2"), wake_fleet("west")], 1) is True
    assert await store.wake_pending([wake_device("d2"), wake_fleet("east")], 2) is False
    assert await store.wake_pending([wake_device("d2"), WAKE_EVERYONE], 2) is True
    assert await store.wake_pending([], 0) is False
    with pytest.raises(ValueError):
        await store.read_wakes(0, -1)


async def test_a_cursor_above_the_head_is_pending(store: WakeStore) -> None:
    """A cursor this database never gave out (it was restored from a backup or replaced):
    the reader must sync to be sure."""
    await store.add_wakes([wake_device("d1")], 1)
    assert await store.wake_pending([wake_device("other")], 1) is False
    assert await store.wake_pending([wake_device("other")], 2) is True


async def test_purge_keeps_the_head_and_raises_the_floor(store: WakeStore) -> None:
    for at in (10, 20, 30):
        await store.add_wakes([wake_device(f"d{at}")], at)
    assert await store.purge_wakes(25) == 2
    assert await store.read_wakes(0, 10) == [WakeEntry(3, "d:d30", 30)]
    # below the floor a reader cannot tell what it missed
    assert await store.wake_pending([wake_device("nobody")], 1) is True
    assert await store.wake_pending([wake_device("nobody")], 2) is False
    assert await store.purge_wakes(100) == 1
    assert await store.wake_head() == 3
    assert await store.read_wakes(0, 10) == []
    assert await store.wake_pending([wake_device("nobody")], 3) is False
    assert await store.add_wakes([wake_device("d1")], 101) == 4  # never reused


async def test_purge_cuts_a_prefix_in_cursor_order(store: WakeStore) -> None:
    """An entry written later but with an earlier time (another process's clock) stops the
    cut: the log stays a suffix, so the floor says exactly what went."""
    await store.add_wakes(["d:a"], 10)
    await store.add_wakes(["d:b"], 50)
    await store.add_wakes(["d:c"], 10)
    assert await store.purge_wakes(20) == 1
    assert [e.cursor for e in await store.read_wakes(0, 10)] == [2, 3]
    assert await store.purge_wakes(20) == 0


async def test_listeners_hear_of_each_appending_write(store: Store) -> None:
    heads = await _announced(store)
    await store.add_wakes([wake_device("d1")], 1)
    await store.set_setting("x", "1")  # appends nothing
    await store.add_wakes([wake_device("d1"), wake_device("d2")], 2)
    assert heads == [1, 3]


async def test_cloud_commit_appends_its_wakes_atomically(store: Store) -> None:
    heads = await _announced(store)
    await store.commit(SyncWrite(None, 7, docs=[DocWrite("fleet:west", b"u")],
                                 wakes=[wake_fleet("west")]))
    assert await store.read_wakes(0, 10) == [WakeEntry(1, "f:west", 7)]
    assert heads == [1]
    await store.commit(SyncWrite(None, 8, docs=[DocWrite("d1/state", b"u")]))
    assert await store.wake_head() == 1  # no wakes asked, none written


async def test_a_failed_commit_appends_nothing(store: Store) -> None:
    await store.add_device(DeviceRecord("d1", "h", created=1))
    with pytest.raises(SeqGap):
        await store.commit(SyncWrite("d1", 5, events=[ev(3)], wakes=[wake_device("d1")]))
    assert await store.wake_head() == 0


async def test_downlink_and_requests_wake_their_device(store: Store) -> None:
    await store.add_device(DeviceRecord("d1", "h", created=1))
    heads = await _announced(store)
    await store.queue_downlink("d1", "command", "reboot", {}, 10, None)
    with pytest.raises(NotFound):
        await store.queue_downlink("ghost", "message", "hi", {}, 11, None)
    await store.commit(SyncWrite("d1", 12, requests=[
        ProxyRequest("d1", "r1", "weather", {}, 12), ProxyRequest("d1", "r2", "weather", {}, 12)]))
    assert await store.wake_head() == 1  # a device's own sync wakes nobody
    assert await store.claim_request("d1", "r1", 13) is not None
    await store.finish_request("d1", "r1", {"status": 200}, 14)
    await store.finish_request("d1", "r1", {"status": 500}, 15)  # not running: no entry
    assert await store.claim_request("d1", "r2", 16) is not None
    store.instance = "restarted"
    assert await store.interrupt_running({"error": "restart"}, 17) == 1
    assert await store.interrupt_running({"error": "restart"}, 18) == 0
    assert await store.read_wakes(0, 10) == [
        WakeEntry(1, "d:d1", 10), WakeEntry(2, "d:d1", 14), WakeEntry(3, "d:d1", 17)]
    assert heads == [1, 2, 3]


async def test_a_fleet_change_wakes_the_device(store: Store) -> None:
    await store.add_fleet(FleetRecord("west", created=1))
    await store.add_device(DeviceRecord("d1", "h", created=1))
    await store.set_device_fleet("d1", "west", 5)
    await store.set_device_fleet("d1", "west", 6)  # no change, no entry
    await store.set_device_fleet("d1", None, 7)
    assert await store.read_wakes(0, 10) == [WakeEntry(1, "d:d1", 5), WakeEntry(2, "d:d1", 7)]


def test_wake_targets_of_a_device() -> None:
    plain = DeviceRecord("d1", "h", created=1)
    assert wake_targets(plain) == ("d:d1", "*")
    assert wake_targets(DeviceRecord("d1", "h", created=1, fleet="west")) == (
        "d:d1", "f:west", "*")
