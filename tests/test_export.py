"""Cold export (crdtsync/export.py, ``crdtsync export``) against a real server: layout,
both formats, resuming, crashes at every write of a chunk, the NDJSON fallback, --follow."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from crdtsync import AdminClient, Device, TransportError, export
from crdtsync.cli import build_parser
from crdtsync.export import ExportError, day_dir, export_events, topic_dir

from .conftest import ADMIN_TOKEN, DeviceFactory

MIDNIGHT = int(datetime(2024, 3, 2, tzinfo=UTC).timestamp() * 1000)
"""2024-03-02T00:00:00Z in ms: events just before it are on 2024-03-01."""
EVENTS = [("env.temp", MIDNIGHT - 1, {"t": 20.5}),
          ("power:main", MIDNIGHT - 60_000, {"w": 2, "tags": ["a", "b"]}),
          ("env.temp", MIDNIGHT, {"t": 21.0, "note": "été"}),
          ("env.temp", MIDNIGHT + 5, {"t": 21.5}),
          ("power:main", MIDNIGHT + 10, {"w": 3, "nested": {"x": None}})]
PARTITIONS = {"day=2024-03-01/topic=env%2Etemp", "day=2024-03-01/topic=power%3Amain",
              "day=2024-03-02/topic=env%2Etemp", "day=2024-03-02/topic=power%3Amain"}

Row = dict[str, Any]


async def emit(dev: Device, events: list[tuple[str, int, Any]]) -> None:
    """Emit ``(topic, time, body)`` events and a state write, then sync them all."""
    for topic, time_ms, body in events:
        await dev.emit(topic, body, time_ms=time_ms)
        dev.state["last"] = topic  # state changes interleave in the feed; never exported
    await dev.sync()


def read_parquet(out: Path) -> list[Row]:
    """Every exported row, read the way an analytics job would (Hive partitions)."""
    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    return sorted(({**row, "day": str(row["day"])} for row in table.to_pylist()),
                  key=lambda row: row["cursor"])


def read_ndjson(out: Path) -> list[Row]:
    rows = [{**json.loads(line), "day": path.parent.parent.name.removeprefix("day=")}
            for path in out.rglob("*.ndjson") for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda row: row["cursor"])


READERS: dict[str, Callable[[Path], list[Row]]] = {"parquet": read_parquet,
                                                    "ndjson": read_ndjson}


def read_rows(out: Path) -> list[Row]:
    """Rows of whichever format ``out`` holds."""
    fmt = json.loads((out / "_export_state.json").read_text())["format"]
    return READERS[fmt](out)


def part_dirs(out: Path) -> set[str]:
    return {path.parent.relative_to(out).as_posix() for path in out.rglob("part-*")}


def exported_keys(out: Path) -> list[str]:
    return [row["key"] for row in read_rows(out)]


def assert_clean(out: Path) -> None:
    """No temporary file is left over, and no part file holds an event twice."""
    assert not list(out.rglob(".*"))
    keys = exported_keys(out)
    assert len(keys) == len(set(keys))


async def event_keys(admin: AdminClient) -> list[str]:
    items, _ = await admin.feed(limit=1000, kind="event")
    return [item["key"] for item in items]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The export directory (tmp_path also holds the devices' databases)."""
    return tmp_path / "export"


@pytest.fixture
async def sensor(make_device: DeviceFactory) -> Device:
    return await make_device("sensor-1")


