"""warden.Process against multiprocessing.Process."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time

import pytest

import warden

from conftest import alive, wait_until


def write(path, text):
    with open(path, "a") as f:
        f.write(text)


def exit_with(code):
    sys.exit(code)


def raise_value_error():
    raise ValueError("from the child")


class CannotBePrinted:
    def __str__(self):
        raise RuntimeError("no text for this exit code")


def exit_with_a_code_that_cannot_be_printed():
    sys.exit(CannotBePrinted())


def sleep_forever(path=None):
    if path is not None:
        write(path, "started\n")
    try:
        time.sleep(60)
    finally:
        if path is not None:
            write(path, "finally\n")


def report_identity(path):
    me = warden.current_process()
    parent = multiprocessing.parent_process()
    write(path, f"{me.name} {me.pid} {os.getpid()} {me.daemon} {parent.pid} {me.is_alive()} {me.exitcode}\n")


class Subclassed(warden.Process):
    def __init__(self, path):
        super().__init__(name="custom")
        self.path = path

    def run(self):
        write(self.path, f"run of {type(self).__name__} {self.name}\n")


def wait_for_file(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("make", [warden.Process, multiprocessing.get_context("spawn").Process])
def test_a_copied_process_starts_and_a_deep_copy_is_refused_as_the_standard_librarys(tmp_path, make):
    out = tmp_path / "out"
    p = make(target=write, args=(str(out), "copied"))
    copied = copy.copy(p)
    copied.start()
    copied.join(60)
    assert copied.exitcode == 0 and out.read_text() == "copied"
    with pytest.raises(TypeError, match="AuthenticationString"):
        copy.deepcopy(make(target=write))


def test_a_process_is_a_multiprocessing_process_for_code_and_annotations_naming_it():
    assert isinstance(warden.Process(), multiprocessing.Process)
    assert issubclass(warden.Process, multiprocessing.process.BaseProcess)


def test_start_then_join_runs_the_target_and_gives_exit_code_zero(tmp_path):
    out = tmp_path / "out"
    p = warden.Process(target=write, args=(out, "hello\n"))
    assert p.exitcode is None and p.pid is None and not p.is_alive()
    p.start()
    assert isinstance(p.pid, int) and p.pid > 0 and p.ident == p.pid
    p.join(30)
    assert not p.is_alive()
    assert p.exitcode == 0
    assert out.read_text() == "hello\n"


def report_name(path):
    write(path, ascii(warden.current_process().name) + "\n")


@pytest.mark.parametrize(
    "name",
    [
        # os.fsdecode of a file name that is not UTF-8, as multiprocessing takes it.
        b"job-\xe9".decode("utf-8", "surrogateescape"),
        # The name is also its pool's, in the names of the threads that
        # serve it, where a NUL byte made the thread's start panic.
        "job\x00one",
    ],
    ids=["not-utf8", "nul-byte"],
)
def test_a_process_named_with_text_a_c_string_cannot_hold_starts_and_keeps_its_name(tmp_path, name):
    out = tmp_path / "out"
    p = warden.Process(target=report_name, args=(out,), name=name)
    p.start()
    p.join(30)
    assert p.exitcode == 0 and p.name == name
    assert out.read_text() == ascii(name) + "\n"


@pytest.mark.parametrize(
    ("target", "args", "expected"),
    [
        (exit_with, (3,), 3),
        (exit_with, (None,), 0),
        (exit_with, ("bye",), 1),
        (raise_value_error, (), 1),
        # Beyond a C int: what the interpreter's exit(3) keeps of it.
        (exit_with, (2**31,), 0),
        (exit_with, (-(2**31) - 1,), 255),
        (exit_with, (2**40 + 3,), 3),
        # Beyond a C long: -1 (it was the low bits: 2**64 + 3 gave 3, 2**63 gave 0).
        (exit_with, (2**64 + 3,), 255),
        (exit_with, (-(2**63) - 1,), 255),
        # Printed, as a code that is not an int is; when that fails, still 1
        # (it was 0: the child's error report raised, and ended it quietly).
        (exit_with_a_code_that_cannot_be_printed, (), 1),
    ],
)
def test_exit_codes_follow_the_standard_library(target, args, expected):
    ours = warden.Process(target=target, args=args)
    ours.start()
    ours.join(30)
    theirs = multiprocessing.get_context("spawn").Process(target=target, args=args)
    theirs.start()
    theirs.join(30)
    assert ours.exitcode == theirs.exitcode == expected


def fork_a_copy_that(ends, path):
    pid = os.fork()
    if pid == 0:  # the copy: out of the target, as the original would leave it
        if ends == "exit":
            sys.exit(5)
        if ends == "raise":
            raise ValueError("the copy's error")
        if ends == "leaves a thread":
            threading.Thread(target=lambda: (time.sleep(0.5), write(path + ".thread", "done"))).start()
        return
    _, status = os.waitpid(pid, 0)
    code = str(os.waitstatus_to_exitcode(status))
    with contextlib.suppress(FileNotFoundError), open(f"{path}.thread") as thread:
        code += " " + thread.read()
    write(path, code)


@pytest.mark.parametrize(
    ("ends", "expected"), [("exit", "5"), ("raise", "1"), ("return", "0"), ("leaves a thread", "0 done")]
)
def test_a_copy_a_targets_fork_made_ends_with_its_own_exit_code_as_the_standard_librarys(
    tmp_path, ends, expected
):
    # It ended with 0 whatever it did: it was taken for a pool task's copy.
    codes = {}
    for name, make in (("std", multiprocessing.get_context("spawn").Process), ("warden", warden.Process)):
        path = tmp_path / name
        p = make(target=fork_a_copy_that, args=(ends, str(path)))
        p.start()
        p.join(30)
        codes[name] = (p.exitcode, path.read_text())
    assert codes == {"std": (0, expected), "warden": (0, expected)}


def sleep_long():
    time.sleep(60)


def test_sighup_from_outside_ends_a_process_by_that_signal_as_the_standard_librarys():
    codes = {}
    for name, make in (("std", multiprocessing.get_context("spawn").Process), ("warden", warden.Process)):
        p = make(target=sleep_long)
        p.start()
        time.sleep(1.0)  # running its target
        os.kill(p.pid, signal.SIGHUP)
        p.join(30)
        codes[name] = p.exitcode
    assert codes == {"std": -signal.SIGHUP, "warden": -signal.SIGHUP}


def test_repr_reads_as_the_standard_librarys_through_the_life_of_a_process():
    seen = {}
    for name, make in (("std", multiprocessing.get_context("spawn").Process), ("warden", warden.Process)):
        p = make(target=sleep_long, name="P", daemon=True)
        reprs = [repr(p)]
        p.start()
        pid = str(p.pid)
        reprs.append(repr(p))
        p.terminate()
        p.join(30)
        reprs.append(repr(p))
        p.close()
        reprs.append(repr(p))
        seen[name] = [r.replace(pid, "PID").replace(type(p).__name__, "Process", 1) for r in reprs]
    assert seen["warden"] == seen["std"]
    stopped = f"<Process name='P' pid=PID parent={os.getpid()} stopped exitcode=-SIGTERM daemon>"
    assert seen["warden"][2] == stopped


def test_an_exception_prints_the_traceback_in_the_child(program):
    prog = program(
        """
        import warden
        def boom():
            raise ValueError("from the child")
        if __name__ == "__main__":
            p = warden.Process(target=boom, name="P")
            p.start(); p.join()
            print("exitcode", p.exitcode)
        """
    )
    run = prog.run()
    assert run.stdout.strip() == "exitcode 1"
    assert "Process P:" in run.stderr
    assert "ValueError: from the child" in run.stderr


def test_a_target_raising_task_interrupted_itself_fails_as_with_any_other_exception(program):
    """No stop was asked: the exception is the target's own, not the sign of
    a ``terminate()``."""
    prog = program(
        """
        import warden
        def target():
            raise warden.TaskInterrupted("the target's own reason")
        if __name__ == "__main__":
            p = warden.Process(target=target, name="P")
            p.start(); p.join(30)
            print("exitcode", p.exitcode)
        """
    )
    run = prog.run()
    assert run.stdout.strip() == "exitcode 1", run.stderr
    assert "Process P:" in run.stderr
    assert "TaskInterrupted: the target's own reason" in run.stderr


def test_a_target_the_child_cannot_unpickle_gives_exit_code_one(program):
    prog = program(
        """
        import sys, types, warden
        if __name__ == "__main__":
            ghost = types.ModuleType("ghost")  # exists in this process only
            exec("def hello():\\n    print('never')", ghost.__dict__)
            ghost.hello.__module__ = "ghost"
            sys.modules["ghost"] = ghost
            p = warden.Process(target=ghost.hello)
            p.start(); p.join()
            print("exitcode", p.exitcode)
        """
    )
    run = prog.run()
    assert run.stdout.strip() == "exitcode 1"
    assert "No module named 'ghost'" in run.stderr


@pytest.mark.parametrize("kind", ["warden", "spawn"])
def test_sys_exit_while_the_child_unpickles_its_target_gives_that_exit_code(program, kind):
    """An argument whose unpickling calls ``sys.exit(3)`` (a check that the
    child cannot run there, say): the child ends with code 3, as under the
    standard library's spawn, where the ``SystemExit`` leaves its interpreter."""
    prog = program(
        f"""
        import multiprocessing, sys, warden
        class LeavesOnArrival:
            def __reduce__(self):
                return (sys.exit, (3,))
        def never(arg):
            print("never")
        if __name__ == "__main__":
            cls = warden.Process if "{kind}" == "warden" else multiprocessing.get_context("spawn").Process
            p = cls(target=never, args=(LeavesOnArrival(),))
            p.start(); p.join()
            print("exitcode", p.exitcode)
        """
    )
    run = prog.run()
    assert run.stdout.strip() == "exitcode 3", run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("kind", ["warden", "spawn"])
