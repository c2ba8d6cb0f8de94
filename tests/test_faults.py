"""Fault tolerance as a user sees it: crashes that stay with their task,
restart intensity, stopping a running task, memory caps, cleanup after a
SIGKILL (``on_worker_lost``), and nothing left open after a shutdown."""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import warden
from warden import _warden

from conftest import REFUSE_SYSTEM_CALL, SECCOMP_MACHINES, WITHOUT_OWN_PROC, alive, wait_until

MiB = 1 << 20


def square(x):
    return x * x


def getpid(_=None):
    return os.getpid()


def die_by_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def record(path, tag):
    with open(path, "a") as f:
        f.write(f"{tag} {os.getpid()}\n")


def sleep_after_marking(path, seconds):
    try:
        record(path, "started")
        time.sleep(seconds)
        return "slept"
    finally:
        record(path, "finally")


def fork_then_return(path):
    # Both processes come back from the task: only the worker may answer.
    copy = os.fork()
    if copy == 0:
        record(path, "copy")
        return os.getpid()
    _, status = os.waitpid(copy, 0)  # the copy ends by itself, at once
    return os.getpid(), os.waitstatus_to_exitcode(status)


def fork_then_end_the_copy(how):
    # The copy ends as the task's code tells it, as after a fork in a plain
    # program: by sys.exit(3), an exception, or returning.
    copy = os.fork()
    if copy == 0:
        if how == "exit":
            sys.exit(3)
        if how == "raise":
            raise ValueError("the copy failed")
        return "the copy's answer"
    _, status = os.waitpid(copy, 0)
    return os.waitstatus_to_exitcode(status)


def fork_and_return_in_the_copy(path, tag):
    copy = os.fork()
    if copy == 0:
        record(path, f"{tag}-copy")
        return
    os.waitpid(copy, 0)
    record(path, tag)


def initializer_that_forks(path):
    atexit.register(record, path, "atexit")
    fork_and_return_in_the_copy(path, "initializer")


def stop_own_worker(path):
    record(path, "stopped")
    os.kill(os.getpid(), signal.SIGSTOP)
    return "resumed"


def start_sleepers():
    # One left in the worker's process group, one in a session of its own.
    stays = subprocess.Popen(["sleep", "300"])
    leaves = subprocess.Popen(["sleep", "300"], start_new_session=True)
    return stays.pid, leaves.pid


def put_sleepers(queue):
    queue.put(start_sleepers())


CLEANS_UP_ON_SIGTERM = (
    "import pathlib, signal, sys, time\n"
    "def cleaned(*_):\n"
    "    pathlib.Path(sys.argv[1]).write_text('cleaned up')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, cleaned)\n"
    "pathlib.Path(sys.argv[2]).touch()\n"
    "time.sleep(300)\n"
)


def start_a_child_that_cleans_up_on_sigterm(cleaned, ready):
    """Starts a child in this worker's process group that records its
    SIGTERM handler's run; returns the child's pid and this worker's, once
    the handler is in place."""
    child = subprocess.Popen([sys.executable, "-c", CLEANS_UP_ON_SIGTERM, cleaned, ready])
    deadline = time.monotonic() + 30
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    return child.pid, os.getpid()


def start_such_a_child_then_die_of_sigkill(cleaned, ready):
    start_a_child_that_cleans_up_on_sigterm(cleaned, ready)
    os.kill(os.getpid(), signal.SIGKILL)


def lines(path):
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def pids_tagged(path, tag):
    return [int(line.split()[1]) for line in lines(path) if line.split()[0] == tag]


def busy_pids(pool_runner):
    return [w.pid for w in pool_runner.core.workers() if w.running_task is not None]


def ready_pids(pool_runner):
    return [w.pid for w in pool_runner.core.workers() if w.phase == "ready"]


def kill_idle_workers(pool_runner, n):
    """SIGKILLs ``n`` idle workers one after another, each once it is ready,
    and waits until the pool has reaped it (or has failed)."""
    killed: set[int] = set()
    for _ in range(n):
        assert wait_until(
            lambda: [p for p in ready_pids(pool_runner) if p not in killed] or pool_runner.core.failure(),
            timeout=30,
        )
        fresh = [p for p in ready_pids(pool_runner) if p not in killed]
        if not fresh:
            return
        pid = fresh[0]
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        assert wait_until(lambda pid=pid: pid not in [w.pid for w in pool_runner.core.workers()], timeout=30)


# -- tasks that fork -----------------------------------------------------------


def fork_and_signal(signum):
    """Forks a copy that waits, sends it ``signum``, and says how it ended."""
    import time

    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(20)
        except KeyboardInterrupt:
            os._exit(7)
        os._exit(3)
    time.sleep(0.3)
    os.kill(pid, signum)
    _, status = os.waitpid(pid, 0)
    return os.getpid(), os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_a_copy_a_task_forked_is_the_copys_and_the_worker_goes_on(signum):
    ctx = multiprocessing.get_context("spawn")
    outcomes = {}
    makers = {
        "std": lambda: cf.ProcessPoolExecutor(1, mp_context=ctx),
        "warden": lambda: warden.ProcessPoolExecutor(1),
    }
    for name, make in makers.items():
        with make() as ex:
            worker, code = ex.submit(fork_and_signal, signum).result(timeout=60)
            outcomes[name] = (code, ex.submit(os.getpid).result(timeout=60) == worker)
    # SIGTERM and SIGHUP end the copy by the signal, SIGINT raises
    # KeyboardInterrupt in it; either way the worker serves on.
    expected = (7 if signum == signal.SIGINT else -signum, True)
    assert outcomes["warden"] == outcomes["std"] == expected


def start_method_and_a_pool_of_its_own(_=None):
    with multiprocessing.Pool(1) as pool:
        squares = pool.map(abs, [-1, -2])
    return multiprocessing.get_start_method(), squares, os.getpid()


def test_a_task_starting_a_default_pool_spawns_it_as_in_a_spawned_child():
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as std:
        theirs = std.submit(start_method_and_a_pool_of_its_own).result(timeout=120)
    with warden.ProcessPoolExecutor(1) as ex:
        ours = ex.submit(start_method_and_a_pool_of_its_own).result(timeout=120)
        assert ex.submit(os.getpid).result(timeout=60) == ours[2]
    assert ours[:2] == theirs[:2] == ("spawn", [1, 2])


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_task_whose_fork_returns_twice_gets_the_workers_answer_and_the_copy_ends_quietly(tmp_path, kind):
    path = str(tmp_path / "log")
    hooks = {"finalizer": record, "finalargs": (path, "finalizer")}
    if kind == "executor":
        with warden.ProcessPoolExecutor(1, **hooks) as ex:
            answers = [ex.submit(fork_then_return, path).result(timeout=30) for _ in range(3)]
            worker = ex.submit(getpid).result(timeout=30)
    else:
        with warden.Pool(1, **hooks) as pool:
            answers = [pool.apply_async(fork_then_return, (path,)).get(timeout=30) for _ in range(3)]
            worker = pool.apply(getpid)
            pool.close()
            pool.join()
    # Each answer is the worker's (not a copy's, not a crash), each copy
    # ended by itself with 0, the worker served on, and only the worker ran
    # its finalizer.
    assert answers == [(worker, 0)] * 3
    assert len(pids_tagged(path, "copy")) == 3
    assert worker not in pids_tagged(path, "copy")
    assert pids_tagged(path, "finalizer") == [worker]


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_copy_a_task_forks_ends_with_the_exit_code_its_code_gives_it(kind):
    # As a copy of a plain program, or of a multiprocessing child: 3 after
    # sys.exit(3), 1 after an exception, 0 after returning (always 0 before).
    if kind == "executor":
        with warden.ProcessPoolExecutor(1) as ex:
            codes = [
                ex.submit(fork_then_end_the_copy, how).result(timeout=30)
                for how in ("exit", "raise", "return")
            ]
    else:
        with warden.Pool(1) as pool:
            codes = [pool.apply(fork_then_end_the_copy, (how,)) for how in ("exit", "raise", "return")]
    assert codes == [3, 1, 0]


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_an_initializer_or_finalizer_whose_fork_returns_twice_leaves_the_worker_alone_serving(tmp_path, kind):
    # The copy an initializer's fork made came back into the worker's loop:
    # it said "ready" on the worker's channel and served its tasks (the pool
    # hung, or killed the worker for breaking the protocol); a finalizer's
    # copy ran the worker's exit path again (its atexit handlers twice).
    path = str(tmp_path / "log")
    hooks = {
        "initializer": initializer_that_forks,
        "initargs": (path,),
        "finalizer": fork_and_return_in_the_copy,
        "finalargs": (path, "finalizer"),
    }
    if kind == "executor":
        with warden.ProcessPoolExecutor(1, **hooks) as ex:
            served = {ex.submit(getpid).result(timeout=30) for _ in range(10)}
    else:
        with warden.Pool(1, **hooks) as pool:
            served = {pool.apply(getpid) for _ in range(10)}
            pool.close()
            pool.join()
    (worker,) = served
    assert pids_tagged(path, "initializer") == [worker]
    assert pids_tagged(path, "finalizer") == [worker]
    assert pids_tagged(path, "atexit") == [worker]  # neither copy ran it
    assert len(pids_tagged(path, "initializer-copy")) == 1
    assert len(pids_tagged(path, "finalizer-copy")) == 1


def test_a_stopped_worker_past_its_task_timeout_is_resumed_to_run_its_exit_path(tmp_path):
    # SIGTERM waits while a process is stopped (SIGSTOP, a debugger, Ctrl-Z):
    # the pool resumes it, so it ends through its exit path (its finalizer
    # runs) instead of by SIGKILL once the grace is over.
    path = str(tmp_path / "log")
    with warden.ProcessPoolExecutor(1, task_timeout=1, finalizer=record, finalargs=(path, "finalizer")) as ex:
        with pytest.raises(warden.TaskTimeout):
            ex.submit(stop_own_worker, path).result(timeout=30)
        assert ex.submit(square, 3).result(timeout=30) == 9
    stopped = pids_tagged(path, "stopped")
    assert len(stopped) == 1
    assert stopped[0] in pids_tagged(path, "finalizer")


TASK_WITH_A_CHILD = """
import multiprocessing, os, signal, sys, time
import warden

def note(path, tag):
    with open(path, "a") as f:
        f.write(f"{tag} {os.getpid()}\\n")

def child(path):
    def stop(signum, frame):
        note(path, "child-stopped")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    note(path, "child-started")
    time.sleep(300)

def task(path):
    p = multiprocessing.get_context("spawn").Process(target=child, args=(path,))
    p.start()
    p.join()

if __name__ == "__main__":
    path, how = sys.argv[1], sys.argv[2]
    lost = []
    hooks = {"finalizer": note, "finalargs": (path, "finalizer")}
    timeout = 1 if how == "timeout" else None
    with warden.ProcessPoolExecutor(1, task_timeout=timeout, on_worker_lost=lost.append, **hooks) as ex:
        f = ex.submit(task, path)
        while "child-started" not in open(path).read() if os.path.exists(path) else True:
            time.sleep(0.02)
        if how == "cancel":
            f.cancel(running=True)
        try:
            f.result(timeout=60)
        except BaseException as e:
            print(type(e).__name__)
        print(ex.submit(os.getpid).result(timeout=60) > 0)
    print("lost", len(lost))
"""


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_stopped_task_stops_the_multiprocessing_children_it_started_and_its_worker_exits_by_its_exit_path(
    program, tmp_path, how
):
    """A task stopped by its timeout or a cancel was told alone, not its
    process group as a terminate() tells it: the worker's exit path then
    joined the child the task had started (as ``multiprocessing`` does at
    exit), which nothing had told to stop, until the grace was over and the
    group was killed: the child without its SIGTERM handler, the worker
    without the rest of its exit path, reported lost."""
    path = str(tmp_path / "log")
    run = program(TASK_WITH_A_CHILD).run(timeout=90, args=(path, how))
    assert run.returncode == 0, run.stderr
    stopped = "TaskTimeout" if how == "timeout" else "CancelledError"
    assert run.lines == [stopped, "True", "lost 0"], run.stdout + run.stderr
    assert len(pids_tagged(path, "child-started")) == 1
    assert pids_tagged(path, "child-stopped") == pids_tagged(path, "child-started")
    assert len(pids_tagged(path, "finalizer")) == 2  # the stopped worker's and its replacement's


NESTED_EXECUTOR_LEFT_OPEN = """
import time
import warden

def slow():
    time.sleep(60)

def task():
    inner = warden.ProcessPoolExecutor(1)  # never shut down
    for f in [inner.submit(slow) for _ in range(2)]:
        f.result()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1, task_timeout=2) as ex:
        try:
            ex.submit(task).result(timeout=60)
        except warden.TaskTimeout:
            print("timed out", flush=True)
"""


