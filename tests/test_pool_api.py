"""warden.Pool against the multiprocessing.Pool API, compared with the
standard library where the behaviour should match."""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import CancelledError

import pytest

import warden
import warden.pool

from conftest import wait_until


def square(x):
    return x * x


def power(base, exp):
    return base**exp


def fail_on(x, bad=3):
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def getpid(_=None):
    return os.getpid()


def raise_system_exit():
    raise SystemExit(2)


def record(path, *words):
    with open(path, "a") as f:
        f.write(" ".join(str(w) for w in (*words, os.getpid())) + "\n")


def numbers(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("iterable broke")
        yield i


@pytest.fixture
def pool():
    with warden.Pool(2) as p:
        yield p


@pytest.fixture(scope="module")
def std_pool():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as p:
        yield p


def test_results_and_iterators_are_instances_of_the_standard_library_types(pool, std_pool):
    def kinds(p):
        r = p.apply_async(square, (2,))
        m = p.map_async(square, [1, 2])
        it, unordered = p.imap(square, [1]), p.imap_unordered(square, [1])
        seen = {
            "Pool": isinstance(p, multiprocessing.pool.Pool),
            "ApplyResult": isinstance(r, multiprocessing.pool.ApplyResult),
            "AsyncResult": isinstance(r, multiprocessing.pool.AsyncResult),
            "MapResult": isinstance(m, multiprocessing.pool.MapResult),
            "MapResult is an ApplyResult": isinstance(m, multiprocessing.pool.ApplyResult),
            "IMapIterator": isinstance(it, multiprocessing.pool.IMapIterator),
            "imap not unordered": not isinstance(it, multiprocessing.pool.IMapUnorderedIterator),
            "IMapUnorderedIterator": isinstance(unordered, multiprocessing.pool.IMapUnorderedIterator),
        }
        assert (r.get(30), m.get(30), list(it), list(unordered)) == (4, [1, 4], [1], [1])
        return seen

    ours = kinds(pool)
    assert ours == kinds(std_pool)
    assert all(ours.values()), ours


@pytest.mark.parametrize("name", ["ApplyResult", "MapResult", "IMapIterator", "IMapUnorderedIterator"])
def test_result_types_subclass_the_standard_librarys_yet_inherit_none_of_its_machinery(pool, name):
    ours, std = getattr(warden.pool, name), getattr(multiprocessing.pool, name)
    assert issubclass(ours, std)
    # Only what touches no machinery comes from the standard library's class
    # (its __init__ never runs): every method users call is warden's own, and
    # the rest (_set, which its result handler calls) is absent.
    harmless = {"__dict__", "__weakref__", "__module__", "__doc__", "__class_getitem__"}
    harmless |= {"__firstlineno__", "__static_attributes__"}
    for attr in dir(std):
        owner = next(k for k in ours.__mro__ if attr in vars(k))
        if owner.__module__ == "multiprocessing.pool":
            assert attr in harmless, attr
        elif owner is not object:
            assert owner.__module__ == "warden.pool", attr
    made = {
        "ApplyResult": lambda: pool.apply_async(square, (2,)),
        "MapResult": lambda: pool.map_async(square, [2]),
        "IMapIterator": lambda: pool.imap(square, [2]),
        "IMapUnorderedIterator": lambda: pool.imap_unordered(square, [2]),
    }[name]()
    assert type(made) is ours
    for attr in ("_set", "_cache"):
        assert not hasattr(made, attr) and not hasattr(ours, attr), attr
    if name.startswith("IMap"):
        assert iter(made) is made and made.next(30) == 4
        with pytest.raises(StopIteration):
            next(made)
    else:
        made.wait(30)
        assert made.ready() and made.successful() and made.get(0) in (4, [4])
        assert ours[int] == types.GenericAlias(ours, int)  # annotations, as for the standard library's


def test_the_pool_inherits_none_of_the_standard_librarys_machinery(pool):
    # Its private methods would reach queues and threads that never existed.
    for attr in ("_repopulate_pool", "_maintain_pool", "_get_sentinels", "_handle_results", "Process"):
        assert hasattr(multiprocessing.pool.Pool, attr)
        assert not hasattr(pool, attr) and not hasattr(warden.Pool, attr), attr


def sleep_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def note_pid(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_a_pool_task_past_its_task_timeout_fails_with_task_timeout_and_the_pool_goes_on(tmp_path):
    ends = tmp_path / "ends"
    with warden.Pool(1, task_timeout=0.5, finalizer=note_pid, finalargs=(str(ends),)) as pool:
        first = pool.apply(sleep_then_pid, (0,))
        with pytest.raises(warden.TaskTimeout) as raised:
            pool.apply(sleep_then_pid, (30,))
        assert isinstance(raised.value, TimeoutError) and raised.value.timeout == 0.5
        mapped = pool.map_async(sleep_then_pid, [0, 30, 0], chunksize=1)
        with pytest.raises(warden.TaskTimeout):
            mapped.get(30)
        second = pool.apply(sleep_then_pid, (0,))
        assert second != first  # the worker that ran past it was replaced
    # The worker stopped for a timeout ran its finalizer.
    assert first in {int(p) for p in ends.read_text().split()}


def test_the_standard_librarys_pool_example_runs_with_warden_imported_in_its_place(program):
    # The first example of multiprocessing's documentation, with only its
    # import changed: TimeoutError and cpu_count come along.
    prog = program(
        """
        from warden import Pool, TimeoutError, cpu_count
        import time
        import os

        def f(x):
            return x * x

        if __name__ == "__main__":
            with Pool(processes=min(4, cpu_count())) as pool:
                print(pool.map(f, range(10)))
                res = pool.apply_async(time.sleep, (10,))
                try:
                    print(res.get(timeout=0.5))
                except TimeoutError:
                    print("We lacked patience and got a multiprocessing.TimeoutError")
        """
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
        "We lacked patience and got a multiprocessing.TimeoutError",
    ]


def test_a_pools_timeouts_are_caught_as_multiprocessings_the_built_in_and_wardens_timeout_error(pool):
    # ``from warden import Pool, TimeoutError`` and ``import warden as cf``
    # then ``except cf.TimeoutError`` both mean the one they catch.
    assert warden.TimeoutError is TimeoutError is concurrent.futures.TimeoutError
    slow = pool.apply_async(sleep_then_pid, (5,))
    for kind in (multiprocessing.TimeoutError, TimeoutError):
        with pytest.raises(kind):
            slow.get(timeout=0.05)
        with pytest.raises(kind):
            pool.imap(sleep_then_pid, [5]).next(timeout=0.05)


def test_a_multiprocessing_or_concurrent_futures_name_warden_lacks_says_where_to_take_it_from():
    with pytest.raises(AttributeError, match="take Manager from multiprocessing") as e:
        warden.Manager  # noqa: B018
    assert 'multiprocessing.get_context("spawn")' in str(e.value)
    with pytest.raises(AttributeError, match="take ThreadPoolExecutor from concurrent.futures"):
        warden.ThreadPoolExecutor  # noqa: B018
    with pytest.raises(AttributeError, match=r"^module 'warden' has no attribute 'nothing'$"):
        warden.nothing  # type: ignore[attr-defined] # noqa: B018
    assert not hasattr(warden, "Queue")


def test_importing_a_multiprocessing_name_warden_lacks_from_it_says_where_to_take_it_from():
    """``from warden import Process, Queue``: the import statement used to
    replace the hint with its own "cannot import name" message."""
    with pytest.raises(ImportError, match="take Queue from multiprocessing") as e:
        from warden import Process, Queue  # type: ignore[attr-defined]  # noqa: F401
    assert e.value.name == "warden"
    with pytest.raises(ImportError, match="take ThreadPoolExecutor from concurrent.futures"):
        from warden import ThreadPoolExecutor  # type: ignore[attr-defined]  # noqa: F401
    with pytest.raises(ImportError, match=r"^cannot import name 'nothing' from 'warden' \("):
        from warden import nothing  # type: ignore[attr-defined]  # noqa: F401


def test_the_context_is_the_fifth_positional_parameter_as_in_the_standard_library():
    # Subclasses call ``super().__init__(processes, initializer, initargs,
    # maxtasksperchild, context)``.
    ctx = multiprocessing.get_context("spawn")
    with warden.Pool(1, None, (), None, ctx) as p:
        assert p.apply(square, (3,)) == 9
    with multiprocessing.pool.Pool(1, None, (), None, ctx) as p:
        assert p.apply(square, (3,)) == 9


def test_len_of_the_pools_cache_counts_its_results_not_ready_as_the_standard_librarys(pool, std_pool):
    # A common way to bound the work in flight: ``while len(pool._cache) > n``.
    def counts(p):
        gate = [p.apply_async(sleep_then, (0.5,)) for _ in range(2)]
        queued = [p.apply_async(square, (i,)) for i in range(3)]
        mapped = p.map_async(square, range(4))
        busy = len(p._cache)
        for r in (*gate, *queued, mapped):
            r.wait(30)
        wait_until(lambda: len(p._cache) == 0, timeout=10)
        return busy, [r._job in p._cache for r in gate], len(p._cache)

    assert counts(pool) == counts(std_pool) == (6, [False, False], 0)


def test_a_maps_chunks_left_and_chunksize_read_as_the_standard_librarys(pool, std_pool):
    # Progress loops read ``while not r.ready(): ... r._number_left``.
    def progress(p):
        r = p.map_async(sleep_then, [0.3] * 8, chunksize=2)
        at_start = r._number_left
        seen = []
        while not r.ready():
            seen.append(r._number_left)
            r.wait(0.05)
        failed = p.map_async(square, ["not a number"] * 4, chunksize=2)
        failed.wait(30)
        return at_start, seen == sorted(seen, reverse=True), r._number_left, r._chunksize, failed._number_left

    assert progress(pool) == progress(std_pool) == (4, True, 0, 2, 0)


def test_results_that_will_never_come_leave_the_pools_cache(pool, std_pool):
    # An empty map is ready at once; a map or call that could not be queued
    # gets no outcome: none of them may stay in _cache (a drain loop on it
    # would never end).
    for p in (pool, std_pool):
        assert p.map_async(square, []).get(30) == []
        with pytest.raises((TypeError, pickle.PicklingError)):
            p.map(square, [threading.Lock()])
        assert wait_until(lambda p=p: len(p._cache) == 0, timeout=10), p._cache
    pool.close()
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))
    assert len(pool._cache) == 0


