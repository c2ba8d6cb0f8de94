"""Ctrl-C (SIGINT to the parent, as a terminal sends it): waits raise
KeyboardInterrupt promptly, queued tasks are cancelled, running workers stop
gracefully (finalizers run), workers print no tracebacks, and a second Ctrl-C
kills at once. And stop signals that the workers' own code handles."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import warden

from conftest import alive, descendants, wait_until

# Every test here runs with zygote-forked workers and with exec'd ones.
pytestmark = pytest.mark.usefixtures("start_method")

# The program's workers log to $OUT; the parent prints "ready" once two tasks
# are running, then waits in the way the test names.
PROGRAM = """
import os, sys, time, warden

OUT = os.environ["OUT"]

def log(word):
    with open(OUT, "a") as f:
        f.write(f"{{word}} {{os.getpid()}}\\n")

def fin():
    log("fin-start")
    time.sleep(float(os.environ.get("FIN_SLEEP", "0")))
    log("fin-end")

def task(i):
    log(f"ran-{{i}}")
    time.sleep(60)
    return i

def wait_running(n):
    while open(OUT).read().count("ran-") < n if os.path.exists(OUT) else True:
        time.sleep(0.02)
    print("ready", flush=True)

if __name__ == "__main__":
{body}
"""

BODIES = {
    "future_result": """
    with warden.ProcessPoolExecutor(2, finalizer=fin) as ex:
        fs = [ex.submit(task, i) for i in range(6)]
        wait_running(2)
        fs[0].result()
""",
    "executor_map": """
    with warden.ProcessPoolExecutor(2, finalizer=fin) as ex:
        results = ex.map(task, range(6))
        wait_running(2)
        list(results)
""",
    "pool_map": """
    with warden.Pool(2, finalizer=fin) as pool:
        r = pool.map_async(task, range(6), chunksize=1)
        wait_running(2)
        r.get()
""",
    "executor_with_block": """
    with warden.ProcessPoolExecutor(2, finalizer=fin) as ex:
        fs = [ex.submit(task, i) for i in range(6)]
        wait_running(2)
        time.sleep(60)  # not a wait on the pool: the with block's exit stops it
""",
    "future_result_no_with": """
    ex = warden.ProcessPoolExecutor(2, finalizer=fin)
    fs = [ex.submit(task, i) for i in range(6)]
    for f in fs:
        f.add_done_callback(lambda f: time.sleep(0.1))  # bookkeeping: delivery takes a while
    import threading  # "ready" once the main thread waits (not before: then it is no wait's)
    threading.Thread(target=wait_running, args=(2,), daemon=True).start()
    fs[0].result()
""",
    "pool_map_no_with": """
    import gc, warnings
    warnings.simplefilter("default", ResourceWarning)
    pool = warden.Pool(2, finalizer=fin)
    r = pool.map_async(task, range(6), chunksize=1)
    import threading
    threading.Thread(target=wait_running, args=(2,), daemon=True).start()
    try:
        r.get()
    finally:
        log(f"state-{pool._state}")
        del pool, r
        gc.collect()  # no "unclosed running pool": it is terminated
""",
    "pool_join": """
    pool = warden.Pool(2, finalizer=fin)
    pool.map_async(task, range(6), chunksize=1)
    pool.close()
    wait_running(2)
    pool.join()
""",
}


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def start(program, body, env=None):
    prog = program(PROGRAM.format(body=body))
    proc = prog.start(env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return prog, proc


def finish(proc, timeout=30):
    out, err = proc.communicate(timeout=timeout)
    return out, err


@pytest.mark.parametrize("wait", sorted(BODIES))
def test_ctrl_c_while_waiting_stops_workers_gracefully_and_cancels_queued_tasks(program, wait):
    prog, proc = start(program, BODIES[wait])
    workers = descendants(proc.pid)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    _, err = finish(proc)
    assert time.monotonic() - sent < 5
    assert proc.returncode == -signal.SIGINT  # died of the KeyboardInterrupt, like Python does
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt"), err
    # The Ctrl-C cancelled the queued tasks; the exit dropped none, nor
    # warns of an unclosed running pool.
    assert "dropped at interpreter exit" not in err, err
    assert "unclosed running" not in err, err
    lines = prog.out_lines()
    if wait == "pool_map_no_with":
        assert any(line.startswith("state-TERMINATE ") for line in lines), lines
    assert len([line for line in lines if line.startswith("ran-")]) == 2  # queued ones never ran
    assert len([line for line in lines if line.startswith("fin-end")]) == 2
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), timeout=5)


# A Ctrl-C that reaches the program inside a trio nursery comes out of it in
# an exception group; this program wraps it the same way.
CTRL_C_IN_A_GROUP = """
import sys, time, warden

def slow(i):
    time.sleep(20)

def nursery(ex):
    futures = [ex.submit(slow, i) for i in range(6)]
    try:
        print("ready", flush=True)
        warden.wait(futures)
    except KeyboardInterrupt as e:
        raise BaseExceptionGroup("nursery", [e])

if __name__ == "__main__":
    if sys.argv[1] == "with":
        try:
            with warden.ProcessPoolExecutor(2) as ex:
                nursery(ex)
        except BaseExceptionGroup as group:
            print("left the with block:", [type(e).__name__ for e in group.exceptions], flush=True)
    else:
        nursery(warden.ProcessPoolExecutor(2))
"""


@pytest.mark.parametrize("where", ["with", "open"])
def test_a_ctrl_c_in_an_exception_group_stops_the_executor_as_a_bare_one_does(program, where):
    """A ``with`` block (or the program) that a Ctrl-C left in an exception
    group, as trio raises it, ran all six 20 s tasks first: only a bare
    ``KeyboardInterrupt`` was taken for a Ctrl-C."""
    prog = program(CTRL_C_IN_A_GROUP)
    proc = prog.start(args=(where,))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    try:
        out, err = finish(proc, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the queued tasks ran to their end after the Ctrl-C")
    assert time.monotonic() - sent < 15, err
    if where == "with":
        assert proc.returncode == 0, err
        assert out.strip() == "left the with block: ['KeyboardInterrupt']", out + err
    else:
        assert proc.returncode == 1, err
        assert (
            "KeyboardInterrupt" in err and "dropped at interpreter exit (the program was interrupted)" in err
        ), err


# A real SIGINT sent once concurrent.futures.wait() has taken all but one of
# its futures' locks: its KeyboardInterrupt leaves them held. With SECONDS=1,
# wait() is given the futures of the first two tasks and of the last one (it
# takes their locks in an order of its own: at least one of the first two is
# held), and those two tasks end before the SIGINT: their outcomes are then
# in the results thread's hands, out of the pool's pending ones, as it blocks
# on a held lock.
CTRL_C_AS_WAIT_TAKES_ITS_LOCKS = """
import concurrent.futures._base as base
import os, signal, sys, time, warden

SECONDS = float(os.environ.get("SECONDS", "20"))
DELIVERED = SECONDS < 20

def slow(i):
    time.sleep(SECONDS)

taken = 0

def profile(frame, event, arg):
    global taken
    if event == "c_return" and frame.f_code is base._AcquireFutures.__enter__.__code__:
        taken += 1
        if taken == 2 if DELIVERED else taken == 3:
            sys.setprofile(None)
            if DELIVERED:
                time.sleep(1.5 * SECONDS)
            os.kill(os.getpid(), signal.SIGINT)

def waited(futures):
    return [futures[0], futures[1], futures[5]] if DELIVERED else futures

