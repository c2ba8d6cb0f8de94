"""Large buffers travel beside the pickle, in one shared-memory segment.

Pickle protocol 5 lets an object hand its buffer to the pickler *out of
band* (``bytearray``, ``pickle.PickleBuffer``, numpy arrays and anything
built on ``PickleBuffer``); warden also sends large ``bytes`` that way. The
buffers of one task (or one result) of at least :data:`INLINE_LIMIT` bytes
are written one after the other into an anonymous memory file (``memfd``),
which is sealed and passed to the other process over the worker channel with
``SCM_RIGHTS``; the pickle itself, and smaller buffers, stay in the frame.
The receiver maps the segment copy-on-write and unpickles with those buffers:

* a numpy array (or any ``PickleBuffer`` user) is rebuilt **on** the mapping,
  without a copy, writable (its writes stay private to this process), a
  numpy array that was read-only in the sender too (:func:`unpickle`: as
  under the standard library's protocol 4, every array received is
  writable and its own; a read-only one that came inline costs a copy);
  the mapping lives as long as the arrays built on it (a small array beside
  one at least four times its size is copied out of it first, so that
  keeping it does not keep that one: ``_warden.SegmentBuffer.alone``);
* ``bytes`` and ``bytearray`` are copied out of the mapping once (they own
  their memory in CPython);
* a segment of at most :data:`COPY_MAX` bytes is not mapped at all: its
  buffers are read into ``bytearray`` objects of their own, so that small
  results kept by the thousand do not each keep a mapping (the kernel
  allows a process ``vm.max_map_count`` of them, 65 530 by default).

Lending instead of copying: where the kernel lets the receiver read the
sender's memory (see :func:`may_lend`), the buffers of a call or a result
whose exporters cannot be resized under the reader (``bytes``, numpy arrays)
are *lent*: the sender keeps them alive and sends, in place of a segment,
the read end of a pipe holding a table of their addresses; the receiver
copies them into its own fresh memory with ``process_vm_readv``
(``_warden.read_remote``: one copy each way, no ``memfd`` pages to allocate
and zero; a ``bytes`` is read straight into the new object) and closes the
pipe. The sender holds the buffers until every reader of the pipe is gone
(:class:`_Lender`: a thread waits for the pipe's error state): for a call,
the core keeps its copy of the read end until the task has an outcome, so a
task given back and sent to another worker can still be read; for a
result, the parent reads it as soon as it arrives, before the result is
handed to anyone. A call's buffers are let go sooner, when its task has an
outcome or is cancelled, before its future has it (:class:`Loan`, which
``_runner`` releases): the caller may close what they came from (an
``mmap``) once it has the result, while the pipe and the core's copy of it
are still being closed. A worker that lent a result's buffers waits until
the parent has read them before it starts its next task, so the result is
what the function returned, as with a copy, and a crash of the next task
cannot take it with the worker's memory.

Layout of a segment (little endian, every buffer 64-byte aligned)::

    "WDSG" | u32 count | count * (u64 offset, u64 length) | ... buffers ...

Lifetime: the segment is a memfd, never a name in ``/dev/shm``; it lives
while an fd or a mapping refers to it. The sender closes its fd once the
task has an outcome (the core owns it until then), the receiver closes its
fd as soon as it has mapped it (``_warden.map_segment``, which keeps no fd
open for the mapping), and the kernel closes what a dead process
held, including fds still in flight in a closed socket. So every exit path
(crash, timeout, shutdown, SIGKILL of either side) releases it.

A segment has its own size limit (:data:`MAX_SEGMENT`, environment variable
``WARDEN_MAX_SEGMENT``, in bytes); a larger one is refused with
:class:`SegmentTooLarge` before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import itertools
import os
import pickle
import re
import select
import stat
import struct
import threading
import time

from . import _native

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: Buffers smaller than this stay inline in the frame (see docs/benchmarks.md);
#: ``WARDEN_INLINE_LIMIT`` (bytes) changes it, for measurements.
INLINE_LIMIT = int(os.environ.get("WARDEN_INLINE_LIMIT", str(64 << 10)))
#: The largest segment a process sends or accepts (default 16 GiB).
MAX_SEGMENT = int(os.environ.get("WARDEN_MAX_SEGMENT", str(16 << 30)))
#: A pickle larger than this travels beside the frame too, as the last of
#: its buffers, not in it: a frame has a size limit (256 MiB by default), the
#: standard library's pickles none. ``WARDEN_PICKLE_INLINE_MAX`` (bytes)
#: changes it, for tests.
PICKLE_INLINE_MAX = int(os.environ.get("WARDEN_PICKLE_INLINE_MAX", str(32 << 20)))
#: What the frame holds in place of a pickle that travels beside it.
_PICKLE_BESIDE = b"WDPK"

_MAGIC = b"WDSG"
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<QQ")
_ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class SegmentTooLarge(ValueError):
    """The out-of-band buffers of a call or a result exceed the segment limit."""


class SegmentError(ValueError):
    """A segment received from another process is not one warden made."""


#: Lend buffers where the kernel allows it; ``WARDEN_LEND_BUFFERS=0`` always
#: copies them into segments.
LEND = os.environ.get("WARDEN_LEND_BUFFERS", "1") != "0"

_LEND_MAGIC = b"WDLN"
_LEND_HEAD = struct.Struct("<4sII")
_LEND_ENTRY = struct.Struct("<QQQ")
#: The largest table of lent buffers: it must fit in a pipe that nobody reads
#: yet (one page, the smallest a pipe gets when a user has too many).
_LEND_TABLE_MAX = 4096


def _bytes_from(buffer: Any) -> bytes:
    """Rebuilds a ``bytes`` sent out of band: one copy out of the mapping
    (see ``_warden.copy_to_bytes``), none if it was lent (read into a new
    ``bytes`` already)."""
    if type(buffer) is bytes:
        return buffer
    from . import _warden

    return _warden.copy_to_bytes(buffer)


def _bytearray_from(buffer: Any) -> bytearray:
    """Rebuilds a ``bytearray`` sent out of band (one copy out of the mapping)."""
    from . import _warden

    return _warden.copy_to_bytearray(buffer)


def _memoryview_from(buffer: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    """Rebuilds a ``memoryview``: on the mapping itself (no copy) when it came
    out of band, on a ``bytes`` or ``bytearray`` when it came inline."""
    from . import _warden

    if type(buffer) is _warden.SegmentBuffer:
        buffer = buffer.alone()
    view = memoryview(buffer).cast("B")
    if readonly:
        view = view.toreadonly()
    return view.cast(fmt, shape) if (fmt, shape) != ("B", (view.nbytes,)) else view  # type: ignore[call-overload]


def _picklebuffer_from(buffer: Any, readonly: bool) -> bytes | bytearray:
    """What the standard pickler makes of a ``PickleBuffer`` it keeps inline:
    ``bytes`` if it was read-only, else ``bytearray`` (one copy)."""
    return _bytes_from(buffer) if readonly else _bytearray_from(buffer)


class _Wrapped:
    """A ``bytes``, ``bytearray``, ``PickleBuffer`` or contiguous
    ``memoryview`` the standard pickler would copy inline (or refuse, for
    ``memoryview``), offered as a ``PickleBuffer`` so that it can travel out
    of band, and rebuilt as the same type."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> Any:
        obj = self.obj
        if type(obj) is bytes:
            return (_bytes_from, (pickle.PickleBuffer(obj),))
        if type(obj) is bytearray:
            return (_bytearray_from, (pickle.PickleBuffer(obj),))
        if type(obj) is pickle.PickleBuffer:
            # A new PickleBuffer: the pickler would take this one for the
            # object it stands in for again.
            return (_picklebuffer_from, (pickle.PickleBuffer(obj), memoryview(obj).readonly))
        return (_memoryview_from, (pickle.PickleBuffer(obj), obj.format, obj.shape, obj.readonly))