def test_a_stopped_workers_own_executor_says_its_dropped_tasks_are_for_the_stop_not_an_interrupt(program):
    """The tasks a stopped worker's executor drops at its exit were counted
    as for "the program was interrupted": nothing was, the worker was
    stopped (its task's timeout here)."""
    run = program(NESTED_EXECUTOR_LEFT_OPEN).run(timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["timed out"], run.stdout + run.stderr
    said = "2 submitted tasks dropped at interpreter exit (this process was told to stop)"
    assert said in run.stderr, run.stderr
    assert "the program was interrupted" not in run.stderr


def stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("T")
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_shutdown_resumes_a_worker_stopped_in_its_task_and_waits_for_that_task(tmp_path, kind):
    # A drain waits for the running task: one whose worker was stopped
    # (SIGSTOP, a debugger) would never end. The pool resumes it.
    path = str(tmp_path / "log")
    if kind == "executor":
        pool = warden.ProcessPoolExecutor(1, finalizer=record, finalargs=(path, "finalizer"))
        outcome = pool.submit(stop_own_worker, path)
        shut_down = pool.shutdown
    else:
        pool = warden.Pool(1, finalizer=record, finalargs=(path, "finalizer"))
        outcome = pool.apply_async(stop_own_worker, (path,))

        def shut_down():
            pool.close()
            pool.join()

    assert wait_until(lambda: len(pids_tagged(path, "stopped")) == 1, timeout=30)
    (worker,) = pids_tagged(path, "stopped")
    assert wait_until(lambda: stopped(worker), timeout=10)
    waiting = threading.Thread(target=shut_down, daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    if waiting.is_alive():
        os.kill(worker, signal.SIGKILL)
    assert not waiting.is_alive(), "the shutdown waited for a task that could not run"
    answer = outcome.result(5) if kind == "executor" else outcome.get(5)
    assert answer == "resumed"
    assert pids_tagged(path, "finalizer") == [worker]


FORKED_COPY = """
import multiprocessing, os, sys, warden
if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(2)
    pool = warden.Pool(2)
    print("parent", ex.submit(abs, -1).result(), pool.apply(abs, (-2,)), flush=True)
    workers = sorted(p.pid for p in multiprocessing.active_children())
    pid = os.fork()
    if pid == 0:
        calls = (("executor", lambda: ex.submit(abs, -3)), ("pool", lambda: pool.apply_async(abs, (-4,))))
        for name, call in calls:
            try:
                call()
            except warden.PoolFailed as e:
                print("copy", name, "refused:", "belongs to process %d" % os.getppid() in str(e), flush=True)
        print("copy sees", len(multiprocessing.active_children()), "workers", flush=True)
        with warden.ProcessPoolExecutor(1) as own:
            print("copy's own pool", own.submit(abs, -5).result(timeout=30), flush=True)
        sys.exit(0)  # its exit waits for none of the original's pools
    _, status = os.waitpid(pid, 0)
    print("copy exited", os.waitstatus_to_exitcode(status), flush=True)
    same = workers == sorted(p.pid for p in multiprocessing.active_children())
    print("parent", ex.submit(abs, -6).result(), pool.apply(abs, (-7,)), "same workers", same, flush=True)
    pool.close(); pool.join(); ex.shutdown()
"""


def test_a_forked_copy_of_the_parent_is_refused_its_pools_exits_at_once_and_leaves_them_serving(tmp_path):
    # os.fork() in a program that has pools (a server forking its workers
    # after building them, say): the copy's exit used to wait forever for
    # pools that nothing in it serves.
    script = tmp_path / "forked_copy.py"
    script.write_text(FORKED_COPY)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "parent 1 2",
        "copy executor refused: True",
        "copy pool refused: True",
        "copy sees 0 workers",
        "copy's own pool 5",
        "copy exited 0",
        "parent 6 7 same workers True",
    ]


COPY_SHUTS_DOWN = """
import os, sys
import warden

def square(x):
    return x * x

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(2) as ex, warden.Pool(2) as pool:
        print("parent", list(ex.map(square, range(3))), pool.map(square, range(3)), flush=True)
        pid = os.fork()
        if pid == 0:
            # The copy ends its pools as it would its own: with no workers
            # of its own to wait for, each call returns at once.
            if sys.argv[1] == "shutdown":
                ex.shutdown()
                pool.close()
                pool.join()
                print("copy shut down", flush=True)
            sys.exit(0)  # and the with block, on the way out
        _, status = os.waitpid(pid, 0)
        print("copy exited", os.waitstatus_to_exitcode(status), flush=True)
        print("parent", list(ex.map(square, range(3))), pool.map(square, range(3)), flush=True)
"""


UNSTARTED_EXECUTOR_FORKED = """
import os, warden

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)  # no task yet: no workers
    pid = os.fork()
    who = "copy" if pid == 0 else "parent"
    worker = ex.submit(os.getpid).result(30)
    print(who, ex.submit(abs, -3).result(30), worker != os.getpid(), flush=True)
    ex.shutdown()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_an_executor_forked_before_its_first_task_serves_the_copy_and_the_original_each_with_its_own(program):
    run = program(UNSTARTED_EXECUTOR_FORKED).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(run.lines) == ["copy 3 True", "parent 3 True"]


@pytest.mark.parametrize("how", ["shutdown", "with-block"])
def test_a_forked_copy_shutting_its_parents_pools_down_returns_at_once_and_leaves_them_serving(program, how):
    """Before, ``shutdown()``, ``Pool.join()`` or leaving the ``with`` block
    in the copy spun forever at full CPU (the join loop asked the core again
    and again, and a foreign pool answered "not yet")."""
    run = program(COPY_SHUTS_DOWN).run(timeout=60, args=(how,))
    assert run.returncode == 0, run.stderr
    expected = ["parent [0, 1, 4] [0, 1, 4]", "copy exited 0", "parent [0, 1, 4] [0, 1, 4]"]
    if how == "shutdown":
        expected.insert(1, "copy shut down")
    assert run.stdout.splitlines() == expected, run.stderr


SEGFAULT_IN_A_TASK = """
import ctypes, sys
import warden

def parse_record(x):
    return ctypes.string_at(0)  # an extension's bug: a read of address 0

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        try:
            ex.submit(parse_record, 1).result(timeout=30)
        except warden.WorkerCrashed as e:
            print("crashed", e.signal == 11, flush=True)
        print("then", ex.submit(abs, -3).result(timeout=30), flush=True)
    with warden.Pool(1) as pool:
        try:
            pool.apply(parse_record, (1,))
        except warden.WorkerCrashed as e:
            print("crashed", e.signal == 11, flush=True)
"""


@pytest.mark.parametrize("faulthandler", ["on", "off"])
def test_a_worker_that_segfaults_writes_the_python_traceback_of_the_crash_to_stderr(program, faulthandler):
    """A segfault fails its task (the pool goes on) and, as loky's workers
    do, the worker writes where it happened first (``faulthandler``), which
    the standard library's workers leave to ``-X faulthandler``;
    ``WARDEN_FAULTHANDLER=0`` turns it off."""
    env = {"WARDEN_FAULTHANDLER": "0"} if faulthandler == "off" else {}
    run = program(SEGFAULT_IN_A_TASK).run(timeout=90, env=env)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["crashed True", "then 3", "crashed True"], run.stderr
    if faulthandler == "on":
        assert run.stderr.count("Fatal Python error: Segmentation fault") == 2, run.stderr
        assert run.stderr.count("in parse_record") == 2, run.stderr
    else:
        assert "Segmentation fault" not in run.stderr and "parse_record" not in run.stderr, run.stderr


LOCKS_HELD_AT_FORK = """
import faulthandler, os, threading
import multiprocessing.resource_tracker
import warden

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)
    pool = warden.Pool(1)
    print("parent", ex.submit(abs, -1).result(30), pool.apply(abs, (-1,)), flush=True)
    # A thread of the program in the middle of a call on each (a submit, an
    # imap starting), and of a pool's start (which takes the resource
    # tracker's lock), as at a fork of a busy program.
    tracker = multiprocessing.resource_tracker._resource_tracker
    held, release = threading.Event(), threading.Event()

    def hold():
        with ex._warden_lock, pool._warden_feeders_lock, tracker._lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(20, exit=True)  # a hang ends the copy with 1
        ex.shutdown()
        pool.close()
        pool.join()
        pool.terminate()
        print("copy shut down", flush=True)
        with warden.ProcessPoolExecutor(1) as own:
            print("copy's own pool", own.submit(abs, -4).result(30), flush=True)
        os._exit(0)
    release.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    print("copy exited", os.waitstatus_to_exitcode(status), flush=True)
    print("parent", ex.submit(abs, -2).result(30), pool.apply(abs, (-3,)), flush=True)
    ex.shutdown()
    pool.terminate()
"""


def test_a_forked_copy_shuts_its_parents_pools_and_starts_its_own_though_a_thread_held_their_locks_at_fork(
    program,
):
    """A thread of the original in the middle of a call on a pool when the
    program forks holds that pool's lock in the copy for ever: the copy's
    ``shutdown()`` or ``close()`` waited on it. So with the resource
    tracker's lock, which every pool's start takes: the copy's own first
    pool waited on it. The copy makes them anew."""
    run = program(LOCKS_HELD_AT_FORK).run(timeout=90)
    assert run.returncode == 0, run.stderr
    expected = ["parent 1 1", "copy shut down", "copy's own pool 4", "copy exited 0", "parent 2 3"]
    assert run.stdout.splitlines() == expected, run.stderr


STOPPED_WHILE_A_NESTED_POOL_PICKLES_AN_ERROR = """
import os, time
import warden

def mark(what):
    with open(os.environ["OUT"], "a") as f:
        f.write(what + "\\n")

class SlowToPickle(Exception):
    def __reduce__(self):  # the nested pool pickles the error to hand it on: the stop lands here
        mark("pickling the error")
        for _ in range(80):
            time.sleep(0.05)
        raise RuntimeError("cannot pickle this either")

class Unpicklable:
    def __reduce__(self):
        raise SlowToPickle("cannot pickle Unpicklable")

def task():
    inner = warden.Pool(1)
    try:
        inner.apply_async(abs, (Unpicklable(),))
        mark("the stop was lost")
        time.sleep(30)
    except warden.TaskInterrupted:
        mark("stopped")
        raise
    finally:
        inner.terminate()

if __name__ == "__main__":
    pool = warden.Pool(1)
    pool.apply_async(task)
    out = os.environ["OUT"]
    while "pickling the error" not in (open(out).read() if os.path.exists(out) else ""):
        time.sleep(0.05)
    pool.terminate()
    pool.join()
"""


def test_a_stop_that_lands_while_a_nested_pool_pickles_an_argument_error_stops_the_task(program):
    # The nested pool's error handling caught BaseException around pickling
    # the error: the worker's TaskInterrupted went with it, and the task ran
    # on until the exit path ran beside it.
    prog = program(STOPPED_WHILE_A_NESTED_POOL_PICKLES_AN_ERROR)
    run = prog.run(timeout=90)
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["pickling the error", "stopped"], run.stderr
    assert "its exit path runs beside it" not in run.stderr


SIGNALS_TAKEN_WITH_SIGWAIT = """
import os, signal, threading
import warden

