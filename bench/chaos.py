"""Chaos: busy workers SIGKILLed at random while a pool runs many short tasks.

Runs ``--tasks`` tasks on a ``warden.ProcessPoolExecutor`` while a killer
thread SIGKILLs ``--kills`` workers that are running a task (what the
kernel's OOM killer does), spread over the run; ``--signal TERM`` (or
``INT``, ``HUP``) sends that signal instead, which each worker takes
through its exit path, racing the tasks on their way to it. Then checks,
as an outsider:

* every future ended in exactly one outcome: its value (checked) or
  ``warden.WorkerCrashed``, and its done-callbacks ran exactly once;
* no task ran twice (each task claims a marker file with ``O_EXCL``: a second
  run would fail with ``FileExistsError``, an outcome that fails the check);
* the pool never failed, and its restart limit was the default;
* afterwards this process has no children (no zombies either) and the same
  open fds as before the pool.

The same kill schedule is then run against ``concurrent.futures``'s
``ProcessPoolExecutor`` for comparison (``--stdlib-tasks`` of them).

Prints a table, or one JSON object with ``--json``; exits 1 if any check
failed. ``make chaos`` runs it with 100 000 tasks and 1 000 kills.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import warden


def work(i: int, marks: str, pause: float) -> int:
    """A short task that proves it ran only once."""
    fd = os.open(os.path.join(marks, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    if pause:
        time.sleep(pause)
    return i * 2


def children() -> list[int]:
    """Pids of this process's children, zombies included."""
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return pids


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class Killer(threading.Thread):
    """SIGKILLs a busy worker each time another ``every`` tasks have finished."""

    def __init__(
        self, busy_pids: Any, kills: int, every: int, finished: Any, sig: int = signal.SIGKILL
    ) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.sig = sig
        self.busy_pids = busy_pids
        self.kills = kills
        self.every = max(1, every)
        self.finished = finished
        self.sent = 0
        self.stop = threading.Event()
        self.rng = random.Random(8)

    def run(self) -> None:
        while self.sent < self.kills and not self.stop.is_set():
            if self.finished() < (self.sent + 1) * self.every:
                time.sleep(0.0005)
                continue
            pids = self.busy_pids()
            if not pids:
                time.sleep(0.0002)
                continue
            try:
                os.kill(self.rng.choice(pids), self.sig)
            except ProcessLookupError:
                continue
            self.sent += 1


