"""The web console (/console) in a real browser: Debian's chromium driven by Playwright, against
a real server, devices provisioned over the admin API and a real ``crdtsync.Device`` syncing.

Without chromium or Playwright the browser tests are skipped on a developer's machine and fail
under ``CI=true`` (``.ci/run`` installs chromium). Screenshots go to a temporary folder, or
to docs/console/*.png (docs/console.md shows them) with ``CRDTSYNC_CONSOLE_SCREENSHOTS=1``:
a test run does not rewrite tracked files unless asked to."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from crdtsync import AdminClient
from crdtsync_server import Server

from .conftest import ADMIN_TOKEN, DeviceFactory

SHOTS = (Path(__file__).resolve().parent.parent / "docs" / "console"
         if os.environ.get("CRDTSYNC_CONSOLE_SCREENSHOTS") == "1"
         else Path(tempfile.gettempdir()) / "crdtsync-console-shots")
WAIT_MS = 15_000


def chromium_path() -> str:
    """The system chromium; skipped without it (or Playwright), failed under CI=true."""
    path = shutil.which("chromium")
    missing = "chromium is not installed" if path is None else None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing = "playwright (the test extra) is not installed"
    if missing is None and path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing}; CI needs it (.ci/run installs chromium)")
    pytest.skip(str(missing))


@pytest.fixture
async def page(server: Server) -> AsyncIterator[Any]:
    """A fresh browser page (its own sessionStorage); console errors fail the test."""
    executable = chromium_path()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)

    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 800})
            tab = await context.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
                   and "401" not in msg.text else None)
            yield tab
        finally:
            await browser.close()
    assert errors == []


async def test_console_is_served_without_a_token_with_a_strict_policy(server: Server) -> None:
    async with aiohttp.ClientSession() as http:
        for path, kind in [("/console", "text/html"), ("/console/app.js", "text/javascript"),
                           ("/console/api.js", "text/javascript"),
                           ("/console/metrics.js", "text/javascript"),
                           ("/console/console.css", "text/css")]:
            async with http.get(server.url + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind
                policy = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in policy and "default-src 'none'" in policy
                assert "unsafe-inline" not in policy
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        html = await (await http.get(server.url + "/console")).text()
        assert "<script>" not in html and " style=" not in html  # nothing inline
        for path in ("/console/nope.js", "/console/..%2Fopenapi.json"):
            async with http.get(server.url + path) as resp:
                assert resp.status == 404
        async with http.get(server.url + "/v1/devices") as resp:
            assert resp.status == 401  # the data still needs the token


async def test_token_form_and_paged_device_list(server: Server, admin: AdminClient,
                                                page: Any) -> None:
    from playwright.async_api import expect

    await admin.add_fleet("north", {"site": "Oslo"})
    for n in range(55):
        await admin.add_device(f"sensor-{n:02d}", fleet="north" if n % 2 else None)
    for name in ("a", "b"):  # queued for a device that never syncs: pending to it
        await admin.request("POST", "/v1/devices/sensor-02/messages",
                            json={"topic": name, "body": {}})
    assert (await admin.device("sensor-02"))["downlink_pending"] == 2
    await page.goto(server.url + "/console")
    await page.fill("#token", "wrong-token")
    await page.click("#login button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text("That token was refused.")
    await page.fill("#token", ADMIN_TOKEN)
    await page.click("#login button[type=submit]")
    rows = page.locator("#devices tbody tr")
    await expect(rows).to_have_count(50)  # one page of 50, never all
    await expect(rows.first).to_contain_text("sensor-00")
    await expect(page.locator("tr[data-device='sensor-01']")).to_contain_text("north")
    await expect(page.locator("tr[data-device='sensor-01']")).to_contain_text("never")
    await expect(page.locator("tr[data-device='sensor-02'] td.pending")).to_have_text("2")
    await expect(page.locator("tr[data-device='sensor-03'] td.pending")).to_have_text("0")
    assert await page.evaluate("sessionStorage.getItem('crdtsync.adminToken')") == ADMIN_TOKEN
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "devices.png"))
    await page.get_by_role("button", name="Next").click()
    await expect(rows).to_have_count(5)
    await expect(rows.first).to_contain_text("sensor-50")
    await page.get_by_role("button", name="Previous").click()
    await expect(rows.first).to_contain_text("sensor-00")

    await page.click("a[href='#/fleets']")
    await expect(page.locator("tr[data-fleet='north']")).to_be_visible()
    await page.click("tr[data-fleet='north'] a")
    await expect(page.locator("#view h1")).to_contain_text("north")
    await expect(page.locator("#devices tbody tr")).to_have_count(27)
    await page.screenshot(path=str(SHOTS / "fleet.png"))


async def test_fragment_token_live_state_and_command_result(
        server: Server, admin: AdminClient, make_device: DeviceFactory, page: Any) -> None:
    from playwright.async_api import expect

    dev = await make_device("pump-1")
    dev.command("add")(lambda params: params["a"] + params["b"])
    dev.state["temp"] = 20.5
    await dev.sync()

    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    await page.goto(f"{server.url}/console#token={ADMIN_TOKEN}")
    await expect(page.locator("tr[data-device='pump-1']")).to_contain_text("online")
    assert ADMIN_TOKEN not in page.url  # dropped from the address bar
    assert not any(ADMIN_TOKEN in url for url in requests)  # and never sent in a URL

    await page.click("tr[data-device='pump-1'] a")
    value = page.locator("#state tr[data-map='state'][data-key='temp'] td.value")
    await expect(value).to_have_text("20.5")
    await expect(page.locator("#live")).to_have_text("live")

    # A change made on the device appears without a reload (the feed stream).
    dev.state["temp"] = 23.25
    dev.state["mode"] = "eco"
    await dev.sync()
    await expect(value).to_have_text("23.25")
    await expect(page.locator("#state tr[data-key='mode'] td.value")).to_have_text('"eco"')
    await dev.emit("alarm", {"level": 2})
    await dev.sync()
    await expect(page.locator("#tail tbody tr").first).to_contain_text('{"level":2}')

    # A cloud write from the page reaches the device.
    await page.fill("#state-form input[name=key]", "target")
    await page.fill("#state-form input[name=value]", "19")
    await page.click("#state-form button")
    await expect(page.locator("#state tr[data-key='target'] td.value")).to_have_text("19")
    await dev.sync()
    assert dev.state["target"] == 19

    # A command: queued, run by the device at its sync, its result shown (long-poll).
    await page.fill("#command-form input[name=method]", "add")
    await page.fill("#command-form input[name=params]", '{"a": 2, "b": 40}')
    await page.click("#command-form button")
    row = page.locator("#commands tr").first
    await expect(row).to_contain_text("add")
    await dev.sync()  # receives and runs the command
    await dev.sync()  # returns its result
    await expect(row.locator("td.status")).to_have_text("succeeded")
    await expect(row.locator("td.result")).to_have_text("42")
    await page.fill("#message-form input[name=topic]", "notice")
    await page.fill("#message-form input[name=body]", '"hello"')
    await page.click("#message-form button")
    await expect(page.locator("#message-status")).to_have_text(re.compile(r"message \d+ queued"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "device.png"), full_page=True)
    assert not any(ADMIN_TOKEN in url for url in requests)


async def test_sinks_and_metrics_pages(server: Server, admin: AdminClient,
                                       page: Any) -> None:
    from playwright.async_api import expect

    await admin.put_sink("hook", {"type": "webhook", "batch": 4, "max_attempts": 1,
                                  "options": {"url": "http://127.0.0.1:9/nowhere",
                                              "secret": "s3cret"}})
    await admin.add_device("d1")
    await admin.patch_state("d1", {"x": 1})
    await page.goto(f"{server.url}/console#token={ADMIN_TOKEN}")
    await expect(page.locator("tr[data-device='d1']")).to_be_visible()
    await page.click("a[href='#/sinks']")
    await expect(page.locator("tr[data-sink='hook']")).to_contain_text("webhook")
    await page.screenshot(path=str(SHOTS / "sinks.png"))
    await page.click("tr[data-sink='hook'] a")
    await expect(page.locator("#view h1")).to_contain_text("hook")
    await expect(page.locator("#view")).not_to_contain_text("s3cret")  # redacted by the API
    await page.click("a[href='#/metrics']")
    await expect(page.locator("#chart svg")).to_be_visible()
    await expect(page.locator("#series")).to_contain_text("crdtsync_feed_head")


METRICS_TEXT = """# HELP crdtsync_sync_requests_total Sync requests by outcome and code.
# TYPE crdtsync_sync_requests_total counter
crdtsync_sync_requests_total{outcome="ok",code="none"} 7.0
crdtsync_sync_requests_total{outcome="client_error",code="seq_conflict"} 2.0
crdtsync_sync_requests_total{code="internal",outcome="server_error",note="a \\"quoted\\" one"} 1.0
crdtsync_sync_requests_created{outcome="ok",code="none"} 1.7e9
crdtsync_sync_request_bytes_total 12345.0
crdtsync_sink_failures_total{sink="hook"} 1
crdtsync_feed_head 41
garbage line
other_requests_total 99
"""


async def test_metrics_parser_is_generic_and_tolerates_missing_series(
        server: Server, page: Any) -> None:
    """The chart's parser (console/metrics.js, run in the browser) reads any series and
    labels; the chart sums the server's sync requests (every outcome) and those answered with
    an error (their labels), not the bytes or other counters, and answers null for what is
    absent."""
    await page.goto(server.url + "/console")
    result = await page.evaluate("""async (text) => {
        const m = await import("/console/metrics.js");
        const samples = m.parseMetrics(text);
        return {names: samples.map((s) => s.name), labels: samples[2].labels,
                syncs: m.syncs(samples), errors: m.syncErrors(samples),
                head: m.first(samples, "crdtsync_feed_head"),
                none: m.syncs(m.parseMetrics("crdtsync_feed_head 1\\n"))};
    }""", METRICS_TEXT)
    assert result == {
        "names": ["crdtsync_sync_requests_total"] * 3 + [
            "crdtsync_sync_requests_created", "crdtsync_sync_request_bytes_total",
            "crdtsync_sink_failures_total", "crdtsync_feed_head", "other_requests_total"],
        "labels": {"code": "internal", "outcome": "server_error", "note": 'a "quoted" one'},
        "syncs": 10, "errors": 3, "head": 41, "none": None}
