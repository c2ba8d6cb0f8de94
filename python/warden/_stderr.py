"""warden's own messages on the program's stderr.

``print(..., file=sys.stderr)`` writes to ``sys.stdout`` when ``sys.stderr``
is ``None`` (a program run with ``2>&-``, or one that set it so), and
``traceback.print_exc()`` does the same: warden's reports would land in the
program's output (its CSV, its JSON). These write to stderr or nowhere, in
one write each, so that two threads reporting at once do not interleave.
"""

from __future__ import annotations

import sys


def say(text: str) -> None:
    """Writes ``text`` and a newline to ``sys.stderr``; nothing if there is
    no stderr, or writing to it fails."""
    _write(text + "\n")


def say_exception(header: str = "") -> None:
    """Writes ``header`` (ending in its own newline, if any) and the
    traceback of the exception being handled to ``sys.stderr``, as
    :func:`say` writes."""
    if sys.stderr is None:
        return
    import traceback  # only when there is something to report

    _write(header + traceback.format_exc())


def _write(text: str) -> None:
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(text)
        stream.flush()
    except Exception:
        pass  # no stderr to report to
