"""The parent's memory under many small tasks: warden against the standard library.

1. **growth**: 1e6 no-op tasks submitted in batches of 10 000, each batch's
   results consumed before the next; the parent's RSS after the first batch,
   after a fifth of them and after the last: the growth from the first, and
   from the fifth (once the allocators have warmed up: a pool that keeps
   something per task goes on growing).
2. **outstanding**: 100 000 no-op futures submitted at once (two workers busy
   on a blocker so that none of them can finish), then the parent's RSS;
   reported as the growth over the RSS before submitting.

Both for ``warden.ProcessPoolExecutor`` and
``concurrent.futures.ProcessPoolExecutor`` (spawn), each in a fresh
interpreter so that one does not inherit the other's heap. Run with
``python bench/bench_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys, time

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def noop(x=None):
    return x

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)

def main():
    kind, measure, n, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if kind == "warden":
        import warden
        ex = warden.ProcessPoolExecutor(2)
    else:
        import concurrent.futures as cf, multiprocessing as mp
        ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
    with ex:
        ex.submit(noop).result()
        out = {}
        if measure == "growth":
            batch = 10_000
            for i in range(n // batch):
                for f in [ex.submit(noop, j) for j in range(batch)]:
                    f.result()
                if i == 0:
                    out["first"] = rss()
                if i == n // batch // 5:
                    out["fifth"] = rss()
            out["last"] = rss()
        else:
            blockers = [ex.submit(wait_for, path) for _ in range(2)]
            time.sleep(0.5)
            before = rss()
            futures = [ex.submit(noop, j) for j in range(n)]
            out["before"], out["after"] = before, rss()
            open(path, "w").close()
            for f in blockers + futures:
                f.result()
        print(json.dumps(out))

if __name__ == "__main__":
    main()
"""


def run(kind: str, measure: str, n: int, tmp: str) -> dict[str, int]:
    # A script file, so that spawned workers can import its functions.
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "memory_child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        return _run(script, kind, measure, n, tmp)


def _run(script: str, kind: str, measure: str, n: int, tmp: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, script, kind, measure, str(n), tmp],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {measure}: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 tasks and 20 000 futures")
    args = parser.parse_args()
    n_growth = 100_000 if args.quick else 1_000_000
    n_out = 20_000 if args.quick else 100_000
    mib = 1 << 20
    print(f"python {sys.version.split()[0]}, 2 workers")
    title = f"growth over {n_growth:,} tasks"
    print(f"\n{title:32} {'first MiB':>10} {'fifth MiB':>10} {'last MiB':>9} {'growth':>7} {'since 1/5':>9}")
    for kind in ("warden", "stdlib"):
        r = run(kind, "growth", n_growth, "")
        first, fifth, last = r["first"] / mib, r["fifth"] / mib, r["last"] / mib
        print(f"{kind:32} {first:10.1f} {fifth:10.1f} {last:9.1f} {last - first:7.2f} {last - fifth:9.2f}")
    title = f"{n_out:,} outstanding futures"
    print(f"\n{title:44} {'before MiB':>10} {'after MiB':>9} {'growth':>8}")
    growth = {}
    for kind in ("warden", "stdlib"):
        with tempfile.TemporaryDirectory() as d:
            r = run(kind, "outstanding", n_out, os.path.join(d, "go"))
        growth[kind] = (r["after"] - r["before"]) / mib
        print(f"{kind:44} {r['before'] / mib:10.1f} {r['after'] / mib:9.1f} {growth[kind]:8.1f}")
    print(f"\nwarden / stdlib, outstanding futures' memory: {growth['warden'] / growth['stdlib']:.2f}")


if __name__ == "__main__":
    main()
