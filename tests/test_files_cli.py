"""``crdtsync file put|get|list`` and the ``serve`` file options, as subprocesses against a
``crdtsync serve`` subprocess: a fleet's firmware put from disk reaches a device, and what a
device sent is listed and fetched back byte for byte."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdtsync import Device

from .cli_process import ADMIN, Background, admin_env, clean_env, cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("serve") / "server.db"
    with Background("serve", "--db", str(db), "--port", "0", "--admin-token", ADMIN,
                    "--file-chunk", "65536", env=clean_env()) as proc:
        yield proc.url()
        assert proc.stop(signal.SIGTERM) == 0, proc.stderr


def _ok(*args: str, url: str) -> str:
    result = cli(*args, env=admin_env(url))
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _device(url: str, token: str, path: Path, upload: bytes) -> dict[str, bytes]:
    async with Device("cli-f1", url, token=token, path=path, interval=None) as dev:
        await dev.send_file("dump.bin", upload, meta={"n": 1})
        await dev.sync()
        await dev.sync_files()
        received: dict[str, bytes] = {}
        for name in dev.files:
            await dev.fetch_file(name, path.parent / f"got-{name}")
            received[name] = (path.parent / f"got-{name}").read_bytes()
        return received


def test_file_put_get_list(server: str, tmp_path: Path) -> None:
    _ok("fleet", "add", "lab", url=server)
    token = _ok("device", "add", "cli-f1", url=server).strip()
    _ok("fleet", "assign", "cli-f1", "lab", url=server)
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(os.urandom(300_000))
    record = json.loads(_ok("file", "put", "--fleet", "lab", "fw.bin", str(firmware),
                            "--meta", '{"version": "3"}', url=server))
    assert record["sha256"] == hashlib.sha256(firmware.read_bytes()).hexdigest()
    upload = os.urandom(200_000)
    received = asyncio.run(_device(server, token, tmp_path / "dev.db", upload))
    assert received == {"fw.bin": firmware.read_bytes()}
    listing = _ok("file", "list", "--device", "cli-f1", url=server)
    assert "dump.bin" in listing and "up" in listing and "200000" in listing
    _ok("file", "get", "--device", "cli-f1", "dump.bin", "--out", str(tmp_path / "back"),
        url=server)
    assert (tmp_path / "back").read_bytes() == upload
    missing = cli("file", "get", "--device", "cli-f1", "nope.bin", env=admin_env(server),
                  cwd=tmp_path)
    assert missing.returncode == 1 and "not_found" in missing.stderr
    assert not (tmp_path / "nope.bin").exists()
    both = cli("file", "list", "--device", "x", "--fleet", "y", env=admin_env(server))
    assert both.returncode == 2


def test_serve_file_options() -> None:
    from crdtsync.cli import build_parser, serve_config

    config = serve_config(build_parser().parse_args([
        "serve", "--files-dir", "/tmp/f", "--max-file-size", "10", "--file-quota", "20",
        "--file-chunk", "5", "--file-retention", "2"]))
    assert (config.files_dir, config.max_file_size, config.file_quota, config.file_chunk,
            config.file_retention_ms) == ("/tmp/f", 10, 20, 5, 172_800_000)
