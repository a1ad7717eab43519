"""A lamp that takes orders from the cloud and asks the cloud to call a web service for it.

- ``@device.on("config")``: the cloud sends a *message*; the handler runs at least once
  (``message.seq`` is unique per device, so handlers can be idempotent).
- ``@device.command("blink")``: the cloud sends a *command*; it runs at most once, and its
  return value goes back to the cloud as the command's result.
- ``await device.request("weather", {...})``: a *proxied request*. The device names only a
  route alias; the server holds the URL and the API key, performs the call and sends the
  outcome back. Offline, the request waits durably in the device's SQLite file.

Against a running server (``crdtsync serve`` prints the admin token at its first start)::

    export CRDTSYNC_URL=http://127.0.0.1:8787 CRDTSYNC_ADMIN_TOKEN=...
    TOKEN=$(crdtsync device add lamp-1)
    AUTH="Authorization: Bearer $CRDTSYNC_ADMIN_TOKEN"; JSON="Content-Type: application/json"
    curl -X PUT "$CRDTSYNC_URL/v1/routes/weather" -H "$AUTH" -H "$JSON" \\
        -d '{"url": "https://weather.example.com/now", "headers": {"X-Api-Key": "..."}}'
    python examples/commands_and_requests.py --url "$CRDTSYNC_URL" --token "$TOKEN" --stay 60

and, while it runs (every request above and below needs the admin token)::

    curl -X POST "$CRDTSYNC_URL/v1/devices/lamp-1/messages" -H "$AUTH" -H "$JSON" \\
        -d '{"topic": "config", "body": {"brightness": 40}, "ttl": 3600}'
    curl -X POST "$CRDTSYNC_URL/v1/devices/lamp-1/commands" -H "$AUTH" -H "$JSON" \\
        -d '{"method": "blink", "params": {"times": 3}, "deadline": 60}'
    curl "$CRDTSYNC_URL/v1/commands/ID?wait=30" -H "$AUTH"   # ID from the answer above

The token may also come from ``CRDTSYNC_TOKEN``. The route's target gets the device's body
as JSON (POST); ``GET /v1/routes`` lists routes with header values shown as ``***``.

Without ``--url`` (nor ``CRDTSYNC_URL``) it runs on its own, as CI does: it starts a small
local "weather" service and a server in this process on a temporary SQLite file and free
ports, sets the route with a secret header, provisions the lamp, queues a message and a
command, runs the lamp with its background sync loop, checks the command's result and the
proxied request's outcome, and prints ``ok: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from crdtsync import AdminClient, Device, Message, RouteFailed
from crdtsync_server import Server, ServerConfig


class Lamp:
    """The device's behaviour: what it does with the cloud's messages and commands."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.blinks = 0
        self.messages = 0

    def attach(self, device: Device) -> None:
        """Register the handlers; do it before the device starts syncing, so that nothing
        arrives without its handler (such an item waits, and everything after it)."""
        device.on("config")(self.on_config)
        device.command("blink")(self.blink)

    def on_config(self, message: Message) -> None:
        # Setting values is idempotent: running this twice for one seq does no harm.
        self.config.update(message.body)
        self.messages += 1
        print(f"message {message.seq} on {message.topic!r}: config is now {self.config}")

    async def blink(self, params: Any) -> dict[str, Any]:
        times = int(params.get("times", 1)) if isinstance(params, dict) else 1
        for _ in range(times):
            await asyncio.sleep(0.01)  # the LED would toggle here
        self.blinks += times
        print(f"command blink: blinked {times} time(s)")
        return {"blinked": times}


async def ask_weather(device: Device, city: str, wait_s: float) -> dict[str, Any] | None:
    """Ask the cloud to call the route ``weather``; the outcome, or None if it failed."""
    try:
        outcome = await asyncio.wait_for(device.request("weather", {"city": city}), wait_s)
    except RouteFailed as exc:
        print(f"request weather failed: {exc.reason} ({exc.message})")
        return None
    except TimeoutError:
        # Cancelling the wait leaves the request queued: a later run can still collect it.
        print(f"request weather: no outcome within {wait_s:g} s; "
              f"{len(await device.pending_requests())} request(s) still pending")
        return None
    print(f"request weather: {outcome['status']} {outcome['body']}")
    return outcome


# --- self-contained run ------------------------------------------------------------------


