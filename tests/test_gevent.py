"""warden in a program gevent monkey-patched (``gevent.monkey.patch_all()``),
as web servers and crawlers are: pools answer, the program's greenlets run
while it waits, Ctrl-C stops it, nothing is left open."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

pytest.importorskip("gevent", reason="gevent is optional (make test installs it)")

PROGRAM = """
from gevent import monkey; monkey.patch_all()
import logging, os, sys, time
import gevent

def square(x):
    return x * x

def block(n):
    return b"x" * n

def warn(x):
    logging.getLogger("task").warning("from the worker %s", x)
    return x

def pipes():
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                found.add(fd)
        except OSError:
            pass
    return found

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stdout)
    if sys.argv[1] == "warden":
        from warden import ProcessPoolExecutor
        from warden import Pool
        kw = {}
    else:
        import multiprocessing, concurrent.futures
        ProcessPoolExecutor = concurrent.futures.ProcessPoolExecutor
        kw = {"mp_context": multiprocessing.get_context("spawn")}
    ticks = []
    def tick():
        while True:
            ticks.append(1)
            gevent.sleep(0.005)
    ticker = gevent.spawn(tick)
    with ProcessPoolExecutor(2, **kw) as ex:
        print("submit", ex.submit(square, 3).result(timeout=30), flush=True)
        print("map", list(ex.map(square, range(4), timeout=30)), flush=True)
        print("large", len(ex.submit(block, 8 << 20).result(timeout=30)), flush=True)
        seen = []
        f = ex.submit(time.sleep, 0.3)
        f.add_done_callback(lambda _: seen.append("called"))
        f.result(timeout=30)
        print("callback", seen, flush=True)
        before = len(ticks)
        ex.submit(time.sleep, 0.3).result(timeout=30)
        print("greenlets ran while waiting", len(ticks) > before, flush=True)
        print("logged", ex.submit(warn, 7).result(timeout=30), flush=True)
    if sys.argv[1] == "warden":
        with Pool(2) as pool:
            print("pool map", pool.map(square, range(4)), flush=True)
            print("imap", list(pool.imap(square, range(4))), flush=True)
            held = pipes()
            print("large", len(pool.apply_async(block, (8 << 20,)).get(timeout=30)), flush=True)
            print("pipes left open", sorted(pipes() - held), flush=True)
    ticker.kill()
    print("done", flush=True)
"""

BOTH = [
    "submit 9",
    "map [0, 1, 4, 9]",
    f"large {8 << 20}",
    "callback ['called']",
    "greenlets ran while waiting True",
    "logged 7",
]


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_gevent_patched_program_gets_its_results_while_its_greenlets_run(program, impl):
    """Before, ``submit`` never returned: warden's results thread, a
    greenlet under gevent's patching, blocked the program's only thread in
    the core's wait. The standard library's executor (whose threads wait
    in patched calls) is the reference; its ``Pool`` hangs there."""
    run = program(PROGRAM).run(timeout=120, args=(impl,))
    assert run.returncode == 0, run.stderr
    expected = list(BOTH)
    if impl == "warden":
        # A worker's records reach the parent's handlers (see docs/python.md).
        expected.insert(expected.index("logged 7"), "task from the worker 7")
        expected += ["pool map [0, 1, 4, 9]", "imap [0, 1, 4, 9]", f"large {8 << 20}", "pipes left open []"]
    assert run.stdout.splitlines() == [*expected, "done"], run.stderr
    # Nothing of warden's own on stderr: before, the thread that watches a
    # worker's import of main, started before main patched ``threading``,
    # ended after it with a ``KeyError`` from the patched bookkeeping.
    assert "Exception ignored" not in run.stderr and "KeyError" not in run.stderr, run.stderr


INTERRUPTED = """
from gevent import monkey; monkey.patch_all()
import os, sys, time
import warden

def nap(x):
    with open(os.environ["OUT"], "a") as f:
        f.write(f"started {x}\\n")
    try:
        time.sleep(60)
    finally:
        with open(os.environ["OUT"], "a") as f:
            f.write(f"finally {x}\\n")

if __name__ == "__main__":
    if sys.argv[1] == "executor":
        with warden.ProcessPoolExecutor(2) as ex:
            futures = [ex.submit(nap, i) for i in range(2)]
            print("waiting", flush=True)
            futures[0].result()
    else:
        with warden.Pool(2) as pool:
            result = pool.map_async(nap, range(2), chunksize=1)
            print("waiting", flush=True)
            result.get()
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_ctrl_c_stops_a_gevent_patched_program_waiting_on_a_pool_and_its_tasks_finish_their_finally(
    program, kind
):
    prog = program(INTERRUPTED)
    proc = prog.start(args=(kind,))
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "waiting":
        proc.wait(30)
        pytest.fail(f"the program did not start: {proc.stderr.read() if proc.stderr else ''}")
    deadline = time.monotonic() + 30
    while len(prog.out_lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(prog.out_lines()) == ["started 0", "started 1"]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the program did not stop within 30 s of Ctrl-C")
    assert proc.returncode == -signal.SIGINT, proc.returncode  # KeyboardInterrupt ended it
    assert sorted(prog.out_lines()) == ["finally 0", "finally 1", "started 0", "started 1"]


CTRL_C_IN_THE_ITERABLE = """
from gevent import monkey; monkey.patch_all()
import time
import warden

def square(x):
    return x * x

def parsed_records():
    for i in range(10_000):
        began = time.monotonic()
        while time.monotonic() - began < 0.02:
            pass  # parsing: the feeder's greenlet holds the program's thread
        if i == 3:
            print("waiting", flush=True)
        yield i

if __name__ == "__main__":
    with warden.Pool(2) as pool:
        try:
            for value in pool.imap(square, parsed_records()):
                pass
        except Exception as e:
            print("caught", type(e).__name__, e, flush=True)
    print("went on", flush=True)
"""


def test_ctrl_c_while_a_gevent_patched_imap_runs_its_iterable_ends_the_program_as_keyboard_interrupt(program):
    """Under gevent the feeder of an ``imap`` is a greenlet on the program's
    one thread, and a Ctrl-C lands in whatever runs there: often the
    program's own iterable, in the feeder, at times the feeder's hand-off
    of a chunk to the pool (there, 2 runs in 20 under load ended the loop
    quietly, the program going on). It stops the program, as gevent
    makes a greenlet's ``KeyboardInterrupt`` do, instead of becoming the
    iteration's error (which ``except Exception`` caught, and the program
    went on)."""
    prog = program(CTRL_C_IN_THE_ITERABLE)
    proc = prog.start()
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "waiting":
        proc.wait(30)
        pytest.fail(f"the program did not start: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the program did not stop within 30 s of Ctrl-C")
    rest = proc.stdout.read()
    assert proc.returncode == -signal.SIGINT, (proc.returncode, rest)
    assert "caught" not in rest and "went on" not in rest, rest
