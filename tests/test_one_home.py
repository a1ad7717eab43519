"""One home each for the wall clock and for document names (issue 14).

The clock is :func:`crdtsync.hlc.wall_ms` (components take an injectable ``clock``/``wall``
defaulting to it), the document names are constants of :mod:`crdtsync.protocol`. These
checks read the source of the library and the server and fail when a second definition
creeps back in: a ``now_ms`` helper, an inlined ``time.time() * 1000``, or a constant
spelling ``"state"``, ``"fleet"`` or ``"project"`` again.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from crdtsync import hlc, protocol

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "crdtsync", ROOT / "server" / "crdtsync_server")
CLOCK_HOME = ROOT / "crdtsync" / "hlc.py"
NAMES_HOME = ROOT / "crdtsync" / "protocol.py"
SECONDS_CLOCK = {ROOT / "server" / "crdtsync_server" / "sinks" / "webhook.py"}
"""Reads the clock in whole seconds for webhook signature headers, not in ms."""
CLOCK_FUNCTIONS = {"now_ms", "wall_ms"}
DOC_NAMES = {protocol.STATE_DOC, protocol.FLEET_DOC, protocol.PROJECT_DOC}


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def is_wall_clock_call(node: ast.AST) -> bool:
    """``time.time()`` or ``time.time_ns()``."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"time", "time_ns"}
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "time")


def names_only_docs(value: ast.expr) -> bool:
    """A constant that is a document name, or a collection of nothing but document names."""
    if isinstance(value, ast.Call) and value.args:  # frozenset({...}), tuple([...])
        return names_only_docs(value.args[0])
    if isinstance(value, (ast.Tuple, ast.List, ast.Set)) and value.elts:
        return all(names_only_docs(e) for e in value.elts)
    return isinstance(value, ast.Constant) and value.value in DOC_NAMES


def test_the_scan_sees_both_packages() -> None:
    seen = {path for path, _ in modules()}
    assert CLOCK_HOME in seen and NAMES_HOME in seen
    assert ROOT / "server" / "crdtsync_server" / "sync.py" in seen


def test_the_clock_has_one_definition() -> None:
    defined = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in modules()
               for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name in CLOCK_FUNCTIONS]
    home = ast.parse(CLOCK_HOME.read_text())  # (compiled, hlc.wall_ms has no __code__)
    line = next(node.lineno for node in home.body
                if isinstance(node, ast.FunctionDef) and node.name == hlc.wall_ms.__name__)
    assert defined == [f"{CLOCK_HOME.relative_to(ROOT)}:{line}"]


def test_only_the_clock_home_reads_the_system_clock() -> None:
    reads = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in modules()
             if path != CLOCK_HOME and path not in SECONDS_CLOCK
             for node in ast.walk(tree) if is_wall_clock_call(node)]
    assert reads == []


def test_document_names_have_one_definition() -> None:
    constants = []
    for path, tree in modules():
        for node in tree.body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            if names_only_docs(value):
                constants += [f"{path.relative_to(ROOT)}:{t.id}" for t in targets
                              if isinstance(t, ast.Name)]
    home = str(NAMES_HOME.relative_to(ROOT))
    assert sorted(constants) == sorted(f"{home}:{name}" for name in (
        "STATE_DOC", "STATE_MAP", "FLEET_DOC", "PROJECT_DOC"))


def test_the_names_are_the_wire_names() -> None:
    assert protocol.SHARED_DOC_NAMES == ("fleet", "project")
    assert set(protocol.DEVICE_DOC_NAMES) == {"state", "fleet", "project"}
