"""Cold export: events (and the files devices sent, as rows of topic ``_file``) from the
change feed into files partitioned by day and topic.

    DIR/day=YYYY-MM-DD/topic=<topic>/part-<first cursor>-<last cursor>.parquet (or .ndjson)
    DIR/_export_state.json

``day`` is the UTC date of the event's device ``time``; ``<topic>`` is percent-encoded
(``.`` and ``:`` too, so ``a.b`` is ``a%2Eb``: what Hive-style readers decode); cursors in file
names are zero-padded to 19 digits, so names sort in feed order. Columns: ``cursor``,
``key`` (the idempotency key), ``device``, ``fleet``, ``seq``, ``topic``, ``time`` and
``received`` (ms since the epoch), ``body`` (JSON text). Parquet needs pyarrow
(``pip install 'crdtsync[parquet]'``); ``auto`` picks it when it imports, else NDJSON.

Exactly once, across crashes. Events are read in chunks (``chunk`` events, default 10,000).
Each chunk is committed in three steps, each durable (written to a temporary name, fsynced,
renamed, directory fsynced) before the next starts:

1. the state file records the chunk as *pending*: its last cursor ``L``;
2. one part file per (day, topic) of the chunk;
3. the state file moves its cursor to ``L`` and clears *pending*.

A rerun after a crash finds either no pending chunk (nothing of the next chunk was written)
or a pending one, which it redoes first: it reads exactly the events in
``(cursor, L]``. The feed is append-only and ordered, so that is the same set of events as
before, grouped into the same files under the same names, which are overwritten. Events that
arrived in the meantime go to later chunks. So every event ends up in exactly one file, and
no file of an unfinished chunk is left over. The state file also records the format and the
filters: resuming with others is refused (``ExportError``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TypeVar
from urllib.parse import quote

from ._aio import cancel_and_wait
from ._disk import fsync_dir
from .admin import MAX_PAGE, AdminClient
from .errors import CrdtsyncError, ExportError

__all__ = ["COLUMNS", "FORMATS", "ExportError", "ExportReport", "ExportState",
           "export_events", "topic_dir"]

EXPORTED_KINDS = "event,file"
"""The feed items an export writes: events, and files devices finished uploading."""
COLUMNS = ("cursor", "key", "device", "fleet", "seq", "topic", "time", "received", "body")
FORMATS = ("auto", "parquet", "ndjson")
STATE_FILE = "_export_state.json"
DEFAULT_CHUNK = 10_000
FOLLOW_WAIT_S = 30
"""Long-poll seconds while following the feed."""
MAX_RETRY_S = 30.0

Row = dict[str, Any]
T = TypeVar("T")

_EPOCH = date(1970, 1, 1).toordinal()
_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class ExportState:
    """What ``DIR/_export_state.json`` holds: every event up to ``cursor`` is in a part
    file; ``pending`` is the last cursor of a chunk being written (redone at the next run)."""

    format: str
    filters: Mapping[str, str]
    cursor: int = 0
    pending: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "format": self.format, "filters": dict(self.filters),
                "cursor": self.cursor, "pending": self.pending}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportState:
        return cls(data["format"], data["filters"], data["cursor"], data["pending"])


@dataclass(slots=True)
class ExportReport:
    """What an export run wrote: ``cursor`` is the last exported cursor (resume point),
    ``format`` the files' format (``parquet``, or ``ndjson`` when pyarrow is absent)."""

    events: int = 0
    files: int = 0
    chunks: int = 0
    cursor: int = 0
    format: str = ""

    def add(self, events: int, files: int, cursor: int) -> None:
        """Count one committed chunk."""
        self.events += events
        self.files += files
        self.chunks += 1
        self.cursor = cursor


# --- formats --------------------------------------------------------------------------------


def pyarrow_parquet() -> ModuleType | None:
    """``pyarrow.parquet``, or None when pyarrow is not installed."""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        return None


def choose_format(requested: str, saved: str | None) -> str:
    """``parquet`` or ``ndjson``: ``auto`` keeps the format of an export being resumed,
    else picks Parquet when pyarrow imports."""
    if requested not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {requested!r}")
    chosen = saved if requested == "auto" and saved else requested
    if chosen == "auto":
        chosen = "parquet" if pyarrow_parquet() is not None else "ndjson"
    if chosen == "parquet" and pyarrow_parquet() is None:
        raise ExportError("Parquet needs pyarrow: pip install 'crdtsync[parquet]', "
                          "or export with --format ndjson")
    return chosen


def write_ndjson(rows: Sequence[Row], file: IO[bytes]) -> None:
    for row in rows:
        file.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")