class _Unsendable:
    """A ``memoryview`` the receiver could not rebuild as it is (see
    :func:`_rebuildable`): pickling it raises ``TypeError``, as the standard
    pickler refuses every ``memoryview`` (``cloudpickle`` would send its
    bytes alone, and the task would get a ``bytes`` of another length)."""

    __slots__ = ("obj",)

    def __init__(self, obj: memoryview) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> Any:
        view = self.obj
        order = "" if view.c_contiguous else "not in C order, "
        raise TypeError(
            f"cannot pickle memoryview objects of format {view.format!r} and shape {view.shape} "
            f"({order}only C-ordered views of a native single-character format and no empty "
            "dimension travel; send the exporter itself, e.g. the numpy array)"
        )


def reduce_memoryview(view: memoryview) -> Any:
    """The pickler's reducer for a ``memoryview`` that :func:`prepare` did
    not meet (deeper than it looks: a ``starmap`` chunk's argument tuples,
    a dict in a list in a result): rebuilt as the same ``memoryview``, its
    bytes out of band if large, as one it met is; ``TypeError`` for one no
    receiver could rebuild. (``cloudpickle`` would send its bytes alone.)"""
    if _rebuildable(view):
        return _Wrapped(view).__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return _Unsendable(view).__reduce_ex__(pickle.HIGHEST_PROTOCOL)


#: Containers looked into by :func:`prepare`, and how far.
_DEPTH = 3
_MAX_LEN = 256


#: The types :func:`prepare` looks at: buffers, and the containers it looks into.
_SEEN: frozenset[type] = frozenset({bytes, bytearray, memoryview, pickle.PickleBuffer, tuple, list, dict})


def prepare(obj: Any, depth: int = _DEPTH) -> dict[int, Any] | None:
    """Finds the large ``bytes`` and ``bytearray``, every ``PickleBuffer``
    and every ``memoryview`` in ``obj`` that should travel out of band: the
    object itself and what it holds in tuples, lists and dict values, three
    levels deep (a task's ``(fn, args, kwargs)``, a map chunk, a result), in
    containers of at most 256 items. Buffers deeper down are pickled as the
    standard library does. Everything else is passed over at the cost of a
    type check (this runs on every task).

    Returns what to pickle in their place, by ``id`` (a :class:`_Wrapped`,
    or an :class:`_Unsendable` for a ``memoryview`` no receiver could
    rebuild as it is), for :func:`dumps` to give the pickler as its
    ``persistent_id``; ``None`` if there is nothing. Nothing is copied or
    rebuilt: the pickler meets the objects where they are, so what pickle
    shares stays shared however it is reached (a list held by the call and
    by an attribute of another argument arrives as one list, and ``[b] *
    200`` as one ``bytes``)."""
    found: dict[int, Any] = {}
    _find(obj, depth, found, set())
    return found or None


def _rebuildable(view: memoryview) -> bool:
    """Whether :func:`_memoryview_from` rebuilds ``view`` as it is: its
    bytes in C order (a Fortran-order view's are not: its elements would
    arrive reordered), and a format and shape ``memoryview.cast`` takes (a
    native single-character format, no zero in the shape). Tried on the view
    itself, without a copy."""
    if not view.c_contiguous:
        return False
    if view.format == "B" and view.shape == (view.nbytes,):
        return True  # rebuilt without a cast
    try:
        view.cast("B").cast(view.format, view.shape)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return True


def _find(obj: Any, depth: int, found: dict[int, Any], seen: set[int]) -> None:
    t = type(obj)
    if t is bytes or t is bytearray:
        if len(obj) < INLINE_LIMIT:
            return
        wrap: Any = _Wrapped
    elif t is memoryview:
        wrap = _Wrapped if _rebuildable(obj) else _Unsendable
    elif t is pickle.PickleBuffer:
        wrap = _Wrapped
    else:
        if t not in _SEEN or not depth or len(obj) > _MAX_LEN or id(obj) in seen:
            return
        seen.add(id(obj))
        for x in obj.values() if t is dict else obj:
            if type(x) in _SEEN:
                _find(x, depth - 1, found, seen)
        return
    # A buffer: one stand-in, however often it is met, which the pickler
    # memoizes: the receiver gets one object. (Out of band, pickle would
    # hand the receiver a memoryview for a PickleBuffer; the stand-in keeps
    # the standard library's bytes or bytearray instead.)
    if id(obj) not in found:
        found[id(obj)] = wrap(obj)


def persistent_id(found: dict[int, Any]) -> Callable[[Any], Any]:
    """The pickler's ``persistent_id`` for what :func:`prepare` found: the
    stand-in of each such object, pickled in its place (and read back as
    itself by the receiver's ``persistent_load``, see :class:`_Unpickler`)."""
    get = found.get

    def stand_in(obj: Any) -> Any:
        return get(id(obj))

    return stand_in


