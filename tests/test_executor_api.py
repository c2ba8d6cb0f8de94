"""warden.ProcessPoolExecutor against the concurrent.futures API, compared with
the standard library where the behaviour should match."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import gc
import multiprocessing
import multiprocessing.pool
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool

import pytest

import warden

from conftest import alive, wait_until


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def echo_kwargs(**kwargs):
    return kwargs


def fail(message):
    raise ValueError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def getpid(_=None):
    return os.getpid()


def die_by_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def exit_abruptly(code):
    os._exit(code)


def raise_system_exit(code):
    raise SystemExit(code)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def return_lock():
    return threading.Lock()


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_needs_two_args():
    raise NeedsTwoArgs(1, 2)


class UnpicklableError(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable():
    raise UnpicklableError()


@pytest.fixture
def ex():
    with warden.ProcessPoolExecutor(2) as executor:
        yield executor


# -- submit and result ------------------------------------------------------


def test_submit_returns_a_concurrent_futures_future_with_the_result(ex):
    f = ex.submit(square, 7)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=30) == 49
    assert f.done() and not f.cancelled() and f.exception() is None


def test_submit_passes_any_keyword_name_including_fn_and_self(ex):
    assert ex.submit(echo_kwargs, fn=1, self=2).result() == {"fn": 1, "self": 2}
    assert ex.submit(add, 1, b=2).result() == 3


def test_remote_exception_matches_the_standard_library(ex):
    with pytest.raises(ValueError, match="boom") as ours:
        ex.submit(fail, "boom").result()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as std, pytest.raises(ValueError) as theirs:
        std.submit(fail, "boom").result()
    assert type(ours.value.__cause__) is type(theirs.value.__cause__)
    assert type(ours.value.__cause__).__name__ == "_RemoteTraceback"
    ours_tb, theirs_tb = ours.value.__cause__.tb, theirs.value.__cause__.tb
    assert ours_tb.startswith('\n"""\nTraceback') and ours_tb.endswith('"""')
    assert theirs_tb.startswith('\n"""\nTraceback')
    assert "in fail" in ours_tb and "ValueError: boom" in ours_tb


#: What os.fsdecode makes of a file name that is not UTF-8.
NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")


def test_an_exception_whose_text_is_not_utf8_comes_back_as_itself_with_its_traceback(ex):
    with pytest.raises(ValueError) as raised:
        ex.submit(fail, NOT_UTF8).result(timeout=60)
    assert raised.value.args == (NOT_UTF8,)
    tb = raised.value.__cause__.tb
    assert "in fail" in tb and "ValueError: caf\\udce9" in tb
    assert ex.submit(square, 3).result(timeout=60) == 9  # the pool goes on


def test_each_result_call_raises_a_fresh_exception(ex):
    f = ex.submit(fail, "again")
    errors = []
    for _ in range(2):
        try:
            f.result()
        except ValueError as e:
            errors.append(e)
    assert errors[0] is not errors[1]
    assert f.exception() is not f.exception()
    assert str(f.exception()) == "again"


def test_a_failed_future_holds_no_reference_to_the_callers_frames(ex):
    class Marker:
        pass

    def call():
        marker = Marker()
        future = ex.submit(fail, "x")
        try:
            future.result()
        except ValueError:
            pass
        return weakref_to(marker), future

    import weakref

    def weakref_to(obj):
        return weakref.ref(obj)

    gc.disable()
    try:
        ref, future = call()
        # Without a cycle, the frame's locals die by reference counting alone.
        assert ref() is None
        assert future.done()
    finally:
        gc.enable()


def test_submit_after_shutdown_raises_runtime_error_like_the_standard_library():
    ex = warden.ProcessPoolExecutor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(square, 1)
    std = cf.ProcessPoolExecutor(1)
    std.shutdown()
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        std.submit(square, 1)


def test_the_executor_is_a_standard_library_process_pool_executor(ex):
    spawn = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=spawn) as std:

        def kinds(executor):
            return {
                "ProcessPoolExecutor": isinstance(executor, cf.ProcessPoolExecutor),
                "Executor": isinstance(executor, cf.Executor),
                "not a ThreadPoolExecutor": not isinstance(executor, cf.ThreadPoolExecutor),
            }

        ours = kinds(ex)
        assert ours == kinds(std)
        assert all(ours.values()), ours


def test_the_executor_inherits_none_of_the_standard_librarys_machinery(ex):
    spawn = multiprocessing.get_context("spawn")
    ours, std_type = type(ex), cf.ProcessPoolExecutor
    assert issubclass(ours, std_type)
    # Its __init__ never runs: whatever the executor would inherit from it
    # (_adjust_process_count, _spawn_process...) is absent; what
    # concurrent.futures.Executor gives (__enter__) is as before.
    harmless = {"__dict__", "__weakref__", "__module__", "__doc__"}
    harmless |= {"__firstlineno__", "__static_attributes__"}
    for attr in dir(std_type):
        owner = next(k for k in ours.__mro__ if attr in vars(k))
        assert owner is not std_type or attr in harmless, attr
        if attr in vars(std_type) and attr not in harmless:
            assert owner is ours, attr
    assert not hasattr(ex, "_adjust_process_count") and not hasattr(ours, "_spawn_process")
    # The private attributes the standard library's own code and libraries
    # read say what the standard library's say.
    read = ("_max_workers", "_mp_context", "_processes", "_broken", "_shutdown_thread")
    with cf.ProcessPoolExecutor(2, mp_context=spawn) as std:

        def view(executor):
            executor.submit(square, 2).result()
            seen = {a: hasattr(executor, a) for a in read}
            seen.update(
                max_workers=executor._max_workers,
                processes=len(executor._processes) > 0,
                broken=bool(executor._broken),
                shutdown_thread=executor._shutdown_thread,
            )
            return seen

        assert view(ex) == view(std)
        ex.shutdown()
        std.shutdown()
        assert ex._shutdown_thread is std._shutdown_thread is True
    with ex as entered:
        assert entered is ex


AFFINITY_PROGRAM = """
import concurrent.futures, multiprocessing, os, warden

if __name__ == "__main__":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU of those there are
    spawn = multiprocessing.get_context("spawn")
    std = concurrent.futures.ProcessPoolExecutor(mp_context=spawn)
    ours = warden.ProcessPoolExecutor()
    with spawn.Pool() as std_pool, warden.Pool() as our_pool:
        print(std._max_workers, ours._max_workers, std_pool._processes, our_pool._processes)
    std.shutdown()
    ours.shutdown()
"""


def test_the_default_number_of_workers_is_counted_as_the_standard_library_counts_it(program):
    run = program(AFFINITY_PROGRAM).run(timeout=60)
    assert run.returncode == 0, run.stderr
    std, ours, std_pool, our_pool = run.stdout.split()
    assert (ours, our_pool) == (std, std_pool)


def test_constructor_rejects_bad_arguments_like_the_standard_library():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        warden.ProcessPoolExecutor(0)
    with pytest.raises(ValueError):
        warden.ProcessPoolExecutor(1, max_tasks_per_child=0)
    with pytest.raises(TypeError):
        warden.ProcessPoolExecutor(1, initializer=42)


@pytest.mark.parametrize(
    "option, value, error, words",
    [
        ("task_timeout", "1", TypeError, "task_timeout must be a number of seconds"),
        (
            "task_timeout",
            float("nan"),
            ValueError,
            "task_timeout must be a positive number of seconds, not nan",
        ),
        ("task_timeout", 0, ValueError, "task_timeout must be a positive number"),
        ("task_timeout", True, TypeError, "task_timeout must be a number of seconds"),
        ("task_timeout", 10**400, ValueError, "task_timeout is too large"),
        ("exit_timeout", "5", TypeError, "exit_timeout must be a number of seconds"),
        ("exit_timeout", float("nan"), ValueError, "exit_timeout must be a number of seconds >= 0"),
    ],
)
def test_a_bad_timeout_is_refused_at_construction_naming_the_option(option, value, error, words):
    # Not a comparison's TypeError that names no option, nor a NaN that
    # every later submit() refuses.
    with pytest.raises(error, match=words.replace("(", r"\(")):
        warden.ProcessPoolExecutor(1, **{option: value})


def test_mp_context_is_accepted_and_workers_are_fresh_interpreters():
    fork = multiprocessing.get_context("fork")
    with warden.ProcessPoolExecutor(1, mp_context=fork) as ex:
        assert ex.submit(square, 3).result() == 9
        # A fresh interpreter, not a fork: it did not inherit state set here.
        global _SET_IN_PARENT
        _SET_IN_PARENT = True
        try:
            assert ex.submit(_set_in_parent).result() is False
        finally:
            _SET_IN_PARENT = False


