"""warden's pool workers as ``multiprocessing`` sees its children.

Code in the wild looks at a pool's processes through the standard library:
``multiprocessing.active_children()``, ``executor._processes``,
``pool._pool``. A :class:`WorkerProcess` is such a view of one live pool
worker: ``pid``, ``name``, ``daemon``, ``is_alive()``, ``exitcode``,
``terminate()``, ``kill()``, ``join(timeout)``, and the ``_popen.poll()``
that ``multiprocessing``'s own bookkeeping calls.

The pool's supervisor owns its workers and reaps them; a view never waits for
or reaps a worker. It signals one through a pidfd that it opened while the
core still listed the worker as running: an unreaped process's pid cannot be
reused, so the pidfd names that worker even after it exits. A worker stopped
this way ends through its exit path (SIGTERM) or not at all (SIGKILL); the
pool sees an exit it did not ask for, fails the task that was running and
starts a replacement, as when anything else signals a worker.

``multiprocessing.active_children()`` lists ``multiprocessing.process._children``;
:func:`install` replaces that set with one that also yields the live workers
of every warden pool of this process.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from . import _runner

#: How long ``exitcode`` waits for the pool to record an exit it saw happen.
STATUS_WAIT = 2.0


class WorkerProcess:
    """A live view of one pool worker, with ``multiprocessing.Process``'s
    read-and-signal API. Made by :func:`workers_of`; not started by users."""

    def __init__(self, runner: _runner.Runner, worker: int, pid: int) -> None:
        #: As the standard library's: a ``Pool``'s workers are daemonic, an
        #: executor's are not (a pool that interpreter exit terminates).
        self.daemon = runner.exit_policy == "terminate"
        # The core pool, not the runner: views are kept by runner, weakly,
        # and one that held its runner would keep it (and its pidfd) forever.
        self._core = runner.core
        self.pid = self.ident = pid
        self.name = runner.worker_name(worker)
        self._parent_pid = os.getpid()
        self._pidfd: int | None = None
        self._closer: Any = None
        #: The program has the pidfd as ``sentinel`` (kept until the pool ends).
        self._sentinel_taken = False
        #: No pidfd could be opened for a worker that runs (no descriptor to
        #: spare): whether it is alive is read from its pool's list.
        self._without_pidfd = False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
        except OSError:
            self._without_pidfd = True
        else:
            if self._listed():  # opened before the core could reap it: it is ours
                self._pidfd = fd
                self._closer = weakref.finalize(self, os.close, fd)
            else:
                os.close(fd)

    def _release(self) -> None:
        """Its pool has shut down: the worker is reaped, and the pool keeps
        its exit status; the pidfd is closed now, not when this view (which
        the program may keep) is collected."""
        closer, self._closer = self._closer, None
        self._pidfd = None
        if closer is not None:
            with contextlib.suppress(OSError):  # closed already, by the program
                closer()

    @property
    def _popen(self) -> WorkerProcess:
        return self  # what multiprocessing's bookkeeping calls poll() on

    def _listed(self) -> bool:
        return any(w.pid == self.pid for w in self._core.workers())

    def poll(self) -> int | None:
        """``exitcode`` (``multiprocessing``'s ``Popen`` API)."""
        return self.exitcode

    def is_alive(self) -> bool:
        """Whether the worker is still running."""
        fd = self._pidfd
        if fd is None:
            return self._without_pidfd and not self._core.is_shut_down() and self._listed()
        try:
            readable, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile: its pool has shut down
            return False
        return not readable

    @property
    def exitcode(self) -> int | None:
        """``None`` while it runs, then its exit code (``-N`` after signal ``N``)."""
        if self.is_alive():
            return None
        # Between its exit and the pool recording it (the pool reaps it
        # meanwhile) the status is read without reaping, or waited for briefly.
        deadline = time.monotonic() + (STATUS_WAIT if self._pidfd is not None else 0.0)
        while (code := self._exit_status()) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return code

    def _exit_status(self) -> int | None:
        status = self._core.exit_status(self.pid)
        if status is not None:
            code, sig = status
            return -sig if sig is not None else code
        fd = self._pidfd  # once: another thread may let it go meanwhile
        if fd is None:
            return None
        try:
            info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError:  # reaped by the pool already (it records it next), or let go
            return None
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def _signal(self, sig: int) -> None:
        fd = self._pidfd
        if fd is not None:
            with contextlib.suppress(OSError):  # gone (ProcessLookupError), or let go meanwhile
                signal.pidfd_send_signal(fd, sig)

    def terminate(self) -> None:
        """SIGTERM: the worker runs its exit path (finalizer) and exits."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        """Waits until the worker has exited, or ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd = self._pidfd
            if fd is None:
                return
            left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                readable, _, _ = select.select([fd], [], [], left)
            except (OSError, ValueError):  # closed meanwhile: its pool has shut down
                return
            if readable or (deadline is not None and time.monotonic() >= deadline):
                return

    @property
    def sentinel(self) -> int:
        """A pidfd, readable once the worker has exited."""
        fd = self._pidfd
        if fd is None:
            raise ValueError("the worker has exited")
        self._sentinel_taken = True
        return fd

    def __repr__(self) -> str:
        code = self.exitcode
        status = "started" if code is None else f"stopped exitcode={code}"
        name = type(self).__name__
        daemon = " daemon" if self.daemon else ""
        return f"<{name} name={self.name!r} pid={self.pid} parent={self._parent_pid} {status}{daemon}>"


_views: weakref.WeakKeyDictionary[_runner.Runner, dict[int, WorkerProcess]] = weakref.WeakKeyDictionary()
_views_lock = threading.Lock()


#: How long a first look at a pool's workers waits for them to start (as
#: ``Process.start()`` waits for its child's pid).
START_WAIT = 30.0


def wait_for_workers(runner: _runner.Runner, count: int, timeout: float = START_WAIT) -> None:
    """Waits, at most ``timeout`` seconds, until ``runner``'s pool has
    ``count`` live workers or has shut down. ``multiprocessing.Pool`` has
    started all its processes when its constructor returns; a warden pool's
    first workers may still be waiting for its zygote."""
    began = time.monotonic()
    core = runner.core
    while len(core.workers()) < count and not core.is_shut_down() and not starts_refused(runner, began):
        if time.monotonic() - began >= timeout:
            return
        time.sleep(0.01)


#: How recent a refused start makes a pool short of workers for the views:
#: while the system refuses its starts, the pool tries again at least once a
#: second (and each refusal is an event).
_SHORT_FOR = 2.0


def starts_refused(runner: _runner.Runner, since: float) -> bool:
    """Whether ``runner``'s pool could not start a worker since ``since`` (a
    ``time.monotonic()``) or in the last :data:`_SHORT_FOR` seconds: it is
    short of workers while the system refuses them (``ulimit -u``, ``-n``),
    and a view waiting for them would wait in vain."""
    ago = runner.core.seconds_since_start_refused()
    return ago is not None and ago < max(time.monotonic() - since, _SHORT_FOR)


#: The phases of a worker on its way out (its exit path runs).
_LEAVING = ("retiring", "stopping")


def workers_of(runner: _runner.Runner | None, leaving: bool = True) -> list[WorkerProcess]:
    """The live workers of a runner, one stable view per worker; without
    those on their way out (retiring, stopping) unless ``leaving``."""
    if runner is None:
        return []
    listed = runner.core.workers()
    with _views_lock:
        views = _views.setdefault(runner, {})
        current = {w.pid: views.get(w.pid) or WorkerProcess(runner, w.worker, w.pid) for w in listed}
        gone = [view for pid, view in views.items() if pid not in current]
        views.clear()
        views.update(current)
    for view in gone:
        # No longer listed: reaped, its exit status recorded by the pool (a
        # view the program keeps reads it there); its pidfd is let go now,
        # unless the program took it as the sentinel (it may wait on it).
        if not view._sentinel_taken and view._exit_status() is not None:
            view._release()
    return [current[w.pid] for w in listed if leaving or w.phase not in _LEAVING]


class VacantWorker:
    """A place in ``Pool._pool`` no worker filled: the pool stopped before
    they started, or the system refuses them (``ulimit -u``, ``-n``). As a
    ``multiprocessing.Process`` never started: no pid, not alive, no exit
    code."""

    daemon = True
    pid = ident = exitcode = None

    def __init__(self, name: str) -> None:
        self.name = name

    def is_alive(self) -> bool:
        """Never: it did not start."""
        return False

    def poll(self) -> None:
        """``exitcode`` (``multiprocessing``'s ``Popen`` API)."""
        return None

    @property
    def _popen(self) -> VacantWorker:
        return self

    def terminate(self) -> None:
        """Nothing to stop."""

    def kill(self) -> None:
        """Nothing to stop."""

    def join(self, timeout: float | None = None) -> None:
        """Returns at once: nothing runs."""

    @property
    def sentinel(self) -> int:
        """``ValueError``, as for a ``Process`` never started."""
        raise ValueError("the worker never started")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} initial daemon>"


def release_views(runner: _runner.Runner) -> None:
    """``runner``'s pool has shut down: the views of its workers let go of
    their pidfds (one per worker ever looked at)."""
    with _views_lock:
        views = _views.pop(runner, {})
    for view in views.values():
        view._release()


class _Children(set):  # type: ignore[type-arg]
    """``multiprocessing.process._children``, plus the live workers of every
    warden pool of this process when iterated (``active_children()``)."""

    def __iter__(self) -> Iterator[Any]:
        yield from set.__iter__(self)
        if os.getpid() != _owner:
            return
        with _runner._live_lock:
            # Pools (a Process is in the set itself, and has no results thread).
            pools = [r for r in _runner._live if r.thread is not None]
        for runner in pools:
            yield from workers_of(runner)


_owner = os.getpid()


def install() -> None:
    """Makes ``multiprocessing.active_children()`` see warden's pool workers."""
    global _owner
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    if not isinstance(children, _Children):
        multiprocessing.process._children = _Children(children)  # type: ignore[attr-defined]
    _owner = os.getpid()


install()
