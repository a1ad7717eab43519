"""docs/architecture.md and README.md stay true to the tree: the Layout block of
architecture.md names every module of ``crdtsync/`` and ``server/crdtsync_server/`` (one line
each, by its path inside the package), and the README's ``crdtsync serve`` synopsis names
exactly the flags the command accepts."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from crdtsync.cli import add_serve

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"crdtsync/": ROOT / "crdtsync",
            "server/crdtsync_server/": ROOT / "server" / "crdtsync_server"}


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


def serve_flags() -> set[str]:
    """The long options ``crdtsync serve`` accepts, ``--help`` aside."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_serve(sub)
    serve = sub.choices["serve"]
    return {option for action in serve._actions for option in action.option_strings
            if option.startswith("--")} - {"--help"}


def test_readme_serve_synopsis_names_every_flag() -> None:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"`crdtsync serve (\[.*?)`", text, flags=re.S)
    assert match, "no `crdtsync serve [...]` synopsis in README.md"
    documented = set(re.findall(r"\[(--[a-z-]+)", match.group(1)))
    assert documented == serve_flags()
