"""Errors are data.

A task that fails is stored as an :class:`ErrorData` (kind, text, pickled
exception bytes, remote traceback text), never as an exception object. Each
``result()``/``get()`` builds a *fresh* exception from it, so the stored error
never holds a traceback, a traceback never reaches back into the frames of the
code that waited for it, and no ``exception -> traceback -> frame -> future``
cycle keeps a pool (and its workers) alive after the program let go of it.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import CancelledError
from pickle import dumps as _dumps  # bound at import: a task that patches pickle cannot break warden
from pickle import loads as _loads

try:
    import concurrent.futures.process
except RuntimeError:
    # Imported for the first time while the interpreter shuts down (the
    # program's first pool made in an atexit handler, or in a thread still
    # running after the main thread returned): the module registers an exit
    # handler with threading, which refuses it then. That handler only joins
    # the standard library's own executors, of which there are none.
    _register = threading._register_atexit  # type: ignore[attr-defined]
    threading._register_atexit = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    try:
        import concurrent.futures.process  # noqa: F401
    finally:
        threading._register_atexit = _register  # type: ignore[attr-defined]
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

from ._remote import RemoteError, TaskAborted, TaskInterrupted, short_repr, text_of, traceback_text
from ._warden import CoreError, ErrorKind, RemoteFailure, RemoteKind, TaskError

__all__ = [
    "ErrorData",
    "PoolFailed",
    "RemoteError",
    "TaskAborted",
    "TaskInterrupted",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerMemoryExceeded",
]


class WorkerCrashed(BrokenProcessPool):
    """The worker running the task died while running it.

    Only that task fails: the pool replaces the worker and goes on (unlike the
    standard library, where one crash breaks the whole pool).

    Attributes: ``pid`` of the worker; ``exitcode`` as ``multiprocessing``
    reports it (the exit status, or minus the signal number); ``signal``, the
    signal that killed it, or ``None``.
    """

    def __init__(
        self,
        message: str,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal


class WorkerMemoryExceeded(WorkerCrashed):
    """The worker's resident memory passed the pool's ``memory_limit`` while
    it ran the task: the pool stopped it (SIGTERM, its finalizer, SIGKILL after
    the grace period) and replaced it.

    Attributes: ``pid`` of the worker, ``limit`` and ``rss``, the limit and
    the resident set size seen, in bytes. (``exitcode`` and ``signal`` are
    ``None``: the task fails as soon as the limit is seen, before the worker
    has exited.)
    """

    def __init__(
        self, message: str, pid: int | None = None, *, limit: int | None = None, rss: int | None = None
    ) -> None:
        super().__init__(message, pid)
        self.limit = limit
        self.rss = rss


class PoolFailed(BrokenProcessPool):
    """The pool failed as a whole: its workers kept dying (for instance in a
    failing initializer) faster than the restart limit allows. ``reason``
    says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TaskTimeout(TimeoutError):
    """The task ran longer than its ``task_timeout``; its worker is stopped
    (its finalizer runs) and replaced. Raised as the stop begins: the task
    may still be unwinding. ``timeout`` is the limit in seconds."""

    def __init__(self, message: str, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class ErrorData:
    """How a task failed, as data. :meth:`build` makes a fresh exception."""

    __slots__ = (
        "by_exit",
        "exitcode",
        "in_list",
        "kind",
        "memory",
        "message",
        "note",
        "pid",
        "remote",
        "signal",
        "timeout",
    )

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        remote: RemoteFailure | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: int | None = None,
        timeout: float | None = None,
        memory: tuple[int, int] | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.remote = remote
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.timeout = timeout
        self.memory = memory
        #: Added to the built exception's notes: where it was raised.
        self.note: str | None = None
        #: The task's result was to be the one item of a list (a ``Pool.map``
        #: chunk of one item, sent as a plain call): a result that cannot be
        #: pickled is named as that list, as ``multiprocessing.pool`` names it.
        self.in_list = False
        #: A cancellation the interpreter's exit made (its pool terminated,
        #: or its drain cut short): a daemon thread waiting for it stays
        #: blocked (``_runner.park_at_exit``).
        self.by_exit = False

    @classmethod
    def from_core(cls, error: TaskError) -> ErrorData:
        """From the error of a ``Completion``."""
        return cls(
            error.kind,
            error.message,
            error.remote,
            pid=error.pid,
            exitcode=error.exitcode,
            signal=error.signal,
            timeout=error.timeout,
            memory=error.memory,
        )

    @classmethod
    def local(cls, exc: BaseException, context: str) -> ErrorData:
        """A failure in this process (a result that cannot be unpickled, an
        item of an ``imap`` that cannot be pickled): rebuilt as ``exc`` itself
        when it pickles, else as a :class:`RemoteError` saying ``context``.
        Never as a ``SystemExit`` or another ``BaseException`` that is not an
        ``Exception``: waiting for a result must not end the program. Its
        traceback is kept as text, as a worker's error's is: the rebuilt
        exception's cause shows where it was raised (a ``__setstate__`` of
        the program's), not only warden's frames that raise it again."""
        type_name = type(exc).__qualname__
        text = text_of(exc)
        try:
            data = _dumps(exc, protocol=5) if isinstance(exc, Exception) else b""
        except TaskInterrupted:
            raise  # a worker's stop (a nested pool's call), not the error's
        except BaseException:  # its __reduce__ may raise anything, SystemExit too
            data = b""
        if not data:
            return cls(ErrorKind.OTHER, f"{context}: {type_name}: {text}")
        frames = traceback_text(exc, exc.__traceback__, type_name, text)
        error = cls(
            ErrorKind.REMOTE,
            f"{context}: {type_name}: {text}",
            RemoteFailure(RemoteKind.RAISED, type_name, text, frames, data),
        )
        # Rebuilt as itself, it would read as the task's own error.
        error.note = f"(raised in this process: {context})"
        return error

    @property
    def cancelled(self) -> bool:
        return self.kind == ErrorKind.CANCELLED

    def build(self, traceback_type: type[Exception] = _RemoteTraceback) -> BaseException:
        """A new exception for this failure, never raised before. A remote
        traceback becomes its ``__cause__``, of ``traceback_type`` (the
        standard library's type: ``concurrent.futures`` and
        ``multiprocessing.pool`` each have their own)."""
        kind = self.kind
        if kind == ErrorKind.REMOTE and self.remote is not None:
            exc = _build_remote(traceback_type, self.remote)
            if self.note is not None:
                exc.add_note(self.note)
            return exc
        if kind == ErrorKind.MEMORY_EXCEEDED:
            limit, rss = self.memory if self.memory is not None else (None, None)
            return WorkerMemoryExceeded(self.message, self.pid, limit=limit, rss=rss)
        if kind in (ErrorKind.CRASHED, ErrorKind.PROTOCOL):
            exitcode = -self.signal if self.signal is not None else self.exitcode
            return WorkerCrashed(self.message, self.pid, exitcode, self.signal)
        if kind == ErrorKind.TIMED_OUT:
            return TaskTimeout(self.message, self.timeout)
        if kind == ErrorKind.POOL_FAILED:
            return PoolFailed(self.message)
        if kind == ErrorKind.CANCELLED:
            return CancelledError()
        if kind == ErrorKind.SEGMENT_LOST:
            return OSError(errno.EMFILE, self.message)
        if kind == ErrorKind.CLOSED:
            return BrokenProcessPool(
                "the pool shut down before the task finished (it was never run to completion)"
            )
        return RemoteError(self.message)

    def type_shown(self) -> str:
        """The name a future's ``repr`` gives this failure, in the place of
        the standard library's exception class: the class the task raised
        (also where :meth:`build` makes a stand-in for it, a ``TaskAborted``
        or ``RemoteError``, which is known only by unpickling), or the one
        :meth:`build` makes for a failure of the pool's."""
        if self.kind == ErrorKind.REMOTE and self.remote is not None:
            return self.remote.type_name.rpartition(".")[2]
        return type(self.build()).__name__


def _build_remote(traceback_type: type[Exception], remote: RemoteFailure) -> BaseException:
    """The exception a worker reported, unpickled, or a :class:`RemoteError`
    standing in for it; its traceback text becomes the ``__cause__``."""
    type_name, message = remote.type_name, remote.message
    exc: BaseException | None = None
    if remote.kind == RemoteKind.RAISED and remote.data:
        try:
            exc = _loads(remote.data)
        except BaseException as e:  # its __reduce__ may raise anything
            exc = RemoteError(
                f"task raised {type_name}: {message} "
                f"(the exception could not be rebuilt from its pickle: {type(e).__name__}: {text_of(e)})",
                type_name,
                message,
            )
        if not isinstance(exc, BaseException):
            made = f"its pickle makes {short_repr(exc)}, not an exception"
            exc = RemoteError(f"task raised {type_name}: {message} ({made})", type_name, message)
        elif not isinstance(exc, Exception):
            # Rebuilt here as a KeyboardInterrupt or SystemExit: it must not
            # interrupt or end the caller, as one raised in the task cannot.
            made = f"{type_name}: {message}, whose pickle makes {short_repr(exc)}"
            exc = TaskAborted.standing_in(made, type_name, message)
    if exc is None:
        exc = RemoteError(f"task failed: {type_name}: {message}", type_name, message)
    if remote.traceback:
        exc.__cause__ = traceback_type(f'\n"""\n{remote.traceback}"""')
    return exc


def core_error(exc: CoreError) -> BaseException:
    """The exception a caller should see for a ``CoreError`` raised by the
    extension when a task is submitted."""
    kind, message = exc.kind, str(exc)
    if kind == ErrorKind.CLOSED:
        return RuntimeError("cannot schedule new futures after shutdown")
    if kind == ErrorKind.POOL_FAILED:
        return PoolFailed(message)
    if kind == ErrorKind.REJECTED:
        return ValueError(message)
    return RuntimeError(message)
