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
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import TimeoutError as TimeoutError
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
    "ApplyResult": ".pool",
    "AsyncResult": ".pool",
    "BrokenProcessPool": "concurrent.futures.process",
    "Event": ".event",
    "ExitHandle": "._finalize",
    "Future": "._futures",
    "Guardian": "._finalize",
    "IMapIterator": ".pool",
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
    # multiprocessing's, as a Pool raises and sizes it: ``from warden import
    # Pool, TimeoutError`` reads as the standard library's examples do. (Not
    # in __all__: ``from warden import *`` must not hide the built-in
    # TimeoutError, which an executor's futures raise.)
    "TimeoutError": "multiprocessing",
    "WorkerCrashed": "._errors",
    "WorkerLost": "._runner",
    "WorkerMemoryExceeded": "._errors",
    "at_exit": "._finalize",
    "cpu_count": "multiprocessing",
    "current_process": ".process",
    "finalize": "._finalize",
    "set_cleanup_record": "._context",
    "wait_for_finalizers": "._finalize",
    "worker_context": "._context",
}

__all__ = [
    "ApplyResult",
    "AsyncResult",
    "BrokenProcessPool",
    "Event",
    "ExitHandle",
    "Future",
    "Guardian",
    "IMapIterator",
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
    "WorkerCrashed",
    "WorkerLost",
    "WorkerMemoryExceeded",
    "at_exit",
    "cpu_count",
    "current_process",
    "finalize",
    "set_cleanup_record",
    "wait_for_finalizers",
    "worker_context",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        hint = ""
        if name in getattr(_sys.modules.get("multiprocessing"), "__all__", ()):
            # A program switched over with ``import warden as multiprocessing``.
            hint = (
                f": warden stands in for Pool, Process, Event and ProcessPoolExecutor; take {name} "
                "from multiprocessing (objects that go to warden's workers and children from "
                'multiprocessing.get_context("spawn"))'
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}{hint}")
    value = getattr(_importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _at_interpreter_exit() -> None:
    """warden's step of interpreter exit, registered when warden is imported
    (so ``atexit`` handlers registered later run before it): every pool and
    ``Process`` child still running is shut down, then this process's exit
    callbacks run (``warden.at_exit``, and ``warden.finalize`` callbacks of
    objects still alive). Only what was loaded has anything to do."""
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
