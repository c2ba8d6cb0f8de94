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


def _set(value: Any) -> None:
    global _value
    _value = value


def _clear() -> None:
    global _value
    _value = _UNSET