@pytest.mark.parametrize("fmt", ["parquet", "ndjson"])
async def test_export_partitions_by_day_and_topic(admin: AdminClient, sensor: Device,
                                                  out: Path, fmt: str) -> None:
    await emit(sensor, EVENTS)
    report = await export_events(admin, out, format=fmt)
    items, _ = await admin.feed(limit=1000, kind="event")
    assert report.events == 5 and report.files == 4 and report.chunks == 1
    assert report.cursor == int(items[-1]["cursor"])
    assert part_dirs(out) == PARTITIONS
    rows = READERS[fmt](out)
    assert [row["key"] for row in rows] == [f"ev:sensor-1:{n}" for n in range(1, 6)]
    for row, item, (topic, time_ms, body) in zip(rows, items, EVENTS, strict=True):
        assert row["cursor"] == int(item["cursor"])
        assert (row["device"], row["fleet"], row["seq"]) == ("sensor-1", None, item["seq"])
        assert (row["topic"], row["time"], row["received"]) == (topic, time_ms,
                                                                 item["received"])
        assert json.loads(row["body"]) == body
        assert row["day"] == ("2024-03-01" if time_ms < MIDNIGHT else "2024-03-02")
    state = json.loads((out / "_export_state.json").read_text())
    assert state == {"version": 1, "format": fmt, "filters": {}, "cursor": report.cursor,
                     "pending": None}
    assert_clean(out)


@pytest.mark.parametrize("fmt", ["parquet", "ndjson"])
async def test_files_devices_sent_are_exported_once_in_their_own_partition(
        admin: AdminClient, sensor: Device, out: Path, fmt: str) -> None:
    """A file a device finished uploading is one row (topic ``_file``, no seq, the feed
    item's file description as body) beside the events, and a rerun adds none."""
    await emit(sensor, EVENTS[:1])
    await sensor.send_file("dump.bin", b"x" * 5000, meta={"why": "test"})
    await sensor.sync_files()
    first = await export_events(admin, out, format=fmt)
    files, _ = await admin.feed(limit=1000, kind="file")
    assert len(files) == 1 and first.events == 2
    rows = READERS[fmt](out)
    row = next(r for r in rows if r["topic"] == export.FILE_TOPIC)
    assert row["key"] == files[0]["key"] and row["seq"] is None
    assert json.loads(row["body"]) == files[0]["file"]
    assert json.loads(row["body"])["size"] == 5000
    day = datetime.fromtimestamp(files[0]["time"] / 1000, UTC).date().isoformat()
    assert f"day={day}/topic=_file" in part_dirs(out)
    await sensor.send_file("dump.bin", b"x" * 5000)  # the same file again: a new upload
    await sensor.sync_files()
    again = await export_events(admin, out, format=fmt)
    files, _ = await admin.feed(limit=1000, kind="file")
    assert again.events == len(files) - 1
    assert sorted(exported_keys(out)) == sorted(
        await event_keys(admin) + [f["key"] for f in files])
    assert_clean(out)


async def test_part_files_are_named_by_their_cursors(admin: AdminClient, sensor: Device,
                                                     out: Path) -> None:
    await emit(sensor, EVENTS)
    await export_events(admin, out, format="ndjson", chunk=2)
    for path in out.rglob("part-*"):
        cursors = [json.loads(line)["cursor"] for line in path.read_text().splitlines()]
        assert path.name == f"part-{cursors[0]:019d}-{cursors[-1]:019d}.ndjson"
    # chunks of 2 events: (day 1 env, day 1 power), (day 2 env x2), (day 2 power)
    assert len(list(out.rglob("part-*"))) == 4
    assert exported_keys(out) == await event_keys(admin)


async def test_rerun_exports_only_new_events(admin: AdminClient, sensor: Device,
                                             out: Path) -> None:
    await emit(sensor, EVENTS[:3])
    first = await export_events(admin, out, chunk=2)
    before = {path: path.read_bytes() for path in out.rglob("part-*")}
    assert (await export_events(admin, out)).events == 0
    await emit(sensor, EVENTS[3:])
    second = await export_events(admin, out)
    assert (first.events, second.events) == (3, 2)
    assert {path: path.read_bytes() for path in before} == before  # untouched
    assert exported_keys(out) == await event_keys(admin)
    assert_clean(out)