def test_apply_and_apply_async_give_the_result(pool):
    assert pool.apply(power, (2, 10)) == 1024
    assert pool.apply(power, (), {"base": 3, "exp": 2}) == 9
    r = pool.apply_async(square, (6,))
    assert isinstance(r, warden.AsyncResult)
    assert r.get(timeout=30) == 36
    assert r.ready() and r.successful()


def test_a_chunksize_below_one_is_refused_where_the_standard_library_computes_nothing(pool, std_pool):
    # A listed difference: the standard library's map hands back a None per
    # item without calling the function; its imap refuses, as warden's calls do.
    assert std_pool.map(square, range(3), chunksize=0) == [None, None, None]
    with pytest.raises(ValueError, match="Chunksize must be 1\\+, not 0"):
        list(std_pool.imap(square, range(3), chunksize=0))
    calls = [
        lambda: pool.map(square, range(3), chunksize=0),
        lambda: pool.map_async(square, range(3), chunksize=0).get(30),
        lambda: pool.starmap(power, [(2, 1)], chunksize=0),
        lambda: pool.starmap_async(power, [(2, 1)], chunksize=-1).get(30),
        lambda: list(pool.imap(square, range(3), chunksize=0)),
        lambda: list(pool.imap_unordered(square, range(3), chunksize=0)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
            call()
    assert pool.map(square, range(3)) == [0, 1, 4]  # and the pool goes on


@pytest.mark.parametrize("chunksize", [0.375, -2])
def test_a_chunksize_below_one_is_named_in_the_refusal_as_the_standard_library_names_it(
    pool, std_pool, chunksize
):
    # A fraction below one (a computed chunk size) was refused with a
    # formatting error about the message itself.
    with pytest.raises(ValueError) as theirs:
        list(std_pool.imap(square, range(3), chunksize=chunksize))
    for call in (pool.imap, pool.imap_unordered):
        with pytest.raises(ValueError) as ours:
            list(call(square, range(3), chunksize=chunksize))
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError) as ours:
        pool.map(square, range(3), chunksize=chunksize)
    assert str(ours.value) == str(theirs.value)


def test_map_and_starmap_match_the_standard_library(pool, std_pool):
    data = list(range(50))
    assert pool.map(square, data) == std_pool.map(square, data)
    assert pool.map(square, data, chunksize=7) == std_pool.map(square, data, chunksize=7)
    assert pool.map(square, iter(data)) == [x * x for x in data]
    assert pool.map(square, []) == std_pool.map(square, []) == []
    pairs = [(2, i) for i in range(10)]
    assert pool.starmap(power, pairs) == std_pool.starmap(power, pairs)


def finish_after(path, seconds, value):
    time.sleep(seconds)
    record(path, value)
    return value


def test_map_returns_items_in_order_though_later_chunks_finish_first(pool, std_pool, tmp_path):
    """The first chunk sleeps while the other worker runs every later one:
    the list still comes back in the items' order, as the standard
    library's does."""
    calls = [(0.5 if i < 2 else 0, i) for i in range(12)]
    for which, p in (("warden", pool), ("std", std_pool)):
        path = tmp_path / which
        got = p.starmap(functools.partial(finish_after, path), calls, chunksize=2)
        assert got == list(range(12)), which
        finished = [int(line.split()[0]) for line in path.read_text().splitlines()]
        assert finished.index(11) < finished.index(0), (which, finished)


def test_map_async_and_starmap_async_call_back_with_the_list(pool):
    got = []
    r = pool.map_async(square, range(5), callback=got.append)
    assert r.get(30) == [0, 1, 4, 9, 16]
    assert got == [[0, 1, 4, 9, 16]]
    r = pool.starmap_async(power, [(2, 2), (3, 3)])
    assert r.get(30) == [4, 27]


def test_map_raises_the_task_error_after_all_chunks_finish(pool, std_pool):
    with pytest.raises(ValueError, match="bad 3") as ours:
        pool.map(fail_on, range(10), chunksize=2)
    with pytest.raises(ValueError, match="bad 3") as theirs:
        std_pool.map(fail_on, range(10), chunksize=2)
    assert type(ours.value.__cause__) is type(theirs.value.__cause__)
    assert "fail_on" in ours.value.__cause__.tb


def test_a_callback_waiting_on_its_own_pool_gets_an_error_instead_of_hanging(pool):
    """Callbacks run on the thread that delivers the pool's results: a
    callback calling ``apply``/``map``/``imap`` on its own pool would wait
    forever there (the standard library's pool hangs, and then hangs
    ``terminate()``). A wait with a timeout is bounded, and runs out."""
    seen = []
    event = threading.Event()

    def callback(_):
        for wait in (
            lambda: pool.apply(square, (5,)),
            lambda: pool.map(square, range(3)),
            lambda: list(pool.imap(square, range(3))),
            lambda: pool.apply_async(sleep_then, (1,)).get(timeout=0.1),
        ):
            try:
                seen.append(wait())
            except (RuntimeError, multiprocessing.TimeoutError) as e:
                seen.append(type(e).__name__)
        event.set()

    pool.apply_async(square, (4,), callback=callback)
    assert event.wait(30)
    assert seen == ["RuntimeError"] * 3 + ["TimeoutError"]
    assert pool.apply(square, (7,)) == 49


def test_error_callback_gets_the_exception(pool):
    errors = []
    r = pool.apply_async(fail_on, (3,), error_callback=errors.append)
    r.wait(30)
    assert not r.successful()
    assert isinstance(errors[0], ValueError)
    with pytest.raises(ValueError):
        r.get()


def test_async_result_not_ready_behaves_like_the_standard_library(pool):
    r = pool.apply_async(sleep_then, (0.5, "x"))
    assert not r.ready()
    with pytest.raises(ValueError, match="not ready"):
        r.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    r.wait(0.01)
    assert r.get(timeout=30) == "x"


def test_imap_yields_in_order_and_imap_unordered_yields_all(pool, std_pool):
    assert list(pool.imap(square, range(20))) == list(std_pool.imap(square, range(20)))
    assert list(pool.imap(square, range(20), chunksize=3)) == [x * x for x in range(20)]
    assert sorted(pool.imap_unordered(square, range(20), chunksize=4)) == [x * x for x in range(20)]


def test_imap_consumes_its_iterable_lazily(pool):
    it = pool.imap(square, numbers(10**9))
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    pool.terminate()


def nap_then_square(args):
    seconds, i = args
    time.sleep(seconds)
    return i * i


class Counted:
    """An iterable that counts the items taken from it."""

    def __init__(self, n):
        self.taken = 0
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


def fail_in_callback(value):
    raise ValueError(f"callback bug with {value}")


def test_a_callback_that_raises_is_reported_and_its_result_and_the_pools_others_still_arrive(pool, capfd):
    # The standard library's result thread dies of it (3.11): that result
    # and every later one never come.
    r = pool.apply_async(abs, (-3,), callback=fail_in_callback)
    assert r.get(timeout=30) == 3
    assert r.successful()
    assert pool.map(abs, [-1, -2]) == [1, 2]
    assert pool.apply_async(abs, (-5,), error_callback=fail_in_callback).get(timeout=30) == 5
    err = capfd.readouterr().err
    assert "warden: exception in a task-outcome callback" in err
    assert "ValueError: callback bug with 3" in err


def echo_then_stall_from_10(i):
    if i >= 10:
        time.sleep(30)  # until terminate(): no result comes after the first ten
    return i


def test_imap_reads_its_iterable_only_as_far_ahead_as_the_workers_need(pool):
    # As the standard library's imap, whose pipe to the workers fills: a big
    # file read line by line is not read into memory ahead of the workers.
    items = Counted(100_000)
    it = pool.imap(echo_then_stall_from_10, items)
    assert [next(it) for _ in range(10)] == list(range(10))
    time.sleep(0.5)  # time enough for a feeder that does not stop to read thousands
    bound = 10 + warden.pool.IMAP_AHEAD_CHUNKS * 2 + 10  # (2 workers; a few in hand)
    assert items.taken < bound, items.taken
    pool.terminate()


@pytest.mark.parametrize("seconds", [0, 0.005])
def test_an_abandoned_imap_over_an_endless_iterable_lets_close_and_join_return(pool, seconds):
    # The standard library's feeder takes items forever: join() never returns.
    it = pool.imap(nap_then_square, ((seconds, i) for i in itertools.count()), chunksize=4)
    for r in it:
        if r > 400:
            break
    del it
    gc.collect()
    pool.close()
    joined = threading.Thread(target=pool.join, daemon=True)
    joined.start()
    joined.join(timeout=30)
    assert not joined.is_alive()


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_over_what_is_not_iterable_raises_type_error_from_next_as_the_standard_librarys(
    pool, std_pool, method, chunksize
):
    for p in (std_pool, pool):
        it = getattr(p, method)(abs, 5, chunksize)  # no error yet: the iterable is read lazily
        with pytest.raises(TypeError, match="'int' object is not iterable"):
            next(it)


def test_imap_next_timeout_raises_timeout_error(pool):
    it = pool.imap(sleep_then, [2])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.1)
    pool.terminate()


