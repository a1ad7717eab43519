"""docs/architecture.md and README.md stay true to the tree: the Layout block of
architecture.md names every module of ``crdtsync/`` and ``server/crdtsync_server/`` (one line
each, by its path inside the package), and the README's ``crdtsync serve`` synopsis and the
synopsis of every command in ``crdtsync/cli.py``'s docstring name exactly the flags the
parser accepts."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from crdtsync import cli

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"crdtsync/": ROOT / "crdtsync",
            "server/crdtsync_server/": ROOT / "server" / "crdtsync_server"}
COMMANDS: dict[str, argparse.ArgumentParser] = next(
    action.choices for action in cli.build_parser()._actions
    if isinstance(action, argparse._SubParsersAction))
"""Each ``crdtsync`` command's parser, by name."""


def layout_block() -> str:
    """The first code block after the ``## Layout`` heading of architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    match = re.search(r"^## Layout\n.*?```\n(.*?)```", text, flags=re.S | re.M)
    assert match, "no code block under '## Layout' in docs/architecture.md"
    return match.group(1)


def listed_modules() -> dict[str, set[str]]:
    """Per package header line (``crdtsync/``, ``server/crdtsync_server/``), the names its
    entries start with: lines indented by exactly two spaces (deeper lines continue one)."""
    listed: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in layout_block().splitlines():
        header = line.split(" ", 1)[0]
        if header in PACKAGES:
            current = listed.setdefault(header, set())
        elif current is not None and re.match(r"^  \S", line):
            current.add(line.split()[0])
    return listed


def actual_modules(package: Path) -> set[str]:
    """Every ``.py`` file of ``package``, as its path inside the package."""
    return {path.relative_to(package).as_posix() for path in package.rglob("*.py")}


def test_layout_lists_every_module() -> None:
    listed = listed_modules()
    for header, package in PACKAGES.items():
        modules = actual_modules(package)
        assert modules, f"no modules found under {package}"
        missing = modules - listed.get(header, set())
        assert not missing, f"docs/architecture.md Layout misses {header}: {sorted(missing)}"
        stale = {name for name in listed.get(header, set())
                 if name.endswith(".py")} - modules
        assert not stale, f"docs/architecture.md Layout lists absent {header}: {sorted(stale)}"


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The long options ``parser`` and its subcommands accept, ``--help`` aside."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                flags |= parser_flags(subparser)
        flags |= {option for option in action.option_strings if option.startswith("--")}
    return flags - {"--help"}


def named_flags(text: str) -> set[str]:
    """The long options a synopsis names."""
    return set(re.findall(r"--[a-z][a-z-]*", text))


def cli_synopsis() -> dict[str, str]:
    """The synopsis of ``crdtsync/cli.py``'s docstring, by command: each line starting
    with ``crdtsync COMMAND`` plus its more indented continuation lines."""
    block = (cli.__doc__ or "").split("\n\n")[1]
    lines: dict[str, str] = {}
    command = ""
    for line in block.splitlines():
        if line.strip().startswith("crdtsync "):
            command = line.split()[1]
        lines[command] = lines.get(command, "") + line + "\n"
    return lines


def test_readme_serve_synopsis_names_every_flag() -> None:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"`crdtsync serve (\[.*?)`", text, flags=re.S)
    assert match, "no `crdtsync serve [...]` synopsis in README.md"
    assert named_flags(match.group(1)) == parser_flags(COMMANDS["serve"])


def test_cli_synopsis_names_every_flag_of_every_command() -> None:
    """The management options (``--url``, ``--admin-token``) are said once, in prose."""
    synopsis = cli_synopsis()
    assert synopsis.keys() == COMMANDS.keys()
    client = parser_flags(cli.client_options())
    for command, parser in COMMANDS.items():
        flags = parser_flags(parser)
        expected = flags - client if client <= flags else flags
        assert named_flags(synopsis[command]) == expected, command
