"""Workers forked by a pool's zygote: as isolated as exec'd ones (fds,
process group, parent, random state, finalizers), the zygote is never a
worker, and a pool whose zygote dies or cannot fork goes on serving by exec."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import signal
import sys
import threading
import time

import pytest

import warden
from warden import _warden

from conftest import alive, numpy, wait_until


def whoami():
    return os.getpid(), os.getppid(), os.getpgid(0), _warden.forked_from()


def fds():
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory listing's own fd
    return out


def draw():
    return os.getpid(), random.random(), random.getrandbits(64)


def preloaded(name):
    return os.getpid(), name in sys.modules


def nap(seconds):
    time.sleep(seconds)
    return os.getpid()


def zygote_pid(ex):
    """The pool's zygote, once it is ready."""
    pid = None

    def ready():
        nonlocal pid
        pid = ex._warden_runner.core.zygote_pid()
        return pid is not None

    assert wait_until(ready, timeout=30)
    return pid


def test_zygote_workers_are_forked_children_of_the_pool_process_in_their_own_group():
    with warden.ProcessPoolExecutor(2, start="zygote", max_tasks_per_child=1) as ex:
        seen = [ex.submit(whoami).result(30) for _ in range(4)]
        zygote = zygote_pid(ex)
    assert len({pid for pid, *_ in seen}) == 4
    for pid, ppid, pgid, forked_from in seen:
        assert ppid == os.getpid()  # a child of this process, not of the zygote
        assert pgid == pid != os.getpgid(0)
        assert forked_from == zygote
    assert zygote not in {pid for pid, *_ in seen}


def test_exec_workers_are_not_forked():
    with warden.ProcessPoolExecutor(1, start="exec") as ex:
        assert ex.submit(whoami).result(30)[3] is None
        assert ex._warden_runner.core.zygote_pid() is None


@pytest.mark.usefixtures("start_method")
@pytest.mark.parametrize(
    ("forward_logging", "expected"),
    [
        # the parent's pidfd, the parent's resource tracker (as a spawned
        # child holds it), the channel
        (False, ["anon_inode", "pipe", "socket"]),
        (True, ["anon_inode", "pipe", "socket", "socket"]),  # and the logging channel
    ],
)
def test_a_worker_holds_only_stdio_its_channel_and_the_parent_sentinel(forward_logging, expected):
    careless = os.open("/proc/self/status", os.O_RDONLY)  # no O_CLOEXEC in effect:
    os.set_inheritable(careless, True)  # as a careless library leaves it
    try:
        with warden.ProcessPoolExecutor(2, forward_logging=forward_logging) as ex:
            held = [ex.submit(fds).result(30) for _ in range(3)]
    finally:
        os.close(careless)
    for table in held:
        assert table[0] == "/dev/null"
        kinds = sorted(target.split(":")[0] for fd, target in table.items() if fd > 2)
        assert kinds == expected, table


def test_each_forked_worker_draws_fresh_random_numbers():
    with warden.ProcessPoolExecutor(2, start="zygote", max_tasks_per_child=1) as ex:
        draws = [ex.submit(draw).result(30) for _ in range(6)]
    assert len({pid for pid, *_ in draws}) == 6
    assert len({x for _, x, _ in draws}) == 6
    assert len({bits for *_, bits in draws}) == 6


def test_preloads_are_imported_once_by_the_zygote_not_by_each_worker(tmp_path, monkeypatch):
    log = tmp_path / "imports"
    (tmp_path / "heavy_preload.py").write_text(
        f"import os\nwith open({str(log)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with warden.Pool(2, start="zygote", preload=["heavy_preload"], maxtasksperchild=1) as pool:
        seen = [pool.apply(preloaded, ("heavy_preload",)) for _ in range(4)]
    assert all(loaded for _, loaded in seen)
    importers = log.read_text().split()
    assert len(importers) == 1, importers
    assert int(importers[0]) not in {pid for pid, _ in seen}


def test_bad_start_and_preload_arguments_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="start must be one of"):
        warden.ProcessPoolExecutor(1, start="fork")
    with pytest.raises(TypeError, match="list of module names"):
        warden.Pool(1, preload="numpy")
    monkeypatch.setenv("WARDEN_START", "forkserver")
    with pytest.raises(ValueError, match="WARDEN_START"):
        warden.ProcessPoolExecutor(1)


def test_the_zygote_never_runs_a_task_nor_counts_as_a_worker():
    with warden.ProcessPoolExecutor(2, start="zygote") as ex:
        pids = {f.result(30) for f in [ex.submit(nap, 0.05) for _ in range(8)]}
        zygote = zygote_pid(ex)
        workers = {w.pid for w in ex._warden_runner.core.workers()}
    assert zygote not in pids
    assert zygote not in workers
    assert pids <= workers


def test_killing_the_zygote_mid_run_leaves_the_pool_serving():
    with warden.ProcessPoolExecutor(2, start="zygote", max_tasks_per_child=1) as ex:
        ex.submit(os.getpid).result(30)
        first = zygote_pid(ex)
        running = ex.submit(nap, 1.0)
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: not alive(first))
        # The running task was not the zygote's: it finishes.
        assert running.result(30) != first
        # Replacements keep coming (by exec until a new zygote is ready).
        pids = [ex.submit(os.getpid).result(30) for _ in range(6)]
        assert len(set(pids)) == 6
        assert wait_until(lambda: ex._warden_runner.core.zygote_pid() not in (None, first), timeout=30)
        second = ex._warden_runner.core.zygote_pid()
        # Once it is ready, workers come from the new zygote.
        assert wait_until(lambda: ex.submit(whoami).result(30)[3] == second, timeout=30)


def umask_and_files_limit():
    mask = os.umask(0)
    os.umask(mask)
    return mask, resource.getrlimit(resource.RLIMIT_NOFILE), _warden.forked_from()


