"""Finalizers without hidden concurrency (see docs/finalization.md).

Every callback here is registered with the core's finalizer service
(``_warden.register_finalizer``), which runs it at most once, whichever of
these gets there first:

* a call of its handle, on the calling thread;
* the finalizer thread (one per process, ``warden-finalizer``), when the
  object it watches dies: the ``weakref`` callback, which runs on whatever
  thread dropped the last reference, only *schedules* it;
* the exit drain, at process exit: higher priority first, the last
  registered first among equals, on the finalizer thread.

A callback that raises is reported on stderr with its traceback (except when
its handle is called: then the caller gets the exception), and the others
still run.

:class:`Guardian` runs nothing at all: it hands dead objects' values back when
the program asks. :class:`ResourceSet` is a class-wide
registry of open resources (a set of descriptors that ``__del__`` shrinks)
made safe: finalizers on the finalizer thread may shrink it while the program
iterates it.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from . import _warden
from ._remote import text_of

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()


def _label(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if name is None:
        return text_of(func, repr)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def _report(label: str, exc: BaseException) -> None:
    """A callback run by the service raised: say so on stderr, with the traceback."""
    stream = sys.stderr
    if stream is None:
        return
    where = "at exit" if _exiting else "on the finalizer thread"
    frames = exc.__traceback__
    if frames is not None and frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next  # warden's own frame is noise to the user
    try:
        print(f"warden: exception in finalizer {label} ({where}):", file=stream)
        import traceback  # only when there is one to print

        traceback.print_exception(type(exc), exc, frames, file=stream)
        stream.flush()
    except Exception:
        pass


#: Set once this process's exit drain has begun (for reports).
_exiting = False


class _Registration:
    """A callback registered with the finalizer service, and its outcome."""

    __slots__ = ("__weakref__", "_args", "_func", "_kwargs", "_label", "_outcome", "_token")

    def __init__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], priority: int
    ) -> None:
        if not callable(func):
            raise TypeError(f"{type(func).__name__!r} object is not callable")
        self._func: Callable[..., Any] | None = func
        self._args: tuple[Any, ...] | None = args
        self._kwargs: dict[str, Any] | None = kwargs or None
        self._outcome: tuple[bool, Any] | None = None
        # Set before registering: the callback may run (during the exit drain,
        # on the finalizer thread) before register_finalizer has even returned.
        self._label = _label(func)
        try:
            self._token = _warden.register_finalizer(self._fire, int(priority), self._label)
        except RuntimeError as e:
            self._clear()
            raise RuntimeError(f"cannot register {self._label}: {e}") from None

    def _clear(self) -> None:
        self._func = self._args = self._kwargs = None

    def _fire(self) -> bool:
        """Runs the callback; the service calls this at most once, on the thread
        that won the run. Returns whether the callback succeeded."""
        func, args, kwargs = self._func, self._args or (), self._kwargs or {}
        label = self._label
        self._clear()
        direct = getattr(_local, "direct", None) is self
        if func is None:
            return True
        try:
            value = func(*args, **kwargs)
        except BaseException as e:
            if direct:
                self._outcome = (False, e)
            else:
                _report(label, e)
            return False
        finally:
            del func, args, kwargs
        if direct:
            self._outcome = (True, value)
        return True

    def _run_now(self) -> Any:
        """Runs the callback on this thread if nobody has yet; returns its
        result or raises its exception. ``None`` if it had already run, started
        or been cancelled."""
        previous = getattr(_local, "direct", None)
        _local.direct = self
        try:
            ran = self._token.run_now()
        finally:
            _local.direct = previous
        outcome, self._outcome = self._outcome, None
        if not ran or outcome is None:
            return None
        ok, value = outcome
        if ok:
            return value
        try:
            raise value
        finally:
            del value, outcome

    @property
    def alive(self) -> bool:
        """Whether the callback has neither run (or started) nor been cancelled."""
        return self._token.is_pending()

    @property
    def priority(self) -> int:
        """The exit priority: at exit, higher runs first."""
        return self._token.priority


class finalize(_Registration):  # lowercase, as weakref.finalize
    """``weakref.finalize`` without hidden concurrency.

    ``finalize(obj, func, *args, priority=0, **kwargs)``: when ``obj`` dies,
    ``func(*args, **kwargs)`` runs on warden's finalizer thread, never on the
    thread that dropped the last reference and never inside a signal handler.
    If ``obj`` is still alive when the process exits (and :attr:`atexit` is
    true), it runs then, in exit order: higher ``priority`` first, the last
    registered first among equals. It runs at most once.

    ``func`` and its arguments must not refer to ``obj``, or ``obj`` never dies.
    """

    __slots__ = ("_ref",)

    def __init__(self, obj: Any, func: Callable[..., Any], /, *args: Any, priority: int = 0, **kwargs: Any):
        self._ref: weakref.ref[Any] | None = None
        super().__init__(func, args, kwargs, priority)
        try:
            self._ref = weakref.ref(obj, self._died)
        except TypeError:
            self._token.cancel()
            self._clear()
            raise

    def _died(self, _ref: Any) -> None:
        # Runs on the thread that dropped the last reference, possibly in the
        # middle of anything: only schedule. The object is dead, so the callback
        # must run even if it was not to run at exit.
        token = self._token
        token.set_at_exit(True)
        token.schedule()

    def _clear(self) -> None:
        super()._clear()
        self._ref = None

    def __call__(self, _: Any = None) -> Any:
        """If alive, run the callback now, on this thread, and return its result
        (or raise its exception); else return ``None``."""
        return self._run_now()

    def detach(self) -> tuple[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
        """If alive and ``obj`` is alive, unregister and return
        ``(obj, func, args, kwargs)``; else ``None``."""
        ref = self._ref
        obj = ref() if ref is not None else None
        if obj is None:
            return None
        func, args, kwargs = self._func, self._args, self._kwargs
        if func is None or not self._token.cancel():
            return None
        self._clear()
        return (obj, func, args or (), kwargs or {})

    def peek(self) -> tuple[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
        """If alive and ``obj`` is alive, ``(obj, func, args, kwargs)``; else ``None``."""
        ref = self._ref
        obj = ref() if ref is not None else None
        func, args, kwargs = self._func, self._args, self._kwargs
        if obj is None or func is None or not self._token.is_pending():
            return None
        return (obj, func, args or (), kwargs or {})

    @property
    def atexit(self) -> bool:
        """Whether the callback runs at exit if ``obj`` is still alive then
        (default true, as for ``weakref.finalize``)."""
        return self._token.at_exit

    @atexit.setter
    def atexit(self, value: bool) -> None:
        self._token.set_at_exit(bool(value))

    def __repr__(self) -> str:
        ref = self._ref
        obj = ref() if ref is not None else None
        if obj is None or not self.alive:
            return f"<warden.finalize object at {id(self):#x}; dead>"
        return f"<warden.finalize object at {id(self):#x}; for {type(obj).__name__!r} at {id(obj):#x}>"


class ExitHandle(_Registration):
    """What :func:`at_exit` returns: call it to run the callback now (at most
    once, as ever), or :meth:`cancel` it."""

    __slots__ = ()

    def __call__(self) -> Any:
        """If alive, run the callback now, on this thread, and return its result
        (or raise its exception); else return ``None``. It will not run at exit."""
        return self._run_now()

    def cancel(self) -> bool:
        """Unregister the callback if it has not started; returns whether it was."""
        if self._token.cancel():
            self._clear()
            return True
        return False

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<warden.ExitHandle {self._label} priority={self.priority} {state}>"


def at_exit(func: Callable[..., Any], /, *args: Any, priority: int = 0, **kwargs: Any) -> ExitHandle:
    """Run ``func(*args, **kwargs)`` when this process exits.

    In every warden process: the main program at interpreter exit (after
    warden has shut down the pools and ``Process`` children still running),
    and pool workers and ``Process`` children on their exit path (after the
    worker context, the pool's ``finalizer``, a garbage collection and the
    ``atexit`` handlers registered after warden was imported). Higher
    ``priority`` first, the last registered first among equals, on the
    finalizer thread, within the exit deadline (2 s). A callback that raises
    is reported on stderr and the others still run. A child never runs its
    parent's callbacks.

    Raises ``RuntimeError`` once this process's exit callbacks have run.
    """
    return ExitHandle(func, args, kwargs, priority)


def wait_for_finalizers(timeout: float | None = None) -> bool:
    """Wait until the finalizer thread has run every callback whose object has
    died so far. Returns whether it did within ``timeout`` seconds (``False``
    at once when called on the finalizer thread itself)."""
    return _warden.wait_finalizers_idle(timeout)


def run_exit_callbacks() -> None:
    """This process's exit drain; idempotent. Called by warden's exit step
    (see ``_runner``), and by the worker's exit path."""
    global _exiting
    _exiting = True
    _warden.run_exit_finalizers(None)


