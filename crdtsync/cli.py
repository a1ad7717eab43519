"""The ``crdtsync`` command: run a server or the demo, and manage devices, fleets, state and
events.

    crdtsync serve  [--database URL (alias --db)] [--workers N] [--host H] [--port N]
                    [--admin-token T] [--max-body B] [--routes FILE] [--sinks FILE]
                    [--cache-docs N] [--cache-idle S] [--gc-young N]
                    [--backlog N] [--feed-retention DAYS] [--header-timeout S]
                    [--body-timeout S] [--rebuild-factor X] [--rebuild-slack B]
                    [--wake-hold S] [--wake-rate N] [--max-waiters N] [--instance-ttl S]
                    [--files-dir DIR] [--max-file-size B] [--file-quota B] [--file-chunk B]
                    [--file-retention DAYS] [--log-level LEVEL] [--log-format text|json]
    crdtsync demo   [--devices N] [--duration S] [--db PATH] [--port N] [--data-dir DIR]
                    [--log-level LEVEL]
    crdtsync device add ID [--meta JSON] | crdtsync device list | crdtsync device show ID
    crdtsync device token ID | disable ID | enable ID | delete ID [--events]
    crdtsync fleet add ID [--meta JSON] | crdtsync fleet list | crdtsync fleet show ID
    crdtsync fleet devices ID | crdtsync fleet assign DEVICE (FLEET | --none)
    crdtsync state ID [--map NAME] | crdtsync state set ID KEY=VALUE... [--map NAME] [--string]
    crdtsync events [--device ID] [--topic T] [--after CURSOR] [--limit N] [--follow]
                    [--poll S]
    crdtsync feed [--after CURSOR] [--device ID] [--fleet F] [--topic T] [--kind K] [--follow]
    crdtsync export --out DIR [--format parquet|ndjson|auto] [--device ID] [--fleet F]
                    [--topic T] [--chunk N] [--follow]
    crdtsync env show|set [--device ID | --fleet ID] [KEY=VALUE...] [--string]
    crdtsync template FLEET [TOPIC [JSON | --delete]]
    crdtsync schema set --fleet F FILE | show --fleet F [--version HASH] | delete --fleet F
    crdtsync file put (--device ID | --fleet F) NAME PATH [--meta JSON]
    crdtsync file get (--device ID | --fleet F) NAME [--out PATH] [--direction up|down]
    crdtsync file list (--device ID | --fleet F) [--direction up|down]
    crdtsync sink add NAME JSON | list | show NAME | delete NAME | dead-letters NAME
    crdtsync sink retry NAME [ID...]
    crdtsync simulate [--devices N] [--servers M] [--steps S] [--seed K] [--seeds N]
                      [--faults drop,dup,reorder,delay,partition,crash] [--rate P]
                      [--skew] [--database sqlite|postgresql://...] [--no-progress]

Management commands take ``--url`` (or ``CRDTSYNC_URL``) and ``--admin-token`` (or
``CRDTSYNC_ADMIN_TOKEN``). Exit status: 0 success; 1 an error from the server or the network,
printed as ``error: <code>: <message>``; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from . import __version__
from ._console import compact, err, out, pretty, stop_event, wait_or_stop
from .admin import AdminClient
from .demo import cmd_demo
from .errors import CrdtsyncError
from .export import DEFAULT_CHUNK, FORMATS, ExportReport, export_events, unless_stopped

if TYPE_CHECKING:  # the server loads only when a command runs it (docs/architecture.md, Layering)
    from crdtsync_server import ServerConfig

DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_DATABASE = "./crdtsync.db"
PAGE = 1000
"""The largest page the management API serves."""

Command = Callable[[argparse.Namespace], Awaitable[int]]
AdminCommand = Callable[[AdminClient, argparse.Namespace], Awaitable[int]]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(CrdtsyncError):
    """A command line that parses but cannot be carried out (exit status 2)."""

    code = "usage"
    status = 0


# --- serve --------------------------------------------------------------------------------


def announce_admin_token(token: str) -> None:
    """Print a newly created admin token, the only time it can be seen."""
    rule = "=" * 72
    out(f"{rule}\nadmin token (shown once, store it): {token}\n"
        f"  export CRDTSYNC_ADMIN_TOKEN={token}\n{rule}")


def announce_admin_origin(args: argparse.Namespace, created: str | None) -> None:
    """Say where the admin token comes from when it was not just created (and printed)."""
    if args.admin_token:
        err("admin token: the one given by --admin-token / CRDTSYNC_ADMIN_TOKEN")
    elif not created:
        err("admin token: the one created at first start (the database keeps its hash)")


def listening_line(url: str, database: str, workers: int = 1) -> str:
    """The line ``crdtsync serve`` prints once it serves; a password in ``database`` reads
    ``***``."""
    from crdtsync_server.validation import redact_dsn

    processes = f"; {workers} worker processes" if workers > 1 else ""
    return f"crdtsync server listening on {url} (database: {redact_dsn(database)}{processes})"


async def cmd_serve(args: argparse.Namespace) -> int:
    """Run the sync server until SIGINT or SIGTERM, then shut it down cleanly. With
    ``--workers N`` (N > 1) this process supervises N server processes sharing the port."""
    from crdtsync_server.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    config = serve_config(args)
    check_serve(config, args.workers)
    if args.workers > 1:
        return await serve_workers(config, args)
    from crdtsync_server import Server

    created: list[str] = []

    def on_admin_token(token: str) -> None:
        created.append(token)
        announce_admin_token(token)

    config.on_admin_token = on_admin_token
    stop = stop_event()
    async with Server(config) as server:
        announce_admin_origin(args, created[0] if created else None)
        out(listening_line(server.url, config.db))
        await stop.wait()
        err("shutting down")
    err("stopped")
    return 0


async def serve_workers(config: ServerConfig, args: argparse.Namespace) -> int:
    """``crdtsync serve --workers N``: the supervisor, until SIGINT or SIGTERM. It settles
    the database once before any worker starts, so the admin token is created and printed
    here, never by a worker. Returns 1 if a worker did not stop cleanly."""
    from crdtsync_server.api.workers import Supervisor

    def on_settled(created: str | None) -> None:
        if created:
            announce_admin_token(created)
        announce_admin_origin(args, created)

    supervisor = Supervisor(config, args.workers, stop=stop_event(), log_level=args.log_level,
                            log_format=args.log_format)
    status = await supervisor.run(
        on_settled, lambda: out(listening_line(supervisor.url, config.db, args.workers)))
    err("stopped")
    return status


def check_serve(config: ServerConfig, workers: int) -> None:
    """Raise :class:`UsageError` if ``config`` cannot be served by ``workers`` processes:
    a database URL no backend takes (shown without its password), or a combination
    :func:`~crdtsync_server.api.workers.workers_problem` refuses."""
    from crdtsync_server.api.workers import workers_problem
    from crdtsync_server.store import open_store
    from crdtsync_server.validation import redact_dsn

    try:
        open_store(config.db)  # builds the backend object only: nothing is opened
    except ValueError as exc:
        raise UsageError(f"--database: {redact_dsn(str(exc))}") from None
    if problem := workers_problem(config, workers):
        raise UsageError(problem)


SERVE_OPTIONS = ("max_body", "cache_docs", "backlog", "cache_idle", "header_timeout",
                 "body_timeout", "rebuild_factor", "rebuild_slack", "wake_hold", "wake_rate",
                 "max_waiters", "instance_ttl", "files_dir", "max_file_size", "file_quota",
                 "file_chunk")
"""``crdtsync serve`` options that set the ``ServerConfig`` field of the same name."""
SERVE_GC_YOUNG = 50_000
"""``ServerConfig.gc_young`` of ``crdtsync serve`` (``--gc-young``): above the container
objects a few thousand syncs in flight keep alive, so a loaded server's collector rarely
runs (it ran every dozen syncs at Python's 700)."""
SHOWN_DEFAULTS = frozenset(SERVE_OPTIONS) - {"max_body", "files_dir"}
"""The options whose help shows the ``ServerConfig`` default (:class:`ServeHelp`)."""


class PlainHelp(argparse.HelpFormatter):
    """Help as a terminal shows it: the reST ````code```` marks of the docstrings that serve
    as descriptions are dropped."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("``", "")


class ServeHelp(PlainHelp):
    """``crdtsync serve --help``: appends each option's ``ServerConfig`` default, importing the
    server only when the help is shown, so building the parser leaves it unloaded."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if action.dest not in SHOWN_DEFAULTS:
            return text
        from crdtsync_server import ServerConfig

        value = getattr(ServerConfig(), action.dest)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{text} (default {shown})"


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The server configuration ``crdtsync serve`` options ask for."""
    from crdtsync_server import ServerConfig

    config = ServerConfig(db=args.database, host=args.host, port=args.port,
                          admin_token=args.admin_token or None)
    config.routes_file = args.routes
    config.sinks_file = args.sinks
    for name in SERVE_OPTIONS:  # given on the command line: overrides the default
        if (value := getattr(args, name)) is not None:
            setattr(config, name, value)
    config.gc_young = SERVE_GC_YOUNG if args.gc_young is None else args.gc_young
    if args.feed_retention is not None:
        config.feed_retention_ms = round(args.feed_retention * 86_400_000)
    if args.file_retention is not None:
        config.file_retention_ms = round(args.file_retention * 86_400_000)
    return config


# --- management commands ------------------------------------------------------------------


def admin_command(command: AdminCommand) -> Command:
    """Run ``command`` with an :class:`AdminClient` built from ``--url`` and ``--admin-token``."""

    @functools.wraps(command)
    async def run(args: argparse.Namespace) -> int:
        url, token = client_settings(args)
        if not token:
            raise UsageError("no admin token: pass --admin-token or set CRDTSYNC_ADMIN_TOKEN "
                             "(`crdtsync serve` prints one at its first start)")
        async with AdminClient(url, token) as admin:
            return await command(admin, args)

    return run


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


JSON_OPENERS = ('{', '[', '"')
"""A VALUE starting with one of these is meant as JSON: if it does not parse, it is a typo
(``cfg={"a": 1,``), refused rather than stored as a string."""


def parse_assignment(text: str, *, string: bool = False) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE is read as JSON, else taken as a string (a word: ``mode=eco``);
    ``null`` deletes KEY. A VALUE that starts like a JSON object, array or string but does
    not parse is a :class:`UsageError`. With ``string``, VALUE is always the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"expected KEY=VALUE, got {text!r}")
    if string:
        return key, raw

    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN and Infinity stay strings: no CRDT holds them

    try:
        return key, json.loads(raw, parse_constant=no_constants)
    except ValueError as exc:
        if raw.lstrip().startswith(JSON_OPENERS):
            raise UsageError(f"{key}: {raw!r} is not valid JSON ({exc}); quote it for the "
                             "shell, or pass --string to store it as text") from exc
        return key, raw


def format_time(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds")


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


async def cmd_device_add(admin: AdminClient, args: argparse.Namespace) -> int:
    """Provision a device. Only its token goes to stdout: ``TOKEN=$(crdtsync device add x)``."""
    device = await admin.add_device(args.id, args.meta)
    err(f"provisioned device {device['id']}; its token (shown once) follows on stdout")
    out(device["token"])
    return 0


async def every(fetch: Callable[[str], Awaitable[dict[str, Any]]], key: str
                ) -> list[dict[str, Any]]:
    """Every item of a listing paginated by id: ``fetch(after)`` returns one page,
    ``{key: [...], "next": id | None}``."""
    items: list[dict[str, Any]] = []
    after = ""
    while True:
        page = await fetch(after)
        items += page[key]
        if not page["next"]:
            return items
        after = page["next"]


async def cmd_device_list(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print every device as a table, in id order."""
    devices = await every(lambda after: admin.list_devices(after, PAGE), "devices")
    rows = [("ID", "LAST SEQ", "LOST", "LAST SYNC", "CREATED")]
    rows += [(d["id"], str(d["last_seq"]), str(d["events_lost"]),
              format_time(d["last_sync"]), format_time(d["created"])) for d in devices]
    out(format_table(rows))
    return 0


async def cmd_device_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print one device's record as JSON."""
    out(pretty(await admin.device(args.id)))
    return 0


async def cmd_device_token(admin: AdminClient, args: argparse.Namespace) -> int:
    """Give a device a new token; the old one stops working at once. Only the new token goes
    to stdout: ``TOKEN=$(crdtsync device token x)``."""
    device = await admin.rotate_token(args.id)
    err(f"new token for device {device['id']} (shown once; the old one no longer works) "
        "follows on stdout")
    out(device["token"])
    return 0


async def cmd_device_disable(admin: AdminClient, args: argparse.Namespace) -> int:
    """Refuse a device's syncs (403 forbidden) until it is enabled; it loses nothing: its
    events wait in its outbox. Prints the device as JSON."""
    out(pretty(await admin.set_disabled(args.id, True)))
    return 0


async def cmd_device_enable(admin: AdminClient, args: argparse.Namespace) -> int:
    """Serve a disabled device's syncs again. Prints the device as JSON."""
    out(pretty(await admin.set_disabled(args.id, False)))
    return 0


async def cmd_device_delete(admin: AdminClient, args: argparse.Namespace) -> int:
    """Delete a device, its documents and its queued messages, commands and requests; its
    token stops working. Its events stay in the feed unless --events."""
    await admin.delete_device(args.id, events=args.events)
    err(f"deleted device {args.id}" + (" and its events" if args.events else ""))
    return 0


async def cmd_fleet_add(admin: AdminClient, args: argparse.Namespace) -> int:
    """Create a fleet and print it as JSON."""
    out(pretty(await admin.add_fleet(args.id, args.meta)))
    return 0


async def cmd_fleet_list(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print every fleet as a table, in id order."""
    fleets = await every(lambda after: admin.list_fleets(after, PAGE), "fleets")
    rows = [("ID", "CREATED", "META")]
    rows += [(f["id"], format_time(f["created"]), compact(f["meta"])) for f in fleets]
    out(format_table(rows))
    return 0


async def cmd_fleet_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print one fleet as JSON."""
    out(pretty(await admin.fleet(args.id)))
    return 0


async def cmd_fleet_devices(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print the fleet's devices as a table, in id order."""
    devices = await every(lambda after: admin.fleet_devices(args.id, after, PAGE), "devices")
    rows = [("ID", "FLEET GEN", "LAST SYNC")]
    rows += [(d["id"], str(d["fleet_gen"]), format_time(d["last_sync"])) for d in devices]
    out(format_table(rows))
    return 0


async def cmd_fleet_assign(admin: AdminClient, args: argparse.Namespace) -> int:
    """Move a device into FLEET, or out of every fleet with ``--none``; print the device."""
    if (args.fleet is None) == (not args.none):
        raise UsageError("give either FLEET or --none")
    out(pretty(await admin.set_fleet(args.device, args.fleet)))
    return 0


async def cmd_state(admin: AdminClient, args: argparse.Namespace) -> int:
    """``state ID``: print the document (or one map). ``state set ID K=V...``: patch a map."""
    words: list[str] = args.words
    if len(words) == 1:
        state = await admin.state(words[0])
        out(pretty(state if args.map is None else state.get(args.map, {})))
        return 0
    if words[0] != "set" or len(words) < 3:
        raise UsageError("use `crdtsync state ID` or `crdtsync state set ID KEY=VALUE...`")
    changes = dict(parse_assignment(word, string=args.string) for word in words[2:])
    out(pretty(await admin.patch_state(words[1], changes, args.map or "state")))
    return 0


def ordered(data: Any) -> str:
    """Pretty JSON keeping key order (a template's field order is its wire order)."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def env_path(args: argparse.Namespace) -> str:
    """The env resource named by ``--device`` / ``--fleet`` (project defaults otherwise)."""
    if args.device and args.fleet:
        raise UsageError("give --device or --fleet, not both")
    if args.device:
        return f"/v1/devices/{args.device}/env"
    return f"/v1/fleets/{args.fleet}/env" if args.fleet else "/v1/env"


async def cmd_env_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Show project variables, a fleet's (``--fleet``), or a device's merged view with the
    source of each value (``--device``)."""
    out(pretty(await admin.request("GET", env_path(args))))
    return 0


async def cmd_env_set(admin: AdminClient, args: argparse.Namespace) -> int:
    """Set or delete (``KEY=null``) project, fleet (``--fleet``) or device (``--device``)
    variables; VALUE is read as JSON, else taken as a string."""
    changes = dict(parse_assignment(word, string=args.string) for word in args.pairs)
    out(pretty(await admin.request("PATCH", env_path(args), json=changes)))
    return 0


async def cmd_template(admin: AdminClient, args: argparse.Namespace) -> int:
    """``template FLEET``: list its templates; ``template FLEET TOPIC JSON``: set one;
    ``template FLEET TOPIC --delete``: remove one."""
    path = f"/v1/fleets/{args.fleet}/templates"
    if args.topic is None:
        out(ordered(await admin.request("GET", path)))
    elif args.delete:
        await admin.request("DELETE", f"{path}/{args.topic}")
    elif args.definition is None:
        raise UsageError("give the template as JSON, e.g. '{\"temp\": \"float32\"}'")
    else:
        try:
            definition = json_object(args.definition)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"template: {exc}") from exc
        out(ordered(await admin.request("PUT", f"{path}/{args.topic}", json=definition)))
    return 0


def read_schema_file(path: str) -> dict[str, Any]:
    """The JSON object in file ``path`` (``-``: standard input)."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except OSError as exc:
        raise UsageError(f"schema: cannot read {path}: {exc.strerror}") from exc
    try:
        return json_object(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"schema: {path}: {exc}") from exc


async def cmd_schema_set(admin: AdminClient, args: argparse.Namespace) -> int:
    """Set a fleet's state schema from a JSON file (``-``: standard input); prints its
    version (hash) and normalized definition. Devices of the fleet receive it at their next
    sync (docs/protocol.md 15c)."""
    out(pretty(await admin.put_schema(args.fleet, read_schema_file(args.file))))
    return 0


async def cmd_schema_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Show a fleet's state schema and its version, or any version by hash (``--version``)."""
    if args.version:
        out(pretty(await admin.schema_version(args.version)))
    else:
        out(pretty(await admin.schema(args.fleet)))
    return 0


async def cmd_schema_delete(admin: AdminClient, args: argparse.Namespace) -> int:
    """Remove a fleet's state schema: its devices are held to none from their next sync."""
    await admin.delete_schema(args.fleet)
    return 0


async def cmd_events(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print events as NDJSON, oldest first; with ``--follow``, poll for more until Ctrl-C."""
    stop = stop_event() if args.follow else None
    after, left = args.after, args.limit
    while left is None or left > 0:
        page = await admin.events(after=after, limit=min(PAGE, left or PAGE),
                                  device=args.device, topic=args.topic)
        for event in page["events"]:
            out(compact(event))
        after = page["next"]
        if left is not None:
            left -= len(page["events"])
        if page["events"]:
            continue
        if stop is None or await wait_or_stop(stop, args.poll):
            break
    return 0


def feed_filters(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in ("device", "fleet", "topic", "kind")}


async def cmd_feed(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print change-feed items (events and state changes) as NDJSON, oldest first; with
    ``--follow``, stream new ones as they are stored until Ctrl-C."""
    if args.follow:
        stop = stop_event()
        async with contextlib.aclosing(admin.follow(args.after, **feed_filters(args))) as feed:
            while (item := await unless_stopped(anext(feed), stop)) is not None:
                out(compact(item))
        return 0
    after = args.after
    while True:
        items, after = await admin.feed(after, PAGE, **feed_filters(args))
        for item in items:
            out(compact(item))
        if len(items) < PAGE:
            return 0


def export_progress(report: ExportReport) -> None:
    err(f"exported {report.events} event(s) into {report.files} file(s), "
        f"up to cursor {report.cursor}")


async def cmd_export(admin: AdminClient, args: argparse.Namespace) -> int:
    """Export events from the change feed into DIR as Parquet (or NDJSON) files partitioned
    by day and topic: DIR/day=YYYY-MM-DD/topic=T/part-FIRST-LAST.parquet. Rerunning resumes
    after the last exported event (DIR/_export_state.json); each event is exported exactly
    once, also across crashes. With --follow, keep exporting new events until Ctrl-C."""
    report = await export_events(
        admin, args.out, format=args.format, device=args.device, fleet=args.fleet,
        topic=args.topic, chunk=args.chunk, follow=args.follow,
        stop=stop_event() if args.follow else None, progress=export_progress)
    out(f"exported {report.events} event(s) into {report.files} {report.format.upper()} "
        f"file(s) under {args.out}; last cursor {report.cursor}")
    return 0


# --- sinks ---------------------------------------------------------------------------------


async def cmd_sink_add(admin: AdminClient, args: argparse.Namespace) -> int:
    """Create or reconfigure sink NAME from its JSON form (docs/downstream.md), e.g.
    '{"type": "webhook", "options": {"url": "https://example.com/hook", "secret": "..."}}';
    print it as stored (secrets redacted)."""
    out(pretty(await admin.put_sink(args.name, args.config)))
    return 0


async def cmd_sink_list(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print every sink and where its delivery stands, as a table."""
    rows = [("NAME", "TYPE", "STATE", "LAG", "DELIVERED", "FAILURES", "DEAD", "LAST ERROR")]
    for sink in await admin.sinks():
        status = sink["status"]
        rows.append((sink["name"], sink["type"], status["state"], str(status["lag"]),
                     str(status["delivered"]), str(status["failures"]),
                     str(status["dead_letters"]), status["last_error"] or "-"))
    out(format_table(rows))
    return 0


async def cmd_sink_show(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print one sink with its status as JSON."""
    out(pretty(await admin.sink(args.name)))
    return 0


async def cmd_sink_delete(admin: AdminClient, args: argparse.Namespace) -> int:
    """Stop a sink and forget it with its dead letters."""
    await admin.delete_sink(args.name)
    err(f"deleted sink {args.name}")
    return 0


async def cmd_sink_dead_letters(admin: AdminClient, args: argparse.Namespace) -> int:
    """Print the sink's dead letters as NDJSON, oldest first."""
    after = 0
    while True:
        page = await admin.dead_letters(args.name, after, PAGE)
        for letter in page["dead_letters"]:
            out(compact(letter))
        if page["next"] is None:
            return 0
        after = int(page["next"])


async def cmd_sink_retry(admin: AdminClient, args: argparse.Namespace) -> int:
    """Deliver the sink's dead letters again (all, or the given ids)."""
    count = await admin.retry_dead_letters(args.name, args.ids or None)
    out(f"retrying {count} dead letter(s) of sink {args.name}")
    return 0


# --- command line -------------------------------------------------------------------------


def number(kind: Callable[[str], float], minimum: float) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` that is at least ``minimum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}")
        return value

    return parse


def rebuild_factor(text: str) -> float:
    """argparse type of ``--rebuild-factor``: 0 (off) or a number of at least 1 (below 1 a
    fresh document would be rebuilt again at every check)."""
    value = float(number(float, 0)(text))
    if 0 < value < 1:
        raise argparse.ArgumentTypeError("must be 0 (off) or at least 1")
    return value


def client_options(prefix: str = "") -> argparse.ArgumentParser:
    """The options every management command takes, after the command or (``prefix``
    ``global_``, on the root parser) before it: ``crdtsync --url URL device list``. The two
    are kept apart (a sub-command's default would overwrite the root's value) and resolved
    by :func:`client_settings`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", dest=f"{prefix}url", default=None,
                        help=f"server URL (env CRDTSYNC_URL; default {DEFAULT_URL})")
    parent.add_argument("--admin-token", dest=f"{prefix}admin_token", default=None,
                        help="admin token (env CRDTSYNC_ADMIN_TOKEN, which keeps it out of `ps`)")
    return parent


def client_settings(args: argparse.Namespace) -> tuple[str, str | None]:
    """The URL and admin token of a management command: given after the command, else
    before it, else from the environment (else the default URL, and no token)."""
    url = (args.url or getattr(args, "global_url", None) or os.environ.get("CRDTSYNC_URL")
           or DEFAULT_URL)
    token = (args.admin_token or getattr(args, "global_admin_token", None)
             or os.environ.get("CRDTSYNC_ADMIN_TOKEN"))
    return url, token


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="run the sync server", description=cmd_serve.__doc__,
                       formatter_class=ServeHelp)
    # The default comes from the environment, so the help must not show it (a password).
    p.add_argument("--database", "--db", dest="database", metavar="URL",
                   default=os.environ.get("CRDTSYNC_DATABASE") or DEFAULT_DATABASE,
                   help="the store: a SQLite file, sqlite:///PATH, postgresql://... or "
                        f"memory: (env CRDTSYNC_DATABASE; default {DEFAULT_DATABASE}); "
                        "logs show a password in it as ***")
    p.add_argument("--workers", type=number(int, 1), default=1, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT), under a "
                        "supervisor that restarts them; needs a fixed --port and a database "
                        "every process opens (default 1: one process, no supervisor)")
    p.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    p.add_argument("--port", type=int, default=8787,
                   help="0 picks a free port (default %(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("CRDTSYNC_ADMIN_TOKEN"),
                   help="admin token (env CRDTSYNC_ADMIN_TOKEN); without one, the server uses "
                        "the token created and printed at its first start")
    p.add_argument("--max-body", type=number(int, 1), metavar="BYTES",
                   help="largest request body accepted")
    p.add_argument("--routes", metavar="FILE",
                   help='JSON file of proxied-request routes: {"routes": {alias: {"url": ...,'
                        ' "headers": {"X-Key": "${ENV_VAR}"}, ...}}}')
    p.add_argument("--sinks", metavar="FILE",
                   help='JSON file of downstream sinks: {"sinks": {name: {"type": "webhook",'
                        ' "options": {"url": ..., "secret": "${ENV_VAR}"}, ...}}}')
    p.add_argument("--cache-docs", type=number(int, 1), metavar="N",
                   help="documents kept in memory (LRU); size it to the devices syncing often")
    p.add_argument("--cache-idle", type=number(float, 0.01), metavar="SECONDS",
                   help="a document unused this long leaves memory")
    p.add_argument("--gc-young", type=number(int, 0), metavar="N",
                   help="freeze the start-up's objects and run Python's young garbage"
                        f" collection every N net container allocations (default"
                        f" {SERVE_GC_YOUNG:,}; 0 leaves the collector as Python sets it)")
    p.add_argument("--backlog", type=number(int, 1), metavar="N",
                   help="TCP listen backlog: connections the kernel queues during a reconnect"
                        " storm")
    p.add_argument("--feed-retention", type=number(float, 0.0001), metavar="DAYS",
                   help="purge feed items (events included) this many days after they were"
                        " stored, once every sink delivered them (default: keep for ever)")
    p.add_argument("--header-timeout", type=number(float, 0.01), metavar="SECONDS",
                   help="a connection that does not deliver a whole request head this soon is"
                        " closed")
    p.add_argument("--body-timeout", type=number(float, 0.01), metavar="SECONDS",
                   help="a request body that does not arrive this soon is refused with 408;"
                        " raise it for devices on slow links")
    p.add_argument("--rebuild-factor", type=rebuild_factor, metavar="X",
                   help="rebuild a device's state document without its history when it is"
                        " over X times a fresh document with the same content (plus the"
                        " slack); 0 disables")
    p.add_argument("--rebuild-slack", type=number(int, 0), metavar="BYTES",
                   help="history a state document may carry beyond the factor before it is"
                        " rebuilt")
    p.add_argument("--wake-hold", type=number(float, 0.01), metavar="SECONDS",
                   help="longest a device's live channel (GET /v1/wake) is held before an"
                        " empty answer; keep it below your proxy's idle timeout")
    p.add_argument("--wake-rate", type=number(float, 0.01), metavar="PER_SECOND",
                   help="devices per second a fleet-wide wake-up lets sync (the rest are told"
                        " to wait their turn)")
    p.add_argument("--max-waiters", type=number(int, 1), metavar="N",
                   help="live channels held at most; beyond, 429 with Retry-After")
    p.add_argument("--instance-ttl", type=number(float, 0.1), metavar="SECONDS",
                   help="after this long without a heartbeat, an instance sharing the"
                        " database counts as gone: its running proxied requests are finished"
                        " as interrupted")
    p.add_argument("--files-dir", metavar="DIR",
                   help="directory of the file blobs (default: <database>.files next to a"
                        " SQLite file; inside the database on PostgreSQL)")
    p.add_argument("--max-file-size", type=number(int, 0), metavar="BYTES",
                   help="largest file either way")
    p.add_argument("--file-quota", type=number(int, 0), metavar="BYTES",
                   help="bytes of files one device may hold in the cloud")
    p.add_argument("--file-chunk", type=number(int, 1), metavar="BYTES",
                   help="largest upload chunk a device may send")
    p.add_argument("--file-retention", type=number(float, 0.0001), metavar="DAYS",
                   help="delete files devices sent this many days after they were stored"
                        " (default: keep them)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", type=log_format, metavar="text|json",
                   default=os.environ.get("CRDTSYNC_LOG_FORMAT") or "text",
                   help="log lines as text or one JSON object per line (env "
                        "CRDTSYNC_LOG_FORMAT; default text); see docs/operations.md, Logs")
    p.set_defaults(run=cmd_serve)


def log_format(value: str) -> str:
    """``--log-format``: ``text`` or ``json`` (also checks a value from the environment,
    which argparse passes through this but not through ``choices``)."""
    if value not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"{value!r}: use text or json")
    return value


def add_demo(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="run a server and simulated devices in one process",
                       description=cmd_demo.__doc__)
    p.add_argument("--devices", type=number(int, 1), default=5, help="default %(default)s")
    p.add_argument("--duration", type=number(float, 0), default=20.0,
                   help="seconds; 0 runs until Ctrl-C (default %(default)g)")
    p.add_argument("--db", default="./crdtsync-demo.db",
                   help="server database, deleted and recreated at start (default %(default)s)")
    p.add_argument("--port", type=int, default=8787,
                   help="0 picks a free port (default %(default)s)")
    p.add_argument("--data-dir", default="./crdtsync-demo",
                   help="device stores, recreated at start (default %(default)s)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_demo)


async def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a deterministic simulation of devices, server instances and a faulty network,
    then check every invariant; exit 0 only if all held (docs/testing.md)."""
    from crdtsync_server.validation import redact_dsn

    from .testing import FAULT_NAMES
    from .testing.database import SimDatabase
    from .testing.simulate import simulate

    seeds = list(range(args.seed, args.seed + args.seeds))
    faults = [] if args.faults in ("", "none") else args.faults.split(",")
    unknown = sorted(set(faults) - set(FAULT_NAMES))
    if unknown:
        raise UsageError(f"unknown fault {', '.join(unknown)}; choose from "
                         f"{', '.join(FAULT_NAMES)}")
    try:
        SimDatabase(args.database)
    except ValueError as exc:
        raise UsageError(f"--database: {redact_dsn(str(exc))}") from None
    return await simulate(devices=args.devices, servers=args.servers, steps=args.steps,
                          seeds=seeds, faults=faults, rate=args.rate,
                          progress=not args.no_progress, skew=args.skew,
                          database=args.database)


def add_simulate(sub: Subparsers) -> None:
    from .testing import FAULT_NAMES

    p = sub.add_parser("simulate", help="run a seeded fault simulation and check invariants",
                       description=cmd_simulate.__doc__)
    p.add_argument("--devices", type=number(int, 1), default=3, help="default %(default)s")
    p.add_argument("--servers", type=number(int, 1), default=1,
                   help="server instances sharing one database (default %(default)s)")
    p.add_argument("--steps", type=number(int, 1), default=1000, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="first seed (default %(default)s)")
    p.add_argument("--seeds", type=number(int, 1), default=1,
                   help="how many consecutive seeds to run (default %(default)s)")
    p.add_argument("--faults", default=",".join(FAULT_NAMES),
                   help="comma-separated subset of " + ",".join(FAULT_NAMES)
                   + ", or none (default: all); drop, dup, delay and reorder also hit the "
                   "live channel's wake answers")
    p.add_argument("--rate", type=number(float, 0), default=0.05,
                   help="probability of each enabled fault (default %(default)g)")
    p.add_argument("--skew", action="store_true",
                   help="wrong clocks: device clocks up to 1 h off, drifting, stepped now and "
                   "then; requests and answers taking 2-300 ms")
    p.add_argument("--database", default="sqlite",
                   help="the server instances' shared database: sqlite (one file, the "
                   "default) or a postgresql:// URL (each seed runs in a fresh schema, "
                   "dropped at its end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_simulate)


def add_device(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("device", help="provision and inspect devices")
    device = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = device.add_parser("add", parents=[client], help="provision a device, print its token",
                            description=cmd_device_add.__doc__)
    add.add_argument("id", help="the new device's id (1-64 of A-Z a-z 0-9 _ . : -)")
    add.add_argument("--meta", type=json_object, default={}, help="JSON object kept with it")
    add.set_defaults(run=admin_command(cmd_device_add))
    listing = device.add_parser("list", parents=[client], help="list devices")
    listing.set_defaults(run=admin_command(cmd_device_list))
    show = device.add_parser("show", parents=[client], help="show one device as JSON")
    show.add_argument("id", help="the device's id")
    show.set_defaults(run=admin_command(cmd_device_show))
    actions = {"token": (cmd_device_token, "issue a new token, revoking the old one"),
               "disable": (cmd_device_disable, "refuse the device's syncs until enabled"),
               "enable": (cmd_device_enable, "serve a disabled device again"),
               "delete": (cmd_device_delete, "delete a device and what it owns")}
    parsers = {}
    for action, (command, help_) in actions.items():
        parsers[action] = device.add_parser(action, parents=[client], help=help_,
                                            description=command.__doc__)
        parsers[action].add_argument("id", help="the device's id")
        parsers[action].set_defaults(run=admin_command(command))
    parsers["delete"].add_argument(
        "--events", action="store_true",
        help="also delete its events and state changes from the feed")


def add_fleet(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("fleet", help="create fleets and put devices in them")
    fleet = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = fleet.add_parser("add", parents=[client], help="create a fleet",
                           description=cmd_fleet_add.__doc__)
    add.add_argument("id", help="the new fleet's id")
    add.add_argument("--meta", type=json_object, default={}, help="JSON object kept with it")
    add.set_defaults(run=admin_command(cmd_fleet_add))
    listing = fleet.add_parser("list", parents=[client], help="list fleets")
    listing.set_defaults(run=admin_command(cmd_fleet_list))
    show = fleet.add_parser("show", parents=[client], help="show one fleet as JSON")
    show.add_argument("id", help="the fleet's id")
    show.set_defaults(run=admin_command(cmd_fleet_show))
    devices = fleet.add_parser("devices", parents=[client], help="list a fleet's devices")
    devices.add_argument("id", help="the fleet's id")
    devices.set_defaults(run=admin_command(cmd_fleet_devices))
    assign = fleet.add_parser("assign", parents=[client], help="move a device to a fleet",
                              usage="crdtsync fleet assign DEVICE (FLEET | --none)",
                              description=cmd_fleet_assign.__doc__)
    assign.add_argument("device", help="the device's id")
    assign.add_argument("fleet", nargs="?", help="the fleet to move it to")
    assign.add_argument("--none", action="store_true", help="take the device out of its fleet")
    assign.set_defaults(run=admin_command(cmd_fleet_assign))


def add_state(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "state", parents=[client], help="show a device's state, or set keys of it",
        usage="crdtsync state ID [--map NAME]\n"
              "       crdtsync state set ID KEY=VALUE... [--map NAME] [--string]",
        description="Show a device's document, or merge KEY=VALUE pairs into one of its maps. "
                    "VALUE is read as JSON, else taken as a string (a word: mode=eco); "
                    "KEY=null deletes KEY. A VALUE that starts with { [ or \" must be valid "
                    "JSON (else an error), unless --string stores every VALUE as text.")
    p.add_argument("words", nargs="+", metavar="ID | set ID KEY=VALUE",
                   help="a device id to show, or `set`, the device id and KEY=VALUE pairs")
    p.add_argument("--map", metavar="NAME",
                   help="map to show, or to set keys in (default: state)")
    p.add_argument("--string", action="store_true",
                   help="store every VALUE as a string, without reading it as JSON")
    p.set_defaults(run=admin_command(cmd_state))


def add_env(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("env", help="show or set environment variables")
    env = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    scope = argparse.ArgumentParser(add_help=False)
    scope.add_argument("--device", metavar="ID",
                       help="a device's own variables (`show` also lists what it inherits "
                            "from its fleet and the project, with the source of each)")
    scope.add_argument("--fleet", help="a fleet's variables")
    show = env.add_parser("show", parents=[client, scope], help="show variables",
                          description=cmd_env_show.__doc__)
    show.set_defaults(run=admin_command(cmd_env_show))
    put = env.add_parser("set", parents=[client, scope], help="set or delete variables",
                         description=cmd_env_set.__doc__)
    put.add_argument("pairs", nargs="+", metavar="KEY=VALUE",
                     help="VALUE read as JSON, else taken as a string; KEY=null deletes KEY")
    put.add_argument("--string", action="store_true",
                     help="store every VALUE as a string, without reading it as JSON")
    put.set_defaults(run=admin_command(cmd_env_set))


def add_template(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("template", parents=[client], help="list or set a fleet's templates",
                       description=cmd_template.__doc__)
    p.add_argument("fleet", help="the fleet's id")
    p.add_argument("topic", nargs="?", help="the event topic the template is for")
    p.add_argument("definition", nargs="?", metavar="JSON",
                   help='the template: {"field": "type", ...} in wire order')
    p.add_argument("--delete", action="store_true", help="remove the topic's template")
    p.set_defaults(run=admin_command(cmd_template))


def add_schema(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("schema", help="set, show or delete a fleet's state schema")
    schema = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fleet = argparse.ArgumentParser(add_help=False)
    fleet.add_argument("--fleet", required=True, help="the fleet")
    put = schema.add_parser("set", parents=[client, fleet], help="set the schema from a file",
                            description=cmd_schema_set.__doc__)
    put.add_argument("file", metavar="FILE", help="JSON file, or - for standard input")
    put.set_defaults(run=admin_command(cmd_schema_set))
    show = schema.add_parser("show", parents=[client, fleet], help="show the schema",
                             description=cmd_schema_show.__doc__)
    show.add_argument("--version", metavar="HASH", help="show this version instead")
    show.set_defaults(run=admin_command(cmd_schema_show))
    delete = schema.add_parser("delete", parents=[client, fleet], help="remove the schema",
                               description=cmd_schema_delete.__doc__)
    delete.set_defaults(run=admin_command(cmd_schema_delete))


def add_events(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("events", parents=[client], help="print events as NDJSON",
                       description=cmd_events.__doc__)
    p.add_argument("--device", help="only this device's events")
    p.add_argument("--topic", help="only events of this topic")
    p.add_argument("--after", default="0", metavar="CURSOR",
                   help="start after this cursor (each event carries its own)")
    p.add_argument("--limit", type=number(int, 1), help="print at most this many events")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling for new events")
    p.add_argument("--poll", type=number(float, 0.05), default=1.0,
                   help="seconds between polls with --follow (default %(default)g)")
    p.set_defaults(run=admin_command(cmd_events))


def feed_options(*, kind: bool) -> argparse.ArgumentParser:
    """The filters of the change feed."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", help="only this device's items")
    parent.add_argument("--fleet", help="only items of devices in this fleet")
    parent.add_argument("--topic", help="only events of this topic")
    if kind:
        parent.add_argument("--kind", choices=["event", "state", "conflict", "file"],
                            help="only events, only state changes or only conflicts")
    return parent


def add_feed(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("feed", parents=[client, feed_options(kind=True)],
                       help="print the change feed as NDJSON", description=cmd_feed.__doc__)
    p.add_argument("--after", default="0", metavar="CURSOR",
                   help="start after this cursor (each item carries its own)")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming new items")
    p.set_defaults(run=admin_command(cmd_feed))


def add_export(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[client, feed_options(kind=False)],
                       help="export events into Parquet/NDJSON files, resumably",
                       description=cmd_export.__doc__)
    p.add_argument("--out", required=True, metavar="DIR", help="export directory")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto: parquet when pyarrow is installed, else ndjson; a resumed "
                        "export keeps its format (default %(default)s)")
    p.add_argument("--chunk", type=number(int, 1), default=DEFAULT_CHUNK,
                   help="events per chunk: one file per day and topic of each chunk "
                        "(default %(default)s)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep exporting new events as they arrive, until Ctrl-C")
    p.set_defaults(run=admin_command(cmd_export))


def add_sink(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sink", help="configure downstream sinks and watch their delivery")
    sink = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sink.add_parser("add", parents=[client], help="create or reconfigure a sink",
                          description=cmd_sink_add.__doc__)
    add.add_argument("name", help="the sink's name")
    add.add_argument("config", type=json_object, metavar="JSON",
                     help="the sink's definition (docs/downstream.md)")
    add.set_defaults(run=admin_command(cmd_sink_add))
    listing = sink.add_parser("list", parents=[client], help="list sinks with their status")
    listing.set_defaults(run=admin_command(cmd_sink_list))
    for action, command, help_ in (
            ("show", cmd_sink_show, "show one sink as JSON"),
            ("delete", cmd_sink_delete, "delete a sink"),
            ("dead-letters", cmd_sink_dead_letters, "print a sink's dead letters as NDJSON")):
        one = sink.add_parser(action, parents=[client], help=help_,
                              description=command.__doc__)
        one.add_argument("name", help="the sink's name")
        one.set_defaults(run=admin_command(command))
    retry = sink.add_parser("retry", parents=[client], help="deliver dead letters again",
                            description=cmd_sink_retry.__doc__)
    retry.add_argument("name", help="the sink's name")
    retry.add_argument("ids", nargs="*", type=number(int, 1), metavar="ID",
                       help="dead letters to retry (default: all of them)")
    retry.set_defaults(run=admin_command(cmd_sink_retry))


def file_target(args: argparse.Namespace) -> dict[str, str | None]:
    """``device=`` or ``fleet=`` from ``--device`` / ``--fleet`` (exactly one)."""
    if (args.device is None) == (args.fleet is None):
        raise UsageError("give --device ID or --fleet F")
    return {"device": args.device, "fleet": args.fleet}


async def cmd_file_put(admin: AdminClient, args: argparse.Namespace) -> int:
    """Put the file at PATH as NAME for a device (``--device``) or every device of a fleet
    (``--fleet``), streamed; they download it after their next sync. Prints the record."""
    meta = json.loads(args.meta) if args.meta is not None else None
    out(pretty(await admin.put_file(args.name, args.path, meta=meta, **file_target(args))))
    return 0


async def cmd_file_get(admin: AdminClient, args: argparse.Namespace) -> int:
    """Download file NAME of a device (by default what it sent; ``--direction down``: what
    the cloud put for it) or of a fleet into ``--out`` (default: NAME; ``-``: stdout)."""
    target = args.out or args.name
    if target == "-":
        await admin.get_file(args.name, sys.stdout.buffer, direction=args.direction,
                             **file_target(args))
        return 0
    try:
        with open(target, "wb") as dest:  # noqa: ASYNC230 (written block by block as it comes)
            size = await admin.get_file(args.name, dest, direction=args.direction,
                                        **file_target(args))
    except BaseException:
        os.unlink(target)  # no empty or partial file left behind
        raise
    err(f"{target}: {size} bytes")
    return 0


async def cmd_file_list(admin: AdminClient, args: argparse.Namespace) -> int:
    """List a device's or a fleet's files: name, direction, size, SHA-256."""
    files = await admin.files(direction=args.direction, **file_target(args))
    rows = [("NAME", "DIRECTION", "SIZE", "SHA256")]
    rows += [(f["name"], f["direction"], str(f["size"]), f["sha256"]) for f in files]
    out(format_table(rows))
    return 0


def add_file(sub: Subparsers, client: argparse.ArgumentParser) -> None:
    p = sub.add_parser("file", help="put, get and list files of devices and fleets")
    file = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--device", metavar="ID", help="a device's files")
    target.add_argument("--fleet", metavar="F", help="a fleet's files")
    direction = argparse.ArgumentParser(add_help=False)
    direction.add_argument("--direction", choices=["up", "down"],
                           help="up: sent by the device; down: put by the cloud")
    put = file.add_parser("put", parents=[client, target], help="put a file for devices",
                          description=cmd_file_put.__doc__)
    put.add_argument("name", help="the file's name (1-128 of A-Z a-z 0-9 . _ -)")
    put.add_argument("path", help="the local file to send")
    put.add_argument("--meta", metavar="JSON", help="the file's meta, as JSON")
    put.set_defaults(run=admin_command(cmd_file_put))
    get = file.add_parser("get", parents=[client, target, direction], help="download a file",
                          description=cmd_file_get.__doc__)
    get.add_argument("name", help="the file's name")
    get.add_argument("--out", "-o", metavar="PATH", help="where to write it (- for stdout)")
    get.set_defaults(run=admin_command(cmd_file_get))
    listing = file.add_parser("list", parents=[client, target, direction], help="list files",
                              description=cmd_file_list.__doc__)
    listing.set_defaults(run=admin_command(cmd_file_list))


class Parser(argparse.ArgumentParser):
    """Every parser and sub-parser of the command line formats its help with
    :class:`PlainHelp` (sub-parsers are made of the root parser's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", PlainHelp)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``crdtsync`` argument parser; each command stores its coroutine as ``run``."""
    parser: argparse.ArgumentParser = Parser(
        prog="crdtsync", description="Offline-first sync of device state and events.",
        parents=[client_options("global_")])
    parser.add_argument("--version", action="version", version=f"crdtsync {__version__}")
    parser.set_defaults(log_level="warning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = client_options()
    add_serve(sub)
    add_demo(sub)
    add_simulate(sub)
    add_device(sub, client)
    add_fleet(sub, client)
    add_env(sub, client)
    add_template(sub, client)
    add_schema(sub, client)
    add_state(sub, client)
    add_events(sub, client)
    add_sink(sub, client)
    add_file(sub, client)
    add_feed(sub, client)
    add_export(sub, client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crdtsync`` command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(args.run(args))  # type: ignore[no-any-return]
    except UsageError as exc:
        err(f"error: {exc}")
        return 2
    except CrdtsyncError as exc:
        err(f"error: {exc.code}: {exc.message}")
        return 1
    except BrokenPipeError:
        # The reader went away (`crdtsync events | head`): silence the final flush too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the port is taken, the database cannot be opened, ...
        hint = (" (another server on that port? pick a free one with --port)"
                if exc.errno == errno.EADDRINUSE else "")
        err(f"error: {exc}{hint}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
