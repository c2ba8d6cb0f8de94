"""Results with large buffers while the program holds most of its file
descriptors: warden against the standard library.

A program that keeps many descriptors open (a server's sockets, open
files) sits near its soft limit (1 024 on most systems). Each result with
large buffers brings warden's parent one descriptor until the result is
taken, and the pool paces its reading when descriptors run short. This
measures what that costs: 50 tasks returning a 160 KB ``bytes`` each,
submitted at once and taken in order, then 20 taken one at a time, with
``max_tasks_per_child=1`` (every result comes from a new worker, whose own
descriptors reuse the numbers just freed) and without, holding ``HELD``
descriptors of the 1 024 and none. Each run in a fresh interpreter.
Run with ``python bench/bench_fd_pressure.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time

def block(i):
    return bytes([i % 251]) * 160_000

def main():
    kind, held, per_child = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    files = [open(os.devnull) for _ in range(held)]
    if kind == "warden":
        import warden
        ex = warden.ProcessPoolExecutor(2, max_tasks_per_child=per_child)
    else:
        import concurrent.futures as cf, multiprocessing as mp
        ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), max_tasks_per_child=per_child)
    with ex:
        ex.submit(block, 0).result()
        start = time.perf_counter()
        burst = [f.result() for f in [ex.submit(block, i) for i in range(50)]]
        mid = time.perf_counter()
        for i in range(20):
            ex.submit(block, i).result()
        end = time.perf_counter()
    assert all(b == bytes([i % 251]) * 160_000 for i, b in enumerate(burst))
    print(json.dumps({"burst": mid - start, "one_by_one": end - mid}))
    del files

if __name__ == "__main__":
    main()
"""

HELD = 786


def run(script: str, kind: str, held: int, per_child: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, script, kind, str(held), str(per_child)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    print(f"python {sys.version.split()[0]}; 50 x 160 KB results at once, then 20 one at a time (s)")
    print(f"{'pool':10} {'max_tasks_per_child':>20} {'fds held':>9} {'50 at once':>11} {'20 in turn':>11}")
    # A file, not -c: the standard library's spawned workers import it.
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "fd_pressure_child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        rows = [
            (kind, held, per_child, run(script, kind, held, per_child))
            for per_child in (1, 0)
            for held in (HELD, 0)
            for kind in ("warden", "stdlib")
        ]
    for kind, held, per_child, r in rows:
        label = str(per_child) if per_child else "-"
        print(f"{kind:10} {label:>20} {held:>9} {r['burst']:>11.2f} {r['one_by_one']:>11.2f}")


if __name__ == "__main__":
    main()
