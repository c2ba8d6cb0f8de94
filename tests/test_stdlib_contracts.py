"""The standard library's documented contracts, kept by warden.

Each test is a user's program. Where the standard library has the same
contract, the same program runs against ``concurrent.futures`` /
``multiprocessing`` (spawn context) and against warden, and the test asserts
the same observable result for both.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import gc
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import pytest

import warden

from conftest import alive, wait_until

#: Chooses the implementation from $IMPL; every program below starts with it.
HEADER = """
import concurrent.futures, multiprocessing, os, sys, time
import warden

IMPL = os.environ["IMPL"]
if IMPL == "warden":
    Executor, Pool, Process = warden.ProcessPoolExecutor, warden.Pool, warden.Process
else:
    ctx = multiprocessing.get_context("spawn")
    def Executor(*args, **kwargs):
        return concurrent.futures.ProcessPoolExecutor(*args, mp_context=ctx, **kwargs)
    Pool, Process = ctx.Pool, ctx.Process

def note(text):
    with open(os.environ["OUT"], "a") as f:
        f.write(f"{text}\\n")
"""

IMPLS = ["warden", "stdlib"]


def user_program(program, body: str):
    """A program file: the implementation header, then ``body``."""
    return program(HEADER + textwrap.dedent(body))


# -- work is never silently lost ----------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_interpreter_exit_runs_the_tasks_submitted_to_an_open_executor(program, impl):
    prog = user_program(
        program,
        """
        def save(i):
            time.sleep(0.3)
            note(f"saved {i}")

        if __name__ == "__main__":
            ex = Executor(2)
            for i in range(5):
                ex.submit(save, i)
            note("main done")
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    lines = prog.out_lines()
    assert lines[0] == "main done"
    assert sorted(lines[1:]) == [f"saved {i}" for i in range(5)]
    assert "dropped" not in run.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_an_executor_a_thread_makes_once_the_main_thread_has_finished_refuses_work(program, impl):
    """A worker thread that makes an executor per job: once the main thread
    has finished, a new executor's ``submit`` raises, as every executor's
    does under the standard library, and the program ends (it made a new
    working one each time, and never ended)."""
    prog = user_program(
        program,
        """
        import threading

        def work(n):
            return n

        def jobs(main):
            n = 0
            try:
                while True:
                    with Executor(1) as ex:
                        assert ex.submit(work, n).result() == n
                    n += 1
                    if n == 1:
                        main.set()
            except RuntimeError as e:
                note(f"jobs ended: {e}")

        if __name__ == "__main__":
            main = threading.Event()
            threading.Thread(target=jobs, args=(main,)).start()  # not a daemon
            main.wait(60)
            note("main done")
        """,
    )
    run = prog.run(timeout=90, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    ended = prog.out_lines()[-1]
    if (3, 12) <= sys.version_info < (3, 13) or impl == "stdlib":
        # 3.12 starts no thread once the main thread has returned: the
        # executor's first submit may fail at that first (either library).
        # The standard library's worker may also find the main module gone
        # as the interpreter ends ("Can't get attribute 'work'") and break
        # the pool (BrokenProcessPool) before a submit is refused.
        assert ended.startswith("jobs ended: "), run.stderr
    else:
        assert ended == "jobs ended: cannot schedule new futures after interpreter shutdown", run.stderr


def test_a_first_call_still_being_pickled_as_the_main_thread_finishes_is_refused_as_after_exit(
    program,
):
    """A thread's first submit to a new executor pickles its call while the
    main thread finishes (the exit closes the executor meanwhile): the call
    is refused with the standard library's words for an executor that had
    taken no work by then, not those for one shut down. (The standard
    library pickles later, on its feeder thread, and runs the call: the
    difference of pickling at ``submit()`` listed in docs/python.md.)"""
    prog = user_program(
        program,
        """
        import threading

        main = threading.Event()

        class SlowToPickle:
            def __reduce__(self):
                main.set()
                time.sleep(1.0)
                return (int, (7,))

        def jobs():
            ex = Executor(1)
            try:
                ex.submit(abs, SlowToPickle())
                note("submitted")
            except RuntimeError as e:
                note(f"refused: {e}")

        if __name__ == "__main__":
            threading.Thread(target=jobs).start()  # not a daemon
            main.wait(60)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": "warden"})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["refused: cannot schedule new futures after interpreter shutdown"], run.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_an_open_executors_tasks_run_at_exit_before_atexit_handlers_and_weakref_finalizers(program, impl):
    """``concurrent.futures`` joins its executors in ``threading``'s exit
    hooks, before any ``atexit`` handler: the tasks still find the temporary
    directory the program made (its cleanup is a ``weakref.finalize``), and
    a handler registered after the library was imported sees their results."""
    prog = user_program(
        program,
        """
        import atexit, tempfile

        def write(directory, i):
            time.sleep(0.3)
            with open(os.path.join(directory, f"part-{i}"), "w") as f:
                f.write("data")
            return i

        results = []

        if __name__ == "__main__":
            scratch = tempfile.TemporaryDirectory()
            ex = Executor(2)
            atexit.register(lambda: note(f"atexit sees {sorted(results)}"))
            for i in range(4):
                ex.submit(write, scratch.name, i).add_done_callback(lambda f: results.append(f.result()))
            note("main done")
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["main done", "atexit sees [0, 1, 2, 3]"], run.stderr


def test_a_pool_stopped_by_a_caught_ctrl_c_says_so_when_given_more_work(program):
    # A deliberate difference (docs/python.md): a Ctrl-C while waiting stops
    # the pool. What is left must say so, not claim a shutdown nobody called.
    prog = user_program(
        program,
        """
        import signal, threading

        def slow(x):
            time.sleep(x)
            return x

        def interrupted(wait):
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                wait()
            except KeyboardInterrupt:
                return True
            return False

        def outcome(call):
            try:
                return f"ok {call()}"
            except Exception as e:
                return f"{type(e).__name__}: {e}"

        if __name__ == "__main__":
            ex = Executor(2)
            ex.submit(abs, -1).result(30)  # started: the Ctrl-C comes in the wait, not in a start
            note(f"executor {interrupted(lambda: ex.submit(slow, 5).result(30))}")
            note(outcome(lambda: ex.submit(abs, -5).result(30)))
            ex.shutdown()
            p = Pool(2)
            p.apply(abs, (-1,))
            note(f"pool {interrupted(lambda: p.apply(slow, (5,)))}")
            note(outcome(lambda: p.apply_async(abs, (-5,)).get(30)))
            note(repr(p))
            p.close()
            p.join()
            with Executor(1) as fresh:
                note(f"a new one {fresh.submit(abs, -7).result(30)}")
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": "warden"})
    assert run.returncode == 0, run.stderr
    executor, after_executor, pool, after_pool, pool_repr, fresh = prog.out_lines()
    assert (executor, pool) == ("executor True", "pool True")
    assert after_executor.startswith("RuntimeError: cannot schedule new futures after shutdown: a Ctrl-C")
    assert after_pool.startswith("ValueError: Pool not running: a Ctrl-C")
    assert "state=TERMINATE" in pool_repr
    assert fresh == "a new one 7"


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_memory_a_child_or_worker_leaks_is_unlinked_by_the_end_of_the_program(program, impl, tmp_path):
    # By the parent's resource tracker, which its children and workers use,
    # when the parent has ended (the tracker holds its stderr: run() waits for it).
    prefix = f"warden_test_{os.getpid()}_{impl}"
    prog = user_program(
        program,
        """
        from multiprocessing import shared_memory

        def leak(name, queue=None):
            shm = shared_memory.SharedMemory(name=name, create=True, size=4096)
            shm.close()  # never unlinked: the resource tracker's to clean up
            if queue is not None:
                queue.put(name)
            return name

        if __name__ == "__main__":
            prefix = sys.argv[1]
            queue = multiprocessing.get_context("spawn").Queue()
            child = Process(target=leak, args=(prefix + "_process", queue))
            child.start()
            note(queue.get(timeout=60))
            child.join(60)
            with Executor(1) as ex:
                note(ex.submit(leak, prefix + "_worker").result(timeout=60))
        """,
    )
    try:
        run = prog.run(timeout=90, args=(prefix,), env={"IMPL": impl})
        assert run.returncode == 0, run.stderr
        assert prog.out_lines() == [f"{prefix}_process", f"{prefix}_worker"]
        assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []
    finally:
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                os.unlink(os.path.join("/dev/shm", name))


@pytest.mark.parametrize(("impl", "start"), [("warden", "zygote"), ("warden", "exec"), ("stdlib", "")])
def test_shared_memory_workers_and_children_only_attach_to_outlives_them_until_the_parent_unlinks_it(
    program, impl, start
):
    # Attaching registers the segment with the resource tracker (3.11, 3.12;
    # 3.13 by default): a child uses its parent's tracker, so the segment
    # lives on when the child exits, until the parent unlinks it.
    prog = user_program(
        program,
        """
        from multiprocessing import shared_memory

        def read(name, numbers):
            shm = shared_memory.SharedMemory(name=name)  # attach; never unlink
            try:
                return f"{shm.buf[0]} {sum(numbers)}"
            finally:
                shm.close()

        def child(name, numbers):
            note(f"process {read(name, numbers)}")

        def outcome(call):
            try:
                return call()
            except Exception as e:
                return f"{type(e).__name__}"

        if __name__ == "__main__":
            # Named as this suite's segments are, so that a check for what
            # warden leaves in /dev/shm, running meanwhile, knows them.
            shm = shared_memory.SharedMemory(f"warden_test_{os.getpid()}_bytes", create=True, size=4096)
            shm.buf[0] = 42
            numbers = shared_memory.ShareableList([1, 2, 3], name=f"warden_test_{os.getpid()}_list")

            def present():
                return [os.path.exists(f"/dev/shm/{s.name.lstrip('/')}") for s in (shm, numbers.shm)]

            with Executor(1, max_tasks_per_child=1) as ex:  # a fresh worker for each task
                for _ in range(3):
                    note(f"executor {outcome(lambda: ex.submit(read, shm.name, numbers).result(timeout=60))}")
            note(f"after the executor {present()}")
            pool = Pool(1, maxtasksperchild=1)
            for _ in range(2):
                note(f"pool {outcome(lambda: pool.apply(read, (shm.name, numbers)))}")
            pool.close()
            pool.join()
            note(f"after the pool {present()}")
            p = Process(target=child, args=(shm.name, numbers))
            p.start()
            p.join(60)
            note(f"after the process {present()}")
            for s in (shm, numbers.shm):
                s.close()
                note(f"unlink {outcome(lambda: s.unlink() or 'ok')}")
        """,
    )
    run = prog.run(timeout=90, env={"IMPL": impl, "WARDEN_START": start})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == [
        *["executor 42 6"] * 3,
        "after the executor [True, True]",
        *["pool 42 6"] * 2,
        "after the pool [True, True]",
        "process 42 6",
        "after the process [True, True]",
        "unlink ok",
        "unlink ok",
    ]
    assert "leaked" not in run.stderr, run.stderr


def test_workers_of_an_executor_left_open_retire_with_their_finalizers_after_its_tasks(program):
    prog = program(
        """
        import os, time, warden

        def note(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(f"{text}\\n")

        def save(i):
            time.sleep(0.2)
            note(f"saved {os.getpid()}")

        def goodbye():
            note(f"finalizer {os.getpid()}")

        if __name__ == "__main__":
            ex = warden.ProcessPoolExecutor(2, finalizer=goodbye)
            for i in range(4):
                ex.submit(save, i)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [line.split() for line in prog.out_lines()]
    assert sum(what == "saved" for what, _ in lines) == 4
    workers = {pid for _, pid in lines}
    for pid in workers:  # each worker's finalizer runs once, after its last task
        own = [what for what, p in lines if p == pid]
        assert own[-1] == "finalizer" and own.count("finalizer") == 1, lines


def test_exit_timeout_cuts_interpreter_exit_short_and_says_how_many_tasks_were_dropped(program):
    prog = program(
        """
        import os, time, warden

        def slow(i):
            time.sleep(60)
            with open(os.environ["OUT"], "a") as f:
                f.write(f"ran {i}\\n")

        if __name__ == "__main__":
            ex = warden.ProcessPoolExecutor(1, exit_timeout=0.5)
            for i in range(3):
                ex.submit(slow, i)
        """
    )
    run = prog.run(timeout=40)
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 30
    assert prog.out_lines() == []
    assert "3 submitted tasks dropped at interpreter exit (exit_timeout=0.5s passed)" in run.stderr


def test_ctrl_c_while_exit_waits_for_submitted_tasks_drops_them_and_says_so(program):
    prog = program(
        """
        import os, time, warden

        def slow(i):
            time.sleep(60)

        if __name__ == "__main__":
            ex = warden.ProcessPoolExecutor(1)
            for i in range(2):
                ex.submit(slow, i)
            ex.submit(slow, 0)
            print("ended", flush=True)
        """
    )
    proc = prog.start()
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ended"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "3 submitted tasks dropped at interpreter exit (interrupted (Ctrl-C))" in err


def test_a_signal_handlers_system_exit_while_exit_waits_for_submitted_tasks_drops_them_and_says_so(program):
    """A SIGTERM handler that calls ``sys.exit()``, as the signal comes while
    the exit runs an executor's pending tasks: the program is to end now. It
    printed a traceback ("Exception ignored in: <module 'threading'>") and
    went on waiting for the tasks; it now stops them, as a Ctrl-C there does."""
    prog = program(
        """
        import signal, sys, time, warden

        def slow(i):
            time.sleep(60)

        def leave(signum, frame):
            sys.exit(3)

        if __name__ == "__main__":
            signal.signal(signal.SIGTERM, leave)
            ex = warden.ProcessPoolExecutor(1)
            for i in range(2):
                ex.submit(slow, i)
            print("ended", flush=True)
        """
    )
    proc = prog.start()
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ended"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    # Ended within the bound (the interpreter's exit status was set as main
    # returned: a SystemExit this late does not change it).
    _, err = proc.communicate(timeout=30)
    assert "2 submitted tasks dropped at interpreter exit (interrupted (SystemExit))" in err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pool_left_open_at_exit_is_terminated(program, impl):
    prog = user_program(
        program,
        """
        def slow():
            time.sleep(60)
            note("ran")

        if __name__ == "__main__":
            pool = Pool(1)
            pool.apply_async(slow)
            time.sleep(0.5)
        """,
    )
    run = prog.run(timeout=40, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 30
    assert prog.out_lines() == []


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pool_left_open_at_exit_is_terminated_after_multiprocessing_log_to_stderr(program, impl):
    """``multiprocessing.log_to_stderr()`` (or ``get_logger()``, which celery's
    worker calls) moves multiprocessing's exit function ahead of warden's
    handler. That function terminates the daemonic children
    ``active_children()`` lists, warden's pool workers among them, and joins
    them all: the pool, still running, replaced the workers it terminated,
    and the join waited for a replacement for ever (in about half the runs).
    The pools are now terminated first. Run several times, so that the
    race shows."""
    prog = user_program(
        program,
        """
        if __name__ == "__main__":
            multiprocessing.log_to_stderr()
            pool = Pool(4)
            note(pool.map(abs, [-1, -2, -3]))
        """,
    )
    for attempt in range(8):
        run = prog.run(timeout=30, env={"IMPL": impl})
        assert run.returncode == 0, f"run {attempt}: {run.stderr}"
    assert prog.out_lines() == ["[1, 2, 3]"] * 8


@pytest.mark.parametrize("wait", ["map", "imap", "apply_async", "wait_then_successful"])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_daemon_thread_waiting_on_a_pool_left_open_at_exit_ends_silently_with_the_program(
    program, impl, wait
):
    """``wait_then_successful``: ``wait()`` returned once the exit's terminate
    had ended the result, and the thread went on running its own code while
    the interpreter shut down (the standard library's result never becomes
    ready: the thread stays blocked)."""
    prog = user_program(
        program,
        f"""
        import threading

        def slow(x):
            time.sleep(60)
            return x

        def background(pool):
            note("waiting")
            if "{wait}" == "map":
                pool.map(slow, range(4))
            elif "{wait}" == "imap":
                list(pool.imap(slow, range(4)))
            elif "{wait}" == "apply_async":
                pool.apply_async(slow, (1,)).get()
            else:
                result = pool.apply_async(slow, (1,))
                result.wait()
                note(f"successful: {{result.successful()}}")
            note("returned")

        if __name__ == "__main__":
            pool = Pool(2)
            threading.Thread(target=background, args=(pool,), daemon=True).start()
            time.sleep(0.5)
        """,
    )
    run = prog.run(timeout=40, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 30
    assert prog.out_lines() == ["waiting"]
    assert run.stderr == ""


@pytest.mark.parametrize("impl", IMPLS)
def test_a_daemon_thread_asking_at_exit_for_a_future_the_program_cancelled_gets_cancelled_error(
    program, impl
):
    """Only what the exit itself cancels keeps a daemon thread blocked: a
    future the program cancelled raises ``CancelledError`` in it, during
    the exit's drain as at any other time (it was blocked for good)."""
    prog = user_program(
        program,
        """
        import atexit, threading
        from concurrent.futures import CancelledError

        def consumer(future, done):
            time.sleep(0.5)  # main has returned: the exit drains the executor
            try:
                future.result()
            except CancelledError:
                note("CancelledError")
            done.set()

        if __name__ == "__main__":
            ex = Executor(1)
            ex.submit(time.sleep, 1.5)  # drained at exit
            future = ex.submit(abs, 1)
            note(f"cancelled {future.cancel()}")
            done = threading.Event()
            threading.Thread(target=consumer, args=(future, done), daemon=True).start()
            atexit.register(lambda: note(f"consumer done {done.wait(10)}"))
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["cancelled True", "CancelledError", "consumer done True"], run.stderr


@pytest.mark.parametrize("wait", ["result", "exception", "wait_then_result", "as_completed", "asyncio_run"])
def test_a_daemon_thread_waiting_on_a_future_that_exit_timeout_drops_ends_silently_with_the_program(
    program, wait
):
    """However the thread waits: ``exception()``, and a ``result()`` asked
    for after ``wait()`` or ``as_completed()`` said the future was done,
    raised ``CancelledError`` (a traceback per thread on stderr), as did
    ``await ex.run(...)`` on the thread's own event loop."""
    prog = program(
        f"""
        import asyncio, os, threading, time, warden

        def slow():
            time.sleep(60)

        def background(ex):
            if "{wait}" == "result":
                ex.submit(slow).result()
            elif "{wait}" == "exception":
                ex.submit(slow).exception()
            elif "{wait}" == "wait_then_result":
                future = ex.submit(slow)
                warden.wait([future])
                future.result()
            elif "{wait}" == "as_completed":
                for future in warden.as_completed([ex.submit(slow)]):
                    future.result()
            else:
                asyncio.run(ex.run(slow))
            with open(os.environ["OUT"], "a") as f:
                f.write("returned\\n")

        if __name__ == "__main__":
            ex = warden.ProcessPoolExecutor(1, exit_timeout=0.5)
            threading.Thread(target=background, args=(ex,), daemon=True).start()
            time.sleep(0.5)
        """
    )
    run = prog.run(timeout=40)
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 30
    assert prog.out_lines() == []
    dropped = (
        r"warden: ProcessPoolExecutor-\d+: 1 submitted task dropped at interpreter exit"
        r" \(exit_timeout=0\.5s passed\)"
    )
    assert re.fullmatch(dropped, run.stderr.strip()), run.stderr


# -- in this process: the same calls on both implementations -----------------


class Impl:
    """The standard library (spawn context) or warden, by the same names."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "warden":
            self.Executor = warden.ProcessPoolExecutor
            self.Pool = warden.Pool
            self.Process = warden.Process
            self.Event = warden.Event
        else:
            ctx = multiprocessing.get_context("spawn")
            self.Executor = functools.partial(concurrent.futures.ProcessPoolExecutor, mp_context=ctx)
            self.Pool = ctx.Pool
            self.Process = ctx.Process
            self.Event = ctx.Event


@pytest.fixture(params=IMPLS)
def impl(request) -> Impl:
    return Impl(request.param)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def return_lock():
    return threading.Lock()


def lock_for(_):
    return threading.Lock()


def identity(x):
    return x


class Payload:
    """Something a weak reference can watch."""

    def __init__(self, n=0):
        self.n = n


def make_payload(n):
    return Payload(n)


def test_shutdown_with_cancel_futures_leaves_every_queued_future_cancelled(impl):
    ex = impl.Executor(1)
    assert ex.submit(identity, 0).result(timeout=60) == 0  # the worker is up
    first = ex.submit(sleep_then, 1.0, "first")
    time.sleep(0.3)  # and has taken the first task
    queued = [ex.submit(sleep_then, 0, i) for i in range(6)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=0) == "first"
    # The standard library may already have handed its call queue's worth
    # (max_workers + 1) to its worker: those are running to it, and run.
    handed = 2 if impl.name != "warden" else 1
    assert all(f.cancelled() or f.result(timeout=0) == i for i, f in enumerate(queued[:handed]))
    assert all(f.cancelled() for f in queued[handed:])
    for f in queued[handed:]:
        assert f.done()
        assert not f.running()
        with pytest.raises(concurrent.futures.CancelledError):
            f.result(timeout=0)


def test_a_future_is_running_while_a_worker_runs_its_task_and_cannot_be_cancelled_then(impl):
    with impl.Executor(1) as ex:
        assert ex.submit(identity, 0).result(timeout=60) == 0  # the worker is up
        future = ex.submit(sleep_then, 1.0, "slept")
        assert wait_until(future.running, timeout=30)
        assert "state=running" in repr(future)
        assert not future.cancel()
        assert not future.cancelled() and not future.done()
        done, _ = concurrent.futures.wait([future], timeout=30)
        assert done == {future}
        assert future.result(timeout=0) == "slept"
        assert not future.running()
        assert "state=finished" in repr(future)


def raise_value_error(message):
    raise ValueError(message)


def test_a_failed_futures_repr_names_the_exceptions_class_not_its_message(impl):
    with impl.Executor(1) as ex:
        future = ex.submit(raise_value_error, "x" * 100_000)
        concurrent.futures.wait([future], timeout=60)
        assert re.fullmatch(r"<Future at 0x[0-9a-f]+ state=finished raised ValueError>", repr(future))


class RecordsItsMaking(Exception):
    """An exception whose ``__init__`` writes the pid it runs in to a file."""

    def __init__(self, log):
        super().__init__(log)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")


def raise_recorded(log):
    raise RecordsItsMaking(log)


def test_a_tasks_exception_is_made_once_where_raised_and_once_where_caught(impl, tmp_path):
    log = tmp_path / "made"
    with impl.Executor(1) as ex, pytest.raises(RecordsItsMaking):
        ex.submit(raise_recorded, str(log)).result(timeout=60)
    made_in = log.read_text().split()
    assert len(made_in) == 2, made_in
    assert made_in[0] != str(os.getpid()) and made_in[1] == str(os.getpid())


def test_a_running_future_stopped_by_cancel_is_never_seen_neither_running_nor_done():
    """While ``cancel(running=True)`` asks the pool, the task's "cancelled"
    outcome reaches the results thread, which leaves the marking to the
    cancelling thread; the pool forgets the task's start once that outcome
    is delivered. Another thread looking meanwhile saw a future neither
    running nor done (1 round in 3 or 4)."""
    seen = []
    with warden.ProcessPoolExecutor(1) as ex:
        for _ in range(12):
            future = ex.submit(sleep_then, 60, "never")
            assert wait_until(future.running, timeout=30)
            stop = threading.Event()

            def watch(future=future, stop=stop):
                while not stop.is_set():
                    running = future.running()
                    if not running and not future.done():  # done() never goes back
                        seen.append(future._state)
                        return

            watcher = threading.Thread(target=watch)
            watcher.start()
            time.sleep(0.002)
            assert future.cancel(running=True)
            stop.set()
            watcher.join(30)
            assert future.cancelled()
    assert seen == []


def test_a_task_waiting_behind_another_is_not_running_and_can_be_cancelled():
    with warden.ProcessPoolExecutor(1) as ex:
        first = ex.submit(sleep_then, 1.0, "first")
        second = ex.submit(sleep_then, 0, "second")
        assert wait_until(first.running, timeout=30)
        assert not second.running()
        assert second.cancel() and second.cancelled()
        assert list(concurrent.futures.as_completed([first, second], timeout=30)) == [second, first]
        assert first.result(timeout=0) == "first"


def test_shutdown_without_waiting_cancels_the_queued_futures_before_it_returns():
    ex = warden.ProcessPoolExecutor(1)
    first = ex.submit(sleep_then, 0.5, "first")
    queued = [ex.submit(sleep_then, 0, i) for i in range(20)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    done, not_done = concurrent.futures.wait(queued, timeout=0)
    assert len(done) == 20 and not not_done
    assert first.cancelled() or first.result(timeout=30) == "first"
    ex.shutdown(wait=True)


def test_shutdown_without_waiting_returns_while_the_callbacks_of_what_it_cancels_need_the_callers_lock(impl):
    # Bookkeeping under the owner's lock: the callbacks of the futures
    # shutdown cancels take the lock its caller holds. The standard library
    # runs them on its manager thread, after shutdown(wait=False) returned.
    lock = threading.Lock()
    pending = set()
    called = []

    def done(future):
        with lock:
            pending.discard(future)
            called.append(future)

    ex = impl.Executor(1)
    try:
        assert ex.submit(identity, 0).result(timeout=60) == 0  # the worker is up
        futures = [ex.submit(sleep_then, 0.2, i) for i in range(12)]
        for future in futures:
            pending.add(future)
            future.add_done_callback(done)
        returned = threading.Event()

        def close():
            with lock:
                ex.shutdown(wait=False, cancel_futures=True)
                returned.set()

        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        assert returned.wait(30), "shutdown(wait=False, cancel_futures=True) did not return"
        closer.join(30)
        # (The standard library's second shutdown does not wait: it
        # forgets its manager thread in the first; and its wait() never
        # counts a future cancel_futures cancelled as done.)
        assert wait_until(lambda: all(f.done() for f in futures), timeout=30)
        assert sum(f.cancelled() for f in futures) >= 8
        assert wait_until(lambda: not pending, timeout=30), pending
        time.sleep(0.2)  # no callback runs twice
        assert sorted(map(id, called)) == sorted(map(id, futures))
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def touch_after(path, seconds):
    time.sleep(seconds)
    with open(path, "w"):
        pass


def test_a_map_cut_short_by_a_shutdown_from_another_thread_still_runs_what_it_submitted(impl, tmp_path):
    # map() submits as it reads its iterable; a shutdown (without
    # cancel_futures) lands halfway. The map raises, and the calls it had
    # submitted run, as shutdown promises of what was submitted.
    halfway, shut = threading.Event(), threading.Event()

    def items():
        for i in range(100):
            if i == 50:
                halfway.set()
                shut.wait(30)
            yield str(tmp_path / f"{i}")

    ex = impl.Executor(2)
    try:
        raised = []

        def mapper():
            try:
                ex.map(touch_after, items(), [0.02] * 100)
            except RuntimeError as e:
                raised.append(e)

        thread = threading.Thread(target=mapper)
        thread.start()
        assert halfway.wait(60)
        ex.shutdown(wait=False)
        shut.set()
        thread.join(30)
        assert raised and "cannot schedule new futures" in str(raised[0])
        expected = {str(i) for i in range(50)}
        assert wait_until(lambda: set(os.listdir(tmp_path)) >= expected, timeout=60), sorted(
            os.listdir(tmp_path), key=int
        )
        assert set(os.listdir(tmp_path)) == expected
    finally:
        shut.set()
        ex.shutdown(wait=False, cancel_futures=True)


def test_a_result_that_cannot_be_pickled_raises_maybe_encoding_error(impl):
    with impl.Pool(1) as pool:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="Error sending result: .*lock"):
            pool.apply(return_lock)
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as raised:
            pool.map(lock_for, [1, 2])  # chunks of one item: named as a list of it
        assert raised.value.value.startswith("[<unlocked _thread.lock object"), raised.value.value
        assert pool.apply(identity, (3,)) == 3


def pair_of(*args):
    return args


@pytest.mark.parametrize("chunksize", [1, 2, None])
def test_a_starmap_over_items_that_are_not_iterable_fails_in_the_standard_librarys_words(impl, chunksize):
    # warden's said "__mp_main__.pair_of() argument after * must be an
    # iterable, not int", naming the function by its worker's module.
    with impl.Pool(2) as pool:
        with pytest.raises(TypeError) as raised:
            pool.starmap(pair_of, range(3), chunksize)
        assert str(raised.value) == "'int' object is not iterable"
        assert pool.starmap(pair_of, [(1, 2), [3], "ab"], chunksize) == [(1, 2), (3,), ("a", "b")]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_imap_result_that_cannot_be_pickled_names_that_result_as_the_standard_library_does(impl, method):
    with impl.Pool(1) as pool:
        results = getattr(pool, method)(lock_for, [1])  # chunksize 1: one call per item
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as raised:
            next(results)
    assert raised.value.value.startswith("<unlocked _thread.lock object"), raised.value.value
    assert str(raised.value).startswith("Error sending result: '<unlocked _thread.lock object")


@pytest.mark.parametrize("module", ["concurrent.futures", "warden"])
def test_a_concurrent_futures_program_runs_with_warden_imported_in_its_place(program, module):
    # ``import concurrent.futures as cf`` switched to ``import warden as cf``:
    # wait, as_completed, their constants and errors come along.
    prog = program(
        f"""
        import time
        import {module} as cf

        def nap(x):
            time.sleep(x)
            return x

        def fail():
            raise KeyError("k")

        if __name__ == "__main__":
            with cf.ProcessPoolExecutor(2) as ex:
                assert isinstance(ex, cf.Executor)
                futs = [ex.submit(nap, x) for x in (0.0, 0.2)]
                print(sorted(f.result() for f in cf.as_completed(futs, timeout=30)))
                slow, bad = ex.submit(nap, 5), ex.submit(fail)
                done, _ = cf.wait([slow, bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
                print([f is bad for f in done], repr(bad.exception()))
                try:
                    slow.result(timeout=0.05)
                except cf.TimeoutError:
                    print("timed out")
                try:
                    list(cf.as_completed([slow], timeout=0.05))
                except cf.TimeoutError:
                    print("as_completed timed out")
                print(cf.wait([slow], timeout=0.05, return_when=cf.ALL_COMPLETED).done == set())
                try:
                    never = cf.Future()
                    never.cancel()
                    never.result()
                except cf.CancelledError:
                    print("cancelled")
                print(cf.BrokenExecutor.__name__, cf.FIRST_COMPLETED, cf.InvalidStateError.__name__)
                ex.shutdown(wait=False, cancel_futures=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "[0.0, 0.2]",
        "[True] KeyError('k')",
        "timed out",
        "as_completed timed out",
        "True",
        "cancelled",
        "BrokenExecutor FIRST_COMPLETED InvalidStateError",
    ]


@pytest.mark.parametrize("modules", ["concurrent.futures multiprocessing", "warden warden"])
def test_a_program_naming_the_process_submodules_runs_with_warden_imported_in_their_place(program, modules):
    """``cf.process.BrokenProcessPool`` (and ``mp.process.parent_process``)
    with ``import warden as cf``: ``warden.process`` stands in for both
    ``concurrent.futures.process`` and ``multiprocessing.process``. It had
    none of their names, and the ``except`` clause of a program whose worker
    died raised ``AttributeError`` in place of catching the error."""
    cf_module, mp_module = modules.split()
    prog = program(
        f"""
        import os
        import {cf_module} as cf
        import {mp_module} as mp

        def crash():
            os._exit(3)

        if __name__ == "__main__":
            with cf.ProcessPoolExecutor(1) as ex:
                try:
                    ex.submit(crash).result(timeout=60)
                except cf.process.BrokenProcessPool as e:
                    print("caught", isinstance(e, cf.BrokenExecutor))
            print(cf.process.ProcessPoolExecutor is cf.ProcessPoolExecutor)
            print(isinstance(mp.process.current_process(), mp.process.BaseProcess))
            print(mp.process.parent_process(), mp.process.active_children())
        """
    )
    run = prog.run(timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["caught True", "True", "True", "None []"], run.stdout + run.stderr


SUBCLASSES_WITH_PRIVATE_NAMES_OF_THEIR_OWN = """
import concurrent.futures, multiprocessing, multiprocessing.pool, os, signal, sys, time
import warden

if os.environ["IMPL"] == "warden":
    Process, Executor, Pool, Event = warden.Process, warden.ProcessPoolExecutor, warden.Pool, warden.Event
else:
    ctx = multiprocessing.get_context("spawn")
    Process, Event = ctx.Process, ctx.Event
    Executor, Pool = concurrent.futures.ProcessPoolExecutor, multiprocessing.pool.Pool

class Worker(Process):
    # Names a subclass picks for itself, as real ones do: a stop event, a
    # start helper, the pid it saw.
    def __init__(self, event):
        super().__init__()
        self._stop = event
        self._pid = None
        self._sentinel_fd = "mine"

    def _start(self):
        raise AssertionError("the subclass's own helper, not the start")

    def _on_sigterm(self, signum, frame):
        print("child: stopping", flush=True)
        sys.exit(0)

    def run(self):
        signal.signal(signal.SIGTERM, self._on_sigterm)
        while not self._stop.is_set():
            time.sleep(0.01)

class Graceful(Process):
    def _stop(self, signum, frame):  # its SIGTERM handler
        sys.exit(3)

    def run(self):
        signal.signal(signal.SIGTERM, self._stop)
        time.sleep(60)

class Bounded(Executor):
    def __init__(self, n):
        super().__init__(n)
        self._lock = "the subclass's"
        self._queue = []
        self._name = 42
        self._start = self._limits = self._hooks = None

    def submit(self, fn, /, *args, **kwargs):
        self._queue.append(fn)
        return super().submit(fn, *args, **kwargs)

class Named(Pool):
    def __init__(self, n):
        super().__init__(n)
        self._name = None
        self._submit = self._interrupt = self._hooks = self._imap = "the subclass's"

if __name__ == "__main__":
    event = Event()
    p = Worker(event)
    p.start()
    time.sleep(0.5)
    event.set()
    p.join(60)
    print("event", p.exitcode, p.pid is not None, p._pid, p._sentinel_fd)
    for stop in ("terminate", "kill"):
        p = Worker(Event())
        p.start()
        time.sleep(0.5)
        getattr(p, stop)()
        p.join(60)
        print(stop, p.exitcode)
    g = Graceful()
    g.start()
    time.sleep(0.5)
    g.terminate()
    g.join(60)
    print("graceful", g.exitcode)

    with Bounded(2) as ex:
        print("executor", [f.result(timeout=60) for f in [ex.submit(abs, -i) for i in range(4)]])
        print(list(ex.map(abs, [-1, -2], timeout=60)), len(ex._queue))
    with Named(2) as pool:
        print("pool", pool.map(abs, [-1, -2, -3]), pool.apply_async(abs, (-4,)).get(60))
        print(list(pool.imap(abs, [-5, -6])), pool._name, pool._imap)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_subclasses_keeping_private_names_of_their_own_start_stop_and_serve_as_the_standard_librarys(
    program, impl
):
    # warden's own private names are its alone (`_warden_`): a subclass that
    # uses `_stop`, `_start`, `_pid`, `_lock`, `_queue`, `_name` for itself,
    # as the standard library leaves it free to, changes nothing warden does.
    run = program(SUBCLASSES_WITH_PRIVATE_NAMES_OF_THEIR_OWN).run(env={"IMPL": impl}, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.lines == [
        "event 0 True None mine",
        "child: stopping",
        "terminate 0",
        "kill -9",
        "graceful 3",
        "executor [0, 1, 2, 3]",
        "[1, 2] 6",
        "pool [1, 2, 3] 4",
        "[5, 6] None the subclass's",
    ], run.stdout + run.stderr


@pytest.mark.parametrize(
    "made, standing_in_for",
    [
        (lambda: warden.Process(target=abs, args=(-1,)), multiprocessing.get_context("spawn").Process),
        (lambda: warden.Pool(1), multiprocessing.pool.Pool),
        (lambda: warden.ProcessPoolExecutor(1), concurrent.futures.ProcessPoolExecutor),
    ],
    ids=["Process", "Pool", "ProcessPoolExecutor"],
)
def test_every_private_name_warden_adds_to_a_class_users_subclass_is_marked_as_warden_s(
    made, standing_in_for
):
    # Private names the standard library's class has are a subclass's to
    # avoid; any other a subclass may take for itself. So warden's own, on
    # the class and on a used object, all begin with `_warden_`.
    obj = made()
    try:
        if isinstance(obj, warden.Process):
            obj.start()
            obj.join(60)
            obj.sentinel  # noqa: B018  (sets what it keeps)
        elif isinstance(obj, warden.Pool):
            obj.map(abs, [-1, -2])
            list(obj.imap(abs, [-1]))
        else:
            obj.submit(abs, -1).result(timeout=60)
            list(obj.map(abs, [-1], timeout=60))
        names = {
            n for klass in type(obj).__mro__ if klass.__module__.startswith("warden") for n in vars(klass)
        }
        names |= set(vars(obj))
    finally:
        if isinstance(obj, warden.Pool):
            obj.terminate()
        elif isinstance(obj, warden.ProcessPoolExecutor):
            obj.shutdown()
    theirs = set(dir(standing_in_for))
    if standing_in_for is multiprocessing.pool.Pool:
        theirs |= set(vars(multiprocessing.pool.ThreadPool(1)))  # its attributes, without processes
    else:
        theirs |= set(vars(standing_in_for()))  # unstarted: neither starts a process
    private = {n for n in names if n.startswith("_") and not n.startswith("__")}
    assert sorted(n for n in private - theirs if not n.startswith("_warden_")) == []


def wait_cut_short_by_its_own_timer(seconds):
    import _thread

    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        # interrupt_main() sends no signal: a sleep is not cut short, the
        # next bytecode after it is.
        for _ in range(int(seconds * 100)):
            time.sleep(0.01)
        return "slept", os.getpid()
    except KeyboardInterrupt:
        return "caught KeyboardInterrupt", os.getpid()
    finally:
        timer.cancel()


def test_a_task_that_interrupts_its_own_wait_with_interrupt_main_catches_keyboard_interrupt(impl):
    # ``threading.Timer(t, _thread.interrupt_main)``: a timeout of the
    # task's own, not a stop of its worker, which serves on.
    with impl.Executor(1) as ex:
        outcome, pid = ex.submit(wait_cut_short_by_its_own_timer, 30).result(timeout=60)
        assert outcome == "caught KeyboardInterrupt"
        assert ex.submit(os.getpid).result(timeout=60) == pid


def real_sigint_after_putting_the_handler_back():
    old = signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGINT, old)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(3000):
            time.sleep(0.01)
        return "slept"
    except KeyboardInterrupt:
        return "caught KeyboardInterrupt"


def test_a_real_sigint_is_never_taken_for_interrupt_main_even_after_a_task_put_its_handler_back():
    # The task's signal.signal(SIGINT, old) leaves the interpreter's C
    # handler where warden's was: the SIGINT is still a stop (as the docs
    # say, the task fails with WorkerCrashed and its worker is replaced),
    # not the task's own KeyboardInterrupt, nor a stop only half taken.
    with warden.ProcessPoolExecutor(1) as ex:
        pid = ex.submit(os.getpid).result(timeout=60)
        with pytest.raises(warden.WorkerCrashed) as crashed:
            ex.submit(real_sigint_after_putting_the_handler_back).result(timeout=60)
        assert crashed.value.signal == signal.SIGINT
        assert ex.submit(os.getpid).result(timeout=60) != pid


def test_async_result_get_with_a_timeout_raises_multiprocessing_timeout_error(impl):
    with impl.Pool(1) as pool:
        result = pool.apply_async(sleep_then, (5,))
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.1)
        assert not result.ready()


@pytest.mark.parametrize("stop", ["close", "terminate"])
def test_using_a_closed_or_terminated_pool_raises_value_error(impl, stop):
    pool = impl.Pool(1)
    getattr(pool, stop)()
    for use in (
        lambda: pool.apply_async(identity, (1,)),
        lambda: pool.map(identity, [1]),
        lambda: pool.imap(identity, [1]),
        lambda: pool.starmap(identity, [(1,)]),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            use()
    pool.join()


@pytest.mark.parametrize("args", [(0,), (-2,), (1, None, (), 0), (1, None, (), -1), (1, None, (), 1.5)])
def test_a_pool_with_no_processes_or_a_bad_maxtasksperchild_raises_value_error(impl, args):
    with pytest.raises(ValueError):
        impl.Pool(*args)


def test_event_repr_says_set_or_unset_in_the_standard_librarys_form(impl):
    event = impl.Event()
    assert re.fullmatch(r"<Event at 0x[0-9a-f]+ unset>", repr(event))
    event.set()
    assert re.fullmatch(r"<Event at 0x[0-9a-f]+ set>", repr(event))


def test_a_running_pool_that_is_garbage_collected_warns_resource_warning(impl):
    pool = impl.Pool(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert any(m.startswith("unclosed running multiprocessing pool <") for m in messages), messages
    closed = impl.Pool(1)
    closed.close()
    closed.join()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del closed
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_pool_whose_constructor_raises_warns_of_no_unclosed_pool(impl):
    # A test run with -W error that checks a bad configuration is refused
    # would otherwise fail on the warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError):
            impl.Pool(1, initializer=3)
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


# -- nothing is kept alive that the standard library releases -----------------


def test_the_map_iterator_keeps_no_reference_to_results_already_yielded(impl):
    with impl.Executor(2) as ex:
        results = ex.map(make_payload, range(4))
        first = next(results)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None
        assert [p.n for p in results] == [1, 2, 3]


def test_a_finished_task_keeps_no_reference_to_its_function_arguments_or_result(impl):
    with impl.Executor(1) as ex:
        fn, argument = Doubler(), Payload(21)
        refs = [weakref.ref(fn), weakref.ref(argument)]
        future = ex.submit(fn, argument)
        result = future.result(timeout=60)
        assert result.n == 42
        refs.append(weakref.ref(result))
        del fn, argument, result
        assert wait_until(lambda: gc.collect() is not None and refs[0]() is None and refs[1]() is None)
        assert refs[2]() is not None  # the future holds its result...
        del future
        assert wait_until(lambda: gc.collect() is not None and refs[2]() is None)  # ...nothing else


class Doubler:
    def __call__(self, payload):
        return Payload(payload.n * 2)


def remember_and_return(tag):
    """In a worker: makes an argument-like and a result-like object, keeping
    only weak references to them."""
    global _refs
    value = Payload(tag)
    _refs = [weakref.ref(value)]
    return tag


def worker_refs_are_dead():
    gc.collect()
    return all(r() is None for r in _refs)


def test_a_worker_keeps_no_reference_to_a_finished_tasks_objects(impl):
    with impl.Executor(1) as ex:
        assert ex.submit(remember_and_return, 3).result(timeout=60) == 3
        assert ex.submit(worker_refs_are_dead).result(timeout=60) is True
    with impl.Pool(1) as pool:
        assert pool.apply(remember_and_return, (4,)) == 4
        assert pool.apply(worker_refs_are_dead) is True


def test_process_start_drops_its_references_to_target_args_and_kwargs(impl):
    target, arg, kwarg = Payload(), Payload(1), Payload(2)
    refs = [weakref.ref(o) for o in (target, arg, kwarg)]
    p = impl.Process(target=target, args=(arg,), kwargs={"k": kwarg})
    p.start()
    del target, arg, kwarg
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    p.join(60)
    assert p.exitcode == 1  # Payload() does not take arguments: the child says so


# -- workers as the standard library starts them -------------------------------


@pytest.mark.parametrize(("impl", "start"), [("warden", "zygote"), ("warden", "exec"), ("stdlib", "")])
def test_a_task_can_name_the_submodules_a_standard_library_worker_has_imported(program, impl, start):
    """A standard library worker has imported ``concurrent.futures.process``
    and ``multiprocessing.pool``, ``connection``, ``queues`` and
    ``synchronize`` for its own use, so a task can name them after a bare
    ``import multiprocessing, concurrent.futures`` (the program of a known
    report raises ``concurrent.futures.process._RemoteTraceback`` in its
    tasks). A warden worker imports each when first named: without that, an
    ``AttributeError``."""
    prog = user_program(
        program,
        """
        def fun(arg):
            raise concurrent.futures.process._RemoteTraceback(f"error {arg}")

        def names(in_a_pool):
            if in_a_pool:  # (an executor's worker has not imported multiprocessing.pool)
                with multiprocessing.pool.ThreadPool(2) as threads:
                    assert threads.map(lambda x: 2 * x, [1, 2]) == [2, 4]
            return [
                multiprocessing.connection.wait([], 0),
                multiprocessing.queues.SimpleQueue.__name__,
                multiprocessing.synchronize.Lock.__name__,
            ]

        def missing(_):
            return multiprocessing.no_such_name

        if __name__ == "__main__":
            with Executor(1) as ex:
                try:
                    ex.submit(fun, 1).result(timeout=60)
                except Exception as e:
                    note(f"{type(e).__name__}: {e}")
                note(ex.submit(names, False).result(timeout=60))
            with Pool(1) as pool:
                note(pool.apply(names, (True,)))
                try:
                    pool.apply(missing, (0,))
                except AttributeError as e:
                    note(e)
        """,
    )
    run = prog.run(timeout=90, env={"IMPL": impl, "WARDEN_START": start})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == [
        "_RemoteTraceback: error 1",
        "[[], 'SimpleQueue', 'Lock']",
        "[[], 'SimpleQueue', 'Lock']",
        "module 'multiprocessing' has no attribute 'no_such_name'",
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_what_the_program_printed_before_starting_workers_comes_before_what_they_print(program, impl):
    """With stdout a pipe (block-buffered: a log file, ``| tee``, CI), the
    standard library flushes the parent's streams before it starts a child,
    so a header printed before a pool or ``Process`` precedes the output of
    its tasks; warden's came out after all of it."""
    prog = user_program(
        program,
        """
        def job(where):
            print("task", where, flush=True)

        if __name__ == "__main__":
            print("before executor")
            with Executor(1) as ex:
                ex.submit(job, "executor").result(60)
            print("before pool")
            with Pool(1) as pool:
                pool.apply(job, ("pool",))
            print("before process")
            p = Process(target=job, args=("process",))
            p.start()
            p.join(60)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl, "PYTHONUNBUFFERED": ""})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "before executor",
        "task executor",
        "before pool",
        "task pool",
        "before process",
        "task process",
    ], run.stderr


def name_and_parent():
    parent = multiprocessing.parent_process()
    me = multiprocessing.current_process()
    return me.name, parent.pid if parent else None, parent.name if parent else None


def test_pool_workers_are_active_children_with_pid_name_and_is_alive(impl):
    with impl.Pool(2) as pool:
        pool.map(identity, range(8))
        assert wait_until(lambda: len(multiprocessing.active_children()) == 2)
        children = multiprocessing.active_children()
        pids = {c.pid for c in children}
        assert all(c.is_alive() and c.name for c in children)
        worker_pids = set(pool.map(os_getpid_of, range(8), chunksize=1))
        assert worker_pids <= pids
        assert {c.pid for c in pool._pool} == pids
        assert pool._processes == 2
        name, parent_pid, _ = pool.apply(name_and_parent)
        assert parent_pid == os.getpid()
        assert name in {c.name for c in children}
    assert wait_until(lambda: multiprocessing.active_children() == [], timeout=30)


def start_a_thread_that_writes(path, seconds):
    def work():
        time.sleep(seconds)
        with open(path, "w") as f:
            f.write("thread finished\n")

    threading.Thread(target=work).start()  # not a daemon
    return os.getpid()


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_waits_for_the_threads_its_tasks_started_before_it_exits(impl, kind, tmp_path):
    out = tmp_path / "thread.txt"
    if kind == "executor":
        with impl.Executor(1) as ex:
            ex.submit(start_a_thread_that_writes, str(out), 0.5).result(timeout=60)
    else:
        pool = impl.Pool(1)
        pool.apply(start_a_thread_that_writes, (str(out), 0.5))
        pool.close()
        pool.join()
    # Written before shutdown()/join() returned: the worker waited for it.
    assert out.read_text() == "thread finished\n"


def keep_a_thread_pool_and_use_it():
    global _THREADS
    _THREADS = concurrent.futures.ThreadPoolExecutor(2)  # never shut down
    _THREADS.submit(print, "used", flush=True).result(timeout=60)


def test_a_process_whose_target_keeps_a_thread_pool_ends_when_its_target_returns(impl):
    # The child's interpreter exit shuts the pool's idle threads down
    # (threading's exit hooks) before it waits for non-daemon threads.
    p = impl.Process(target=keep_a_thread_pool_and_use_it)
    p.start()
    p.join(60)
    assert not p.is_alive()
    assert p.exitcode == 0


BREAK_PICKLE = """
import concurrent.futures, multiprocessing, os, pickle, sys
import warden

def patch_pickle_in_this_worker():
    def broken(*args, **kwargs):
        raise RuntimeError("an instrumentation wrapper with a bug")
    pickle.loads = pickle.dumps = broken  # a mock.patch left behind, say
    return os.getpid()

def pid_of(*args):
    return os.getpid()

if __name__ == "__main__":
    if sys.argv[1] == "warden":
        ex = warden.ProcessPoolExecutor(1)
    else:
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with ex:
        patched = ex.submit(patch_pickle_in_this_worker).result(timeout=60)
        later = [ex.submit(pid_of, i).result(timeout=60) for i in range(5)]
        print("same worker, every task done" if later == [patched] * 5 else later, flush=True)
"""


def test_a_task_that_breaks_pickle_in_its_worker_fails_no_later_task(impl, program):
    run = program(BREAK_PICKLE).run(args=(impl.name,), timeout=120)
    assert run.stdout.strip() == "same worker, every task done", run.stdout + run.stderr


class SlowToDie:
    """A result whose __del__, in the worker that made it, waits until a file
    appears (a connection closed, a thread joined): 60 s at most."""

    def __init__(self, flag):
        self.flag, self.pid = flag, os.getpid()

    def __del__(self):
        deadline = time.monotonic() + 60
        while os.getpid() == self.pid and not os.path.exists(self.flag) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __reduce__(self):
        return (str, (self.flag,))


def make_slow_to_die(flag):
    return SlowToDie(flag)


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_result_arrives_before_its_objects_slow_del_runs_in_the_worker(impl, kind, tmp_path):
    flag = str(tmp_path / "let-it-die")
    try:
        if kind == "executor":
            with impl.Executor(1) as ex:
                assert ex.submit(make_slow_to_die, flag).result(timeout=30) == flag
                open(flag, "w").close()
        else:
            with impl.Pool(1) as pool:
                assert pool.apply_async(make_slow_to_die, (flag,)).get(timeout=30) == flag
                open(flag, "w").close()
    finally:
        open(flag, "w").close()


def identity_after(seconds):
    time.sleep(seconds)
    return multiprocessing.current_process()._identity


def test_pool_workers_number_themselves_in_their_identity_from_one(impl):
    with impl.Pool(2, maxtasksperchild=1) as pool:
        seen = sorted(pool.map(identity_after, [0.05] * 4, chunksize=1))
    # Four workers in turn, each with a number of its own, counted from 1:
    # current_process()._identity[0].
    assert [len(i) for i in seen] == [1, 1, 1, 1]
    assert len({i[0] for i in seen}) == 4 and min(i[0] for i in seen) >= 1
    with impl.Executor(2) as ex:
        numbers = set(ex.map(identity_after, [0.2] * 4))
    assert all(len(i) == 1 and i[0] >= 1 for i in numbers)


def nested_pool_names(pool_type, queue):
    me = multiprocessing.current_process()
    with pool_type(2) as pool:
        seen = pool.map(name_and_identity_after, [0.2] * 2, chunksize=1)
    queue.put((me._identity, seen))


def name_and_identity_after(seconds):
    time.sleep(seconds)
    me = multiprocessing.current_process()
    return me.name, me._identity


def test_the_workers_of_a_pool_made_in_a_child_number_themselves_after_it(impl):
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    p = impl.Process(target=nested_pool_names, args=(impl.Pool, queue))
    p.start()
    try:
        child, seen = queue.get()
    finally:
        p.join(60)
    # Their numbers follow the child's, as its other children's do, and
    # their names end with them: a log line tells them from the top level's.
    assert len({identity for _, identity in seen}) == 2
    for name, identity in seen:
        assert len(identity) == 2 and identity[:1] == child, (child, seen)
        assert name.endswith("-" + ":".join(map(str, identity))), (name, identity)


def test_a_future_no_pool_made_cancels_as_the_standard_librarys(impl):
    cls = warden.Future if impl.name == "warden" else concurrent.futures.Future
    f = cls()
    assert f.cancel() is True
    assert f.cancelled()
    assert f.set_running_or_notify_cancel() is False
    g = cls()
    assert g.set_running_or_notify_cancel() is True
    assert g.cancel() is False
    g.set_result(3)
    assert g.result(timeout=1) == 3


def test_the_executor_refuses_a_max_workers_that_is_not_an_integer_at_construction(impl):
    for bad in (2.0, "2"):
        with pytest.raises(TypeError):
            impl.Executor(bad)


def test_a_process_is_an_active_child_until_joined_and_its_child_sees_its_parent(impl):
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    p = impl.Process(target=put_name_and_parent, args=(queue,), name="child-7")
    p.start()
    assert p in multiprocessing.active_children()
    assert queue.get() == ("child-7", os.getpid(), multiprocessing.current_process().name)
    p.join(60)
    assert p not in multiprocessing.active_children()


def put_name_and_parent(queue):
    queue.put(name_and_parent())


def os_getpid_of(_):
    time.sleep(0.01)
    return os.getpid()


def test_executor_processes_max_workers_and_mp_context_are_live_compatibility_views():
    with warden.ProcessPoolExecutor(2) as ex:
        assert ex._max_workers == 2
        assert ex._mp_context is multiprocessing.get_context("spawn")
        assert ex._processes == {}
        pids = set(ex.map(os_getpid_of, range(8)))
        assert wait_until(lambda: len(ex._processes) == 2)
        assert pids <= set(ex._processes)
        victim = ex._processes[min(pids)]
        assert victim.pid == min(pids) and victim.is_alive() and victim.exitcode is None
        victim.terminate()
        victim.join(30)
        assert not victim.is_alive()
        assert victim.exitcode == -signal.SIGTERM
        assert wait_until(lambda: len(ex._processes) == 2 and min(pids) not in ex._processes)
        other = next(iter(ex._processes.values()))
        other.kill()
        other.join(30)
        assert other.exitcode == -signal.SIGKILL
        assert ex.submit(identity, 5).result(timeout=60) == 5  # the pool goes on
    forkserver = multiprocessing.get_context("forkserver")
    assert warden.ProcessPoolExecutor(1, mp_context=forkserver)._mp_context is forkserver


def test_an_executors_workers_are_listed_as_not_daemonic_and_a_pools_as_daemonic(impl):
    # What a program reads from _processes and _pool: the standard library
    # starts an executor's workers non-daemonic, a Pool's daemonic.
    with impl.Executor(1) as ex:
        assert ex.submit(identity, 1).result(timeout=60) == 1
        views = list(ex._processes.values())
        assert views and [w.daemon for w in views] == [False] * len(views)
        assert all("daemon" not in repr(w) for w in views)
    with impl.Pool(1) as pool:
        assert pool.apply(identity, (1,)) == 1
        assert [w.daemon for w in pool._pool] == [True]
        assert "daemon" in repr(pool._pool[0])


def test_an_executor_lists_a_started_worker_in_processes_as_soon_as_submit_returns(impl):
    # A common way out of a stuck executor: terminate what _processes lists.
    ex = impl.Executor(2)
    try:
        future = ex.submit(sleep_then, 2, "done")
        workers = list(ex._processes.values())
        assert workers, "no worker listed right after submit()"
        for worker in workers:
            assert worker.is_alive()
            worker.terminate()
        # Not join(): the standard library's executor reaps its workers on its
        # own thread, and a second thread's join may then never see the exit.
        pids = [worker.pid for worker in workers]
        assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=60)
        # The standard library breaks the whole pool; warden fails the task if
        # its worker was running it, and runs it on another if not.
        try:
            assert future.result(timeout=60) == "done"
        except concurrent.futures.process.BrokenProcessPool:
            pass
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def failing_initializer():
    raise ValueError("error in initializer")


def test_an_executor_whose_initializer_fails_is_broken_and_says_why(impl):
    ex = impl.Executor(1, initializer=failing_initializer)
    try:
        assert ex._broken is False
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(identity, 1).result(timeout=60)
        assert wait_until(lambda: ex._broken)
        assert isinstance(ex._broken, str) and ex._broken
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(identity, 1)
    finally:
        ex.shutdown(wait=True)


def slowly_failing_initializer(seconds):
    time.sleep(seconds)
    raise ValueError("error in initializer, after a while")


def test_an_executor_whose_initializer_fails_slowly_is_broken_too(impl):
    # Never more than one failure in the restart window: only failures in a
    # row, with no worker getting ready, show the pool cannot start.
    kwargs = {"restart_limit": (3, 0.25)} if impl.name == "warden" else {}
    ex = impl.Executor(1, initializer=slowly_failing_initializer, initargs=(0.4,), **kwargs)
    try:
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(identity, 1).result(timeout=60)
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(identity, 1)
    finally:
        ex.shutdown(wait=True)


LOADED = None


def load_slowly(seconds):
    global LOADED
    time.sleep(seconds)
    LOADED = f"loaded by {os.getpid()}"


def loaded(_=None):
    return LOADED


def test_an_initializer_slower_than_the_start_timeout_runs_to_its_end_as_the_standard_librarys(
    impl, monkeypatch
):
    """An initializer has no time limit in the standard library (a model
    that takes minutes to load): the timeout on a worker's start (here 1 s,
    the core's default is 60 s) covers the start up to its hello, not the
    initializer, which is never cut short and retried."""
    monkeypatch.setattr(warden._runner, "INIT_TIMEOUT", 1.0)
    with impl.Executor(1, initializer=load_slowly, initargs=(3,)) as ex:
        executor_result = ex.submit(loaded).result(timeout=60)
    with impl.Pool(1, initializer=load_slowly, initargs=(3,)) as pool:
        pool_result = pool.apply_async(loaded).get(timeout=60)
    for result in (executor_result, pool_result):
        assert result is not None and result.startswith("loaded by ")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "failure", ['raise ValueError("no database")', 'sys.exit("no database")'], ids=["error", "sys.exit"]
)
def test_a_failing_executor_initializer_is_logged_by_concurrent_futures_with_its_traceback(
    program, impl, failure
):
    """A ``sys.exit()`` too (a ``BaseException``): it went to stderr raw, not
    through the ``concurrent.futures`` logger the parent's handlers see."""
    prog = user_program(
        program,
        """
        import sys

        def init():
            FAILURE

        def work():
            return 1

        if __name__ == "__main__":
            ex = Executor(1, initializer=init)
            try:
                ex.submit(work).result(timeout=60)
            except concurrent.futures.BrokenExecutor as e:
                note(f"broken {type(e).__name__}")
            ex.shutdown()
        """.replace("FAILURE", failure),
    )
    run = prog.run(timeout=120, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines()[0].startswith("broken")
    # Once: the executor is broken at the first failure, no worker retried.
    assert run.stderr.count("Exception in initializer:") == 1, run.stderr
    raised = "ValueError: no database" if failure.startswith("raise") else "SystemExit: no database"
    assert raised in run.stderr and "Traceback" in run.stderr


def test_a_negative_timeout_polls_in_join_and_event_wait(impl):
    # The standard library's waits take a negative timeout as no wait at all.
    p = impl.Process(target=time.sleep, args=(30,))
    p.start()
    try:
        started = time.monotonic()
        assert p.join(-1) is None
        assert p.is_alive()
        event = impl.Event()
        assert event.wait(-1) is False
        assert time.monotonic() - started < 10
    finally:
        p.terminate()
        p.join(60)
    assert not p.is_alive()


# -- libraries that check types or pass locks ----------------------------------


def pid_of(_):
    return os.getpid()


def test_dask_takes_a_warden_pool_where_it_takes_a_multiprocessing_pool(impl):
    dask = pytest.importorskip("dask", reason="dask is an optional test dependency (`make test` installs it)")
    with impl.Pool(2) as pool, dask.config.set(scheduler="processes", pool=pool):
        assert isinstance(pool, multiprocessing.pool.Pool)
        pids = dask.compute(*[dask.delayed(pid_of)(i) for i in range(6)])
        workers = {w.pid for w in pool._pool}
    assert len(workers) == 2
    assert set(pids) <= workers


def kill_own_worker(_):
    os.kill(os.getpid(), signal.SIGKILL)


def square(x):
    return x * x


def test_dask_on_a_warden_pool_goes_on_after_tasks_killed_their_workers():
    # dask takes len(pool._pool) for the number of workers, and submits
    # nothing when it reads 0; warden's pool outlives a crash, so the program
    # catches it and goes on.
    dask = pytest.importorskip("dask", reason="dask is an optional test dependency (`make test` installs it)")
    with warden.Pool(2) as pool, dask.config.set(scheduler="processes", pool=pool):
        for _ in range(20):
            with pytest.raises(warden.WorkerCrashed):
                dask.compute(dask.delayed(kill_own_worker)(0), dask.delayed(kill_own_worker)(1))
            assert len(pool._pool) == 2
            assert dask.compute(dask.delayed(square)(3)) == (9,)


def test_a_pool_lists_as_many_workers_as_it_has_right_after_they_crashed():
    # What dask reads above, looked at the moment both crashes are known
    # (the pool is then still replacing one of them, often).
    with warden.Pool(2) as pool:
        assert len(pool._pool) == 2
        sizes = collections.Counter()
        for _ in range(100):
            crashes = [pool.apply_async(kill_own_worker, (i,)) for i in range(2)]
            for crash in crashes:
                with pytest.raises(warden.WorkerCrashed):
                    crash.get(60)
            sizes[len(pool._pool)] += 1
        assert sizes == {2: 100}
        assert all(w.is_alive() for w in pool._pool)


@pytest.mark.parametrize("used", [True, False], ids=["used", "stopped-at-once"])
@pytest.mark.parametrize("stop", ["terminate", "close"])
def test_a_stopped_pool_still_lists_as_many_workers_exited(impl, stop, used):
    # The standard library keeps its list of (exited) workers; dask, given
    # such a pool, then gets "Pool not running" from apply_async, not a hang.
    pool = impl.Pool(2)
    try:
        if used:
            assert pool.apply(identity, (1,)) == 1
        getattr(pool, stop)()
        pool.join()
        assert len(pool._pool) == 2
        assert not any(w.is_alive() for w in pool._pool)
        with pytest.raises(ValueError, match="Pool not running"):
            pool.apply_async(identity, (1,))
    finally:
        pool.terminate()


def pidfds():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except FileNotFoundError:  # the listing's own
            pass
    return count


def test_a_joined_pool_kept_by_the_program_holds_no_pidfd_of_its_workers():
    before = pidfds()
    pool = warden.Pool(2)
    try:
        slow = pool.apply_async(time.sleep, (0.5,))
        assert len(pool._pool) == 2
        pool.close()  # the idle worker retires
        assert wait_until(lambda: len(pool._warden_runner.core.workers()) == 1, timeout=30)
        assert len(pool._pool) == 2
        slow.get(60)
        pool.join()
        assert len(pool._pool) == 2
        assert pidfds() == before
    finally:
        pool.terminate()


def test_a_pool_replacing_workers_after_each_task_lists_no_more_than_its_size():
    with warden.Pool(2, maxtasksperchild=1) as pool:
        sizes = set()
        for _ in range(20):
            pool.map(identity, range(4), chunksize=1)
            sizes.add(len(pool._pool))
    assert sizes == {2}


def test_a_fork_context_lock_in_initargs_is_refused_once_naming_it_and_the_fix(program):
    pytest.importorskip("tqdm", reason="tqdm is an optional test dependency (`make test` installs it)")
    prog = program(
        """
        import concurrent.futures, multiprocessing, traceback
        import warden
        concurrent.futures.ProcessPoolExecutor = warden.ProcessPoolExecutor  # the drop-in
        import tqdm.auto
        from tqdm.contrib.concurrent import process_map

        def square(x):
            return x * x

        if __name__ == "__main__":
            try:
                process_map(square, range(5), max_workers=2, disable=True)
            except RuntimeError as e:
                print("error:", e)
                shown = "".join(traceback.format_exception(e))
                print("shown:", shown.count("was made for"), "fork context" in shown, "cloudpickle" in shown)
            # The recipe in docs/python.md:
            tqdm.auto.tqdm.set_lock(multiprocessing.get_context("spawn").RLock())
            print("result:", process_map(square, range(5), max_workers=2, disable=True))
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    error = next(line for line in run.lines if line.startswith("error:"))
    assert error.startswith(
        "error: initargs[0] (a multiprocessing.synchronize.RLock) was made for the 'fork'"
    )
    assert 'multiprocessing.get_context("spawn")' in error
    assert "tqdm.auto.tqdm.set_lock(" in error
    assert "shown: 1 False False" in run.lines  # once: not again by cloudpickle, nor as a context
    assert "result: [0, 1, 4, 9, 16]" in run.lines


def test_a_fork_context_queue_kept_on_a_process_subclass_is_refused_naming_the_attribute(program):
    # The producer/consumer recipe: a Process subclass that keeps its queue
    # as an attribute, made from the default (fork) context.
    prog = program(
        """
        import multiprocessing
        import warden

        class Consumer(warden.Process):
            def __init__(self, tasks):
                super().__init__()
                self.tasks = tasks

            def run(self):
                print(self.tasks.get())

        if __name__ == "__main__":
            try:
                Consumer(multiprocessing.Queue()).start()
            except RuntimeError as e:
                print("error:", e)
            tasks = multiprocessing.get_context("spawn").Queue()
            tasks.put("job")
            c = Consumer(tasks)
            c.start()
            c.join(60)
            print("exit", c.exitcode)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    error = next(line for line in run.lines if line.startswith("error:"))
    assert error.startswith(
        "error: self.tasks (a multiprocessing.queues.Queue holding a multiprocessing.synchronize.Lock) "
        "was made for the 'fork' start method"
    ), error
    assert "tqdm" not in error  # its hint is for tqdm's lock only
    assert run.lines[-2:] == ["job", "exit 0"], run.stdout


# -- a stop while starting -----------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_a_process_terminated_while_it_imports_ends_quietly_by_that_signal(program, impl):
    prog = user_program(
        program,
        """
        if __name__ == "__mp_main__":
            note("importing")
            try:
                time.sleep(30)  # a heavy import, which turns any error into its own
            except BaseException as e:
                raise ImportError("the import failed") from e

        def work():
            note("ran")

        if __name__ == "__main__":
            p = Process(target=work)
            p.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not os.path.exists(os.environ["OUT"]):
                time.sleep(0.02)
            time.sleep(0.2)
            p.terminate()
            p.join(30)
            print("exitcode", p.exitcode)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["importing"]
    assert run.lines == ["exitcode -15"]
    assert "Traceback" not in run.stderr and "failed to start" not in run.stderr


def test_pool_workers_terminated_while_their_initializer_imports_end_quietly(program):
    prog = program(
        """
        import os, sys, time, warden

        def heavy_import():
            with open(os.environ["OUT"], "a") as f:
                f.write(f"importing {os.getpid()}\\n")
            try:
                time.sleep(30)
            except BaseException as e:
                raise ImportError("the import failed") from e

        if __name__ == "__main__":
            pool = warden.Pool(2, initializer=heavy_import)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if os.path.exists(os.environ["OUT"]) and len(open(os.environ["OUT"]).readlines()) == 2:
                    break
                time.sleep(0.02)
            time.sleep(0.2)
            pool.terminate()
            print("failure", pool._warden_runner.core.failure())
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(prog.out_lines()) == 2
    assert run.lines == ["failure None"]
    assert "Traceback" not in run.stderr and "failed to start" not in run.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_a_pool_closed_at_once_still_starts_every_worker_and_runs_each_initializer(program, impl):
    prog = user_program(
        program,
        """
        def hello():
            note(f"init {os.getpid()}")

        if __name__ == "__main__":
            pool = Pool(3, initializer=hello)
            pool.close()
            pool.join()
            print("joined")
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    inits = prog.out_lines()
    assert len(inits) == 3 and len(set(inits)) == 3, inits


def test_each_worker_of_a_pool_closed_at_once_runs_its_initializer_then_its_finalizer(program):
    prog = program(
        """
        import os, warden

        def note(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(f"{text} {os.getpid()}\\n")

        if __name__ == "__main__":
            pool = warden.Pool(3, initializer=note, initargs=("init",), finalizer=note, finalargs=("final",))
            pool.close()
            pool.join()
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [line.split() for line in prog.out_lines()]
    pids = {pid for _, pid in lines}
    assert len(pids) == 3
    for pid in pids:
        assert [what for what, p in lines if p == pid] == ["init", "final"]


def test_a_worker_told_to_stop_drops_the_work_pending_in_executors_it_started(program):
    prog = program(
        """
        import os, time, warden

        def note(text):
            with open(os.environ["OUT"], "a") as f:
                f.write(text + "\\n")

        def outer():
            inner = warden.ProcessPoolExecutor(1)
            for _ in range(3):
                inner.submit(time.sleep, 60)
            note("submitted")
            time.sleep(60)

        if __name__ == "__main__":
            pool = warden.Pool(1)
            pool.apply_async(outer)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not os.path.exists(os.environ["OUT"]):
                time.sleep(0.02)
            pool.terminate()
            exit = pool._warden_runner.core.last_exit()
            print("worker ended by signal", exit.signal)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["submitted"]
    assert run.lines == ["worker ended by signal 15"]  # its exit path ran to the end, not killed
    assert "3 submitted tasks dropped at interpreter exit" in run.stderr


@pytest.mark.parametrize("kind", ["executor", "pool"])
@pytest.mark.parametrize("impl", IMPLS)
def test_tasks_start_in_the_order_they_were_submitted_when_one_runs_long(program, impl, kind):
    # Six tasks on two workers, the second long: under the standard library
    # each free worker takes the next task from one shared queue. Tasks sent
    # ahead to the worker of the long one must not wait behind it while
    # later tasks start on the other.
    prog = user_program(
        program,
        """
        def run(i, seconds):
            started = time.monotonic()
            time.sleep(seconds)
            return i, started

        if __name__ == "__main__":
            durations = [0.3, 2.0, 0.3, 0.3, 0.3, 0.3]
            if sys.argv[1] == "executor":
                with Executor(2) as ex:
                    ex.submit(run, -1, 0).result()  # both workers up
                    ex.submit(run, -1, 0).result()
                    pending = [ex.submit(run, i, d) for i, d in enumerate(durations)]
                    results = [f.result() for f in pending]
            else:
                with Pool(2) as pool:
                    pool.apply(run, (-1, 0))
                    pending = [pool.apply_async(run, (i, d)) for i, d in enumerate(durations)]
                    results = [r.get() for r in pending]
            order = [i for i, started in sorted(results, key=lambda r: r[1])]
            print("start order", order)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl}, args=(kind,))
    assert run.returncode == 0, run.stderr
    order = [int(i) for i in run.stdout.split("[", 1)[1].rstrip("]\n").split(",")]
    assert sorted(order[:2]) == [0, 1] and order[2:] == [2, 3, 4, 5], run.stdout


@pytest.mark.parametrize("impl", IMPLS)
def test_tasks_of_mixed_lengths_start_in_the_order_they_were_submitted(program, impl):
    # Tasks of tens to hundreds of milliseconds on two workers: under the
    # standard library each free worker takes the next task from one queue,
    # so no task starts before one submitted earlier.
    prog = user_program(
        program,
        """
        def run(i, seconds):
            started = time.monotonic()
            time.sleep(seconds)
            return i, started

        if __name__ == "__main__":
            durations = [0.05, 0.3, 0.05, 0.05, 0.2, 0.05, 0.3, 0.05, 0.05, 0.1, 0.05, 0.05]
            with Executor(2) as ex:
                list(ex.map(run, [-1, -2], [0.05, 0.05]))  # both workers up, tasks timed
                pending = [ex.submit(run, i, d) for i, d in enumerate(durations)]
                results = [f.result() for f in pending]
            # A task that started clearly (40 ms) before one submitted earlier.
            # (Two tasks given out at once, to both workers, start in either order.)
            starts = [started for _, started in results]
            pairs = [(i, j) for i in range(len(starts)) for j in range(i + 1, len(starts))]
            late = [(j, i) for i, j in pairs if starts[j] < starts[i] - 0.04]
            print("started before an earlier one:", late)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["started before an earlier one: []"]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_task_or_a_process_target_can_start_its_own_session(program, impl):
    # warden makes each worker the leader of its own process group, where the
    # kernel refuses setsid(); a child the standard library spawns is not one.
    prog = user_program(
        program,
        """
        import subprocess

        def detach():
            os.setsid()
            return os.getsid(0) == os.getpid() and os.getpgrp() == os.getpid()

        def detach_and_leave_a_child():
            os.setsid()
            return subprocess.Popen(["sleep", "60"]).pid

        if __name__ == "__main__":
            with Executor(1) as ex:
                print("task", ex.submit(detach).result())
            p = Process(target=detach)
            p.start()
            p.join()
            print("process exit code", p.exitcode)
            with Executor(1) as ex:
                child = ex.submit(detach_and_leave_a_child).result()
            time.sleep(0.5)
            alive = os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z"
            print("child left running", alive)
            if alive:
                os.kill(child, 9)
        """,
    )
    run = prog.run(timeout=60, env={"IMPL": impl})
    assert run.returncode == 0, run.stderr
    # A worker's new session is still its own group: what it leaves running
    # there is stopped as it is reaped (warden), or orphaned (the standard library).
    left = "True" if impl == "stdlib" else "False"
    expected = ["task True", "process exit code 0", f"child left running {left}"]
    assert run.lines == expected, run.stdout + run.stderr


def _can_unshare_a_pid_namespace() -> bool:
    try:
        command = ["unshare", "--fork", "--pid", "--mount-proc", "true"]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_pid_namespace = pytest.mark.skipif(
    not _can_unshare_a_pid_namespace(),
    reason="needs unshare(1) and the right to make a PID namespace (root, or user namespaces)",
)


@needs_pid_namespace
@pytest.mark.parametrize("impl", IMPLS)
def test_in_a_pid_namespace_outside_its_callers_group_exit_codes_and_setsid_are_as_elsewhere(program, impl):
    # Under `unshare --fork --pid`, the program (PID 1 there) is in a process
    # group of the caller's namespace: getpgid() answers 0 for it. A child
    # that moved to that "group 0" (itself) and killed its group as it ended
    # died by SIGKILL whatever its exit code; setsid() found no group to move to.
    prog = user_program(
        program,
        """
        import signal

        def ends_with(code):
            sys.exit(code)

        def fails():
            raise ValueError("the target's error")

        def sleeps():
            time.sleep(60)

        def detach():
            os.setsid()
            return os.getsid(0) == os.getpid()

        if __name__ == "__main__":
            codes = []
            for target, args in ((ends_with, (0,)), (ends_with, (3,)), (fails, ())):
                p = Process(target=target, args=args)
                p.start()
                p.join(30)
                codes.append(p.exitcode)
            p = Process(target=sleeps)
            p.start()
            time.sleep(0.5)
            p.terminate()
            p.join(30)
            codes.append(p.exitcode)
            print("exit codes", codes)
            with Executor(1) as ex:
                print("task starts a session", ex.submit(detach).result(timeout=30))
            p = Process(target=detach)
            p.start()
            p.join(30)
            print("process starts a session, exit code", p.exitcode)
        """,
    )
    proc = prog.start(
        env={"IMPL": impl},
        command=["unshare", "--fork", "--pid", "--mount-proc", sys.executable, str(prog.path)],
    )
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "exit codes [0, 3, 1, -15]",
        "task starts a session True",
        "process starts a session, exit code 0",
    ], out + err


@pytest.mark.parametrize("where", ["atexit", "thread-after-main"])
def test_a_programs_first_pool_made_while_the_interpreter_shuts_down_runs_as_under_fork(program, where):
    """The first pool made in an ``atexit`` handler, or in a thread that
    runs on after the main thread returned: it runs, as under the standard
    library's default (fork) start method (an executor the thread makes
    refuses work, as every executor does then); before, importing warden's pool
    raised "can't register atexit after shutdown" (the standard library's
    spawn pool hangs there)."""
    if where == "atexit" and sys.version_info >= (3, 12):
        pytest.skip("Python 3.12 starts no thread nor process in atexit handlers (its fork pool fails too)")
    if (3, 12) <= sys.version_info < (3, 13):
        pytest.skip(
            "Python 3.12 starts no thread nor process once the main thread has returned "
            "(its fork pool fails too: can't fork at interpreter shutdown)"
        )
    prog = program(
        f"""
        import atexit, threading, time

        def square(x):
            return x * x

        def use_a_pool():
            import warden
            with warden.Pool(2) as pool:
                print("pool", pool.map(square, range(4)), flush=True)
            with warden.ProcessPoolExecutor(1) as ex:
                try:
                    print("executor", ex.submit(square, 5).result(timeout=60), flush=True)
                except RuntimeError as e:
                    print("executor", e, flush=True)

        def later():
            time.sleep(0.3)
            use_a_pool()

        if __name__ == "__main__":
            if "{where}" == "atexit":
                atexit.register(use_a_pool)
            else:
                threading.Thread(target=later).start()
            print("main returns", flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    # An executor a thread makes then refuses work, as the standard
    # library's do from then on (see
    # test_an_executor_a_thread_makes_once_the_main_thread_has_finished_refuses_work).
    executor = (
        "executor 25"
        if where == "atexit"
        else "executor cannot schedule new futures after interpreter shutdown"
    )
    assert run.stdout.splitlines() == ["main returns", "pool [0, 1, 4, 9]", executor], run.stderr


@pytest.mark.parametrize(
    "before",
    [
        "import warden",
        "from warden import ProcessPoolExecutor",
        "a Pool used in main",
        "the same function submitted in main",
    ],
)
def test_an_executor_made_in_an_atexit_handler_works_whatever_the_program_used_before(program, before):
    """Whether warden's executor module was loaded before the interpreter
    began to shut down (by a top-level import, or by a pool the program
    used) does not change what an executor made in an ``atexit`` handler
    does: it works, as a ``Pool`` made there does. Nor does a call of the
    same function of main sent by reference before: once main's script has
    run, a new worker cannot import main, and the function goes by value."""
    if sys.version_info[:2] == (3, 12):
        pytest.skip("Python 3.12 starts no thread in atexit handlers")
    prog = program(
        f"""
        import atexit
        import warden
        {"from warden import ProcessPoolExecutor" if "from" in before else ""}

        def square(x):
            return x * x

        def use_an_executor():
            with warden.ProcessPoolExecutor(1) as ex:
                print("executor", ex.submit(square, 7).result(timeout=60), flush=True)

        if __name__ == "__main__":
            if "{before}" == "a Pool used in main":
                with warden.Pool(1) as pool:
                    pool.map(square, [1])
            if "{before}" == "the same function submitted in main":
                with warden.ProcessPoolExecutor(1) as ex:
                    ex.submit(square, 2).result(timeout=60)
            atexit.register(use_an_executor)
            print("main returns", flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["main returns", "executor 49"], run.stderr


@pytest.mark.parametrize("starts", ["an executor", "a Process", "an executor in warden.at_exit"])
def test_a_pool_or_process_started_after_wardens_exit_step_is_refused_though_main_used_none(program, starts):
    """An ``atexit`` handler registered before ``import warden`` runs after
    warden's exit step. If the program had used no pool before, warden's
    pool module was first loaded there and took the start: the executor's
    second task, the ``Process``'s target, were lost without a word (the
    interpreter's end killed the workers). Now it is refused, as it is
    when the program used a pool first."""
    prog = program(
        f"""
        import atexit, time

        def slow(x):
            time.sleep(x)
            return x

        def target():
            print("target ran", flush=True)

        def start():
            import warden
            try:
                if "{starts}" == "a Process":
                    warden.Process(target=target).start()
                else:
                    ex = warden.ProcessPoolExecutor(1)
                    print("first", ex.submit(slow, 0.1).result(timeout=60), flush=True)
                    ex.submit(slow, 0.5).add_done_callback(lambda f: print("second", f.result(), flush=True))
            except RuntimeError as e:
                print("refused:", e, flush=True)

        if __name__ == "__main__":
            if "{starts}" == "an executor in warden.at_exit":
                import warden
                warden.at_exit(start)
            else:
                atexit.register(start)
                import warden
            print("main returns", flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    refused = (
        "refused: cannot start new workers"
        if starts == "a Process"
        else "refused: cannot schedule new futures"
    )
    lines = run.stdout.splitlines()
    assert lines[0] == "main returns" and len(lines) == 2, run.stdout + run.stderr
    assert lines[1].startswith(refused), run.stdout + run.stderr


STALE_CTRL_C = """
import code, concurrent.futures, multiprocessing, sys, time
import warden

def slow(x):
    time.sleep(0.2)
    print("task done", x, flush=True)
    return x

if __name__ == "__main__":
    # An embedded interpreter reports a Ctrl-C: it stays in sys.last_value.
    code.InteractiveInterpreter().runsource("raise KeyboardInterrupt")
    if sys.argv[1] == "warden":
        ex = warden.ProcessPoolExecutor(1)
    else:
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    futures = [ex.submit(slow, i) for i in range(3)]
    print("main done", flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_ctrl_c_reported_long_before_exit_does_not_drop_the_pending_tasks(program, impl):
    """``sys.last_value`` keeps the last exception reported (at a REPL's
    prompt, by ``code.interact``, by IPython) while the program goes on: a
    program ending normally after one still runs its pending tasks, as
    ``concurrent.futures`` promises; only a Ctrl-C that ends the program
    cuts them short (before, any KeyboardInterrupt left there did)."""
    run = program(STALE_CTRL_C).run(timeout=60, args=(impl,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["main done", "task done 0", "task done 1", "task done 2"], run.stderr


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_the_interactive_interpreter_runs_pending_tasks_at_exit_after_a_ctrl_c_at_its_prompt(tmp_path, impl):
    session = textwrap.dedent(
        f"""
        import concurrent.futures, multiprocessing, time
        import warden
        from slow import slow

        raise KeyboardInterrupt
        Executor = (warden.ProcessPoolExecutor, concurrent.futures.ProcessPoolExecutor)["{impl}" != "warden"]
        ex = Executor(1)
        futures = [ex.submit(slow, i) for i in range(3)]
        """
    )
    (tmp_path / "slow.py").write_text(
        "import time\ndef slow(x):\n    time.sleep(0.2)\n    print('task done', x, flush=True)\n"
    )
    run = subprocess.run(
        [sys.executable, "-i", "-q"], input=session, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["task", "done", "0", "task", "done", "1", "task", "done", "2"], run.stderr
