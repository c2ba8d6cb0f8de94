"""Shared fixtures: programs run as real subprocesses, and process hygiene.

Every test is checked for leftovers: after it, no process started by this
test run may still be alive (they are killed, and the test fails).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    return int(rest[1]), rest[0]


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) descendants of ``pid``, from ``/proc/*/stat``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None and st[1] != "Z":
            parents.setdefault(st[0], []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z"


#: Commands that run a program where this process's /proc cannot be read:
#: a tmpfs over it, or the /proc of the PID namespace outside.
WITHOUT_OWN_PROC = {
    "hidden": [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs tmpfs /proc && exec "$@"',
        "-",
    ],
    "another-namespace": ["unshare", "--fork", "--pid"],
}


def can_run(command: list[str]) -> bool:
    """Whether ``command`` (a prefix of a command line, e.g. ``unshare``'s)
    can run ``true`` here."""
    try:
        return subprocess.run([*command, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def held_loans() -> int:
    """How many sets of buffers this process has lent and still holds."""
    from warden import _oob

    lender = _oob._the_lender
    return 0 if lender is None else len(lender.held)


def numpy():
    """numpy, or a skip saying why it is missing."""
    return pytest.importorskip("numpy", reason="numpy is optional (make test installs it)")


#: Program text (put in front of a program) defining
#: ``refuse_system_call(name, errno)``: a seccomp filter on
#: the calling thread, inherited by what it starts, that makes one system
#: call fail with ``errno``, as a container's or sandbox's filter (or an
#: older kernel, with ``ENOSYS``) does. x86-64 and aarch64.
REFUSE_SYSTEM_CALL = """

def refuse_system_call(name, error):
    import ctypes, platform, struct
    numbers = {
        "memfd_create": {"x86_64": 319, "aarch64": 279},
        "close_range": {"x86_64": 436, "aarch64": 436},
    }
    nr = numbers[name][platform.machine()]
    code = [
        (0x20, 0, 0, 0),  # load the system call's number
        (0x15, 0, 1, nr),  # the one to refuse?
        (0x06, 0, 0, 0x00050000 | error),  # refuse it
        (0x06, 0, 0, 0x7FFF0000),  # allow the rest
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *c) for c in code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(Program(len(code), ctypes.addressof(filters))), 0, 0) == 0
"""

#: Where :data:`REFUSE_SYSTEM_CALL` knows the system calls' numbers.
SECCOMP_MACHINES = ("x86_64", "aarch64")


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


@pytest.fixture(params=["zygote", "exec"])
def start_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per way a pool starts its workers, through
    ``$WARDEN_START`` (seen by pools made here and by programs run from here)."""
    monkeypatch.setenv("WARDEN_START", request.param)
    return str(request.param)


def _ours() -> set[int]:
    # The standard library's resource tracker (started by spawn-context
    # objects) lives as long as this process, by design.
    return {p for p in descendants(os.getpid()) if not _is_resource_tracker(p)}


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fails a test that leaves a child process of this test run behind."""
    before = _ours()
    yield
    ok = wait_until(lambda: not (_ours() - before), timeout=15.0)
    left = _ours() - before
    if not ok and left:
        kill_all(left)
        pytest.fail(f"processes left behind: {sorted(left)}")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    pid: int

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


class Program:
    """A Python program written to a file and run as a real subprocess."""

    def __init__(self, path: Path, tmp_path: Path) -> None:
        self.path = path
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen[str] | None = None

    def env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["OUT"] = str(self.tmp_path / "out.txt")
        env.update(extra or {})
        return env

    def start(
        self,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        stdin: int | None = None,
        command: list[str] | None = None,
    ) -> subprocess.Popen[str]:
        """Starts the program (``command``: the whole command line that runs
        it instead, e.g. under another program); cleaned up with the fixture."""
        self.proc = subprocess.Popen(
            command or [sys.executable, str(self.path), *args],
            cwd=self.tmp_path,
            env=self.env(env),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self.proc

    def run(
        self, timeout: float = 60.0, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Run:
        start = time.monotonic()
        proc = self.start(env, args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_all(descendants(proc.pid) | {proc.pid})
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a process it orphaned holds its output open
                out, err = "", "(its output is held open by a process that outlived it)"
            pytest.fail(f"program did not exit within {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
        return Run(proc.returncode, out, err, time.monotonic() - start, proc.pid)

    def run_without_own_proc(
        self,
        where: str,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 100.0,
    ) -> tuple[str, str]:
        """Runs the program where this process's ``/proc`` cannot be read
        (``where``: a key of :data:`WITHOUT_OWN_PROC`), skipping the test
        where that cannot be set up; its stdout and stderr, once it exited 0."""
        command = WITHOUT_OWN_PROC[where]
        if not can_run(command):
            pytest.skip(f"needs {command[0]}(1) and the right to run {' '.join(command[:3])}")
        proc = self.start(env=env, command=[*command, sys.executable, str(self.path), *args])
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        return out, err

    def out_lines(self) -> list[str]:
        """Lines the program (or its workers) appended to $OUT."""
        try:
            return (self.tmp_path / "out.txt").read_text().splitlines()
        except FileNotFoundError:
            return []

    def cleanup(self) -> None:
        proc = self.proc
        if proc is not None:
            left = descendants(proc.pid) | ({proc.pid} if proc.poll() is None else set())
            kill_all(left)
            if proc.poll() is None:
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Callable[[str], Program]]:
    """``program(source)`` writes a program file; ``.run()`` runs it."""
    made: list[Program] = []

    def make(source: str, name: str = "prog.py") -> Program:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        prog = Program(path, tmp_path)
        made.append(prog)
        return prog

    yield make
    for prog in made:
        prog.cleanup()


#: Where a test may make a cgroup (v1) of the pids controller, if it may.
PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A new cgroup of the pids controller (its directory), for a program
    to move itself into and set ``pids.max`` of: every process left in it is
    killed, and it is removed, at the end. Skipped where none can be made."""
    if not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip(f"needs a writable pids cgroup hierarchy at {PIDS_CGROUPS}")
    cgroup = PIDS_CGROUPS / f"warden-test-{os.getpid()}-{time.monotonic_ns()}"
    cgroup.mkdir()
    yield cgroup

    def removed() -> bool:
        try:
            for pid in (cgroup / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            cgroup.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    assert wait_until(removed, timeout=10), f"{cgroup} is still there"


def out_file_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
