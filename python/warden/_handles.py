"""Inert handles: what warden's pools become when pickled.

Pickling a pool (say, as part of ``self`` in ``submit(self.method)``) gives
the child a handle that reports which pool it was and refuses to do work,
instead of failing to pickle locks and threads.
"""

from __future__ import annotations

from typing import Any


class PoolHandle:
    """A pool of another process, seen from a child: ``kind``, ``name``,
    ``owner_pid`` and ``max_workers`` are there; using it raises ``RuntimeError``."""

    def __init__(self, kind: str, name: str, owner_pid: int, max_workers: int) -> None:
        self.kind = kind
        self.name = name
        self.owner_pid = owner_pid
        self.max_workers = max_workers

    def __reduce__(self) -> tuple[Any, ...]:
        return (PoolHandle, (self.kind, self.name, self.owner_pid, self.max_workers))

    def __repr__(self) -> str:
        return f"<{self.kind} handle {self.name!r} of process {self.owner_pid}>"

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(
            f"{self.kind} {self.name!r} belongs to process {self.owner_pid}; this is an "
            f"inert handle to it and cannot {attr}() (only that process can use or stop the pool)"
        )
