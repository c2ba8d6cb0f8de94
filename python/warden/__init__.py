"""warden: process pools and child processes that always clean up after themselves.

Drop-in replacements for ``concurrent.futures.ProcessPoolExecutor``,
``multiprocessing.Pool``, ``multiprocessing.Process`` and
``multiprocessing.Event``, supervised by warden's Rust core:

* every worker and child ends through one exit path that runs its finalizer,
  its ``atexit`` handlers and a garbage collection, and flushes its output;
* a task's error is data: each ``result()`` raises a fresh exception, and a
  pool never keeps the interpreter from exiting;
* pools take a ``finalizer`` (and a ``worker_context``) as well as an
  ``initializer``, run on every retirement path;
* processes, events and pools pickle into inert, useful handles;
* Ctrl-C stops waits promptly and workers gracefully;
* large buffers (numpy arrays, ``bytes``) travel in shared memory beside the
  pickle, and are freed on every exit path;
* finalizers run on a dedicated thread (``finalize``), or when the program
  asks (``Guardian``); exit callbacks run in priority order in every warden
  process (``at_exit``); ``ResourceSet`` is a registry finalizers may shrink
  while it is iterated.

See ``docs/python.md`` for the guide.

The names below are loaded on first use, so a worker process (which imports
this package first) loads only what it needs to start.
"""

from __future__ import annotations

import atexit as _atexit
import importlib as _importlib
import sys as _sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time

if TYPE_CHECKING:
    from builtins import TimeoutError as TimeoutError
    from concurrent.futures import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        BrokenExecutor,
        CancelledError,
        Executor,
        InvalidStateError,
        as_completed,
        wait,
    )
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import cpu_count
    from typing import Any

    from ._context import set_cleanup_record, worker_context
    from ._errors import PoolFailed, TaskTimeout, WorkerCrashed, WorkerMemoryExceeded
    from ._finalize import ExitHandle, Guardian, ResourceSet, at_exit, finalize, wait_for_finalizers
    from ._futures import Future
    from ._handles import PoolHandle
    from ._oob import SegmentError, SegmentTooLarge
    from ._remote import RemoteError, TaskAborted, TaskInterrupted
    from ._runner import WorkerLost
    from .event import Event
    from .executor import ProcessPoolExecutor
    from .pool import ApplyResult, AsyncResult, IMapIterator, MapResult, Pool
    from .process import Process, current_process

__version__ = "0.1.0"

#: Where each public name lives; imported on first access.
_HOMES = {
    "ALL_COMPLETED": "concurrent.futures",
    "ApplyResult": ".pool",
    "AsyncResult": ".pool",
    "BrokenExecutor": "concurrent.futures",
    "BrokenProcessPool": "concurrent.futures.process",
    "CancelledError": "concurrent.futures",
    "Event": ".event",
    "Executor": "concurrent.futures",
    "ExitHandle": "._finalize",
    "FIRST_COMPLETED": "concurrent.futures",
    "FIRST_EXCEPTION": "concurrent.futures",
    "Future": "._futures",
    "Guardian": "._finalize",
    "IMapIterator": ".pool",
    "InvalidStateError": "concurrent.futures",
    "MapResult": ".pool",
    "Pool": ".pool",
    "PoolFailed": "._errors",
    "PoolHandle": "._handles",
    "Process": ".process",
    "ProcessPoolExecutor": ".executor",
    "RemoteError": "._remote",
    "ResourceSet": "._finalize",
    "SegmentError": "._oob",
    "SegmentTooLarge": "._oob",
    "TaskAborted": "._remote",
    "TaskInterrupted": "._remote",
    "TaskTimeout": "._errors",
    # The built-in one, which is concurrent.futures': an executor's futures
    # raise it, and a Pool's timeouts are one as well as multiprocessing's
    # (warden.pool.TimeoutError). So ``except TimeoutError`` after ``from
    # warden import Pool, TimeoutError`` (the standard library's Pool
    # example) and ``except cf.TimeoutError`` after ``import warden as cf``
    # both catch what they meant to.
    "TimeoutError": "builtins",
    "WorkerCrashed": "._errors",
    "WorkerLost": "._runner",
    "WorkerMemoryExceeded": "._errors",
    "as_completed": "concurrent.futures",
    "at_exit": "._finalize",
    "cpu_count": "multiprocessing",
    "current_process": ".process",
    "finalize": "._finalize",
    "set_cleanup_record": "._context",
    "wait": "concurrent.futures",
    "wait_for_finalizers": "._finalize",
    "worker_context": "._context",
}

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "ApplyResult",
    "AsyncResult",
    "BrokenExecutor",
    "BrokenProcessPool",
    "CancelledError",
    "Event",
    "Executor",
    "ExitHandle",
    "Future",
    "Guardian",
    "IMapIterator",
    "InvalidStateError",
    "MapResult",
    "Pool",
    "PoolFailed",
    "PoolHandle",
    "Process",
    "ProcessPoolExecutor",
    "RemoteError",
    "ResourceSet",
    "SegmentError",
    "SegmentTooLarge",
    "TaskAborted",
    "TaskInterrupted",
    "TaskTimeout",
    "TimeoutError",
    "WorkerCrashed",
    "WorkerLost",
    "WorkerMemoryExceeded",
    "as_completed",
    "at_exit",
    "cpu_count",
    "current_process",
    "finalize",
    "set_cleanup_record",
    "wait",
    "wait_for_finalizers",
    "worker_context",
]


