"""The ``crdtsync`` command, run as subprocesses against a ``crdtsync serve`` subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdtsync import Device, SyncReport
from crdtsync.errors import Forbidden, Unauthorized

from .cli_process import ADMIN, Background, admin_env, clean_env, cli, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``crdtsync serve`` subprocess on a free port; its URL."""
    db = tmp_path_factory.mktemp("serve") / "server.db"
    with Background("serve", "--db", str(db), "--port", "0", "--admin-token", ADMIN,
                    env=clean_env()) as proc:
        yield proc.url()
        assert proc.stop(signal.SIGTERM) == 0, proc.stderr
    assert "stopped" in proc.stderr


def add_device(url: str, device_id: str) -> str:
    result = cli("device", "add", device_id, env=admin_env(url))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def run_device(url: str, device_id: str, token: str, path: Path,
                     events: int) -> SyncReport:
    async with Device(device_id, url, token=token, path=path, interval=None) as device:
        device.state["voltage"] = 3.7
        for n in range(events):
            await device.emit("readings", {"n": n})
        return await device.sync()


def test_health_answers_while_serving(server: str) -> None:
    with urllib.request.urlopen(f"{server}/v1/health", timeout=10) as resp:
        assert json.load(resp) == {"ok": True}


def test_device_add_prints_only_a_token_a_device_can_use(server: str, tmp_path: Path) -> None:
    result = cli("device", "add", "cli-1", "--meta", '{"site": "lab"}', env=admin_env(server))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == f"{token}\n" and len(token) == 22  # 128 random bits
    report = asyncio.run(run_device(server, "cli-1", token, tmp_path / "d.db", events=2))
    assert report.events_acked == 2


def test_device_list_and_show(server: str) -> None:
    add_device(server, "cli-2")
    listing = cli("device", "list", env=admin_env(server))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("ID ") and "\ncli-2 " in listing.stdout
    show = cli("device", "show", "cli-2", env=admin_env(server))
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["id"] == "cli-2"
    missing = cli("device", "show", "nobody", env=admin_env(server))
    assert (missing.returncode, missing.stderr) == (1, "error: not_found: no device 'nobody'\n")


def test_state_set_then_state_shows_it(server: str) -> None:
    env = admin_env(server)
    add_device(server, "cli-3")
    result = cli("state", "set", "cli-3", "interval=30", "mode=eco", "ratio=0.5", "tags=[1,2]",
                 "word=hello world", "nan=NaN", env=env)
    assert result.returncode == 0, result.stderr
    expected = {"interval": 30, "mode": "eco", "ratio": 0.5, "tags": [1, 2],
                "word": "hello world", "nan": "NaN"}
    assert json.loads(result.stdout) == expected
    assert cli("state", "set", "cli-3", "mode=null", env=env).returncode == 0
    assert cli("state", "set", "cli-3", "led=blue", "--map", "config", env=env).returncode == 0
    shown = cli("state", "cli-3", env=env)
    assert shown.returncode == 0, shown.stderr
    del expected["mode"]
    assert json.loads(shown.stdout) == {"state": expected, "config": {"led": "blue"}}
    config = cli("state", "cli-3", "--map", "config", env=env)
    assert json.loads(config.stdout) == {"led": "blue"}


@pytest.mark.parametrize("args", [["state", "set", "cli-3"], ["state", "set", "cli-3", "novalue"],
                                  ["state", "a", "b"], ["device", "add", "x", "--meta", "[]"],
                                  ["events", "--limit", "0"]])
def test_usage_errors_exit_2(server: str, args: list[str]) -> None:
    result = cli(*args, env=admin_env(server))
    assert result.returncode == 2 and "error" in result.stderr and result.stdout == ""


def test_template_typo_exits_1_naming_the_valid_types(server: str) -> None:
    """Finding 11 of issue 11: ``"flaot32"`` used to become a string field, exit 0."""
    env = admin_env(server)
    assert cli("fleet", "add", "cli-typos", env=env).returncode == 0
    result = cli("template", "cli-typos", "t", '{"temp": "flaot32", "hum": "uint8"}', env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: invalid_value: template temp: unknown type "
                                    "'flaot32' (did you mean 'float32'?); valid types: int8,")
    listing = cli("template", "cli-typos", env=env)
    assert (listing.returncode, json.loads(listing.stdout)) == (0, {})


