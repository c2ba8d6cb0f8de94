"""Programs that go wrong with the standard library (a forked child that
never runs ``__del__``, nested executors that never exit, a pool without a
finalizer, a ``Process`` target bound to an unpicklable object, finalizers
that run mid-iteration), with warden in place of it, run as real processes:
what their authors expected is what they get."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import descendants, numpy


def test_del_of_cyclic_garbage_runs_in_the_child_before_join_returns(program):
    prog = program(
        """
        import warden

        class Foo():
            def __init__(self):
                self.b = []

            def __del__(self):
                print('del')

        def foo():
            print('call foo')
            f = Foo()
            a = [f]
            f.b.append(a)

        if __name__ == "__main__":
            p = warden.Process(target=foo)
            p.start()
            p.join()
            print('joined')
            foo()
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.lines[:3] == ["call foo", "del", "joined"]
    assert run.lines[3] == "call foo"


def test_nested_executors_with_failing_tasks_exit_promptly(program):
    prog = program(
        """
        import multiprocessing
        from warden import ProcessPoolExecutor
        import concurrent.futures

        class Foo(object):
            def __init__(self):
                self.executor = ProcessPoolExecutor(
                    max_workers=10, mp_context=multiprocessing.get_context("spawn"))

            @staticmethod
            def fun(arg):
                raise concurrent.futures.process._RemoteTraceback("error")

            def call(self, i):
                x = []
                try:
                    future = self.executor.submit(self.fun, i)
                    res = future.result(timeout=1)
                except Exception as e:
                    print("-"*20)
                return x

        def predict():
            f = Foo()
            for i in range(3):
                f.call(i)

        if __name__ == "__main__":
            with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as e:
                futures = e.submit(predict)
                futures.result()
            print("exited")
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["-" * 20] * 3 + ["exited"]
    assert run.elapsed < 20
    assert not descendants(run.pid)


def test_an_executor_kept_alive_by_a_cycle_does_not_block_exit(program):
    prog = program(
        """
        import warden

        def fun(arg):
            raise ValueError("error")

        class Holder:
            def __init__(self):
                self.executor = warden.ProcessPoolExecutor(2)
                self.me = self  # a cycle: only the garbage collector frees it

        if __name__ == "__main__":
            h = Holder()
            futures = [h.executor.submit(fun, i) for i in range(3)]
            for f in futures:
                try:
                    f.result()
                except ValueError:
                    print("error")
            print("leaving")
        """
    )
    run = prog.run(timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["error"] * 3 + ["leaving"]
    assert run.elapsed < 10


def test_initializer_and_finalizer_manage_a_worker_resource(program):
    prog = program(
        """
        import warden

        class Resource:
            def __init__(self, args):
                self.args = args
            def __enter__(self):
                print(f"in __enter__ of {warden.current_process().name}", flush=True)
                return self
            def __exit__(self, *exc):
                print(f"in __exit__ of {warden.current_process().name}", flush=True)

        resource_cm = None
        resource = None

        def _worker_init(args):
            global resource_cm, resource
            resource_cm = Resource(args)
            resource = resource_cm.__enter__()

        def _worker_fini():
            resource_cm.__exit__(None, None, None)

        def hi(*args):
            return resource.args

        if __name__ == "__main__":
            pool = warden.Pool(2, initializer=_worker_init, initargs=("abc",), finalizer=_worker_fini)
            print(pool.map(hi, range(4)), flush=True)
            pool.close()
            pool.join()
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    # Every worker that entered the resource exited it (a worker still
    # starting when the pool closes is retired before its initializer runs).
    # (Workers share the stdout pipe: their lines may interleave.)
    enters = sorted(re.findall(r"in __enter__ of (Pool-\d+-worker-\d+)", run.stdout))
    exits = sorted(re.findall(r"in __exit__ of (Pool-\d+-worker-\d+)", run.stdout))
    assert enters and enters == exits
    assert "['abc', 'abc', 'abc', 'abc']" in run.stdout


def test_a_worker_context_is_entered_and_exited_once_per_worker(program):
    prog = program(
        """
        import contextlib, warden

        @contextlib.contextmanager
        def open_resource(args):
            print("enter", flush=True)
            try:
                yield args.upper()
            finally:
                print("exit", flush=True)

        def hi(_):
            return warden.worker_context()

        if __name__ == "__main__":
            with warden.Pool(2, worker_context=lambda: open_resource("abc")) as pool:
                print(pool.map(hi, range(4)), flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert len(re.findall("enter", run.stdout)) == len(re.findall("exit", run.stdout)) >= 1
    assert "['ABC', 'ABC', 'ABC', 'ABC']" in run.stdout


def test_a_worker_context_terminated_while_it_is_entered_is_entered_in_full_then_exited(program, tmp_path):
    """terminate() while ``__enter__`` runs (here: after it took its resource,
    before it returned) lets it finish, then exits it; the finalizer runs too,
    the initializer having returned. An interrupted ``__enter__`` would leave
    the resource taken and no exit path knowing of it."""
    marker = tmp_path / "resource"
    prog = program(
        f"""
        import os, time, warden

        class Resource:
            def __enter__(self):
                open({str(marker)!r}, "w").close()  # taken
                time.sleep(1.0)  # the pool is terminated here
                return self

            def __exit__(self, *exc):
                os.unlink({str(marker)!r})
                print("exited", flush=True)

        def final():
            print("finalized", flush=True)

        if __name__ == "__main__":
            pool = warden.Pool(1, initializer=print, initargs=("initialized",), finalizer=final,
                               worker_context=Resource)
            while not os.path.exists({str(marker)!r}):
                time.sleep(0.01)
            pool.terminate()
            pool.join()
            print("resource left" if os.path.exists({str(marker)!r}) else "resource released", flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["initialized", "exited", "finalized", "resource", "released"]


def test_a_worker_context_of_a_worker_stopped_mid_task_sees_the_stop_and_rolls_back(program, tmp_path):
    """A transaction per worker, committed as the context exits cleanly and
    rolled back on an exception: a task that timed out after its first
    insert had that insert committed (the context was exited as if nothing
    had happened). A worker that ends between tasks still commits."""
    db = tmp_path / "rows.db"
    prog = program(
        f"""
        import contextlib, os, sqlite3, time, warden

        def note(text):  # the worker's lines, apart from the parent's
            with open(os.environ["OUT"], "a") as f:
                f.write(text + "\\n")

        @contextlib.contextmanager
        def transaction():
            conn = sqlite3.connect({str(db)!r})
            conn.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
            try:
                yield conn
            except BaseException as e:
                conn.rollback()
                note(f"rolled back: {{type(e).__name__}}")
                raise
            else:
                conn.commit()
                note("committed")
            finally:
                conn.close()

        def insert(value, then_sleep):
            warden.worker_context().execute("INSERT INTO t VALUES (?)", (value,))
            time.sleep(then_sleep)

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1, worker_context=transaction, task_timeout=1) as ex:
                try:
                    ex.submit(insert, "half-done", 60).result(timeout=60)
                except warden.TaskTimeout:
                    print("timed out", flush=True)
                ex.submit(insert, "whole", 0).result(timeout=60)
            print(sqlite3.connect({str(db)!r}).execute("SELECT v FROM t").fetchall(), flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == ["rolled back: TaskInterrupted", "committed"], run.stdout + run.stderr
    assert run.stdout.splitlines() == ["timed out", "[('whole',)]"], run.stdout + run.stderr


def test_a_multiprocessing_finalize_registered_in_the_initializer_runs_at_worker_exit(program):
    prog = program(
        """
        import warden
        from multiprocessing.util import Finalize

        class Resource:
            def close(self):
                print(f"closed in {warden.current_process().name}", flush=True)

        def _worker_init():
            global resource
            resource = Resource()
            Finalize(resource, resource.close, exitpriority=16)
            print(f"opened in {warden.current_process().name}", flush=True)

        def hi(_):
            return 1

        if __name__ == "__main__":
            pool = warden.Pool(2, initializer=_worker_init)
            pool.map(hi, range(4))
            pool.close()
            pool.join()
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    opened = sorted(re.findall(r"opened in (Pool-\d+-worker-\d+)", run.stdout))
    closed = sorted(re.findall(r"closed in (Pool-\d+-worker-\d+)", run.stdout))
    assert opened and opened == closed


def test_process_target_bound_to_an_object_holding_processes_and_an_event(program):
    prog = program(
        """
        import time
        import warden

        class Application:

            def __init__(self):
                self._event = warden.Event()
                self._processes = [
                    warden.Process(target=self._worker)
                    for _ in range(2)]

            def _worker(self):
                while True:
                    print(warden.current_process().name, flush=True)
                    if self._event.wait(0.1):
                        break

            def start(self):
                for process in self._processes:
                    print('starting', flush=True)
                    process.start()

            def stop(self):
                self._event.set()
                for process in self._processes:
                    process.join()

        if __name__ == '__main__':
            application = Application()
            application.start()
            time.sleep(1)
            application.stop()
            print([p.exitcode for p in application._processes])
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("starting") == 2
    assert "Process-1" in run.stdout and "Process-2" in run.stdout
    assert run.lines[-1] == "[0, 0]"


# A registry of descriptors as people write it: __del__ closes the descriptor
# and removes it from the class-wide set, on whatever thread drops the last
# reference, at whatever point that thread is.
FD_REGISTRY_ORIGINAL = """
import os

class FD:
    _all_fds = set()

    def __init__(self, fd):
        self.fd = fd
        self._all_fds.add(fd)

    def close(self):
        if (self.fd):
            os.close(self.fd)
            self._all_fds.remove(self.fd)
            self.fd = None

    def for_each_fd(self, proc):
        for fd in self._all_fds:
            proc(fd)

    def __del__(self):
        self.close()

owners = {}
for _ in range(50):
    fd = os.open(os.devnull, os.O_RDONLY)
    owners[fd] = FD(fd)

def proc(fd):
    os.fstat(fd)
    if fd % 2:
        del owners[fd]  # the FD dies here: its __del__ runs now, mid-iteration

next(iter(owners.values())).for_each_fd(proc)
print("iterated")
"""


def test_without_warden_a_del_mid_iteration_breaks_the_registry_iteration(program):
    """The control: without warden, the finalizer runs inside the loop that
    iterates the set it mutates, and the iteration fails."""
    prog = program(FD_REGISTRY_ORIGINAL)
    run = prog.run()
    assert run.returncode == 1
    assert "RuntimeError: Set changed size during iteration" in run.stderr
    assert "iterated" not in run.stdout


def test_finalizers_that_shrink_a_shared_set_never_break_its_iteration(program):
    """The descriptor registry with warden: the set is a ``warden.ResourceSet``, and an FD's
    descriptor is closed by its owner's finalizer on warden's finalizer thread.
    The main thread iterates the set while it drops FDs (and closes some
    explicitly); the finalizer thread shrinks the set all the while, with the
    interpreter switching threads as often as it can. Run the original way
    (``FD_REGISTRY_ORIGINAL`` above), the first dropped FD breaks the iteration
    with "Set changed size during iteration"; here no iteration ever fails,
    every descriptor the loop is given is still open, each is closed exactly
    once, and none is left open."""
    prog = program(
        """
        import os
        import sys
        import threading
        import warden

        opened = set()
        closed_on = []
        iterating = False
        closed_mid_iteration = 0

        def close(fd):
            global closed_mid_iteration
            opened.remove(fd)  # KeyError if it were closed twice
            os.close(fd)
            closed_on.append(threading.get_ident())
            if iterating and threading.get_ident() != main:
                closed_mid_iteration += 1

        fds = warden.ResourceSet(close)

        class FD:
            def __init__(self, fd):
                self.fd = fd
                fds.add(fd, owner=self)  # closed on the finalizer thread once self dies

            def close(self):
                if self.fd is not None:
                    fds.close(self.fd)
                    self.fd = None

        def for_each_fd(proc):
            global iterating
            iterating = True
            try:
                for fd in fds:
                    proc(fd)
            finally:
                iterating = False

        def open_fds():
            return len(os.listdir("/proc/self/fd"))

        main = threading.get_ident()
        sys.setswitchinterval(1e-6)  # interleave the two threads as much as possible
        baseline = open_fds()
        visited = 0
        for round in range(20):
            owners = {}
            for _ in range(100):
                fd = os.open(os.devnull, os.O_RDONLY)
                opened.add(fd)
                owners[fd] = FD(fd)

            def proc(fd):
                global visited
                os.fstat(fd)  # raises if the descriptor were closed under us
                visited += 1
                if fd % 3 == 0:
                    owners.pop(fd).close()  # explicitly, on this thread
                elif fd % 3 == 1:
                    del owners[fd]  # the owner dies: its finalizer closes fd later

            for_each_fd(proc)
            for_each_fd(lambda fd: None)
            owners.clear()

        assert warden.wait_for_finalizers(10)
        print("visited", visited)
        print("left in the set", len(fds))
        print("closed", len(closed_on), "still open", len(opened))
        print("closed on the finalizer thread during an iteration", closed_mid_iteration > 0)
        print("open descriptors back to baseline", open_fds() == baseline)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "visited 2000",
        "left in the set 0",
        "closed 2000 still open 0",
        "closed on the finalizer thread during an iteration True",
        "open descriptors back to baseline True",
    ]
    assert run.stderr == ""


STDIN_OF_A_TASK = """
import concurrent.futures, multiprocessing, os, subprocess, sys
import warden

def task():
    # A subprocess started without stdin= reads the worker's fd 0.
    return subprocess.run(["cat"], capture_output=True, text=True, timeout=10).stdout.strip()

if __name__ == "__main__":
    if sys.argv[1] == "std":
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    else:
        ex = warden.ProcessPoolExecutor(1)
    with ex:
        print("task read", repr(ex.submit(task).result(timeout=60)))
    print("parent read", repr(sys.stdin.read().strip()))
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_the_programs_input_is_the_programs_not_a_subprocess_a_task_starts(program, impl):
    # A listed difference: a spawned child's fd 0 is still the parent's stdin.
    prog = program(STDIN_OF_A_TASK)
    proc = prog.start(args=(impl,), stdin=subprocess.PIPE)
    out, err = proc.communicate("parent-input\n", timeout=60)
    assert proc.returncode == 0, err
    if impl == "std":
        assert out.splitlines() == ["task read 'parent-input'", "parent read ''"]
    else:
        assert out.splitlines() == ["task read ''", "parent read 'parent-input'"]


@pytest.mark.parametrize("start", ["pool-zygote", "pool-exec", "process"])
def test_workers_start_while_another_thread_multiplies_matrices_with_numpy(program, start):
    # A fork of the program's process (glibc's fork(), which runs every
    # library's pthread_atfork handler) waits for ever in OpenBLAS's handler
    # while another thread is inside a BLAS call. Every start here (the
    # zygote, each worker by exec, a Process) comes while one is.
    numpy()
    prog = program(
        f"""
        import threading
        import numpy as np
        import warden

        def square(x):
            return x * x

        def background(stop):
            a = np.ones((300, 300))
            while not stop.is_set():
                a @ a

        if __name__ == "__main__":
            stop = threading.Event()
            thread = threading.Thread(target=background, args=(stop,))
            thread.start()
            try:
                if {start!r} == "process":
                    for _ in range(5):
                        p = warden.Process(target=square, args=(3,))
                        p.start()
                        p.join(30)
                        print(p.exitcode)
                else:
                    start = "zygote" if {start!r} == "pool-zygote" else "exec"
                    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1, start=start) as ex:
                        print(list(ex.map(square, range(8), timeout=30)))
            finally:
                stop.set()
                thread.join()
        """
    )
    run = prog.run(timeout=90)
    assert run.returncode == 0, run.stderr
    expected = ["0"] * 5 if start == "process" else [str([x * x for x in range(8)])]
    assert run.lines == expected
