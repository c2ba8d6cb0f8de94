"""Tools that watch a program from inside it, run over a program using
warden's pools as over one using the standard library's: coverage.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("coverage", reason="coverage is optional (make test installs it)")

MEASURED = """
import sys

def work(x):
    return x * 3  # TASK

def target():
    print("child", flush=True)  # CHILD

if __name__ == "__main__":
    if sys.argv[1] == "warden":
        import warden as mp
        from warden import ProcessPoolExecutor
        kw = {}
    else:
        import concurrent.futures, multiprocessing
        mp = multiprocessing.get_context("spawn")
        ProcessPoolExecutor = concurrent.futures.ProcessPoolExecutor
        kw = {"mp_context": mp}
    with mp.Pool(1) as pool:
        print(pool.map(work, range(3)), flush=True)
    with ProcessPoolExecutor(1, **kw) as ex:
        print(ex.submit(work, 5).result(), flush=True)
    p = mp.Process(target=target)
    p.start()
    p.join()
"""


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
def test_coverage_with_multiprocessing_concurrency_measures_what_workers_and_children_run(tmp_path, impl):
    """``concurrency = multiprocessing``: coverage measures each child of
    ``multiprocessing`` by wrapping ``BaseProcess._bootstrap``, which warden's
    workers and children do not run; before, every line a task or a child's
    target ran was reported as missed, with no warning."""
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(MEASURED))
    (tmp_path / ".coveragerc").write_text("[run]\nconcurrency = multiprocessing\nparallel = true\n")
    run = subprocess.run(
        [sys.executable, "-m", "coverage", "run", str(prog), impl],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[0,", "3,", "6]", "15", "child"], run.stderr
    for step in (["combine", "-q"], ["json", "-q", "-o", "cov.json", "--include", str(prog)]):
        command = [sys.executable, "-m", "coverage", *step]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "cov.json").read_text())
    missing = set(next(iter(report["files"].values()))["missing_lines"])
    lines = prog.read_text().splitlines()
    for mark in ("# TASK", "# CHILD"):
        line = next(i for i, text in enumerate(lines, 1) if mark in text)
        assert line not in missing, f"{mark} (line {line}) reported as never run"
