"""What a type checker makes of warden's API: ``ProcessPoolExecutor``'s
``submit`` and ``map`` are typed as typeshed types
``concurrent.futures.Executor``'s (``submit`` gives a
``concurrent.futures.Future``; ``schedule``, warden's own, a generic
``warden.Future``), and ``Pool``'s methods as typeshed types
``multiprocessing.pool.Pool``'s, with the standard library's generic results
and iterators: code typed for the standard library checks unchanged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy is a build tool (`make venv` installs it)")

PROGRAM = """
    import concurrent.futures
    import contextlib
    import multiprocessing
    import multiprocessing.synchronize
    from collections.abc import Callable, Iterator
    from concurrent.futures import as_completed, wait
    from types import TracebackType
    from typing import ParamSpec, TypeVar

    import warden

    P = ParamSpec("P")
    T = TypeVar("T")


    class Logged(warden.ProcessPoolExecutor):
        # Overridden with typeshed's signature of the standard library's.
        def submit(
            self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
        ) -> concurrent.futures.Future[T]:
            return super().submit(fn, *args, **kwargs)


    class Quiet(warden.ProcessPoolExecutor):
        # As typeshed types the standard library's __exit__.
        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc_val: BaseException | None,
            exc_tb: TracebackType | None,
        ) -> bool | None:
            return super().__exit__(exc_type, exc_val, exc_tb)


    def gather(futures: list[concurrent.futures.Future[int]]) -> int:
        return sum(f.result() for f in futures)


    def square(x: int) -> int:
        return x * x


    async def main_async(ex: warden.ProcessPoolExecutor) -> None:
        n: int = await ex.run(square, 2)
        s: str = await ex.run(square, 2)  # wrong
        print(n, s)


    async def closes_its_maps_early(ex: warden.ProcessPoolExecutor, pool: warden.Pool) -> None:
        # As the docs advise: the calls not done are cancelled once it is closed.
        async with contextlib.aclosing(ex.amap(square, [1, 2])) as squares:
            async for n in squares:
                break
        async with contextlib.aclosing(pool.amap(square, [1, 2])) as more:
            async for m in more:
                m.upper()  # wrong
        await ex.amap(square, [3]).aclose()


    def main() -> None:
        with warden.ProcessPoolExecutor(1) as ex:
            future: concurrent.futures.Future[int] = ex.submit(square, 2)
            n: int = future.result()
            s: str = ex.submit(square, 2).result()  # wrong
            ex.submit(square, "2")  # wrong
            ex.submit(square, 1, 2)  # wrong
            limited: warden.Future[int] = ex.schedule(square, (2,), timeout=5.0)
            ex.schedule(square, [2]).result().upper()  # wrong
            squares: Iterator[int] = ex.map(square, [1, 2])
            names: Iterator[str] = ex.map(square, [1, 2])  # wrong
            futures = [ex.submit(square, i) for i in range(3)]
            for done in as_completed(futures):  # the standard library's own functions take them
                n = done.result() + 1
            n = gather(futures)
            # The standard library's documented idiom: futures as a dict's keys.
            future_to_x = {ex.submit(square, x): x for x in range(3)}
            for done in as_completed(future_to_x):
                n = future_to_x[done] + done.result()
            finished, _ = wait(futures)
            print(n, s, squares, names, finished, limited)
        spawn = multiprocessing.get_context("spawn")
        with warden.ProcessPoolExecutor(1, mp_context=spawn) as ex, warden.Pool(1, context=spawn) as pool:
            print(ex, pool)
        warden.ProcessPoolExecutor(1, mp_context="spawn")  # wrong
        warden.Pool(1, context="spawn")  # wrong


    def waits_on(event: multiprocessing.synchronize.Event) -> bool:
        return event.wait(0.1)


    def takes_a_warden_event_for_the_standard_librarys() -> bool:
        return waits_on(warden.Event())


    def catches_the_executors_error_by_its_submodules_name(ex: warden.ProcessPoolExecutor) -> int:
        # ``import warden as cf`` in place of concurrent.futures: cf.process.BrokenProcessPool.
        try:
            return ex.submit(square, 2).result()
        except warden.process.BrokenProcessPool:
            return -1


    def returns_from_inside_the_with_block(n: int) -> int:
        # The executor's __exit__ never swallows the exception: no "missing return".
        with warden.ProcessPoolExecutor(1) as ex:
            return ex.submit(square, n).result()
    """


POOL_PROGRAM = """
    import multiprocessing.pool
    from types import TracebackType

    import warden


    def square(x: int) -> int:
        return x * x


    def add(x: int, y: int) -> int:
        return x + y


    async def main_async(pool: warden.Pool) -> None:
        n: int = await pool.run(square, 2)
        s: str = await pool.run(square, 2)  # wrong
        await pool.run(square, "2")  # wrong
        async for m in pool.amap(square, [1, 2]):
            n = m + 1
        print(n, s)


    def on_squares(values: list[int]) -> None:
        print(sum(values))


    def collect(results: list[multiprocessing.pool.AsyncResult[int]]) -> list[int]:
        return [r.get() for r in results]


    class MyPool(warden.Pool):
        def extra(self) -> int:
            return 1


    class QuietPool(warden.Pool):
        # As typeshed types the standard library's __exit__.
        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc_val: BaseException | None,
            exc_tb: TracebackType | None,
        ) -> None:
            super().__exit__(exc_type, exc_val, exc_tb)


    def a_subclass_enters_as_itself() -> int:
        with MyPool(1) as pool:
            return pool.extra()


    def main() -> None:
        with warden.Pool(1) as pool:
            n: int = pool.apply(square, (2,))
            s: str = pool.apply(square, (2,))  # wrong
            pending = pool.apply_async(square, (2,))
            n = pending.get(timeout=1)
            n = sum(collect([pool.apply_async(square, (i,)) for i in range(2)]))
            as_stdlib: multiprocessing.pool.AsyncResult[int] = pool.apply_async(square, (3,))
            squares: list[int] = pool.map(square, [1, 2])
            names: list[str] = pool.map(square, [1, 2])  # wrong
            pool.map(square, ["1"])  # wrong
            sums: list[int] = pool.starmap(add, [(1, 2)])
            later: multiprocessing.pool.MapResult[int] = pool.map_async(square, [1], callback=on_squares)
            pairs: multiprocessing.pool.AsyncResult[list[int]] = pool.starmap_async(add, [(1, 2)])
            for m in pool.imap(square, [1, 2]):
                n = m + 1
            for word in pool.imap_unordered(square, [1, 2]):
                word.upper()  # wrong
            lazy: multiprocessing.pool.IMapIterator[int] = pool.imap(square, [3])
            print(n, s, as_stdlib, squares, names, sums, later, pairs, lazy)
    """


def _mypy_flags_exactly_the_wrong_lines(tmp_path, program):
    source = textwrap.dedent(program)
    (tmp_path / "prog.py").write_text(source)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "prog.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    flagged = {int(n) for n in re.findall(r"^prog\.py:(\d+): error:", run.stdout, re.MULTILINE)}
    wrong = {i for i, line in enumerate(source.splitlines(), 1) if line.endswith("# wrong")}
    assert flagged == wrong, run.stdout + run.stderr


def test_submit_map_and_run_carry_the_functions_types(tmp_path):
    _mypy_flags_exactly_the_wrong_lines(tmp_path, PROGRAM)


def test_pool_results_carry_the_functions_types_as_typeshed_gives_the_standard_pools(tmp_path):
    """``apply``, ``map``, ``imap`` and their ``_async`` forms are typed
    as the standard library's ``multiprocessing.pool.Pool`` is: a result
    of the wrong type is flagged, and ``AsyncResult[int]`` annotations of
    either library take warden's results."""
    _mypy_flags_exactly_the_wrong_lines(tmp_path, POOL_PROGRAM)


