"""asyncio on warden: ``await ex.run(...)``, ``async for ... in ex.amap(...)``,
and cancellation that stops running work through the worker's exit path.

Every test runs on asyncio's own loop and, when it is installed, on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import warden

from conftest import wait_until


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def getpid(_=None):
    return os.getpid()


def fail(message):
    raise ValueError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def run_then_mark(seconds: float, marker: str) -> int:
    """Sleeps, then writes ``marker``: the file exists only if the task ran to its end."""
    time.sleep(seconds)
    Path(marker).write_text("finished")
    return os.getpid()


def note_start_then_run(starts: str, seconds: float, marker: str) -> int:
    """Appends this worker's pid and ``seconds`` to ``starts``, then as
    :func:`run_then_mark`."""
    with open(starts, "a") as f:
        f.write(f"{os.getpid()} {seconds}\n")
    return run_then_mark(seconds, marker)


def mark_now(marker: str) -> None:
    Path(marker).write_text("ran")


def wait_for_file(path: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def record_exit(path: str) -> None:
    """A finalizer: appends this worker's pid to ``path``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def pids_in(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _uvloop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    uvloop = pytest.importorskip(
        "uvloop", reason="uvloop is not installed (optional; `make test` installs it)"
    )

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)

    return run


@pytest.fixture
def arun() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion on asyncio's own loop."""
    return asyncio.run


@pytest.fixture(params=["asyncio", "uvloop"])
def any_loop(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion on asyncio's loop, then on uvloop."""
    if request.param == "uvloop":
        return _uvloop_runner()
    return asyncio.run


def test_run_returns_the_value_and_raises_a_fresh_error(any_loop):
    async def main():
        with warden.ProcessPoolExecutor(2) as ex:
            assert await ex.run(add, 2, b=3) == 5
            errors = []
            for _ in range(2):
                with pytest.raises(ValueError, match="boom") as info:
                    await ex.run(fail, "boom")
                errors.append(info.value)
            assert errors[0] is not errors[1]

    any_loop(main())


def test_pool_run_returns_the_value_and_raises_with_the_remote_traceback(arun):
    async def main():
        with warden.Pool(2) as pool:
            assert await pool.run(add, 2, b=3) == 5
            with pytest.raises(ValueError, match="boom") as info:
                await pool.run(fail, "boom")
            assert "RemoteTraceback" in repr(info.value.__cause__)

    arun(main())


def test_amap_yields_results_in_order_chunked_or_not(arun):
    async def main():
        with warden.ProcessPoolExecutor(2) as ex:
            assert [r async for r in ex.amap(square, range(10))] == [x * x for x in range(10)]
            assert [r async for r in ex.amap(add, range(7), range(7), chunksize=3)] == [
                2 * x for x in range(7)
            ]
        with warden.Pool(2) as pool:
            assert [r async for r in pool.amap(square, iter(range(9)), chunksize=4)] == [
                x * x for x in range(9)
            ]

    arun(main())


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the unclosed pools, collected after the test
def test_amap_of_a_pool_the_program_keeps_no_reference_to_yields_every_result(arun):
    """``Pool(2).amap(...)`` written in one expression, as ``Pool(2).imap(...)``
    is: the pool was collected (and terminated) while the loop awaited its
    first result, which ended the coroutine with ``CancelledError``."""

    async def main():
        pools = [r async for r in warden.Pool(2).amap(sleep_then, [0.2] * 4)]
        executors = [r async for r in warden.ProcessPoolExecutor(2).amap(sleep_then, [0.2] * 4)]
        return pools, executors

    assert arun(main()) == ([None] * 4, [None] * 4)


def test_amap_raises_the_first_failure_in_order(arun):
    async def main():
        with warden.ProcessPoolExecutor(2) as ex:
            got = []
            with pytest.raises(ValueError, match="third"):
                async for r in ex.amap(fail_on, range(5)):
                    got.append(r)
            assert got == [0, 1]

    arun(main())


def fail_on(x):
    if x == 2:
        raise ValueError("third")
    return x


def test_run_in_executor_keeps_working(arun):
    async def main():
        loop = asyncio.get_running_loop()
        with warden.ProcessPoolExecutor(2) as ex:
            assert await loop.run_in_executor(ex, square, 7) == 49

    arun(main())


def test_waiting_calls_take_no_thread_each(arun, tmp_path):
    """Twenty calls waiting at once: the process has no more threads than with one."""
    release = str(tmp_path / "release")

    async def main():
        with warden.ProcessPoolExecutor(2) as ex:
            await ex.run(square, 1)  # the pool and its threads are up
            baseline = threading.active_count()
            tasks = [asyncio.create_task(ex.run(wait_for_file, release)) for _ in range(20)]
            await asyncio.sleep(0.3)
            during = threading.active_count()
            Path(release).touch()
            await asyncio.gather(*tasks)
            return baseline, during

    baseline, during = arun(main())
    assert during == baseline


@pytest.mark.parametrize("how", ["wait_for", "timeout", "task_cancel"])
def test_cancelling_the_coroutine_stops_the_running_task_through_its_exit_path(arun, tmp_path, how):
    """The finalizer of the worker running the task writes a file; the task
    never reaches its end; the next task runs in a new worker."""
    exits = tmp_path / "exits"
    marker = str(tmp_path / "finished")

    async def main():
        with warden.ProcessPoolExecutor(1, finalizer=record_exit, finalargs=(str(exits),)) as ex:
            first = await ex.run(getpid)
            call = ex.run(run_then_mark, 30, marker)
            started = time.monotonic()
            if how == "wait_for":
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(call, 0.5)
            elif how == "timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await call
            else:
                task = asyncio.create_task(call)
                await asyncio.sleep(0.5)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert time.monotonic() - started < 5
            assert wait_until(lambda: pids_in(exits) == [first], timeout=15)
            second = await ex.run(getpid)
            return first, second

    first, second = arun(main())
    assert second != first
    assert not os.path.exists(marker)


def test_pool_run_cancelled_stops_the_running_task_through_its_exit_path(arun, tmp_path):
    exits = tmp_path / "exits"
    marker = str(tmp_path / "finished")

    async def main():
        with warden.Pool(1, finalizer=record_exit, finalargs=(str(exits),)) as pool:
            first = await pool.run(getpid)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.run(run_then_mark, 30, marker), 0.5)
            assert wait_until(lambda: pids_in(exits) == [first], timeout=15)
            assert await pool.run(getpid) != first

    arun(main())
    assert not os.path.exists(marker)


