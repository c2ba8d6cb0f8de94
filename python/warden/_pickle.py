"""How warden turns calls into bytes.

* Protocol 5, with the reducers of ``multiprocessing`` (connections, sockets,
  bound methods) -- what ``ForkingPickler`` pickles, warden pickles.
* When plain pickle refuses (lambdas, closures, local classes) or cannot work
  (the pickle names the parent's ``__main__``, and it is interactive, so the
  child cannot import it), ``cloudpickle`` pickles the same object by value.
  A pickle that names nothing of ``__main__`` (library functions, builtins,
  plain data) stays a plain pickle even then: a notebook's calls of library
  code neither import ``cloudpickle`` nor pay for it. What plain pickle
  refuses for another reason, ``cloudpickle`` refuses too, with the standard
  library's error, where its own reducer would send a copy that behaves
  otherwise (an open file as a ``StringIO`` snapshot: see
  :func:`_cloud_pickler_class`). A function of ``__main__`` sent by value
  runs in the worker's namespace of main, not in a fresh copy of the parent's
  globals (:func:`main_namespace`). A class of an importable ``__main__``
  goes by reference even in a ``cloudpickle``, as plain pickle sends it: the
  task gets the worker's own class (its enum members, what ``isinstance``
  knows), not a copy (:func:`_main_names_class`).
* Objects handed to a child *at spawn time* (``Process`` arguments, pool
  ``initargs``) are pickled while a spawning context is set, exactly as the
  standard library's spawn start method does: process-shared objects
  (``multiprocessing.Queue``, ``Lock``, ``Value``, manager proxies,
  ``warden.Event``) ask it to duplicate their fds for the child, and warden
  passes those fds to the child at the same numbers.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import io
import itertools
import os
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from multiprocessing import context as _mp_context
from multiprocessing.reduction import ForkingPickler
from pickle import dumps as _dumps  # bound at import: a task that patches pickle cannot break warden
from pickle import loads as _loads

from . import _oob
from ._remote import text_of

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 5

#: Handles pickled so far that the receiver opens through this process's
#: descriptors (``warden.Event`` outside a spawn): a worker whose result has
#: one lets the value go before sending it, so that such a handle only the
#: result held is gone when the parent opens it, whatever the timing.
opened_through_this_process = 0


def loads(data: Any) -> Any:
    """Unpickles a task's call or outcome, with its out-of-band buffers if it
    has some; numpy arrays arrive writable (see ``_oob.unpickle``)."""
    if type(data) is _oob.Received:
        return data.load()
    return _oob.unpickle(data)


class _Pickler(pickle.Pickler):
    dispatch_table: dict[type, Any] = {}


#: The reducers the dispatch table was made from, in their tables' order.
_dispatch_made_from: tuple[tuple[Any, ...], tuple[Any, ...]] = ((), ())


def _pickler() -> type[_Pickler]:
    """The pickler, its dispatch table being copyreg's reducers plus
    ForkingPickler's as one dict (much faster for the C pickler than a chain
    of mappings), made again when either changes (libraries register
    reducers when they are imported; a program may replace one)."""
    global _dispatch_made_from
    made_from = (tuple(copyreg.dispatch_table.values()), tuple(ForkingPickler._extra_reducers.values()))  # type: ignore[attr-defined]
    if made_from != _dispatch_made_from:
        table = dict(copyreg.dispatch_table)
        table.update(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
        table[memoryview] = _oob.reduce_memoryview
        _Pickler.dispatch_table = table
        _dispatch_made_from = made_from
    return _Pickler


_cloud_pickler: type | None = None


def _as_plain(obj: Any) -> Any:
    """Reduces ``obj`` as the standard pickler does (``copyreg``'s reducer for
    its type, else its ``__reduce_ex__``): for an object the standard library
    refuses, its own error, e.g. ``TypeError: cannot pickle
    '_io.TextIOWrapper' object``."""
    reduce = copyreg.dispatch_table.get(type(obj))
    return reduce(obj) if reduce is not None else obj.__reduce_ex__(PROTOCOL)


def _text_file_reduce(obj: Any) -> Any:
    """An open text file: refused, as by the standard library, except this
    interpreter's own ``sys.stdout``/``sys.stderr``, which go as the worker's
    (``cloudpickle``'s way, for a function's default ``file=sys.stderr``).
    ``cloudpickle`` would send any other file readable as a ``StringIO`` of
    its contents: the task would write to a copy, and a pickled
    ``NamedTemporaryFile`` deletes the file when the copy is collected."""
    for name in ("stdout", "stderr"):
        if obj is getattr(sys, name) and obj is getattr(sys, f"__{name}__"):
            return getattr, (sys, name)
    return _as_plain(obj)


def _cloud_pickler_class() -> type:
    """``cloudpickle``'s pickler with ``ForkingPickler``'s reducers, for what
    the standard pickler refuses because it would pickle a function or class
    by reference. Of ``cloudpickle``'s reducers for other objects the standard
    library refuses, it keeps those that give the task what it would have
    had (code, cells, modules by name, descriptors, read-only views: what
    functions and classes by value hold), and refuses, with the standard
    library's error, those that would give it a copy behaving otherwise:
    open text files (a ``StringIO`` snapshot; binary files it refuses
    already) and ``weakref.WeakSet`` (rebuilt empty: nothing else holds its
    items in the worker)."""
    global _cloud_pickler
    if _cloud_pickler is None:
        import weakref

        import cloudpickle

        code_reduce = cloudpickle.CloudPickler.dispatch_table[types.CodeType]

        def code_keeping_its_file(obj: types.CodeType) -> Any:
            # A function's code by value, with the name of the file it came
            # from: cloudpickle (from 3.0) writes "<dynamic-code>" there, so
            # that a payload does not depend on where the function was
            # defined; a traceback from the worker then named no file and
            # showed none of its lines, where the standard library's fork
            # shows both (a notebook's cell, a function defined under
            # `if __name__ == "__main__":`).
            make, args = code_reduce(obj)
            return make, tuple(
                obj.co_filename if isinstance(a, str) and a == "<dynamic-code>" else a for a in args
            )

        class CloudPickler(cloudpickle.CloudPickler):  # type: ignore[misc]  # cloudpickle is untyped
            dispatch_table = collections.ChainMap(
                ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
                {
                    io.TextIOWrapper: _text_file_reduce,
                    weakref.WeakSet: _as_plain,
                    memoryview: _oob.reduce_memoryview,
                    types.CodeType: code_keeping_its_file,
                },
                cloudpickle.CloudPickler.dispatch_table,
            )

            def reducer_override(self, obj: Any) -> Any:
                # A class of an importable __main__ goes by reference, as the
                # standard pickler sends it (the worker has main imported):
                # by value, the task would get a copy of the class, not the
                # worker's own (an enum member that `is` no member of the
                # worker's enum, an instance no isinstance() recognizes).
                if isinstance(obj, type):
                    if _main_names_class(obj):
                        return NotImplemented  # save_global: __main__.<qualname>
                    if _program_names_class(obj):
                        # The same, for a program a tool runs (see program_namespace).
                        return main_attribute, (obj.__qualname__,)
                return super().reducer_override(obj)

            def _dynamic_function_reduce(self, func: Any) -> Any:
                reduced = super()._dynamic_function_reduce(func)
                main = sys.modules.get("__main__")
                # Also a copy of a function of __main__ that came by value
                # itself (Dask sends the client's functions so): it names
                # __main__, but its globals are a dict of its own.
                of_main = getattr(func, "__module__", None) == "__main__"
                if main is None or (func.__globals__ is not main.__dict__ and not of_main):
                    return reduced
                make, (code, _, *rest), (attrs, slots), items, pairs, _ = reduced
                slots = {**slots, _VERSIONS: (os.getpid(), _versions_of(slots["__globals__"]))}
                state = (attrs, slots)
                return make, (code, _MAIN_NAMESPACE, *rest), state, items, pairs, _main_function_setstate

        _cloud_pickler = CloudPickler
    return _cloud_pickler


class _MainNamespace:
    """Pickles as a call of :func:`main_namespace` in the process that loads it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return main_namespace, ()


