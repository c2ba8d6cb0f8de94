"""``warden.Pool``: the ``multiprocessing.Pool`` API on warden's core."""

from __future__ import annotations

import builtins
import collections
import functools
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import threading
import time
import types
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, cast

from . import _native, _progress, _runner, _warden
from ._children import VacantWorker, WorkerProcess, starts_refused, wait_for_workers, workers_of
from ._errors import ErrorData, core_error
from ._futures import refuse_pickling
from ._handles import PoolHandle
from ._inherit import own_api_only
from ._pickle import dumps_call, dumps_oob, loads
from ._remote import text_of
from ._tasks import chunks, run_chunk

if TYPE_CHECKING:
    # asyncio costs ~40 ms to import: loaded when a coroutine API is first used.
    from . import _aio

_counter = itertools.count(1)
_job_counter = itertools.count()

_P = ParamSpec("_P")
_S = TypeVar("_S")
_T = TypeVar("_T")

INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

#: How long a look at ``Pool._pool`` waits for a worker being replaced (seconds).
REPLACE_WAIT = 2.0

#: Once its workers are gone, :meth:`Pool.terminate` waits for the results
#: thread to deliver the outcomes and run their callbacks, unless it delivers
#: none for this long (seconds): one waits for something the caller holds.
TERMINATE_DELIVERY_WAIT = 1.0


_own_api_only = own_api_only("multiprocessing.pool")


class TimeoutError(multiprocessing.TimeoutError, builtins.TimeoutError):
    """What ``get(timeout)`` and ``next(timeout)`` raise when the time passes
    first: ``multiprocessing.TimeoutError``, as the standard library's Pool
    raises, and the built-in ``TimeoutError`` too (which ``warden.TimeoutError``
    and ``concurrent.futures.TimeoutError`` are), so that either ``except``
    catches it."""