if __name__ == "__main__":
    # A server that takes its stop signals on a thread of its own.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    got = []
    waiter = threading.Thread(target=lambda: got.append(signal.sigwait({signal.SIGTERM})))
    waiter.start()
    with warden.Pool(1) as pool:  # the program's first pool starts the resource tracker
        print("blocked", sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        waiter.join(30)
        print("sigwait", got == [signal.SIGTERM], pool.apply(abs, (-2,)), flush=True)
"""


def test_starting_a_pool_keeps_the_stop_signals_a_program_blocked_to_take_them_with_sigwait(program):
    # Starting the standard library's resource tracker unblocks SIGINT and
    # SIGTERM in the calling thread: the SIGTERM meant for the server's
    # sigwait() killed it.
    run = program(SIGNALS_TAKEN_WITH_SIGWAIT).run(timeout=90)
    assert run.returncode == 0, run.stderr
    blocked = sorted([int(signal.SIGINT), int(signal.SIGTERM)])
    assert run.stdout.splitlines() == [f"blocked {blocked}", "sigwait True 2"], run.stderr


MP_CHILD_LEAVES_A_POOL_OPEN = """
import multiprocessing, sys
import warden

KEPT = []


def task(kind):
    # A pool made in the child and left open (kept, not shut down).
    pool = warden.ProcessPoolExecutor(2) if kind == "executor" else warden.Pool(2)
    KEPT.append(pool)
    results = pool.map(abs, range(-6, 0))
    return sum(results)


if __name__ == "__main__":
    method, where, kind = sys.argv[1:]
    ctx = multiprocessing.get_context(method)
    if where == "pool":
        pool = ctx.Pool(1)
        print("result", pool.apply(task, (kind,)), flush=True)
        pool.close()
        pool.join()
        print("joined", flush=True)
    else:
        child = ctx.Process(target=task, args=(kind,))
        child.start()
        child.join()
        print("exit code", child.exitcode, flush=True)
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
@pytest.mark.parametrize("where", ["pool", "process"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multiprocessing_child_that_leaves_a_warden_pool_open_exits(program, method, where, kind):
    """A ``multiprocessing`` child ends without ``atexit`` handlers: its
    bootstrap terminates the daemonic children ``active_children()`` lists
    (warden's workers among them) and joins them all. The open pool started
    replacements for the workers terminated, and the join waited for those
    for ever: ``Pool.close(); join()`` never returned. warden's exit step now
    runs first there, as at the end of a program."""
    run = program(MP_CHILD_LEAVES_A_POOL_OPEN).run(timeout=60, args=(method, where, kind))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == (["result 21", "joined"] if where == "pool" else ["exit code 0"])


MP_CHILD_AT_EXIT = """
import multiprocessing, sys
import warden  # before the fork: the child inherits warden's atexit handler

def task(path):
    warden.at_exit(lambda: open(path, "a").write("at_exit\\n"))
    pool = warden.Pool(2)  # left open
    task.kept = pool
    return sum(pool.map(abs, [-1, -2]))

if __name__ == "__main__":
    method, path = sys.argv[1:]
    child = multiprocessing.get_context(method).Process(target=task, args=(path,))
    child.start()
    child.join(60)
    print("exit code", child.exitcode, flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_warden_at_exit_runs_at_the_end_of_a_multiprocessing_child(program, tmp_path, method):
    """warden's exit step (its pools shut down, ``warden.at_exit`` callbacks)
    runs at the end of a child the standard library started, whatever its
    start method. From Python 3.13 a child forked by ``fork`` or the fork
    server clears the ``atexit`` handlers it inherited and runs
    multiprocessing's exit function on its own, after the bootstrap: the
    step was skipped there (the callback never ran, and the open pool's
    workers were terminated and joined as they were being replaced, which
    could wait for ever)."""
    out = tmp_path / "at-exit"
    run = program(MP_CHILD_AT_EXIT).run(timeout=90, args=(method, str(out)))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["exit code 0"], run.stderr
    assert out.read_text() == "at_exit\n"


LARGE_CALLS_PENDING_AT_FORK = """
import os, resource, time
import warden
from warden import _oob

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    _oob.INLINE_FALLBACK_MAX = 1 << 20  # as if each call were over 64 MiB
    block = bytearray(2 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(time.sleep, 0).result(60)
        busy = ex.submit(time.sleep, 1)
        pending = [ex.submit(len, block) for _ in range(4)]
        pid = os.fork()
        if pid == 0:
            for f in pending:  # they fail here (the original's tasks)
                try:
                    f.result(30)
                except warden.PoolFailed:
                    pass
            print("copy holds", _oob.calls_holding_fds(), flush=True)
            # Its own files fill the table into the pools' reserve: a large
            # call of a pool of its own takes a descriptor at once.
            kept = []
            while not kept or kept[-1] < 200:
                kept.append(os.open(os.devnull, os.O_RDONLY))
            with warden.ProcessPoolExecutor(1) as own:
                print("copy length", own.submit(len, block).result(60), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", [f.result(60) for f in pending], _oob.calls_holding_fds(), flush=True)
"""


def test_a_forked_copy_counts_no_large_call_of_the_original_as_its_own(program):
    """The large calls in flight when the program forks are the original's:
    failing them in the copy took them off a count the copy had started at
    zero, which went negative, and the copy's own large call then waited 60
    s for a descriptor nothing would give back."""
    run = program(LARGE_CALLS_PENDING_AT_FORK).run(timeout=120)
    assert run.returncode == 0, run.stderr
    size = 2 << 20
    assert run.stdout.splitlines() == ["copy holds 0", f"copy length {size}", f"parent {[size] * 4} 0"], (
        run.stderr
    )


PENDING_AT_FORK = """
import concurrent.futures, os, sys, time
import warden

def slow(x):
    time.sleep(1)
    return x

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(2) as ex, warden.Pool(2) as pool:
        fut = ex.submit(slow, 1)
        res = pool.apply_async(slow, (2,))
        late = ex.submit(slow, 3)
        pid = os.fork()
        if pid == 0:
            done, _ = concurrent.futures.wait([late], timeout=30)
            print("copy: wait says done", late in done, flush=True)
            for name, get in (("future", fut.result), ("async result", res.get)):
                try:
                    print("copy:", name, "got", get(30), flush=True)
                except warden.PoolFailed as e:
                    owner = "belongs to process %d" % os.getppid()
                    print("copy:", name, "failed:", owner in str(e), flush=True)
                except Exception as e:
                    print("copy:", name, "raised", type(e).__name__, flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("copy exited", os.waitstatus_to_exitcode(status), flush=True)
        print("parent", fut.result(30), res.get(30), late.result(30), flush=True)
"""


def test_what_a_forked_copy_inherited_pending_fails_there_at_once_and_finishes_in_the_parent(program):
    """Futures and ``AsyncResult`` objects pending when the program forks: in the
    copy, nothing will ever finish them (their tasks run for the original),
    so waiting on them fails with ``PoolFailed`` instead of waiting forever
    (``wait()`` returns them done); the original gets its results."""
    run = program(PENDING_AT_FORK).run(timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "copy: wait says done True",
        "copy: future failed: True",
        "copy: async result failed: True",
        "copy exited 0",
        "parent 1 2 3",
    ], run.stderr


@pytest.mark.parametrize("kind", ["executor", "pool", "process"])
def test_what_a_task_leaves_running_in_its_workers_group_ends_with_the_worker(kind):
    if kind == "executor":
        with warden.ProcessPoolExecutor(1) as ex:
            stays, leaves = ex.submit(start_sleepers).result(timeout=30)
            assert alive(stays)
    elif kind == "pool":
        with warden.Pool(1) as pool:
            stays, leaves = pool.apply(start_sleepers)
            assert alive(stays)
            pool.close()
            pool.join()
    else:
        queue = multiprocessing.get_context("spawn").SimpleQueue()
        child = warden.Process(target=put_sleepers, args=(queue,))
        child.start()
        stays, leaves = queue.get()
        child.join(30)
        assert child.exitcode == 0
    try:
        assert wait_until(lambda: not alive(stays), timeout=10), "the one in the worker's group ended with it"
        assert alive(leaves), "one in a session of its own is not the worker's to end"
    finally:
        for pid in (stays, leaves):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_what_a_worker_killed_outright_left_in_its_group_gets_sigterm_and_runs_its_handler(tmp_path):
    """A worker SIGKILLed from outside (the OOM killer, ``kill -9``) never ran
    its exit path: what it left in its process group is sent SIGTERM, and
    has the grace period to clean up, before the SIGKILL that ends what is
    left. The pool goes on meanwhile."""
    cleaned, ready = tmp_path / "cleaned", tmp_path / "ready"
    with warden.ProcessPoolExecutor(1) as ex:
        child, worker = ex.submit(start_a_child_that_cleans_up_on_sigterm, str(cleaned), str(ready)).result(
            timeout=60
        )
        os.kill(worker, signal.SIGKILL)
        assert wait_until(cleaned.exists, timeout=30), "the child's SIGTERM handler ran"
        assert ex.submit(os.getpid).result(timeout=60) not in (worker, child), "the pool serves on"
    assert cleaned.read_text() == "cleaned up"


def test_a_process_killed_outright_is_seen_ended_at_once_what_it_left_killed_with_it(tmp_path):
    """A ``Process`` child's end is its pool's end, which ``join()`` and
    ``exitcode`` wait for: what it left in its group is SIGKILLed as it is
    reaped, given no grace period that would hold its end back."""
    cleaned, ready = tmp_path / "cleaned", tmp_path / "ready"
    proc = warden.Process(target=start_such_a_child_then_die_of_sigkill, args=(str(cleaned), str(ready)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert not proc.is_alive()
    assert not cleaned.exists(), "the child was given no grace period: killed with the process"


JOBLIB_JOBS = """
import os, pathlib, time

def nap(data, marker):
    pathlib.Path(marker).touch()
    time.sleep(300)

def use_joblib(folder, marks):
    import joblib, numpy
    pathlib.Path(marks, "worker").write_text(str(os.getpid()))
    data = numpy.ones(1 << 20)  # 8 MiB, above joblib's max_nbytes: memmapped into `folder`
    joblib.Parallel(n_jobs=2, backend="loky", temp_folder=folder)(
        joblib.delayed(nap)(data, os.path.join(marks, str(i))) for i in range(2)
    )
"""

JOBLIB_IN_A_KILLED_WORKER = """
import os, pathlib, sys, time
import warden
from jobs import use_joblib

if __name__ == "__main__":
    folder, marks = sys.argv[1], sys.argv[2]
    with warden.ProcessPoolExecutor(1) as ex:
        f = ex.submit(use_joblib, folder, marks)
        deadline = time.monotonic() + 60
        while len(os.listdir(marks)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        memmaps = [n for n in os.listdir(folder) if n.startswith("joblib_memmapping_folder")]
        print("memmapped:", len(memmaps), flush=True)
        os.kill(int(pathlib.Path(marks, "worker").read_text()), 9)
        try:
            f.result(timeout=60)
        except warden.WorkerCrashed as e:
            print("crashed:", e.signal, flush=True)
    deadline = time.monotonic() + 30
    while os.listdir(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    print("left:", os.listdir(folder), flush=True)
"""


def test_joblib_in_a_worker_killed_outright_still_removes_its_memmapped_data(program, tmp_path):
    """joblib (its loky backend) keeps large arguments in a memmapped folder
    that its own resource tracker, a process in the worker's group, removes
    once its pool's processes are gone. A worker SIGKILLed from outside
    leaves that tracker the grace period to do it; the folder does not
    outlive the program."""
    pytest.importorskip("joblib", reason="joblib is installed by `make test-tools`")
    pytest.importorskip("numpy", reason="numpy is installed by `make test-tools`")
    folder, marks = tmp_path / "memmaps", tmp_path / "marks"
    folder.mkdir()
    marks.mkdir()
    program(JOBLIB_JOBS, name="jobs.py")
    run = program(JOBLIB_IN_A_KILLED_WORKER).run(timeout=100, args=(str(folder), str(marks)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["memmapped: 1", "crashed: 9", "left: []"], run.stderr


ORPHANING_PARENT = """
import os, signal, subprocess, warden

def start_sleeper():
    return subprocess.Popen(["sleep", "300"]).pid

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)
    sleeper = ex.submit(start_sleeper).result(timeout=60)
    worker = ex.submit(os.getpid).result(timeout=60)
    print(sleeper, worker, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # nothing of this process cleans up
"""


def test_sighup_from_outside_stops_a_busy_worker_by_that_signal_through_its_exit_path(tmp_path):
    lost = []
    started = tmp_path / "started"
    with warden.ProcessPoolExecutor(1, on_worker_lost=lost.append) as ex:
        ex.submit(square, 1).result(timeout=60)
        f = ex.submit(sleep_after_marking, str(started), 30)
        # Running in the worker (running() is true from when the pool hands
        # the task over: a stop before the worker starts it gives it back,
        # and it runs on the replacement).
        assert wait_until(started.exists, timeout=60)
        os.kill(busy_pids(ex._warden_runner)[0], signal.SIGHUP)
        with pytest.raises(warden.WorkerCrashed) as info:
            f.result(timeout=60)
        assert info.value.signal == signal.SIGHUP
        assert ex.submit(square, 3).result(timeout=60) == 9
    # It left through its exit path: not a lost worker (the parent is alive,
    # so SIGHUP is not its death signal).
    assert lost == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_an_idle_worker_ends_it_at_once_and_the_next_task_runs(tmp_path, signum):
    # The worker leaves through its exit path right away; the next task runs
    # on its replacement instead of failing as if it had crashed there.
    out = tmp_path / "fin"
    with warden.ProcessPoolExecutor(1, finalizer=record, finalargs=(str(out), "fin")) as ex:
        first = ex.submit(getpid).result(timeout=60)
        os.kill(first, signum)
        if signum != signal.SIGHUP:
            # (It used to wait 2 s for its parent to die first. After SIGHUP,
            # its parent's death signal, it still gives the parent up to 2 s
            # to be seen gone, but takes no task meanwhile.)
            assert wait_until(lambda: not alive(first), timeout=1.5), "it left at once"
        assert ex.submit(getpid).result(timeout=60) != first
    assert f"fin {first}" in out.read_text().splitlines()


def test_a_task_submitted_as_a_stop_signal_reaches_an_idle_worker_runs_on_its_replacement():
    # The signal and the task cross: the worker may read the task, see the
    # signal and leave without starting it. That task must run elsewhere,
    # not fail as if it had crashed its worker. (Before the fix, about one
    # round in three failed.)
    with warden.ProcessPoolExecutor(1, restart_limit=None) as ex:
        for _ in range(15):
            worker = ex.submit(getpid).result(timeout=60)
            os.kill(worker, signal.SIGTERM)
            assert ex.submit(getpid).result(timeout=60) != worker


ORPHANING_PARENT_OF_A_LONG_TASK = """
import os, signal, subprocess, sys, time, warden

def long_task_with_its_own_sighup(kind):
    if kind == "handler":
        signal.signal(signal.SIGHUP, lambda s, f: None)  # "reload the configuration"
    elif kind == "ignore":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    sleeper = subprocess.Popen(["sleep", "300"])
    print(sleeper.pid, os.getpid(), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)
    ex.submit(long_task_with_its_own_sighup, sys.argv[1])
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["handler", "ignore", "block"])
def test_a_task_that_takes_sighup_still_ends_with_its_worker_when_the_parent_is_sigkilled(program, kind):
    prog = program(ORPHANING_PARENT_OF_A_LONG_TASK)
    proc = prog.start({}, (kind,))
    sleeper = worker = 0
    try:
        sleeper, worker = (int(p) for p in proc.stdout.readline().split())
        proc.kill()  # SIGKILL: the parent cleans up nothing
        proc.wait(timeout=30)
        assert wait_until(lambda: not alive(worker) and not alive(sleeper), timeout=15), (
            f"worker alive: {alive(worker)}, what its task left alive: {alive(sleeper)}"
        )
    finally:
        proc.kill()
        proc.communicate()
        for pid in (sleeper, worker):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_what_a_task_leaves_running_ends_with_its_worker_when_the_parent_is_sigkilled(program):
    run = program(ORPHANING_PARENT).run(timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    sleeper, worker = (int(p) for p in run.stdout.split())
    try:
        assert wait_until(lambda: not alive(worker) and not alive(sleeper), timeout=15), (
            f"worker alive: {alive(worker)}, what its task left alive: {alive(sleeper)}"
        )
    finally:
        for pid in (sleeper, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


STOPPED_WORKER_OUTLIVES_ITS_PARENT = """
import os, subprocess, sys, time
import warden

def slow_finalizer(path):
    with open(path, "w") as f:
        f.write("exit path")
    if sys.argv[2] == "slow":
        time.sleep(1.0)  # the parent dies meanwhile
    else:
        # The exit path ends as soon as the parent is gone: sooner than a
        # watch that looks every so often sees it.
        parent = os.getppid()
        deadline = time.monotonic() + 30
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.001)

def start_a_sleeper():
    sleeper = subprocess.Popen(["sleep", "300"])
    print(sleeper.pid, os.getpid(), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1, finalizer=slow_finalizer, finalargs=(sys.argv[1],))
    ex.submit(start_a_sleeper)
    time.sleep(60)
"""


@pytest.mark.parametrize("exit_path", ["slow", "ending-as-the-parent-dies"])
def test_what_a_task_leaves_running_ends_with_its_worker_though_the_parent_dies_before_reaping_it(
    program, tmp_path, exit_path
):
    """The worker is stopped (SIGTERM) and, while its exit path runs, its
    parent is SIGKILLed: nobody is left to reap it and kill its process
    group. The worker does it itself as it ends. Also when its exit path
    ends right after the parent's death, before the watch for it looked:
    the worker then tried to move into its parent's group, failed (the
    parent gone), and killed nothing."""
    marker = tmp_path / "finalizer"
    proc = program(STOPPED_WORKER_OUTLIVES_ITS_PARENT).start({}, (str(marker), exit_path))
    sleeper = worker = 0
    try:
        sleeper, worker = (int(p) for p in proc.stdout.readline().split())
        os.kill(worker, signal.SIGTERM)
        assert wait_until(marker.exists, timeout=30), "the worker's exit path began"
        proc.kill()  # SIGKILL, while the worker still runs its finalizer
        proc.wait(timeout=30)
        assert wait_until(lambda: not alive(worker) and not alive(sleeper), timeout=15), (
            f"worker alive: {alive(worker)}, what its task left alive: {alive(sleeper)}"
        )
    finally:
        for pid in (sleeper, worker):  # first: the sleeper holds the program's stdout
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()


# -- restart intensity -------------------------------------------------------


def test_workers_killed_while_running_tasks_fail_only_those_tasks_and_never_the_pool():
    # A limit of 2 failures a minute, and 6 workers dying in their tasks: none counts.
    with warden.ProcessPoolExecutor(2, restart_limit=(2, 60.0)) as ex:
        for _ in range(6):
            with pytest.raises(warden.WorkerCrashed) as info:
                ex.submit(die_by_sigkill).result(timeout=60)
            assert info.value.signal == signal.SIGKILL
        assert ex.submit(square, 7).result(timeout=60) == 49
        assert ex._warden_runner.core.failure() is None


def test_workers_dying_idle_past_the_restart_limit_fail_the_pool_saying_so():
    ex = warden.ProcessPoolExecutor(1, restart_limit=(2, 60.0))
    try:
        assert ex.submit(square, 2).result(timeout=60) == 4
        kill_idle_workers(ex._warden_runner, 3)
        assert wait_until(lambda: ex._warden_runner.core.failure() is not None, timeout=30)
        failure = ex._warden_runner.core.failure()
        assert "restart limit" in failure and "signal 9" in failure
        with pytest.raises(warden.PoolFailed):
            ex.submit(square, 3)
    finally:
        ex.shutdown()


def test_no_restart_limit_keeps_a_pool_serving_whatever_dies():
    with warden.ProcessPoolExecutor(1, restart_limit=None) as ex:
        assert ex.submit(square, 2).result(timeout=60) == 4
        kill_idle_workers(ex._warden_runner, 4)
        assert ex.submit(square, 5).result(timeout=60) == 25
        assert ex._warden_runner.core.failure() is None


def test_a_stop_signal_to_a_worker_still_starting_is_a_stop_not_a_failed_start_that_breaks_the_executor():
    # An executor breaks when a worker's start hook fails; one that is told to
    # stop while starting has not failed. SIGTERM each new worker within a
    # few milliseconds of its start, hundreds of times: the executor serves on.
    with warden.ProcessPoolExecutor(2, restart_limit=None) as ex:
        assert ex.submit(square, 2).result(timeout=60) == 4
        seen = set(ex._processes)
        done = threading.Event()
        sent = 0

        def stop_each_new_worker() -> None:
            nonlocal sent
            rng = random.Random(7)
            while not done.is_set():
                new = set(ex._processes) - seen
                if not new:
                    time.sleep(0.0005)
                    continue
                for pid in new:
                    seen.add(pid)
                    time.sleep(rng.uniform(0, 0.004))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                        sent += 1

        killer = threading.Thread(target=stop_each_new_worker, daemon=True)
        killer.start()
        try:
            os.kill(next(iter(seen)), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while sent < 300 and time.monotonic() < deadline:
                with contextlib.suppress(warden.WorkerCrashed):
                    ex.submit(square, 3).result(timeout=60)
        finally:
            done.set()
            killer.join(10)
        assert ex._warden_runner.core.failure() is None
        assert sent >= 300
        assert ex.submit(square, 5).result(timeout=60) == 25


@pytest.mark.parametrize(
    "bad, error",
    [
        ((1,), TypeError),
        (5, TypeError),
        ((-1, 5.0), ValueError),
        ((3, 0), ValueError),
        ((1.5, 2.0), ValueError),
    ],
)
def test_a_bad_restart_limit_is_refused_with_a_clear_error(bad, error):
    with pytest.raises(error, match="restart_limit"):
        warden.ProcessPoolExecutor(1, restart_limit=bad)
    with pytest.raises(error, match="restart_limit"):
        warden.Pool(1, restart_limit=bad)


# -- stopping a running task ---------------------------------------------------


def test_cancel_running_stops_the_task_runs_the_finalizer_and_spares_the_other_tasks(tmp_path):
    log = tmp_path / "log"
    with warden.ProcessPoolExecutor(2, finalizer=record, finalargs=(log, "fin")) as ex:
        victim = ex.submit(sleep_after_marking, log, 60)
        # The victim starts first, so that its line is the first in the log.
        assert wait_until(lambda: len(pids_tagged(log, "started")) == 1, timeout=60)
        other = ex.submit(sleep_after_marking, log, 1.0)
        assert wait_until(lambda: len(pids_tagged(log, "started")) == 2, timeout=60)
        assert victim.cancel() is False  # the standard library's meaning: it runs
        assert victim.cancel(running=True) is True
        assert victim.cancelled()
        with pytest.raises(cf.CancelledError):
            victim.result(timeout=0)
        assert other.result(timeout=60) == "slept"
        # The victim's worker ran the task's finally block and its finalizer,
        # then exited; a new worker serves.
        victim_pid = pids_tagged(log, "started")[0]
        assert wait_until(lambda: victim_pid in pids_tagged(log, "fin"), timeout=15)
        assert victim_pid in pids_tagged(log, "finally")
        assert wait_until(lambda: not alive(victim_pid), timeout=15)
        assert ex.submit(square, 3).result(timeout=60) == 9
        assert victim.cancel(running=True) is True  # already cancelled


def block_after_marking(path, how):
    """Blocks in a wait the kernel would restart after a signal handler
    (a futex: a lock, an event, a queue), unless interrupted."""
    import queue

    try:
        record(path, "started")
        if how == "lock":
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        elif how == "event":
            threading.Event().wait()
        else:
            queue.Queue().get()
    finally:
        record(path, "finally")


@pytest.mark.parametrize("how", ["lock", "event", "queue"])
def test_a_task_blocked_in_a_lock_event_or_queue_is_interrupted_and_runs_its_finally(tmp_path, how):
    """A stop signal makes the blocked wait fail with EINTR, so the task gets
    ``TaskInterrupted`` there, as it does in ``time.sleep()`` (with the
    handler installed with ``SA_RESTART``, the kernel restarted the wait and
    the task never saw it: the exit path ran beside it, without its
    ``finally``)."""
    log = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, finalizer=record, finalargs=(log, "fin")) as ex:
        victim = ex.submit(block_after_marking, log, how)
        assert wait_until(lambda: len(pids_tagged(log, "started")) == 1, timeout=60)
        assert victim.cancel(running=True) is True
        pid = pids_tagged(log, "started")[0]
        assert wait_until(lambda: pid in pids_tagged(log, "fin"), timeout=15)
        assert pid in pids_tagged(log, "finally")
        assert ex.submit(square, 3).result(timeout=60) == 9


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("how", ["task_timeout", "cancel_running"])
def test_stopping_a_task_as_it_ends_never_cuts_off_the_task_sent_after_it(how):
    # The task stopped (its timeout, cancel(running=True)) ends about when
    # the stop comes; the next one, sent ahead to the same worker, must
    # never be what the stop reaches.
    rng = random.Random(3)
    failed = []
    timeout = 0.02 if how == "task_timeout" else None
    # The initializer imports this module in each worker: no task pays for it.
    with warden.ProcessPoolExecutor(1, task_timeout=timeout, initializer=sleep_for, initargs=(0,)) as ex:
        ex.submit(sleep_for, 0).result(timeout=60)
        for _ in range(200):
            if how == "task_timeout":
                ex.submit(sleep_for, 0.02 + rng.uniform(-0.002, 0.002))
                after = ex.submit(sleep_for, 0.001)
            else:
                stopped = ex.submit(sleep_for, rng.choice([0.0005, 0.001, 0.002]))
                after = ex.submit(sleep_for, 0.003)
                assert wait_until(lambda s=stopped: s.running() or s.done(), timeout=30, step=0.0001)
                time.sleep(rng.random() * 0.002)
                stopped.cancel(running=True)
            try:
                after.result(timeout=60)
            except warden.WorkerCrashed as e:  # the stop reached it
                failed.append(repr(e))
            except warden.TaskTimeout:
                pass  # its own 20 ms, on a loaded machine
    assert failed == []


def test_cancel_running_after_the_task_finished_is_false(tmp_path):
    with warden.ProcessPoolExecutor(1) as ex:
        f = ex.submit(square, 4)
        assert f.result(timeout=60) == 16
        assert f.cancel(running=True) is False
        assert f.result() == 16


def test_async_result_cancel_running_stops_the_call_and_runs_the_finalizer(tmp_path):
    log = tmp_path / "log"
    with warden.Pool(2, finalizer=record, finalargs=(log, "fin")) as pool:
        victim = pool.apply_async(sleep_after_marking, (log, 60))
        other = pool.apply_async(sleep_after_marking, (log, 1.0))
        assert wait_until(lambda: len(pids_tagged(log, "started")) == 2, timeout=60)
        assert victim.cancel() is False
        assert victim.cancel(running=True) is True
        with pytest.raises(cf.CancelledError):
            victim.get(timeout=30)
        assert other.get(timeout=60) == "slept"
        # The other task's worker lives on in the pool: exactly one of the two
        # workers, the stopped one, has run its finalizer.
        started = set(pids_tagged(log, "started"))
        assert wait_until(lambda: len(started & set(pids_tagged(log, "fin"))) == 1, timeout=15)
        assert pool.apply(square, (5,)) == 25


# -- memory caps ----------------------------------------------------------------

_ballast: list[bytearray] = []


def grow_and_keep(mib):
    """Allocates and touches ``mib`` MiB, keeps it, returns the pid."""
    _ballast.append(bytearray(b"x" * (mib * MiB)))
    return os.getpid()


def grow_slowly_then_sleep(mib, path):
    record(path, "started")
    for _ in range(mib // 8):
        _ballast.append(bytearray(b"x" * (8 * MiB)))
        time.sleep(0.005)
    time.sleep(60)
    return "survived"


@pytest.mark.parametrize("cap", [160 * MiB, "160MiB"])
def test_max_memory_per_child_retires_the_worker_after_its_task_and_keeps_the_result(tmp_path, cap):
    log = tmp_path / "log"
    hooks = {"finalizer": record, "finalargs": (log, "fin")}
    with warden.ProcessPoolExecutor(1, max_memory_per_child=cap, **hooks) as ex:
        small = ex.submit(grow_and_keep, 1).result(timeout=60)
        assert ex.submit(getpid).result(timeout=60) == small  # under the cap: the same worker
        big = ex.submit(grow_and_keep, 200).result(timeout=60)  # the result comes back
        assert big == small
        assert wait_until(lambda: big in pids_tagged(log, "fin"), timeout=15)  # retired gracefully
        assert ex.submit(getpid).result(timeout=60) != big


def total_of(array):
    return float(array.sum())


def use_for_a_while(mib):
    """Touches ``mib`` MiB for a moment, lets it go, returns the pid."""
    block = bytearray(b"x") * (mib * MiB)  # one allocation: no bytes copied into it
    time.sleep(0.3)  # long enough for the memory watch to see it
    del block
    return os.getpid()


@pytest.mark.parametrize(
    "cap, argument, later", [("max_memory_per_child", 250, 0), ("memory_limit", 100, 80)]
)
def test_a_large_argument_a_task_has_let_go_of_does_not_count_against_a_memory_cap(cap, argument, later):
    # A worker keeps the memory it read a large array into, for the next one
    # (a spare): resident until the kernel needs it, it counted against the
    # cap as if the finished task still held it. The worker was retired after
    # every such task, or a later task was stopped for memory it never used.
    np = pytest.importorskip("numpy", reason="numpy is optional (`make test` installs it)")
    array = np.ones((argument * MiB) // 8)
    # A worker here holds about 45 MiB before the argument (numpy imported).
    with warden.ProcessPoolExecutor(1, **{cap: "200MiB"}) as ex:
        worker = ex.submit(getpid).result(timeout=60)
        for _ in range(3):
            assert ex.submit(total_of, array).result(timeout=60) == array.size
            assert ex.submit(use_for_a_while, later).result(timeout=60) == worker  # the same worker, still


def test_memory_limit_stops_a_worker_mid_task_with_worker_memory_exceeded(tmp_path):
    log = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, memory_limit="150MiB", finalizer=record, finalargs=(log, "fin")) as ex:
        f = ex.submit(grow_slowly_then_sleep, 400, log)
        with pytest.raises(warden.WorkerMemoryExceeded) as info:
            f.result(timeout=60)
        e = info.value
        assert isinstance(e, warden.WorkerCrashed)
        assert e.limit == 150 * MiB and e.rss > e.limit
        assert "150" in str(e) or str(150 * MiB) in str(e)
        pid = pids_tagged(log, "started")[0]
        assert e.pid == pid
        assert wait_until(lambda: pid in pids_tagged(log, "fin"), timeout=15)  # SIGTERM: finalizer ran
        assert ex.submit(square, 6).result(timeout=60) == 36


def keep_quickly(mib):
    """Keeps ``mib`` MiB in a module global (a cache), touched in one
    allocation, and returns the pid: well within the first memory sample."""
    _ballast.append(bytearray(b"x") * (mib * MiB))
    return os.getpid()


def sleep_a_little():
    time.sleep(0.3)  # long enough for the memory watch to sample it
    return os.getpid()


def test_a_task_that_keeps_memory_past_memory_limit_retires_its_worker_instead_of_failing_the_next(tmp_path):
    """The task that grew the worker returned before any sample; the next
    task, which allocates nothing, was then failed with
    ``WorkerMemoryExceeded`` for memory it never took. Now the worker left
    over the limit retires (finalizer and all) once its tasks are done, and
    no later task fails. (A sample that falls while the first task grows
    fails that task: its own memory.)"""
    log = tmp_path / "log"
    kept_past_it = 0  # rounds where the growth ended before the first sample
    for _ in range(8):
        if kept_past_it == 2:
            break
        with warden.ProcessPoolExecutor(
            1, memory_limit="100MiB", finalizer=record, finalargs=(log, "fin")
        ) as ex:
            ex.submit(getpid).result(timeout=60)  # started; the pool idle again
            kept = ex.submit(keep_quickly, 120)
            after = [ex.submit(sleep_a_little) for _ in range(3)]
            try:
                grown = kept.result(timeout=60)
            except warden.WorkerMemoryExceeded:
                grown = None
            pids = [f.result(timeout=60) for f in after]  # none failed
            if grown is not None:
                kept_past_it += 1
                assert pids[-1] != grown  # retired: the last ran on its replacement
                assert wait_until(lambda pid=grown: pid in pids_tagged(log, "fin"), timeout=15)
    assert kept_past_it, "in every round a sample fell while the first task grew: nothing was checked"


@pytest.mark.parametrize(
    "value, error",
    [("lots", ValueError), ("12 parsecs", ValueError), (0, ValueError), (-5, ValueError), (1.5, TypeError)],
)
def test_a_bad_memory_size_is_refused_with_a_clear_error(value, error):
    with pytest.raises(error, match="memory_limit"):
        warden.ProcessPoolExecutor(1, memory_limit=value)
    with pytest.raises(error, match="max_memory_per_child"):
        warden.Pool(1, max_memory_per_child=value)


WITHOUT_PROC = """
import warden

def grow(n):
    return len(bytearray(n))

if __name__ == "__main__":
    # (An executor starts its workers with the first task, as the standard library's.)
    for use in (
        lambda: warden.ProcessPoolExecutor(1, memory_limit="100MiB").submit(grow, 1).result(timeout=60),
        lambda: warden.Pool(1, max_memory_per_child="100MiB").apply(grow, (1,)),
    ):
        try:
            use()
        except ValueError as e:
            print("refused:", e, flush=True)
        else:
            print("served", flush=True)
    with warden.ProcessPoolExecutor(1) as ex:  # no cap: /proc is not needed
        print(ex.submit(grow, 300 << 20).result(timeout=60), flush=True)
"""


@pytest.mark.parametrize("where", sorted(WITHOUT_OWN_PROC))
def test_a_memory_cap_where_proc_cannot_be_read_is_refused_instead_of_holding_nothing(program, where):
    """The caps read each worker's ``/proc/<pid>/statm``. With ``/proc``
    hidden (a tmpfs over it), or another PID namespace's (``unshare --pid``
    without a ``/proc`` of its own: the workers' pids there are other
    processes), the pool is refused as it starts its workers, with a
    ``ValueError`` that says why; before, it served, and a task went past
    the cap unnoticed. A pool without a cap still runs there."""
    out, err = program(WITHOUT_PROC).run_without_own_proc(where)
    lines = out.splitlines()
    assert len(lines) == 3, out + err
    for line in lines[:2]:
        assert line.startswith("refused:") and "/proc/<pid>/statm, which cannot be read here" in line, line
    assert lines[2] == str(300 << 20)


# -- on_worker_lost -------------------------------------------------------------


def make_scratch(base):
    path = tempfile.mkdtemp(prefix="scratch-", dir=base)
    warden.set_cleanup_record({"scratch": path})


def scratch_then_die(base, die):
    path = tempfile.mkdtemp(prefix="task-", dir=base)
    warden.set_cleanup_record({"scratch": path, "task": True})
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def test_on_worker_lost_cleans_up_in_the_parent_after_a_sigkill(tmp_path):
    seen = []
    done = threading.Event()

    def lost(info):
        # A thread of the core's (not one Python started), not the main thread.
        seen.append((info, threading.get_ident(), type(threading.current_thread()).__name__))
        shutil.rmtree(info.record["scratch"])
        done.set()

    hooks = {"initializer": make_scratch, "initargs": (str(tmp_path),)}
    ex = warden.ProcessPoolExecutor(1, on_worker_lost=lost, **hooks)
    try:
        f = ex.submit(scratch_then_die, str(tmp_path), True)
        with pytest.raises(warden.WorkerCrashed) as crash:
            f.result(timeout=60)
        assert done.wait(30)
        info, thread, kind = seen[0]
        assert info.pid == crash.value.pid and info.signal == signal.SIGKILL
        assert info.exitcode == -signal.SIGKILL
        assert info.task is f
        assert info.record["task"] is True
        assert thread != threading.main_thread().ident and kind == "_DummyThread"
        # The worker that replaced it retires normally: it is not lost.
        assert ex.submit(square, 2).result(timeout=60) == 4
    finally:
        ex.shutdown()
    assert len(seen) == 1
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    # The lost worker's task scratch is gone; the two initializer scratches
    # (one per worker, never cleaned by a finalizer here) stay.
    assert left == ["scratch", "scratch"]


def test_on_worker_lost_on_a_pool_gets_the_async_result_and_an_error_in_it_is_reported(tmp_path, capfd):
    seen = []

    def lost(info):
        seen.append(info)
        raise RuntimeError("hook failed on purpose")

    with warden.Pool(1, on_worker_lost=lost) as pool:
        r = pool.apply_async(scratch_then_die, (str(tmp_path), True))
        with pytest.raises(warden.WorkerCrashed):
            r.get(timeout=60)
        assert wait_until(lambda: len(seen) == 1, timeout=30)
        assert seen[0].task is r
        assert pool.apply(square, (3,)) == 9
    assert wait_until(lambda: "hook failed on purpose" in capfd.readouterr().err, timeout=10)


def crash(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


def test_futures_of_lost_or_timed_out_workers_are_not_kept_once_the_hook_is_done_with_them():
    # Held for the hook from a crash's outcome until the hook takes them; a
    # hook that ran first, or a timed-out task (no hook: its worker ran its
    # exit path), left them held for the executor's life.
    import gc
    import weakref

    seen = []
    with warden.ProcessPoolExecutor(2, on_worker_lost=seen.append) as ex:
        crashed = [ex.submit(crash) for _ in range(12)]
        timed_out = [ex.schedule(sleep_for, args=(30,), timeout=0.3) for _ in range(3)]
        refs = [weakref.ref(f) for f in crashed + timed_out]
        for f in crashed + timed_out:
            with pytest.raises((warden.WorkerCrashed, warden.TaskTimeout)):
                f.result(timeout=60)
        lost = len(crashed)
        assert wait_until(lambda: len(seen) >= lost, timeout=60)
        assert sum(info.task is not None for info in seen) >= lost
        del crashed, timed_out, f
        seen.clear()
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs)


CLOSES_ITS_CHANNEL = """
import os, sys, warden

def finalizer():
    print("finalizer ran in", os.getpid(), flush=True)

def close_everything():
    os.closerange(3, 4096)
    return "done"

def pid():
    return os.getpid()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1, finalizer=finalizer) as ex:
        first = ex.submit(pid).result(timeout=60)
        try:
            ex.submit(close_everything).result(timeout=60)
        except warden.WorkerCrashed as e:
            print("crashed", e.pid == first, e.signal, e.exitcode, flush=True)
        print("next", ex.submit(pid).result(timeout=60) != first, flush=True)
"""


def test_a_task_that_closes_its_workers_channel_fails_that_task_and_its_worker_ends_through_its_exit_path(
    program,
):
    # The worker used to take its closed channel for its parent's death and
    # SIGKILL its own process group, itself included.
    run = program(CLOSES_ITS_CHANNEL).run(env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    finalized = [line for line in run.lines if line.startswith("finalizer ran in")]
    rest = [line for line in run.lines if not line.startswith("finalizer ran in")]
    assert rest == ["crashed True None 4", "next True"], run.stderr
    assert len(finalized) == 2  # the worker that lost its channel, and its replacement
    assert "its channel to the pool was closed in this process" in run.stderr


FROZEN_WHILE_FINALIZING = """
import os, sys, time, warden

def finalizer():
    with open(os.environ["OUT"], "a") as f:
        f.write("finalizer began\\n")
    for _ in range(40):  # 2 s of its own running time: a freeze does not count
        time.sleep(0.05)
    with open(os.environ["OUT"], "a") as f:
        f.write("finalizer done\\n")

def task():
    print(os.getpid(), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    pool = warden.Pool(1, finalizer=finalizer)
    pool.apply_async(task)
    time.sleep(float(sys.argv[1]))
    pool.terminate()  # the task is stopped, and the worker's finalizer runs
    pool.join()
    print("joined", flush=True)
"""


def test_a_freeze_of_the_program_and_its_workers_longer_than_the_grace_does_not_cut_a_finalizer_short(
    program,
):
    # The program and its worker, stopped together (as a cgroup freezer or
    # ``docker pause`` stops them) for longer than the grace periods while
    # the worker runs its finalizer: the grace was the clock's, and the
    # worker was SIGKILLed as they resumed, its finalizer cut short.
    prog = program(FROZEN_WHILE_FINALIZING)
    proc = prog.start(args=("1",))
    worker = int(proc.stdout.readline())
    assert wait_until(lambda: "finalizer began" in prog.out_lines(), timeout=60)
    frozen = [proc.pid, worker]
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(13)  # past the terminate's grace period, and past its caller's own bound (twice that)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["joined"], err
    assert prog.out_lines() == ["finalizer began", "finalizer done"], err


REUSES_ITS_CHANNELS_NUMBER = """
import os, socket, warden

KEPT = []

def close_everything_and_open_a_socket():
    os.closerange(3, 4096)
    KEPT.append(socket.socketpair())  # takes the channel's number
    return "done"

def pid():
    return os.getpid()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        first = ex.submit(pid).result(timeout=60)
        try:
            ex.submit(close_everything_and_open_a_socket).result(timeout=60)
        except warden.WorkerCrashed as e:
            print("crashed", e.pid == first, flush=True)
        print("next", ex.submit(pid).result(timeout=60) != first, flush=True)
"""


def test_a_worker_whose_task_put_a_socket_on_its_channels_number_is_stopped_after_a_grace_period(program):
    # Its result went into the task's socket, and it then waited for work
    # there, for good: the task's future never finished, nor the shutdown.
    run = program(REUSES_ITS_CHANNELS_NUMBER).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["crashed True", "next True"], run.stderr


def test_on_worker_lost_gets_the_future_even_when_the_program_let_go_of_it_at_its_outcome():
    # ``ex.submit(f).result()``: the program lets go of the future as soon as
    # its outcome is in, which can be before the hook's thread looks it up.
    seen = []
    rounds = 10
    with warden.ProcessPoolExecutor(1, on_worker_lost=seen.append) as ex:
        for _ in range(rounds):
            with pytest.raises(warden.WorkerCrashed):
                ex.submit(crash).result(timeout=60)
        assert wait_until(lambda: len(seen) == rounds, timeout=60)
        crashed_in_tasks = list(seen)  # (a worker still starting as the pool ends may follow)
    assert [type(info.task).__name__ for info in crashed_in_tasks] == ["Future"] * rounds
    for info in crashed_in_tasks:
        with pytest.raises(warden.WorkerCrashed) as crashed:
            info.task.result(0)
        assert crashed.value.pid == info.pid


@pytest.mark.parametrize("who", ["caller", "hook"])
def test_a_slow_on_worker_lost_hook_holds_terminate_for_one_grace_period_at_most(who):
    """A cleanup hook that takes long (an ``rm -rf``, a network call) while
    the pool is terminated, by the program or by the hook itself ("a worker
    died: give up"): ``terminate()`` waits for it one grace period at most
    (5 s), then leaves it to finish on its own, and a hook that terminates
    its own pool does not wait for itself. Before, the wait climbed the kill
    ladder (19 s), or waited for the hook for as long as it ran, or for good
    when the hook was the one waiting."""
    release = threading.Event()
    entered = threading.Event()
    returned = threading.Event()
    pool: warden.Pool | None = None

    def hook(info):
        entered.set()
        if who == "hook":
            assert pool is not None
            pool.terminate()
            returned.set()
        release.wait(60)

    pool = warden.Pool(1, on_worker_lost=hook)
    try:
        with pytest.raises(warden.WorkerCrashed):
            pool.apply(crash)
        assert entered.wait(30)
        if who == "caller":
            t = threading.Thread(target=lambda: (pool.terminate(), returned.set()), daemon=True)
            t.start()
        assert returned.wait(15), f"terminate() from the {who} did not return"
    finally:
        release.set()
        pool.terminate()


def test_set_cleanup_record_outside_a_worker_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not serving as a warden worker"):
        warden.set_cleanup_record("x")


# -- nothing left open -------------------------------------------------------------


def open_fds():
    """This process's open fds (not the one that listed them)."""
    listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    still = []
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue
        still.append(fd)
    return sorted(still)


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_after_shutdown_every_fd_the_pool_opened_is_closed_while_it_is_still_referenced(kind):
    before = open_fds()
    if kind == "executor":
        ex = warden.ProcessPoolExecutor(2)
        assert ex.submit(square, 3).result(timeout=60) == 9
        ex.shutdown(wait=True)
        keep = ex
    else:
        pool = warden.Pool(2)
        assert pool.apply(square, (3,)) == 9
        pool.close()
        pool.join()
        keep = pool
    assert open_fds() == before
    assert keep is not None


# -- sharp edges ----------------------------------------------------------------------


def test_pass_fds_with_a_bad_fd_closes_every_good_one_it_was_given():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.close(w1), os.close(w2)
    bad = max(r1, r2) + 1000
    program, args = sys.executable, ["-c", "pass"]
    with pytest.raises(ValueError, match=f"pass_fds: {bad} "):
        _warden.CorePool(program, args, pass_fds=[r1, bad, r2])
    for fd in (r1, r2):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_pass_fds_with_a_repeated_fd_passes_it_once_and_closes_it():
    from warden import _runner

    r, w = os.pipe()
    os.close(w)
    program, args = _runner.worker_command()
    before = open_fds()
    core = _warden.CorePool(program, args, pass_fds=[r, r], workers=1)
    core.close()
    assert core.join(60)
    core.dispose()
    with pytest.raises(OSError):
        os.fstat(r)
    assert sorted(set(before) - set(open_fds())) == [r]


def spawn_child_and_read_its_worker_variables():
    code = "import os, sys; sys.stdout.write(repr([os.environ.get(k) for k in sys.argv[1:]]))"
    argv = [sys.executable, "-c", code, *_warden.WORKER_VARIABLES]
    out = subprocess.run(argv, capture_output=True, text=True)
    return out.stdout, [os.environ.get(k) for k in _warden.WORKER_VARIABLES]


def test_a_workers_own_children_do_not_see_the_worker_variables():
    with warden.ProcessPoolExecutor(1) as ex:
        child, own = ex.submit(spawn_child_and_read_its_worker_variables).result(timeout=60)
    nothing = [None] * len(_warden.WORKER_VARIABLES)
    assert child == repr(nothing)
    assert own == nothing


def exit_1_if_a_worker_variable_is_set():
    if any(k in os.environ for k in _warden.WORKER_VARIABLES):
        sys.exit(1)


def test_a_process_child_does_not_see_the_worker_variables():
    # A one-off child gets one more than a pool's workers (WARDEN_ONE_OFF).
    p = warden.Process(target=exit_1_if_a_worker_variable_is_set)
    p.start()
    p.join(60)
    assert p.exitcode == 0


def pidfds() -> int:
    """How many pidfds this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    return count


def test_looking_at_a_pools_workers_keeps_nothing_once_the_pool_is_gone():
    """``active_children()``, ``executor._processes`` and ``pool._pool`` give
    views of the workers, each with a pidfd: they go with the pool."""
    import gc

    before = pidfds()
    for _ in range(5):
        with warden.ProcessPoolExecutor(2) as ex:
            ex.submit(abs, -1).result(timeout=60)
            assert len(multiprocessing.active_children()) >= 2
            assert len(ex._processes) == 2
        with warden.Pool(2) as pool:
            assert len(pool._pool) == 2
        del ex, pool
    gc.collect()
    assert wait_until(lambda: pidfds() <= before, timeout=10), (before, pidfds())


@pytest.mark.parametrize("start", ["zygote", "exec"])
@pytest.mark.parametrize("stream", [1, 2])
def test_a_task_writing_to_a_stream_the_parent_closed_breaks_nothing(tmp_path, stream, start):
    """A program started with its stdout or stderr closed (``>&-``): what a
    task (or a C library in it) writes to that fd goes nowhere, never into
    the worker's channel to its pool."""
    report = tmp_path / "report.txt"
    prog = tmp_path / "prog.py"
    prog.write_text(
        f"""
import os
import warden

def task(x):
    os.write({stream}, b"diagnostic from a task\\n")
    return x

if __name__ == "__main__":
    with open({str(report)!r}, "w") as out:
        with warden.ProcessPoolExecutor(2, start={start!r}) as ex:
            for f in [ex.submit(task, i) for i in range(4)]:
                try:
                    out.write(f"ok {{f.result(timeout=60)}}\\n")
                except Exception as e:
                    out.write(f"failed {{type(e).__name__}}: {{e}}\\n")
"""
    )
    closed = ">&-" if stream == 1 else "2>&-"
    run = subprocess.run(
        ["sh", "-c", f'exec "$0" "$1" {closed}', sys.executable, str(prog)],
        cwd=tmp_path,
        timeout=120,
        capture_output=stream == 2,
        check=False,
    )
    assert run.returncode == 0
    assert report.read_text().splitlines() == [f"ok {i}" for i in range(4)]


@pytest.mark.parametrize("api", ["executor", "pool", "process"])
def test_a_program_started_with_every_stdio_stream_closed_gets_working_pools(tmp_path, api):
    report = tmp_path / "report.txt"
    prog = tmp_path / "prog.py"
    prog.write_text(
        f"""
import os
import warden

def task(x):
    print("from a task", x)
    return x

if __name__ == "__main__":
    with open({str(report)!r}, "w") as out:
        try:
            if {api!r} == "executor":
                with warden.ProcessPoolExecutor(2) as ex:
                    got = [f.result(timeout=60) for f in [ex.submit(task, i) for i in range(4)]]
            elif {api!r} == "pool":
                with warden.Pool(2) as pool:
                    got = pool.map(task, range(4))
            else:
                child = warden.Process(target=task, args=(1,))
                child.start()
                child.join(60)
                got = [child.exitcode]
            out.write(f"ok {{got}}\\n")
        except Exception as e:
            out.write(f"failed {{type(e).__name__}}: {{e}}\\n")
"""
    )
    run = subprocess.run(
        ["sh", "-c", 'exec "$0" "$1" <&- >&- 2>&-', sys.executable, str(prog)],
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0
    expected = "ok [0]" if api == "process" else "ok [0, 1, 2, 3]"
    assert report.read_text().splitlines() == [expected]


STOPS_ITSELF = """
import os, signal, sys, time
import warden

def freeze():
    os.kill(os.getpid(), signal.SIGSTOP)
    return "resumed"

def work(x):
    time.sleep(0.1)
    return x

if __name__ == "__main__":
    if sys.argv[1] == "executor":
        pool = warden.ProcessPoolExecutor(2)
        frozen = pool.submit(freeze)
        futures = [pool.submit(work, i) for i in range(20)]
        done = lambda: sum(f.done() for f in futures)
    else:
        pool = warden.Pool(2)
        frozen = pool.apply_async(freeze)
        results = [pool.apply_async(work, (i,)) for i in range(20)]
        done = lambda: sum(r.ready() for r in results)
    deadline = time.monotonic() + 30
    while done() < 19 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the other worker has long had time for the rest
    print("done while a worker is frozen", done(), flush=True)
    workers = pool._processes.values() if sys.argv[1] == "executor" else pool._pool
    for w in workers:
        os.kill(w.pid, signal.SIGCONT)
    if sys.argv[1] == "executor":
        print("frozen task", frozen.result(10))
        pool.shutdown()
    else:
        print("frozen task", frozen.get(10))
        pool.close()
        pool.join()
    print("done after", done())
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_frozen_worker_holds_at_most_one_task_beyond_its_own(program, kind):
    # SIGSTOP (a debugger, Ctrl-Z on one pid, a cgroup freezer) freezes the
    # worker's every thread: what it holds cannot be asked back. Submitted
    # right after the pool starts (before any task time is known), at most
    # one task waits for it; the other worker runs the rest.
    run = program(STOPS_ITSELF).run(timeout=60, args=(kind,))
    assert run.returncode == 0, run.stderr
    assert run.lines[0] in [f"done while a worker is frozen {n}" for n in (19, 20)], run.stdout
    assert run.lines[1:] == ["frozen task resumed", "done after 20"], run.stdout


PARENT_STOPPED = """
import os, subprocess, sys, time
import warden

def half_a_second(i):
    time.sleep(0.5)
    return i

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(2, task_timeout=2) as ex:
        list(ex.map(half_a_second, range(2)))
        # Ctrl-Z, then fg, 3 s later: stopped while its two tasks run.
        me = os.getpid()
        subprocess.Popen(["sh", "-c", f"sleep 0.2; kill -STOP {me}; sleep 3; kill -CONT {me}"])
        futures = [ex.submit(half_a_second, i) for i in range(4)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(60))
            except Exception as e:
                outcomes.append(type(e).__name__)
    print(*outcomes, flush=True)
"""


def test_a_parent_stopped_and_continued_reads_its_results_before_their_deadlines(program):
    """The supervisor's wait fails with EINTR when the process is continued
    (no handler needed): it polls again, so results that arrived meanwhile
    are read before the deadlines that passed while it was stopped are
    looked at (before, finished tasks failed with ``TaskTimeout``)."""
    run = program(PARENT_STOPPED).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["0 1 2 3"], run.stdout


NO_THREAD = """
import os, threading, time
import warden

def children():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, parent = f.read().rsplit(") ", 1)[1].split()[:2]
            with open(f"/proc/{pid}/cmdline") as f:
                tracker = "resource_tracker" in f.read()
        except OSError:
            continue
        if parent == str(os.getpid()) and state != "Z" and not tracker:
            found.append(pid)
    return found

if __name__ == "__main__":
    start = threading.Thread.start

    def refuse(thread):
        if thread.name == "warden-results":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        return start(thread)

    threading.Thread.start = refuse
    ex = warden.ProcessPoolExecutor(2)
    try:
        ex.submit(abs, -1)
    except RuntimeError as e:
        print("submit:", e)
    threading.Thread.start = start
    deadline = time.monotonic() + 10
    while children() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("children left", len(children()))
    with warden.ProcessPoolExecutor(1) as other:
        print("another pool", other.submit(abs, -2).result())
"""


def test_a_pool_whose_results_thread_cannot_start_leaves_nothing_running(program):
    # Python 3.13 refuses new threads at interpreter shutdown; a pool that
    # cannot start its results thread fails at once, its workers stopped.
    run = program(NO_THREAD).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "submit: can't create new thread at interpreter shutdown",
        "children left 0",
        "another pool 2",
    ], run.stdout + run.stderr


ADDRESS_SPACE = """
import multiprocessing, resource, sys
import warden

SIZE = 4 << 20

def vm_size(_=None):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize"))

def work(arg):
    i, blob = arg
    return bytes([i % 256]) * SIZE, len(blob)

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), resource.RLIM_INFINITY))
    before = vm_size()
    if sys.argv[1] == "warden":
        ex = warden.ProcessPoolExecutor(4)
    else:
        import concurrent.futures as cf
        ex = cf.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn"))
    with ex:
        worker = max(ex.submit(vm_size, i).result(timeout=60) for i in range(8))
        blob = b"x" * SIZE
        done = 0
        for f in [ex.submit(work, (i, blob)) for i in range(20)]:
            value, n = f.result(timeout=60)
            done += value == bytes([value[0]]) * SIZE and n == SIZE
        parent = vm_size() - before
    print(worker, parent, done, flush=True)
"""


def test_under_an_address_space_limit_workers_and_parent_reserve_about_what_the_standard_librarys_do(program):
    """``ulimit -v`` (``RLIMIT_AS``, as batch schedulers set it) counts the
    64 MiB glibc reserves for each thread's malloc arena: warden's own
    threads (two per worker, three in the parent) would take over 100 MB of
    it more than the standard library's pool and fail tasks, or abort the
    parent, at a limit the standard library lives with. Under a limit they
    keep to the arenas there are."""
    prog = program(ADDRESS_SPACE)
    seen = {}
    for impl in ("stdlib", "warden"):
        run = prog.run(timeout=120, args=(impl, str(1 << 30)))
        assert run.returncode == 0, run.stderr
        worker, parent, done = (int(x) for x in run.stdout.split())
        assert done == 20
        seen[impl] = worker, parent
    assert seen["warden"][0] < seen["stdlib"][0] + 32 * MiB, seen
    assert seen["warden"][1] < seen["stdlib"][1] + 32 * MiB, seen
    # And all 20 tasks come through under the limit the standard library needs.
    run = prog.run(timeout=120, args=("warden", str(200 * MiB)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[2] == "20", run.stdout


PROCESS_SHORTAGE = """
import subprocess, sys, threading, time
import warden

def work(x):
    time.sleep(0.05)
    return x

def hog(held):
    procs = []
    try:
        while True:
            procs.append(subprocess.Popen(["sleep", "60"]))
    except OSError:
        pass
    held.set()
    time.sleep(2)
    for p in procs:
        p.kill()
        p.wait()

if __name__ == "__main__":
    held = threading.Event()
    kind = sys.argv[1]
    if kind == "executor":
        pool = warden.ProcessPoolExecutor(2, max_tasks_per_child=1)
    else:
        pool = warden.Pool(2, maxtasksperchild=1)
    with pool:
        def submit(fn, x):
            return pool.submit(fn, x) if kind == "executor" else pool.apply_async(fn, (x,))

        pending = [submit(work, i) for i in range(30)]
        t = threading.Thread(target=hog, args=(held,))
        t.start()
        held.wait(30)
        results = [f.result(timeout=60) if kind == "executor" else f.get(timeout=60) for f in pending]
        t.join()
        print("results", results == list(range(30)), flush=True)
        after = submit(work, 99)
        print("after", after.result(timeout=60) if kind == "executor" else after.get(timeout=60), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user under its own RLIMIT_NPROC needs root")
@pytest.mark.skipif(
    not (shutil.which("setpriv") and shutil.which("prlimit")), reason="needs setpriv and prlimit (util-linux)"
)
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_pool_outlasts_a_passing_shortage_of_processes_and_loses_no_task(program, kind):
    """``ulimit -u`` reached for two seconds while every task needs a new
    worker: the system refuses starts (``EAGAIN``), which is no worker's
    failure; the pool tries again as the shortage lasts, every task comes
    through and the pool serves on, as the standard library's does (before,
    eleven refusals in a few milliseconds failed the pool as a whole). The
    program runs with a real uid of its own, which the limit counts (one per
    case: run side by side, two programs under one uid would share the
    limit), keeping root's files readable."""
    prog = program(PROCESS_SHORTAGE)
    prog.path.chmod(0o644)
    uid = {"executor": "65531", "pool": "65532"}[kind]
    command = [
        "setpriv", "--ruid", uid, "--bounding-set", "-sys_resource,-sys_admin", "--",
        "prlimit", "--nproc=60:60", sys.executable, str(prog.path), kind,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=prog.tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    prog.proc = proc  # cleaned up with the fixture, whatever happens
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the program did not finish within 120 s")
    assert proc.returncode == 0, err
    assert out.splitlines() == ["results True", "after 99"], err


#: A task that leaves stderr a full pipe, as a worker's earlier output would
#: once the pipe's reader stopped reading.
FILL_STDERR = """
import os

def fill_stderr():
    os.set_blocking(2, False)
    try:
        while True:
            os.write(2, b"e" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(2, True)
    return os.getpid()
"""


@contextlib.contextmanager
def started_with_stderr_unread(prog):
    """Starts ``prog`` with stderr a pipe nobody reads (stdout a pipe read
    by the caller); the pipe is closed at the end, the program cleaned up
    with the fixture."""
    reader, writer = os.pipe()
    try:
        prog.proc = subprocess.Popen(
            [sys.executable, str(prog.path)],
            cwd=prog.tmp_path,
            stdout=subprocess.PIPE,
            stderr=writer,
            text=True,
        )
        os.close(writer)
        writer = -1
        yield prog.proc
    finally:
        if writer >= 0:
            os.close(writer)
        os.close(reader)


CRASH_WITH_STDERR_FULL = (
    FILL_STDERR
    + """
import ctypes
import warden

def crash():
    ctypes.string_at(0)

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(fill_stderr).result(60)
        try:
            ex.submit(crash).result(60)
        except warden.WorkerCrashed as e:
            print("crashed", "SIGSEGV" in str(e), flush=True)
        print("served", ex.submit(abs, -7).result(60), flush=True)
"""
)


def test_a_worker_that_crashes_while_stderr_is_a_full_pipe_dies_and_its_task_fails(program):
    """stderr is a pipe whose reader has stopped reading, and full; then a
    task crashes its worker. The worker's fault handler blocked writing the
    traceback, so the worker neither died nor served: the task and the
    pool's shutdown waited for ever (the standard library's worker dies,
    and its pool reports it). Now the handler writes what fits and the
    worker dies of its signal."""
    with started_with_stderr_unread(program(CRASH_WITH_STDERR_FULL)) as proc:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the program did not finish within 60 s with its stderr full")
    assert proc.returncode == 0
    assert out.splitlines() == ["crashed True", "served 7"], out


ORPHANED_WITH_STDERR_FULL = (
    FILL_STDERR
    + """
import signal, time
import warden

def hang():
    time.sleep(1000)

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1, finalizer=hang)
    print(ex.submit(fill_stderr).result(60), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
)


def test_an_orphaned_worker_whose_exit_hangs_is_killed_in_time_while_stderr_is_a_full_pipe(program):
    """The program is SIGKILLed while its worker's finalizer hangs, and
    stderr is a full pipe nobody reads. The worker's bound on an orphan's
    exit path first said so on stderr, a write that blocked, and the kill
    after it never came: the worker outlived the program for as long as the
    pipe's reader did. warden's reports now give up on a stderr that takes
    nothing for a second."""
    worker = None
    try:
        with started_with_stderr_unread(program(ORPHANED_WITH_STDERR_FULL)) as proc:
            assert proc.stdout is not None
            worker = int(proc.stdout.readline())  # (the worker holds stdout open too)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            # The orphan bound is 5 s, and a report's wait on stderr 1 s more.
            assert wait_until(lambda: not alive(worker), timeout=20), "the orphaned worker is still alive"
    finally:
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)


THREAD_SHORTAGE = """
import os, signal, sys, threading, time
import warden

if __name__ == "__main__":
    cgroup = sys.argv[1]
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(os.getpid).result(30)

        def lift():
            time.sleep(3.5)
            with open(os.path.join(cgroup, "pids.max"), "w") as f:
                f.write("max")

        threading.Thread(target=lift).start()
        time.sleep(0.5)
        workers = [w.pid for w in ex._warden_runner.core.workers()]
        theirs = sum(len(os.listdir(f"/proc/{pid}/task")) for pid in workers)
        with open(os.path.join(cgroup, "tasks")) as f:
            now = len(f.read().split())
        # Once the workers are gone, room for two processes, not their threads.
        with open(os.path.join(cgroup, "pids.max"), "w") as f:
            f.write(str(now - theirs + 2))
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        print("served", ex.submit(os.getpid).result(60) not in workers, flush=True)
"""


def test_a_shortage_of_threads_is_said_once_by_the_pool_not_once_per_worker_refused(program, pids_cgroup):
    """The system's limit on processes and threads reached for three
    seconds while a pool replaces its workers: the workers it forks cannot
    start their threads, and each said so on stderr, about four lines a
    second for as long as it lasted (58 over a minute). The pool now says it
    once, and serves on once the limit is lifted."""
    run = program(THREAD_SHORTAGE).run(timeout=120, args=(str(pids_cgroup),))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["served True"], run.stdout + run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("warden")]
    assert len(said) == 1 and said[0].endswith("while the shortage lasts"), run.stderr


#: For test programs: takes every descriptor the program has left, as its
#: own files would, and returns them (the program imports ``os``).
FILL_TABLE = """
def fill_table():
    files = []
    try:
        while True:
            files.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    return files
"""

DESCRIPTOR_SHORTAGE = (
    """
import os, sys, threading, time
import warden
"""
    + FILL_TABLE
    + """
def work(x):
    time.sleep(0.05)
    return x

def hog(held, seconds):
    files = fill_table()
    held.set()
    time.sleep(seconds)
    for fd in files:
        os.close(fd)

if __name__ == "__main__":
    kind, start = sys.argv[1], sys.argv[2]
    held = threading.Event()
    if kind == "executor":
        pool = warden.ProcessPoolExecutor(2, max_tasks_per_child=1, start=start)
    else:
        pool = warden.Pool(2, maxtasksperchild=1, start=start)
    with pool:
        def submit(fn, x):
            return pool.submit(fn, x) if kind == "executor" else pool.apply_async(fn, (x,))

        def get(f):
            return f.result(timeout=60) if kind == "executor" else f.get(timeout=60)

        print("first", get(submit(work, -1)), flush=True)
        pending = [submit(work, i) for i in range(30)]
        t = threading.Thread(target=hog, args=(held, 2.0))
        t.start()
        held.wait(30)
        results = [get(f) for f in pending]
        t.join()
        print("results", results == list(range(30)), flush=True)
        print("after", get(submit(work, 99)), flush=True)
"""
)


@pytest.mark.parametrize("start", ["exec", "zygote"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_pool_outlasts_a_passing_shortage_of_descriptors_and_loses_no_task(program, kind, start):
    """The program's own files fill its descriptor table for two seconds
    while every task needs a new worker: starts fail with ``EMFILE`` (the
    channel, the pidfd, the zygote's socket), which is no worker's failure;
    the pool tries again as the shortage lasts and serves on once the files
    are closed (before, eleven refusals in a second failed the pool, and one
    in the parent took the zygote for broken)."""
    run = program(DESCRIPTOR_SHORTAGE).run(timeout=120, args=(kind, start))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["first -1", "results True", "after 99"], run.stderr


DESCRIPTORS_EXHAUSTED = (
    """
import errno, os
import warden
"""
    + FILL_TABLE
    + """
def fill(leave):
    files = fill_table()
    for _ in range(leave):
        os.close(files.pop())
    return files

if __name__ == "__main__":
    for leave in range(24):
        for make in (lambda: warden.Pool(2), lambda: warden.ProcessPoolExecutor(2)):
            files = fill(leave)
            try:
                with make() as pool:
                    pool.submit(abs, -1).result(30) if hasattr(pool, "submit") else pool.apply(abs, (-1,))
            except OSError as e:
                assert e.errno == errno.EMFILE, e
                print("OSError")
            except warden.PoolFailed as e:
                assert "Too many open files" in str(e), e
                print("PoolFailed")
            else:
                print("served")
            finally:
                for fd in files:
                    os.close(fd)
    with warden.ProcessPoolExecutor(2) as ex:
        print("then", ex.submit(abs, -2).result(30), flush=True)
"""
)


def test_a_pool_made_with_no_descriptor_to_spare_fails_at_once_with_oserror_emfile(program):
    """With the descriptor table all but full, the standard library's
    constructor raises ``OSError`` (``EMFILE``): warden raises that too, or
    (once made) fails the pool within a second with the system's words, and
    never a ``RuntimeError`` of its own or a wait of the init timeout."""
    run = program(DESCRIPTORS_EXHAUSTED).run(timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "then 2", run.stderr
    assert set(lines[:-1]) <= {"OSError", "PoolFailed", "served"}, lines
    assert "OSError" in lines and "served" in lines, lines


POOL_LARGER_THAN_ITS_DESCRIPTORS = """
import os, resource, sys
import warden

def big(i):
    return bytes(200_000) + bytes([i % 256])

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    kind = sys.argv[1]
    pool = warden.ProcessPoolExecutor(64) if kind == "executor" else warden.Pool(64)
    with pool:
        if kind == "executor":
            futures = [pool.submit(big, i) for i in range(300)]
            results = [f.result(60) for f in futures]
        else:
            results = [r.get(60) for r in [pool.apply_async(big, (i,)) for i in range(300)]]
        right = all(r == bytes(200_000) + bytes([i % 256]) for i, r in enumerate(results))
        print("results", right, flush=True)
        try:
            lowest = os.dup(0)
            os.close(lowest)
            print("free", 128 - lowest, flush=True)
        except OSError as e:
            print("free none:", e, flush=True)
    print("then", warden.ProcessPoolExecutor(2).submit(abs, -2).result(30), flush=True)
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_pool_larger_than_its_descriptors_allow_serves_with_fewer_workers_and_loses_no_result(
    program, kind
):
    """``ulimit -n 128`` and a pool of 64: each worker holds descriptors in
    the parent (its channel, its pidfd), and each result with large buffers
    one more until it is taken. Before, the pool started workers until the
    table was full, and then results failed with ``EMFILE``; now it stops a
    quarter short of the limit, says so on stderr, and every result comes."""
    run = program(POOL_LARGER_THAN_ITS_DESCRIPTORS).run(timeout=120, args=(kind,))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "results True", run.stderr
    assert lines[1].startswith("free ") and not lines[1].startswith("free none"), lines
    assert int(lines[1].split()[1]) >= 24, lines
    assert lines[2] == "then 2", run.stderr
    assert "(ulimit -n: 128) free" in run.stderr, run.stderr


POOL_VIEW_SHORT_OF_WORKERS = """
import os, resource, time
import warden

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with warden.Pool(64) as pool:
        print("map", pool.map(abs, range(-50, 0)) == list(range(50, 0, -1)), flush=True)
        for look in ("first", "second"):
            began = time.monotonic()
            workers = pool._pool
            took = time.monotonic() - began
            alive = sum(w.is_alive() for w in workers)
            print(look, len(workers), 0 < alive < 64, took < 10, flush=True)
"""


def test_a_pool_the_system_refuses_workers_lists_all_its_places_in_pool_without_waiting_for_them(program):
    """``Pool._pool`` holds ``processes`` places (dask counts them as the
    workers). A pool short of workers because the system refuses them (here
    ``ulimit -n``; ``ulimit -u`` alike) lists the places none fills as
    workers never started, at once: before, the first look waited its whole
    start wait (30 s), each later one 2 s, and the list was short."""
    run = program(POOL_VIEW_SHORT_OF_WORKERS).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["map True", "first 64 True True", "second 64 True True"], run.stderr


VIEWS_WITH_NO_DESCRIPTOR_TO_SPARE = (
    """
import os
import warden
"""
    + FILL_TABLE
    + """
if __name__ == "__main__":
    with warden.Pool(2) as pool:
        print("map", pool.map(abs, [-1, -2]), flush=True)
        files = fill_table()
        workers = pool._pool  # a first look, with no descriptor left for its pidfds
        alive = [w.is_alive() for w in workers]
        codes = [w.exitcode for w in workers]
        for fd in files:
            os.close(fd)
        print("alive", alive, codes, flush=True)
"""
)


def test_a_look_at_the_workers_with_no_descriptor_to_spare_still_sees_them_alive(program):
    """Each view of a worker opens a pidfd. With the table full (the
    program's own files), none could be opened, and two live workers that
    had just served read as not alive, with no exit code; their pool's
    list of its workers now answers instead."""
    run = program(VIEWS_WITH_NO_DESCRIPTOR_TO_SPARE).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["map [1, 2]", "alive [True, True] [None, None]"], run.stderr


FDS_CLOSED_BY_THE_PROGRAM = """
import os, sys, time
import warden

def work(i):
    return i + 1

if __name__ == "__main__":
    kind = sys.argv[1]
    pool = warden.ProcessPoolExecutor(2) if kind == "executor" else warden.Pool(2)
    submit = pool.submit if kind == "executor" else (lambda f, x: pool.apply_async(f, (x,)))
    get = (lambda r: r.result(30)) if kind == "executor" else (lambda r: r.get(30))
    print("first", get(submit(work, 1)), flush=True)
    os.closerange(3, 1024)  # a naive daemonizer's way
    try:
        get(submit(work, 2))
    except warden.PoolFailed as e:
        print("second PoolFailed", "descriptors were closed" in str(e), flush=True)
    started = time.monotonic()
    if kind == "executor":
        pool.shutdown(cancel_futures=True)
    else:
        pool.terminate()
        pool.join()
    print("shut down", time.monotonic() - started < 30, flush=True)
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_program_closing_its_pools_descriptors_gets_pool_failed_and_a_bounded_shutdown(program, kind):
    """``os.closerange(3, ...)`` with a pool running: the supervisor sleeps in
    a poller no one can wake, the logging thread polls closed fds. Before,
    the logging thread printed a traceback per pass (megabytes of stderr a
    second, a core busy) and the next ``shutdown()`` waited forever; now the
    supervisor finds its poller gone within seconds, the pool fails with
    ``PoolFailed`` saying so, and shutdown returns."""
    run = program(FDS_CLOSED_BY_THE_PROGRAM).run(timeout=90, args=(kind,))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines == ["first 2", "second PoolFailed True", "shut down True"], run.stderr[-3000:]
    assert len(run.stderr) < 2000, run.stderr[-3000:]


NEW_POOLS_AFTER_CLOSERANGE = """
import logging, os, socket, sys, time
import warden

def use(block, i, pause=0.0):
    time.sleep(pause)
    logging.getLogger("task").warning("record %d from a worker", i)
    return len(block)

if __name__ == "__main__":
    logging.basicConfig(format="%(name)s %(message)s")
    block = b"z" * (1 << 20)  # lent to the worker: a pipe the lender thread watches
    ex = warden.ProcessPoolExecutor(1)
    running = ex.submit(use, block, 0, 1.0)
    time.sleep(0.3)
    os.closerange(3, 1024)  # with the pool running
    try:
        running.result(timeout=30)
    except (warden.PoolFailed, warden.WorkerCrashed):  # its poller or its worker's channel gone first
        print("old pool failed", flush=True)
    ex.shutdown(cancel_futures=True)
    # The program's own files and sockets take the numbers warden's had.
    files = [open(f"{sys.argv[1]}/{i}", "w+b", buffering=0) for i in range(30)]
    for i, f in enumerate(files):
        f.write(b"line %d" % i)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with warden.ProcessPoolExecutor(1) as ex:
        print("new pool", [ex.submit(use, block, i).result(timeout=30) for i in (1, 2, 3)], flush=True)
    changed = []
    for i, f in enumerate(files):
        f.seek(0)
        if f.read() != b"line %d" % i:
            changed.append(i)
    print("files changed", changed, flush=True)
    got = []
    for s in (mine, peer):
        s.setblocking(False)
        try:
            got.append(s.recv(4096))
        except BlockingIOError:
            pass
    print("socket got", len(got), flush=True)
"""


def test_pools_made_after_the_program_closed_a_running_pools_descriptors_touch_none_of_its_files(
    program, tmp_path
):
    """``os.closerange`` while a pool ran, which fails that pool: the logging
    listener and the thread holding lent buffers outlived it with the closed
    numbers. Every later pool sent its workers' log records to whatever the
    program opened with the logging socket's number (its own socket), and
    the lender thread, dead of the closed pipe, had later loans write a byte
    into the program's file with the wake-up pipe's number. Now both make
    new descriptors, and forget the old numbers without closing them."""
    run = program(NEW_POOLS_AFTER_CLOSERANGE).run(timeout=90, args=(str(tmp_path),))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [
        "old pool failed",
        f"new pool {[1 << 20] * 3}",
        "files changed []",
        "socket got 0",
    ], run.stderr[-3000:]
    for i in (1, 2, 3):
        assert f"task record {i} from a worker" in run.stderr, run.stderr[-3000:]
    assert "Exception in thread" not in run.stderr, run.stderr[-3000:]


FORK_AFTER_CLOSERANGE = """
import os, sys, time
import warden

def use(i):
    time.sleep(0.5)
    return i

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)
    running = ex.submit(use, 1)
    time.sleep(0.2)
    os.closerange(3, 1024)
    # The program's own files take the numbers warden's had.
    fds = [os.open(f"{sys.argv[1]}/{i}", os.O_RDWR | os.O_CREAT) for i in range(30)]
    try:
        running.result(timeout=30)
    except (warden.PoolFailed, warden.WorkerCrashed):
        print("old pool failed", flush=True)
    def closed():
        gone = set()
        for fd in fds:
            try:
                os.fstat(fd)
            except OSError:
                gone.add(fd)
        return gone

    before = closed()  # (the failed pool's teardown is not what this is about)
    pid = os.fork()  # before the failed pool is shut down
    if pid == 0:
        os.write(1, f"closed in the child {sorted(closed() - before)}\\n".encode())
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_a_fork_after_the_program_closed_a_running_pools_descriptors_closes_none_of_its_files(
    program, tmp_path
):
    """A forked child closes its copies of the logging listener's fds: of a
    listener whose fds the program closed, those numbers are the program's
    files by now, which the child closed."""
    run = program(FORK_AFTER_CLOSERANGE).run(timeout=90, args=(str(tmp_path),))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["old pool failed", "closed in the child []"], run.stderr[-3000:]


LENDER_WAKE_PIPE_HALF_CLOSED = """
import os, time
import warden
from warden import _oob

def use(block, pause):
    time.sleep(pause)
    return len(block)

if __name__ == "__main__":
    block = b"z" * (1 << 20)  # lent: a loan the lender's thread holds
    with warden.ProcessPoolExecutor(1) as ex:
        held = ex.submit(use, block, 1.0)
        time.sleep(0.3)
        os.close(_oob._the_lender.wake_w)  # only the write end of its wake-up pipe
        print("held", held.result(timeout=30), flush=True)
        time.sleep(0.5)  # the loan let go: the thread ends, closing its pipe
        print("then", [ex.submit(use, block, 0).result(timeout=30) for _ in range(3)], flush=True)
"""


def test_the_lenders_thread_outlives_the_program_closing_half_of_its_wake_up_pipe(program):
    """With the write end of its wake-up pipe closed, the read end said
    ``POLLHUP`` for good: the thread spun reading nothing, then died closing
    the closed write end (``EBADF``, or a file of the program's on that
    number). It now makes a new pipe."""
    run = program(LENDER_WAKE_PIPE_HALF_CLOSED).run(timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [f"held {1 << 20}", f"then {[1 << 20] * 3}"], run.stderr[-3000:]
    assert "Exception in thread" not in run.stderr, run.stderr[-3000:]
    assert "the thread that holds lent buffers failed" not in run.stderr, run.stderr[-3000:]


PIDFDS_CLOSED_BY_THE_PROGRAM = """
import os, time
from multiprocessing import resource_tracker
import warden

def square(x):
    return x * x

def child():
    time.sleep(1.0)
    print("child done", flush=True)

def close_pidfds():
    # A library closing descriptors it does not own, as a buggy one does.
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                os.close(fd)
        except OSError:
            pass

if __name__ == "__main__":
    p = warden.Process(target=child)
    p.start()
    ex = warden.ProcessPoolExecutor(2)
    print("before", list(ex.map(square, range(4))), flush=True)
    close_pidfds()
    print("after", ex.submit(square, 3).result(timeout=30), flush=True)
    ex.shutdown()
    print("shut down", flush=True)
    p.join(30)
    print("process exit", p.exitcode, flush=True)
    with warden.Pool(2) as pool:
        close_pidfds()
        print("pool", pool.map(square, range(3)), flush=True)
        pool.terminate()
        pool.join()
    print("joined", flush=True)
    # Nothing left behind, not even unreaped (a zygote whose pidfd was
    # closed); the resource tracker aside, which is no pool's.
    # Read by each process's parent, not from the threads' lists: a pool's
    # thread may end, and its list go, while they are read.
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(") ", 1)[1].split()[1]
        except OSError:  # a process that ended meanwhile
            continue
        if parent == str(os.getpid()):
            children.add(int(pid))
    children.discard(resource_tracker._resource_tracker._pid)
    print("children left", sorted(children), flush=True)
"""


def test_workers_whose_pidfds_the_program_closed_are_watched_by_pid_and_every_wait_ends(program):
    """A poll of a closed pidfd says ``POLLNVAL``, which was taken for the
    worker's exit: an idle worker got no more tasks (the next ``result()``
    timed out), and its real exit, which no closed pidfd reports, was never
    seen: ``shutdown()`` never returned, nor ``Process.join()``. Now such a
    worker is watched by its pid."""
    run = program(PIDFDS_CLOSED_BY_THE_PROGRAM).run(timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "child done" in lines, run.stderr[-3000:]
    lines.remove("child done")  # whenever its second is up
    assert lines == [
        "before [0, 1, 4, 9]",
        "after 9",
        "shut down",
        "process exit 0",
        "pool [0, 1, 4]",
        "joined",
        "children left []",
    ], run.stderr[-3000:]


DAEMON_AFTER_A_POOL = """
import os, signal, sys
import warden

def work(i):
    return i * 10

def daemonize(err):
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.closerange(0, 1024)  # every descriptor, as a classic daemon does
    fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(err, "w", buffering=1)

if __name__ == "__main__":
    out, err = sys.argv[1], sys.argv[2]
    with warden.ProcessPoolExecutor(2) as ex:
        list(ex.map(work, range(3)))
    daemonize(err)
    signal.alarm(50)  # no test leaves a daemon behind, whatever happens
    with open(out + ".part", "w") as f, open(out + ".log", "w") as log:
        log.write("the daemon's own log\\n")
        log.flush()
        with warden.ProcessPoolExecutor(2) as ex:
            f.write(f"{list(ex.map(work, range(4)))}\\n")
        with warden.Pool(2) as pool:
            f.write(f"{pool.map(work, range(4))}\\n")
    os.rename(out + ".part", out)
"""


def test_a_daemon_that_closed_every_descriptor_after_using_a_pool_starts_new_pools_cleanly(program, tmp_path):
    """The standard library's resource tracker keeps the number of a pipe the
    daemon closed; the next file opened reuses it. Before, warden passed that
    number to its new workers as the tracker's, so their registrations went
    into warden's own wake pipe (the logging thread ended at once, and its
    pool printed ``OSError: Bad file descriptor`` at shutdown) or into the
    program's files. Now the stale tracker is forgotten and a new one used."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    run = program(DAEMON_AFTER_A_POOL).run(timeout=60, args=(str(out), str(err)))
    assert run.returncode == 0, run.stderr
    assert wait_until(out.exists, timeout=60), err.read_text() if err.exists() else "no stderr file"
    assert out.read_text().splitlines() == ["[0, 10, 20, 30]", "[0, 10, 20, 30]"]
    assert err.read_text() == ""
    assert (tmp_path / "out.txt.log").read_text() == "the daemon's own log\n"


TOO_FEW_DESCRIPTORS_UNLIMITED_RESTARTS = """
import resource, sys, time
import warden

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))
    started = time.monotonic()
    try:
        with warden.ProcessPoolExecutor(2, restart_limit=None) as ex:
            ex.submit(abs, -3).result(60)
    except warden.PoolFailed as e:
        print("PoolFailed", "Too many open files" in str(e), flush=True)
    except OSError as e:
        print("OSError", e.errno, flush=True)
    print("within 10 s", time.monotonic() - started < 10, flush=True)
"""


def test_a_pool_without_restart_limit_that_has_no_descriptor_to_start_a_worker_fails_at_once(program):
    """``restart_limit=None`` under a ``ulimit -n`` too low for any worker:
    starts failed with ``EMFILE`` forever, the task's ``result()`` waited its
    whole timeout and ``shutdown()`` never returned (a limited pool failed
    only once its restart limit ran out)."""
    run = program(TOO_FEW_DESCRIPTORS_UNLIMITED_RESTARTS).run(timeout=90)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] in ("PoolFailed True", "OSError 24"), (lines, run.stderr)
    assert lines[1] == "within 10 s True", (lines, run.stderr)


STDERR_NONE = """
import sys, time
import warden

def bad_callback(result):
    raise ValueError("a callback with a bug")

if __name__ == "__main__":
    sys.stderr = None  # as under `2>&-`, or in a program without a console
    with warden.Pool(1) as pool:
        print("DATA", pool.apply_async(abs, (-1,), callback=bad_callback).get(30), flush=True)
    ex = warden.ProcessPoolExecutor(1, exit_timeout=0.2)
    for _ in range(3):
        ex.submit(time.sleep, 5)
    print("DATA end", flush=True)
"""


def test_with_no_stderr_warden_reports_nothing_into_the_programs_output(program):
    """``print(..., file=sys.stderr)`` and ``traceback.print_exc()`` write to
    stdout when ``sys.stderr`` is ``None``: warden's reports (a callback that
    raised, tasks dropped at exit) landed in the program's data."""
    run = program(STDERR_NONE).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["DATA 1", "DATA end"], run.stdout


LOCK_HELD_WHEN_STOPPED = """
import multiprocessing, sys, time
import warden

def init(value, lock, queue):
    global VALUE, LOCK, QUEUE
    VALUE, LOCK, QUEUE = value, lock, queue

def spin_with_lock():
    while True:
        with LOCK:
            VALUE.value += 1

def spin_with_values_lock():
    while True:
        with VALUE.get_lock():
            VALUE.value += 1

def wait_for_the_lock_with_pass():
    while True:
        with LOCK:  # "until nobody holds it": a body that compiles to nothing
            pass

def wait_for_the_lock_with_ellipsis():
    while True:
        with LOCK:
            ...

def spin_acquiring_then_trying():
    n = 0
    while True:
        LOCK.acquire()
        try:
            n += 1
        finally:
            LOCK.release()

def spin_acquiring_with_a_timeout():
    n = 0
    while True:
        if LOCK.acquire(timeout=1):
            try:
                n += 1
            finally:
                LOCK.release()

def poll_a_queue():
    while True:
        try:
            QUEUE.get(timeout=0.001)
        except Exception:
            pass

TASKS = {
    "lock": spin_with_lock,
    "value": spin_with_values_lock,
    "with-pass": wait_for_the_lock_with_pass,
    "with-ellipsis": wait_for_the_lock_with_ellipsis,
    "acquire-try": spin_acquiring_then_trying,
    "acquire-timeout": spin_acquiring_with_a_timeout,
    "queue-get": poll_a_queue,
}

if __name__ == "__main__":
    how, idiom = sys.argv[1], sys.argv[2]
    ctx = multiprocessing.get_context("spawn")
    value, lock, queue = ctx.Value("q", 0), ctx.Lock(), ctx.Queue()
    held = {"value": value.get_lock(), "queue-get": queue._rlock}.get(idiom, lock)
    task = TASKS[idiom]
    kwargs = {"task_timeout": 0.2} if how == "timeout" else {}
    with warden.ProcessPoolExecutor(1, initializer=init, initargs=(value, lock, queue), **kwargs) as ex:
        for round in range(20):
            f = ex.submit(task)
            if how == "cancel":
                time.sleep(0.2)
                f.cancel(running=True)
            try:
                f.result(30)
            except (TimeoutError, warden.WorkerCrashed, BaseException):
                pass
            if not held.acquire(timeout=5):
                print("held after round", round, flush=True)
                sys.exit(1)
            held.release()
    print("free after every stop", flush=True)
"""


@pytest.mark.parametrize(
    "idiom", ["lock", "value", "with-pass", "with-ellipsis", "acquire-try", "acquire-timeout", "queue-get"]
)
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_task_stopped_while_taking_or_giving_a_process_shared_lock_leaves_it_free(program, how, idiom):
    """A task looping on ``with lock: value.value += 1`` (a ``multiprocessing``
    lock, or a synchronized ``Value``'s own), stopped by ``task_timeout`` or
    ``cancel(running=True)``: the stop used to land, every few rounds, inside
    ``multiprocessing``'s Python wrappers just after the lock was taken (the
    ``with`` not yet in charge) or just before it was given back, leaving it
    held by a process that then exited, and every later user of the lock
    (the parent's ``value.value`` too) waited forever. Now it is raised
    once the hand-over is done. The same for ``lock.acquire()`` followed by
    ``try: ... finally: lock.release()`` (the C call returns with the lock
    taken, the ``try`` not yet entered), as a ``Queue``'s ``get(timeout=)``
    takes its reader lock. And for ``with lock: pass``, whose body is an
    instruction no exception handler covers: raised there, the stop left
    the task without ``__exit__`` or its ``finally``."""
    run = program(LOCK_HELD_WHEN_STOPPED).run(timeout=180, args=(how, idiom))
    assert run.returncode == 0, (run.stdout, run.stderr[-2000:])
    assert run.stdout.splitlines() == ["free after every stop"], run.stderr[-2000:]


BLOCKED_IN_WHAT_IT_HOLDS_MORE_OF = """
import multiprocessing, os, sys, time
import warden

def note(path, what):
    with open(path, "a") as f:
        f.write(what + "\\n")

def produce(queue, path):
    try:
        for i in range(1000):
            queue.put(i)  # blocks once the queue is full
    finally:
        note(path, "producer finally")

def init(sem):
    global SEM
    SEM = sem

def take(path):
    try:
        return SEM.acquire(timeout=60)  # blocks: the parent released it once
    finally:
        note(path, "taker finally")

if __name__ == "__main__":
    path = sys.argv[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue(maxsize=2)
    p = warden.Process(target=produce, args=(queue, path))
    p.start()
    for _ in range(5):
        queue.get(timeout=30)
    time.sleep(0.3)
    p.terminate()
    p.join(30)
    print("process", p.exitcode, flush=True)
    sem = ctx.Semaphore(0)
    with warden.ProcessPoolExecutor(1, initializer=init, initargs=(sem,), task_timeout=0.5) as ex:
        sem.release()
        print("first", ex.submit(take, path).result(30), flush=True)
        try:
            ex.submit(take, path).result(30)
        except warden.TaskTimeout:
            print("timed out", flush=True)
"""


def test_a_task_blocked_taking_what_it_took_before_is_stopped_at_once(program, tmp_path):
    # A producer blocked on a full Queue's semaphore (which it had taken more
    # often than given back), a task blocked on a Semaphore it had taken
    # once: "this process holds it" is true of both, and the stop was held
    # back for a lock hand-over that never came; the task's finally never ran.
    path = tmp_path / "steps"
    run = program(BLOCKED_IN_WHAT_IT_HOLDS_MORE_OF).run(timeout=60, args=(str(path),))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:3] == ["process -15", "first True", "timed out"]
    assert sorted(path.read_text().splitlines()) == ["producer finally", "taker finally", "taker finally"]
    assert "was still running" not in run.stderr


SLOW_FINALLY = """
import os, sys, time
import warden

def note(path, what):
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")

def task(path):
    try:
        while True:
            time.sleep(0.01)
    finally:
        time.sleep(1.5)  # a rollback, a subprocess waited for, a partial upload
        note(path, "finally done")

if __name__ == "__main__":
    path = sys.argv[1]
    with warden.ProcessPoolExecutor(1, task_timeout=0.3, finalizer=note, finalargs=(path, "finalizer")) as ex:
        try:
            ex.submit(task, path).result(30)
        except warden.TaskTimeout:
            print("timed out", flush=True)
        # The replacement is up (its finalizer is to run too) before shutdown.
        print(ex.submit(os.getpid).result(30) > 0, flush=True)
"""


def test_a_stopped_tasks_finally_block_has_half_the_grace_period_before_the_exit_path(program, tmp_path):
    # The exit path used to run beside the unwinding task after 500 ms, and
    # end the process under a finally block of 1.5 s.
    path = tmp_path / "steps"
    run = program(SLOW_FINALLY).run(timeout=60, args=(str(path),))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["timed", "out", "True"]
    steps = [line.split(" ", 1) for line in path.read_text().splitlines()]
    stopped = next(pid for pid, what in steps if what == "finally done")
    assert [what for pid, what in steps if pid == stopped] == ["finally done", "finalizer"]
    assert sorted(what for _, what in steps) == ["finalizer", "finalizer", "finally done"]
    assert "exit path runs beside it" not in run.stderr


STOP_CLEANUP_RAISES = """
import os, sys, time
import warden

def started(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\\n")

def cleanup_raises(path):
    try:
        started(path)  # (in the try: a stop as soon as it is seen still runs its cleanup)
        time.sleep(60)
    finally:
        raise ValueError("cleanup failed during the stop")

def unwinds(path):
    try:
        started(path)  # (in the try: a stop as soon as it is seen still runs its cleanup)
        time.sleep(60)
    finally:
        pass

def unwinds_in_a_group(path):
    try:
        started(path)  # (in the try: a stop as soon as it is seen still runs its cleanup)
        time.sleep(60)
    except BaseException as e:  # as a task group the stop went through
        raise BaseExceptionGroup("the group's tasks failed", [e])

if __name__ == "__main__":
    path = sys.argv[1]
    with warden.ProcessPoolExecutor(1, task_timeout=0.5) as ex:
        for fn in (cleanup_raises, unwinds, unwinds_in_a_group):
            try:
                ex.submit(fn, path).result(timeout=60)
            except warden.TaskTimeout:
                print("timed out", flush=True)
    with warden.Pool(1) as pool:
        for fn in (cleanup_raises, unwinds):
            before = len(open(path).readlines())
            result = pool.apply_async(fn, (path,))
            while len(open(path).readlines()) == before:  # until it runs
                time.sleep(0.01)
            print("cancelled", result.cancel(running=True), flush=True)
            try:
                result.get(60)
            except Exception as e:
                print(type(e).__name__, flush=True)
"""


def test_an_exception_a_tasks_cleanup_raises_as_it_is_stopped_is_said_on_the_workers_stderr(
    program, tmp_path
):
    # The caller rightly gets the stop's error (TaskTimeout, CancelledError),
    # and the worker dropped the exception of the task's finally block
    # without a word: a Process child that is terminated prints it. A task
    # that only unwinds prints nothing.
    path = tmp_path / "started"
    path.touch()
    run = program(STOP_CLEANUP_RAISES).run(timeout=120, args=(str(path),))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["timed out"] * 3 + ["cancelled True", "CancelledError"] * 2
    pids = path.read_text().split()
    reports = re.findall(
        r"^warden: worker (\d+): exception in a task being stopped:\nTraceback \(most recent call last\):\n",
        run.stderr,
        re.MULTILINE,
    )
    assert reports == [pids[0], pids[3]], run.stderr
    assert run.stderr.count("ValueError: cleanup failed during the stop") == 2, run.stderr
    assert run.stderr.count("TaskInterrupted") == 2, run.stderr  # what each was handling
    assert "BaseExceptionGroup" not in run.stderr, run.stderr


def swallow_stops_for(path, seconds):
    """A task that will not stop when asked (it catches ``TaskInterrupted``,
    as native code that holds on would not see it): its exit path runs
    beside it once half the grace period is over."""
    record(path, "started")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except warden.TaskInterrupted:
            pass


def start_a_detached_helper(path):
    """A finalizer that starts a helper meant to outlive the worker (an
    uploader, a cleanup daemon), in a session of its own."""
    helper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    record(path, f"helper {helper.pid}")


def test_a_helper_the_finalizer_starts_beside_a_task_that_would_not_stop_can_be_stopped_with_sigterm(
    tmp_path,
):
    # The exit path ran on the thread that watches for stop signals, which
    # blocks them; a process the finalizer started there inherited the mask
    # (it survives exec): SIGTERM, SIGINT and SIGHUP never reached it, and
    # only SIGKILL could end it.
    log = tmp_path / "log"
    helper = None
    try:
        with warden.ProcessPoolExecutor(
            1, task_timeout=0.5, finalizer=start_a_detached_helper, finalargs=(log,)
        ) as ex:
            with pytest.raises(warden.TaskTimeout):
                ex.submit(swallow_stops_for, log, 30).result(timeout=60)
            assert wait_until(lambda: pids_tagged(log, "helper"), timeout=30)
        helper = pids_tagged(log, "helper")[0]
        os.kill(helper, signal.SIGTERM)
        assert wait_until(lambda: not alive(helper), timeout=10), "the helper ignored SIGTERM"
        helper = None
    finally:
        if helper is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)


SIGCHLD_IGNORED = """
import os, signal, sys
import warden

def crash():
    os._exit(3)

if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # a daemon's way of leaving no zombies
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
        print("tasks", sorted(ex.map(abs, range(-5, 0))), flush=True)
        try:
            ex.submit(crash).result(60)
        except warden.WorkerCrashed as e:
            print("crashed", e.exitcode, flush=True)
        print("after", ex.submit(abs, -6).result(60), flush=True)
    p = warden.Process(target=sys.exit, args=(5,))
    p.start()
    p.join(60)
    print("process", p.is_alive(), p.exitcode, flush=True)
"""


def test_with_sigchld_ignored_pools_and_processes_go_on_and_exit_codes_read_unknown(program):
    """The kernel reaps children itself and keeps no status; the standard
    library's ``join()`` waits forever there."""
    run = program(SIGCHLD_IGNORED).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "tasks [1, 2, 3, 4, 5]",
        "crashed -1",
        "after 6",
        "process False -1",
    ], run.stderr


CWD_DELETED = """
import os, shutil, sys
import warden

def where(_=None):
    return os.getpid(), os.readlink("/proc/self/cwd")

if __name__ == "__main__":
    work = os.path.join(os.getcwd(), "work")
    os.mkdir(work)
    os.chdir(work)
    with warden.ProcessPoolExecutor(1, max_tasks_per_child=1, start=sys.argv[1]) as ex:
        print(*ex.submit(where).result(timeout=30))
        shutil.rmtree(work)
        for _ in range(3):
            print(*ex.submit(where).result(timeout=30))
"""


@pytest.mark.parametrize("start", ["zygote", "exec"])
def test_workers_started_after_the_programs_directory_was_deleted_stand_in_it_as_the_program_does(
    program, start
):
    """The program's working directory is deleted while its pool runs: each
    new worker (here one per task) keeps standing in that same directory, as
    the program does, instead of failing its start on ``chdir`` (which broke
    the pool at the first replacement)."""
    run = program(CWD_DELETED).run(timeout=90, args=(start,))
    assert run.returncode == 0, run.stderr
    rows = [line.split(" ", 1) for line in run.stdout.splitlines()]
    assert len(rows) == 4, run.stdout
    work = rows[0][1]
    assert work.endswith("/work")
    assert [cwd for _, cwd in rows[1:]] == [f"{work} (deleted)"] * 3
    assert len({pid for pid, _ in rows}) == 4, "a new worker for each task"


CWD_DELETED_WITHOUT_PROC = """
import os, shutil
import warden

def where():
    try:
        return os.getpid(), os.getcwd()
    except FileNotFoundError:
        return os.getpid(), "deleted"

if __name__ == "__main__":
    work = os.path.join(os.getcwd(), "work")
    os.mkdir(work)
    os.chdir(work)
    with warden.ProcessPoolExecutor(1, max_tasks_per_child=1) as ex:
        print(*ex.submit(where).result(timeout=30))
        shutil.rmtree(work)
        for _ in range(3):
            print(*ex.submit(where).result(timeout=30))
"""


def test_workers_started_after_the_programs_directory_was_deleted_stand_in_it_where_proc_cannot_be_read(
    program,
):
    """Where ``/proc`` cannot be read, the worker could not tell it stood in
    the deleted directory: its ``chdir`` failed, and the pool with it, at the
    first replacement. ``getcwd`` tells it there."""
    out, err = program(CWD_DELETED_WITHOUT_PROC).run_without_own_proc("hidden")
    rows = [line.split(" ", 1) for line in out.splitlines()]
    assert len(rows) == 4, out + err
    assert rows[0][1].endswith("/work")
    assert [cwd for _, cwd in rows[1:]] == ["deleted"] * 3
    assert len({pid for pid, _ in rows}) == 4, "a new worker for each task"


@pytest.mark.parametrize(
    "make", ["Pool(1)", "Process(target=print).start()", "ProcessPoolExecutor(1).submit(abs, -1)"]
)
def test_a_new_pool_or_child_in_a_deleted_directory_is_refused_with_an_error_that_says_so(program, make):
    # The standard library's spawn raises a bare FileNotFoundError here.
    prog = program(
        f"""
        import os, shutil
        import warden

        if __name__ == "__main__":
            os.makedirs("work")
            os.chdir("work")
            shutil.rmtree(os.getcwd())
            try:
                warden.{make}
            except FileNotFoundError as e:
                print("refused:", e)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "refused: [Errno 2] the program's working directory no longer exists (removed while it runs): "
        "new workers and children start in it, as spawned ones do; os.chdir() to one that exists first"
    ], run.stdout


@pytest.mark.skipif(
    platform.machine() not in SECCOMP_MACHINES, reason="the filter knows x86-64 and aarch64 only"
)
@pytest.mark.parametrize("what", ["executor", "process"])
def test_a_start_that_a_system_call_warden_needs_is_refused_names_that_call(program, what):
    # A kernel older than 5.11, or a sandbox's seccomp filter: the error
    # names close_range, not only "Function not implemented".
    prog = program(
        REFUSE_SYSTEM_CALL
        + f"""
import errno
import warden

if __name__ == "__main__":
    refuse_system_call("close_range", errno.ENOSYS)
    try:
        if {what!r} == "executor":
            with warden.ProcessPoolExecutor(1) as ex:
                ex.submit(abs, -1).result(timeout=60)
        else:
            p = warden.Process(target=abs, args=(1,))
            p.start()
            p.join(60)
    except Exception as e:
        print(type(e).__name__, e)
"""
    )
    run = prog.run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert "close_range(CLOSE_RANGE_CLOEXEC)" in run.stdout, run.stdout
    assert "Function not implemented" in run.stdout, run.stdout