async def test_filters_select_events(admin: AdminClient, make_device: DeviceFactory,
                                     tmp_path: Path) -> None:
    await admin.add_fleet("pumps")
    one, two = await make_device("d1"), await make_device("d2")
    await admin.set_fleet("d2", "pumps")
    await emit(one, EVENTS)
    await emit(two, EVENTS)
    await export_events(admin, tmp_path / "d1", device="d1")
    await export_events(admin, tmp_path / "pumps", fleet="pumps")
    await export_events(admin, tmp_path / "power", topic="power:main")
    assert {row["device"] for row in read_rows(tmp_path / "d1")} == {"d1"}
    assert {(row["device"], row["fleet"]) for row in read_rows(tmp_path / "pumps")} == {
        ("d2", "pumps")}
    assert len(read_rows(tmp_path / "pumps")) == 5
    power = read_rows(tmp_path / "power")
    assert {row["topic"] for row in power} == {"power:main"} and len(power) == 4
    state = json.loads((tmp_path / "power" / "_export_state.json").read_text())
    assert state["filters"] == {"topic": "power:main"}


class Crash(Exception):
    """The process died here (simulated)."""


WRITES_PER_CHUNK = 6
"""The first chunk of EVENTS: state (pending), 4 part files, state (committed)."""


@pytest.mark.parametrize("torn", [False, True], ids=["before", "torn"])
@pytest.mark.parametrize("crash_at", range(WRITES_PER_CHUNK))
async def test_a_crash_at_any_write_then_a_rerun_exports_each_event_once(
        admin: AdminClient, sensor: Device, out: Path,
        monkeypatch: pytest.MonkeyPatch, crash_at: int, torn: bool) -> None:
    """The process dies before the n-th durable write of a chunk (``torn``: in the middle
    of it, its temporary file half written); new events arrive before the rerun, which
    then holds every event exactly once, with no temporary file left."""
    await emit(sensor, EVENTS)
    real = export.write_atomically
    writes: list[Path] = []

    def crashing(path: Path, write: Callable[[Any], None]) -> None:
        if len(writes) == crash_at:
            if torn:
                path.with_name(f".{path.name}.tmp").write_bytes(b"half a file")
            raise Crash(path)
        writes.append(path)
        real(path, write)

    monkeypatch.setattr(export, "write_atomically", crashing)
    with pytest.raises(Crash):
        await export_events(admin, out, chunk=100)
    monkeypatch.undo()
    await emit(sensor, [("env.temp", MIDNIGHT + 20, {"t": 22.0}),
                        ("late", MIDNIGHT - 5, {"n": 1})])
    report = await export_events(admin, out, chunk=100)
    assert report.chunks == (2 if crash_at else 1)  # the pending chunk is redone first
    assert exported_keys(out) == await event_keys(admin)
    assert_clean(out)


async def test_crash_after_the_part_files_before_the_state_file(
        admin: AdminClient, sensor: Device, out: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The case named in the design: every part file of the chunk is durable, the state
    file still says "pending". The rerun rewrites the same files, under the same names."""
    await emit(sensor, EVENTS)
    real = export.write_parts

    def then_crash(*args: Any) -> int:
        real(*args)
        raise Crash

    monkeypatch.setattr(export, "write_parts", then_crash)
    with pytest.raises(Crash):
        await export_events(admin, out, format="parquet")
    monkeypatch.undo()
    state = json.loads((out / "_export_state.json").read_text())
    assert state["cursor"] == 0 and state["pending"] is not None
    names = sorted(path.name for path in out.rglob("part-*"))
    await emit(sensor, [("env.temp", MIDNIGHT + 20, {"t": 22.0})])
    await export_events(admin, out)
    assert sorted(path.name for path in out.rglob("part-*"))[:4] == names
    assert exported_keys(out) == await event_keys(admin)
    assert_clean(out)


def without_pyarrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import pyarrow`` fail as if it were not installed."""
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)