@pytest.mark.parametrize("ends", ["exit-3", "returns"])
def test_a_target_that_closes_the_descriptors_it_inherited_keeps_its_exit_code(program, kind, ends):
    """A target that closes every descriptor it did not open (a daemonizing
    helper's hygiene step) and then finishes: its ``atexit`` handler runs
    and its exit code is its own, as under spawn (warden's child took the
    closed channel for its parent's death and killed itself: -9)."""
    prog = program(
        f"""
        import atexit, multiprocessing, os, sys, warden
        def target():
            atexit.register(lambda: print("atexit ran", flush=True))
            os.closerange(3, 4096)
            if "{ends}" == "exit-3":
                sys.exit(3)
        if __name__ == "__main__":
            cls = warden.Process if "{kind}" == "warden" else multiprocessing.get_context("spawn").Process
            p = cls(target=target)
            p.start()
            p.join(60)
            print("exitcode", p.exitcode)
        """
    )
    run = prog.run()
    code = 3 if ends == "exit-3" else 0
    assert run.lines == ["atexit ran", f"exitcode {code}"], run.stderr
    assert run.stderr == ""


@pytest.mark.parametrize("kind", ["warden", "spawn"])
def test_a_process_refused_for_want_of_descriptors_is_left_unstarted_and_starts_on_retry(program, kind):
    """With no descriptor free, or a few, too few for a child, ``start()``
    fails (after it has begun, with a few): the ``OSError`` carries the
    system's error number (``EMFILE``), as the standard library's does, so
    that ``except OSError`` code sees it; and the object is
    as it was (``exitcode`` None, not alive), so that a retry once
    descriptors are free starts it, as the standard library's does (the
    object used to be left "started", its ``exitcode`` 1, with no child ever
    run, and a retry raised "cannot start a process twice")."""
    prog = program(
        f"""
        import errno, multiprocessing, os, resource, warden
        def hello():
            pass
        if __name__ == "__main__":
            cls = warden.Process if "{kind}" == "warden" else multiprocessing.get_context("spawn").Process
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            said = []
            for free in range(9):
                held = []
                try:
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    pass
                for fd in held[len(held) - free:]:
                    os.close(fd)
                del held[len(held) - free:]
                p = cls(target=hello)
                try:
                    p.start()
                    outcome = "started"
                except OSError as e:
                    outcome = f"refused {{errno.errorcode.get(e.errno)}} {{p.exitcode}} {{p.is_alive()}}"
                    said.append((p.name, str(e)))
                for fd in held:
                    os.close(fd)
                if outcome != "started":
                    p.start()
                p.join(60)
                print(free, outcome, p.exitcode, flush=True)
            print("a pool's words:", any("worker" in words for _, words in said), flush=True)
            # (The first refusal may be an import's, of the module that starts children.)
            print("named:", [name in words for name, words in said if "cannot start" in words], flush=True)
        """
    )
    run = prog.run()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # (The error names the process it could not start, as every other
    # refusal of warden's start() does.)
    named = lines.pop()
    if kind == "warden":
        assert "True" in named and "False" not in named, run.stdout
    # (The error speaks of the process, not of a pool's first worker.)
    assert lines.pop() == "a pool's words: False", run.stdout
    assert len(lines) == 9, run.stderr
    for line in lines:
        _free, outcome = line.split(" ", 1)
        assert outcome in ("started 0", "refused EMFILE None False 0"), line
    # The limit is low enough that some start is refused.
    assert "refused" in lines[0]


