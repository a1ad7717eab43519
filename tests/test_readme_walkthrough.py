"""The README's "30 seconds with the real thing", run as written: its shell commands (through
the installed command line, against a real ``crdtsync serve`` on a free port in a temporary
folder) and its Python snippet (twice, the second time after the fleet's template and schema
exist), in the README's order. The commands and the snippet are read from README.md itself,
so the test fails when the README drifts from what works."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from .cli_process import ADMIN, Background, admin_env, clean_env, cli

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## 30 seconds with the real thing"


def walkthrough() -> tuple[list[list[str]], str, list[tuple[list[str], str]]]:
    """The section's first commands after `serve` (``device add``), its Python snippet, and
    its second block of commands with each one's trailing comment."""
    text = README.read_text()
    section = text[text.index(SECTION):text.index("\n## ", text.index(SECTION) + 1)]
    blocks = re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)
    shell = [body for kind, body in blocks if kind == "sh"]
    python = [body for kind, body in blocks if kind == "python"]
    assert len(shell) == 3 and len(python) == 1, "the walkthrough's shape changed"
    first = [words for words, _ in commands(shell[1])]
    return first, python[0], commands(shell[2])


def commands(block: str) -> list[tuple[list[str], str]]:
    """``.venv/bin/crdtsync ...`` lines (``&&`` splits one line in two) as argument lists,
    each with its comment."""
    out = []
    for line in block.splitlines():
        code, _, comment = line.partition("  #")
        if ".venv/bin/crdtsync" not in code:
            continue
        for part in code.split("&&"):
            words = shlex.split(part.replace("$(", " ").replace(")", " "))
            words = words[words.index(".venv/bin/crdtsync") + 1:]
            out.append((words, comment.strip()))
    return out


def schema_example() -> dict[str, object]:
    text = README.read_text()
    section = text[text.index("## Typed state"):]
    found = re.search(r"```json\n(.*?)```", section, flags=re.S)
    assert found is not None, "the schema example is gone"
    example: dict[str, object] = json.loads(found.group(1))
    return example


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    first, snippet, second = walkthrough()
    (tmp_path / "schema.json").write_text(json.dumps(schema_example()))
    with Background("serve", "--db", str(tmp_path / "server.db"), "--port", "0",
                    "--admin-token", ADMIN, env=clean_env()) as server:
        env = admin_env(server.url())
        assert first == [["device", "add", "sensor-7"]]
        added = cli(*first[0], env=env, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        device_env = {**env, "TOKEN": added.stdout.strip()}

        def run_snippet() -> str:
            done = subprocess.run([sys.executable, "-c", snippet], capture_output=True,
                                  text=True, env=device_env, cwd=tmp_path, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert run_snippet().startswith("1 ")  # the first event's seq, then the report
        for words, comment in second:
            if words[-1] == "--follow":  # runs until Ctrl-C: read what is there instead
                words = words[:-1]
            done = cli(*words, env=env, cwd=tmp_path)
            assert done.returncode == 0, (words, done.stderr)
            if words == ["state", "sensor-7"]:  # the README shows the answer
                assert json.loads(done.stdout) == json.loads(comment)
            if words == ["events"]:
                events = [json.loads(line) for line in done.stdout.splitlines()]
                assert [(e["topic"], e["body"]) for e in events] == [  # the first run's
                    ("readings", {"temp": 21.5, "hum": 40})]
        assert run_snippet().startswith("2 ")  # again, now under the template and schema
        assert run_snippet().startswith("3 ")  # and with the template known to the device
        state = cli("state", "sensor-7", env=env, cwd=tmp_path)
        assert json.loads(state.stdout)["state"] == {"voltage": 3.71, "interval": 30}
        assert server.stop(signal.SIGTERM) == 0
