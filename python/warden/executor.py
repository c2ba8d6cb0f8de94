"""``warden.ProcessPoolExecutor``: ``concurrent.futures`` on warden's core."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import multiprocessing
import operator
import os
import threading
import time
import types
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import _pickle, _progress, _runner, _warden
from ._children import WorkerProcess, wait_for_workers, workers_of
from ._errors import core_error
from ._futures import Future
from ._handles import PoolHandle
from ._inherit import own_api_only
from ._pickle import dumps_call
from ._tasks import chunks, run_chunk

# concurrent.futures.process is imported by _errors, which can do it while
# the interpreter shuts down (the program's first executor made in an atexit
# handler), when its own import would fail.
if TYPE_CHECKING:
    import concurrent.futures.process

    # asyncio costs ~40 ms to import: loaded when a coroutine API is first used.
    from . import _aio

# At run time too (typing is imported anyway), so that typing.get_type_hints()
# of the methods that name them works.
_P = ParamSpec("_P")
_T = TypeVar("_T")

_counter = itertools.count(1)

_own_api_only = own_api_only("concurrent.futures.process")


@_own_api_only
class ProcessPoolExecutor(concurrent.futures.process.ProcessPoolExecutor):
    """An ``Executor`` whose workers always clean up after themselves.

    A subclass of ``concurrent.futures.ProcessPoolExecutor`` (none of whose
    machinery it uses), so that code and annotations naming that type take
    it. The same API, plus:

    * ``finalizer(*finalargs)`` runs in every worker at the end of its life,
      whatever ends it: ``shutdown``, ``max_tasks_per_child``, a task timeout,
      a terminate, the death of this process;
    * ``worker_context``: a factory of a context manager entered when a worker
      starts and exited when it ends; tasks reach what it yields with
      :func:`warden.worker_context`;
    * ``task_timeout``: seconds a task may run before its worker is stopped
      (the task fails with :class:`warden.TaskTimeout`) and replaced;
    * ``start``: ``"zygote"`` (the default, unless ``$WARDEN_START`` says
      otherwise) forks each worker from the pool's zygote, a fresh
      interpreter that has imported warden's worker code and the modules
      named in ``preload`` (by default ``["__main__"]``: this program's main
      module, imported once there instead of in every worker, as the
      standard library's forkserver does); ``"exec"`` starts every worker as a new
      interpreter. Where a zygote cannot work the pool falls back to exec by
      itself (see ``docs/python.md``).
    * ``restart_limit=(count, seconds)``: more than ``count`` worker failures
      that no task explains (a worker that cannot start, dies idle, or breaks
      the protocol) within ``seconds`` fail the pool; ``None`` for no limit.
      An initializer that raises, or ends its worker, breaks the executor
      at once, as ``concurrent.futures`` documents;
    * ``max_memory_per_child`` (bytes, or a string like ``"512MiB"``): a
      worker above it after a task retires (its finalizer runs) and is
      replaced; the task's result is kept;
    * ``memory_limit``: a worker above it while a task runs is stopped
      (SIGTERM, finalizer, SIGKILL after the grace period); the task fails
      with :class:`warden.WorkerMemoryExceeded`;
    * ``on_worker_lost(info)``: runs in this process, on a thread of its own,
      for each worker that died without running its exit path (SIGKILL, a
      segfault), with a :class:`warden.WorkerLost`;
    * ``forward_logging`` (default on): records logged in the workers are
      handled by this process's ``logging`` (see ``warden._logging``);
    * ``run`` and ``amap``: the same for asyncio, where cancelling the
      awaiting coroutine stops the task (as ``Future.cancel(running=True)``);
    * ``exit_timeout``: seconds that interpreter exit waits for the tasks
      still pending in an executor left open. By default it waits for all of
      them, as ``concurrent.futures`` promises; past the limit (or on Ctrl-C)
      the rest are dropped, and stderr says how many.

    A worker crash fails only the task it was running
    (:class:`warden.WorkerCrashed`); the pool replaces the worker, and such
    crashes never count toward ``restart_limit``.

    ``mp_context`` is accepted for compatibility and otherwise ignored: warden
    never forks this process; its workers are fresh interpreters (or forks of
    one, the zygote), as under the ``"spawn"`` start method, whatever context
    is given.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: multiprocessing.context.BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[Any, ...] = (),
        task_timeout: float | None = None,
        worker_context: Callable[[], Any] | None = None,
        start: str | None = None,
        preload: Iterable[str] | None = None,
        restart_limit: tuple[int, float] | None = _runner.DEFAULT_RESTART_LIMIT,
        max_memory_per_child: int | str | None = None,
        memory_limit: int | str | None = None,
        on_worker_lost: Callable[[_runner.WorkerLost], object] | None = None,
        forward_logging: bool = True,
        exit_timeout: float | None = None,
    ) -> None:
        # concurrent.futures.ProcessPoolExecutor.__init__ is not called: none
        # of its queues, threads or processes exist here.
        if max_workers is None:
            max_workers = _runner.cpu_count()
        else:
            # A float or a str is refused here, as the standard library's
            # constructor refuses it ("'float' object cannot be interpreted
            # as an integer"), not at the first submit.
            max_workers = operator.index(max_workers)
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        task_timeout = _runner.task_timeout(task_timeout)
        exit_timeout = _runner.seconds("exit_timeout", exit_timeout)
        if exit_timeout is not None and not exit_timeout >= 0:
            raise ValueError(f"exit_timeout must be a number of seconds >= 0, not {exit_timeout!r}")
        self._warden_start, self._warden_preload = _runner.start_options(start, preload)
        if on_worker_lost is not None and not callable(on_worker_lost):
            raise TypeError("on_worker_lost must be a callable")
        self._warden_limits: dict[str, Any] = {
            "restart": _runner.restart_limit(restart_limit),
            "max_memory_per_child": _runner.memory_size("max_memory_per_child", max_memory_per_child),
            "memory_limit": _runner.memory_size("memory_limit", memory_limit),
            "on_worker_lost": on_worker_lost,
        }
        self._max_workers = max_workers
        # Only a compatibility view: workers always start like "spawn".
        self._mp_context = mp_context if mp_context is not None else multiprocessing.get_context("spawn")
        self._warden_hooks = _runner.worker_hooks(initializer, initargs, finalizer, finalargs, worker_context)
        # A failing initializer is logged as concurrent.futures' workers log it.
        self._warden_hooks["failure_logger"] = "concurrent.futures"
        self._max_tasks_per_child = max_tasks_per_child
        self._warden_task_timeout = task_timeout
        self._warden_forward_logging = forward_logging
        self._warden_exit_timeout = exit_timeout
        self._warden_name = f"ProcessPoolExecutor-{next(_counter)}"
        self._warden_lock = threading.Lock()
        _runner.renew_locks_after_fork(self, "_warden_lock")
        self._warden_shutdown_called = False
        # Once the main thread has finished (before non-daemon threads are
        # joined and atexit handlers run), the executors made before take no
        # new work, as the standard library's refuse it; what was submitted
        # to them still runs to its end. So do those a thread still running
        # makes then, as there (a thread making one per job would otherwise
        # keep the program from ending). One made on the main thread after it
        # (in an ``atexit`` handler) works, as a ``Pool`` made then does.
        self._warden_made_after_main = (
            _pickle.main_thread_done and threading.current_thread() is threading.main_thread()
        )
        self._warden_runner: _runner.Runner | None = None
        self._warden_took_work = False
        self._warden_first_workers_seen = False

    @property
    def _processes(self) -> dict[int, WorkerProcess]:  # type: ignore[override]  # a read-only view
        """The live workers serving the pool, by pid (a compatibility view, as
        the standard library's executor has it): ``pid``, ``is_alive()``,
        ``exitcode``, ``terminate()``, ``kill()``, ``join(timeout)``."""
        runner = self._warden_runner
        if runner is not None and not self._warden_first_workers_seen:
            # The standard library has started a worker when submit()
            # returns; a warden pool's may still be waiting for its zygote.
            self._warden_first_workers_seen = True
            wait_for_workers(runner, 1)
        # As the standard library's, which drops a worker that ends (after
        # max_tasks_per_child, say) before it starts the next: the workers
        # serving the pool, not one still running its exit path.
        return {w.pid: w for w in workers_of(runner, leaving=False)}

    @property
    def _broken(self) -> str | bool:  # type: ignore[override]  # a read-only view
        """Why the pool failed (what ``PoolFailed`` says), or ``False``: a
        compatibility view, as the standard library's executor has it."""
        runner = self._warden_runner
        failure = runner.core.failure() if runner is not None else None
        return failure if failure is not None else False

    @property
    def _shutdown_thread(self) -> bool:  # type: ignore[override]  # a read-only view
        """Whether ``shutdown`` (or ``terminate_workers``...) was called: a
        compatibility view, as the standard library's executor has it."""
        return self._warden_shutdown_called

    def __reduce__(self) -> tuple[Any, ...]:
        return (PoolHandle, ("ProcessPoolExecutor", self._warden_name, os.getpid(), self._max_workers))

    def __copy__(self) -> ProcessPoolExecutor:
        # Pickling gives a child an inert handle; a copy in this process would
        # be one that fails later, naming this process as the owner.
        raise TypeError(
            f"cannot copy {type(self).__name__} {self._warden_name!r}: its workers belong to it alone"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessPoolExecutor:
        return self.__copy__()

    def _warden_ensure_runner(self) -> _runner.Runner:
        # Workers start with the first task, as the standard library starts
        # them on demand; the pickled initargs go to every worker.
        if self._warden_runner is None:
            with _runner.ctrl_c_held():
                self._warden_runner = self._warden_make_runner()
        return self._warden_runner

    def _warden_make_runner(self) -> _runner.Runner:
        runner = _runner.Runner(
            mode="pool",
            name=self._warden_name,
            workers=self._max_workers,
            hooks=self._warden_hooks,
            max_tasks_per_child=self._max_tasks_per_child,
            task_timeout=self._warden_task_timeout,
            forward_logging=self._warden_forward_logging,
            exit_timeout=self._warden_exit_timeout,
            start=self._warden_start,
            preload=self._warden_preload,
            # As concurrent.futures documents: an initializer that raises
            # breaks the executor (its pending and later tasks fail).
            fail_on_init_error=True,
            **self._warden_limits,
        )
        # An executor nobody can reach any more shuts down on its own
        # (queued tasks still run); the callback holds the runner only.
        # (Not at interpreter exit: _runner shuts every pool down then.)
        weakref.finalize(self, runner.close_nowait).atexit = False
        return runner

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Runs ``fn(*args, **kwargs)`` in a worker; returns its future (a
        :class:`warden.Future`, typed as typeshed types the standard
        library's, so that code typed for it checks unchanged).

        Raises at once if the call cannot be pickled (the pool is unaffected).
        """
        return self._warden_submit_payload(self._warden_payload(fn, args, kwargs))

    def schedule(
        self,
        function: Callable[..., _T],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Future[_T]:
        """pebble's ``ProcessPool.schedule``: :meth:`submit` with a time limit
        of the task's own. Past ``timeout`` seconds of running (queued time
        does not count) the task fails with :class:`warden.TaskTimeout` (a
        ``TimeoutError``) and its worker is stopped (its finalizer runs) and
        replaced. ``None``: the pool's ``task_timeout``, if any.
        """
        limit = _runner.task_timeout(timeout, "timeout")
        return self._warden_submit_payload(
            self._warden_payload(function, tuple(args), dict(kwargs or {})), limit
        )

    def _warden_refusal(self) -> str | None:
        """Why a submit now raises, if the executor or the interpreter is
        shutting down (not because of the call); ``None`` while it takes work."""
        if self._warden_shutdown_called:
            return "cannot schedule new futures after shutdown"
        if self._warden_runner is not None and self._warden_runner.interrupted:
            return _runner.INTERRUPTED_EXECUTOR
        if _pickle.main_thread_done and not self._warden_made_after_main:
            if self._warden_runner is not None:
                # The standard library's words: its running executors were shut down then.
                return "cannot schedule new futures after shutdown"
            return "cannot schedule new futures after interpreter shutdown"
        if _runner.exiting:
            return "cannot schedule new futures after interpreter shutdown"
        return None

    def _warden_payload(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, int | None]:
        refusal = self._warden_refusal()
        if refusal is not None:
            raise RuntimeError(refusal)
        if self._warden_runner is None:
            # The first submit starts the pool before it pickles the call, so
            # that the workers' start overlaps the pickling (and, the first
            # time, the pickler's imports).
            with self._warden_lock:
                if not self._warden_shutdown_called:
                    self._warden_ensure_runner()
        return dumps_call(fn, args, kwargs)

    def _warden_queue(
        self,
        call: tuple[bytes, int | None],
        on_done: Callable[[bool, Any], None],
        owner: Any,
        track_start: bool = False,
        timeout: float | None = None,
    ) -> tuple[_runner.Runner, int]:
        """Queues a pickled call (its payload and the segment of its large
        buffers, if any, which this takes over); ``on_done(ok, data)`` gets its
        outcome on the results thread (with ``track_start``, the core tells
        when a worker has taken it); ``owner`` is what ``on_worker_lost``
        reports as the task. Returns the runner and the task id."""
        payload, segment = call
        try:
            with self._warden_lock:
                if self._warden_shutdown_called:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                runner = self._warden_ensure_runner()
        except BaseException:
            _runner.close_fd(segment)
            raise
        try:
            task = runner.submit(
                payload, on_done, timeout, owner=owner, segment=segment, track_start=track_start
            )
        except _warden.CoreError as e:
            if runner.interrupted and e.kind == _warden.ErrorKind.CLOSED:
                raise RuntimeError(_runner.INTERRUPTED_EXECUTOR) from None
            if (
                e.kind == _warden.ErrorKind.CLOSED
                and not self._warden_took_work
                and not self._warden_shutdown_called
            ):
                # The interpreter's exit closed the executor while this, its
                # first call, was being pickled: the standard library's words
                # for an executor that had taken no work when the main thread
                # finished (its later calls get "after shutdown").
                raise RuntimeError("cannot schedule new futures after interpreter shutdown") from None
            raise core_error(e) from None
        self._warden_took_work = True
        return runner, task

    def _warden_submit_payload(
        self, call: tuple[bytes, int | None], timeout: float | None = None
    ) -> Future[Any]:
        future: Future[Any] = Future()
        runner, task = self._warden_queue(call, future._deliver, future, track_start=True, timeout=timeout)
        future._runner, future._task = runner, task
        return future

    def _warden_starter(self, call: tuple[bytes, int | None]) -> _aio.Starter:
        def start(on_done: _aio.OnDone, owner: Any) -> Callable[[], object]:
            runner, task = self._warden_queue(call, on_done, owner)
            # The one way to stop a task, queued or running: cancel(running=True)'s.
            return functools.partial(_runner.cancel_nowait, runner.core, task)

        return start

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``await ex.run(fn, *args, **kwargs)``: runs the call in a worker and
        returns its value (or raises its error) without blocking the event
        loop, and without a thread per call.

        Cancelling the awaiting coroutine cancels the task: a queued task is
        dropped, a running one is stopped through its worker's exit path (its
        finalizer runs) and the worker is replaced.
        """
        from . import _aio

        value: _T = await _aio.call(self._warden_starter(self._warden_payload(fn, args, kwargs)))
        return value

    def amap(
        self, fn: Callable[..., _T], *iterables: Iterable[Any], chunksize: int = 1
    ) -> AsyncGenerator[_T, None]:
        """``async for result in ex.amap(fn, *iterables)``: :meth:`map` for
        asyncio. Every call is queued now (pickling errors raise here, and
        cancel the calls queued before); results come in order. Call it from
        a coroutine. Leaving the loop early (an error, cancellation, or
        ``break`` once the iterator is closed, e.g. by ``contextlib.aclosing``)
        cancels the calls not done, running ones included."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        calls = _calls(fn, iterables, chunksize)
        starters = (self._warden_starter(self._warden_payload(f, args, {})) for f, args in calls)
        from . import _aio

        return _aio.results(self, starters, chunked=chunksize > 1)

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: _progress.ProgressArg = None,
    ) -> Iterator[_T]:
        """Like the built-in ``map``, running in the workers: every call is
        submitted now (pickling errors raise here, and the calls submitted
        before the bad one are cancelled unless they have started), results
        come in order.

        ``timeout`` bounds the whole iteration; ``chunksize`` sends that many
        calls per task; ``progress`` (``True``, a tqdm bar or a dict of tqdm
        options) shows a bar that counts results as they arrive.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        bar = _progress.make(progress, _progress.length(*iterables))
        futures: list[concurrent.futures.Future[Any]] = []
        try:
            items = 0
            for f, args in _calls(fn, iterables, chunksize):
                try:
                    future = self.submit(f, *args)
                except BaseException:
                    # The caller gets no iterator, so no handle on the calls
                    # already submitted: those still queued are cancelled, as
                    # a Pool.map with a bad item sends none of its chunks. (An
                    # error of the iterables leaves them to run, as the
                    # standard library's map does; and so does a shutdown
                    # from another thread, or the interpreter's exit, which
                    # runs what was submitted.)
                    if self._warden_refusal() is None:
                        for future in futures:
                            future.cancel()
                    raise
                size = len(args[1]) if chunksize > 1 else 1
                items += size
                if bar is not None:
                    future.add_done_callback(functools.partial(_advance, bar, size))
                futures.append(future)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        if bar is not None:
            bar.set_total(items)
        return _results(futures, end, chunked=chunksize > 1, bar=bar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops taking tasks. Queued tasks run (unless ``cancel_futures``),
        then every worker retires through its exit path. With ``wait``, returns
        once all of that is done and every future has its outcome."""
        with self._warden_lock:
            self._warden_shutdown_called = True
            runner = self._warden_runner
        if runner is None:
            return
        if cancel_futures:
            # Every queued future reads as cancelled when this returns, as in
            # the standard library (one request for all of them); the core
            # then cancels whatever came after. A task sent ahead to a worker
            # (the standard library's call queue) is asked back: cancelled
            # if the worker gives it back, else it runs and has its result.
            # Their done-callbacks run on the results thread, as the standard
            # library's run on its manager thread: not here, where the caller
            # may hold a lock they take (and wait=False must not wait).
            pending = runner.pending
            for task in _runner.cancel_all_queued(runner.core):
                future = getattr(pending.get(task), "__self__", None)
                if isinstance(future, Future):
                    future._mark_cancelled(callbacks=False)
            runner.core.close_cancel_queued()
        else:
            runner.core.close()
        if wait:
            runner.join()

    def terminate_workers(self) -> None:
        """Stops every worker now (as in Python 3.14): queued and running tasks
        are cancelled, workers get SIGTERM (their finalizers run) and SIGKILL
        after the grace period; then shuts down. Returns when they are gone."""
        self._warden_stop_workers(kill=False)

    def kill_workers(self) -> None:
        """Kills every worker with SIGKILL now (as in Python 3.14); no
        finalizers run. Queued and running tasks are cancelled."""
        self._warden_stop_workers(kill=True)

    def _warden_stop_workers(self, kill: bool) -> None:
        with self._warden_lock:
            self._warden_shutdown_called = True
            runner = self._warden_runner
        if runner is None:
            return
        if kill:
            runner.core.kill()
        else:
            runner.core.terminate()
        runner.join_bounded()

    # Typed as typeshed types the standard library's, for overrides.
    def __exit__(  # type: ignore[exit-return]
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: types.TracebackType | None,
    ) -> bool | None:
        # Ctrl-C inside the with block (bare, or in an exception group, as a
        # trio nursery raises it), or (in a worker) a stop that reached the
        # task using this executor: stop the workers rather than wait.
        if exc_type is not None and (
            issubclass(exc_type, KeyboardInterrupt) or _runner.is_ctrl_c(exc_val) or _runner.stop_requested
        ):
            runner = self._warden_runner
            if runner is not None and not runner.interrupted:
                runner.interrupt()
        self.shutdown(wait=True)
        return False


def _calls(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int
) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...]]]:
    """The calls of a ``map``: ``(fn, args)`` per item, or one ``run_chunk``
    call per ``chunksize`` items."""
    if chunksize == 1:
        for args in zip(*iterables, strict=False):
            yield fn, args
    elif len(iterables) == 1:
        # One iterable: chunks of the items themselves, not of 1-tuples (the
        # usual case; half the objects to build, pickle and unpickle).
        for chunk in chunks(iterables[0], chunksize):
            yield run_chunk, (fn, chunk, False)
    else:
        it = zip(*iterables, strict=False)
        while chunk := tuple(itertools.islice(it, chunksize)):
            yield run_chunk, (fn, chunk, True)


def _advance(bar: _progress.Progress, size: int, future: Future[Any]) -> None:
    if not future.cancelled() and future._error is None:
        bar.advance(size)


def _results(
    futures: list[concurrent.futures.Future[Any]],
    end: float | None,
    chunked: bool,
    bar: _progress.Progress | None = None,
) -> Iterator[Any]:
    """Yields the results of ``futures`` in order; cancels the rest if stopped."""
    try:
        futures.reverse()
        while futures:
            # Nothing here holds a result once it is yielded (nor its future).
            if chunked:
                yield from _next_result(futures, end)
            else:
                yield _next_result(futures, end)
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close()


def _next_result(futures: list[concurrent.futures.Future[Any]], end: float | None) -> Any:
    """The result of the last future of ``futures``, which it removes;
    cancels that future if waiting for it fails."""
    future = futures.pop()
    try:
        return future.result() if end is None else future.result(end - time.monotonic())
    except BaseException:
        future.cancel()
        raise
    finally:
        del future