def test_terminate_gives_minus_sigterm_and_runs_finally_blocks(tmp_path):
    out = tmp_path / "out"
    p = warden.Process(target=sleep_forever, args=(out,))
    p.start()
    assert wait_for_file(out)
    start = time.monotonic()
    p.terminate()
    p.join(30)
    assert time.monotonic() - start < 5
    assert p.exitcode == -signal.SIGTERM
    assert out.read_text() == "started\nfinally\n"


TERMINATED_WHILE_EXITING = """
import atexit, multiprocessing, sys, time
import warden

def then(path):
    # Written, not flushed: the exit path flushes the files the program's
    # globals hold after the exit handlers, so the rest of it ran.
    global LOG
    LOG = open(path, "w")
    LOG.write("exit path went on")

def fills_a_queue(path, q):
    then(path)
    q.put(b"x" * (4 << 20))  # more than a pipe holds: the exit waits for a reader

def sleeps_at_exit(path, q):
    then(path)
    def handler():
        time.sleep(60)
    atexit.register(handler)

def sleeps_at_exit_in_c(path, q):
    then(path)
    atexit.register(time.sleep, 60)

class Slow:
    def __del__(self):
        time.sleep(60)

def leaves_slow_garbage(path, q):
    then(path)
    a = Slow()
    a.me = a

def sleeps_twice_at_exit(path, q):
    then(path)
    atexit.register(time.sleep, 60)
    atexit.register(time.sleep, 60)

def leaves_a_child_running(path, q):
    then(path)
    warden.Process(target=time.sleep, args=(60,)).start()  # not a daemon: joined at exit

def waits_for_room_in_a_queue(path, q):
    then(path)
    full = multiprocessing.get_context("spawn").Queue(1)
    full.put(1)
    atexit.register(full.put, 2)  # blocks: a semaphore this process took before

def waits_on_a_warden_event(path, q):
    then(path)
    atexit.register(warden.Event().wait)  # a wait in warden's code the program called

def works_at_exit(path, q):
    # An exit handler that works (not waits) for a while: left to finish.
    def handler():
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:
            n += 1
        open(path + ".work", "w").write("finished")
    then(path)
    atexit.register(handler)

def is_terminated_while_running(path, q):
    # Stopped while it runs (not yet exiting): its exit handler's wait too.
    then(path)
    atexit.register(time.sleep, 60)
    time.sleep(60)

if __name__ == "__main__":
    kind, case, path = sys.argv[1:]
    cls = warden.Process if kind == "warden" else multiprocessing.get_context("spawn").Process
    q = multiprocessing.get_context("spawn").Queue()
    p = cls(target=globals()[case], args=(path, q))
    p.start()
    p.join(2)  # the target has returned; its exit waits
    p.terminate()
    p.join(60)
    print("exitcode", p.exitcode)
"""


@pytest.mark.parametrize("kind", ["warden", "spawn"])
@pytest.mark.parametrize(
    "case",
    [
        "fills_a_queue",
        "sleeps_at_exit",
        "sleeps_at_exit_in_c",
        "leaves_slow_garbage",
        "sleeps_twice_at_exit",
        "leaves_a_child_running",
        "waits_for_room_in_a_queue",
        "waits_on_a_warden_event",
        "works_at_exit",
        "is_terminated_while_running",
    ],
)
def test_terminate_while_the_child_waits_at_exit_ends_it_with_minus_sigterm(program, tmp_path, kind, case):
    """The target has returned and the child's exit waits (a Queue's data
    going into a full pipe, an exit handler, a ``__del__``):
    ``terminate()`` ends that wait, and every later one (a second handler,
    the join of a child of its own, which is stopped), and the child ends
    with ``-SIGTERM``, as the standard library's does at once. warden's exit
    path goes on with its own steps (a file a global holds is flushed);
    before, SIGTERM changed nothing, and the child was SIGKILLed after the
    grace period (``-9``)."""
    out = tmp_path / "went-on"
    run = program(TERMINATED_WHILE_EXITING).run(args=(kind, case, str(out)))
    assert run.returncode == 0, run.stderr
    assert run.lines == [f"exitcode {-signal.SIGTERM}"], run.stderr
    if kind == "warden":
        assert out.read_text() == "exit path went on"
        if case == "works_at_exit":
            assert (tmp_path / "went-on.work").read_text() == "finished"
        assert "Traceback" not in run.stderr, run.stderr


LOCK_AT_EXIT = """
import atexit, multiprocessing, time
import warden

def spin(lock, ready):
    def at_exit():
        ready.set()
        while True:
            with lock:
                time.sleep(0.002)  # waits holding it: where the stop lands
    atexit.register(at_exit)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    for i in range(15):
        lock, ready = ctx.Lock(), ctx.Event()
        p = warden.Process(target=spin, args=(lock, ready))
        p.start()
        ready.wait(30)
        time.sleep(0.05 + (i % 7) * 0.013)
        p.terminate()
        p.join(60)
        print(p.exitcode, "free" if lock.acquire(timeout=5) else "held", flush=True)
"""


