"""How warden turns calls into bytes.

* Protocol 5, with the reducers of ``multiprocessing`` (connections, sockets,
  bound methods) -- what ``ForkingPickler`` pickles, warden pickles.
* When plain pickle refuses (lambdas, closures, local classes) or cannot work
  (the parent's ``__main__`` is interactive, so the child cannot import it),
  ``cloudpickle`` pickles the same object by value.
* Objects handed to a child *at spawn time* (``Process`` arguments, pool
  ``initargs``) are pickled while a spawning context is set, exactly as the
  standard library's spawn start method does: process-shared objects
  (``multiprocessing.Queue``, ``Lock``, ``Value``, manager proxies,
  ``warden.Event``) ask it to duplicate their fds for the child, and warden
  passes those fds to the child at the same numbers.
"""

from __future__ import annotations

import collections
import copyreg
import io
import os
import pickle
import sys
import threading
from collections.abc import Callable
from multiprocessing import context as _mp_context
from multiprocessing.reduction import ForkingPickler

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 5

loads = pickle.loads


class _Pickler(pickle.Pickler):
    dispatch_table: dict[type, Any] = {}


_dispatch_sizes = (-1, -1)


def _pickler() -> type[_Pickler]:
    """The pickler, its dispatch table being copyreg's reducers plus
    ForkingPickler's as one dict (much faster for the C pickler than a chain
    of mappings), rebuilt when either gains entries (libraries register
    reducers when they are imported)."""
    global _dispatch_sizes
    sizes = (len(copyreg.dispatch_table), len(ForkingPickler._extra_reducers))
    if sizes != _dispatch_sizes:
        table = dict(copyreg.dispatch_table)
        table.update(ForkingPickler._extra_reducers)
        _Pickler.dispatch_table = table
        _dispatch_sizes = sizes
    return _Pickler


_cloud_pickler: type | None = None


def _cloud_pickler_class() -> type:
    global _cloud_pickler
    if _cloud_pickler is None:
        import cloudpickle

        class CloudPickler(cloudpickle.CloudPickler):
            dispatch_table = collections.ChainMap(
                ForkingPickler._extra_reducers, cloudpickle.CloudPickler.dispatch_table
            )

        _cloud_pickler = CloudPickler
    return _cloud_pickler


_main_checked: tuple[Any, Any, bool] = (None, None, True)


def _main_is_importable() -> bool:
    """Whether a child can import this process's ``__main__`` (as spawn does)."""
    global _main_checked
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if _main_checked[0] is main and _main_checked[1] == path:
        return _main_checked[2]
    if main is None or getattr(getattr(main, "__spec__", None), "name", None) is not None:
        importable = True
    else:
        importable = path is not None and os.path.isfile(path)
    _main_checked = (main, path, importable)
    return importable


def _plain(obj: Any) -> bytes:
    buf = io.BytesIO()
    _pickler()(buf, PROTOCOL).dump(obj)
    return buf.getvalue()


def _cloud(obj: Any) -> bytes:
    buf = io.BytesIO()
    _cloud_pickler_class()(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps(obj: Any, before_retry: Callable[[], None] | None = None) -> bytes:
    """Pickles ``obj``: plain pickle first, ``cloudpickle`` if that refuses.

    Raises the plain pickler's error (with a note) if neither can pickle it.
    ``before_retry`` runs before the ``cloudpickle`` attempt.
    """
    if not _main_is_importable():
        return _cloud(obj)
    try:
        return _plain(obj)
    except Exception as plain_error:
        if before_retry is not None:
            before_retry()
        try:
            return _cloud(obj)
        except Exception as cloud_error:
            plain_error.add_note(f"(cloudpickle could not pickle it either: {cloud_error!r})")
            raise plain_error from None


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


def dumps_for_spawn(obj: Any, target: Any = None) -> tuple[bytes, list[int]]:
    """Pickles ``obj`` for a child about to be started. Returns the bytes and
    the fds to pass to the child (the caller owns them). ``target`` is the
    object being started, if any (a ``Process`` pickles fully only then)."""
    fds = SpawnFds()
    previous_popen = _mp_context.get_spawning_popen()
    previous_target = spawning_object()
    _mp_context.set_spawning_popen(fds)
    _spawning.target = target
    try:
        data = dumps(obj, before_retry=fds.close)
    except BaseException:
        fds.close()
        raise
    finally:
        _mp_context.set_spawning_popen(previous_popen)
        _spawning.target = previous_target
    return data, fds.fds
