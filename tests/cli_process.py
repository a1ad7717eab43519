"""Running the ``crdtsync`` command as a subprocess in tests: one-shot (:func:`cli`) or left
running (:class:`Background`, e.g. ``crdtsync serve``), with a clean environment."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

CLI = [sys.executable, "-W", "default", "-m", "crdtsync.cli"]
ADMIN = "cli-test-admin-token"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's CRDTSYNC_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDTSYNC_")}
    env.update(extra)
    return env


def admin_env(url: str, token: str = ADMIN) -> dict[str, str]:
    return clean_env(CRDTSYNC_URL=url, CRDTSYNC_ADMIN_TOKEN=token)


def cli(*args: str, env: dict[str, str], timeout: float = 30,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd, check=False)


class Background:
    """A CLI process left running (serve, events --follow), its stdout read line by line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: IO[str], sink: Callable[[str], object]) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first stdout line (from here on) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; stdout {self.seen}, "
                             f"stderr {self.stderr}, exit {self.proc.poll()}")

    def wait_for_log(self, pattern: str, timeout: float = 20, nth: int = 1) -> re.Match[str]:
        """The ``nth`` stderr line (since the start) matching ``pattern``, waiting for it if
        need be."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for line in list(self.stderr) if (m := re.search(pattern, line))]
            if len(found) >= nth:
                return found[nth - 1]
            time.sleep(0.05)
        raise AssertionError(f"no stderr line matching {pattern!r}; stderr {self.stderr}, "
                             f"exit {self.proc.poll()}")

    def url(self) -> str:
        return self.wait_for(r"listening on (http://\S+)").group(1)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the exit, and return the exit status."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.close()

    def close(self) -> None:
        """Kill the process if it still runs; collect what it printed; close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
