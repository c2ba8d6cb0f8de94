"""warden against the standard library and its peers, in one run.

Contenders: warden, ``concurrent.futures.ProcessPoolExecutor`` (spawn),
``multiprocessing.Pool`` (fork), loky, pebble and mpire, each with its own
API and its own default start method, two workers each. Every measurement
opens a fresh pool, warms it up (every worker started and numpy imported in
it), times the work, and closes the pool; the contenders take turns within
each round and every figure is the median of the rounds
(``WARDEN_BENCH_ROUNDS``, default 3).

Measurements (lower is better unless it says tasks/s):

* ``submit``: N unchunked no-op ``submit`` -> ``result`` (executor APIs:
  warden's and the standard library's ``ProcessPoolExecutor``, loky, pebble's
  ``schedule``); tasks/s.
* ``apply_async``: N unchunked no-op ``apply_async`` -> ``get`` (pool APIs:
  ``warden.Pool``, ``multiprocessing.Pool``, mpire); tasks/s.
* ``Executor.map`` / ``Pool.map`` of 1e6 tiny items (``abs``), with
  ``multiprocessing.Pool``'s default chunk size (``len / (4 * workers)``) for
  everyone.
* a 64 MiB ``bytes``, a 64 MiB numpy array and a ``str`` of 64 Mi
  characters sent to a worker and returned (one ``submit`` /
  ``apply_async`` of the identity function).
* 1000 numpy arrays of 1 MiB through ``map`` and back (identity, default chunk
  size rule as above).

Ratios come first: how many times faster warden is than each contender (their
time / warden's time), then the figures themselves. Run with
``make bench-peers`` (which installs the peers into the venv) or
``python bench/bench_peers.py``. ``WARDEN_BENCH_QUICK=1`` makes a short run
(fewer tasks and items, 16 MiB payloads, 100 arrays) for a smoke
test on a small machine; ``WARDEN_BENCH_ONLY=MiB,map`` runs only the rows
whose name contains one of the words.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import warden

try:
    import numpy as np
except ImportError:  # pragma: no cover - the make target installs it
    np = None

QUICK = os.environ.get("WARDEN_BENCH_QUICK", "") not in ("", "0")
WORKERS = int(os.environ.get("WARDEN_BENCH_WORKERS", "2"))
ROUNDS = int(os.environ.get("WARDEN_BENCH_ROUNDS", "3"))
N_TASKS = 2_000 if QUICK else 10_000
N_MAP = 200_000 if QUICK else 1_000_000
BIG = (16 if QUICK else 64) << 20
N_ARRAYS = 100 if QUICK else 1000
ARRAY = 1 << 20

CONTENDERS = ["warden", "PPE(spawn)", "Pool(fork)", "loky", "pebble", "mpire"]


def noop(x: Any = None) -> Any:
    return x


def identity(x: Any) -> Any:
    return x


def warm(_: Any = None) -> int:
    # Imports what the data benchmarks unpickle, and holds the worker a
    # moment so that the warm-up reaches every worker.
    if np is not None:
        np.zeros(1)
    time.sleep(0.02)
    return os.getpid()


def chunk_for(n: int) -> int:
    """``multiprocessing.Pool.map``'s default chunk size for n items."""
    size, extra = divmod(n, WORKERS * 4)
    return size + (1 if extra else 0)


# -- one adapter per contender -------------------------------------------------
#
# ``call(fn, arg)`` is one unchunked call, ``many(fn, args)`` submits every call
# first and then waits for each result, ``map(fn, items, chunksize)`` is the
# contender's own chunked map.


class Executor:
    """Anything with the ``concurrent.futures`` API (warden, stdlib, loky)."""

    def __init__(self, ex: Any) -> None:
        self.ex = ex

    def many(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        futures = [self.ex.submit(fn, a) for a in args]
        return [f.result() for f in futures]

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.ex.submit(fn, arg).result()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int) -> list[Any]:
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        self.ex.shutdown(wait=True)


