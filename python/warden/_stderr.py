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
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except Exception:
        pass  # no stderr to report to


def say_exception(header: str) -> None:
    """Writes ``header``, a newline and the traceback of the exception being
    handled to ``sys.stderr``, as :func:`say` writes."""
    if sys.stderr is None:
        return
    import traceback  # only when there is something to report

    say(header + "\n" + traceback.format_exc().rstrip("\n"))