_MAIN_NAMESPACE = _MainNamespace()

#: In a worker whose parent's ``__main__`` could not be imported (``python
#: -c``, a notebook, stdin): the one namespace of the functions it sent by value.
_parent_main: dict[str, Any] | None = None


def main_namespace() -> dict[str, Any]:
    """The globals a function of the parent's ``__main__`` gets when it
    arrives by value (``cloudpickle``: a lambda, a closure, or any function of
    an interactive ``__main__``): in a worker, the namespace of the parent's
    main module as the worker imported it (``__mp_main__``, as spawn does);
    where it could not be imported, one namespace of the worker's own, shared
    by every such function it receives; in the program itself, its
    ``__main__``. So such a function sees what the worker's initializer or
    earlier tasks set in main's globals, as a function sent by reference
    does, instead of a copy of the parent's values made for each call."""
    global _parent_main
    for name in ("__mp_main__", "__main__"):
        module = sys.modules.get(name)
        # A worker started without the parent's main has its own entry point there.
        spec = getattr(module, "__spec__", None)
        if module is not None and getattr(spec, "name", None) != "warden._worker":
            return _code_namespace(module)
    if _parent_main is None:
        import builtins

        _parent_main = {"__name__": "__main__", "__builtins__": builtins}
    return _parent_main


_FunctionType = type(main_namespace)


def _code_namespace(module: Any) -> dict[str, Any]:
    """The namespace the code of ``module`` runs in. For the parent's main
    module imported in a worker it is not the module's ``__dict__``: spawn's
    preparation runs main with ``runpy.run_path``, in a namespace of its own,
    and gives the module a copy; main's functions (and so its initializer)
    read and write the original."""
    namespace: dict[str, Any] = vars(module)
    name = module.__name__
    for value in namespace.values():
        # Not a wrapper that only names the module (``functools.wraps``: a
        # ``contextlib.contextmanager``, a ``functools.lru_cache`` in Python):
        # its globals are those of the module that defines the wrapper.
        if type(value) is not _FunctionType or value.__module__ != name:
            continue
        globals_: dict[str, Any] = value.__globals__
        if globals_.get("__name__") == name:
            return globals_
    return namespace


#: The immutable values functions sent by value put into a namespace of
#: main's, by the namespace's id and the name: a later function's value
#: replaces one of those as long as the worker's code has not rebound the name.
_given: dict[tuple[int, str], Any] = {}

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range})

#: The key, among the state of a function of ``__main__`` sent by value, of
#: the versions of the globals it carries (see :func:`_versions_of`).
_VERSIONS = "__warden_versions__"


class _Sent:
    """What this process last sent under a name of main's globals: the
    object (weakly where it can be; else held until only this holds it), its
    version, and whether the name was rebound after it was first sent."""

    __slots__ = ("rebound", "ref", "strong", "version")

    def __init__(self, value: Any, version: int, rebound: bool) -> None:
        try:
            self.ref: Any = weakref.ref(value)
            self.strong: Any = None
        except TypeError:  # a dict, a list, an int: held, and let go of below
            self.ref, self.strong = None, value
        self.version = version
        self.rebound = rebound

    def holds(self, value: Any) -> bool:
        if self.ref is not None:
            return self.ref() is value
        return self.strong is value


_sent: dict[str, _Sent] = {}
#: Re-entrant only so that :func:`_let_go_of_unused` can tell that its own
#: thread holds it; nothing takes it twice.
_sent_lock = threading.RLock()
_next_version = itertools.count(1)
#: Whether :func:`_let_go_of_unused` is among ``gc.callbacks``.
_gc_hooked = False
#: Set by :func:`let_go_at_exit`: no values are held or versioned after it.
_closed = False


def _new_lock_after_fork() -> None:
    global _sent_lock
    _sent_lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _versions_of(values: dict[str, Any]) -> dict[str, tuple[int, bool]]:
    """In the process that sends functions of its ``__main__`` by value:
    for each global such a function carries, a version that changes when
    the name is bound to another object, and whether that has happened since
    the name was first sent. A worker that had the name from an earlier
    version, or that has only its own value (its import of main), takes the
    parent's once the parent has rebound it (a notebook's cell run again),
    so that no worker keeps what the parent replaced. Only this process's
    binding counts: the worker's changes to what it was given are its own."""
    global _gc_hooked
    out: dict[str, tuple[int, bool]] = {}
    replaced: list[_Sent] = []  # let go of after the lock (see let_go_at_exit)
    with _sent_lock:
        if _closed:  # under the lock: not after let_go_at_exit has begun
            return out
        if not _gc_hooked:
            import gc

            gc.callbacks.append(_let_go_of_unused)
            _gc_hooked = True
        for name, value in values.items():
            sent = _sent.get(name)
            if sent is None:
                sent = _sent[name] = _Sent(value, next(_next_version), False)
            elif not sent.holds(value):
                replaced.append(sent)
                sent = _sent[name] = _Sent(value, next(_next_version), True)
            out[name] = (sent.version, sent.rebound)
    del replaced
    _let_go_of_unused("start", {})
    return out


def let_go_at_exit() -> None:
    """At interpreter exit, before modules are torn down: lets go of every
    value :func:`_versions_of` holds and leaves ``gc.callbacks``, so that
    the program's objects are finalized at exit as they would be without
    warden (a callback would keep this module, and them, alive)."""
    global _closed, _gc_hooked
    with _sent_lock:
        _closed = True
        # Let go of after the lock: their ``__del__`` may take locks of the
        # program's, whose holders may be collecting, waiting for this one.
        held = list(_sent.values())
        _sent.clear()
        if _gc_hooked:
            import gc

            with contextlib.suppress(ValueError):
                gc.callbacks.remove(_let_go_of_unused)
            _gc_hooked = False
    del held


