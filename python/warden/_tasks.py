"""Helpers that run inside workers, pickled by reference into tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def run_chunk(fn: Callable[..., Any], chunk: Iterable[Any], star: bool) -> list[Any]:
    """Runs ``fn`` over a chunk of a ``map``: ``fn(*args)`` for each ``args``
    if ``star``, else ``fn(item)`` for each item."""
    if star:
        return [fn(*args) for args in chunk]
    return [fn(item) for item in chunk]
