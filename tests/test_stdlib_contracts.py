"""The standard library's documented contracts, kept by warden.

Each test is a user's program. Where the standard library has the same
contract, the same program runs against ``concurrent.futures`` /
``multiprocessing`` (spawn context) and against warden, and the test asserts
the same observable result for both.
"""

from __future__ import annotations

import signal

import pytest

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
    import textwrap

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
    import time

    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "3 submitted tasks dropped at interpreter exit (interrupted (Ctrl-C))" in err


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
