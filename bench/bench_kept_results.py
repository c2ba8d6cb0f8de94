"""What keeping a task's return value until its result is sent costs: unchunked
``submit``→``result`` of a task returning ``None`` (sent as it is) against one
returning a small tuple (kept by the worker until its result is sent, then
dropped, so that its ``__del__`` cannot hold the result back), on the same
pool, alternated; medians of 5 rounds.

    .venv/bin/python bench/bench_kept_results.py
"""

import statistics
import time

import warden


def none(i):
    return None


def pair(i):
    return (i, i)


def rate(ex, fn, n):
    t = time.perf_counter()
    fs = [ex.submit(fn, i) for i in range(n)]
    for f in fs:
        f.result()
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    n = 20000
    with warden.ProcessPoolExecutor(2) as ex:
        rate(ex, none, 2000)
        a, b = [], []
        for _ in range(5):
            a.append(rate(ex, none, n))
            b.append(rate(ex, pair, n))
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"None: {ma:,.0f} tasks/s  (i, i): {mb:,.0f} tasks/s  ratio {mb / ma:.2f}")