#: The public submodules, which docs/python.md names (``warden.pool.TimeoutError``):
#: imported on first access, as their names are.
_SUBMODULES = frozenset({"dask", "event", "executor", "pool", "process"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        # Importing it sets the attribute on this package.
        return _importlib.import_module(f"{__name__}.{name}")
    home = _HOMES.get(name)
    if home is None:
        hint = ""
        if name.startswith("_"):
            pass
        elif name in _importlib.import_module("concurrent.futures").__all__:
            # ``import warden as cf``: ThreadPoolExecutor.
            hint = f": warden stands in for ProcessPoolExecutor; take {name} from concurrent.futures"
        elif name in _importlib.import_module("multiprocessing").__all__:
            # A program switched over with ``import warden as multiprocessing``.
            hint = (
                f": warden stands in for Pool, Process, Event and ProcessPoolExecutor; take {name} "
                "from multiprocessing (objects that go to warden's workers and children from "
                'multiprocessing.get_context("spawn"))'
            )
        if hint and _asked_by_from_import():
            # ``from warden import Queue``: the import statement would put
            # its own message, without the hint, in place of an AttributeError.
            raise ImportError(
                f"cannot import name {name!r} from {__name__!r}{hint}", name=__name__, path=__file__
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}{hint}")
    value = getattr(_importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def _asked_by_from_import() -> bool:
    """Whether the caller of the module's ``__getattr__`` is a ``from warden
    import ...`` statement (its frame is at an ``IMPORT_FROM`` instruction)."""
    import dis

    try:
        frame = _sys._getframe(2)
    except ValueError:  # asked from C, with no Python caller (a thread's getattr)
        return False
    code = frame.f_code.co_code
    return 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == dis.opmap["IMPORT_FROM"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


#: Set as warden's step of interpreter exit begins (read by ``_runner`` when
#: it is first imported after that).
_exit_step_began = False


def _at_interpreter_exit() -> None:
    """warden's step of interpreter exit, registered when warden is imported
    (so ``atexit`` handlers registered later run before it): every pool and
    ``Process`` child still running is shut down, then this process's exit
    callbacks run (``warden.at_exit``, and ``warden.finalize`` callbacks of
    objects still alive). Only what was loaded has anything to do; what
    loads later (an ``atexit`` handler registered before warden was
    imported, run after this, making the program's first pool) sees
    :data:`_exit_step_began` and refuses to start workers, as if it had
    been loaded."""
    global _exit_step_began
    _exit_step_began = True
    runner = _sys.modules.get(__name__ + "._runner")
    if runner is not None:
        runner.at_interpreter_exit()
        return
    finalizers = _sys.modules.get(__name__ + "._finalize")
    if finalizers is not None:
        finalizers.run_exit_callbacks()


# multiprocessing's own exit handler joins every child in active_children(),
# which lists warden's pool workers: imported first, it is registered first
# and so runs after warden's (atexit runs handlers last-registered first),
# once the pools have shut their workers down.
import multiprocessing.util as _mp_util  # noqa: E402, F401

_atexit.register(_at_interpreter_exit)
