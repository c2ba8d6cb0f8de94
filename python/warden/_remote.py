"""The errors a worker itself raises or reports, kept apart from the rest of
:mod:`warden._errors` so that a worker starts without importing
``concurrent.futures`` (the parent re-exports them from ``warden``)."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

__all__ = ["RemoteError", "TaskAborted", "TaskInterrupted"]


class RemoteError(Exception):
    """A task failed in a way that cannot be rebuilt as its own exception here:
    its exception could not be pickled in the worker or unpickled in this
    process, or the result was too large to send. ``type_name`` and
    ``message`` describe the original."""

    def __init__(self, message: str, type_name: str = "", original_message: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = original_message


class TaskAborted(Exception):
    """A task raised a ``BaseException`` that is not an ``Exception``
    (``SystemExit``, ``KeyboardInterrupt``, ...). It is reported as this
    ordinary exception so that it cannot end or interrupt the waiting process;
    the worker lives on. ``type_name`` and ``message`` describe the original."""

    def __init__(self, message: str, type_name: str = "", original_message: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = original_message

    @classmethod
    def standing_in(cls, what: str, type_name: str, message: str) -> TaskAborted:
        """The stand-in for ``what`` (a description of what the task raised)."""
        return cls(
            f"task raised {what}; a BaseException that is not an Exception is reported as "
            "TaskAborted so that it cannot end this process",
            type_name,
            message,
        )


class TaskInterrupted(BaseException):
    """Raised inside a running task when its worker is told to stop (task
    timeout, cancel, terminate, parent death). Let it propagate: ``finally``
    blocks run, then the worker's exit path (finalizer, ``atexit``, garbage
    collection) runs and the worker exits."""


def text_of(value: object, fn: Callable[[object], object] = str) -> str:
    """``str(value)`` (or ``fn(value)``) for a message, never an error of
    its own: whatever a broken ``__str__`` or ``__repr__`` raises gives a
    stand-in, a ``SystemExit`` or ``KeyboardInterrupt`` too (``traceback``
    takes them so): an error being reported must not become another one.
    Only a stop of this worker (``TaskInterrupted``) goes through."""
    try:
        return str(fn(value))
    except TaskInterrupted:
        raise
    except BaseException:
        return f"<unprintable {type(value).__name__}>"


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` for a stand-in's message: at most ``limit``
    characters, and never an error of its own."""
    text = text_of(value, repr)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def traceback_text(exc: BaseException, frames: TracebackType | None, type_name: str, message: str) -> str:
    """``exc`` with its traceback from ``frames``, as the standard library
    formats it; where that fails (a ``__notes__`` or ``__cause__`` that
    raises when read, ``SystemExit`` too), its type and message and why.
    A stop of this worker raised meanwhile is not the exception's: it goes on."""
    import traceback  # a worker imports it only once a task fails

    try:
        return "".join(traceback.format_exception(type(exc), exc, frames))
    except TaskInterrupted:
        raise
    except BaseException as why:
        unformatted = f"its traceback could not be formatted: {type(why).__name__}: {text_of(why)}"
        return f"{type_name}: {message}\n({unformatted})\n"