def called_back(future):
    print("called back", future.cancelled(), flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "with":
        try:
            with warden.ProcessPoolExecutor(2) as ex:
                futures = [ex.submit(slow, i) for i in range(6)]
                sys.setprofile(profile)
                warden.wait(waited(futures))
        except KeyboardInterrupt:
            print("left the with block", flush=True)
        print("cancelled", sum(f.cancelled() for f in futures), flush=True)
    else:
        ex = warden.ProcessPoolExecutor(2)
        futures = [ex.submit(slow, i) for i in range(6)]
        for future in futures:
            future.add_done_callback(called_back)
        sys.setprofile(profile)
        warden.wait(waited(futures))
"""


@pytest.mark.parametrize("delivered", [False, True])
@pytest.mark.parametrize("where", ["with", "open"])
def test_a_ctrl_c_while_wait_takes_its_futures_locks_still_stops_the_pool(program, where, delivered):
    """The Ctrl-C left some futures' locks held by the main thread for good,
    and the results thread blocked on the first of them: the ``with``
    block's shutdown waited for ever (as the standard library's does); at
    exit, no done-callback ran. The thread that takes the Ctrl-C now gives
    such locks back."""
    env = {"SECONDS": "1"} if delivered else None
    run = program(CTRL_C_AS_WAIT_TAKES_ITS_LOCKS).run(timeout=40, args=(where,), env=env)
    # Delivered: the first two tasks ended before the Ctrl-C (their futures
    # finished); the others were stopped or dropped (cancelled).
    cancelled = 4 if delivered else 6
    if where == "with":
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == ["left the with block", f"cancelled {cancelled}"], (
            run.stdout + run.stderr
        )
    else:
        assert run.returncode == -signal.SIGINT, run.stderr
        lines = sorted(run.stdout.splitlines())
        assert lines == ["called back False"] * (6 - cancelled) + ["called back True"] * cancelled, run.stdout


# Ctrl-C arrives just as the pool starts one of its threads (the wrapper
# sends it after the thread started and gives the handler time to run).
CTRL_C_AT_START = """
import os, signal, threading, time, warden

start_thread = threading.Thread.start

def start_then_ctrl_c(self):
    start_thread(self)
    if self.name == os.environ["THREAD"]:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

def children():  # this program's pool processes (not the resource tracker a pool starts)
    return [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid() and _is_warden(p)]

