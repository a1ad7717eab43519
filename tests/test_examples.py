"""Every file in examples/ runs standalone (own server, own provisioning) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
EXPECTED = {
    "sensor.py": ["reading 1:", "synced: 1 round trip(s), 1 event(s) acked",
                  "the cloud changed config.unit", "ok: 5 readings arrived exactly once"],
    "gateway.py": ["gateway: 3 devices in one Gateway", "gateway-2: the cloud set config",
                   "HTTP request(s)", "ok: 3 devices x 5 events arrived exactly once"],
    "commands_and_requests.py": ["message 1 on 'config'", "command blink: blinked 3 time(s)",
                                 "succeeded, result {'blinked': 3}", "request weather: 200",
                                 "the API key never left the server"],
    "pipe_events.py": ["piped 3 event(s) (3 new)", "pipe resumed after cursor",
                       "piped 5 event(s) (5 new)", "events delivered again: 0 new row(s)",
                       "ok: 8 readings piped into SQLite exactly once"],
    "firmware.py": ["firmware 2.1: 3000000 bytes verified, installed",
                    "after the transfers: 0 file(s) queued",
                    "ok: firmware down verified, 2 file(s) up verified"],
}


def test_the_documented_examples_exist() -> None:
    assert set(EXPECTED) <= {path.name for path in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_standalone(path: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTSYNC_")}
    result = subprocess.run([sys.executable, "-W", "default", str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("ok: "), result.stdout
    for text in EXPECTED.get(path.name, []):
        assert text in result.stdout
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # the smoke run leaves nothing behind