@asynccontextmanager
async def weather_service(api_key: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A local stand-in for a paid weather API: answers ``POST /weather`` when the request
    carries ``api_key``. Yields its URL and the cities it was asked about."""
    asked: list[str] = []

    async def weather(request: web.Request) -> web.Response:
        if request.headers.get("X-Api-Key") != api_key:
            return web.json_response({"error": "bad api key"}, status=401)
        city = (await request.json())["city"]
        asked.append(city)
        return web.json_response({"city": city, "temp_c": 7.5, "sky": "overcast"})

    app = web.Application()
    app.router.add_post("/weather", weather)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/weather", asked
    finally:
        await runner.cleanup()


async def queue_work(admin: AdminClient, device_id: str) -> int:
    """Queue a config message and a blink command; return the command's id."""
    await admin.request("POST", f"/v1/devices/{device_id}/messages",
                        json={"topic": "config", "body": {"brightness": 40}, "ttl": 3600})
    command = await admin.request("POST", f"/v1/devices/{device_id}/commands",
                                  json={"method": "blink", "params": {"times": 3},
                                        "deadline": 60})
    print(f"queued message config and command blink (id {command['id']}, "
          f"status {command['status']})")
    return int(command["id"])


def verify(lamp: Lamp, command: dict[str, Any], outcome: dict[str, Any] | None,
           asked: list[str]) -> bool:
    """True when the message was handled, the command ran once and the request went
    through the route (with its secret header) exactly once."""
    problems = []
    if lamp.messages != 1 or lamp.config != {"brightness": 40}:
        problems.append(f"config message handled {lamp.messages} time(s): {lamp.config}")
    if (command["status"], command["result"]) != ("succeeded", {"blinked": 3}):
        problems.append(f"command is {command['status']} with {command['result']}")
    if outcome is None or outcome["body"].get("temp_c") != 7.5 or asked != ["Oslo"]:
        problems.append(f"request outcome {outcome}, target asked {asked}")
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print(f"ok: {summary_line(lamp, outcome)}; the API key never left the server")
    return not problems


async def self_contained(args: argparse.Namespace) -> int:
    """Own weather service and server on temporary files, own provisioning, then verify."""
    admin_token, api_key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(db=str(Path(tmp) / "server.db"), port=0, admin_token=admin_token)
        async with weather_service(api_key) as (weather_url, asked), Server(config) as server, \
                AdminClient(server.url, admin_token) as admin:
            print(f"no --url given: started a server on {server.url}")
            route = await admin.request("PUT", "/v1/routes/weather", json={
                "url": weather_url, "headers": {"X-Api-Key": api_key}, "timeout": 5})
            print(f"route weather -> {route['url']}, headers as the API shows them: "
                  f"{route['headers']}")
            token = (await admin.add_device(args.id))["token"]
            command_id = await queue_work(admin, args.id)
            lamp = Lamp()
            device = Device(args.id, server.url, token=token, path=Path(tmp) / "lamp.db",
                            interval=1.0, min_spacing=0.05)
            lamp.attach(device)
            async with device:
                command = await admin.request("GET", f"/v1/commands/{command_id}?wait=10")
                print(f"the cloud sees command {command_id}: {command['status']}, "
                      f"result {command['result']}")
                outcome = await ask_weather(device, "Oslo", wait_s=10)
            return 0 if verify(lamp, command, outcome, asked) else 1


def summary_line(lamp: Lamp, outcome: dict[str, Any] | None) -> str:
    """One line: what the lamp did and what the weather request brought."""
    weather = outcome["body"] if outcome else None
    return (f"{lamp.messages} message(s) handled, {lamp.blinks} blink(s), "
            f"weather {weather}")


# --- against a real server ---------------------------------------------------------------


async def connected(args: argparse.Namespace) -> int:
    """Run as the device ``--id`` against the server at ``--url`` for ``--stay`` seconds."""
    token = args.token or os.environ.get("CRDTSYNC_TOKEN")
    if not token:
        print("error: give --token or set CRDTSYNC_TOKEN", file=sys.stderr)
        return 2
    lamp = Lamp()
    device = Device(args.id, args.url, token=token, path=args.db or f"{args.id}.db",
                    interval=args.interval, min_spacing=0.2)
    lamp.attach(device)
    async with device:
        outcome = await ask_weather(device, args.city, wait_s=30)
        print(f"listening for messages and commands for {args.stay:g} s "
              f"(syncing every {args.interval:g} s)")
        await asyncio.sleep(args.stay)
    print(f"done: {summary_line(lamp, outcome)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("CRDTSYNC_URL"),
                        help="server URL (env CRDTSYNC_URL); none: self-contained run")
    parser.add_argument("--token", help="device token (env CRDTSYNC_TOKEN)")
    parser.add_argument("--id", default="lamp-1", help="device id (default %(default)s)")
    parser.add_argument("--city", default="Oslo", help="city to ask the weather route about")
    parser.add_argument("--stay", type=float, default=30.0,
                        help="seconds to keep handling messages and commands (with --url)")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between background syncs (with --url)")
    parser.add_argument("--db", help="local SQLite file (default ./<id>.db)")
    args = parser.parse_args()
    return asyncio.run(connected(args) if args.url else self_contained(args))


if __name__ == "__main__":
    raise SystemExit(main())
