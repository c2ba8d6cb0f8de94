"""warden.finalize, at_exit, Guardian and ResourceSet: when callbacks run, on
which thread, in which order, and how often."""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import warden

from conftest import wait_until


class Obj:
    """Something that can be weakly referenced."""


def thread_name(native_id: int) -> str:
    """The kernel's name of a thread of this process (what `ps -L` shows)."""
    with open(f"/proc/self/task/{native_id}/comm") as f:
        return f.read().strip()


def record_thread(log: list[tuple[int, int]]):
    def callback() -> None:
        log.append((threading.get_ident(), threading.get_native_id()))

    return callback


# --- warden.finalize -----------------------------------------------------------


def test_finalize_callbacks_run_on_one_dedicated_thread_that_is_not_the_dropping_thread():
    ran: list[tuple[int, int]] = []
    droppers: list[int] = []

    def drop_some(n: int) -> None:
        droppers.append(threading.get_ident())
        objs = [Obj() for _ in range(n)]
        for o in objs:
            warden.finalize(o, record_thread(ran))
        del o
        objs.clear()  # the last references die here, on this thread

    drop_some(5)
    threads = [threading.Thread(target=drop_some, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warden.wait_for_finalizers(10)
    assert len(ran) == 25
    idents = {ident for ident, _ in ran}
    assert len(idents) == 1, "one finalizer thread runs every callback"
    assert not idents & set(droppers), "never the thread that dropped the object"
    native = ran[0][1]
    assert thread_name(native) == "warden-finalize"  # "warden-finalizer", cut to 15 bytes by the kernel


def test_a_finalizer_needing_a_lock_the_dropping_thread_holds_waits_for_it_instead_of_running_inside():
    """Boehm's point: run inline, this callback would deadlock (or see the
    half-done update); on the finalizer thread it waits for the lock."""
    lock = threading.Lock()
    state = {"a": 0, "b": 0}
    seen: list[dict[str, int]] = []

    def check() -> None:
        with lock:
            seen.append(dict(state))

    obj = Obj()
    warden.finalize(obj, check)
    with lock:
        state["a"] = 1
        del obj  # the object dies in the middle of the update
        time.sleep(0.05)
        state["b"] = 1
    assert warden.wait_for_finalizers(10)
    assert seen == [{"a": 1, "b": 1}]


def test_a_finalizer_never_runs_inside_a_signal_handler():
    ran: list[tuple[int, int]] = []
    in_handler: list[bool] = []
    box = [Obj()]
    warden.finalize(box[0], record_thread(ran))

    def handler(signum, frame):
        box.clear()  # the last reference dies inside the handler
        in_handler.append(True)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_until(lambda: in_handler, timeout=5)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert warden.wait_for_finalizers(10)
    assert in_handler == [True]
    # Run inside the handler, it would have run on the main thread.
    assert len(ran) == 1 and ran[0][0] != threading.main_thread().ident


def test_calling_the_handle_runs_the_callback_now_once_and_returns_its_result():
    obj = Obj()
    calls: list[tuple[tuple, dict]] = []

    def callback(*args, **kwargs):
        calls.append((args, kwargs))
        return threading.get_ident()

    f = warden.finalize(obj, callback, 1, 2, key="v")
    assert f.alive
    assert f() == threading.get_ident(), "runs on the calling thread"
    assert f() is None
    assert not f.alive
    assert calls == [((1, 2), {"key": "v"})]
    del obj
    assert warden.wait_for_finalizers(10)
    assert len(calls) == 1, "it never runs again"


def test_calling_the_handle_raises_what_the_callback_raised():
    obj = Obj()

    def fail():
        raise KeyError("nope")

    f = warden.finalize(obj, fail)
    with pytest.raises(KeyError, match="nope"):
        f()
    assert not f.alive
    assert f() is None


def test_peek_detach_atexit_and_repr_behave_like_weakref_finalize():
    obj = Obj()
    f = warden.finalize(obj, print, "x", priority=3, sep="")
    assert f.atexit is True
    assert f.priority == 3
    assert f.peek() == (obj, print, ("x",), {"sep": ""})
    assert "for 'Obj'" in repr(f)
    f.atexit = False
    assert f.atexit is False
    assert f.detach() == (obj, print, ("x",), {"sep": ""})
    assert not f.alive
    assert f.peek() is None and f.detach() is None and f() is None
    assert "dead" in repr(f)


def test_a_detached_finalizer_does_not_run_when_its_object_dies():
    ran: list[int] = []
    obj = Obj()
    f = warden.finalize(obj, ran.append, 1)
    assert f.detach() is not None
    del obj
    assert warden.wait_for_finalizers(10)
    assert ran == []


def test_a_finalizer_whose_object_died_runs_even_if_it_was_not_to_run_at_exit():
    ran: list[int] = []
    obj = Obj()
    f = warden.finalize(obj, ran.append, 1)
    f.atexit = False
    del obj
    assert warden.wait_for_finalizers(10)
    assert ran == [1]


def test_an_object_that_cannot_be_weakly_referenced_is_refused():
    with pytest.raises(TypeError):
        warden.finalize(42, print)


def test_the_callback_runs_at_most_once_when_many_threads_call_the_handle_while_the_object_dies():
    for _ in range(30):
        count = [0]
        lock = threading.Lock()

        def bump(count=count, lock=lock):
            with lock:
                count[0] += 1
            return "ran"

        box = [Obj()]
        f = warden.finalize(box[0], bump)
        results: list[object] = []
        start = threading.Barrier(9)

        def call(f=f, start=start, results=results):
            start.wait()
            results.append(f())

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        start.wait()
        box.clear()  # the object dies while the threads call the handle
        for t in threads:
            t.join()
        assert warden.wait_for_finalizers(10)
        assert count[0] == 1
        assert results.count("ran") <= 1
        assert results.count(None) == 8 - results.count("ran")
        assert not f.alive


def test_a_finalizer_that_raises_is_reported_and_the_thread_goes_on(capfd):
    ran: list[int] = []
    a, b = Obj(), Obj()

    def fail():
        raise ValueError("finalizer failed")

    warden.finalize(a, fail)
    warden.finalize(b, ran.append, 2)
    del a, b
    assert warden.wait_for_finalizers(10)
    assert ran == [2]
    err = capfd.readouterr().err
    assert "warden: exception in finalizer" in err and "fail" in err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: finalizer failed" in err


# --- warden.Guardian ------------------------------------------------------------


def test_a_guardian_returns_exactly_the_dead_objects_values_and_runs_nothing_before_drain():
    closed: list[str] = []

    class Conn:
        def __init__(self, name: str) -> None:
            self.name = name

    g: warden.Guardian[str] = warden.Guardian()
    conns = {name: Conn(name) for name in "abcde"}
    for name, conn in conns.items():
        g.register(conn, value=name)
    del conn
    assert len(g) == 5
    del conns["b"], conns["d"]
    gc.collect()
    dropped = threading.Thread(target=lambda: conns.pop("e"))
    dropped.start()
    dropped.join()
    time.sleep(0.05)
    assert closed == [], "nothing ran by itself"
    dead = g.drain()
    assert sorted(dead) == ["b", "d", "e"]
    for name in dead:
        closed.append(name)
    assert g.drain() == []
    assert len(g) == 2
    del conns["a"]
    assert g.drain() == ["a"]


def test_a_guardian_register_without_a_value_drains_none():
    g = warden.Guardian()
    obj = Obj()
    g.register(obj)
    del obj
    assert g.drain() == [None]


def test_objects_outliving_their_guardian_die_quietly():
    g = warden.Guardian()
    obj = Obj()
    g.register(obj, "v")
    del g
    gc.collect()
    del obj  # no guardian to hand "v" to: nothing happens


# --- warden.ResourceSet ---------------------------------------------------------


def test_a_resource_set_closes_a_member_when_its_owner_dies_on_the_finalizer_thread():
    closed: list[tuple[int, int]] = []
    rs = warden.ResourceSet(lambda r: closed.append((r, threading.get_ident())))
    owner = Obj()
    rs.add(7, owner)
    rs.add(8)
    assert set(rs) == {7, 8} and 7 in rs and len(rs) == 2
    del owner
    assert warden.wait_for_finalizers(10)
    assert [r for r, _ in closed] == [7]
    assert closed[0][1] != threading.get_ident()
    assert set(rs) == {8}


def test_a_resource_set_closes_each_member_once_whoever_gets_there_first():
    closes: dict[int, int] = {}
    lock = threading.Lock()

    def close(r: int) -> None:
        with lock:
            closes[r] = closes.get(r, 0) + 1

    rs: warden.ResourceSet[int] = warden.ResourceSet(close)
    owners = [Obj() for _ in range(300)]
    for i, o in enumerate(owners):
        rs.add(i, o)
    del o
    start = threading.Barrier(3)

    def close_explicitly():
        start.wait()
        for i in range(0, 300, 2):
            rs.close(i)

    def close_everything():
        start.wait()
        rs.close_all()

    threads = [threading.Thread(target=close_explicitly), threading.Thread(target=close_everything)]
    for t in threads:
        t.start()
    start.wait()
    owners.clear()  # every owner dies: their finalizers race the two threads
    for t in threads:
        t.join()
    assert warden.wait_for_finalizers(10)
    assert closes == dict.fromkeys(range(300), 1)
    assert len(rs) == 0 and list(rs) == []
    assert rs.close_all() == 0


def test_a_closed_resource_reused_by_a_new_owner_is_not_closed_by_the_old_finalizer():
    closed: list[int] = []
    rs = warden.ResourceSet(closed.append)
    old = Obj()
    rs.add(3, old)
    assert rs.close(3)  # explicitly, like FD.close()
    new = Obj()
    rs.add(3, new)  # the OS hands out the same number again
    del old
    assert warden.wait_for_finalizers(10)
    assert closed == [3] and 3 in rs
    assert rs.discard(3) and 3 not in rs
    del new
    assert warden.wait_for_finalizers(10)
    assert closed == [3], "a discarded member is not closed by its owner either"


def test_close_all_reports_a_failing_close_and_closes_the_rest(capfd):
    closed: list[int] = []

    def close(r: int) -> None:
        if r == 2:
            raise OSError("bad descriptor")
        closed.append(r)

    rs = warden.ResourceSet(close)
    for r in range(4):
        rs.add(r)
    assert rs.close_all() == 3
    assert sorted(closed) == [0, 1, 3]
    assert "OSError: bad descriptor" in capfd.readouterr().err


# --- exit: real programs ------------------------------------------------------


def test_exit_callbacks_run_higher_priority_first_then_last_registered_first(program):
    prog = program(
        """
        import warden

        class Obj:
            pass

        def say(word):
            print(word, flush=True)

        warden.at_exit(say, "zero-a")
        warden.at_exit(say, "minus-one", priority=-1)
        warden.at_exit(say, "ten-a", priority=10)
        warden.at_exit(say, "zero-b")
        warden.at_exit(say, "ten-b", priority=10)
        alive = Obj()
        warden.finalize(alive, say, "five (object alive at exit)", priority=5)
        quiet = Obj()
        warden.finalize(quiet, say, "never").atexit = False
        cancelled = warden.at_exit(say, "cancelled", priority=99)
        cancelled.cancel()
        early = warden.at_exit(say, "called early", priority=99)
        early()
        print("main done", flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "called early",
        "main done",
        "ten-b",
        "ten-a",
        "five (object alive at exit)",
        "zero-b",
        "zero-a",
        "minus-one",
    ]


def test_an_exit_callback_that_raises_is_reported_with_its_traceback_and_the_rest_run(program):
    prog = program(
        """
        import warden

        def broken():
            raise RuntimeError("cleanup failed")

        warden.at_exit(print, "low", priority=-1)
        warden.at_exit(broken)
        warden.at_exit(print, "high", priority=1)
        """
    )
    run = prog.run()
    assert run.returncode == 0
    assert run.lines == ["high", "low"]
    assert "warden: exception in finalizer __main__.broken (at exit):" in run.stderr
    assert 'line 5, in broken\n    raise RuntimeError("cleanup failed")' in run.stderr
    assert "RuntimeError: cleanup failed" in run.stderr


def test_callbacks_registered_during_the_exit_drain_run_and_after_it_are_refused(program):
    prog = program(
        """
        import atexit

        def late():
            # Registered before warden was imported: runs after warden's exit step.
            try:
                warden.at_exit(print, "too late")
            except RuntimeError as e:
                print("refused:", e, flush=True)

        atexit.register(late)

        import warden

        def first():
            print("first", flush=True)
            warden.at_exit(print, "added while draining", priority=-5)

        warden.at_exit(first, priority=1)
        warden.at_exit(print, "second")
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.lines[:3] == ["first", "second", "added while draining"]
    assert run.lines[3].startswith("refused: cannot register print")
    assert "too late" not in run.stdout


def test_a_process_that_cannot_start_threads_still_registers_finalizers_and_runs_them_at_exit(program):
    # As in a container whose pids.max is reached, or under ulimit -u: no new
    # thread can start. (Root is exempt from RLIMIT_NPROC: it becomes nobody.)
    prog = program(
        """
        import os, resource, threading
        import warden

        at_exit, finalize = warden.at_exit, warden.finalize
        if os.geteuid() == 0:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        try:
            threading.Thread(target=print).start()
            print("threads still start", flush=True)
        except RuntimeError:
            pass

        class Resource:
            pass

        r = Resource()
        finalize(r, print, "the finalizer of a dropped object ran", flush=True)
        del r
        at_exit(print, "the exit callback ran", flush=True)
        print("registered", flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    expected = ["registered", "the exit callback ran", "the finalizer of a dropped object ran"]
    assert run.lines == expected, run.stderr


def test_a_hung_exit_callback_is_abandoned_at_the_deadline_and_reported(program):
    prog = program(
        """
        import time
        import warden

        warden.at_exit(print, "skipped")
        warden.at_exit(time.sleep, 30, priority=1)
        """
    )
    run = prog.run(timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 10
    assert "skipped" not in run.stdout
    assert re.search(r"warden: finalizer .*sleep was still running at the exit deadline", run.stderr)
    assert re.search(r"warden: finalizer print did not run before the exit deadline", run.stderr)


def test_objects_dying_while_the_interpreter_shuts_down_neither_crash_nor_hang_it(program):
    prog = program(
        """
        import threading
        import time
        import warden

        class Obj:
            pass

        def churn():
            while True:  # a daemon thread still dropping objects at shutdown
                o = Obj()
                try:
                    warden.finalize(o, len, "x")
                except RuntimeError:
                    return  # the exit callbacks have run: no more registrations
                del o
                time.sleep(0.0005)

        for _ in range(2):
            threading.Thread(target=churn, daemon=True).start()
        keep = [Obj() for _ in range(100)]
        for o in keep:
            warden.finalize(o, len, "y").atexit = False
        print("bye", flush=True)
        """
    )
    for _ in range(3):
        run = prog.run(timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.lines == ["bye"]
        assert run.stderr == ""
        assert run.elapsed < 10


def test_exit_callbacks_in_the_parent_run_after_its_pools_and_children_have_ended(program):
    prog = program(
        """
        import os
        import warden

        def init():
            warden.at_exit(print, "worker exit callback", flush=True)

        def pid(_):
            return os.getpid()

        def check(pool, pids, child):
            alive = [p for p in pids | {child.pid} if os.path.exists(f"/proc/{p}/status")
                     and "zombie" not in open(f"/proc/{p}/status").read()]
            print("children alive:", alive, flush=True)
            try:
                pool.apply(pid, (0,))
            except Exception as e:
                print("pool refused:", type(e).__name__, flush=True)

        if __name__ == "__main__":
            pool = warden.Pool(2, initializer=init)
            pids = set(pool.map(pid, range(4)))
            child = warden.Process(target=init)
            child.start()
            warden.at_exit(check, pool, pids, child)
            print("main done", flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    lines = run.lines
    assert lines[0] == "main done"
    assert lines[-2:] == ["children alive: []", "pool refused: ValueError"]  # Pool not running
    # The child's, and every started worker's. Counted in the whole output:
    # processes that exit together may interleave their writes on one line
    # (with PYTHONUNBUFFERED, print writes the text and the newline apart).
    assert sum(line.count("worker exit callback") for line in lines) >= 2


# --- exit in workers and children -------------------------------------------------

WORKER_PROGRAM = """
import os
import sys
import time
import warden

OUT = os.environ["OUT"]

def note(line):
    with open(OUT, "a") as f:
        f.write(line + "\\n")

def init():
    # Registered before "start" is written: a worker stopped between the two
    # must not look like one that skipped its exit callback.
    warden.at_exit(note, f"exit {os.getpid()}")
    note(f"start {os.getpid()}")

def wait_for_starts(n):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(OUT) as f:
            if sum(line.startswith("start ") for line in f) >= n:
                return
        time.sleep(0.01)
    raise SystemExit("workers did not start")

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    how = sys.argv[1]
    if how == "close_join":
        pool = warden.Pool(2, initializer=init)
        pool.map(pid, range(4))
        pool.close()
        pool.join()
    elif how == "terminate":
        pool = warden.Pool(2, initializer=init)
        pool.map(pid, range(4))
        wait_for_starts(2)
        pool.terminate()
        pool.join()
    elif how == "shutdown":
        ex = warden.ProcessPoolExecutor(2, initializer=init)
        list(ex.map(pid, range(4)))
        ex.shutdown()
    elif how == "max_tasks_per_child":
        with warden.ProcessPoolExecutor(1, initializer=init, max_tasks_per_child=1) as ex:
            pids = {ex.submit(pid, i).result() for i in range(3)}
        assert len(pids) == 3, pids
    elif how == "timeout":
        with warden.ProcessPoolExecutor(1, initializer=init, task_timeout=0.5) as ex:
            try:
                ex.submit(time.sleep, 30).result()
            except warden.TaskTimeout:
                pass
            ex.submit(pid, 0).result()
    elif how == "process":
        p = warden.Process(target=init)
        p.start()
        p.join()
        assert p.exitcode == 0
"""


@pytest.mark.parametrize(
    "how", ["close_join", "terminate", "shutdown", "max_tasks_per_child", "timeout", "process"]
)
def test_exit_callbacks_run_in_every_worker_and_child_when_it_retires(program, how):
    prog = program(WORKER_PROGRAM)
    run = prog.run(args=(how,))
    assert run.returncode == 0, run.stderr
    lines = prog.out_lines()
    started = {line.split()[1] for line in lines if line.startswith("start ")}
    exited = [line.split()[1] for line in lines if line.startswith("exit ")]
    assert started, lines
    assert sorted(exited) == sorted(started), "each worker ran its exit callback, once"
    # Replacements: one per retired worker (one may retire before it starts).
    expected = {"max_tasks_per_child": 3, "timeout": 2, "process": 1}.get(how)
    if expected is not None:
        assert len(started) >= expected


def test_exit_callbacks_and_atexit_handlers_registered_by_an_initializer_that_then_fails_still_run(program):
    prog = program(
        """
        import atexit
        import os
        import warden

        def note(line):
            with open(os.environ["OUT"], "a") as f:
                f.write(line + "\\n")

        def init():
            warden.at_exit(note, f"exit callback of {os.getpid()}")
            atexit.register(note, f"atexit handler of {os.getpid()}")
            raise ValueError("the initializer fails after registering")

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1, initializer=init, restart_limit=(0, 60.0)) as ex:
                try:
                    ex.submit(os.getpid).result(timeout=60)
                except Exception as e:
                    print(type(e).__name__)
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["PoolFailed"], run.stdout
    lines = prog.out_lines()
    pids = {line.rsplit(" ", 1)[1] for line in lines}
    assert pids, "the initializer ran"
    for pid in pids:
        assert f"atexit handler of {pid}" in lines, lines
        assert f"exit callback of {pid}" in lines, lines


def test_a_worker_runs_its_finalizer_then_gc_then_atexit_then_exit_callbacks_in_priority_order(program):
    prog = program(
        """
        import atexit
        import os
        import warden

        OUT = os.environ["OUT"]

        def note(line):
            with open(OUT, "a") as f:
                f.write(line + "\\n")

        class Cycle:
            def __init__(self):
                self.me = self
            def __del__(self):
                note("gc: __del__ of cyclic garbage")

        def init():
            global garbage
            garbage = Cycle()
            atexit.register(note, "atexit handler")
            warden.at_exit(note, "at_exit priority 0")
            warden.at_exit(note, "at_exit priority 1", priority=1)
            warden.at_exit(note, "at_exit priority -1", priority=-1)

        def fini():
            global garbage
            garbage = None
            note("pool finalizer")

        def task(_):
            warden.at_exit(note, "at_exit from a task")

        if __name__ == "__main__":
            with warden.Pool(1, initializer=init, finalizer=fini) as pool:
                pool.map(task, [0])
                pool.close()
                pool.join()
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert prog.out_lines() == [
        "pool finalizer",
        "gc: __del__ of cyclic garbage",
        "atexit handler",
        "at_exit priority 1",
        "at_exit from a task",
        "at_exit priority 0",
        "at_exit priority -1",
    ]


def test_a_child_never_runs_its_parents_exit_callbacks(program):
    prog = program(
        """
        import os
        import sys
        import warden

        def child():
            warden.at_exit(print, f"child {os.getpid()} own", flush=True)

        if __name__ == "__main__":
            warden.at_exit(print, f"parent {os.getpid()} callback", flush=True)
            pid = os.fork()
            if pid == 0:  # a forked copy of the parent, registrations and all
                child()
                sys.exit(0)
            os.waitpid(pid, 0)
            p = warden.Process(target=child)
            p.start()
            p.join()
            with warden.Pool(1) as pool:
                pool.apply(child)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    parent_lines = [line for line in run.lines if line.startswith("parent ")]
    child_lines = [line for line in run.lines if line.startswith("child ")]
    assert parent_lines == [f"parent {run.pid} callback"]
    assert len(child_lines) == 3
    assert len({line.split()[1] for line in child_lines}) == 3
    assert str(run.pid) not in " ".join(child_lines)


def test_exit_callbacks_see_the_exit_order_in_a_process_child(program):
    prog = program(
        """
        import warden

        def child():
            warden.at_exit(print, "child low", priority=-3, flush=True)
            warden.at_exit(print, "child high", priority=3, flush=True)
            print("child body", flush=True)

        if __name__ == "__main__":
            p = warden.Process(target=child)
            p.start()
            p.join()
            print("joined", flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    assert run.lines == ["child body", "child high", "child low", "joined"]


# -- what only a module global holds, at a child's or worker's exit --------

LOG = None
GZ = None


class SaysGoodbye:
    def __init__(self, path):
        self.path = path

    def __del__(self):
        with open(self.path, "a") as f:
            f.write("goodbye\n")


KEEPER = None


def leave_open(path, how):
    """Writes into objects only module globals hold, closes nothing."""
    import gzip

    global LOG, GZ, KEEPER
    LOG = open(f"{path}.log", "w")  # noqa: SIM115  (left open on purpose)
    LOG.write(f"written by {how}\n")
    GZ = gzip.open(f"{path}.gz", "wt")  # noqa: SIM115
    GZ.write("z" * 1000)
    KEEPER = SaysGoodbye(f"{path}.del")
    return os.getpid()


def left_behind(path):
    """What leave_open's objects left in their files."""
    import gzip

    with open(f"{path}.log") as f, gzip.open(f"{path}.gz", "rt") as z:
        written = [f.read(), z.read()]
    if not os.path.exists(f"{path}.del"):
        return [*written, None]
    with open(f"{path}.del") as d:
        return [*written, d.read()]


@pytest.mark.parametrize("how", ["process", "process-terminated", "pool", "initializer"])
def test_what_only_a_module_global_holds_is_finalized_at_exit_as_at_the_end_of_a_program(tmp_path, how):
    """As the interpreter's finalization does at the end of a spawned child:
    a file opened into a global is flushed and closed, a gzip writer writes
    its trailer, a global's ``__del__`` runs (before, the exit path ended the
    process with them unflushed: the file empty, the gzip truncated)."""
    import multiprocessing

    path = str(tmp_path / "out")
    expected = [f"written by {how}\n", "z" * 1000, "goodbye\n"]
    if how == "process":
        # The standard library's spawned child, for comparison.
        std = multiprocessing.get_context("spawn").Process(target=leave_open, args=(f"{path}-std", how))
        std.start()
        std.join(60)
        # Its __del__ comes too late there: the interpreter's finalization
        # has taken the builtins away (NameError: open), so it writes nothing.
        assert left_behind(f"{path}-std") == [*expected[:2], None]
    if how.startswith("process"):
        if how == "process":
            p = warden.Process(target=leave_open, args=(path, how))
            p.start()
        else:
            p = warden.Process(target=sleep_after, args=(path, how))
            p.start()
            assert wait_until(lambda: os.path.exists(f"{path}.log"), timeout=30)
            p.terminate()
        p.join(30)
    elif how == "pool":
        with warden.ProcessPoolExecutor(1) as ex:
            ex.submit(leave_open, path, how).result(timeout=60)
    else:
        with warden.Pool(1, initializer=leave_open, initargs=(path, how)) as pool:
            pool.apply(os.getpid)
            pool.close()
            pool.join()
    assert left_behind(path) == expected


def sleep_after(path, how):
    leave_open(path, how)
    time.sleep(60)


def leave_open_beside_a_thread(path):
    """As leave_open, with a daemon thread of the program still running."""
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    return leave_open(path, "beside a thread")


def test_globals_are_left_alone_while_a_thread_of_the_program_still_runs(tmp_path):
    """The exit path cannot freeze threads as the interpreter's finalization
    does: one still running would find its globals gone under it. So then
    they are left as they are (the object only a global holds is not
    finalized, as before)."""
    path = str(tmp_path / "out")
    p = warden.Process(target=leave_open_beside_a_thread, args=(path,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert not os.path.exists(f"{path}.del")
    # What was written into the file is flushed, though: it is there.
    with open(f"{path}.log") as f:
        assert f.read() == "written by beside a thread\n"


class KeepsAFile:
    file = None


def leave_open_in_a_class(path):
    KeepsAFile.file = open(path, "w")  # noqa: SIM115  (left open on purpose)
    KeepsAFile.file.write("kept by a class\n")


def test_a_file_a_class_attribute_holds_is_flushed_at_exit(tmp_path):
    path = tmp_path / "out"
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(leave_open_in_a_class, str(path)).result(timeout=60)
    assert path.read_text() == "kept by a class\n"


def make_writer(path):
    file = open(path, "w")  # noqa: SIM115  (left open on purpose: the writer holds it)

    def write(line):
        file.write(line + "\n")

    return write


def keep_a_writer(path, how):
    """Keeps, in a global, only a way to write to a file left open: a
    function whose closure holds it, or the file's bound ``write``."""
    global kept_writer
    kept_writer = make_writer(path) if how == "closure" else open(path, "w").write  # noqa: SIM115
    kept_writer(f"written through a {how}")


@pytest.mark.parametrize("how", ["closure", "bound method"])
@pytest.mark.parametrize("kind", ["executor", "Pool", "Process"])
def test_a_file_only_a_writer_function_in_a_global_holds_is_flushed_at_exit(tmp_path, kind, how):
    """A worker's writer made by a factory, kept in a global (or the file's
    bound ``write``): what it wrote was never flushed, the file reachable
    by no global of its own (the standard library's spawn worker flushes it
    as its interpreter frees everything at exit)."""
    path = tmp_path / "out"
    if kind == "executor":
        with warden.ProcessPoolExecutor(1) as ex:
            ex.submit(keep_a_writer, str(path), how).result(timeout=60)
    elif kind == "Pool":
        with warden.Pool(1) as pool:
            pool.apply(keep_a_writer, (str(path), how))
            pool.close()
            pool.join()
    else:
        p = warden.Process(target=keep_a_writer, args=(str(path), how))
        p.start()
        p.join(60)
        assert p.exitcode == 0
    assert path.read_text().strip() == f"written through a {how}"


MAIN_GLOBALS = """
import concurrent.futures
import contextlib
import multiprocessing
import sys
import warden

@contextlib.contextmanager
def quiet():  # defined first: a wrapper that only names __main__
    yield

LOG = None
MODEL = "the parent's"

def init(path):
    global LOG, MODEL
    LOG = open(path, "w")
    MODEL = "the worker's"

def log(x):
    LOG.write(f"{x}\\n")
    return MODEL

def model():
    return MODEL

if __name__ == "__main__":
    impl, path = sys.argv[1], sys.argv[2]
    if impl == "std":
        ctx = multiprocessing.get_context("spawn")
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=init, initargs=(path,))
    else:
        ex = warden.ProcessPoolExecutor(1, initializer=init, initargs=(path,))
    # warden sends a lambda by value (the standard library cannot pickle one).
    read = model if impl == "std" else lambda: MODEL
    with ex:
        print(list(ex.map(log, range(3))), ex.submit(read).result())
    print(repr(open(path).read()))
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_main_globals_an_initializer_set_are_seen_and_finalized_beside_a_contextmanager(
    program, tmp_path, impl
):
    # A @contextmanager defined first in main once made the exit path take
    # contextlib's globals for main's: the file was never flushed, and a
    # lambda saw the parent's value.
    run = program(MAIN_GLOBALS).run(args=(impl, str(tmp_path / "log")))
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        '["the worker\'s", "the worker\'s", "the worker\'s"] the worker\'s',
        "'0\\n1\\n2\\n'",
    ]


WRAPS_STDOUT = """
import concurrent.futures, io, multiprocessing, sys
import warden

class Out:
    stream = None

def task():
    # A class attribute wrapping stdout's buffer: closing it closes stdout's.
    Out.stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8")
    print("printed by the task")  # block-buffered: stdout is a pipe
    return 1

if __name__ == "__main__":
    if sys.argv[1] == "std":
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    else:
        ex = warden.ProcessPoolExecutor(1)
    with ex:
        print("result", ex.submit(task).result(timeout=60))
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_what_a_task_printed_is_written_though_a_class_attribute_wraps_stdout(program, impl):
    run = program(WRAPS_STDOUT).run(args=(impl,), env={"PYTHONUNBUFFERED": ""})
    assert run.returncode == 0, run.stderr
    assert sorted(run.lines) == ["printed by the task", "result 1"]


SWAPS_STDOUT = """
import concurrent.futures, multiprocessing, os, sys
import warden

def report(i):
    print("printed before the swap", i)  # block-buffered: stdout is a pipe
    return i

def silence():
    sys.stdout = open(os.devnull, "w")  # as code quieting a noisy library does; never put back
    return "silenced"

def both():
    report(0)
    silence()

if __name__ == "__main__":
    impl, kind = sys.argv[1], sys.argv[2]
    ctx = multiprocessing.get_context("spawn") if impl == "std" else warden
    if kind == "executor":
        if impl == "std":
            ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
        else:
            ex = warden.ProcessPoolExecutor(1)
        with ex:
            ex.submit(report, 0).result(timeout=60)
            ex.submit(silence).result(timeout=60)
    elif kind == "pool":
        with ctx.Pool(1) as pool:
            pool.apply(report, (0,))
            pool.apply(silence)
            pool.close()
            pool.join()
    else:
        p = ctx.Process(target=both)
        p.start()
        p.join(60)
    print("parent done", flush=True)
"""


@pytest.mark.parametrize("kind", ["executor", "pool", "process"])
@pytest.mark.parametrize("impl", ["std", "warden"])
def test_what_was_printed_before_a_task_replaced_stdout_for_good_is_still_written(program, impl, kind):
    run = program(SWAPS_STDOUT).run(args=(impl, kind), env={"PYTHONUNBUFFERED": ""})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["printed before the swap 0", "parent done"], run.stderr


STDOUT_TO_A_FULL_DISK = """
import multiprocessing, os, sys
import warden

def task(x):
    print("printed by the task", x)  # buffered: written when the worker exits
    return x

if __name__ == "__main__":
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, 1)  # the workers' stdout too
    ctx = multiprocessing.get_context("spawn") if sys.argv[1] == "std" else warden
    with ctx.Pool(2) as pool:
        results = pool.map(task, range(4))
        pool.close()
        pool.join()
    sys.stderr.write(f"results {results}\\n")
    p = ctx.Process(target=task, args=(4,))
    p.start()
    p.join(60)
    sys.stderr.write(f"exitcode {p.exitcode}\\n")
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_output_lost_at_exit_is_reported_and_a_process_child_ends_with_the_interpreters_code_120(
    program, impl
):
    run = program(STDOUT_TO_A_FULL_DISK).run(args=(impl,), env={"PYTHONUNBUFFERED": ""})
    assert run.returncode == 0, run.stderr
    assert "results [0, 1, 2, 3]" in run.stderr
    assert "No space left on device" in run.stderr
    # The interpreter's exit code when it cannot flush stdio at its end.
    assert "exitcode 120" in run.stderr
    if impl == "warden":
        # Each says what it is: a worker of the pool, and the Process child.
        lost = [line for line in run.stderr.splitlines() if "what it printed was lost" in line]
        assert any(line.startswith("warden: worker ") for line in lost), run.stderr
        assert sum(line.startswith("warden: child ") for line in lost) == 1, run.stderr


STDOUT_CLOSED_BY_THE_PROGRAM = """
import multiprocessing, sys
import warden

def report(path):
    with open(path, "w") as f:
        sys.stdout = f  # redirected, and never put back: closed at the with's end
        print("report written")
    return 1

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn") if sys.argv[1] == "std" else warden
    p = ctx.Process(target=report, args=(sys.argv[2] + ".process",))
    p.start()
    p.join(60)
    with ctx.Pool(1) as pool:
        result = pool.apply(report, (sys.argv[2] + ".pool",))
        pool.close()
        pool.join()
    print("exitcode", p.exitcode, "result", result)
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_a_stdout_the_program_closed_is_not_reported_as_lost_output(program, impl, tmp_path):
    """A target or task that put a file in ``sys.stdout``'s place and closed
    it has nothing left to flush: the exit path skips it, as the
    interpreter's exit and the standard library's children do, instead of
    saying that what it printed was lost."""
    out = tmp_path / "report"
    run = program(STDOUT_CLOSED_BY_THE_PROGRAM).run(args=(impl, str(out)))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["exitcode 0 result 1"]
    assert run.stderr == ""
    for kind in ("process", "pool"):
        assert Path(f"{out}.{kind}").read_text() == "report written\n"


MAIN_OBJECT_AT_EXIT = """
import concurrent.futures, json, multiprocessing, sys
import warden

class Report:
    def __del__(self):
        # json is a global of main: None here if main was torn down late
        sys.stderr.write("del " + json.dumps({"ok": True}) + "\\n")

def twice(x):
    return 2 * x

if __name__ == "__main__":
    impl, api = sys.argv[1:]
    if api == "executor":
        if impl == "std":
            ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        else:
            ex = warden.ProcessPoolExecutor(1)
        with ex:
            ex.submit(twice, 1).result(timeout=60)
            ex.submit(len, "x").result(timeout=60)
    elif api == "pool":
        ctx = multiprocessing.get_context("spawn") if impl == "std" else warden
        with ctx.Pool(1) as pool:
            pool.apply(twice, (1,))
            pool.apply(len, ("x",))
    else:
        ctx = multiprocessing.get_context("spawn") if impl == "std" else warden
        p = ctx.Process(target=twice, args=(1,))
        p.start()
        p.join(60)
    report = Report()
    print("end of main")
"""


@pytest.mark.parametrize("api", ["executor", "pool", "process"])
@pytest.mark.parametrize("impl", ["std", "warden"])
def test_an_object_in_mains_globals_is_finalized_at_exit_with_mains_globals_still_set(program, impl, api):
    """The interpreter finalizes ``__main__`` when it clears ``sys.modules``:
    an object main holds sees main's globals in its ``__del__``. A reference
    to main or its functions kept anywhere would have it torn down late,
    after its globals are ``None`` (warden's pickling kept both: main, to
    know whether a child can import it, and the functions it sends by
    reference)."""
    run = program(MAIN_OBJECT_AT_EXIT).run(args=(impl, api))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["end of main"]
    assert 'del {"ok": true}' in run.stderr.splitlines(), run.stderr


LAZY_GLOBAL_AT_EXIT = """
import concurrent.futures, multiprocessing, sys
import warden

_client = None  # made on first use, after the globals its __del__ uses
SERVICE = {"name": "billing"}
pending = []

class Client:
    def __init__(self):
        pending.append("record")

    def __del__(self):
        sys.stderr.write(f"{SERVICE['name']}: flushing {len(pending)} record(s)\\n")

def use_client(_=None):
    global _client
    if _client is None:
        _client = Client()
"""

#: Runs ``use_client`` once in a worker or child: ``prog.py std|warden executor|pool|process``.
USE_CLIENT_IN_A_WORKER = """
if __name__ == "__main__":
    impl, api = sys.argv[1:]
    spawn = multiprocessing.get_context("spawn")
    if api == "executor":
        kind = concurrent.futures.ProcessPoolExecutor if impl == "std" else warden.ProcessPoolExecutor
        with kind(1, **({"mp_context": spawn} if impl == "std" else {})) as ex:
            ex.submit(use_client).result(timeout=60)
    elif api == "pool":
        with (spawn if impl == "std" else warden).Pool(1) as pool:
            pool.apply(use_client)
            pool.close()
            pool.join()
    else:
        p = (spawn if impl == "std" else warden).Process(target=use_client)
        p.start()
        p.join(60)
"""


@pytest.mark.parametrize("api", ["executor", "pool", "process"])
@pytest.mark.parametrize("impl", ["std", "warden"])
def test_a_global_made_on_first_use_is_finalized_at_exit_seeing_the_globals_set_after_its_name(
    program, impl, api
):
    """A lazily made ``_client`` whose ``__del__`` uses globals set after its
    placeholder: the interpreter's exit finalizes it with those still set.
    So does the worker's exit path, which clears main's globals in the
    order CPython clears a module's (one leading underscore first), one at
    a time out of both namespaces main has in a worker (before, newest
    first, and out of one namespace wholly before the other: the
    ``__del__`` found ``SERVICE`` already ``None``, a TypeError)."""
    run = program(LAZY_GLOBAL_AT_EXIT + USE_CLIENT_IN_A_WORKER).run(args=(impl, api))
    assert run.returncode == 0, run.stderr
    assert "billing: flushing 1 record(s)" in run.stderr.splitlines(), run.stderr
    assert "Exception ignored" not in run.stderr, run.stderr


SHARED_GLOBAL_HELPER = """
import sys

SERVICE = {"name": "billing"}

class Client:
    def __del__(self):
        sys.stderr.write(f"helper: flushing for {SERVICE['name']}\\n")

_client = None

def use_client(_=None):
    global _client
    if _client is None:
        _client = Client()
"""

SHARED_GLOBAL_MAIN = (
    """
import concurrent.futures, multiprocessing, sys
import warden
from helper import SERVICE, use_client  # main holds the helper's global too
"""
    + USE_CLIENT_IN_A_WORKER
)


@pytest.mark.parametrize("api", ["executor", "pool", "process"])
@pytest.mark.parametrize("impl", ["std", "warden"])
def test_a_global_main_imported_from_another_module_stays_set_there_until_that_modules_turn(
    program, impl, api
):
    """``from helper import SERVICE`` in main: clearing main's name leaves
    the helper's own, which its ``_client.__del__`` reads when the helper's
    turn comes (only main's two namespaces are cleared as one)."""
    program(SHARED_GLOBAL_HELPER, name="helper.py")
    run = program(SHARED_GLOBAL_MAIN).run(args=(impl, api))
    assert run.returncode == 0, run.stderr
    assert "helper: flushing for billing" in run.stderr.splitlines(), run.stderr
    assert "Exception ignored" not in run.stderr, run.stderr


GOODBYE_HELPER = """
import os, sys

class Goodbye:
    def __init__(self, name):
        self.name = name

    def __del__(self):
        sys.stderr.write(f"del {self.name} {os.getpid()}\\n")

KEPT = Goodbye("helper")
"""

LAZY_HELPER = """
from helper import Goodbye

KEPT = Goodbye("lazyhelper")
"""

PROGRAM_MODULES = """
import concurrent.futures, multiprocessing, os, sys
import helper  # imported with main: a zygote has it before it forks
import warden

def task(_):
    import lazyhelper  # imported by the worker itself
    return os.getpid()

if __name__ == "__main__":
    if sys.argv[1] == "std":
        ctx = multiprocessing.get_context("spawn")
        ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, max_tasks_per_child=1)
    else:
        ex = warden.ProcessPoolExecutor(2, max_tasks_per_child=1)
    with ex:
        pids = sorted(set(ex.map(task, range(4))))
    print(" ".join(map(str, pids)))
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_globals_of_program_modules_imported_before_and_after_the_fork_are_finalized_in_each_worker(
    program, impl
):
    """A module of the program that main imports (which a zygote imported
    before it forked the worker) and one a task imports: each worker that ran
    a task finalizes the globals of both at its exit, as a spawned child's
    interpreter does."""
    program(GOODBYE_HELPER, name="helper.py")
    program(LAZY_HELPER, name="lazyhelper.py")
    run = program(PROGRAM_MODULES).run(args=(impl,))
    assert run.returncode == 0, run.stderr
    pids = run.lines[0].split()
    assert len(pids) >= 1
    said = set(run.stderr.splitlines())
    for pid in pids:
        assert f"del helper {pid}" in said, run.stderr
        assert f"del lazyhelper {pid}" in said, run.stderr


def test_a_forked_workers_exit_path_reads_only_the_modules_imported_since_unless_one_was_removed():
    """What a forked worker's exit path reads of ``sys.modules``: the entries
    added since its zygote noted them, in import order; every entry, once
    one the zygote had is gone, or given another module (the rest can no
    longer be told apart)."""
    import sys
    import types

    from warden import _workerloop

    known = _workerloop._ModulesAtFork()
    added = [types.ModuleType(f"warden_test_added_{i}") for i in range(2)]
    last = known.last
    try:
        for module in added:
            sys.modules[module.__name__] = module
        since = _workerloop._imported_since(known)
        assert since == [(m.__name__, m) for m in added]
        removed = sys.modules.pop(last)
        try:
            assert _workerloop._imported_since(known) is None
            sys.modules[last] = removed  # back, but now the newest
            assert _workerloop._imported_since(known) is None
            # Imported again: the zygote's last name, a new module, newest.
            del sys.modules[last]
            for module in added:
                del sys.modules[module.__name__]
            sys.modules[last] = types.ModuleType(last)
            assert _workerloop._imported_since(known) is None
        finally:
            sys.modules[last] = removed
    finally:
        for module in added:
            sys.modules.pop(module.__name__, None)


def test_a_forked_workers_exit_path_reads_every_module_once_one_of_the_programs_is_replaced():
    import sys
    import types

    from warden import _workerloop

    name = "warden_test_program_module"
    sys.modules[name] = types.ModuleType(name)
    try:
        known = _workerloop._ModulesAtFork()
        known.programs.append((name, sys.modules[name]))  # as if it were the program's own
        assert _workerloop._imported_since(known) == []
        sys.modules[name] = types.ModuleType(name)  # a task put another in its place
        assert _workerloop._imported_since(known) is None
    finally:
        sys.modules.pop(name, None)


GET_LOGGER_THEN_POOL_AT_EXIT = """
import atexit, multiprocessing, sys
import warden

def at_exit():
    ctx = multiprocessing.get_context("spawn") if sys.argv[1] == "std" else warden
    with ctx.Pool(1) as pool:
        print("at exit", pool.apply(abs, (-4,)), flush=True)

if __name__ == "__main__":
    atexit.register(at_exit)
    multiprocessing.get_logger()  # re-registers multiprocessing's exit function: now it runs first
    ctx = multiprocessing.get_context("spawn") if sys.argv[1] == "std" else warden
    with ctx.Pool(1) as pool:
        print("main", pool.apply(abs, (-3,)), flush=True)
"""


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_an_atexit_handler_can_start_a_pool_after_multiprocessing_get_logger(program, impl):
    """``multiprocessing.get_logger()`` moves multiprocessing's exit function
    ahead of the handlers registered before it; warden's exit step, among
    that function's finalizers, ran early with it and refused the handler's
    pool. It runs there only at the end of a multiprocessing child."""
    if sys.version_info[:2] == (3, 12):
        pytest.skip("Python 3.12 starts no thread in atexit handlers")
    run = program(GET_LOGGER_THEN_POOL_AT_EXIT).run(timeout=90, args=(impl,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["main 3", "at exit 4"], run.stderr


# -- a global's __del__ that uses other globals of its module ---------------

REGISTRY_HELPER = """
import logging, os, sys

log = logging.getLogger("helper")  # module-level logger, as people write it
_open = set()  # a private registry the object removes itself from

class Conn:
    def __init__(self):
        self.pid = os.getpid()
        _open.add(self.pid)

    def __del__(self):
        _open.discard(self.pid)
        log.warning("helper: conn %d closed, %d still open", self.pid, len(_open))

conn = None

def connect():
    global conn
    conn = Conn()
"""

DEL_USES_GLOBALS = """
import concurrent.futures, logging, multiprocessing, os, sys
import helper
import warden

PREFIX = "main: closed by __del__"  # a constant
log = logging.getLogger("main")
_live = {}  # a private registry

class Plain:  # in no cycle: freed as soon as its last reference goes
    def __del__(self):
        os.write(2, (PREFIX + " (plain)\\n").encode())

class Cyclic:  # in a cycle: freed by the collector
    def __init__(self):
        self.me = self

    def __del__(self):
        os.write(2, (PREFIX + " (cyclic)\\n").encode())

class Handle:
    def __init__(self, key):
        self.key = key
        _live[key] = True

    def __del__(self):
        _live.pop(self.key, None)
        log.warning("main: released %s, %d live", self.key, len(_live))

def setup(_=None):
    global plain, cyclic, handle
    plain, cyclic, handle = Plain(), Cyclic(), Handle("db")
    helper.connect()
    return os.getpid()

if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    impl, api = sys.argv[1:]
    spawn = multiprocessing.get_context("spawn")
    if api == "executor":
        kind = concurrent.futures.ProcessPoolExecutor if impl == "std" else warden.ProcessPoolExecutor
        with kind(1, **({"mp_context": spawn} if impl == "std" else {})) as ex:
            pid = ex.submit(setup).result(timeout=60)
    elif api == "pool":
        with (spawn if impl == "std" else warden).Pool(1, initializer=setup) as pool:
            pid = pool.apply(os.getpid)
            pool.close()
            pool.join()
    else:
        p = (spawn if impl == "std" else warden).Process(target=setup)
        p.start()
        p.join(60)
        pid = p.pid
    print(pid)
"""


@pytest.mark.parametrize("api", ["executor", "pool", "process"])
@pytest.mark.parametrize("impl", ["std", "warden"])
def test_a_globals_del_sees_the_other_globals_of_its_module_at_exit(program, start_method, impl, api):
    """A worker's or child's exit finalizes the program's modules as the
    interpreter's does: their objects' ``__del__`` methods run with every
    global of their module still set (a constant, a module-level logger, a
    private registry), in main and in a module it imports, whether the
    object is in a cycle or not (before, the exit path set the globals to
    ``None`` one name at a time, and a ``__del__`` that used one failed:
    "Exception ignored in ... __del__")."""
    program(REGISTRY_HELPER, name="helper.py")
    run = program(DEL_USES_GLOBALS).run(args=(impl, api))
    assert run.returncode == 0, run.stderr
    pid = run.lines[-1]
    said = run.stderr.splitlines()
    assert "Exception ignored" not in run.stderr, run.stderr
    for line in (
        "main: closed by __del__ (plain)",
        "main: closed by __del__ (cyclic)",
        "main: released db, 0 live",
        f"helper: conn {pid} closed, 0 still open",
    ):
        assert line in said, run.stderr


KEPT_ALIVE_ELSEWHERE = """
import logging, os, sys
import warden

print("main imported", flush=True)
PREFIX = "kept: closed by __del__"

class Handler(logging.Handler):  # the logging module keeps main alive through it
    def emit(self, record):
        pass

class Goodbye:
    def __del__(self):
        os.write(2, (PREFIX + "\\n").encode())

def target():
    global kept
    logging.getLogger().addHandler(Handler())
    kept = Goodbye()

if __name__ == "__main__":
    p = warden.Process(target=target)
    p.start()
    p.join(60)
    print("exitcode", p.exitcode)
"""


def test_a_module_something_else_keeps_alive_has_its_globals_cleared_and_is_not_imported_again(
    program, start_method
):
    """A module of the program that outlives the collection of the program's
    modules (a library holds one of its objects) is put back in
    ``sys.modules`` and has its globals cleared one at a time, those that
    hold an object with a ``__del__`` first: what only a global holds is
    still finalized, seeing the module's other globals, and nothing imports
    (runs) the module again."""
    run = program(KEPT_ALIVE_ELSEWHERE).run()
    assert run.returncode == 0, run.stderr
    # Once in the program, once for the child (by its zygote, or by itself).
    assert run.lines.count("main imported") == 2, run.stdout
    assert run.lines[-1] == "exitcode 0"
    assert "kept: closed by __del__" in run.stderr.splitlines(), run.stderr
