"""Worker start-up: warden's zygote against the standard library, in one run.

1. **respawn**: ``max_tasks_per_child=1``, N no-op tasks, so every task gets a
   new worker: warden (zygote, and exec), ``concurrent.futures``'
   ``ProcessPoolExecutor(max_tasks_per_child=1)`` (spawn) and
   ``multiprocessing.Pool(maxtasksperchild=1)`` under fork. Tasks per second,
   and the CPU time and page faults per task of the workers reaped meanwhile;
   beside them, the ceiling: processes per second that only fork, exit and
   are reaped, two at a time.
2. **replacement latency**: one worker, ``max_tasks_per_child=1``, one task at
   a time: each ``submit -> result`` retires the last worker, starts a new one
   and runs the task on it. Median per task.
3. **crash replacement**: one worker; a task ends its worker (``os._exit``),
   then the time from that task's failure to the next task's result. Median.
4. **a Process**: ``start()`` then ``join()`` of a ``Process`` whose target
   does nothing, one after another: ``warden.Process`` (which always starts
   by exec) against ``multiprocessing.Process`` under spawn and fork. Median.
5. **cold start**: a fresh interpreter runs ``import``, constructs a pool of 2
   and waits for the first ``submit -> result``. Median of several runs, with
   pebble beside the standard library when it is installed, and the floor:
   ``import concurrent.futures.process`` alone, which any drop-in for
   ``ProcessPoolExecutor`` (a subclass of it) pays before it has a worker.

Run with ``make bench-py`` or ``python bench/bench_start.py [--quick]``. The
module imports nothing heavy at the top: workers under spawn (and warden's,
which prepare like spawn) import it as ``__mp_main__``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORKERS = 2


def respawn_rate(make, n):
    """Tasks per second through a pool whose every worker runs one task; and,
    per task, the CPU time (ms), the part of it in user space (the
    interpreter's own work, apart from the kernel's page faults and system
    calls) and the page faults of the processes reaped meanwhile (the
    workers that ended; not a zygote or a fork server)."""
    import resource

    with make() as pool:
        submit = pool.submit if hasattr(pool, "submit") else None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        if submit is not None:
            for f in [submit(abs, -i) for i in range(n)]:
                f.result()
        else:
            for r in [pool.apply_async(abs, (-i,)) for i in range(n)]:
                r.get()
        rate = n / (time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n * 1e3
    user = (after.ru_utime - before.ru_utime) / n * 1e3
    return rate, cpu, user, (after.ru_minflt - before.ru_minflt) / n


def fork_ceiling(n):
    """Processes per second that do nothing: ``os.fork()``, ``os._exit(0)`` in
    the child, ``os.waitpid`` in the parent, ``WORKERS`` in flight, from this
    interpreter as it is now (warden, multiprocessing and concurrent.futures
    imported). No pool that gives each task a new process of this interpreter
    respawns faster on this machine."""
    start = time.perf_counter()
    running = 0
    for _ in range(n):
        if running == WORKERS:
            os.wait()
            running -= 1
        if os.fork() == 0:
            os._exit(0)
        running += 1
    while running:
        os.wait()
        running -= 1
    return n / (time.perf_counter() - start)


def replacement_latency(make, n):
    """Median seconds of a sequential submit -> result on a one-worker pool
    with max_tasks_per_child=1 (each is a fresh worker's whole start)."""
    times = []
    with make() as pool:
        pool.submit(abs, 0).result()
        for i in range(n):
            start = time.perf_counter()
            pool.submit(abs, -i).result()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def crash_replacement(make, n):
    """Median seconds from a crashed task's failure to the next result."""
    times = []
    with make() as pool:
        pool.submit(abs, 0).result()
        for _ in range(n):
            with contextlib.suppress(Exception):  # the crash is the point
                pool.submit(os._exit, 3).result()
            start = time.perf_counter()
            pool.submit(abs, -1).result()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def noop():
    """A ``Process`` target that does nothing."""


def process_round_trip(make, n):
    """Median seconds of ``start()`` then ``join()`` of a ``Process`` whose
    target does nothing (the first one, which may start the resource
    tracker, not counted)."""
    times = []
    for i in range(n + 1):
        start = time.perf_counter()
        p = make(target=noop)
        p.start()
        p.join()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


COLD = {
    "warden (zygote)": (
        "import warden\np = warden.ProcessPoolExecutor({w}, start='zygote')\np.submit(abs, -1).result()"
    ),
    "warden (exec)": (
        "import warden\np = warden.ProcessPoolExecutor({w}, start='exec')\np.submit(abs, -1).result()"
    ),
    "ProcessPoolExecutor (spawn)": (
        "import concurrent.futures as cf, multiprocessing as mp\n"
        "p = cf.ProcessPoolExecutor({w}, mp_context=mp.get_context('spawn'))\np.submit(abs, -1).result()"
    ),
    "multiprocessing.Pool (fork)": (
        "import multiprocessing as mp\np = mp.get_context('fork').Pool({w})\np.apply(abs, (-1,))"
    ),
    "pebble.ProcessPool": "import pebble\np = pebble.ProcessPool({w})\np.schedule(abs, args=(-1,)).result()",
    # What a drop-in for concurrent.futures pays before it has a worker: the
    # module whose ProcessPoolExecutor (and BrokenProcessPool) it subclasses.
    "floor: import concurrent.futures.process": "import concurrent.futures.process",
}

COLD_HARNESS = """
import time
t0 = time.perf_counter()
{body}
print(time.perf_counter() - t0, flush=True)
"""


# The same, in a main module (a file) that imports ``module`` first, as a
# program importing numpy at its top does: its workers (or a zygote) import
# main too. The import itself is before the clock starts.
COLD_SCRIPT = """
import time
import {module}
if __name__ == "__main__":
    t0 = time.perf_counter()
{body}
    print(time.perf_counter() - t0, flush=True)
"""


def cold_starts(runs, main_imports=None):
    """Median seconds, by name, from before the import to the first result,
    each in a fresh interpreter (its own start-up excluded: it is the same
    for everyone); the names take turns, a round at a time, so a slower
    minute of the machine weighs on each of them alike. ``None`` for a peer
    that is not installed. With ``main_imports``, the program is a main
    module that imports that module first."""
    names = list(COLD)
    try:
        import pebble  # noqa: F401
    except ImportError:
        names.remove("pebble.ProcessPool")
    times = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="warden-cold-") as tmp:
        script = Path(tmp) / "main.py"
        for _ in range(runs):
            for name in names:
                # Each pool is shut down by its own exit handling, after the figure.
                body = COLD[name].format(w=WORKERS)
                if main_imports is None:
                    code = COLD_HARNESS.format(body=body)
                    argv = [sys.executable, "-c", code]
                else:
                    body = textwrap.indent(body, "    ")
                    script.write_text(COLD_SCRIPT.format(module=main_imports, body=body))
                    argv = [sys.executable, str(script)]
                out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    raise RuntimeError(f"{name}: {out.stderr}")
                times[name].append(float(out.stdout.split()[0]))
    return {name: statistics.median(times[name]) if name in times else None for name in COLD}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (for a smoke test)")
    parser.add_argument("--cold", type=int, metavar="RUNS", help="only the cold start, RUNS rounds")
    parser.add_argument("--process", type=int, metavar="N", help="only the Process start, N of each")
    parser.add_argument(
        "--main-imports", metavar="MODULE", help="with --cold: the program is a main module importing MODULE"
    )
    args = parser.parse_args()
    if args.cold:
        return report_cold(args.cold, args.main_imports)
    if args.process:
        return report_process(args.process)
    scale = 10 if args.quick else 1

    import concurrent.futures as cf
    import multiprocessing as mp

    import warden

    spawn, fork = mp.get_context("spawn"), mp.get_context("fork")
    n_fast = 2000 // scale
    n_slow = 200 // scale
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {WORKERS} workers")
    print(f"respawn: warden zygote and fork N={n_fast}; warden exec and spawn N={n_slow}\n")

    rates = {
        "warden (zygote)": respawn_rate(
            lambda: warden.ProcessPoolExecutor(WORKERS, max_tasks_per_child=1, start="zygote"), n_fast
        ),
        "warden (exec)": respawn_rate(
            lambda: warden.ProcessPoolExecutor(WORKERS, max_tasks_per_child=1, start="exec"), n_slow
        ),
        "ProcessPoolExecutor (spawn)": respawn_rate(
            lambda: cf.ProcessPoolExecutor(WORKERS, mp_context=spawn, max_tasks_per_child=1), n_slow
        ),
        "multiprocessing.Pool (fork)": respawn_rate(lambda: fork.Pool(WORKERS, maxtasksperchild=1), n_fast),
    }
    rates["bare fork + _exit + wait (ceiling)"] = (fork_ceiling(n_fast), None, None, None)
    z = rates["warden (zygote)"][0]
    head = f"{'respawn, max_tasks_per_child=1':34} {'tasks/s':>10} {'zygote is':>10}"
    print(f"{head} {'CPU ms':>7} {'user':>6} {'faults':>7}")
    for name, (rate, cpu, user, faults) in rates.items():
        used = "" if cpu is None else f" {cpu:7.2f} {user:6.2f} {faults:7.0f}"
        print(f"{name:34} {rate:10.1f} {z / rate:9.2f}x{used}")
    print("(CPU ms, of it in user space, faults: per task, of the workers that ended during the run)")

    n_lat = 200 // scale
    print(f"\n{'one worker, max_tasks_per_child=1':34} {'median ms':>10}   (N={n_lat})")
    for start in ("zygote", "exec"):
        lat = replacement_latency(
            lambda start=start: warden.ProcessPoolExecutor(1, max_tasks_per_child=1, start=start), n_lat
        )
        print(f"{'replacement, warden (' + start + ')':34} {lat * 1e3:10.2f}")
    n_crash = 50 // scale
    for start in ("zygote", "exec"):
        lat = crash_replacement(lambda start=start: warden.ProcessPoolExecutor(1, start=start), n_crash)
        print(f"{'after a crash, warden (' + start + ')':34} {lat * 1e3:10.2f}   (N={n_crash})")

    report_process(10 if args.quick else 30)
    report_cold(3 if args.quick else 7)


def report_process(n):
    import multiprocessing as mp

    import warden

    print(f"\n{'Process start() + join(), no-op':34} {'median ms':>10}   (N={n})")
    for name, make in (
        ("warden.Process", warden.Process),
        ("multiprocessing.Process (spawn)", mp.get_context("spawn").Process),
        ("multiprocessing.Process (fork)", mp.get_context("fork").Process),
    ):
        print(f"{name:34} {process_round_trip(make, n) * 1e3:10.2f}")


def report_cold(runs, main_imports=None):
    what = "" if main_imports is None else f", main imports {main_imports}"
    print(f"\n{'cold start to first result':40} {'median ms':>10} {'vs spawn':>9}   ({runs} runs each{what})")
    cold = cold_starts(runs, main_imports)
    base = cold["ProcessPoolExecutor (spawn)"]
    for name, secs in cold.items():
        if secs is None:
            print(f"{name:40} {'(not installed)':>10}")
        else:
            print(f"{name:40} {secs * 1e3:10.1f} {secs / base:8.2f}x")


if __name__ == "__main__":
    main()
