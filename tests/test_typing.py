"""What a type checker makes of warden's API: ``ProcessPoolExecutor``'s
``submit``, ``map`` and ``run`` are typed as typeshed types
``concurrent.futures.Executor``'s, with a generic ``warden.Future``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy is a build tool (`make venv` installs it)")

PROGRAM = """
    from collections.abc import Iterator
    from concurrent.futures import as_completed, wait

    import warden


    def square(x: int) -> int:
        return x * x


    async def main_async(ex: warden.ProcessPoolExecutor) -> None:
        n: int = await ex.run(square, 2)
        s: str = await ex.run(square, 2)  # wrong
        print(n, s)


    def main() -> None:
        with warden.ProcessPoolExecutor(1) as ex:
            future: warden.Future[int] = ex.submit(square, 2)
            n: int = future.result()
            s: str = ex.submit(square, 2).result()  # wrong
            ex.submit(square, "2")  # wrong
            ex.submit(square, 1, 2)  # wrong
            squares: Iterator[int] = ex.map(square, [1, 2])
            names: Iterator[str] = ex.map(square, [1, 2])  # wrong
            futures = [ex.submit(square, i) for i in range(3)]
            for done in as_completed(futures):  # the standard library's own functions take them
                n = done.result() + 1
            finished, _ = wait(futures)
            print(n, s, squares, names, finished)
    """


def test_submit_map_and_run_carry_the_functions_types(tmp_path):
    source = textwrap.dedent(PROGRAM)
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
