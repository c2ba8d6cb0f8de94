"""``warden.Event``: an event flag shared by every process that has it."""

from __future__ import annotations

import os
from multiprocessing import context as _mp_context
from typing import Any

from . import _pickle, _warden

try:
    # A subclass, so that code checking for (or annotated with) the standard
    # library's event takes this one. Its semaphores are not made.
    from multiprocessing.synchronize import Event as _StandardEvent
except ImportError:  # pragma: no cover - a build without sem_open
    _StandardEvent = object  # type: ignore[misc,assignment]


class Event(_StandardEvent):
    """``threading.Event``'s API, shared across processes; a
    ``multiprocessing.synchronize.Event`` for ``isinstance`` and type
    checkers, though not made of its semaphores.

    The flag lives in a sealed anonymous memory page (``memfd``); waiters sleep
    on a shared futex, so ``set()`` in any process wakes them all. It leaves
    nothing in the file system, even when its processes are killed.

    An ``Event`` pickles anywhere: into a child at spawn (``Process`` args,
    ``initargs``, also a standard library spawn child), where the child
    inherits its fd; and into task arguments and results, where the receiver
    opens it through ``/proc/<pid>/fd`` of the sender, which must still hold it.
    """

    __slots__ = ("_core",)

    def __init__(self) -> None:  # the standard library's takes the context
        self._core = _warden.SharedEvent()

    def set(self) -> None:
        """Sets the flag and wakes every waiter, in every process."""
        self._core.set()

    def clear(self) -> None:
        """Clears the flag."""
        self._core.clear()

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._core.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until the flag is set or ``timeout`` seconds pass; returns the
        flag. Ctrl-C interrupts the wait. A set flag answers at once, before
        ``timeout`` is looked at, as the standard library's does."""
        if self._core.is_set():
            return True
        return self._core.wait(timeout)

    def __repr__(self) -> str:
        # The standard library's form (multiprocessing.synchronize.Event).
        return f"<{type(self).__qualname__} at {id(self):#x} {'set' if self.is_set() else 'unset'}>"

    def __reduce__(self) -> tuple[Any, ...]:
        popen = _mp_context.get_spawning_popen()
        if popen is not None:
            dup = popen.DupFd(popen.duplicate_for_child(self._core.fileno()))
            return (_from_fd, (dup, self._core.token))
        _pickle.opened_through_this_process += 1
        return (_from_process, (os.getpid(), self._core.fileno(), self._core.token))


def _wrap(core: Any) -> Event:
    event = Event.__new__(Event)
    event._core = core
    return event


def _from_fd(dup: Any, token: int) -> Event:
    return _wrap(_warden.SharedEvent.from_fd(dup.detach(), token))


def _from_process(pid: int, fd: int, token: int) -> Event:
    if pid == os.getpid():
        return _wrap(_warden.SharedEvent.from_fd(os.dup(fd), token))
    return _wrap(_warden.SharedEvent.open(pid, fd, token))
