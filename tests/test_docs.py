"""Code shown in the docs runs: the conflict-simulation example of docs/testing.md is
executed as written, and it stays under 30 lines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


async def test_testing_md_example_runs_and_is_short() -> None:
    source = python_blocks(DOCS / "testing.md")[0]
    assert len(source.strip().splitlines()) < 30
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/testing.md", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert len(tests) == 1
    await tests[0]()
