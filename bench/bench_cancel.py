"""``shutdown(wait=False, cancel_futures=True)`` with many tasks waiting:
warden against the standard library.

N tasks of 10 ms are submitted to two workers; once the first is done,
``shutdown(wait=False, cancel_futures=True)`` is timed (how long the call
holds the caller), then how long until every future is done. Each
executor runs in a fresh interpreter. Run with
``python bench/bench_cancel.py [--tasks N]``.

The standard library's call returns at once and cancels later, on its
manager thread (its futures read as cancelled only then); warden's marks
every queued future cancelled before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import concurrent.futures as cf, multiprocessing as mp

def work(x):
    time.sleep(0.01)
    return x

if __name__ == "__main__":
    impl, n = sys.argv[1], int(sys.argv[2])
    if impl == "warden":
        import warden
        ex = warden.ProcessPoolExecutor(2)
    else:
        ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
    fs = [ex.submit(work, i) for i in range(n)]
    fs[0].result()
    started = time.perf_counter()
    ex.shutdown(wait=False, cancel_futures=True)
    call = time.perf_counter() - started
    cancelled_at_return = sum(f.cancelled() for f in fs)
    deadline = started + 120
    while not all(f.done() for f in fs) and time.perf_counter() < deadline:
        time.sleep(0.005)  # (not cf.wait: it never counts the standard library's cancelled futures)
    all_done = time.perf_counter() - started
    ex.shutdown(wait=True)
    print(json.dumps({"call": call, "all_done": all_done, "cancelled_at_return": cancelled_at_return}))
"""


def run(impl: str, tasks: int) -> dict[str, float]:
    # A file, not -c: the standard library's spawned workers import the main module.
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        command = [sys.executable, script, impl, str(tasks)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    args = parser.parse_args()
    print(f"shutdown(wait=False, cancel_futures=True), {args.tasks} tasks of 10 ms on 2 workers")
    print(f"{'':10} {'call (s)':>10} {'all done (s)':>13} {'cancelled at return':>20}")
    for impl in ("stdlib", "warden"):
        r = run(impl, args.tasks)
        print(f"{impl:10} {r['call']:10.3f} {r['all_done']:13.3f} {int(r['cancelled_at_return']):20d}")


if __name__ == "__main__":
    main()