def test_terminate_while_an_exit_handler_takes_a_lock_never_leaves_it_held(program):
    """The stop that ends an exit handler's wait lets the program's lock go:
    raised in the wait, the ``with`` statement releases it; never raised
    just as the lock is taken (between its ``acquire`` and the ``with``
    statement's charge of it), as for a running target: it comes a moment
    later. Raised there, it left the lock held in about a third of runs."""
    run = program(LOCK_AT_EXIT).run(timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.lines == [f"{-signal.SIGTERM} free"] * 15, run.stderr


def wait_on_a_nested_executor(path):
    warden.at_exit(lambda: write(path, "at_exit\n"))
    with warden.ProcessPoolExecutor(1) as ex:
        write(path, "started\n")
        try:
            ex.submit(time.sleep, 60).result()
        finally:
            write(path, "finally\n")


def test_terminate_interrupts_a_target_waiting_on_a_nested_pool_and_stops_that_pool(tmp_path):
    """The target waits in ``result()`` (a lock): SIGTERM interrupts it, and
    the exit path stops the nested pool instead of waiting for its task
    (before, the wait went on, the exit path waited for the nested task, and
    the child was SIGKILLed after the grace period, its exit callbacks not
    run)."""
    out = tmp_path / "out"
    p = warden.Process(target=wait_on_a_nested_executor, args=(out,))
    p.start()
    assert wait_for_file(out)
    time.sleep(0.3)  # into the wait
    p.terminate()
    p.join(30)
    assert p.exitcode == -signal.SIGTERM
    assert out.read_text() == "started\nfinally\nat_exit\n"


def test_kill_gives_minus_sigkill(tmp_path):
    out = tmp_path / "out"
    p = warden.Process(target=sleep_forever, args=(out,))
    p.start()
    assert wait_for_file(out)
    p.kill()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert out.read_text() == "started\n"


def test_processes_started_and_dropped_without_a_join_are_let_go_by_the_next_start():
    # multiprocessing keeps every started child in a set until it is joined or
    # seen ended; the standard library's start() drops the ended ones.
    import gc
    import weakref

    dropped, pids = [], []
    for _ in range(5):
        p = warden.Process(target=int)
        p.start()
        dropped.append(weakref.ref(p))
        pids.append(p.pid)
        del p
    # Ended as the children's own pools see it (reaped), not only gone from
    # /proc's point of view (a zombie is not alive there).
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30)
    assert wait_until(lambda: not any(ref() is not None and ref().is_alive() for ref in dropped), timeout=30)
    last = warden.Process(target=int)
    last.start()
    gc.collect()
    assert [ref for ref in dropped if ref() is not None] == []
    last.join(30)


@pytest.mark.parametrize("kind", ["process", "pool"])
def test_log_to_stderr_shows_a_childs_lifecycle_as_the_standard_librarys(program, kind):
    prog = program(
        """
        import logging, multiprocessing, sys
        import warden

        def child():
            pass

        if __name__ == "__main__":
            multiprocessing.log_to_stderr().setLevel(logging.INFO)
            spawn = multiprocessing.get_context("spawn")
            if sys.argv[2] == "process":
                p = (warden.Process if sys.argv[1] == "warden" else spawn.Process)(target=child)
                p.start()
                p.join()
            else:
                with (warden.Pool if sys.argv[1] == "warden" else spawn.Pool)(1) as pool:
                    pool.apply(child)
                    pool.close()
                    pool.join()
        """
    )

    def child_lines(lib):
        run = prog.run(args=(lib, kind))
        assert run.returncode == 0, run.stderr
        children = [line for line in run.stderr.splitlines() if not line.startswith("[INFO/Main")]
        return [line.split("] ", 1)[1] for line in children if "process" in line]

    expected = [
        "child process calling self.run()",
        "process shutting down",
        "process exiting with exitcode 0",
    ]
    if sys.version_info >= (3, 13):
        # Its exit function runs among the atexit handlers, after the bootstrap.
        expected[1:] = reversed(expected[1:])
    assert child_lines("std") == expected
    assert child_lines("warden") == expected


def test_join_timeout_returns_while_the_child_runs():
    p = warden.Process(target=sleep_forever)
    p.start()
    start = time.monotonic()
    p.join(0.2)
    assert 0.15 < time.monotonic() - start < 5
    assert p.is_alive() and p.exitcode is None
    p.terminate()
    p.join(30)


def test_current_process_in_the_child_is_the_process(tmp_path):
    out = tmp_path / "out"
    p = warden.Process(target=report_identity, args=(out,), name="worker-a", daemon=True)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    name, pid, getpid, daemon, parent, is_alive, exitcode = out.read_text().split()
    assert (name, int(pid), int(getpid), daemon, int(parent)) == (
        "worker-a",
        p.pid,
        p.pid,
        "True",
        os.getpid(),
    )
    # Running, with no exit code yet, as a spawned child's current_process().
    assert (is_alive, exitcode) == ("True", "None")


LOADED_IN_THE_CHILD = """
import sys
import warden

def report():
    starting = ("warden._runner", "concurrent.futures.process", "logging", "tempfile")
    print(*[name for name in starting if name in sys.modules] or ["none"], flush=True)

if __name__ == "__main__":
    p = warden.Process(target=report)
    p.start()
    p.join(60)
"""


def test_a_child_loads_none_of_what_starting_processes_takes(program):
    """The child imports ``warden.process`` to unpickle its ``Process``; that
    module loaded the machinery that starts pools and processes (and with it
    ``concurrent.futures.process``, ``logging``, ``tempfile``): a third of
    the child's start-up, for nothing it runs."""
    run = program(LOADED_IN_THE_CHILD).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["none"], run.stdout


def test_a_subclass_overriding_run_has_its_run_called_in_the_child(tmp_path):
    out = tmp_path / "out"
    p = Subclassed(out)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert out.read_text() == "run of Subclassed custom\n"


def test_targets_can_be_lambdas_and_closures(tmp_path):
    out = tmp_path / "out"
    p = warden.Process(target=lambda: write(out, "lambda\n"))
    p.start()
    p.join(30)
    assert out.read_text() == "lambda\n"