def test_events_print_ndjson(server: str, tmp_path: Path) -> None:
    token = add_device(server, "cli-4")
    asyncio.run(run_device(server, "cli-4", token, tmp_path / "d.db", events=3))
    result = cli("events", "--device", "cli-4", env=admin_env(server))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["device"], e["seq"], e["topic"], e["body"]) for e in events] == [
        ("cli-4", n + 1, "readings", {"n": n}) for n in range(3)]
    limited = cli("events", "--device", "cli-4", "--limit", "2", env=admin_env(server))
    assert len(limited.stdout.splitlines()) == 2
    after = cli("events", "--device", "cli-4", "--after", events[0]["cursor"],
                env=admin_env(server))
    assert [json.loads(line)["seq"] for line in after.stdout.splitlines()] == [2, 3]
    none = cli("events", "--topic", "no-such-topic", env=admin_env(server))
    assert (none.returncode, none.stdout) == (0, "")


def test_events_follow_prints_new_events_until_ctrl_c(server: str, tmp_path: Path) -> None:
    token = add_device(server, "cli-5")
    asyncio.run(run_device(server, "cli-5", token, tmp_path / "d.db", events=1))
    with Background("events", "--device", "cli-5", "--follow", "--poll", "0.1",
                    env=admin_env(server)) as follow:
        assert follow.wait_for(r'"seq":1\b')
        asyncio.run(run_device(server, "cli-5", token, tmp_path / "d.db", events=1))
        assert follow.wait_for(r'"seq":2\b')
        assert follow.stop(signal.SIGINT) == 0, follow.stderr
    assert len(follow.seen) == 2


def test_wrong_admin_token_is_unauthorized(server: str) -> None:
    result = cli("device", "list", "--url", server, "--admin-token", "wrong", env=clean_env())
    assert result.returncode == 1
    assert result.stderr.startswith("error: unauthorized: ")


def test_missing_admin_token_is_a_usage_error(server: str) -> None:
    result = cli("device", "list", env=clean_env(CRDTSYNC_URL=server))
    assert result.returncode == 2 and "CRDTSYNC_ADMIN_TOKEN" in result.stderr


def test_unreachable_server_is_a_transport_error() -> None:
    result = cli("events", "--url", f"http://127.0.0.1:{free_port()}", "--admin-token", "x",
                 env=clean_env())
    assert result.returncode == 1 and result.stderr.startswith("error: transport: ")


def test_serve_creates_and_prints_an_admin_token_only_at_first_start(tmp_path: Path) -> None:
    db = str(tmp_path / "fresh.db")
    with Background("serve", "--db", db, "--port", "0", env=clean_env()) as first:
        token = first.wait_for(r"admin token \(shown once, store it\): (\S+)").group(1)
        url = first.url()
        assert cli("device", "list", env=admin_env(url, token)).returncode == 0
        assert first.stop(signal.SIGINT) == 0, first.stderr

    with Background("serve", "--db", db, "--port", "0", env=clean_env()) as second:
        url = second.url()
        assert cli("device", "list", env=admin_env(url, token)).returncode == 0
        assert second.stop() == 0, second.stderr
    assert not any("shown once" in line or token in line for line in second.seen)


