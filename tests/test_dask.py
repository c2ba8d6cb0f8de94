"""warden on a Dask cluster (one machine, loopback only): each Dask worker
process hosts a warden pool, so timeouts, crash isolation and finalizers hold
on every Dask worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import warden
from dask_tasks import die, pids, record_exit, sleep_then, slow_pids, square

from conftest import wait_until

distributed = pytest.importorskip(
    "distributed",
    reason="dask.distributed is not installed (optional: warden[dask]; `make test` installs it)",
)
wdask = pytest.importorskip("warden.dask")

pytestmark = pytest.mark.timeout(180)


def cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    )


@pytest.fixture
def client() -> Iterator[distributed.Client]:
    with cluster() as c, distributed.Client(c, timeout=60) as cl:
        yield cl


def exits(path: Path) -> list[tuple[int, int]]:
    try:
        return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]
    except FileNotFoundError:
        return []


def dask_worker_pids(cl: distributed.Client) -> set[int]:
    return set(cl.run(os.getpid).values())


def test_calls_run_in_warden_workers_of_every_dask_worker(client):
    ex = wdask.Executor(client, task_timeout=60)
    try:
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
        daskers = dask_worker_pids(client)
        seen = set(ex.map(slow_pids, range(8)))
        assert {d for d, _ in seen} == daskers  # both Dask workers took calls
        assert all(w not in daskers for _, w in seen)  # each ran in a warden worker
    finally:
        ex.shutdown()


def test_a_task_timeout_and_a_crash_fail_alone(client):
    ex = wdask.Executor(client, task_timeout=1.0)
    try:
        slow = ex.submit(sleep_then, 60)
        crash = ex.submit(die)
        with pytest.raises(warden.TaskTimeout):
            slow.result(timeout=60)
        with pytest.raises(warden.WorkerCrashed) as info:
            crash.result(timeout=60)
        assert info.value.signal == signal.SIGKILL
        # The Dask workers lived on, and so did their pools.
        before = dask_worker_pids(client)
        assert list(ex.map(square, range(6))) == [x * x for x in range(6)]
        assert dask_worker_pids(client) == before
    finally:
        ex.shutdown()


def test_finalizers_run_on_every_dask_worker_at_executor_shutdown_and_cluster_close(tmp_path):
    by_shutdown = tmp_path / "by_shutdown"
    by_close = tmp_path / "by_close"
    with cluster() as c, distributed.Client(c, timeout=60) as cl:
        daskers = dask_worker_pids(cl)
        ex = wdask.Executor(cl, finalizer=record_exit, finalargs=(str(by_shutdown),))
        assert ex.submit(square, 3).result() == 9
        ex.shutdown()
        assert {d for d, _ in exits(by_shutdown)} == daskers
        kept = wdask.Executor(cl, finalizer=record_exit, finalargs=(str(by_close),))
        assert kept.submit(square, 4).result() == 16
    # Leaving the blocks closed the client, then the cluster.
    assert wait_until(lambda: {d for d, _ in exits(by_close)} == daskers, timeout=30)
    assert len(exits(by_close)) == 2


def test_finalizers_run_on_client_restart_and_new_pools_start(tmp_path):
    path = tmp_path / "exits"
    with cluster() as c, distributed.Client(c, timeout=60) as cl:
        ex = wdask.Executor(cl, finalizer=record_exit, finalargs=(str(path),))
        old = dask_worker_pids(cl)
        assert ex.submit(square, 5).result() == 25
        cl.restart(timeout=60)
        assert wait_until(lambda: {d for d, _ in exits(path)} == old, timeout=30)
        cl.wait_for_workers(2, timeout=60)
        # The plugin set up a pool on each new Dask worker.
        assert wait_until(lambda: all(cl.run(wdask.has_pool, ex.name).values()), timeout=60, step=0.5)
        new = dask_worker_pids(cl)
        assert new.isdisjoint(old)
        dask_pid, _ = ex.submit(pids).result()
        assert dask_pid in new
        ex.shutdown()


def pool_pids(name: str, dask_worker: distributed.Worker) -> frozenset[int]:
    return frozenset(wdask.pool(name, dask_worker)._processes)


def test_dask_workers_sharing_one_process_each_keep_a_pool_of_their_own(tmp_path):
    """``LocalCluster(processes=False)``: two Dask workers in this process.
    Each gets its own pool, as many processes as its threads (before, the
    second worker's setup replaced and stopped the first's pool), and
    retiring one stops its pool alone: the other's calls go on (before, its
    pool was gone with the first and every call failed with "no warden pool")."""
    path = tmp_path / "exits"
    options = {"n_workers": 2, "threads_per_worker": 2, "processes": False, "dashboard_address": None}
    with distributed.LocalCluster(**options) as c, distributed.Client(c, timeout=60) as cl:
        ex = wdask.Executor(cl, finalizer=record_exit, finalargs=(str(path),))
        try:
            assert ex.submit(square, 2).result(timeout=60) == 4
            by_worker = cl.run(pool_pids, ex.name)
            assert len(by_worker) == 2 and all(len(p) == 2 for p in by_worker.values()), by_worker
            first, second = sorted(by_worker)
            assert by_worker[first].isdisjoint(by_worker[second])
            cl.retire_workers([first])
            assert wait_until(lambda: {w for _, w in exits(path)} == by_worker[first], timeout=30)
            assert list(ex.map(square, range(6), timeout=60)) == [x * x for x in range(6)]
            assert cl.run(pool_pids, ex.name) == {second: by_worker[second]}
        finally:
            ex.shutdown()
    assert {w for _, w in exits(path)} == by_worker[first] | by_worker[second]


DOCS_EXAMPLE = """
import sys
from distributed import Client, LocalCluster
import warden.dask

def open_db():
    global db
    db = {"connected": True}

def work(x):
    return db["connected"], x

if __name__ == "__main__":
    processes = sys.argv[1] == "processes"
    options = dict(n_workers=1, threads_per_worker=1, processes=processes, dashboard_address=None)
    with LocalCluster(**options) as cluster:
        with Client(cluster) as client, warden.dask.Executor(client, initializer=open_db) as ex:
            print(list(ex.map(work, range(3))), flush=True)
"""


@pytest.mark.parametrize("processes", ["threads", "processes"])
def test_what_the_initializer_of_a_main_module_sets_is_seen_by_its_tasks_through_dask(program, processes):
    """docs/dask.md's pattern, functions in the program's main module: Dask
    sends them by value, so each arrives as a copy with globals of its own.
    warden sends such a copy on to run in the worker's namespace of main, as
    it does the original: the initializer's global is there for the tasks
    (before, each call got a fresh copy of the globals: NameError)."""
    run = program(DOCS_EXAMPLE).run(timeout=120, args=(processes,))
    assert run.returncode == 0, run.stderr
    assert run.lines[-1] == "[(True, 0), (True, 1), (True, 2)]", run.stdout + run.stderr