def test_start_twice_and_join_before_start_are_errors_like_the_standard_library():
    p = warden.Process(target=exit_with, args=(0,))
    with pytest.raises(AssertionError, match="can only join a started process"):
        p.join()
    p.start()
    with pytest.raises(AssertionError, match="cannot start a process twice"):
        p.start()
    p.join(30)


def test_daemon_cannot_change_after_start():
    p = warden.Process(target=exit_with, args=(0,))
    p.daemon = True
    p.start()
    with pytest.raises(AssertionError):
        p.daemon = False
    p.join(30)


BEING_PICKLED = threading.Event()


class SlowToPickle:
    """An argument whose pickling takes a while and says when it began: a
    start() is then surely under way when another thread acts."""

    def __reduce__(self):
        BEING_PICKLED.set()
        time.sleep(0.3)
        return (SlowToPickle, ())


def write_and_exit(path, _slow):
    write(path, "started\n")


@contextlib.contextmanager
def starting_in_another_thread(p):
    BEING_PICKLED.clear()
    errors = []

    def start():
        try:
            p.start()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        assert BEING_PICKLED.wait(30)
        yield
    finally:
        thread.join(60)
    assert not errors, errors


def test_a_process_started_from_two_threads_at_once_starts_one_child_and_refuses_the_second_start(tmp_path):
    """The second start() was let through while the first one ran: two
    children, one of which the object had no handle on (terminate() and
    join() left it running, and the program waited for it at exit)."""
    out = tmp_path / "out"
    p = warden.Process(target=write_and_exit, args=(out, SlowToPickle()))
    with starting_in_another_thread(p), pytest.raises(AssertionError, match="cannot start a process twice"):
        p.start()
    p.join(30)
    assert p.exitcode == 0
    time.sleep(0.5)  # time for a second child to have written
    assert out.read_text() == "started\n"


def test_a_process_being_started_in_another_thread_cannot_be_closed(tmp_path):
    """close() during another thread's start() found no child yet and
    closed the object; the child then started, and nothing could join or
    stop it (``ValueError: process object is closed``)."""
    out = tmp_path / "out"
    p = warden.Process(target=write_and_exit, args=(out, SlowToPickle()))
    with starting_in_another_thread(p), pytest.raises(ValueError, match="still running"):
        p.close()
    p.join(30)
    assert p.exitcode == 0
    assert out.read_text() == "started\n"
    p.close()


def sleep_forever_slow_to_start(path, _slow):
    sleep_forever(path)


