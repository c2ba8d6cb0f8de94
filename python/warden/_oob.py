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
  without a copy, writable (its writes stay private to this process); the
  mapping lives as long as the arrays built on it;
* ``bytes`` and ``bytearray`` are copied out of the mapping once (they own
  their memory in CPython).

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

import fcntl
import io
import os
import pickle
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: Buffers smaller than this stay inline in the frame (see docs/benchmarks.md);
#: ``WARDEN_INLINE_LIMIT`` (bytes) changes it, for measurements.
INLINE_LIMIT = int(os.environ.get("WARDEN_INLINE_LIMIT", str(64 << 10)))
#: The largest segment a process sends or accepts (default 16 GiB).
MAX_SEGMENT = int(os.environ.get("WARDEN_MAX_SEGMENT", str(16 << 30)))

_MAGIC = b"WDSG"
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<QQ")
_ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class SegmentTooLarge(ValueError):
    """The out-of-band buffers of a call or a result exceed the segment limit."""


class SegmentError(ValueError):
    """A segment received from another process is not one warden made."""


def _bytes_from(buffer: Any) -> bytes:
    """Rebuilds a ``bytes`` sent out of band (one copy out of the mapping,
    into huge pages when it is large: see ``_warden.copy_to_bytes``)."""
    if type(buffer) is memoryview:
        from . import _warden

        return _warden.copy_to_bytes(buffer)
    return bytes(buffer)


def _bytearray_from(buffer: Any) -> bytearray:
    """Rebuilds a ``bytearray`` sent out of band (one copy out of the mapping)."""
    if type(buffer) is memoryview:
        from . import _warden

        return _warden.copy_to_bytearray(buffer)
    return bytearray(buffer)


def _memoryview_from(buffer: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    """Rebuilds a ``memoryview``: on the mapping itself (no copy) when it came
    out of band, on a ``bytes`` or ``bytearray`` when it came inline."""
    view = memoryview(buffer).cast("B")
    if readonly:
        view = view.toreadonly()
    return view.cast(fmt, shape) if (fmt, shape) != ("B", (view.nbytes,)) else view


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
            return (_picklebuffer_from, (obj, memoryview(obj).readonly))
        return (_memoryview_from, (pickle.PickleBuffer(obj), obj.format, obj.shape, obj.readonly))


#: Containers looked into by :func:`prepare`, and how far.
_DEPTH = 3
_MAX_LEN = 256


#: The types :func:`prepare` looks at: buffers, and the containers it looks into.
_SEEN = frozenset({bytes, bytearray, memoryview, pickle.PickleBuffer, tuple, list, dict})


def prepare(obj: Any, depth: int = _DEPTH) -> Any:
    """``obj`` with large ``bytes`` and ``bytearray``, every ``PickleBuffer``
    and every contiguous ``memoryview`` wrapped so that they can travel out
    of band: the object itself and what it holds in tuples, lists and dict
    values, three levels deep (a task's ``(fn, args, kwargs)``, a map chunk,
    a result), in containers of at most 256 items. Buffers deeper down are pickled as the
    standard library does. Containers are only rebuilt when something in
    them was wrapped; everything else is passed over at the cost of a type
    check (this runs on every task)."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return _Wrapped(obj) if len(obj) >= INLINE_LIMIT else obj
    if t is memoryview:
        return _Wrapped(obj) if obj.contiguous else obj
    if t is pickle.PickleBuffer:
        # Out of band, pickle would hand the receiver a memoryview; keep the
        # standard library's bytes or bytearray instead.
        return _Wrapped(obj)
    if not depth or t not in _SEEN or len(obj) > _MAX_LEN:
        return obj
    depth -= 1
    copy: Any = None
    for key, x in obj.items() if t is dict else enumerate(obj):
        if type(x) in _SEEN:
            y = prepare(x, depth)
            if y is not x:
                if copy is None:
                    copy = dict(obj) if t is dict else list(obj)
                copy[key] = y
    if copy is None:
        return obj
    return tuple(copy) if t is tuple else copy


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


def dumps(obj: Any, pickler: Callable[[io.BytesIO, Collector], pickle.Pickler]) -> tuple[bytes, int | None]:
    """Pickles ``obj`` with ``pickler(file, buffer_callback)``. Returns the
    pickle and the fd of a sealed segment holding its out-of-band buffers
    (the caller owns it), or ``None`` when everything is inline."""
    out = io.BytesIO()
    collector = Collector()
    pickler(out, collector).dump(obj)
    if not collector.buffers:
        return out.getvalue(), None
    return out.getvalue(), make_segment(collector.buffers)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def make_segment(buffers: list[pickle.PickleBuffer]) -> int:
    """Writes ``buffers`` into a new sealed memfd; returns its fd (close-on-exec)."""
    views = [b.raw() for b in buffers]
    offset = _aligned(_HEAD.size + _ENTRY.size * len(views))
    table = []
    for view in views:
        table.append((offset, view.nbytes))
        offset = _aligned(offset + view.nbytes)
    size = offset
    if size > MAX_SEGMENT:
        raise SegmentTooLarge(
            f"out-of-band buffers of {size} bytes exceed the shared segment limit of {MAX_SEGMENT} bytes "
            "(set WARDEN_MAX_SEGMENT to raise it)"
        )
    fd = os.memfd_create("warden-oob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        head = _HEAD.pack(_MAGIC, len(views)) + b"".join(_ENTRY.pack(o, n) for o, n in table)
        _write_all(fd, memoryview(head), 0)
        for (off, _), view in zip(table, views, strict=True):
            _write_all(fd, view, off)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    view = view.cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def open_segment(fd: int) -> list[memoryview]:
    """Maps a segment received from another process (copy-on-write) and
    returns its buffers. Takes ownership of ``fd`` and closes it. Raises
    :class:`SegmentError` if it is not a sealed warden segment within the
    limit: a segment that could shrink under the mapping would crash this
    process with SIGBUS when read."""
    from . import _warden

    try:
        segment = _warden.map_segment(fd, _HEAD.size, MAX_SEGMENT)
    except ValueError as e:
        raise SegmentError(str(e)) from None
    view = memoryview(segment)
    size = view.nbytes
    magic, count = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC or _HEAD.size + count * _ENTRY.size > size:
        raise SegmentError("the shared segment has no valid table of buffers")
    buffers = []
    for i in range(count):
        off, n = _ENTRY.unpack_from(view, _HEAD.size + i * _ENTRY.size)
        if off + n > size:
            raise SegmentError(f"buffer {i} of the shared segment lies outside it")
        buffers.append(view[off : off + n])
    return buffers


def loads(data: Any, fd: int | None) -> Any:
    """Unpickles ``data`` with the buffers of segment ``fd`` (closed here), if any."""
    if fd is None:
        return pickle.loads(data)
    return pickle.loads(data, buffers=open_segment(fd))


class Received:
    """A pickle that arrived with a segment, already mapped (its fd closed),
    waiting to be unpickled by whoever takes the outcome."""

    __slots__ = ("buffers", "data", "error")

    def __init__(self, data: bytes, fd: int) -> None:
        self.data = data
        self.buffers: list[memoryview] = []
        self.error: SegmentError | None = None
        try:
            self.buffers = open_segment(fd)
        except SegmentError as e:
            self.error = e

    def load(self) -> Any:
        if self.error is not None:
            raise self.error
        return pickle.loads(self.data, buffers=self.buffers)
