"""Structured logs (issue 18): the JSON line format of ``crdtsync serve --log-format json``,
one record per failed request with its fields and without secrets, and the device's short,
non-repeating sync failure lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from crdtsync import AdminClient, Device
from crdtsync.errors import StoreError, TransportError
from crdtsync.protocol import MEDIA_TYPE, SYNC_PATH
from crdtsync.transport import HttpTransport, origin
from crdtsync_server import Server, ServerConfig
from crdtsync_server.api import sync as sync_module
from crdtsync_server.api.requestlog import REQUEST_ID_HEADER
from crdtsync_server.logs import JsonFormatter

from .cli_process import ADMIN, Background, clean_env, cli, free_port
from .conftest import ADMIN_TOKEN, local_app, until

WRONG_TOKEN = "wrong-device-token-0123456789"
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \S+ (DEBUG|INFO|WARNING|ERROR) ")


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The failed-request records (those carrying a ``request_id``)."""
    return [r for r in caplog.records if hasattr(r, "request_id")]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- the JSON formatter ------------------------------------------------------------------

def test_a_json_line_parses_and_carries_the_fields_and_the_exception() -> None:
    logger = logging.getLogger("crdtsync.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord("crdtsync.test", logging.ERROR, __file__, 1,
                                   "failed %s", ("here",), sys.exc_info(),
                                   extra={"code": "internal", "status": 500,
                                          "odd": object()})
    line = JsonFormatter({"worker": 2}).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["logger"] == "crdtsync.test"
    assert entry["message"] == "failed here"
    assert entry["code"] == "internal" and entry["status"] == 500 and entry["worker"] == 2
    assert entry["odd"].startswith("<object object")  # not JSON: written as its str
    assert "ValueError: boom" in entry["exc"]
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"]).timestamp() == pytest.approx(
        record.created, abs=0.001)
    assert "args" not in entry and "msg" not in entry and "exc_info" not in entry


# --- one record per failed request -------------------------------------------------------

