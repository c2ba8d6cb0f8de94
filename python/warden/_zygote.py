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
* ``str`` hashes use the zygote's hash secret (as under any fork), so a
  worker's ``hash("x")`` is the same in every worker of the pool.
"""

from __future__ import annotations

import contextlib
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


def prepare(payload: bytes) -> None:
    """Runs in the zygote before it parks: the pool's ``sys.path`` and working
    directory, then its preloads. A preload that fails to import is reported
    and skipped (its workers import it themselves, or fail there)."""
    data = pickle.loads(payload)
    preparation = dict(data["preparation"])
    if "__main__" not in data["preload"]:
        # The parent's __main__ is imported by each worker, unless preloaded.
        preparation.pop("init_main_from_path", None)
        preparation.pop("init_main_from_name", None)
    multiprocessing.spawn.prepare(preparation)
    for name in data["preload"]:
        if name == "__main__":
            continue
        try:
            __import__(name)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            print(f"warden: zygote {os.getpid()}: cannot preload {name!r}: {why}", file=sys.stderr)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def main() -> None:
    """Parks as a zygote; in each forked worker, runs the worker loop."""
    # What an exec'd worker imports only when it needs it (to report a
    # failure) costs a forked one nothing once the zygote has it.
    import traceback  # noqa: F401

    _warden.zygote_main(prepare)
    _workerloop.main()
