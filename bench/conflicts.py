"""Who wins when a device and the cloud write the same key: the win rate of the later write.

A real server (in this process, aiohttp on 127.0.0.1, SQLite in a temp folder) and N
devices, each a real ``Device`` with its own store and a random Yjs client id (as in
production). Each device first writes the key ``mode`` and syncs (it has been online), then
goes offline, and:

- **A**: the device writes ``mode`` offline at t; the cloud PATCHes ``mode`` at t + gap; the
  device syncs at t + 2 gap. The later write is the cloud's.
- **B**: the cloud PATCHes ``mode`` at t; the device writes ``mode`` offline at t + gap; the
  device syncs at t + 2 gap. The later write is the device's.

After that one sync, the value on the cloud (``GET /v1/devices/{id}/state``) and on the
device (``dev.state``) says which write won on each side. Each scenario runs with the
device's clock right, 1 h ahead, 1 h behind (from its first sync on), stepped 1 h ahead or
behind while it was offline (after its last sync), and reset to 1970 while offline.

Time. Where the code takes injected clocks (``Device(..., clock=)`` and ``ServerConfig(clock=)``,
issue 13), every clock reads one simulated time that the script moves forward: no sleeping, and the
device's clock is that time plus its offset. Where it does not, the script sleeps ``gap``
seconds between the steps (all devices step together, so a run costs a few gaps); a device
clock offset needs ``Device(..., clock=)``, without it the offset rows run with the system
clock and say so. The first lines of the output say which mode ran.

    python bench/conflicts.py [--devices 12] [--gap 1.0] [--json] [--quick]
                              [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import ADMIN_TOKEN, arg_parser, in_process_server, machine, provision, report

from crdtsync import AdminClient, Device

HOUR = 3_600_000
KEY = "mode"


# --- time -----------------------------------------------------------------------------------


def device_takes_clock() -> bool:
    """True when ``Device`` takes ``clock=`` (a wall clock in ms; issue 13). Checked here
    rather than imported from ``crdtsync.testing.clocks`` so that the script also runs on a
    checkout from before issue 13, for a before/after in one run."""
    return "clock" in inspect.signature(Device.__init__).parameters


def server_config_takes_clock() -> bool:
    """True when ``ServerConfig`` has ``clock`` (the server's wall clock in ms; issue 13)."""
    from crdtsync_server import ServerConfig

    return "clock" in ServerConfig.__dataclass_fields__


class Timeline:
    """The true time of a run, in ms. Simulated (``simulated``: every injected clock reads
    it; :meth:`advance` moves it without sleeping) or the system clock (:meth:`advance`
    sleeps)."""

    def __init__(self, simulated: bool) -> None:
        self.simulated = simulated
        self._now = time.time_ns() // 1_000_000

    def now(self) -> int:
        return self._now if self.simulated else time.time_ns() // 1_000_000

    async def advance(self, seconds: float) -> None:
        if self.simulated:
            self._now += round(seconds * 1000)
        else:
            await asyncio.sleep(seconds)


@dataclass
class Variant:
    """A device clock: its offset from true time (ms) up to its last sync, and after it."""

    name: str
    before: int
    offline: int | None = None
    """Offset while offline (``None``: unchanged); ``RESET`` reads 0 ms since 1970-01-01
    plus the time since the step."""
    in_target: bool = True
    """Part of the issue's 100 % target (the 1970 reset is a documented limit)."""


RESET = -1
VARIANTS = [
    Variant("right", 0),
    Variant("+1 h", HOUR),
    Variant("-1 h", -HOUR),
    Variant("stepped +1 h while offline", 0, HOUR),
    Variant("stepped -1 h while offline", 0, -HOUR),
    Variant("reset to 1970 while offline", 0, RESET, in_target=False),
]


class DeviceClock:
    """A device's wall clock: true time plus an offset that the run can step."""

    def __init__(self, timeline: Timeline, offset: int) -> None:
        self.timeline = timeline
        self.offset = offset
        self.reset_at: int | None = None

    def step(self, offset: int | None) -> None:
        if offset == RESET:
            self.reset_at = self.timeline.now()
        elif offset is not None:
            self.offset = offset

    def __call__(self) -> int:
        now = self.timeline.now()
        if self.reset_at is not None:
            return now - self.reset_at
        return now + self.offset


# --- one scenario ---------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    clock: str
    later: str
    devices: int
    won_cloud: dict[str, int] = field(default_factory=dict)
    """On the cloud after the sync: how many devices ended with the device's, the cloud's,
    another value."""
    won_device: dict[str, int] = field(default_factory=dict)
    agree: int = 0
    later_both: int = 0
    in_target: bool = True
    skew_applied: bool = True

    @property
    def later_cloud(self) -> int:
        return self.won_cloud.get(self.later, 0)

    @property
    def later_device(self) -> int:
        return self.won_device.get(self.later, 0)


def writer_of(value: Any, device_id: str) -> str:
    if value == f"device:{device_id}":
        return "device"
    if value == f"cloud:{device_id}":
        return "cloud"
    return "other"


async def run_scenario(url: str, folder: Path, scenario: str, variant: Variant, n: int,
                       gap: float, timeline: Timeline, clocks: bool) -> Row:
    """Run ``scenario`` (A or B) on ``n`` fresh devices with the device clock ``variant``."""
    tag = f"{scenario}{VARIANTS.index(variant)}"
    ids = [f"{tag}-{i:02d}" for i in range(n)]
    tokens = await provision(url, ids)
    device_clocks = {i: DeviceClock(timeline, variant.before) for i in ids}
    devices = []
    for device_id in ids:
        extra: dict[str, Any] = {"clock": device_clocks[device_id]} if clocks else {}
        dev = Device(device_id, url, token=tokens[device_id], path=folder / f"{device_id}.db",
                     interval=None, **extra)
        await dev.start()
        devices.append(dev)
    try:
        for dev in devices:  # online: the key exists on both sides
            dev.state[KEY] = "initial"
            await dev.sync()
        await timeline.advance(gap)
        for clock in device_clocks.values():
            clock.step(variant.offline)
        async with AdminClient(url, ADMIN_TOKEN) as admin:
            first, second = (("device", "cloud") if scenario == "A" else ("cloud", "device"))
            await write_all(first, devices, admin)
            await timeline.advance(gap)
            await write_all(second, devices, admin)
            await timeline.advance(gap)
            for dev in devices:
                await dev.sync()
            row = Row(scenario, variant.name, second, n, in_target=variant.in_target,
                      skew_applied=clocks or (variant.before == 0 and variant.offline is None))
            for dev in devices:
                cloud = writer_of((await admin.state(dev.id))["state"].get(KEY), dev.id)
                local = writer_of(dev.state.get(KEY), dev.id)
                row.won_cloud[cloud] = row.won_cloud.get(cloud, 0) + 1
                row.won_device[local] = row.won_device.get(local, 0) + 1
                row.agree += cloud == local
                row.later_both += cloud == local == second
    finally:
        for dev in devices:
            await dev.aclose()
    return row


async def write_all(writer: str, devices: list[Device], admin: AdminClient) -> None:
    """Every device (offline) or the cloud writes ``KEY`` for every device."""
    for dev in devices:
        if writer == "device":
            dev.state[KEY] = f"device:{dev.id}"
        else:
            await admin.patch_state(dev.id, {KEY: f"cloud:{dev.id}"})


# --- the run --------------------------------------------------------------------------------


async def run(n: int, gap: float, variants: list[Variant]) -> dict[str, Any]:
    clocks = device_takes_clock()
    simulated = clocks and server_config_takes_clock()
    timeline = Timeline(simulated)
    server_clock: dict[str, Any] = {"clock": timeline.now} if simulated else {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="crdtsync-conflicts-") as tmp:
        folder = Path(tmp)
        for index, variant in enumerate(variants):
            for scenario in ("A", "B"):
                # A fresh server per row: each has its own random client id, as each server
                # process does (today the id decides every concurrent write).
                async with in_process_server(folder, f"server-{scenario}{index}.db",
                                             **server_clock) as server:
                    rows.append(await run_scenario(server.url, folder, scenario, variant, n,
                                                   gap, timeline, clocks))
    return {"machine": machine(), "devices": n, "gap_s": gap,
            "device_clock_injected": clocks, "simulated_time": simulated,
            "rows": [{**asdict(r), "later_cloud": r.later_cloud,
                      "later_device": r.later_device} for r in rows]}


SCENARIOS = {"A": "device offline at t, cloud at t+{gap}",
             "B": "cloud at t, device offline at t+{gap}"}


def render(result: dict[str, Any]) -> str:
    n, gap = result["devices"], result["gap_s"]
    mode = ("simulated time (injected device and server clocks, no sleeping)"
            if result["simulated_time"] else
            f"system time (sleeping {gap:g} s between steps); device clock offsets "
            + ("injected (`Device(..., clock=)`)" if result["device_clock_injected"] else
               "NOT applied: this `Device` takes no `clock=`, so those rows ran with the "
               "system clock"))
    lines = [f"Machine: {result['machine']}. {n} devices per row, random client ids; "
             f"{mode}.", "",
             "| scenario | device clock | later writer | later write wins on cloud | "
             "on device | both sides agree | later wins on both |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        clock = r["clock"] + ("" if r["skew_applied"] else " (not applied)")
        clock += "" if r["in_target"] else " (limit)"
        lines.append(f"| {r['scenario']}: {SCENARIOS[r['scenario']].format(gap=f'{gap:g} s')} "
                     f"| {clock} | {r['later']} | {r['later_cloud']}/{n} | "
                     f"{r['later_device']}/{n} | {r['agree']}/{n} | {r['later_both']}/{n} |")
    target = [r for r in result["rows"] if r["in_target"] and r["skew_applied"]]
    won = sum(r["later_both"] for r in target)
    total = n * len(target)
    every = sum(r["later_both"] for r in result["rows"])
    lines += ["", f"Later write wins on both sides: {won}/{total} "
              f"({100 * won / max(total, 1):.0f} %) over the rows in the target (device clock "
              f"right, ±1 h, stepped ±1 h, where applied); {every}/{n * len(result['rows'])} "
              "over every row."]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--devices", type=int, default=12, help="devices per row")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds between the two writes (and before the sync)")
    parser.add_argument("--quick", action="store_true",
                        help="3 devices, 0.2 s gap, two clock variants (CI smoke test)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--write", type=Path, help="replace the conflicts block of this file")
    return parser.parse_args()


def main() -> None:
    args = parse()
    n, gap, variants = args.devices, args.gap, VARIANTS
    if args.quick:
        n, gap, variants = 3, 0.2, [VARIANTS[0], VARIANTS[2]]
    result = asyncio.run(run(n, gap, variants))
    if args.json:
        print(json.dumps(result))
    else:
        report(render(result), args.write, "conflicts")


if __name__ == "__main__":
    main()