def test_imap_next_with_a_nan_timeout_raises_timeout_error_at_once_as_the_standard_librarys(pool, std_pool):
    # Not a wait until the result comes (which spun, NaN never being <= 0).
    for p in (std_pool, pool):
        it = p.imap(sleep_then, [2])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=float("nan"))
    pool.terminate()


def test_imap_errors_are_raised_at_their_position_and_iteration_goes_on(pool):
    it = pool.imap(fail_on, range(5))
    assert next(it) == 0
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ValueError, match="bad 3"):
        next(it)
    assert next(it) == 4
    with pytest.raises(StopIteration):
        next(it)


def stop_at_three(x):
    if x == 3:
        raise StopIteration(f"stopped at {x}")
    return x


@pytest.mark.parametrize("chunksize", [1, 3])
def test_a_task_raising_stop_iteration_fails_the_map_instead_of_dropping_its_items(pool, chunksize):
    """``map`` raises the task's ``StopIteration``, as ``apply`` does; ``imap``
    raises ``RuntimeError`` from it, since a ``StopIteration`` out of
    ``next()`` would end the caller's loop as if every result had been read.
    (The standard library drops the items, or yields ``None`` in their
    places.)"""
    with pytest.raises(StopIteration, match="stopped at 3"):
        pool.map(stop_at_three, range(8), chunksize=chunksize)
    with pytest.raises(StopIteration, match="stopped at 3"):
        pool.starmap(stop_at_three, [(i,) for i in range(8)], chunksize=chunksize)
    for method in (pool.imap, pool.imap_unordered):
        with pytest.raises(RuntimeError, match="StopIteration") as raised:
            list(method(stop_at_three, range(8), chunksize=chunksize))
        assert isinstance(raised.value.__cause__, StopIteration)
    assert pool.map(square, range(4)) == [0, 1, 4, 9]


