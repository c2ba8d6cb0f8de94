"""Progress bars for maps: ``progress=True``, a ``tqdm`` bar, or tqdm's keyword arguments.

The bar lives in the parent and counts items, not tasks: it advances as each
task's results arrive (by the number of items in it, when the map is
chunked), on the pool's results thread. A bar warden makes is closed when
the map ends, whether it finished, raised, or was interrupted (Ctrl-C); a
bar the caller passes is advanced (and given a total if it has none) but
left open: it is the caller's to close.

tqdm is an optional dependency (``pip install 'warden[progress]'``).
"""

from __future__ import annotations

import threading
from typing import Any

#: What ``progress=`` takes.
ProgressArg = Any  # bool | tqdm.tqdm | dict[str, Any] | None


class Progress:
    """A bar a map advances; see the module documentation."""

    def __init__(self, bar: Any, owned: bool) -> None:
        self.bar = bar
        self.owned = owned
        self._lock = threading.Lock()
        self._closed = False

    def advance(self, items: int) -> None:
        """Counts ``items`` more results (from any thread); a bar warden made
        is closed once it has counted its total (an ``imap`` the program
        stopped reading after an item's error still fills it)."""
        with self._lock:
            if not self._closed:
                self.bar.update(items)
        self._close_if_full()

    def set_total(self, total: int) -> None:
        """Gives the bar its total once it is known, if it has none."""
        with self._lock:
            if not self._closed and getattr(self.bar, "total", None) is None:
                _give_total(self.bar, total)
                self.bar.refresh()
        self._close_if_full()

    def _close_if_full(self) -> None:
        if not self.owned:
            return
        total, n = getattr(self.bar, "total", None), getattr(self.bar, "n", None)
        if total is not None and n is not None and n >= total:
            self.close()

    def close(self) -> None:
        """Closes the bar if warden made it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.owned:
            self.bar.close()
        else:
            self.bar.refresh()


def _give_total(bar: Any, total: int) -> None:
    """Gives a bar that has none its ``total``: through ``reset(total=...)``
    while it has counted nothing, since tqdm's front ends size their display
    there (a notebook's widget keeps its own maximum, and showed a full bar
    from the first item), else through the attribute."""
    reset = getattr(bar, "reset", None)
    if callable(reset) and getattr(bar, "n", None) == 0:
        reset(total=total)
    else:
        bar.total = total


def make(progress: ProgressArg, total: int | None) -> Progress | None:
    """The bar ``progress=`` asks for over ``total`` items (``None`` if unknown),
    or ``None`` for no bar. Raises ``ImportError`` naming what to install
    when tqdm is missing, ``TypeError`` for anything else."""
    if progress is None or progress is False:
        return None
    if progress is True or isinstance(progress, dict):
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError(
                "progress=... needs tqdm, which is not installed: pip install 'warden[progress]' "
                "(or pip install tqdm)"
            ) from e
        options = {} if progress is True else dict(progress)
        options.setdefault("total", total)
        return Progress(tqdm(**options), owned=True)
    if callable(getattr(progress, "update", None)) and callable(getattr(progress, "close", None)):
        if getattr(progress, "total", None) is None and total is not None:
            _give_total(progress, total)
        return Progress(progress, owned=False)
    raise TypeError(
        "progress must be True, False, None, a tqdm bar or a dict of tqdm options, "
        f"not {type(progress).__name__}"
    )


def length(*iterables: Any) -> int | None:
    """How many items ``zip(*iterables)`` yields, if every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)
    except (TypeError, ValueError):
        return None
