"""Large buffers are lent: the receiver reads them straight out of the
sender's memory (``process_vm_readv``), and the sender holds them until
every reader is done.

What an outsider sees: a ``bytes`` or numpy array travels as the read end of
a pipe holding a table of addresses (no ``memfd``); the sender keeps the
buffers alive after the caller has dropped them, and lets them go once
every copy of that pipe is closed; a worker that exits right after its
result, or runs another task that changes the array it returned, still
hands the parent what the function returned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import sys
import time

import pytest

import warden
from warden import _oob, _pickle, _warden

from conftest import held_loans, numpy, wait_until

pytestmark = pytest.mark.skipif(
    not (_oob.LEND and _oob.may_lend(False) and _oob.may_lend(True)),
    reason="this kernel does not let these processes read each other's memory (see _oob.may_lend)",
)

BIG = 8 << 20


def carrier_kind(fd: int) -> str:
    mode = os.fstat(fd).st_mode
    return "table" if stat.S_ISFIFO(mode) else "segment"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: os.urandom(BIG), "table"),
        (lambda: numpy().ones(BIG // 8), "table"),
        (lambda: bytearray(BIG), "segment"),  # could be resized under the reader
        (lambda: memoryview(os.urandom(BIG)), "segment"),
    ],
    ids=["bytes", "numpy", "bytearray", "memoryview"],
)
def test_bytes_and_numpy_arrays_are_lent_and_resizable_buffers_go_in_a_segment(make, expected):
    _, fd = _pickle.dumps_oob((len, (make(),), {}))
    assert fd is not None
    try:
        assert carrier_kind(fd) == expected
    finally:
        os.close(fd)
    assert wait_until(lambda: not held_loans(), timeout=5)


def test_lent_buffers_are_held_until_every_reader_has_closed_the_table():
    payload = os.urandom(BIG)
    data, fd = _pickle.dumps_oob(payload)
    assert fd is not None and carrier_kind(fd) == "table"
    other_reader = os.dup(fd)  # as the core keeps its copy until the task ends
    del payload  # the loan keeps the buffer alive
    received = _oob.loads(data, fd)  # reads the table and our own memory, closes fd
    assert len(received) == BIG
    assert held_loans() == 1
    os.close(other_reader)
    assert wait_until(lambda: held_loans() == 0, timeout=5)


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def random_block(seed: int) -> tuple[str, bytes]:
    block = os.urandom(BIG)
    return digest(block), block


def test_an_argument_dropped_by_the_caller_right_after_submit_still_arrives_whole():
    with warden.ProcessPoolExecutor(2) as ex:
        expected = []
        futures = []
        for _ in range(6):
            block = os.urandom(BIG)
            expected.append(digest(block))
            futures.append(ex.submit(digest, block))
            del block
        assert [f.result(timeout=60) for f in futures] == expected
    assert wait_until(lambda: not held_loans(), timeout=5)


def test_a_result_lent_by_a_worker_that_exits_after_each_task_arrives_whole():
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
        pids = set()
        for d, block in ex.map(random_block, range(6)):
            assert digest(block) == d
        for pid in ex.map(_pid, range(4)):
            pids.add(pid)
        assert len(pids) == 4  # each task had a fresh worker


def _pid(_: int) -> int:
    return os.getpid()


_SHARED = None


def return_then_overwrite(step: int):
    """Step 0 returns a module-level array of zeros; step 1 fills that same
    array with ones (in the same worker) and returns its sum."""
    global _SHARED
    import numpy as np

    if _SHARED is None:
        _SHARED = np.zeros(32 << 17)  # 32 MiB
    if step == 0:
        return _SHARED
    _SHARED[:] = 1.0
    return float(_SHARED.sum())


def test_a_worker_leaves_an_array_it_returned_alone_until_the_parent_has_read_it():
    np = numpy()
    with warden.ProcessPoolExecutor(1) as ex:
        for _ in range(3):
            first = ex.submit(return_then_overwrite, 0)
            second = ex.submit(return_then_overwrite, 1)
            returned = first.result(timeout=60)
            assert second.result(timeout=60) == float(returned.size)
            # What the function returned: zeros the first time; the same
            # array, all ones, in later rounds. Never a mix of the two.
            values = np.unique(returned)
            assert values.size == 1, values
            ex.submit(reset_shared).result(timeout=60)
            del returned


def reset_shared() -> None:
    if _SHARED is not None:
        _SHARED[:] = 0.0


def test_a_truncated_or_foreign_lending_table_is_refused():
    head = struct.Struct("<4sII")
    for table, message in [
        (head.pack(b"WDLN", os.getpid(), 2)[:6], "truncated"),
        (head.pack(b"WDLN", os.getpid(), 1), "truncated"),
        (head.pack(b"XXXX", os.getpid(), 0), "not valid"),
    ]:
        r, w = os.pipe()
        os.write(w, table)
        with pytest.raises(_oob.SegmentError, match=message):
            _oob.open_segment(r)
        with pytest.raises(OSError):
            os.fstat(r)  # taken and closed
        os.close(w)


def test_a_lent_buffer_that_cannot_be_read_fails_with_an_error_naming_the_way_out():
    head = struct.pack("<4sII", b"WDLN", os.getpid(), 1)
    table = head + struct.pack("<QQQ", 4096, 1 << 20, _warden.LENT_BYTES)
    r, w = os.pipe()
    os.write(w, table)
    with pytest.raises(OSError, match="WARDEN_LEND_BUFFERS=0") as caught:
        _oob.open_segment(r)
    assert "out of process" in str(caught.value)
    os.close(w)


NOT_DUMPABLE = """
import ctypes, os
import warden

