"""Run the whole benchmark suite: every script of bench/, one after the other.

Each script runs as its own subprocess (in its own process group, so a timeout stops the
servers it started too) with its output shown as it comes. `--quick` is passed to every
script; `--write FILE` to every script that takes it (the others only print). At the end a
summary lists each script's status and time; the exit status is 1 if any script failed.

    python bench/run.py                               # full suite (several minutes)
    python bench/run.py --quick                       # CI smoke run, under a minute or two
    python bench/run.py --write docs/benchmarks.md    # full suite, results into the docs
    python bench/run.py --only throughput ingest      # some scripts only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SUITE = ("sync_basics.py", "templates_bytes.py", "compression.py", "throughput.py",
         "instructions.py", "ingest.py", "storm.py", "storm_instructions.py", "memory.py",
         "device.py", "growth.py", "rebuild.py", "policy.py", "conflicts.py", "policy_cost.py",
         "wake.py", "scaleout.py", "files.py", "gateway.py")
"""The suite, in running order; the scripts not (yet) in bench/ are skipped."""
HELPERS = ("run.py", "common.py")
"""Modules of bench/ that are not benchmarks (nor are those whose name starts with ``_``)."""


def takes_write(script: Path) -> bool:
    """True when the script has a ``--write`` option."""
    return '"--write"' in script.read_text()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> bool:
    """Stop ``proc`` and everything it started (its process group, whose id is its pid):
    SIGTERM, then SIGKILL. Returns True if some process of the group was still running."""
    if proc.poll() is not None and not group_alive(proc.pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return True
            time.sleep(0.05)
    return True


def run(script: Path, args: list[str], timeout: float | None) -> tuple[str, float]:
    """Run one script; returns (status, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script), *args], start_new_session=True)
    status = ""
    try:
        code = proc.wait(timeout)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"TIMEOUT after {timeout:g} s"
    finally:
        # Also on KeyboardInterrupt. Processes left behind by a script that ended are a bug.
        if stop_group(proc) and status.startswith(("ok", "FAILED")):
            status = ("FAILED (left processes running)" if status == "ok"
                      else f"{status}, left processes running")
    return status, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="pass --write FILE to every script that takes it")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these scripts (name with or without .py)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per script (default: 300 with --quick, 3600 without)")
    args = parser.parse_args()
    timeout = args.timeout or (300.0 if args.quick else 3600.0)
    names = list(SUITE)
    if args.only:
        wanted = {n if n.endswith(".py") else f"{n}.py" for n in args.only}
        unknown = wanted - set(SUITE)
        if unknown:
            parser.error(f"not in the suite: {', '.join(sorted(unknown))} "
                         f"(the suite: {', '.join(SUITE)})")
        names = [n for n in SUITE if n in wanted]
    write = str(args.write.resolve()) if args.write else None
    others = sorted(p.name for p in BENCH.glob("*.py")
                    if p.name not in SUITE + HELPERS and not p.name.startswith("_"))

    results: list[tuple[str, str, float]] = []
    for name in names:
        script = BENCH / name
        if not script.exists():
            results.append((name, "skipped (not in bench/)", 0.0))
            continue
        extra = ["--quick"] if args.quick else []
        note = ""
        if write:
            if takes_write(script):
                extra += ["--write", write]
            else:
                note = " (no --write: printed only)"
        print(f"\n===== {name} {' '.join(extra)} =====", flush=True)
        try:
            status, seconds = run(script, extra, timeout)
        except KeyboardInterrupt:
            results.append((name, "INTERRUPTED", 0.0))
            break
        results.append((name, status + note, seconds))

    print("\n===== summary =====")
    width = max(len(n) for n, _, _ in results)
    for name, status, seconds in results:
        took = f"{seconds:7.1f} s" if seconds else " " * 9
        print(f"{name:<{width}}  {took}  {status}")
    if others:
        print(f"not in the suite (not run): {', '.join(others)}")
    failed = [n for n, status, _ in results if not status.startswith(("ok", "skipped"))]
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