class Guardian(Generic[T]):
    """Hands back the values of registered objects that have died, when the
    program asks (:meth:`drain`). Nothing runs by itself: the program cleans up
    on its own thread, at a point it chooses, with no concurrency at all.

    >>> g = warden.Guardian()
    >>> g.register(conn, value=conn.fileno())
    >>> del conn
    >>> for fd in g.drain():
    ...     os.close(fd)

    The guardian keeps the values, not the objects. If the guardian itself is
    dropped, the values of objects that die afterwards are dropped too.
    """

    __slots__ = ("__weakref__", "_dead", "_keys", "_watched")

    def __init__(self) -> None:
        self._dead: deque[T | None] = deque()
        self._watched: dict[int, weakref.ref[Any]] = {}
        self._keys = itertools.count()

    def register(self, obj: Any, value: T | None = None) -> None:
        """Watch ``obj``; once it has died, :meth:`drain` returns ``value``."""
        key = next(self._keys)
        dead, watched = self._dead, self._watched

        # Runs wherever obj dies; only records (atomic operations, no lock).
        def died(_ref: Any, key: int = key, value: T | None = value) -> None:
            if watched.pop(key, None) is not None:
                dead.append(value)

        watched[key] = weakref.ref(obj, died)

    def drain(self) -> list[T | None]:
        """The values of registered objects that have died since the last
        drain, in the order they died."""
        out: list[T | None] = []
        dead = self._dead
        while True:
            try:
                out.append(dead.popleft())
            except IndexError:
                return out

    def __len__(self) -> int:
        """How many registered objects are still alive."""
        return len(self._watched)

    def __repr__(self) -> str:
        return f"<warden.Guardian watching {len(self._watched)}, {len(self._dead)} dead>"


