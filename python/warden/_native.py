"""warden's own threads, which must be threads of the operating system.

Each of them waits in a call that blocks its thread (the core's wait for
outcomes, ``poll`` on pipes): in a thread of the operating system, other
threads run on meanwhile. A program that gevent monkey-patched
(``gevent.monkey.patch_all()``) has ``threading.Thread`` start greenlets on
the calling thread instead, and ``select.poll`` cooperative: a greenlet
that blocked in the core would stop the whole program (its ``submit`` never
returned, Ctrl-C included). There, :func:`Thread` starts a thread of the
operating system with the original ``_thread`` functions, and :func:`poll`
is the original ``select.poll``.
Without gevent's patching, both are the standard library's own.

:func:`Lock` and :func:`Condition` are what these threads share with each
other (and hold only briefly in the program's threads): under gevent's
patching, a gevent lock passed between two real threads waits for a hub
that may never hear of it, so they are the original locks there.

Caveat: under gevent, what such a thread runs of the program's (a future's
done callbacks, which the results thread calls) runs in that real thread, as
it would without gevent's patching; a future's own condition stays gevent's,
which the program's greenlets wait on, and which a real thread can wake.
"""

from __future__ import annotations

import _thread
import os
import select
import sys
import threading
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing in a worker
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _patched(module: str) -> Any:
    """``gevent.monkey`` if it patched ``module``, else ``None``."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return None
    try:
        return monkey if monkey.is_module_patched(module) else None
    except Exception:
        return None


class _OsThread:
    """A target run in a thread started with the original
    ``_thread.start_new_thread``, with the part of ``threading.Thread``'s
    interface warden uses. (Not gevent's pool of real threads: a worker
    forked by the zygote from a patched ``__main__`` has a copy of that
    pool without its threads.)"""

    def __init__(self, monkey: Any, target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self._start_new_thread = monkey.get_original("_thread", "start_new_thread")
        self._get_ident = monkey.get_original("_thread", "get_ident")
        self._running = monkey.get_original("_thread", "allocate_lock")()
        self._target, self._args, self.name = target, args, name
        self._ident: int | None = None
        self._started = False

    def start(self) -> None:
        import gevent

        # While the thread runs, a watcher keeps the starting thread's hub
        # from deciding that a greenlet waiting for what the thread will
        # give (a future's result) would wait forever (``LoopExit``).
        loop = gevent.get_hub().loop
        keep = loop.async_()
        keep.start(_nothing)
        self._running.acquire()
        try:
            self._start_new_thread(self._run, (loop, keep))
        except BaseException:
            self._running.release()
            keep.stop()
            raise
        self._started = True

    def _run(self, loop: Any, keep: Any) -> None:
        self._ident = self._get_ident()
        try:
            self._target(*self._args)
        finally:
            self._running.release()
            loop.run_callback_threadsafe(keep.stop)

    def join(self, timeout: float | None = None) -> None:
        """Waits for the target to return (blocking this thread, greenlets
        and all: warden joins its threads with a bound, as they end)."""
        if self._started and self._running.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._running.release()

    def is_alive(self) -> bool:
        return self._started and self._running.locked()

    def is_current(self) -> bool:
        return self._ident is not None and self._ident == self._get_ident()


def _nothing() -> None:
    pass


#: How long :meth:`_Thread.start` waits for the new thread to begin (s).
START_WAIT = 10.0
#: How long :meth:`_Thread.join` waits, once the target has returned, for
#: the thread to end (s).
END_WAIT = 1.0


class _BoundedEvent(threading.Event):
    """``threading.Event`` whose ``wait()`` without a timeout gives up after
    :data:`START_WAIT` seconds."""

    def wait(self, timeout: float | None = None) -> bool:
        return super().wait(START_WAIT if timeout is None else timeout)


class _Thread(threading.Thread):
    """``threading.Thread`` whose ``start()`` waits at most
    :data:`START_WAIT` seconds for the thread to begin, then raises
    ``RuntimeError``. The standard library's waits without a bound, and a
    thread that fails as it begins, before it says so (``MemoryError`` in a
    process short of memory, ``RLIMIT_AS``), would leave it waiting for
    ever: a worker would never send its result."""

    _running: Any = None
    _owner = 0

    def start(self) -> None:
        # Held while the target runs: join() and is_alive() read it. A Ctrl-C
        # inside threading.Thread.join() marks a thread that still runs as
        # stopped for good (CPython's handling of an interrupted join), after
        # which every join returns at once; an interrupted wait on this lock
        # changes nothing.
        running = self._running = threading.Lock()
        running.acquire()
        self._owner = os.getpid()
        # The event threading.Thread.start() waits on (3.11 to 3.13).
        self._started = _BoundedEvent()
        try:
            super().start()
        except BaseException:
            if not self._started.is_set():
                self._running = None
                running.release()  # it never ran
            raise
        if not self._started.is_set():
            raise RuntimeError(f"thread {self.name!r} did not begin within {START_WAIT} s")

    def run(self) -> None:
        running = self._running
        try:
            super().run()
        finally:
            if running is not None:
                running.release()

    def _lock(self) -> Any:
        """The running lock; ``None`` before ``start()``, and in a copy made by
        ``fork()`` (where ``threading`` knows the thread is gone, and the
        lock's state is the parent's)."""
        return self._running if self._owner == os.getpid() else None

    def join(self, timeout: float | None = None) -> None:
        running = self._lock()
        if running is None or self is threading.current_thread():
            super().join(timeout)  # its errors: not started, the current thread
        elif running.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            running.release()
            # The target has returned; the thread itself ends a moment
            # later. Wait for that too, briefly, as threading's join does
            # (from 3.13, for the thread of the system): a fork() right
            # after would find it there and warn of threads.
            super().join(END_WAIT)

    def is_alive(self) -> bool:
        running = self._lock()
        return super().is_alive() if running is None else running.locked()


def Thread(target: Callable[..., Any], args: tuple[Any, ...] = (), name: str = "") -> Any:
    """A daemon thread of the operating system that runs ``target(*args)``
    once started: a ``threading.Thread`` (whose ``start()`` is bounded, see
    :class:`_Thread`), or under gevent's patching one started with the
    original ``_thread`` functions (see the module documentation)."""
    monkey = _patched("threading")
    if monkey is None:
        return _Thread(target=target, args=args, name=name, daemon=True)
    return _OsThread(monkey, target, args, name)


def is_current(thread: Any) -> bool:
    """Whether ``thread`` (made by :func:`Thread`) is the calling thread."""
    if isinstance(thread, _OsThread):
        return thread.is_current()
    return thread is threading.current_thread()


def pass_ctrl_c_on(error: BaseException) -> None:
    """Under gevent's patching a thread of the program's is a greenlet on the
    main thread, where a Ctrl-C's ``KeyboardInterrupt`` is raised in
    whichever greenlet runs: one such greenlet of warden's that caught it
    (an ``imap`` feeder running the program's iterable) passes it on to the
    main greenlet, as gevent does for a greenlet that dies of it. Anywhere
    else it is the error of the code that raised it, and nothing is done."""
    if not isinstance(error, KeyboardInterrupt) or _patched("threading") is None:
        return
    if threading.get_native_id() != os.getpid():
        return  # a thread of the operating system: no Ctrl-C lands there
    import gevent

    hub = gevent.get_hub()
    if gevent.getcurrent() is not hub.parent:
        hub.handle_system_error(type(error), error, error.__traceback__)


def original(name: str) -> Any:
    """``_thread``'s function ``name``; the original under gevent's patching."""
    monkey = _patched("threading")
    if monkey is None:
        return getattr(_thread, name)
    return monkey.get_original("_thread", name)


def Lock() -> Any:
    """``threading.Lock()``; the original lock under gevent's patching."""
    return original("allocate_lock")()


def Condition(lock: Any) -> Any:
    """``threading.Condition(lock)``; under gevent's patching, one made of
    original locks only (``threading.Condition`` makes its waiters' locks
    with the patched allocator)."""
    monkey = _patched("threading")
    if monkey is None:
        return threading.Condition(lock)
    return _OsCondition(lock, monkey.get_original("_thread", "allocate_lock"))


class _OsCondition:
    """The part of ``threading.Condition`` warden uses, on original locks."""

    def __init__(self, lock: Any, allocate: Callable[[], Any]) -> None:
        self._lock, self._allocate = lock, allocate
        self._waiters: list[Any] = []

    def __enter__(self) -> Any:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._lock.__exit__(*exc)

    def wait(self, timeout: float | None = None) -> bool:
        """With the lock held: releases it until notified or ``timeout``."""
        waiter = self._allocate()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        try:
            return bool(waiter.acquire(True, -1 if timeout is None else max(timeout, 0)))
        finally:
            self._lock.acquire()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        end = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            self.wait(left)
            result = predicate()
        return result

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()


def close(fd: int) -> None:
    """``os.close(fd)``, at once: gevent's patched ``os.close`` leaves a
    descriptor for the calling thread's hub to close, which a thread of
    warden's never runs (a lent result's table stayed open, and its worker
    waited for the reader to go)."""
    monkey = _patched("os")
    (os.close if monkey is None else monkey.get_original("os", "close"))(fd)


def identity(fd: int) -> tuple[int, int] | None:
    """Which file ``fd`` names (device and inode), to tell later whether the
    number still names it; ``None`` if it names nothing."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def close_if_same(fd: int, file: tuple[int, int] | None) -> bool:
    """Closes ``fd`` if it still names ``file`` (its :func:`identity` when
    it was made): a number the program closed behind warden's back, and
    perhaps opened a file of its own on, is not warden's to close. Returns
    whether it did."""
    if file is None or identity(fd) != file:
        return False
    close(fd)
    return True


def poll() -> Any:
    """``select.poll()``: the original one where gevent replaced it with its
    cooperative one (which would wait for this thread's own hub)."""
    monkey = _patched("select")
    return (select.poll if monkey is None else monkey.get_original("select", "poll"))()
