"""warden on a Dask cluster: Dask carries the work between machines, warden
supervises the processes on each.

* :class:`WardenPlugin` is a ``distributed.WorkerPlugin``: in ``setup`` each
  Dask worker process starts a :class:`warden.ProcessPoolExecutor` with the
  plugin's options (``initializer``, ``finalizer``, ``task_timeout``,
  ``max_tasks_per_child``, ...); in ``teardown`` (plugin removed, Dask worker
  closed, retired or restarted) the pool shuts down and every worker's
  finalizer runs. If the Dask worker is killed outright, its warden workers
  see their parent die and run their exit path anyway.
* :class:`Executor` is a ``concurrent.futures.Executor`` on a
  ``distributed.Client``: it registers a :class:`WardenPlugin`, and each
  ``submit`` becomes a Dask task (through Dask's own ``Client.get_executor``)
  that runs the call in the warden pool of the Dask worker it lands on. So a
  task timeout, a crashed task (it fails alone, with
  :class:`warden.WorkerCrashed`) and finalizers hold on every machine.

Needs ``distributed`` (``pip install 'warden[dask]'``). See docs/dask.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import ParamSpec, TypeVar

    _P = ParamSpec("_P")
    _T = TypeVar("_T")

try:
    import distributed
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "warden.dask needs Dask's distributed scheduler: pip install 'warden[dask]' "
        "(or pip install 'dask[distributed]')"
    ) from e

from .executor import ProcessPoolExecutor

__all__ = ["Executor", "WardenPlugin", "pool"]

#: The warden pools in this process, by (Dask worker id, plugin name): a
#: process may host more than one Dask worker (``LocalCluster(processes=False)``),
#: each with pools of its own.
_pools: dict[tuple[str, str], ProcessPoolExecutor] = {}
_pools_lock = threading.Lock()


def _found(name: str, dask_worker: distributed.Worker | None) -> ProcessPoolExecutor | None:
    """The pool ``name`` of ``dask_worker``, else of the Dask worker running
    this task; outside a task, the one pool of that name in this process."""
    try:
        worker = dask_worker if dask_worker is not None else distributed.get_worker()
    except ValueError:
        with _pools_lock:
            found = [ex for (_, n), ex in _pools.items() if n == name]
        return found[0] if len(found) == 1 else None
    with _pools_lock:
        return _pools.get((worker.id, name))


def pool(name: str = "warden", dask_worker: distributed.Worker | None = None) -> ProcessPoolExecutor:
    """The warden pool that the plugin ``name`` started in this Dask worker
    (for a task that wants to submit to it directly). In a Dask task the
    Dask worker is the one running it; elsewhere (``client.run``) pass it as
    ``dask_worker``, or it is the only one in this process with that pool."""
    found = _found(name, dask_worker)
    if found is None:
        raise RuntimeError(
            f"no warden pool {name!r} on this Dask worker (pid {os.getpid()}): register "
            "warden.dask.WardenPlugin, or use warden.dask.Executor"
        )
    return found


class WardenPlugin(distributed.WorkerPlugin):
    """A warden pool in every Dask worker process.

    ``max_workers`` (default: the Dask worker's thread count, so that every
    Dask thread has a process to hand its task to) and every other keyword
    argument go to :class:`warden.ProcessPoolExecutor`. The pool's workers
    start in ``setup`` (so a failing ``initializer`` shows at registration;
    ``TimeoutError`` if they are not up within ``start_timeout`` seconds);
    ``teardown`` shuts the pool down, cancelling calls not started, and
    stops what still runs after ``teardown_timeout`` seconds (gracefully:
    finalizers run).
    """

    idempotent = True

    def __init__(
        self,
        name: str = "warden",
        *,
        max_workers: int | None = None,
        start_timeout: float = 120.0,
        teardown_timeout: float = 10.0,
        **pool_options: Any,
    ) -> None:
        self.name = name
        self.max_workers = max_workers
        self.start_timeout = start_timeout
        self.teardown_timeout = teardown_timeout
        self.pool_options = pool_options

    def _start(self, worker_id: str, nthreads: int) -> None:
        ex = ProcessPoolExecutor(self.max_workers or nthreads, **self.pool_options)
        try:
            # Every worker starts with the first call (os.getpid: nothing to import).
            ex.submit(os.getpid).result(timeout=self.start_timeout)
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        with _pools_lock:
            old = _pools.pop((worker_id, self.name), None)
            _pools[(worker_id, self.name)] = ex
        if old is not None:
            _stop(old, self.teardown_timeout)

    async def setup(self, worker: distributed.Worker) -> None:
        """Starts this Dask worker's pool (off the worker's event loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self._start, worker.id, worker.state.nthreads)

    async def teardown(self, worker: distributed.Worker) -> None:
        """Shuts this Dask worker's pool down; its finalizers run."""
        with _pools_lock:
            ex = _pools.pop((worker.id, self.name), None)
        if ex is not None:
            await asyncio.get_running_loop().run_in_executor(None, _stop, ex, self.teardown_timeout)


