"""Progress bars on maps: ``progress=True``, a tqdm bar, or tqdm options."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import warden

from conftest import wait_until

tqdm_auto = pytest.importorskip(
    "tqdm.auto", reason="tqdm is not installed (optional: warden[progress]; `make test` installs it)"
)


class Recorder(tqdm_auto.tqdm):
    """A real tqdm bar that remembers each update."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", io.StringIO())
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def update(self, n=1):
        self.steps.append(n)
        return super().update(n)


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


def wait_for_file(path):
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return path


def open_bars() -> list[object]:
    return list(tqdm_auto.tqdm._instances)


@pytest.fixture
def pool():
    with warden.Pool(2) as p:
        yield p


@pytest.fixture
def executor():
    with warden.ProcessPoolExecutor(2) as ex:
        yield ex


MAPS = {
    "Executor.map": lambda ex, pool, bar: list(ex.map(square, range(10), progress=bar)),
    "Executor.map chunked": lambda ex, pool, bar: list(ex.map(square, range(10), chunksize=4, progress=bar)),
    "Pool.map": lambda ex, pool, bar: pool.map(square, range(10), chunksize=4, progress=bar),
    "Pool.starmap": lambda ex, pool, bar: pool.starmap(add, [(x, x) for x in range(10)], 3, progress=bar),
    "Pool.imap": lambda ex, pool, bar: list(pool.imap(square, range(10), chunksize=4, progress=bar)),
    "Pool.imap_unordered": lambda ex, pool, bar: list(pool.imap_unordered(square, range(10), progress=bar)),
}


@pytest.mark.parametrize("which", list(MAPS))
def test_the_bar_counts_every_item_per_result_chunk(executor, pool, which):
    bar = Recorder()
    results = MAPS[which](executor, pool, bar)
    assert len(results) == 10
    assert bar.n == 10 and bar.total == 10
    chunk = {"Executor.map": 1, "Pool.imap_unordered": 1, "Pool.starmap": 3}.get(which, 4)
    assert sorted(bar.steps) == sorted([chunk] * (10 // chunk) + ([10 % chunk] if 10 % chunk else []))
    bar.close()


class FrontEnd(Recorder):
    """A bar that sizes its display in ``reset(total=...)``, as tqdm's
    notebook widget and rich front ends do (the attribute alone leaves them
    showing a bar of one item)."""

    display_total = None

    def reset(self, total=None):
        if total is not None:
            self.display_total = total
        return super().reset(total=total)


@pytest.mark.parametrize("which", list(MAPS))
def test_a_bar_without_a_total_is_given_one_as_tqdms_front_ends_take_it(executor, pool, which):
    bar = FrontEnd()
    MAPS[which](executor, pool, bar)
    assert bar.display_total == 10 and bar.total == 10 and bar.n == 10
    bar.close()


def test_the_bar_advances_as_results_arrive(executor, tmp_path):
    release = str(tmp_path / "release")
    bar = Recorder()
    it = executor.map(wait_for_file, [str(tmp_path), release], progress=bar)
    assert next(it) == str(tmp_path)
    assert wait_until(lambda: bar.n == 1, timeout=10)
    time.sleep(0.2)
    assert bar.n == 1  # the second result has not arrived
    Path(release).touch()
    assert list(it) == [release]
    assert bar.n == 2
    bar.close()


def test_a_bar_warden_makes_is_closed_at_the_end(pool):
    out = io.StringIO()
    assert pool.map(square, range(6), progress={"file": out, "desc": "squares"}) == [x * x for x in range(6)]
    assert open_bars() == []
    assert "squares" in out.getvalue() and "6/6" in out.getvalue()


@pytest.mark.parametrize("which", ["Executor.map", "Pool.map", "Pool.imap"])
def test_a_bar_warden_makes_is_closed_when_the_map_fails(executor, pool, which):
    options = {"file": io.StringIO()}
    with pytest.raises(ValueError, match="three"):
        if which == "Executor.map":
            list(executor.map(fail_on_three, range(6), progress=options))
        elif which == "Pool.map":
            pool.map(fail_on_three, range(6), 1, progress=options)
        else:
            list(pool.imap(fail_on_three, range(6), progress=options))
    # (An imap's bar, whose iteration could go on, closes once every item is in.)
    assert wait_until(lambda: open_bars() == [], timeout=10), open_bars()


@pytest.mark.parametrize("unordered", [False, True])
def test_an_imap_of_single_items_counts_every_item_past_an_error(pool, unordered):
    """With ``chunksize=1`` an ``imap`` goes on after an item's error, and so
    does its bar: it counts the failed item and every one after it."""
    bar = Recorder(total=6)
    imap = pool.imap_unordered if unordered else pool.imap
    results, errors = [], []
    it = imap(fail_on_three, range(6), progress=bar)
    while True:
        try:
            results.append(next(it))
        except StopIteration:
            break
        except ValueError as e:
            errors.append(str(e))
    assert sorted(results) == [0, 1, 2, 4, 5] and errors == ["three"]
    assert bar.n == 6
    bar.close()


def test_progress_without_tqdm_says_what_to_install(monkeypatch, pool, executor):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"pip install 'warden\[progress\]'"):
        pool.map(square, range(3), progress=True)
    with pytest.raises(ImportError, match="tqdm"):
        executor.map(square, range(3), progress=True)
    assert pool.map(square, range(3)) == [0, 1, 4]


def test_progress_of_the_wrong_type_is_refused(pool):
    with pytest.raises(TypeError, match="progress must be"):
        pool.map(square, range(3), progress="yes")


CTRL_C = """
import os, sys, time
import tqdm.auto
import warden

class Bar(tqdm.auto.tqdm):
    def close(self):
        if not self.disable:
            print("bar closed at", self.n, flush=True)
        super().close()

tqdm.auto.tqdm = Bar

def slow(x):
    if x == 0:
        return x
    open(os.environ["OUT"], "a").write("running\\n")
    time.sleep(60)

if __name__ == "__main__":
    with warden.Pool(2) as pool:
        try:
            pool.map(slow, range(3), 1, progress={"file": sys.stderr})
        except KeyboardInterrupt:
            print("interrupted", flush=True)
"""


def test_a_bar_warden_makes_is_closed_on_ctrl_c(program):
    prog = program(CTRL_C)
    proc = prog.start()
    # Both slow items run: the fast one's result came back before the second began.
    assert wait_until(lambda: prog.out_lines() == ["running", "running"], timeout=30)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.splitlines() == ["bar closed at 1", "interrupted"], err
