"""Several server instances on one PostgreSQL database (issue 16).

In-process instances show that every wake-up crosses instances through ``LISTEN`` /
``NOTIFY``: a long poll, a live channel or a feed reader held by one instance answers a
write committed through another well within its wait, although on PostgreSQL the waiters
re-read only every ``SAFETY_POLL`` (60 s) on their own. Real ``crdtsync serve`` processes
behind a round-robin :class:`~crdtsync.testing.balancer.Balancer` (no sticky routing: a
device reaches a different instance on every request) are killed with ``kill -9`` and
restarted while devices write, emit and run commands: events stay exactly once, every
instance shows each device's state, and every command ran once and finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient, CrdtsyncError, Device, crdt
from crdtsync.testing.balancer import Balancer
from crdtsync.transport import HttpTransport
from crdtsync_server import Server, ServerConfig
from crdtsync_server.core import SAFETY_POLL
from crdtsync_server.store import DeviceRecord, ProxyRequest, SyncWrite

from .conftest import ADMIN_TOKEN
from .realworld import (
    Ledger,
    Progress,
    ServeProcess,
    TcpLink,
    check_invariants,
    device_loops,
    free_port,
    outbox_rows,
)
from .services import postgres_schema

pytestmark = [pytest.mark.service, pytest.mark.timeout(180)]

WAIT = 20
"""Seconds a test's long poll waits: well below ``SAFETY_POLL``, so an answer within it was
brought by an announcement, not by a waiter's own re-read."""


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema as a store URL (``...?schema=NAME``), dropped after."""
    assert WAIT < SAFETY_POLL
    async with postgres_schema() as url:
        yield url


@contextlib.asynccontextmanager
async def instances(url: str, count: int) -> AsyncIterator[list[Server]]:
    """``count`` in-process servers on the database ``url``."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Server(ServerConfig(
            db=url, port=0, admin_token=ADMIN_TOKEN))) for _ in range(count)]


