"""The benchmarks run (quick mode): a smoke test, never a timing assertion."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import local_app
from .services import require_postgres

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["sync_basics.py", "templates_bytes.py", "compression.py",
                                    "throughput.py", "ingest.py", "storm.py", "memory.py",
                                    "device.py", "growth.py", "rebuild.py", "policy.py",
                                    "conflicts.py", "policy_cost.py", "wake.py",
                                    "files.py", "gateway.py"])
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


def test_scaleout_runs_in_quick_mode_on_postgres_and_drops_its_schemas() -> None:
    """``bench/scaleout.py --quick`` (it needs PostgreSQL): every configuration runs, the
    PostgreSQL backends' CPU is found for each PostgreSQL one, and every schema it made is
    gone afterwards."""
    import asyncpg

    url = require_postgres()
    result = subprocess.run([sys.executable, str(BENCH / "scaleout.py"), "--quick",
                             "--database", url], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    header = re.search(r"^\| figure \| (.*) \|$", result.stdout, re.M)
    assert header is not None, result.stdout
    assert header.group(1).split(" | ") == ["SQLite x1", "PostgreSQL x1", "PostgreSQL x2",
                                            "PostgreSQL x4"]
    per_sync = re.search(r"^\| PostgreSQL CPU per sync \(ms\) \| (.*) \|$", result.stdout,
                         re.M)
    assert per_sync is not None, result.stdout
    sqlite, *postgres = (float(x) for x in per_sync.group(1).split(" | "))
    assert sqlite == 0 and all(x > 0 for x in postgres), per_sync.group(0)
    schemas = re.findall(r"^PostgreSQL schema: (\w+)$", result.stdout, re.M)
    assert len(schemas) == 4, result.stdout  # x1, x2, x4, and the storm's x2

    async def left() -> list[str]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT schema_name FROM information_schema.schemata"
                                    " WHERE schema_name = any($1::text[])", schemas)
        finally:
            await conn.close()
        return [r["schema_name"] for r in rows]

    assert asyncio.run(left()) == []


def run_suite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_runner_runs_the_chosen_scripts() -> None:
    result = run_suite("--quick", "--only", "compression")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all passed" in result.stdout
    # the shared helpers are not benchmarks: not listed as scripts left out of the suite
    assert "common.py" not in result.stdout and "_serve.py" not in result.stdout


def test_runner_exits_non_zero_when_a_script_fails() -> None:
    result = run_suite("--quick", "--only", "compression", "--timeout", "0.01")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TIMEOUT" in result.stdout


def test_conflicts_bench_json_counts_every_device() -> None:
    """``bench/conflicts.py --json``: each row accounts for every device on both sides."""
    import json

    result = subprocess.run([sys.executable, str(BENCH / "conflicts.py"), "--quick", "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert {r["scenario"] for r in data["rows"]} == {"A", "B"}
    for row in data["rows"]:
        assert sum(row["won_cloud"].values()) == sum(row["won_device"].values()) == 3
        assert row["later"] == ("cloud" if row["scenario"] == "A" else "device")


def test_throughput_sql_stats_count_every_write_of_server_and_floor(tmp_path: Path) -> None:
    """``bench/throughput.py --quick --sql-stats DIR``: both sides' statement counts are
    written, the server's commits its device writes (one ``UPDATE devices`` each, at least
    one ``INSERT feed`` each since every sync brings events: more than 16 rows take two)
    and the table is printed."""
    import json

    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--quick",
                             "--sql-stats", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    server = json.loads((tmp_path / "server.json").read_text())
    direct = json.loads((tmp_path / "direct.json").read_text())

    def calls(stats: dict[str, list[float]], prefix: str) -> float:
        return sum(n for statement, (n, _) in stats.items() if statement.startswith(prefix))

    writes = calls(server, "UPDATE devices SET last_seq")
    assert writes > 0
    assert writes <= calls(server, "INSERT INTO feed") < writes * 1.05
    assert calls(direct, "many: INSERT INTO updates") > 0
    assert re.search(r"\| INSERT feed \| 1\.0\d \| [\d.]+ \| 1\.00 \|", result.stdout)


def test_throughput_against_another_checkout_alternates_and_prints_b_over_a() -> None:
    """``bench/throughput.py --quick --against TREE`` (here the checkout against itself): both
    servers run every round, the first round A then B, the second B then A, and the table
    gives B / A per round and its median."""
    root = BENCH.parent
    result = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--quick",
                             "--against", str(root)],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    order = re.findall(r"^round (\d)/2 crdtsync ([AB]):", result.stdout, flags=re.M)
    assert order == [("1", "A"), ("1", "B"), ("2", "B"), ("2", "A")]
    for n in (1, 2):
        assert re.search(rf"^\| {n} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d,]+ \| [\d,]+ \|$",
                         result.stdout, flags=re.M)
    assert re.search(r"^\| median \| [\d.]+ \| [\d.]+ \| \*\*[\d.]+\*\* \([\d.]+-[\d.]+\) \|",
                     result.stdout, flags=re.M)


async def test_the_lean_load_generator_frames_and_counts_every_exchange() -> None:
    """``lean_round`` (``bench/throughput.py``'s load generator) against a real aiohttp
    server: every request arrives whole, each device's in the order built and one at a time,
    every answer is counted once (a 200 whose ``ack`` covers the request as a sync, anything
    else as an error), with the bytes of the bodies that went each way, and each device's
    highest ``ack`` is kept."""
    import importlib

    import msgpack
    from aiohttp import web

    sys.path.insert(0, str(BENCH))
    throughput: Any = importlib.import_module("throughput")
    seen: list[tuple[str, int, int, bool, int]] = []  # device, last seq, status, short, size
    in_flight: set[str] = set()

    async def handler(request: web.Request) -> web.Response:
        message = msgpack.unpackb(await request.read(), raw=False)
        device, last = message["dev"], message["ev"][-1][0]
        assert device not in in_flight
        in_flight.add(device)
        await asyncio.sleep(0)
        in_flight.discard(device)
        status = 503 if len(seen) % 7 == 6 else 200
        ack = last - 1 if len(seen) % 11 == 10 else last  # one short now and then
        body = msgpack.packb({"ack": ack, "pad": "x" * 40})
        seen.append((device, last, status, ack < last, len(body)))
        return web.Response(body=body, status=status)

    app = web.Application()
    app.router.add_post("/v1/sync", handler)
    settings = throughput.Settings(devices=6, concurrency=4, duration=0.3, rounds=1,
                                   shared_docs=False, encoding="identity", quick=True,
                                   profile=None, seed=1)
    devices = throughput.fleet({f"d{n}": "t" for n in range(6)}, settings, 1)

    class Meter:  # the CPU meter reads a server process; this server is this process
        @staticmethod
        def thread_cpu() -> tuple[float, float]:
            return 0.0, 0.0

    async with local_app(app) as url:
        fleet = throughput.LeanFleet(url.split("//", 1)[1], devices)
        fleet.top_up(400)
        result = await throughput.lean_round(f"{url}/v1/sync", fleet, 4, 0.3, "crdtsync",
                                             [Meter()])
    for device in fleet.devices:  # each device's seqs in the order built, none skipped
        sent = [last for d, last, *_ in seen if d == device]
        assert sent == list(range(10, 10 * len(sent) + 1, 10))
        assert fleet.acked[device] == max(
            [last - short for d, last, status, short, _ in seen
             if d == device and status == 200], default=0)
    ok = [size for _, _, status, short, size in seen if status == 200 and not short]
    assert result.syncs == len(ok) > 0
    assert result.errors["503"] == sum(1 for _, _, status, *_ in seen if status == 503)
    assert result.errors["events not acknowledged"] == sum(
        1 for _, _, status, short, _ in seen if status == 200 and short)
    assert result.bytes_down == sum(ok)
    assert len(result.latencies) == len(seen)


@pytest.mark.parametrize("side", ["server", "direct"])
def test_instructions_children_run_the_syncs_they_count(side: str) -> None:
    """``bench/instructions.py``'s measured processes, without valgrind: every timed sync
    runs (the server side checks that each device's events are all stored)."""
    import json

    argv = [sys.executable, str(BENCH / "instructions.py"), "--child", side, "--devices", "3",
            "--passes", "2", "--concurrency", "2"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["syncs"] == 6
    warm = subprocess.run([*argv, "--warm-up-only"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert json.loads(warm.stdout.strip().splitlines()[-1])["syncs"] == 0


@pytest.mark.timeout(900)
def test_instructions_runs_in_quick_mode_under_valgrind() -> None:
    """The whole measurement, small: four callgrind runs, a ratio. CI installs valgrind
    (.ci/run), so there a missing valgrind fails the test; elsewhere it skips."""
    if shutil.which("valgrind") is None and os.environ.get("CI") != "true":
        pytest.skip("valgrind is not installed")
    result = subprocess.run([sys.executable, str(BENCH / "instructions.py"), "--quick"],
                            capture_output=True, text=True, timeout=850, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server / direct" in result.stdout


@pytest.mark.timeout(600)
def test_storm_instructions_runs_in_quick_mode_under_valgrind() -> None:
    """Both servers under callgrind for a storm of 50 devices: each counted something, and
    the ratio is theirs. Skips without valgrind, except in CI (.ci/run installs it)."""
    if shutil.which("valgrind") is None and os.environ.get("CI") != "true":
        pytest.skip("valgrind is not installed")
    result = subprocess.run([sys.executable, str(BENCH / "storm_instructions.py"), "--quick"],
                            capture_output=True, text=True, timeout=550, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = {name: int(count.replace(",", "")) for name, count in re.findall(
        r"\| (crdtsync serve|pycrdt-websocket) \| ([\d,]+) \|", result.stdout)}
    assert set(counts) == {"crdtsync serve", "pycrdt-websocket"}, result.stdout
    assert all(count > 100_000 for count in counts.values()), counts  # a reconnect's work
    ratio = counts["crdtsync serve"] / counts["pycrdt-websocket"]
    assert f"**{ratio:.2f}x**" in result.stdout



async def test_the_lean_load_generator_adopts_rebuilt_documents(tmp_path: Path) -> None:
    """``bench/throughput.py``'s prebuilt-request devices against a real server that rebuilds
    their documents often (``rebuild_slack`` 0): they adopt each new generation, the requests
    queued on the old one are built again with their events, and in the end every event is
    stored once and the server holds each device's own state."""
    import importlib

    from crdtsync import AdminClient
    from crdtsync_server import Server, ServerConfig

    from .conftest import ADMIN_TOKEN

    sys.path.insert(0, str(BENCH))
    throughput: Any = importlib.import_module("throughput")
    config = ServerConfig(db=str(tmp_path / "server.db"), port=0, admin_token=ADMIN_TOKEN,
                          rebuild_factor=2, rebuild_slack=0)

    class Meter:  # the CPU meter reads a server process; this server is this process
        @staticmethod
        def thread_cpu() -> tuple[float, float]:
            return 0.0, 0.0

    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        tokens = {f"d{n}": (await admin.add_device(f"d{n}"))["token"] for n in range(3)}
        settings = throughput.Settings(devices=3, concurrency=3, duration=60, rounds=1,
                                       shared_docs=False, encoding="identity", quick=True,
                                       profile=None, seed=3)
        devices = throughput.fleet(tokens, settings, 3)
        fleet = throughput.LeanFleet(server.url.split("//", 1)[1], devices)
        fleet.top_up(25)
        result = await throughput.lean_round(server.url + "/v1/sync", fleet, 3, 60,
                                             "crdtsync", [Meter()])
        # every request sent (the round ends when none is left), each answered 200
        assert dict(result.errors) == {"requests ran out before the round's end": 1}
        assert result.syncs == 75
        assert result.adoptions == sum(d.adoptions for d in devices) > 0
        assert all(d.gen > 0 for d in devices)
        common: Any = importlib.import_module("common")
        async with common.client_session(3, 60) as session:  # until one is not adopted:
            for dev in devices:  # the server holds what the device last wrote
                for _ in range(10):
                    adopted = dev.adoptions
                    await throughput.sync_once(session, server.url + "/v1/sync", dev)
                    if dev.adoptions == adopted:
                        break
        for dev in devices:
            assert (await admin.device(dev.id))["last_seq"] == dev.next_seq - 1 > 250
            state = (await admin.state(dev.id))["state"]  # numbers come back as floats
            assert state == {k: float(v) for k, v in dev.state.to_py().items()}
    assert server.services.docs.rebuilds >= result.adoptions


def test_the_machine_line_names_the_build_of_the_server_that_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under ``CRDTSYNC_BENCH_SERVER_TREE`` the machine line describes that checkout's server,
    asked of a Python started as its server is: a tree without compiled modules reads "no
    mypyc" whatever this checkout's build, and the line names the tree."""
    import importlib

    sys.path.insert(0, str(BENCH))
    common: Any = importlib.import_module("common")
    tree = tmp_path / "tree"
    shutil.copytree(BENCH.parent / "crdtsync", tree / "crdtsync",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(BENCH.parent / "server", tree / "server",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    monkeypatch.setenv(common.SERVER_TREE_ENV, str(tree))
    assert common.server_build() == f"no mypyc; server of {tree}"
    assert f"(no mypyc; server of {tree})" in common.machine()
    monkeypatch.delenv(common.SERVER_TREE_ENV)
    from crdtsync import _compiled
    expected = "hot path compiled with mypyc" if _compiled.active() else "no mypyc"
    assert common.server_build() == expected