class Collector:
    """Decides, buffer by buffer, what leaves the pickle: given to the
    pickler as ``buffer_callback``; large ``bytes`` are offered to it through
    :func:`prepare`."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[pickle.PickleBuffer] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: the pickler copies it inline
            return True
        if size < INLINE_LIMIT:
            return True
        self.buffers.append(buffer)
        return False


def dumps(
    obj: Any,
    pickler: Callable[[io.BytesIO, Callable[[pickle.PickleBuffer], bool]], pickle.Pickler],
    *,
    to_parent: bool = False,
    check: Callable[[bytes], object] | None = None,
    lend: bool = True,
    found: dict[int, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Pickles ``obj`` with ``pickler(file, buffer_callback)``. Returns the
    pickle and the fd that carries its out-of-band buffers (the caller owns
    it): the read end of a lending table (a :class:`LentFd`, whose ``loan``
    the caller releases once the task has an outcome), or a sealed segment; ``None`` when
    everything is inline. ``to_parent``: the receiver is the parent of this
    process (a result), not a child (a call). ``check(pickle)`` may refuse
    the pickle by raising, before any buffer is lent or copied. ``lend=False``
    copies the buffers into a segment even where they could be lent.
    ``found``: what :func:`prepare` found in ``obj``, pickled in its place. When
    this process is short of file descriptors (:func:`fds_scarce`), a payload
    of at most :data:`INLINE_FALLBACK_MAX` bytes is pickled inline instead,
    and a larger call waits for one to come free (see :data:`FDS_WAIT`).
    A pickle larger than :data:`PICKLE_INLINE_MAX` goes with the buffers
    (the last), and the frame says so (see :func:`unpickle`)."""
    out = io.BytesIO()
    collector = Collector()
    _dump(pickler(out, collector), obj, found)
    data = out.getvalue()
    if check is not None:
        check(data)
    if len(data) <= PICKLE_INLINE_MAX and not collector.buffers:
        return data, None

    def in_band() -> bytes:
        out = io.BytesIO()
        _dump(pickler(out, _in_band), obj, found)
        data = out.getvalue()
        if check is not None:
            check(data)
        return data

    return _carry(data, collector.buffers, to_parent, lend, in_band)


def segment_for_starts(data: bytes, buffers: list[pickle.PickleBuffer]) -> tuple[bytes, int] | None:
    """Copies ``buffers`` (and ``data``, the pickle, the last of them if it
    is over :data:`PICKLE_INLINE_MAX`) into one sealed segment, for what a
    child is started with: a pool's initializer and its arguments, which
    every worker it starts maps (the pool keeps the segment for its life,
    and passes it to each worker as it starts, restarts included), or a
    ``Process``'s target and arguments. Never lent: the parent's objects
    may change, or go, before a later worker starts. Returns what the
    pickle's place holds and the segment's fd (the caller owns it), or
    ``None`` where no segment can be made (no descriptor or memory left, a
    file size limit, ``memfd_create`` refused): the caller pickles inline.
    ``SegmentTooLarge`` over :data:`MAX_SEGMENT`."""
    head = data
    if len(data) > PICKLE_INLINE_MAX:
        buffers = [*buffers, pickle.PickleBuffer(data)]
        head = _PICKLE_BESIDE
    try:
        fd = make_segment(buffers)
    except OSError as e:
        if e.errno not in _NO_ROOM:
            raise
        return None
    # The caller's from here on, as a plain number: it goes into the init
    # message, and to the core, which keeps it as long as it starts children.
    return head, int(fd.take())


def beside(data: bytes, *, to_parent: bool = False, lend: bool = True) -> tuple[bytes, int | None]:
    """What :func:`dumps` returns for ``data``, a finished pickle larger
    than :data:`PICKLE_INLINE_MAX` with no buffers out of band (a huge
    string): the pickle goes beside its frame, as the only buffer, without
    pickling the object again."""
    return _carry(data, [], to_parent, lend, lambda: data)


def _carry(
    data: bytes,
    buffers: list[pickle.PickleBuffer],
    to_parent: bool,
    lend: bool,
    in_band: Callable[[], bytes],
) -> tuple[bytes, int | None]:
    """Lends ``buffers`` (and ``data``, the pickle, the last of them if it is
    over :data:`PICKLE_INLINE_MAX`) or copies them into a segment; see
    :func:`dumps`. ``in_band()`` pickles everything inline, for when no
    descriptor can carry them."""
    if len(data) > PICKLE_INLINE_MAX:
        buffers = [*buffers, pickle.PickleBuffer(data)]
        head = _PICKLE_BESIDE
        inline_ok = False
    else:
        head = data
        inline_ok = sum(b.raw().nbytes for b in buffers) + len(data) <= INLINE_FALLBACK_MAX
    # A call too large to go inline (each call a copy) waits, while this
    # process is short of descriptors, for the calls in flight to give theirs
    # back as workers take them, rather than take the reserve the pool needs
    # to start workers and read results. A result takes one anyway: what
    # holds a worker's descriptors is its own task, which waiting would not
    # end.
    spare = inline_ok or not to_parent
    waited_since = None
    while True:
        try:
            if lend and may_lend(to_parent):
                fd = _lend(buffers, to_parent=to_parent, spare=spare)
                if fd is not None:
                    return head, fd
            return head, make_segment(buffers, spare=spare)
        except _FdsScarce:
            if inline_ok or getattr(_results_thread, "on", False):
                # A pool's results thread (a callback making the call) cannot
                # wait: its own delivery of outcomes gives descriptors back.
                # Nor may it take from the reserve, one per call of a
                # callback that makes many: the call goes inline, as the
                # standard library sends it (or fails, over the frame limit).
                break
            if calls_holding_fds() == 0:
                # No call of this process holds one: none will come free by
                # waiting (what fills the table is the program's own, or the
                # pools'). This one takes a descriptor from the reserve.
                spare = False
                continue
            now = time.monotonic()
            if waited_since is None:
                waited_since = now
            elif now - waited_since > FDS_WAIT:
                raise OSError(
                    errno.EMFILE,
                    f"no file descriptor came free within {FDS_WAIT:.0f} s for a call of "
                    f"more than {INLINE_FALLBACK_MAX >> 20} MiB: this process uses the descriptors "
                    "its pools keep for starting workers and reading results (the last quarter of "
                    "ulimit -n, at least 32), by itself or with the large calls in flight",
                ) from None
            time.sleep(0.01)
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            break
    # This process is short of file descriptors, or cannot make the pipe or
    # segment at all (no descriptor left, a file size limit, no memory for
    # it, memfd refused): the buffers go in the pickle, as the standard
    # library sends them.
    return in_band(), None


def _dump(p: pickle.Pickler, obj: Any, found: dict[int, Any] | None) -> None:
    if found is not None:
        p.persistent_id = persistent_id(found)  # type: ignore[method-assign]
    p.dump(obj)


#: ``on`` is set in a pool's results thread (see :func:`results_thread`).
_results_thread = threading.local()


def results_thread() -> None:
    """Marks this thread as a pool's results thread: a call made in it (by a
    callback) while this process is short of descriptors does not wait for
    one to come free, since outcomes this thread delivers are what lets them
    go: it goes inline."""
    _results_thread.on = True


#: How many calls of this process are in flight with a descriptor for their
#: buffers (a segment or a lending pipe), counted by the pools as they queue
#: such a call and as it gets its outcome (see ``_runner``).
_calls_holding = 0
_calls_holding_lock = threading.Lock()