def test_imap_reports_an_iterable_that_raises(pool):
    it = pool.imap(square, numbers(5, fail_at=2))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RuntimeError, match="iterable broke"):
        next(it)
    assert list(it) == []


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for this error")


def numbers_then_an_unprintable_error(n):
    yield from range(n)
    raise Unprintable("the iterable's own")


def test_imap_raises_an_error_of_its_iterable_that_cannot_be_printed_instead_of_ending_early(pool, std_pool):
    # The feeder thread made the error's text with str(), which raised: the
    # thread died, and the caller's loop ended after the first results as if
    # the iterable had run out, with no error.
    for p in (pool, std_pool):
        got = []
        with pytest.raises(Unprintable):
            for r in p.imap(square, numbers_then_an_unprintable_error(3)):
                got.append(r)
        assert got == [0, 1, 4]
    assert pool.map(square, range(4)) == [0, 1, 4, 9]


class Unreadable(BaseException):
    """Not an ``Exception``: a parser's own way to stop everything."""


def records_until(n, error):
    for i in range(n):
        if i == 3:
            raise error
        yield i


class ExitsOnPickle:
    def __reduce__(self):
        raise SystemExit("this item cannot be sent")


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize(
    "error", [SystemExit("bad record 3"), KeyboardInterrupt(), GeneratorExit(), Unreadable("bad record 3")]
)
def test_an_imap_whose_iterable_raises_what_is_not_an_exception_ends_with_an_error_not_quietly(
    pool, method, error
):
    """A generator that gives up with ``sys.exit()`` (or any other exception
    that is not an ``Exception``) is the iteration's error at its position:
    ending the iteration there as if the input had ended would lose the
    rest of it without a word."""
    got = []
    it = getattr(pool, method)(square, records_until(8, error))
    with pytest.raises(Exception, match=type(error).__name__) as raised:
        for value in it:
            got.append(value)
    assert "the iterable raised" in str(raised.value)
    assert sorted(got) == [0, 1, 4]
    assert pool.map(square, range(3)) == [0, 1, 4]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_an_imap_item_whose_pickling_raises_system_exit_fails_that_item_only(pool, method):
    it = getattr(pool, method)(square, [1, 2, ExitsOnPickle(), 4])
    out, errors = [], []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            break
        except Exception as e:
            errors.append(str(e))
    assert sorted(out) == [1, 4, 16]
    assert len(errors) == 1 and "cannot pickle the task: SystemExit: this item cannot be sent" in errors[0]


def slow_numbers(n):
    for i in range(n):
        time.sleep(0.01)
        yield i


def test_a_ctrl_c_as_an_imap_feeder_starts_still_leaves_close_waiting_for_the_other_imaps(monkeypatch):
    """A Ctrl-C that cuts ``start()`` short once the feeder thread has begun
    (``Thread.start`` waits for it to say so) raises in the caller, and the
    feeder ends on its own: it must be taken off the count of running
    feeders once, not twice, or a later ``close()`` stops taking the items
    of an imap still being fed (they failed with ``CancelledError``)."""
    real_start = threading.Thread.start
    landed: list[str] = []

    def start_then_ctrl_c(self):
        real_start(self)
        if self.name == "warden-feeder" and not landed:
            landed.append(self.name)
            raise KeyboardInterrupt

    with warden.Pool(2) as pool:
        monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            pool.imap(square, range(10))
        monkeypatch.undo()
        time.sleep(0.2)  # that feeder has ended
        it = pool.imap(square, slow_numbers(30))
        pool.close()
        assert list(it) == [i * i for i in range(30)]
        pool.join()
    assert landed == ["warden-feeder"]


DROPPED_IMAP = """
import sys, time, warnings
import warden

def square(x):
    return x * x

def endless():
    i = 0
    while True:
        yield i
        i += 1

if __name__ == "__main__":
    warnings.simplefilter(sys.argv[1], ResourceWarning)
    with warden.Pool(2) as pool:
        print("all", sum(pool.imap(square, range(100))), flush=True)
        for value in pool.imap_unordered(square, endless()):
            break  # the rest is not wanted
        pool.close()
        pool.join()
    print("joined", flush=True)
"""


