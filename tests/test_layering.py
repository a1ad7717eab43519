"""The layering docs/architecture.md draws, enforced: the pure modules load neither aiohttp nor
sqlite3 nor the server, the device library loads no server, the CLI loads the server only when a
server command runs, and no library module imports the server at module level.

Imports are checked in fresh interpreters (``sys.modules`` after the import), since this test
process has long loaded everything; the static check reads the source with ``ast``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import crdtsync
from crdtsync import errors
from crdtsync.errors import CrdtsyncError

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "crdtsync"
SERVER = ROOT / "server" / "crdtsync_server"

PURE = ["crdtsync.protocol", "crdtsync.values", "crdtsync.yupdate", "crdtsync.hlc",
        "crdtsync.schema", "crdtsync.errors", "crdtsync.crdt", "crdtsync.templates"]
"""Modules a third party may use alone: codec, values, CRDT and schema logic."""
PURE_FORBIDDEN = ("aiohttp", "sqlite3", "crdtsync_server")
LIBRARY_FORBIDDEN = ("crdtsync_server",)


def loaded_after(code: str) -> set[str]:
    """The top-level package names in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    return {name.split(".")[0] for name in done.stdout.split()}


@pytest.mark.parametrize("module", PURE)
def test_pure_module_loads_no_network_storage_or_server(module: str) -> None:
    assert loaded_after(f"import {module}") & set(PURE_FORBIDDEN) == set()


@pytest.mark.parametrize("module", ["crdtsync", "crdtsync.device", "crdtsync.testing.faults"])
def test_library_loads_no_server(module: str) -> None:
    assert loaded_after(f"import {module}") & set(LIBRARY_FORBIDDEN) == set()


def test_cli_loads_the_server_only_when_a_server_command_runs() -> None:
    parse = ("from crdtsync.cli import build_parser, serve_config\n"
             "args = build_parser().parse_args(['serve'])")
    assert "crdtsync_server" not in loaded_after(parse)
    # the control: the same probe sees the server once the serve command builds its config
    assert "crdtsync_server" in loaded_after(f"{parse}\nserve_config(args)")


def test_public_names_are_frozen_and_resolve() -> None:
    assert crdtsync.__all__ == [
        "AdminClient", "ClosedError", "Conflict", "CrdtsyncError", "Device", "FileInfo",
        "FileTransfer", "Gateway", "HttpTransport", "InvalidValue", "Message", "OutboxFull",
        "OutboxLimits", "RouteFailed",
        "SchemaViolation", "StateMap", "StateSchema", "StoreError", "SyncReport", "SyncStalled",
        "Transport", "TransportError", "WriteInfo", "__version__"]
    namespace: dict[str, object] = {}
    exec("from crdtsync import *", namespace)  # the star import users write
    assert set(crdtsync.__all__) <= set(namespace)
    assert set(crdtsync.__all__) <= set(dir(crdtsync))
    with pytest.raises(AttributeError, match="Bogus"):
        crdtsync.Bogus  # type: ignore[attr-defined]  # noqa: B018


PUBLIC_MODULES = {"admin", "cli", "crdt", "demo", "device", "errors", "export", "gateway", "hlc",
                  "protocol", "schema", "templates", "testing", "transport", "values",
                  "yupdate"}
"""The modules of ``crdtsync`` a user may import by name; the rest are underscored (httpx's
rule): their names are re-exported where they are public (``crdtsync.Message`` lives in
``_inbox``)."""


def test_public_modules_are_a_deliberate_list() -> None:
    found = {path.stem if path.is_file() else path.name
             for path in LIBRARY.iterdir()
             if (path.suffix == ".py" or (path / "__init__.py").exists())
             and not path.name.startswith("_")}
    assert found == PUBLIC_MODULES


def test_server_and_testing_public_names_are_frozen_and_resolve() -> None:
    import crdtsync.testing
    import crdtsync_server

    assert crdtsync_server.__all__ == ["Server", "ServerConfig", "Services", "create_app",
                                       "open_services", "process_sync"]
    assert crdtsync.testing.__all__ == [
        "FAULT_NAMES", "ClockPlan", "Crash", "FaultPlan", "FaultProxy", "Model", "SimDevice",
        "SimReport", "Simulation", "SkewedClock"]
    for package in (crdtsync_server, crdtsync.testing):
        assert all(getattr(package, name) is not None for name in package.__all__)


# --- static import graph --------------------------------------------------------------------


def module_name(path: Path) -> str:
    """``crdtsync/device.py`` -> ``crdtsync.device``; a package's ``__init__`` is the package."""
    base = ROOT / "server" if path.is_relative_to(SERVER) else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is imported: not function bodies, not
    ``if TYPE_CHECKING:`` blocks (their ``else`` runs)."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            yield from runtime_statements(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from runtime_statements(getattr(node, field, []))