def _let_go_of_unused(phase: str, _info: dict[str, int]) -> None:
    """Lets go of the values :class:`_Sent` holds that nothing else does any
    more (the program rebound or deleted the name): after each send, and as
    the garbage collector starts (so a large list the program deleted is
    not kept until the next send). The next value sent under such a name is
    a new version all the same."""
    if phase != "start" or _sent_lock._is_owned():  # type: ignore[attr-defined]
        return  # a collection that started while this thread updates the table
    # ``with``, not a bare ``acquire()``: a signal handler's error (a Ctrl-C)
    # may come wherever this collection started, and no handler runs between
    # ``with`` taking the lock and its block. Another thread holding it
    # updates the table without waiting for anything, and lets go soon: no
    # value of the program's is let go of under it (its ``__del__`` could
    # wait for a lock the thread collecting here holds).
    unused = []  # let go of after the lock (see let_go_at_exit)
    with _sent_lock:
        for sent in _sent.values():
            # Two references: the table's and the argument's.
            if sent.strong is not None and sent.strong is not _LET_GO and sys.getrefcount(sent.strong) <= 2:
                unused.append(sent.strong)
                sent.strong = _LET_GO
    del unused


#: Stands for a value :func:`_versions_of` let go of: no value is it.
_LET_GO = object()

#: In a worker: the version of each name of a namespace of main's it last
#: took or saw from its parent, by the namespace's id and the name.
_versions_seen: dict[tuple[int, str], int] = {}


