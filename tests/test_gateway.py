"""``crdtsync.Gateway`` end to end (docs/protocol.md 18): many devices synced through batch
requests against a real server on 127.0.0.1 with real SQLite files (and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient, Device, Gateway
from crdtsync.errors import TransportError, Unauthorized
from crdtsync.protocol import DEFAULT_LIMITS
from crdtsync.testing import FaultProxy
from crdtsync_server import Server, ServerConfig

from .conftest import ADMIN_TOKEN
from .provisioning import events_by_device, provision
from .services import drop_schema, new_schema, require_postgres


async def test_devices_converge_both_ways_in_one_request(server: Server, admin: AdminClient,
                                                         tmp_path: Path) -> None:
    """20 devices behind one gateway: their state and events reach the cloud in one batch
    request, each event exactly once; cloud writes, messages and commands reach each device
    at the next gateway sync; each device is a whole :class:`Device`."""
    tokens = await provision(admin, 20)
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        devices = {i: await gw.add(i, t) for i, t in tokens.items()}
        assert all(isinstance(d, Device) for d in devices.values())
        await gw.sync()  # first contact
        requests = gw.stats.requests
        for n, dev in enumerate(devices.values()):
            dev.state["n"] = n
            for k in range(5):
                await dev.emit("reading", {"k": k})
        outcomes = await gw.sync()
        assert all(not isinstance(o, Exception) for o in outcomes.values()), outcomes
        assert gw.stats.requests == requests + 1
        assert all(d.pending_events == 0 for d in devices.values())
        stored = await events_by_device(admin)
        assert {d: [s for s, _ in e] for d, e in stored.items()} == {
            i: [1, 2, 3, 4, 5] for i in tokens}
        assert (await admin.state("s7"))["state"] == {"n": 7}

        seen: list[Any] = []
        devices["s3"].on("cfg")(lambda m: seen.append(m.body))
        devices["s4"].command("blink")(lambda params: {"blinked": params["times"]})
        await admin.patch_state("s2", {"mode": "eco"})
        await admin.request("POST", "/v1/devices/s3/messages", json={"topic": "cfg",
                                                                      "body": {"x": 1}})
        command = await admin.request("POST", "/v1/devices/s4/commands",
                                      json={"method": "blink", "params": {"times": 2}})
        outcomes = await gw.sync(force=True)
        assert len(outcomes) == 20
        assert devices["s2"].state["mode"] == "eco"
        assert seen == [{"x": 1}]
        done = await admin.request("GET", f"/v1/commands/{command['id']}")
        assert done["status"] == "succeeded" and done["result"] == {"blinked": 2}
        await gw.sync(force=True)
        assert seen == [{"x": 1}]  # once
    assert sorted(p.name for p in (tmp_path / "gw").iterdir()) == sorted(
        [f"{i}.db" for i in tokens] + ["gateway.json"]
        + [f"{i}.db-{x}" for i in tokens for x in ("shm", "wal")
           if (tmp_path / "gw" / f"{i}.db-{x}").exists()])


async def test_bad_token_device_fails_alone(server: Server, admin: AdminClient,
                                            tmp_path: Path) -> None:
    """A device whose token is wrong (also when its entry is first, its token in the header)
    gets ``Unauthorized``; the others sync; the gateway backs it off like a device loop."""
    tokens = await provision(admin, 3)
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        bad = await gw.add("s0", "wrong-token")
        good = [await gw.add(i, tokens[i]) for i in ("s1", "s2")]
        for dev in (bad, *good):
            await dev.emit("t", {"v": 1})
        outcomes = await gw.sync()
        assert isinstance(outcomes["s0"], Unauthorized)
        assert not isinstance(outcomes["s1"], Exception)
        assert not isinstance(outcomes["s2"], Exception)
        assert bad.pending_events == 1 and all(d.pending_events == 0 for d in good)
        await gw.add("s0", tokens["s0"])  # the right token, e.g. after a rotation
        outcomes = await gw.sync()
        assert not isinstance(outcomes["s0"], Exception) and bad.pending_events == 0
    assert json.loads((tmp_path / "gw" / "gateway.json").read_text())["devices"]["s0"] == \
        tokens["s0"]
    assert (tmp_path / "gw" / "gateway.json").stat().st_mode & 0o777 == 0o600


async def test_gateway_splits_by_the_servers_limits(tmp_path: Path) -> None:
    """A server taking 3 entries per batch: the gateway learns it from the refusal and syncs
    every device in batches of 3; a device whose request alone is over ``max_body`` gets
    ``body_too_large`` and shrinks its own request, as over ``POST /v1/sync``."""
    limits = dataclasses.replace(DEFAULT_LIMITS, max_batch_entries=3)
    config = ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                          limits=limits, max_body=48 * 1024)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        tokens = await provision(admin, 10)
        async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
            devices = [await gw.add(i, t) for i, t in tokens.items()]
            for dev in devices:
                await dev.emit("t", {"v": 1})
            await devices[0].emit_many([("big", {"pad": "x" * 30_000})] * 3)
            outcomes = await gw.sync()
            assert all(not isinstance(o, Exception) for o in outcomes.values()), outcomes
            assert gw._batcher is not None and gw._batcher.max_entries == 3
            assert all(d.pending_events == 0 for d in devices)
        stored = await events_by_device(admin)
        assert [s for s, _ in stored["s0"]] == [1, 2, 3, 4]
        assert all([s for s, _ in stored[i]] == [1] for i in tokens if i != "s0")


async def test_restart_reloads_devices_and_their_outboxes(server: Server, admin: AdminClient,
                                                          tmp_path: Path) -> None:
    tokens = await provision(admin, 4)
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        for i, t in tokens.items():
            dev = await gw.add(i, t)
            await dev.emit("t", {"offline": i})
            dev.state["where"] = i
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        assert sorted(gw.devices) == sorted(tokens)
        assert all(d.pending_events == 1 for d in gw.devices.values())
        outcomes = await gw.sync()
        assert sorted(outcomes) == sorted(tokens)
        await gw.remove("s0")  # forgotten: not reopened next time, its file stays
        assert sorted(gw.devices) == ["s1", "s2", "s3"]
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        assert sorted(gw.devices) == ["s1", "s2", "s3"]
    assert (tmp_path / "gw" / "s0.db").exists()
    stored = await events_by_device(admin)
    assert stored == {i: [(1, {"offline": i})] for i in tokens}
    assert (await admin.state("s3"))["state"] == {"where": "s3"}


async def test_background_loop_syncs_what_changed(server: Server, admin: AdminClient,
                                                  tmp_path: Path) -> None:
    tokens = await provision(admin, 5)
    async with Gateway(server.url, path=tmp_path / "gw", interval=30.0,
                       min_spacing=0.05) as gw:
        devices = [await gw.add(i, t) for i, t in tokens.items()]
        await asyncio.sleep(0.2)  # the first contact, all due at start
        for dev in devices:
            await dev.emit("t", {"v": dev.id})
        async with asyncio.timeout(10):
            while any(d.pending_events for d in devices):  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.02)
        assert gw.stats.entries >= 10
    stored = await events_by_device(admin)
    assert stored == {i: [(1, {"v": i})] for i in tokens}


async def test_files_move_both_ways_through_a_gateways_devices(
        server: Server, admin: AdminClient, tmp_path: Path) -> None:
    """A gateway's device has the whole file API (issue 19): a file it sends reaches the
    cloud (one feed item), and a file the cloud puts for it arrives, is verified and handed
    to its ``on_file`` handler once, driven by the gateway's loop alone; a new token given
    through ``gw.add`` is the one its transfers use. A gateway holds no live channel, so the
    cloud's file reaches the device at its next due sync: a short interval, else the device's
    last sync may come before the put and the next one 30 s later."""
    tokens = await provision(admin, 2)
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(bytes(range(256)) * 4000)
    async with Gateway(server.url, path=tmp_path / "gw", interval=0.5,
                       min_spacing=0.05) as gw:
        devices = {i: await gw.add(i, t) for i, t in tokens.items()}
        got: list[tuple[str, bytes]] = []
        for dev in devices.values():
            @dev.on_file("fw.bin")
            async def handle(info: Any, dev: Device = dev) -> None:
                out = tmp_path / f"{dev.id}.out"
                await dev.fetch_file(info.name, out)
                got.append((dev.id, out.read_bytes()))

        new_token = (await admin.rotate_token("s1"))["token"]
        await gw.add("s1", new_token)
        await devices["s0"].send_file("dump.bin", b"d" * 300_000, meta={"n": 0})
        await devices["s1"].send_file("dump.bin", b"e" * 1000)
        await admin.put_file("fw.bin", firmware, device="s1")
        async with asyncio.timeout(20):
            while (any(d.pending_files for d in devices.values())  # noqa: ASYNC110
                   or not got):
                await asyncio.sleep(0.05)
        assert got == [("s1", firmware.read_bytes())]
    items, _ = await admin.feed(limit=100, kind="file")
    assert sorted((i["device"], i["file"]["size"]) for i in items) == [
        ("s0", 300_000), ("s1", 1000)]


@pytest.mark.parametrize("seed", [1, 2])
async def test_cuts_mid_batch_lose_and_duplicate_nothing(server: Server, admin: AdminClient,
                                                         tmp_path: Path, seed: int) -> None:
    """Through the fault proxy (requests cut, answers cut after the commit, resets), batch
    after batch: every device gets ``TransportError`` for a batch whose outcome is unknown,
    and after a fault-free sync every event is stored exactly once and every state
    converged."""
    tokens = await provision(admin, 8)
    plan = {"cut_request": 0.2, "cut_response": 0.3, "reset": 0.2}
    async with FaultProxy(server.port, seed=seed, plan=plan) as proxy, \
            Gateway(proxy.url, path=tmp_path / "gw", interval=None, timeout=5.0) as gw:
        devices = [await gw.add(i, t) for i, t in tokens.items()]
        unknown = 0
        for step in range(8):
            for dev in devices:
                await dev.emit("t", {"step": step})
                dev.state["step"] = step
            outcomes = await gw.sync(force=True)
            unknown += sum(isinstance(o, TransportError) for o in outcomes.values())
        assert unknown > 0 and proxy.stats["pass"] > 0
        proxy.mode = "pass"
        outcomes = await gw.sync(force=True)
        assert all(not isinstance(o, Exception) for o in outcomes.values()), outcomes
        assert all(d.pending_events == 0 for d in devices)
    stored = await events_by_device(admin)
    assert stored == {i: [(n + 1, {"step": n}) for n in range(8)] for i in tokens}
    for i in tokens:
        assert (await admin.state(i))["state"] == {"step": 7}


async def test_a_device_sync_goes_through_the_gateway(server: Server, admin: AdminClient,
                                                           tmp_path: Path) -> None:
    """The transport contract: an entry's error frame is raised as its class in that device
    alone (here seen through ``Device.sync`` of one device)."""
    tokens = await provision(admin, 2)
    async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
        dev = await gw.add("s0", tokens["s0"])
        other = await gw.add("s1", "nope")
        await dev.emit("t", {"ok": True})
        report = await dev.sync()
        assert report.events_acked == 1
        with pytest.raises(Unauthorized):
            await other.sync()


async def test_gateway_on_postgres(tmp_path: Path) -> None:
    """The batch endpoint on the PostgreSQL store: the entries' commits share its group
    commit like on SQLite, and every guarantee holds."""
    from crdtsync_server.store.postgres import PostgresStore

    url, schema = require_postgres(), new_schema()
    store = PostgresStore(url, schema=schema)
    config = ServerConfig(db=str(tmp_path / "unused.db"), port=0, admin_token=ADMIN_TOKEN)
    try:
        async with Server(config, store=store) as server, \
                AdminClient(server.url, ADMIN_TOKEN) as admin:
            tokens = await provision(admin, 12)
            async with Gateway(server.url, path=tmp_path / "gw", interval=None) as gw:
                devices = [await gw.add(i, t) for i, t in tokens.items()]
                for dev in devices:
                    dev.state["id"] = dev.id
                    await dev.emit_many([("t", {"k": k}) for k in range(5)])
                await gw.add("bad", "wrong")
                outcomes = await gw.sync()
                assert isinstance(outcomes["bad"], Unauthorized)
                assert gw.stats.requests == 2  # the bad token was in the first header
                await gw.devices["s0"].emit("t", {"k": 5})
                outcomes = await gw.sync(force=True)
                assert isinstance(outcomes["bad"], Unauthorized)
                assert gw.stats.requests == 3  # a good token in the header this time
                assert all(not isinstance(outcomes[i], Exception) for i in tokens)
            stored = await events_by_device(admin)
            assert stored == {i: [(k + 1, {"k": k}) for k in range(6 if i == "s0" else 5)]
                              for i in tokens}
            assert (await admin.state("s11"))["state"] == {"id": "s11"}
    finally:
        await drop_schema(schema)


@pytest.mark.parametrize("mode", ["hold_request", "hold_response"])
async def test_gateway_stopped_mid_batch_resumes_from_its_directory(
        server: Server, admin: AdminClient, tmp_path: Path, mode: str) -> None:
    """The gateway stops while its batch is in flight (``hold_response``: the server has
    committed every entry, the answer never arrives; ``hold_request``: nothing was
    committed), as a process killed at that point would: no device stored an answer. A new
    gateway on the same directory reopens every device and its outbox, and one sync leaves
    every event stored exactly once and every state converged."""
    tokens = await provision(admin, 6)
    async with FaultProxy(server.port, mode="pass") as proxy:
        gw = Gateway(proxy.url, path=tmp_path / "gw", interval=None)
        await gw.start()
        for i, t in tokens.items():
            dev = await gw.add(i, t)
            await dev.emit_many([("t", {"k": k}) for k in range(3)])
            dev.state["v"] = i
        proxy.mode = mode
        syncing = asyncio.create_task(gw.sync())
        async with asyncio.timeout(20):
            await proxy.wait_held()
        stored = await events_by_device(admin)
        assert sum(len(e) for e in stored.values()) == (18 if mode == "hold_response" else 0)
        syncing.cancel()  # the process dies here: nothing of the answer reaches a device
        with contextlib.suppress(asyncio.CancelledError):
            await syncing
        await gw.aclose()
        proxy.mode = "pass"
        async with Gateway(proxy.url, path=tmp_path / "gw", interval=None) as again:
            assert all(d.pending_events == 3 for d in again.devices.values())
            outcomes = await again.sync()
            assert all(not isinstance(o, Exception) for o in outcomes.values()), outcomes
            assert all(d.pending_events == 0 for d in again.devices.values())
    stored = await events_by_device(admin)
    assert stored == {i: [(k + 1, {"k": k}) for k in range(3)] for i in tokens}
    for i in tokens:
        assert (await admin.state(i))["state"] == {"v": i}