@pytest.mark.parametrize(("how", "code"), [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_a_process_stopped_while_another_thread_starts_it_is_stopped_once_it_has_started(tmp_path, how, code):
    """terminate() and kill() found no child yet and did nothing: the child
    then ran its target to the end."""
    out = tmp_path / "out"
    p = warden.Process(target=sleep_forever_slow_to_start, args=(out, SlowToPickle()))
    try:
        with starting_in_another_thread(p):
            getattr(p, how)()
        p.join(20)
        assert p.exitcode == code
    finally:
        p.kill()
        p.join(10)


FORKED_COPY_STOPS_THE_CHILD = """
import os, sys, time
import warden

def sleep_forever(path):
    with open(path, "a") as f:
        f.write("started\\n")
    try:
        time.sleep(60)
    finally:
        with open(path, "a") as f:
            f.write("finally\\n")

if __name__ == "__main__":
    how, path = sys.argv[1], os.environ["OUT"]
    p = warden.Process(target=sleep_forever, args=(path,))
    p.start()
    while not os.path.exists(path):
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        try:
            getattr(p, how)()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    started = time.monotonic()
    p.join(20)
    print(p.exitcode, time.monotonic() - started < 10, flush=True)
    with open(path) as f:
        print(f.read().split(), flush=True)
"""


@pytest.mark.parametrize(("how", "code"), [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_a_copy_of_the_parent_made_by_fork_can_stop_its_child(program, how, code):
    """In the copy, terminate() and kill() did nothing: the copy's core runs
    no thread to act on them, and the child slept on. The standard library's
    signal the child from any copy."""
    run = program(FORKED_COPY_STOPS_THE_CHILD).run(timeout=60, args=(how,))
    assert run.returncode == 0, run.stderr
    stopped_with = ["started", "finally"] if how == "terminate" else ["started"]
    assert run.lines == [f"{code} True", str(stopped_with)], run.stdout + run.stderr


PID_REUSED_AFTER_THE_CHILD = """
import os, subprocess, sys, time
import warden

def sleep_a_little():
    time.sleep(0.3)

def reuse(pid):
    # The parent's next child gets the pid the ended one had (once it is
    # free: another process may take it first, or the child be reaped late).
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        other = subprocess.Popen(["sleep", "30"])
        if other.pid == pid:
            return other
        other.kill()
        other.wait()
        time.sleep(0.02)
    return None

if __name__ == "__main__":
    when = sys.argv[1]
    p = warden.Process(target=sleep_a_little)
    p.start()
    if when == "after it ended":
        p.join(30)
        other = reuse(p.pid)
        copy = os.fork()
        if copy == 0:
            p.terminate()
            p.kill()
            os._exit(0)
    else:
        go, ready = os.pipe()
        copy = os.fork()
        if copy == 0:
            os.read(go, 1)
            p.terminate()
            p.kill()
            os._exit(0)
        p.join(30)
        other = reuse(p.pid)
        os.write(ready, b"x")  # the copy goes on, also without a reuse
    os.waitpid(copy, 0)
    if other is None:
        print("no reuse", flush=True)
        sys.exit(0)
    time.sleep(0.2)
    print("the process given the pid", other.poll(), flush=True)
    other.kill()
    other.wait()
"""


@pytest.mark.skipif(
    not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK), reason="choosing the next pid needs root"
)
@pytest.mark.parametrize("when", ["after it ended", "before it ended"])
def test_a_copy_made_by_fork_never_signals_a_process_that_reused_its_ended_childs_pid(program, when):
    """The copy signalled whatever process of the parent had the pid: once
    the child had ended and been reaped, another child of the parent given
    its pid (here a ``sleep``) was terminated."""
    run = program(PID_REUSED_AFTER_THE_CHILD).run(timeout=60, args=(when,))
    assert run.returncode == 0, run.stderr
    if run.lines == ["no reuse"]:
        pytest.skip("the pid was taken by another process each time")
    assert run.lines == ["the process given the pid None"], run.stdout + run.stderr


FORKED_WHILE_A_THREAD_STARTS_ANOTHER = """
import os, signal, threading, time
import warden
from warden import process

if __name__ == "__main__":
    p = warden.Process(target=time.sleep, args=(30,))
    p.start()
    # Another thread in the middle of a start(), a close() or a stop of
    # another Process as the copy is made: it holds their lock.
    held, release = threading.Event(), threading.Event()

    def hold():
        with process._starting_lock:
            held.set()
            release.wait(30)

    threading.Thread(target=hold).start()
    held.wait(30)
    copy = os.fork()
    if copy == 0:
        signal.alarm(10)  # the copy waited for ever on the lock
        p.terminate()
        os._exit(0)
    _, status = os.waitpid(copy, 0)
    release.set()
    print("copy", os.waitstatus_to_exitcode(status), flush=True)
    p.join(20)
    print("child", p.exitcode, flush=True)
"""


def test_a_copy_made_by_fork_while_another_thread_starts_a_process_can_stop_its_child(program):
    run = program(FORKED_WHILE_A_THREAD_STARTS_ANOTHER).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["copy 0", f"child {-signal.SIGTERM}"], run.stdout + run.stderr


def test_close_releases_and_refuses_while_running():
    p = warden.Process(target=sleep_forever)
    p.start()
    with pytest.raises(ValueError, match="still running"):
        p.close()
    p.terminate()
    p.join(30)
    p.close()
    with pytest.raises(ValueError, match="closed"):
        p.is_alive()


def test_sentinel_becomes_ready_when_the_child_exits():
    p = warden.Process(target=exit_with, args=(0,))
    p.start()
    assert multiprocessing.connection.wait([p.sentinel], timeout=30) == [p.sentinel]
    p.join(30)
    p.close()


def test_the_sentinel_of_a_reaped_child_is_ready_and_never_names_another_process():
    p = warden.Process(target=exit_with, args=(0,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    # The child is reaped: its pid may name another process by now, so the
    # sentinel must not be a pidfd opened from it.
    fd = p.sentinel
    assert multiprocessing.connection.wait([fd], timeout=0) == [fd]
    assert not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:[pidfd]")
    p.close()


def test_a_started_process_pickles_into_an_inert_handle():
    p = warden.Process(target=sleep_forever, name="sleeper")
    p.start()
    try:
        handle = pickle.loads(pickle.dumps(p))
        assert (handle.name, handle.pid, handle.daemon) == ("sleeper", p.pid, False)
        with pytest.raises(RuntimeError, match="handle"):
            handle.start()
        with pytest.raises(RuntimeError, match="handle"):
            handle.terminate()
        assert "handle" in repr(handle)
    finally:
        p.terminate()
        p.join(30)


def test_start_returns_promptly_with_a_live_pid():
    start = time.monotonic()
    p = warden.Process(target=sleep_forever)
    p.start()
    assert time.monotonic() - start < 5
    assert alive(p.pid)
    p.terminate()
    p.join(30)
    assert not alive(p.pid)


def test_interpreter_exit_terminates_daemons_and_joins_other_children(program):
    prog = program(
        """
        import os, time, warden
        def slow(path, seconds):
            time.sleep(seconds)
            with open(path, "a") as f:
                f.write(f"done {seconds}\\n")
        def forever(path, running):
            try:
                running.set()
                time.sleep(60)
            finally:
                with open(path, "a") as f:
                    f.write("daemon stopped\\n")
        if __name__ == "__main__":
            out = os.environ["OUT"]
            warden.Process(target=slow, args=(out, 0.5)).start()
            running = warden.Event()
            d = warden.Process(target=forever, args=(out, running), daemon=True)
            d.start()
            assert running.wait(30), "the daemon never started its target"
            print("main done", flush=True)
        """
    )
    run = prog.run(timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.elapsed < 10
    assert sorted(prog.out_lines()) == ["daemon stopped", "done 0.5"]


# -- signals the target handles itself, as in a child of the standard library's


IMPLS = {"stdlib": multiprocessing.get_context("spawn").Process, "warden": warden.Process}


def serve_until_sigterm(path, code):
    """A server's graceful shutdown: its own SIGTERM handler asks the loop to
    end (or ends it with ``sys.exit(code)``)."""
    import atexit

    stopping = []

    def on_sigterm(signum, frame):
        write(path, "handler\n")
        if code is not None:
            sys.exit(code)
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(write, path, "atexit\n")
    write(path, "ready\n")
    while not stopping:
        time.sleep(0.02)
    write(path, "returning\n")


def stopped_in_time(p, path):
    """Terminates ``p`` once its target is ready; how long ``join()`` took."""
    try:
        assert wait_for_file(path)
        start = time.monotonic()
        p.terminate()
        p.join(30)
        return time.monotonic() - start
    finally:
        if p.exitcode is None:
            p.kill()
            p.join(30)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize(
    ("code", "expected"),
    [(None, ["ready", "handler", "returning", "atexit"]), (3, ["ready", "handler", "atexit"])],
)
def test_terminate_lets_a_target_with_its_own_sigterm_handler_return_and_run_the_exit_path(
    tmp_path, impl, code, expected
):
    out = tmp_path / "out"
    p = IMPLS[impl](target=serve_until_sigterm, args=(out, code))
    p.start()
    took = stopped_in_time(p, out)
    assert p.exitcode == (code or 0)
    assert out.read_text().splitlines() == expected
    assert took < 3  # well under the 5 s grace: nothing waited for SIGKILL


def wait_for_ctrl_c(path, handle):
    import atexit

    atexit.register(write, path, "atexit\n")
    try:
        write(path, "ready\n")
        time.sleep(30)
        write(path, "slept\n")
    except KeyboardInterrupt:
        if not handle:
            raise
        write(path, "KeyboardInterrupt\n")
    finally:
        write(path, "finally\n")


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize(
    ("handle", "expected_code", "expected"),
    [
        (True, 0, ["ready", "KeyboardInterrupt", "finally", "atexit"]),
        (False, 1, ["ready", "finally", "atexit"]),
    ],
)
def test_sigint_raises_keyboard_interrupt_in_the_target(
    tmp_path, capfd, impl, handle, expected_code, expected
):
    out = tmp_path / "out"
    p = IMPLS[impl](target=wait_for_ctrl_c, args=(out, handle), name="P")
    p.start()
    try:
        assert wait_for_file(out)
        os.kill(p.pid, signal.SIGINT)
        p.join(30)
    finally:
        if p.exitcode is None:
            p.kill()
            p.join(30)
    assert p.exitcode == expected_code
    assert out.read_text().splitlines() == expected
    err = capfd.readouterr().err
    if handle:
        assert "Traceback" not in err
    else:
        # As multiprocessing's bootstrap reports an exception that ends run().
        assert "Process P:" in err and err.rstrip().endswith("KeyboardInterrupt"), err


class Greeter(warden.Process):
    """A subclass calling the base constructor the standard library's way."""

    def __init__(self, path):
        super().__init__(None, write, "greeter", (path, "hello"))


@pytest.mark.parametrize("Process", [multiprocessing.get_context("spawn").Process, warden.Process])
def test_the_constructor_takes_the_standard_librarys_positional_arguments_group_first(tmp_path, Process):
    path = tmp_path / "out.txt"
    child = Process(None, write, "named", (path, "positional"))
    child.start()
    child.join(60)
    assert (child.name, child.exitcode, path.read_text()) == ("named", 0, "positional")
    with pytest.raises(AssertionError):
        Process(group=object(), target=write)
    other = tmp_path / "other.txt"
    child = Process(group=None, target=write, args=(other, "keywords"))
    child.start()
    child.join(60)
    assert (child.exitcode, other.read_text()) == (0, "keywords")


def test_a_subclass_passing_group_to_the_base_constructor_runs():
    path = "/dev/null"
    child = Greeter(path)
    child.start()
    child.join(60)
    assert (child.name, child.exitcode) == ("greeter", 0)


# The child's way out takes longer than the pool's grace period (made short
# here): its queue's feeder thread writes an item larger than the pipe holds,
# and the parent reads it only later, as multiprocessing's own examples do.
SLOW_READER = """
import multiprocessing, os, sys, time
import warden, warden._runner

def put_big(q, n):
    q.put(b"x" * n)

if __name__ == "__main__":
    warden._runner.GRACE = 0.5
    if sys.argv[1] == "warden":
        Process = warden.Process
    else:
        Process = multiprocessing.get_context("spawn").Process
    q = multiprocessing.get_context("spawn").Queue()
    p = Process(target=put_big, args=(q, 1 << 20))
    p.start()
    time.sleep(3)  # six grace periods
    item = q.get(timeout=30)
    p.join(30)
    print(len(item), p.exitcode, flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_child_still_flushing_its_queue_after_its_target_returned_is_not_cut_short(program, impl):
    # multiprocessing documents that a process which put items in a queue
    # waits, before it ends, until they are all in the pipe: that is the
    # child's own exit, which no grace period ends.
    run = program(SLOW_READER).run(args=(impl,), timeout=120)
    assert run.stdout.split() == [str(1 << 20), "0"], run.stdout + run.stderr


CHILDREN_JOINED_AT_EXIT = """
import atexit, multiprocessing, os, sys, tempfile, time
import warden

def grandchild(directory, marker):
    time.sleep(1)
    ran = os.path.exists(marker)
    try:
        with open(os.path.join(directory, "out"), "w") as f:
            f.write("ok")
        print(f"grandchild wrote; atexit had run: {ran}", flush=True)
    except OSError as e:
        print(f"grandchild failed ({type(e).__name__}); atexit had run: {ran}", flush=True)

def child(Process, marker):
    global TMP
    TMP = tempfile.TemporaryDirectory()  # removed at the child's exit
    atexit.register(open, marker, "w")
    Process(target=grandchild, args=(TMP.name, marker)).start()  # not joined: exit joins it

if __name__ == "__main__":
    Process = warden.Process if sys.argv[1] == "warden" else multiprocessing.get_context("spawn").Process
    p = Process(target=child, args=(Process, sys.argv[2]))
    p.start()
    p.join(60)
    print(p.exitcode, flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_child_joins_the_children_it_left_when_its_target_returns_as_multiprocessing_does(
    program, tmp_path, impl
):
    """Up to Python 3.12 a child of multiprocessing's runs its exit function
    (``multiprocessing.util.Finalize`` callbacks; its children terminated if
    daemonic, else joined) as soon as its target returns, before its
    ``atexit`` handlers and what those remove (a ``TemporaryDirectory`` a
    grandchild writes into). From 3.13 it is one of the ``atexit`` handlers,
    run after those registered since. A warden child does as the running
    Python's (before, as 3.13 on every version: the directory was gone)."""
    run = program(CHILDREN_JOINED_AT_EXIT).run(args=(impl, str(tmp_path / "atexit-ran")), timeout=90)
    assert run.returncode == 0, run.stderr
    if sys.version_info < (3, 13):
        assert run.lines == ["grandchild wrote; atexit had run: False", "0"], run.stdout + run.stderr
    else:
        assert run.lines == ["grandchild failed (FileNotFoundError); atexit had run: True", "0"], (
            run.stdout + run.stderr
        )


FINALIZE_EXITS = """
import multiprocessing, multiprocessing.util, sys
import warden

def leave(code):
    raise SystemExit(code)

def child(fails):
    multiprocessing.util.Finalize(None, leave, args=(7,), exitpriority=5)
    if fails:
        raise RuntimeError("the target's error")

if __name__ == "__main__":
    Process = warden.Process if sys.argv[1] == "warden" else multiprocessing.get_context("spawn").Process
    for fails in (False, True):
        p = Process(target=child, args=(fails,))
        p.start()
        p.join(60)
        print(p.exitcode, flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_finalize_callback_that_exits_sets_the_childs_exit_code_as_multiprocessing_does(program, impl):
    """Up to Python 3.12 a child's exit function runs in its bootstrap's
    ``finally``: a ``SystemExit`` of a ``multiprocessing.util.Finalize``
    callback gives the exit code, in place of what the target raised (no
    traceback). From 3.13 it runs among the ``atexit`` handlers, which
    report it and exit as the target said."""
    run = program(FINALIZE_EXITS).run(args=(impl,), timeout=90)
    assert run.returncode == 0, run.stderr
    if sys.version_info < (3, 13):
        assert run.lines == ["7", "7"], run.stdout + run.stderr
        assert "the target's error" not in run.stderr, run.stderr
    else:
        assert run.lines == ["0", "1"], run.stdout + run.stderr


TERMINATED_WHILE_JOINING_AT_EXIT = """
import multiprocessing, multiprocessing.util, os, sys, time
import warden

def last(path):
    with open(path, "w") as f:
        f.write("ran")

def child(path):
    multiprocessing.util.Finalize(None, last, args=(path,), exitpriority=-1)  # after the joins
    warden.Process(target=time.sleep, args=(60,)).start()  # not joined: the exit joins it

if __name__ == "__main__":
    p = warden.Process(target=child, args=(sys.argv[1],))
    p.start()
    time.sleep(2)
    p.terminate()
    p.join(30)
    print(p.exitcode, os.path.exists(sys.argv[1]), flush=True)
"""


def test_a_child_terminated_while_its_exit_joins_a_child_still_runs_its_later_finalize_callbacks(
    program, tmp_path
):
    """The exit function cut short in its join by ``terminate()``: the exit
    path's ``atexit`` handlers take it up again, so the callbacks it had not
    reached (a negative priority: after the joins) still run. Before, it
    counted as done, and they never ran."""
    run = program(TERMINATED_WHILE_JOINING_AT_EXIT).run(args=(str(tmp_path / "last"),), timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["-15 True"], run.stdout + run.stderr


TARGET_FAILS_AFTER_THE_STOP = """
import threading, time
import warden

def target(ready, release, daemon):
    threading.Thread(target=release.wait, args=(30,), daemon=daemon).start()
    try:
        ready.set()
        release.wait(30)
    finally:
        raise RuntimeError("cleanup failed")  # instead of the stop's TaskInterrupted

if __name__ == "__main__":
    for daemon in (False, True):
        ready, release = warden.Event(), warden.Event()
        p = warden.Process(target=target, args=(ready, release, daemon))
        p.start()
        ready.wait(30)
        time.sleep(0.2)
        p.terminate()
        p.join(30)
        release.set()
        print(daemon, p.exitcode, flush=True)
"""


def test_a_terminated_target_that_ends_with_another_error_does_not_wait_for_its_threads(program):
    # Its non-daemon thread would keep the child in its join until the
    # monitor gave up on it (2.5 s later, saying the target was still running,
    # which it was not): a child told to stop does not wait for its threads.
    run = program(TARGET_FAILS_AFTER_THE_STOP).run(timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["False -15", "True -15"], run.stdout + run.stderr
    assert "RuntimeError: cleanup failed" in run.stderr
    assert "still running" not in run.stderr, run.stderr


START_WITH_NO_PROCESS_TO_SPARE = """
import errno, multiprocessing, os, sys
import warden

def nothing():
    pass

if __name__ == "__main__":
    cgroup = sys.argv[1]
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(cgroup, "tasks")) as f:
        threads = len(f.read().split())
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write(str(threads))  # not one thread or process more
    impl = warden if sys.argv[2] == "warden" else multiprocessing.get_context(sys.argv[2])
    try:
        impl.Process(target=nothing).start()
    except OSError as e:
        print(type(e).__name__, e.errno == errno.EAGAIN, str(e).split(":")[0])
"""


@pytest.mark.parametrize("impl", ["warden", "fork", "spawn"])
def test_a_process_that_cannot_start_for_want_of_processes_says_so_as_the_standard_librarys(
    program, pids_cgroup, impl
):
    """``start()`` with no process or thread to spare raises the
    ``BlockingIOError`` the standard library's raises; warden's message
    spoke of starting "the pool"."""
    run = program(START_WITH_NO_PROCESS_TO_SPARE).run(timeout=60, args=(str(pids_cgroup), impl))
    assert run.returncode == 0, run.stderr
    said = run.stdout.split("\n")[0]
    assert said.startswith("BlockingIOError True [Errno 11]"), run.stdout + run.stderr
    if impl == "warden":
        assert said == "BlockingIOError True [Errno 11] cannot start process Process-1", run.stdout


def test_a_process_whose_interpreter_cannot_start_says_so_in_a_childs_words():
    """The core's failure, for the pool of one that runs a child, spoke of
    "the pool" and "a worker" to a program that started a ``Process``."""
    core = (
        "the pool failed: cannot start a worker (/venv/bin/python): "
        "Resource temporarily unavailable (os error 11)"
    )
    error = warden.process._start_error("Process-3", core)
    assert isinstance(error, BlockingIOError)
    assert str(error) == (
        "[Errno 11] cannot start process Process-3: cannot start its interpreter (/venv/bin/python): "
        "Resource temporarily unavailable (os error 11)"
    )


NO_MAIN_GUARD = """
import warden

def hello():
    print("hello", flush=True)

child = warden.Process(target=hello)  # at the top level: again in the child's import of main
child.start()
child.join(60)
print("exit code", child.exitcode)
"""


def test_a_child_that_cannot_import_main_is_named_a_child_not_a_worker(program):
    """Without the ``__main__`` guard, the child's import of main starts a
    child again: the standard library's bootstrapping error, exit code 1, as
    under spawn. What warden says on stderr named the child a worker."""
    run = program(NO_MAIN_GUARD).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["exit code 1"], run.stdout + run.stderr
    assert "bootstrapping phase" in run.stderr, run.stderr
    assert "warden: child " in run.stderr and "warden: worker " not in run.stderr, run.stderr