def _immutable(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` cannot change in place (a number, a string, a tuple
    of such): the worker cannot have made it its own without rebinding the
    name, as it can a dict it fills (a cache)."""
    kind = type(value)
    if kind in _ATOMS:
        return True
    if (kind is tuple or kind is frozenset) and depth < 3 and len(value) <= 64:
        return all(_immutable(item, depth + 1) for item in value)
    return False


def _main_function_setstate(func: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """``cloudpickle``'s state setter for a function of the parent's
    ``__main__``, but the globals it carries (the parent's values when it was
    pickled) only fill in names the namespace does not have yet, replace
    immutable values (numbers, strings, tuples of such) an earlier such
    function brought and the worker has not rebound since (a loop variable a
    lambda reads: each call sees the parent's value of the time), replace
    functions the parent defined anew, and replace any value the parent
    rebound after it first sent it (the versions :func:`_versions_of` sends
    along; only those of this process's parent count). Otherwise the
    worker's own values of main's globals (its import of main, its
    initializer, its tasks' assignments, a dict or list it fills in place)
    win, as they do for a function sent by reference."""
    try:
        from cloudpickle.cloudpickle import _function_setstate
    except ImportError:  # cloudpickle 2.x keeps it in another module
        from cloudpickle.cloudpickle_fast import _function_setstate

    attrs, slots = state
    sender, versions = slots.pop(_VERSIONS, (None, None))
    if sender != os.getppid():  # only a worker's parent's versions count
        versions = None
    namespace = func.__globals__
    where = id(namespace)
    taken = {}
    for name, value in slots["__globals__"].items():
        sent = versions.get(name) if versions is not None else None
        rebound = False
        if sent is not None:
            version, since = sent
            rebound = since and _versions_seen.get((where, name)) != version
            _versions_seen[(where, name)] = version
        if name in namespace and not rebound:
            mine = namespace[name]
            brought = _given.get((where, name), _given)
            if mine is not brought and not _redefined(mine, value):
                # The worker's own now: what was brought is not kept alive.
                _given.pop((where, name), None)
                continue
        taken[name] = value
        if _immutable(value):
            _given[(where, name)] = value
        else:
            _given.pop((where, name), None)
    slots["__globals__"] = taken
    _function_setstate(func, (attrs, slots))


def _redefined(mine: Any, parents: Any) -> bool:
    """Whether the parent's function ``parents`` is a new definition of the
    worker's ``mine`` (other code under the same name: a helper fixed and
    run again in a notebook or a REPL): then the parent's wins, as a
    redefinition in the parent means to. Other values stay the worker's."""
    code = getattr(parents, "__code__", None)
    return code is not None and callable(mine) and getattr(mine, "__code__", code) != code


#: The last answer of :func:`_main_is_importable`: the module it was about
#: (weakly: a strong reference would keep ``__main__`` alive past the
#: interpreter's clearing of ``sys.modules``, and its objects' ``__del__``
#: would then run with main's globals already ``None``), its path, the answer.
_main_checked: tuple[Callable[[], Any], Any, bool] = (lambda: None, None, True)


def _main_is_importable() -> bool:
    """Whether a child can import this process's ``__main__`` (as spawn does)."""
    global _main_checked
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is not None and _main_checked[0]() is main and _main_checked[1] == path:
        return _main_checked[2]
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if main is None:
        importable = True
    elif spec_name is not None:
        # Spawn's preparation imports a main run as ``python -m name``, but
        # not one named ``__main__`` or ``*.__main__`` (a package's
        # ``__main__.py``, a zipapp): those it leaves alone, as spawn does.
        importable = spec_name != "__main__" and not spec_name.endswith(".__main__")
    else:
        importable = path is not None and os.path.isfile(path)
    # None, or a stand-in that cannot be weakly referenced: not cached.
    with contextlib.suppress(TypeError):
        _main_checked = (weakref.ref(main), path, importable)
    return importable


#: Set in a process whose program a tool runs in a namespace of its own
#: (``python -m cProfile prog.py``), and whose workers import that program
#: as their main: the program's namespace (see ``_runner._program_run_by_a_tool``).
program_namespace: dict[str, Any] | None = None
#: Its file, as the workers find it (``__file__`` as the tool got it may be
#: relative to a directory the program has left).
program_file: str | None = None


def _program_names_class(cls: type) -> bool:
    """Whether class ``cls`` is one the program a tool runs defines (see
    :data:`program_namespace`), and its workers' import of the program binds:
    it then goes by reference to their main, as a class of ``__main__`` goes
    when the program runs alone, so that the task gets the worker's own class
    (an enum member that ``is`` its member, an instance ``isinstance``
    knows), not a copy made by value."""
    names = program_namespace
    if names is None or getattr(cls, "__module__", None) != "__main__":
        return False
    qualname = getattr(cls, "__qualname__", None)
    if type(qualname) is not str or "<locals>" in qualname:
        return False
    first, *rest = qualname.split(".")
    found: Any = names.get(first)
    try:
        for part in rest:
            found = getattr(found, part)
    except Exception:
        return False
    if found is not cls:
        return False
    try:
        bound = _bound_at_import(program_file)
    except OSError:
        bound = None
    if bound is not None and first not in bound:
        return False  # defined under the program's main guard: by value
    import cloudpickle

    return "__main__" not in cloudpickle.list_registry_pickle_by_value()


def main_attribute(qualname: str) -> Any:
    """In a worker: what its main module (the parent's program) names
    ``qualname``; how a class of a program a tool runs arrives (see
    :func:`_program_names_class`)."""
    found: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _main_names_class(cls: type) -> bool:
    """Whether the standard pickler would send class ``cls`` by reference as
    a class of ``__main__`` and a child could load it: ``__main__`` names it
    by its qualified name, and a child can import ``__main__`` (see
    :func:`_main_is_importable`), which binds its name as it is imported
    (a class defined under ``if __name__ == "__main__":`` exists only in the
    parent: it goes by value, as the functions there do); unless
    ``cloudpickle`` was told to pickle ``__main__`` by value
    (``cloudpickle.register_pickle_by_value``)."""
    if getattr(cls, "__module__", None) != "__main__":
        return False
    name = getattr(cls, "__qualname__", None)
    main = sys.modules.get("__main__")
    if main is None or type(name) is not str or "<locals>" in name:
        return False
    found: Any = main
    try:
        for part in name.split("."):
            found = getattr(found, part)
    except Exception:
        return False
    if found is not cls or not _main_is_importable():
        return False
    try:
        bound = _main_bound(main)
    except OSError:
        bound = None
    if bound is not None and name.split(".")[0] not in bound:
        return False
    import cloudpickle

    return "__main__" not in cloudpickle.list_registry_pickle_by_value()


_Names = tuple[frozenset[str] | None, frozenset[str]]

#: The last answer of :func:`_main_source_names`: the file, its mtime, the names.
_bound_checked: tuple[Any, float, _Names] = (None, 0.0, (None, frozenset()))


def _bound_at_import(path: Any) -> frozenset[str] | None:
    """The names the main module at ``path`` binds at its top level when a
    child imports it (as ``__mp_main__``): those outside its ``if __name__ ==
    "__main__":`` blocks. ``None`` where that cannot be told (no source, a
    syntax the parser refuses): then every name counts as bound."""
    return _main_source_names(path)[0]


def _main_source_names(path: Any) -> _Names:
    """The names the main module at ``path`` binds at its top level as a
    child imports it (see :func:`_bound_at_import`), and those its ``if
    __name__ == "__main__":`` blocks bind."""
    global _bound_checked
    if type(path) is not str:
        return None, frozenset()
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None, frozenset()
    if _bound_checked[0] == path and _bound_checked[1] == mtime:
        return _bound_checked[2]
    # Not caught: an OSError of this process (no descriptor left) is not an
    # answer, and is not kept as one (see _main_bound).
    import ast

    def names_main(test: ast.expr, op: type) -> bool:
        # `__name__ == "__main__"` (either way round), with ``op`` for ``==``.
        if not isinstance(test, ast.Compare) or len(test.ops) != 1 or not isinstance(test.ops[0], op):
            return False
        sides = [test.left, *test.comparators]
        names = {s.id for s in sides if isinstance(s, ast.Name)}
        texts = {s.value for s in sides if isinstance(s, ast.Constant)}
        return names == {"__name__"} and texts == {"__main__"}

    def guard(node: ast.AST) -> str | None:
        # Which branch of an ``if`` runs only as main: its body under
        # `if __name__ == "__main__":` (or `... and more:`), its else under
        # `if __name__ != "__main__":`, whose body runs in the child.
        if not isinstance(node, ast.If):
            return None
        test = node.test
        if names_main(test, ast.Eq):
            return "body"
        if (
            isinstance(test, ast.BoolOp)
            and isinstance(test.op, ast.And)
            and any(names_main(v, ast.Eq) for v in test.values)
        ):
            return "body"
        return "orelse" if names_main(test, ast.NotEq) else None

    def collect(body: list[ast.stmt], into: set[str], in_guard: set[str]) -> None:
        for node in body:
            visit(node, into, in_guard)

    def visit(node: ast.stmt, into: set[str], in_guard: set[str]) -> None:
        branch = guard(node)
        if branch is not None:
            # (At the top level, or in a `try:`, a `with`, another `if`.)
            only_main, both = (node.body, node.orelse) if branch == "body" else (node.orelse, node.body)  # type: ignore[attr-defined]
            collect(only_main, in_guard, in_guard)
            collect(both, into, in_guard)
            return
        todo: list[ast.AST] = [node]
        while todo:
            child = todo.pop()
            if child is not node and guard(child) is not None:
                visit(child, into, in_guard)  # type: ignore[arg-type]
                continue
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                into.add(child.name)  # what its body binds is its own,
                # but for the names it declares global (it may run at import)
                into.update(
                    name for inner in ast.walk(child) if isinstance(inner, ast.Global) for name in inner.names
                )
                continue
            if isinstance(child, ast.Lambda):
                continue
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                into.add(child.id)
            elif isinstance(child, ast.alias):
                into.add((child.asname or child.name).split(".")[0])
            todo.extend(ast.iter_child_nodes(child))

    names: _Names
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source, path)
        found: set[str] = set()
        guarded: set[str] = set()
        collect(tree.body, found, guarded)
        names = (frozenset(found), frozenset(guarded))
    except (SyntaxError, ValueError, RecursionError):
        names = (None, frozenset())
    _bound_checked = (path, mtime, names)
    return names


#: What :func:`_main_names` found: main (weakly), the names of its source.
_main_names_found: tuple[Callable[[], Any], _Names] = (lambda: None, (None, frozenset()))


def _main_names(main: Any) -> _Names:
    """The names this process's ``main`` binds as a child imports it, and
    those its guard blocks bind (see :func:`_main_source_names`), read from
    its file once (later edits of the file do not change what the program's
    workers imported at its start). ``OSError`` if the file cannot be read
    now (no descriptor left): asked again next time."""
    global _main_names_found
    if _main_names_found[0]() is main:
        return _main_names_found[1]
    names = _main_source_names(getattr(main, "__file__", None))
    with contextlib.suppress(TypeError):  # a stand-in that cannot be weakly referenced: not kept
        _main_names_found = (weakref.ref(main), names)
    return names


def _main_bound(main: Any) -> frozenset[str] | None:
    """The names this process's ``main`` binds as a child imports it."""
    return _main_names(main)[0]


def _plain(obj: Any, beside: _Beside | None = None) -> bytes:
    buf = io.BytesIO()
    if beside is None:
        _pickler()(buf, PROTOCOL).dump(obj)
    else:
        beside.dump(_plain_oob, buf, obj)
    return buf.getvalue()


def _cloud(obj: Any, beside: _Beside | None = None) -> bytes:
    buf = io.BytesIO()
    if beside is None:
        _cloud_pickler_class()(buf, protocol=PROTOCOL).dump(obj)
    else:
        beside.dump(_cloud_oob, buf, obj)
    return buf.getvalue()


class _Beside:
    """What pickling an object for a new child sends beside its pickle, as
    a task's call sends it (see ``_oob``): the large buffers :func:`_oob.prepare`
    found in what the user passed (their stand-ins, by ``id``), and those the
    last pickler given this object handed out of band (numpy arrays too)."""

    __slots__ = ("buffers", "found")

    def __init__(self, found: dict[int, Any] | None) -> None:
        self.found = found
        self.buffers: list[pickle.PickleBuffer] = []

    def dump(
        self,
        pickler: Callable[[io.BytesIO, Callable[[pickle.PickleBuffer], bool]], pickle.Pickler],
        file: io.BytesIO,
        obj: Any,
    ) -> None:
        collector = _oob.Collector()
        self.buffers = collector.buffers  # a failed attempt's are not kept
        p = pickler(file, collector)
        if self.found is not None:
            p.persistent_id = _oob.persistent_id(self.found)  # type: ignore[method-assign]
        p.dump(obj)


def _plain_oob(file: io.BytesIO, callback: Callable[[pickle.PickleBuffer], bool]) -> pickle.Pickler:
    return _pickler()(file, PROTOCOL, buffer_callback=callback)


def _cloud_oob(file: io.BytesIO, callback: Callable[[pickle.PickleBuffer], bool]) -> pickle.Pickler:
    return _cloud_pickler_class()(file, protocol=PROTOCOL, buffer_callback=callback)  # type: ignore[no-any-return]


#: Types every pickler saves the same way (before any reducer or dispatch
#: table is looked at), and that never carry a buffer worth sending out of band.
_SCALARS = frozenset({int, float, bool, complex, str, type(None)})
_FUNCTION = type(_pickler)
_BUILTIN = type(len)
_MODULE = type(sys)

#: How a pickle names the parent's main module: the module name of a global
#: it saves by reference. A pickle without it refers to nothing of ``__main__``
#: (a string value that happens to be "__main__" only costs a cloudpickle).
_MAIN_NAME = b"__main__"


def _child_can_load(data: bytes) -> bool:
    """Whether a child can unpickle ``data`` made by the plain pickler: yes
    unless it names ``__main__`` and either this ``__main__`` cannot be
    imported or it names a function or class of main that a child's import
    of main does not define (see :func:`_names_guarded`)."""
    if _MAIN_NAME not in data:
        return True
    return _main_is_importable() and not _names_guarded(data)


class _NamesMain(Exception):
    """A plain pickle names a ``__main__`` the child cannot import, or a
    name of main only the parent has."""


def _refuse_main(data: bytes) -> None:
    if _MAIN_NAME in data:
        raise _NamesMain


def _refuse_guarded(data: bytes) -> None:
    if _MAIN_NAME in data and _names_guarded(data):
        raise _NamesMain


#: What :func:`_guarded` found: main's namespace (its id), its size and last
#: name (a name deleted and another defined changes the last), and the
#: functions and classes of main bound there that a guard block of main
#: defines and a child's import of main does not bind: ``(name, its pickled
#: form, the start of a nested class's, the object)``.
_guarded_found: tuple[Any, ...] = (0, -1, None, ())


def _guarded(main: Any, namespace: dict[str, Any]) -> tuple[tuple[str, bytes, bytes | None, Any], ...]:
    """The functions and classes of ``main`` that only this process has
    (defined under ``if __name__ == "__main__":``): their names, how a pickle
    writes them (and the start of a nested class's, for a class), the
    objects. ``OSError`` if main's file cannot be read now."""
    global _guarded_found
    key = (id(namespace), len(namespace), next(reversed(namespace), None))
    bound, in_guard = _main_names(main)
    found: list[tuple[str, bytes, bytes | None, Any]] = []
    if bound is not None:
        for name, value in list(namespace.items()):
            # Only what a guard block defines, not what main binds otherwise
            # than the parser sees (globals().update(...), exec): those a
            # child's import of main may well bind too, as before by reference.
            if name in bound or name not in in_guard or getattr(value, "__module__", None) != "__main__":
                continue
            if type(value) is _FunctionType:
                found.append((name, _pickled_name(name), None, value))
            elif isinstance(value, type):
                found.append((name, _pickled_name(name), (name + ".").encode(), value))
    _guarded_found = (*key, tuple(found))
    return _guarded_found[3]


def _pickled_name(name: str) -> bytes:
    """How a protocol 5 pickle writes a global's name ``name``: as a short
    string (``SHORT_BINUNICODE``, its length in one byte)."""
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > 255:
        return encoded
    return b"\x8c" + bytes([len(encoded)]) + encoded


def _guarded_now() -> tuple[tuple[str, bytes, bytes | None, Any], ...] | None:
    """What :func:`_guarded` finds in this process's main now (looked at
    again when main's namespace changes size or its last name); ``()`` in a
    worker, whose ``__main__`` is the parent's as imported there
    (``__mp_main__``, without its guard blocks: nothing it names is missing);
    ``None`` when that cannot be told now (main's file cannot be read: no
    descriptor left)."""
    main = sys.modules.get("__main__")
    namespace = getattr(main, "__dict__", None)
    if namespace is None or namespace.get("__name__") != "__main__":
        return ()
    found = _guarded_found
    last = next(reversed(namespace), None)
    if found[0] == id(namespace) and found[1] == len(namespace) and found[2] == last:
        # And each still bound as found: a name the guard block rebinds (a
        # function defined again in a loop) changes neither the size nor
        # the last name.
        for name, _, _, value in found[3]:
            if namespace.get(name) is not value:
                break
        else:
            return found[3]  # type: ignore[no-any-return]
    try:
        return _guarded(main, namespace)
    except Exception:
        return None


def _names_guarded(data: bytes) -> bool | None:
    """Whether a plain pickle ``data`` (which names ``__main__``) names a
    function or class of main that a guard block defines and a child's
    import of main does not (see :func:`_guarded`): a child could not
    load it (the standard library's workers fail with "Can't get attribute"),
    so it goes by ``cloudpickle``, by value, as loky sends it. ``None`` when
    that cannot be told now (main's file cannot be read): sent by
    reference, as before.

    Told by the name as a pickle writes a global's (a short string, then
    ``MEMOIZE`` and ``STACK_GLOBAL``). Where the name's bytes are there only
    otherwise, they are a string value that happens to be that name (a
    pickle made again by ``cloudpickle`` would run the arguments' reducers a
    second time, and one with a side effect, draining an iterator, would
    send what its second run gave); unless a global takes its name from the
    memo (``BINGET`` then ``STACK_GLOBAL``: the same string saved before,
    as a value), which only the pickle's opcodes tell, as they tell a class
    nested in one (``P.Q``) from a string value that starts with ``P.``.
    Those are read for a pickle of at most :data:`_OPCODES_READ_MAX` bytes;
    a larger one that may hold such a global goes by ``cloudpickle``."""
    guarded = _guarded_now()
    if guarded is None:
        return None
    if not guarded:
        return False
    main_namespace = vars(sys.modules["__main__"])
    import re

    ambiguous = []
    nested = False
    for name, encoded, dotted, value in guarded:
        if main_namespace.get(name) is not value:
            continue
        if encoded + b"\x94\x93" in data:
            return True
        if dotted is not None and dotted in data and re.search(b"\x8c." + re.escape(dotted), data, re.DOTALL):
            # A class nested in it (``P.Q``, one short string) or a string
            # value that starts so: told only by the opcodes.
            ambiguous.append(name)
            nested = True
        elif encoded in data:
            ambiguous.append(name)
    if not ambiguous:
        return False
    # ``BINGET`` or ``LONG_BINGET`` right before ``STACK_GLOBAL``: a
    # global's name taken from the memo.
    if not nested and re.search(rb"(?:h.|j....)\x93", data, re.DOTALL) is None:
        return False
    return len(data) > _OPCODES_READ_MAX or _saves_main_global(data, ambiguous)


#: The largest pickle :func:`_names_guarded` reads opcode by opcode (about a
#: microsecond each, in Python).
_OPCODES_READ_MAX = 256 * 1024


def _saves_main_global(data: bytes, names: list[str]) -> bool:
    """Whether the pickle ``data`` (protocol 4 or later) saves one of
    ``names`` of ``__main__`` as a global (or a class nested in one), read
    from its opcodes: the two strings ``STACK_GLOBAL`` takes, pushed as they
    are or fetched from the memo."""
    import pickletools

    memo: list[Any] = []
    pushed: list[Any] = [None, None]
    arg: Any  # what each opcode takes: an int for a memo's index
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name == "MEMOIZE":
                memo.append(pushed[-1])
                continue
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                value = arg
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                index = int(arg)
                value = memo[index] if 0 <= index < len(memo) else None
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                index = int(arg)
                memo.extend([None] * (index + 1 - len(memo)))
                memo[index] = pushed[-1]
                continue
            elif name == "STACK_GLOBAL":
                module, qualname = pushed[-2], pushed[-1]
                if module == "__main__" and isinstance(qualname, str) and qualname.partition(".")[0] in names:
                    return True
                value = None
            elif name == "FRAME":
                continue
            else:
                value = None
            pushed = [pushed[-1], value]
    except Exception:
        return True  # not read to its end: by value, as before
    return False


def _only_by_value(fn: Any) -> bool:
    """Whether the plain pickler certainly cannot send ``fn``, a function or
    class, so that a child loads it: a lambda, a local one, or one of a
    ``__main__`` the child cannot import or that a guard block of main
    defines (see :func:`_guarded`). A call of it is pickled by
    ``cloudpickle`` at once: a plain pickle first, only to be refused, would
    run the reducers of its arguments twice (and one with a side effect,
    draining an iterator, would send what its second run gave)."""
    if not isinstance(fn, (_FunctionType, type)):
        return False
    qualname = getattr(fn, "__qualname__", None)
    if type(qualname) is not str:
        return False
    if "<" in qualname:  # <lambda>, <locals>
        return True
    if getattr(fn, "__module__", None) != "__main__":
        return False
    if not _main_is_importable():
        return True
    guarded = _guarded_now()
    return bool(guarded) and any(value is fn for _, _, _, value in guarded)  # type: ignore[union-attr]


def _call_only_by_value(obj: Any) -> bool:
    """Whether ``obj`` is a call ``(fn, args, kwargs)`` whose function, or
    one of its arguments (a chunk's runner has the function it runs first; a
    callback), only ``cloudpickle`` can send (see :func:`_only_by_value`)."""
    if type(obj) is not tuple or len(obj) != 3:
        return False
    fn, args, kwargs = obj
    if _only_by_value(fn):
        return True
    # (Loops, not any() over a generator: this runs for every such call.)
    if type(args) is tuple:
        for arg in args:
            if (type(arg) is _FunctionType or isinstance(arg, type)) and _only_by_value(arg):
                return True
    if type(kwargs) is dict and kwargs:
        for arg in kwargs.values():
            if (type(arg) is _FunctionType or isinstance(arg, type)) and _only_by_value(arg):
                return True
    return False


def _is_small_and_plain(obj: Any) -> bool:
    """Whether ``obj`` is a scalar, or a call ``(function, scalars, {})`` of a
    plain function: what the standard pickler saves exactly as warden's own
    (a function is saved by reference before any reducer is looked at)."""
    t = type(obj)
    if t in _SCALARS:
        return True
    if t is not tuple or len(obj) != 3:
        return False
    fn, args, kwargs = obj
    if type(args) is not tuple or type(kwargs) is not dict or kwargs:
        return False
    # A builtin saved by reference (``abs``, ``math.sqrt``), not a bound
    # method of some object, which would be pickled with that object.
    if type(fn) is not _FUNCTION and not (type(fn) is _BUILTIN and type(fn.__self__) is _MODULE):  # type: ignore[attr-defined]
        return False
    for arg in args:  # noqa: SIM110 - a loop costs less than all() over a generator, on every task
        if type(arg) not in _SCALARS:
            return False
    return True


#: The first byte of a call whose function goes by reference, apart from its
#: arguments: ``BY_REF``, the length of the function's pickle (2 bytes, little
#: endian), that pickle, then the pickle of the arguments tuple. No pickle
#: starts with it (protocol 2 and later start with ``\x80``).
BY_REF = 0
_MAX_REF = 0xFFFF
_MAX_REFS = 4096

#: Functions sent by reference: ``id(fn) -> (fn, its module, its name, the
#: payload's head, whether it names __main__)``, fn and its module held
#: weakly, the head ``None`` for one whose pickle cannot go (it names a
#: ``__main__`` the child cannot import). A function goes by reference while
#: its module still names it, and one of main while a child can still import
#: main (not once main's script has run and its ``__file__`` is gone). Nothing here
#: keeps a function or a module alive: a strong reference to a function of
#: ``__main__`` would keep main's globals past the interpreter's clearing of
#: its modules, and the objects there would be finalized late, with the
#: modules they use already cleared.
if TYPE_CHECKING:
    _Ref = tuple[Callable[[], Any], Callable[[], Any], str, bytes | None, bool]
_refs: dict[int, _Ref] = {}


#: Set when the main thread has finished (threading's exit step, before
#: non-daemon threads are joined and ``atexit`` handlers run): from then on
#: the executors made before take no new work (``executor``).
main_thread_done = False


def note_main_thread_done() -> None:
    """Sets :data:`main_thread_done`: from threading's exit hooks, first
    thing (also from the executors' drain, which must refuse new work
    before it waits, as the standard library's exit step does)."""
    global main_thread_done
    main_thread_done = True


try:
    threading._register_atexit(note_main_thread_done)  # type: ignore[attr-defined]
except RuntimeError:  # imported while the interpreter shuts down: main is done already
    note_main_thread_done()
except AttributeError:  # no such hook in this Python: always check
    note_main_thread_done()


def _ref_of(fn: Any) -> bytes | None:
    """The payload's head for a call of ``fn`` by reference, or ``None`` if
    it cannot go so."""
    entry = _refs.get(id(fn))
    if entry is None or entry[0]() is not fn:
        entry = _new_ref(fn)
        if entry is None:
            return None
    module = entry[1]()
    if module is None or vars(module).get(entry[2]) is not fn:
        return None
    if entry[4] and not _main_is_importable():
        # Main's script has run (CPython removes its __file__ then: at exit,
        # or at the prompt of `python -i`): a new worker has no main to import.
        return None
    return entry[3]


def _new_ref(fn: Any) -> _Ref | None:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    name = getattr(fn, "__qualname__", None)
    if module is None or type(name) is not str or "." in name:
        return None
    try:
        if vars(module).get(name) is not fn:
            return None
        ref = _dumps(fn, PROTOCOL)
        names_main = _MAIN_NAME in ref
        entry: _Ref = (weakref.ref(fn), weakref.ref(module), name, None, names_main)
    except Exception:
        return None
    unknown = names_main and _main_is_importable() and _names_guarded(ref) is None
    if len(ref) <= _MAX_REF and _child_can_load(ref):
        entry = (*entry[:3], bytes([BY_REF]) + len(ref).to_bytes(2, "little") + ref, names_main)
    if unknown:
        return entry  # not kept: whether it is main's only here is told once main can be read
    if len(_refs) >= _MAX_REFS:
        _refs.clear()
    _refs[id(fn)] = entry
    return entry


def dumps_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, int | None]:
    """Pickles a task's call ``fn(*args, **kwargs)``, as :func:`dumps_oob`
    does. A small call of a module-level function or builtin (see
    :func:`_is_small_and_plain`), most small tasks, goes by reference apart
    from its arguments: the function's pickle (an import and a lookup each
    time, the larger part of a small call's cost in the parent and in the
    worker) is made once and reused while its module still names it;
    :func:`loads_call` reads it back."""
    call = (fn, args, kwargs)
    if _is_small_and_plain(call):
        head = _ref_of(fn)
        if head is not None:
            data = head + _dumps(args, PROTOCOL)
            if len(data) <= _oob.PICKLE_INLINE_MAX:
                return data, None
            # A huge string: the call travels beside the frame as it is (see
            # _oob.dumps), not pickled again; the worker reads it back there.
            return _oob.beside(data)
    return dumps_oob(call)


#: In a worker, what each function's pickle named: ``ref -> (namespace, name, fn)``.
_named: dict[bytes, tuple[dict[str, Any], str, Any]] = {}


def forget_the_programs_objects() -> None:
    """In a worker's exit path, before the program's modules are collected:
    lets go of the functions its tasks named (and their namespaces), and of
    the namespace of the functions that came by value."""
    global _parent_main
    _named.clear()
    _parent_main = None


def loads_call(payload: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Reads back a call made by :func:`dumps_call` by reference."""
    n = int.from_bytes(payload[1:3], "little")
    ref = bytes(payload[3 : 3 + n])
    known = _named.get(ref)
    if known is None or known[0].get(known[1]) is not known[2]:
        fn = _loads(ref)
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        name = getattr(fn, "__qualname__", None)
        if module is not None and type(name) is str:
            if len(_named) >= _MAX_REFS:
                _named.clear()
            _named[ref] = (vars(module), name, fn)
    else:
        fn = known[2]
    return fn, _loads(payload[3 + n :]), {}


def dumps_oob(obj: Any, to_parent: bool = False, lend: bool = True) -> tuple[bytes, int | None]:
    """Pickles a task's call or result: like :func:`dumps`, with large
    buffers out of band, lent or in a shared segment (see ``_oob``).
    Returns the pickle and the fd that carries them (owned by the caller),
    or ``None`` if there is none. ``to_parent``: a worker's result.
    ``lend=False`` copies large buffers into a segment now, even where they
    could be lent: for a caller that may change them before the task starts.

    A scalar, or a plain function's call with scalar arguments (most small
    tasks and their results), takes a short cut: the standard pickler's
    one-call ``pickle.dumps``, which gives the same bytes."""
    if _is_small_and_plain(obj):
        try:
            data = _dumps(obj, PROTOCOL)
        except Exception:
            pass  # e.g. a lambda: the full path below says why, or uses cloudpickle
        else:
            if _child_can_load(data):
                if len(data) <= _oob.PICKLE_INLINE_MAX:
                    return data, None
                # A pickle over the inline maximum (a huge string) travels
                # beside its frame, as it is: the object is not pickled again.
                return _oob.beside(data, to_parent=to_parent, lend=lend)
    found = _oob.prepare(obj)
    if _call_only_by_value(obj):
        try:
            return _oob.dumps(obj, _cloud_oob, to_parent=to_parent, lend=lend, found=found)
        except (_oob.SegmentTooLarge, OSError):
            raise
        except Exception:
            pass  # the plain pickler's error says what the standard library's would: below
    check = _refuse_guarded if _main_is_importable() else _refuse_main
    try:
        return _oob.dumps(obj, _plain_oob, to_parent=to_parent, check=check, lend=lend, found=found)
    except (_oob.SegmentTooLarge, OSError):
        raise  # no room for its buffers: cloudpickle would find none either
    except _NamesMain:
        return _oob.dumps(obj, _cloud_oob, to_parent=to_parent, lend=lend, found=found)
    except Exception as plain_error:
        try:
            return _oob.dumps(obj, _cloud_oob, to_parent=to_parent, lend=lend, found=found)
        except Exception as cloud_error:
            raise _neither(plain_error, cloud_error) from None


def _neither(plain_error: Exception, cloud_error: Exception) -> Exception:
    """The error to raise when neither pickler could pickle a call: the
    plain pickler's (the standard library's own error), with a note. Where
    the plain pickler only refused what ``cloudpickle`` sends by value (a
    lambda, a local function or class: "attribute lookup ... failed"), the
    error keeps its type (what ``except pickle.PicklingError`` catches under
    the standard library) but says what could not be sent: ``cloudpickle``'s
    message (the lock a lambda captured)."""
    text = text_of(plain_error)
    by_reference_only = isinstance(plain_error, (pickle.PicklingError, AttributeError)) and any(
        words in text for words in ("attribute lookup", "local object", "Can't get attribute")
    )
    if by_reference_only and not isinstance(cloud_error, pickle.PicklingError):
        try:
            error = type(plain_error)(text_of(cloud_error))
        except Exception:
            error = None
        if isinstance(error, Exception):
            error.add_note(
                f"(a {type(cloud_error).__name__} from cloudpickle, sending it by value; the "
                f"standard pickler could not send it by reference: {text})"
            )
            return error
    plain_error.add_note(f"(cloudpickle could not pickle it either: {text_of(cloud_error, repr)})")
    return plain_error


def dumps(
    obj: Any,
    before_retry: Callable[[Exception | None], None] | None = None,
    functions: Iterable[Any] = (),
    beside: _Beside | None = None,
) -> bytes:
    """Pickles ``obj``: plain pickle first, ``cloudpickle`` if that refuses
    or if the plain pickle names a ``__main__`` the child cannot import.
    ``cloudpickle`` first if one of ``functions`` (what ``obj`` calls) can
    only go by value (see :func:`_only_by_value`).

    Raises the plain pickler's error (with a note) if neither can pickle it.
    ``before_retry(error)`` runs before the ``cloudpickle`` attempt, with the
    plain pickler's error (``None`` when it succeeded but its pickle cannot
    be used); it may raise instead. ``beside``: large buffers leave the
    pickle, into ``beside.buffers``.
    """
    if any(_only_by_value(fn) for fn in functions):
        try:
            return _cloud(obj, beside)
        except Exception as cloud_error:  # the plain pickler's error says why: below
            if before_retry is not None:
                before_retry(cloud_error)
    try:
        data = _plain(obj, beside)
    except Exception as plain_error:
        if before_retry is not None:
            before_retry(plain_error)
        try:
            return _cloud(obj, beside)
        except Exception as cloud_error:
            raise _neither(plain_error, cloud_error) from None
    if _child_can_load(data):
        return data
    if before_retry is not None:
        before_retry(None)
    return _cloud(obj, beside)


class DupFd:
    """An fd duplicated for a child: in the child, :meth:`detach` returns it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (DupFd, (self.fd,))


class SpawnFds:
    """What ``multiprocessing`` calls the *spawning popen* while an object is
    pickled for a child: it duplicates the fds that process-shared objects ask
    for, and remembers them so that the child inherits them at those numbers."""

    DupFd = DupFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        new = os.dup(fd)
        self.fds.append(new)
        return new

    def close(self, keep: int = 0) -> None:
        """Closes the duplicates made after the first ``keep``."""
        while len(self.fds) > keep:
            os.close(self.fds.pop())


_spawning = threading.local()


def spawning_object() -> Any:
    """The object being pickled for a new child by :func:`dumps_for_spawn`, if any."""
    return getattr(_spawning, "target", None)


def dumps_for_spawn(
    obj: Any,
    target: Any = None,
    parameters: Callable[[], Iterable[tuple[str, Any]]] = tuple,
    functions: Iterable[Any] = (),
    out_of_band: Any = None,
) -> tuple[bytes, list[int], int | None]:
    """Pickles ``obj`` for a child about to be started. Returns the bytes,
    the fds to pass to the child and the segment of its large buffers, or
    ``None`` (the caller owns them all). ``target`` is the object being
    started, if any (a ``Process`` pickles fully only then).
    ``functions``: what ``obj`` calls there (see :func:`dumps`).

    Large buffers (numpy arrays, and the ``bytes``, ``bytearray`` and
    ``memoryview`` objects :func:`_oob.prepare` finds in ``out_of_band``:
    what the user passed, such as ``initargs``) leave the pickle, as a task
    call's do, into one sealed segment (``_oob.segment_for_starts``), which
    every start of a child may map: the frame limit does not apply to them,
    and a pickle over ``_oob.PICKLE_INLINE_MAX`` goes there too. Where no
    segment can be made (no descriptor or memory left), everything is
    pickled inline, as before, and the frame limit applies.

    ``parameters()`` lists what ``obj`` carries by the names the user gave
    them (``("initargs[0]", value)``, ...): an object made for the ``fork``
    start method among them is refused with an error that names it (once:
    ``cloudpickle`` would only fail the same way); the error for another
    object neither pickler can pickle gets a note that names it."""
    fds = SpawnFds()
    previous_popen = _mp_context.get_spawning_popen()
    previous_target = spawning_object()
    _mp_context.set_spawning_popen(fds)  # type: ignore[arg-type]
    _spawning.target = target
    named: list[bool] = []

    def before_retry(error: Exception | None) -> None:
        fds.close()
        culprit = _made_for_fork(error) if error is not None else None
        if culprit is not None:
            named.append(True)
            raise _fork_error(culprit, parameters()) from None

    beside = None if out_of_band is None else _Beside(_oob.prepare(out_of_band))
    segment = None
    try:
        data = dumps(obj, before_retry=before_retry, functions=functions, beside=beside)
        if beside is not None and (beside.buffers or len(data) > _oob.PICKLE_INLINE_MAX):
            carried = _oob.segment_for_starts(data, beside.buffers)
            beside = None  # the buffers are in the segment (or could not be)
            if carried is None:
                fds.close()
                data = dumps(obj, before_retry=before_retry, functions=functions)
            else:
                data, segment = carried
    except Exception as error:
        fds.close()
        if not named:
            culprit = _unpicklable(parameters(), fds)
            if culprit is not None:
                error.add_note(f"(in {culprit[0]}, a {_type_name(culprit[1])})")
        raise
    except BaseException:
        fds.close()
        raise
    finally:
        _mp_context.set_spawning_popen(previous_popen)
        _spawning.target = previous_target
    return data, fds.fds, segment


def _made_for_fork(error: BaseException) -> Any:
    """The lock or semaphore whose pickling raised ``error`` because it was
    made for the ``fork`` start method (multiprocessing's ``SemLock`` refuses
    to go to a spawned child then), or ``None`` if that is not what happened."""
    from multiprocessing.synchronize import SemLock

    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__getstate__" else None
        if isinstance(candidate, SemLock) and getattr(candidate, "_is_fork_ctx", False):
            return candidate
        tb = tb.tb_next
    return None


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _fork_error(culprit: Any, parameters: Iterable[tuple[str, Any]]) -> RuntimeError:
    """The error for an object made for the ``fork`` start method, naming the
    parameter that carries it."""
    where = "an argument"
    holder = culprit
    for name, value in parameters:
        if value is culprit:
            where = f"{name} (a {_type_name(culprit)})"
            break
        if _carries_fork_object(value):
            where = f"{name} (a {_type_name(value)} holding a {_type_name(culprit)})"
            holder = value
            break
    else:
        where = f"a {_type_name(culprit)} in the arguments"
    tqdm = ""
    if _is_tqdms(culprit, holder):
        tqdm = (
            " (for tqdm's process_map: call "
            'tqdm.auto.tqdm.set_lock(multiprocessing.get_context("spawn").RLock()) first)'
        )
    return RuntimeError(
        f"{where} was made for the 'fork' start method (multiprocessing's default on Linux before "
        "Python 3.14, or one chosen with set_start_method or get_context) and cannot go to warden's "
        "workers and children, "
        "which start like 'spawn'. Make it from multiprocessing.get_context(\"spawn\") instead"
        f"{tqdm}."
    )


def _is_tqdms(lock: Any, holder: Any) -> bool:
    """Whether ``lock`` (in ``holder``) is tqdm's: its ``process_map`` sends
    tqdm's write lock to every worker."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return False
    writer = getattr(std, "TqdmDefaultWriteLock", None)
    return (
        lock is getattr(writer, "mp_lock", None)
        or lock is getattr(getattr(std, "tqdm", None), "_lock", None)
        or str(getattr(type(holder), "__module__", "")).split(".")[0] == "tqdm"
    )


def _unpicklable(parameters: Iterable[tuple[str, Any]], fds: SpawnFds) -> tuple[str, Any] | None:
    """The first of ``parameters`` that neither pickler can pickle for a
    child, while ``fds`` is the spawning popen (whose duplicates it closes)."""
    for name, value in parameters:
        try:
            try:
                _plain(value)
            except Exception:
                _cloud(value)
        except Exception:
            return name, value
        finally:
            fds.close()
    return None


def _carries_fork_object(value: Any) -> bool:
    fds = SpawnFds()
    previous = _mp_context.get_spawning_popen()
    _mp_context.set_spawning_popen(fds)  # type: ignore[arg-type]
    try:
        _plain(value)
    except Exception as e:
        return _made_for_fork(e) is not None
    finally:
        _mp_context.set_spawning_popen(previous)
        fds.close()
    return False
