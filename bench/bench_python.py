"""warden vs the standard library, in one run.

1. unchunked no-op ``submit`` -> ``result`` throughput: submit N no-op calls,
   then wait for every result (pools already warm);
2. ``map`` of 1e6 tiny items (``abs``), with ``multiprocessing.Pool``'s
   default chunking (``len / (4 * workers)``) for every contender.

Prints a table and the ratios warden / standard library. Run with
``make bench-py`` or ``python bench/bench_python.py [--quick]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys
import time

import warden


def noop(x=None):
    return x


def best_of(repeats, fn):
    return min(fn() for _ in range(repeats))


def submit_throughput(executor, n):
    def once():
        start = time.perf_counter()
        futures = [executor.submit(noop, i) for i in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - start

    once()  # warm up: workers started, code paths hot
    return n / best_of(3, once)


def map_seconds(run, items):
    run(items[:1000])  # warm up
    return best_of(3, lambda: timed(run, items))


def timed(run, items):
    start = time.perf_counter()
    result = run(items)
    elapsed = time.perf_counter() - start
    assert len(result) == len(items)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    args = parser.parse_args()
    workers = args.workers
    n_submit = 2_000 if args.quick else 20_000
    n_submit_std = 1_000 if args.quick else 5_000
    n_map = 100_000 if args.quick else 1_000_000
    items = list(range(n_map))
    chunk = -(-n_map // (workers * 4))
    ctx = multiprocessing.get_context("spawn")

    print(f"workers={workers}  submit: N={n_submit} (stdlib N={n_submit_std})")
    print(f"map: {n_map} items, chunksize={chunk}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")

    with warden.ProcessPoolExecutor(workers) as ex:
        w_submit = submit_throughput(ex, n_submit)
        w_exmap = map_seconds(lambda xs: list(ex.map(abs, xs, chunksize=chunk)), items)
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        s_submit = submit_throughput(ex, n_submit_std)
        s_exmap = map_seconds(lambda xs: list(ex.map(abs, xs, chunksize=chunk)), items)
    with warden.Pool(workers) as pool:
        w_pmap = map_seconds(lambda xs: pool.map(abs, xs), items)
    with ctx.Pool(workers) as pool:
        s_pmap = map_seconds(lambda xs: pool.map(abs, xs), items)

    ppe = "ProcessPoolExecutor"
    rows = [
        ("submit->result, no-op (tasks/s)", w_submit, s_submit, w_submit / s_submit, ppe),
        (f"Pool.map {n_map:.0e} tiny items (s)", w_pmap, s_pmap, s_pmap / w_pmap, "multiprocessing.Pool"),
        (f"Executor.map {n_map:.0e} chunked (s)", w_exmap, s_exmap, s_exmap / w_exmap, ppe),
    ]
    print(f"{'measure':34} {'warden':>12} {'stdlib':>12} {'speed-up':>9}  against")
    for name, ours, theirs, ratio, against in rows:
        print(f"{name:34} {ours:12.3f} {theirs:12.3f} {ratio:8.2f}x  {against}")


if __name__ == "__main__":
    main()
