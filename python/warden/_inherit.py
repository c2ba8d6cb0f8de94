"""Subclassing the standard library's classes without their machinery.

``warden.ProcessPoolExecutor`` subclasses
``concurrent.futures.ProcessPoolExecutor``, ``warden.Pool``'s results and
iterators subclass ``multiprocessing.pool``'s, so that code and annotations
naming those types take warden's. None of them calls its base's
``__init__`` or uses its queues and threads: :func:`own_api_only` makes
whatever such a class would inherit from the standard library's module
absent, so that nothing reaches machinery that was never set up.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _C = TypeVar("_C", bound=type)


class Absent:
    """An attribute a warden class does not have although its standard
    library base class does: reading it raises ``AttributeError``, as for
    any missing attribute (``hasattr`` is false)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None and owner is not None:
            raise AttributeError(f"type object {owner.__name__!r} has no attribute {self.name!r}")
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}")


#: What may be inherited from a standard library class: none of it touches
#: its machinery (``__class_getitem__`` makes ``ApplyResult[int]`` an
#: annotation, as there).
INHERITABLE = frozenset(
    {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__"}
    | {"__static_attributes__", "__class_getitem__"}
)


def own_api_only(module: str) -> Callable[[_C], _C]:
    """Class decorator for a subclass of a class of the standard library's
    ``module`` that uses none of its machinery: whatever the class would
    inherit from there is made absent (``_set``, which the pool's result
    handler calls; ``_adjust_process_count``; any method a later Python
    adds). What other bases give (``concurrent.futures.Executor``'s
    ``__enter__``) is kept."""

    def decorate(cls: _C) -> _C:
        for base in cls.__mro__:
            if base.__module__ != module:
                continue
            for name in vars(base):
                owner = next(k for k in cls.__mro__ if name in vars(k))
                if owner.__module__ == module and name not in INHERITABLE:
                    setattr(cls, name, Absent(name))
        return cls

    return decorate
