"""The modules compiled with mypyc (``crdtsync._compiled``): built where the install could,
run only while they match their source, and the same as their source.

CI installs with a compiler and mypyc (the build requirements), so there the compiled
modules must be what runs: the rest of the suite tests them. Their sources stay tested here
(a seeded fault simulation gives the same report both ways) and wherever no compiler is.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from crdtsync import _compiled

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def run_python(code: str, **env: str) -> str:
    """``code`` in a fresh interpreter (with ``env`` added); its output."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


WHAT_RUNS = ("import crdtsync, crdtsync._compiled as c, crdtsync_server.sync as s; "
             "print(c.active(), s.__file__)")


def test_ci_runs_the_compiled_modules() -> None:
    active, file = run_python(WHAT_RUNS).split()
    built = _compiled.compiled_file(ROOT / "server" / "crdtsync_server" / "sync.py")
    assert (active == "True") == (built is not None and file.endswith(SUFFIX))
    if os.environ.get("CI") == "true":  # the install has what it needs: it must have built
        assert active == "True" and file.endswith(SUFFIX), file


def test_no_extensions_runs_every_compiled_module_from_its_source() -> None:
    code = ("import crdtsync, crdtsync._compiled as c, sys\n"
            "for name in c.MODULES: __import__(name)\n"
            "print(c.active(), all(sys.modules[n].__file__.endswith('.py') "
            "for n in c.MODULES))")
    assert run_python(code, CRDTSYNC_NO_EXTENSIONS="1") == "False True"


def test_a_seeded_simulation_reports_the_same_compiled_and_from_source() -> None:
    """The fault simulation drives the compiled modules through syncs, crashes, replays and
    clock corrections; seeded, it must tell the same story either way."""
    code = ("from crdtsync.cli import main; main(['simulate', '--devices', '3', '--steps', "
            "'150', '--seed', '11', '--seeds', '1', '--faults', "
            "'drop,dup,reorder,partition,crash', '--no-progress'])")

    def report(**env: str) -> list[str]:  # without the run's duration
        return [line.rsplit(";", 1)[0] if "converged" in line else line
                for line in run_python(code, **env).splitlines()]

    compiled, source = report(), report(CRDTSYNC_NO_EXTENSIONS="1")
    assert "converged: yes; invariants: all held" in compiled, compiled
    assert compiled == source


def test_setup_reads_the_module_list_from_the_text() -> None:
    """setup.py cannot import crdtsync: it reads ``MODULES`` with ``ast.literal_eval``."""
    tree = ast.parse((ROOT / "crdtsync" / "_compiled.py").read_text())
    literal = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "MODULES")
    assert tuple(ast.literal_eval(literal)) == _compiled.MODULES
    assert 'compiled_setting("MODULES")' in (ROOT / "setup.py").read_text()
    for name in _compiled.MODULES:
        top = name.split(".")[0]
        assert (ROOT / _compiled.ROOTS[top]).joinpath(*name.split(".")).with_suffix(
            ".py").exists(), name


def test_the_build_type_checks_against_the_runtime_dependencies() -> None:
    """mypyc type-checks the modules it compiles in pip's build environment: every runtime
    dependency must be there too, or the build falls back to Python."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = set(project["build-system"]["requires"])
    assert set(project["project"]["dependencies"]) <= requires
    assert any(r.startswith("mypy==") for r in requires)


def touch(path: Path, mtime: float, text: str = "") -> Path:
    path.write_text(text)
    os.utime(path, (mtime, mtime))
    return path


def test_a_source_edited_after_the_build_is_stale(tmp_path: Path) -> None:
    lib = touch(tmp_path / f"lib{SUFFIX}", 2000)
    a = touch(tmp_path / "a.py", 1000)
    b = touch(tmp_path / "b.py", 1000)
    touch(tmp_path / f"a{SUFFIX}", 1500)
    touch(tmp_path / f"b{SUFFIX}", 1500)  # the stubs are older: they are not rebuilt
    assert _compiled.stale([a, b], lib) == []
    os.utime(b, (3000, 3000))
    assert _compiled.stale([a, b], lib) == [b]
    (tmp_path / f"a{SUFFIX}").unlink()  # a stub missing beside the others
    assert _compiled.stale([a, b], lib) == [a, b]
    assert _compiled.stale([a, b], None) == [a, b]


def test_nothing_compiled_is_nothing_stale(tmp_path: Path) -> None:
    a = touch(tmp_path / "a.py", 3000)
    assert _compiled.stale([a], None) == []


def test_the_finder_loads_the_source_beside_a_compiled_module(tmp_path: Path) -> None:
    touch(tmp_path / "crdtsync_probe_mod.py", 1000, "ANSWER = 42\n")
    touch(tmp_path / f"crdtsync_probe_mod{SUFFIX}", 2000, "not an extension module")
    finder = _compiled._Sources({"crdtsync_probe_mod": tmp_path / "crdtsync_probe_mod.py"})
    spec = finder.find_spec("crdtsync_probe_mod", None)
    assert spec is not None and spec.loader is not None
    assert isinstance(spec.loader, importlib.machinery.SourceFileLoader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.ANSWER == 42
    assert finder.find_spec("json", None) is None


@pytest.mark.skipif(not _compiled.active(), reason="no compiled modules in this install")
def test_a_stale_build_warns_and_runs_the_sources(tmp_path: Path) -> None:
    """An edited source (here: a copy of the tree whose sync.py is newer than its build)
    must not run the old compiled code."""
    import shutil

    tree = tmp_path / "tree"
    for top, rel in _compiled.ROOTS.items():
        shutil.copytree(ROOT / rel / top, tree / rel / top, symlinks=True,
                        copy_function=shutil.copy2,
                        ignore=shutil.ignore_patterns("__pycache__"))
    sync = tree / "server" / "crdtsync_server" / "sync.py"
    sync.touch()
    out = subprocess.run(
        [sys.executable, "-W", "default", "-c", WHAT_RUNS], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'server'}"},
        timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "older than their source" in out.stderr
    active, file = out.stdout.split()
    assert active == "False" and file == str(sync)