def test_serve_reports_a_taken_port(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    result = cli("serve", "--db", "memory:", "--port", port, "--admin-token", "x",
                 env=clean_env())
    assert result.returncode == 1 and result.stderr.startswith("error: ")


def test_demo_runs_and_reports_exactly_once(tmp_path: Path) -> None:
    result = cli("demo", "--devices", "2", "--duration", "4", "--port", "0",
                 "--db", str(tmp_path / "demo.db"), "--data-dir", str(tmp_path / "demo"),
                 env=clean_env(), timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exactly once: yes" in result.stdout
    assert "state converged: yes" in result.stdout
    for device_id in ("demo-1", "demo-2"):
        assert re.search(rf"{device_id}: emitted ([1-9]\d*), in cloud \1 .*: exactly once",
                         result.stdout)
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


def test_serve_options_become_the_server_config() -> None:
    from crdtsync.cli import build_parser, serve_config

    args = build_parser().parse_args([
        "serve", "--db", "x.db", "--port", "0", "--cache-docs", "7", "--cache-idle", "2.5",
        "--backlog", "99", "--feed-retention", "1.5", "--max-body", "1000"])
    config = serve_config(args)
    assert (config.db, config.port, config.cache_docs, config.cache_idle, config.backlog,
            config.max_body) == ("x.db", 0, 7, 2.5, 99, 1000)
    assert config.feed_retention_ms == 129_600_000  # 1.5 days
    defaults = serve_config(build_parser().parse_args(["serve"]))
    assert defaults.feed_retention_ms is None
    assert (defaults.header_timeout, defaults.body_timeout) == (10.0, 30.0)
    timeouts = serve_config(build_parser().parse_args(
        ["serve", "--header-timeout", "2.5", "--body-timeout", "120"]))
    assert (timeouts.header_timeout, timeouts.body_timeout) == (2.5, 120.0)
    for option in ("--feed-retention", "--header-timeout", "--body-timeout"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", option, "0"])


def test_serve_tunes_the_garbage_collector_unless_told_not_to() -> None:
    from crdtsync.cli import SERVE_GC_YOUNG, build_parser, serve_config
    from crdtsync_server import ServerConfig

    assert ServerConfig().gc_young == 0  # embedded: left to the host process
    assert serve_config(build_parser().parse_args(["serve"])).gc_young == SERVE_GC_YOUNG
    for given in ("0", "2000"):
        config = serve_config(build_parser().parse_args(["serve", "--gc-young", given]))
        assert config.gc_young == int(given)
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--gc-young", bad])


def test_serve_rebuild_options() -> None:
    from crdtsync.cli import build_parser, serve_config

    defaults = serve_config(build_parser().parse_args(["serve"]))
    assert (defaults.rebuild_factor, defaults.rebuild_slack) == (2.0, 1024)
    tuned = serve_config(build_parser().parse_args(
        ["serve", "--rebuild-factor", "3.5", "--rebuild-slack", "0"]))
    assert (tuned.rebuild_factor, tuned.rebuild_slack) == (3.5, 0)
    assert serve_config(build_parser().parse_args(
        ["serve", "--rebuild-factor", "0"])).rebuild_factor == 0
    for option, value in (("--rebuild-factor", "0.5"), ("--rebuild-factor", "-1"),
                          ("--rebuild-factor", "x"), ("--rebuild-slack", "-1")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", option, value])


def test_device_token_disable_enable_delete(server: str, tmp_path: Path) -> None:
    """The credential lifecycle from the command line, each step checked with a real
    device: a new token replaces the old one, disable refuses syncs, delete forgets it."""
    env = admin_env(server)
    old = add_device(server, "cli-life")
    assert asyncio.run(run_device(server, "cli-life", old, tmp_path / "a.db", 1)).events_acked == 1
    rotated = cli("device", "token", "cli-life", env=env)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert rotated.stdout == f"{new}\n" and len(new) == 22 and new != old
    assert "old one no longer works" in rotated.stderr
    with pytest.raises(Unauthorized):
        asyncio.run(run_device(server, "cli-life", old, tmp_path / "a.db", 0))
    assert asyncio.run(run_device(server, "cli-life", new, tmp_path / "a.db", 1)).events_acked == 1

    disabled = cli("device", "disable", "cli-life", env=env)
    assert disabled.returncode == 0, disabled.stderr
    assert json.loads(disabled.stdout)["disabled"] is True
    with pytest.raises(Forbidden):
        asyncio.run(run_device(server, "cli-life", new, tmp_path / "a.db", 1))
    enabled = cli("device", "enable", "cli-life", env=env)
    assert json.loads(enabled.stdout)["disabled"] is False
    report = asyncio.run(run_device(server, "cli-life", new, tmp_path / "a.db", 0))
    assert report.events_acked == 1  # the event emitted while disabled

    deleted = cli("device", "delete", "cli-life", "--events", env=env)
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted.stderr
    assert "deleted device cli-life and its events" in deleted.stderr
    assert cli("events", "--device", "cli-life", env=env).stdout == ""
    with pytest.raises(Unauthorized):
        asyncio.run(run_device(server, "cli-life", new, tmp_path / "a.db", 0))
    for action in ("token", "disable", "enable", "delete"):
        missing = cli("device", action, "cli-life", env=env)
        assert (missing.returncode, missing.stderr) == (
            1, "error: not_found: no device 'cli-life'\n")
