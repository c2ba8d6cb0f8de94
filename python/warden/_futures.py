"""The futures of :class:`warden.ProcessPoolExecutor`.

A :class:`Future` is a real ``concurrent.futures.Future`` (``wait``,
``as_completed``, ``add_done_callback`` and ``asyncio.wrap_future`` work), with
three differences:

* a failure is kept as :class:`~warden._errors.ErrorData`; ``result()`` and
  ``exception()`` build a fresh exception on each call, so a future never
  holds the frames of the code that waited on it;
* ``cancel()`` asks the pool, and succeeds only while the task is queued
  (the future is ``running()`` once a worker has taken it: ``running()``
  asks the pool, which sends the future nothing at a start, so its
  ``_state`` stays ``PENDING`` until the outcome);
  ``cancel(running=True)`` also stops a task that is running (its worker is
  stopped: SIGTERM, finalizer, grace period, SIGKILL; and replaced);
* a ``KeyboardInterrupt`` while waiting in ``result()`` stops the pool the
  future belongs to (graceful stop of its workers; a second one kills them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, _base
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import _runner
from ._errors import ErrorData
from ._pickle import loads

# At run time too (typing is imported anyway), so that typing.get_type_hints()
# of the methods that name them works.
_T = TypeVar("_T")

_CANCELLED = (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED)

#: How long ``Future.cancel()`` waits, at most, for the outcome of a pending
#: future of a pool that has shut down (see ``Future._cancelled_after_all``).
CANCEL_RACE_WAIT = 0.1
_DONE = (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED, _base.FINISHED)


#: Serialises making a future's condition, and finishing a future that has
#: none (nobody has waited on it, nor added a callback). Re-entrant, as each
#: of the standard library's futures' own condition is: what the thread
#: holding it may run meanwhile (a ``__del__`` the collector calls, a signal
#: handler that cancels futures or shuts the pool down) takes it again.
_CONDITION_LOCK = threading.RLock()


def reset_after_fork() -> None:
    """In a forked copy that fails the futures it inherited: a thread of the
    original may have held the lock at the fork."""
    global _CONDITION_LOCK
    _CONDITION_LOCK = threading.RLock()


def refuse_pickling(obj: object, instead: str) -> NoReturn:
    """Refuses to pickle a future or a pool's result, which belongs to the
    process that made the call: a ``TypeError`` naming it and saying what
    to pass ``instead``."""
    raise TypeError(
        f"cannot pickle {type(obj).__name__!r} object: it belongs to the process that made the call; "
        f"pass {instead} to the task instead"
    )


# Generic for type checkers, as concurrent.futures.Future is in typeshed: a
# string subscript makes no TypeVar at run time (it only names one for them).
class Future(_base.Future["_T"]):
    """A ``concurrent.futures.Future`` whose failure is stored as data.

    Its ``_condition`` (a lock and a deque: most of a future's memory) is made
    the first time something needs it: waiting on the future, a callback,
    ``wait()``/``as_completed()``. A future nobody waits on before it is done
    never gets one, and many outstanding futures cost less than the standard
    library's."""

    #: Made with the condition (class defaults until then: a future nobody
    #: waits on allocates neither list, and never materialises its ``__dict__``).
    _lazy_condition: threading.Condition | None = None
    _lazy_waiters: list[Any] | None = None
    _lazy_callbacks: list[Callable[[Any], object]] | None = None
    #: Callers of ``cancel()`` in the middle of asking the pool, and whether
    #: the task's "cancelled" outcome came meanwhile (see ``_deliver``).
    _cancellers = 0
    _cancel_came = False
    #: Cancelled by ``shutdown(cancel_futures=True)``, whose done-callbacks
    #: run on the results thread, as the standard library runs them on its
    #: manager thread (not in the caller, which may hold a lock they take).
    _callbacks_owed = False
    #: Cancelled by the interpreter's exit (its pool terminated, its drain
    #: cut short): a daemon thread that waits for it stays blocked.
    _cut_by_exit = False

    def __reduce_ex__(self, protocol: Any) -> Any:
        refuse_pickling(self, "its result()")

    def __copy__(self) -> Future[_T]:
        """The future itself (as a pool's results and ``imap`` iterators
        are): a copy could only be another way to wait for the same task,
        and one with an identity of its own would not be the one the pool
        completes, nor the one ``wait()``, ``as_completed()`` and
        done-callbacks are given."""
        return self

    def __init__(self) -> None:
        # _base.Future.__init__, but for the condition and its two lists.
        self._state = _base.PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._error: ErrorData | None = None
        #: The runner whose pool runs the task (``core``, ``interrupt``), and the task's id.
        self._runner: Any = None
        self._task = 0

    # Hidden from type checkers, which see the standard library's plain
    # attributes: typeshed's protocols for as_completed() and wait() ask for
    # mutable attributes, which a property does not satisfy for every checker.
    if not TYPE_CHECKING:

        @property
        def _condition(self) -> threading.Condition:
            condition = self._lazy_condition
            if condition is None:
                # Made before the lock is taken: making them may run the
                # program's code (the collector's __del__ methods), which
                # may use this future too.
                waiters: list[Any] = []
                callbacks: list[Callable[[Any], object]] = []
                made = threading.Condition()
                with _CONDITION_LOCK:
                    condition = self._lazy_condition
                    if condition is None:
                        # The lists first: whoever sees the condition sees them.
                        self._lazy_waiters, self._lazy_callbacks = waiters, callbacks
                        condition = self._lazy_condition = made
            return condition

        @_condition.setter
        def _condition(self, condition: threading.Condition) -> None:
            # Settable, as the standard library's attribute is (typeshed's
            # protocols for as_completed() and wait() ask for that).
            self._lazy_condition = condition

        @property
        def _waiters(self) -> list[Any]:
            """``wait()``'s and ``as_completed()``'s waiters (made with the condition)."""
            if self._lazy_waiters is None:
                self._condition  # noqa: B018  (makes the lists)
            return self._lazy_waiters  # type: ignore[return-value]

        @_waiters.setter
        def _waiters(self, waiters: list[Any]) -> None:
            self._lazy_waiters = waiters

        @property
        def _done_callbacks(self) -> list[Callable[[Any], object]]:
            """The callbacks ``add_done_callback`` registered (made with the condition)."""
            if self._lazy_callbacks is None:
                self._condition  # noqa: B018  (makes the lists)
            return self._lazy_callbacks  # type: ignore[return-value]

    def _on_interrupt(self) -> None:
        if self._runner is not None:
            self._runner.interrupt()

    def done(self) -> bool:
        """Whether the future is cancelled or finished."""
        return self._state in _DONE

    def cancelled(self) -> bool:
        """Whether the future was cancelled."""
        return self._state in _CANCELLED

    def running(self) -> bool:
        """Whether a worker is running the task."""
        state = self._state
        if state == _base.PENDING:
            # The pool knows when a worker takes the task (nothing is sent to
            # the future then): running from then until its outcome is here.
            # Read again after asking: the outcome's delivery may have marked
            # the future running (see _deliver) and the pool forgotten the
            # start meanwhile.
            return self._taken() or self._state == _base.RUNNING
        return state == _base.RUNNING

    def _taken(self) -> bool:
        runner = self._runner
        return runner is not None and runner.core.has_started(self._task)

    def __repr__(self) -> str:
        with self._condition:
            if self._state == _base.FINISHED and self._error is not None:
                raised = self._error.type_shown()
                return f"<{type(self).__name__} at {id(self):#x} state=finished raised {raised}>"
            if self._state == _base.PENDING and self._taken():
                return f"<{type(self).__name__} at {id(self):#x} state=running>"
        return super().__repr__()

    # -- waiting -----------------------------------------------------------

    def _outcome(self) -> _T:
        if self._error is not None:
            raise self._error.build()
        if self._exception is not None:  # set_exception() called by other code
            raise self._exception
        value: _T = self._result
        return value

    def result(self, timeout: float | None = None) -> _T:
        """The task's return value; raises a fresh exception if it failed.

        Raises ``CancelledError`` if cancelled and ``TimeoutError`` if
        ``timeout`` seconds pass first.
        """
        try:
            # Done already: no lock needed (the outcome is set before the state).
            state = self._state
            if state == _base.FINISHED:
                return self._outcome()
            if state not in _CANCELLED:
                with self._condition:
                    if self._state == _base.FINISHED:
                        return self._outcome()
                    if self._state not in _CANCELLED:
                        if timeout is None and self._runner is not None:
                            _runner.refuse_self_wait(self._runner.core)
                        self._condition.wait(timeout)
                        if self._state not in _CANCELLED:
                            if self._state == _base.FINISHED:
                                return self._outcome()
                            raise TimeoutError()
            # Cancelled by the interpreter's exit: a daemon thread stays
            # blocked (outside the lock) instead, whether the cancel came
            # while it waited or before it asked (after ``wait()`` or
            # ``as_completed()`` told it the future was done).
            if self._cut_by_exit:
                _runner.park_at_exit()
            raise CancelledError()
        except KeyboardInterrupt:
            if self._on_interrupt is not None:
                self._on_interrupt()
            raise
        finally:
            self = None  # type: ignore[assignment]  # noqa: PLW0642  (breaks frame -> future)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """A fresh exception for the task's failure, or ``None`` if it succeeded."""
        try:
            with self._condition:
                if self._state not in _DONE:
                    if timeout is None and self._runner is not None:
                        _runner.refuse_self_wait(self._runner.core)
                    self._condition.wait(timeout)
                if self._state not in _CANCELLED:
                    if self._state != _base.FINISHED:
                        raise TimeoutError()
                    if self._error is not None:
                        return self._error.build()
                    return self._exception
            # As in result(): a daemon thread stays blocked at exit.
            if self._cut_by_exit:
                _runner.park_at_exit()
            raise CancelledError()
        except KeyboardInterrupt:
            if self._on_interrupt is not None:
                self._on_interrupt()
            raise
        finally:
            self = None  # type: ignore[assignment]  # noqa: PLW0642

    # -- cancelling --------------------------------------------------------

    def cancel(self, running: bool = False) -> bool:
        """Cancels the task. Returns whether the future is cancelled.

        ``cancel()`` keeps the standard library's meaning: it succeeds only
        while the task is queued, and returns ``False`` once the task runs or
        has finished.

        ``cancel(running=True)`` also stops a task that is already running:
        its worker stops as SIGTERM stops it (the task is interrupted,
        ``finally`` blocks and the worker's finalizer run), SIGKILL after the
        grace period, and is replaced; the other tasks are unaffected (if the
        task ended as the stop came, the worker serves on). The future ends
        cancelled. ``False`` only once the task has finished.
        """
        # One read, no lock (which would make the lazy condition): whatever
        # happens after it, the pool's answer and ``_mark_cancelled`` decide.
        state = self._state
        if state == _base.FINISHED or (
            not running and (state == _base.RUNNING or (state == _base.PENDING and self._taken()))
        ):
            return False
        if state in _CANCELLED:
            return True
        runner = self._runner
        if runner is None:
            # A future no pool made (tests and adapters make their own): the
            # standard library's cancel, on its own state.
            return super().cancel()
        # The pool sends the task's "cancelled" outcome to the results thread
        # too. While this asks, that outcome is left to this caller, so that
        # (as in the standard library) the done-callbacks have run, in this
        # thread, when cancel() returns True.
        with _CONDITION_LOCK:
            self._cancellers += 1
        try:
            cancelled = _runner.cancel(runner.core, self._task, running)
        finally:
            with _CONDITION_LOCK:
                self._cancellers -= 1
                came = self._cancel_came
            if came:
                # Also when the ask raised: nobody else marks it now.
                self._mark_cancelled()
        if cancelled or came:
            return self._mark_cancelled()
        return self._cancelled_after_all(runner.core)

    def _cancelled_after_all(self, core: Any) -> bool:
        """Whether this future is cancelled although the pool just said its
        task could not be. Another caller's cancel may have landed between
        the read of the state in :meth:`cancel` and now (the pool says
        "cancelled" to a cancel that comes after one that landed, but this
        future's mark may still be on its way). And once the pool has shut
        down it cannot tell: a task a shutdown cancelled has its outcome on
        the way to this future through the results thread, waited for here
        up to :data:`CANCEL_RACE_WAIT` seconds (not on that thread itself)."""
        if self._state == _base.PENDING and core.is_shut_down() and not _runner.delivering(core):
            deadline = time.monotonic() + CANCEL_RACE_WAIT
            with self._condition:
                while self._state == _base.PENDING and (left := deadline - time.monotonic()) > 0:
                    self._condition.wait(left)
        return self._state in _CANCELLED

    def _mark_cancelled(self, callbacks: bool = True) -> bool:
        """Cancels the future (``False`` if it has finished). Its
        done-callbacks run now, in this thread; or, without ``callbacks``,
        when the task's "cancelled" outcome reaches the future on the results
        thread (owed till then), or when the pool ends without it."""
        if self._lazy_condition is None:
            with _CONDITION_LOCK:
                if self._lazy_condition is None:
                    # Nobody waits and no callback is registered: just cancel.
                    if self._state == _base.FINISHED:
                        return False
                    if self._state not in _CANCELLED:
                        self._state = _base.CANCELLED_AND_NOTIFIED
                    return True
        with self._condition:
            if self._state == _base.FINISHED:
                return False
            if self._state in _CANCELLED:
                run = callbacks and self._callbacks_owed
                if run:
                    self._callbacks_owed = False
            else:
                self._state = _base.CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
                run = callbacks
                if not callbacks:
                    self._callbacks_owed = True
        if run:
            self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    # -- completing (on the results thread) --------------------------------

    def _finish(self, value: Any = None, error: ErrorData | None = None) -> None:
        """Finishes the future with a value or an error (kept as data)."""
        if self._lazy_condition is None:
            with _CONDITION_LOCK:
                if self._lazy_condition is None:
                    # Nobody waits and no callback is registered (both need
                    # the condition, made under this lock): just finish.
                    if self._state in _DONE:
                        return
                    self._result, self._error = value, error
                    self._state = _base.FINISHED
                    return
        with self._condition:
            if self._state in _DONE:
                # Done already; a cancel may have left its callbacks owed
                # (the pool ended before the "cancelled" outcome came).
                run = self._callbacks_owed
                if run:
                    self._callbacks_owed = False
            else:
                run = True
                self._result, self._error = value, error
                self._state = _base.FINISHED
                for waiter in self._waiters:
                    if error is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                self._condition.notify_all()
        if run:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def _deliver(self, ok: bool, data: Any) -> None:
        """Takes a task outcome from the results thread."""
        if ok:
            try:
                value = loads(data)
            except BaseException as e:  # SystemExit too: this is the results thread
                self._finish(error=ErrorData.local(e, "cannot unpickle the task's result"))
            else:
                self._finish(value)
            return
        error = data
        if error.cancelled:
            self._cut_by_exit = error.by_exit
            taken = self._taken()
            with _CONDITION_LOCK:
                if self._cancellers:
                    # A cancel() is asking the pool: it marks the future.
                    # Meanwhile one a worker had taken stays running (the
                    # pool forgets the start once this outcome is delivered):
                    # never seen neither running nor done.
                    if taken and self._state == _base.PENDING:
                        self._state = _base.RUNNING
                    self._cancel_came = True
                    return
            self._mark_cancelled()
        else:
            self._finish(error=error)
