"""deflate vs zstd on real sync request bodies, small to large: bytes and time.

    python bench/compression.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

import zstandard

from crdtsync.protocol import DocSync, Event, SyncRequest, encode_request


def body(events: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    temp, hum, volt = 21.0, 40, 3.70
    evs = []
    for i in range(events):
        temp = round(temp + rng.choice((-0.1, 0, 0.1)), 1)
        hum += rng.choice((-1, 0, 1))
        volt = round(volt + rng.choice((-0.01, 0, 0.01)), 2)
        evs.append(Event(1000 + i, "readings", 1764000000000 + 60000 * i,
                         {"temp": temp, "hum": hum, "voltage": volt,
                          "ts": 1764000000 + 60 * i, "motion": rng.random() < 0.05}))
    sv = b"\x02\x93\xa1\xdd\xbd\x09\x27\x84\xc6\x84\xa2\x04\x05"
    return encode_request(SyncRequest("sensor-7", (DocSync("state", sv),), tuple(evs), 999))


def timed(fn: object, data: bytes, rounds: int) -> tuple[int, float]:
    samples = []
    out = b""
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn(data)  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return len(out), statistics.median(samples) * 1e6


def main(quick: bool) -> None:
    rounds = 5 if quick else 200
    zc = zstandard.ZstdCompressor(level=3)
    print("| events | raw | deflate 6 | zstd 3 | zstd/deflate | deflate us | zstd us |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (1, 10, 100, 1000):
        data = body(n)
        d, dt = timed(lambda b: zlib.compress(b, 6), data, rounds)
        z, zt = timed(zc.compress, data, rounds)
        print(f"| {n} | {len(data)} | {d} | {z} | {z / d:.2f} | {dt:.0f} | {zt:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
