"""The zygote of a warden pool: ``python -m warden._worker`` started as a
fork server (``WARDEN_ZYGOTE`` set).

It imports the worker runtime and what the pool asked to preload, then parks
in the core's fork loop (``_warden.zygote_main``); that call returns only in
each forked worker, which then runs the ordinary worker loop. A forked worker
is as fresh as an exec'd one where it matters:

* the interpreter's fork protocol runs around each fork, so the
  ``os.register_at_fork`` hooks run in the child: ``random`` reseeds itself,
  ``threading`` and ``logging`` reset their locks;
* numpy's global generator (``numpy.random.seed``), if numpy was preloaded,
  is reseeded from the OS in each worker;
* ``multiprocessing``'s finalizer registry is emptied, as its fork start
  method does: a finalizer registered while preloading belongs to the zygote;
* ``multiprocessing.active_children()`` lists the pool workers the worker
  itself starts, if a preload loaded warden's pools;
* the objects the zygote holds are frozen (``gc.freeze()``) before each fork,
  so a worker's garbage collections leave them, and the memory pages they
  share with the zygote, alone;
* ``str`` hashes use the zygote's hash secret (as under any fork), so a
  worker's ``hash("x")`` is the same in every worker of the pool.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import sys

from . import _warden, _workerloop


def _reseed_numpy() -> None:
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        # A numpy without the legacy global generator has nothing to reseed.
        with contextlib.suppress(Exception):
            numpy.random.seed()


def _after_fork_in_child() -> None:
    multiprocessing.util._finalizer_registry.clear()  # type: ignore[attr-defined]
    _reseed_numpy()
    # The zygote has no pools: pools a worker starts are its own children.
    children = sys.modules.get("warden._children")
    if children is not None:
        children.install()


def prepare(payload: bytes) -> None:
    """Runs in the zygote before it parks: the pool's ``sys.path`` and working
    directory, then its preloads. A preload that fails to import is reported
    and skipped (its workers import it themselves, or fail there).

    ``__main__`` (preloaded unless the pool names its preloads) is the
    program's main module imported as ``__mp_main__``, exactly as a spawned
    child imports it, once here instead of in every worker. If it fails, the
    zygote says nothing: each worker imports it again and reports the error as
    its start failure, as it would without a zygote."""
    data = pickle.loads(payload)
    preparation = dict(data["preparation"])
    main_keys = ("init_main_from_path", "init_main_from_name")
    main = {key: preparation.pop(key) for key in main_keys if key in preparation}
    multiprocessing.spawn.prepare(preparation)
    if main and "__main__" in data["preload"]:
        me = multiprocessing.current_process()
        # As in a spawned child: a pool started by main's unguarded top level
        # raises the standard library's "bootstrapping phase" error.
        me._inheriting = True  # type: ignore[attr-defined]
        try:
            multiprocessing.spawn.prepare(main)
        except BaseException:  # each worker imports it again and reports the error
            pass
        finally:
            del me._inheriting  # type: ignore[attr-defined]
    for name in data["preload"]:
        if name == "__main__":
            continue
        try:
            __import__(name)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            print(f"warden: zygote {os.getpid()}: cannot preload {name!r}: {why}", file=sys.stderr)
    # What the zygote holds is moved out of the collector's reach before each
    # fork: a worker's collections (and its exit path's) then never touch,
    # and so never copy, the pages it shares with the zygote.
    gc.freeze()
    os.register_at_fork(before=gc.freeze, after_in_child=_after_fork_in_child)


def main() -> None:
    """Parks as a zygote; in each forked worker, runs the worker loop."""
    # What an exec'd worker imports only when it needs it (to report a
    # failure) costs a forked one nothing once the zygote has it.
    import traceback  # noqa: F401

    _warden.zygote_main(prepare)
    _workerloop.main()
