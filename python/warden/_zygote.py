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
* except where a named preload seeded a global generator at import
  (``random.seed(1234)``, ``numpy.random.seed(1234)``, or set its state):
  then each worker starts from the state the preloads left it in. The
  zygote sees the seeding call itself (:class:`_SeedWatch`), not the state.
  A main module that does so (or makes other per-process state at import:
  a finalizer, a working directory, a stop signal's handler) is not kept:
  each worker imports it, as under spawn (:func:`_per_process_state`);
* ``multiprocessing``'s finalizer registry is emptied, as its fork start
  method does: a finalizer registered while preloading belongs to the zygote;
* ``multiprocessing.active_children()`` lists the pool workers the worker
  itself starts, if a preload loaded warden's pools;
* what the preloads printed is flushed before each fork, so that no worker
  writes the zygote's buffered output again;
* the objects the zygote holds are frozen (``gc.freeze()``) before each fork,
  so a worker's garbage collections leave them, and the memory pages they
  share with the zygote, alone;
* ``str`` hashes use the zygote's hash secret (as under any fork), so a
  worker's ``hash("x")`` is the same in every worker of the pool.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.machinery
import multiprocessing.resource_tracker  # every worker uses its parent's: loaded once, here
import multiprocessing.spawn
import multiprocessing.util
import os
import signal
import sys
import threading
import weakref
from pickle import loads as _loads  # bound at import: a task that patches pickle cannot break warden

from . import _warden, _workerloop
from ._remote import text_of
from ._stderr import say

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing in the zygote
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The global generators the zygote watches while it preloads: the module,
#: its seeding functions, and its state's getter and setter.
_GENERATORS = {
    "random": (("seed", "setstate"), "getstate", "setstate"),
    "numpy.random": (("seed", "set_state"), "get_state", "set_state"),
}

#: Set in the zygote after its preloads: for each global generator a preload
#: seeded, by module name, its state setter and the state it left. Restored
#: in each worker.
_seeded: dict[str, tuple[Callable[[Any], Any], Any]] = {}

#: Set in the zygote after its preloads: the ``random.Random`` instances the
#: preloads made (a library's own: Faker's, at its import) whose last
#: seeding drew from the OS. Each worker reseeds them, as each spawned worker
#: would make its own; one seeded with a value keeps the state it has.
_drawn: list[weakref.ref[Any]] = []


class _SeedWatch:
    """While the zygote imports main and its preloads, wraps the seeding
    functions of ``random`` and ``numpy.random`` (as soon as either is
    imported: a meta path finder sees the import) to learn whether the
    program seeded a global generator: its last seeding call gave a seed or a
    state (``seed(None)`` draws from the OS: each worker reseeds as usual).
    Taken out again, originals back, by :meth:`finish`."""

    def __init__(self) -> None:
        self.active = True
        self.seeded: dict[str, bool] = {}
        self.wrapped: list[tuple[Any, str, Any, Any]] = []
        #: ``random.Random`` instances seeded while watching, by id: a
        #: weak reference and whether that seeding drew from the OS.
        self.instances: dict[int, tuple[weakref.ref[Any], bool]] = {}
        for name in _GENERATORS:
            if name in sys.modules:
                self.watch(sys.modules[name])
        sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _GENERATORS or not self.active:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or isinstance(loader, type):
            return spec

        def exec_then_watch(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                with contextlib.suppress(AttributeError):
                    del loader.exec_module  # the loader's own method again
            self.watch(module)

        loader.exec_module = exec_then_watch
        return spec

    def watch(self, module: Any) -> None:
        names, _, _ = _GENERATORS[module.__name__]
        for attr in names:
            original = getattr(module, attr, None)
            if original is None:
                continue
            wrapper = self._wrap(module.__name__, attr, original)
            setattr(module, attr, wrapper)
            self.wrapped.append((module, attr, original, wrapper))
        generator = getattr(module, "Random", None) if module.__name__ == "random" else None
        original = getattr(generator, "seed", None)
        if isinstance(generator, type) and original is not None:
            wrapper = self._wrap_instances(original)
            generator.seed = wrapper  # type: ignore[attr-defined]
            self.wrapped.append((generator, "seed", original, wrapper))

    def _wrap_instances(self, original: Any) -> Any:
        @functools.wraps(original)
        def seed(generator: Any, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                value = args[0] if args else kwargs.get("a")
                with contextlib.suppress(TypeError):  # not weakly referable: left as it is
                    self.instances[id(generator)] = (weakref.ref(generator), value is None)
            return original(generator, *args, **kwargs)

        return seed

    def drawn(self) -> list[weakref.ref[Any]]:
        """The instances whose last seeding while watching drew from the OS
        (not ``random``'s global one, which reseeds itself at each fork)."""
        own = getattr(sys.modules.get("random"), "_inst", None)
        return [ref for ref, fresh in self.instances.values() if fresh and ref() not in (None, own)]

    def _wrap(self, name: str, attr: str, original: Any) -> Any:
        @functools.wraps(original)
        def seeding(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                if attr == "seed":
                    value = args[0] if args else kwargs.get("a", kwargs.get("seed"))
                    self.seeded[name] = value is not None
                else:  # a state set
                    self.seeded[name] = True
            return original(*args, **kwargs)

        return seeding

    def finish(self) -> dict[str, tuple[Callable[[Any], Any], Any]]:
        """Stops watching; returns, for each generator a preload seeded, its
        state setter and the state it is in now."""
        self.active = False
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        for module, attr, original, wrapper in self.wrapped:
            if getattr(module, attr, None) is wrapper:
                setattr(module, attr, original)
        seeded = {}
        for name, fixed in self.seeded.items():
            module = sys.modules.get(name)
            if not fixed or module is None:
                continue
            _, get, put = _GENERATORS[name]
            with contextlib.suppress(Exception):
                seeded[name] = (getattr(module, put), getattr(module, get)())
        return seeded


def _reseed_numpy() -> None:
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        # A numpy without the legacy global generator has nothing to reseed.
        with contextlib.suppress(Exception):
            numpy.random.seed()


class _LookAfresh:
    """Last on a forked worker's ``sys.meta_path``. The worker's import
    system starts with what the zygote's learned of ``sys.path``, which may
    be stale by now: a directory missing then (cached as ``None``), one
    listed in the same clock tick as a file arrived. A spawned worker looks
    afresh. At this worker's first import that no finder found, the caches
    are dropped (as ``importlib.invalidate_caches`` drops them for
    ``sys.path``) and ``sys.path`` searched once more; from then on they
    are this worker's own. Lazily, since telling
    every finder to look again at each fork cost every worker copy-on-write
    faults (one per finder it touched) and a listing of each directory its
    next imports searched."""

    def __init__(self) -> None:
        self.pending = True

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not self.pending:
            return None
        self.pending = False
        # What importlib.invalidate_caches() does for sys.path, by hand: it
        # may import (importlib.metadata, on 3.13), and this runs inside
        # whatever import missed, perhaps half done (pathlib's, of nt).
        cache = sys.path_importer_cache
        for entry, finder in list(cache.items()):
            if finder is None:
                cache.pop(entry, None)  # nothing there then: looked for again
            elif isinstance(finder, importlib.machinery.FileFinder):
                finder.invalidate_caches()  # lists its directory again
        namespace_path = getattr(sys.modules.get("importlib._bootstrap_external"), "_NamespacePath", None)
        if isinstance(getattr(namespace_path, "_epoch", None), int):
            namespace_path._epoch += 1  # type: ignore[union-attr]  # namespace packages look again
        return importlib.machinery.PathFinder.find_spec(name, path, target)


#: SIGINT's handler before the zygote ignored it.
_sigint: Any = signal.default_int_handler


def _after_fork_in_child() -> None:
    if _sigint is not None:  # None: not set from Python
        signal.signal(signal.SIGINT, _sigint)
    # threading's fork hook renews the main thread's ident, not its native
    # id: the zygote's (multiprocessing's bootstrap renews it the same way).
    main = threading.main_thread()
    if hasattr(main, "_set_native_id"):
        main._set_native_id()
    multiprocessing.util._finalizer_registry.clear()  # type: ignore[attr-defined]
    # A zip file on sys.path may have been replaced since the zygote read
    # its table of contents: its importer is made again at the first import
    # that needs it, as a spawned worker makes its own. (The rest of what
    # the zygote's imports learned of sys.path is refreshed at this worker's
    # first miss: see _LookAfresh.)
    zipimport = sys.modules.get("zipimport")
    contents = getattr(zipimport, "_zip_directory_cache", None)
    if isinstance(contents, dict) and contents:
        for entry, finder in list(sys.path_importer_cache.items()):
            if isinstance(finder, zipimport.zipimporter):  # type: ignore[union-attr]
                del sys.path_importer_cache[entry]
        contents.clear()
    sys.meta_path.append(_LookAfresh())
    # random has reseeded itself (its own at-fork hook ran first); numpy's
    # global generator is reseeded here. A generator the program seeded gets
    # the state the preloads left instead, as a spawned worker would have.
    if "numpy.random" not in _seeded:
        _reseed_numpy()
    for put, state in _seeded.values():
        with contextlib.suppress(Exception):
            put(state)
    for ref in _drawn:
        generator = ref()
        if generator is not None:
            with contextlib.suppress(Exception):
                generator.seed()
    # The zygote has no pools: pools a worker starts are its own children.
    children = sys.modules.get("warden._children")
    if children is not None:
        children.install()


def prepare(payload: bytes) -> str | None:
    """Runs in the zygote before it parks: the pool's ``sys.path`` and working
    directory, then its preloads. A preload that fails to import is reported
    and skipped (its workers import it themselves, or fail there).

    ``__main__`` (preloaded unless the pool names its preloads) is the
    program's main module imported as ``__mp_main__``, exactly as a spawned
    child imports it, once here instead of in every worker. If it fails, the
    zygote says nothing: each worker imports it again and reports the error as
    its start failure, as it would without a zygote.

    What main does at import is checked after it: if it made per-process
    state (:func:`_per_process_state`), the reason is returned, and the pool
    starts a zygote without main instead. Two things a preload does at import
    are checked after it. A global generator a named preload seeded keeps
    that state in every worker (:class:`_SeedWatch`).
    An fd it opened and left open (a log file, a socket) would be closed under
    its holder in every fork, so the core refuses to fork from this zygote;
    the pool then starts one without ``__main__``, whose workers import it
    themselves, as under spawn (or, if a named preload holds the fd, starts
    its workers by exec)."""
    global _seeded, _drawn
    data = _loads(payload)
    watch = _SeedWatch()
    try:
        with _workerloop.notice_if_slow("zygote", "importing the program's code"):
            refused = _preload(data, watch)
    finally:
        _seeded = watch.finish()
        _drawn = watch.drawn()
    if refused is not None:
        return refused
    # A SIGINT sent to the parked zygote (it is not in the terminal's
    # foreground group: someone sent it on purpose) would raise in the
    # interpreter's fork hooks, over and over: the zygote ignores it, and
    # each worker gets the handler back (see _after_fork_in_child).
    global _sigint
    _sigint = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What the zygote holds is moved out of the collector's reach before each
    # fork: a worker's collections (and its exit path's) then never touch,
    # and so never copy, the pages it shares with the zygote.
    _before_fork()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    return None


def _before_fork() -> None:
    """Before each fork: what the preloads printed is written out, once,
    instead of sitting in a buffer every worker copies and writes again at
    its exit (a line main prints at import, with stdout to a file or a pipe,
    came out once per worker and once more at the zygote's end); and the
    zygote's objects are frozen (``gc.freeze()``); and which of its modules
    are the program's is noted, for the workers' exit paths
    (:func:`_workerloop.note_modules_before_fork`)."""
    _workerloop.note_modules_before_fork()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or a pipe whose reader is gone
            if stream is not None:
                stream.flush()
    gc.freeze()


#: Signals whose handlers a worker sets up itself: one main set at import
#: would be replaced in a forked worker.
_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _preload(data: dict[str, Any], watch: _SeedWatch) -> str | None:
    """Prepares as a spawned child does and imports the preloads. Returns why
    this zygote must not fork, if main's import made state each worker must
    make for itself (see :func:`_per_process_state`)."""
    preparation = dict(_workerloop.spawn_preparation(data["preparation"]))
    main_keys = ("init_main_from_path", "init_main_from_name")
    main = {key: preparation.pop(key) for key in main_keys if key in preparation}
    multiprocessing.spawn.prepare(preparation)
    if main and "__main__" in data["preload"]:
        me = multiprocessing.current_process()
        before = _process_state()
        # As in a spawned child: a pool started by main's unguarded top level
        # raises the standard library's "bootstrapping phase" error.
        me._inheriting = True  # type: ignore[attr-defined]
        try:
            multiprocessing.spawn.prepare(main)
        except BaseException:  # each worker imports it again and reports the error
            pass
        finally:
            del me._inheriting  # type: ignore[attr-defined]
        why = _per_process_state(before, _process_state(), watch)
        if why is not None:
            return f"the main module {why} at import: each worker imports it itself, as under spawn"
    for name in data["preload"]:
        if name == "__main__":
            continue
        try:
            __import__(name)
        except Exception as e:
            why = f"{type(e).__name__}: {text_of(e)}"
            say(f"warden: zygote {os.getpid()}: cannot preload {name!r}: {why}")
    if _interpreters() > 1:
        # CPython's fork() of a process with a subinterpreter aborts the
        # child (3.12, 3.13) or leaves it hung (3.11).
        return (
            "an import made a subinterpreter, and such a process cannot fork: "
            "the workers start without it and import what they need themselves, as under spawn"
        )
    return None


def _interpreters() -> int:
    """How many interpreters this process has: more than one only if an
    import made a subinterpreter, which takes the module that makes them."""
    for name in ("_interpreters", "_xxsubinterpreters"):
        module = sys.modules.get(name)
        if module is not None:
            try:
                return len(module.list_all())
            except Exception:
                return 2  # cannot tell: as if it had made one
    return 1


def _process_state() -> tuple[int, str, tuple[Any, ...]]:
    """What a module's import can set that is per process: finalizers, the
    working directory, the stop signals' handlers."""
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    return (len(weakref.finalize._registry), cwd, tuple(signal.getsignal(s) for s in _WORKER_SIGNALS))  # type: ignore[attr-defined]


def _per_process_state(before: tuple[Any, ...], after: tuple[Any, ...], watch: _SeedWatch) -> str | None:
    """Whether main's import made state that, copied into every fork, would
    not be what a spawned worker has: an object with a finalizer (a
    ``tempfile.TemporaryDirectory``: each worker's own under spawn, and each
    worker's exit would remove the one they share), a global generator seeded
    (``random.seed(os.getpid())`` gives each spawned worker its own stream),
    a new working directory or a handler for a stop signal (which a forked
    worker's preparation would replace)."""
    if after[0] > before[0]:
        return "made an object with a finalizer"
    if any(watch.seeded.values()):
        return "seeded a global random generator"
    if after[1] != before[1]:
        return "changed the working directory"
    if after[2] != before[2]:
        return "set a handler for SIGTERM, SIGINT or SIGHUP"
    return None


def finish() -> None:
    """The end of a zygote that never forked a worker (the pool refused what
    main's import made, see :func:`_per_process_state`, or was done first):
    what the import made is finalized as at the end of a spawned child that
    imported main, instead of being left behind: its globals are cleared and
    collected (a ``NamedTemporaryFile`` removes its file) and the finalizers
    left run (a ``TemporaryDirectory`` removes its directory). Exit handlers
    are not run: main's would run once more than under spawn. A zygote that
    forked leaves this to its workers, each of which has its own copy."""
    _workerloop._clear_program_globals()
    weakref.finalize._exitfunc()  # type: ignore[attr-defined]


def main() -> None:
    """Parks as a zygote; in each forked worker, runs the worker loop."""
    # What an exec'd worker imports only when it needs it (to report a
    # failure) costs a forked one nothing once the zygote has it.
    import traceback  # noqa: F401

    _warden.zygote_main(prepare, finish)
    _workerloop.main()
