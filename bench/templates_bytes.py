"""Bytes on the wire per event: JSON and msgpack (raw and compressed) against template batches.

A seeded stream of sensor readings drifting slowly (temperature in 0.1 degree steps around 21,
humidity in 1 % steps around 40, voltage in 0.01 V steps around 3.7, ts +60 s, motion rarely
true) is cut into batches of 1, 10, 100 and 1,000 events. Each batch is encoded as the sync
protocol carries events today, a list of [seq, topic, time, body] (msgpack: body as msgpack
bytes, as crdtsync.protocol.encode_request does; JSON: body inline), and as a template batch
with its topic, msgpack [topic, batch]. Each is also compressed on its own. Sizes are summed
over the whole stream and divided by its event count.

    python bench/templates_bytes.py [--events 1000] [--jitter 30] [--quick] [--write FILE]

zstd figures need the optional `zstandard` package; without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from common import machine, write_block

from crdtsync.templates import HASH_SIZE, Template, encode_batch, encode_one

try:
    import zstandard
except ImportError:  # optional
    zstandard = None  # type: ignore[assignment]

TOPIC = "sensor"
FIRST_SEQ = 10_000  # a device a week into minute readings
TEMPLATE_F16 = {"temp": "float16", "hum": "uint8", "voltage": "float16", "ts": "uint32",
                "motion": "bool"}
TEMPLATE_F32 = {**TEMPLATE_F16, "temp": "float32", "voltage": "float32"}

Event = tuple[int, int, dict[str, Any]]


def readings(n: int, seed: int = 5, jitter: int = 30) -> list[Event]:
    """The sample reading, then a mean-reverting random walk at sensor resolution."""
    rng = random.Random(seed)
    temp, hum, volt, ts = 215, 40, 371, 1_764_000_000
    events = []
    for i in range(n):
        body = {"temp": temp / 10, "hum": hum, "voltage": volt / 100, "ts": ts,
                "motion": i > 0 and rng.random() < 0.05}
        time_ms = ts * 1000 + rng.randint(0, jitter)  # emitted a few ms after sampling
        events.append((FIRST_SEQ + i, time_ms, body))
        temp += step(rng, temp, 210, 10)
        hum += step(rng, hum, 40, 5)
        volt += step(rng, volt, 370, 5)
        ts += 60
    return events


def step(rng: random.Random, value: int, centre: int, spread: int) -> int:
    pull = (centre - value) / (4 * spread)  # drift back towards the centre
    r = rng.random()
    return -1 if r < 0.25 - pull else 1 if r > 0.75 - pull else 0


def as_json(batch: list[Event]) -> bytes:
    return json.dumps([[s, TOPIC, t, b] for s, t, b in batch], separators=(",", ":")).encode()


def as_msgpack(batch: list[Event]) -> bytes:
    rows = [[s, TOPIC, t, msgpack.packb(b, use_bin_type=True)] for s, t, b in batch]
    return msgpack.packb(rows, use_bin_type=True)  # type: ignore[no-any-return]


def as_template(template: Template, ref: bool) -> Callable[[list[Event], Event | None], bytes]:
    def encode(batch: list[Event], previous: Event | None) -> bytes:
        refs = {"ref_seq": previous[0], "ref_time": previous[1]} if ref and previous else {}
        data = encode_batch(template, batch, **refs)
        return msgpack.packb([TOPIC, data], use_bin_type=True)  # type: ignore[no-any-return]
    return encode


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    " + deflate 6": lambda b: zlib.compress(b, 6),
    " + deflate 9": lambda b: zlib.compress(b, 9),
}
if zstandard is not None:
    COMPRESSORS[" + zstd 3"] = zstandard.ZstdCompressor(level=3).compress
    COMPRESSORS[" + zstd 19"] = zstandard.ZstdCompressor(level=19).compress


def measure(events: list[Event], sizes: list[int]) -> dict[str, dict[int, float]]:
    f16, f32 = Template(TEMPLATE_F16), Template(TEMPLATE_F32)
    encoders: dict[str, Callable[[list[Event], Event | None], bytes]] = {
        "JSON": lambda b, _: as_json(b),
        "msgpack": lambda b, _: as_msgpack(b),
        "template f16": as_template(f16, ref=False),
        "template f16, ref-coded": as_template(f16, ref=True),
        "template f32": as_template(f32, ref=False),
    }
    table: dict[str, dict[int, float]] = {}
    for size in sizes:
        batches = [events[i:i + size] for i in range(0, len(events) - size + 1, size)]
        count = sum(len(b) for b in batches)
        for name, encode in encoders.items():
            encoded = [encode(b, events[i * size - 1] if i else None)
                       for i, b in enumerate(batches)]
            for suffix, compress in COMPRESSORS.items():
                total = sum(len(compress(e)) for e in encoded)
                table.setdefault(name + suffix, {})[size] = total / count
    return table


def single_event_parts() -> dict[str, int]:
    t = Template(TEMPLATE_F16)
    first, second = readings(2)
    absolute = encode_one(t, *first)
    ref = encode_one(t, *second, ref_seq=first[0], ref_time=first[1])
    return {
        "row (the values at fixed width)": 10,
        "record: row + seq and time, delta-coded against the previous event":
            len(ref) - HASH_SIZE - 1,
        "batch of one, ref-coded (+ template hash 8, count 1)": len(ref),
        "batch of one, absolute seq and time": len(absolute),
        "on the wire with its topic, msgpack [topic, batch]":
            len(msgpack.packb([TOPIC, absolute], use_bin_type=True)),
    }


def best(table: dict[str, dict[int, float]], size: int, keep: Callable[[str], bool]
         ) -> tuple[float, str]:
    return min((row[size], name) for name, row in table.items() if keep(name))


def render(table: dict[str, dict[int, float]], sizes: list[int], n: int, jitter: int) -> str:
    lines = [
        f"Machine: {machine((), sqlite=False)}, zlib {zlib.ZLIB_VERSION}, "
        + (f"zstandard {zstandard.__version__}" if zstandard else "zstd not installed")
        + f". Stream: {n} readings (seed 5), event times {jitter} ms or less after ts.",
        "",
        "Bytes per event (lower is better):",
        "",
        "| encoding | " + " | ".join(f"batch {s:,}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.1f}" for s in sizes) + " |")
    lines += ["", "| batch | best general-purpose | best template f16 | ratio | bar: <= 0.5 "
              "| ref-coded | ratio |", "|---:|---|---|---:|---|---:|---:|"]
    for s in sizes:
        g, gk = best(table, s, lambda k: not k.startswith("template"))
        t, tk = best(table, s, lambda k: k.startswith("template f16") and "ref" not in k)
        r, _ = best(table, s, lambda k: k.startswith("template f16, ref"))
        verdict = "holds" if t <= g / 2 else f"missed by {t - g / 2:.1f} B/event"
        lines.append(f"| {s:,} | {g:.1f} ({gk}) | {t:.1f} ({tk}) | {t / g:.2f} | {verdict} "
                     f"| {r:.1f} | {r / g:.2f} |")
    lines += ["", "Single event, template f16 (bar: <= 20 bytes with its per-event envelope):",
              "", "| what | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in single_event_parts().items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="100 readings (CI smoke)")
    parser.add_argument("--jitter", type=int, default=30,
                        help="event time is ts*1000 plus up to this many ms (default 30)")
    parser.add_argument("--write", type=Path, help="replace the generated block of this file")
    args = parser.parse_args()
    n = 100 if args.quick else args.events
    sizes = [s for s in (1, 10, 100, 1000) if s <= n]
    events = readings(n, jitter=args.jitter)
    text = render(measure(events, sizes), sizes, n, args.jitter)
    print(text)
    if args.write:
        write_block(args.write, "templates_bytes", text)


if __name__ == "__main__":
    main()