def call_holds_fd(change: int, holder: Any = None) -> None:
    """A pool queued (``+1``) a call with a descriptor for its buffers, or
    it got its outcome (``-1``), which lets that descriptor go. ``holder``
    (the call's outcome callback) gets this process's id as its ``held``
    in the same step."""
    global _calls_holding
    pid = os.getpid()
    with _calls_holding_lock:
        _calls_holding += change
        if holder is not None:
            holder.held = pid


def calls_holding_fds() -> int:
    """How many calls in flight hold a descriptor: a large call waits for
    one of theirs while this process is short of them, and only then."""
    return _calls_holding


def _forget_calls_holding() -> None:
    global _calls_holding, _calls_holding_lock
    _calls_holding_lock = threading.Lock()  # a thread of the original may have held it
    _calls_holding = 0  # the copy's pools are its own; the original's calls are not
    _results_thread.on = False  # a copy made in a callback: its thread delivers nothing


os.register_at_fork(after_in_child=_forget_calls_holding)


#: The largest payload :func:`dumps` puts inline when this process is short
#: of file descriptors; a larger one waits for one (up to :data:`FDS_WAIT`).
INLINE_FALLBACK_MAX = 64 << 20

#: How long :func:`dumps` waits, in seconds, for a descriptor to come free
#: for a call larger than :data:`INLINE_FALLBACK_MAX` while this process
#: is short of them, before it raises ``OSError(EMFILE)``.
FDS_WAIT = 60.0


#: Why a segment or a lending pipe could not be made that sending the
#: buffers inline avoids: no descriptor left in this process (``EMFILE``) or
#: the system (``ENFILE``), a file size limit (``RLIMIT_FSIZE``, which counts
#: a memfd: ``EFBIG``), no room for its pages (``ENOSPC``, ``ENOMEM``), or
#: ``memfd_create`` refused (a sandbox's seccomp filter: ``EPERM``,
#: ``EACCES``; a kernel without it: ``ENOSYS``).
_NO_ROOM = frozenset({errno.EMFILE, errno.ENFILE, errno.EFBIG, errno.ENOSPC, errno.ENOMEM}) | frozenset(
    {errno.EPERM, errno.EACCES, errno.ENOSYS}
)


class _FdsScarce(Exception):
    """A new fd came from the top of this process's descriptor table."""


def _in_band(buffer: pickle.PickleBuffer) -> bool:
    return True


def fds_scarce(fd: int) -> bool:
    """Whether ``fd``, just made, says this process is running out of file
    descriptors: the core's rule (``_warden.fds_scarce``: a new fd gets the
    lowest free number, so one within a quarter of the soft limit of it
    means at most that many are left), by which the pool also reads
    results. Every call or result in flight with large buffers holds one
    until it is read (a lent one two, in its sender): thousands submitted at
    once would otherwise use up the limit (1 024 by default on most
    systems), and with it the descriptors the pool needs to receive results
    and start workers."""
    from . import _warden

    return _warden.fds_scarce(fd)


def _check_size(size: int) -> None:
    if size > MAX_SEGMENT:
        raise SegmentTooLarge(
            f"out-of-band buffers of {size} bytes exceed the shared segment limit of {MAX_SEGMENT} bytes "
            "(set WARDEN_MAX_SEGMENT to raise it)"
        )


_may_lend: dict[bool, tuple[int, bool]] = {}


def may_lend(to_parent: bool) -> bool:
    """Whether buffers may be lent to the parent (``to_parent``) or to a
    child: Yama's ``ptrace_scope`` is 0 (or 1, which lets only an ancestor
    read: the parent), this process is dumpable, and ``process_vm_readv``
    works here (a seccomp filter may refuse it). Decided once per process,
    but for whether it is dumpable, asked each time: a task may have made
    its worker not dumpable (``prctl(PR_SET_DUMPABLE, 0)``, or a change of
    user or group, which does that too), and a program its own process."""
    if not LEND:
        return False
    pid = os.getpid()
    known = _may_lend.get(to_parent)
    if known is not None and known[0] == pid:
        allowed = known[1]
    else:
        allowed = _lending_works(1 if to_parent else 0)
        _may_lend[to_parent] = (pid, allowed)
    if not allowed:
        return False
    from . import _warden

    return _warden.is_dumpable()


def _lending_works(max_scope: int) -> bool:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", "rb") as f:
            scope = int(f.read())
    except FileNotFoundError:
        scope = 0  # no Yama: the classic rules (same user, dumpable)
    except (OSError, ValueError):
        return False
    if scope > max_scope:
        return False
    from . import _warden

    if not _warden.is_dumpable():
        return False
    probe = os.urandom(64)
    try:
        address, size = _warden.buffer_address(probe)
        return _warden.read_remote(os.getpid(), [(address, size, _warden.LENT_BYTES)], size) == [probe]
    except OSError:
        return False


def _lent_kind(view: memoryview) -> int | None:
    """How a lent buffer is rebuilt, or ``None`` if it cannot be lent: its
    exporter must keep its memory where it is while we hold an export
    (``bytes``; numpy arrays, which refuse to resize while referenced)."""
    from . import _warden

    t = type(view.obj)
    if t is bytes:
        return _warden.LENT_BYTES
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        return _warden.LENT_RAW
    return None


def _lend(buffers: list[pickle.PickleBuffer], to_parent: bool, spare: bool = False) -> LentFd | None:
    """Lends ``buffers``: returns the read end of a pipe holding their
    table, or ``None`` if one of them cannot be lent (the caller copies them
    into a segment). They are held until every reader of the pipe is gone,
    or until their :class:`Loan` is released.
    ``to_parent``: they are a result's, lent to the parent (what
    :func:`wait_for_readers` waits for before a worker's next task).
    ``spare``: raises :class:`_FdsScarce` instead if the pipe's fds
    say this process is short of them (see :func:`fds_scarce`)."""
    from . import _warden

    views = [b.raw() for b in buffers]
    entries = []
    mutable = False
    total = 0
    for view in views:
        kind = _lent_kind(view)
        if kind is None:
            return None
        mutable = mutable or kind != _warden.LENT_BYTES
        address, size = _warden.buffer_address(view)
        entries.append(_LEND_ENTRY.pack(address, size, kind))
        total += size
    _check_size(total)
    table = _LEND_HEAD.pack(_LEND_MAGIC, os.getpid(), len(entries)) + b"".join(entries)
    if len(table) > _LEND_TABLE_MAX:
        return None
    pid = os.getpid()
    made: list[tuple[int, int]] = []
    fd = lender = None
    try:
        _made_by_c(made, os.pipe)
        r, w = made[0]
        # From ``owner`` on, the read end is its LentFd's: closed by it, once,
        # wherever the call stops on its way to the core (see CarriedFd).
        fd = LentFd(r)
        fd.owner = pid
        if spare and fds_scarce(max(r, w)):
            raise _FdsScarce
        os.set_blocking(w, False)
        if os.write(w, table) != len(table):
            raise BlockingIOError
        loan = Loan(views, mutable, to_parent)
        lender = _lender()
        lender.hold(w, loan)
        fd.loan = loan
    except BaseException as e:
        if not made:
            raise  # no pipe (EMFILE: the caller sends the buffers inline)
        r, w = made[0]
        # A Ctrl-C (a signal handler's error) may come once the lender has
        # the write end: then it is the lender's to close, not ours.
        if lender is None:
            _native.close(w)
        else:
            lender.close_unless_held(w)
        if fd is None or not fd.owner:
            _native.close(r)
        else:
            fd.close()
        if isinstance(e, (OSError, RuntimeError)):
            # The pipe could not be written, or there is no thread to hold
            # the loan (none can be started): the buffers are copied instead.
            return None
        raise
    return fd