DASK_PROGRAM = """
    import concurrent.futures

    import warden.dask


    def square(x: int) -> int:
        return x * x


    def main(ex: warden.dask.Executor) -> int:
        n: int = ex.submit(square, 3).result()
        s: str = ex.submit(square, 3).result()  # wrong
        ex.submit(square, "3")  # wrong
        future: concurrent.futures.Future[int] = ex.submit(square, 4)
        return n + future.result()
    """


def test_the_dask_executors_submit_carries_the_functions_types(tmp_path):
    pytest.importorskip("distributed", reason="Dask's distributed is a test tool (`make test-tools`)")
    _mypy_flags_exactly_the_wrong_lines(tmp_path, DASK_PROGRAM)


AS_COMPLETED_PROGRAM = """
    from concurrent.futures import FIRST_COMPLETED, as_completed, wait

    import warden


    def square(x: int) -> int:
        return x * x


    def main() -> int:
        total = 0
        with warden.ProcessPoolExecutor(2) as ex:
            futures = [ex.submit(square, i) for i in range(4)]
            for done in as_completed(futures):
                total += done.result()
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                total += f.result()
        return total
    """


def test_pyright_takes_warden_futures_in_as_completed_and_wait(tmp_path):
    """typeshed types ``as_completed()`` and ``wait()`` with a protocol whose
    ``_condition`` and ``_waiters`` are mutable attributes; pyright rejected a
    future whose class makes them properties (and typed the futures it
    yields as unknown). Type checkers now see the standard library's
    attributes."""
    pyright = shutil.which("pyright", path=os.path.dirname(sys.executable))
    if pyright is None:
        pytest.skip("pyright is a test tool (`make test-tools` installs it)")
    (tmp_path / "prog.py").write_text(textwrap.dedent(AS_COMPLETED_PROGRAM))
    (tmp_path / "pyrightconfig.json").write_text('{"typeCheckingMode": "strict"}')
    run = subprocess.run(
        [pyright, "--pythonpath", sys.executable, "prog.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 errors" in run.stdout, run.stdout


def test_run_time_type_hints_of_the_public_methods_evaluate():
    """``typing.get_type_hints`` (sphinx autodoc, pydantic,
    ``inspect.signature(eval_str=True)``) evaluates the annotations of every
    public method of the pools, their results and ``Future``: the standard
    library's ``IMapIterator``, which type checkers see as what ``imap``
    returns, cannot be subscripted at run time, and a type variable defined
    for type checkers only is a ``NameError`` there."""
    import inspect
    import typing

    import warden

    classes = (
        warden.Pool,
        warden.ProcessPoolExecutor,
        warden.Future,
        warden.AsyncResult,
        warden.IMapIterator,
    )
    checked = []
    for cls in classes:
        for name, member in vars(cls).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            typing.get_type_hints(member)
            checked.append(f"{cls.__name__}.{name}")
    for name in (
        "Pool.imap",
        "Pool.apply_async",
        "ProcessPoolExecutor.submit",
        "ProcessPoolExecutor.map",
        "Future.result",
    ):
        assert name in checked
