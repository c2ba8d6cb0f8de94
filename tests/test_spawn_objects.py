"""The standard library's process-shared objects work in a warden Process's
arguments and in a pool's initargs, as under the spawn start method."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import weakref

import pytest

import warden

ctx = multiprocessing.get_context("spawn")


def use_queue(q):
    q.put(("from", os.getpid()))


def use_lock(lock, value):
    with lock:
        value.value += 1


def use_event(event):
    event.set()


def use_array(array):
    for i in range(len(array)):
        array[i] = i * 10


def use_proxy(shared):
    shared["child"] = os.getpid()
    shared["items"] = [1, 2, 3]


def run_process(target, *args):
    p = warden.Process(target=target, args=args)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    return p


def test_a_queue_in_process_args_carries_what_the_child_puts():
    q = ctx.Queue()
    p = run_process(use_queue, q)
    assert q.get(timeout=10) == ("from", p.pid)


def test_a_lock_and_value_in_process_args_are_shared_with_the_child():
    lock, value = ctx.Lock(), ctx.Value("i", 41)
    run_process(use_lock, lock, value)
    assert value.value == 42
    assert lock.acquire(timeout=1)
    lock.release()


def test_a_multiprocessing_event_in_process_args_is_set_by_the_child():
    event = ctx.Event()
    run_process(use_event, event)
    assert event.is_set()


def test_an_array_in_process_args_is_written_by_the_child():
    array = ctx.Array("i", 4)
    run_process(use_array, array)
    assert array[:] == [0, 10, 20, 30]


def test_a_manager_proxy_in_process_args_is_updated_by_the_child():
    with ctx.Manager() as manager:
        shared = manager.dict()
        p = run_process(use_proxy, shared)
        assert shared["child"] == p.pid and shared["items"] == [1, 2, 3]


def test_a_manager_proxy_in_task_arguments_is_updated_by_the_worker():
    with ctx.Manager() as manager, warden.ProcessPoolExecutor(1) as ex:
        shared = manager.dict()
        ex.submit(use_proxy, shared).result(30)
        assert shared["items"] == [1, 2, 3]


# -- pool initargs --------------------------------------------------------------

_state: dict = {}


def keep(**objects):
    _state.update(objects)


def task_put(x):
    _state["q"].put(x * 2)
    with _state["lock"]:
        _state["value"].value += 1
    _state["array"][x] = x
    _state["event"].set()
    _state["shared"][x] = os.getpid()
    return x


def keep_positional(q, lock, value, array, event, shared):
    keep(q=q, lock=lock, value=value, array=array, event=event, shared=shared)


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_shared_objects_in_pool_initargs_are_shared_with_every_worker(kind):
    q, lock, value, array, event = ctx.Queue(), ctx.Lock(), ctx.Value("i", 0), ctx.Array("i", 4), ctx.Event()
    with ctx.Manager() as manager:
        shared = manager.dict()
        initargs = (q, lock, value, array, event, shared)
        if kind == "executor":
            with warden.ProcessPoolExecutor(2, initializer=keep_positional, initargs=initargs) as ex:
                assert list(ex.map(task_put, range(4))) == [0, 1, 2, 3]
        else:
            with warden.Pool(2, initializer=keep_positional, initargs=initargs) as pool:
                assert pool.map(task_put, range(4), chunksize=1) == [0, 1, 2, 3]
        assert sorted(q.get(timeout=10) for _ in range(4)) == [0, 2, 4, 6]
        assert value.value == 4
        assert array[:] == [0, 1, 2, 3]
        assert event.is_set()
        assert sorted(shared.keys()) == [0, 1, 2, 3]


def keep_lock(lock):
    _state["lock"] = lock


def square_under_lock(x):
    with _state["lock"]:
        return x * x


def _pool_holding_the_only_lock(kind):
    # The Lock is made in the call: nothing of the caller's refers to it.
    if kind == "warden executor":
        return warden.ProcessPoolExecutor(
            2, initializer=keep_lock, initargs=(ctx.Lock(),), max_tasks_per_child=1
        )
    if kind == "warden Pool":
        return warden.Pool(
            2,
            initializer=keep_lock,
            initargs=(ctx.Lock(),),
            finalizer=keep_lock,
            finalargs=(ctx.Lock(),),
            maxtasksperchild=1,
        )
    if kind == "stdlib executor":
        return concurrent.futures.ProcessPoolExecutor(
            2, mp_context=ctx, initializer=keep_lock, initargs=(ctx.Lock(),), max_tasks_per_child=1
        )
    return ctx.Pool(2, initializer=keep_lock, initargs=(ctx.Lock(),), maxtasksperchild=1)


@pytest.mark.parametrize("kind", ["warden executor", "warden Pool", "stdlib executor", "stdlib Pool"])
def test_a_shared_object_only_the_pool_holds_lives_as_long_as_the_pool(kind):
    """A spawn context's Lock unlinks its semaphore when its last owner in
    the parent goes. The pools keep their initargs (and finalargs) for their
    whole life, as the standard library's do, so that every worker,
    replacements too, opens it."""
    with _pool_holding_the_only_lock(kind) as pool:
        gc.collect()
        if kind.endswith("Pool"):
            results = pool.map_async(square_under_lock, range(6), chunksize=1).get(60)
        else:
            results = list(pool.map(square_under_lock, range(6), timeout=60))
    assert results == [0, 1, 4, 9, 16, 25]


class _Service:
    """Owns a pool whose initializer is one of its own methods."""

    def __init__(self, kind):
        if kind == "executor":
            self.pool = warden.ProcessPoolExecutor(1, initializer=self.setup)
        else:
            self.pool = warden.Pool(1, initializer=self.setup)

    def setup(self):
        pass


@pytest.mark.parametrize("kind", ["executor", "Pool"])
def test_an_owner_whose_method_is_its_pools_initializer_is_collected_once_the_pool_is_shut_down(kind):
    """The pool keeps its initializer as the standard library's pools do
    (a plain cycle through the owner, which the collector frees), not in
    its core, which the pool's finalizer holds from a global registry: there
    it kept the owner, and the pool, alive for the rest of the process."""
    service = _Service(kind)
    if kind == "Pool":
        assert service.pool.apply(abs, (-3,)) == 3
        service.pool.close()
        service.pool.join()
    else:
        assert service.pool.submit(abs, -3).result(60) == 3
        service.pool.shutdown(wait=True)
    owner, pool = weakref.ref(service), weakref.ref(service.pool)
    del service
    for _ in range(3):
        gc.collect()
    assert owner() is None and pool() is None


def test_a_lock_in_task_arguments_is_refused_as_under_spawn():
    with warden.ProcessPoolExecutor(1) as ex, pytest.raises(RuntimeError, match="inheritance"):
        ex.submit(use_lock, ctx.Lock(), ctx.Value("i", 0))