def test_workers_started_after_the_program_tightened_its_umask_and_limits_get_them():
    """The zygote was started with the program's umask and limits of then:
    its forks kept them (group- and world-readable files from a service
    that had set ``umask(0o077)``; a lowered limit ignored), where a
    spawned worker gets the program's current ones. Now a worker started
    after a change starts by exec, and a new zygote is prepared with what
    the program has now."""
    mask = os.umask(0o022)
    os.umask(mask)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 4096) - 1
    try:
        with warden.ProcessPoolExecutor(1, start="zygote", max_tasks_per_child=1) as ex:
            assert ex.submit(umask_and_files_limit).result(30)[:2] == (mask, (soft, hard))
            first = zygote_pid(ex)
            os.umask(0o077)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
            # One worker per task; the first may have started before the change.
            seen = [ex.submit(umask_and_files_limit).result(30) for _ in range(5)]
            assert [s[:2] for s in seen[1:]] == [(0o077, (lowered, hard))] * 4
            assert wait_until(lambda: ex._warden_runner.core.zygote_pid() not in (None, first), timeout=30)
            second = ex._warden_runner.core.zygote_pid()
            # Forks of the new zygote have them too.
            assert wait_until(lambda: ex.submit(umask_and_files_limit).result(30)[2] == second, timeout=30)
            assert ex.submit(umask_and_files_limit).result(30)[:2] == (0o077, (lowered, hard))
    finally:
        os.umask(mask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


UMASK_AFTER_START = """
import os, resource
import warden

def umask_and_files_limit():
    mask = os.umask(0)
    os.umask(mask)
    return mask, resource.getrlimit(resource.RLIMIT_NOFILE)[0]

if __name__ == "__main__":
    os.umask(0o022)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with warden.ProcessPoolExecutor(1, start="zygote", max_tasks_per_child=1) as ex:
        ex.submit(umask_and_files_limit).result(60)
        assert ex._warden_runner.core.zygote_pid() is not None
        os.umask(0o077)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096) - 1, hard))
        for _ in range(4):
            print("%o %d" % ex.submit(umask_and_files_limit).result(60), flush=True)
    print("limit", min(soft, 4096) - 1)
"""


def test_workers_get_a_umask_and_limits_set_after_the_start_where_proc_is_another_namespaces(program):
    """Under ``unshare --pid`` without a ``/proc`` of its own, the zygote's
    supervisor read its thread's status under the id ``gettid()`` gives,
    which there is another thread's: it read nothing, so compared nothing,
    and every worker forked after the program tightened its ``umask`` and
    limits (or dropped its privileges) had those of before."""
    out, _ = program(UMASK_AFTER_START).run_without_own_proc("another-namespace")
    *seen, limit = out.splitlines()
    lowered = limit.split()[1]
    # One worker per task; the first may have started before the change.
    assert seen[1:] == [f"77 {lowered}"] * 3, out


OOM_SCORE_RAISED = """
import time
import warden
from warden import _warden

def oom_score_adj():
    with open("/proc/self/oom_score_adj") as f:
        return int(f.read()), _warden.forked_from()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1, start="zygote", max_tasks_per_child=1) as ex:
        before, _ = ex.submit(oom_score_adj).result(30)
        first = ex._warden_runner.core.zygote_pid()
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(before + 300))
        # One worker per task; the first may have started before the change.
        seen = [ex.submit(oom_score_adj).result(30)[0] for _ in range(4)]
        print(before, seen[1:])
        deadline = time.monotonic() + 30
        while ex._warden_runner.core.zygote_pid() in (None, first) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = ex._warden_runner.core.zygote_pid()
        while ex.submit(oom_score_adj).result(30)[1] != second and time.monotonic() < deadline:
            time.sleep(0.05)
        print("from the new zygote:", ex.submit(oom_score_adj).result(30) == (before + 300, second))
"""


def test_workers_started_after_the_program_raised_its_oom_score_adj_get_it(program):
    """A spawned worker gets the ``oom_score_adj`` its parent has now (a
    program that offers itself to the OOM killer first, its workers with
    it): the zygote's forks had the one of the zygote's start. Run as a
    program of its own: the value cannot be lowered back without
    privilege."""
    run = program(OOM_SCORE_RAISED).run(timeout=120)
    assert run.returncode == 0, run.stderr
    seen, new_zygote = run.stdout.splitlines()
    base = int(seen.split()[0])
    assert seen == f"{base} {[base + 300] * 3}", run.stdout
    assert new_zygote == "from the new zygote: True", run.stdout


def sigusr1_ignored():
    return signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, _warden.forked_from()


def test_workers_started_after_the_program_ignored_a_signal_ignore_it_too():
    """``SIG_IGN`` outlives exec: a spawned worker started after the program
    ignored SIGUSR1 ignores it too. The zygote's forks had the dispositions
    of its start; now a worker started after the change starts by exec, and
    a new zygote is prepared with what the program has now."""
    before = signal.getsignal(signal.SIGUSR1)
    try:
        with warden.ProcessPoolExecutor(1, start="zygote", max_tasks_per_child=1) as ex:
            assert ex.submit(sigusr1_ignored).result(30)[0] is False
            first = zygote_pid(ex)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            # One worker per task; the first may have started before the change.
            seen = [ex.submit(sigusr1_ignored).result(30)[0] for _ in range(4)]
            assert seen[1:] == [True] * 3
            assert wait_until(lambda: ex._warden_runner.core.zygote_pid() not in (None, first), timeout=30)
            second = ex._warden_runner.core.zygote_pid()
            assert wait_until(lambda: ex.submit(sigusr1_ignored).result(30) == (True, second), timeout=30)
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_stopped_zygote_is_replaced_and_costs_no_task(tmp_path):
    """A zygote stopped (SIGSTOP) while asked for workers: the request goes
    unanswered, the zygote is killed and replaced, and every task runs. It
    is resumed after 5.5 s, while the pool still runs: a late answer from it
    must not be taken for the answer to a later request (that failed
    innocent tasks with ``WorkerCrashed``, or the pool with ``PoolFailed``)."""
    with warden.ProcessPoolExecutor(2, start="zygote", max_tasks_per_child=1) as ex:
        assert sorted(ex.map(nap, [0.01] * 4)) != []
        first = zygote_pid(ex)
        os.kill(first, signal.SIGSTOP)
        try:
            futures = [ex.submit(nap, 0.05) for _ in range(40)]
            time.sleep(5.5)
        finally:
            if alive(first):
                os.kill(first, signal.SIGCONT)
        futures += [ex.submit(nap, 0.01) for _ in range(20)]
        pids = [f.result(60) for f in futures]
        assert len(set(pids)) == 60  # a worker each: nothing failed, nothing ran twice
        assert not alive(first)
        assert wait_until(lambda: ex._warden_runner.core.zygote_pid() not in (None, first), timeout=30)


THREADED_PRELOAD = """
import threading, time
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
"""


def test_a_zygote_that_cannot_fork_falls_back_to_exec(tmp_path, monkeypatch):
    (tmp_path / "starts_a_thread.py").write_text(THREADED_PRELOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warden.ProcessPoolExecutor(2, start="zygote", preload=["starts_a_thread"]) as ex:
        seen = [ex.submit(whoami).result(30) for _ in range(4)]
        refused = ex._warden_runner.core.zygote_refused()
    assert all(forked_from is None for *_, forked_from in seen)
    assert refused is not None and "threads" in refused


def test_a_parents_exit_handlers_never_run_in_its_workers(program):
    prog = program(
        """
        import atexit, multiprocessing.util, os, warden
        OUT = os.environ["OUT"]
        def mark(word):
            with open(OUT, "a") as f:
                f.write(f"{word} {os.getpid()}\\n")
        class Held:
            pass
        if __name__ == "__main__":
            held = Held()
            atexit.register(mark, "atexit")
            warden.at_exit(mark, "at_exit")
            warden.finalize(held, mark, "finalize")
            multiprocessing.util.Finalize(held, mark, args=("mp-finalize",), exitpriority=10)
            with warden.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
                pids = [ex.submit(os.getpid).result() for _ in range(4)]
            print(os.getpid(), flush=True)
        """
    )
    run = prog.run(env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    parent = int(run.stdout.split()[0])
    lines = prog.out_lines()
    assert sorted(line.split()[0] for line in lines) == ["at_exit", "atexit", "finalize", "mp-finalize"]
    assert {int(line.split()[1]) for line in lines} == {parent}


# A main module that notes each import of itself as __mp_main__ (by a child:
# the zygote or a worker), then runs 6 one-task workers.
COUNTS_MAIN_IMPORTS = """
import _thread, os, sys, threading, time, warden
from warden import _warden
if os.environ.get("MAIN_STARTS_A_NATIVE_THREAD"):
    # As a library's own threads (numpy's OpenBLAS pool): not threading's.
    _thread.start_new_thread(time.sleep, (3600,))
if __name__ == "__mp_main__":
    with open(os.environ["OUT"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    if os.environ.get("FORKED_FROM"):  # the zygote that forked the importer
        with open(os.environ["FORKED_FROM"], "a") as f:
            f.write(f"{_warden.forked_from()}\\n")
    if os.environ.get("MAIN_STARTS_A_THREAD"):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

def where():
    return os.getpid(), _warden.forked_from()

if __name__ == "__main__":
    preload = None if sys.argv[1] == "default" else []
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1, preload=preload) as ex:
        seen = [ex.submit(where).result(60) for _ in range(6)]
    print(" ".join(f"{pid}:{z}" for pid, z in seen))
"""


def test_the_zygote_imports_main_once_so_workers_do_not(program):
    prog = program(COUNTS_MAIN_IMPORTS)
    run = prog.run(env={"WARDEN_START": "zygote"}, args=("default",))
    assert run.returncode == 0, run.stderr
    seen = [entry.split(":") for entry in run.stdout.split()]
    assert len({pid for pid, _ in seen}) == 6
    zygotes = {z for _, z in seen}
    assert len(zygotes) == 1 and "None" not in zygotes
    # One import, by the zygote, not one per worker.
    assert prog.out_lines() == list(zygotes)


def test_the_zygote_imports_main_once_where_proc_is_another_namespaces(program):
    """Under ``unshare --pid`` without a ``/proc`` of its own, the check for
    threads warden and ``threading`` did not start compared ``/proc``'s
    thread ids with this namespace's: every thread looked like another
    library's, so no zygote imported main, and every worker did."""
    prog = program(COUNTS_MAIN_IMPORTS)
    out, _ = prog.run_without_own_proc("another-namespace", args=("default",), env={"WARDEN_START": "zygote"})
    seen = [entry.split(":") for entry in out.split()]
    assert len({pid for pid, _ in seen}) == 6
    zygotes = {z for _, z in seen}
    assert len(zygotes) == 1 and "None" not in zygotes
    assert prog.out_lines() == list(zygotes)


def test_a_pool_naming_its_preloads_leaves_main_to_each_worker(program):
    prog = program(COUNTS_MAIN_IMPORTS)
    run = prog.run(env={"WARDEN_START": "zygote"}, args=("none",))
    assert run.returncode == 0, run.stderr
    workers = {entry.split(":")[0] for entry in run.stdout.split()}
    assert len(workers) == 6
    assert workers <= set(prog.out_lines())


MAIN_MAKES_A_SUBINTERPRETER = """
import os, sys
try:
    import _interpreters as interpreters
except ImportError:
    import _xxsubinterpreters as interpreters
SUB = interpreters.create()
import warden

def where(i):
    return os.getpid()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(2) as ex:
        print("executor", len(list(ex.map(where, range(8)))))
    with warden.Pool(2) as pool:
        print("pool", pool.map(abs, [-1, -2]))
    child = warden.Process(target=abs, args=(-1,))
    child.start()
    child.join(60)
    print("process", child.exitcode)
"""


def test_a_main_module_that_makes_a_subinterpreter_at_import_gets_working_workers(program):
    # CPython's fork() of a process with a subinterpreter aborts the child
    # (3.12, 3.13) or leaves it hung (3.11): the zygote that imported such a
    # main must not fork; the workers import main themselves, as under spawn.
    run = program(MAIN_MAKES_A_SUBINTERPRETER).run(env={"WARDEN_START": "zygote"}, timeout=90)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["executor 8", "pool [1, 2]", "process 0"], run.stderr


def test_a_main_module_that_starts_a_thread_still_gets_forked_workers(program):
    # The zygote that imported main has a thread and cannot fork: a second one,
    # without main, forks the workers, and each of them imports main itself.
    prog = program(COUNTS_MAIN_IMPORTS)
    run = prog.run(env={"WARDEN_START": "zygote", "MAIN_STARTS_A_THREAD": "1"}, args=("default",))
    assert run.returncode == 0, run.stderr
    seen = [entry.split(":") for entry in run.stdout.split()]
    workers = {pid for pid, _ in seen}
    zygotes = {z for _, z in seen}
    assert len(workers) == 6
    assert len(zygotes) == 1 and "None" not in zygotes
    importers = prog.out_lines()
    assert workers <= set(importers)
    # The first zygote imported it first; the one that forked did not.
    assert zygotes.isdisjoint(importers)
    assert importers[0] not in workers


def test_a_main_module_whose_imports_start_native_threads_is_imported_by_the_workers_alone(program):
    """Its import starts a library's threads in the program too (``import
    numpy`` does): a zygote importing it would have them and could not
    fork. The pool sees them and starts its zygote without main at once;
    main was imported twice before the first worker served (by a zygote
    that then gave up, and by the worker)."""
    prog = program(COUNTS_MAIN_IMPORTS)
    forked_from = prog.tmp_path / "forked_from"
    env = {"WARDEN_START": "zygote", "MAIN_STARTS_A_NATIVE_THREAD": "1", "FORKED_FROM": str(forked_from)}
    run = prog.run(env=env, args=("default",))
    assert run.returncode == 0, run.stderr
    seen = [entry.split(":") for entry in run.stdout.split()]
    workers = {pid for pid, _ in seen}
    zygotes = {z for _, z in seen}
    assert len(workers) == 6
    assert len(zygotes) == 1 and "None" not in zygotes  # still forked by a zygote
    assert workers <= set(prog.out_lines())
    # Every import of main was a worker's (forked by that zygote), none a zygote's.
    assert set(forked_from.read_text().split()) == zygotes


def test_a_running_pools_own_threads_leave_the_next_pools_zygote_to_import_main(program):
    """The threads a pool runs (its supervisor's, the core's) are not a
    library's: a second pool made while the first runs still has a zygote
    that imports main, and workers that do not."""
    prog = program(
        """
        import os, warden
        from warden import _warden
        if __name__ == "__mp_main__":
            with open(os.environ["OUT"], "a") as f:
                f.write(f"{os.getpid()} {_warden.forked_from()}\\n")
        def where():
            return _warden.forked_from()
        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1) as first, warden.ProcessPoolExecutor(1) as second:
                zygotes = {first.submit(where).result(60), second.submit(where).result(60)}
            print(*sorted(zygotes))
        """
    )
    run = prog.run(env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    zygotes = run.stdout.split()
    assert len(zygotes) == 2 and "None" not in zygotes
    assert sorted(prog.out_lines()) == sorted(f"{z} None" for z in zygotes)


def test_a_main_module_that_starts_a_pool_unguarded_gets_the_standard_librarys_error(program):
    prog = program(
        """
        import warden
        with warden.ProcessPoolExecutor(1) as ex:
            print(ex.submit(abs, -1).result(60))
        """
    )
    run = prog.run(env={"WARDEN_START": "zygote"})
    assert run.returncode != 0
    assert "bootstrapping phase" in run.stderr
    assert "freeze_support" in run.stderr


@pytest.mark.parametrize("start", ["zygote", "exec"])
def test_a_main_module_that_waits_at_import_is_named_on_stderr_with_the_line_it_waits_at(program, start):
    # A single-instance lock at the top of the main module: the parent holds
    # it, and each process that imports main (the zygote, or each worker
    # started by exec) waits for it. The standard library's spawn waits the
    # same way, in silence; here the waiting process says where, and the
    # pool starts serving once the lock is let go.
    prog = program(
        """
        import fcntl
        import warden
        lock = open("single.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one instance at a time

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1) as ex:
                f = ex.submit(abs, -7)
                try:
                    f.result(timeout=3)
                except TimeoutError:
                    print("no result yet", flush=True)
                fcntl.flock(lock, fcntl.LOCK_UN)
                print(f.result(timeout=60))
        """
    )
    run = prog.run(env={"WARDEN_START": start, "WARDEN_SLOW_IMPORT_NOTICE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["no result yet", "7"], run.stderr
    who = "zygote" if start == "zygote" else "worker"
    assert f"warden: {who} " in run.stderr and "importing the program's code for 1 s" in run.stderr, (
        run.stderr
    )
    # The program's own line, not the way warden got there.
    assert "fcntl.flock(lock, fcntl.LOCK_EX)  # one instance at a time" in run.stderr, run.stderr
    assert "_workerloop.py" not in run.stderr and "spawn.py" not in run.stderr, run.stderr
    assert 'belongs under `if __name__ == "__main__":`' in run.stderr, run.stderr


def test_the_slow_import_notice_gives_way_where_no_thread_can_start(monkeypatch):
    # Out of threads (`ulimit -u`): the start goes on without the notice,
    # instead of failing as if the program could not be loaded.
    from warden import _workerloop

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    ran = []
    with _workerloop.notice_if_slow("worker", "importing the program's code"):
        ran.append(True)
    assert ran == [True]


@pytest.mark.parametrize("setting", ["inf", "0", "1e300"])
def test_a_slow_import_notice_of_never_starts_no_thread(monkeypatch, setting):
    from warden import _workerloop

    def unexpected(self):
        raise AssertionError("a thread was started")

    monkeypatch.setenv("WARDEN_SLOW_IMPORT_NOTICE", setting)
    monkeypatch.setattr(threading.Thread, "start", unexpected)
    with _workerloop.notice_if_slow("worker", "importing the program's code"):
        pass


def test_a_main_module_quick_to_import_says_nothing(program):
    prog = program(
        """
        import time
        import warden
        time.sleep(0.2)  # a slow import, well within the notice's bound

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1, start="exec") as ex:
                print(ex.submit(abs, -7).result(timeout=60))
        """
    )
    run = prog.run(env={"WARDEN_SLOW_IMPORT_NOTICE": "5"})
    assert run.returncode == 0 and run.lines == ["7"], run.stderr
    assert "importing the program's code" not in run.stderr, run.stderr


@pytest.mark.parametrize("start", ["zygote", "exec"])
@pytest.mark.parametrize("restart_limit", ["(10, 5)", "None"])
def test_a_pool_whose_workers_cannot_import_main_fails_at_the_first_failure(program, start, restart_limit):
    # The standard library's Pool starts workers for ever here, each printing
    # the same traceback; a worker that cannot import the program's main
    # module says so once, and no other worker would do better.
    prog = program(
        f"""
        import warden
        with warden.Pool(2, restart_limit={restart_limit}) as pool:
            print(pool.apply(abs, (-1,)))
        """
    )
    run = prog.run(env={"WARDEN_START": start})
    assert run.returncode != 0
    assert "could not load the program" in run.stderr
    assert "bootstrapping phase" in run.stderr
    # The two first workers, started together (and at most a replacement
    # started between their failures), not the eleven of the restart limit.
    assert 1 <= run.stderr.count("failed to start") <= 3, run.stderr


def test_a_main_module_whose_import_fails_once_still_gets_a_pool(program, tmp_path):
    # A passing fault as a worker imports main (a file being rewritten, a
    # database busy): the pool does not fail at the first such failure.
    prog = program(
        """
        import os, time
        if __name__ != "__main__":
            try:
                fd = os.open(os.environ["MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                time.sleep(0.3)
            else:
                os.close(fd)
                raise RuntimeError("a passing fault while importing main")

        def square(x):
            return x * x

        if __name__ == "__main__":
            import warden
            with warden.Pool(2, start="exec") as pool:
                print(pool.map(square, range(4)))
        """
    )
    run = prog.run(env={"MARK": str(tmp_path / "mark")})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[0,", "1,", "4,", "9]"]
    assert run.stderr.count("a passing fault while importing main") >= 1


# A main module as users write it: a file opened at its top level (an audit
# log) that its tasks write to, next to a file each task opens itself.
MAIN_KEEPS_A_FILE = """
import concurrent.futures, json, multiprocessing, os, sys, warden
from warden import _warden
DIR = os.environ["RUN_DIR"]
if __name__ == "__mp_main__":
    with open(os.path.join(DIR, "imports"), "a") as f:
        f.write(f"{os.getpid()}\\n")
AUDIT = open(os.path.join(DIR, "audit.log"), "a")

def export(i):
    with open(os.path.join(DIR, f"out{i}.csv"), "w") as out:
        out.write("id,value\\n")
        out.flush()
        try:
            AUDIT.write(f"exported {i}\\n")
            AUDIT.flush()
        except OSError as e:
            return f"audit failed: {e.strerror}"
    return "ok"

if __name__ == "__main__":
    if sys.argv[1] == "stdlib":
        spawn = multiprocessing.get_context("spawn")
        ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn, max_tasks_per_child=1)
    else:
        ex = warden.ProcessPoolExecutor(2, max_tasks_per_child=1)
    with ex:
        results = list(ex.map(export, range(4)))
    AUDIT.close()
    files = {}
    for name in sorted(os.listdir(DIR)):
        if name != "imports":
            with open(os.path.join(DIR, name)) as f:
                files[name] = sorted(f.read().splitlines())
    print(json.dumps({"results": results, "files": files}))
"""


def _run_in(prog, tmp_path, kind, env=None, name=None):
    """Runs ``prog kind`` with a directory of its own (``$RUN_DIR``); returns
    its JSON answer and the pids that imported main as ``__mp_main__``."""
    run_dir = tmp_path / (name or kind)
    run_dir.mkdir()
    run = prog.run(env={"RUN_DIR": str(run_dir), **(env or {})}, args=(kind,))
    assert run.returncode == 0, run.stderr
    imports = run_dir / "imports"
    importers = imports.read_text().split() if imports.exists() else []
    return json.loads(run.stdout), importers


def test_a_file_main_opens_at_import_gets_each_workers_writes_and_no_other_file_does(program, tmp_path):
    prog = program(MAIN_KEEPS_A_FILE)
    stdlib, _ = _run_in(prog, tmp_path, "stdlib")
    ours, importers = _run_in(prog, tmp_path, "warden", env={"WARDEN_START": "zygote"})
    assert stdlib["results"] == ["ok"] * 4
    assert stdlib["files"]["audit.log"] == [f"exported {i}" for i in range(4)]
    assert all(stdlib["files"][f"out{i}.csv"] == ["id,value"] for i in range(4))
    assert ours == stdlib
    # Each worker opened the file itself: it imported main, as under spawn.
    assert len(importers) >= 4


def test_a_named_preload_that_keeps_a_file_open_makes_the_pool_start_workers_by_exec(tmp_path, monkeypatch):
    log = tmp_path / "preload.log"
    (tmp_path / "keeps_a_file.py").write_text(f"LOG = open({str(log)!r}, 'a')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warden.ProcessPoolExecutor(2, start="zygote", preload=["keeps_a_file"], max_tasks_per_child=1) as ex:
        seen = [ex.submit(write_to_preloads_file, i).result(30) for i in range(4)]
        refused = ex._warden_runner.core.zygote_refused()
    assert [wrote for _, wrote in seen] == ["ok"] * 4
    assert all(forked_from is None for forked_from, _ in seen)
    assert refused is not None and "fds open" in refused and str(log) in refused
    assert sorted(log.read_text().splitlines()) == [f"line {i}" for i in range(4)]


def write_to_preloads_file(i):
    import keeps_a_file

    try:
        keeps_a_file.LOG.write(f"line {i}\n")
        keeps_a_file.LOG.flush()
    except OSError as e:
        return _warden.forked_from(), f"failed: {e.strerror}"
    return _warden.forked_from(), "ok"


# The main block of the programs below: four tasks, each in a worker of its
# own (max_tasks_per_child=1), under warden or the standard library's spawn,
# run from "/" (so that a working directory main sets is told apart).
ONE_TASK_WORKERS = """
if __name__ == "__main__":
    os.chdir("/")
    if sys.argv[1] == "stdlib":
        spawn = multiprocessing.get_context("spawn")
        ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn, max_tasks_per_child=1)
    else:
        ex = warden.ProcessPoolExecutor(2, max_tasks_per_child=1)
    with ex:
        print(json.dumps(list(ex.map({task}, range(4)))))
"""


# A main module that seeds the global generators at its top level (and makes
# seeded generators of its own), then draws in one-task workers. Under spawn
# each worker imports main and starts from the seeded state.
MAIN_SEEDS = """
import concurrent.futures, json, multiprocessing, os, random, sys, warden
from warden import _warden
DIR = os.environ["RUN_DIR"]
if __name__ == "__mp_main__":
    with open(os.path.join(DIR, "imports"), "a") as f:
        f.write(f"{os.getpid()}\\n")
NUMPY = os.environ.get("WITH_NUMPY") == "1"
SEED = os.environ.get("SEED")
random.seed(None if SEED is None else int(SEED))
OWN = random.Random(99)
if NUMPY:
    import numpy as np
    np.random.seed(None if SEED is None else int(SEED))
    RNG = np.random.default_rng(7)

def draw(_):
    values = [random.random(), random.getrandbits(64), OWN.random()]
    if NUMPY:
        values += [float(np.random.rand()), int(np.random.randint(1 << 62)), float(RNG.random())]
    return values

""" + ONE_TASK_WORKERS.format(task="draw")


@pytest.mark.parametrize("with_numpy", [False, True], ids=["random", "numpy"])
def test_seeds_set_at_mains_import_start_each_worker_as_under_spawn(program, tmp_path, with_numpy):
    env = {"SEED": "1234", "WITH_NUMPY": "1" if with_numpy else "0"}
    if with_numpy:
        numpy()
        # A threaded BLAS would make the zygote refuse (workers then import
        # main themselves); this checks the zygote that imported it.
        env["OPENBLAS_NUM_THREADS"] = "1"
    prog = program(MAIN_SEEDS)
    stdlib, _ = _run_in(prog, tmp_path, "stdlib", env=env)
    first, importers = _run_in(prog, tmp_path, "warden", env={**env, "WARDEN_START": "zygote"}, name="first")
    second, _ = _run_in(prog, tmp_path, "warden", env={**env, "WARDEN_START": "zygote"}, name="second")
    # Every one-task worker starts from the seeded state: all four draw alike.
    assert all(values == stdlib[0] for values in stdlib)
    assert first == second == stdlib
    # Each worker imported main itself, as under spawn (a main that seeds at
    # import is not kept by the zygote: see the test below).
    assert len(importers) >= 4


# A main module that makes, at its top level, state each process should have
# its own of: under spawn every worker imports main and makes its own.
MAIN_MAKES_PER_PROCESS_STATE = """
import concurrent.futures, json, multiprocessing, os, random, signal, sys, tempfile, warden
MADE = os.environ["MADE"]
if __name__ == "__mp_main__":
    with open(os.path.join(os.environ["RUN_DIR"], "imports"), "a") as f:
        f.write(f"{os.getpid()}\\n")
if MADE == "seed":
    random.seed(os.getpid())
elif MADE == "tempdir":
    SCRATCH = tempfile.TemporaryDirectory(prefix="warden-test-scratch-")
elif MADE == "tempfile":
    SCRATCH = tempfile.NamedTemporaryFile(prefix="warden-test-scratch-")
elif MADE == "handler":
    def on_term(signum, frame):
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
elif MADE == "cwd":
    os.chdir(os.environ["RUN_DIR"])

def what(i):
    if MADE == "seed":
        return random.random()
    if MADE == "tempfile":
        return [SCRATCH.name, str(os.path.exists(SCRATCH.name))]
    if MADE == "tempdir":
        path = os.path.join(SCRATCH.name, f"part{i}")
        with open(path, "w") as f:
            f.write(str(i))
        with open(path) as f:
            return [SCRATCH.name, f.read()]
    if MADE == "handler":
        return getattr(signal.getsignal(signal.SIGTERM), "__name__", "other")
    return os.getcwd()

""" + ONE_TASK_WORKERS.format(task="what")


@pytest.mark.parametrize("made", ["seed", "tempdir", "tempfile", "handler", "cwd"])
def test_state_main_makes_at_import_is_each_workers_own_as_under_spawn(program, tmp_path, made):
    prog = program(MAIN_MAKES_PER_PROCESS_STATE)
    env = {"MADE": made, "WARDEN_START": "zygote"}
    temp = {kind: tmp_path / f"temp-{kind}" for kind in ("stdlib", "warden")}
    for path in temp.values():
        path.mkdir()
    stdlib, _ = _run_in(prog, tmp_path, "stdlib", env={**env, "TMPDIR": str(temp["stdlib"])})
    ours, importers = _run_in(prog, tmp_path, "warden", env={**env, "TMPDIR": str(temp["warden"])})
    # What each process made is removed as it ends: by the first zygote
    # too, which imported main and was not used (nothing can be forked from it).
    assert sorted(os.listdir(temp["warden"])) == sorted(os.listdir(temp["stdlib"])) == []
    if made == "seed":  # random.seed(os.getpid()): a stream of its own in each worker
        assert len(set(stdlib)) == len(set(ours)) == 4
    elif made == "tempdir":  # a directory of its own, not removed under it by another's exit
        assert [text for _, text in ours] == [text for _, text in stdlib] == ["0", "1", "2", "3"]
        assert len({name for name, _ in ours}) == 4
    elif made == "tempfile":  # a file of its own, there while the worker runs
        assert [there for _, there in ours] == [there for _, there in stdlib] == ["True"] * 4
        assert len({name for name, _ in ours}) == 4
    elif made == "handler":  # main's SIGTERM handler, not warden's
        assert ours == stdlib == ["on_term"] * 4
    else:  # the directory main changed to, not the parent's
        assert (stdlib, ours) == ([str(tmp_path / "stdlib")] * 4, [str(tmp_path / "warden")] * 4)
    assert len(importers) >= 4  # each worker imported main itself


@pytest.mark.parametrize("with_numpy", [False, True], ids=["random", "numpy"])
def test_a_main_that_seeds_from_the_os_gets_distinct_numbers_in_each_worker(program, tmp_path, with_numpy):
    env = {"WITH_NUMPY": "1" if with_numpy else "0"}  # seed(None): from the OS
    if with_numpy:
        numpy()
        env["OPENBLAS_NUM_THREADS"] = "1"
    prog = program(MAIN_SEEDS)
    stdlib, _ = _run_in(prog, tmp_path, "stdlib", env=env)
    ours, importers = _run_in(prog, tmp_path, "warden", env={**env, "WARDEN_START": "zygote"})
    for draws in (stdlib, ours):
        # The global generators differ between workers...
        globals_only = [tuple(v for i, v in enumerate(values) if i % 3 != 2) for values in draws]
        assert len(set(globals_only)) == 4
        # ...while the program's own seeded generators start alike in each.
        assert len({tuple(values[2::3]) for values in draws}) == 1
    assert ours[0][2::3] == stdlib[0][2::3]
    assert len(importers) == 1


LIBRARY_GENERATORS = """
import random

_own = random.Random()  # a library's own generator, made at its import: Faker's
_fixed = random.Random(1234)  # one seeded on purpose
_reseeded = random.Random(5)
_reseeded.seed()  # then from the OS

def draw(_=None):
    return _own.random(), _fixed.random(), _reseeded.random()
"""

LIBRARY_GENERATORS_MAIN = """
import multiprocessing, sys
import warden
from library import draw

if __name__ == "__main__":
    if sys.argv[1] == "warden":
        pool = warden.Pool(2, maxtasksperchild=1)
    else:
        pool = multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1)
    with pool:
        draws = pool.map(draw, range(8), chunksize=1)
    print(*(len({d[i] for d in draws}) for i in range(3)))
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_a_generator_a_library_made_at_import_without_a_seed_draws_its_own_numbers_in_each_worker(
    program, impl
):
    """A ``random.Random()`` a library makes at import (main imports it, so
    the zygote does) is copied into each fork: each worker reseeds it from
    the OS, as each spawned worker makes its own (before, all eight workers
    drew the same numbers); one seeded with a value starts alike in each, as
    under spawn."""
    program(LIBRARY_GENERATORS, name="library.py")
    run = program(LIBRARY_GENERATORS_MAIN).run(args=(impl,), env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["8 1 8"], run.stdout + run.stderr


CODE_ARRIVING_AFTER_THE_START = """
import importlib, os, sys, zipfile
import warden

LATER = os.path.abspath("later")  # a directory on sys.path made after the pool starts
BUNDLE = os.path.abspath("bundle.zip")  # a zip on sys.path replaced while the pool runs
sys.path[:0] = [LATER, BUNDLE]
import colorsys  # (an import after: the zygote's import system looks at both)

def build(version):
    with zipfile.ZipFile(BUNDLE + ".tmp", "w") as z:
        z.writestr("plugin.py", "# " + "x" * len(version) * 40 + f"\\nVERSION = {version!r}\\n")
    os.replace(BUNDLE + ".tmp", BUNDLE)

def version(name):
    try:
        return importlib.import_module(name).VERSION
    except Exception as e:
        return type(e).__name__

if __name__ == "__main__":
    build("v1")
    with warden.Pool(1, maxtasksperchild=1) as pool:  # each task in a fresh worker
        print(pool.apply(version, ("plugin",)), flush=True)
        os.mkdir(LATER)
        with open(os.path.join(LATER, "generated.py"), "w") as f:
            f.write("VERSION = 'generated'\\n")
        build("v2, a longer one")
        importlib.invalidate_caches()
        print(version("generated"), version("plugin"), flush=True)  # the program sees both
        print(pool.apply(version, ("generated",)), pool.apply(version, ("plugin",)), flush=True)
"""


def test_code_that_arrives_on_sys_path_after_the_pool_started_is_imported_by_new_workers(program):
    """A directory on ``sys.path`` made after the pool started, and a zip on
    it replaced since: what the zygote's import system learned of them
    (nothing there; the zip's old table of contents) is stale, and a worker
    forked from it looks again, as a spawned worker does (before:
    ``ModuleNotFoundError``, and the new zip read at the old offsets)."""
    run = program(CODE_ARRIVING_AFTER_THE_START).run(env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["v1", "generated v2, a longer one", "generated v2, a longer one"], (
        run.stdout + run.stderr
    )


CYCLE_MADE_AT_IMPORT = """
import multiprocessing, os, sys
import warden

class Client:
    def __init__(self):
        self.buffer = []
        self.on_event = self.buffer.append  # (a cycle: client, its dict, ...)
        self.me = self

    # (What __del__ uses is bound here: at a spawned worker's exit, the
    # interpreter may have cleared main's globals first.)
    def __del__(self, _open=open, _out=os.environ["OUT"], _pid=os.getpid):
        with _open(_out, "a") as f:
            f.write(f"{_pid()} flushed {len(self.buffer)}\\n")

CLIENT = Client()  # made at import: in the zygote, frozen there before each fork

def task(x):
    CLIENT.on_event(x)
    return os.getpid()

if __name__ == "__main__":
    if sys.argv[1] == "warden":
        pool = warden.Pool(2, maxtasksperchild=3)
    else:
        pool = multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=3)
    with pool:
        pids = set(pool.map(task, range(12), chunksize=1))
        pool.close()
        pool.join()
    print(*sorted(pids), flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_an_object_in_a_cycle_main_made_at_import_is_finalized_at_each_workers_exit(program, impl):
    """A client main makes at import, in a reference cycle, whose ``__del__``
    flushes what it buffered: each worker's exit finalizes its copy, as a
    spawned worker's interpreter does at exit. (The zygote froze it before
    each fork, out of the collector's reach: no worker flushed anything.)"""
    prog = program(CYCLE_MADE_AT_IMPORT)
    run = prog.run(args=(impl,), env={"WARDEN_START": "zygote"}, timeout=90)
    assert run.returncode == 0, run.stderr
    flushed = [line.split() for line in prog.out_lines()]
    assert sum(int(n) for _, _, n in flushed) == 12, flushed
    assert set(run.lines[0].split()) <= {pid for pid, _, _ in flushed}, (flushed, run.lines)


def test_what_main_prints_at_import_is_written_once_not_once_more_by_each_forked_worker(program):
    """With stdout a pipe (block-buffered), a line main prints at import in
    the zygote is written once: each forked worker used to copy the unwritten
    buffer and write it again at its exit (six lines with the zygote's pid
    for six one-task workers, and one more at the zygote's end)."""
    prog = program(
        """
        import os, warden
        print("imported as", __name__, os.getpid())

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(2, max_tasks_per_child=1, start="zygote") as ex:
                pids = {f.result() for f in [ex.submit(os.getpid) for _ in range(6)]}
            print("workers", len(pids))
        """
    )
    run = prog.run(timeout=60, env={"PYTHONUNBUFFERED": ""})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "workers 6" in lines, run.stdout
    imported = [line for line in lines if line.startswith("imported as __mp_main__")]
    assert imported, run.stdout  # the zygote imported main
    assert len(imported) == len(set(imported)), run.stdout  # each process's line once


ZYGOTE_PESTERED_WITH_SIGINT = """
import os, signal, threading, time
import warden
from warden import _warden

def zygote():
    return _warden.forked_from()

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
        pid = ex.submit(zygote).result(timeout=60)
        stop = threading.Event()

        def pester():
            while not stop.is_set():
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    return
                time.sleep(0.003)

        thread = threading.Thread(target=pester)
        thread.start()
        try:
            # Every task a new worker: the zygote forks all the while.
            results = list(ex.map(abs, range(-200, 0)))
        finally:
            stop.set()
            thread.join()
        print("results", results == list(range(200, 0, -1)), flush=True)
        print("same zygote", ex.submit(zygote).result(timeout=60) == pid, flush=True)
"""


def test_sigint_sent_to_the_zygote_while_it_forks_is_ignored_quietly(program):
    # Before, the interpreter's fork hooks raised KeyboardInterrupt in the
    # zygote, printed as "Exception ignored in: <function _before_fork>"
    # on the program's stderr, once for nearly every fork.
    run = program(ZYGOTE_PESTERED_WITH_SIGINT).run(timeout=120, env={"WARDEN_START": "zygote"})
    assert run.returncode == 0, run.stderr
    assert run.lines == ["results True", "same zygote True"]
    assert "KeyboardInterrupt" not in run.stderr, run.stderr


def main_thread_by_its_pthread_handle():
    """In a forked worker: what reaches the main thread through its
    ``pthread_t`` (as OpenMP's binding and watchdog threads address it)."""
    import ctypes

    got = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append("signal"))
    try:
        helper = threading.Thread(
            target=signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGUSR1)
        )
        helper.start()
        helper.join()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, old)
    clock = time.clock_gettime(time.pthread_getcpuclockid(threading.get_ident())) > 0
    # Pin this thread to one CPU through its pthread_t.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.pthread_self.restype = ctypes.c_ulong
    mask = ctypes.c_ulong(1 << min(os.sched_getaffinity(0)))
    rc = libc.pthread_setaffinity_np(
        ctypes.c_ulong(libc.pthread_self()), ctypes.sizeof(mask), ctypes.byref(mask)
    )
    # Robust futexes of a process that dies are released only if its list
    # is registered (glibc's fork() does; a raw clone must too).
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    number = {"x86_64": 274, "aarch64": 100}[platform.machine()]
    robust = libc.syscall(number, 0, ctypes.byref(head), ctypes.byref(size)) == 0 and bool(head.value)
    return {
        "signal": got,
        "clock": clock,
        "robust": robust,
        "native_id": threading.main_thread().native_id == threading.get_native_id() == os.getpid(),
        "pinned": rc == 0 and len(os.sched_getaffinity(0)) == 1,
        "zygote": sorted(os.sched_getaffinity(_warden.forked_from())),
        "forked": _warden.forked_from() is not None,
    }


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin a worker to one")
@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="the zygote forks on x86-64 and aarch64"
)
def test_a_forked_workers_main_thread_is_reached_through_its_pthread_handle_and_never_the_zygote():
    cpus = sorted(os.sched_getaffinity(0))
    with warden.ProcessPoolExecutor(1, start="zygote") as ex:
        seen = ex.submit(main_thread_by_its_pthread_handle).result(timeout=60)
    assert seen == {
        "signal": ["signal"],
        "clock": True,
        "robust": True,
        "native_id": True,
        "pinned": True,
        "zygote": cpus,  # the worker's pinning did not reach the zygote
        "forked": True,
    }


HOLDS_A_ROBUST_MUTEX = """
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
shared = mmap.mmap(-1, 4096)  # anonymous, shared with the processes forked from here
mutex = ctypes.c_char.from_buffer(shared)
attr = ctypes.create_string_buffer(64)
assert libc.pthread_mutexattr_init(attr) == 0
assert libc.pthread_mutexattr_setpshared(attr, 1) == 0
assert libc.pthread_mutexattr_setrobust(attr, 1) == 0
assert libc.pthread_mutex_init(ctypes.byref(mutex), attr) == 0
assert libc.pthread_mutex_lock(ctypes.byref(mutex)) == 0  # held by the zygote
"""


def robust_list_is_empty():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    number = {"x86_64": 274, "aarch64": 100}[platform.machine()]
    assert libc.syscall(number, 0, ctypes.byref(head), ctypes.byref(size)) == 0
    first = ctypes.c_void_p.from_address(head.value).value
    return _warden.forked_from() is not None, first == head.value


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="the zygote forks on x86-64 and aarch64"
)
def test_a_forked_worker_holds_none_of_the_robust_mutexes_its_zygote_holds(tmp_path, monkeypatch):
    # A worker's robust list is its own, and empty: a mutex the zygote
    # holds is not the worker's, and its list must not lead into the
    # zygote's (a lock of the worker's would write through it).
    (tmp_path / "holds_a_robust_mutex.py").write_text(HOLDS_A_ROBUST_MUTEX)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warden.ProcessPoolExecutor(1, start="zygote", preload=["holds_a_robust_mutex"]) as ex:
        assert ex.submit(robust_list_is_empty).result(timeout=60) == (True, True)


MAIN_CHANGES_AT_IMPORT = """
import multiprocessing, sys

# What main's top level changes when a worker imports it (as __mp_main__).
sys.path.append("added-by-" + ("the-program" if __name__ == "__main__" else "a-worker"))
if __name__ != "__main__":
    sys.argv.append("--in-a-worker")

def seen(_):
    return [p for p in sys.path if p.startswith("added-by-")], sys.argv[2:]

if __name__ == "__main__":
    impl = sys.argv[1]
    if impl == "spawn":
        import concurrent.futures
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    else:
        import warden
        ex = warden.ProcessPoolExecutor(1, start=impl)
    with ex:
        print(ex.submit(seen, 0).result(60))
"""


def test_what_mains_import_changes_in_a_worker_is_kept_as_under_spawn(program):
    """A worker imports main, whose top level changes ``sys.path`` and
    ``sys.argv``: a spawned worker keeps those changes. A worker forked by a zygote that had imported main
    applied the pool's preparation again, which put the parent's values
    back."""
    prog = program(MAIN_CHANGES_AT_IMPORT)
    seen = {}
    for impl in ("spawn", "zygote", "exec"):
        run = prog.run(timeout=120, args=(impl,))
        assert run.returncode == 0, run.stderr
        seen[impl] = run.stdout
    assert "added-by-a-worker" in seen["spawn"], seen
    assert seen["zygote"] == seen["exec"] == seen["spawn"], seen