def run_warden(
    tasks: int, kills: int, workers: int, pause: float, sig: int = signal.SIGKILL
) -> dict[str, Any]:
    # A program's first pool starts its multiprocessing resource tracker (one
    # per program, shared by the workers, as the standard library's spawn
    # starts it for its first child); it lives until the program ends, so it
    # belongs to the baseline, not to what the pool leaves.
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    fds_before = open_fds()
    children_before = children()
    with tempfile.TemporaryDirectory(prefix="warden-chaos-") as marks:
        done_calls = [0] * tasks
        lock = threading.Lock()
        finished = [0]

        def on_done(i: int) -> Any:
            def callback(_: Any) -> None:
                with lock:
                    done_calls[i] += 1
                    finished[0] += 1

            return callback

        # Worker logging's channel is one per process, kept for its life (not
        # the pool's resource): off here, so the fd check sees the pool's alone.
        ex = warden.ProcessPoolExecutor(workers, forward_logging=False)
        core = ex._warden_ensure_runner().core

        def busy_pids() -> list[int]:
            return [w.pid for w in core.workers() if w.running_task is not None and w.phase == "ready"]

        start = time.perf_counter()
        killer = Killer(busy_pids, kills, tasks // (kills + 1), lambda: finished[0], sig)
        killer.start()
        futures = []
        for i in range(tasks):
            f = ex.submit(work, i, marks, pause)
            f.add_done_callback(on_done(i))
            futures.append(f)
        values = crashed = wrong = other = 0
        others: list[str] = []
        for i, f in enumerate(futures):
            try:
                v = f.result(timeout=600)
            except warden.WorkerCrashed:
                crashed += 1
            except Exception as e:  # every other outcome is a failed check
                other += 1
                if len(others) < 5:
                    others.append(f"{type(e).__name__}: {e}")
            else:
                values += 1
                wrong += v != i * 2
        elapsed = time.perf_counter() - start
        killer.stop.set()
        killer.join(10)
        failure = core.failure()
        ex.shutdown(wait=True)
        ran = len(os.listdir(marks))
    time.sleep(0.05)  # the results thread's last wake-up
    left_children = [p for p in children() if p not in children_before]
    fds_after = open_fds()
    return {
        "tasks": tasks,
        "kills": killer.sent,
        "signal": signal.Signals(sig).name,
        "workers": workers,
        "seconds": round(elapsed, 2),
        "tasks_per_second": round(tasks / elapsed),
        "values": values,
        "wrong_values": wrong,
        "crashed": crashed,
        "other_outcomes": other,
        "other_examples": others,
        "callbacks_not_once": sum(1 for n in done_calls if n != 1),
        "tasks_started": ran,
        "pool_failure": failure,
        "children_left": left_children,
        "fds_left": sorted(fds_after - fds_before),
    }


def run_stdlib(tasks: int, kills: int, workers: int, pause: float) -> dict[str, Any]:
    """The same schedule on the standard library's executor."""
    with tempfile.TemporaryDirectory(prefix="stdlib-chaos-") as marks:
        ex = cf.ProcessPoolExecutor(workers)
        finished = [0]
        lock = threading.Lock()

        def count(_: Any) -> None:
            with lock:
                finished[0] += 1

        def busy_pids() -> list[int]:
            return list(getattr(ex, "_processes", None) or {})

        start = time.perf_counter()
        futures = [ex.submit(work, i, marks, pause) for i in range(tasks)]
        for f in futures:
            f.add_done_callback(count)
        killer = Killer(busy_pids, kills, tasks // (kills + 1), lambda: finished[0])
        killer.start()
        values = broken = 0
        for f in futures:
            try:
                f.result(timeout=600)
                values += 1
            except cf.process.BrokenProcessPool:
                broken += 1
        elapsed = time.perf_counter() - start
        killer.stop.set()
        killer.join(10)
        ex.shutdown(wait=True)
    return {
        "tasks": tasks,
        "kills": killer.sent,
        "seconds": round(elapsed, 2),
        "values": values,
        "broken": broken,
    }


def checks(r: dict[str, Any]) -> list[str]:
    failed = []
    if r["values"] + r["crashed"] != r["tasks"] or r["other_outcomes"]:
        failed.append(f"outcomes other than a value or WorkerCrashed: {r['other_examples']}")
    if r["wrong_values"]:
        failed.append(f"{r['wrong_values']} wrong values")
    if r["callbacks_not_once"]:
        failed.append(f"{r['callbacks_not_once']} futures whose callbacks did not run exactly once")
    if r["crashed"] > r["kills"]:
        failed.append(f"{r['crashed']} crashed tasks for {r['kills']} kills")
    if r["tasks_started"] < r["values"]:
        failed.append(f"{r['values']} values from {r['tasks_started']} started tasks")
    if r["pool_failure"]:
        failed.append(f"the pool failed: {r['pool_failure']}")
    if r["children_left"]:
        failed.append(f"children left: {r['children_left']}")
    if r["fds_left"]:
        failed.append(f"fds left open: {r['fds_left']}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.001, help="seconds each task sleeps")
    parser.add_argument("--stdlib-tasks", type=int, default=2_000, help="0 to skip the standard library run")
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT", "HUP"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    result = run_warden(args.tasks, args.kills, args.workers, args.pause, sig)
    failed = checks(result)
    out: dict[str, Any] = {"warden": result, "failed_checks": failed}
    if args.stdlib_tasks:
        stdlib_kills = max(1, args.kills * args.stdlib_tasks // max(1, args.tasks))
        out["stdlib"] = run_stdlib(args.stdlib_tasks, stdlib_kills, args.workers, args.pause)
    if args.json:
        print(json.dumps(out))
    else:
        r = result
        print(
            f"warden: {r['tasks']} tasks, {r['kills']} {r['signal']}s to busy workers, {r['workers']} workers"
        )
        print(f"  {r['seconds']} s ({r['tasks_per_second']} tasks/s)")
        print(f"  values {r['values']}, WorkerCrashed {r['crashed']}, other {r['other_outcomes']}")
        print(f"  tasks started {r['tasks_started']} (each at most once), pool failure: {r['pool_failure']}")
        print(f"  children left {len(r['children_left'])}, fds left {len(r['fds_left'])}")
        if "stdlib" in out:
            s = out["stdlib"]
            print(
                f"concurrent.futures: {s['tasks']} tasks, {s['kills']} kills: {s['values']} values, "
                f"{s['broken']} BrokenProcessPool, {s['seconds']} s"
            )
        print("checks:", "all passed" if not failed else "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
