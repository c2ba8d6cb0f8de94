"""A task reading small items from a ``multiprocessing`` queue: warden
against the standard library.

One worker (``initializer`` hands it a spawn-context ``SimpleQueue``) runs
one task that takes N small items off the queue while a thread of the
parent puts them on; timed, in the worker, is the task's loop. A warden
worker reads each item's length after a ``poll()`` (so that a stop can
tell a read blocked on an empty pipe from one just back with a length);
this is what that costs. Rounds alternate between the two executors, each
in a fresh interpreter. Run with
``python bench/bench_queue_reads.py [--items N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, threading, time
import concurrent.futures as cf, multiprocessing as mp

def init(q):
    global Q
    Q = q

def drain(n):
    started = time.perf_counter()
    for _ in range(n):
        Q.get()
    return n / (time.perf_counter() - started)

if __name__ == "__main__":
    impl, n = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    if impl == "warden":
        import warden
        ex = warden.ProcessPoolExecutor(1, initializer=init, initargs=(q,))
    else:
        ex = cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=init, initargs=(q,))
    with ex:
        ex.submit(abs, 1).result()
        feeder = threading.Thread(target=lambda: [q.put(i) for i in range(n)])
        future = ex.submit(drain, n)
        feeder.start()
        print(future.result())
        feeder.join()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"warden": [], "ProcessPoolExecutor (spawn)": []}
    with tempfile.TemporaryDirectory() as tmp:
        # A file, not -c: spawned workers import the main module by its path.
        child = os.path.join(tmp, "queue_reads.py")
        with open(child, "w") as f:
            f.write(CHILD)
        for _ in range(args.rounds):
            for name, impl in (("warden", "warden"), ("ProcessPoolExecutor (spawn)", "stdlib")):
                out = subprocess.run(
                    [sys.executable, child, impl, str(args.items)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                rates[name].append(float(out.stdout.split()[-1]))
    base = statistics.median(rates["ProcessPoolExecutor (spawn)"])
    print(f"queue reads in a task: {args.items} items, median of {args.rounds} rounds")
    print(f"{'':30}{'items/s':>12}{'ratio':>8}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:30}{median:12,.0f}{median / base:7.2f}x")


if __name__ == "__main__":
    main()
