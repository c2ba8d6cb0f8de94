"""Large data travels out of band: lent (read straight out of the sender's
memory) or in shared segments passed over the worker channel, and every
loan and segment is released on every exit path.

What an outsider sees: values come back byte for byte; a numpy array above
the inline limit is rebuilt on a mapping of its own (no copy after the one
out of the sender); no ``memfd`` stays open, no loan stays held and no
``/dev/shm`` entry appears, whether the task returns, the worker is killed
mid-task, or the pool shuts down. Every test runs with lending on (where
the kernel allows it) and off (``WARDEN_LEND_BUFFERS=0``, segments only).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import pickle
import platform
import signal
import subprocess
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import warden
from warden import _oob, _runner

from conftest import REFUSE_SYSTEM_CALL, SECCOMP_MACHINES, held_loans, numpy, wait_until

LIMIT = _oob.INLINE_LIMIT
SIZES = [0, 1, LIMIT - 1, LIMIT, LIMIT + 1, 3 * LIMIT + 7, 4 << 20, (6 << 20) + 13]


def identity(x):
    return x


def describe(x):
    """What the worker received: its type, and whether a numpy array is
    built on a mapping warden made (a shared segment, or the memory a lent
    buffer was read into)."""
    base = x
    while base is not None and type(base).__name__ != "SegmentBuffer":
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return type(x).__name__, base is not None


def own_memfds(pid: int | None = None) -> list[str]:
    """The memfd segments a process has open (fds) or mapped."""
    pid = os.getpid() if pid is None else pid
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if "warden-oob" in target:
                found.append(f"fd {fd}: {target}")
        with open(f"/proc/{pid}/maps") as maps:
            found += [line.strip() for line in maps if "warden-oob" in line]
    except OSError:
        pass
    return found


def dev_shm() -> set[str]:
    """Shared-memory names in /dev/shm. POSIX semaphores ("sem.*") of other
    programs on this machine (multiprocessing, loky) come and go there, and
    so do the segments other tests of this suite make on purpose, under
    "warden_test_" (they may run at the same time); warden creates no name
    at all, so every other new entry counts."""
    try:
        return {n for n in os.listdir("/dev/shm") if not n.startswith(("sem.", "warden_test_"))}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True, params=["lent", "segments"])
def carrier(request, monkeypatch):
    """Runs the test with lending on (where the kernel allows it), then off;
    workers read the setting from their environment."""
    lend = request.param == "lent"
    if lend and not (_oob.LEND and _oob.may_lend(False)):
        pytest.skip("this kernel does not let a child read its parent's memory (see _oob.may_lend)")
    monkeypatch.setattr(_oob, "LEND", lend)
    monkeypatch.setenv("WARDEN_LEND_BUFFERS", "1" if lend else "0")
    return request.param


@pytest.fixture
def no_segment_leaks():
    """Fails the test if this process keeps a segment (fd or mapping) or a
    loan, or a new /dev/shm entry appears."""
    shm = dev_shm()
    yield
    gc.collect()
    assert wait_until(lambda: not own_memfds(), timeout=5), own_memfds()
    assert wait_until(lambda: not held_loans(), timeout=5), held_loans()
    assert dev_shm() - shm == set()


@pytest.fixture
def executor():
    with warden.ProcessPoolExecutor(2) as ex:
        yield ex


@pytest.mark.parametrize("make", ["copy_to_bytes", "copy_to_bytearray"])
def test_a_large_buffer_is_copied_into_a_new_object_of_its_type(make):
    from warden import _warden

    raw = os.urandom(16 << 20)
    copy = getattr(_warden, make)(memoryview(raw))
    assert type(copy) is {"copy_to_bytes": bytes, "copy_to_bytearray": bytearray}[make]
    assert copy == raw


def test_copying_a_buffer_that_is_not_contiguous_is_refused():
    from warden import _warden

    with pytest.raises(Exception, match="contiguous"):
        _warden.copy_to_bytes(memoryview(bytearray(range(256)))[::2])


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "picklebuffer"])
def test_buffers_round_trip_byte_exact_around_the_inline_limit(executor, no_segment_leaks, kind):
    expected_type = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview, "picklebuffer": bytes}
    for size in SIZES:
        raw = os.urandom(size)
        value = {
            "bytes": raw,
            "bytearray": bytearray(raw),
            "memoryview": memoryview(bytearray(raw)),
            "picklebuffer": pickle.PickleBuffer(raw),
        }[kind]
        back = executor.submit(identity, value).result(timeout=60)
        assert type(back) is expected_type[kind], size
        assert bytes(back) == raw, size
        del back


class ZeroCopyByteArray(bytearray):
    """The ``pickle`` docs' example of out-of-band buffers (PEP 574): its
    reconstructor looks through the buffer it gets to that buffer's exporter,
    and copies that exporter if it is not one of its own."""

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return type(self)._reconstruct, (pickle.PickleBuffer(self),), None
        return type(self)._reconstruct, (bytearray(self),)

    @classmethod
    def _reconstruct(cls, obj):
        with memoryview(obj) as m:
            obj = m.obj
            return obj if type(obj) is cls else cls(obj)


def size_and_ends(x):
    return type(x).__name__, len(x), bytes(x[:8]), bytes(x[-8:])


def test_a_reconstructor_that_looks_through_its_buffer_finds_exactly_the_data_as_under_the_standard_library(
    executor, no_segment_leaks
):
    """The exporter of an out-of-band buffer is an object of exactly the
    buffer's size, as the standard library's in-band ``bytearray`` is; it
    was the whole shared segment (its table first), and the value arrived
    longer and with other bytes, without an error."""
    import concurrent.futures
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as std:
        for size in SIZES:
            raw = os.urandom(size)
            value = ZeroCopyByteArray(raw)
            expected = std.submit(size_and_ends, value).result(timeout=60)
            assert expected == ("ZeroCopyByteArray", size, raw[:8], raw[-8:])
            assert executor.submit(size_and_ends, value).result(timeout=60) == expected, size
            back = executor.submit(identity, value).result(timeout=60)
            assert type(back) is ZeroCopyByteArray and back == raw, size
            del back


def test_a_thread_that_never_begins_is_given_up_on_instead_of_waited_for_for_ever(carrier, monkeypatch):
    """``threading.Thread.start()`` waits without a bound for the new thread
    to say it began; one that fails first (``MemoryError`` in a process short
    of memory) left a worker waiting for ever, its result never sent."""
    if carrier != "lent":
        pytest.skip("the same with lending off")
    from warden import _native

    monkeypatch.setattr(_native, "START_WAIT", 0.5)
    thread = _native.Thread(target=print, name="warden-test-never-begins")
    thread._bootstrap = lambda: None  # dies before it says it began
    raised: list[BaseException] = []

    def start():
        try:
            thread.start()
        except BaseException as e:
            raised.append(e)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    starter.join(timeout=30)
    assert not starter.is_alive(), "start() still waits"
    assert [type(e) for e in raised] == [RuntimeError] and "did not begin" in str(raised[0])


def test_large_buffers_are_copied_when_no_thread_can_hold_them_lent(carrier, monkeypatch, no_segment_leaks):
    """A loan needs a thread to hold it; where none can be started, the
    buffers go through a segment instead (the call was refused before, as if
    it could not be pickled)."""
    if carrier != "lent":
        pytest.skip("lending is off: nothing is lent")

    from warden import _native

    real = _native.Thread

    class NoLender:
        def start(self):
            raise RuntimeError("can't start new thread")

    def thread(target, args=(), name=""):
        return NoLender() if name == "warden-lender" else real(target, args, name)

    monkeypatch.setattr(_native, "Thread", thread)
    raw = os.urandom(4 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        assert ex.submit(identity, bytearray(raw)).result(timeout=60) == raw
        assert ex.submit(identity, raw).result(timeout=60) == raw


def test_a_ctrl_c_as_a_large_call_is_counted_leaves_the_count_of_calls_holding_descriptors_right(
    monkeypatch, no_segment_leaks
):
    """A Ctrl-C landing as ``submit`` counts a large call among those holding
    a descriptor (at the start of the count's update) raises in the caller;
    the call's outcome must not then take one off a count it was never in.
    Before, the count went to -1, and a large call of a process short of
    descriptors waited 60 s for one to come free instead of taking one of
    the reserve."""
    from warden import _oob

    real = _oob.call_holds_fd
    landed: list[int] = []

    def ctrl_c_lands_first(change, *rest):
        if change == 1 and not landed:
            landed.append(change)
            raise KeyboardInterrupt
        return real(change, *rest)

    monkeypatch.setattr(_oob, "call_holds_fd", ctrl_c_lands_first)
    raw = os.urandom(4 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(identity, raw)
        assert ex.submit(identity, raw).result(timeout=60) == raw
    assert landed == [1]
    assert wait_until(lambda: _oob.calls_holding_fds() == 0, timeout=5), _oob.calls_holding_fds()


def test_memoryview_keeps_its_format_shape_and_readonly_flag(executor, no_segment_leaks):
    data = bytes(range(256)) * (LIMIT // 64)
    view = memoryview(data).cast("i", (len(data) // 16, 4))
    back = executor.submit(identity, view).result(timeout=60)
    assert (back.format, back.shape, back.readonly) == ("i", view.shape, True)
    assert back.tobytes() == data
    del back


def listed(view):
    return view.tolist()


def fortran_view(n):
    np = numpy()
    return memoryview(np.asfortranarray(np.arange(n * 3.0).reshape(n, 3)))


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_memoryview_no_receiver_could_rebuild_as_it_is_is_refused_instead_of_arriving_changed(
    executor, no_segment_leaks, size
):
    """A Fortran-order view (its bytes are not in the order its elements
    are listed), a non-native format, an empty dimension: the standard
    library refuses every ``memoryview`` with ``TypeError``; warden sends
    those it can rebuild, and refuses these (before, a Fortran-order view
    arrived with its elements reordered)."""
    np = numpy()
    n = 2 if size == "small" else LIMIT
    for view in (
        fortran_view(n),
        memoryview(np.arange(3 * n, dtype=">i4")),
        memoryview(np.zeros((n, 0))),
    ):
        with pytest.raises(TypeError, match="cannot pickle memoryview objects"):
            executor.submit(listed, view)
    # As any result that cannot be pickled fails (see docs/python.md).
    with pytest.raises(pickle.PicklingError, match="cannot pickle memoryview objects"):
        executor.submit(fortran_view, n).result(timeout=60)
    c_order = memoryview(np.arange(n * 3.0).reshape(n, 3))
    assert executor.submit(listed, c_order).result(timeout=60) == c_order.tolist()


def view_facts(view):
    return type(view).__name__, view.format, view.shape, view.tobytes()


def nested_view(data):
    return {"level": [{"deeper": [memoryview(data).cast("i")]}]}


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_memoryview_deeper_than_the_buffers_looked_for_still_keeps_its_format_and_shape(
    no_segment_leaks, size
):
    """``starmap``'s argument tuples sit four levels into a task's call, and
    a result may nest deeper still: such a view arrives as the same
    ``memoryview``, never as its bytes alone; one no receiver could rebuild
    is refused there too."""
    data = bytes(range(256)) * (4 if size == "small" else LIMIT // 64)
    view = memoryview(bytearray(data)).cast("i", (len(data) // 16, 4))
    with warden.Pool(2) as pool:
        facts = ("memoryview", "i", view.shape, data)
        assert pool.starmap(view_facts, [(view,)]) == [facts]
        assert pool.starmap_async(view_facts, [(view,)] * 3).get(60) == [facts] * 3
        back = pool.apply(nested_view, (data,))
        deep = back["level"][0]["deeper"][0]
        assert (type(deep), deep.format, deep.tobytes()) == (memoryview, "i", data)
        reversed_view = memoryview(bytearray(data))[::-1]  # not C-contiguous
        with pytest.raises(TypeError, match="cannot pickle memoryview objects"):
            pool.starmap(view_facts, [(reversed_view,)])


def test_buffers_inside_arguments_and_results_travel_too(executor, no_segment_leaks):
    big = os.urandom(3 * LIMIT)
    args = ([big, bytearray(big)], {"k": big})
    back = executor.submit(identity, args).result(timeout=60)
    assert back == ([big, bytearray(big)], {"k": big})


def test_a_pool_map_of_large_buffers_returns_them_in_order(no_segment_leaks):
    items = [os.urandom(LIMIT + i) for i in range(20)]
    with warden.Pool(2) as pool:
        assert pool.map(identity, items, chunksize=3) == items
        assert pool.apply_async(identity, (items[0],)).get(timeout=60) == items[0]


def test_buffers_larger_than_the_frame_limit_travel_out_of_band(monkeypatch, no_segment_leaks):
    monkeypatch.setattr(_runner, "MAX_FRAME", 1 << 20)
    big = os.urandom(8 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        assert ex.submit(identity, big).result(timeout=60) == big
        # Data the pickle must carry inline still meets the frame limit, with
        # a clear error, and the pool carries on.
        with pytest.raises(Exception, match="exceeds the frame limit"):
            ex.submit(identity, list(range(1 << 18))).result(timeout=60)
        assert ex.submit(identity, b"after").result(timeout=60) == b"after"


def keep_initargs(*args):
    global INITARGS
    INITARGS = args


def digests(values):
    """What arrived, byte for byte: each value's type and the SHA-256 of its bytes."""
    import hashlib

    out = []
    for v in values:
        data = v.encode() if isinstance(v, str) else v.tobytes() if hasattr(v, "tobytes") else bytes(v)
        out.append((type(v).__name__, hashlib.sha256(data).hexdigest()))
    return out


def initargs_digests(_=None):
    return os.getpid(), digests(INITARGS)


def large_arguments():
    """Arguments each over a frame limit of 1 MiB: a ``bytes``, a
    ``bytearray``, a ``str`` (its pickle alone over the limit) and, with
    numpy, an array."""
    args = [os.urandom(3 << 20), bytearray(os.urandom(2 << 20)), "s" * (3 << 20)]
    with contextlib.suppress(ImportError):
        import numpy as np

        args.append(np.frombuffer(os.urandom(4 << 20), dtype=np.uint8).reshape(1024, -1))
    return tuple(args)


def frame_limit_of_a_mib(monkeypatch):
    monkeypatch.setattr(_runner, "MAX_FRAME", 1 << 20)
    # A pickle over this goes beside its frame (below the frame limit, as
    # with the default 256 MiB frames and 32 MiB here).
    monkeypatch.setattr(_oob, "PICKLE_INLINE_MAX", 256 << 10)


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_initargs_over_the_frame_limit_reach_every_worker_and_every_restart_as_sent(
    api, monkeypatch, no_segment_leaks
):
    frame_limit_of_a_mib(monkeypatch)
    args = large_arguments()
    expected = digests(args)
    if api == "executor":
        pool = warden.ProcessPoolExecutor(2, initializer=keep_initargs, initargs=args, max_tasks_per_child=1)
    else:
        pool = warden.Pool(2, initializer=keep_initargs, initargs=args, maxtasksperchild=1)
    with pool:
        # Each task in a new worker: the initargs reach the replacements too.
        got = list(pool.map(initargs_digests, range(6)))
        assert [d for _, d in got] == [expected] * 6
        assert len({pid for pid, _ in got}) == 6
        # One segment for the pool's life, not one per worker started.
        assert len([m for m in own_memfds() if m.startswith("fd")]) == 1, own_memfds()
    # no_segment_leaks: gone once the pool has shut down.


def run_with_large_arguments(expected, *args, **kwargs):
    if digests([*args, *kwargs.values()]) != expected:
        raise SystemExit(3)


def test_process_arguments_over_the_frame_limit_reach_the_child_as_sent(monkeypatch, no_segment_leaks):
    frame_limit_of_a_mib(monkeypatch)
    *args, last = large_arguments()
    expected = digests([*args, last])
    p = warden.Process(target=run_with_large_arguments, args=(expected, *args), kwargs={"last": last})
    p.start()
    p.join(60)
    assert p.exitcode == 0
    p.close()
    # no_segment_leaks: the child's segment is gone once it has been joined.


def test_initargs_that_must_go_inline_over_the_frame_limit_are_refused_without_blaming_a_worker(
    monkeypatch, no_segment_leaks
):
    """Where no segment can be made, the initargs are pickled inline: over
    the frame limit, the pool refuses them itself, naming the size, the limit
    and the setting, and starts no worker (no "broke the protocol", no
    restarts spent)."""
    import errno

    def no_memfd(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_runner, "MAX_FRAME", 1 << 20)
    monkeypatch.setattr(_oob, "make_segment", no_memfd)
    big = os.urandom(2 << 20)
    started = time.monotonic()
    ex = warden.ProcessPoolExecutor(2, initializer=keep_initargs, initargs=(big,))
    try:
        with pytest.raises(
            ValueError,
            match=r"init payload of \d+ bytes exceeds the frame limit of 1048576 bytes.*max_frame_size",
        ):
            ex.submit(initargs_digests)
    finally:
        ex.shutdown(cancel_futures=True)
    with pytest.raises(ValueError, match="max_frame_size"):
        warden.Pool(2, initializer=keep_initargs, initargs=(big,))
    assert time.monotonic() - started < 10


def fail_with_output(n):
    raise subprocess.CalledProcessError(3, ["tool", "--all"], output=b"o" * n)


def fail_with_message(n):
    raise ValueError("m" * n)


def fail_from_a_long_cause(n):
    try:
        raise KeyError("k" * n)
    except KeyError as e:
        raise RuntimeError("the real failure") from e


def test_a_long_traceback_keeps_its_end_where_the_exception_raised_is_named():
    with warden.ProcessPoolExecutor(1) as ex:
        with pytest.raises(RuntimeError, match="the real failure") as caught:
            ex.submit(fail_from_a_long_cause, 2 << 20).result(timeout=60)
        tb = str(caught.value.__cause__)
        assert "RuntimeError: the real failure" in tb
        assert "more characters not sent" in tb


def test_an_error_over_the_frame_limit_still_names_its_type_message_and_traceback(monkeypatch):
    monkeypatch.setattr(_runner, "MAX_FRAME", 1 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        with pytest.raises(warden.RemoteError) as caught:
            ex.submit(fail_with_output, 4 << 20).result(timeout=60)
        e = caught.value
        assert e.type_name == "subprocess.CalledProcessError"
        assert "returned non-zero exit status 3" in str(e)
        assert "not sent whole" in str(e)
        assert "fail_with_output" in str(e.__cause__)
        assert ex.submit(identity, b"after").result(timeout=60) == b"after"


def test_an_error_with_a_long_message_arrives_whole_within_the_frame_limit(monkeypatch):
    # Its message and traceback text, each as long as the pickle, would
    # triple it: those two are cut, and the exception itself arrives whole.
    monkeypatch.setattr(_runner, "MAX_FRAME", 8 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        with pytest.raises(ValueError) as caught:
            ex.submit(fail_with_message, 3 << 20).result(timeout=60)
        assert str(caught.value) == "m" * (3 << 20)
        assert "fail_with_message" in str(caught.value.__cause__)


def test_a_segment_over_the_cap_is_refused_at_submit_and_loses_nothing(monkeypatch, no_segment_leaks):
    with warden.ProcessPoolExecutor(1) as ex:
        first = ex.submit(identity, 1)
        monkeypatch.setattr(_oob, "MAX_SEGMENT", 1 << 20)
        with pytest.raises(_oob.SegmentTooLarge, match="shared segment limit"):
            ex.submit(identity, os.urandom(2 << 20))
        assert first.result(timeout=60) == 1
        assert ex.submit(identity, os.urandom(LIMIT)).result(timeout=60) is not None


def test_a_result_segment_over_the_receivers_cap_fails_that_task_only(monkeypatch, no_segment_leaks):
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(identity, 0).result(timeout=60)
        monkeypatch.setattr(_oob, "MAX_SEGMENT", 1 << 20)
        with pytest.raises(Exception, match="exceeds? the limit"):
            ex.submit(os.urandom, 2 << 20).result(timeout=60)
        assert ex.submit(identity, 7).result(timeout=60) == 7


def test_a_segment_that_could_shrink_is_refused():
    fd = os.memfd_create("warden-oob-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    with pytest.raises(_oob.SegmentError, match="not sealed"):
        _oob.open_segment(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # open_segment took it and closed it


def test_a_sealed_segment_without_a_buffer_table_is_refused():
    fd = os.memfd_create("warden-oob-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    with pytest.raises(_oob.SegmentError, match="no valid table"):
        _oob.open_segment(fd)


def wait_for_file_then(path, value):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def lend_slowly_read_results():
    """A worker initializer: the exit's wait for the parent to read what it
    lent starts from 50 ms, and counts on a parent reading 32 MiB/s."""
    from warden import _workerloop

    _workerloop._LOAN_GRACE = 0.05
    _workerloop._SLOWEST_READ = 32 << 20


def test_a_retiring_worker_waits_for_its_large_lent_result_as_long_as_its_size_takes_to_read(
    carrier, no_segment_leaks
):
    """A worker retires after its task (``max_tasks_per_child=1``) while the
    parent's results thread is busy (here a done callback; in earnest, the
    results before it, 1 GiB each taking the parent seconds): its exit waits
    for the parent to read the result it lent, longer the larger it is
    (before, a fixed grace ran out and the result was lost with
    ``ProcessLookupError``)."""
    size = 64 << 20
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1, initializer=lend_slowly_read_results) as ex:
        first = ex.submit(os.getpid)
        first.add_done_callback(lambda _: time.sleep(1.0))
        big = ex.submit(bytes, size)
        assert len(big.result(timeout=60)) == size
        assert first.result(timeout=60) > 0


_REUSED = None


def refill(i):
    """Returns the same module-level array each time, refilled with ``i``:
    a buffer the program reuses, as a worker's scratch array."""
    global _REUSED
    np = numpy()
    if _REUSED is None:
        _REUSED = np.zeros(1 << 17)  # 1 MiB: lent, not inline
    _REUSED[:] = i
    return _REUSED


def test_a_result_lent_while_the_parent_is_held_up_past_the_grace_is_what_the_task_returned():
    """The results thread is held up (a done callback) longer than a worker
    waits at exit for its lent result to be read: the worker's next task
    still waits for the read, as the standard library's waits on its full
    pipe. Before, it began after the grace, refilled the array it had lent,
    and the parent read the next task's numbers as this one's result."""
    numpy()
    with warden.ProcessPoolExecutor(1, initializer=lend_slowly_read_results) as ex:
        first = ex.submit(refill, 1)
        first.add_done_callback(lambda _: time.sleep(1.5))
        futures = [first, ex.submit(refill, 2), ex.submit(refill, 3)]
        got = [set(f.result(timeout=60).tolist()) for f in futures]
    assert got == [{1.0}, {2.0}, {3.0}]


def lend_then_die(size):
    """Returns a large result, and SIGKILLs this worker 0.5 s later: time
    enough, on a loaded machine too, to send it first."""
    result = bytes(size)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return result


def test_a_worker_killed_before_its_large_result_is_read_loses_it_only_if_it_was_lent(
    carrier, no_segment_leaks
):
    """The results thread is held up (a done callback of an earlier task)
    while the worker that sent a large result is killed. Lent, the result is
    lost: the task fails with ``ProcessLookupError``, as docs/python.md's
    table says, naming the process that ended and suggesting no setting (the
    read was not refused). In a shared segment, it survives the worker."""
    with warden.ProcessPoolExecutor(2) as ex:
        first = ex.submit(os.getpid)
        first.add_done_callback(lambda _: time.sleep(2.5))
        sent = ex.submit(lend_then_die, 64 << 20)
        if carrier == "lent":
            with pytest.raises(ProcessLookupError) as info:
                sent.result(timeout=60)
            assert "ended before its lent buffers were read" in str(info.value)
            assert "WARDEN_LEND_BUFFERS" not in str(info.value)
        else:
            assert sent.result(timeout=60) == bytes(64 << 20)
        assert ex.submit(identity, 5).result(timeout=60) == 5


_READY_RESULT = b""


def make_a_large_result():
    """A worker initializer: the result its task returns, made ahead."""
    global _READY_RESULT
    _READY_RESULT = b"\x05" * (256 << 20)


def return_it_then_die(delay):
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return _READY_RESULT


def test_the_next_task_is_not_given_to_a_worker_that_died_while_its_large_result_was_read(
    carrier, no_segment_leaks
):
    """The worker dies while the parent reads (or is about to read) its
    large result: its memory goes first, and a large process takes
    milliseconds more to have exited. The error the caller gets comes once
    it has, so the tasks the caller submits next go to another worker,
    never to that one (they failed with ``WorkerCrashed`` before)."""
    with warden.ProcessPoolExecutor(2, initializer=make_a_large_result) as ex:
        for delay in (0.01, 0.02, 0.03, 0.04, 0.05):
            ex.submit(identity, 0).result(timeout=60)
            # Lost (read too late), or the worker died still sending it, or read in time.
            with contextlib.suppress(ProcessLookupError, warden.WorkerCrashed):
                assert len(ex.submit(return_it_then_die, delay).result(timeout=60)) == 256 << 20
            assert [ex.submit(identity, i).result(timeout=60) for i in range(4)] == [0, 1, 2, 3], delay


def test_a_worker_killed_with_a_large_payload_in_flight_leaks_nothing(tmp_path, no_segment_leaks):
    started = tmp_path / "started"
    never = tmp_path / "never"
    big = os.urandom(16 << 20)
    with warden.ProcessPoolExecutor(1) as ex:
        pid = ex.submit(os.getpid).result(timeout=60)
        # A memoryview stays on the mapping in the worker while the task runs.
        future = ex.submit(touch_then_wait, str(started), str(never), memoryview(big))
        assert wait_until(started.exists, timeout=60)
        assert own_memfds(pid), "the worker holds the task's segment while it runs"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(warden.WorkerCrashed):
            future.result(timeout=60)
        # The replacement takes large payloads as before.
        assert ex.submit(identity, big).result(timeout=60) == big
    assert not os.path.exists(f"/proc/{pid}") or not own_memfds(pid)


def touch_then_wait(started, never, payload):
    Path(started).write_text("x")
    return wait_for_file_then(never, len(payload))


def test_a_shutdown_with_large_payloads_queued_releases_every_segment(tmp_path, no_segment_leaks):
    started = tmp_path / "started"
    release = tmp_path / "release"
    big = os.urandom(4 << 20)
    ex = warden.ProcessPoolExecutor(1)
    blocker = ex.submit(touch_then_wait, str(started), str(release), b"")
    assert wait_until(started.exists, timeout=60)
    queued = [ex.submit(identity, big) for _ in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    release.write_text("x")
    assert blocker.result(timeout=60) == 0
    ex.shutdown(wait=True)
    assert all(f.cancelled() for f in queued)
    del queued


def test_a_parent_killed_with_large_payloads_in_flight_leaves_no_segment(program):
    shm = dev_shm()
    prog = program(
        """
        import os, sys, time
        import warden

        def hold(payload):
            # One write: two workers print at once (unbuffered, print's
            # pieces are writes of their own, which could interleave).
            os.write(1, f"holding {os.getpid()}\\n".encode())
            time.sleep(60)

        if __name__ == "__main__":
            ex = warden.ProcessPoolExecutor(2)
            futures = [ex.submit(hold, os.urandom(8 << 20)) for _ in range(4)]
            time.sleep(60)
        """
    )
    proc = prog.start()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("holding"), line
    worker = int(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    # The workers see their parent die and end; the kernel frees the segments.
    assert wait_until(lambda: not os.path.exists(f"/proc/{worker}"), timeout=30)
    assert dev_shm() - shm == set()


def test_a_result_too_large_for_the_parents_memory_fails_alone_and_the_pool_goes_on(program):
    prog = program(
        """
        import os, resource
        import warden

        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1) as ex:
                pid = ex.submit(os.getpid).result(timeout=60)
                # From here this process cannot map 200 MiB more (the worker can).
                used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                resource.setrlimit(resource.RLIMIT_AS, (used + (100 << 20), resource.RLIM_INFINITY))
                try:
                    ex.submit(bytes, 200 << 20).result(timeout=60)
                except (MemoryError, OSError, warden.SegmentError) as e:
                    print("too large:", type(e).__name__, getattr(e, "__notes__", []), flush=True)
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                same = ex.submit(os.getpid).result(timeout=60) == pid
                print("then", ex.submit(abs, -2).result(timeout=60), same)
        """
    )
    run = prog.run(timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("too large:"), (run.stdout, run.stderr)
    # The error says where it happened (a bare MemoryError did not).
    assert "read the task's result out of its worker" in lines[0], lines[0]
    assert lines[1] == "then 2 True", run.stderr


class Holder:
    """A buffer where warden does not look for one (an attribute): it stays
    in the pickle."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def rows(n: int) -> list[str]:
    return [f"row {i:09d}" for i in range(n)]


def test_a_pickle_larger_than_a_frame_travels_as_under_the_standard_library(executor, no_segment_leaks):
    """The standard library's pickles have no size limit; warden's frames
    have one (256 MiB by default): a larger pickle goes beside its frame."""
    big = Holder(bytes(range(256)) * ((300 << 20) // 256))
    back = executor.submit(identity, big).result(timeout=120)
    assert type(back) is Holder and back.data == big.data
    del big, back


def test_a_pickle_over_the_inline_maximum_goes_beside_its_frame_both_ways(monkeypatch, no_segment_leaks):
    monkeypatch.setattr(_oob, "PICKLE_INLINE_MAX", 1 << 20)
    monkeypatch.setenv("WARDEN_PICKLE_INLINE_MAX", str(1 << 20))
    data, fd = _oob.dumps(rows(100_000), lambda f, cb: pickle.Pickler(f, 5, buffer_callback=cb))
    assert fd is not None and data == b"WDPK"
    assert _oob.loads(data, fd) == rows(100_000)
    with warden.ProcessPoolExecutor(1) as ex:
        assert ex.submit(rows, 100_000).result(timeout=60) == rows(100_000)
        assert ex.submit(len, rows(100_000)).result(timeout=60) == 100_000
    with warden.Pool(1) as pool:
        assert pool.apply(rows, (100_000,)) == rows(100_000)


def text_of(n):
    return "ab" * (n // 2)


def test_a_string_over_the_inline_maximum_goes_beside_its_frame_as_argument_and_result(
    monkeypatch, no_segment_leaks
):
    """A ``str`` (a scalar, which small calls pickle by a short cut) larger
    than a frame may be: as any pickle over the inline maximum, it travels
    beside its frame instead of being refused as over the frame limit (the
    standard library sends it)."""
    monkeypatch.setattr(_oob, "PICKLE_INLINE_MAX", 1 << 20)
    monkeypatch.setenv("WARDEN_PICKLE_INLINE_MAX", str(1 << 20))
    monkeypatch.setattr(_runner, "MAX_FRAME", 2 << 20)
    n = 3 << 20
    with warden.ProcessPoolExecutor(1) as ex:
        assert ex.submit(len, text_of(n)).result(timeout=60) == n
        assert ex.submit(text_of, n).result(timeout=60) == text_of(n)
    with warden.Pool(1) as pool:
        assert pool.apply(len, (text_of(n),)) == n
        assert pool.apply(text_of, (n,)) == text_of(n)


# -- sharing -------------------------------------------------------------------
#
# Pickle keeps what an object graph shares: an object met twice arrives as
# one. Buffers sent out of band must not lose that (wrongly aliased data, and
# a list of one buffer 200 times costing 200 copies).


def sharing(a, b):
    return a is b, a[0] is b[0], a[0] is a[-1]


def repeated(block, n):
    return [block] * n


def holds_itself(items):
    return items[-1] is items, items[0] == b"c" * 100_000


def distinct(values) -> int:
    return len({id(v) for v in values})


def test_what_a_call_or_result_shares_arrives_shared_as_pickle_gives_it(executor, no_segment_leaks):
    big = b"q" * (LIMIT * 2)
    both = [big, bytearray(LIMIT), big]
    looped: list = [b"c" * 100_000]
    looped.append(looped)
    expected = pickle.loads(pickle.dumps((both, both, looped), protocol=5))
    assert sharing(expected[0], expected[1]) == (True, True, True)
    assert executor.submit(sharing, both, both).result(timeout=60) == (True, True, True)
    assert executor.submit(sharing, [big, 1, big], [big]).result(timeout=60) == (False, True, True)
    assert executor.submit(holds_itself, looped).result(timeout=60) == (True, True)
    result = executor.submit(repeated, big, 200).result(timeout=60)
    assert result == [big] * 200
    assert distinct(result) == 1


class Referrer:
    def __init__(self, ref):
        self.ref = ref


def held_is_given_and_changes_show(items, holder):
    same = items is holder.ref
    if isinstance(items, list):
        items.append("appended")
    else:
        items.extend(b"!")
    return same, len(holder.ref)


def a_buffer_and_its_holder(n):
    buf = bytearray(n)
    return buf, Referrer(buf)


def test_an_object_reached_both_in_the_call_and_through_an_attribute_arrives_as_one(
    executor, no_segment_leaks
):
    """A list holding a large ``bytes``, or a large ``bytearray``, given to
    a task and also held by an attribute of another argument (or returned
    so): one object in the worker, as pickle gives it, so that a change
    through one is seen through the other (before, the list was rebuilt to
    send its buffer out of band, and the attribute still named the
    original: two lists)."""
    rows = [b"x" * (LIMIT * 2)]
    assert executor.submit(held_is_given_and_changes_show, rows, Referrer(rows)).result(timeout=60) == (
        True,
        2,
    )
    buf = bytearray(LIMIT * 2)
    got = executor.submit(held_is_given_and_changes_show, buf, Referrer(buf)).result(timeout=60)
    assert got == (True, LIMIT * 2 + 1)
    back, holder = executor.submit(a_buffer_and_its_holder, LIMIT * 2).result(timeout=60)
    assert back is holder.ref
    assert len(back) == LIMIT * 2


SHORT_OF_ADDRESS_SPACE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (500 << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))  # ulimit -v
import warden

def make(n):
    return bytearray(n)

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        for n in (1 << 20, 200 << 20, 10):
            try:
                print(len(ex.submit(make, n).result(60)), flush=True)
            except Exception as e:
                print(type(e).__name__, flush=True)
"""


def test_a_bytearray_result_this_process_cannot_allocate_fails_its_task_with_memory_error_alone(program):
    # Under ulimit -v the worker lends the result and this process cannot
    # make a bytearray for it: CPython 3.11 frees a bytearray it failed to
    # allocate with a garbage export count, and printed a SystemError
    # ("deallocated bytearray object has exported buffers") beside it.
    run = program(SHORT_OF_ADDRESS_SPACE).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.lines[0] == "1048576" and run.lines[2] == "10", run.stdout
    assert run.lines[1] in ("MemoryError", "SegmentError", str(200 << 20)), run.stdout
    assert "SystemError" not in run.stderr, run.stderr


# -- a low limit of open files ----------------------------------------------
#
# Each call or result in flight with large buffers holds a file descriptor
# (its segment, or its lending table) until it is read. Under the soft limit
# most systems default to (1 024; 256 here, to need fewer tasks), a burst of
# them must neither exhaust it nor lose a task.

BURST = """
import resource, sys
import warden

SIZE = 100_000

def size_of(b):
    return len(b), b[:1]

def block(i):
    return bytes([i % 251]) * SIZE

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    n = int(sys.argv[1])
    with warden.ProcessPoolExecutor(2) as ex:
        if sys.argv[2] == "arguments":
            data = [bytes([i % 251]) * SIZE for i in range(n)]
            futures = [ex.submit(size_of, b) for b in data]
            wrong = [i for i, f in enumerate(futures) if f.result(timeout=60) != (SIZE, bytes([i % 251]))]
        else:
            futures = [ex.submit(block, i) for i in range(n)]
            wrong = [i for i, f in enumerate(futures) if f.result(timeout=60) != bytes([i % 251]) * SIZE]
    print("wrong", len(wrong), flush=True)
"""


@pytest.mark.parametrize("what", ["arguments", "results"])
def test_a_burst_of_large_buffers_under_a_low_open_file_limit_loses_no_task(program, what):
    run = program(BURST).run(timeout=120, args=("2000", what))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["wrong", "0"], run.stderr


MANY_WORKERS_FEW_FDS = """
import resource, sys
import warden

def size_of(b):
    return len(b), b[:1]

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    data = [bytes([i]) * 200_000 for i in range(200)]
    pool = warden.Pool(16) if sys.argv[1] == "pool" else warden.ProcessPoolExecutor(16)
    with pool:
        out = list(pool.map(size_of, data))
    print("wrong", sum(o != (200_000, bytes([i])) for i, o in enumerate(out)), flush=True)
"""


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_many_workers_sent_large_calls_ahead_under_a_low_open_file_limit_lose_no_task(program, api):
    """16 workers, each sent calls with large buffers ahead, in a process
    allowed 128 descriptors (the standard library's pool runs this program):
    queueing a call to a worker takes no descriptor of its own (it took a
    copy of the call's segment, and failed the task, ``EMFILE``, once the
    copies used up the limit)."""
    run = program(MANY_WORKERS_FEW_FDS).run(timeout=120, args=(api,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["wrong", "0"], run.stderr


BROADCAST = """
import resource, sys
import warden
from warden import _oob

def size_of(block, i):
    return len(block), i

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    _oob.INLINE_FALLBACK_MAX = 1 << 20  # as if each call were over 64 MiB
    block = b"x" * (2 << 20)
    n = int(sys.argv[1])
    with warden.ProcessPoolExecutor(2) as ex:  # not started before the first call
        futures = [ex.submit(size_of, block, i) for i in range(n)]
        right = sum(f.result(timeout=60) == (len(block), i) for i, f in enumerate(futures))
        print("right", right, flush=True)
"""


def test_one_buffer_too_large_to_go_inline_sent_to_many_tasks_waits_for_descriptors_and_loses_none(program):
    """The same large array given to many more tasks than the open file
    limit allows descriptors for (each call in flight holds one or two until
    its worker has it), and too large to be pickled into each call: submits
    wait for descriptors to come free as workers take the calls, and every
    task runs (before, a submit raised ``EMFILE``, and a pool not yet started
    failed as a whole, unable to start its workers)."""
    run = program(BROADCAST).run(timeout=120, args=("600",))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["right", "600"], run.stderr


ONE_LARGE_CALL_FEW_FDS = """
import os, resource, sys
import warden
from warden import _oob

if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    _oob.INLINE_FALLBACK_MAX = 1 << 20  # as if the call were over 64 MiB
    block = b"x" * (2 << 20)
    executor = sys.argv[1] == "executor"
    pool = warden.ProcessPoolExecutor(2) if executor else warden.Pool(2)
    with pool:
        print("warm", pool.submit(len, b"").result(60) if executor else pool.apply(len, (b"",)))
        # The program's own files fill the table into the quarter the pools
        # keep for starting workers and reading results (from fd 32 on).
        kept = []
        while not kept or kept[-1] < 40:
            kept.append(os.open(os.devnull, os.O_RDONLY))
        if executor:
            print("length", pool.submit(len, block).result(timeout=120), flush=True)
        else:
            print("length", pool.apply(len, (block,)), flush=True)
"""


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_a_large_call_with_nothing_in_flight_takes_a_reserved_descriptor_not_waiting_in_vain(program, api):
    """A process whose own files fill its descriptor table into the quarter
    the pools keep for starting workers and reading results: a call too
    large to go inline waited (60 s, then ``EMFILE``) for a call in flight
    to give one back, where there was none; it now takes one."""
    run = program(ONE_LARGE_CALL_FEW_FDS).run(timeout=150, args=(api,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["warm", "0", "length", str(2 << 20)], run.stderr


CALLBACK_CHAIN_FEW_FDS = """
import resource, sys, threading
import warden
from warden import _oob

def length(block, i):
    return len(block), i

if __name__ == "__main__":
    _oob.INLINE_FALLBACK_MAX = 1 << 20  # as if each call were over 64 MiB
    _oob.FDS_WAIT = 10.0  # a wait in vain fails sooner
    executor = sys.argv[1] == "executor"
    pool = warden.ProcessPoolExecutor(2) if executor else warden.Pool(2)
    with pool:
        print("warm", pool.submit(len, b"").result(60) if executor else pool.apply(len, (b"",)), flush=True)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))  # its reserve in use from fd 36 on
        block = b"x" * (2 << 20)
        done, seen, errors = threading.Event(), [], []

        def submit(i, then):
            if executor:
                pool.submit(length, block, i).add_done_callback(lambda f: then(f.result()))
            else:
                pool.apply_async(length, (block, i), callback=then, error_callback=errors.append)

        def chain(outcome):
            seen.append(outcome[1])
            if len(seen) >= 6:
                return done.set()
            try:
                submit(-1, lambda _: None)  # another large call in flight
                submit(len(seen), chain)
            except OSError as e:
                errors.append(e)
                done.set()

        submit(0, chain)
        done.wait(60)
        print("chain", *seen, "errors", *[f"{type(e).__name__}:{e.errno}" for e in errors], flush=True)
"""


@pytest.mark.parametrize("api", ["executor", "pool"])
def test_large_calls_made_in_callbacks_while_short_of_descriptors_do_not_wait_on_their_own_thread(
    program, api
):
    """Callbacks run on the thread that delivers outcomes, whose delivery is
    what lets the descriptors of calls in flight go: a callback making two
    large calls while the process is short of descriptors waited for them
    (60 s, then ``EMFILE``: its chain of calls ended), as that thread could
    not deliver anything meanwhile. Its calls now go inline."""
    run = program(CALLBACK_CHAIN_FEW_FDS).run(timeout=150, args=(api,))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["warm 0", "chain 0 1 2 3 4 5 errors"], run.stderr


CALLBACK_FAN_OUT_FEW_FDS = """
import resource, threading
import warden
from warden import _oob

def length(block, i):
    return len(block), i

if __name__ == "__main__":
    _oob.INLINE_FALLBACK_MAX = 1 << 20  # as if each call were over 64 MiB
    _oob.FDS_WAIT = 10.0
    with warden.Pool(2, maxtasksperchild=1) as pool:  # workers keep starting
        print("warm", pool.apply(len, (b"",)), flush=True)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        block = b"x" * (2 << 20)
        done, results, errors = threading.Event(), [], []

        def count(into):
            def counted(outcome):
                into.append(outcome)
                if len(results) + len(errors) == 40:
                    done.set()
            return counted

        def fan_out(_):
            for i in range(40):
                pool.apply_async(length, (block, i), callback=count(results), error_callback=count(errors))

        pool.apply_async(len, (b"",), callback=fan_out)
        done.wait(90)
        print("results", sorted(i for _, i in results), flush=True)
        print("errors", [type(e).__name__ for e in errors], flush=True)
        print("after", pool.apply(length, (block, 99)), flush=True)
"""


def test_a_callback_making_many_large_calls_while_short_of_descriptors_leaves_the_pools_reserve(program):
    """A callback's calls, which cannot wait for descriptors, go inline while
    this process is short of them: taking one each from the reserve the pool
    keeps for starting workers and reading results, forty of them used it up
    and the pool failed, unable to start a worker."""
    run = program(CALLBACK_FAN_OUT_FEW_FDS).run(timeout=150)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "warm 0",
        f"results {list(range(40))}",
        "errors []",
        f"after ({2 << 20}, 99)",
    ], run.stderr


def test_a_result_this_process_has_no_descriptor_for_fails_alone_with_emfile(program):
    prog = program(
        """
        import errno, os, resource
        import warden

        def block(n):
            return b"x" * n

        if __name__ == "__main__":
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            with warden.ProcessPoolExecutor(1) as ex:
                pid = ex.submit(os.getpid).result(timeout=60)
                held = []
                try:
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError as e:
                    assert e.errno == errno.EMFILE
                try:
                    ex.submit(block, 1 << 20).result(timeout=60)
                except OSError as e:
                    print("lost", errno.errorcode[e.errno], "too many open files" in str(e), flush=True)
                for fd in held:
                    os.close(fd)
                print("then", len(ex.submit(block, 1 << 20).result(timeout=60)), flush=True)
                print("same worker", ex.submit(os.getpid).result(timeout=60) == pid, flush=True)
        """
    )
    run = prog.run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["lost EMFILE True", f"then {1 << 20}", "same worker True"], run.stderr


NO_ROOM_FOR_A_SEGMENT = """
import errno, multiprocessing, os, resource, sys
import warden

def size_of(b):
    return type(b).__name__, len(b), bytes(b[:1])

def make(n):
    return bytearray(b"y" * n)

if __name__ == "__main__":
    how, impl = sys.argv[1], sys.argv[2]
    if how == "refused":
        refuse_system_call("memfd_create", errno.EPERM)
        try:
            os.memfd_create("probe")
        except PermissionError:
            pass
        else:
            raise AssertionError("memfd_create still works")
        if impl == "warden":
            try:
                warden.Event()
            except OSError as e:
                print("event", "memfd_create refused" in str(e), flush=True)
    if impl == "warden":
        ex, pool = warden.ProcessPoolExecutor(1), warden.Pool(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        import concurrent.futures as cf
        ex, pool = cf.ProcessPoolExecutor(1, mp_context=ctx), ctx.Pool(1)
    with ex, pool:
        print("warm", ex.submit(len, b"").result(timeout=60), pool.apply(len, (b"",)), flush=True)
        held = []
        if how == "file-size":
            # A memfd counts against it as a file does.
            resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, resource.RLIM_INFINITY))
        elif how == "descriptors":
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
            os.close(held.pop())  # one left: no pipe, and one segment at most
        for arg in (b"x" * (1 << 20), bytearray(b"x" * (1 << 20))):
            print("executor", *ex.submit(size_of, arg).result(timeout=60), flush=True)
            print("pool", *pool.apply_async(size_of, (arg,)).get(timeout=60), flush=True)
        if how in ("file-size", "refused"):
            print("result", len(ex.submit(make, 1 << 20).result(timeout=60)), flush=True)
        for fd in held:
            os.close(fd)
    print("done", flush=True)
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
@pytest.mark.parametrize("how", ["file-size", "descriptors", "refused"])
def test_large_buffers_go_inline_when_no_segment_can_be_made_as_the_standard_library_sends_them(
    program, how, impl, carrier
):
    """A file size limit (``ulimit -f``: a memfd is a file), a descriptor
    table with one slot left, or ``memfd_create`` refused (a sandbox's
    seccomp filter): the buffers travel in the pickle instead of failing the
    call with ``EFBIG``, ``EMFILE`` or ``EPERM``, as the standard library
    (which always sends them so) delivers them."""
    if impl == "stdlib" and carrier == "lent":
        pytest.skip("the standard library has no carriers")
    if how == "refused" and platform.machine() not in SECCOMP_MACHINES:
        pytest.skip("the filter names memfd_create's number on x86-64 and aarch64 only")
    run = program(REFUSE_SYSTEM_CALL + NO_ROOM_FOR_A_SEGMENT).run(timeout=120, args=(how, impl))
    assert run.returncode == 0, run.stderr
    mib = str(1 << 20)
    expected = ["event True"] if how == "refused" and impl == "warden" else []
    expected.append("warm 0 0")
    for kind in ("bytes", "bytearray"):
        expected += [f"executor {kind} {mib} b'x'", f"pool {kind} {mib} b'x'"]
    if how in ("file-size", "refused"):
        expected.append(f"result {mib}")
    assert run.stdout.splitlines() == [*expected, "done"], run.stderr


# -- numpy --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "uint8", "int32", "complex128"])
def test_numpy_arrays_round_trip_byte_exact_around_the_inline_limit(executor, no_segment_leaks, dtype):
    np = numpy()
    itemsize = np.dtype(dtype).itemsize
    for n in [0, 1, LIMIT // itemsize - 1, LIMIT // itemsize, LIMIT // itemsize + 1, (4 << 20) // itemsize]:
        rng = np.random.default_rng(n)
        a = (rng.random(n) * 1000).astype(dtype)
        back = executor.submit(identity, a).result(timeout=60)
        assert back.dtype == a.dtype and back.shape == a.shape, n
        assert back.tobytes() == a.tobytes(), n
        assert back.flags.writeable, n
        del back


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_numpy_array_layouts_round_trip(executor, no_segment_leaks, order):
    np = numpy()
    a = np.arange(512 * 300, dtype=np.float64).reshape(512, 300)
    if order == "F":
        a = np.asfortranarray(a)
    elif order == "strided":
        a = a[::2, ::3]
    back = executor.submit(identity, a).result(timeout=60)
    assert np.array_equal(back, a)
    assert back.flags.f_contiguous == a.flags.f_contiguous or order == "strided"
    del back


def test_a_large_numpy_array_is_rebuilt_on_a_mapping_without_another_copy(executor, no_segment_leaks):
    np = numpy()
    a = np.ones(1 << 20)
    assert executor.submit(describe, a).result(timeout=60) == ("ndarray", True)
    back = executor.submit(identity, a).result(timeout=60)
    assert describe(back) == ("ndarray", True)
    back[0] = 5.0  # writable, and private to this process
    assert a[0] == 1.0
    del back


def memory_holding(a) -> int:
    """The size of the memory warden received array ``a`` on (the segment
    or the mapping a lent buffer was read into), which it keeps alive; 0
    for an array that came inline."""
    base = a
    while base is not None and type(base).__name__ != "SegmentBuffer":
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return 0 if base is None else len(base.segment)


def big_and_small(_: int):
    np = numpy()
    return np.ones(32 << 17), np.arange(20_000, dtype=np.float64)  # 32 MiB, 160 KB


def kept_small_holds(big, small) -> int:
    return memory_holding(small)


def test_an_array_kept_from_a_result_or_a_call_holds_its_own_memory_not_its_larger_siblings(
    executor, no_segment_leaks
):
    # ``coef = fit(...)[1]``: keeping the small part of a result (or of a
    # call, in the worker) must not keep the large part's memory too.
    np = numpy()
    big, small = executor.submit(big_and_small, 0).result(timeout=60)
    assert np.array_equal(small, np.arange(20_000)) and big.sum() == 32 << 17
    del big
    gc.collect()
    assert 0 < memory_holding(small) < 4 << 20
    held = executor.submit(kept_small_holds, np.ones(32 << 17), np.arange(20_000.0)).result(timeout=60)
    assert 0 < held < 4 << 20
    del small


def big_and_medium(_: int):
    np = numpy()
    return np.ones(16 << 20), np.ones(6 << 17)  # 128 MiB, 6 MiB


def test_an_array_over_4_mib_kept_beside_one_sixteen_times_its_size_holds_its_own_memory(
    executor, no_segment_leaks
):
    numpy()  # or a skip
    big, medium = executor.submit(big_and_medium, 0).result(timeout=60)
    del big
    gc.collect()
    assert medium.sum() == 6 << 17
    assert 0 < memory_holding(medium) < 16 << 20
    del medium


def first_holds(arrays) -> int:
    return memory_holding(arrays[0])


def test_arrays_of_similar_sizes_stay_where_they_arrived_uncopied(executor, carrier, no_segment_leaks):
    # A chunk of a map: no array is much smaller than another, so none is
    # copied out of its segment (a lent one has memory of its own anyway).
    np = numpy()
    held = executor.submit(first_holds, [np.ones(1 << 17) for _ in range(8)]).result(timeout=60)
    if carrier == "segments":
        assert held > 8 << 20  # the whole segment
    else:
        assert held == 1 << 20


def test_a_small_numpy_array_stays_inline(executor, no_segment_leaks):
    np = numpy()
    assert executor.submit(describe, np.ones(16)).result(timeout=60) == ("ndarray", False)


def test_many_arrays_through_map_come_back_in_order(no_segment_leaks):
    np = numpy()
    arrays = [np.full(LIMIT // 8 + i, i, dtype=np.float64) for i in range(40)]
    with warden.ProcessPoolExecutor(2) as ex:
        back = list(ex.map(identity, arrays, chunksize=7))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
    del back


# -- read-only numpy arrays ---------------------------------------------------

#: Sizes in bytes: inline, at the limit, out of band.
READ_ONLY_SIZES = [LIMIT - 16, LIMIT, LIMIT + 16, 4 << 20]


def pattern(n: int) -> bytes:
    return bytes(range(251)) * (n // 251) + bytes(range(n % 251))


def add_one_in_place(a):
    """What a task does to its own copy: ``a -= a.mean()``, say."""
    a += 1  # ValueError: output array is read-only, on a read-only array
    return a


def read_only_array(n: int):
    """A result as decoding a message gives it: an array over ``bytes``."""
    import numpy as np

    return np.frombuffer(pattern(n), dtype=np.uint8)


def read_only_arguments(np, n: int) -> list:
    decoded = np.frombuffer(pattern(n), dtype=np.uint8)
    frozen = np.frombuffer(pattern(n), dtype=np.int64, count=n // 8).copy().reshape(-1, 2)
    frozen.flags.writeable = False
    fortran = np.asfortranarray(frozen)
    fortran.flags.writeable = False
    return [decoded, frozen, fortran]


def read_only_round_trips(np, call) -> list:
    """What a program sees sending read-only arrays to ``call(fn, arg)`` and
    getting read-only arrays back: for each, whether the array that arrived
    was writable and held the right bytes (or the error)."""
    seen = []
    for n in READ_ONLY_SIZES:
        for a in read_only_arguments(np, n):
            before = a.tobytes()
            try:
                back = call(add_one_in_place, a)
            except ValueError as e:
                seen.append((n, "argument", str(e)))
                continue
            seen.append(
                (n, "argument", back.flags.writeable, np.array_equal(back, a + 1), back.dtype, back.shape)
            )
            assert not a.flags.writeable and a.tobytes() == before  # the caller's, untouched
        back = call(read_only_array, n)
        seen.append((n, "result", back.flags.writeable, back.tobytes() == pattern(n)))
        back += 1  # the caller's own
        del back
    return seen


def expected_read_only_round_trips(np) -> list:
    seen = []
    for n in READ_ONLY_SIZES:
        for a in read_only_arguments(np, n):
            seen.append((n, "argument", True, True, a.dtype, a.shape))
        seen.append((n, "result", True, True))
    return seen


def test_a_large_pickle_is_searched_whole_for_the_names_that_need_the_special_unpickler():
    # Past _SEARCH_HERE_MAX the extension searches; a miss there would leave
    # a read-only array read-only, a buffer's stand-in unresolved.
    for size in (_oob._SEARCH_HERE_MAX + 1, 1 << 20, (2 << 20) + 3):
        for needle in _oob._SPECIAL_NAMES:
            for at in (0, size // 2 - 5, size - len(needle)):
                data = bytearray(b"x" * size)
                data[at : at + len(needle)] = needle
                assert _oob._names_special(bytes(data)), (size, needle, at)
                assert _oob._names_special(memoryview(data)), (size, needle, at)
                data[at + len(needle) - 1] ^= 1
                assert not _oob._names_special(bytes(data)), (size, needle, at)


#: Whether the standard library's pools pickle with protocol 4, which gives
#: every array received a writable copy (3.14 made protocol 5 the default).
STDLIB_COPIES_ARRAYS = pickle.DEFAULT_PROTOCOL < 5


@pytest.mark.parametrize("api", ["executor", "pool_apply", "pool_map"])
def test_a_read_only_numpy_array_arrives_writable_and_byte_exact_as_argument_and_result(
    no_segment_leaks, api
):
    np = numpy()
    if api == "executor":
        with warden.ProcessPoolExecutor(1) as ex:
            seen = read_only_round_trips(np, lambda fn, a: ex.submit(fn, a).result(timeout=60))
    else:
        with warden.Pool(1) as pool:
            if api == "pool_apply":
                seen = read_only_round_trips(np, lambda fn, a: pool.apply_async(fn, (a,)).get(timeout=60))
            else:
                seen = read_only_round_trips(np, lambda fn, a: pool.map(fn, [a, a])[1])
    assert seen == expected_read_only_round_trips(np)


@pytest.mark.skipif(not STDLIB_COPIES_ARRAYS, reason="this Python's pools keep read-only arrays read-only")
@pytest.mark.parametrize("api", ["executor", "pool"])
def test_read_only_numpy_arrays_arrive_as_the_standard_librarys_pools_deliver_them(api):
    import concurrent.futures
    import multiprocessing

    np = numpy()
    ctx = multiprocessing.get_context("spawn")
    if api == "executor":
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as std:
            theirs = read_only_round_trips(np, lambda fn, a: std.submit(fn, a).result(timeout=60))
        with warden.ProcessPoolExecutor(1) as ex:
            ours = read_only_round_trips(np, lambda fn, a: ex.submit(fn, a).result(timeout=60))
    else:
        with ctx.Pool(1) as std:
            theirs = read_only_round_trips(np, lambda fn, a: std.apply_async(fn, (a,)).get(timeout=60))
        with warden.Pool(1) as pool:
            ours = read_only_round_trips(np, lambda fn, a: pool.apply_async(fn, (a,)).get(timeout=60))
    assert ours == theirs == expected_read_only_round_trips(np)


def in_place_report(arrays) -> list:
    """Adds one to each array in place; for each, the error, or whether it is
    writable and its bytes as received."""
    report = []
    for a in arrays:
        try:
            add_one_in_place(a)
        except ValueError as e:
            report.append(str(e))
        else:
            report.append((a.flags.writeable, (a - 1).tobytes()))
    return report


def report_in_place(queue, arrays) -> None:
    queue.put(in_place_report(arrays))


def process_report(Process, ctx, arrays) -> list:
    queue = ctx.Queue()
    p = Process(target=report_in_place, args=(queue, arrays))
    p.start()
    try:
        return queue.get(timeout=60)
    finally:
        p.join(30)
        if p.exitcode is None:
            p.kill()
            p.join(10)


def test_read_only_numpy_arrays_in_a_process_arguments_arrive_writable_as_with_the_standard_library():
    import multiprocessing

    np = numpy()
    ctx = multiprocessing.get_context("spawn")
    arrays = [a for n in (LIMIT - 16, 4 << 20) for a in read_only_arguments(np, n)]
    expected = [(True, a.tobytes()) for a in arrays]
    assert process_report(warden.Process, ctx, arrays) == expected
    if STDLIB_COPIES_ARRAYS:
        assert process_report(ctx.Process, ctx, arrays) == expected


_INITIAL = None


def keep_initial(arrays) -> None:
    global _INITIAL
    _INITIAL = arrays


def report_initial(_=None) -> list:
    return in_place_report(_INITIAL)


def test_read_only_numpy_arrays_in_a_pools_initargs_arrive_writable_as_with_the_standard_library():
    import multiprocessing

    np = numpy()
    arrays = [a for n in (LIMIT - 16, 4 << 20) for a in read_only_arguments(np, n)]
    expected = [(True, a.tobytes()) for a in arrays]
    with warden.Pool(1, initializer=keep_initial, initargs=(arrays,)) as pool:
        assert pool.apply_async(report_initial).get(timeout=60) == expected
    if STDLIB_COPIES_ARRAYS:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1, initializer=keep_initial, initargs=(arrays,)) as std:
            assert std.apply_async(report_initial).get(timeout=60) == expected


def test_a_writable_numpy_array_is_still_rebuilt_without_a_copy_and_a_read_only_one_on_its_own_memory(
    executor, no_segment_leaks, carrier
):
    np = numpy()
    frozen = np.ones(1 << 20)
    frozen.flags.writeable = False
    # Out of band, a read-only array is rebuilt on the mapping it arrived in
    # (private to the receiver): no copy either.
    assert executor.submit(describe, frozen).result(timeout=60) == ("ndarray", True)
    assert executor.submit(describe, np.ones(1 << 20)).result(timeout=60) == ("ndarray", True)
    back = executor.submit(read_only_array, 4 << 20).result(timeout=60)
    assert describe(back) == ("ndarray", True) and back.flags.writeable
    del back


# -- fairness -----------------------------------------------------------------


def test_a_short_task_never_waits_for_a_long_one_while_a_worker_is_idle(tmp_path):
    """The long task finishes only once the short one has: if the short one
    were queued behind it, neither would finish (the wait is bounded)."""
    long_go = tmp_path / "long"
    mid_go = tmp_path / "mid"
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(identity, 0).result(timeout=60)
        long = ex.submit(wait_for_file_then, str(long_go), "long")
        mid = ex.submit(wait_for_file_then, str(mid_go), "mid")
        short = ex.submit(identity, "short")
        # Both workers are busy; the short task must go to whichever frees first.
        mid_go.write_text("x")
        assert mid.result(timeout=60) == "mid"
        assert short.result(timeout=30) == "short"
        assert not long.done()
        long_go.write_text("x")
        assert long.result(timeout=60) == "long"


def test_tiny_tasks_in_bursts_all_come_back_right_from_the_same_workers():
    """Between bursts the queue runs dry and an idle worker asks a busy one
    for the tasks it was sent ahead, over and over: no task is lost or run
    twice, and no worker answers out of turn (the pool would kill it)."""
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(identity, 0).result(timeout=60)
        assert wait_until(lambda: len(ex._warden_runner.core.workers()) == 2, timeout=60)
        before = {w.pid for w in ex._warden_runner.core.workers()}
        for burst in range(200):
            futures = [ex.submit(identity, (burst, i)) for i in range(50)]
            assert [f.result(timeout=60) for f in futures] == [(burst, i) for i in range(50)]
        assert {w.pid for w in ex._warden_runner.core.workers()} == before


def test_a_task_sent_ahead_to_a_busy_worker_can_still_be_cancelled(tmp_path):
    go = tmp_path / "go"
    with warden.ProcessPoolExecutor(2) as ex:
        busy = [ex.submit(wait_for_file_then, str(go), n) for n in range(2)]
        assert wait_until(lambda: all(f.running() for f in busy), timeout=60)
        # With both workers busy, these are sent ahead to them: not started,
        # so cancel() succeeds, as for any pending future.
        ahead = [ex.submit(identity, n) for n in range(4)]
        assert all(f.cancel() for f in ahead)
        assert all(f.cancelled() for f in ahead)
        pids = {w.pid for w in ex._warden_runner.core.workers()}
        go.write_text("x")
        assert [f.result(timeout=60) for f in busy] == [0, 1]
        assert ex.submit(identity, "after").result(timeout=60) == "after"
        # Nobody was stopped for it.
        assert {w.pid for w in ex._warden_runner.core.workers()} == pids


def note_and_sleep(path, n):
    with open(path, "a") as f:
        f.write(f"start {n}\n")
    time.sleep(0.002)
    with open(path, "a") as f:
        f.write(f"end {n}\n")
    return n


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
def test_cancelling_tasks_sent_ahead_never_cuts_off_a_task_runs_a_cancelled_one_nor_loses_one(tmp_path, how):
    # Many short tasks, most sent ahead to the workers, then every future
    # cancelled (or the executor shut down with cancel_futures) while they
    # run. A cancel can cross a task a worker has just started (done with
    # the one before): that task runs to its end, and its future is not
    # cancelled. Nothing is stopped for it, so no task is cut off midway; no
    # task whose future reads cancelled ran; no task nobody cancelled fails.
    for round_ in range(5):
        started = tmp_path / f"started-{round_}"
        ex = warden.ProcessPoolExecutor(2)
        try:
            ex.submit(identity, 0).result(timeout=60)
            assert wait_until(lambda ex=ex: len(ex._warden_runner.core.workers()) == 2, timeout=60)
            futures = [ex.submit(note_and_sleep, str(started), n) for n in range(400)]
            time.sleep(0.1)  # both workers busy, tasks sent ahead to each
            if how == "cancel":
                cancelled = {n for n, f in enumerate(futures) if f.cancel()}
            else:
                ex.shutdown(wait=False, cancel_futures=True)
            outcomes = {}
            for n, f in enumerate(futures):
                try:
                    outcomes[n] = f.result(timeout=60)
                except CancelledError:
                    outcomes[n] = "cancelled"
            if how == "shutdown":
                cancelled = {n for n, o in outcomes.items() if o == "cancelled"}
        finally:
            ex.shutdown(wait=True)
        log = started.read_text().splitlines() if started.exists() else []
        begun = {int(line.split()[1]) for line in log if line.startswith("start")}
        ended = {int(line.split()[1]) for line in log if line.startswith("end")}
        assert begun == ended, f"cut off midway: {sorted(begun - ended)}"
        assert not begun & cancelled, f"cancelled, yet ran: {sorted(begun & cancelled)}"
        assert all(outcomes[n] == n for n in range(400) if n not in cancelled)
        assert not cancelled - {n for n in range(400) if outcomes[n] == "cancelled"}


KEPT_NEAR_THE_MAP_LIMIT = """
import mmap
import sys

import numpy as np

import warden


def maps():
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def make(i, kind):
    # 65 600 bytes: just over the inline limit, so each result has a segment.
    array = np.full(8200, i, dtype=np.float64)
    if kind == "pyarrow":
        import pyarrow

        return pyarrow.array(array)
    return array


def exact(i, result, kind):
    if kind == "pyarrow":
        return len(result) == 8200 and result[0].as_py() == i and result[8199].as_py() == i
    return result.shape == (8200,) and bool((result == i).all())


if __name__ == "__main__":
    kind, count, free = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(make, 0, kind).result(timeout=60)
        limit = int(open("/proc/sys/vm/max_map_count").read())
        # A program that uses most of its mappings already: `free` are left.
        hold = []
        while maps() < limit - free:
            for _ in range(min(1000, max(1, (limit - free - maps()) // 2))):
                prot = mmap.PROT_READ if len(hold) % 2 else mmap.PROT_READ | mmap.PROT_WRITE
                hold.append(mmap.mmap(-1, 4096, prot=prot))  # alternating: never merged
        before = maps()
        kept = []
        try:
            for result in ex.map(make, range(count), [kind] * count, timeout=300):
                kept.append(result)
        except Exception as e:
            print("failed after", len(kept), type(e).__name__, str(e)[:200], flush=True)
        grown = maps() - before
        del hold
    print("kept", len(kept), "exact", all(exact(i, r, kind) for i, r in enumerate(kept)), flush=True)
    print("a mapping per result", grown >= count // 2, flush=True)
"""


@pytest.mark.parametrize("kind", ["numpy", "pyarrow"])
def test_small_results_kept_by_the_thousand_near_the_map_limit_all_arrive(program, carrier, kind):
    # A received segment of at most WARDEN_SEGMENT_COPY_MAX bytes is copied
    # out and not kept mapped: a program with 2 000 mappings left keeps
    # 3 000 results of 65 600 bytes each (a segment each: numpy's when
    # lending is off, pyarrow's always), as with the standard library.
    numpy()
    if kind == "pyarrow":
        pytest.importorskip("pyarrow", reason="pyarrow is optional (not installed here)")
    if not os.path.exists("/proc/sys/vm/max_map_count"):
        pytest.skip("no /proc/sys/vm/max_map_count to read")
    env = {"WARDEN_LEND_BUFFERS": "1" if carrier == "lent" else "0"}
    run = program(KEPT_NEAR_THE_MAP_LIMIT).run(timeout=400, env=env, args=(kind, "3000", "2000"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.lines == ["kept 3000 exact True", "a mapping per result False"], run.stderr[-3000:]
