"""Every worker ends through one exit path: its worker
context exits, its finalizer runs, then a garbage collection, the atexit
handlers and a flush -- once, on every path that ends it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import re
import signal
import threading
import time

import pytest

import warden

from conftest import alive, descendants, wait_until

# Every test here runs with zygote-forked workers and with exec'd ones.
pytestmark = pytest.mark.usefixtures("start_method")


def log(path, *words):
    with open(path, "a") as f:
        f.write(" ".join(str(w) for w in (*words, os.getpid())) + "\n")


def lines_of(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class Cyclic:
    """Cyclic garbage whose __del__ leaves a trace."""

    def __init__(self, path):
        self.path = path
        self.me = self

    def __del__(self):
        log(self.path, "del")


def start_worker(path):
    # Collect garbage only at the exit path, so its place in the order shows.
    gc.disable()
    import atexit

    atexit.register(log, path, "atexit")
    log(path, "init")


@contextlib.contextmanager
def resource(path):
    log(path, "ctx-enter")
    try:
        yield f"resource-of-{os.getpid()}"
    finally:
        log(path, "ctx-exit")


def make_garbage(path):
    Cyclic(path)
    return os.getpid()


def use_context():
    return warden.worker_context()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def getpid():
    return os.getpid()


def events_for(path, pid):
    return [line.split()[0] for line in lines_of(path) if line.split()[-1] == str(pid)]


def pool_kwargs(path):
    return {
        "initializer": start_worker,
        "initargs": (path,),
        "finalizer": log,
        "finalargs": (path, "fin"),
        "worker_context": lambda: resource(path),
    }


def test_exit_path_runs_context_finalizer_gc_and_atexit_once_in_order(tmp_path):
    out = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, **pool_kwargs(out)) as ex:
        pid = ex.submit(make_garbage, out).result(30)
        assert ex.submit(use_context).result(30) == f"resource-of-{pid}"
    assert events_for(out, pid) == ["init", "ctx-enter", "ctx-exit", "fin", "del", "atexit"]


@contextlib.contextmanager
def stopped_while_entering(path):
    # A stop signal comes while the worker context is entered (after the
    # initializer returned), and the entering fails with an error of its own.
    log(path, "ctx-enter")
    os.kill(os.getpid(), signal.SIGTERM)
    raise ValueError("the resource is gone")
    yield  # never reached


def test_a_stop_after_the_initializer_returned_runs_the_finalizer_even_if_it_surfaces_as_another_error(
    tmp_path,
):
    out = tmp_path / "log"
    kwargs = {**pool_kwargs(out), "worker_context": lambda: stopped_while_entering(out)}
    pool = warden.Pool(1, **kwargs)
    try:
        assert wait_until(lambda: "ctx-enter" in [line.split()[0] for line in lines_of(out)], timeout=30)
    finally:
        pool.terminate()
        pool.join()
    first = lines_of(out)[0].split()[-1]
    assert events_for(out, first)[:3] == ["init", "ctx-enter", "fin"], lines_of(out)


def test_worker_context_is_only_available_inside_such_a_worker():
    with pytest.raises(RuntimeError, match="worker_context"):
        warden.worker_context()
    with warden.ProcessPoolExecutor(1) as ex, pytest.raises(RuntimeError, match="worker_context"):
        ex.submit(use_context).result(30)


def test_finalizer_runs_after_a_task_timeout(tmp_path):
    out = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, task_timeout=0.5, **pool_kwargs(out)) as ex:
        pid = ex.submit(getpid).result(30)
        with pytest.raises(warden.TaskTimeout):
            ex.submit(sleep_then, 30).result(30)
        assert wait_until(lambda: not alive(pid))
    assert events_for(out, pid)[-3:] == ["ctx-exit", "fin", "atexit"]


def start_worker_with_a_thread_pool(path):
    """An initializer that keeps a thread pool for the worker's tasks, never
    shut down (as most programs keep one)."""
    global _THREADS
    start_worker(path)
    _THREADS = concurrent.futures.ThreadPoolExecutor(4)


def sum_on_the_worker_thread_pool(n):
    return sum(_THREADS.map(abs, range(n))), os.getpid()


def leave_a_thread_sleeping(seconds):
    threading.Thread(target=time.sleep, args=(seconds,)).start()  # not a daemon
    return os.getpid()


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_keeping_a_thread_pool_retires_through_its_exit_path(tmp_path, kind):
    """Its thread pool ends as at interpreter exit (threading's exit hooks
    run before the worker waits for its threads), so the worker is not left
    waiting for idle threads until the pool kills it without its finalizer."""
    out = tmp_path / "log"
    kwargs = {**pool_kwargs(out), "initializer": start_worker_with_a_thread_pool}
    if kind == "executor":
        with warden.ProcessPoolExecutor(2, **kwargs) as ex:
            results = list(ex.map(sum_on_the_worker_thread_pool, [10, 20, 30, 40]))
    else:
        pool = warden.Pool(2, **kwargs)
        results = pool.map(sum_on_the_worker_thread_pool, [10, 20, 30, 40], chunksize=1)
        pool.close()
        pool.join()
    assert [total for total, _ in results] == [45, 190, 435, 780]
    pids = {pid for _, pid in results}
    for pid in pids:
        assert events_for(out, pid)[-3:] == ["ctx-exit", "fin", "atexit"], lines_of(out)


def test_a_thread_left_running_is_waited_for_one_grace_period_then_the_finalizer_runs(tmp_path):
    out = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, **pool_kwargs(out)) as ex:
        pid = ex.submit(leave_a_thread_sleeping, 600).result(30)
    # The pool's SIGTERM after its grace ends the wait; the exit path goes on.
    assert events_for(out, pid)[-3:] == ["ctx-exit", "fin", "atexit"], lines_of(out)
    assert not alive(pid)


@pytest.mark.parametrize("path", ["shutdown", "max_tasks_per_child", "terminate"])
def test_finalizer_runs_on_every_retirement_path(tmp_path, path):
    out = tmp_path / "log"
    if path == "max_tasks_per_child":
        with warden.ProcessPoolExecutor(1, max_tasks_per_child=1, **pool_kwargs(out)) as ex:
            first = ex.submit(getpid).result(30)
            ex.submit(getpid).result(30)
        pids = [first]
    elif path == "shutdown":
        ex = warden.ProcessPoolExecutor(2, **pool_kwargs(out))
        list(ex.map(sleep_then, [0.2, 0.2]))
        pids = [w.pid for w in ex._warden_runner.core.workers()]
        ex.shutdown()
    else:
        pool = warden.Pool(2, **pool_kwargs(out))
        pool.map_async(sleep_then, [30, 30], chunksize=1)
        assert wait_until(
            lambda: sum(w.running_task is not None for w in pool._warden_runner.core.workers()) == 2
        )
        pids = [w.pid for w in pool._warden_runner.core.workers()]
        pool.terminate()
    for pid in pids:
        assert wait_until(lambda pid=pid: not alive(pid))
    # A worker retired while still starting never initialized: nothing to finalize.
    pids = [pid for pid in pids if "init" in events_for(out, pid)]
    assert pids
    for pid in pids:
        assert "fin" in events_for(out, pid), lines_of(out)
        assert events_for(out, pid).count("fin") == 1
        assert events_for(out, pid)[-1] == "atexit"


def test_finalizers_run_when_the_parent_is_killed(program):
    prog = program(
        """
        import os, signal, time, warden
        def log(path, word):
            with open(path, "a") as f:
                f.write(f"{word} {os.getpid()}\\n")
        def busy(path):
            log(path, "busy")
            time.sleep(60)
        if __name__ == "__main__":
            out = os.environ["OUT"]
            ex = warden.ProcessPoolExecutor(2, finalizer=log, finalargs=(out, "fin"))
            ex.submit(busy, out)
            ex.submit(os.getpid).result()  # the other worker: idle
            while not os.path.exists(out) or open(out).read().count("busy") < 1:
                time.sleep(0.02)
            print(" ".join(str(w.pid) for w in ex._warden_runner.core.workers()), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = prog.run(timeout=30)
    assert run.returncode == -signal.SIGKILL
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=10)
    fins = sorted(int(line.split()[1]) for line in prog.out_lines() if line.startswith("fin"))
    assert fins == sorted(pids)


