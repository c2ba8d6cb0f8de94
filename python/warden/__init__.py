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
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from ._context import worker_context
from ._errors import (
    PoolFailed,
    RemoteError,
    TaskAborted,
    TaskInterrupted,
    TaskTimeout,
    WorkerCrashed,
)
from ._finalize import ExitHandle, Guardian, ResourceSet, at_exit, finalize, wait_for_finalizers
from ._futures import Future
from ._handles import PoolHandle
from ._oob import SegmentError, SegmentTooLarge
from .event import Event
from .executor import ProcessPoolExecutor
from .pool import ApplyResult, AsyncResult, IMapIterator, MapResult, Pool
from .process import Process, current_process

__version__ = "0.1.0"

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
    "at_exit",
    "current_process",
    "finalize",
    "wait_for_finalizers",
    "worker_context",
]
