"""External services some tests need (PostgreSQL, NATS JetStream) and how tests reach them.

On a developer's machine without the service the test is skipped; in CI (``CI=true``) it
fails instead, so a missing service can never pass as green. ``.ci/run`` starts the services
of this machine before the tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator

import pytest

POSTGRES_URL = os.environ.get("CRDTSYNC_TEST_POSTGRES",
                              "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("CRDTSYNC_TEST_NATS", "nats://127.0.0.1:4222")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (fail when ``CI=true``) unless ``host:port`` accepts connections."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI needs it (.ci/run starts it)")
    pytest.skip(message)


def require_postgres() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


def require_nats() -> str:
    require_service("NATS", "127.0.0.1", 4222)
    return NATS_URL


def new_schema() -> str:
    """A fresh, random name for a test's own PostgreSQL schema."""
    return "t_" + secrets.token_hex(6)


async def drop_schema(schema: str) -> None:
    """Drop a test schema with everything in it (a connection of its own)."""
    import asyncpg

    conn = await asyncpg.connect(require_postgres())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A store URL on a fresh PostgreSQL schema of its own (``...?schema=t_<random>``), so
    tests never see each other's rows; the schema is dropped afterwards."""
    base = require_postgres()
    schema = new_schema()
    try:
        yield f"{base}?schema={schema}"
    finally:
        await drop_schema(schema)
