"""The Python side of a worker process.

``main()`` installs the stop-signal handler, then hands the process to the
core's worker loop (``_warden.worker_main``), which calls back into a
:class:`Handler`:

``init``
    prepares the process the way the standard library's spawn does (``sys.path``,
    working directory, authkey, the parent's ``__main__`` as ``__mp_main__``),
    then runs the pool's ``initializer`` and enters its ``worker_context``;
``run``
    runs one task: a pickled ``(fn, args, kwargs)`` for a pool (a small
    call's function by reference: see ``_pickle.dumps_call``), or the pickled
    :class:`warden.Process` for a one-off child;
``exit``
    the exit path, run exactly once whatever ends the worker: the worker
    context is exited, the ``finalizer`` runs, then a garbage collection (so
    ``__del__`` of cyclic garbage runs), the ``atexit`` handlers (among them
    warden's, which runs the ``warden.at_exit`` callbacks), the program's
    modules taken out of ``sys.modules`` and collected, those still alive
    then put back with their globals cleared and collected (what only a
    global holds is finalized, as at the end of a program), the end of a
    resource tracker the process started itself (which unlinks what it
    leaked; a worker uses its parent's tracker, as a spawned child does, and
    starts one only if that one is gone), and a flush of ``stdout``/``stderr``.
    A pool worker retiring normally first runs ``threading``'s exit hooks
    (idle ``concurrent.futures`` thread pools end) and waits for the
    non-daemon threads its tasks started, until the pool's stop signal.

A stop signal (SIGTERM from the pool on a timeout, cancel or terminate; the
parent-death signal; SIGINT/SIGHUP) raises :class:`TaskInterrupted` in the
running task; outside a task the handler does nothing and the core ends the
worker through its exit path. A ``Process`` child's target has SIGINT back
(``KeyboardInterrupt``, as in any program). A task that installs its own
SIGTERM handler gets the pool's SIGTERM there instead; the pool's
``Retire(Stopped)`` that comes with it ends the worker once the task returns.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import gc
import multiprocessing
import multiprocessing.process
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import select
import signal
import sys
import threading
import time
import types
import weakref
from pickle import loads as _loads  # bound at import: a task that patches pickle cannot break warden

from . import _context, _native, _oob, _pickle, _warden
from ._pickle import BY_REF, dumps, dumps_oob, loads_call
from ._remote import RemoteError, TaskAborted, TaskInterrupted, short_repr, text_of, traceback_text
from ._stderr import say, say_exception

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

# ``traceback`` is imported only when there is one to format: a worker that
# never fails never pays for it (nor for ``linecache`` and ``tokenize``).

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: SIGINT's handler as the interpreter set it up, before the worker's own:
#: ``signal.default_int_handler``, or ``SIG_IGN`` in a process started with
#: SIGINT ignored. A ``Process`` child's target gets it back.
_startup_sigint: Any = signal.default_int_handler


#: How long a worker's exit waits for the parent to read the results it lent:
#: this, and one second more for each :data:`_SLOWEST_READ` bytes lent (the
#: parent reads results one after another: a few results of a GiB each
#: take it seconds). Generous: the parent reads them on the thread that also
#: runs the program's callbacks, which a slow callback holds up. A parent
#: that is gone ends the wait at once; a pool stopping its workers bounds it
#: with its grace period.
_LOAN_GRACE = 60.0

#: Bytes per second the parent reads lent results at, at least (about a
#: tenth of what a loaded two-core machine measures).
_SLOWEST_READ = 100 << 20


def _loan_wait() -> float:
    """How long to wait for the parent to read what this process lent now."""
    return _LOAN_GRACE + _oob.lent_bytes() / _SLOWEST_READ


#: Code of ``multiprocessing``'s Python wrappers around its process-shared
#: locks, between the lock's taking or giving and the ``with`` statement's
#: taking charge of it (made on first use).
_LOCK_WRAPPERS: frozenset[Any] | None = None


def _lock_wrappers() -> frozenset[Any]:
    global _LOCK_WRAPPERS
    if _LOCK_WRAPPERS is None:
        codes = set()
        synchronize = sys.modules.get("multiprocessing.synchronize")
        sharedctypes = sys.modules.get("multiprocessing.sharedctypes")
        for cls in (
            getattr(synchronize, "SemLock", None),
            getattr(synchronize, "Condition", None),
            getattr(sharedctypes, "SynchronizedBase", None),
        ):
            for name in ("__enter__", "__exit__"):
                code = getattr(getattr(cls, name, None), "__code__", None)
                if code is not None:
                    codes.add(code)
        if synchronize is None or sharedctypes is None:
            return frozenset(codes)  # not cached: the rest may be imported later
        _LOCK_WRAPPERS = frozenset(codes)
    return _LOCK_WRAPPERS


def _taking_or_giving_a_lock(frame: Any) -> bool:
    """Whether a stop raised in ``frame`` would leave a process-shared lock
    (``multiprocessing``'s ``Lock``, ``RLock``, ``Semaphore``, a ``Value``'s
    lock) held by this process after it ends: the frame is one of
    ``multiprocessing``'s Python wrappers (``__enter__`` just after taking
    the lock, ``__exit__`` before giving it back, or the accessors of a
    synchronized ``Value``/``Array``, which take its lock and give it back in
    ``finally``) and this thread holds the lock now. A task blocked while
    taking a lock is not holding it: it is stopped there at once."""
    if frame is None or "multiprocessing.synchronize" not in sys.modules:
        return False
    code = frame.f_code
    if code not in _lock_wrappers() and code.co_filename != "<string>":
        return False
    try:
        owner = frame.f_locals.get("self")
        lock = getattr(owner, "_lock", owner)  # a Condition's or a Value's lock
        return bool(lock._semlock._is_mine())
    except Exception:
        return False


def _raise_after_hand_over(frame: Any, stop: BaseException) -> Callable[[], None] | None:
    """Arranges for ``stop`` to be raised once the lock's hand-over is done,
    through a trace function removed as it raises: after an ``__enter__``,
    at the next line of the code that entered (the ``with`` block's body,
    where its ``__exit__`` will give the lock back); in an ``__exit__`` or a
    ``Value``'s accessor, as it returns (the lock given back). Returns what
    removes the trace function; ``None`` where that cannot be done (a trace
    function of the program's, a debugger's or a coverage tool's is set)."""
    if frame.f_code.co_name == "__enter__":
        target = frame.f_back
        while target is not None and target.f_code in _lock_wrappers():
            target = target.f_back  # a Condition's __enter__ around its lock's
        if target is None:
            return None
        owner = frame.f_locals.get("self")
        # In the body, or once the lock is given back (the ``with``'s exit
        # has run); not on the ``with``'s exit line before it has.
        return _raise_in_the_withs_charge(target, stop, lambda _now: not _lock_held(owner))
    return _raise_in(frame, stop, lambda _now, event: event == "return")


def _raise_in_the_withs_charge(
    target: Any, stop: BaseException, given_back: Callable[[Any], bool]
) -> Callable[[], None] | None:
    """Arranges for ``stop`` to be raised in ``target``, whose call of a
    lock's ``__enter__`` just returned, once the lock is in its ``with``
    statement's charge: at a line of the body (whose ``__exit__`` gives the
    lock back), or where ``given_back(frame)`` says the lock is given back;
    entered otherwise (``ExitStack.enter_context``), as ``target`` returns,
    its exit registered. Returns what removes the trace function; ``None``
    where that cannot be done (a trace function is set)."""
    import dis

    nop = dis.opmap["NOP"]
    # The handler that gives the lock back: the ``with``'s, which covers
    # its body, from the instruction after the one that entered.
    gives_back = _handler_of(target.f_code, target.f_lasti + 2)
    if gives_back is None:
        return _raise_in(target, stop, lambda _now, event: event == "return")

    def due(now: Any, event: str) -> bool:
        if event == "return":
            return True
        if event != "line" or now.f_code.co_code[now.f_lasti] == nop:
            # A body that compiles to nothing (``with lock: pass``) is a
            # NOP outside every handler's range: raised there, the stop
            # would leave the frame without the ``with``'s ``__exit__``
            # (the lock stays held) or any ``finally``.
            return False
        return _handler_of(now.f_code, now.f_lasti) == gives_back or given_back(now)

    return _raise_in(target, stop, due)


def _proxy_call(frame: Any) -> Any:
    """The frame of a ``multiprocessing`` manager proxy's call of its
    referent's method (``BaseProxy._callmethod``) that ``frame`` is in, a
    few calls down at most, or ``None``. Such a call sends its request, then
    reads the reply, on the connection every proxy of that manager shares in
    this thread: a stop raised between the two leaves the reply unread, and
    the next call (the ``with`` statement's ``release``, a finalizer's) reads
    it as its own."""
    managers = sys.modules.get("multiprocessing.managers")
    if managers is None or frame is None:
        return None
    code = getattr(getattr(getattr(managers, "BaseProxy", None), "_callmethod", None), "__code__", None)
    return _frame_running(frame, code, 8)


#: Offsets found by :func:`_first_offset`, by code object and what was looked for.
_OFFSETS: dict[tuple[Any, str, str], int] = {}


def _first_offset(code: Any, field: str, value: str) -> int:
    """The offset of the first instruction of ``code`` whose ``field``
    (``opname``, ``argval``) is ``value``, or -1; kept for the next time
    (for 4096 lookups at most: every ``__exit__`` a stop lands in is one)."""
    key = (code, field, value)
    at = _OFFSETS.get(key)
    if at is None:
        import dis

        found = (ins.offset for ins in dis.get_instructions(code) if getattr(ins, field) == value)
        at = next(found, -1)
        if len(_OFFSETS) < 4096:
            _OFFSETS[key] = at
    return at


def _request_sent(call: Any) -> bool:
    """Whether the proxy call ``call`` (see :func:`_proxy_call`) has sent its
    request: it is past loading its connection's ``recv``. Taken as sent
    where that load is not found."""
    return bool(call.f_lasti >= _first_offset(call.f_code, "argval", "recv"))


def _frame_running(frame: Any, code: Any, depth: int, within: str | None = None) -> Any:
    """The frame running ``code`` among ``frame`` and its callers, ``depth``
    at most (and only through frames of the file ``within``, if given), or
    ``None``."""
    for _ in range(depth):
        if frame is None or code is None or (within is not None and frame.f_code.co_filename != within):
            return None
        if frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


def _connection_transfer(frame: Any) -> Any:
    """The frame of a ``multiprocessing`` connection's transfer of one
    message (``Connection._recv_bytes``, ``_send_bytes``) that ``frame`` is
    in, once part of the message has moved, or ``None``. A ``Queue``, a
    ``SimpleQueue`` and a ``Pipe`` send each message as a length, then its
    bytes: a stop raised between the two leaves the rest of the message in
    the pipe (or the start of one that never ends), and the next reader
    (another worker, the parent) takes those bytes for a length: the pipe
    is misframed for good, and that reader's ``get(timeout=)`` waits for
    bytes that never come. A reader counts as started once its wait for
    bytes is over (see :func:`_read_when_ready`) or it has stored some; a
    writer as soon as it writes (its first write may already have put a
    part into the pipe)."""
    connection = sys.modules.get("multiprocessing.connection")
    kind = getattr(connection, "Connection", None)
    if kind is None or frame is None:
        return None
    codes = [getattr(getattr(kind, name, None), "__code__", None) for name in _TRANSFER_STEPS]
    recv_bytes, recv, send_bytes = codes
    reading = started = False
    for _ in range(4):
        if frame is None:
            return None
        code = frame.f_code
        if code is send_bytes:
            return frame
        if code is recv_bytes:
            # Past its length (``buf`` is bound), or reading it, a byte in.
            return frame if "buf" in frame.f_locals or started else None
        if code is _READ_WHEN_READY:
            # Past its wait: reading bytes that are there, or just back
            # with them (not yet bound to ``_recv``'s ``chunk``).
            reading = frame.f_lineno == _READ_LINE
        else:
            started = code is recv and (reading or "chunk" in frame.f_locals)
            reading = False
        frame = frame.f_back
    return None


def _read_when_ready(handle: int, size: int, _os_read: Callable[[int, int], bytes] = os.read) -> bytes:
    """A ``multiprocessing`` connection's read of up to ``size`` bytes, in
    a worker: the read of a message's length (4 bytes) waits for them
    first. A stop that lands in the wait has taken nothing, and is raised
    at once; one that lands in the read (which finds the bytes there) may
    come as the read returns, its bytes not yet stored anywhere the frames
    show, and is raised once the whole message is through (see
    :func:`_connection_transfer`). With a bare ``os.read`` the two look the
    same: a read blocked on an empty pipe, and one just back with a
    message's length. (The rest of a message is read as it comes: a stop
    there is raised once it is through, blocked or not.)"""
    if size == 4:
        poller = _POLLERS.get(handle)
        if poller is None:
            if len(_POLLERS) > 256:
                _POLLERS.clear()
            poller = _POLLERS[handle] = select.poll()
            poller.register(handle, select.POLLIN)
        poller.poll()
    return _os_read(handle, size)


#: A poller per descriptor read by :func:`_read_when_ready` (polling takes
#: the descriptor's number, whatever file it is now).
_POLLERS: dict[int, Any] = {}


_READ_WHEN_READY = _read_when_ready.__code__
#: The line of its read (its last).
_READ_LINE = max(line for *_, line in _READ_WHEN_READY.co_lines() if line is not None)


def _guard_connection_reads(connection: Any) -> None:
    """``multiprocessing.connection.Connection`` reads through
    :func:`_read_when_ready` in this worker (its ``_recv``'s default
    ``read``), where it has the form this knows."""
    recv = getattr(getattr(connection, "Connection", None), "_recv", None)
    if recv is not None and recv.__defaults__ == (os.read,):
        recv.__defaults__ = (_read_when_ready,)


def _guard_connection_reads_on_import() -> None:
    """:func:`_guard_connection_reads`, now if ``multiprocessing.connection``
    is imported, else once it is."""
    connection = sys.modules.get("multiprocessing.connection")
    if connection is not None:
        _guard_connection_reads(connection)
    else:
        sys.meta_path.insert(0, _AfterImport("multiprocessing.connection", _guard_connection_reads))


#: A connection's steps that :func:`_connection_transfer` knows: the
#: message received, a part of it received, the message sent.
_TRANSFER_STEPS = ("_recv_bytes", "_recv", "_send_bytes")


def _entering_an_exit_stack(frame: Any) -> Any:
    """The frame of ``ExitStack.enter_context`` that ``frame`` is in, running
    the stack's own code (between the context manager's ``__enter__`` and
    the registering of its exit), or ``None``: a stop raised there leaves
    what was entered without its exit (a lock held for good)."""
    code = getattr(getattr(contextlib._BaseExitStack, "enter_context", None), "__code__", None)
    return _frame_running(frame, code, 4, within=getattr(contextlib, "__file__", None) or "")


def _leaving_a_with(frame: Any) -> bool:
    """Whether ``frame`` is an ``__exit__`` that a stop raised in it would
    end with its work undone (a lock held for good), where raised as it
    returns, the stop costs what it would have cost a moment earlier, in the
    ``with`` statement's body: any ``__exit__`` at its first instruction;
    anywhere in the own code of those of ``ExitStack`` (between the exits it
    calls, each in a ``try`` of its own), ``@contextmanager`` (before it
    resumes the generator) and a manager lock (before its ``release``
    call)."""
    if frame is None:
        return False
    code = frame.f_code
    # At or before its first RESUME, it has run nothing of its own yet.
    if code.co_name == "__exit__" and frame.f_lasti <= _first_offset(code, "opname", "RESUME"):
        return True
    owners: list[object] = [contextlib.ExitStack, contextlib._GeneratorContextManager]
    managers = sys.modules.get("multiprocessing.managers")
    if managers is not None:
        owners.append(getattr(managers, "AcquirerProxy", None))
    return any(code is getattr(getattr(owner, "__exit__", None), "__code__", None) for owner in owners)


def _drop_proxy_connection(proxy: Any) -> None:
    """Lets go of this thread's connection to ``proxy``'s manager, whose
    reply to a call stopped in the middle is still unread: the next call of
    any of that manager's proxies here connects again."""
    local: Any = getattr(proxy, "_tls", None)  # not None where connection is not
    connection = getattr(local, "connection", None)
    if connection is None:
        return
    with contextlib.suppress(Exception):
        del local.connection
        connection.close()


def _raise_after_proxy_call(call: Any, stop: BaseException) -> Callable[[], None] | None:
    """Arranges for ``stop`` to be raised once the proxy call ``call`` (see
    :func:`_proxy_call`) has read its reply: as it returns; out of a proxy's
    ``__exit__`` as that returns (a manager lock given back); after a
    proxy's ``__enter__``, in the ``with`` statement's body (whose exit gives
    the lock back), or, entered otherwise (``ExitStack.enter_context``), as
    what entered it returns (its exit registered). Returns what removes the
    trace function; ``None`` where that cannot be done (a trace function is
    set)."""
    caller = call.f_back
    name = caller.f_code.co_name if caller is not None else None
    if name == "__enter__":
        target = caller.f_back
        if target is None:
            return None
        # Past the with statement: off its line (the ``with`` line, where
        # ``__exit__`` has yet to run).
        with_line = target.f_lineno
        return _raise_in_the_withs_charge(target, stop, lambda now: now.f_lineno != with_line)
    if name == "__exit__":
        return _raise_in(caller, stop, lambda _now, event: event == "return")
    return _raise_in(call, stop, lambda _now, event: event == "return")


def _raise_in(
    frame: Any, stop: BaseException, due: Callable[[Any, str], bool], opcodes: bool = False
) -> Callable[[], None] | None:
    """Arranges for ``stop`` to be raised in ``frame`` through a trace
    function, at its first event (``"line"``, or ``"opcode"`` with
    ``opcodes``, or ``"return"``) for which ``due(frame, event)`` holds; the
    trace function is removed as it raises, and frames called meanwhile are
    not traced. Returns what removes it; ``None`` where that cannot be done
    (a trace function of the program's, a debugger's or a coverage tool's is
    set)."""
    if sys.gettrace() is not None:
        return None

    def clear() -> None:
        frame.f_trace = None
        sys.settrace(None)

    def raise_there(now: Any, event: str, _arg: Any) -> Any:
        if due(now, event):
            clear()
            raise stop
        return raise_there

    frame.f_trace = raise_there
    if opcodes:
        frame.f_trace_opcodes = True
    else:
        frame.f_trace_lines = True
    sys.settrace(lambda *_: None)
    return clear


#: ``threading``'s lock types: a ``Lock``, and the ``RLock`` ones (C and Python).
_THREAD_LOCK = type(threading.Lock())
_THREAD_RLOCKS = (type(threading.RLock()), threading._PyRLock)  # type: ignore[attr-defined]


class _SomeLock:
    """A lock :func:`_lock_just_taken` found taken but could not read again:
    held, as far as :func:`_lock_held` can tell."""


_A_LOCK = _SomeLock()


def _lock_held(obj: Any) -> bool:
    """Whether ``obj`` is a lock (or a ``Condition`` or synchronized value
    around one) this thread holds: a process-shared lock of
    ``multiprocessing``, or a ``threading`` ``RLock``, exactly; a
    ``threading.Lock``, which knows no owner, if anyone holds it (a second
    look tells: see ``Handler.on_signal``)."""
    if obj is _A_LOCK:
        return True
    try:
        lock = getattr(obj, "_lock", obj)
        semlock = getattr(lock, "_semlock", None)
        if semlock is not None:
            return bool(semlock._is_mine())
        if isinstance(lock, _THREAD_RLOCKS):
            return bool(lock._is_owned())  # type: ignore[union-attr]
        if isinstance(lock, _THREAD_LOCK):
            return bool(lock.locked())
    except Exception:
        pass
    return False


#: The methods that take a lock, as :func:`_lock_just_taken` finds them called.
_TAKING = frozenset({"acquire", "__enter__"})

#: How the receiver of a method call may have been loaded: a name, then attributes.
_NAME_LOADS = frozenset(
    {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF"}
)


def _lock_just_taken(frame: Any) -> Any:
    """The lock (see :func:`_lock_held`) that the call the frame has just
    returned from took, or ``None``: ``lock.acquire(...)``
    (``self._rlock.acquire`` in a ``Queue``'s ``get``) called from plain
    code, the form that gives the lock back in a ``try``'s ``finally`` it
    has yet to enter; or ``self._lock.__enter__()``, a ``threading.Condition``'s
    ``__enter__`` (which ``queue.Queue`` enters), whose ``with`` has yet to
    take the lock in charge. Found from the bytecode: the call's receiver is
    a name and attributes, read again."""
    if frame is None:
        return None
    import dis

    try:
        code = frame.f_code
        ins = list(dis.get_instructions(code))
        at = next(i for i, x in enumerate(ins) if x.offset == frame.f_lasti)
        if not ins[at].opname.startswith(("CALL", "PRECALL")):
            return None  # CALL, CALL_KW (3.13), PRECALL (3.11), CALL_FUNCTION_EX
        i = at - 1
        if ins[at].opname == "CALL" and i >= 0 and ins[i].opname == "PRECALL":
            i -= 1  # 3.11, a call site not specialised yet: PRECALL then CALL
        while i >= 0 and not (ins[i].opname in ("LOAD_METHOD", "LOAD_ATTR") and ins[i].argval in _TAKING):
            if ins[i].opname.startswith(("CALL", "PRECALL")) or ins[i].starts_line:
                return None  # another call between, or another statement
            i -= 1
        if i < 0:
            return None
        attrs = []
        j = i - 1
        while j >= 0 and ins[j].opname == "LOAD_ATTR":
            attrs.append(ins[j].argval)
            j -= 1
        if j < 0 or ins[j].opname not in _NAME_LOADS:
            # Reached otherwise (``locks["a"].acquire()``, ``get_lock().acquire()``):
            # not read again (that could run the program's code); taken for
            # a lock just taken, which the second look tells from a blocked one.
            return _A_LOCK
        name = ins[j].argval
        if name in frame.f_locals:
            obj = frame.f_locals[name]
        elif name in frame.f_globals:
            obj = frame.f_globals[name]
        else:
            return None
        for attr in reversed(attrs):
            obj = getattr(obj, attr)
    except Exception:
        return None
    return obj if _lock_held(obj) else None


def _handler_of(code: Any, offset: int) -> int | None:
    """Where an exception raised at ``offset`` of ``code`` is handled in
    that code (a ``try``'s ``finally`` or ``except``), or ``None``."""
    import dis

    parse = getattr(dis, "_parse_exception_table", None)
    if parse is None:
        return -1  # unknown: any line is taken for a new handler's
    for entry in parse(code):
        if entry.start <= offset < entry.end:
            return int(entry.target)
    return None


def _raise_once_in_charge(frame: Any, lock: Any, stop: BaseException) -> Callable[[], None] | None:
    """Arranges for ``stop`` to be raised in ``frame`` once the lock it just
    took is in a ``try``'s charge (the first line whose exception handler is
    not the one of the ``acquire()`` call: its ``finally`` gives the lock
    back), or given back, or as the frame returns; after 20 lines at most (a
    lock taken with nothing to give it back). Returns what removes the trace
    function; ``None`` where a trace function of the program's, a
    debugger's or a coverage tool's is set."""
    if sys.gettrace() is not None:
        return None
    outside = _handler_of(frame.f_code, frame.f_lasti)
    lines = 0

    def due(now: Any, event: str) -> bool:
        nonlocal lines
        if event == "return":
            return True
        if event != "line":
            return False
        lines += 1
        handler = _handler_of(now.f_code, now.f_lasti)
        return (handler != outside and handler is not None) or not _lock_held(lock) or lines > 20

    return _raise_in(frame, stop, due)


def _raise_at_next_instruction(frame: Any, stop: BaseException) -> bool:
    """Arranges for ``stop`` to be raised in ``frame`` at its next
    instruction (or as it returns). ``False`` where a trace function of the
    program's, a debugger's or a coverage tool's is set."""
    if frame is None:
        return False
    due = ("opcode", "line", "return")
    return _raise_in(frame, stop, lambda _now, event: event in due, opcodes=True) is not None


def _frame_it_was_called_from(stop: BaseException) -> Any:
    """The frame that was running when the callback (or ``__del__``) that
    dropped ``stop`` was called: the caller of the outermost frame of its
    traceback (not this hook's caller, which is another hook that chains to
    this one, if the program installed one)."""
    tb = stop.__traceback__
    if tb is not None and tb.tb_frame.f_back is not None:
        return tb.tb_frame.f_back
    return sys._getframe(2)


def _being_handled(stop: BaseException) -> bool:
    """Whether this thread is handling ``stop`` (an ``except`` or ``finally``
    block, an ``__exit__`` it reached), or an error raised while it was."""
    error = sys.exc_info()[1]
    for _ in range(64):
        if error is None:
            return False
        if error is stop:
            return True
        error = error.__context__
    return False


#: The directory of warden's own Python code.
_WARDENS = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_wardens(frame: Any) -> bool:
    """Whether ``frame`` runs warden's own code (the worker loop around the
    task, a call of the task into warden)."""
    return bool(frame.f_code.co_filename.startswith(_WARDENS))


def _ask_again_soon(delay: float = 0.05) -> None:
    """Sends the stop signal to the main thread again after ``delay``: a
    stop held back because the task seemed to have just taken a lock finds
    out whether it really had (see ``Handler.on_signal``)."""
    main = threading.get_native_id()  # called on the main thread, as signal handlers are

    def resend() -> None:
        time.sleep(delay)
        with contextlib.suppress(Exception):
            _warden.stop_thread_again(main)

    with contextlib.suppress(Exception):  # no thread to spare: the stop stays held back
        threading.Thread(target=resend, name="warden-stop-again", daemon=True).start()


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    if t.__module__ == "builtins":
        return t.__qualname__
    # The program's main module is __mp_main__ here, __main__ where it is read.
    module = "__main__" if t.__module__ == "__mp_main__" else t.__module__
    return f"{module}.{t.__qualname__}"


def _error(exc: BaseException, kind: _warden.RemoteKind = _warden.RemoteKind.RAISED) -> _warden.RemoteFailure:
    """A failed task as the core reports it: the exception pickled if it
    pickles, else a stand-in."""
    type_name = _type_name(exc)
    message = text_of(exc)
    frames = exc.__traceback__
    if frames is not None and frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next  # the worker's own frame is noise to the user
    tb = traceback_text(exc, frames, type_name, message)
    # Both are for reading (the exception itself goes whole, pickled): a
    # message of 100 MB would otherwise travel three times. A traceback keeps
    # its start (the frames) and its end (the exception raised).
    message, tb = _cut(message), _cut(tb, keep_end=True)
    if isinstance(exc, Exception):
        # Rebuilt only where it is raised again: its __init__ or __setstate__
        # runs there once, as the standard library's does; what cannot be
        # rebuilt there becomes a RemoteError then.
        try:
            data = dumps(exc)
        except TaskInterrupted:
            raise
        except BaseException as why:  # its __reduce__ may raise anything
            stand_in = RemoteError(
                f"task raised {type_name}: {message} (the exception could not be pickled: "
                f"{type(why).__name__}: {text_of(why)})",
                type_name,
                message,
            )
            data = dumps(stand_in)
    else:
        data = dumps(TaskAborted.standing_in(short_repr(exc), type_name, message))
    return _warden.RemoteFailure(kind, type_name, message, tb, data)


#: How many characters of an error's message and of its traceback text travel.
_TEXT_KEPT = 1 << 20


def _cut(text: str, keep_end: bool = False) -> str:
    """``text`` within :data:`_TEXT_KEPT` characters: its start, or, with
    ``keep_end``, half of it from each end."""
    if len(text) <= _TEXT_KEPT:
        return text
    gone = f"[{len(text) - _TEXT_KEPT} more characters not sent]"
    if keep_end:
        half = _TEXT_KEPT // 2
        return f"{text[:half]}{gone}{text[-half:]}"
    return f"{text[:_TEXT_KEPT]}{gone}"


def _unpicklable_result(value: Any, why: Exception) -> pickle.PicklingError:
    """The error of a task whose result cannot be pickled. It carries the
    reprs ``multiprocessing.pool.MaybeEncodingError`` is made of, so that a
    ``Pool`` raises that instead, each cut as an error's message is: the
    repr of a result too big to send would make the error too big to send."""
    error = pickle.PicklingError(
        f"cannot pickle the task's result of type {type(value).__qualname__}: "
        f"{type(why).__name__}: {_cut(text_of(why))}"
    )
    error.result_repr = _cut(text_of(value, repr))  # type: ignore[attr-defined]
    error.reason_repr = _cut(text_of(why, repr))  # type: ignore[attr-defined]
    return error


def _only_stops(exc: BaseException) -> bool:
    """Whether ``exc`` is an exception group of nothing but stops (a task
    group the stop went through): the stop itself, not an error of the
    task's."""
    return isinstance(exc, BaseExceptionGroup) and exc.split(TaskInterrupted)[1] is None


def _interrupted() -> _warden.RemoteFailure:
    return _warden.RemoteFailure(
        _warden.RemoteKind.INTERRUPTED, "TaskInterrupted", "the worker was told to stop", "", b""
    )


def _system_exit_code(e: SystemExit) -> int:
    """The exit code ``SystemExit`` gives a process, as the interpreter
    computes it; a code that is not an int is printed and gives 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        # As the interpreter passes it to exit(3): read as a C long (-1 if
        # it does not fit), then cut to a C int, of which the system keeps
        # the low 8 bits (2**31 gives 0, 2**40 + 3 gives 3, 2**63 gives 255).
        if not -(2**63) <= e.code < 2**63:
            return -1
        return (e.code + 2**31) % 2**32 - 2**31
    try:
        sys.stderr.write(str(e.code) + "\n")
    except TaskInterrupted:
        raise
    except BaseException:
        pass  # as the interpreter's: a code that cannot be printed is not; it still gives 1
    return 1


#: What coverage.py sets on ``multiprocessing`` once it measures its
#: children (``concurrency = multiprocessing``).
_COVERAGE_PATCHED = "_coverage$patched"


def spawn_preparation(preparation: dict[str, Any]) -> dict[str, Any]:
    """``preparation`` (``multiprocessing.spawn.get_preparation_data``'s) as
    this process should apply it. Its ``dir`` is the parent's working
    directory when the pool was made; if that directory has since been
    deleted and this process still stands in it (inherited from the parent,
    or from a zygote started before), ``chdir`` would fail and every new
    worker with it: the inherited one is kept, the parent's own."""
    wanted = preparation.get("dir")
    if wanted is None:
        return preparation
    try:
        deleted = os.readlink("/proc/self/cwd") == f"{wanted} (deleted)"
    except OSError:
        # No /proc: ``getcwd`` fails (ENOENT) where this process stands in a
        # deleted directory; the wanted one is gone too.
        try:
            os.getcwd()
            deleted = False
        except FileNotFoundError:
            deleted = not os.path.isdir(wanted)
    if not deleted:
        return preparation
    return {key: value for key, value in preparation.items() if key != "dir"}


def _measure_coverage_if_asked() -> None:
    """Under coverage.py's ``concurrency = multiprocessing``, measures this
    worker or child as coverage measures a child of ``multiprocessing``.

    Coverage wraps ``BaseProcess._bootstrap``, which a warden worker does
    not run, so that each child starts its own measurement; the preparation
    data carries its patch into the child (it is applied by now). Here the
    measurement starts as its wrapper starts it, after the program's main
    module is imported; its data is saved, in a file of this process's own,
    by the exit handler it registers (among this process's ``atexit``
    handlers, which the exit path runs). Without that, a program measured
    with warden's pools saw every line its tasks ran reported as missed."""
    if not getattr(multiprocessing, _COVERAGE_PATCHED, False):
        return
    try:
        from coverage import Coverage
    except ImportError:
        return
    cov = Coverage(data_suffix=True, auto_data=True)
    cov._warn_preimported_source = False  # as coverage's own wrapper says: main is imported by now
    cov.start()


#: Whether a child of multiprocessing's runs its exit function (the
#: ``multiprocessing.util.Finalize`` callbacks, then its daemon children
#: terminated and the others joined) as soon as its target returns, before
#: the ``atexit`` handlers (up to Python 3.12; from 3.13 it is one of them).
_EXIT_FUNCTION_AFTER_RUN = sys.version_info < (3, 13)

#: Whether a child of multiprocessing's says "process exiting" before its
#: exit function says "process shutting down" (from Python 3.13, where that
#: function runs among the atexit handlers, after the bootstrap).
_EXITING_SAID_FIRST = sys.version_info >= (3, 13)

#: Types of results whose end runs no code of the program's.
_DIES_QUIETLY = frozenset({type(None), bool, int, float, complex, str, bytes})


#: CPU time (s) under which an exit handler's main thread has used between
#: two stop signals 50 ms apart reads as waiting, not working.
_STUCK_CPU = 0.002


class _ExitWaitEnded(TaskInterrupted):
    """Raised by the stop-signal handler in a ``Process`` child's exit
    handler that waits (see ``Handler._end_a_stuck_wait``)."""


class _StopWaiting(BaseException):
    """Raised by the stop-signal handler in a retiring worker that waits for
    its threads: the pool stopped waiting for them (SIGTERM after its grace)."""


def _join_non_daemon_threads() -> None:
    """Waits for the non-daemon threads of this process, as interpreter exit
    does (``threading._shutdown``): first the ``threading`` module's exit
    hooks run (``concurrent.futures`` thread pools finish their queued work
    and end their threads there, and take no more), then every non-daemon
    thread is joined."""
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks:
        threading._SHUTTING_DOWN = True  # type: ignore[attr-defined]  # later registrations fail, as at exit
        while hooks:
            try:
                hooks.pop()()  # newest first, each once
            except Exception:
                say_exception(f"warden: worker {os.getpid()}: exception in a threading exit hook:\n")
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()


def _as_without_warden(signum: int, frame: Any) -> None:
    """In a forked copy of a worker: what the signal does to a process
    without warden's handlers. SIGINT raises ``KeyboardInterrupt``; SIGTERM
    and SIGHUP end the copy (its exit code says which)."""
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


#: Set in a copy of this process made by ``os.fork()`` (the program's code
#: forking in a task or a hook); the worker clears it as it starts (a zygote
#: forks workers too). Read on every task: a global, not a system call.
_forked = False


def _note_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_forked)


def _end_a_forked_copy(error: BaseException | None = None) -> None:
    """Ends this process here if it is a copy of the worker that the
    program's code (a task, the initializer, the finalizer, a worker
    context) made with ``os.fork()`` and that came back out of that code:
    it is not the worker, and must not answer on the worker's channel, serve
    its tasks or run its exit path. It ends as a forked ``multiprocessing``
    child ends its bootstrap: exit code 0; ``n`` after ``sys.exit(n)``; 1
    after another exception, its traceback printed; its streams flushed.
    Returns at once in the worker. (A copy made otherwise, by C code, is
    ended by the core as it comes back, with exit code 0.)"""
    if not _forked:
        return
    code = 0
    if isinstance(error, SystemExit):
        code = _system_exit_code(error)
    elif error is not None:
        code = 1
        with contextlib.suppress(BaseException):
            import traceback

            say("".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip("\n"))
    with contextlib.suppress(BaseException):
        multiprocessing.util._flush_std_streams()  # type: ignore[attr-defined]
    os._exit(code)


class Handler:
    """Called by the core's worker loop; see the module documentation."""

    def __init__(self) -> None:
        global _forked
        _forked = False  # the worker itself, even if a zygote forked it
        self.pid = os.getpid()
        self.running = False
        self.mode = "pool"
        self.hooks: dict[str, Any] = {}
        # A one-off child's: the fd of the segment its task's large buffers
        # are in (the parent passed it at start, see _runner), until read.
        self.segment: int | None = None
        self.context: contextlib.AbstractContextManager[Any] | None = None
        # Set once the initializer has returned: from then on, a stop runs
        # the finalizer (and exits the worker context) as any exit does.
        self.initialized = False
        self.exit_code: int | None = None
        self.stopping = False
        # Set while a retiring worker waits for its threads: a stop signal
        # ends that wait (see exit).
        self.waiting_for_threads = False
        # Set while a Process child runs the program's exit handlers: once
        # it is told to stop, a wait of theirs is ended (see _end_process);
        # the main thread's CPU time when the last stop signal came.
        self.may_cut_short = False
        self.last_seen: float | None = None
        # Set when a Process child gets SIGTERM (terminate()) once its target
        # has returned: it ends by that signal after its exit path.
        self.terminated_while_exiting = False
        #: Flushing stdout or stderr failed at the exit path's end.
        self.flush_failed = False
        # A stop held back until a lock is in a try's or a with's charge:
        # the frame and instruction it came in, the stop, what cancels it,
        # when it came (time.monotonic()).
        self.held_back: tuple[Any, int, BaseException, Callable[[], None], float] | None = None
        # The stop raised in the running task (or start), until it ends: a
        # stop the interpreter swallowed then is raised again. (Let go as the
        # task ends: its traceback holds the task's frames.)
        self.raised_stop: BaseException | None = None
        # A stop came while a task ran (it was interrupted): the worker
        # context's exit is told (see _end_hooks).
        self.task_stopped = False
        self._unraisable_before = sys.unraisablehook
        sys.unraisablehook = self._on_unraisable

    def _on_unraisable(self, unraisable: Any) -> None:
        """A stop raised where the interpreter ignores exceptions (a weakref
        callback such as the import system's module locks', a ``__del__``)
        never reached the task, which would run on until the core's unwind
        grace ran out: it is raised again in the code the interpreter goes
        back to."""
        stop = unraisable.exc_value
        if isinstance(stop, _ExitWaitEnded):
            return  # an exit handler's wait ended by a stop: what was asked
        if (
            self.raised_stop is not None
            and isinstance(stop, TaskInterrupted)
            and threading.current_thread() is threading.main_thread()
            and _raise_at_next_instruction(_frame_it_was_called_from(stop), stop)
        ):
            return
        self._unraisable_before(unraisable)

    # The signal handler runs on the main thread between bytecodes. It raises
    # at most once per task, so the task's own cleanup is not interrupted twice.
    def on_signal(self, signum: int, frame: Any) -> None:
        caller = frame
        while caller is not None:
            if caller.f_code is _ON_SIGNAL_CODE:
                # The stop signal again (the core sends it twice), while this
                # handler runs: the running one decides where to raise.
                return
            caller = caller.f_back
        if os.getpid() != self.pid:
            # A copy of this worker made by os.fork() in a task: the signal
            # is the copy's, as if warden were not there.
            _as_without_warden(signum, frame)
            return
        if signum == signal.SIGINT and _warden.sigint_without_a_signal():
            # No SIGINT came: ``_thread.interrupt_main()`` ran this handler
            # (a task's timer interrupting its own wait). The task gets its
            # KeyboardInterrupt, as without warden; between tasks, nothing.
            if self.running:
                signal.default_int_handler(signum, frame)
            return
        # A stop. Where a task put the interpreter's handler back in place
        # of the core's, only this one saw it: the core learns it here.
        _warden.record_stop_signal(signum)
        self.stopping = True
        # Pools this worker started stop at once at its exit (only a worker
        # that started one has loaded warden._runner).
        runner = sys.modules.get("warden._runner")
        if runner is not None:
            runner.stop_requested = True  # type: ignore[attr-defined]
        cancel: Callable[[], None] | None
        held_back, self.held_back = self.held_back, None
        if held_back is not None:
            then, lasti, stop, cancel, since = held_back
            if frame is then and frame.f_lasti == lasti:
                # Still in the call the stop came in: it had not returned.
                if _leaving_a_with(frame):
                    self.held_back = held_back  # raised as it returns
                    return
                call = _proxy_call(frame)
                if (
                    call is not None
                    and _request_sent(call)
                    and time.monotonic() - since < _warden.unwind_grace() / 2
                ):
                    # A manager proxy's call whose request is out: the
                    # manager carries it out (takes the lock, say) whether
                    # or not the reply is read. It is waited for, half the
                    # time the task has to unwind at most (a slow manager
                    # on a loaded machine, not a contended lock).
                    self.held_back = held_back
                    _ask_again_soon()
                    return
                if (
                    _connection_transfer(frame) is not None
                    and time.monotonic() - since < _warden.unwind_grace() / 2
                ):
                    # A message half moved through a connection: waited
                    # for as a proxy's reply is (a writer that stopped
                    # mid-message, a reader of a full pipe nobody drains,
                    # end so: that pipe is misframed).
                    self.held_back = held_back
                    _ask_again_soon()
                    return
                # Blocked taking what this process already held more of (a
                # Queue's semaphore, an Event's), so it took nothing; a
                # proxy's call still waiting: stopped now.
                cancel()
                if call is not None:  # its reply is never read: nor by the next call
                    _drop_proxy_connection(call.f_locals.get("self"))
                raise stop
            call = _proxy_call(frame) if sys.gettrace() is not None else None
            if call is not None:
                # Held back, not raised yet, and now in another proxy call
                # made before it could be (the second lock of `with a, b:`,
                # which may block): held back for that one instead.
                cancel()
                cancel = _raise_after_proxy_call(call, stop)
                if cancel is None:
                    _drop_proxy_connection(call.f_locals.get("self"))
                    raise stop
                self.held_back = (frame, frame.f_lasti, stop, cancel, since)
                _ask_again_soon()
                return
            if _connection_transfer(frame) is not None:
                # Moving on through a message: watched from where it is now.
                self.held_back = (frame, frame.f_lasti, stop, cancel, since)
                _ask_again_soon()
                return
            self.held_back = held_back  # on its way: its trace function raises it
            return
        if self.raised_stop is not None and frame is not None:
            # The stop signal again while the task has not unwound (the core
            # asks, now and then, until it has). Where the interpreter
            # swallowed the stop (raised in the flush of a file freed
            # unclosed, an error it clears), the task runs on as if never
            # stopped: it is raised again; not in a task that is unwinding
            # (handling the stop, or an error raised while handling it).
            swallowed = self.raised_stop
            if not _being_handled(swallowed) and not _is_wardens(frame):
                raise swallowed
        if self.running:
            self.running = False
            self.task_stopped = True
            stop = TaskInterrupted(signal.Signals(signum).name)
            self.raised_stop = stop
            cancel = None
            ask_again = True
            call = _proxy_call(frame)
            transfer = None if call is not None else _connection_transfer(frame)
            entering = None if call is not None or transfer is not None else _entering_an_exit_stack(frame)
            if call is not None:
                # In a manager proxy's call: raised once it has its reply.
                cancel = _raise_after_proxy_call(call, stop)
                if cancel is None:
                    _drop_proxy_connection(call.f_locals.get("self"))
                    raise stop
            elif transfer is not None:
                # Part of a message moved: raised once all of it has.
                cancel = _raise_in(transfer, stop, lambda _now, event: event == "return")
                if cancel is None:
                    raise stop
            elif entering is not None:
                # Entered, its exit not registered yet: raised once it is.
                cancel = _raise_in(entering, stop, lambda _now, event: event == "return")
                if cancel is None:
                    raise stop
            elif _leaving_a_with(frame):
                # Giving back what the with statement took: raised once
                # it has (never cut short, so not asked again).
                cancel = _raise_in(frame, stop, lambda _now, event: event == "return")
                ask_again = False
            elif _taking_or_giving_a_lock(frame):
                # Raised here, the stop would leave a lock of the program's
                # held for good: it is raised once the lock is in the with
                # statement's charge, or given back.
                cancel = _raise_after_hand_over(frame, stop)
            else:
                lock = _lock_just_taken(frame)
                if lock is not None and frame.f_code.co_name == "__enter__" and frame.f_back is not None:
                    # Taken by a context manager of the program's: raised
                    # once its with statement has it in charge.
                    cancel = _raise_in_the_withs_charge(frame.f_back, stop, lambda _now: not _lock_held(lock))
                elif lock is not None:
                    # The same for ``lock.acquire()`` followed by ``try:``.
                    cancel = _raise_once_in_charge(frame, lock, stop)
            if cancel is not None:
                self.held_back = (frame, frame.f_lasti, stop, cancel, time.monotonic())
                if ask_again:
                    _ask_again_soon()
                return
            raise stop
        if self.waiting_for_threads:
            self.waiting_for_threads = False
            raise _StopWaiting
        if self.mode == "process" and signum == signal.SIGTERM:
            # (terminate(), or the signal sent again: never a stray SIGHUP,
            # which leaves the exit path to finish, as before it came.)
            self.terminated_while_exiting = True
            if self.may_cut_short and frame is not None:
                self._end_a_stuck_wait(frame, signum)

    def _end_a_stuck_wait(self, frame: Any, signum: int) -> None:
        """In a ``Process`` child told to stop while its exit handlers (or
        ``__del__`` methods) run: the stop signal comes again every 50 ms
        while they run, and ends the wait of one that has used no CPU since
        the last one (a ``Queue`` flushing into a full pipe, a join, a sleep)
        by raising in it, as the standard library's child would have ended at
        once. Never in the exit path's own steps (they must all run; warden's
        exit step ends its own waits on the stop), nor as a lock of the
        program's is handed over, nor in code that is working."""
        _ask_again_soon()
        now = time.thread_time()  # the main thread's: handlers run there
        stuck = self.last_seen is not None and now - self.last_seen < _STUCK_CPU
        self.last_seen = now
        # (Not _lock_just_taken: it also holds for a semaphore this process
        # holds counts of while the wait takes one more, which is the wait.)
        if stuck and _programs_frame(frame) and not _taking_or_giving_a_lock(frame):
            self.last_seen = None
            raise _ExitWaitEnded(signal.Signals(signum).name)

    def init(self, worker: int, pid: int, parent: int, payload: bytes) -> _warden.RemoteFailure | None:
        logged = False
        setup = False
        self.running = True
        try:
            _enable_faulthandler()
            if self.stopping:
                # Told to stop before the start hook began: the handler ran
                # and raised nothing (nothing was running), and the core has
                # the signal too: it reads this failure as the stop it is.
                raise TaskInterrupted("stopped while starting")
            init = _loads(payload)
            self.mode = init["mode"]
            segment = init.get("segment")
            if self.mode == "process":
                self.segment = segment
                segment = None
            if init.get("memory_capped"):
                _warden.keep_no_spares()
            if init.get("resource_tracker") is not None:
                # Before anything of the program's runs (main, as imported
                # by prepare(), may already create shared memory).
                _use_parents_resource_tracker(init["resource_tracker"])
            if self.mode == "pool":
                _stdlib_worker_submodules()
            _guard_connection_reads_on_import()
            me = multiprocessing.current_process()
            within = tuple(init.get("within", ()))
            identity = (*within, worker)
            name = _context.pool_worker_name(init["name"], within, worker)
            me._inheriting = True  # type: ignore[attr-defined]
            setup = True
            try:
                # (Not where a zygote imported main: nothing of the program's is left to import.)
                watch = getattr(sys.modules.get("__main__"), "__name__", None) != "__mp_main__"
                with notice_if_slow(
                    "worker" if self.mode == "pool" else "child", "importing the program's code", watch
                ):
                    if watch:
                        preparation = spawn_preparation(init["preparation"])
                        if self.mode == "pool":
                            # Named (and numbered) as it imports main, as a
                            # spawned worker of the standard library's is: a
                            # log line main writes as it is imported says which.
                            preparation = {**preparation, "name": name}
                            me._identity = identity
                        multiprocessing.spawn.prepare(preparation)
                    # else: forked by a zygote that applied this preparation,
                    # then imported main: applied again, it would undo what
                    # main's import changed (``sys.path``, ``sys.argv``, the
                    # log level), which a spawned worker keeps.
                    _measure_coverage_if_asked()
                    # Their large buffers (initargs') are in the pool's segment,
                    # mapped copy-on-write (its fd closed here).
                    hooks = _oob.loads(init["hooks"], segment) if init["hooks"] else {}
                setup = False
            finally:
                del me._inheriting  # type: ignore[attr-defined]
            _set_parent(init["parent_name"], parent)
            if self.mode == "pool":
                me.name = name
                # As a multiprocessing pool worker's: its number, counted
                # from 1 as the pool starts workers (``_identity[0]`` is a
                # common way to tell workers apart, e.g. a progress bar's row),
                # after those of the worker or child the pool was made in.
                me._identity = identity
            if init.get("logging"):
                _forward_logging(init["logging"]["fd"], init["logging"]["levels"])
            self.hooks = hooks
            initializer = hooks.get("initializer")
            if initializer is not None:
                try:
                    try:
                        initializer(*hooks.get("initargs", ()))
                    except BaseException as e:
                        _end_a_forked_copy(e)
                        raise
                    # At once, with no call in between (where a stop signal's
                    # handler could raise): from here on a stop runs the
                    # finalizer, however soon it comes.
                    self.initialized = True
                    _end_a_forked_copy()
                except BaseException as e:
                    _logging_steps_aside()
                    logger = hooks.get("failure_logger")
                    # A sys.exit() too, as concurrent.futures logs it; a stop
                    # is not the initializer's failure.
                    if logger is None or isinstance(e, (TaskInterrupted, _StopWaiting)):
                        raise
                    # As concurrent.futures' workers report it (forwarded to
                    # the parent's handlers, like any record of a worker).
                    import logging

                    logging.getLogger(logger).critical("Exception in initializer:", exc_info=True)
                    logged = True
                    raise
                _logging_steps_aside()
            self.initialized = True
            factory = hooks.get("worker_context")
            if factory is not None:
                cm = factory()
                # An entered context is always exited: a stop signal neither
                # raises in __enter__ nor lets the core end the process before
                # it returns (cut short, it could be entered and known to no
                # exit path; the pool's grace bounds the wait). The stop is
                # taken once init returns: the exit path exits the context.
                self.running = False
                _warden.hold_stops(True)
                try:
                    try:
                        entered = cm.__enter__()
                    except BaseException as e:
                        _end_a_forked_copy(e)
                        raise
                    _end_a_forked_copy()
                    self.context = cm
                finally:
                    _warden.hold_stops(False)
                _context._set(entered)
                _logging_steps_aside()
        except BaseException as e:
            # Nothing runs any more: a second stop signal must not raise
            # inside the exit path (the monitor re-sends SIGTERM).
            self.running = False
            if self.stopping:
                # Told to stop while starting (the stop itself, or what an
                # import in progress turned it into): a stop, not a failure.
                # Once the initializer has returned, what it and the worker
                # context set up is torn down as at any exit. (A
                # TaskInterrupted with no stop asked is the hooks' own error.)
                self._end_process(self._end_hooks() if self.initialized else [])
                return _interrupted()
            if not logged:
                who = "worker" if self.mode == "pool" else "child"
                say_exception(f"warden: {who} {os.getpid()} failed to start:\n")
            # The program's main module, or what the hooks refer to, could
            # not be loaded: no other worker would load them either.
            failure = _error(e, _warden.RemoteKind.SETUP if setup else _warden.RemoteKind.RAISED)
            self._end_process([])
            return failure
        finally:
            self.running = False
            self.raised_stop = None
        if self.mode == "pool":
            # As the standard library's pool and executor workers, which are
            # processes, say it (seen with multiprocessing.log_to_stderr()).
            multiprocessing.util.info("child process calling self.run()")
        return None

    def run(
        self, payload: bytes, segment: int | None = None
    ) -> bytes | tuple[bytes, int | None, Any] | _warden.RemoteFailure:
        """Runs one task: returns the pickled result or a ``RemoteFailure``.
        A result with out-of-band buffers, or whose value could run code when
        it dies, comes as ``(bytes, fd or None, value)``: the core keeps the
        value until the result is sent, so that a slow ``__del__`` cannot hold
        the result back (the standard library's workers also send, then drop
        it); except a result holding a ``warden.Event`` opened through this
        worker's fd, dropped first, so that an Event only the result held is
        gone when the parent opens it (a clear error, as documented, not a
        race). ``segment`` is the fd of the call's buffers, if any (closed here)."""
        self.running = True
        try:
            if self.mode == "process":
                return self._run_process(payload)
            try:
                _wait_for_results_read()
            except BaseException:
                if segment is not None:
                    _native.close(segment)
                raise
            if segment is None:
                fn, args, kwargs = loads_call(payload) if payload[0] == BY_REF else _oob.unpickle(payload)
            else:
                fn, args, kwargs = _oob.loads_beside(payload, segment, BY_REF, loads_call)
            try:
                value = fn(*args, **kwargs)
            except BaseException as e:
                _end_a_forked_copy(e)
                raise
            if _forked:  # (read here: no call per task)
                _end_a_forked_copy()
            self.running = False
            del fn, args, kwargs
            handles = _pickle.opened_through_this_process
            try:
                data, out = dumps_oob(value, to_parent=True)
            except Exception as e:
                return _error(_unpicklable_result(value, e))
            if out is None and (
                type(value) in _DIES_QUIETLY or handles != _pickle.opened_through_this_process
            ):
                # An Event the result alone held is closed before the parent
                # can open it: a clear error there, never a race.
                return data
            return (data, out if out is None else _oob.take_fd(out), value)
        except TaskInterrupted as e:
            self.running = False  # the exit path comes next: not to be interrupted
            # Raised by the task itself, with no stop asked: its own error.
            return _interrupted() if self.stopping else _error(e)
        except BaseException as e:
            self.running = False
            if self.stopping and not _only_stops(e):
                # Raised by the task's own cleanup as it was being stopped:
                # the caller has the stop's error (a timeout, a cancel), so
                # this one would reach nobody. Said here, as a Process
                # child's is when it is terminated.
                say_exception(f"warden: worker {os.getpid()}: exception in a task being stopped:\n")
            return _error(e)
        finally:
            self.running = False
            self.raised_stop = None

    def _run_process(self, payload: bytes) -> bytes | _warden.RemoteFailure:
        """Runs a one-off ``Process`` as ``multiprocessing``'s bootstrap does:
        exit code 0, ``sys.exit(n)`` gives n, an exception gives 1 and a traceback.

        SIGINT is the target's, as in a child of the standard library's (a
        ``Process`` is a program of its own): it raises ``KeyboardInterrupt``
        there, not ``TaskInterrupted``, and does not stop the worker. Setting
        its handler back also takes it from the core's, which stops
        treating it as a stop signal. The core's forwarding handler is then
        chained in front of it: a SIGINT sent to every process of the program
        reaches this one from its sender and again from the parent, which
        passes it on, and the target gets it once."""
        signal.signal(signal.SIGINT, _startup_sigint)
        _warden.prepare_interrupt_forwarding()
        me = multiprocessing.current_process()
        me._inheriting = True  # type: ignore[attr-defined]
        segment, self.segment = self.segment, None
        try:
            process = _oob.loads(payload, segment)
        except TaskInterrupted:
            raise
        except SystemExit as e:
            # As under spawn, where it leaves the child's interpreter: its code.
            self.exit_code = _system_exit_code(e)
            self.running = False
            return dumps(None)
        except BaseException:
            # As under spawn: the child cannot get its target; traceback, exit code 1.
            say_exception()
            self.exit_code = 1
            self.running = False
            return dumps(None)
        finally:
            del me._inheriting  # type: ignore[attr-defined]
        multiprocessing.process._current_process = process  # type: ignore[attr-defined]
        multiprocessing.process._children = set()  # type: ignore[attr-defined]
        exitcode = 1
        pid = os.getpid()
        multiprocessing.util.info("child process calling self.run()")
        try:
            try:
                process.run()
                exitcode = 0
            finally:
                # As multiprocessing's bootstrap up to 3.12: what its exit
                # function raises (a Finalize callback's sys.exit) takes the
                # place of what the target raised.
                if _EXIT_FUNCTION_AFTER_RUN and not self.stopping:
                    self._exit_function()
        except TaskInterrupted:
            if self.stopping:
                raise
            # The target's own (no stop was asked): as any other exception.
            say_exception(f"Process {process.name}:\n")
            exitcode = 1
        except SystemExit as e:
            exitcode = _system_exit_code(e)
        except BaseException:
            say_exception(f"Process {process.name}:\n")
            exitcode = 1
        if os.getpid() != pid:
            # A copy the target forked (os.fork), come back out of it: it
            # ends here with the target's exit code, as such a copy of a
            # multiprocessing child ends its bootstrap (the threads it
            # started joined, its streams flushed), not as the worker.
            with contextlib.suppress(BaseException):
                _join_non_daemon_threads()
            multiprocessing.util._flush_std_streams()  # type: ignore[attr-defined]
            os._exit(exitcode)
        self.exit_code = exitcode
        # Like multiprocessing: a child waits for the non-daemon threads it
        # started; one told to stop does not (its target ended with another
        # error than the stop, or swallowed it): the stop's exit path runs now.
        if not self.stopping:
            _join_non_daemon_threads()
        self.running = False
        return dumps(None)

    def _exit_function(self) -> None:
        """``multiprocessing.util._exit_function``: Finalize callbacks, the
        children terminated if daemonic, else joined, then the rest of the
        callbacks. Cut short by a stop (a join waiting), it is left to the
        exit path's ``atexit`` handlers to take up again (once it has begun,
        it does nothing when they call it)."""
        try:
            multiprocessing.util._exit_function()  # type: ignore[attr-defined]
        except TaskInterrupted:
            if self.stopping:
                multiprocessing.util._exiting = False  # type: ignore[attr-defined]
            raise

    def exit(self, reason: str) -> tuple[str | None, int | None, int | None]:
        """The exit path: worker context, finalizer, gc, atexit (with warden's
        exit callbacks), flush. Once. Returns its errors (each said on stderr
        as it came), the exit code, and
        the signal to end by instead (a ``Process`` child terminated while its
        exit path ran ends as the ``terminate()`` asked)."""
        errors: list[str] = []
        if reason == "parent_gone":
            # Records logged from here on (a finalizer's) go to this
            # worker's stderr (``warden._logging.parent_gone``).
            _tell_logging("parent_gone")
        if self.mode == "pool" and reason.startswith("retired:") and reason != "retired:stopped":
            # As a process ending normally does (the standard library's
            # workers too): wait for the non-daemon threads its tasks
            # started, before the finalizer closes what they may use. The
            # pool's grace bounds it: its SIGTERM ends the wait, and the
            # exit path goes on (the threads end with the process).
            try:
                self.waiting_for_threads = not self.stopping
                if self.waiting_for_threads:
                    _join_non_daemon_threads()
                self.waiting_for_threads = False
            except _StopWaiting:
                pass
        # As multiprocessing's bootstrap ends a process that was not killed:
        # from Python 3.13 before its exit function runs ("process shutting
        # down", among the atexit handlers), up to 3.12 after it.
        exiting = None if self.stopping else f"process exiting with exitcode {self.exit_code or 0}"
        if exiting and _EXITING_SAID_FIRST:
            multiprocessing.util.info(exiting)
        errors += self._end_hooks()
        self._end_process(errors)
        if exiting and not _EXITING_SAID_FIRST:
            multiprocessing.util.info(exiting)
        # A result lent to the parent lives in this process's memory: wait
        # (briefly: the parent reads a result as soon as it arrives, and a
        # parent that is gone closes its end; longer for more bytes, which
        # the parent takes longer to read) until it has been read.
        if not _oob.wait_for_readers(every=True, timeout=_loan_wait()):
            say(f"warden: worker {os.getpid()}: exiting before the parent read a result")
        signum = int(signal.SIGTERM) if self.terminated_while_exiting else None
        if self.flush_failed and self.mode == "process":
            # The interpreter's own exit code when it cannot flush stdio at
            # its end: a standard library child started by spawn ends so.
            self.exit_code = 120
        return ("; ".join(errors) or None, self.exit_code, signum)

    def _who(self) -> str:
        """What this process is called on stderr."""
        return "worker" if self.mode == "pool" else "child"

    def _end_hooks(self) -> list[str]:
        """The pool's part of the exit path: the worker context is exited,
        then the finalizer runs. Once: the hooks are gone afterwards."""
        errors: list[str] = []
        if self.context is not None:
            context, self.context = self.context, None
            # A task stopped mid-way (a timeout, cancel(running=True), a
            # terminate): the context is told, as a with block around the
            # worker's tasks would be, so that one that commits on a clean
            # exit rolls back instead.
            stop = TaskInterrupted("the worker was stopped while a task ran") if self.task_stopped else None
            try:
                try:
                    context.__exit__(type(stop) if stop else None, stop, None)
                except BaseException as e:
                    _end_a_forked_copy(e)
                    raise
                _end_a_forked_copy()
            except BaseException as e:
                if e is not stop:  # given back: not a failure of the context
                    errors.append(f"worker_context exit raised {_type_name(e)}: {text_of(e)}")
                    say_exception(f"warden: worker {os.getpid()}: exception in worker_context exit:\n")
            _context._clear()
        finalizer = self.hooks.get("finalizer")
        if finalizer is not None:
            try:
                try:
                    finalizer(*self.hooks.get("finalargs", ()))
                except BaseException as e:
                    _end_a_forked_copy(e)
                    raise
                _end_a_forked_copy()
            except BaseException as e:
                errors.append(f"finalizer raised {_type_name(e)}: {text_of(e)}")
                say_exception(f"warden: worker {os.getpid()}: exception in finalizer:\n")
        self.hooks = {}
        return errors

    def _end_process(self, errors: list[str]) -> None:
        """The process's part of the exit path, also run when the worker never
        finished starting (what a partly run initializer registered still
        runs): gc, atexit (with warden's exit callbacks), flush. Once: the
        registries are empty afterwards."""
        self.raised_stop = None  # the exit path is not to be interrupted
        # Except, in a Process child, what the program's __del__ methods and
        # exit handlers wait for (a Queue's data going into a full pipe, a
        # child to join, a sleep), once the child is told to stop: a
        # terminate() ends that, as it would end a child of the standard
        # library's at once; the exit path's own steps still run, and the
        # child ends with -SIGTERM (see _end_a_stuck_wait).
        self.may_cut_short = self.mode == "process"
        # A stop held back in the target (a lock it was taking) is past: the
        # exit path takes stops as they come.
        self.held_back = None
        if self.may_cut_short and self.stopping:
            _ask_again_soon()  # told to stop before: the same from the start
        try:
            _cuttable(gc.collect)
        except BaseException as e:
            if not isinstance(e, _ExitWaitEnded):
                errors.append(f"garbage collection raised {_type_name(e)}: {text_of(e)}")
                say(f"warden: {self._who()} {os.getpid()}: {errors[-1]}")
        try:
            # warden's own handler is among them (registered when warden was
            # imported, so it runs after those registered since): it shuts down
            # the pools this worker started, then runs the exit callbacks.
            _cuttable(atexit._run_exitfuncs)
        except BaseException as e:
            if not isinstance(e, _ExitWaitEnded):
                errors.append(f"atexit raised {_type_name(e)}: {text_of(e)}")
                say(f"warden: {self._who()} {os.getpid()}: {errors[-1]}")
        self.may_cut_short = False
        self.last_seen = None
        try:
            # Idempotent: in case the handler above did not get to run them.
            # Only a process that loaded warden._finalize can have any.
            finalizers = sys.modules.get("warden._finalize")
            if finalizers is not None:
                finalizers.run_exit_callbacks()
        except BaseException as e:
            errors.append(f"exit callbacks raised {_type_name(e)}: {text_of(e)}")
            say(f"warden: {self._who()} {os.getpid()}: {errors[-1]}")
        try:
            _clear_program_globals()
        except BaseException as e:
            errors.append(f"clearing the program's globals raised {_type_name(e)}: {text_of(e)}")
            say(f"warden: {self._who()} {os.getpid()}: {errors[-1]}")
        _stop_resource_tracker()
        for name, stream in _standard_streams():
            try:
                # A closed stream has nothing left to write (the program
                # closed it, or put a file it has closed in its place): the
                # interpreter's own exit skips it too.
                if stream is not None and not getattr(stream, "closed", False):
                    stream.flush()
            except Exception as e:
                # What the program printed is lost (a full disk, a closed
                # pipe): say so, as the interpreter's own exit would.
                self.flush_failed = True
                if name == "stdout":
                    say(
                        f"warden: {self._who()} {os.getpid()}: what it printed was lost, "
                        f"flushing stdout raised {_type_name(e)}: {text_of(e)}"
                    )


def _cuttable(step: Callable[[], object]) -> None:
    """Runs a step of a ``Process`` child's exit path that runs the program's
    code (its ``__del__`` methods, its exit handlers): a ``terminate()`` may
    raise in this frame, or in a deeper one, to end what it waits for, and
    the caller catches it (see ``Handler.on_signal``)."""
    step()


_CUTTABLE_CODE = _cuttable.__code__


def _programs_frame(frame: Any) -> bool:
    """Whether ``frame`` runs the program's code (or the standard library's,
    or what of warden's the program called: a ``Process.join``, an
    ``Event.wait``), not the exit path's own steps: where a ``terminate()``
    may cut a ``Process`` child's exit short. :func:`_cuttable`'s own frame
    counts as the program's: it is where the interpreter runs an exit
    handler that is a C function (``time.sleep``)."""
    runner = sys.modules.get("warden._runner")
    steps = runner.EXIT_STEP_CODES if runner is not None else frozenset()
    # Out to the step that runs the program's code: whatever warden's exit
    # step called (a thread's join, its log drain) is the step's too.
    while frame is not None and frame.f_code is not _CUTTABLE_CODE:
        if frame.f_globals is globals() or frame.f_code in steps:
            return False
        frame = frame.f_back
    return True


def _clear_program_globals() -> None:
    """What the interpreter's own finalization does at the end of a program,
    which the exit path takes the place of, for the program's own modules
    (``__main__`` as the worker imported it, and every module loaded from
    outside the interpreter's and the environment's directories).

    As CPython's finalization does, the program's modules are first taken
    out of ``sys.modules`` together (main with the namespace its functions
    run in), warden lets go of what it holds of them (the functions its
    tasks named), and garbage is collected: a module only ``sys.modules``
    held is garbage then, with its functions, classes and the objects only
    its globals hold, and the collector runs every ``__del__`` among them
    before it clears anything, so each sees every global of its module
    still set. A module still alive after that (something else holds it, or
    one of its functions: a handler the program gave a library) is put back
    in ``sys.modules``, and its globals that hold data are cleared one at a
    time, in the order CPython clears a module's globals at that point, then
    collected; modules, functions, classes and dunder names are kept, for
    the ``__del__`` methods that use them. So what only a global holds is
    finalized as at the end of a program: ``__del__`` runs, a file opened
    into a global is flushed and closed, a ``gzip`` writer writes its
    trailer, a temporary file is removed; a file a class attribute of the
    program's holds is closed then.

    Unlike the interpreter's finalization, the exit path cannot freeze
    threads: one of the program's still running (a daemon thread) would find
    its globals, or a file it writes, gone under it. Then the globals are
    left as they are, and the files they and the program's classes hold are
    only flushed: what was written reaches the file, nothing is finalized."""
    here, main = threading.current_thread(), threading.main_thread()
    threads = False
    for thread in threading.enumerate():  # the live ones
        if thread is here or thread is main or isinstance(thread, threading._DummyThread):
            continue
        if not thread.name.startswith("warden-"):  # warden's own: results, logging
            threads = True
            break
    # What was printed goes out first, as the interpreter's finalization
    # flushes the standard streams before it tears modules down: a wrapper of
    # sys.stdout's buffer that a global holds closes that buffer as it goes.
    for _, stream in _standard_streams():
        with contextlib.suppress(Exception):
            stream.flush()
    if threads:
        _settle_files(_program_namespaces(), close=False)
        return
    namespaces, mains = _collect_program_modules()
    _clear_each_name(namespaces, mains)
    _settle_files(namespaces, close=True)


class _Mark:
    """Put in a namespace of the program's while its modules are collected:
    alive afterwards (weakly referred to) if, and only if, the namespace is,
    and then it gives the namespace back (a ``dict`` cannot be referred to
    weakly)."""

    __slots__ = ("__weakref__", "main", "namespace")

    def __init__(self, namespace: dict[str, Any], main: bool) -> None:
        self.namespace: dict[str, Any] | None = namespace
        self.main = main


#: The name a :class:`_Mark` has in its namespace (a dunder name: never
#: cleared, never taken for the program's data).
_MARK_NAME = "__warden_exit_mark__"


def _collect_program_modules() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Takes the program's modules out of ``sys.modules``, lets go of what
    warden holds of them, and collects garbage, as CPython's finalization
    does before it clears any module. Returns the program's namespaces
    still alive after that, and those of them that are main's (its
    module's and the one its functions run in), whose modules are back in
    ``sys.modules``."""
    global _modules_at_fork
    namespaces = _program_namespaces()
    mains = _main_namespaces(namespaces)
    marks: list[weakref.ref[_Mark]] = []
    for namespace in namespaces:
        mark = _Mark(namespace, any(namespace is m for m in mains))
        namespace[_MARK_NAME] = mark
        marks.append(weakref.ref(mark))
    # The entries of sys.modules that hold one of them (main under both its
    # names), in their order. In a forked worker, only the program's entries
    # the zygote noted and those added since are read, not every entry (see
    # note_modules_before_fork).
    ids = {id(namespace) for namespace in namespaces}
    known = _modules_at_fork
    since = None if known is None else _imported_since(known)
    if known is None or since is None:
        names = list(sys.modules)
    else:
        names = [name for name, _ in known.programs] + [name for name, _ in since]
    names += [name for name in _MAIN_NAMES if name not in names]
    removed: list[tuple[str, weakref.ref[Any]]] = []
    for name in names:
        module = sys.modules.get(name)
        if module is None or id(getattr(module, "__dict__", None)) not in ids:
            continue
        try:
            removed.append((name, weakref.ref(module)))
        except TypeError:  # not a module: left where it is
            continue
        del sys.modules[name]
    # Nothing here holds them any more (nor the last module looked at).
    del namespaces, mains, ids, names, namespace, mark, module, known, since
    # What warden holds of the program: the functions its tasks named (and
    # main's namespace there), the modules its zygote noted, the namespace
    # of functions that came by value, a Process child's process object
    # (its target is the program's).
    _pickle.forget_the_programs_objects()
    _modules_at_fork = None
    _stand_in_for_the_process()
    gc.collect()
    alive = [mark for mark in (ref() for ref in marks) if mark is not None]
    # A module made before a zygote forked this worker is frozen out of the
    # collector's reach (see _zygote._before_fork), and with it what only
    # it holds: given back to the collector, as a spawned worker's
    # interpreter would collect it at exit, when something waits for it (a
    # full collection: only then).
    if alive and any(_finalizable_in(m.namespace) for m in alive) and gc.get_freeze_count():
        del alive
        gc.unfreeze()
        gc.collect()
        alive = [mark for mark in (ref() for ref in marks) if mark is not None]
    # Put back what is still alive (nothing later is to import and run a
    # module of the program again), in the order it had.
    for name, ref in removed:
        back = ref()
        if back is not None and name not in sys.modules:
            sys.modules[name] = back
        del back
    namespaces, mains = [], []
    for kept in alive:
        given = kept.namespace
        assert given is not None  # set until here
        kept.namespace = None
        if given.get(_MARK_NAME) is kept:
            del given[_MARK_NAME]
        namespaces.append(given)
        if kept.main:
            mains.append(given)
    return namespaces, mains


def _finalizable_in(namespace: dict[str, Any] | None) -> bool:
    """Whether a global of ``namespace`` (or an item of a list, tuple, set
    or dict one holds) is an object with a ``__del__``; not a file, which
    the exit path closes anyway (see :func:`_settle_files`)."""
    import _io

    if namespace is None:
        return False
    for value in list(namespace.values()):
        items = [value]
        if type(value) in (list, tuple, set, frozenset):
            items += list(value)
        elif type(value) is dict:
            items += list(value.values())
        for item in items:
            if isinstance(item, (type, _io._IOBase)):
                continue
            if getattr(type(item), "__del__", None) is not None:
                return True
    return False


def _stand_in_for_the_process() -> None:
    """In a ``Process`` child: ``multiprocessing.current_process()`` is the
    program's process object (its target, perhaps its class, the
    program's); from here on a plain one with its name, pid and
    configuration stands in for it, so that it does not keep the program's
    modules alive."""
    process = multiprocessing.process._current_process  # type: ignore[attr-defined]
    state = getattr(process, "__dict__", {})
    if type(process).__module__ == "multiprocessing.process" and not any(
        state.get(name) for name in ("_target", "_args", "_kwargs")
    ):
        return  # a worker's own: nothing of the program's
    stand_in = object.__new__(multiprocessing.process.BaseProcess)
    for name in ("_identity", "_config", "_parent_pid", "_parent_name", "_popen", "_closed", "_name"):
        if name in state:
            vars(stand_in)[name] = state[name]
    stand_in._target, stand_in._args, stand_in._kwargs = None, (), {}  # type: ignore[attr-defined]
    multiprocessing.process._current_process = stand_in  # type: ignore[attr-defined]


def _main_namespaces(namespaces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Main's namespace as its functions see it, and the module's copy of it
    (spawn's preparation runs main in a namespace of its own), among
    ``namespaces``: one object is under the same name in both. Other
    modules' are each their own."""
    mains = [namespaces[0]] if namespaces else []
    for name in _MAIN_NAMES:
        module = sys.modules.get(name)
        namespace = getattr(module, "__dict__", None)
        if (
            namespace is not None
            and any(namespace is n for n in namespaces)
            and all(namespace is not m for m in mains)
        ):
            mains.append(namespace)
    return mains


def _clear_each_name(namespaces: list[dict[str, Any]], mains: list[dict[str, Any]]) -> None:
    """Clears the globals that hold data of the program's modules still
    alive after their collection, as CPython clears such a module's, then
    collects."""
    keep = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    cleared = False
    finalizable: list[weakref.ref[Any]] = []
    for namespace in namespaces:
        # The names of objects with a __del__ first, while every other
        # global is still set; then the rest. Each group in the order
        # CPython clears a module's globals at exit: names with one leading
        # underscore first (a lazily made ``_client``), then the rest, each
        # pass in the order the names were first set; one at a time (main's
        # out of both its namespaces at once), so a __del__ still finds the
        # names not cleared yet, and the modules, functions and classes it
        # uses (never cleared).
        twins = mains if any(namespace is m for m in mains) else [namespace]
        keys = [
            k for k in list(namespace) if isinstance(k, str) and not (k.startswith("__") and k.endswith("__"))
        ]

        def order(key: str, namespace: dict[str, Any] = namespace) -> tuple[bool, bool]:
            finalized = getattr(type(namespace.get(key)), "__del__", None) is not None
            return (not finalized, not (key[:1] == "_" and key[1:2] != "_"))

        for key in sorted(keys, key=order):  # (stable)
            value = namespace.get(key)
            if value is None or isinstance(value, keep):
                continue
            if gc.is_tracked(value) and getattr(type(value), "__del__", None) is not None:
                with contextlib.suppress(TypeError):  # not weakly referable
                    finalizable.append(weakref.ref(value))
            for twin in twins:
                if twin.get(key) is value:
                    twin[key] = None
            del value
            cleared = True
    if cleared:
        gc.collect()
    # One with a __del__ still alive is in a reference cycle (or held
    # elsewhere). Made before a zygote forked this worker, the cycle is
    # frozen out of the collector's reach (see _zygote._before_fork):
    # given back to it, as a spawned worker's interpreter would collect
    # it at exit. (A full collection: only when something waits for it.
    # Asked last: get_freeze_count() walks every frozen object.)
    if any(ref() is not None for ref in finalizable) and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


def _layers(file: Any) -> list[Any]:
    """``file`` and what it wraps, outermost first (a ``TextIOWrapper``, its
    ``buffer``, that one's ``raw``)."""
    layers: list[Any] = []
    while file is not None and len(layers) < 8 and all(file is not seen for seen in layers):
        layers.append(file)
        file = getattr(file, "buffer", None) or getattr(file, "raw", None)
    return layers


def _program_namespaces() -> list[dict[str, Any]]:
    """The namespaces :func:`_clear_program_globals` finalizes."""
    # The parent's main module as the worker runs it (spawn's preparation
    # runs it in a namespace of its own, and copies that into the module,
    # which the modules below include), or the namespace of the functions
    # an interactive main sent by value.
    from ._pickle import main_namespace

    namespaces = [main_namespace()]
    known = _modules_at_fork
    modules = None if known is None else _imported_since(known)
    if modules is None:  # not forked, or sys.modules lost or changed an entry since
        installed = _installed_prefixes()
        modules = list(sys.modules.items())
    else:
        assert known is not None  # modules come from it
        installed = known.installed
        namespaces += [vars(module) for _, module in known.programs]
        # Entries the zygote had, given another module since: main's, which
        # a worker that imports main itself replaces (as spawn does).
        modules += [(name, sys.modules.get(name)) for name in _MAIN_NAMES]
    for name, module in modules:
        namespace = _program_namespace(name, module, installed)
        if namespace is not None and not any(namespace is seen for seen in namespaces):
            namespaces.append(namespace)
    return namespaces


def _installed_prefixes() -> tuple[str, ...]:
    """The directories of the interpreter and the environment: modules loaded
    from under them are not the program's."""
    # Module paths as imported (no realpath per module: at every worker's
    # exit, that would be thousands of system calls), prefixes both ways.
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    user_site = getattr(sys.modules.get("site"), "USER_SITE", None)
    if user_site:
        roots.append(user_site)
    return tuple({os.path.join(p, "") for root in roots for p in (root, os.path.realpath(root))})


def _program_namespace(name: str, module: Any, installed: tuple[str, ...]) -> dict[str, Any] | None:
    """The namespace of ``module`` if it is one of the program's own."""
    path = getattr(module, "__file__", None)
    if name == "warden" or name.startswith("warden.") or not isinstance(path, str):
        return None
    if path.startswith(installed):
        return None
    return vars(module)  # type: ignore[no-any-return]


class _ModulesAtFork:
    """What a zygote knew of its modules when it forked (see
    :func:`note_modules_before_fork`)."""

    __slots__ = ("count", "installed", "last", "last_module", "programs")

    def __init__(self) -> None:
        self.count = len(sys.modules)
        self.last = next(reversed(sys.modules), None)
        self.last_module = sys.modules.get(self.last) if self.last is not None else None
        self.installed = _installed_prefixes()
        #: The program's modules, by name.
        self.programs: list[tuple[str, Any]] = []
        for name, module in list(sys.modules.items()):
            if _program_namespace(name, module, self.installed) is not None:
                self.programs.append((name, module))


#: The entries of ``sys.modules`` a worker that imports the parent's main
#: module sets to it.
_MAIN_NAMES = ("__mp_main__", "__main__")

#: Set in a zygote before it forks, inherited by its workers.
_modules_at_fork: _ModulesAtFork | None = None


def note_modules_before_fork() -> None:
    """In a zygote, before it forks: notes which of its modules are the
    program's, and where ``sys.modules`` ends. A forked worker's exit path
    then looks only at the modules imported since (:func:`_imported_since`)
    and at main's entries, instead of at every module: reading each one
    would write its reference count, and so copy, in every worker, the
    memory page it shares with the zygote. Made again only if the zygote's
    modules changed. (An entry of the interpreter's or the environment's
    that a task points at a module of the program's is not looked at.)"""
    global _modules_at_fork
    known = _modules_at_fork
    last = next(reversed(sys.modules), None)
    if known is None or known.count != len(sys.modules) or known.last is not last:
        _modules_at_fork = _ModulesAtFork()


def _imported_since(known: _ModulesAtFork) -> list[tuple[str, Any]] | None:
    """The entries of ``sys.modules`` added since the zygote forked this
    worker, in the order imported; ``None`` if they cannot be told from the
    rest without reading every entry: an entry the zygote had was removed,
    or given another module (its last one, or one of the program's)."""
    added: list[tuple[str, Any]] = []
    try:
        # Newest first, back to the zygote's last entry: every entry before
        # it is the zygote's, and all of them are still there if it sits at
        # the position it had, with the module it had.
        for name in reversed(sys.modules):
            module = sys.modules.get(name)
            if name == known.last and module is known.last_module:
                break
            added.append((name, module))
        else:
            return None
    except RuntimeError:  # changed while read (a thread importing)
        return None
    if len(sys.modules) - len(added) != known.count:
        return None
    if any(sys.modules.get(name) is not module for name, module in known.programs):
        return None
    added.reverse()  # in the order imported, as sys.modules lists them
    return added


#: How deep :func:`_files_held` looks through what holds a file: a writer
#: function kept in a global whose closure holds a list of files is 3 deep.
_HOLDERS_DEPTH = 3
#: The most items of one list, tuple, set or dict it looks at.
_HOLDERS_WIDTH = 256


def _files_held(value: Any, files: list[Any], depth: int) -> None:
    """Adds to ``files`` the file ``value`` is, or holds in a way the
    program's globals commonly keep one without a name of its own: a
    function's closure (a writer made by a factory) or defaults, a bound
    method (``write = open(path, "a").write``), a ``functools.partial``, a
    container; ``depth`` levels deep. The interpreter's finalization frees
    them all, and each file is flushed and closed as it goes."""
    import _io
    import functools
    import itertools

    # io.IOBase's concrete base (every file object's, the pure-Python ones'
    # too): no ABC lookup for each value looked at, as io.IOBase costs.
    if isinstance(value, _io._IOBase):
        files.append(value)
        return
    if depth <= 0 or value is None or isinstance(value, (str, bytes, int, float, type, types.ModuleType)):
        return
    depth -= 1
    held: Iterable[Any] = ()
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            with contextlib.suppress(ValueError):  # empty
                cells.append(cell.cell_contents)
        held = [*cells, *(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
    elif isinstance(value, (types.MethodType, types.BuiltinMethodType)):
        held = (getattr(value, "__self__", None),)
    elif isinstance(value, functools.partial):
        held = (value.func, *value.args, *value.keywords.values())
    elif type(value) in (list, tuple, set, frozenset):
        held = itertools.islice(value, _HOLDERS_WIDTH)
    elif type(value) is dict:
        held = itertools.islice(value.values(), _HOLDERS_WIDTH)
    for item in list(held):
        _files_held(item, files, depth)


def _standard_streams() -> list[tuple[str, Any]]:
    """The standard streams the exit path flushes, named, each once: those
    the process started with (``sys.__stdout__``), then those the program
    put in their place (``sys.stdout = open(os.devnull, "w")``). What was
    printed before such a swap sits in the first; the interpreter's own
    exit flushes it as it tears the stream down, which this exit skips."""
    streams: list[tuple[str, Any]] = []
    for name in ("stdout", "stderr"):
        for stream in (getattr(sys, f"__{name}__"), getattr(sys, name)):
            if stream is not None and all(stream is not seen for _, seen in streams):
                streams.append((name, stream))
    return streams


def _settle_files(namespaces: list[dict[str, Any]], close: bool) -> None:
    """Flushes (``close``: closes) the files the globals of ``namespaces``,
    and the attributes of the classes defined there, still hold; never the
    standard streams."""
    import _io

    stdio = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
    streams = {id(layer) for std in stdio for layer in _layers(std)}
    files: list[Any] = []
    for namespace in namespaces:
        module = namespace.get("__name__")
        for value in list(namespace.values()):
            if isinstance(value, type) and value.__module__ == module:
                files.extend(v for v in list(vars(value).values()) if isinstance(v, _io._IOBase))
            else:
                _files_held(value, files, _HOLDERS_DEPTH)
    done: set[int] = set()
    for file in files:
        # Never one that is, or wraps, a standard stream (a TextIOWrapper
        # over sys.stdout.buffer: closing it closes stdout's buffer).
        if id(file) in done or any(id(layer) in streams for layer in _layers(file)):
            continue
        done.add(id(file))
        with contextlib.suppress(Exception):
            if file.closed:
                continue
            if close:
                file.close()
            else:
                file.flush()


#: How long the exit path waits for this process's resource tracker.
_TRACKER_GRACE = 2.0


def _use_parents_resource_tracker(fd: int) -> None:
    """Makes this process use its parent's ``multiprocessing`` resource
    tracker (``fd``, the write end of its pipe, passed at the start), as the
    standard library's ``spawn_main`` does in a child: what a task registers
    (a ``SharedMemory`` it creates, or only attaches to) is the parent's
    tracker's to clean up, when the program ends, never this worker's exit."""
    import multiprocessing.resource_tracker

    os.set_inheritable(fd, False)
    tracker = multiprocessing.resource_tracker._resource_tracker
    tracker._fd = fd  # type: ignore[attr-defined]
    tracker._pid = None  # type: ignore[attr-defined]  # not this process's to stop


def _stop_resource_tracker() -> None:
    """Ends a ``multiprocessing`` resource tracker this process started
    itself (a worker uses its parent's, see :func:`_use_parents_resource_tracker`,
    and starts its own only if that one is gone), and waits (briefly) until
    it has: seeing its pipe closed, it unlinks what this process registered
    and never unlinked, warning about it, as it does at the end of a program.
    It is in this process's group, which is killed as the process is reaped:
    left running, it would die before cleaning up. The parent's tracker is
    left alone: it cleans up at the end of the program."""
    module = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    pid, fd = getattr(tracker, "_pid", None), getattr(tracker, "_fd", None)
    if pid is None or fd is None:
        return  # none, or one this process did not start
    import contextlib
    import time

    with contextlib.suppress(OSError):
        os.close(fd)
    tracker._fd = None  # type: ignore[union-attr]
    deadline = time.monotonic() + _TRACKER_GRACE
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            break
        time.sleep(0.01)
    tracker._pid = None  # type: ignore[union-attr]


def _forward_logging(fd: int, levels: dict[str, int]) -> None:
    """Sends this worker's log records to the parent (``warden._logging``).

    ``logging`` costs a worker's start ``traceback``, ``re`` and more, and a
    worker whose code never imports it logs nothing: so the handler goes in
    when something imports ``logging``, or now if something already has."""
    os.set_inheritable(fd, False)
    if "logging" in sys.modules:
        from . import _logging

        _logging.forward_to_parent(fd, levels)
    else:
        global _deferred_forwarding
        _deferred_forwarding = (fd, levels)
        sys.meta_path.insert(0, _AfterImport("logging", lambda _: _forward_deferred()))


def _tell_logging(what: str) -> None:
    """Calls ``warden._logging``'s ``what`` if the worker has imported it
    (it does once its code imports ``logging``)."""
    call = getattr(sys.modules.get("warden._logging"), what, None)
    if call is not None:
        call()


def _logging_steps_aside() -> None:
    """After the worker's own code could configure logging (its initializer,
    its ``worker_context``): where it added handlers of its own, forwarding
    steps aside (``warden._logging.step_aside``)."""
    _tell_logging("step_aside")


#: The forwarding to install once ``logging`` is imported: (fd, levels).
_deferred_forwarding: tuple[int, dict[str, int]] | None = None


def _forward_deferred() -> None:
    """Installs the deferred forwarding, once ``logging`` and
    ``warden._logging`` can both be used. When it is ``warden._logging``
    itself that imports ``logging``, it is only partly initialized here: it
    calls this again as its last statement."""
    global _deferred_forwarding
    support = sys.modules.get("warden._logging")
    if support is not None and not hasattr(support, "forward_to_parent"):
        return
    pending, _deferred_forwarding = _deferred_forwarding, None
    if pending is not None:
        from . import _logging

        _logging.forward_to_parent(*pending)


#: The stop handler's code: a frame of it means the handler is running.
_ON_SIGNAL_CODE = Handler.on_signal.__code__


class _AfterImport:
    """A ``sys.meta_path`` finder for one module alone: it lets the usual
    finders find it, and once the module has run, calls ``then(module)``
    (then finds nothing more). An import of it that fails, or a look that
    imports nothing (``importlib.util.find_spec``), leaves it watching.
    It stays in ``sys.meta_path``, switched off: another thread may be going
    through the list, and would skip the finder after it, were it taken out."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name = name
        self.then = then
        self.done = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.name or self.done:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec: Any = find(name, path, target) if find is not None and finder is not self else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        watch = self

        class Loader:
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                # The module's loader is the one that found it.
                spec.loader = loader
                module.__loader__ = loader
                loader.exec_module(module)
                if not watch.done:  # (once, whichever spec it found runs)
                    watch.done = True
                    watch.then(module)

        spec.loader = Loader()
        return spec


#: Submodules a standard library pool or executor worker has imported by the
#: time it runs a task (its own machinery uses them): a program may name them
#: after a bare ``import multiprocessing`` or ``import concurrent.futures``
#: (``multiprocessing.pool.ThreadPool``,
#: ``concurrent.futures.process._RemoteTraceback``). A warden worker has no
#: use for them; each is imported when first named instead.
_STDLIB_WORKER_SUBMODULES = {
    "multiprocessing": frozenset(
        {"connection", "pool", "popen_fork", "popen_spawn_posix", "queues", "synchronize"}
    ),
    "concurrent.futures": frozenset({"process"}),
}


def _submodules_on_first_use(package: Any) -> None:
    """``package.<submodule>`` of :data:`_STDLIB_WORKER_SUBMODULES` imports
    it (a module ``__getattr__``, before the package's own if it has one)."""
    name = package.__name__
    names = _STDLIB_WORKER_SUBMODULES[name]
    previous = package.__dict__.get("__getattr__")

    def __getattr__(attr: str) -> Any:
        if attr in names:
            __import__(f"{name}.{attr}")
            return sys.modules[f"{name}.{attr}"]
        if previous is not None:
            return previous(attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    package.__getattr__ = __getattr__


def _stdlib_worker_submodules() -> None:
    """Each package of :data:`_STDLIB_WORKER_SUBMODULES` gets its submodules
    on first use: now if it is imported, else once it is."""
    for name in _STDLIB_WORKER_SUBMODULES:
        package = sys.modules.get(name)
        if package is not None:
            _submodules_on_first_use(package)
        else:
            sys.meta_path.insert(0, _AfterImport(name, _submodules_on_first_use))


def _set_parent(name: str, pid: int) -> None:
    """``multiprocessing.parent_process()`` in the worker, as under spawn; its
    sentinel is a pidfd of the parent (close-on-exec), readable once the
    parent has exited."""
    try:
        sentinel = os.pidfd_open(pid)
    except OSError:
        return
    if os.getppid() != pid:
        # The parent died before the pidfd was opened; the pid may name
        # another process now. The death signal is ending this worker anyway.
        os.close(sentinel)
        return
    multiprocessing.process._parent_process = multiprocessing.process._ParentProcess(  # type: ignore[attr-defined]
        name, pid, sentinel
    )


_os_setsid = os.setsid


def _setsid() -> None:
    """``os.setsid()`` in a worker or ``Process`` child. warden makes each the
    leader of its own process group, and the kernel refuses ``setsid()`` to a
    group leader (``PermissionError``), where a child the standard library
    spawns (in its parent's group) gets its session. So the process first
    moves to another group of its session (its parent's, or one made for the
    move where the parent's lies outside this PID namespace), then starts its
    own session, as that child would; its new group is still its own (its id
    is the process's), where warden finds what it leaves running."""
    try:
        _os_setsid()
        return
    except PermissionError:
        if os.getpgrp() != os.getpid():
            raise  # refused for another reason than leading a group
    _warden.setsid()


def _wait_for_results_read() -> None:
    """Before a task starts (its call unpickled included: that runs the
    program's code too), the parent has read the buffers the last result
    lent: the task cannot change them under the parent, and its crash
    cannot lose them with this process's memory. (The standard library's
    worker likewise waits, on a full pipe, until the parent takes a large
    result.) For as long as it takes: a task that began sooner could
    refill an array the result lent, and the parent would read the next
    task's data as this result. The parent reads every result it is sent,
    or closes it unread as its pool ends; a parent gone takes this worker
    with it; a stop (a terminate, a cancel) interrupts the wait as it would
    the task."""
    if _oob.wait_for_readers(every=True, timeout=0, results=True):
        return
    # The pool counts the task's time from the last result: not while it
    # waits (the parent may be slow to read, its results thread held by a
    # callback).
    with contextlib.suppress(RuntimeError):  # the channel is gone: the pool hears no more
        _warden.task_clock(False)
    if not _oob.wait_for_readers(every=True, timeout=_loan_wait(), results=True):
        # Said once: a program whose results thread waits for this worker's
        # next task (a callback waiting for another future) waits for ever,
        # as the standard library's does.
        say(
            f"warden: worker {os.getpid()}: the parent has not read its last result "
            f"for {_loan_wait():.0f} s (a callback holding up its results thread?); "
            "the next task waits for it"
        )
        _oob.wait_for_readers(every=True, timeout=None, results=True)
    with contextlib.suppress(RuntimeError):
        _warden.task_clock(True)


#: Seconds a start may spend importing the program's main module (and what
#: the pool's hooks name) before the process says where it is waiting.
_SLOW_IMPORT_NOTICE = 10.0


@contextlib.contextmanager
def notice_if_slow(who: str, what: str, watch: bool = True) -> Iterator[None]:
    """Runs the body (an import of the program's code at a worker's start);
    if ``watch`` and it lasts over ``WARDEN_SLOW_IMPORT_NOTICE`` seconds (10;
    ``0`` or ``inf``: never), writes once to stderr what the process is doing and where
    its main thread waits, and lets it go on. A main module that waits at
    import (a single-instance lock, ``input()``, a server it connects to)
    otherwise stalls every worker's start in silence: each imports it again,
    as under the standard library's spawn.

    It watches from a thread of its own, which has ended (its kernel task
    too) when this returns, so a zygote is single-threaded again before it
    forks. Not a signal: a timer's ``SIGALRM`` would reach a handler the
    program sets at import, and interrupt the system calls of a slow but
    healthy import in C code that does not retry them. (Under an
    address-space limit the thread takes no malloc arena of its own: see
    ``keep_to_one_arena_under_an_address_space_limit`` in the core.)"""
    try:
        after = float(os.environ.get("WARDEN_SLOW_IMPORT_NOTICE", _SLOW_IMPORT_NOTICE))
    except ValueError:
        after = _SLOW_IMPORT_NOTICE
    # (``inf``, or anything a wait cannot take, is never too.)
    if not (watch and 0 < after < threading.TIMEOUT_MAX):
        yield
        return
    # A raw thread and raw locks, made now: the import may monkey-patch
    # ``threading`` (gevent), and a ``threading.Thread`` started before that
    # ends after it with the patched bookkeeping (``KeyError`` on stderr).
    # (The original ones where gevent patched them already: a module the
    # zygote preloaded that patches.)
    done = _native.Lock()
    done.acquire()  # released as the body ends
    ended = _native.Lock()
    ended.acquire()  # released as the watcher's last act
    native: list[int] = []
    main = _native.original("get_ident")()

    def notice() -> None:
        try:
            native.append(_thread.get_native_id())
            watch_the_import()
        finally:
            ended.release()

    def watch_the_import() -> None:
        if done.acquire(timeout=after):
            return
        import traceback  # only when there is something to say

        frame = sys._current_frames().get(main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        # From the program's first frame: what warden and the standard
        # library's spawn did to get there says nothing.
        machinery = (
            os.path.dirname(__file__) + os.sep,
            os.path.dirname(multiprocessing.__file__ or "") + os.sep,
            "<frozen ",
        )
        ours = [i for i, f in enumerate(stack) if f.filename.startswith(machinery)]
        first = ours[-1] + 1 if ours and ours[-1] < len(stack) - 1 else 0
        where = "".join(traceback.format_list(stack[first:]))
        say(
            f"warden: {who} {os.getpid()} has been {what} for {after:g} s and still waits, at "
            f"(most recent call last):\n{where}"
            "warden: every worker imports the program's main module, as under the standard "
            "library's spawn: code that waits at its top level (a lock, input(), a connection) "
            'belongs under `if __name__ == "__main__":`'
        )

    try:
        _native.original("start_new_thread")(notice, ())
    except RuntimeError:  # no thread to spare (`ulimit -u`): the start goes on without the notice
        yield
        return
    try:
        yield
    finally:
        done.release()
        ended.acquire()
        # Its last act done, its kernel task may still be on its way out,
        # and a zygote that counts its threads before it forks must not see
        # it (bounded: it is past its last line).
        # (None to wait for if it could not say, or was a greenlet after all.)
        if native and native[0] != os.getpid():
            task = f"/proc/self/task/{native[0]}"
            deadline = time.monotonic() + 1.0
            while os.path.exists(task) and time.monotonic() < deadline:
                time.sleep(0.0001)


def _enable_faulthandler() -> None:
    """A worker or child that dies of a fatal signal (a segfault in an
    extension, an abort) writes the Python traceback of each of its threads
    to its stderr first, so the program learns where: ``faulthandler``, as
    loky's workers enable it. ``WARDEN_FAULTHANDLER=0`` leaves it off (as
    the standard library's workers have it, unless ``-X faulthandler``)."""
    if os.environ.get("WARDEN_FAULTHANDLER", "1") == "0":
        return
    import faulthandler

    if faulthandler.is_enabled():
        return
    # No usable stderr (closed, or an object with no fd): nothing to write to.
    with contextlib.suppress(Exception):
        faulthandler.enable(_stderr_that_never_blocks() or sys.stderr, all_threads=True)


def _stderr_that_never_blocks() -> int | None:
    """Where stderr is a pipe (or a FIFO), a descriptor of it for
    ``faulthandler`` that never blocks: an open file description of its own
    (opened again through ``/proc``, so that stderr itself stays blocking),
    non-blocking and close-on-exec. A full pipe whose reader has stopped
    reading would otherwise hold a worker that crashed in its fatal signal's
    handler for ever, where it should die of that signal; its traceback is
    cut short instead. ``None`` elsewhere (a file or a terminal does not
    fill; a socket cannot be opened again). (Not moved to a high number: a
    larger descriptor table costs a threaded process a wait for the kernel's
    RCU grace period, about 10 ms of each worker's start.)"""
    import stat

    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return None
        return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def main() -> None:
    """Runs this process as a warden worker; never returns."""
    os.setsid = _setsid
    # The worker variables leave the environment first, through Python's own
    # API (so os.environ and the C environment agree), so that processes the
    # tasks start are not mistaken for workers.
    variables = {key: os.environ.pop(key) for key in _warden.WORKER_VARIABLES if key in os.environ}
    handler = Handler()
    global _startup_sigint
    _startup_sigint = signal.getsignal(signal.SIGINT)
    if _startup_sigint is None:  # not set from Python: what a fresh interpreter has
        _startup_sigint = signal.default_int_handler
    # Installed before the core's handlers, which chain to them. Blocked
    # until those are in place too (the core unblocks them then): a stop
    # signal in between would otherwise reach only this one, and read as a
    # start that failed instead of a stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler.on_signal)
    # The core ignores these (a read of the terminal fails instead of
    # stopping the worker for ever): said through Python too, so that
    # signal.getsignal() tells a task so, and a task that sets a handler of
    # its own and then the one it had back sets SIG_IGN back, not SIG_DFL.
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    _warden.worker_main(handler, variables)