@pytest.mark.parametrize("action", ["always", "error"])
def test_an_imap_dropped_before_its_iterable_ended_says_so_with_a_resource_warning(program, action):
    """A dropped ``imap`` iterator stops its feeder (so that ``close();
    join()`` return even for an endless iterable), where the standard
    library's would run every item: a ``ResourceWarning`` says so, as for a
    file dropped unclosed. An ``imap`` read to its end says nothing. Where
    warnings are errors, it is reported as one raised by a finalizer is
    (``sys.unraisablehook``), not as the death of the thread that saw it."""
    run = program(DROPPED_IMAP).run(args=(action,))
    assert run.returncode == 0, run.stderr
    assert run.lines == [f"all {sum(i * i for i in range(100))}", "joined"]
    assert run.stderr.count("ResourceWarning") == 1, run.stderr
    assert "an imap of 'square' was dropped before its iterable ended" in run.stderr
    assert "Exception in thread" not in run.stderr
    assert ("Exception ignored in" in run.stderr) == (action == "error"), run.stderr


READ_TO_ITS_END_OR_TERMINATED = """
import warnings
import warden

if __name__ == "__main__":
    warnings.simplefilter("always", ResourceWarning)
    with warden.Pool(1) as pool:
        for _ in range(5):
            # Its one result read, then dropped: the feeder, held back by the
            # bytes in flight, may not have seen the iterable's end yet.
            it = pool.imap(len, [bytes(65 << 20)])
            print(next(it), flush=True)
            del it
    try:
        with warden.Pool(2) as pool:
            for n in pool.imap(len, (bytes(i) for i in range(10_000))):
                if n == 10:
                    raise ValueError("the loop gave up")  # the pool is terminated
    except ValueError:
        print("terminated", flush=True)
"""


def test_no_resource_warning_for_an_imap_read_to_its_end_or_whose_pool_was_terminated(program):
    """The warning is for items the standard library would have run: not for
    an ``imap`` whose every result was read, though its feeder had not seen
    the end of the iterable when the iterator was dropped, nor for one whose
    pool was terminated (as leaving a ``with`` block on an exception does)."""
    run = program(READ_TO_ITS_END_OR_TERMINATED).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.lines == [str(65 << 20)] * 5 + ["terminated"]
    assert "ResourceWarning" not in run.stderr, run.stderr


def square_slowly(x):
    time.sleep(0.05)
    return x * x


@pytest.mark.parametrize("chunksize", [1, 3])
def test_an_imap_unordered_whose_iterable_raises_yields_every_result_before_the_error(pool, chunksize):
    """The iterable's error comes after the results of the items it yielded
    before it, as through the standard library's task queue: raised at once,
    it ended the iteration before any of them (a file reader that meets a
    corrupt record at its end lost every record read). As there, the items
    of the chunk the error cut short are dropped (here, none)."""
    got = []
    it = pool.imap_unordered(square_slowly, numbers(13, fail_at=12), chunksize=chunksize)
    with pytest.raises(RuntimeError, match="iterable broke"):
        for value in it:
            got.append(value)
    assert sorted(got) == [i * i for i in range(12)]
    assert list(it) == []


def drain(it):
    """What a loop that catches a task's error and calls ``next()`` again
    gets from an imap: its results, ``"E"`` for each error."""
    out = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out
        except ValueError:
            out.append("E")


@pytest.mark.parametrize("chunksize", [1, 2, 4])
def test_a_chunked_imap_ends_at_its_first_failed_chunk_like_the_standard_library(pool, std_pool, chunksize):
    # The standard library's chunked imap is a generator over chunks: the
    # error of a chunk ends it. One item per task goes on after an error.
    ours = drain(pool.imap(fail_on, range(8), chunksize=chunksize))
    assert ours == drain(std_pool.imap(fail_on, range(8), chunksize=chunksize))
    assert ours == {1: [0, 1, 2, "E", 4, 5, 6, 7], 2: [0, 1, "E"], 4: ["E"]}[chunksize]


def fail_first(x):
    """Fails item 0 at once; the others come later, after its error."""
    if x == 0:
        raise ValueError("bad 0")
    time.sleep(0.05)
    return x


@pytest.mark.parametrize("chunksize", [1, 2, 4])
def test_a_chunked_imap_unordered_ends_at_its_first_failed_chunk_like_the_standard_library(
    pool, std_pool, chunksize
):
    def shape(out):
        # The order varies; that nothing comes after a chunk's error does not.
        if chunksize == 1:
            return out.count("E"), sorted(x for x in out if x != "E")
        return out.count("E"), out[-1] == "E"

    ours = drain(pool.imap_unordered(fail_first, range(8), chunksize=chunksize))
    assert shape(ours) == shape(drain(std_pool.imap_unordered(fail_first, range(8), chunksize=chunksize)))
    assert shape(ours) == ((1, [1, 2, 3, 4, 5, 6, 7]) if chunksize == 1 else (1, True))


def test_the_chunks_after_a_failed_one_still_run_and_leave_the_pool_clean(pool, tmp_path):
    it = pool.imap(fail_on, range(40), chunksize=2)
    assert drain(it) == [0, 1, "E"]
    assert wait_until(lambda: not pool._warden_runner.pending)  # every chunk ran; nothing waits
    assert it._chunks == {} and it._pool is None  # nor is any result kept
    assert pool.map(square, range(10), chunksize=3) == [x * x for x in range(10)]
    pool.close()
    pool.join()


def slowly(n, pause=0.02):
    for i in range(n):
        time.sleep(pause)  # an iterable that produces items slowly (a file, a cursor)
        yield i


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_close_after_imap_still_runs_every_item_of_its_iterable(method, std_pool):
    ctx = multiprocessing.get_context("spawn")
    outcomes = {}
    for name, make in (("std", ctx.Pool), ("warden", warden.Pool)):
        p = make(2)
        try:
            it = getattr(p, method)(square, slowly(20))
            p.close()
            outcomes[name] = sorted(it)
            p.join()
        finally:
            p.terminate()
    assert outcomes["warden"] == outcomes["std"] == [x * x for x in range(20)]


