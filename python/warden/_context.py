"""What a task can learn about the worker it runs in."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

_UNSET: Any = object()
_value: Any = _UNSET


def worker_context() -> Any:
    """The value yielded by the pool's ``worker_context`` in this worker.

    A pool created with ``worker_context=factory`` enters ``factory()`` when a
    worker starts and exits it when the worker ends (on every path: shutdown,
    ``max_tasks_per_child``, timeout, terminate, parent death). Tasks reach what
    it yielded (its ``__enter__`` result) here.

    Raises ``RuntimeError`` outside such a worker.
    """
    if _value is _UNSET:
        raise RuntimeError(
            "warden.worker_context() is only available in a worker of a pool created with worker_context="
        )
    return _value


def pool_worker_name(pool: str, within: tuple[int, ...], worker: int) -> str:
    """A pool worker's process name: its pool's name and its number, after the
    numbers of the processes the pool was made in (``Pool-1-worker-2`` at the
    top, ``Pool-1-worker-3:2`` for the second worker of a pool made in the
    third of another pool's workers), as ``multiprocessing`` numbers nested
    children (its ``_identity``)."""
    return f"{pool}-worker-{':'.join(map(str, (*within, worker)))}"


def set_cleanup_record(record: Any) -> None:
    """In a pool's worker: leaves ``record`` for the pool's ``on_worker_lost``
    hook, which runs in the parent if this worker dies without running its
    exit path (SIGKILL from the OOM killer or ``kill -9``, a segfault,
    ``os._exit`` in a task), so that its finalizer could not clean up.

    ``record`` is anything picklable and small (temporary paths, a lock file,
    a session id); it reaches the hook as ``info.record``. Call it from the
    ``initializer``, the ``worker_context`` or a task; a later call replaces
    an earlier one, and ``None`` clears it.

    Raises ``RuntimeError`` outside a pool's worker.
    """
    from . import _warden
    from ._pickle import dumps

    _warden.send_record(b"" if record is None else dumps(record))


def _set(value: Any) -> None:
    global _value
    _value = value


def _clear() -> None:
    global _value
    _value = _UNSET