def _stop(ex: ProcessPoolExecutor, timeout: float) -> None:
    """Shuts a pool down within about ``timeout`` seconds (plus one grace
    period): calls not started are cancelled, running ones get ``timeout``
    seconds, then the workers are stopped (their finalizers run)."""
    ex.shutdown(wait=False, cancel_futures=True)
    runner = ex._warden_runner
    if runner is not None and not runner.join(timeout):
        ex.terminate_workers()


def has_pool(name: str, dask_worker: distributed.Worker | None = None) -> bool:
    """Whether this Dask worker has the warden pool ``name`` (for
    ``client.run``, which passes ``dask_worker``)."""
    return _found(name, dask_worker) is not None


def _call_in_pool(name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The Dask task: runs ``fn(*args, **kwargs)`` in this Dask worker's warden pool."""
    return pool(name).submit(fn, *args, **kwargs).result()


_names = itertools.count(1)


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose calls run in warden pools on the
    Dask workers of ``client``.

    Pool options (``initializer``, ``initargs``, ``finalizer``,
    ``finalargs``, ``task_timeout``, ``max_tasks_per_child``,
    ``worker_context``, ``forward_logging``, ``max_workers`` per Dask worker,
    ...) go to the :class:`WardenPlugin` this executor registers under a
    name of its own. ``workers``, ``resources``, ``allow_other_workers`` and
    ``retries`` go to Dask (``Client.get_executor``) and say where calls may
    run.

    ``shutdown()`` waits for the calls submitted (unless ``wait=False``,
    which cancels those not done, like Dask's executor), then removes the
    plugin: every Dask worker shuts its pool down and the finalizers run.
    """

    def __init__(
        self,
        client: distributed.Client,
        *,
        workers: Any = None,
        resources: Any = None,
        allow_other_workers: bool | None = None,
        retries: int | None = None,
        **pool_options: Any,
    ) -> None:
        self.name = f"warden-{next(_names)}-{uuid.uuid4().hex[:8]}"
        self.client = client
        dask_options = {
            key: value
            for key, value in (
                ("workers", workers),
                ("resources", resources),
                ("allow_other_workers", allow_other_workers),
                ("retries", retries),
            )
            if value is not None
        }
        self._plugin = WardenPlugin(self.name, **pool_options)
        client.register_plugin(self._plugin, name=self.name)
        self._inner = client.get_executor(pure=False, **dask_options)
        self._shutdown = False

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> cf.Future[_T]:
        """Runs ``fn(*args, **kwargs)`` in the warden pool of some Dask worker."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: cf.Future[_T] = self._inner.submit(_call_in_pool, self.name, fn, args, kwargs)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops taking calls; see the class documentation."""
        if self._shutdown:
            return
        self._shutdown = True
        self._inner.shutdown(wait=wait and not cancel_futures)
        self.client.unregister_worker_plugin(self.name)
