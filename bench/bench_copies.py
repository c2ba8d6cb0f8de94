"""What a large buffer's copies cost on this machine, outside warden.

The data path copies a large buffer into a fresh ``memfd`` (the sender) and,
for ``bytes`` and ``bytearray``, out of the mapping into a fresh object (the
receiver). Most of either is the kernel handing out fresh pages. This
measures the alternatives behind the choices in docs/benchmarks.md, median
of several runs each:

* into a fresh ``memfd``: one ``pwrite``; two halves from two threads into
  one ``memfd`` (the kernel serialises writers of one file); two halves from
  two threads into two ``memfd`` s;
* into fresh anonymous memory: with 4 KiB pages; populated in one call
  first (``MADV_POPULATE_WRITE``, what ``_warden.copy_to_bytes`` and the
  destinations of lent buffers do); advised for transparent huge pages
  (``MADV_HUGEPAGE``: fast when the kernel hands out memory it used
  recently, several times slower than 4 KiB pages when a virtual machine's
  hypervisor must back it first, which a run in one process rarely shows);
* a lent buffer read with ``_warden.read_remote`` (``process_vm_readv``,
  here out of this very process): into fresh memory, and into the spare a
  dropped array left behind.

Run with ``python bench/bench_copies.py [--mib N]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import threading
import time

RUNS = 7


def median_ms(fn) -> float:
    return 1e3 * statistics.median(fn() for _ in range(RUNS))


def into_memfds(src: memoryview, files: int, threads: int) -> float:
    n = src.nbytes
    fds = [os.memfd_create("bench-copies", os.MFD_CLOEXEC) for _ in range(files)]
    part = n // threads
    for fd in fds:
        os.ftruncate(fd, n // files)

    def write(i: int) -> None:
        fd = fds[i % files]
        offset = 0 if files > 1 else i * part
        view = src[i * part : (i + 1) * part]
        while view.nbytes:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    start = time.perf_counter()
    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    for fd in fds:
        os.close(fd)
    return seconds


def into_anonymous(src: bytes, advice: int | None) -> float:
    start = time.perf_counter()
    dst = mmap.mmap(-1, len(src), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if advice is not None:
        dst.madvise(advice)
    dst[:] = src
    seconds = time.perf_counter() - start
    dst.close()
    return seconds


#: ``MADV_POPULATE_WRITE`` (Linux 5.14), which the mmap module does not name.
MADV_POPULATE_WRITE = 23


def read_lent(src: memoryview, keep: list) -> float:
    from warden import _warden

    address, size = _warden.buffer_address(src)
    start = time.perf_counter()
    out = _warden.read_remote(os.getpid(), [(address, size, _warden.LENT_RAW)], size)
    seconds = time.perf_counter() - start
    keep.extend(out)  # kept: the next read gets fresh memory; dropped: a spare
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size in MiB (default 64)")
    args = parser.parse_args()
    src = os.urandom(args.mib << 20)
    view = memoryview(src)
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "absent"
    print(f"{args.mib} MiB, {os.cpu_count()} CPUs, transparent huge pages: {thp}; median of {RUNS} (ms)")
    rows = [
        ("memfd: one pwrite", lambda: into_memfds(view, 1, 1)),
        ("memfd: two threads, one memfd", lambda: into_memfds(view, 1, 2)),
        ("memfd: two threads, two memfds", lambda: into_memfds(view, 2, 2)),
        ("anonymous: 4 KiB pages", lambda: into_anonymous(src, None)),
        ("anonymous: MADV_POPULATE_WRITE", lambda: into_anonymous(src, MADV_POPULATE_WRITE)),
        ("anonymous: MADV_HUGEPAGE", lambda: into_anonymous(src, mmap.MADV_HUGEPAGE)),
    ]
    kept: list = []
    rows.append(("lent: read into fresh memory", lambda: read_lent(view, kept)))
    rows.append(("lent: read into a spare", lambda: read_lent(view, [])))
    for name, fn in rows:
        print(f"{name:34} {median_ms(fn):8.1f}")
        kept.clear()


if __name__ == "__main__":
    main()