@_own_api_only
class Pool(multiprocessing.pool.Pool):
    """A pool of worker processes that always clean up after themselves.

    A subclass of ``multiprocessing.pool.Pool`` (none of whose machinery it
    uses), so that libraries that accept only that type (dask's ``pool=``)
    take it.

    The API of ``multiprocessing.Pool``, plus ``finalizer(*finalargs)``, run in
    every worker at the end of its life, and ``worker_context``, a factory of a
    context manager entered when a worker starts and exited when it ends (tasks
    reach what it yields with :func:`warden.worker_context`); ``start`` and
    ``preload`` choose how workers start, as for
    :class:`warden.ProcessPoolExecutor`: forked from a zygote that imported the
    ``preload`` modules (the default), or each by exec (``start="exec"``);
    ``restart_limit``, ``max_memory_per_child``, ``memory_limit`` and
    ``on_worker_lost`` as on :class:`warden.ProcessPoolExecutor`. Records logged in
    the workers are handled by this process's ``logging`` unless
    ``forward_logging=False``; ``run`` and ``amap`` serve asyncio.

    Differences from the standard library that users can rely on: a task that
    raises a ``BaseException`` or whose worker dies fails with an error instead
    of hanging the pool; ``terminate()`` (and leaving a ``with`` block) stops
    workers gracefully (their finalizers run) before it kills them; tasks it
    cancels raise ``CancelledError`` instead of never finishing.

    ``context`` is accepted for compatibility and ignored: this process is
    never forked; workers are fresh interpreters (or forks of one, the
    zygote), as under the ``"spawn"`` start method.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: multiprocessing.context.BaseContext | None = None,
        *,
        finalizer: Callable[..., object] | None = None,
        finalargs: Iterable[Any] = (),
        worker_context: Callable[[], Any] | None = None,
        start: str | None = None,
        preload: Iterable[str] | None = None,
        restart_limit: tuple[int, float] | None = _runner.DEFAULT_RESTART_LIMIT,
        max_memory_per_child: int | str | None = None,
        memory_limit: int | str | None = None,
        on_worker_lost: Callable[[_runner.WorkerLost], object] | None = None,
        forward_logging: bool = True,
        task_timeout: float | None = None,
    ) -> None:
        # multiprocessing.pool.Pool.__init__ is not called: none of its queues,
        # threads or processes exist here.
        if processes is None:
            processes = _runner.cpu_count()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        start, preload = _runner.start_options(start, preload)
        task_timeout = _runner.task_timeout(task_timeout)
        self._processes = processes
        # The results not ready yet, by job number, as the standard library
        # keeps them (``len(pool._cache)`` is a common way to bound the work
        # in flight); an imap's iterator is not in it.
        self._cache: dict[int, ApplyResult[Any]] = {}
        self._warden_first_workers_seen = False
        #: What ``_pool`` last listed (it lists them, exited, once the pool stops).
        self._warden_last_workers: Sequence[WorkerProcess | VacantWorker] = []
        self._ctx = context
        self._warden_name = f"Pool-{next(_counter)}"
        # RUN once made, as the standard library's: a constructor that raises
        # leaves no "unclosed running pool" to warn about.
        self._state = INIT
        # imap feeders still consuming their iterables: close() lets them
        # finish, and the last one closes the runner.
        self._warden_feeders = 0
        self._warden_feeders_lock = threading.Lock()
        _runner.renew_locks_after_fork(self, "_warden_feeders_lock")
        hooks = _runner.worker_hooks(initializer, initargs, finalizer, finalargs, worker_context)
        # Kept for the pool's life, as the standard library's pool keeps its
        # initargs: a shared object they pass (a spawn context's Lock or
        # Queue, a manager's proxy) lives while its owner in this process
        # does, and every worker, replacements too, opens it. On the pool,
        # not its runner, which the pool's finalizer holds: an initializer
        # that is a method of the pool's owner would keep both alive for good.
        self._warden_hooks = hooks
        if on_worker_lost is not None and not callable(on_worker_lost):
            raise TypeError("on_worker_lost must be a callable")
        # A Ctrl-C is held back until the pool is made (see ctrl_c_held). Raised
        # here, it leaves the caller without the pool: that is terminated, not
        # left running out of reach (a notebook keeps the traceback, and the
        # pool with it, until another error and a garbage collection).
        try:
            with _runner.ctrl_c_held():
                self._warden_runner = _runner.Runner(
                    mode="pool",
                    name=self._warden_name,
                    workers=processes,
                    hooks=hooks,
                    max_tasks_per_child=maxtasksperchild,
                    exit_policy="terminate",
                    start=start,
                    preload=preload,
                    restart=_runner.restart_limit(restart_limit),
                    max_memory_per_child=_runner.memory_size("max_memory_per_child", max_memory_per_child),
                    memory_limit=_runner.memory_size("memory_limit", memory_limit),
                    on_worker_lost=on_worker_lost,
                    forward_logging=forward_logging,
                    task_timeout=task_timeout,
                )
                # A pool nobody can reach any more is terminated, as the standard
                # library does; results being waited for keep their pool reachable.
                # (Not at interpreter exit: _runner shuts every pool down then.)
                weakref.finalize(self, self._warden_runner.terminate_nowait).atexit = False
        except KeyboardInterrupt:
            runner = self.__dict__.get("_warden_runner")
            if runner is not None:
                runner.terminate_nowait()
            raise
        self._state = RUN

    #: RUN, CLOSE or TERMINATE, as the standard library's (see ``_state``).
    _warden_set_state = INIT

    @property
    def _state(self) -> str:
        """The standard library's attribute (read by code in the wild), also
        ``TERMINATE`` once a Ctrl-C while waiting on the pool stopped it."""
        self._warden_stopped_by_interrupt()
        return self._warden_set_state

    @_state.setter
    def _state(self, state: str) -> None:
        self._warden_set_state = state

    def _warden_interrupt(self) -> None:
        """A Ctrl-C while waiting on the pool: it stops (see
        ``Runner.interrupt``); ``_pool`` keeps listing the workers it had."""
        if not self._warden_runner.interrupted:
            self._warden_remember_workers()
        self._warden_runner.interrupt()

    def _warden_stopped_by_interrupt(self) -> bool:
        """Whether a Ctrl-C while waiting on this pool stopped it: its state
        is then ``TERMINATE``, as after :meth:`terminate`."""
        runner = getattr(self, "_warden_runner", None)  # None if the constructor raised
        if runner is not None and runner.interrupted:
            self._warden_set_state = TERMINATE
            return True
        return False

    def __repr__(self) -> str:
        self._warden_stopped_by_interrupt()
        cls = type(self)
        return f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={self._processes}>"

    @property
    def _pool(self) -> list[WorkerProcess | VacantWorker]:
        """The pool's workers (a compatibility view, as ``multiprocessing.Pool``
        has it): ``pid``, ``name``, ``is_alive()``, ``exitcode``,
        ``terminate()``, ``kill()``, ``join(timeout)``.

        As the standard library's list, it holds ``processes`` of them, which
        code in the wild takes for the number of workers (dask does): the
        workers serving the pool (not one on its way out); while one is being
        replaced, the look waits for it (at most :data:`REPLACE_WAIT`
        seconds, as the standard library replaces one in the same pass); and
        once the pool has stopped, the workers it had, exited. The first look
        waits (bounded) for the pool's first workers to start. While the
        system refuses the pool some of its workers (``ulimit -u``, ``-n``),
        no look waits for them: the places they would fill hold workers that
        have exited, or ones never started (no pid, not alive)."""
        runner = self._warden_runner
        if not self._warden_first_workers_seen:
            self._warden_first_workers_seen = True
            if self._state == RUN:
                wait_for_workers(runner, self._processes)
            elif self._state == CLOSE:  # (its workers may retire as they start)
                wait_for_workers(runner, self._processes, REPLACE_WAIT)
        size = self._processes
        # Running: not a worker on its way out (its replacement is coming);
        # closed: those finishing the work are the pool's workers still.
        serving = workers_of(runner, leaving=self._state != RUN)
        if len(serving) < size and self._state == RUN:
            began = time.monotonic()
            while (
                len(serving) < size
                and not runner.core.is_shut_down()
                and not starts_refused(runner, began)
                and time.monotonic() - began < REPLACE_WAIT
            ):
                time.sleep(0.005)
                serving = workers_of(runner, leaving=False)
        # Short of workers (the pool stopped, or cannot start them): those
        # seen last stand in, exited, as the standard library keeps them;
        # in a stopped pool, then those that exited last, and places no
        # worker filled (it stopped before they started); in a running pool
        # the system refuses workers, places none filled yet.
        seen = {id(w) for w in serving}
        workers: list[WorkerProcess | VacantWorker] = (
            cast("list[WorkerProcess | VacantWorker]", serving)
            + [w for w in self._warden_last_workers if id(w) not in seen][: max(0, size - len(serving))]
        )
        if len(workers) < size and self._state == RUN and not runner.core.is_shut_down():
            workers += [VacantWorker(runner.worker_name(i + 1)) for i in range(len(workers), size)]
        if len(workers) < size and runner.core.is_shut_down():
            # Workers that ran and exited before any look: the last to exit.
            listed = {w.pid for w in workers}
            for pid in reversed(runner.core.exited(size)):
                if len(workers) < size and pid not in listed:
                    workers.append(WorkerProcess(runner, len(workers) + 1, pid))
            workers += [VacantWorker(runner.worker_name(i + 1)) for i in range(len(workers), size)]
        self._warden_last_workers = workers
        return workers

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # As multiprocessing.Pool: a running pool should have been closed or
        # terminated (the finalizer above terminates it now).
        if self._state == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (PoolHandle, ("Pool", self._warden_name, os.getpid(), self._processes))

    def __copy__(self) -> Pool:
        # The standard library's error, where pickling gives a child a handle.
        raise NotImplementedError("pool objects cannot be copied, passed between processes or pickled")

    def __deepcopy__(self, memo: dict[int, Any]) -> Pool:
        return self.__copy__()

    def _check_running(self) -> None:
        if self._warden_stopped_by_interrupt():
            raise ValueError(_runner.INTERRUPTED_POOL)
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _warden_submit(
        self, payload: bytes, segment: int | None, on_done: Callable[[bool, Any], None], owner: Any = None
    ) -> int:
        try:
            return self._warden_runner.submit(payload, on_done, owner=owner, segment=segment)
        except _warden.CoreError as e:
            if e.kind == _warden.ErrorKind.CLOSED:
                self._check_running()
                raise ValueError("Pool not running") from None
            raise core_error(e) from None

    # -- single calls ------------------------------------------------------

    def apply(
        self,
        func: Callable[..., _T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
    ) -> _T:
        """``func(*args, **kwds)`` in a worker; waits for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., _T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callable[[_T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> multiprocessing.pool.ApplyResult[_T]:
        """Queues ``func(*args, **kwds)``; returns an :class:`ApplyResult`
        (typed, as every result of the standard library's methods here, as
        typeshed types the standard library's).
        A call that cannot be pickled fails through its result, as in the
        standard library: ``error_callback`` gets the pickler's error (on
        another thread) and ``get()`` raises it; the pool is unaffected."""
        self._check_running()
        try:
            try:
                call = _arguments(args, kwds)
            except TypeError:
                # Arguments ``func(*args, **kwds)`` may refuse, or a mapping
                # that is not a ``Mapping``: the call goes as it is, as the
                # standard library sends it, and the worker's
                # ``func(*args, **kwds)`` takes it or fails it (through the
                # result and error_callback).
                payload, segment = dumps_oob((func, args, kwds))
            else:
                payload, segment = dumps_call(func, *call)
        except Exception as e:
            failed: ApplyResult[_T] = ApplyResult(self, callback, error_callback)
            _deliver_apart(failed._deliver, False, ErrorData.local(e, "cannot pickle the call"))
            return failed
        try:
            result: ApplyResult[_T] = ApplyResult(self, callback, error_callback)
        except BaseException:
            _runner.close_fd(segment)
            raise
        try:
            result._tasks.append(self._warden_submit(payload, segment, result._deliver, result))
        except BaseException:
            result._forget()
            raise
        return result

    # -- asyncio -----------------------------------------------------------

    def _warden_starter(self, call: tuple[bytes, int | None]) -> _aio.Starter:
        def start(on_done: _aio.OnDone, owner: Any) -> Callable[[], object]:
            payload, segment = call
            try:
                self._check_running()
            except BaseException:
                _runner.close_fd(segment)
                raise
            task = self._warden_submit(payload, segment, on_done, owner)
            # The one way to stop a task, queued or running: cancel(running=True)'s.
            return functools.partial(_runner.cancel_nowait, self._warden_runner.core, task)

        return start

    async def run(self, func: Callable[_P, _T], /, *args: _P.args, **kwds: _P.kwargs) -> _T:
        """``await pool.run(func, *args, **kwds)``: :meth:`apply` for asyncio,
        without a thread per call. Cancelling the awaiting coroutine cancels
        the task: a queued task is dropped, a running one is stopped through
        its worker's exit path (its finalizer runs) and the worker is replaced."""
        self._check_running()
        from . import _aio

        return await _aio.call(self._warden_starter(dumps_oob((func, args, kwds))), RemoteTraceback)  # type: ignore[no-any-return]

    def amap(
        self, func: Callable[[_S], _T], iterable: Iterable[_S], chunksize: int = 1
    ) -> AsyncGenerator[_T, None]:
        """``async for result in pool.amap(func, iterable)``: :meth:`imap` for
        asyncio. Every chunk is queued now (pickling errors raise here);
        results come in order. Leaving the loop early cancels the chunks not
        done, running ones included (see :meth:`ProcessPoolExecutor.amap`)."""
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        it = iter(iterable)
        starters = (
            self._warden_starter(dumps_oob((run_chunk, (func, chunk, False), {})))
            for chunk in iter(lambda: tuple(itertools.islice(it, chunksize)), ())
        )
        from . import _aio

        return _aio.results(self, starters, chunked=True, traceback_type=RemoteTraceback)

    # -- maps --------------------------------------------------------------

    def map(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int | None = None,
        *,
        progress: _progress.ProgressArg = None,
    ) -> list[_T]:
        """``list(map(func, iterable))`` computed by the workers, in chunks.
        ``progress`` (``True``, a tqdm bar or a dict of tqdm options) shows a
        bar that counts results as they arrive."""
        return self._warden_map_wait(self._map_async(func, iterable, False, chunksize, progress=progress))

    def starmap(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        progress: _progress.ProgressArg = None,
    ) -> list[_T]:
        """Like :meth:`map`, calling ``func(*args)`` for each ``args``."""
        return self._warden_map_wait(self._map_async(func, iterable, True, chunksize, progress=progress))

    @staticmethod
    def _warden_map_wait(result: MapResult[_T]) -> list[_T]:
        try:
            return result.get()
        finally:
            if result._progress is not None:
                result._progress.close()

    def map_async(
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int | None = None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> multiprocessing.pool.MapResult[_T]:
        """Asynchronous :meth:`map`; returns a :class:`MapResult`."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> multiprocessing.pool.ApplyResult[list[_T]]:
        """Asynchronous :meth:`starmap`; returns a :class:`MapResult`."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def _map_async(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Any],
        star: bool,
        chunksize: int | None,
        callback: Callable[[list[_T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        progress: _progress.ProgressArg = None,
    ) -> MapResult[_T]:
        # Until its last chunk is queued, a map holds the pool open as an
        # imap's feeder does: a close() from another thread meanwhile takes
        # no new work, but a map that was running gets every chunk (the
        # standard library queues a map as one task).
        with self._warden_feeders_lock:
            self._check_running()
            self._warden_feeders += 1
        try:
            return self._warden_queue_map(func, iterable, star, chunksize, callback, error_callback, progress)
        finally:
            self._warden_feeder_done()

    def _warden_queue_map(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Any],
        star: bool,
        chunksize: int | None,
        callback: Callable[[list[_T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        progress: _progress.ProgressArg,
    ) -> MapResult[_T]:
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        length = len(items)  # type: ignore[arg-type]
        if chunksize is None:
            chunksize, extra = divmod(length, self._processes * 4)
            if extra:
                chunksize += 1
        if length == 0:
            chunksize = 0
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        count = -(-length // chunksize) if length else 0
        result: MapResult[_T] = MapResult(self, count, callback, error_callback)
        result._chunksize = chunksize
        result._progress = _progress.make(progress, length)
        # Each chunk goes to the workers as soon as it is pickled, so they
        # start while the rest is being pickled. A chunk that cannot be
        # pickled fails the map, as in the standard library (error_callback,
        # get()): the chunks after it are not made, those queued are
        # cancelled. One that cannot be queued raises here: the result is
        # abandoned (it calls no callback), the queued chunks are cancelled.
        made = 0
        try:
            for i, chunk in enumerate(chunks(items, chunksize) if count else ()):
                if i >= count:
                    result._one_more_chunk()
                if chunksize == 1 and (not star or type(chunk[0]) is tuple):
                    # One item, one plain call (cheaper to pickle: a call of
                    # a function with scalar arguments takes the short cut);
                    # its result is the item's, not a list.
                    call: tuple[Any, ...] = (func, chunk[0] if star else (chunk[0],), {})
                    deliver = _ChunkOutcome(result, i, True)
                else:
                    call = (run_chunk, (func, chunk, star), {})
                    deliver = _ChunkOutcome(result, i, False)
                try:
                    payload, segment = dumps_oob(call)
                except Exception as e:
                    result._unpicklable_chunk(i, ErrorData.local(e, f"cannot pickle chunk {i} of the map"))
                    return result
                del chunk, call
                result._tasks.append(self._warden_submit(payload, segment, deliver, result))
                made = i + 1
        except BaseException:
            result._abandon()
            raise
        result._queued(made)
        return result

    def imap(  # type: ignore[override]  # chunksize: an int, never None (a TypeError there too)
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int = 1,
        *,
        progress: _progress.ProgressArg = None,
    ) -> _IMapResult[_T]:
        """Like :meth:`map`, lazily: an iterator of results in order. The
        iterable is consumed by a feeder thread, as far ahead of the workers
        as keeps them busy (see :data:`IMAP_AHEAD_CHUNKS`); dropping the
        iterator stops it. ``progress``: as for :meth:`map` (the bar's total
        is known only if the iterable has a length)."""
        return self._warden_imap(func, iterable, chunksize, unordered=False, progress=progress)

    def imap_unordered(  # type: ignore[override]  # chunksize: as for imap
        self,
        func: Callable[[_S], _T],
        iterable: Iterable[_S],
        chunksize: int = 1,
        *,
        progress: _progress.ProgressArg = None,
    ) -> _IMapResult[_T]:
        """Like :meth:`imap`, yielding results as they complete (an
        :class:`IMapUnorderedIterator`)."""
        return self._warden_imap(func, iterable, chunksize, unordered=True, progress=progress)

    def _warden_imap(
        self,
        func: Callable[..., _T],
        iterable: Iterable[Any],
        chunksize: int,
        unordered: bool,
        progress: _progress.ProgressArg = None,
    ) -> IMapIterator[_T]:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        kind = IMapUnorderedIterator if unordered else IMapIterator
        result: IMapIterator[_T] = kind(self, chunksize > 1)
        result._progress = _progress.make(progress, _progress.length(iterable))
        # Whoever says first that this feeder is done (it, or a start() a
        # Ctrl-C cut short after the thread had begun) takes it off the count.
        counted = [True]
        feeder = threading.Thread(
            target=_feed_imap,
            args=(self, func, _iterate(iterable), chunksize, weakref.ref(result), counted),
            name="warden-feeder",
            daemon=True,
        )
        with self._warden_feeders_lock:
            # Checked again with the count: a close() from another thread
            # since the check above closed the runner without waiting for it.
            self._check_running()
            self._warden_feeders += 1
        try:
            feeder.start()
        except BaseException:
            self._warden_feeder_done(counted)
            raise
        return result

    def _warden_feeder_done(self, counted: list[bool] | None = None) -> None:
        """An imap feeder has consumed its iterable (or stopped): the last
        one closes the runner if :meth:`close` was called meanwhile.
        ``counted``: the feeder's mark, cleared by the first call for it."""
        with self._warden_feeders_lock:
            if counted is not None:
                if not counted[0]:
                    return
                counted[0] = False
            self._warden_feeders -= 1
            close = self._warden_feeders == 0 and self._state == CLOSE
        if close:
            self._warden_runner.close_nowait()

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Takes no more tasks; queued tasks still run, then the workers retire.
        An ``imap`` already started still gets every item of its iterable, and
        a map another thread is queuing every chunk, as with the standard
        library: the workers retire after the last one."""
        self._warden_stopped_by_interrupt()
        with self._warden_feeders_lock:
            if self._state != RUN:
                return
            self._state = CLOSE
            close = self._warden_feeders == 0
        self._warden_remember_workers()
        if close:
            self._warden_runner.close_nowait()

    def terminate(self) -> None:
        """Cancels queued and running tasks and stops every worker: SIGTERM
        (its finalizer runs), then SIGKILL after the grace period. Returns once
        every worker is gone and the results thread has delivered the
        outcomes (their callbacks have run), unless it delivers none for
        :data:`TERMINATE_DELIVERY_WAIT` seconds: the callbacks of the tasks
        it cancels (``error_callback`` with ``CancelledError``, which the
        standard library never calls) may need a lock this caller holds.
        :meth:`join` waits for them all."""
        running, self._state = self._state == RUN, TERMINATE
        if running:
            self._warden_remember_workers()
        self._warden_runner.terminate_nowait()
        self._warden_runner.join_bounded(TERMINATE_DELIVERY_WAIT)

    def _warden_remember_workers(self) -> None:
        """The workers ``_pool`` lists once the pool has stopped: those
        serving it now (as the standard library's list keeps them)."""
        serving = workers_of(self._warden_runner, leaving=False)
        if serving:
            self._warden_last_workers = serving

    def join(self) -> None:
        """Waits for the workers to exit; call :meth:`close` or :meth:`terminate` first."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        self._warden_runner.join()

    def __enter__(self) -> Self:
        self._check_running()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: types.TracebackType | None,
    ) -> None:
        self.terminate()


def _arguments(args: Any, kwds: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwds`` as a tuple and a dict; ``TypeError`` if ``args``
    is not iterable or ``kwds`` not a ``Mapping``."""
    if not isinstance(kwds, Mapping):
        raise TypeError(f"not a Mapping: {type(kwds).__name__}")
    return tuple(args), dict(kwds)


#: Serialises making a result's event and making the result ready.
_EVENT_LOCK = threading.Lock()


@_own_api_only
class ApplyResult(multiprocessing.pool.ApplyResult[_T]):
    """The result of :meth:`Pool.apply_async`, as in ``multiprocessing``.

    A subclass of ``multiprocessing.pool.ApplyResult`` (``AsyncResult``),
    none of whose machinery it uses, so that code and annotations naming
    that type take it."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        refuse_pickling(self, "its get()")

    def __copy__(self) -> ApplyResult[_T]:
        return self  # as a Future's (see Future.__copy__)

    def __init__(
        self,
        pool: Pool,
        callback: Callable[[_T], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        # multiprocessing.pool.ApplyResult.__init__ is not called: its
        # machinery is not used, but the job number and the entry in the
        # pool's ``_cache`` until the result is ready are kept.
        self._pool: Pool | None = pool  # kept alive until the result is ready
        self._job = next(_job_counter)
        pool._cache[self._job] = self
        self._core = pool._warden_runner.core
        self._tasks: list[int] = []
        self._ready = False
        # Made by the first wait that finds the result not ready: most results
        # are ready by the time anyone asks, and an Event is most of one's memory.
        self._event: threading.Event | None = None
        self._callback = callback
        self._error_callback = error_callback
        self._value: Any = None
        self._error: ErrorData | None = None

    def _interrupt(self) -> None:
        pool = self._pool
        if pool is not None:
            pool._warden_interrupt()

    def _set_ready(self) -> None:
        with _EVENT_LOCK:
            self._ready = True
            event = self._event
        if event is not None:
            event.set()

    def ready(self) -> bool:
        """Whether the call has completed."""
        return self._ready

    def successful(self) -> bool:
        """Whether the call completed without raising; ``ValueError`` if not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def cancel(self, running: bool = False) -> bool:
        """*warden*: cancels the call (every chunk of a map). Without
        ``running``, only what is still queued; with ``running=True``, a
        running call too: its worker is stopped (SIGTERM, its finalizer runs,
        SIGKILL after the grace period) and replaced. ``get()`` then raises
        ``concurrent.futures.CancelledError``. Returns whether anything was
        cancelled (``False`` once the result is ready)."""
        if self.ready():
            return False
        cancelled = False
        for task in self._tasks:
            cancelled = _runner.cancel(self._core, task, running) or cancelled
        return cancelled

    def wait(self, timeout: float | None = None) -> None:
        """Waits until the result is ready or ``timeout`` seconds pass."""
        if not self._ready:
            self._wait(timeout)
        if self._ready and self._error is not None and self._error.by_exit:
            # Cancelled by the pool's end at interpreter exit: a daemon thread
            # stays blocked, as on the standard library's pool, whose
            # results a terminate leaves unready for good.
            _runner.park_at_exit()

    def _wait(self, timeout: float | None) -> None:
        with _EVENT_LOCK:
            if self._ready:
                return
            if timeout is None:
                _runner.refuse_self_wait(self._core)
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        try:
            event.wait(timeout)
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def get(self, timeout: float | None = None) -> _T:
        """The result; raises a fresh exception if the call failed, and
        a ``multiprocessing.TimeoutError`` (:class:`TimeoutError`) if
        ``timeout`` seconds pass first."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._error is not None:
            raise _exception(self._error)
        return self._value  # type: ignore[no-any-return]

    def _deliver(self, ok: bool, data: Any) -> None:
        if ok:
            try:
                value = loads(data)
            except BaseException as e:  # SystemExit too: this is the results thread
                self._finish(None, ErrorData.local(e, "cannot unpickle the task's result"))
            else:
                self._finish(value, None)
        else:
            self._finish(None, data)

    def _finish(self, value: Any, error: ErrorData | None) -> None:
        self._value, self._error = value, error
        try:
            if error is None:
                if self._callback is not None:
                    self._callback(value)
            elif self._error_callback is not None:
                self._error_callback(_exception(error))
        finally:
            self._set_ready()
            self._forget()

    def _forget(self) -> None:
        """Lets go of the pool, and leaves its ``_cache``: no outcome will come."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._cache.pop(self._job, None)


AsyncResult = ApplyResult


def _deliver_apart(deliver: Callable[[bool, Any], None], ok: bool, data: Any) -> None:
    """Gives a result an outcome this thread found (a call that could not be
    pickled) on a thread of its own, as outcomes come on the results thread:
    a callback never runs inside the call that queued it (where the caller
    may hold a lock the callback takes)."""
    _native.Thread(_runner.call_outcome_callback, (deliver, ok, data), "warden-outcome").start()


class _ChunkOutcome:
    """Where the outcome of one chunk of a map goes:
    ``result._deliver_chunk(index, ok, data, one)``. A slotted object, not a
    ``functools.partial`` of the bound method (with its keyword dict, about
    420 bytes a chunk, against about 60): a map in chunks of one holds one
    for each item not done yet."""

    __slots__ = ("index", "one", "result")

    def __init__(self, result: MapResult[Any], index: int, one: bool) -> None:
        self.result = result
        self.index = index
        self.one = one

    def __call__(self, ok: bool, data: Any) -> None:
        self.result._deliver_chunk(self.index, ok, data, self.one)


@_own_api_only
class MapResult(ApplyResult[list[_T]], multiprocessing.pool.MapResult[_T]):
    """The result of :meth:`Pool.map_async`: ready when every chunk is (a
    ``multiprocessing.pool.MapResult`` too)."""

    def __init__(
        self,
        pool: Pool,
        chunks: int,
        callback: Callable[[list[_T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        super().__init__(pool, callback, error_callback)
        self._lock = threading.Lock()
        _runner.renew_locks_after_fork(self, "_lock")
        self._progress: _progress.Progress | None = None
        self._left = chunks
        self._count = chunks
        #: Until the map's last chunk is queued, it is not ready, whatever
        #: its iterable's ``len()`` said (see ``_one_more_chunk``, ``_queued``).
        self._queueing = chunks > 0
        #: The map's chunk size (the standard library's attribute).
        self._chunksize = 0
        # Chunks that came before one ahead of them; each joins ``_gathered``
        # as soon as every chunk before it has, so the whole list is ready
        # moments after the last chunk rather than built from all of them then.
        self._chunks: list[Any] = [None] * chunks
        self._gathered: list[Any] = []
        self._merged = 0
        self._first_error: ErrorData | None = None
        if chunks == 0:
            self._value = []
            self._set_ready()
            self._forget()

    @property
    def _number_left(self) -> int:
        """How many chunks are still to come, 0 once the map is ready: the
        standard library's attribute, which progress loops read
        (``while not r.ready(): ... r._number_left``)."""
        return 0 if self.ready() else max(self._left, 0)

    def _abandon(self) -> None:
        """The map could not be queued whole: its queued chunks are
        cancelled, and no outcome will ever make it ready or call back."""
        with self._lock:
            self._left = -1
            self._chunks = []
        for task in self._tasks:
            _runner.cancel(self._core, task, False)
        if self._progress is not None:
            self._progress.close()
        self._forget()

    def _deliver_chunk(self, index: int, ok: bool, data: Any, one: bool = False) -> None:
        """A chunk's outcome; ``one``: a chunk of one item sent as a plain
        call, whose result is the item's, not a list."""
        if self._left < 0:
            return  # abandoned
        error = None
        values: list[Any] = []
        if ok:
            try:
                values = [loads(data)] if one else loads(data)
            except BaseException as e:  # SystemExit too: this is the results thread
                error = ErrorData.local(e, "cannot unpickle a result")
            else:
                if self._progress is not None:
                    self._progress.advance(len(values))
        else:
            error = data
            error.in_list = one
        with self._lock:
            if self._left < 0:
                return
            if error is not None:
                if self._first_error is None:
                    self._first_error = error
                    self._chunks = []
                    self._gathered = []
            elif self._first_error is None:
                chunks = self._chunks
                chunks[index] = values
                while self._merged < len(chunks) and chunks[self._merged] is not None:
                    self._gathered.extend(chunks[self._merged])
                    chunks[self._merged] = None
                    self._merged += 1
            self._left -= 1
            done = self._left == 0 and not self._queueing
        if done:
            self._complete()

    def _one_more_chunk(self) -> None:
        """The iterable gave more items than its ``len()`` said: one more
        chunk is being queued, and the result holds its items too (as the
        standard library's list grows by them)."""
        with self._lock:
            self._count += 1
            self._left += 1
            self._chunks.append(None)

    def _unpicklable_chunk(self, index: int, error: ErrorData) -> None:
        """Chunk ``index`` could not be pickled: the map fails with ``error``
        (whatever the chunks queued before it give), once their outcomes are
        in. Those still queued are cancelled; the map's callbacks run on
        another thread, as they would for an outcome."""
        with self._lock:
            if self._first_error is None:
                self._first_error = error
                self._chunks = []
                self._gathered = []
        self._queued(index + 1)
        for task in self._tasks:
            _runner.cancel(self._core, task, False)
        _deliver_apart(_ChunkOutcome(self, index, False), False, error)

    def _queued(self, made: int) -> None:
        """The map's last chunk is queued: ``made`` chunks in all (fewer than
        its iterable's ``len()`` said, if it ran out first), and the map is
        ready once they are in."""
        with self._lock:
            if self._left < 0 or not self._queueing:
                return
            self._queueing = False
            self._left -= self._count - made
            self._count = made
            del self._chunks[made:]
            done = self._left == 0
        if done:
            self._complete()

    def _complete(self) -> None:
        self._chunks = []
        if self._first_error is not None:
            self._finish(None, self._first_error)
        else:
            value, self._gathered = self._gathered, []
            self._finish(value, None)


if TYPE_CHECKING:
    _StdIMapIterator = multiprocessing.pool.IMapIterator  # generic in typeshed
else:
    # Not subscriptable at run time, unlike ApplyResult: an alias that is, and
    # whose subclasses have the class itself as base (typing.Generic is not
    # brought in, with its __init_subclass__ and __class_getitem__).
    _StdIMapIterator = types.GenericAlias(multiprocessing.pool.IMapIterator, (_T,))


@_own_api_only
class IMapIterator(_StdIMapIterator[_T]):
    """The iterator of :meth:`Pool.imap` (a ``multiprocessing.pool.IMapIterator``,
    none of whose machinery it uses).

    With ``chunksize > 1`` the first failed chunk ends the iteration, as the
    standard library's chunked ``imap`` (a generator over chunks) ends: its
    error is raised, then ``StopIteration``. The chunks after it still run,
    as there; their results are dropped. With ``chunksize=1`` the iteration
    goes on after an error."""

    _unordered = False

    # IMapIterator[int], as ApplyResult[int]. (Not annotated: typing.get_type_hints()
    # would evaluate the annotation, and classmethod cannot be subscripted at run time.)
    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]

    def __reduce_ex__(self, protocol: Any) -> Any:
        refuse_pickling(self, "its results (a list of them)")

    def __copy__(self) -> IMapIterator[_T]:
        # As a Future's (see Future.__copy__); the pool's feeder keeps only
        # this very iterator going.
        return self

    def __init__(self, pool: Pool, chunked: bool = False) -> None:
        # multiprocessing.pool.IMapIterator.__init__ is not called.
        self._pool: Pool | None = pool
        self._interrupt = pool._warden_interrupt
        self._core = pool._warden_runner.core
        self._chunked = chunked
        # A chunked iteration that raised a task's error: it is over.
        self._failed = False
        self._cond = threading.Condition(threading.Lock())
        _runner.renew_locks_after_fork(self, "_cond")
        self._chunks: dict[int, tuple[bool, Any]] = {}
        self._arrived: collections.deque[tuple[bool, Any]] = collections.deque()
        self._next = 0
        self._length: int | None = None
        self._buffer: collections.deque[_T] = collections.deque()
        self._progress: _progress.Progress | None = None

    def __iter__(self) -> IMapIterator[_T]:
        return self

    def __next__(self, timeout: float | None = None) -> _T:
        if timeout is None:
            # The rest of a chunk that came: one call per item, as the
            # standard library's generator over chunks costs.
            try:
                return self._buffer.popleft()
            except IndexError:
                pass
        return self.next(timeout)

    def _take(self) -> tuple[bool, Any] | None:
        if self._unordered:
            if self._arrived:
                self._next += 1
                return self._arrived.popleft()
            return None
        item = self._chunks.pop(self._next, None)
        if item is not None:
            self._next += 1
        return item

    def _exhausted(self) -> bool:
        return self._failed or (self._length is not None and self._next >= self._length)

    def next(self, timeout: float | None = None) -> _T:
        """The next result; a ``multiprocessing.TimeoutError``
        (:class:`TimeoutError`) if it is not there within ``timeout`` seconds."""
        if self._progress is None:
            return self._next_result(timeout)
        try:
            return self._next_result(timeout)
        except multiprocessing.TimeoutError:
            raise
        except StopIteration:
            self._progress.close()
            raise
        except Exception:
            # An item's error: with chunks of one the iteration goes on (and
            # so does the bar); a chunked one ends here.
            if self._chunked:
                self._progress.close()
            raise
        except BaseException:  # Ctrl-C: the bar is done
            self._progress.close()
            raise

    def _next_result(self, timeout: float | None) -> _T:
        while not self._buffer:
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                with self._cond:
                    while (item := self._take()) is None:
                        if self._exhausted():
                            self._pool = None
                            raise StopIteration
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and not left > 0:  # NaN too, as the standard library's
                            raise TimeoutError
                        if left is None:
                            _runner.refuse_self_wait(self._core)
                        self._cond.wait(left)
            except KeyboardInterrupt:
                self._interrupt()
                raise
            ok, value = item
            if not ok:
                if self._chunked:
                    with self._cond:
                        self._failed = True
                        self._chunks.clear()
                        self._arrived.clear()
                    self._pool = None
                if value.by_exit:
                    _runner.park_at_exit()
                exc = _exception(value)
                if isinstance(exc, StopIteration):
                    # Raised as is, it would end the caller's loop as if the
                    # results had run out (PEP 479's reason, for generators).
                    raise RuntimeError("a task of imap raised StopIteration") from exc
                raise exc
            self._buffer.extend(value)
        return self._buffer.popleft()

    def _put(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            if self._failed:
                return  # nobody will take it
            if self._unordered:
                self._arrived.append((ok, value))
            else:
                self._chunks[index] = (ok, value)
            self._cond.notify_all()

    def _deliver(self, index: int, ok: bool, data: Any) -> None:
        if self._failed:
            return  # a chunked iteration that is over: the result is dropped unread
        if ok:
            try:
                value = loads(data)
                if not self._chunked:
                    value = (value,)  # one call's result: the chunk of one item it stands for
                if self._progress is not None:
                    self._progress.advance(len(value))
                self._put(index, True, value)
            except BaseException as e:  # SystemExit too: this is the results thread
                self._put(index, False, ErrorData.local(e, "cannot unpickle a result"))
        else:
            if self._progress is not None and not self._chunked:
                self._progress.advance(1)  # the item is done, if not well
            self._put(index, False, data)

    def _set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._cond.notify_all()


@_own_api_only
class IMapUnorderedIterator(IMapIterator[_T], multiprocessing.pool.IMapUnorderedIterator):  # type: ignore[type-arg]
    """The iterator of :meth:`Pool.imap_unordered`: results as they complete
    (a ``multiprocessing.pool.IMapUnorderedIterator`` too)."""

    _unordered = True


if TYPE_CHECKING:
    # What imap() returns, as typeshed types the standard library's.
    _IMapResult = multiprocessing.pool.IMapIterator
else:
    # Warden's own at run time (typing.get_type_hints, sphinx): the standard
    # library's class cannot be subscripted.
    _IMapResult = IMapIterator


def _iterate(iterable: Iterable[Any]) -> Iterator[Any]:
    """``iter(iterable)``; for what is not iterable, an iterator that raises
    that ``TypeError``: as with the standard library's ``imap``, it comes out
    of the first ``next()``, as any error of the iterable does, not out of
    the call."""
    try:
        return iter(iterable)
    except Exception as e:
        return _raise(e)


def _raise(error: Exception) -> Iterator[Any]:
    raise error
    yield  # a generator: raises when first advanced


def _exception(error: ErrorData) -> BaseException:
    """A fresh exception for a failed task, as ``multiprocessing.pool`` raises
    it: with a ``RemoteTraceback`` cause, and ``MaybeEncodingError`` for a
    result that could not be pickled."""
    exc = error.build(RemoteTraceback)
    if isinstance(exc, pickle.PicklingError) and hasattr(exc, "result_repr"):
        value = f"[{exc.result_repr}]" if error.in_list else exc.result_repr
        encoding = MaybeEncodingError.__new__(MaybeEncodingError)
        Exception.__init__(encoding, exc.reason_repr, value)  # type: ignore[attr-defined]
        encoding.exc, encoding.value = exc.reason_repr, value  # type: ignore[attr-defined]
        return encoding  # type: ignore[no-any-return]
    return exc


#: How far an ``imap`` feeder reads ahead of the workers: at most this many
#: chunks per worker submitted and without an outcome yet, and at most
#: :data:`IMAP_AHEAD_BYTES` of their pickles (one chunk at least, however
#: large). Enough to keep every worker's pipeline full, and as lazy with a
#: large or endless iterable (the lines of a big file, ``itertools.count()``)
#: as the standard library's imap, whose pipe to the workers fills.
IMAP_AHEAD_CHUNKS = 64
IMAP_AHEAD_BYTES = 64 << 20


class _Ahead:
    """What an ``imap`` feeder has in flight: chunks submitted and their
    pickles' size, until each has its outcome. Each count has one writer
    (``sent_*`` the feeder, ``done_*`` the results thread), so neither takes
    a lock; the feeder waits on ``cond`` only when it must."""

    __slots__ = ("cond", "done_chunks", "done_size", "sent_chunks", "sent_size", "waiting")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.sent_chunks = self.sent_size = 0
        self.done_chunks = self.done_size = 0
        self.waiting = False

    def sent(self, size: int) -> None:
        """(Feeder.) A chunk of ``size`` bytes went; ``-size`` takes it back."""
        self.sent_chunks += 1 if size >= 0 else -1
        self.sent_size += size

    def done(self, size: int) -> None:
        """(Results thread.) A chunk of ``size`` bytes has its outcome."""
        self.done_chunks += 1
        self.done_size += size
        if self.waiting:
            with self.cond:
                self.cond.notify()

    def _full(self, max_chunks: int) -> bool:
        chunks = self.sent_chunks - self.done_chunks
        return chunks >= max_chunks or (chunks > 0 and self.sent_size - self.done_size >= IMAP_AHEAD_BYTES)

    def wait_for_room(self, max_chunks: int, gone: Callable[[], bool]) -> bool:
        """(Feeder.) Waits until another chunk may go; ``False`` if the
        iterator was dropped meanwhile (looked at every tenth of a second)."""
        if not self._full(max_chunks):
            return True
        with self.cond:
            self.waiting = True
            try:
                while self._full(max_chunks):
                    if gone():
                        return False
                    self.cond.wait(0.1)
            finally:
                self.waiting = False
        return True


def _deliver_imap_chunk(
    ahead: _Ahead, size: int, result_ref: weakref.ref[IMapIterator[Any]], index: int, ok: bool, data: Any
) -> None:
    try:
        result = result_ref()
        if result is not None:  # else nobody can read it
            result._deliver(index, ok, data)
    finally:
        ahead.done(size)


class _Unraisable:
    """Raises ``error`` in its ``__del__``: the interpreter reports it there
    as it reports any exception a finalizer raises ("Exception ignored in"),
    through ``sys.unraisablehook``, which pytest and other tools watch."""

    def __init__(self, error: BaseException) -> None:
        self.error: BaseException | None = error

    def __del__(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


def _has_more(it: Iterator[Any]) -> bool:
    """Whether ``it`` yields another item (taken, and dropped: nobody can
    read its result any more)."""
    try:
        next(it)
    except StopIteration:
        return False
    except BaseException as e:
        _native.pass_ctrl_c_on(e)
        return True  # it had something more to say: an error
    return True


def _segment_size(segment: int | None) -> int:
    return 0 if segment is None else os.fstat(segment).st_size


def _feed_imap(
    pool: Pool,
    func: Callable[..., Any],
    it: Iterator[Any],
    chunksize: int,
    result_ref: weakref.ref[IMapIterator[Any]],
    counted: list[bool],
) -> None:
    """The feeder thread of an ``imap``: pickles and submits chunks as the
    iterable yields them, up to :data:`IMAP_AHEAD_CHUNKS` per worker (and
    :data:`IMAP_AHEAD_BYTES`) ahead of the outcomes; an item that fails to
    pickle, or the iterable raising, becomes the error of that position (the
    iterable's error once the chunks before it have their outcomes).

    It and the chunks in flight hold the iterator only weakly: once the
    program drops the iterator, nobody can read another result, and the
    feeder stops taking items (the chunks in flight finish, their results
    dropped), so an abandoned ``imap`` over an endless iterable lets
    ``close(); join()`` return."""
    index = 0
    ahead = _Ahead()
    max_chunks = IMAP_AHEAD_CHUNKS * pool._processes

    def gone() -> bool:
        return result_ref() is None

    def put(index: int, ok: bool, data: Any) -> None:
        result = result_ref()
        if result is not None:
            result._put(index, ok, data)

    broke: BaseException | None = None
    used_up = False  # the iterable ended, or raised
    try:
        while ahead.wait_for_room(max_chunks, gone) and not gone():
            try:
                chunk = tuple(itertools.islice(it, chunksize))
            except BaseException as e:
                _native.pass_ctrl_c_on(e)
                # At the start of the chunk it cut short, whose items are
                # dropped, as the standard library's imap does. Whatever it
                # raises, a ``SystemExit`` of a parser giving up included: it
                # is the iteration's error, never its quiet end.
                broke = e
                used_up = True
                break
            if not chunk:
                used_up = True
                break
            try:
                # Not lent: the iterable may change an item's buffer once it
                # yields the next one (a generator refilling one array), and
                # each item is sent as it was when it was taken, as the
                # standard library's imap sends it.
                # One item is one call, as in the standard library's imap with
                # chunksize 1 (its errors then name the item's result, not a list).
                call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] = (
                    (run_chunk, (func, chunk, False), {}) if chunksize > 1 else (func, chunk, {})
                )
                payload, segment = dumps_oob(call, lend=False)
                del call
            except BaseException as e:
                _native.pass_ctrl_c_on(e)
                put(index, False, ErrorData.local(e, "cannot pickle the task"))
                index += 1
                continue
            del chunk
            result = result_ref()
            if result is None:
                _runner.close_fd(segment)
                break
            size = len(payload) + _segment_size(segment)
            ahead.sent(size)
            try:
                on_done = functools.partial(_deliver_imap_chunk, ahead, size, result_ref, index)
                pool._warden_runner.submit(payload, on_done, segment=segment)
            except _warden.CoreError:
                ahead.sent(-size)  # never in flight
                stopped = ErrorData(_warden.ErrorKind.CANCELLED, "the pool stopped taking tasks")
                stopped.by_exit = pool._warden_runner.cut_by_exit[0]
                result._put(index, False, stopped)
                index += 1
                break
            del result, on_done  # (nothing but the program holds the iterator)
            index += 1
        # The iterable's error comes after the outcomes of the chunks before
        # it: put first, it would end an imap_unordered before the results
        # already on their way (the standard library's goes through its task
        # queue, behind them).
        if broke is not None and ahead.wait_for_room(1, gone):
            put(index, False, ErrorData.local(broke, "the iterable raised"))
            index += 1
        if not used_up and gone() and pool._state != TERMINATE and _has_more(it):
            # The standard library's would have run them: said, where a
            # dropped file that was never closed is said. (Not for a pool
            # terminated meanwhile, which would not have run them either, nor
            # for an iterable whose end the feeder had not yet seen.)
            name = text_of(getattr(func, "__qualname__", func), repr)
            try:
                warnings.warn(
                    f"an imap of {name} was dropped before its iterable ended: "
                    f"the items after its first {index} chunks are not run",
                    ResourceWarning,
                    stacklevel=1,
                )
            except Warning as e:
                # Warnings are errors (``-W error``): reported as such a
                # warning of a dropped file is, not as this thread's death.
                _Unraisable(e)
    except BaseException as e:
        # Under gevent, a Ctrl-C that lands anywhere else in this greenlet
        # (handing a chunk to the pool): passed on to the main greenlet
        # before the iteration is marked ended, so that the program stops
        # instead of the loop ending quietly.
        _native.pass_ctrl_c_on(e)
        raise
    finally:
        result = result_ref()
        if result is not None:
            result._set_length(index)
        del result
        pool._warden_feeder_done(counted)