@pytest.mark.parametrize("method", ["map", "starmap", "map_async"])
def test_a_map_running_in_another_thread_when_close_is_called_still_gets_every_item(method):
    # Another thread is inside map() (its items being pickled) when the main
    # thread closes the pool: "no new work" does not cut that map short.
    pickling, closed = threading.Event(), threading.Event()

    class Item:
        def __init__(self, n):
            self.n = n

        def __reduce__(self):
            if self.n == 3 and not pickling.is_set():
                pickling.set()
                closed.wait(30)
            return (int, (self.n,))

    def run(make):
        pickling.clear()
        closed.clear()
        p = make(2)
        outcome = {}
        try:
            items = [Item(i) for i in range(40)]
            if method == "starmap":
                call = functools.partial(p.starmap, square, [(item,) for item in items], 1)
            elif method == "map_async":
                call = lambda: p.map_async(square, items, 1).get(60)  # noqa: E731
            else:
                call = functools.partial(p.map, square, items, 1)

            def mapper():
                try:
                    outcome["result"] = call()
                except Exception as e:
                    outcome["result"] = repr(e)

            thread = threading.Thread(target=mapper)
            thread.start()
            assert pickling.wait(60)
            p.close()
            closed.set()
            thread.join(60)
            p.join()
        finally:
            closed.set()
            p.terminate()
        return outcome["result"]

    std = run(multiprocessing.get_context("spawn").Pool)
    assert std == [i * i for i in range(40)]
    assert run(warden.Pool) == std


def refilled_blocks(n, np):
    block = np.empty(100_000, dtype=np.int64)  # above the inline limit: out of band
    for i in range(n):
        block[:] = i
        yield block  # the same array each time, refilled


def first_of(a):
    time.sleep(0.01)
    return int(a[0])


def test_imap_sends_each_item_as_it_was_when_the_iterable_yielded_it(pool, std_pool):
    from conftest import numpy

    np = numpy()
    expected = list(range(12))
    assert list(std_pool.imap(first_of, refilled_blocks(12, np))) == expected
    assert list(pool.imap(first_of, refilled_blocks(12, np))) == expected
    assert sorted(pool.imap_unordered(first_of, refilled_blocks(12, np))) == expected


def test_a_pool_whose_constructor_raised_is_dropped_without_an_error():
    import gc
    import sys

    ignored = []
    previous, sys.unraisablehook = sys.unraisablehook, ignored.append
    try:
        with pytest.raises(TypeError, match="on_worker_lost"):
            warden.Pool(1, on_worker_lost=42)
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert [str(u.exc_value) for u in ignored] == []


def test_imap_item_that_cannot_be_pickled_fails_its_position(pool):
    results = pool.imap(square, [1, threading.Lock(), 3])
    assert next(results) == 1
    with pytest.raises(TypeError, match="pickle"):
        next(results)
    assert next(results) == 9


def calls_that_cannot_be_pickled(p):
    """What a fire-and-forget loop sees of a call that cannot be pickled: the
    async call returns, its ``error_callback`` gets the pickler's error on
    another thread, ``get()`` raises it, and the pool goes on."""
    seen = []
    done = threading.Event()

    def on_error(e):
        seen.append((type(e).__name__, "pickle" in str(e), threading.current_thread() is not caller))
        done.set()

    caller = threading.current_thread()
    out = []
    for start in (
        lambda: p.apply_async(square, (threading.Lock(),), callback=out.append, error_callback=on_error),
        lambda: p.map_async(square, [1, threading.Lock()], 1, callback=out.append, error_callback=on_error),
    ):
        done.clear()
        result = start()
        assert done.wait(30)
        with pytest.raises(TypeError, match="pickle"):
            result.get(timeout=30)
        assert not result.successful()
    return seen, out, p.apply(square, (3,))


def test_apply_async_and_map_async_fail_an_unpicklable_call_through_its_result_as_the_standard_librarys(
    pool, std_pool
):
    expected = ([("TypeError", True, True)] * 2, [], 9)
    assert calls_that_cannot_be_pickled(std_pool) == expected
    assert calls_that_cannot_be_pickled(pool) == expected


class KeysOnly:
    """A mapping to ``**`` (``keys()`` and ``[]``) that is no ``Mapping``."""

    def keys(self):
        return ["exp"]

    def __getitem__(self, key):
        return 3


def test_apply_async_with_arguments_no_call_could_take_fails_through_its_result_as_the_standard_librarys(
    pool, std_pool
):
    """As the standard library sends them, arguments go as they are, and the
    worker's ``func(*args, **kwds)`` fails them: ``get()`` raises the message
    Python gives, and ``error_callback`` is called; the pool is unaffected."""
    for args, kwds in ((-3, {}), ((), 5), ((1,), [("key", 1)])):
        messages = []
        for p in (std_pool, pool):
            failed = []
            result = p.apply_async(abs, args, kwds, error_callback=failed.append)
            with pytest.raises(TypeError) as raised:
                result.get(timeout=60)
            assert [type(e) for e in failed] == [TypeError], p
            messages.append(str(raised.value))
        assert messages[0] == messages[1]
    assert pool.apply(abs, [-2]) == 2


def test_apply_takes_any_mapping_the_call_takes_as_the_standard_librarys(pool, std_pool):
    for p in (std_pool, pool):
        assert p.apply(power, (2,), KeysOnly()) == 8
        assert p.apply_async(power, [2], KeysOnly()).get(timeout=60) == 8


def note_start(path, x):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