class Loan:
    """The buffers of one lending table, held for its readers. The lender
    thread lets them go when the last reader is gone; the parent lets a
    call's go as soon as its task has an outcome (:meth:`release`), before
    the caller can see it: nobody reads them after that, and the caller
    must be able to close or change what they came from (an ``mmap`` that
    refuses to close while exported) once it has the result."""

    __slots__ = ("lock", "mutable", "to_parent", "views")

    def __init__(self, views: list[memoryview], mutable: bool, to_parent: bool) -> None:
        self.lock = threading.Lock()
        self.views = views
        #: One of the buffers can be changed (a numpy array).
        self.mutable = mutable
        #: A result's, lent to the parent.
        self.to_parent = to_parent

    def release(self) -> None:
        """Lets go of the buffers now (the pipe stays with the lender thread,
        which closes it when its readers are gone). Returns once they are
        let go, whichever thread does it: under this loan's own lock, not the
        lender's, which what letting go of a buffer frees may need."""
        with self.lock:
            for view in self.views:
                with contextlib.suppress(BufferError):  # still exported: let it go with its last user
                    view.release()
            self.views = []


def _made_by_c(into: list[Any], make: Callable[[], Any]) -> None:
    """Appends ``make()`` (``os.pipe``, ``os.memfd_create``: new fds) to
    ``into``, with no step of Python's between the two: the call is made
    from C (an iterator's ``extend``), so a signal handler (a Ctrl-C's
    ``KeyboardInterrupt``), which runs only between Python's steps, finds
    the new fds in ``into``, never only on the evaluation stack, where the
    error would drop them unclosed."""
    into.extend(itertools.islice(iter(make, None), 1))


