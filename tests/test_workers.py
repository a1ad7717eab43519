"""``crdtsync serve --workers N`` as a real subprocess: N worker processes share the port
(SO_REUSEPORT), a supervisor restarts a killed one, nothing synced is lost, SIGTERM stops
them all; the once-per-start work is the supervisor's, not a worker's; and ``--database`` /
``CRDTSYNC_DATABASE``, never showing a password."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient, Device, TransportError
from crdtsync.cli import build_parser, listening_line, serve_config
from crdtsync_server import ServerConfig, open_services
from crdtsync_server.api.app import WORKER_HEADER
from crdtsync_server.api.workers import MAX_START_FAILURES
from crdtsync_server.core import settle_database
from crdtsync_server.proxied.executor import RouteExecutor
from crdtsync_server.store import SQLiteStore, SyncWrite
from crdtsync_server.validation import redact_dsn

from .cli_process import Background, clean_env, cli, free_port
from .services import postgres_schema
from .store_backends import add_device, req

TOKEN_LINE = r"admin token \(shown once, store it\): (\S+)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pid(proc: Background, number: int, start: int = 1) -> int:
    """The pid of the ``start``-th process of worker ``number`` to listen (from the log)."""
    return int(proc.wait_for_log(rf"worker {number} listening \(pid (\d+)\)",
                                 nth=start).group(1))


async def answering_workers(url: str, expected: set[int], tries: int = 200) -> set[int]:
    """The worker pids that answered ``GET /v1/health`` over fresh connections, asked until
    all of ``expected`` answered or ``tries`` connections were made."""
    seen: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection every time
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(tries):
            async with http.get(url + "/v1/health") as resp:
                assert resp.status == 200
                seen.add(int(resp.headers[WORKER_HEADER].split("/")[1]))
            if seen >= expected:
                break
    return seen


@dataclass
class Ledger:
    """What one device did that the cloud must hold exactly once."""

    dev: Device
    emitted: list[dict[str, Any]] = field(default_factory=list)

    async def round(self, n: int) -> None:
        """Emit two events and write a key, then sync until a sync succeeds (a connection
        to a killed worker fails the first attempt)."""
        for k in range(2):
            body = {"round": n, "k": k}
            await self.dev.emit("t", body)
            self.emitted.append(body)
        self.dev.state["round"] = n
        for _ in range(20):
            try:
                await self.dev.sync()
                return
            except TransportError:
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.dev.id}: no sync succeeded")


async def check_cloud(admin: AdminClient, ledger: Ledger) -> None:
    """Every event exactly once, in order; the cloud's state is the device's."""
    events = [e async for e in admin.iter_events(device=ledger.dev.id)]
    assert [e["seq"] for e in events] == list(range(1, len(ledger.emitted) + 1))
    assert [e["body"] for e in events] == ledger.emitted
    assert ledger.dev.pending_events == 0
    cloud = await admin.state(ledger.dev.id)
    assert cloud["state"]["round"] == ledger.dev.state["round"]


async def start_devices(admin: AdminClient, url: str, tmp_path: Path, count: int
                        ) -> list[Ledger]:
    ledgers = []
    for n in range(count):
        added = await admin.add_device(f"dev-{n}")
        dev = Device(f"dev-{n}", url, token=added["token"], path=tmp_path / f"dev-{n}.db",
                     interval=None, live=False)
        await dev.start()
        ledgers.append(Ledger(dev))
    return ledgers


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The workers' database: a SQLite file, or a schema of its own on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server.db'}"
        return
    async with postgres_schema() as url:
        yield url


async def test_workers_share_the_port_survive_a_kill_and_stop_on_sigterm(
        database: str, tmp_path: Path) -> None:
    port = free_port()
    with Background("serve", "--workers", "2", "--port", str(port),
                    env=clean_env(CRDTSYNC_DATABASE=database)) as proc:
        token = (await asyncio.to_thread(proc.wait_for, TOKEN_LINE)).group(1)
        url = await asyncio.to_thread(proc.url)
        assert f"(database: {database}; 2 worker processes)" in proc.seen[-1]
        first = {n: await asyncio.to_thread(worker_pid, proc, n) for n in (1, 2)}
        assert await answering_workers(url, set(first.values())) == set(first.values())

        async with AdminClient(url, token) as admin:
            ledgers = await start_devices(admin, url, tmp_path, 4)
            try:
                for n in range(3):
                    await asyncio.gather(*(ledger.round(n) for ledger in ledgers))
                # a cloud write through one worker reaches a device through any
                await admin.patch_state("dev-0", {"setpoint": 21})
                await ledgers[0].dev.sync()
                assert ledgers[0].dev.state["setpoint"] == 21

                os.kill(first[2], signal.SIGKILL)
                await asyncio.to_thread(
                    proc.wait_for_log, rf"worker 2 \(pid {first[2]}\) died \(killed by SIGKILL\)")
                for n in range(3, 6):  # service goes on, through worker 1 meanwhile
                    await asyncio.gather(*(ledger.round(n) for ledger in ledgers))
                restarted = await asyncio.to_thread(worker_pid, proc, 2, 2)
                assert restarted != first[2] and not alive(first[2])
                now = {first[1], restarted}
                assert await answering_workers(url, now) == now
                for n in range(6, 8):
                    await asyncio.gather(*(ledger.round(n) for ledger in ledgers))
                for ledger in ledgers:
                    await check_cloud(admin, ledger)
            finally:
                for ledger in ledgers:
                    await ledger.dev.aclose()

        assert await asyncio.to_thread(proc.stop, signal.SIGTERM) == 0, proc.stderr
    assert "stopped" in proc.stderr
    assert not any(alive(pid) for pid in (*first.values(), restarted))
    assert sum("shown once" in line for line in proc.seen) == 1  # one token, printed once
    assert not any("Traceback" in line for line in proc.stderr), proc.stderr


def test_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    port = free_port()
    with Background("serve", "--database", "memory:", "--port", str(port),
                    "--admin-token", "x", env=clean_env()) as lone:
        lone.url()
        result = cli("serve", "--workers", "2", "--port", str(port),
                     "--database", str(tmp_path / "server.db"), env=clean_env())
        assert lone.stop() == 0
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert "address already in use" in result.stderr
    assert "listening" not in result.stdout
    assert "shown once" not in result.stdout  # checked before the database was touched
    assert not (tmp_path / "server.db").exists()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    result = cli("serve", "--workers", "2", "--port", str(free_port()),
                 "--database", str(tmp_path / "server.db"),
                 "--routes", str(tmp_path / "missing.json"), env=clean_env())
    assert result.returncode == 1
    assert re.search(r"error: workers_failed: worker \d \(pid \d+\) failed to start: .*"
                     r"missing\.json", result.stderr), result.stderr
    assert "listening" not in result.stdout


def test_a_worker_that_keeps_failing_to_restart_makes_the_supervisor_give_up(
        tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text('{"routes": {}}')
    with Background("serve", "--workers", "2", "--port", str(free_port()),
                    "--database", str(tmp_path / "server.db"), "--routes", str(routes),
                    env=clean_env()) as proc:
        proc.url()
        pids = {n: worker_pid(proc, n) for n in (1, 2)}
        routes.unlink()  # every later start of a worker fails
        os.kill(pids[1], signal.SIGKILL)
        assert proc.proc.wait(timeout=60) == 1
    assert re.search(r"error: workers_failed: worker 1 .* failed to start: .*routes\.json.*"
                     r"giving up", "\n".join(proc.stderr)), proc.stderr
    # one restart after the kill, then MAX_START_FAILURES failed ones, the last fatal
    restarts = sum("restarting worker 1" in line for line in proc.stderr)
    assert restarts == MAX_START_FAILURES, proc.stderr
    assert not alive(pids[2])


@pytest.mark.parametrize(("args", "complaint"), [
    (["--database", "memory:", "--port", "8787"], "memory: each process would have its own"),
    (["--database", "x.db", "--port", "0"], "--workers needs a fixed --port"),
])
def test_workers_refuse_what_cannot_be_shared(args: list[str], complaint: str) -> None:
    result = cli("serve", "--workers", "2", *args, env=clean_env())
    assert result.returncode == 2 and complaint in result.stderr, result.stderr


def test_database_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRDTSYNC_DATABASE", raising=False)
    assert serve_config(build_parser().parse_args(["serve"])).db == "./crdtsync.db"
    monkeypatch.setenv("CRDTSYNC_DATABASE", "sqlite:///from-env.db")
    assert serve_config(build_parser().parse_args(["serve"])).db == "sqlite:///from-env.db"
    for flag in ("--database", "--db"):
        parsed = build_parser().parse_args(["serve", flag, "flag.db"])
        assert serve_config(parsed).db == "flag.db"
    assert build_parser().parse_args(["serve"]).workers == 1


def test_a_password_in_the_database_url_is_never_shown() -> None:
    url = "postgresql://app:hunter2@127.0.0.1:1/sync"
    assert redact_dsn(url) == "postgresql://app:***@127.0.0.1:1/sync"
    assert redact_dsn("postgresql://u:p@ss@h/db?sslmode=require") == (
        "postgresql://u:***@h/db?sslmode=require")
    assert redact_dsn("host=h password=hunter2 dbname=d") == "host=h password=*** dbname=d"
    assert redact_dsn("sqlite:////var/lib/sync.db") == "sqlite:////var/lib/sync.db"
    line = listening_line("http://127.0.0.1:8787", url, 2)
    assert "hunter2" not in line and "app:***@127.0.0.1:1/sync; 2 worker" in line
    for args in (["serve", "--database", url], ["serve", "--workers", "2", "--database", url],
                 ["serve", "--help"]):
        result = cli(*args, env=clean_env(CRDTSYNC_DATABASE=url), timeout=30)
        assert "hunter2" not in result.stdout + result.stderr, args


async def test_a_worker_leaves_a_live_siblings_running_requests_alone(tmp_path: Path) -> None:
    """A worker starting beside a running sibling does not mark the sibling's proxied
    requests interrupted; once the sibling is gone (it closed), a worker's recovery does,
    once. The supervisor's settling makes the admin token once and touches no request."""
    db = str(tmp_path / "server.db")
    created = await settle_database(ServerConfig(db=db))  # no token given: one is made
    assert created and await settle_database(ServerConfig(db=db)) is None  # made once
    config = ServerConfig(db=db, admin_token="x", worker=2)
    async with SQLiteStore(db, instance="sibling") as sibling:
        await add_device(sibling)
        await sibling.commit(SyncWrite("dev-1", time=20, requests=[req("a")]))
        await sibling.heartbeat(config.clock())
        assert await sibling.claim_request("dev-1", "a", now=config.clock()) is not None
        async with open_services(config, executor=RouteExecutor(), loops=False) as services:
            running = await services.store.get_request("dev-1", "a")
            assert running is not None and running.status == "running"
    async with open_services(config, executor=RouteExecutor(), loops=False) as services:
        done = await services.store.get_request("dev-1", "a")
        assert done is not None and done.status == "done"
        assert done.outcome is not None and done.outcome["error"] == "interrupted"