class _Member:
    __slots__ = ("handle", "owner", "resource")

    def __init__(self, resource: Any) -> None:
        self.resource = resource
        self.owner: weakref.ref[Any] | None = None
        self.handle: finalize | None = None

    def keep(self) -> Any:
        """Something that keeps the member alive while held (its owner, or the
        member itself if it has none); ``None`` if its owner has died."""
        return self if self.owner is None else self.owner()


class ResourceSet(Generic[R]):
    """A registry of open resources (say, every open descriptor of a class)
    that finalizers may shrink while the program iterates it.

    ``ResourceSet(close)``: ``add(resource, owner)`` makes ``resource`` a
    member; when ``owner`` dies, ``close(resource)`` runs on the finalizer
    thread (or at exit, if ``owner`` is still alive then). A member whose owner
    has died is no longer counted, iterated or ``in`` the set, even before its
    close has run.

    Iterating gives a snapshot of the members, skipping those removed
    meanwhile, so it never fails because a finalizer removed one; and while
    the loop body runs, the owner of the resource it was given is kept alive,
    so that resource's finalizer cannot close it under the loop. Each member
    is closed at most once, whoever gets there first: :meth:`close`,
    :meth:`close_all`, or its owner's finalizer.

    The set's own lock is held only for its bookkeeping, never while
    ``close`` runs, so :meth:`close_all` may be called from any exit path
    (an :func:`at_exit` callback, a pool ``finalizer``, a signal handler).
    """

    def __init__(self, close: Callable[[R], object], *, priority: int = 0) -> None:
        self._close = close
        self._priority = priority
        self._members: dict[R, _Member] = {}
        # Reentrant: a signal handler on the same thread may call close_all().
        self._lock = threading.RLock()

    def add(self, resource: R, owner: Any = None) -> R:
        """Add ``resource``; if ``owner`` is given, close it when ``owner``
        dies. Returns ``resource``. ``ValueError`` if it is already a member."""
        member = _Member(resource)
        with self._lock:
            if resource in self._members:
                raise ValueError(f"{resource!r} is already in this set")
            self._members[resource] = member
        if owner is not None:
            try:
                member.owner = weakref.ref(owner)
                member.handle = finalize(owner, self._release, member, priority=self._priority)
            except BaseException:
                self._take(member)
                raise
        return resource

    def _take(self, member: _Member) -> bool:
        """Remove ``member`` if it is still the member for its resource."""
        with self._lock:
            if self._members.get(member.resource) is not member:
                return False
            del self._members[member.resource]
            return True

    def _release(self, member: _Member) -> bool:
        if not self._take(member):
            return False
        self._close(member.resource)
        return True

    def close(self, resource: R) -> bool:
        """Close ``resource`` now, on this thread, and remove it. Returns whether
        this call closed it (``False`` if it is not a member, e.g. already
        closed). An error from ``close`` propagates; the resource is removed."""
        member = self._members.get(resource)
        if member is None:
            return False
        handle = member.handle
        if handle is not None:
            # Through the owner's finalizer, so that it never runs again.
            return bool(handle())
        return self._release(member)

    def discard(self, resource: R) -> bool:
        """Remove ``resource`` without closing it (its owner no longer closes it
        either). Returns whether it was a member."""
        member = self._members.get(resource)
        if member is None or not self._take(member):
            return False
        if member.handle is not None:
            member.handle.detach()
        return True

    def close_all(self) -> int:
        """Close every member, reporting errors on stderr and going on; returns
        how many were closed. Safe from any exit path, and idempotent."""
        closed = 0
        while True:
            with self._lock:
                if not self._members:
                    return closed
                _, member = self._members.popitem()
            if member.handle is not None:
                member.handle.detach()
            try:
                self._close(member.resource)
                closed += 1
            except Exception as e:
                _report(f"{_label(self._close)}({text_of(member.resource, repr)})", e)

    def __iter__(self) -> Iterator[R]:
        with self._lock:
            snapshot = list(self._members.items())
        members = self._members
        for resource, member in snapshot:
            if members.get(resource) is not member:
                continue
            # Held until the loop asks for the next one: the owner cannot die,
            # so its finalizer cannot close the resource, while the body runs.
            keep = member.keep()
            if keep is None:
                continue
            yield resource
        keep = None

    def __contains__(self, resource: object) -> bool:
        member = self._members.get(resource)  # type: ignore[arg-type]
        return member is not None and member.keep() is not None

    def __len__(self) -> int:
        with self._lock:
            members = list(self._members.values())
        return sum(1 for m in members if m.keep() is not None)

    def __repr__(self) -> str:
        return f"<warden.ResourceSet of {len(self._members)}>"