class WaitsForFile:
    """Pickles only once ``path`` exists (or 20 s pass): what it pickles to
    says whether it saw the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        deadline = time.monotonic() + 20
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return (str, (f"saw={os.path.exists(self.path)}",))


def test_a_maps_first_chunk_runs_while_later_chunks_are_being_pickled(pool, tmp_path):
    started = tmp_path / "started"
    # Chunk 1 writes the file when it runs; chunk 2 cannot be pickled until
    # it exists: only a map that queues each chunk as soon as it is pickled
    # finishes without waiting out the 20 s.
    out = pool.starmap(note_start, [(started, 1), (started, WaitsForFile(started))], chunksize=1)
    assert out == [1, "saw=True"]


def test_a_map_whose_chunk_cannot_be_pickled_fails_once_with_that_error_and_the_pool_goes_on(pool, tmp_path):
    called = []
    ran = tmp_path / "ran"
    items = [*((ran, i) for i in range(40)), (ran, threading.Lock()), *((ran, i) for i in range(40, 80))]
    result = pool.starmap_async(
        note_start, items, chunksize=4, callback=called.append, error_callback=called.append
    )
    with pytest.raises(TypeError, match="pickle"):
        result.get(timeout=60)
    assert [type(e) for e in called] == [TypeError], "error_callback once, callback never"
    # The chunks after the bad one were never made (those before it ran or
    # were cancelled), and the pool goes on.
    assert pool.map(square, range(10), chunksize=2) == [x * x for x in range(10)]
    time.sleep(0.3)
    started = [int(x) for x in ran.read_text().split()] if ran.exists() else []
    assert all(x < 40 for x in started), started
    assert len(called) == 1 and len(pool._cache) == 0


def test_base_exception_in_a_task_fails_it_instead_of_hanging_the_pool(pool):
    with pytest.raises(warden.TaskAborted, match="SystemExit"):
        pool.apply_async(raise_system_exit).get(timeout=30)
    assert pool.apply(square, (2,)) == 4


def test_close_then_join_runs_queued_tasks_and_retires_workers(tmp_path):
    out = tmp_path / "log"
    p = warden.Pool(2, finalizer=record, finalargs=(out, "fin"))
    results = [p.apply_async(sleep_then, (0.1, i)) for i in range(6)]
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(square, (1,))
    p.join()
    assert [r.get(0) for r in results] == list(range(6))
    assert len(out.read_text().splitlines()) == 2


def test_join_while_running_raises_like_the_standard_library(pool):
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()


def test_terminate_cancels_tasks_and_finalizers_still_run(tmp_path):
    out = tmp_path / "log"
    p = warden.Pool(2, finalizer=record, finalargs=(out, "fin"))
    running = [p.apply_async(sleep_then, (30,)) for _ in range(2)]
    queued = p.apply_async(square, (2,))
    assert wait_until(lambda: sum(w.running_task is not None for w in p._warden_runner.core.workers()) == 2)
    start = time.monotonic()
    p.terminate()
    assert time.monotonic() - start < 5
    for r in (*running, queued):
        with pytest.raises(CancelledError):
            r.get(timeout=5)
    assert len(out.read_text().splitlines()) == 2
    p.join()


def test_terminate_under_a_lock_its_error_callbacks_take_returns_and_join_runs_them_all():
    # The callbacks of results and their errors do their bookkeeping under
    # the program's lock, and the program terminates the pool under it: the
    # error_callback of each task terminate cancels waits for that lock.
    lock = threading.Lock()
    seen = []

    def note(value):
        with lock:
            seen.append(value)

    p = warden.Pool(2)
    try:
        results = [p.apply_async(sleep_then, (0.2, i), callback=note, error_callback=note) for i in range(20)]
        assert wait_until(
            lambda: sum(w.running_task is not None for w in p._warden_runner.core.workers()) == 2
        )
        with lock:
            start = time.monotonic()
            p.terminate()
            took = time.monotonic() - start
        # The workers stop in well under a second; the results thread's
        # delivery (stuck on the lock) is waited for no longer than that.
        assert took < warden.pool.TERMINATE_DELIVERY_WAIT + 4, took
        p.join()
        assert len(seen) == 20
        assert sum(isinstance(v, CancelledError) for v in seen) >= 10
        for r in results:
            assert r.ready()
    finally:
        p.terminate()


def test_terminate_returns_once_slow_callbacks_of_what_it_cancelled_have_run():
    seen = []

    def note(value):
        time.sleep(0.005)  # a callback that writes to a file or a database
        seen.append(value)

    p = warden.Pool(2)
    try:
        for i in range(400):
            p.apply_async(sleep_then, (0.2, i), callback=note, error_callback=note)
        assert wait_until(
            lambda: sum(w.running_task is not None for w in p._warden_runner.core.workers()) == 2
        )
        p.terminate()
        assert len(seen) == 400  # 2 s of callbacks, none of them stuck
    finally:
        p.terminate()


def test_a_ctrl_c_while_terminate_waits_for_callbacks_leaves_join_to_wait_for_the_rest(program):
    run = program(
        """
        import os, signal, threading, time, warden

        seen = []

        def note(value):
            time.sleep(0.2)  # slow bookkeeping
            seen.append(value)

        def sleep_then(seconds, value):
            time.sleep(seconds)
            return value

        if __name__ == "__main__":
            pool = warden.Pool(2)
            for i in range(12):
                pool.apply_async(sleep_then, (30, i), error_callback=note)
            while sum(w.running_task is not None for w in pool._warden_runner.core.workers()) < 2:
                time.sleep(0.02)
            threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                pool.terminate()
                print("not interrupted", flush=True)
            except KeyboardInterrupt:
                print("interrupted", len(seen), flush=True)
            pool.join()
            print("after join", len(seen), flush=True)
        """
    ).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines[0].startswith("interrupted"), run.stdout
    assert int(run.lines[0].split()[1]) < 12
    assert run.lines[-1] == "after join 12", run.stdout


def test_the_sentinels_of_workers_the_program_keeps_stay_valid_after_they_are_replaced():
    from multiprocessing.connection import wait

    with warden.Pool(2, maxtasksperchild=1) as p:
        workers = p._pool
        sentinels = [w.sentinel for w in workers]
        p.map(square, range(8), chunksize=1)  # every worker replaced
        assert wait_until(lambda: not any(w.is_alive() for w in workers), timeout=30)
        assert all(w.exitcode == 0 for w in workers)  # the pool has recorded their exits
        assert wait_until(lambda: not {w.pid for w in p._pool} & {w.pid for w in workers}, timeout=30)
        assert [w.sentinel for w in workers] == sentinels  # still theirs
        assert sorted(wait(sentinels, timeout=10)) == sorted(sentinels)
        assert all(w.exitcode == 0 for w in workers)


def test_a_pool_stopped_by_ctrl_c_or_closed_while_starting_lists_its_workers_with_their_pids(program):
    run = program(
        """
        import os, signal, threading, time, warden

        def sleep_then(seconds, value):
            time.sleep(seconds)
            return value

        if __name__ == "__main__":
            pool = warden.Pool(2)
            pool.starmap_async(sleep_then, [(0.1, i) for i in range(4)])
            pool.close()  # its workers are still starting
            print("closed", [type(w.pid).__name__ for w in pool._pool], flush=True)
            pool.join()
            pool = warden.Pool(2)
            pool.starmap_async(sleep_then, [(0.1, i) for i in range(4)])
            pool.close()
            pool.join()  # no look until they have exited
            print("joined", [type(w.pid).__name__ for w in pool._pool], flush=True)
            pool = warden.Pool(2)
            result = pool.apply_async(sleep_then, (30, 1))
            threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                result.get()
            except KeyboardInterrupt:
                pass
            pool.join()
            print("interrupted", pool._state, [type(w.pid).__name__ for w in pool._pool], flush=True)
        """
    ).run(timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "closed ['int', 'int']",
        "joined ['int', 'int']",
        "interrupted TERMINATE ['int', 'int']",
    ], run.stdout


def test_context_manager_exit_terminates_like_the_standard_library(tmp_path):
    out = tmp_path / "log"
    with warden.Pool(1, finalizer=record, finalargs=(out, "fin")) as p:
        r = p.apply_async(sleep_then, (30,))
        assert wait_until(lambda: any(w.running_task is not None for w in p._warden_runner.core.workers()))
    assert p._state == "TERMINATE"
    with pytest.raises(CancelledError):
        r.get(5)
    assert out.read_text().startswith("fin")


def test_constructor_validates_like_the_standard_library():
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        warden.Pool(0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        warden.Pool(1, maxtasksperchild=0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        warden.Pool(1, initializer=3)


def test_maxtasksperchild_replaces_workers():
    with warden.Pool(1, maxtasksperchild=1) as p:
        pids = [p.apply(getpid) for _ in range(3)]
    assert len(set(pids)) == 3


def test_initializer_failure_fails_the_pool_instead_of_respawning_forever():
    # A limit wide enough in time that a slow (loaded) machine still reaches it.
    with warden.Pool(1, initializer=fail_on, initargs=(3,), restart_limit=(3, 300.0)) as p:
        with pytest.raises(warden.PoolFailed):
            p.apply(square, (1,))
        with pytest.raises(warden.PoolFailed):
            p.apply_async(square, (1,))


def test_pool_pickles_into_an_inert_handle(pool):
    handle = pickle.loads(pickle.dumps(pool))
    assert handle.kind == "Pool" and handle.owner_pid == os.getpid()
    with pytest.raises(RuntimeError, match="inert handle"):
        handle.map(square, [1])
    with pytest.raises(RuntimeError, match=r"terminate\(\) \(only that process can use or stop the pool\)"):
        handle.terminate()


WORKER_STATE = """
import os, sys
import multiprocessing
import warden