@pytest.mark.parametrize("kind", ["process", "pool"])
def test_a_child_whose_exit_path_blocks_still_dies_when_its_parent_is_killed(program, kind):
    # The exit path began while the parent lived (the target returned; the
    # pool closed), so the parent's death signal found the stop already
    # taken: the child lived on for ever, blocked in its exit path.
    prog = program(
        """
        import atexit, os, signal, sys, time, warden
        def mark_and_block(*_):
            with open(os.environ["OUT"], "a") as f:
                f.write(f"exiting {os.getpid()}\\n")
            time.sleep(1000)
        def target():
            atexit.register(mark_and_block)
        if __name__ == "__main__":
            out = os.environ["OUT"]
            if sys.argv[1] == "process":
                p = warden.Process(target=target)
                p.start()
            else:
                pool = warden.Pool(1, finalizer=mark_and_block)
                pool.apply(os.getpid)
                pool.close()
            while not os.path.exists(out) or "exiting" not in open(out).read():
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = prog.run(timeout=60, args=(kind,))
    assert run.returncode == -signal.SIGKILL, run.stderr
    [pid] = [int(line.split()[1]) for line in prog.out_lines() if line.startswith("exiting")]
    try:
        # The orphan's bound: the default grace period (5 s) once it sees the parent gone.
        assert wait_until(lambda: not alive(pid), timeout=20), "the child outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_process_exit_path_flushes_output_exactly_once(program):
    prog = program(
        """
        import sys, warden
        def chatty():
            sys.stdout.write("partial line without newline")
        if __name__ == "__main__":
            p = warden.Process(target=chatty)
            p.start(); p.join()
            with warden.ProcessPoolExecutor(1) as ex:
                ex.submit(chatty).result()
            print()
            print("parent done")
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("partial line without newline") == 2
    assert run.stdout.rstrip().endswith("parent done")


def test_pools_left_open_with_an_exit_timeout_do_not_keep_the_interpreter_from_exiting(program):
    prog = program(
        """
        import os, time, warden
        def fin(path):
            with open(path, "a") as f:
                f.write(f"fin {os.getpid()}\\n")
        def nap(path):
            with open(path, "a") as f:
                f.write(f"ran {os.getpid()}\\n")
            time.sleep(60)
        if __name__ == "__main__":
            out = os.environ["OUT"]
            ex = warden.ProcessPoolExecutor(2, finalizer=fin, finalargs=(out,), exit_timeout=1)
            tasks = [ex.submit(nap, out) for _ in range(6)]
            pool = warden.Pool(1, finalizer=fin, finalargs=(out,))
            pool.map_async(nap, [out] * 3, chunksize=1)
            while open(out).read().count("ran") < 3 if os.path.exists(out) else True:
                time.sleep(0.02)
            print("leaving", flush=True)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    # The executor waits exit_timeout for its 6 tasks, then they are dropped
    # (the running ones terminated: the finalizers run); the Pool is terminated.
    assert run.elapsed < 15
    lines = prog.out_lines()
    assert len([line for line in lines if line.startswith("ran")]) == 3
    assert len([line for line in lines if line.startswith("fin")]) == 3
    assert "6 submitted tasks dropped at interpreter exit (exit_timeout=1s passed)" in run.stderr
    assert not descendants(run.pid)


def test_a_worker_told_to_stop_before_the_cores_handlers_are_up_does_not_start(program):
    # Between the worker's Python signal handler and the core's, a SIGTERM
    # reaches only the first, which has nothing to interrupt: the init that
    # follows must end the worker instead of starting it (it used to start,
    # and the stop was lost: a terminate() of a starting worker did nothing).
    # And a second SIGTERM must not interrupt the exit path that follows.
    prog = program(
        """
        import atexit, os, pickle, signal
        from warden import _warden, _workerloop

        handler = _workerloop.Handler()

        def late_stop():
            # The monitor sends SIGTERM again while the exit path runs.
            handler.on_signal(signal.SIGTERM, None)
            print("exit callback ran to its end")

        atexit.register(late_stop)
        handler.on_signal(signal.SIGTERM, None)
        payload = pickle.dumps(
            {"mode": "pool", "preparation": {}, "hooks": b"", "parent_name": "MainProcess", "name": "t"}
        )
        failure = handler.init(1, os.getpid(), os.getppid(), payload)
        print("started" if failure is None else failure.kind)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    from warden import _warden

    assert run.stdout.split("\n")[:2] == ["exit callback ran to its end", str(_warden.RemoteKind.INTERRUPTED)]
    assert "Traceback" not in run.stderr


def test_a_failing_finalizer_or_worker_context_exit_is_said_once_per_worker(program):
    """Each worker's stderr had the failure twice: the Python traceback,
    then a line of the core's ("exit hook failed: finalizer raised ...")."""
    prog = program(
        """
        import contextlib, warden

        @contextlib.contextmanager
        def context():
            yield
            raise OSError("context exit broke")

        def fin():
            raise RuntimeError("finalizer broke")

        if __name__ == "__main__":
            with warden.Pool(1, finalizer=fin, worker_context=context, maxtasksperchild=1) as pool:
                print(pool.map(abs, [-1, -2]), flush=True)
                pool.close()
                pool.join()
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[1, 2]"
    workers = run.stderr.count("exception in finalizer:")
    assert workers >= 2, run.stderr
    assert run.stderr.count("RuntimeError: finalizer broke") == workers, run.stderr
    assert run.stderr.count("OSError: context exit broke") == workers, run.stderr
    # Each said with a header naming warden's worker context and the worker.
    said = re.findall(
        r"^warden: worker (\d+): exception in worker_context exit:\nTraceback \(most recent call last\):\n",
        run.stderr,
        re.MULTILINE,
    )
    assert len(set(said)) == workers, run.stderr
    assert "exit hook failed" not in run.stderr, run.stderr