_SET_IN_PARENT = False


def _set_in_parent():
    return _SET_IN_PARENT


# -- map ---------------------------------------------------------------------


def test_map_returns_results_in_order_like_the_builtin(ex):
    assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    assert list(ex.map(add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]


def test_map_with_chunksize_gives_the_same_results(ex):
    assert list(ex.map(square, range(101), chunksize=7)) == [x * x for x in range(101)]
    # Chunks are slices of a list, tuple or range, tuples of anything else.
    for items in (list(range(23)), tuple(range(23)), range(23), iter(range(23)), dict.fromkeys(range(23), 0)):
        assert list(ex.map(square, items, chunksize=5)) == [x * x for x in range(23)]
    assert list(ex.map(add, range(23), range(100), chunksize=5)) == [2 * x for x in range(23)]
    with pytest.raises(ValueError):
        ex.map(square, range(3), chunksize=0)


def test_map_timeout_raises_timeout_error(ex):
    timed = ex.map(sleep_then, [5], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(timed)
    ex.terminate_workers()


def test_map_raises_the_first_failure_in_order(ex):
    it = ex.map(fail, ["a", "b"])
    with pytest.raises(ValueError, match="a"):
        next(it)


def stop_at_three(x):
    if x == 3:
        raise StopIteration(f"stopped at {x}")
    return x


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_task_raising_stop_iteration_fails_the_map_instead_of_shortening_it(ex, chunksize):
    """As the standard library's map: the ``StopIteration`` fails the
    iteration at its position (a ``RuntimeError`` from it, PEP 479), instead
    of ending a chunk early and dropping the items after it."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as std:
        for executor in (std, ex):
            seen = []
            with pytest.raises(RuntimeError, match="StopIteration") as raised:
                for value in executor.map(stop_at_three, range(8), chunksize=chunksize):
                    seen.append(value)
            assert isinstance(raised.value.__cause__, StopIteration)
            assert seen == ([0, 1, 2] if chunksize == 1 else [])
            assert list(executor.map(square, range(3), chunksize=chunksize)) == [0, 1, 4]


def test_map_pickling_error_raises_at_call_time(ex):
    with pytest.raises(TypeError, match="pickle"):
        ex.map(square, [1, threading.Lock()])


def touch(path):
    with open(path, "w"):
        pass


def paths_then_error(paths):
    yield from paths
    raise ValueError("the iterable failed")


@pytest.mark.parametrize("impl", ["std", "warden"])
def test_a_map_whose_iterable_raises_runs_the_calls_it_submitted_before_as_the_standard_librarys(
    tmp_path, impl
):
    paths = [str(tmp_path / f"ran-{i}") for i in range(6)]
    spawn = multiprocessing.get_context("spawn")
    ex = cf.ProcessPoolExecutor(1, mp_context=spawn) if impl == "std" else warden.ProcessPoolExecutor(1)
    with ex, pytest.raises(ValueError, match="the iterable failed"):
        ex.map(touch, paths_then_error(paths))
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


def test_subclasses_that_define_eq_without_hash_can_be_made():
    class Executor(warden.ProcessPoolExecutor):  # noqa: PLW1641  (unhashable, on purpose)
        def __eq__(self, other):
            return self is other

    class Pool(warden.Pool):  # noqa: PLW1641
        def __eq__(self, other):
            return self is other

    with Executor(1) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1
    with Pool(1) as pool:
        assert pool.apply(abs, (-2,)) == 2


def test_a_map_that_raises_for_a_bad_call_leaves_none_of_its_earlier_calls_to_run(tmp_path):
    """The caller of a ``map`` that raised has no handle on the calls it
    submitted before the bad one: those not started are cancelled."""
    with warden.ProcessPoolExecutor(1) as ex:
        busy = ex.submit(time.sleep, 1.0)
        paths = [str(tmp_path / f"ran-{i}") for i in range(20)]
        with pytest.raises(TypeError, match="pickle"):
            ex.map(touch, [*paths, threading.Lock()])
        busy.result(timeout=60)
        assert ex.submit(square, 3).result(timeout=60) == 9
    assert sorted(os.listdir(tmp_path)) == []


# -- futures interoperate ---------------------------------------------------------


def test_futures_work_with_wait_and_as_completed(ex):
    fs = [ex.submit(sleep_then, 0.05 * i, i) for i in range(4)]
    done, not_done = cf.wait(fs, timeout=30)
    assert len(done) == 4 and not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == [0, 1, 2, 3]


def test_wait_first_exception_sees_a_failed_task(ex):
    fs = [ex.submit(fail, "x"), ex.submit(sleep_then, 10)]
    done, not_done = cf.wait(fs, timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert fs[0] in done and fs[1] in not_done
    ex.terminate_workers()
    assert fs[1].cancelled()


def test_add_done_callback_runs_once_with_the_future(ex):
    seen = []
    event = threading.Event()
    f = ex.submit(square, 4)

    def callback(fut):
        seen.append(fut.result())
        event.set()

    f.add_done_callback(callback)
    assert event.wait(30)
    assert seen == [16]
    late = []
    f.add_done_callback(lambda fut: late.append(fut))
    assert late == [f]


def test_a_done_callback_waiting_on_its_own_pool_gets_an_error_instead_of_hanging(ex):
    """Done callbacks run on the thread that delivers the pool's results: a
    callback waiting there, without a timeout, for another of its results
    would wait forever (the standard library's executor hangs the same way).
    A wait with a timeout is bounded, and is left to run out."""
    seen = []
    event = threading.Event()

    def callback(fut):
        for wait in (
            lambda: ex.submit(square, 5).result(),
            lambda: ex.submit(square, 6).exception(),
            lambda: ex.submit(sleep_then, 1).result(timeout=0.1),
        ):
            try:
                seen.append(wait())
            except (RuntimeError, TimeoutError) as e:
                seen.append(type(e).__name__)
        event.set()

    ex.submit(square, 4).add_done_callback(callback)
    assert event.wait(30)
    assert seen == ["RuntimeError", "RuntimeError", "TimeoutError"]
    assert ex.submit(square, 7).result(timeout=30) == 49


def test_a_future_nobody_waited_on_gets_no_condition_lists_or_dict(ex):
    quiet = ex.submit(square, 3)
    assert wait_until(quiet.done)
    # Only the attributes a finished future needs: no condition, no waiter
    # or callback list (each allocated per future, they were most of its
    # memory, and what a burst of futures leaves scattered in the heap).
    assert quiet._lazy_condition is None
    assert quiet._lazy_waiters is None and quiet._lazy_callbacks is None
    assert "_waiters" not in vars(quiet) and "_done_callbacks" not in vars(quiet)
    assert quiet.result() == 9
    # Whoever waits gets them, and sees the outcome.
    waited = ex.submit(sleep_then, 0.2, "late")
    done, _ = cf.wait([waited], timeout=30)
    assert done == {waited} and waited._lazy_waiters == [] and waited._lazy_condition is not None
    assert waited.result() == "late"


def test_the_results_thread_trims_the_heap_once_at_the_end_of_a_burst(monkeypatch):
    from warden import _runner, _warden

    trims = []
    real = _warden.trim_heap
    monkeypatch.setattr(_warden, "trim_heap", lambda: trims.append(1) or real())
    monkeypatch.setattr(_runner, "TRIM_AFTER", 200)
    with warden.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(square, range(500))) == [x * x for x in range(500)]
        assert wait_until(lambda: len(trims) >= 1)
        burst = len(trims)
        assert burst <= 2  # not once per outcome
        # Tasks waited for one at a time are no burst, however many there are.
        monkeypatch.setattr(_runner, "TRIM_AFTER", 5)
        for i in range(30):
            assert ex.submit(square, i).result(timeout=30) == i * i
        assert len(trims) == burst


def test_warden_trim_heap_0_keeps_the_heap_as_it_is(monkeypatch):
    from warden import _runner, _warden

    trims = []
    monkeypatch.setattr(_warden, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(_runner, "TRIM_AFTER", 50)
    monkeypatch.setenv("WARDEN_TRIM_HEAP", "0")
    with warden.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(square, range(300))) == [x * x for x in range(300)]
    assert trims == []


def test_futures_work_with_asyncio_wrap_future(ex):
    async def main():
        ok = await asyncio.wrap_future(ex.submit(square, 5))
        with pytest.raises(ValueError, match="async"):
            await asyncio.wrap_future(ex.submit(fail, "async"))
        return ok

    assert asyncio.run(main()) == 25


# -- cancellation and shutdown ---------------------------------------------------


def test_cancel_succeeds_only_for_queued_tasks():
    with warden.ProcessPoolExecutor(1) as ex:
        running = ex.submit(sleep_then, 0.5, "ran")
        queued = ex.submit(square, 2)
        assert wait_until(lambda: running_in_pool(ex))
        assert queued.cancel() is True
        assert queued.cancelled() and queued.done()
        with pytest.raises(cf.CancelledError):
            queued.result()
        assert running.cancel() is False
        assert running.result() == "ran"
        done, _ = cf.wait([queued], timeout=5)
        assert queued in done


@pytest.mark.parametrize("which", ["sent ahead", "queued", "running"])
def test_when_cancel_returns_true_the_done_callbacks_have_run_in_the_cancelling_thread(which):
    """As in the standard library, ``cancel()`` runs the future's
    done-callbacks itself before it returns ``True``: for a task the worker
    holds ahead of time too, and for a running one (``running=True``), whose
    "cancelled" outcome the pool also sends to the results thread."""
    with warden.ProcessPoolExecutor(1) as ex:
        first = ex.submit(sleep_then, 0.5, "ran")
        later = [ex.submit(sleep_then, 0.5, i) for i in range(3)]
        assert wait_until(lambda: running_in_pool(ex))
        time.sleep(0.1)  # the worker has asked for the next one by now
        target = {"sent ahead": later[0], "queued": later[2], "running": first}[which]
        ran_in: list[str] = []
        target.add_done_callback(lambda f: ran_in.append(threading.current_thread().name))
        assert target.cancel(running=which == "running") is True
        assert ran_in == [threading.current_thread().name]
        time.sleep(0.2)
        assert ran_in == [threading.current_thread().name], "and only there, once"


def append_line(path, i):
    time.sleep(0.002)
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


@pytest.mark.parametrize("cancellers", [1, 2])
def test_a_future_cancelled_while_workers_take_tasks_never_runs_and_the_rest_run_once(tmp_path, cancellers):
    """Queued tasks are cancelled without waiting for the pool: whoever wins,
    the caller's cancel or a worker taking the task, a cancelled future's
    task never ran and every other ran exactly once."""
    path = str(tmp_path / "ran")
    with warden.ProcessPoolExecutor(2) as ex:
        fs = [ex.submit(append_line, path, i) for i in range(600)]
        fs[0].result(timeout=30)
        answers: dict[int, bool] = {}

        def cancel_every(k):
            for i in range(k, len(fs), cancellers):
                answers[i] = fs[i].cancel()
                if i % 7 == 0:
                    time.sleep(0.001)  # let the workers take some while this runs

        threads = [threading.Thread(target=cancel_every, args=(k,)) for k in range(cancellers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        _, not_done = cf.wait(fs, timeout=60)
        assert not not_done
    with open(path) as f:
        ran = [int(line) for line in f]
    assert len(ran) == len(set(ran)), "no task ran twice"
    cancelled = {i for i, yes in answers.items() if yes}
    assert cancelled, "some were still queued"
    assert cancelled.isdisjoint(ran)
    assert set(ran) == set(range(600)) - cancelled
    for i, f in enumerate(fs):
        if i in cancelled:
            assert f.cancelled()
            with pytest.raises(cf.CancelledError):
                f.result()
        else:
            assert f.result() == i


def running_in_pool(ex, n=1):
    """Whether at least ``n`` workers are running a task."""
    return sum(w.running_task is not None for w in ex._warden_runner.core.workers()) >= n


def test_a_task_is_known_by_one_id_in_python_and_in_the_core():
    """The id ``submit`` returns is the one the pool's snapshot shows the
    task running under, and the one its outcome comes back with."""
    with warden.ProcessPoolExecutor(1) as ex:
        assert ex.submit(square, 2).result(30) == 4
        runner = ex._warden_runner
        outcomes: list[tuple[bool, object]] = []
        done = threading.Event()

        def on_done(ok, data):
            outcomes.append((ok, data))
            done.set()

        task = runner.submit(pickle.dumps((sleep_then, (1.0, "slept"), {})), on_done)
        assert wait_until(lambda: [w.running_task for w in runner.core.workers()] == [task])
        assert done.wait(30)
        assert outcomes[0][0] is True and pickle.loads(outcomes[0][1]) == "slept"


def test_shutdown_cancel_futures_cancels_queued_and_finishes_running():
    ex = warden.ProcessPoolExecutor(1)
    running = ex.submit(sleep_then, 0.5, "ran")
    assert wait_until(lambda: running_in_pool(ex))
    queued = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "ran"
    assert all(f.cancelled() for f in queued)


def test_shutdown_wait_runs_queued_tasks_and_resolves_every_future():
    ex = warden.ProcessPoolExecutor(2)
    fs = [ex.submit(sleep_then, 0.05, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in fs] == list(range(6))
    assert ex._warden_runner.core.is_shut_down()


def test_shutdown_without_wait_returns_at_once_and_workers_still_finish():
    ex = warden.ProcessPoolExecutor(1)
    f = ex.submit(sleep_then, 0.5, "late")
    start = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - start < 0.3
    assert f.result(timeout=30) == "late"


def test_shutdown_before_any_task_starts_no_process():
    ex = warden.ProcessPoolExecutor(2)
    ex.shutdown()
    assert ex._warden_runner is None


# -- failures that stay with their task ---------------------------------------------


def test_worker_crash_fails_only_that_task_with_worker_crashed(ex):
    f = ex.submit(die_by_sigkill)
    with pytest.raises(warden.WorkerCrashed) as info:
        f.result()
    assert isinstance(info.value, BrokenProcessPool)
    assert info.value.signal == signal.SIGKILL
    assert info.value.exitcode == -signal.SIGKILL
    assert not alive(info.value.pid)
    assert ex.submit(square, 3).result() == 9


def test_worker_exiting_abruptly_gives_its_exit_code(ex):
    with pytest.raises(warden.WorkerCrashed) as info:
        ex.submit(exit_abruptly, 7).result()
    assert info.value.exitcode == 7 and info.value.signal is None
    assert ex.submit(square, 4).result() == 16


def test_a_timed_out_task_leaving_a_nested_executors_with_block_stops_that_executor_at_once(program):
    # Leaving the inner with block through the stop, shutdown(wait=True)
    # waited for the inner task: the worker's stop outlasted its half grace
    # (2.5 s), with warnings that the program was interrupted.
    prog = program(
        """
        import time, warden
        def leaf():
            time.sleep(60)
        def outer():
            with warden.ProcessPoolExecutor(1) as inner:
                inner.submit(leaf).result()
        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1, task_timeout=1) as ex:
                try:
                    ex.submit(outer).result(30)
                except warden.TaskTimeout:
                    print("timed out")
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0 and run.stdout.splitlines() == ["timed out"], run.stderr
    assert "still running" not in run.stderr and "dropped" not in run.stderr, run.stderr


@pytest.mark.parametrize("hook", ["warden's", "a program's in front"])
def test_a_stop_landing_where_the_interpreter_ignores_exceptions_still_stops_the_task(program, hook):
    # A weakref callback (the import system's module locks have them) that
    # the stop interrupts: the interpreter prints and drops the exception,
    # and the task ran on until the unwind grace (2.5 s) was out.
    prog = program(
        """
        import sys, time, weakref, warden
        class Thing:
            pass
        def callback(_):
            time.sleep(0.2)  # where the stop lands, nearly always
        def task(chain):
            if chain:  # an error reporter's hook, which hands on to the one before
                before = sys.unraisablehook
                sys.unraisablehook = lambda unraisable: before(unraisable)
            while True:
                thing = Thing()
                ref = weakref.ref(thing, callback)
                del thing
        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1, task_timeout=0.5) as ex:
                try:
                    ex.submit(task, sys.argv[1] == "chain").result(30)
                except warden.TaskTimeout:
                    print("timed out")
                print(ex.submit(abs, -3).result(30))
        """
    )
    run = prog.run(timeout=60, args=("chain" if hook != "warden's" else "alone",))
    assert run.returncode == 0 and run.stdout.splitlines() == ["timed out", "3"], run.stderr
    assert "Exception ignored" not in run.stderr and "still running" not in run.stderr, run.stderr


def test_a_stop_the_interpreter_clears_in_a_files_flush_is_raised_again_and_the_finalizer_runs_after_the_task(
    program,
):
    """``open(path, "w").write(...)``: the file, freed unclosed, is flushed as
    it goes, and a stop raised in that flush is an error the interpreter
    clears (outside its dev mode), reported nowhere. The task ran on as if
    never stopped (on 3.11, 39 stops of 100), until the unwind grace was out
    (2.5 s); then the finalizer ran on another thread beside it. The stop
    is now asked for again until the task unwinds: every finalizer runs on
    the main thread, once its task has stopped."""
    prog = program(
        """
        import os, random, sys, threading, warden
        def task(path):
            while True:
                open(path, "w").write("x" * 100)  # closed, and flushed, as it is freed
        def fin(path):
            print("finalizer on the main thread:", threading.current_thread() is threading.main_thread(),
                  file=open(path, "a"), flush=True)
        if __name__ == "__main__":
            out = os.path.abspath("finalizers.txt")
            ends = set()
            with warden.ProcessPoolExecutor(2, finalizer=fin, finalargs=(out,)) as ex:
                futures = [
                    ex.schedule(task, (os.path.abspath(f"data-{i % 2}"),), timeout=random.uniform(0.01, 0.2))
                    for i in range(40)
                ]
                for f in futures:
                    try:
                        f.result(timeout=60)
                        ends.add("returned")
                    except warden.TaskTimeout:
                        ends.add("timed out")
            print(sorted(ends))
            print(sorted(set(open(out).read().splitlines())))
        """
    )
    run = prog.run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["['timed out']", "['finalizer on the main thread: True']"], run.stderr
    assert "still running" not in run.stderr, run.stderr


def test_task_timeout_raises_a_timeout_error_and_replaces_the_worker():
    # The initializer imports this module in the worker, so the first task's
    # 0.5 s is not spent importing it on a loaded machine.
    with warden.ProcessPoolExecutor(1, task_timeout=0.5, initializer=getpid) as ex:
        pid = ex.submit(getpid).result()
        start = time.monotonic()
        with pytest.raises(warden.TaskTimeout) as info:
            ex.submit(sleep_then, 30).result()
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - start < 10
        assert ex.submit(getpid).result() != pid


def test_schedule_stops_its_own_task_at_its_timeout_and_the_other_tasks_run_on(tmp_path):
    # pebble's ProcessPool.schedule(fn, args, kwargs, timeout): a limit of the
    # task's own, in a pool that has none.
    out = tmp_path / "fin"
    with warden.ProcessPoolExecutor(2, initializer=getpid, finalizer=record, finalargs=(out, "fin")) as ex:
        ex.submit(getpid).result()
        pids = set(ex._processes)
        slow = ex.schedule(sleep_then, (30, "never"), timeout=0.5)
        other = ex.schedule(function=add, args=[2], kwargs={"b": 3})  # pebble's keywords
        start = time.monotonic()
        with pytest.raises(warden.TaskTimeout) as info:
            slow.result(timeout=30)
        assert isinstance(info.value, TimeoutError) and info.value.timeout == 0.5
        assert time.monotonic() - start < 10
        assert other.result(timeout=30) == 5
        assert ex.schedule(sleep_then, (1.0, "no limit")).result(timeout=30) == "no limit"
        # The stopped worker ran its finalizer; its replacement serves.
        stopped = [int(line.split()[1]) for line in out.read_text().splitlines()]
        assert len(stopped) == 1 and stopped[0] in pids
        assert stopped[0] not in ex._processes and len(ex._processes) == 2


def test_a_scheduled_timeout_takes_the_place_of_the_pool_task_timeout_for_its_task():
    with warden.ProcessPoolExecutor(1, task_timeout=0.5, initializer=getpid) as ex:
        assert ex.schedule(sleep_then, (1.5, "done"), timeout=30).result(timeout=30) == "done"
        with pytest.raises(warden.TaskTimeout):
            ex.schedule(sleep_then, (30,)).result(timeout=30)  # no timeout of its own: the pool's


@pytest.mark.parametrize(
    "value, error, words",
    [
        (0, ValueError, "timeout must be a positive number"),
        (-1, ValueError, "timeout must be a positive number"),
        (float("nan"), ValueError, "timeout must be a positive number"),
        ("1", TypeError, "timeout must be a number of seconds"),
        (True, TypeError, "timeout must be a number of seconds"),
    ],
)
def test_schedule_refuses_a_bad_timeout_and_queues_nothing(tmp_path, value, error, words):
    ran = tmp_path / "ran"
    with warden.ProcessPoolExecutor(1) as ex:
        with pytest.raises(error, match=words):
            ex.schedule(record, (ran,), timeout=value)
        # One worker, tasks in order: had it been queued, it would have run by now.
        assert ex.submit(square, 3).result(timeout=30) == 9
    assert not ran.exists()


def test_base_exception_in_a_task_is_a_clear_error_and_the_worker_lives_on(ex):
    pid = ex.submit(getpid).result()
    for fn, arg in ((raise_system_exit, 3), (raise_keyboard_interrupt, None)):
        f = ex.submit(fn, arg) if arg is not None else ex.submit(fn)
        with pytest.raises(warden.TaskAborted) as info:
            f.result(timeout=30)
        assert info.value.type_name in ("SystemExit", "KeyboardInterrupt")
    assert pid in ex._processes  # the same worker, not a replacement


def raise_task_interrupted():
    raise warden.TaskInterrupted("the task's own reason")


def test_a_task_raising_task_interrupted_itself_is_reported_as_its_own_and_the_worker_lives_on(ex):
    """No stop was asked: the exception is the task's own (a ``BaseException``
    that is not an ``Exception``, so ``TaskAborted`` naming it), not a stop's."""
    deadline = time.monotonic() + 60
    while len(ex._processes) < 2 and time.monotonic() < deadline:
        ex.submit(getpid).result(timeout=60)
    workers = set(ex._processes)
    assert len(workers) == 2
    with pytest.raises(warden.TaskAborted) as info:
        ex.submit(raise_task_interrupted).result(timeout=60)
    assert info.value.type_name.endswith("TaskInterrupted")
    assert info.value.message == "the task's own reason"
    assert set(ex.map(getpid, range(4))) <= workers
    assert set(ex._processes) == workers  # no worker was replaced


class RebuiltAsKeyboardInterrupt(Exception):
    """An exception whose pickle makes a KeyboardInterrupt."""

    def __reduce__(self):
        return (KeyboardInterrupt, ("made by unpickling",))


def raise_rebuilt_as_keyboard_interrupt():
    raise RebuiltAsKeyboardInterrupt("the task's error")


class RebuiltAsSystemExit(Exception):
    def __reduce__(self):
        return (SystemExit, (4,))


def raise_rebuilt_as_system_exit():
    raise RebuiltAsSystemExit("the task's error")


def _raise_keyboard_interrupt_when_rebuilt():
    raise KeyboardInterrupt("raised while unpickling")


class FailsToRebuildWithKeyboardInterrupt(Exception):
    def __reduce__(self):
        return (_raise_keyboard_interrupt_when_rebuilt, ())


def raise_fails_to_rebuild():
    raise FailsToRebuildWithKeyboardInterrupt("the real error")


def test_an_exception_whose_pickle_makes_keyboard_interrupt_or_system_exit_stops_neither_pool_nor_caller():
    with warden.ProcessPoolExecutor(2) as ex:
        for task, made in (
            (raise_rebuilt_as_keyboard_interrupt, "KeyboardInterrupt"),
            (raise_rebuilt_as_system_exit, "SystemExit"),
        ):
            failing = ex.submit(task)
            others = [ex.submit(sleep_then, 0.2, i) for i in range(6)]
            with pytest.raises(warden.TaskAborted, match=f"whose pickle makes {made}") as info:
                failing.result(timeout=60)
            assert info.value.message == "the task's error"
            assert [f.result(timeout=60) for f in others] == list(range(6))
            assert ex.submit(square, 3).result(timeout=60) == 9


class RebuiltAsANumber(Exception):
    def __reduce__(self):
        return (int, ("5",))


def raise_rebuilt_as_a_number():
    raise RebuiltAsANumber("odd")


class NotesThatRaise(Exception):
    @property
    def __notes__(self):
        raise RuntimeError("reading the notes failed")


def raise_with_notes_that_raise():
    raise NotesThatRaise("the original message")


def test_an_exception_whose_pickle_makes_no_exception_is_a_remote_error_naming_the_tasks_own(ex):
    with pytest.raises(warden.RemoteError) as info:
        ex.submit(raise_rebuilt_as_a_number).result(timeout=60)
    assert info.value.type_name.endswith("RebuiltAsANumber")
    assert info.value.message == "odd"
    assert "its pickle makes 5, not an exception" in str(info.value)
    assert ex.submit(square, 3).result(timeout=60) == 9


def test_an_exception_whose_traceback_cannot_be_formatted_still_comes_back_as_itself(ex):
    # Caught by hand: no traceback of this exception can be formatted here either.
    caught = None
    try:
        ex.submit(raise_with_notes_that_raise).result(timeout=60)
    except NotesThatRaise as e:
        caught = (str(e), str(e.__cause__))
    assert caught is not None
    assert caught[0] == "the original message"
    # Said by warden's worker before Python 3.13, by the traceback module since.
    assert "reading the notes failed" in caught[1]
    assert ex.submit(square, 3).result(timeout=60) == 9


def test_an_exception_whose_unpickling_raises_keyboard_interrupt_is_reported_with_the_tasks_own_error(ex):
    with pytest.raises(warden.RemoteError) as info:
        ex.submit(raise_fails_to_rebuild).result(timeout=60)
    text = str(info.value)
    assert "FailsToRebuildWithKeyboardInterrupt: the real error" in text
    assert "KeyboardInterrupt: raised while unpickling" in text
    assert 'raise FailsToRebuildWithKeyboardInterrupt("the real error")' in str(info.value.__cause__)
    assert ex.submit(square, 4).result(timeout=60) == 16


def test_unpicklable_result_is_a_clear_error(ex):
    with pytest.raises(pickle.PicklingError, match="cannot pickle the task's result"):
        ex.submit(return_lock).result(timeout=30)
    assert ex.submit(square, 2).result() == 4


class HugeAndUnpicklable:
    """A result that cannot be pickled and whose repr is over the frame
    limit (a list of thirty million rows with a lock at its end)."""

    def __repr__(self):
        return "row" * 100_000_000

    def __reduce__(self):
        # ... and the pickler's own message says so at length.
        raise TypeError("cannot pickle '_thread.lock' object in " + "row" * 100_000_000)


def return_huge_and_unpicklable():
    return HugeAndUnpicklable()


def test_a_result_too_big_to_repr_within_the_frame_limit_is_still_a_pickling_error(ex):
    with pytest.raises(
        pickle.PicklingError, match="cannot pickle the task's result of type HugeAndUnpicklable"
    ):
        ex.submit(return_huge_and_unpicklable).result(timeout=60)
    assert ex.submit(square, 2).result() == 4


def test_a_pools_maybe_encoding_error_keeps_the_start_of_a_huge_results_repr():
    with warden.Pool(1) as pool:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
            pool.apply(return_huge_and_unpicklable)
        assert info.value.value.startswith("rowrowrow")
        assert info.value.value.endswith("more characters not sent]")
        assert len(info.value.value) < 2 << 20
        assert len(info.value.exc) < 2 << 20
        assert pool.apply(square, (3,)) == 9


class ExitsWhenUnpickled:
    """A result whose unpickling (in the parent) raises SystemExit."""

    def __reduce__(self):
        return (sys.exit, (1,))


def return_exits_when_unpickled():
    return ExitsWhenUnpickled()


def test_a_result_whose_unpickling_raises_system_exit_fails_only_its_task(ex):
    with pytest.raises(Exception, match="cannot unpickle the task's result") as info:
        ex.submit(return_exits_when_unpickled).result(timeout=30)
    assert "SystemExit" in repr(info.value) or "SystemExit" in str(info.value.__cause__)
    # The results thread lives on: later tasks, and the same pool's map, finish.
    assert ex.submit(square, 2).result(timeout=30) == 4
    assert list(ex.map(square, range(5), timeout=30)) == [0, 1, 4, 9, 16]


class FailsWhenUnpickled:
    def __init__(self):
        self.state = 1

    def __setstate__(self, state):
        raise ValueError("setstate refused")


FAILS_WHEN_UNPICKLED_LINE = FailsWhenUnpickled.__setstate__.__code__.co_firstlineno + 1


def return_fails_when_unpickled():
    return FailsWhenUnpickled()


def test_a_result_that_cannot_be_unpickled_says_so_and_is_not_taken_for_the_tasks_own_error(ex):
    with pytest.raises(ValueError, match="setstate refused") as info:
        ex.submit(return_fails_when_unpickled).result(timeout=30)
    assert info.value.__notes__ == ["(raised in this process: cannot unpickle the task's result)"]
    assert ex.submit(square, 2).result(timeout=30) == 4


def fails_when_unpickled_by_each_way_a_result_comes(how):
    """The error the caller gets when the ``FailsWhenUnpickled`` a task
    returned cannot be unpickled, through ``how``."""
    if how.startswith("executor"):
        with warden.ProcessPoolExecutor(1) as executor:
            if how == "executor.run":
                return asyncio.run(_awaited(executor.run(return_fails_when_unpickled)))
            return executor.submit(return_fails_when_unpickled).exception(timeout=30)
    with warden.Pool(1) as pool:
        try:
            if how == "Pool.apply":
                pool.apply(return_fails_when_unpickled)
            elif how == "Pool.map":
                pool.map(call_it, [return_fails_when_unpickled] * 2, chunksize=2)
            elif how == "Pool.imap":
                list(pool.imap(call_it, [return_fails_when_unpickled] * 2, chunksize=2))
            else:
                return asyncio.run(_awaited(pool.run(return_fails_when_unpickled)))
        except ValueError as e:
            return e
    return None


async def _awaited(coroutine):
    try:
        await coroutine
    except ValueError as e:
        return e
    return None


def call_it(fn):
    return fn()


@pytest.mark.parametrize(
    "how", ["executor.submit", "executor.run", "Pool.apply", "Pool.map", "Pool.imap", "Pool.run"]
)
def test_a_result_that_cannot_be_unpickled_shows_where_its_unpickling_raised(how):
    # The error was rebuilt with no traceback text: what the caller saw had
    # only warden's frames, not the __setstate__ that raised.
    error = fails_when_unpickled_by_each_way_a_result_comes(how)
    assert isinstance(error, ValueError), error
    assert error.__notes__[0].startswith("(raised in this process: cannot unpickle")
    shown = "".join(traceback.format_exception(error))
    assert f'File "{__file__}", line {FAILS_WHEN_UNPICKLED_LINE}, in __setstate__' in shown, shown
    assert 'raise ValueError("setstate refused")' in shown, shown
    assert isinstance(error.__cause__, (cf.process._RemoteTraceback, multiprocessing.pool.RemoteTraceback))


class Unprintable(Exception):
    """An error whose ``__str__`` itself fails (with ``what``)."""

    def __init__(self, message, what=RuntimeError):
        super().__init__(message, what)
        self.what = what

    def __str__(self):
        raise self.what("no text for this error")


def raise_unprintable():
    raise Unprintable("cannot rebuild")


class RebuiltByRaising:
    """A result whose unpickling, in the parent, calls ``raising``."""

    def __init__(self, raising):
        self.raising = raising

    def __reduce__(self):
        return (self.raising, ())


def return_rebuilt_by_raising(raising):
    return RebuiltByRaising(raising)


def raise_unprintable_with(what):
    raise Unprintable("the task's own", what)


class UnpicklableAndUnprintable:
    def __reduce__(self):
        raise TypeError("cannot pickle UnpicklableAndUnprintable")

    def __repr__(self):
        raise SystemExit(4)


def return_unpicklable_and_unprintable():
    return UnpicklableAndUnprintable()


def test_a_result_whose_unpickling_raises_an_error_that_cannot_be_printed_still_fails_its_future(ex):
    # The results thread made the error's text with str(), which raised: the
    # future was never finished, and result() waited for ever.
    others = [ex.submit(sleep_then, 0.1, i) for i in range(4)]
    with pytest.raises(Unprintable):
        ex.submit(return_rebuilt_by_raising, raise_unprintable).result(timeout=60)
    assert [f.result(timeout=60) for f in others] == list(range(4))
    assert ex.submit(square, 3).result(timeout=60) == 9


@pytest.mark.parametrize("what", [RuntimeError, SystemExit, KeyboardInterrupt])
def test_a_task_error_whose_str_raises_even_system_exit_comes_back_as_itself(ex, what):
    # The worker's own text of the error let a BaseException from __str__
    # through: the caller got a RemoteError saying "SystemExit: ...", which
    # the task never raised. The standard library gives the task's error.
    with pytest.raises(Unprintable) as info:
        ex.submit(raise_unprintable_with, what).result(timeout=60)
    assert info.value.what is what
    assert ex.submit(square, 3).result(timeout=60) == 9


def test_an_unpicklable_result_whose_repr_raises_system_exit_is_still_a_pickling_error(ex):
    with pytest.raises(pickle.PicklingError, match="cannot pickle UnpicklableAndUnprintable"):
        ex.submit(return_unpicklable_and_unprintable).result(timeout=60)
    assert ex.submit(square, 3).result(timeout=60) == 9


class RefusesToBePickled(Exception):
    def __reduce__(self):
        raise SystemExit("no pickle for this error")


def raise_refuses_to_be_pickled():
    raise RefusesToBePickled("cannot rebuild")


def test_a_result_whose_unpickling_raises_an_error_whose_pickling_raises_system_exit_fails_its_future(ex):
    # The results thread pickles the error to hand it on: a SystemExit from
    # that went through, and the future stayed pending for ever.
    with pytest.raises(warden.RemoteError, match="cannot unpickle the task's result: RefusesToBePickled"):
        ex.submit(return_rebuilt_by_raising, raise_refuses_to_be_pickled).result(timeout=60)
    assert ex.submit(square, 3).result(timeout=60) == 9


class PicklesWithAnUnprintableError:
    def __reduce__(self):
        raise Unprintable("cannot pickle this", SystemExit)


def test_an_argument_whose_pickling_raises_an_error_that_cannot_be_printed_raises_that_error_at_submit(ex):
    # Noting why cloudpickle failed too read the error's text: the
    # SystemExit of its __str__ came out of submit().
    with pytest.raises(Unprintable):
        ex.submit(square, PicklesWithAnUnprintableError())
    assert ex.submit(square, 3).result(timeout=60) == 9


class NotesThatExit(Exception):
    @property
    def __notes__(self):
        raise SystemExit("reading the notes ended the worker's formatting")


def raise_with_notes_that_exit():
    raise NotesThatExit("the original message")


def test_a_task_error_whose_notes_raise_system_exit_still_comes_back_as_itself(ex):
    caught = None
    try:
        ex.submit(raise_with_notes_that_exit).result(timeout=60)
    except NotesThatExit as e:
        caught = str(e)
    assert caught == "the original message"
    assert ex.submit(square, 3).result(timeout=60) == 9


def test_a_done_callback_raising_system_exit_does_not_stop_other_futures(ex):
    f = ex.submit(sleep_then, 0.2, 1)
    f.add_done_callback(lambda _: sys.exit(1))
    assert f.result(timeout=30) == 1
    assert ex.submit(square, 3).result(timeout=30) == 9


def test_exception_that_cannot_be_unpickled_is_a_remote_error(ex):
    with pytest.raises(warden.RemoteError) as info:
        ex.submit(raise_needs_two_args).result(timeout=30)
    assert info.value.type_name.endswith("NeedsTwoArgs")
    assert "1-2" in str(info.value)
    assert "could not be rebuilt from its pickle" in str(info.value)
    assert info.value.__cause__ is not None


def test_exception_that_cannot_be_pickled_is_a_remote_error(ex):
    with pytest.raises(warden.RemoteError, match="holds a lock") as info:
        ex.submit(raise_unpicklable).result(timeout=30)
    assert "could not be pickled" in str(info.value)


def test_unpicklable_argument_raises_at_submit_and_the_pool_is_unaffected(ex):
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock'"):
        ex.submit(square, threading.Lock())
    assert ex.submit(square, 5).result() == 25


def test_a_lambda_holding_what_cannot_be_pickled_is_refused_naming_that_object(ex):
    # Not the lambda, which cloudpickle sends: the lock it captured.
    lock = threading.Lock()
    # The standard library's type for a lambda it refuses (what `except` clauses name).
    refused = (pickle.PicklingError, AttributeError)
    with pytest.raises(refused, match="cannot pickle '_thread.lock' object") as info:
        ex.submit(lambda x: (lock, x)[1], 1)
    assert "by reference" in " ".join(info.value.__notes__)
    with warden.Pool(1) as pool, pytest.raises(refused, match="_thread.lock"):
        pool.map(lambda x: (lock, x)[1], [1])
    assert ex.submit(square, 4).result(60) == 16


def test_lambdas_and_closures_are_pickled_by_value(ex):
    k = 3
    assert ex.submit(lambda x: x + k, 4).result() == 7

    def local(x):
        return x * k

    assert list(ex.map(local, [1, 2])) == [3, 6]


# -- lifecycle hooks -------------------------------------------------------------


def record(path, *words):
    with open(path, "a") as f:
        f.write(" ".join(str(w) for w in (*words, os.getpid())) + "\n")


def test_processes_lists_the_workers_serving_not_one_still_in_its_exit_path():
    # As the standard library's: at most max_workers, the retired one gone.
    with warden.ProcessPoolExecutor(1, max_tasks_per_child=1, finalizer=time.sleep, finalargs=(3,)) as ex:
        first = ex.submit(getpid).result(timeout=60)
        second = ex.submit(getpid).result(timeout=60)
        assert first != second
        assert alive(first)  # still in its finalizer
        # The second worker retires after its one task too: wait for the
        # one that replaces it (never more than max_workers listed).
        assert wait_until(lambda: len(ex._processes) == 1, timeout=30), ex._processes
        assert first not in ex._processes


def test_max_tasks_per_child_replaces_workers(tmp_path):
    out = tmp_path / "log"
    with warden.ProcessPoolExecutor(1, max_tasks_per_child=2, finalizer=record, finalargs=(out, "fin")) as ex:
        pids = [ex.submit(getpid).result() for _ in range(6)]
    assert len(set(pids)) == 3
    fins = [int(line.split()[1]) for line in out.read_text().splitlines()]
    # Each worker's finalizer runs once; so does that of the replacement
    # started as the third worker retired, if it was started before shutdown.
    assert len(fins) == len(set(fins)) and set(pids) <= set(fins) and len(fins) <= 4


def record_time(path, word):
    with open(path, "a") as f:
        f.write(f"{word} {os.getpid()} {time.time()}\n")


def record_time_slowly(path, word):
    time.sleep(1)  # a finalizer closing connections
    record_time(path, word)


def most_at_once(path):
    """The most workers alive at one time, from each one's first and last
    recorded times (each inside its process's life: the true count is at
    least this)."""
    first, last = {}, {}
    for line in path.read_text().splitlines():
        _, pid, at = line.split()
        first.setdefault(pid, float(at))
        last[pid] = float(at)
    edges = sorted([(first[pid], 1) for pid in first] + [(last[pid], -1) for pid in first])
    alive = most = 0
    for _, step in edges:
        alive += step
        most = max(most, alive)
    return most, len(first)


@pytest.mark.parametrize("kind", ["recycled", "timed-out"])
def test_workers_in_a_slow_exit_path_never_make_the_pool_more_than_twice_its_size(tmp_path, kind):
    """Each worker leaving (recycled after its task, or stopped at its
    task's timeout) runs a finalizer that takes a second; its replacement
    starts beside it, unless the pool has twice its size of workers already,
    so that they cannot pile up without bound."""
    out = tmp_path / "log"
    hooks = {
        "initializer": record_time,
        "initargs": (out, "init"),
        "finalizer": record_time_slowly,
        "finalargs": (out, "fin"),
    }
    if kind == "recycled":
        with warden.ProcessPoolExecutor(2, max_tasks_per_child=1, **hooks) as ex:
            assert len(set(ex.map(getpid, range(12)))) == 12
    else:
        with warden.ProcessPoolExecutor(2, task_timeout=0.2, **hooks) as ex:
            for f in [ex.submit(time.sleep, 30) for _ in range(8)]:
                with pytest.raises(warden.TaskTimeout):
                    f.result(timeout=120)
    most, workers = most_at_once(out)
    assert workers >= 8
    assert most <= 4, f"{most} workers alive at once in a pool of 2"


def wait_for_lines(path, prefix, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(line.startswith(prefix) for line in path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.01)
    return False


def test_initializer_and_finalizer_run_in_every_worker(tmp_path):
    out = tmp_path / "log"
    with warden.ProcessPoolExecutor(
        2, initializer=record, initargs=(out, "init"), finalizer=record, finalargs=(out, "fin")
    ) as ex:
        # Each task waits until both workers have run their initializer.
        list(ex.map(wait_for_lines, [out] * 4, ["init"] * 4, [2] * 4))
    lines = out.read_text().splitlines()
    inits = {line.split()[1] for line in lines if line.startswith("init")}
    fins = {line.split()[1] for line in lines if line.startswith("fin")}
    assert len(inits) == 2 and inits == fins


def test_a_failing_initializer_breaks_the_executor_at_its_first_failure_and_names_it():
    # concurrent.futures: "If the initializer raises an exception, all
    # currently pending jobs will raise a BrokenProcessPool, as well as any
    # attempt to submit more jobs to the pool." No second worker is tried,
    # whatever the restart limit.
    ex = warden.ProcessPoolExecutor(1, initializer=fail, initargs=("no init",), restart_limit=(3, 300.0))
    f = ex.submit(square, 2)
    with pytest.raises(warden.PoolFailed, match="start hook failed: .*no init") as raised:
        f.result(timeout=60)
    assert "restart limit" not in str(raised.value)
    with pytest.raises(warden.PoolFailed):
        ex.submit(square, 2)
    ex.shutdown()


def record_then_exit(out, code):
    record(out, "init")
    os._exit(code)  # as a crash in an extension the initializer loads would end it


@pytest.mark.parametrize("start", ["zygote", "exec"])
def test_an_initializer_that_ends_its_worker_breaks_the_executor_at_the_first_death_and_says_so(
    tmp_path, start
):
    """The standard library's executor breaks when a worker dies; a worker
    that dies in its initializer (a segfault, ``os._exit``) is no different
    from one whose initializer raises: the executor breaks at once, rather
    than starting the initializer again up to the restart limit."""
    out = tmp_path / "log"
    ex = warden.ProcessPoolExecutor(1, initializer=record_then_exit, initargs=(out, 4), start=start)
    try:
        with pytest.raises(BrokenProcessPool) as raised:
            ex.submit(square, 2).result(timeout=60)
        assert "died in its start hook: it ended with exit code 4" in str(raised.value)
        assert "restart limit" not in str(raised.value)
        assert len(out.read_text().splitlines()) == 1, "the initializer ran once"
    finally:
        ex.shutdown()


def initializer_raising_task_interrupted():
    raise warden.TaskInterrupted("the initializer's own reason")


def test_an_initializer_raising_task_interrupted_itself_is_named_as_its_failure():
    """No stop was asked: the exception is the initializer's own, named as a
    ``ValueError`` there would be, not taken for a stop."""
    failed = "start hook failed: .*TaskInterrupted: the initializer's own"
    with (
        warden.ProcessPoolExecutor(1, initializer=initializer_raising_task_interrupted) as ex,
        pytest.raises(warden.PoolFailed, match=failed),
    ):
        ex.submit(square, 2).result(timeout=60)


INIT_NOT_UTF8 = """
import warden

def fail(message):
    raise ValueError(message)

if __name__ == "__main__":
    name = b"caf\\xe9".decode("utf-8", "surrogateescape")
    ex = warden.ProcessPoolExecutor(1, initializer=fail, initargs=(name,))
    try:
        ex.submit(abs, 2).result(timeout=60)
    except warden.PoolFailed as e:
        print(type(e).__name__, ascii(str(e).split("start hook failed: ", 1)[1]))
    ex.shutdown()
"""


def test_an_initializer_failure_whose_text_is_not_utf8_is_named(program):
    # Run apart: the worker's log of the failure, forwarded to this process,
    # carries the surrogate, which pytest-xdist cannot send between its processes.
    run = program(INIT_NOT_UTF8).run()
    assert run.returncode == 0, run.stderr
    assert run.lines == ["PoolFailed 'ValueError: caf\\\\udce9'"]


def pidfds() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += "pidfd" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd
            pass
    return found


def test_pools_that_shut_down_hold_no_pidfd_though_their_futures_and_worker_views_are_kept():
    # A look at the workers (an executor's _processes, active_children())
    # made views holding pidfds; kept futures kept them open once the pool
    # was gone, one per worker of every pool.
    before = pidfds()
    kept = []
    for _ in range(3):
        with warden.ProcessPoolExecutor(2) as ex:
            futures = [ex.submit(square, i) for i in range(4)]
            assert [f.result(timeout=60) for f in futures] == [0, 1, 4, 9]
            views = list(ex._processes.values()) + list(multiprocessing.active_children())
            assert views and all(v.is_alive() for v in views)
            kept += [*futures, *views]
    gc.collect()
    assert pidfds() == before
    assert all(not v.is_alive() and v.exitcode is not None for v in views)


def test_executor_pickles_into_an_inert_handle(ex):
    handle = pickle.loads(pickle.dumps(ex))
    assert isinstance(handle, warden.PoolHandle)
    assert handle.owner_pid == os.getpid() and handle.max_workers == 2
    with pytest.raises(RuntimeError, match="inert handle"):
        handle.submit(square, 1)
    assert ex.submit(_handle_in_worker, ex).result() == "ProcessPoolExecutor"


def _handle_in_worker(handle):
    return handle.kind


def test_a_future_or_pool_result_passed_to_a_task_is_refused_naming_it_and_nothing_is_lost(ex):
    # The standard library's errors name a lock ("cannot pickle '_thread.RLock'
    # object"); warden's used to name its core.
    done = ex.submit(square, 2)
    assert done.result(60) == 4
    with pytest.raises(TypeError, match=r"cannot pickle 'Future' object: .*pass its result\(\)"):
        ex.submit(square, done)
    with warden.Pool(1) as pool:
        pending = pool.apply_async(square, (3,))
        with pytest.raises(TypeError, match=r"cannot pickle 'ApplyResult' object: .*get\(\)"):
            pool.apply(square, (pending,))
        with pytest.raises(TypeError, match="cannot pickle 'IMapIterator' object"):
            pool.apply(square, (pool.imap(square, [1]),))
        assert pending.get(60) == 9 and pool.apply(square, (4,)) == 16
        # A copy in this process is fine, as the standard library's.
        assert copy.copy(pending).get(60) == 9 and list(copy.copy(pool.imap(square, [2]))) == [4]
    assert copy.copy(done).result(60) == 4
    assert ex.submit(square, 5).result(60) == 25


def test_a_copy_of_a_pending_result_or_future_is_the_same_task_and_completes_with_it(ex):
    """``copy.copy()`` of a pending pool result, ``imap`` iterator or future
    is the object itself, as the only thing a copy could be is another way
    to wait for the same task. It used to copy the attributes of the moment,
    and never completed (``get()`` waited for ever); a copy sharing them
    completed, but ``wait()`` and ``as_completed()`` given it were told of
    the original, and an ``imap`` whose original was dropped stopped feeding."""
    with warden.Pool(1) as pool:
        # The worker is held while the copies are made: each is of a pending one.
        blocker = pool.apply_async(sleep_then, (0.5,))
        pending = [
            pool.map_async(square, range(3)),
            pool.starmap_async(square, [(1,), (2,)]),
            pool.apply_async(square, (3,)),
        ]
        copies = [copy.copy(r) for r in pending]
        assert not any(c.ready() for c in copies)
        lazy = copy.copy(pool.imap(square, range(10)))  # the original dropped at once
        gc.collect()
        future = ex.submit(sleep_then, 0.5, 7)
        future_copy = copy.copy(future)
        del future
        assert not future_copy.done()
        assert [c.get(60) for c in copies] == [[0, 1, 4], [1, 4], 9]
        assert all(c.successful() for c in copies) and blocker.get(60) is None
        assert list(lazy) == [x * x for x in range(10)]
    done, _ = cf.wait([future_copy], timeout=60)
    assert done == {future_copy}
    assert [f.result() for f in cf.as_completed([future_copy], timeout=60)] == [7]


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_copying_a_pool_or_executor_is_refused_at_once(ex, how):
    # A copy used to be an inert handle that failed later, naming this very
    # process as the pool's owner.
    with pytest.raises(TypeError, match="cannot copy ProcessPoolExecutor"):
        how(ex)
    with warden.Pool(1) as pool, pytest.raises(NotImplementedError, match="pool objects cannot be copied"):
        how(pool)
    # (Spawn: a fork of this multi-threaded test process warns, from 3.12.)
    with multiprocessing.get_context("spawn").Pool(1) as pool, pytest.raises(NotImplementedError):
        how(pool)  # the standard library's error
    assert ex.submit(square, 3).result(60) == 9


def test_terminate_workers_stops_running_tasks_and_runs_finalizers(tmp_path):
    out = tmp_path / "log"
    ex = warden.ProcessPoolExecutor(2, finalizer=record, finalargs=(out, "fin"))
    fs = [ex.submit(sleep_then, 30) for _ in range(3)]
    assert wait_until(lambda: running_in_pool(ex, 2))
    start = time.monotonic()
    ex.terminate_workers()
    assert time.monotonic() - start < 5
    assert all(f.cancelled() for f in fs)
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_kill_workers_kills_at_once_without_finalizers(tmp_path):
    out = tmp_path / "log"
    ex = warden.ProcessPoolExecutor(1, finalizer=record, finalargs=(out, "fin"))
    f = ex.submit(sleep_then, 30)
    assert wait_until(lambda: running_in_pool(ex))
    ex.kill_workers()
    assert f.cancelled()
    assert not out.exists()


def test_an_unreachable_executor_shuts_down_on_its_own():
    ex = warden.ProcessPoolExecutor(1)
    future = ex.submit(getpid)
    pid = future.result()
    core = ex._warden_runner.core
    del ex
    gc.collect()
    assert core.join(30)
    assert not alive(pid)


AFTER_MAIN = """
import atexit, sys, threading, time
import concurrent.futures as cf, multiprocessing
import warden

def work(i):
    return i * 10

def later(ex, who):
    try:
        print(who, ex.submit(work, 1).result(timeout=60), flush=True)
    except RuntimeError as e:
        print(who, "RuntimeError:", e, flush=True)

def in_a_thread(ex):
    time.sleep(0.3)
    later(ex, "thread")

if __name__ == "__main__":
    spawn = multiprocessing.get_context("spawn")
    if sys.argv[1] == "warden":
        ex = warden.ProcessPoolExecutor(1)
    else:
        ex = cf.ProcessPoolExecutor(1, mp_context=spawn)
    pending = ex.submit(work, 0)
    if sys.argv[2] == "thread":
        threading.Thread(target=in_a_thread, args=(ex,)).start()
    else:
        atexit.register(later, ex, "atexit")
    atexit.register(lambda: print("pending", pending.result(timeout=60), flush=True))
    print("main returns", flush=True)
"""


@pytest.mark.parametrize("where", ["thread", "atexit"])
def test_once_the_main_thread_returns_an_executor_refuses_new_work_and_runs_what_it_has(program, where):
    prog = program(AFTER_MAIN)
    runs = {}
    for which in ("std", "warden"):
        run = prog.run(timeout=120, args=(which, where))
        assert run.returncode == 0, run.stderr
        runs[which] = run.stdout.splitlines()
    assert runs["warden"] == runs["std"]
    assert f"{where} RuntimeError: cannot schedule new futures after shutdown" in runs["std"]


FROZEN_APPLICATION = """
import os, sys
import warden

def f(x):
    return x

if __name__ == "__main__":
    sys.frozen = True  # as PyInstaller and cx_Freeze set it: sys.executable is the application
    fds = len(os.listdir("/proc/self/fd"))
    starts = {
        "executor": lambda: warden.ProcessPoolExecutor(1).submit(f, 1).result(),
        "pool": lambda: warden.Pool(1),
        "process": lambda: warden.Process(target=f, args=(bytearray(1 << 20),)).start(),
    }
    for name, start in starts.items():
        try:
            start()
            print(name, "started")
        except RuntimeError as e:
            print(name, "refused", "frozen application" in str(e))
    children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print("children", len(children), "fds", len(os.listdir("/proc/self/fd")) - fds)
"""


def test_a_frozen_application_is_refused_workers_with_a_clear_error(program):
    """In a frozen application ``sys.executable`` is the application: a
    worker started as ``python -m warden._worker`` would start the
    application again, whose own pools would start it again. Each way to
    start workers raises ``RuntimeError`` instead, starting nothing and
    keeping no descriptor."""
    run = program(FROZEN_APPLICATION).run()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "executor refused True",
        "pool refused True",
        "process refused True",
        "children 0 fds 0",
    ], run.stderr


WARDEN_PUT_ON_SYS_PATH = """
import os, sys
sys.path.insert(0, sys.argv[1])  # where this program keeps its copy of warden
import warden

def task(x):
    return x * 2, os.environ.get("PYTHONPATH"), warden.__file__.startswith(sys.argv[1])

if __name__ == "__main__":
    if sys.argv[2] == "without":
        os.environ.pop("PYTHONPATH", None)
    with warden.ProcessPoolExecutor(1) as ex:
        print("executor", ex.submit(task, 21).result(60))
    with warden.Pool(1) as pool:
        print("pool", pool.apply(task, (21,)))
    p = warden.Process(target=print, args=("process", task(21)), kwargs={"flush": True})
    p.start()
    p.join(60)
    print("exit code", p.exitcode)
"""


@pytest.mark.parametrize("pythonpath", ["without", "with"])
def test_warden_that_the_program_put_on_sys_path_itself_starts_workers(program, tmp_path, pythonpath):
    """A program that keeps warden in a directory of its own and puts it on
    ``sys.path`` as it starts (run here under ``-S``, so that no installed
    warden is found): each worker's interpreter, run as ``python -m
    warden._worker``, could not import warden, and the pool failed after
    eleven failed starts. The worker's ``PYTHONPATH`` gets warden's
    directory in front, and is set back (the program's own, or none) before
    a task runs."""
    import shutil

    lib = tmp_path / "vendored"
    shutil.copytree(
        os.path.dirname(warden.__file__), lib / "warden", ignore=shutil.ignore_patterns("__pycache__")
    )
    prog = program(WARDEN_PUT_ON_SYS_PATH)
    env = {"PYTHONPATH": "/nowhere"} if pythonpath == "with" else {}
    command = [sys.executable, "-S", str(prog.path), str(lib), pythonpath]
    proc = prog.start(env=env, command=command)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    seen = "'/nowhere'" if pythonpath == "with" else "None"
    assert out.splitlines() == [
        f"executor (42, {seen}, True)",
        f"pool (42, {seen}, True)",
        f"process (42, {seen}, True)",
        "exit code 0",
    ], out + err


SET_EXECUTABLE = """
import multiprocessing, sys
import warden

def square(x):
    return x * x

if __name__ == "__main__":
    multiprocessing.set_executable(sys.argv[1])
    try:
        with warden.Pool(2) as pool:
            print(pool.map(square, range(4)), flush=True)
    except warden.PoolFailed as e:
        print("failed:", e, flush=True)
"""


@pytest.mark.parametrize("imports_warden", [True, False])
def test_workers_run_on_the_interpreter_set_executable_names_and_one_without_warden_is_named(
    program, tmp_path, imports_warden
):
    """``multiprocessing.set_executable()`` chooses the workers' interpreter,
    as the standard library's spawn context does. One that cannot import
    warden (here: the same one, without its site-packages, and deaf to
    ``PYTHONPATH``) fails the pool with an error that names it and says
    what it lacks, where it said to check a Rust program's main."""
    wrapper = tmp_path / "python-wrapper"
    flag = "" if imports_warden else " -S -E"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable}{flag} "$@"\n')
    wrapper.chmod(0o755)
    run = program(SET_EXECUTABLE).run(args=(str(wrapper),), timeout=120)
    assert run.returncode == 0, run.stderr
    if imports_warden:
        assert run.lines == ["[0, 1, 4, 9]"], run.stdout + run.stderr
    else:
        assert len(run.lines) == 1 and run.lines[0].startswith("failed:"), run.stdout + run.stderr
        assert (
            f"is {wrapper} a warden worker? a Python interpreter must be able to import warden"
            in run.lines[0]
        )
        assert "No module named 'warden'" in run.stderr


# A signal handler that runs at the worst moment: while the main thread is
# giving a future the condition it waits on. The handler lands inside the
# making, as when the collector, which may run at any allocation, calls a
# __del__ that cancels a future, or a SIGTERM handler calls
# shutdown(cancel_futures=True) as docs/python.md advises.
SIGNAL_WHILE_A_CONDITION_IS_MADE = """
import signal, threading, time, warden

class Landing(threading.Condition):
    armed = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if Landing.armed:
            Landing.armed = False
            signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns

threading.Condition = Landing

def stop(signum, frame):
    ex.shutdown(wait=False, cancel_futures=True)
    print("stopped in the handler", flush=True)

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)
    ex = warden.ProcessPoolExecutor(1)
    blocker = ex.submit(time.sleep, 5)
    queued = [ex.submit(abs, -i) for i in range(5)]
    Landing.armed = True
    queued[0].add_done_callback(lambda f: print("callback, cancelled:", f.cancelled(), flush=True))
    print("cancelled:", sum(f.cancelled() for f in queued), flush=True)
"""


def test_a_signal_handler_that_cancels_futures_while_one_is_given_its_condition_does_not_hang(program):
    """The handler cancels the pool's futures while the interrupted thread
    makes a future's condition. It hung for ever: that thread held the lock
    the cancelling takes, one for every future, and not re-entrant. The
    standard library's futures each have a re-entrant condition of their own."""
    run = program(SIGNAL_WHILE_A_CONDITION_IS_MADE).run(timeout=40)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["stopped in the handler", "callback, cancelled: True", "cancelled: 5"], run.stderr