async def test_a_sync_with_a_wrong_token_is_logged_once_without_device_or_token(
        server: Server, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with http.post(server.url + SYNC_PATH, data=b"\x80",
                         headers={"Authorization": f"Bearer {WRONG_TOKEN}"}) as resp:
        assert resp.status == 401
        rid = resp.headers[REQUEST_ID_HEADER]
    [record] = failures(caplog)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [record]
    assert record.levelno == logging.WARNING
    assert (record.method, record.path, record.status, record.code) == (  # type: ignore[attr-defined]
        "POST", SYNC_PATH, 401, "unauthorized")
    assert record.request_id == rid and re.fullmatch(r"[0-9a-f]{12}", rid)  # type: ignore[attr-defined]
    assert getattr(record, "device", None) is None
    assert record.duration_ms >= 0  # type: ignore[attr-defined]
    everything = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert WRONG_TOKEN not in everything and "Authorization" not in everything


async def test_a_malformed_sync_body_is_logged_once_with_the_device(
        server: Server, admin: AdminClient, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    token = (await admin.add_device("d1"))["token"]
    caplog.set_level(logging.INFO)
    async with http.post(server.url + SYNC_PATH, data=b"\xc1 not msgpack",
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": MEDIA_TYPE,
                                  REQUEST_ID_HEADER: "client-id_1.2:3"}) as resp:
        assert resp.status == 400
        assert resp.headers[REQUEST_ID_HEADER] == "client-id_1.2:3"
    [record] = failures(caplog)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [record]
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["status"] == 400
    assert entry["code"] == "malformed_request" and entry["device"] == "d1"
    assert entry["request_id"] == "client-id_1.2:3"
    assert token not in json.dumps([vars(r) for r in caplog.records], default=str)


@pytest.mark.parametrize("given", ["x" * 65, "has space", "semi;colon", ""])
async def test_an_insane_client_request_id_is_replaced(
        server: Server, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
        given: str) -> None:
    caplog.set_level(logging.INFO)
    async with http.get(server.url + "/v1/devices",
                        headers={REQUEST_ID_HEADER: given}) as resp:
        assert resp.status == 401
        rid = resp.headers[REQUEST_ID_HEADER]
    assert re.fullmatch(r"[0-9a-f]{12}", rid)
    [record] = failures(caplog)
    assert record.request_id == rid  # type: ignore[attr-defined]


async def test_an_admin_call_with_a_bad_token_is_logged_once_without_it(
        server: Server, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    secret = "not-the-admin-token-secret"
    caplog.set_level(logging.INFO)
    async with http.get(server.url + "/v1/devices", params={"token": "query-secret"},
                        headers={"Authorization": f"Bearer {secret}"}) as resp:
        assert resp.status == 401
    [record] = failures(caplog)
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["method"], entry["path"], entry["code"]) == ("GET", "/v1/devices",
                                                               "unauthorized")
    assert "device" not in entry
    logged = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert secret not in logged and "query-secret" not in logged


async def test_a_successful_call_logs_nothing_and_sends_no_request_id(
        server: Server, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with http.get(server.url + "/v1/devices",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200
        assert REQUEST_ID_HEADER not in resp.headers
    assert failures(caplog) == []


@pytest.mark.parametrize(("raised", "code"), [(RuntimeError("bug"), "internal"),
                                              (StoreError("disk gone"), "store")])
async def test_a_server_failure_is_one_error_record(
        server: Server, admin: AdminClient, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        raised: Exception, code: str) -> None:
    """A 500: logged at error level with the code behind it (the client reads
    ``internal``); an unexpected exception carries its traceback as ``exc``."""
    token = (await admin.add_device("d1"))["token"]

    async def failing(*args: object) -> bytes:
        raise raised

    monkeypatch.setattr(sync_module, "run_sync", failing)
    caplog.set_level(logging.INFO)
    async with http.post(server.url + SYNC_PATH, data=b"\x80",
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": MEDIA_TYPE}) as resp:
        assert resp.status == 500
    [record] = failures(caplog)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "error" and entry["code"] == code and entry["device"] == "d1"
    assert ("RuntimeError: bug" in entry["exc"]) if code == "internal" else "exc" not in entry


# --- crdtsync serve --log-format json ----------------------------------------------------

def refused_with_wrong_token(url: str) -> str:
    """Send a sync with a wrong token to ``url``; return the answer's request id."""
    request = urllib.request.Request(url + SYNC_PATH, data=b"\x80", method="POST",
                                     headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    with caught.value:  # holds the connection's socket
        assert caught.value.code == 401
        return str(caught.value.headers[REQUEST_ID_HEADER])


def json_logs(stderr: list[str]) -> list[dict[str, Any]]:
    """The JSON log lines of a ``crdtsync serve`` (the CLI's own messages, such as
    ``shutting down``, are plain text by design); fails on a text-format log line."""
    assert not [line for line in stderr if TEXT_LOG_LINE.match(line)], stderr
    return [json.loads(line) for line in stderr if line.startswith("{")]


def test_serve_with_log_format_json_writes_json_lines(tmp_path: Path) -> None:
    with Background("serve", "--db", str(tmp_path / "s.db"), "--port", "0",
                    "--admin-token", ADMIN, "--log-format", "json",
                    env=clean_env()) as serve:
        rid = refused_with_wrong_token(serve.url())
        serve.wait_for_log(rid)
        assert serve.stop() == 0
    entries = json_logs(serve.stderr)
    [failure] = [e for e in entries if e.get("request_id") == rid]
    assert failure["code"] == "unauthorized" and failure["status"] == 401
    assert failure["level"] == "warning" and failure["logger"] == "crdtsync.server"
    assert WRONG_TOKEN not in "\n".join(serve.stderr) and ADMIN not in "\n".join(serve.stderr)


def test_serve_workers_log_json_from_the_environment(tmp_path: Path) -> None:
    with Background("serve", "--workers", "2", "--port", str(free_port()),
                    "--db", str(tmp_path / "s.db"), "--admin-token", ADMIN,
                    env=clean_env(CRDTSYNC_LOG_FORMAT="json")) as serve:
        rid = refused_with_wrong_token(serve.url())
        serve.wait_for_log(rid)
        assert serve.stop() == 0
    entries = json_logs(serve.stderr)
    [failure] = [e for e in entries if e.get("request_id") == rid]
    assert failure["worker"] in (1, 2) and failure["code"] == "unauthorized"
    assert any(e["logger"] == "crdtsync.supervisor" for e in entries)


def test_an_unknown_log_format_is_a_usage_error() -> None:
    result = cli("serve", "--port", "0", env=clean_env(CRDTSYNC_LOG_FORMAT="xml"))
    assert result.returncode == 2 and "use text or json" in result.stderr


# --- the device: one short line per kind of failure --------------------------------------



async def test_a_refused_connection_is_one_short_warning_then_recovery(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    config = ServerConfig(db=str(tmp_path / "server.db"), port=port,
                          admin_token=ADMIN_TOKEN)
    async with Server(config) as server, AdminClient(server.url, ADMIN_TOKEN) as admin:
        token = (await admin.add_device("d1"))["token"]
    caplog.set_level(logging.DEBUG, "crdtsync.device")

    def sync_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "sync failed" in r.getMessage()]

    dev = Device("d1", f"http://127.0.0.1:{port}", token=token, path=tmp_path / "d1.db",
                 interval=3600.0, min_spacing=0.0, backoff=(0.02, 0.05), live=False)
    async with dev:
        await until(lambda: len(sync_lines()) >= 3)
        async with Server(config):
            await until(lambda: any("sync recovered" in r.getMessage()
                                    for r in caplog.records))
    lines = sync_lines()
    [warning] = [r for r in lines if r.levelno >= logging.WARNING]
    assert warning is lines[0] and all(r.levelno == logging.DEBUG for r in lines[1:])
    text = warning.getMessage()
    assert re.fullmatch(rf"device d1: sync failed: cannot connect to http://127\.0\.0\.1:{port}"
                        r" \(connection refused\); retrying in \d+\.\d s", text), text
    assert len(text) < 160 and "Error(" not in text and "ConnectionKey" not in text
    [recovered] = [r for r in caplog.records if "sync recovered" in r.getMessage()]
    assert recovered.levelno == logging.INFO


async def test_an_error_answer_is_logged_with_its_status_and_code(
        server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "crdtsync.device")
    dev = Device("d1", server.url, token=WRONG_TOKEN, path=tmp_path / "d1.db",
                 interval=3600.0, min_spacing=0.0, backoff=(0.02, 0.05), live=False)
    async with dev:
        await until(lambda: any("sync failed" in r.getMessage() for r in caplog.records))
    first = next(r for r in caplog.records if "sync failed" in r.getMessage())
    assert first.getMessage().startswith("device d1: sync failed: HTTP 401 unauthorized: ")
    assert first.levelno == logging.ERROR  # not retryable: retrying cannot heal it
    assert WRONG_TOKEN not in first.getMessage()


async def exchange_failure(url: str) -> str:
    """The message of the ``TransportError`` a sync request to ``url`` fails with."""
    transport = HttpTransport(url, WRONG_TOKEN)
    try:
        with pytest.raises(TransportError) as caught:
            await transport.exchange(b"\x80")
    finally:
        await transport.aclose()
    return caught.value.message


async def test_a_failed_connection_names_the_server() -> None:
    port = free_port()
    message = await exchange_failure(f"http://127.0.0.1:{port}/base")
    assert message == f"cannot connect to http://127.0.0.1:{port} (connection refused)"


def test_the_server_is_named_without_credentials_path_or_query() -> None:
    assert origin("https://user:secret@[::1]:8787/base/v1/sync?token=t") == "https://[::1]:8787"


async def test_a_name_that_does_not_resolve_is_said_so() -> None:
    message = await exchange_failure("http://no-such-host.invalid:8787")
    assert message == "cannot resolve the server's host name 'no-such-host.invalid'"


async def test_a_timeout_names_the_server(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post(SYNC_PATH, hold)
    async with local_app(app, shutdown_timeout=0.1) as url:
        transport = HttpTransport(url, WRONG_TOKEN, timeout=0.2)
        try:
            with pytest.raises(TransportError) as caught:
                await transport.exchange(b"\x80")
        finally:
            await transport.aclose()
    assert caught.value.message == f"timed out waiting for {url}"