async def call(http: aiohttp.ClientSession, method: str, url: str, json: Any = None
               ) -> Any:
    async with http.request(method, url, json=json,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def test_a_command_result_reaches_a_long_poll_on_another_instance(
        database: str, tmp_path: Path) -> None:
    async with instances(database, 2) as (one, two), aiohttp.ClientSession() as http:
        token = (await call(http, "POST", f"{one.url}/v1/devices", {"id": "d1"}))["token"]
        command = await call(http, "POST", f"{one.url}/v1/devices/d1/commands",
                             {"method": "blink", "params": {"n": 1}})
        waiting = asyncio.create_task(
            call(http, "GET", f"{one.url}/v1/commands/{command['id']}?wait={WAIT}"))
        async with Device("d1", two.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            dev.command("blink")(lambda params: {"blinked": params["n"]})
            await dev.sync()  # takes the command
            await dev.sync()  # brings its result to instance two
        done = await waiting
    assert (done["status"], done["result"]) == ("succeeded", {"blinked": 1})


async def test_a_live_channel_on_one_instance_wakes_for_a_write_through_another(
        database: str) -> None:
    async with instances(database, 2) as (one, two), aiohttp.ClientSession() as http:
        token = (await call(http, "POST", f"{two.url}/v1/devices", {"id": "d1"}))["token"]
        device_auth = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{one.url}/v1/wake", headers=device_auth) as resp:
            cursor = (await resp.json())["w"]

        async def hold() -> Any:
            async with http.get(f"{one.url}/v1/wake?after={cursor}&wait={WAIT}",
                                headers=device_auth) as resp:
                return await resp.json()

        held = asyncio.create_task(hold())
        await asyncio.sleep(0.2)  # most likely held by now; either way it must wake
        await call(http, "POST", f"{two.url}/v1/devices/d1/messages",
                   {"topic": "hello", "body": {}})
        answer = await held
    assert answer["wake"] is True and answer["w"] > cursor


async def test_a_feed_long_poll_on_one_instance_gets_items_committed_through_another(
        database: str, tmp_path: Path) -> None:
    async with instances(database, 2) as (one, two), aiohttp.ClientSession() as http:
        token = (await call(http, "POST", f"{two.url}/v1/devices", {"id": "d1"}))["token"]
        head = (await call(http, "GET", f"{one.url}/v1/feed?limit=1000"))["next"]
        waiting = asyncio.create_task(
            call(http, "GET", f"{one.url}/v1/feed?after={head}&wait={WAIT}"))
        async with Device("d1", two.url, token=token, path=tmp_path / "d1.db",
                          interval=None) as dev:
            await dev.emit("temp", {"c": 21})
            await dev.sync()
        page = await waiting
    assert [(i["kind"], i.get("topic")) for i in page["items"]] == [("event", "temp")]


async def test_a_running_request_of_a_live_instance_is_not_interrupted_by_another(
        database: str) -> None:
    """Instance two starting does not finish instance one's running requests; once one is
    gone (clean stop), the next recovery finishes them as interrupted, once."""
    async with instances(database, 1) as (one,):
        store = one.services.store
        await store.add_device(DeviceRecord("d1", "h", created=1))
        await store.commit(SyncWrite("d1", 5, requests=[ProxyRequest("d1", "r1", "x", {}, 5)]))
        assert await store.claim_request("d1", "r1", 6) is not None
        async with instances(database, 1) as (two,):
            assert await two.services.proxy.recover(two.config.instance_stale_ms) == 0
            request = await two.services.store.get_request("d1", "r1")
            assert request is not None and request.status == "running"
    async with instances(database, 1) as (three,):
        request = await three.services.store.get_request("d1", "r1")
        assert request is not None and request.status == "done"
        assert request.outcome is not None and request.outcome["error"] == "interrupted"


async def test_sinks_changed_through_one_instance_reach_the_others(database: str) -> None:
    """A sink created, paused and deleted through instance two's API is started, stopped
    and forgotten by instance one at its next reconcile (every third of the lease time)."""
    async with instances(database, 2) as (one, two), \
            AdminClient(two.url, ADMIN_TOKEN) as admin:
        sink = {"type": "webhook",
                "options": {"url": "http://127.0.0.1:9/hook", "secret": "s3cret"}}
        await admin.put_sink("hook", sink)
        record = await one.services.store.get_sink("hook")
        assert record is not None and one.services.sinks.running == set()
        await one.services.sinks.reconcile()
        assert one.services.sinks.running == {"hook"}
        await admin.request("PUT", "/v1/sinks/hook", json={**sink, "paused": True})
        await one.services.sinks.reconcile()
        record = await one.services.store.get_sink("hook")
        assert record is not None and one.services.sinks.state(record) == "paused"
        assert one.services.sinks.running == set()
        await admin.put_sink("hook", sink)  # resumed
        await one.services.sinks.reconcile()
        assert one.services.sinks.running == {"hook"}
        await admin.delete_sink("hook")
        await one.services.sinks.reconcile()
        assert one.services.sinks.running == set()


async def test_compaction_and_rebuilds_are_safe_while_another_instance_appends(
        database: str, tmp_path: Path) -> None:
    """A device and the cloud overwrite the same keys through two instances in turn (a
    balancer alternates): both instances compact every few rows and rebuild the growing
    document into new generations while the other appends. Both end with the device's
    document, and the device adopted the rebuilt generations."""
    config = ServerConfig(db=database, port=0, admin_token=ADMIN_TOKEN, compact_every=4,
                          rebuild_slack=256)
    async with Server(config) as one, Server(dataclasses.replace(config)) as two, \
            Balancer([one.url, two.url]) as lb, AdminClient(lb.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
        async with Device("d1", transport=HttpTransport(lb.url, token, timeout=5),
                          path=tmp_path / "d1.db", interval=None) as dev:
            adopted = 0
            for step in range(60):
                dev.state[f"k{step % 3}"] = f"device-{step}"
                adopted += (await dev.sync()).adopted
                await admin.patch_state("d1", {f"k{(step + 1) % 3}": f"cloud-{step}"})
            for _ in range(2):
                adopted += (await dev.sync()).adopted
            for server in (one, two):
                async with AdminClient(server.url, ADMIN_TOKEN) as direct:
                    assert await direct.state("d1") == crdt.to_json(dev.doc)
    rebuilds = one.services.docs.rebuilds + two.services.docs.rebuilds
    assert rebuilds >= 1 and adopted >= 1


# --- real processes behind a balancer, killed with kill -9 --------------------------------------

DEVICES = ("p1", "p2", "p3", "p4")
KILLS = 4


class Commands:
    """Commands queued through the balancer and how often each device ran each."""

    def __init__(self) -> None:
        self.queued: list[str] = []
        self.runs: Counter[tuple[str, int]] = Counter()

    def handler(self, device: str) -> Any:
        def bump(params: Any) -> dict[str, Any]:
            self.runs[(device, params["n"])] += 1
            return {"n": params["n"]}
        return bump

    async def queue(self, admin: AdminClient, device: str, n: int) -> None:
        item = await admin.request("POST", f"/v1/devices/{device}/commands",
                                   json={"method": "bump", "params": {"n": n}})
        self.queued.append(str(item["id"]))


async def test_instances_killed_behind_a_balancer_lose_and_duplicate_nothing(
        database: str, tmp_path: Path) -> None:
    rng = random.Random(16)
    servers = [ServeProcess(database, free_port(), tmp_path, name=f"i{n}",
                            args=["--log-level", "warning"]) for n in range(3)]
    ledgers = {d: Ledger(d) for d in DEVICES}
    commands = Commands()
    progress = Progress()
    try:
        for server in servers:
            await server.start()
        async with Balancer([s.url for s in servers]) as lb, \
                AdminClient(lb.url, ADMIN_TOKEN) as admin, \
                contextlib.AsyncExitStack() as stack:
            tokens = {d: (await admin.add_device(d))["token"] for d in DEVICES}
            devices = {d: await stack.enter_async_context(Device(
                d, transport=HttpTransport(lb.url, tokens[d], timeout=5),
                path=tmp_path / f"{d}.db", interval=None)) for d in DEVICES}
            for d, dev in devices.items():
                dev.command("bump")(commands.handler(d))
            async with device_loops(devices, ledgers, progress):
                for kill in range(KILLS):
                    for d in DEVICES:
                        await commands.queue(admin, d, kill)
                    await progress.wait_ok(progress.ok + rng.randint(8, 20))
                    victim = servers[kill % len(servers)]
                    await victim.kill()  # requests in flight to it fail; the others go on
                    await progress.wait_ok(progress.ok + rng.randint(4, 10))
                    await victim.start()
            for d in DEVICES:
                await devices[d].sync()
                await devices[d].sync()  # command results of the last round
            for server in servers:  # every instance shows the same, whole truth
                async with AdminClient(server.url, ADMIN_TOKEN) as direct:
                    for d in DEVICES:
                        await check_invariants(direct, devices[d], ledgers[d])
            results = [await admin.request("GET", f"/v1/commands/{i}?wait={WAIT}")
                       for i in commands.queued]
            served = dict(lb.served)
    finally:
        for server in servers:
            await server.close()
    assert len(commands.queued) == KILLS * len(DEVICES)
    assert [r["status"] for r in results] == ["succeeded"] * len(results)
    assert sorted(commands.runs) == sorted((d, k) for d in DEVICES for k in range(KILLS))
    assert set(commands.runs.values()) == {1}  # each command ran exactly once
    assert all(served.get(s.url, 0) > 10 for s in servers), served
    assert all(s.starts == 1 + sum(1 for k in range(KILLS) if k % 3 == n)
               for n, s in enumerate(servers))
    assert not any("Traceback" in s.log(n) for s in servers for n in range(1, s.starts + 1))
    assert all(outbox_rows(tmp_path / f"{d}.db") == 0 for d in DEVICES)


# --- the database goes away mid-sync -------------------------------------------------------


async def test_a_cut_database_connection_is_retryable_and_loses_nothing(
        database: str, tmp_path: Path) -> None:
    """The server reaches PostgreSQL through a link that is cut (every connection reset,
    new ones refused) three times while devices sync in a loop: syncs meanwhile fail with
    the retryable ``unavailable`` (503), the server keeps answering, and once the link is
    back everything acknowledged is there, exactly once."""
    async with TcpLink("127.0.0.1", 5432) as link:
        via_link = database.replace("127.0.0.1:5432", f"127.0.0.1:{link.port}")
        config = ServerConfig(db=via_link, port=0, admin_token=ADMIN_TOKEN)
        ledgers = {d: Ledger(d) for d in DEVICES[:2]}
        progress = Progress()
        async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin, \
                contextlib.AsyncExitStack() as stack:
            tokens = {d: (await admin.add_device(d))["token"] for d in ledgers}
            devices = {d: await stack.enter_async_context(Device(
                d, server.url, token=tokens[d], path=tmp_path / f"{d}.db", interval=None))
                for d in ledgers}
            refused: list[str] = []
            async with device_loops(devices, ledgers, progress):
                for _ in range(3):
                    await progress.wait_ok(progress.ok + 5)
                    link.cut()
                    with pytest.raises(CrdtsyncError) as raised:
                        await devices[DEVICES[0]].sync()
                    refused.append(raised.value.code)
                    async with aiohttp.ClientSession() as http, \
                            http.get(server.url + "/v1/health") as resp:
                        assert resp.status == 200  # the server itself keeps serving
                    link.restore()
                await progress.wait_ok(progress.ok + 5)
            for d, dev in devices.items():
                await dev.sync()
                await check_invariants(admin, dev, ledgers[d])
    assert refused == ["unavailable"] * 3
    assert set(progress.errors) <= {"unavailable"}