async def test_auto_falls_back_to_ndjson_without_pyarrow(
        admin: AdminClient, sensor: Device, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await emit(sensor, EVENTS)
    without_pyarrow(monkeypatch)
    with pytest.raises(ExportError, match="pip install 'crdtsync\\[parquet\\]'"):
        await export_events(admin, tmp_path / "p", format="parquet")
    await export_events(admin, tmp_path / "n")
    assert {path.suffix for path in (tmp_path / "n").rglob("part-*")} == {".ndjson"}
    assert exported_keys(tmp_path / "n") == await event_keys(admin)


async def test_resuming_with_other_options_is_refused(admin: AdminClient, sensor: Device,
                                                      out: Path) -> None:
    await emit(sensor, EVENTS[:2])
    await export_events(admin, out, format="ndjson")
    with pytest.raises(ExportError, match="as ndjson"):
        await export_events(admin, out, format="parquet")
    with pytest.raises(ExportError, match="filters"):
        await export_events(admin, out, device="sensor-1")
    await emit(sensor, EVENTS[2:])
    assert (await export_events(admin, out)).events == 3  # auto keeps ndjson
    assert {path.suffix for path in out.rglob("part-*")} == {".ndjson"}
    (out / "_export_state.json").write_text("{")
    with pytest.raises(ExportError, match="not an export state file"):
        await export_events(admin, out)


async def test_follow_exports_new_events_until_stopped(
        admin: AdminClient, sensor: Device, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # short long polls: the server finishes the one in flight at stop before it shuts down
    monkeypatch.setattr(export, "FOLLOW_WAIT_S", 1)
    await emit(sensor, EVENTS[:2])
    stop, all_in = asyncio.Event(), asyncio.Event()

    def progress(report: export.ExportReport) -> None:
        if report.events == 5:
            all_in.set()

    task = asyncio.create_task(export_events(admin, out, follow=True, stop=stop,
                                             progress=progress))
    await emit(sensor, EVENTS[2:])
    await asyncio.wait_for(all_in.wait(), 30)
    stop.set()
    report = await asyncio.wait_for(task, 30)
    assert report.events == 5
    assert exported_keys(out) == await event_keys(admin)


async def test_follow_retries_when_the_server_is_unreachable(
        admin: AdminClient, sensor: Device, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await emit(sensor, EVENTS)
    real, calls = export.feed_page, []

    async def flaky(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise TransportError("connection refused (test)")
        return await real(*args)

    monkeypatch.setattr(export, "feed_page", flaky)
    stop = asyncio.Event()
    report = await export_events(admin, out, follow=True, stop=stop,
                                 progress=lambda report: stop.set())
    assert report.events == 5 and len(calls) >= 2
    with pytest.raises(TransportError):  # without --follow, the error ends the run
        calls.clear()
        await export_events(admin, out)


async def test_cli_export(admin: AdminClient, sensor: Device, out: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    await emit(sensor, EVENTS)
    args = build_parser().parse_args(["export", "--out", str(out), "--url", admin.url,
                                      "--admin-token", ADMIN_TOKEN, "--format", "ndjson",
                                      "--topic", "env.temp", "--chunk", "2"])
    assert await args.run(args) == 0
    output = capsys.readouterr()
    assert output.out.startswith("exported 3 event(s) into 3 NDJSON file(s)")
    assert "up to cursor" in output.err
    assert {row["topic"] for row in read_ndjson(out)} == {"env.temp"}


def test_topic_and_day_directories() -> None:
    assert topic_dir("env.temp") == "topic=env%2Etemp"
    assert topic_dir("a:b_c-D9") == "topic=a%3Ab_c-D9"
    assert topic_dir("..") == "topic=%2E%2E"
    assert topic_dir("x/../y") == "topic=x%2F%2E%2E%2Fy"
    assert day_dir(0) == "day=1970-01-01"
    assert day_dir(MIDNIGHT - 1) == "day=2024-03-01"
    assert day_dir(MIDNIGHT) == "day=2024-03-02"
    assert day_dir(2**63 - 1) == "day=9999-12-31"  # a device clock gone wild