def write_parquet(rows: Sequence[Row], file: IO[bytes]) -> None:
    pq = pyarrow_parquet()
    assert pq is not None  # checked by choose_format
    pa = importlib.import_module("pyarrow")
    schema = pa.schema([("cursor", pa.int64()), ("key", pa.string()), ("device", pa.string()),
                        ("fleet", pa.string()), ("seq", pa.int64()), ("topic", pa.string()),
                        ("time", pa.int64()), ("received", pa.int64()), ("body", pa.string())])
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), file)


WRITERS: dict[str, Callable[[Sequence[Row], IO[bytes]], None]] = {
    "parquet": write_parquet, "ndjson": write_ndjson}


# --- files ----------------------------------------------------------------------------------


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a power cut."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` whole or not at all: a temporary file (same name at every attempt,
    hidden from readers by its leading dot), fsynced, renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def topic_dir(topic: str) -> str:
    """``topic=<topic>`` with every character but letters, digits, ``_`` and ``-``
    percent-encoded (no ``.``/``..``, ``/`` or ``:`` can reach the path)."""
    return "topic=" + quote(topic, safe="").replace(".", "%2E")


def day_dir(ms: int) -> str:
    """``day=YYYY-MM-DD``, the UTC date of ``ms``; clocks past year 9999 count as its end."""
    days = min(ms // _DAY_MS, date.max.toordinal() - _EPOCH)
    return f"day={date.fromordinal(_EPOCH + days).isoformat()}"


def part_name(rows: Sequence[Row], fmt: str) -> str:
    return f"part-{rows[0]['cursor']:019d}-{rows[-1]['cursor']:019d}.{fmt}"


def group_rows(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows by ``(day, topic)`` directory, in cursor order within each."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((day_dir(row["time"]), topic_dir(row["topic"])), []).append(row)
    return groups


def write_parts(out: Path, rows: Sequence[Row], fmt: str) -> int:
    """One part file per (day, topic) of ``rows``; returns how many."""
    groups = group_rows(rows)
    for (day, topic), part in groups.items():
        folder = out / day / topic
        make_dirs(folder)
        write_atomically(folder / part_name(part, fmt), functools.partial(WRITERS[fmt], part))
    return len(groups)


# --- state ----------------------------------------------------------------------------------


def write_state(out: Path, state: ExportState) -> None:
    data = (json.dumps(state.to_json(), indent=2) + "\n").encode()

    def write(file: IO[bytes]) -> None:
        file.write(data)

    write_atomically(out / STATE_FILE, write)


def read_state(out: Path) -> ExportState | None:
    try:
        text = (out / STATE_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        return ExportState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{out / STATE_FILE} is not an export state file: {exc}") from exc


def open_state(out: Path, requested: str, filters: Mapping[str, str]) -> ExportState:
    """The state of the export in ``out`` (a new one if there is none), checked against the
    format and filters asked for."""
    saved = read_state(out)
    fmt = choose_format(requested, saved.format if saved else None)
    make_dirs(out)
    if saved is None:
        return ExportState(fmt, dict(filters))
    if saved.format != fmt or dict(saved.filters) != dict(filters):
        raise ExportError(f"{out} holds an export as {saved.format} with filters "
                          f"{dict(saved.filters)}: resume it with those, or use another "
                          "directory")
    return saved


def commit_chunk(out: Path, state: ExportState, rows: Sequence[Row], last: int
                 ) -> tuple[ExportState, int]:
    """Write one chunk of rows ending at cursor ``last`` (see the module docstring);
    returns the new state and how many files were written."""
    write_state(out, dataclasses.replace(state, pending=last))
    files = write_parts(out, rows, state.format)
    state = dataclasses.replace(state, cursor=last, pending=None)
    write_state(out, state)
    return state, files


# --- reading the feed -----------------------------------------------------------------------


FILE_TOPIC = "_file"
"""The ``topic`` of a file's row (its partition ``topic=_file``): no event topic starts with
``_``, so it is never an event's."""


def to_row(item: Mapping[str, Any]) -> Row:
    """An event or file feed item as an export row (``COLUMNS``). A file's row has ``topic``
    :data:`FILE_TOPIC`, no ``seq`` and the file's description as ``body`` (name, size,
    sha256, where to fetch it: protocol section 19)."""
    if item["kind"] == "file":
        item = {**item, "topic": FILE_TOPIC, "seq": None, "body": item["file"]}
    row = {name: item[name] for name in COLUMNS}
    row["cursor"] = int(item["cursor"])
    row["body"] = json.dumps(item["body"], separators=(",", ":"), ensure_ascii=False)
    return row


async def feed_page(admin: AdminClient, state: ExportState, after: int, limit: int,
                    wait: int = 0) -> tuple[list[dict[str, Any]], int]:
    """One page of the events and files the export selects (a ``topic`` filter selects
    events of that topic only)."""
    where = state.filters
    return await admin.feed(after, limit, wait, kind=EXPORTED_KINDS,
                            device=where.get("device"),
                            fleet=where.get("fleet"), topic=where.get("topic"))


async def fetch_rows(admin: AdminClient, state: ExportState, size: int,
                     upto: int | None = None) -> list[Row]:
    """Up to ``size`` events after ``state.cursor`` (and at most up to cursor ``upto``),
    page by page, as rows."""
    rows: list[Row] = []
    after = state.cursor
    while len(rows) < size:
        limit = min(MAX_PAGE, size - len(rows))
        items, after = await feed_page(admin, state, after, limit)
        rows += [to_row(i) for i in items]
        if len(items) < limit or (upto is not None and after >= upto):
            break
    return [row for row in rows if upto is None or row["cursor"] <= upto]


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event | None) -> T | None:
    """``await awaitable``, or ``None`` as soon as ``stop`` is set (it is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    if stop is None:
        return await task
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(task, stopped)
    return None if task.cancelled() else task.result()


async def wait_for_events(admin: AdminClient, state: ExportState,
                          stop: asyncio.Event | None) -> bool:
    """Long-poll until an event after ``state.cursor`` exists (True) or ``stop`` is set."""
    while stop is None or not stop.is_set():
        page = await unless_stopped(feed_page(admin, state, state.cursor, 1, FOLLOW_WAIT_S),
                                    stop)
        if page is not None and page[0]:
            return True
    return False


# --- the export -----------------------------------------------------------------------------


class _Export:
    """One export run into ``out``: the state on disk and the report of what it wrote."""

    def __init__(self, admin: AdminClient, out: Path, state: ExportState, chunk: int,
                 progress: Callable[[ExportReport], None] | None) -> None:
        self.admin, self.out, self.state, self.chunk = admin, out, state, chunk
        self.progress = progress
        self.report = ExportReport(cursor=state.cursor, format=state.format)

    async def redo_pending(self) -> None:
        """Finish the chunk a previous run left pending: the same events, the same files."""
        if self.state.pending is not None:
            last = self.state.pending
            await self.write(await fetch_rows(self.admin, self.state, sys.maxsize, last), last)

    async def next_chunk(self) -> bool:
        """Export the next chunk; True when it was full (more events may be waiting)."""
        rows = await fetch_rows(self.admin, self.state, self.chunk)
        if rows:
            await self.write(rows, rows[-1]["cursor"])
        return len(rows) == self.chunk

    async def write(self, rows: list[Row], last: int) -> None:
        self.state, files = await asyncio.to_thread(commit_chunk, self.out, self.state, rows,
                                                    last)
        self.report.add(len(rows), files, last)
        if self.progress is not None:
            self.progress(self.report)

    async def follow(self, stop: asyncio.Event | None) -> None:
        """Export chunks as events arrive until ``stop``; a retryable error (the server
        restarting, the network) is retried with backoff."""
        delay = 1.0
        while stop is None or not stop.is_set():
            try:
                await self.redo_pending()
                while await self.next_chunk():
                    pass
                if not await wait_for_events(self.admin, self.state, stop):
                    return
                delay = 1.0
            except CrdtsyncError as exc:
                if not exc.retryable:
                    raise
                await unless_stopped(asyncio.sleep(delay), stop)
                delay = min(MAX_RETRY_S, delay * 2)


async def export_events(admin: AdminClient, out: str | os.PathLike[str], *,
                        format: str = "auto", device: str | None = None,
                        fleet: str | None = None, topic: str | None = None,
                        chunk: int = DEFAULT_CHUNK, follow: bool = False,
                        stop: asyncio.Event | None = None,
                        progress: Callable[[ExportReport], None] | None = None
                        ) -> ExportReport:
    """Export the feed's events (optionally of one device, fleet or topic) into ``out``,
    resuming after the last run (see the module docstring), until none is left; with
    ``follow``, keep exporting new ones until ``stop`` is set. ``progress`` is called after
    each committed chunk. Raises :class:`ExportError`, or the admin client's errors."""
    if chunk < 1:
        raise ExportError("chunk must be at least 1")
    filters = {name: value for name, value in
               (("device", device), ("fleet", fleet), ("topic", topic)) if value is not None}
    state = await asyncio.to_thread(open_state, Path(out), format, filters)
    run = _Export(admin, Path(out), state, chunk, progress)
    if follow:
        await run.follow(stop)
    else:
        await run.redo_pending()
        while await run.next_chunk():
            pass
    return run.report