def test_cancelling_a_queued_call_drops_it_and_keeps_the_worker(arun, tmp_path):
    release = str(tmp_path / "release")
    marker = str(tmp_path / "ran")
    exits = tmp_path / "exits"

    async def main():
        with warden.ProcessPoolExecutor(1, finalizer=record_exit, finalargs=(str(exits),)) as ex:
            await ex.run(getpid)  # the worker is up
            busy = asyncio.create_task(ex.run(wait_for_file, release))
            await asyncio.sleep(0.2)
            queued = asyncio.create_task(ex.run(mark_now, marker))
            await asyncio.sleep(0.2)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            Path(release).touch()
            pid = await busy
            assert await ex.run(getpid) == pid  # the worker was not replaced
        return pid

    pid = arun(main())
    assert not os.path.exists(marker)
    assert pids_in(exits) == [pid]


def test_a_failing_task_in_a_task_group_stops_its_running_siblings(any_loop, tmp_path):
    exits = tmp_path / "exits"
    marker = str(tmp_path / "finished")

    async def fails_soon(ex):
        await ex.run(sleep_then, 0.3)
        await ex.run(fail, "sibling failed")

    async def main():
        with warden.ProcessPoolExecutor(3, finalizer=record_exit, finalargs=(str(exits),)) as ex:
            started = time.monotonic()
            with pytest.raises(ExceptionGroup) as info:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(ex.run(run_then_mark, 30, marker))
                    tg.create_task(ex.run(run_then_mark, 30, marker))
                    tg.create_task(fails_soon(ex))
            assert info.group_contains(ValueError, match="sibling failed")
            assert time.monotonic() - started < 10
            # Both workers that ran the long tasks went through their exit path.
            assert wait_until(lambda: len(pids_in(exits)) >= 2, timeout=15)

    any_loop(main())
    assert not os.path.exists(marker)


def test_leaving_amap_early_stops_the_calls_not_done(any_loop, tmp_path):
    exits, starts = tmp_path / "exits", tmp_path / "starts"
    marker = str(tmp_path / "finished")

    async def main():
        with warden.ProcessPoolExecutor(2, finalizer=record_exit, finalargs=(str(exits),)) as ex:
            async with contextlib.aclosing(
                ex.amap(note_start_then_run, [str(starts)] * 3, [0, 30, 30], [marker + "0", marker, marker])
            ) as it:
                async for _ in it:
                    break
            # Each long call had started, and then its worker was stopped (its
            # exit path ran), or it had not, and it never will.
            lines = starts.read_text().splitlines() if starts.exists() else []
            long_starts = {int(line.split()[0]) for line in lines if line.split()[1] != "0"}
            assert wait_until(lambda: long_starts <= set(pids_in(exits)), timeout=15)
            assert await ex.run(square, 3) == 9

    any_loop(main())
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_timeout_around_amap_stops_the_call_it_was_waiting_for(arun, tmp_path, kind):
    # The awaited call's own waiter is cancelled with the coroutine: that
    # call used to run to its end, and the pool's shutdown waited for it.
    exits = tmp_path / "exits"
    marker = str(tmp_path / "finished")
    make = warden.ProcessPoolExecutor if kind == "executor" else warden.Pool

    async def main():
        with make(2, finalizer=record_exit, finalargs=(str(exits),)) as pool:
            first = await pool.run(getpid)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for _ in pool.amap(functools.partial(run_then_mark, marker=marker), [30, 30]):
                        pass
            assert wait_until(lambda: len(pids_in(exits)) == 2, timeout=15)
            assert await pool.run(getpid) != first

    started = time.monotonic()
    arun(main())
    assert time.monotonic() - started < 20
    assert not os.path.exists(marker)


def test_a_call_the_pool_cancels_ends_the_coroutine_cancelled(arun, tmp_path):
    release = str(tmp_path / "release")

    async def main():
        ex = warden.ProcessPoolExecutor(1)
        await ex.run(getpid)  # the worker is up
        busy = asyncio.create_task(ex.run(wait_for_file, release))
        await asyncio.sleep(0.3)
        queued = asyncio.create_task(ex.run(square, 2))
        await asyncio.sleep(0.1)
        ex.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(asyncio.CancelledError):
            await queued
        Path(release).touch()
        await busy
        ex.shutdown(wait=True)

    arun(main())


def test_run_after_shutdown_raises(arun):
    async def main():
        ex = warden.ProcessPoolExecutor(1)
        ex.shutdown()
        with pytest.raises(RuntimeError, match="after shutdown"):
            await ex.run(square, 2)

    arun(main())
