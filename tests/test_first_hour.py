"""What a new user meets in the first hour (issue 18): the README's walkthrough stays
consistent with itself, mistyped values and an absent server get a clear one-line answer,
and every command's help reads as plain text."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdtsync.cli import UsageError, build_parser, parse_assignment
from crdtsync.demo import cli_path

from .cli_process import admin_env, clean_env, cli, free_port

README = Path(__file__).resolve().parent.parent / "README.md"


# --- KEY=VALUE ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("n=30", 30), ("r=0.5", 0.5), ("on=true", True), ("mode=eco", "eco"),
    ("words=hello world", "hello world"), ("tags=[1, 2]", [1, 2]), ('cfg={"a": 1}', {"a": 1}),
    ('name="quoted"', "quoted"), ("gone=null", None), ("nan=NaN", "NaN"),
])
def test_a_value_is_json_or_else_a_word(text: str, expected: object) -> None:
    assert parse_assignment(text)[1] == expected


@pytest.mark.parametrize("text", ['cfg={"a": 1,', "tags=[1, 2", 'name="open', " cfg={}}"])
def test_a_value_that_starts_like_json_but_is_broken_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_assignment(text)
    key, value = text.split("=", 1)
    assert parse_assignment(text, string=True) == (key, value)  # unless asked for text


def test_state_set_with_broken_json_exits_2_and_stores_nothing() -> None:
    # Refused before any request: no server needed to see it.
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("state", "set", "dev", 'cfg={"a": 1,', env=admin_env(url))
    assert result.returncode == 2 and result.stdout == ""
    assert "not valid JSON" in result.stderr and "--string" in result.stderr


# --- no server ----------------------------------------------------------------------------


def test_a_command_without_a_server_says_where_it_looked_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("device", "list", "--url", url, "--admin-token", "x", env=clean_env())
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"is `crdtsync serve` running at {url}?" in lines[0]
    assert "connection refused" in lines[0] and "ConnectionKey" not in lines[0]


# --- help ---------------------------------------------------------------------------------


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("crdtsync",)
            ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_help_is_plain_text_and_names_every_positional() -> None:
    seen = 0
    for path, parser in parsers(build_parser()):
        seen += 1
        text = parser.format_help()
        assert "``" not in text, path
        for action in parser._actions:
            if not action.option_strings and not isinstance(
                    action, argparse._SubParsersAction):
                assert action.help, (path, action.dest)
    assert seen > 30  # every command and sub-command was walked


def test_state_usage_and_options_agree_on_the_map_metavar() -> None:
    state = dict(parsers(build_parser()))[("crdtsync", "state")]
    text = state.format_help()
    assert "[--map NAME]" in text and "--map NAME " in text and "--map MAP" not in text


# --- the README's walkthrough -------------------------------------------------------------


def test_the_readme_snippet_emits_every_field_of_the_readme_template() -> None:
    """Re-running the README's Python snippet after its `crdtsync template` command must not
    fail for a missing field: the event it emits has every field of the template."""
    text = README.read_text()
    template = re.search(r"crdtsync template pumps readings '(\{.*?\})'", text)
    emitted = re.search(r'dev\.emit\("readings", (\{.*?\})\)', text)
    assert template is not None and emitted is not None
    fields = json.loads(template.group(1))
    body = json.loads(emitted.group(1))
    assert set(body) == set(fields)


def test_serve_on_a_taken_port_suggests_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--db", str(tmp_path / "s.db"), "--port", str(port),
                     "--admin-token", "a" * 40, env=clean_env())
    assert result.returncode == 1
    assert "address already in use" in result.stderr and "--port" in result.stderr


def test_the_demo_names_a_crdtsync_that_runs_from_another_shell() -> None:
    """The demo prints a command to watch the events: its ``crdtsync`` must exist as printed
    (the venv's script when ``crdtsync`` is not on the PATH)."""
    command = cli_path()
    assert shutil.which(command) is not None or Path(command).is_file()


def test_client_options_work_before_the_command_and_after_it_win() -> None:
    before, after = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    result = cli("--url", before, "--admin-token", "x", "device", "list", env=clean_env())
    assert result.returncode == 1 and f"running at {before}?" in result.stderr
    result = cli("--url", before, "device", "list", "--url", after, "--admin-token", "x",
                 env=clean_env())
    assert result.returncode == 1 and f"running at {after}?" in result.stderr
    result = cli("device", "list", env=clean_env(CRDTSYNC_URL=before, CRDTSYNC_ADMIN_TOKEN="x"))
    assert result.returncode == 1 and f"running at {before}?" in result.stderr


def test_not_found_reads_the_same_whoever_says_it() -> None:
    """One wording for a missing thing, "no <kind> '<id>'", from the service and from every
    store (the CLI prints it as is)."""
    import crdtsync_server
    root = Path(crdtsync_server.__file__).parent
    wordings = [line for path in root.rglob("*.py") for line in path.read_text().splitlines()
                if "NotFound(f\"" in line and "does not exist" in line]
    assert wordings == []