def state(_=None):
    # One write (print makes two, which two workers could interleave).
    sys.stdout.buffer.write(b"printed by a worker\\n")
    sys.stdout.buffer.flush()
    return os.environ.get("WARDEN_TEST_SETTING")

if __name__ == "__main__":
    which, api = sys.argv[1], sys.argv[2]
    spawn = multiprocessing.get_context("spawn")
    log = os.open("workers.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(1)
    # The common pattern: settings (and streams) for the workers, set just
    # around the moment the pool starts them.
    os.environ["WARDEN_TEST_SETTING"] = "1"
    os.dup2(log, 1)
    if api == "pool":
        pool = warden.Pool(2) if which == "warden" else spawn.Pool(2)
        first = None
    else:
        import concurrent.futures as cf
        if which == "warden":
            pool = warden.ProcessPoolExecutor(2)
        else:
            pool = cf.ProcessPoolExecutor(2, mp_context=spawn)
        first = pool.submit(state)
    os.dup2(saved, 1)
    del os.environ["WARDEN_TEST_SETTING"]
    if api == "pool":
        seen = pool.map(state, range(4), chunksize=1)
        pool.close()
        pool.join()
    else:
        seen = [first.result(timeout=60)]
        pool.shutdown()
    print("seen", *seen, flush=True)
"""


@pytest.mark.parametrize("api", ["pool", "executor"])
def test_workers_start_with_the_environment_and_streams_the_parent_had_when_it_asked(program, api):
    """The first workers see ``os.environ`` and the standard streams as they
    were when the pool was made (the executor: at its first submit), as the
    standard library's do, not as they are a moment later."""
    prog = program(WORKER_STATE)

    def seen(which):
        run = prog.run(timeout=120, args=(which, api))
        assert run.returncode == 0, run.stderr
        logged = (prog.tmp_path / "workers.log").read_text().splitlines()
        return run.stdout.splitlines(), bool(logged) and set(logged) == {"printed by a worker"}

    std = seen("std")
    assert std[1], "the workers printed into the stream they started with"
    # Three runs: without the guarantee, the workers' start races the
    # parent's next lines.
    assert [seen("warden") for _ in range(3)] == [std] * 3


class LyingLength:
    """An iterable whose ``len()`` is not the number of items it yields."""

    def __init__(self, says: int, yields: int) -> None:
        self.says, self.yields = says, yields

    def __len__(self) -> int:
        return self.says

    def __iter__(self):
        return iter(range(self.yields))


class LyingPairs(LyingLength):
    """Pairs ``(2, i)``, with a ``len()`` that is not their number."""

    def __iter__(self):
        return ((2, i) for i in range(self.yields))


@pytest.mark.parametrize("chunksize", [1, 2, None])
def test_map_over_an_iterable_longer_than_its_len_returns_every_result(pool, capfd, chunksize):
    """A map's result holds every item the iterable gave, as ``map()`` would:
    it used to hold the first ``len()`` of them and drop the rest quietly
    (the standard library's list takes the late chunks in, or not, as they
    come before or after the ones ``len()`` promised)."""
    assert pool.map_async(square, LyingLength(says=2, yields=5), chunksize).get(timeout=60) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert pool.starmap(pow, LyingPairs(says=1, yields=3), chunksize) == [1, 2, 4]
    assert pool.map(square, LyingLength(says=12, yields=40), chunksize) == [x * x for x in range(40)]
    assert pool.map(square, range(3), 1) == [0, 1, 4]
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err


def test_map_over_an_iterable_shorter_than_its_len_returns_what_it_yielded_instead_of_hanging(pool):
    # The standard library's waits for the chunks its len() promised, for ever.
    for chunksize in (1, 2, None):
        assert pool.map_async(square, LyingLength(says=5, yields=2), chunksize).get(timeout=60) == [0, 1]
    assert pool.map(square, range(3)) == [0, 1, 4]


def test_the_pool_module_is_reached_through_the_package_as_the_docs_name_it():
    """``warden.pool.TimeoutError`` right after ``import warden`` (a fresh
    interpreter: here the module is loaded already). It raised
    ``AttributeError`` until something else had imported ``warden.pool``."""
    code = "import warden; print(warden.pool.TimeoutError.__name__, warden.process.Process.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["TimeoutError", "Process"], out.stderr