def harden(_):
    # As code that holds secrets does (and a change of user does too).
    ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    return "hardened"

def make(n):
    return b"y" * n

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        print(len(ex.submit(make, 1 << 20).result(30)))
        print(ex.submit(harden, 0).result(30))
        print(len(ex.submit(make, 1 << 20).result(30)))
"""


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to drop CAP_SYS_PTRACE")
def test_a_worker_a_task_made_not_dumpable_sends_its_large_results_another_way(program):
    # Lending was decided once per process: the parent, without
    # CAP_SYS_PTRACE, could not read the results such a worker lent, and
    # every large result of that worker failed with PermissionError.
    prog = program(NOT_DUMPABLE)
    drop = (
        ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"] if os.geteuid() == 0 else []
    )
    proc = prog.start(command=[*drop, sys.executable, str(prog.path)])
    out, err = proc.communicate(timeout=60)  # (the fixture kills what is left)
    assert proc.returncode == 0, err
    assert out.split() == [str(1 << 20), "hardened", str(1 << 20)], out + err


CHANGED_USER = """
import os
import warden

def become_nobody(_):
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        ex.submit(become_nobody, 0).result(30)
        try:
            ex.submit(len, b"x" * (1 << 20)).result(30)
        except PermissionError as e:
            print(e)
        print(ex.submit(len, b"x" * 1000).result(30))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a task can change its worker's user only as root")
def test_a_worker_whose_task_changed_its_user_says_so_when_it_cannot_read_a_lent_call(program):
    # It may no longer read the parent's memory: that task fails (a
    # documented limit), its error says why, and small calls go on.
    run = program(CHANGED_USER).run()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and "user or group changed" in lines[0] and lines[1] == "1000", (
        run.stdout + run.stderr
    )


