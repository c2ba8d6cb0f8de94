"""Time per received result that arrives on a shared segment and is kept:
numpy arrays around the size below which a received segment is copied out
rather than kept mapped (``WARDEN_SEGMENT_COPY_MAX``, 1 MiB), with lending
off so that every result has a segment; each result's every page is read.
Best of 3 rounds, 2 workers. ``WARDEN_SEGMENT_COPY_MAX=0`` maps every
segment (as before the copying). ``stdlib`` as the first argument runs the
standard library's ``ProcessPoolExecutor`` (spawn) instead, for comparison.

    WARDEN_LEND_BUFFERS=0 WARDEN_SEGMENT_COPY_MAX=0 .venv/bin/python bench/bench_small_segments.py
    WARDEN_LEND_BUFFERS=0 .venv/bin/python bench/bench_small_segments.py
    .venv/bin/python bench/bench_small_segments.py stdlib
"""

import os
import sys
import time

import numpy as np


def make(n):
    return np.ones(n // 8)


if __name__ == "__main__":
    if sys.argv[1:] == ["stdlib"]:
        import concurrent.futures
        import multiprocessing

        ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        print("standard library (spawn)", flush=True)
    else:
        import warden

        ex = warden.ProcessPoolExecutor(2)
        print("warden, copy max", os.environ.get("WARDEN_SEGMENT_COPY_MAX", "default (1 MiB)"), flush=True)
    with ex:
        ex.submit(make, 1 << 20).result()
        for n in (65_600, 256 << 10, (1 << 20) - 4096, 4 << 20):
            count = max(50, min(4000, (512 << 20) // n))
            best = None
            for _ in range(3):
                t = time.perf_counter()
                kept = list(ex.map(make, [n] * count, chunksize=1))
                for a in kept:
                    a[::512].sum()  # every page read, as a program using its results does
                dt = (time.perf_counter() - t) / count
                best = dt if best is None else min(best, dt)
                del kept
            print(f"{n:>10} bytes: {best * 1e6:8.1f} us per result ({count} kept)", flush=True)
