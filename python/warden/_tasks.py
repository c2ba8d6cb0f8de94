"""Helpers that run inside workers, pickled by reference into tasks."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any


def run_chunk(fn: Callable[..., Any], chunk: Iterable[Any], star: bool) -> list[Any]:
    """Runs ``fn`` over a chunk of a ``map``: ``fn(*args)`` for each ``args``
    if ``star``, else ``fn(item)`` for each item."""
    # Comprehensions, not ``list(map(...))``: a ``StopIteration`` that ``fn``
    # raises must fail the chunk, not end it early (dropping the items after).
    if star:
        # (tuple(): an item that is not iterable fails as the standard
        # library's itertools.starmap fails it, "'int' object is not iterable".)
        return [fn(*tuple(args)) for args in chunk]
    return [fn(item) for item in chunk]


def chunks(items: Iterable[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in chunks of ``size``: slices of a list, tuple or range (a
    range's are ranges, a few bytes to send), tuples of anything else."""
    if type(items) in (list, tuple, range):
        seq: Sequence[Any] = items  # type: ignore[assignment]
        for start in range(0, len(seq), size):
            yield seq[start : start + size]
        return
    it = iter(items)
    while chunk := tuple(itertools.islice(it, size)):
        yield chunk