def test_memory_a_received_array_was_read_into_is_reused_once_the_array_is_gone():
    np = numpy()
    source = np.arange(BIG // 8, dtype=np.float64)
    address, size = _warden.buffer_address(memoryview(source).cast("B"))
    first = _warden.read_remote(os.getpid(), [(address, size, _warden.LENT_RAW)], size)[0]
    where = _warden.buffer_address(first)[0]
    assert np.array_equal(np.frombuffer(first, dtype=np.float64), source)
    del first
    assert mapped_at(where), "the memory is kept as a spare"
    source[:] = -1.0
    second = _warden.read_remote(os.getpid(), [(address, size, _warden.LENT_RAW)], size)[0]
    assert _warden.buffer_address(second)[0] == where
    assert np.array_equal(np.frombuffer(second, dtype=np.float64), source)


def mapped_at(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_many_lent_buffers_of_odd_sizes_read_by_two_threads_arrive_byte_exact():
    np = numpy()
    # Over 8 MiB in all: the receiver cuts the read into 4 MiB pieces and
    # shares them between two threads.
    sizes = [(5 << 20) + 3, 64 << 10, (3 << 20) + 1, (9 << 20) + 7]
    blocks = [os.urandom(n) for n in sizes]
    arrays = [np.frombuffer(os.urandom(n - n % 8), dtype=np.float64).copy() for n in sizes]
    with warden.ProcessPoolExecutor(1) as ex:
        back_blocks, back_arrays = ex.submit(swap, arrays, blocks).result(timeout=60)
    assert [digest(b) for b in back_blocks] == [digest(b) for b in blocks]
    assert [a.tobytes() for a in back_arrays] == [a.tobytes() for a in arrays]  # random bits: NaNs too


def swap(a, b):
    return b, a


# The child only looks at a module global and exits: no lock is taken in it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_a_forked_child_holds_none_of_its_parents_loans():
    payload = os.urandom(BIG)
    _, fd = _pickle.dumps_oob(payload)
    assert fd is not None and held_loans() == 1
    pid = os.fork()
    if pid == 0:  # the child: no lender, and the parent's loan fds closed
        os._exit(0 if _oob._the_lender is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert held_loans() == 1  # the parent's loan is untouched
    os.close(fd)
    assert wait_until(lambda: held_loans() == 0, timeout=5)


def test_memory_a_small_received_array_was_read_into_is_given_back():
    np = numpy()
    source = np.arange((1 << 20) // 8, dtype=np.float64)  # under the size a spare is kept for
    address, size = _warden.buffer_address(memoryview(source).cast("B"))
    first = _warden.read_remote(os.getpid(), [(address, size, _warden.LENT_RAW)], size)[0]
    where = _warden.buffer_address(first)[0]
    del first
    assert not mapped_at(where)


def hold_then_digest(started: str, payload: bytes) -> str:
    import time

    with open(started, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return digest(payload)


def test_a_worker_killed_with_a_lent_argument_fails_that_task_and_the_loan_is_let_go(tmp_path):
    import signal

    started = tmp_path / "started"
    payload = os.urandom(BIG)
    with warden.ProcessPoolExecutor(1) as ex:
        future = ex.submit(hold_then_digest, str(started), payload)
        assert wait_until(lambda: started.exists() and started.read_text(), timeout=60)
        assert held_loans() == 1
        os.kill(int(started.read_text()), signal.SIGKILL)
        with pytest.raises(warden.WorkerCrashed):
            future.result(timeout=60)
        assert wait_until(lambda: held_loans() == 0, timeout=10)
        assert ex.submit(digest, payload).result(timeout=60) == digest(payload)
    assert wait_until(lambda: held_loans() == 0, timeout=10)


# -- the caller's buffers are let go when the task has its outcome -------------


def checksum(a) -> int:
    return int(a.sum())


MAPPED = 1 << 20


def mapped_file(tmp_path):
    path = tmp_path / "mapped"
    path.write_bytes(b"\x01" * MAPPED)
    return path


def close_right_after_each_call(path, call, rounds: int = 30) -> list:
    """Runs ``call(array over a memory map of path)`` ``rounds`` times, each
    inside ``with mmap.mmap(...)``: leaving the block closes the map, which
    raises ``BufferError`` if anything still holds an export of it. Returns
    what each round gave, or the error."""
    import mmap

    np = numpy()
    seen = []
    for _ in range(rounds):
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                value = call(np.frombuffer(mm, dtype=np.uint8))
        except BufferError as e:
            seen.append(repr(e))
        else:
            seen.append(value)
    return seen


@pytest.mark.parametrize("api", ["submit", "map", "apply_async", "pool_map", "pool_map_async"])
def test_a_memory_map_closes_right_after_the_result_of_a_task_it_was_lent_to(tmp_path, api):
    path = mapped_file(tmp_path)
    if api in ("submit", "map"):
        with warden.ProcessPoolExecutor(1) as ex:
            if api == "submit":
                seen = close_right_after_each_call(path, lambda a: ex.submit(checksum, a).result(timeout=60))
            else:
                seen = close_right_after_each_call(path, lambda a: sum(ex.map(checksum, [a], timeout=60)))
    else:
        with warden.Pool(1) as pool:
            if api == "apply_async":
                seen = close_right_after_each_call(
                    path, lambda a: pool.apply_async(checksum, (a,)).get(timeout=60)
                )
            elif api == "pool_map":
                seen = close_right_after_each_call(path, lambda a: pool.map(checksum, [a])[0])
            else:
                seen = close_right_after_each_call(
                    path, lambda a: pool.map_async(checksum, [a]).get(timeout=60)[0]
                )
    assert seen == [MAPPED] * 30
    assert wait_until(lambda: not held_loans(), timeout=5)


def test_a_memory_map_closes_right_after_a_result_as_with_the_standard_library(tmp_path):
    import concurrent.futures
    import multiprocessing

    path = mapped_file(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as std:
        theirs = close_right_after_each_call(path, lambda a: std.submit(checksum, a).result(timeout=60))
    with warden.ProcessPoolExecutor(1) as ex:
        ours = close_right_after_each_call(path, lambda a: ex.submit(checksum, a).result(timeout=60))
    assert ours == theirs == [MAPPED] * 30


def wait_for_file(path: str) -> bool:
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def test_a_memory_map_closes_right_after_a_task_it_was_lent_to_is_cancelled(tmp_path):
    path = mapped_file(tmp_path)
    go = tmp_path / "go"
    with warden.ProcessPoolExecutor(1) as ex:
        busy = ex.submit(wait_for_file, str(go))
        try:
            assert wait_until(busy.running, timeout=60)

            def cancelled(a):
                future = ex.submit(checksum, a)  # queued behind the busy task (or sent ahead)
                return future.cancel() and future.cancelled()

            seen = close_right_after_each_call(path, cancelled)
        finally:
            go.write_text("x")
        assert busy.result(timeout=60) is True
    assert seen == [True] * 30
    assert wait_until(lambda: not held_loans(), timeout=5)


LENDER_AFTER_POOLS = """
import os
import threading
import warden

def size(b):
    return len(b)

def threads():
    return [t.name for t in threading.enumerate()]

def pipes():
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:  # the directory listing's own fd
            pass
    return found

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:  # what a pool alone leaves
        ex.submit(size, b"").result()
    base = pipes()
    for _ in range(2):  # the second pool lends again after the first one's lender ended
        with warden.ProcessPoolExecutor(2) as ex:
            big, small = ex.submit(size, os.urandom(1 << 20)), ex.submit(size, b"x" * (1 << 17))
            print("sizes", big.result(), small.result())
        print("threads", threads(), "pipes", pipes() - base)
    with warden.Pool(2) as pool:
        print("sizes", sum(pool.map(size, [b"y" * (1 << 17)] * 8)))
    print("threads", threads(), "pipes", pipes() - base)
"""


def test_no_lending_thread_or_pipe_outlives_the_pools_that_read_the_loans(program):
    # A thread left behind makes a later fork() warn on Python 3.12+, and
    # its pipes count against the program's fds.
    run = program(LENDER_AFTER_POOLS).run()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        f"sizes {1 << 20} {1 << 17}",
        "threads ['MainThread'] pipes 0",
        f"sizes {1 << 20} {1 << 17}",
        "threads ['MainThread'] pipes 0",
        f"sizes {8 << 17}",
        "threads ['MainThread'] pipes 0",
    ]


def large_result(_: int) -> bytes:
    return b"x" * 200_000  # lent: above the inline limit


def test_a_slow_callback_costs_no_large_result_of_the_workers_exiting_meanwhile():
    # The results thread runs the callbacks and reads lent results: while a
    # callback sleeps, the workers retiring (max_tasks_per_child, the
    # shutdown at the end of the block) wait for it to read theirs.
    with warden.ProcessPoolExecutor(2, max_tasks_per_child=2) as ex:
        futures = [ex.submit(large_result, i) for i in range(12)]
        futures[0].add_done_callback(lambda f: time.sleep(6))
    assert [f.exception() for f in futures] == [None] * 12
    assert all(f.result() == b"x" * 200_000 for f in futures)


def test_shutting_down_in_a_callback_refuses_to_wait_and_every_result_still_arrives():
    refused = []

    def shut_down(_: object) -> None:
        try:
            ex.shutdown()
        except RuntimeError as e:
            refused.append(str(e))

    ex = warden.ProcessPoolExecutor(2)
    try:
        futures = [ex.submit(large_result, i) for i in range(20)]
        futures[0].add_done_callback(shut_down)
        assert all(f.result(timeout=30) == b"x" * 200_000 for f in futures)
    finally:
        ex.shutdown()
    assert len(refused) == 1 and "in one of its callbacks" in refused[0]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(large_result, 0)


def crash_now(*_: object) -> None:
    os._exit(3)


class EndsTheWorkerWhenUnpickled:
    def __reduce__(self):
        return (crash_now, ())


@pytest.mark.parametrize("api", ["executor", "pool", "arguments"])
def test_a_crash_of_the_next_task_costs_no_large_result_the_worker_returned_before_it(api):
    # The results thread is held by a callback while the one worker returns a
    # large result (lent: it lives in the worker's memory) and takes a task
    # that kills it. The worker does not start that task before the parent
    # has read the result: the crash fails only the task that crashed.
    if api == "executor":
        with warden.ProcessPoolExecutor(1) as ex:
            slow = ex.submit(_pid, 0)
            slow.add_done_callback(lambda f: time.sleep(1))
            result = ex.submit(large_result, 0)
            crash = ex.submit(crash_now)
            assert result.result(timeout=60) == b"x" * 200_000
            with pytest.raises(warden.WorkerCrashed):
                crash.result(timeout=60)
            assert ex.submit(_pid, 1).result(timeout=60) > 0  # the pool goes on
    elif api == "arguments":
        # The crash comes as the next call's arguments are unpickled.
        with warden.ProcessPoolExecutor(1) as ex:
            ex.submit(_pid, 0).add_done_callback(lambda f: time.sleep(1))
            result = ex.submit(large_result, 0)
            crash = ex.submit(_pid, EndsTheWorkerWhenUnpickled())
            assert result.result(timeout=60) == b"x" * 200_000
            with pytest.raises(warden.WorkerCrashed):
                crash.result(timeout=60)
    else:
        with warden.Pool(1) as pool:
            pool.apply_async(_pid, (0,), callback=lambda _: time.sleep(1))
            result = pool.apply_async(large_result, (0,))
            crash = pool.apply_async(crash_now)
            assert result.get(timeout=60) == b"x" * 200_000
            with pytest.raises(warden.WorkerCrashed):
                crash.get(timeout=60)
            assert pool.apply(_pid, (1,)) > 0


def test_the_wait_for_the_parent_to_read_a_lent_result_is_not_counted_in_the_next_tasks_timeout():
    # The next task waits until the parent has read the last result, which
    # a callback holding the results thread delays past the task timeout:
    # the task still runs, and no worker is stopped.
    # (A timeout a loaded machine's first task, importing this module in the
    # worker, does not run out of; the callback's delay twice as long.)
    with warden.ProcessPoolExecutor(1, task_timeout=2.0) as ex:
        pid = ex.submit(_pid, 0).result(timeout=60)
        slow = ex.submit(_pid, 0)
        slow.add_done_callback(lambda f: time.sleep(4.0))
        result = ex.submit(large_result, 0)
        after = ex.submit(_pid, 1)
        assert result.result(timeout=60) == b"x" * 200_000
        assert after.result(timeout=60) == pid


_inner = None


def lend_to_an_inner_pool(_: int) -> int:
    """Submits a large (lent) argument to a pool of the worker's own, whose
    task holds it for 30 s, and returns without waiting for it."""
    global _inner
    if _inner is None:
        _inner = warden.ProcessPoolExecutor(1)
    _inner.submit(hold, b"x" * BIG, 30)
    return os.getpid()


def hold(data: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(data)


def test_the_next_task_waits_for_the_parent_to_read_a_result_not_for_loans_to_a_workers_own_pool():
    # (The worker's inner pool is stopped as the worker exits.)
    with warden.ProcessPoolExecutor(1) as ex:
        pid = ex.submit(lend_to_an_inner_pool, 0).result(timeout=60)
        assert ex.submit(_pid, 1).result(timeout=20) == pid


INTERRUPTED_SUBMITS = """
import os
import sys
import threading

import warden
from warden import _oob

BIG = 1 << 20


def size(b):
    return len(b)


def fds():
    return len(os.listdir("/proc/self/fd"))


class Interrupt:
    # A profile hook that raises KeyboardInterrupt as the n-th Python
    # function is entered: where a Ctrl-C's handler runs (at a function's
    # start), at every such point of one call in turn.
    def __init__(self, n):
        self.n = n
        self.seen = 0

    def __call__(self, frame, event, arg):
        if event == "call":
            self.seen += 1
            if self.seen == self.n:
                sys.setprofile(None)
                raise KeyboardInterrupt


def sweep(send, wait):
    # Only the sending is interrupted: a Ctrl-C while waiting stops the pool.
    data = os.urandom(BIG)
    counter = Interrupt(0)
    sys.setprofile(counter)
    try:
        sent = send(data)
    finally:
        sys.setprofile(None)
    assert wait(sent) == BIG
    points, hits = counter.seen, 0
    for n in range(1, points + 1):
        sys.setprofile(Interrupt(n))
        try:
            sent = send(data)
        except KeyboardInterrupt:
            hits += 1
        else:
            sys.setprofile(None)
            assert wait(sent) == BIG
        finally:
            sys.setprofile(None)
    return points, hits


def settled():
    # A call interrupted after the pool took its task still runs it (the
    # caller got the Ctrl-C, not a handle): its buffers are let go with its
    # outcome, which may come after the sweep ends. A loan nothing lets go
    # while the pool is open is still held when this gives up.
    _oob.wait_for_readers(every=True, timeout=30)


def result(future):
    return future.result(timeout=60)


def get(result):
    return result.get(timeout=60)


def first(result):
    return result.get(timeout=60)[0]


if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:  # what a pool alone leaves
        ex.submit(size, b"").result()
    base = fds()
    with warden.ProcessPoolExecutor(1) as ex:
        points, hits = sweep(lambda data: ex.submit(size, data), result)
    print("submit", points > 20, hits > 20, "lent", _oob.lent_bytes(), flush=True)
    with warden.Pool(1) as pool:
        points, hits = sweep(lambda data: pool.apply_async(size, (data,)), get)
        settled()
        print("apply_async", points > 20, hits > 20, "lent", _oob.lent_bytes(), flush=True)
        points, hits = sweep(lambda data: pool.map_async(size, [data]), first)
        settled()
        print("map_async", points > 20, hits > 20, "lent", _oob.lent_bytes(), flush=True)
    _oob.settle(5.0)
    # Threads that run. (On 3.13 a KeyboardInterrupt raised inside
    # threading's Thread.start(), before it starts the thread, leaves one
    # in threading's list that never ran, as a Ctrl-C landing there would.)
    threads = [t.name for t in threading.enumerate() if t.is_alive()]
    print("threads", threads, "lent", _oob.lent_bytes(), "fds", fds() - base, flush=True)
"""


@pytest.mark.parametrize("lend", [True, False], ids=["lent", "segment"])
def test_a_ctrl_c_anywhere_in_a_large_submit_leaves_no_loan_pipe_segment_or_thread_behind(program, lend):
    # A KeyboardInterrupt raised as each Python function of a submit (and of
    # apply_async, and of a map_async) is entered, in turn: every time, whatever
    # was lent for the call, or copied into a segment, is let go: no bytes
    # stay lent, no pipe or memfd stays open, no lending thread outlives the
    # pools.
    run = program(INTERRUPTED_SUBMITS).run(timeout=240, env={"WARDEN_LEND_BUFFERS": "1" if lend else "0"})
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "submit True True lent 0",
        "apply_async True True lent 0",
        "map_async True True lent 0",
        "threads ['MainThread'] lent 0 fds 0",
    ], run.stderr[-3000:]