class CarriedFd(int):
    """What :func:`dumps` returns for the fd that carries a call's or a
    result's out-of-band buffers (a sealed segment, or a lending table's
    read end): an ``int``, the fd's number, that owns the fd until it is
    handed on (:meth:`take`, by whoever gives it to the core) or closed
    (:meth:`close`). Dropped while it still owns the fd, it closes it: a
    Ctrl-C (or any error) that lands anywhere between the pickling and the
    hand-off, where no ``try`` of the caller's can catch it yet (a function's
    first step, or its return), releases the segment, or the lent buffers
    (the lender sees the table's last reader gone), as soon as the frames
    that held it are gone. Only in the process that made it: a forked copy
    of one is not the copy's to close. The small-task path makes none."""

    #: This process's id while the fd is this object's; 0 once handed on or
    #: closed, and until its maker sets it (``CarriedFd(fd)`` is int's own
    #: constructor, with no step of Python's where a Ctrl-C could land
    #: between the object's making and its owning the fd).
    owner = 0

    def take(self) -> int:
        """The fd, now the caller's to own (the core's): this object no
        longer closes it. (Returns itself: a call of ``int()`` after the
        hand-off would be one more place for a Ctrl-C to land.)"""
        self.owner = 0
        return self

    def close(self) -> None:
        """Closes the fd if this object still owns it (at most once)."""
        if self.owner == os.getpid():
            self.owner = 0
            _native.close(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # (OSError; at interpreter exit, a module gone)
            self.close()


def take_fd(fd: int | None) -> int | None:
    """``fd`` as a plain number, to hand to the core, which owns it from
    then on (see :class:`CarriedFd`)."""
    if isinstance(fd, CarriedFd):
        return fd.take()
    return fd


def close_fd(fd: int | None) -> None:
    """Closes an fd that :func:`dumps` returned and that never reached the
    core; nothing if it did, or if it was closed already."""
    if fd is None:
        return
    if isinstance(fd, CarriedFd):
        fd.close()
    else:
        with contextlib.suppress(OSError):
            _native.close(fd)


class LentFd(CarriedFd):
    """What :func:`dumps` returns for lent buffers: the fd of the table's
    read end (a :class:`CarriedFd`, owned by the caller as any fd it
    returns), with its :class:`Loan` as ``loan``, for whoever learns the
    task's outcome."""

    loan: Loan


class _Lender:
    """Buffers lent to other processes, each :class:`Loan` held until every
    reader of its table's pipe is gone (the write end then reports
    ``POLLERR``), by a daemon thread started with the first loan. Only that
    thread closes the write ends. The thread ends, and closes its wake-up
    pipe, as soon as it holds nothing; the next loan starts another (so a
    program whose pools have all shut down has no thread of warden's
    left). Reset in a forked child (nobody reads the child's copies)."""

    def __init__(self) -> None:
        self.lock = _native.Lock()
        self.released = _native.Condition(self.lock)
        self.held: dict[int, Loan] = {}
        self.wake_r = self.wake_w = -1
        self.thread: Any = None

    def hold(self, fd: int, loan: Loan) -> None:
        """Holds ``loan`` until the readers of ``fd`` (a pipe's write end,
        which this takes) are gone. Raises ``OSError`` or ``RuntimeError``
        if the thread cannot be started. Whatever it raises (a Ctrl-C too,
        which may come once ``fd`` is held), the caller gives ``fd`` to
        :meth:`close_unless_held`."""
        with self.lock:
            if self.thread is None:
                wake: list[tuple[int, int]] = []
                try:
                    _made_by_c(wake, os.pipe)
                    wake_r, wake_w = wake[0]
                    os.set_blocking(wake_w, False)
                    thread = _native.Thread(target=self._run, name="warden-lender")
                    self.held[fd] = loan
                    self.wake_r, self.wake_w, self.thread = wake_r, wake_w, thread
                    thread.start()
                except BaseException:
                    self.held.pop(fd, None)
                    self.wake_r = self.wake_w = -1
                    self.thread = None
                    for pair in wake:
                        _native.close(pair[0])
                        _native.close(pair[1])
                    raise
                return
            # Woken first, held last: a Ctrl-C between the two leaves the fd
            # the caller's, not held by a thread that never hears of it (it
            # reads the new fd once it has this lock, after the store).
            if self.wake_w >= 0:  # (none while its thread makes a new one, or fails to)
                with contextlib.suppress(BlockingIOError):  # full: already awake
                    os.write(self.wake_w, b"\0")
            self.held[fd] = loan

    def close_unless_held(self, fd: int) -> None:
        """After :meth:`hold` raised: closes ``fd`` unless this holds it
        (then the thread closes it once its readers are gone). Called while
        the caller still has the read end open, so the thread cannot have
        closed it meanwhile: its readers are not gone."""
        with self.lock:
            if fd in self.held:
                return
        _native.close(fd)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            # Nothing it holds is lost: the next loan starts a thread that
            # watches them. Its wake-up pipe is forgotten, not closed: what
            # failed may be that the program closed it, and its numbers may
            # be another file's by now.
            with self.lock:
                if self.thread is not None and _native.is_current(self.thread):
                    self.wake_r = self.wake_w = -1
                    self.thread = None
                    self.released.notify_all()
            from ._stderr import say_exception

            say_exception("warden: the thread that holds lent buffers failed:\n")

    def _serve(self) -> None:
        while True:
            poller = _native.poll()
            with self.lock:
                if self.thread is None or not _native.is_current(self.thread):
                    return  # began after its start was given up
                if not self.held:
                    _native.close(self.wake_r)
                    _native.close(self.wake_w)
                    self.wake_r = self.wake_w = -1
                    self.thread = None
                    self.released.notify_all()
                    return
                wake_r = self.wake_r
                poller.register(wake_r, select.POLLIN)
                for fd in self.held:
                    poller.register(fd, select.POLLERR)
            events = poller.poll()
            done = []
            with self.lock:
                for fd, mask in events:
                    # POLLNVAL: the program closed it (`os.closerange`); its
                    # number is not ours to read, write or close any more.
                    if fd == wake_r:
                        if mask & (select.POLLNVAL | select.POLLHUP):
                            # Its read end (POLLNVAL), or its write end
                            # (POLLHUP: no writer left), was closed. The read
                            # end is still ours only in the second case.
                            if not mask & select.POLLNVAL:
                                _native.close(wake_r)
                            self.wake_r = self.wake_w = -1
                            self.wake_r, self.wake_w = os.pipe()
                            os.set_blocking(self.wake_w, False)
                        else:
                            os.read(wake_r, 4096)
                    elif fd in self.held:
                        done.append(self.held.pop(fd))
                        if not mask & select.POLLNVAL:
                            _native.close(fd)
                if done:
                    self.released.notify_all()
            for loan in done:
                loan.release()
            del done, events  # hold nothing until the next wake-up

    def settle(self, timeout: float) -> None:
        """If every loan held has lost its readers (the pools that read them
        have shut down), waits at most ``timeout`` seconds for the thread to
        let them go and end. Returns at once while a reader remains."""
        with self.lock:
            thread = self.thread
            if thread is None:
                return
            poller = _native.poll()
            for fd in self.held:
                poller.register(fd, select.POLLERR)
            if len(poller.poll(0)) < len(self.held):
                return
            self.released.wait_for(lambda: self.thread is not thread, timeout)
            ended = self.thread is not thread
        if ended:
            thread.join(timeout)

    def wait_for_readers(self, every: bool, timeout: float | None, results: bool) -> bool:
        """Waits until no mutable lent buffer (``every``: no lent buffer;
        ``results``: of a result, lent to the parent) is held: every reader
        has its copy, or is gone; or until no thread watches them any more
        (this one failed: nothing would let them go). False on timeout."""

        def done() -> bool:
            if self.thread is None:
                return True
            return not any(
                (every or loan.mutable) and (loan.to_parent or not results) for loan in self.held.values()
            )

        with self.lock:
            return self.released.wait_for(done, timeout)  # type: ignore[no-any-return]


_the_lender: _Lender | None = None
_lender_lock = threading.Lock()


def _lender() -> _Lender:
    global _the_lender
    lender = _the_lender
    if lender is None:
        with _lender_lock:
            if _the_lender is None:
                _the_lender = _Lender()
            lender = _the_lender
    return lender


def _forget_loans() -> None:
    global _the_lender, _lender_lock
    _lender_lock = threading.Lock()  # another thread may have held it at the fork
    lender, _the_lender = _the_lender, None
    if lender is not None:
        for fd in [*lender.held, lender.wake_r, lender.wake_w]:
            with contextlib.suppress(OSError):  # -1: no thread
                _native.close(fd)


os.register_at_fork(after_in_child=_forget_loans)


def lent_bytes() -> int:
    """How many bytes this process has lent and not yet seen read."""
    lender = _the_lender
    if lender is None:
        return 0
    with lender.lock:
        loans = list(lender.held.values())
    total = 0
    for loan in loans:
        with loan.lock:
            total += sum(view.nbytes for view in loan.views)
    return total


def settle(timeout: float = 1.0) -> None:
    """Called when a pool has shut down: if no reader is left for anything
    this process lent, waits (at most ``timeout`` seconds) for the lender
    thread to end, so that none of warden's threads outlives the pools."""
    lender = _the_lender
    if lender is not None:
        lender.settle(timeout)


def wait_for_readers(every: bool = False, timeout: float | None = None, results: bool = False) -> bool:
    """Waits until the readers of this process's mutable lent buffers (or,
    ``every``, of all of them; ``results``: only of those a result lent to
    the parent, not the arguments of calls to pools of this process's own)
    have read them or are gone: before a worker starts its next task (see
    the module documentation), and before it exits, so that a result it
    lent outlives it until the parent has it. False if ``timeout``
    (seconds) ran out first."""
    if _the_lender is None or not _the_lender.held:
        return True
    return _the_lender.wait_for_readers(every, timeout, results)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def make_segment(buffers: list[pickle.PickleBuffer], spare: bool = False) -> CarriedFd:
    """Writes ``buffers`` into a new sealed memfd; returns its fd
    (close-on-exec). ``spare``: raises :class:`_FdsScarce` instead, before
    writing anything, if the new fd says this process is short of them (see
    :func:`fds_scarce`)."""
    views = [b.raw() for b in buffers]
    offset = _aligned(_HEAD.size + _ENTRY.size * len(views))
    table = []
    for view in views:
        table.append((offset, view.nbytes))
        offset = _aligned(offset + view.nbytes)
    size = offset
    _check_size(size)
    pid = os.getpid()
    made: list[int] = []
    try:
        _made_by_c(made, _new_memfd)
        fd = CarriedFd(made[0])
        fd.owner = pid  # (no step between this and the try's end)
    except BaseException:
        if made:
            _native.close(made[0])
        raise
    if spare and fds_scarce(fd):
        fd.close()
        raise _FdsScarce
    try:
        os.ftruncate(fd, size)
        head = _HEAD.pack(_MAGIC, len(views)) + b"".join(_ENTRY.pack(o, n) for o, n in table)
        _write_all(fd, memoryview(head), 0)
        for (off, _), view in zip(table, views, strict=True):
            _write_all(fd, view, off)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        fd.close()
        raise
    return fd


_new_memfd = functools.partial(os.memfd_create, "warden-oob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def open_segment(fd: int) -> list[Any]:
    """Maps a segment received from another process (copy-on-write) and
    returns its buffers (a small one's copied out instead: see
    :data:`COPY_MAX`), or reads the buffers a lending table names. Takes
    ownership of ``fd`` and closes it. Raises :class:`SegmentError` if it
    is not a sealed warden segment within the limit (a segment that could
    shrink under the mapping would crash this process with SIGBUS when
    read) or a well-formed table, ``OSError`` if the lent buffers cannot be
    read."""
    from . import _warden

    try:
        st = os.fstat(fd)
    except OSError:
        _native.close(fd)
        raise
    if stat.S_ISFIFO(st.st_mode):
        try:
            return _read_lent(fd)
        finally:
            _native.close(fd)
    if st.st_size <= COPY_MAX:
        try:
            return _copy_segment(fd, st.st_size)
        finally:
            _native.close(fd)
    try:
        segment = _warden.map_segment(fd, _HEAD.size, MAX_SEGMENT)
    except ValueError as e:
        raise SegmentError(str(e)) from None
    view = memoryview(segment)
    buffers = []
    largest = 0
    for off, n in _buffer_table(lambda n, off: view[off : off + n], view.nbytes):
        largest = max(largest, n)
        # Each buffer is an object of its own, of exactly its size (see
        # ``_warden.SegmentBuffer``), not a slice of the segment.
        buffers.append(_warden.SegmentBuffer(segment, off, n))
    segment.set_largest_buffer(largest)
    return buffers


def _buffer_table(read: Callable[[int, int], Any], size: int) -> list[tuple[int, int]]:
    """The offset and length of each buffer in a received segment of
    ``size`` bytes (at least its head), as its table says; ``read(n,
    offset)`` gives its bytes. Raises :class:`SegmentError` if the table, or
    a buffer it names, does not lie within the segment."""
    magic, count = _HEAD.unpack(read(_HEAD.size, 0))
    if magic != _MAGIC or _HEAD.size + count * _ENTRY.size > size:
        raise SegmentError("the shared segment has no valid table of buffers")
    table: list[tuple[int, int]] = list(_ENTRY.iter_unpack(read(count * _ENTRY.size, _HEAD.size)))
    for i, (off, n) in enumerate(table):
        if off + n > size:
            raise SegmentError(f"buffer {i} of the shared segment lies outside it")
    return table


#: A received segment of at most this many bytes is copied out, each of its
#: buffers into memory of its own (a ``bytearray``), and never mapped: a
#: mapping kept per result (an array built on it) counts against
#: ``vm.max_map_count`` (65 530 by default), which some tens of thousands of
#: small results kept would reach (``ENOMEM`` for every mapping after). At
#: 1 MiB and above, a mapping each up to that limit would hold 64 GiB; below
#: it, copying costs no more than mapping (docs/benchmarks.md).
#: ``WARDEN_SEGMENT_COPY_MAX`` (bytes) changes it; 0 maps every segment.
COPY_MAX = int(os.environ.get("WARDEN_SEGMENT_COPY_MAX", str(1 << 20)))


def _copy_segment(fd: int, size: int) -> list[Any]:
    """The buffers of a small segment (see :data:`COPY_MAX`), each read into
    a ``bytearray`` of its own (writable, private: as a mapping's
    copy-on-write pages are); checked as :func:`open_segment` checks a
    mapped one. The caller closes ``fd``."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise SegmentError(f"the shared segment is not a sealable memory file: {e}") from None
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE:
        raise SegmentError("the shared segment is not sealed against shrinking and writing")
    if size < _HEAD.size:
        raise SegmentError(f"a shared segment of {size} bytes is too small")
    buffers: list[Any] = []
    for i, (off, n) in enumerate(_buffer_table(lambda n, off: os.pread(fd, n, off), size)):
        buffer = bytearray(n)
        view = memoryview(buffer)
        done = 0
        while done < n:  # (sealed: it cannot come up short; checked all the same)
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise SegmentError(f"buffer {i} of the shared segment lies outside it")
            done += got
        view.release()
        buffers.append(buffer)
    return buffers


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    try:
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    if len(data) < n:
        raise SegmentError("the table of lent buffers is truncated")
    return data


#: How long a reader that found the lender gone waits for it to have exited (s).
EXIT_WAIT = 2.0


def _wait_for_exit(pid: int, timeout: float) -> None:
    """Waits until process ``pid`` has exited (its pidfd is readable), at
    most ``timeout`` seconds; at once if it is already reaped."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _read_lent(fd: int) -> list[Any]:
    """The buffers a lending table names, read out of the lender's memory."""
    from . import _warden

    os.set_blocking(fd, False)  # the lender keeps the write end open: never wait for more
    magic, pid, count = _LEND_HEAD.unpack(_read_exactly(fd, _LEND_HEAD.size))
    if magic != _LEND_MAGIC or _LEND_HEAD.size + count * _LEND_ENTRY.size > _LEND_TABLE_MAX:
        raise SegmentError("the table of lent buffers is not valid")
    table = _read_exactly(fd, count * _LEND_ENTRY.size)
    entries = [_LEND_ENTRY.unpack_from(table, i * _LEND_ENTRY.size) for i in range(count)]
    try:
        return _warden.read_remote(pid, entries, MAX_SEGMENT)
    except ValueError as e:
        raise SegmentError(str(e)) from None
    except OSError as e:
        if e.errno == errno.ESRCH:
            # Not a refusal: the process ended (killed, say) before its
            # buffers could be read, as the docs' table of differences says.
            # Its memory is gone before it has fully exited (a large one's
            # unmapping takes milliseconds): the error waits for the exit, so
            # that a task the caller submits on seeing it is not given to a
            # worker that is still ending.
            _wait_for_exit(pid, EXIT_WAIT)
            raise type(e)(
                e.errno, f"{e.strerror}: process {pid} ended before its lent buffers were read"
            ) from None
        why = ""
        if (os.getresuid(), os.getresgid()) != _CREDENTIALS:
            why = ": this process's user or group changed since it started (a task's os.setuid?)"
        raise type(e)(
            e.errno,
            f"{e.strerror}{why} "
            "(set WARDEN_LEND_BUFFERS=0 to send large buffers through shared segments instead)",
        ) from None


#: This process's user and group ids as warden was imported (``_read_lent``);
#: a zygote's are its pool's, and so its workers'.
_CREDENTIALS = (os.getresuid(), os.getresgid())


#: Where numpy rebuilds an array from its buffer (protocol 5), by version.
_FROMBUFFER_MODULES = frozenset({"numpy._core.numeric", "numpy.core.numeric"})
#: A pickle that may name it, or hold a buffer's stand-in (which names this
#: module: see :func:`prepare`); the rest are unpickled as they are.
_NAMES_FROMBUFFER = re.compile(re.escape(b"_frombuffer")).search
_NAMES_THIS_MODULE = re.compile(re.escape(__name__.encode())).search


#: The same two literals, for the extension's search.
_SPECIAL_NAMES = [b"_frombuffer", __name__.encode()]
#: Pickles up to this size are searched here: below it a call into the
#: extension costs more than ``re``'s scan.
_SEARCH_HERE_MAX = 4096


def _names_special(data: Any) -> bool:
    """Whether a pickle may name numpy's ``_frombuffer`` or this module.
    A small one: two searches for one literal each (``re`` finds a literal
    with a fast scan, an alternation of two byte by byte, over ten times
    slower). A larger one (a long ``str`` argument) is searched by the
    extension (SIMD ``memmem``, several times faster than ``re``; a 1 MiB
    pickle took two ``re`` scans of 0.35 ms each, more than unpickling it)."""
    if len(data) <= _SEARCH_HERE_MAX:
        return _NAMES_FROMBUFFER(data) is not None or _NAMES_THIS_MODULE(data) is not None
    from ._warden import contains_any

    return contains_any(data, _SPECIAL_NAMES)


#: No pickle of an array or of a stand-in is shorter (a scalar result is).
_MIN_SPECIAL_PICKLE = 24


def unpickle(data: Any, buffers: Any = None) -> Any:
    """``pickle.loads(data, buffers=buffers)``, except that every numpy array
    it rebuilds from a buffer is writable and its own, as the standard
    library's protocol 4 gives it.

    Protocol 5 keeps an array's read-only flag: a read-only array (over
    ``bytes``, ``writeable=False``, pandas' copy-on-write arrays) is pickled
    as ``bytes`` in band, or with ``READONLY_BUFFER`` out of band, and numpy
    rebuilds it read-only on that memory. Here numpy's ``_frombuffer`` gets
    a writable buffer instead (see :func:`_writable_buffer`); a writable
    array's buffer is passed as it is, with no copy.

    A pickle that travelled beside its frame is the last of ``buffers``."""
    if buffers is not None and len(data) == len(_PICKLE_BESIDE) and bytes(data) == _PICKLE_BESIDE:
        *buffers, data = buffers
    if len(data) < _MIN_SPECIAL_PICKLE or not _names_special(data):
        return _loads(data) if buffers is None else _loads(data, buffers=buffers)
    return _Unpickler(io.BytesIO(data), buffers=buffers).load()


_loads = pickle.loads


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        """A buffer's stand-in (see :func:`prepare`), already rebuilt as the
        object it stood in for."""
        return pid

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if name == "_frombuffer" and module in _FROMBUFFER_MODULES:
            return functools.partial(_frombuffer, found)
        return found


def _frombuffer(numpy_frombuffer: Callable[..., Any], buffer: Any, *args: Any, **kwargs: Any) -> Any:
    """numpy's ``_frombuffer`` on a writable buffer of the array's own."""
    if type(buffer) is not bytearray:
        buffer = _writable_buffer(buffer)
    return numpy_frombuffer(buffer, *args, **kwargs)


def _writable_buffer(buffer: Any) -> Any:
    """A writable buffer of this process's own with the bytes of ``buffer``:
    the same memory if it lies in a segment or in lent buffers read here
    (out of band: private to this process, read-only only because the
    pickle says so), unless it is a small part of a segment (a copy then, so
    that an array kept does not keep its larger siblings' memory: see
    ``_warden.SegmentBuffer.alone``); a copy if it is read-only in band (a
    ``bytes`` in the pickle); else ``buffer`` itself."""
    from . import _warden

    if type(buffer) is _warden.SegmentBuffer:
        return buffer.alone()
    if type(buffer) is memoryview and type(buffer.obj) is _warden.SegmentBuffer and buffer.c_contiguous:
        # The read-only view the unpickler made of it (``READONLY_BUFFER``).
        whole = memoryview(buffer.obj)
        start = _warden.buffer_address(buffer)[0] - _warden.buffer_address(whole)[0]
        if start >= 0 and start + buffer.nbytes <= whole.nbytes:
            return memoryview(buffer.obj.alone())[start : start + buffer.nbytes]
    if memoryview(buffer).readonly:
        return bytearray(buffer)
    return buffer


def loads(data: Any, fd: int | None) -> Any:
    """Unpickles ``data`` with the buffers of segment ``fd`` (closed here),
    if any (see :func:`unpickle`)."""
    if fd is None:
        return unpickle(data)
    return unpickle(data, open_segment(fd))


def loads_beside(data: Any, fd: int, marker: int, special: Callable[[Any], Any]) -> Any:
    """As :func:`loads`, for a call, which may also be one that is not a
    pickle, starting with byte ``marker`` (a call by reference, see
    ``_pickle.dumps_call``), too large to go inline: ``special`` reads that
    back from the buffer it travelled in."""
    buffers = open_segment(fd)
    if len(data) == len(_PICKLE_BESIDE) and bytes(data) == _PICKLE_BESIDE and len(buffers) == 1:
        view = memoryview(buffers[0])
        if view.nbytes and view[0] == marker:
            return special(view)
    return unpickle(data, buffers)


class Received:
    """A pickle that arrived with a segment, already mapped, or with lent
    buffers, already read (either way its fd is closed), waiting to be
    unpickled by whoever takes the outcome."""

    __slots__ = ("buffers", "data", "error")

    def __init__(self, data: bytes, fd: int) -> None:
        self.data = data
        self.buffers: list[Any] = []
        self.error: Exception | None = None
        try:
            self.buffers = open_segment(fd)
        except Exception as e:  # MemoryError too: the task fails, not the thread reading it
            e.add_note("(raised while this process read the task's result out of its worker)")
            self.error = e

    def load(self) -> Any:
        if self.error is not None:
            raise self.error
        return unpickle(self.data, self.buffers)
