"""``shutdown(wait=False, cancel_futures=True)`` with many tasks waiting:
warden against the standard library.

N tasks of 10 ms are submitted to two workers; once the first is done,
``shutdown(wait=False, cancel_futures=True)`` is timed (how long the call
holds the caller), then how long until every future is done. Each
executor runs in a fresh interpreter. Run with
``python bench/bench_cancel.py [--tasks N]``.

``--asyncio``: N calls awaited from one coroutine (``asyncio.gather`` of
``await ex.run(...)`` for warden, of ``loop.run_in_executor`` for the
standard library), the gather cancelled once the first calls have run; timed
is how long the cancel holds the event loop, until the gather is done.

``--each``: the N futures cancelled one by one (``f.cancel()`` in a loop,
as a program does after its first failure); timed is the loop.

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

async def cancel_a_gather(ex, impl, n):
    import asyncio

    loop = asyncio.get_running_loop()
    if impl == "warden":
        calls = [ex.run(work, i) for i in range(n)]
    else:
        calls = [loop.run_in_executor(ex, work, i) for i in range(n)]
    gathered = asyncio.ensure_future(asyncio.gather(*calls))
    await asyncio.sleep(0.3)
    started = time.perf_counter()
    gathered.cancel()
    try:
        await gathered
    except asyncio.CancelledError:
        pass
    return time.perf_counter() - started

if __name__ == "__main__":
    impl, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if impl == "warden":
        import warden
        ex = warden.ProcessPoolExecutor(2)
    else:
        ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
    if mode == "asyncio":
        import asyncio
        ex.submit(work, 0).result()
        held = asyncio.run(cancel_a_gather(ex, impl, n))
        ex.shutdown(wait=True, cancel_futures=True)
        print(json.dumps({"held": held}))
        sys.exit()
    fs = [ex.submit(work, i) for i in range(n)]
    fs[0].result()
    if mode == "each":
        started = time.perf_counter()
        cancelled = sum(f.cancel() for f in fs)
        call = time.perf_counter() - started
        ex.shutdown(wait=True)
        print(json.dumps({"call": call, "cancelled": cancelled}))
        sys.exit()
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


def run(impl: str, tasks: int, mode: str = "shutdown") -> dict[str, float]:
    # A file, not -c: the standard library's spawned workers import the main module.
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        command = [sys.executable, script, impl, str(tasks), mode]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--asyncio", action="store_true", help="cancel a gather of awaited calls")
    parser.add_argument("--each", action="store_true", help="cancel the futures one by one")
    args = parser.parse_args()
    if args.each:
        print(f"{args.tasks} futures of 10 ms tasks on 2 workers, each cancelled by f.cancel()")
        print(f"{'':10} {'the loop (s)':>13} {'cancelled':>10}")
        for impl in ("stdlib", "warden"):
            r = run(impl, args.tasks, "each")
            print(f"{impl:10} {r['call']:13.3f} {int(r['cancelled']):10d}")
        return
    if args.asyncio:
        print(f"a gather of {args.tasks} awaited calls of 10 ms on 2 workers, cancelled")
        print(f"{'':10} {'the event loop held (s)':>24}")
        for impl in ("stdlib", "warden"):
            print(f"{impl:10} {run(impl, args.tasks, 'asyncio')['held']:24.3f}")
        return
    print(f"shutdown(wait=False, cancel_futures=True), {args.tasks} tasks of 10 ms on 2 workers")
    print(f"{'':10} {'call (s)':>10} {'all done (s)':>13} {'cancelled at return':>20}")
    for impl in ("stdlib", "warden"):
        r = run(impl, args.tasks)
        print(f"{impl:10} {r['call']:10.3f} {r['all_done']:13.3f} {int(r['cancelled_at_return']):20d}")


if __name__ == "__main__":
    main()
