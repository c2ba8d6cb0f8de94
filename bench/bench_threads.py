"""Where a small task's CPU goes: per thread of the parent, and in the workers.

Runs no-op ``submit -> result`` (or ``Pool.apply_async -> get``) in batches of
10 000 on a warm pool of two workers, and reports, per task: the wall time,
the CPU time of each thread of this process (the submitting thread, the
pool's supervisor, the results thread), the CPU time of the workers, and the
voluntary context switches of each (``/proc/<pid>/task/*/stat`` and
``status``), which is what wake-ups cost.

To compare two builds, run it alternately with ``PYTHONPATH`` pointing at
each checkout's ``python/`` directory (each with its extension built in
place); this machine's speed drifts between runs more than most changes.

Run with ``python bench/bench_threads.py [--api submit|apply] [--batches N]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import time

import warden

BATCH = 10_000
_SWITCHES = re.compile(r"^voluntary_ctxt_switches:\s+(\d+)", re.M)


def noop(x: object = None) -> object:
    return x


def threads(pid: int) -> dict[str, tuple[str, int, int]]:
    """Name, CPU ticks and voluntary switches of each thread of ``pid``."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/stat") as f:
                stat = f.read()
            with open(f"{task}/status") as f:
                status = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        match = _SWITCHES.search(status)
        out[task] = (name, int(fields[11]) + int(fields[12]), int(match.group(1)) if match else 0)
    return out


def totals(pids: list[int]) -> tuple[int, int]:
    ticks = switches = 0
    for pid in pids:
        for _, t, s in threads(pid).values():
            ticks, switches = ticks + t, switches + s
    return ticks, switches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=["submit", "apply"], default="submit")
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    if args.api == "submit":
        pool = warden.ProcessPoolExecutor(2)
        pool.submit(noop).result()

        def batch() -> None:
            for f in [pool.submit(noop, i) for i in range(BATCH)]:
                f.result()

        pids = [p.pid for p in pool._processes.values()]
    else:
        pool = warden.Pool(2)
        pool.apply(noop, (1,))

        def batch() -> None:
            for r in [pool.apply_async(noop, (i,)) for i in range(BATCH)]:
                r.get()

        pids = [p.pid for p in pool._pool]
    try:
        batch()
        before, workers_before = threads(os.getpid()), totals(pids)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch()
        seconds = time.perf_counter() - start
        after, workers_after = threads(os.getpid()), totals(pids)
    finally:
        if args.api == "submit":
            pool.shutdown()
        else:
            pool.close()
            pool.join()
    n = args.batches * BATCH
    us = 1e6 / os.sysconf("SC_CLK_TCK") / n
    rows = []
    for task, (name, ticks, switches) in after.items():
        _, ticks0, switches0 = before.get(task, (name, 0, 0))
        if ticks > ticks0:
            rows.append((name, (ticks - ticks0) * us, (switches - switches0) / n))
    worker_ticks, worker_switches = (a - b for a, b in zip(workers_after, workers_before, strict=True))
    rows.append(("workers (both)", worker_ticks * us, worker_switches / n))
    cpu = sum(r[1] for r in rows)
    wall = seconds * 1e6 / n
    print(f"{args.api}: {n / seconds:,.0f} tasks/s, {wall:.1f} us wall and {cpu:.1f} us CPU per task")
    print(f"{'thread':20} {'CPU us/task':>12} {'switches/task':>14}")
    for name, cpu_us, switches in rows:
        print(f"{name:20} {cpu_us:12.1f} {switches:14.2f}")


if __name__ == "__main__":
    main()
