"""The cost of forwarding worker logging to the parent, in one run.

1. no-op ``submit`` -> ``result`` throughput with ``forward_logging`` on
   (the default) and off: what forwarding costs a pool whose tasks log nothing;
2. tasks that each log one INFO record, handled in the parent (a handler that
   counts records): warden with forwarding on, against the standard library's
   recipe for the same thing under spawn (``QueueHandler`` in the workers,
   ``QueueListener`` in the parent, a ``multiprocessing`` queue between);
3. one task that logs 20 000 records: the cost per record forwarded, against
   the same recipe, and with forwarding off (the records are dropped).

Run with ``make bench-logging`` or ``python bench/bench_logging.py [--quick]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import logging.handlers
import multiprocessing
import os
import sys
import time

import warden

log = logging.getLogger("bench")


def noop(x=None):
    return x


def log_one(i):
    log.info("task %d", i)
    return i


def log_many(n):
    for i in range(n):
        log.info("record %d", i)
    return n


def queue_initializer(queue):
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(logging.INFO)


class Counter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += 1


def throughput(executor, fn, n):
    def once():
        start = time.perf_counter()
        futures = [executor.submit(fn, i) for i in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - start

    once()
    return n / min(once() for _ in range(3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    args = parser.parse_args()
    workers = args.workers
    n = 2000 if args.quick else 10000
    many = 5000 if args.quick else 20000

    counter = Counter()
    root = logging.getLogger()
    root.addHandler(counter)
    root.setLevel(logging.INFO)
    print(f"workers={workers}  N={n} tasks, {many} records in one task")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    rows = []

    with warden.ProcessPoolExecutor(workers, forward_logging=False) as ex:
        off = throughput(ex, noop, n)
    with warden.ProcessPoolExecutor(workers) as ex:
        on = throughput(ex, noop, n)
    rows.append(("no-op tasks/s, forwarding on vs off", on, off, "warden, forward_logging=False"))

    with warden.ProcessPoolExecutor(workers) as ex:
        before = counter.count
        warden_one = throughput(ex, log_one, n)
        assert counter.count - before == 4 * n, counter.count - before
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    listener = logging.handlers.QueueListener(queue, counter)
    listener.start()
    try:
        with cf.ProcessPoolExecutor(workers, ctx, initializer=queue_initializer, initargs=(queue,)) as ex:
            std_one = throughput(ex, log_one, n)
    finally:
        listener.stop()
    rows.append(("1 INFO record per task, tasks/s", warden_one, std_one, "stdlib QueueHandler recipe"))

    def per_record(ex):
        ex.submit(noop).result()
        start = time.perf_counter()
        ex.submit(log_many, many).result()
        ex.shutdown()  # every record handled
        return (time.perf_counter() - start) / many * 1e6

    before = counter.count
    with warden.ProcessPoolExecutor(1) as ex:
        warden_us = per_record(ex)
    assert counter.count - before == many
    listener = logging.handlers.QueueListener(queue, counter)
    listener.start()
    try:
        with cf.ProcessPoolExecutor(1, ctx, initializer=queue_initializer, initargs=(queue,)) as ex:
            std_us = per_record(ex)
    finally:
        listener.stop()  # handles what is still queued
    with warden.ProcessPoolExecutor(1, forward_logging=False) as ex:
        dropped_us = per_record(ex)
    recipe = "stdlib QueueHandler recipe"
    rows.append(("µs per record forwarded (lower is better)", warden_us, std_us, recipe))
    rows.append(("µs per record, not forwarded (dropped)", dropped_us, std_us, recipe))

    print(f"{'measure':40} {'warden':>10} {'baseline':>10} {'ratio':>7}  baseline")
    for name, ours, theirs, against in rows:
        print(f"{name:40} {ours:10.1f} {theirs:10.1f} {ours / theirs:6.2f}x  {against}")


if __name__ == "__main__":
    main()
