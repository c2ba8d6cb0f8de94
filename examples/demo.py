"""warden at work, in under ten seconds.

* workers report their start and exit hooks (initializer / finalizer);
* a worker killed mid-task fails that task only, and the pool goes on;
* a task past its timeout is stopped, its worker's finalizer runs, and it is replaced;
* a child's cyclic garbage is collected (its __del__ runs) before join() returns;
* Ctrl-C at any point: the wait is interrupted, queued tasks are cancelled,
  workers stop gracefully (their finalizers run); a second Ctrl-C kills them.

Run it with ``make demo-py``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import warden


def say(*words):
    print(*words, flush=True)


def worker_up(pool):
    say(f"  [{os.getpid()}] {pool}: worker started (initializer)")


def worker_down(pool):
    say(f"  [{os.getpid()}] {pool}: worker exiting (finalizer)")


def square(x):
    return x * x


def crash():
    os.kill(os.getpid(), signal.SIGKILL)


def nap(seconds):
    time.sleep(seconds)
    return seconds


class Noisy:
    def __init__(self):
        self.me = self  # a reference cycle: only the garbage collector frees it

    def __del__(self):
        say(f"  [{os.getpid()}] child: __del__ of cyclic garbage ran")


def leave_garbage():
    Noisy()


def main():
    say("1. A pool of two workers, with start and exit hooks")
    with warden.ProcessPoolExecutor(
        2,
        initializer=worker_up,
        initargs=("pool",),
        finalizer=worker_down,
        finalargs=("pool",),
    ) as ex:
        say("   squares:", list(ex.map(square, range(8))))

        say("2. A worker killed in the middle of a task")
        try:
            ex.submit(crash).result()
        except warden.WorkerCrashed as e:
            say(f"   that task failed alone: {e} (pid {e.pid}, signal {e.signal})")
        say("   the pool goes on:", ex.submit(square, 12).result())

        say("3. A task that runs past its 1 s timeout, in a pool with a task_timeout")
        with warden.ProcessPoolExecutor(
            1, finalizer=worker_down, finalargs=("timeout pool",), task_timeout=1.0
        ) as strict:
            start = time.monotonic()
            try:
                strict.submit(nap, 30).result()
            except warden.TaskTimeout as e:
                say(f"   stopped after {time.monotonic() - start:.1f} s: {e}")
            say("   a fresh worker took over:", strict.submit(square, 5).result())

        say("4. Long tasks: press Ctrl-C now to see a clean stop (waiting 3 s)")
        futures = [ex.submit(nap, 3) for _ in range(4)]
        say("   napped:", [f.result() for f in futures[:2]])
        for f in futures[2:]:
            f.cancel()
        say("5. Shutting down: every worker runs its finalizer")

    say("6. A child process that leaves cyclic garbage behind")
    p = warden.Process(target=leave_garbage)
    p.start()
    p.join()
    say(f"   joined, exit code {p.exitcode}")
    say("done")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        say("\nCtrl-C: the wait stopped, queued tasks were cancelled, workers ran their finalizers")
        sys.exit(130)