def _is_warden(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"warden" in f.read()
    except OSError:
        return False

def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None

if __name__ == "__main__":
    threading.Thread.start = start_then_ctrl_c
    try:
        if os.environ["KIND"] == "executor":
            with warden.ProcessPoolExecutor(2) as ex:
                ex.submit(abs, -1).result()
        else:
            with warden.Pool(2) as pool:
                pool.apply(abs, (-1,))
        print("not interrupted", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    threading.Thread.start = start_thread
    deadline = time.monotonic() + 20
    while children() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("children", len(children()), flush=True)
    files = [open(os.devnull) for _ in range(4)]
    time.sleep(0.5)
    for f in files:
        os.fstat(f.fileno())  # none closed behind the program's back
    print("files ok", flush=True)
"""


@pytest.mark.parametrize("thread", ["warden-results", "warden-logging"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_ctrl_c_while_a_pool_starts_stops_that_pool_and_closes_nothing_of_the_programs(program, kind, thread):
    prog = program(CTRL_C_AT_START)
    run = prog.run(env={"KIND": kind, "THREAD": thread}, timeout=60)
    assert run.stdout.split("\n")[:3] == ["interrupted", "children 0", "files ok"], run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Exception" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stderr


def test_a_pool_whose_constructor_a_ctrl_c_cuts_short_is_stopped_while_the_traceback_is_kept(program):
    """A Ctrl-C held back while ``Pool()`` made the pool is raised before the
    constructor returns: the caller never gets the pool. The traceback holds
    the constructor's frame and with it the pool, and an interactive session
    keeps the traceback (``sys.last_traceback``): the zygote and workers ran
    on, out of reach, until another error and a garbage collection. The
    pool is now terminated before the ``KeyboardInterrupt`` leaves the
    constructor."""
    prog = program(
        """
        import os, signal, sys, time, warden
        from warden import _runner

        class CtrlCLandsHere(_runner.Runner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGINT)  # just as the pool is made
                time.sleep(0.2)

        def pool_processes():  # this program's zygote and workers
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if parent == os.getpid() and b"warden._worker" in f.read():
                            found.append(pid)
                except (OSError, ValueError, IndexError):
                    pass
            return found

        if __name__ == "__main__":
            _runner.Runner = CtrlCLandsHere
            pool = None
            try:
                pool = warden.Pool(2)
            except KeyboardInterrupt:
                kept = sys.exc_info()  # as a notebook keeps it
                print("interrupted; got the pool:", pool is not None, flush=True)
                deadline = time.monotonic() + 15
                while pool_processes() and time.monotonic() < deadline:
                    time.sleep(0.05)
                print("pool processes left:", len(pool_processes()), flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["interrupted; got the pool: False", "pool processes left: 0"], (
        run.stdout
    )


def test_ctrl_c_while_a_process_starts_leaves_it_started_and_running_its_target(program):
    """A Ctrl-C held back while ``start()`` made the child used to be
    raised before the child was given its target: the child waited for it
    for ever, and so did the program at exit, joining it. Now ``start()``
    raises ``KeyboardInterrupt`` with the child started (its pid known),
    the target runs, and the program ends. Here the SIGINT is sent just as
    the child is being made."""
    prog = program(
        """
        import os, signal, time, warden
        from warden import _runner

        class CtrlCLandsHere(_runner.Runner):
            def __init__(self, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                super().__init__(*args, **kwargs)

        def child():
            print("the target ran", flush=True)

        if __name__ == "__main__":
            _runner.Runner = CtrlCLandsHere
            p = warden.Process(target=child)
            try:
                p.start()
            except KeyboardInterrupt:
                print("start interrupted; pid known:", p.pid is not None, flush=True)
            p.join()
            print("exit code", p.exitcode, flush=True)
        """
    )
    run = prog.run(timeout=30)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert sorted(lines[:2]) == ["start interrupted; pid known: True", "the target ran"], run.stdout
    assert lines[2:] == ["exit code 0"], run.stdout


def test_a_start_failing_after_a_held_ctrl_c_raises_keyboard_interrupt_from_the_failure(program):
    """The Ctrl-C held while a child starts may be what made the start fail
    (it ended the child): the program sees its ``KeyboardInterrupt``, with
    the failure as the cause, not the failure alone."""
    prog = program(
        """
        import os, signal, time, warden
        from warden import _runner

        class FailsAfterACtrlC(_runner.Runner):
            def __init__(self, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                raise OSError("the child could not start")

        if __name__ == "__main__":
            _runner.Runner = FailsAfterACtrlC
            try:
                warden.Process(target=print).start()
            except BaseException as e:
                print(type(e).__name__, "from", repr(e.__cause__), flush=True)
        """
    )
    run = prog.run(timeout=30)
    expected = "KeyboardInterrupt from OSError('the child could not start')"
    assert run.stdout.splitlines() == [expected], run.stderr


SIGNAL_DURING_SUBMIT = """
import random, signal, sys
import warden


class Alarm(Exception):
    pass


def on_alarm(signum, frame):
    raise Alarm


def work(b):
    return len(b)


if __name__ == "__main__":
    data = b"y" * int(sys.argv[1])  # 200 kB: lent to the workers
    seen = {}
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(work, b"").result()
        signal.signal(signal.SIGALRM, on_alarm)
        futures = []
        for _ in range(300):
            try:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.002))
                for _ in range(100):
                    futures.append(ex.submit(work, data))
                signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as e:
                seen[type(e).__name__] = seen.get(type(e).__name__, 0) + 1
            if len(futures) > 200:
                assert all(f.result(timeout=60) == len(data) for f in futures)
                futures.clear()
        signal.setitimer(signal.ITIMER_REAL, 0)
        print("after", ex.submit(work, b"abc").result(timeout=30), flush=True)
    print("raised", sorted(seen), flush=True)
"""


@pytest.mark.parametrize("size", [1, 200_000])
def test_a_signal_handlers_error_anywhere_in_submit_leaves_the_pool_whole(program, size):
    """A Ctrl-C (here: a signal handler that raises, at random points of
    ``submit``, 300 times) may land between any two steps of a submit: the
    caller gets that error, and nothing else breaks. Before, one landing
    just after the pool's lock was taken kept it, and the next submit or
    shutdown waited for ever; one landing as a lent buffer's pipe was handed
    over closed the pipe twice (``OSError: [Errno 9]`` instead of the
    caller's error, and the thread holding lent buffers failed)."""
    prog = program(SIGNAL_DURING_SUBMIT)
    run = prog.run(args=(str(size),), timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["after 3", "raised ['Alarm']"], run.stdout + run.stderr
    assert "Bad file descriptor" not in run.stderr and "lent buffers failed" not in run.stderr, run.stderr


def test_a_second_ctrl_c_kills_at_once(program):
    prog, proc = start(program, BODIES["future_result"], env={"FIN_SLEEP": "30"})
    os.kill(proc.pid, signal.SIGINT)
    assert wait_until(lambda: sum(line.startswith("fin-start") for line in prog.out_lines()) == 2, timeout=10)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    _, err = finish(proc)
    took = time.monotonic() - sent
    assert took < 5, (took, err)
    assert not any(line.startswith("fin-end") for line in prog.out_lines()), (prog.out_lines(), err)
    assert "Traceback" in err, (proc.returncode, err)


def test_a_sigint_the_program_sends_itself_while_joining_a_process_stops_it_gracefully(program):
    """A SIGINT the program sends itself is its own, not passed on to its
    children: the ``join()`` it interrupts stops the child being joined
    gracefully (its ``finally`` runs), where it would run on unjoined."""
    prog = program(
        """
        import os, signal, threading, time, warden
        def child(path):
            with open(path, "a") as f:
                f.write("started\\n")
            try:
                time.sleep(60)
            finally:
                with open(path, "a") as f:
                    f.write("child cleaned up\\n")
        def interrupt_when_joining(main):
            # Sent while the main thread is blocked in join() (waiting on a futex).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with open(f"/proc/self/task/{main}/wchan") as f:
                    if "futex" in f.read():
                        break
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
        if __name__ == "__main__":
            out = os.environ["OUT"]
            p = warden.Process(target=child, args=(out,))
            p.start()
            while not os.path.exists(out):
                time.sleep(0.02)
            threading.Thread(target=interrupt_when_joining, args=(threading.get_native_id(),)).start()
            try:
                p.join()
            except KeyboardInterrupt:
                p.join(10)
                print("exitcode", p.exitcode, flush=True)
        """
    )
    out, err = finish(prog.start())
    assert out.strip() == f"exitcode {-signal.SIGTERM}", err
    assert prog.out_lines() == ["started", "child cleaned up"]
    assert "Traceback" not in err


def test_a_program_ended_by_ctrl_c_stops_its_children_instead_of_joining_them(program):
    prog = program(
        """
        import os, time, warden
        def child(path):
            with open(path, "a") as f:
                f.write("child started\\n")
            try:
                time.sleep(60)
            finally:
                with open(path, "a") as f:
                    f.write("child cleaned up\\n")
        if __name__ == "__main__":
            p = warden.Process(target=child, args=(os.environ["OUT"],))
            p.start()
            time.sleep(60)
        """
    )
    proc = prog.start()
    assert wait_until(lambda: prog.out_lines() == ["child started"], timeout=30)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    _, err = finish(proc)
    assert time.monotonic() - sent < 10
    assert proc.returncode == -signal.SIGINT, err
    assert prog.out_lines() == ["child started", "child cleaned up"]


WAITS_IN_A_THREAD = """
import sys, threading, time
import warden

def waiter(call):
    try:
        call()
        print("waiter returned", flush=True)
    except BaseException as e:
        print("waiter raised", type(e).__name__, flush=True)

if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "pool":
        pool = warden.Pool(1)
        call = lambda: pool.apply(time.sleep, (3600,))
    elif kind == "executor":
        ex = warden.ProcessPoolExecutor(1)
        call = lambda: ex.submit(time.sleep, 3600).result()
    else:
        p = warden.Process(target=time.sleep, args=(3600,))
        p.start()
        call = p.join
    threading.Thread(target=waiter, args=(call,)).start()  # not a daemon
    time.sleep(0.5)
    print("ready", flush=True)
    time.sleep(3600)  # the Ctrl-C lands here
"""


@pytest.mark.parametrize("kind", ["pool", "executor", "process"])
def test_a_program_ended_by_ctrl_c_while_a_thread_waits_on_a_pool_or_child_exits(program, kind):
    """The interpreter joins the program's non-daemon threads before its
    ``atexit`` handlers run: a ``Pool`` (or a ``Process``) stopped only there
    kept the thread waiting on it, and the program with it, until the task
    ended (an hour here). Ctrl-C stops every pool and child before those
    threads are joined."""
    proc = program(WAITS_IN_A_THREAD).start(args=(kind,))  # (stopped by the fixture, whatever happens)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert time.monotonic() - sent < 20, err
    assert proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    assert out.splitlines() == ["waiter returned" if kind == "process" else "waiter raised CancelledError"], (
        err
    )


# -- a terminal's Ctrl-C and Process children -------------------------------

# The same program on warden and on the standard library (spawn): children
# that handle Ctrl-C (KeyboardInterrupt) by cleaning up for a moment.
CHILDREN_HANDLING_CTRL_C = """
import os, signal, sys, time
if sys.argv[1] == "warden":
    import warden as mp
    from warden import ProcessPoolExecutor
else:
    import functools, multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    mp = multiprocessing.get_context("spawn")
    ProcessPoolExecutor = functools.partial(ProcessPoolExecutor, mp_context=mp)

def log(text):
    with open(os.environ["OUT"], "a") as f:
        f.write(text + "\\n")

def wait_started(n):
    while sum(line.startswith("started") for line in open(os.environ["OUT"])) < n:
        time.sleep(0.02)
    print("ready", flush=True)

def child(i):
    log(f"started {{i}}")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(0.5)
        log(f"cleaned up {{i}}")

if __name__ == "__main__":
    open(os.environ["OUT"], "a").close()
    children = [mp.Process(target=child, args=(i,)) for i in range(2)]
    for p in children:
        p.start()
{body}
"""

CATCH_AND_JOIN = """
    wait_started(2)
    try:
        for p in children:
            p.join()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        for p in children:
            p.join()
    print("exit codes", [p.exitcode for p in children], flush=True)
"""


def start_under_a_terminal(prog, *args):
    """Runs ``prog`` as the leader of a new session whose controlling
    terminal is a fresh pseudo-terminal (``setsid --ctty``); returns the
    process and the terminal's master side, where writing ``\\x03`` is
    typing Ctrl-C: the terminal sends SIGINT to its foreground process
    group, the program's."""
    master, slave = os.openpty()
    try:
        proc = prog.start(stdin=slave, command=["setsid", "--ctty", sys.executable, str(prog.path), *args])
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return proc, master


def type_ctrl_c_when_ready(proc, master):
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # the parent is in its wait
        os.write(master, b"\x03")
        return finish(proc)
    finally:
        os.close(master)


needs_setsid = pytest.mark.skipif(
    shutil.which("setsid") is None, reason="needs setsid(1) (util-linux) for a terminal"
)


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_terminals_ctrl_c_reaches_process_children_which_handle_it_while_the_parent_joins_them(
    program, impl
):
    """Under the standard library, Ctrl-C in a terminal reaches the children
    too (they are in its foreground process group). A warden child leads a
    group of its own, and so waited for ever: the parent, interrupted, joined
    children that never saw the Ctrl-C. Now the parent passes it on."""
    prog = program(CHILDREN_HANDLING_CTRL_C.format(body=CATCH_AND_JOIN))
    proc, master = start_under_a_terminal(prog, impl)
    out, err = type_ctrl_c_when_ready(proc, master)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["interrupted", "exit codes [0, 0]"], err
    assert sorted(prog.out_lines()) == ["cleaned up 0", "cleaned up 1", "started 0", "started 1"]
    assert "Traceback" not in err


@needs_setsid
@pytest.mark.parametrize(
    "impl, to", [("warden", "group"), ("stdlib", "group"), ("warden", "parent")], ids=lambda x: x
)
def test_a_sigint_another_program_sends_reaches_process_children_which_handle_it_while_the_parent_joins_them(
    program, impl, to
):
    """``timeout -s INT``, a shell's ``kill -INT %1`` or a supervisor send
    SIGINT to the program's process group: the standard library's children,
    in that group, get it too. A warden child leads a group of its own, and
    so got nothing: the parent, interrupted, joined children that were never
    told, for ever. The parent passes such a SIGINT on, as it passes on a
    terminal's; also one sent to it alone, which it cannot tell apart (the
    standard library's children would not get that one: its program waits
    for them at exit)."""
    prog = program(CHILDREN_HANDLING_CTRL_C.format(body=CATCH_AND_JOIN))
    # A session (and process group) of its own, so that only it is signalled.
    proc = prog.start(command=["setsid", sys.executable, str(prog.path), impl])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)  # the parent is in its join
    if to == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["interrupted", "exit codes [0, 0]"], err
    assert sorted(prog.out_lines()) == ["cleaned up 0", "cleaned up 1", "started 0", "started 1"]
    assert "Traceback" not in err


# Children that handle a SIGINT (KeyboardInterrupt), on warden or the
# standard library (spawn): "slowly" cleans up for a second, which a second
# KeyboardInterrupt would cut short; "again" sends itself a SIGINT 0.1 s
# later (a timeout of its own) and notes whether it came.
CHILDREN_HANDLING_A_SIGINT = """
import os, signal, sys, threading, time
if sys.argv[1] == "warden":
    import warden as mp
else:
    import multiprocessing
    mp = multiprocessing.get_context("spawn")

def log(text):
    with open(os.environ["OUT"], "a") as f:
        f.write(text + "\\n")

def child(i, how):
    log(f"started {i}")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        if how == "slowly":
            time.sleep(1)
            log(f"cleaned up {i}")
            return
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            time.sleep(10)
            log(f"not interrupted again {i}")
        except KeyboardInterrupt:
            log(f"interrupted again {i}")

if __name__ == "__main__":
    open(os.environ["OUT"], "a").close()
    children = [mp.Process(target=child, args=(i, sys.argv[2])) for i in range(2)]
    for p in children:
        p.start()
    while sum(line.startswith("started") for line in open(os.environ["OUT"])) < 2:
        time.sleep(0.02)
    print("ready", *(p.pid for p in children), flush=True)
    try:
        for p in children:
            p.join()
    except KeyboardInterrupt:
        for p in children:
            p.join(30)
    print("exit codes", [p.exitcode for p in children], flush=True)
"""


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
@pytest.mark.parametrize("first", ["children", "parent"])
def test_a_sigint_sent_to_every_process_reaches_each_child_once(program, impl, first):
    """``pkill -INT python`` or systemd (``KillMode=control-group``) signal
    every process of a program. A warden child got that SIGINT from the
    sender and again from its parent, which passes on what reaches it: the
    second ``KeyboardInterrupt`` cut the first one's cleanup short."""
    prog = program(CHILDREN_HANDLING_A_SIGINT)
    proc = prog.start(command=["setsid", sys.executable, str(prog.path), impl, "slowly"])
    assert proc.stdout is not None
    ready = proc.stdout.readline().split()
    assert ready[:1] == ["ready"], ready
    children = [int(pid) for pid in ready[1:]]
    time.sleep(0.2)  # the parent is in its join
    order = [children, [proc.pid]] if first == "children" else [[proc.pid], children]
    for pids in order:
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.02)  # as a sender going through many processes
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["exit codes [0, 0]"], err
    assert sorted(prog.out_lines()) == ["cleaned up 0", "cleaned up 1", "started 0", "started 1"], err


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_sigint_a_child_sends_itself_just_after_one_passed_on_is_its_own(program, impl):
    """A child drops the second arrival of one interrupt (from its sender
    and from its parent): a SIGINT it sends itself soon after one its
    parent passed on is never that, and was dropped, so a child timing out
    its own wait with one waited for ever."""
    prog = program(CHILDREN_HANDLING_A_SIGINT)
    proc = prog.start(command=["setsid", sys.executable, str(prog.path), impl, "again"])
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[:1] == ["ready"]
    time.sleep(0.2)  # the parent is in its join
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["exit codes [0, 0]"], err
    assert sorted(prog.out_lines()) == [
        "interrupted again 0",
        "interrupted again 1",
        "started 0",
        "started 1",
    ], err


POOL_WORKER_TELLS_ITS_PARENT = """
import os, signal, sys, time
if sys.argv[1] == "warden":
    import warden as mp
else:
    import multiprocessing
    mp = multiprocessing.get_context("spawn")

def log(text):
    with open(os.environ["OUT"], "a") as f:
        f.write(text + "\\n")

def child():
    log("started")
    time.sleep(1.5)
    log("done")

def tell_the_parent():
    os.kill(os.getppid(), signal.SIGINT)

if __name__ == "__main__":
    open(os.environ["OUT"], "a").close()
    p = mp.Process(target=child)
    p.start()
    while "started" not in open(os.environ["OUT"]).read():
        time.sleep(0.02)
    with mp.Pool(1) as pool:
        try:
            pool.apply(tell_the_parent)
            time.sleep(30)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    p.join(30)
    print("exit code", p.exitcode, flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_sigint_a_pool_worker_sends_its_parent_does_not_reach_the_parents_other_children(program, impl):
    """A SIGINT from a process the program started (a pool worker aborting
    the run, a child's own child) is the program's own business: passed on,
    it interrupted the program's other children, which under the standard
    library never see it."""
    prog = program(POOL_WORKER_TELLS_ITS_PARENT)
    proc = prog.start(args=(impl,))
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["interrupted", "exit code 0"], err
    assert prog.out_lines() == ["started", "done"], err


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
@pytest.mark.parametrize(
    "pool",
    ["", "with ProcessPoolExecutor(1) as ex: ex.submit(abs, -1).result()"],
    ids=["no-pool", "a-pool-made-after-them"],
)
def test_a_program_ended_by_a_terminals_ctrl_c_lets_its_children_finish_handling_it(program, impl, pool):
    """The Ctrl-C ends the parent (uncaught); at exit, a child that saw it
    too is joined while it cleans up, as the standard library joins its
    children, not stopped in the middle of its ``except`` block. Also when
    a pool made after the children started set a SIGINT handler of its own
    for a moment (warden's holds a Ctrl-C back while a pool starts)."""
    body = f"""
    {pool}
    wait_started(2)
    time.sleep(60)
"""
    prog = program(CHILDREN_HANDLING_CTRL_C.format(body=body))
    proc, master = start_under_a_terminal(prog, impl)
    _, err = type_ctrl_c_when_ready(proc, master)
    assert proc.returncode == -signal.SIGINT, err
    assert sorted(prog.out_lines()) == ["cleaned up 0", "cleaned up 1", "started 0", "started 1"]


# A main module that writes to its terminal as it is loaded: in the parent,
# and in each worker, zygote or child that loads it; and whose interpreters
# write to it as they start (``-X importtime``, on the terminal as stderr).
# With ``stty tostop``, a process outside the terminal's foreground group
# that writes to it gets SIGTTOU, which stops it.
WRITES_TO_ITS_TERMINAL_AS_IT_LOADS = """
import os, sys, termios
import warden

with open("/dev/tty", "w") as tty:
    tty.write(f"loading in {os.getpid()}\\n")

def negate(x):
    return -x

def record(path):
    with open(path, "w") as f:
        f.write("ran")

if __name__ == "__main__":
    attrs = termios.tcgetattr(0)
    attrs[3] |= termios.TOSTOP  # stty tostop
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    os.dup2(0, 2)  # the terminal as stderr, for the new interpreters' -X importtime
    how = sys.argv[1]
    if how == "process":
        p = warden.Process(target=record, args=(os.environ["OUT"],))
        p.start()
        p.join(30)
        print("exit code", p.exitcode, flush=True)
        p.kill()
    else:
        ex = warden.ProcessPoolExecutor(1, start=how)
        try:
            print("result", ex.submit(negate, 3).result(timeout=30), flush=True)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
"""


@needs_setsid
@pytest.mark.parametrize("how", ["zygote", "exec", "process"])
def test_a_main_module_that_writes_to_the_terminal_under_tostop_does_not_stop_the_processes_that_load_it(
    program, how
):
    """Under ``stty tostop``, a worker (or the zygote, or a ``Process``
    child) that wrote to the terminal before its loop began was stopped by
    SIGTTOU for good: its group is not the terminal's foreground one, and it
    ignored the terminal's stop signals only once its loop had started. The
    pool waited its start timeout (60 s), and the child never ran its
    target. They are ignored from before the ``exec`` now."""
    prog = program(WRITES_TO_ITS_TERMINAL_AS_IT_LOADS)
    master, slave = os.openpty()
    try:
        command = ["setsid", "--ctty", sys.executable, "-X", "importtime", str(prog.path), how]
        proc = prog.start(stdin=slave, command=command)
    finally:
        os.close(slave)

    def read_the_terminal():
        # What the interpreters write to it, read as a terminal shows it.
        with contextlib.suppress(OSError):  # EIO once nothing has it open
            while os.read(master, 65536):
                pass

    reader = threading.Thread(target=read_the_terminal, daemon=True)
    reader.start()
    try:
        out, err = finish(proc, timeout=90)
    finally:
        proc.kill()
        reader.join(10)
        os.close(master)
    assert proc.returncode == 0, err
    if how == "process":
        assert out.splitlines() == ["exit code 0"], err
        assert prog.out_lines() == ["ran"]
    else:
        assert out.splitlines() == ["result -3"], err


# A SIGINT handler of the program's own, set after its children started,
# then a wait: join() them, or poll the handler's flag with time.sleep.
HANDLER_SET_AFTER_THE_CHILDREN = {
    "join": """
    signal.signal(signal.SIGINT, lambda signum, frame: print("parent's handler ran", flush=True))
    wait_started(2)
    for p in children:
        p.join()
    print("exit codes", [p.exitcode for p in children], flush=True)
""",
    "sleep": """
    stop = []
    signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    wait_started(2)
    while not stop:
        time.sleep(0.05)
    print("parent's handler ran", flush=True)
    for p in children:
        p.join()
    print("exit codes", [p.exitcode for p in children], flush=True)
""",
}


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
@pytest.mark.parametrize("wait", sorted(HANDLER_SET_AFTER_THE_CHILDREN))
def test_a_terminals_ctrl_c_reaches_children_past_a_sigint_handler_set_after_they_started(
    program, impl, wait
):
    """``signal.signal`` replaces the handler that passes Ctrl-C on. A
    ``join()`` puts it back in front of the program's handler; a program
    that polls a flag with ``time.sleep`` instead waited on children that
    never got the Ctrl-C, until a keeper thread chained the handler again
    within 50 ms of ``signal.signal``."""
    prog = program(CHILDREN_HANDLING_CTRL_C.format(body=HANDLER_SET_AFTER_THE_CHILDREN[wait]))
    proc, master = start_under_a_terminal(prog, impl)
    out, err = type_ctrl_c_when_ready(proc, master)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["parent's handler ran", "exit codes [0, 0]"], err
    assert sorted(prog.out_lines()) == ["cleaned up 0", "cleaned up 1", "started 0", "started 1"]


def test_the_thread_keeping_ctrl_c_passed_on_runs_while_children_do_and_ends_after_them(program):
    prog = program(
        """
        import os, time, warden

        def keepers():
            names = []
            for tid in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{tid}/comm") as f:
                        names.append(f.read().strip())
                except FileNotFoundError:  # a thread that ended meanwhile
                    pass
            return names.count("warden-ctrl-c")

        def within_5_s(condition):
            deadline = time.monotonic() + 5
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.02)
            return condition()

        if __name__ == "__main__":
            p = warden.Process(target=time.sleep, args=(1,))
            p.start()
            print("while the child runs:", within_5_s(lambda: keepers() == 1), flush=True)
            p.join()
            print("after it:", within_5_s(lambda: keepers() == 0), flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["while the child runs: True", "after it: True"], run.stderr


@needs_setsid
def test_a_terminals_ctrl_c_while_a_process_starts_reaches_it_and_the_children_started_before(program):
    """A Ctrl-C that comes while ``start()`` makes the child is held back
    until the child is started, then raised. It reached no child before
    (the hold's SIGINT handler replaced the one passing it on), nor the new
    child, started after it came: the parent caught it, joined its
    children, and waited for ever. Now every child started or being
    started gets it. The Ctrl-C is typed while the third start is about to
    make its child (the program pauses there for it)."""
    prog = program(
        """
        import os, time, warden
        from warden import _runner

        def log(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(text + "\\n")

        def child(i):
            log(f"started {i}")
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                log(f"cleaned up {i}")

        children = []

        class CtrlCLandsHere(_runner.Runner):
            def __init__(self, *args, **kwargs):
                if len(children) == 2:
                    while sum(1 for _ in open(os.environ["OUT"])) < 2:
                        time.sleep(0.02)
                    print("ready", flush=True)
                    time.sleep(1)  # the Ctrl-C comes now
                super().__init__(*args, **kwargs)

        _runner.Runner = CtrlCLandsHere

        if __name__ == "__main__":
            open(os.environ["OUT"], "a").close()
            try:
                for i in range(3):
                    p = warden.Process(target=child, args=(i,))
                    p.start()
                    children.append(p)
            except KeyboardInterrupt:
                print("interrupted after", len(children), flush=True)
            for p in children:
                p.join()
            print("exit codes", [p.exitcode for p in children], flush=True)
            # At exit the third child, started as the Ctrl-C came, is joined.
        """
    )
    proc, master = start_under_a_terminal(prog)
    out, err = type_ctrl_c_when_ready(proc, master)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["interrupted after 2", "exit codes [0, 0]"], err
    assert {"cleaned up 0", "cleaned up 1"} <= set(prog.out_lines())


@needs_setsid
@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_terminals_ctrl_c_reaches_a_grandchild_which_handles_it_while_its_parent_joins_it(program, impl):
    """A child that started a child of its own: under the standard library
    all three are in the terminal's group and get the Ctrl-C. The warden
    child got it from its parent (a SIGINT sent with ``kill``, not the
    terminal's) and passed nothing on: its interrupted ``join()`` stopped
    the grandchild with SIGTERM in the middle of its cleanup. A warden
    child now passes on a SIGINT its warden parent sent."""
    prog = program(
        """
        import os, sys, time
        if sys.argv[1] == "warden":
            import warden as mp
        else:
            import multiprocessing
            mp = multiprocessing.get_context("spawn")

        def log(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(text + "\\n")

        def grandchild():
            log("grandchild started")
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                time.sleep(0.5)
                log("grandchild cleaned up")

        def child():
            g = mp.Process(target=grandchild)
            g.start()
            try:
                g.join()
            except KeyboardInterrupt:
                g.join()
                log(f"grandchild's exit code {g.exitcode}")

        if __name__ == "__main__":
            open(os.environ["OUT"], "a").close()
            p = mp.Process(target=child)
            p.start()
            while "grandchild started" not in open(os.environ["OUT"]).read():
                time.sleep(0.02)
            print("ready", flush=True)
            try:
                p.join()
            except KeyboardInterrupt:
                p.join()
            print("exit code", p.exitcode, flush=True)
        """
    )
    proc, master = start_under_a_terminal(prog, impl)
    out, err = type_ctrl_c_when_ready(proc, master)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["exit code 0"], err
    assert prog.out_lines() == ["grandchild started", "grandchild cleaned up", "grandchild's exit code 0"]


@needs_setsid
def test_a_program_ended_by_a_sigint_it_sends_itself_stops_children_that_an_earlier_ctrl_c_reached(program):
    """A child that got a terminal's Ctrl-C earlier, handled it and went
    on, is not one that saw the SIGINT ending the program (one the program
    sent itself, not passed on): at exit it is stopped, not joined for
    ever."""
    prog = program(
        """
        import os, signal, time, warden
        def log(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(text + "\\n")
        def child():
            log("started")
            while True:
                try:
                    time.sleep(60)
                except KeyboardInterrupt:
                    log("handled a Ctrl-C")
                finally:
                    log("finally")
        if __name__ == "__main__":
            p = warden.Process(target=child)
            p.start()
            while not os.path.exists(os.environ["OUT"]):
                time.sleep(0.02)
            print("ready", flush=True)
            try:
                p.join()
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            # Its first `finally` done too: a stop landing in it would cut it
            # short (see docs/python.md, Caveats).
            while open(os.environ["OUT"]).read().split() != ["started", "handled", "a", "Ctrl-C", "finally"]:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        """
    )
    proc, master = start_under_a_terminal(prog)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        os.write(master, b"\x03")
        _, err = finish(proc)
    finally:
        os.close(master)
    assert proc.returncode == -signal.SIGINT, err
    assert prog.out_lines() == ["started", "handled a Ctrl-C", "finally", "finally"]


# -- a pool whose workers handle SIGTERM themselves ---------------------------


def note(path, text):
    with open(path, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


def exit_on_sigterm(path):
    """An initializer that gives the worker its own SIGTERM handler."""
    import atexit

    def on_sigterm(signum, frame):
        note(path, "handler")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(note, path, "atexit")
    note(path, "ready")


def busy(path):
    note(path, "task")
    time.sleep(30)


def count(path, word):
    return sum(line.startswith(word + " ") for line in read(path).splitlines())


def test_terminating_a_pool_whose_workers_handle_sigterm_runs_their_exit_path_at_once(tmp_path):
    # (The standard library's Pool.terminate() can hang here: an idle worker
    # that exits from its handler while it holds the task queue's lock.)
    out = str(tmp_path / "out")
    pool = warden.Pool(2, initializer=exit_on_sigterm, initargs=(out,))
    try:
        assert wait_until(lambda: count(out, "ready") == 2, timeout=30)
        pool.apply_async(busy, (out,))  # one worker busy, the other idle
        assert wait_until(lambda: count(out, "task") == 1, timeout=30)
        pids = [w.pid for w in pool._warden_runner.core.workers()]
        pool.terminate()
        pool.join()
    finally:
        pool.terminate()
    # One SIGTERM each: the handler ran once, then the exit path, in the busy
    # worker and in the idle one; none was left for the SIGKILL that follows
    # the grace period, which would have skipped its atexit handlers.
    assert count(out, "handler") == 2
    assert count(out, "atexit") == 2
    assert not any(alive(pid) for pid in pids)


READS_THE_TERMINAL = """
import os, signal, sys
import warden

def ask(restore):
    if restore:
        # A library's own handler for a while, then the one it found, back.
        found = signal.signal(signal.SIGTTIN, lambda *a: None)
        signal.signal(signal.SIGTTIN, found)
        print("found", "SIG_IGN" if found == signal.SIG_IGN else found, flush=True)
    fd = os.open("/dev/tty", os.O_RDWR)
    try:
        os.write(fd, b"password: ")
        return os.read(fd, 100)
    finally:
        os.close(fd)

if __name__ == "__main__":
    ex = warden.ProcessPoolExecutor(1)
    try:
        print("read", ex.submit(ask, "--restore" in sys.argv).result(timeout=30), flush=True)
    except TimeoutError:  # an OSError too: first
        print("still waiting", flush=True)
        os._exit(1)  # the worker is stopped: a shutdown would wait for it
    except OSError as e:
        print("failed", type(e).__name__, e.errno, flush=True)
    ex.shutdown()
"""


def lines_under_a_terminal(prog, *args):
    """Runs ``prog`` in a pseudo-terminal of its own session (``script``),
    where a worker is in a background process group; its output's lines."""
    command = shlex.join([sys.executable, str(prog.path), *args])
    proc = prog.start(stdin=subprocess.DEVNULL, command=["script", "-qec", command, "/dev/null"])
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the program did not end within 90 s")
    assert proc.returncode == 0, out + err
    return [line.strip() for line in out.splitlines()]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) (util-linux) for a terminal")
def test_a_task_reading_the_terminal_fails_with_eio_instead_of_being_stopped_for_ever(program):
    """A task reading ``/dev/tty`` was stopped by SIGTTIN, and its
    ``result()`` waited for ever. Now the read fails, and the task with it."""
    lines = lines_under_a_terminal(program(READS_THE_TERMINAL))
    assert lines[-1] == f"password: failed OSError {errno.EIO}", lines


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) (util-linux) for a terminal")
def test_a_task_that_sets_back_the_terminal_signal_handler_it_found_keeps_it_ignored(program):
    """Python told a task SIGTTIN's handler was SIG_DFL where the core had
    it ignored: setting back what it found un-ignored it, and the next read
    of the terminal stopped the worker for ever."""
    lines = lines_under_a_terminal(program(READS_THE_TERMINAL), "--restore")
    assert lines[-2:] == ["found SIG_IGN", f"password: failed OSError {errno.EIO}"], lines


STOPPED_IN_A_PROXY_CALL = """
import multiprocessing, time
import warden

def init(shared):
    global D
    D = shared

def task(lock):
    started = time.monotonic()
    while True:
        with lock:  # a manager's lock: its release reads a reply too
            D.get("big")  # most of the time goes in reading this reply
        D["alive"] = time.monotonic() - started

def finalizer():
    D["finalizer saw"] = D.get("small")

if __name__ == "__main__":
    manager = multiprocessing.get_context("spawn").Manager()
    shared = manager.dict(big="x" * 1_000_000, small="ok")
    for _ in range(8):
        for key in ("alive", "finalizer saw"):
            shared.pop(key, None)
        with warden.ProcessPoolExecutor(
            1, initializer=init, initargs=(shared,), finalizer=finalizer, task_timeout=0.4
        ) as ex:
            lock = manager.Lock()
            try:
                ex.submit(task, lock).result(30)
            except warden.TaskTimeout:
                pass
        print(round(shared.get("alive", 0), 1) <= 0.5, shared.get("finalizer saw"), flush=True)
    manager.shutdown()
"""


def test_a_task_stopped_in_a_manager_proxys_call_stops_and_its_finalizer_reads_its_own_replies(program):
    """A stop raised between a proxy call's request and its reply left the
    reply on the connection all of that manager's proxies share in the
    thread: the lock's release read it as its own (true: the stop was
    swallowed, the task ran on until killed, 'still running 2500 ms later'
    on stderr) and the finalizer's ``get`` read another's value."""
    run = program(STOPPED_IN_A_PROXY_CALL).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["True ok"] * 8, run.stdout + run.stderr
    assert "still running" not in run.stderr, run.stderr


STOPPED_MID_MESSAGE = """
import multiprocessing, queue, sys, threading, time
import warden

SIZE = 1_000_000


def init(q, conn):
    global Q, C
    Q, C = q, conn


def reads():
    while True:
        Q.get()


def writes():
    while True:
        C.send_bytes(b"z" * SIZE)


def check_reads(q):
    # The parent reads on: whole items, the reader's timeout kept.
    try:
        return "ok" if [len(q.get(timeout=5)) for _ in range(3)] == [SIZE] * 3 else "wrong"
    except queue.Empty:
        return "empty"
    except Exception as e:
        return f"error {type(e).__name__}"


def check_writes(conn, stopped):
    # The parent reads on, slowly enough that the task's writes wait for it.
    try:
        while not stopped.is_set() or conn.poll(0.5):
            if conn.poll(0.1) and len(conn.recv_bytes()) != SIZE:
                return "wrong"
            time.sleep(0.005)
        return "ok"
    except Exception as e:
        return f"error {type(e).__name__}"


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    kind = sys.argv[1]
    for _ in range(3):
        q = ctx.Queue(maxsize=4)
        q.cancel_join_thread()  # what is left in it is not waited for at exit
        r, w = ctx.Pipe(duplex=False)
        outcome = {}
        stopped = threading.Event()
        with warden.ProcessPoolExecutor(1, initializer=init, initargs=(q, w), task_timeout=0.7) as ex:
            if kind == "reader":
                future = ex.submit(reads)
                end = time.monotonic() + 1.5
                while time.monotonic() < end:  # 1 MB items while the task reads them
                    try:
                        q.put(b"z" * SIZE, timeout=0.1)
                    except queue.Full:
                        pass
                assert isinstance(future.exception(timeout=30), warden.TaskTimeout)
                for _ in range(3):
                    try:
                        q.put(b"z" * SIZE, timeout=0.3)
                    except queue.Full:
                        pass
                check = threading.Thread(target=lambda: outcome.setdefault("r", check_reads(q)), daemon=True)
                check.start()
            else:
                check = threading.Thread(
                    target=lambda: outcome.setdefault("r", check_writes(r, stopped)), daemon=True
                )
                check.start()
                future = ex.submit(writes)
                assert isinstance(future.exception(timeout=30), warden.TaskTimeout)
                stopped.set()
            check.join(20)
        print(outcome.get("r", "hung"), flush=True)
"""


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_a_task_stopped_while_a_message_moves_through_a_queue_or_pipe_leaves_it_readable(program, side):
    """A ``Queue`` and a ``Pipe`` move each message as its length, then its
    bytes. A task stopped between the two (reading 1 MB items from a
    ``Queue``; writing them to a ``Pipe``) left the rest of a message in the
    pipe, or the start of one that never ended: the parent's next read took
    those bytes for a length and waited for good, its ``get(timeout=5)``
    too (hung in 4 of 5 rounds on each side; here, 3 rounds). The stop now waits for the
    message to be through."""
    run = program(STOPPED_MID_MESSAGE).run(args=(side,), timeout=100)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["ok"] * 3, run.stdout + run.stderr[-3000:]


STOPPED_READING_SMALL_ITEMS = """
import multiprocessing, random, sys, threading, time
import warden

def init(source):
    global SOURCE
    SOURCE = source

def reads(source=None):
    source = source or SOURCE
    while True:
        item = source.recv() if hasattr(source, "recv") else source.get()
        assert item[0] == "item", item

if __name__ == "__main__":
    kind = sys.argv[1]
    ctx = multiprocessing.get_context("spawn")
    if kind == "pipe":
        source, writer = ctx.Pipe(duplex=False)
        put = writer.send
    else:
        source = ctx.SimpleQueue() if kind in ("simple", "process") else ctx.Queue()
        put = source.put
    # Small items, as fast as they go: the reader is mostly taking one.
    threading.Thread(target=lambda: [put(("item", i)) for i in iter(int, 1)], daemon=True).start()
    if kind in ("process", "pipe"):
        # (A pipe has no lock for its readers: a pool's replacement worker
        # would read beside the stopped one finishing its message. A
        # Process is joined before the next starts.)
        for round in range(20):
            child = warden.Process(target=reads, args=(source,))
            child.start()
            time.sleep(random.uniform(0.05, 0.15))
            child.terminate()
            child.join(30)
            if child.exitcode != -15:
                print(f"round {round}: the stream is cut: exit code {child.exitcode}", flush=True)
                break
        else:
            print("intact", flush=True)
    else:
        with warden.ProcessPoolExecutor(1, initializer=init, initargs=(source,), task_timeout=0.1) as ex:
            for round in range(40):
                try:
                    ex.submit(reads).result(timeout=30)
                except warden.TaskTimeout:
                    continue
                except Exception as e:
                    print(f"round {round}: the stream is cut: {e!r}", flush=True)
                    break
            else:
                print("intact", flush=True)
    sys.stdout.flush()
    import os
    os._exit(0)  # (the feeding thread never ends)
"""


@pytest.mark.parametrize("kind", ["simple", "queue", "pipe", "process"])
def test_readers_of_small_items_stopped_over_and_over_never_cut_a_message_in_two(program, kind):
    """A reader of small items, stopped by its task's timeout (or a
    ``Process`` by ``terminate()``) again and again while items keep
    coming (a pipe, which has no lock for its readers, is read by one
    ``Process`` after another). A stop that landed as the read of an
    item's length returned,
    its four bytes not yet bound to anything the frames show, was raised
    there: the length was gone, the next reader took the item's bytes for
    one, and the stream was cut for good (``EOFError``, an unpickling error
    or a read that never returns) within 17 rounds in 14 of 14 runs. Reads
    in a worker now wait for their bytes first: a stop in the wait has
    taken nothing; one in the read waits for the whole message."""
    run = program(STOPPED_READING_SMALL_ITEMS).run(args=(kind,), timeout=150)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["intact"], run.stdout + run.stderr[-3000:]


THREAD_LOCKS_AROUND_STOPS = """
import os, queue, random, sys, threading
import warden

LOCK = threading.Lock()
QUEUE = queue.Queue()
LOCKS = {"lock": LOCK}

def task(kind):
    while True:
        if kind == "queue":
            QUEUE.put(1)  # takes its mutex through a Condition's __enter__
            QUEUE.get()
        elif kind == "subscript":
            LOCKS["lock"].acquire()
            try:
                sum(range(200))
            finally:
                LOCKS["lock"].release()
        else:
            LOCK.acquire()
            try:
                sum(range(200))
            finally:
                LOCK.release()

def fin(path):
    free = LOCK.acquire(timeout=1.0) and QUEUE.mutex.acquire(timeout=1.0)
    with open(path, "a") as f:
        print("free" if free else "held", file=f)

if __name__ == "__main__":
    out = os.path.abspath("finalizers.txt")
    with warden.ProcessPoolExecutor(2, finalizer=fin, finalargs=(out,)) as ex:
        futures = [ex.schedule(task, (sys.argv[1],), timeout=random.uniform(0.01, 0.1)) for _ in range(60)]
        ends = {type(f.exception(timeout=60)).__name__ for f in futures}
    print(sorted(ends), sorted(set(open(out).read().splitlines())))
"""


@pytest.mark.parametrize("kind", ["queue", "acquire-try", "subscript"])
def test_a_threading_lock_a_stop_lands_beside_is_never_left_held_for_the_finalizer(program, kind):
    """A task stopped over and over as it takes a ``threading.Lock`` with
    ``acquire()`` before its ``try`` (the lock named, or reached through a
    subscript), or a ``queue.Queue``'s mutex (through
    ``threading.Condition.__enter__``, Python code around the lock's): a
    stop raised just after the lock was taken, before the ``try`` or the
    ``with`` had it in charge, left it held, and the worker's finalizer
    waited on it until the worker was killed (about one stop in ten). It
    is now raised once the lock is in their charge, as for the
    ``multiprocessing`` locks."""
    run = program(THREAD_LOCKS_AROUND_STOPS).run(args=(kind,), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["['TaskTimeout'] ['free']"], run.stdout + run.stderr[-3000:]


AROUND_A_MANAGER_LOCK = """
import contextlib, multiprocessing, sys, time
import warden

def waits(lock):
    while True:
        with lock:  # (waiting for it: a body of `pass`)
            pass

def stacks(lock):
    while True:
        with contextlib.ExitStack() as stack:
            stack.enter_context(lock)
            time.sleep(0.001)

if __name__ == "__main__":
    task = waits if sys.argv[1] == "with" else stacks
    manager = multiprocessing.get_context("spawn").Manager()
    for _ in range(12):
        lock = manager.Lock()
        with warden.ProcessPoolExecutor(1, task_timeout=0.3) as ex:
            try:
                ex.submit(task, lock).result(30)
            except warden.TaskTimeout:
                pass
        free = lock.acquire(timeout=5)
        print("free" if free else "held", flush=True)
        if free:
            lock.release()
    manager.shutdown()
"""


@pytest.mark.parametrize("entered_by", ["with", "exit_stack"])
def test_a_task_stopped_around_a_manager_lock_it_enters_leaves_it_free(program, entered_by):
    """``with``: raised on the ``with`` line after a body of ``pass``, before
    its ``__exit__`` ran, the stop left the manager's lock held for good.
    ``ExitStack.enter_context``: held back past the lock's ``__enter__``, it
    was raised before the stack registered the lock's exit."""
    run = program(AROUND_A_MANAGER_LOCK).run(timeout=120, args=(entered_by,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["free"] * 12, run.stdout + run.stderr


SLOW_TO_ANSWER = """
import multiprocessing, threading, time
from multiprocessing.managers import AcquirerProxy, BaseManager
import warden

class SlowToAnswer:
    # A manager's lock whose reply comes late, as on a loaded machine: it is
    # taken at once, the answer 300 ms later.
    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True, timeout=-1):
        taken = self._lock.acquire(blocking, timeout)
        time.sleep(0.3)
        return taken

    def release(self):
        self._lock.release()

class Manager(BaseManager):
    pass

Manager.register("Lock", SlowToAnswer, proxytype=AcquirerProxy)

def task(lock):
    while True:
        with lock:
            pass

if __name__ == "__main__":
    manager = Manager(ctx=multiprocessing.get_context("spawn"))
    manager.start()
    for _ in range(3):
        lock = manager.Lock()
        with warden.ProcessPoolExecutor(1, task_timeout=0.5) as ex:
            try:
                ex.submit(task, lock).result(30)
            except warden.TaskTimeout:
                pass
        free = lock.acquire(timeout=3)
        print("free" if free else "held", flush=True)
        if free:
            lock.release()
    manager.shutdown()
"""


def test_a_task_stopped_while_a_manager_is_slow_to_answer_its_lock_request_leaves_the_lock_free(program):
    """A stop held back in a manager lock's ``acquire`` and asked again 50 ms
    later, the call still waiting for its reply, was raised there and the
    connection closed: the manager had taken the lock for that connection
    and kept it for good ('held')."""
    run = program(SLOW_TO_ANSWER).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["free"] * 3, run.stdout + run.stderr


STOP_AS_AN_EXIT_BEGINS = """
import contextlib, multiprocessing, signal, sys
import warden
from warden import _workerloop

def stopped_as_it_begins(exit_code, body, event="call"):
    # The stop lands at the first instruction of the ``__exit__`` running
    # ``exit_code`` (with "c_return": as the lock's ``acquire`` returns to
    # that code): the worker's handler is called there, as the interpreter
    # calls it between two bytecodes.
    handler = _workerloop.Handler()
    handler.running = True

    def hook(frame, now, arg):
        if now == event and frame.f_code is exit_code and (now == "call" or arg.__name__ == "acquire"):
            sys.setprofile(None)
            handler.on_signal(signal.SIGTERM, frame)

    sys.setprofile(hook)
    try:
        body()
    except warden.TaskInterrupted:
        return "stopped"
    finally:
        sys.setprofile(None)
    return "ran on"

def with_an_exit_stack(lock):
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock)

def with_it(lock):
    with lock:
        pass

@contextlib.contextmanager
def holding(lock):
    lock.acquire()
    try:
        yield
    finally:
        lock.release()

class Holding:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()

if __name__ == "__main__":
    # The stop asked for again 50 ms after one held back (as a worker's
    # handler does) is the worker's business: not this program's end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = multiprocessing.get_context("spawn")
    for name, exits, body in [
        ("exit stack", contextlib.ExitStack, with_an_exit_stack),
        ("contextmanager", contextlib._GeneratorContextManager, lambda lock: with_it(holding(lock))),
        ("a class's", Holding, lambda lock: with_it(Holding(lock))),
    ]:
        lock = ctx.Lock()
        outcome = stopped_as_it_begins(exits.__exit__.__code__, lambda: body(lock))
        print(f"{name}:", outcome, "free" if lock.acquire(False) else "held")
    lock = ctx.Lock()
    outcome = stopped_as_it_begins(Holding.__enter__.__code__, lambda: with_it(Holding(lock)), "c_return")
    print("taken in a class's __enter__:", outcome, "free" if lock.acquire(False) else "held")
    with ctx.Manager() as manager:
        lock = manager.Lock()
        exit_code = type(lock).__exit__.__code__
        outcome = stopped_as_it_begins(exit_code, lambda: with_it(lock))
        print("manager lock:", outcome, "free" if lock.acquire(timeout=2) else "held")
"""


def test_a_stop_as_an_exit_begins_or_an_enter_takes_its_lock_is_raised_once_the_lock_is_given_back(program):
    """Raised at the first instruction of an ``__exit__`` (an
    ``ExitStack``'s, a ``@contextmanager``'s, a class's of the program's, a
    manager lock's before its ``release`` call), the stop ended it before it
    gave the lock back: held for good. Raised as the lock's ``acquire()``
    returned in a class's ``__enter__``, it was raised as that returned,
    outside the ``with`` statement, whose ``__exit__`` never ran."""
    run = program(STOP_AS_AN_EXIT_BEGINS).run(timeout=120)
    assert run.returncode == 0, run.stderr
    names = ("exit stack", "contextmanager", "a class's", "taken in a class's __enter__", "manager lock")
    expected = [f"{name}: stopped free" for name in names]
    assert run.stdout.splitlines() == expected, run.stdout + run.stderr


SPIN_ON_A_LOCK = """
def spin(n):
    for i in range(n):
        lock.acquire()
        try:
            x = [0] * 2000
        finally:
            lock.release()
"""


def test_a_stop_as_acquire_returns_is_recognised_at_fresh_and_warm_call_sites():
    """Where a stop lands as ``lock.acquire()`` returns with the lock (the
    frame's last instructions load ``acquire``, and this thread holds the
    lock), the worker's handler must see it, or the lock is left held: on
    3.11 a call site not specialised yet (``PRECALL`` then ``CALL``) was
    missed, so the first calls of every fresh worker leaked it."""
    import dis
    import multiprocessing
    import signal

    from warden import _workerloop

    lock = multiprocessing.get_context("spawn").Lock()
    seen = {"landed": 0, "recognised": 0}

    def on_tick(_sig, frame):
        if frame is None or frame.f_code.co_name != "spin":
            return
        ins = list(dis.get_instructions(frame.f_code))
        at = next(i for i, x in enumerate(ins) if x.offset == frame.f_lasti)
        if "acquire" in [x.argval for x in ins[max(0, at - 3) : at]] and lock._semlock._is_mine():
            seen["landed"] += 1
            seen["recognised"] += _workerloop._lock_just_taken(frame) is lock

    # SIGPROF (CPU time), not SIGALRM: pytest-timeout's own alarm stays its own.
    previous = signal.signal(signal.SIGPROF, on_tick)
    signal.setitimer(signal.ITIMER_PROF, 0.00003, 0.00003)
    start = time.monotonic()

    def go_on():
        # Ticks land there a few times a second (most of the time goes to
        # compiling the fresh code): 3 s of them, longer (up to 30 s) until
        # the first one lands.
        elapsed = time.monotonic() - start
        return seen["landed"] < 200 and (elapsed < 3 or (not seen["landed"] and elapsed < 30))

    try:
        while go_on():
            namespace = {"lock": lock}
            exec(SPIN_ON_A_LOCK, namespace)  # a fresh code object: its call sites start cold
            namespace["spin"](3)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, signal.SIG_IGN)  # a tick still pending is dropped
        signal.signal(signal.SIGPROF, previous)
    assert seen["landed"] > 0
    assert seen["recognised"] == seen["landed"], seen
