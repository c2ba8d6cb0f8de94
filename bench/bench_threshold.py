"""Where out-of-band buffers start to pay: one ``bytearray`` of each size sent
to a worker and back, through the frame (inline) and through a shared
segment, in the same run. Run ``python bench/bench_threshold.py``; it runs
itself twice with ``WARDEN_INLINE_LIMIT`` set each way."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import warden

SIZES = [4 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20]
N = 300


def identity(x):
    return x


def measure() -> None:
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(identity, 0).result()
        for size in SIZES:
            data = bytearray(os.urandom(size))
            times = []
            for _ in range(N):
                start = time.perf_counter()
                ex.submit(identity, data).result()
                times.append(time.perf_counter() - start)
            print(size, statistics.median(times) * 1e6)


def main() -> None:
    rows: dict[str, dict[int, float]] = {}
    for name, limit in (("inline", str(1 << 40)), ("segment", "1")):
        env = dict(os.environ, WARDEN_INLINE_LIMIT=limit)
        command = [sys.executable, __file__, "--measure"]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
        rows[name] = {int(a): float(b) for a, b in (line.split() for line in out.splitlines())}
    print("| bytes | inline (µs) | segment (µs) | segment / inline |")
    print("|---:|---:|---:|---:|")
    for size in SIZES:
        i, s = rows["inline"][size], rows["segment"][size]
        print(f"| {size} | {i:.0f} | {s:.0f} | {s / i:.2f} |")


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure()
    else:
        main()