def module_imports(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports at module level."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # submodule imports
    return found


GRAPH = {module_name(path): module_imports(path)
         for tree in (LIBRARY, SERVER) for path in sorted(tree.rglob("*.py"))}
"""Module -> the modules it imports at module level, over the library and the server."""


def parents(module: str) -> set[str]:
    """The packages whose ``__init__`` runs before ``module``: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def reachable(start: str) -> set[str]:
    """Every module ``start`` loads at import, through modules of this repository (the
    ``__init__`` of each enclosing package included)."""
    seen, todo = {start}, [start]
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, set()) | parents(current):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_library_module_imports_the_server_at_module_level() -> None:
    library = [name for name in GRAPH
               if name.split(".")[0] == "crdtsync" and not name.startswith("crdtsync.testing")]
    assert len(library) > 20  # the walk found the library
    offenders = {name: sorted(t for t in GRAPH[name] if t.split(".")[0] == "crdtsync_server")
                 for name in library}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_static_graph_sees_the_simulation_import_the_server() -> None:
    """The control for the test above: the graph does see a module-level server import."""
    assert any(t.startswith("crdtsync_server") for t in GRAPH["crdtsync.testing.simulation"])


@pytest.mark.parametrize("module", PURE)
def test_pure_module_reaches_no_network_storage_or_server_statically(module: str) -> None:
    reached = {name.split(".")[0] for name in reachable(module)}
    assert reached & set(PURE_FORBIDDEN) == set()


# --- one exception tree, a curated surface ---------------------------------------------------


OUTSIDE_THE_TREE = {"crdtsync.testing.faults.Crash"}
"""A ``BaseException`` on purpose: a simulated process death no ``except Exception`` swallows."""


def exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in a module of the library or the server (each module
    imported, its own classes kept, not the ones it imports)."""
    found = []
    for name in GRAPH:
        module = importlib.import_module(name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, BaseException) and cls.__module__ == name]
    return found


def test_every_exception_is_in_the_one_tree() -> None:
    classes = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in exception_classes()}
    assert len(classes) > 30  # the walk found errors.py and the classes beside it
    outside = {name for name, cls in classes.items() if not issubclass(cls, CrdtsyncError)}
    assert outside == OUTSIDE_THE_TREE
    undrawn = {name for name, cls in classes.items()
               if name not in OUTSIDE_THE_TREE and cls.__name__ not in (errors.__doc__ or "")}
    assert undrawn == set()


def test_examples_import_only_the_public_packages() -> None:
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    for path in examples:
        imported = {node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Import) for alias in node.names}
        ours = {name for name in imported if name.split(".")[0].startswith("crdtsync")}
        assert ours <= {"crdtsync", "crdtsync_server"}, (path.name, ours)


# --- the server: a core without HTTP, storage below it, adapters at the edge ----------------


HTTP = ("aiohttp", "multidict", "yarl")
ADAPTERS = ("crdtsync_server.api", "crdtsync_server.proxied.executor")
"""The only server modules that may import an HTTP library: the handlers and the executor
of proxied requests (sinks import their clients when they open, like NATS and PostgreSQL)."""


def server_modules(prefix: str = "crdtsync_server") -> list[str]:
    return [name for name in GRAPH if name == prefix or name.startswith(f"{prefix}.")]


def is_adapter(name: str) -> bool:
    return any(name == a or name.startswith(f"{a}.") for a in ADAPTERS)


def test_the_server_core_reaches_no_http_library_statically() -> None:
    core = [name for name in server_modules() if not is_adapter(name)]
    assert "crdtsync_server.core" in core and "crdtsync_server.sync" in core
    offenders = {name: sorted(t for t in reachable(name) if t.split(".")[0] in HTTP)
                 for name in core}
    assert {name: found for name, found in offenders.items() if found} == {}
    # the control: the graph does see the handlers import aiohttp
    assert "aiohttp" in {t.split(".")[0] for t in reachable("crdtsync_server.api.sync")}


def test_the_server_core_loads_no_http_library() -> None:
    loaded = loaded_after("import crdtsync_server.core, crdtsync_server.maintenance")
    assert loaded & set(HTTP) == set()
    assert "aiohttp" in loaded_after("import crdtsync_server.api.app")  # the control


def test_the_core_never_imports_the_handlers() -> None:
    core = [name for name in server_modules() if not is_adapter(name)]
    offenders = {name: sorted(t for t in reachable(name) if t.startswith("crdtsync_server.api"))
                 for name in core}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_storage_imports_nothing_of_the_server_above_it() -> None:
    store = server_modules("crdtsync_server.store")
    assert len(store) > 5
    above = {name: sorted(t for t in GRAPH[name]
                          if t.startswith("crdtsync_server.")
                          and not t.startswith("crdtsync_server.store"))
             for name in store}
    assert {name: found for name, found in above.items() if found} == {}
    http = {name: sorted(t for t in reachable(name) if t.split(".")[0] in HTTP) for name in store}
    assert {name: found for name, found in http.items() if found} == {}


def import_cycles() -> list[list[str]]:
    """The strongly connected components of more than one module in the graph of explicit
    module-level imports (Tarjan), over the library and the server. An import of a module's
    own package (``from . import sibling``) is no edge: the package runs first anyway."""
    edges = {name: sorted(t for t in targets if t in GRAPH and t not in parents(name) | {name})
             for name, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The control: a graph with a cycle added is reported."""
    GRAPH["crdtsync_server.core"].add("crdtsync_server.api.app")
    try:
        assert any("crdtsync_server.core" in c and "crdtsync_server.api.app" in c
                   for c in import_cycles())
    finally:
        GRAPH["crdtsync_server.core"].discard("crdtsync_server.api.app")