class Pebble(Executor):
    def many(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        futures = [self.ex.schedule(fn, args=(a,)) for a in args]
        return [f.result() for f in futures]

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.ex.schedule(fn, args=(arg,)).result()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int) -> list[Any]:
        return list(self.ex.map(fn, items, chunksize=chunksize).result())

    def close(self) -> None:
        self.ex.close()
        self.ex.join(60)


class MpPool:
    """Anything with the ``multiprocessing.Pool`` API (warden, stdlib)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def many(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        results = [self.pool.apply_async(fn, (a,)) for a in args]
        return [r.get() for r in results]

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply_async(fn, (arg,)).get()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int) -> list[Any]:
        return self.pool.map(fn, items, chunksize)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class Mpire(MpPool):
    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int) -> list[Any]:
        return self.pool.map(fn, items, chunk_size=chunksize, concatenate_numpy_output=False)

    def close(self) -> None:
        self.pool.stop_and_join()
        self.pool.terminate()


def open_contender(name: str, api: str) -> Any:
    """A fresh two-worker pool of ``name``; ``api`` is ``"executor"`` or
    ``"pool"`` for warden, which has both."""
    if name == "warden":
        if api == "pool":
            return MpPool(warden.Pool(WORKERS))
        return Executor(warden.ProcessPoolExecutor(WORKERS))
    if name == "PPE(spawn)":
        return Executor(cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")))
    if name == "Pool(fork)":
        return MpPool(multiprocessing.get_context("fork").Pool(WORKERS))
    if name == "loky":
        import loky

        return Executor(loky.ProcessPoolExecutor(WORKERS))
    if name == "pebble":
        import pebble

        return Pebble(pebble.ProcessPool(WORKERS))
    if name == "mpire":
        import mpire

        return Mpire(mpire.WorkerPool(WORKERS, keep_alive=True))
    raise ValueError(name)


@contextlib.contextmanager
def warm_pool(name: str, api: str) -> Iterator[Any]:
    pool = open_contender(name, api)
    try:
        pool.many(warm, list(range(WORKERS * 3)))
        yield pool
    finally:
        pool.close()


# -- the measurements ----------------------------------------------------------


class Bench:
    """One row: a name, a unit, who takes part, and how to time one round."""

    def __init__(
        self,
        name: str,
        unit: str,
        contenders: list[str],
        api: str,
        run: Callable[[Any], float],
        needs_numpy: bool = False,
    ) -> None:
        self.name, self.unit, self.contenders, self.api, self.run = name, unit, contenders, api, run
        self.needs_numpy = needs_numpy


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tasks_per_second(pool: Any) -> float:
    args = list(range(N_TASKS))
    seconds, out = timed(lambda: pool.many(noop, args))
    assert out == args
    return N_TASKS / seconds


def map_seconds(pool: Any) -> float:
    items = list(range(-N_MAP // 2, N_MAP - N_MAP // 2))
    seconds, out = timed(lambda: pool.map(abs, items, chunk_for(N_MAP)))
    assert len(out) == N_MAP and out[0] == abs(items[0]) and out[-1] == abs(items[-1])
    return seconds


_BYTES: bytes | None = None


def bytes_round_trip(pool: Any) -> float:
    global _BYTES
    if _BYTES is None:
        _BYTES = os.urandom(BIG)
    seconds, out = timed(lambda: pool.call(identity, _BYTES))
    assert out == _BYTES
    return seconds


_STR: str | None = None


def str_round_trip(pool: Any) -> float:
    global _STR
    if _STR is None:
        _STR = os.urandom(BIG // 2).hex()
    seconds, out = timed(lambda: pool.call(identity, _STR))
    assert out == _STR
    return seconds


_ARRAY: Any = None
_ARRAYS: list[Any] | None = None


def array_round_trip(pool: Any) -> float:
    global _ARRAY
    if _ARRAY is None:
        _ARRAY = np.random.default_rng(1).random(BIG // 8)
    seconds, out = timed(lambda: pool.call(identity, _ARRAY))
    assert np.array_equal(out, _ARRAY)
    return seconds


def arrays_map(pool: Any) -> float:
    global _ARRAYS
    if _ARRAYS is None:
        rng = np.random.default_rng(2)
        _ARRAYS = [rng.random(ARRAY // 8) for _ in range(N_ARRAYS)]
    seconds, out = timed(lambda: pool.map(identity, _ARRAYS, chunk_for(N_ARRAYS)))
    assert len(out) == N_ARRAYS and all(np.array_equal(a, b) for a, b in zip(out, _ARRAYS, strict=True))
    return seconds


EXECUTORS = ["warden", "PPE(spawn)", "loky", "pebble"]
POOLS = ["warden", "Pool(fork)", "mpire"]

BENCHES = [
    Bench(f"submit->result, {N_TASKS} no-op", "tasks/s", EXECUTORS, "executor", tasks_per_second),
    Bench(f"apply_async->get, {N_TASKS} no-op", "tasks/s", POOLS, "pool", tasks_per_second),
    Bench(f"Executor.map, {N_MAP:.0e} items", "s", EXECUTORS, "executor", map_seconds),
    Bench(f"Pool.map, {N_MAP:.0e} items", "s", POOLS, "pool", map_seconds),
    Bench(f"{BIG >> 20} MiB bytes round trip", "s", CONTENDERS, "executor", bytes_round_trip),
    Bench(f"{BIG >> 20} MiB numpy round trip", "s", CONTENDERS, "executor", array_round_trip, True),
    Bench(f"{BIG >> 20} Mi-character str round trip", "s", CONTENDERS, "executor", str_round_trip),
    Bench(f"{N_ARRAYS} x 1 MiB arrays, map", "s", CONTENDERS, "executor", arrays_map, True),
]


def available(name: str) -> bool:
    module = {"loky": "loky", "pebble": "pebble", "mpire": "mpire"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def measure(bench: Bench) -> dict[str, float]:
    """Median of ROUNDS rounds per contender, contenders alternating."""
    who = [c for c in bench.contenders if available(c)]
    samples: dict[str, list[float]] = {c: [] for c in who}
    for _ in range(ROUNDS):
        for name in who:
            with warm_pool(name, bench.api) as pool:
                samples[name].append(bench.run(pool))
    return {c: statistics.median(s) for c, s in samples.items()}


def speedup(bench: Bench, ours: float, theirs: float) -> float:
    return ours / theirs if bench.unit == "tasks/s" else theirs / ours


def fmt(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit == "tasks/s" else f"{value:.3f}"


def main() -> None:
    print(f"# warden vs peers ({'quick' if QUICK else 'full'} run)")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {WORKERS} workers, "
        f"median of {ROUNDS} rounds; numpy {'absent' if np is None else np.__version__}"
    )
    missing = [c for c in CONTENDERS if not available(c)]
    if missing:
        print(f"not installed (skipped): {', '.join(missing)}")
    only = [w for w in os.environ.get("WARDEN_BENCH_ONLY", "").split(",") if w]
    results: list[tuple[Bench, dict[str, float]]] = []
    for bench in BENCHES:
        if bench.needs_numpy and np is None:
            continue
        if only and not any(w in bench.name for w in only):
            continue
        start = time.perf_counter()
        results.append((bench, measure(bench)))
        print(f"  measured {bench.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    others = CONTENDERS[1:]

    print("\n## warden's speed-up (their time / warden's time)\n")
    print("| measurement | " + " | ".join(f"vs {c}" for c in others) + " |")
    print("|---|" + "---:|" * len(others))
    for bench, figures in results:
        ours = figures["warden"]
        cells = [f"{speedup(bench, ours, figures[c]):.2f}x" if c in figures else "—" for c in others]
        print(f"| {bench.name} | " + " | ".join(cells) + " |")

    print("\n## figures\n")
    print("| measurement | unit | " + " | ".join(CONTENDERS) + " |")
    print("|---|---|" + "---:|" * len(CONTENDERS))
    for bench, figures in results:
        cells = [fmt(figures[c], bench.unit) if c in figures else "—" for c in CONTENDERS]
        print(f"| {bench.name} | {bench.unit} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
