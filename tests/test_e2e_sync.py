"""End-to-end sync behaviour: convergence, exactly-once events, restarts, lost data, recovery.

Every test runs the real server on 127.0.0.1 over a real SQLite file and real device stores.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient, Device, TransportError
from crdtsync.transport import HttpTransport
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN, DeviceFactory, LoseResponses, SteppedClock


async def events_of(admin: AdminClient, device: str) -> list[dict[str, Any]]:
    return [e async for e in admin.iter_events(device=device)]


def outbox_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


# --- convergence ---------------------------------------------------------------------------

ORDERS = ["device-first", "cloud-first", "interleaved"]


@pytest.mark.parametrize("order", ORDERS)
async def test_offline_concurrent_edits_converge(order: str, make_device: DeviceFactory,
                                                 admin: AdminClient,
                                                 server_clock: SteppedClock) -> None:
    """Device and cloud write the same keys while the device is offline, one second apart;
    whatever the order of writes, both end equal, and each contested key follows the
    documented rule: the later write wins, whatever the client ids (a delete then a set
    of ``mode`` by the device is its last write)."""
    dev = await make_device("d1", clock=server_clock)
    dev.state.update({"shared": 0, "mode": "init"})
    await dev.sync()

    async def device_writes() -> None:
        dev.state["shared"] = "device"
        dev.state["mode"] = "eco"
        dev.state["device_only"] = 1
        del dev.state["mode"]
        dev.state["mode"] = "device-mode"

    async def cloud_writes() -> None:
        await admin.patch_state("d1", {"shared": "cloud", "mode": "boost", "cloud_only": 2})

    if order == "device-first":
        await device_writes()
        server_clock.advance(1000)
        await cloud_writes()
    elif order == "cloud-first":
        await cloud_writes()
        server_clock.advance(1000)
        await device_writes()
    else:
        dev.state["shared"] = "device"
        server_clock.advance(1000)
        await cloud_writes()
        server_clock.advance(1000)
        await device_writes()
    await dev.sync()
    await dev.sync()

    cloud = (await admin.state("d1"))["state"]
    assert cloud == dev.state.to_dict()
    device_wins = order != "device-first"
    assert cloud["shared"] == ("device" if device_wins else "cloud")
    assert cloud["mode"] == ("device-mode" if device_wins else "boost")
    assert cloud["device_only"] == 1 and cloud["cloud_only"] == 2


async def test_many_devices_sync_concurrently(make_device: DeviceFactory,
                                              admin: AdminClient) -> None:
    devices = [await make_device(f"dev-{i}") for i in range(25)]
    for i, dev in enumerate(devices):
        dev.state["n"] = i
        for k in range(20):
            await dev.emit("readings", {"i": i, "k": k})
    await asyncio.gather(*(dev.sync() for dev in devices))
    await asyncio.gather(*(dev.sync() for dev in devices))
    for i, dev in enumerate(devices):
        assert (await admin.state(dev.id))["state"] == {"n": i}
        events = await events_of(admin, dev.id)
        assert [e["body"]["k"] for e in events] == list(range(20))
        assert dev.pending_events == 0


# --- events: exactly once, purged ----------------------------------------------------------

async def test_offline_events_arrive_exactly_once_and_are_purged(
        make_device: DeviceFactory, admin: AdminClient, tmp_path: Path) -> None:
    dev = await make_device("d1", max_events_per_sync=200)
    for k in range(450):
        assert await dev.emit("readings", {"k": k}) == k + 1
    assert outbox_rows(tmp_path / "d1.db") == 450
    report = await dev.sync()
    assert report.rounds == 3 and report.events_sent == 450 and report.events_acked == 450
    events = await events_of(admin, "d1")
    assert [e["seq"] for e in events] == list(range(1, 451))
    assert [e["body"]["k"] for e in events] == list(range(450))
    assert dev.pending_events == 0 and outbox_rows(tmp_path / "d1.db") == 0
    assert all(e["received"] >= e["time"] - 60_000 for e in events)


async def test_lost_response_neither_duplicates_nor_loses(
        make_device: DeviceFactory, admin: AdminClient, server: Server, tmp_path: Path) -> None:
    token = (await admin.add_device("d1"))["token"]
    transport = LoseResponses(HttpTransport(server.url, token), n=2)
    async with Device("d1", transport=transport, path=tmp_path / "d1.db", interval=None) as dev:
        dev.state["v"] = 1
        for k in range(5):
            await dev.emit("t", {"k": k})
        for _ in range(2):
            with pytest.raises(TransportError):
                await dev.sync()
            assert dev.pending_events == 5  # not acknowledged, so not purged
        assert (await admin.state("d1"))["state"] == {"v": 1}  # committed before the loss
        report = await dev.sync()
        assert report.events_acked == 5 and dev.pending_events == 0
    events = await events_of(admin, "d1")
    assert [e["body"]["k"] for e in events] == list(range(5))


# --- restarts --------------------------------------------------------------------------------

async def test_device_restart_loses_nothing(make_device: DeviceFactory, admin: AdminClient
                                            ) -> None:
    dev = await make_device("d1")
    dev.state["voltage"] = 3.7
    await dev.emit("t", {"k": 1})
    await dev.aclose()  # no sync: a restart while offline
    dev = await make_device("d1")
    assert dev.state["voltage"] == 3.7 and dev.pending_events == 1
    await dev.emit("t", {"k": 2})
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"voltage": 3.7}
    assert [e["seq"] for e in await events_of(admin, "d1")] == [1, 2]


async def test_server_restart_loses_nothing(server_config: ServerConfig, tmp_path: Path) -> None:
    async with Server(server_config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        port = srv.port
    config = replace(server_config, port=port)
    async with Device("d1", f"http://127.0.0.1:{port}", token=token, path=tmp_path / "d.db",
                      interval=None) as dev:
        for step in range(3):
            async with Server(config) as srv:
                dev.state[f"k{step}"] = step
                await dev.emit("t", {"step": step})
                await dev.sync()
                await AdminClient(srv.url, ADMIN_TOKEN).aclose()
        async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
            assert (await admin.state("d1"))["state"] == {"k0": 0, "k1": 1, "k2": 2}
            assert [e["body"]["step"] for e in await events_of(admin, "d1")] == [0, 1, 2]
            assert (await admin.device("d1"))["last_seq"] == 3


# --- lost data on either side ----------------------------------------------------------------

async def test_wiped_device_recovers_state_and_renumbers_events(
        make_device: DeviceFactory, admin: AdminClient, tmp_path: Path) -> None:
    dev = await make_device("d1")
    dev.state["a"] = 1
    for k in range(3):
        await dev.emit("t", {"k": k})
    await dev.sync()
    old_client = dev.doc.client_id
    await dev.aclose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'd1.db'}{suffix}").unlink(missing_ok=True)

    dev = await make_device("d1")
    assert dev.doc.client_id != old_client  # a fresh store never reuses a client id
    await dev.emit("t", {"k": "after-wipe"})  # seq 1 again, different content
    report = await dev.sync()
    assert report.recovered and dev.pending_events == 0
    assert dev.state["a"] == 1  # state comes back from the cloud
    events = await events_of(admin, "d1")
    assert [(e["seq"], e["body"]["k"]) for e in events] == [
        (1, 0), (2, 1), (3, 2), (4, "after-wipe")]
    assert await dev.emit("t", {"k": "next"}) == 5


async def test_server_restored_from_backup_recovers_in_one_more_round(
        server_config: ServerConfig, tmp_path: Path) -> None:
    db = Path(server_config.db)
    backup = tmp_path / "backup.db"
    async with Server(server_config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        port = srv.port
    config = replace(server_config, port=port)
    url = f"http://127.0.0.1:{port}"
    async with Device("d1", url, token=token, path=tmp_path / "d.db", interval=None) as dev:
        async with Server(config):
            dev.state["v1"] = "before backup"
            await dev.emit("t", {"n": 1})
            await dev.sync()
        shutil.copy(db, backup)  # server stopped: the file is consistent
        async with Server(config):
            dev.state["v2"] = "after backup"
            for n in (2, 3):
                await dev.emit("t", {"n": n})
            await dev.sync()
        shutil.copy(backup, db)  # disaster: restore the old backup
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
            await dev.emit("t", {"n": 4})
            report = await dev.sync()
            assert report.recovered and report.rounds == 2
            state = (await admin.state("d1"))["state"]
            assert state == {"v1": "before backup", "v2": "after backup"} == dev.state.to_dict()
            # Events 2 and 3 were acknowledged and purged by the device before the restore:
            # they are gone on both sides, and the cloud counts them as lost, not silently.
            assert [e["body"]["n"] for e in await events_of(admin, "d1")] == [1, 4]
            assert (await admin.device("d1"))["events_lost"] == 2


async def test_restored_device_store_switches_client_id(
        make_device: DeviceFactory, admin: AdminClient, tmp_path: Path) -> None:
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    dev.state["a"] = 1
    await dev.sync()
    await dev.aclose()
    shutil.copy(path, tmp_path / "old.db")
    dev = await make_device("d1")
    dev.state["b"] = 2
    await dev.sync()
    client = dev.doc.client_id
    await dev.aclose()
    shutil.copy(tmp_path / "old.db", path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    dev = await make_device("d1")
    assert dev.doc.client_id == client  # the old store knows only the old id
    await dev.sync()
    assert dev.doc.client_id != client  # the cloud knew more of it: switched
    dev.state["c"] = 3
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"a": 1, "b": 2, "c": 3} == dev.state.to_dict()


# --- outbox policy ---------------------------------------------------------------------------

async def test_drop_oldest_outbox_is_accepted_as_a_counted_gap(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    from crdtsync import OutboxLimits

    dev = await make_device("d1", outbox=OutboxLimits(max_events=3, policy="drop_oldest"))
    for k in range(5):
        await dev.emit("t", {"k": k})
    assert dev.pending_events == 3
    await dev.sync()
    assert [e["body"]["k"] for e in await events_of(admin, "d1")] == [2, 3, 4]
    assert (await admin.device("d1"))["events_lost"] == 2


# --- background loop -------------------------------------------------------------------------

async def test_background_loop_syncs_soon_after_local_changes(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    dev = await make_device("d1", interval=3600.0, min_spacing=0.05)
    await _until(lambda: dev.last_report is not None)  # the loop syncs once at start
    dev.state["x"] = 42
    await dev.emit("t", {"k": 1})
    await _until(lambda: dev.pending_events == 0)
    assert (await admin.state("d1"))["state"] == {"x": 42}


async def test_closing_right_after_a_sync_request_stops_the_loop(
        make_device: DeviceFactory) -> None:
    """The wake-up and the cancellation land in the same loop iteration: Python 3.11's
    ``asyncio.wait_for`` swallows such a cancellation, which used to make ``aclose`` hang."""
    dev = await make_device("d1", interval=3600.0, min_spacing=0.0)
    await _until(lambda: dev.last_report is not None)  # the loop now waits for a wake-up
    dev.request_sync()
    closing = asyncio.create_task(dev.aclose())
    done, _ = await asyncio.wait([closing], timeout=10)
    assert closing in done and closing.exception() is None


async def test_background_loop_backs_off_and_recovers(server_config: ServerConfig,
                                                      tmp_path: Path) -> None:
    async with Server(server_config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        port = srv.port
    url = f"http://127.0.0.1:{port}"
    async with Device("d1", url, token=token, path=tmp_path / "d.db", interval=0.05,
                      min_spacing=0.01, backoff=(0.02, 0.1)) as dev:
        await dev.emit("t", {"k": 1})
        await _until(lambda: dev.last_error is not None)
        assert dev.last_error is not None and dev.last_error.retryable
        assert dev.pending_events == 1
        async with Server(replace(server_config, port=port)):
            await _until(lambda: dev.pending_events == 0)
            assert dev.last_error is None


async def _until(predicate: Any, limit: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --- compaction ------------------------------------------------------------------------------

async def test_compaction_on_both_sides_keeps_state(make_device: DeviceFactory,
                                                    admin: AdminClient, server: Server,
                                                    tmp_path: Path) -> None:
    server.services.docs.compact_every = 5
    dev = await make_device("d1", compact_every=5)
    for i in range(30):
        dev.state["counter"] = i
        dev.state[f"k{i % 7}"] = i
        await dev.sync()
        await admin.patch_state("d1", {"cloud": i})
    await dev.sync()
    expected = dev.state.to_dict()
    assert (await admin.state("d1"))["state"] == expected
    store = server.services.store
    log = await store.load_doc("d1/state")
    assert log.snapshot and len(log.updates) < 10  # compacted, not growing
    with sqlite3.connect(tmp_path / "d1.db") as db:
        assert db.execute("SELECT COUNT(*) FROM updates").fetchone()[0] < 10
    await dev.aclose()
    dev = await make_device("d1")  # reload from snapshot + tail
    assert dev.state.to_dict() == expected
    server.services.docs.evict("d1/state")  # server reload from snapshot + tail
    assert (await admin.state("d1"))["state"] == expected


# --- the device adapts instead of blocking itself -------------------------------------------

async def test_restored_device_outbox_with_stored_and_new_events(
        make_device: DeviceFactory, admin: AdminClient, tmp_path: Path) -> None:
    """A device store restored from a backup holds events the cloud already stored (same
    content) followed by new ones reusing their seqs: the stored ones are acknowledged, the
    new ones renumbered, and the device does not get stuck."""
    path = tmp_path / "d1.db"
    dev = await make_device("d1")
    for n in range(3):
        await dev.emit("t", {"n": n})
    await dev.aclose()
    shutil.copy(path, tmp_path / "backup.db")  # backup with events 1..3 still queued
    dev = await make_device("d1")
    await dev.sync()
    await dev.emit("t", {"n": "old-4"})
    await dev.sync()
    await dev.aclose()
    shutil.copy(tmp_path / "backup.db", path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    dev = await make_device("d1")
    assert dev.pending_events == 3
    await dev.emit("t", {"n": "new"})  # seq 4 again, other content
    report = await dev.sync()
    assert report.recovered and dev.pending_events == 0
    assert [(e["seq"], e["body"]["n"]) for e in await events_of(admin, "d1")] == [
        (1, 0), (2, 1), (3, 2), (4, "old-4"), (5, "new")]
    await dev.emit("t", {"n": "later"})
    await dev.sync()
    assert (await admin.device("d1"))["last_seq"] == 6


async def test_device_adopts_the_servers_event_limit(server_config: ServerConfig,
                                                     tmp_path: Path) -> None:
    from crdtsync.protocol import Limits

    config = replace(server_config, limits=Limits(max_events=40))
    async with Server(config) as srv, AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", srv.url, token=token, path=tmp_path / "d.db",
                          interval=None) as dev:
            for n in range(100):
                await dev.emit("t", {"n": n})
            report = await dev.sync()
            assert dev.pending_events == 0 and report.events_acked == 100
            assert dev.max_events_per_sync == 40
        assert [e["body"]["n"] for e in await events_of(admin, "d1")] == list(range(100))


async def test_direct_doc_writes_and_deletes_are_persisted_and_synced(
        make_device: DeviceFactory, admin: AdminClient) -> None:
    from pycrdt import Map

    dev = await make_device("d1")
    dev.state.update({"a": 1, "b": 2})
    await dev.sync()
    raw: Map[Any] = dev.doc.get("state", type=Map)
    del raw["a"]  # a delete changes no state vector: it must still be sent
    await dev.sync()
    assert (await admin.state("d1"))["state"] == {"b": 2}
    raw["c"] = 3
    await dev.aclose()  # persisted at the write, without a later StateMap write
    dev = await make_device("d1")
    assert dev.state.to_dict() == {"b": 2, "c": 3}


async def test_server_rejects_updates_with_non_json_values(make_device: DeviceFactory,
                                                           admin: AdminClient) -> None:
    """A foreign client writing bytes into the document gets invalid_value; nothing applied,
    and the state stays readable."""
    from pycrdt import Doc, Map

    from crdtsync import InvalidValue

    dev = await make_device("d1")
    dev.state["ok"] = 1
    await dev.sync()
    raw: Map[Any] = dev.doc.get("state", type=Map)
    raw["blob"] = b"\x00\x01"  # bypasses StateMap validation
    with pytest.raises(InvalidValue):
        await dev.sync()
    assert (await admin.state("d1"))["state"] == {"ok": 1}
    scratch: Doc[Any] = Doc()
    scratch.apply_update(dev.doc.get_update())
    assert scratch.get("state", type=Map).to_py()["blob"] == bytearray(b"\x00\x01")


async def test_page_limit_zero_is_a_typed_error(admin: AdminClient) -> None:
    from crdtsync.errors import MalformedRequest

    with pytest.raises(MalformedRequest):
        await admin.list_devices(limit=0)
    with pytest.raises(MalformedRequest):
        await admin.events(limit=0)


async def test_concurrent_requests_of_one_device_are_serialised(
        make_device: DeviceFactory, admin: AdminClient, server: Server) -> None:
    """The same request arriving several times at once (a retrying client, a duplicating
    network) stores its events once and its update once."""
    import aiohttp

    from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH, decode_response

    dev = await make_device("d1")
    dev.state["a"] = 1
    for n in range(5):
        await dev.emit("t", {"n": n})
    part, _ = dev._doc_part()
    batch = await dev._store.pending(100, 1 << 20)
    from crdtsync.protocol import Event, SyncRequest, encode_request

    body = encode_request(SyncRequest("d1", (part,), tuple(Event(e.seq, e.topic, e.time, None)
                                                           for e in batch)),
                          bodies=[e.body for e in batch])
    token = make_device.tokens["d1"]  # type: ignore[attr-defined]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}
    async with aiohttp.ClientSession() as session:
        async def post() -> int:
            async with session.post(server.url + SYNC_PATH, data=body, headers=headers) as r:
                assert r.status == 200
                return decode_response(await r.read()).acked
        acks = await asyncio.gather(*(post() for _ in range(8)))
    assert acks == [5] * 8
    assert [e["body"]["n"] for e in await events_of(admin, "d1")] == list(range(5))
    log = await server.services.store.load_doc("d1/state")
    assert len(log.updates) == 1


async def test_two_server_instances_on_one_database_stay_correct_across_compaction(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """Instance A compacts past what instance B holds in memory: B must reload, not miss the
    rows folded into A's snapshot."""
    config = replace(server_config, compact_every=3)
    async with Server(config) as a, Server(config) as b, \
            AdminClient(a.url, ADMIN_TOKEN) as admin_a, AdminClient(b.url, ADMIN_TOKEN) as admin_b:
        await admin_a.add_device("d1")
        assert (await admin_b.state("d1"))["state"] == {}  # B now holds the document
        for i in range(8):
            await admin_a.patch_state("d1", {f"k{i}": i})  # A writes and compacts
        log = await a.services.store.load_doc("d1/state")
        assert log.snapshot_id > 0  # compacted past what B read
        expected = {f"k{i}": i for i in range(8)}
        assert (await admin_b.state("d1"))["state"] == expected
        await admin_b.patch_state("d1", {"from_b": True})
        assert (await admin_a.state("d1"))["state"] == {**expected, "from_b": True}


async def test_no_change_syncs_record_last_sync_without_a_commit_each(
        server_config: ServerConfig, server_clock: SteppedClock, tmp_path: Path) -> None:
    async with Server(replace(server_config, touch_every=3600)) as srv, \
            AdminClient(srv.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", srv.url, token=token, path=tmp_path / "d.db",
                          interval=None) as dev:
            dev.state["a"] = 1
            await dev.sync()
            first = (await admin.device("d1"))["last_sync"]
            server_clock.advance(10)  # a later sync on the server's clock: no sleep
            await dev.sync()  # changes nothing: no commit
            shown = (await admin.device("d1"))["last_sync"]
            stored = (await srv.services.store.get_device("d1")).last_sync  # type: ignore[union-attr]
        assert shown > first and stored == first  # seen at once, written later
        port = srv.port
    async with Server(replace(server_config, port=port)) as srv:  # flushed at shutdown
        assert (await srv.services.store.get_device("d1")).last_sync == shown  # type: ignore[union-attr]
