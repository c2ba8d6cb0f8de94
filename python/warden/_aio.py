"""asyncio on warden's pools: ``await pool.run(...)``, ``async for ... in pool.amap(...)``.

No thread waits for a call. A task's outcome arrives on the pool's results
thread (``warden-results``), which unpickles it there and hands it to the
event loop with ``loop.call_soon_threadsafe``; the awaiting coroutine wakes
on the loop.

Cancelling the awaiting coroutine (``Task.cancel()``, ``asyncio.timeout``,
``asyncio.wait_for``, a failing sibling in an ``asyncio.TaskGroup``) cancels
the task in the pool exactly as ``Future.cancel(running=True)`` does (one
code path): a queued task is dropped, and a running one is stopped
through its worker's exit path (``TaskInterrupted`` is raised in the task,
the worker's finalizer runs) and the worker is replaced. The stop is asked
for at once and goes on in the background: the coroutine does not wait for
the worker to finish its exit path.

A task the pool cancels on its own (``shutdown(cancel_futures=True)``,
``terminate()``) ends the awaiting coroutine with ``asyncio.CancelledError``,
as ``loop.run_in_executor`` does for a cancelled future.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from . import _runner
from ._errors import ErrorData
from ._pickle import loads

#: Called on the results thread with a task's outcome ``(ok, data)``.
OnDone = Callable[[bool, Any], None]
#: Queues one task whose outcome goes to ``on_done``, with the loop future
#: that waits for it as its owner (what ``on_worker_lost`` reports); returns a
#: function that cancels it, queued or running, the way
#: ``Future.cancel(running=True)`` does. Raises if the task cannot be queued.
Starter = Callable[[OnDone, Any], Callable[[], object]]


def _decode(ok: bool, data: Any) -> tuple[bool, Any]:
    """A task's outcome as ``(True, value)`` or ``(False, ErrorData)``."""
    if ok:
        try:
            return True, loads(data)
        except BaseException as e:  # SystemExit too: this is the results thread
            return False, ErrorData.local(e, "cannot unpickle the task's result")
    return False, data  # the results thread made it an ErrorData


def _settle(waiter: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
    """On the loop: wakes the coroutine waiting for ``waiter``."""
    if waiter.done():
        return
    ok, value = outcome
    if not ok and value.cancelled:
        if value.by_exit and _runner.parks_at_exit():
            # Cancelled by the interpreter's exit, on a daemon thread's loop:
            # the coroutine waits on, and the thread ends with the
            # interpreter, as a daemon thread's ``result()`` stays blocked.
            return
        waiter.cancel()
    else:
        waiter.set_result(outcome)


Call = tuple["asyncio.Future[Any]", Callable[[], object]]


def _start(loop: asyncio.AbstractEventLoop, starter: Starter) -> Call:
    """Queues a task; returns the loop future its outcome will settle, and
    the function that cancels the task."""
    waiter: asyncio.Future[tuple[bool, Any]] = loop.create_future()

    def on_done(ok: bool, data: Any) -> None:  # on the results thread
        outcome = _decode(ok, data)
        # A closed loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, waiter, outcome)

    return waiter, starter(on_done, waiter)


def _unwrap(outcome: tuple[bool, Any], traceback_type: type[Exception] | None) -> Any:
    ok, value = outcome
    if ok:
        return value
    # A fresh exception per raise: nothing keeps the caller's frames alive.
    raise value.build() if traceback_type is None else value.build(traceback_type)


async def call(starter: Starter, traceback_type: type[Exception] | None = None) -> Any:
    """Queues a task and waits for its value; see the module documentation."""
    waiter, stop = _start(asyncio.get_running_loop(), starter)
    try:
        outcome = await waiter
    except asyncio.CancelledError:
        stop()
        raise
    return _unwrap(outcome, traceback_type)


def results(
    pool: object,
    starters: Iterable[Starter],
    chunked: bool,
    traceback_type: type[Exception] | None = None,
) -> AsyncGenerator[Any, None]:
    """Queues every task now (a task that cannot be queued cancels those
    before it and raises here); returns an async iterator of their values in
    order, which keeps ``pool`` alive (as ``imap``'s iterator does: a pool
    collected ends its tasks). Leaving the iteration early, by an error,
    ``break`` (once the iterator is closed) or cancellation, cancels the
    tasks not yet done."""
    loop = asyncio.get_running_loop()
    calls: list[Call] = []
    try:
        for starter in starters:
            calls.append(_start(loop, starter))
    except BaseException:
        _stop_all(calls)
        raise
    return _iterate(pool, calls, chunked, traceback_type)


def _stop_all(calls: list[Call]) -> None:
    for waiter, stop in calls:
        if not waiter.done():
            waiter.cancel()
            stop()
        elif waiter.cancelled():
            # The one the iteration was awaiting: cancelling the coroutine
            # cancelled its waiter too, not the task.
            stop()


async def _iterate(
    pool: object,  # kept alive while the iteration lasts
    calls: list[Call],
    chunked: bool,
    traceback_type: type[Exception] | None,
) -> AsyncGenerator[Any, None]:
    calls.reverse()
    try:
        while calls:
            waiter, _ = calls[-1]
            outcome = await waiter
            calls.pop()
            value = _unwrap(outcome, traceback_type)
            if chunked:
                for item in value:
                    yield item
            else:
                yield value
    finally:
        _stop_all(calls)
