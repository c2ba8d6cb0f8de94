"""Tasks of the Dask tests, in a module of their own: a warden worker imports
the module of each function it runs, and this one imports nothing heavy (the
test module imports distributed, which takes a second or more), so a
task's time is its own."""

from __future__ import annotations

import os
import signal
import time


def square(x):
    return x * x


def pids(_=None):
    """(Dask worker pid, warden worker pid)."""
    return os.getppid(), os.getpid()


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def record_exit(path):
    """A finalizer: appends "<Dask worker pid> <warden worker pid>" to ``path``."""
    with open(path, "a") as f:
        f.write(f"{os.getppid()} {os.getpid()}\n")


def slow_pids(_):
    time.sleep(0.3)
    return pids()
