"""One core pool as the Python classes use it.

A :class:`Runner` owns a ``CorePool`` (the Rust pool and its outcome queue),
the table of callbacks waiting for task outcomes, and the daemon thread
(``warden-results``) that drains the queue and calls them. It holds no
reference to the executor or pool object that created it, so that object can
become unreachable and shut down on its own.

It also owns what happens at interpreter exit (:func:`_shut_down_at_exit`),
through the core's shutdown ladder (``CorePool.stop``): an executor runs what
was submitted to it, then its workers retire, as ``concurrent.futures``
promises (only Ctrl-C or its ``exit_timeout`` cuts that short, and stderr then
says how many tasks were dropped); a ``Pool`` and daemon processes are
terminated and other processes joined, as ``multiprocessing`` does. A pool
with nothing pending never keeps the interpreter from exiting, even one whose
executor is still referenced at exit. Then the process's exit callbacks run
(:func:`at_interpreter_exit`).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.resource_tracker
import multiprocessing.spawn
import multiprocessing.util
import os
import re
import signal
import stat
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from pickle import dumps as _dumps  # bound at import: a task that patches pickle cannot break warden
from pickle import loads as _loads
from typing import Any, Literal

from . import _context, _finalize, _logging, _native, _oob, _pickle, _warden
from ._errors import ErrorData
from ._pickle import dumps_for_spawn, let_go_at_exit, note_main_thread_done
from ._remote import text_of
from ._stderr import say, say_exception

#: The worker program: this interpreter, with its flags, running warden._worker.
WORKER_MODULE = "warden._worker"

#: Set in a worker's environment where the directory warden was imported
#: from is put first on its ``PYTHONPATH`` (see :func:`worker_env`): ``+``
#: then the ``PYTHONPATH`` the program had, or ``-`` if it had none. The
#: worker sets that back as it starts (``warden._worker``).
PYTHONPATH_ENV = "WARDEN_PYTHONPATH"

#: Grace period of each escalation step (seconds), the core's default.
GRACE: float = _warden.DEFAULT_GRACE
#: How long a new worker has to start, to its hello (seconds); None for the
#: core's default. Its initializer then runs as long as it takes.
INIT_TIMEOUT: float | None = None
#: The largest frame on a worker channel (bytes); None for the core's default.
#: Out-of-band buffers do not count against it (see _oob).
MAX_FRAME: int | None = None

#: A task's outcome: ``(True, result bytes)`` or ``(False, ErrorData)``.
OnDone = Callable[[bool, Any], None]

#: Runners that may still have live workers. Held strongly, so that interpreter
#: exit finds every pool still running (and stops its thread before the
#: interpreter finalizes); a runner leaves once its pool has shut down.
_live: set[Runner] = set()
_live_lock = _native.Lock()
#: In a results thread: ``core``, the pool whose outcomes it delivers.
_delivering = threading.local()

#: Why a pool's results thread may not wait, unbounded, for one of its results.
SELF_WAIT = (
    "cannot wait for a result of this pool in one of its callbacks: callbacks run on the "
    "thread that delivers the pool's results, so the wait would never end (wait with a "
    "timeout, or outside the callback)"
)


SELF_JOIN = (
    "cannot wait for this pool to shut down in one of its callbacks: callbacks run on the "
    "thread that delivers the pool's results, which the workers wait for as they exit (the "
    "shutdown goes on; wait outside the callback)"
)


def delivering(core: Any) -> bool:
    """Whether this thread is ``core``'s results thread, running a callback."""
    return getattr(_delivering, "core", None) is core


def refuse_self_wait(core: Any, message: str = SELF_WAIT) -> None:
    """Raises ``RuntimeError`` in ``core``'s results thread: a callback that
    waits there, without a timeout, for another of the pool's results would
    wait forever (the standard library's pools hang on it)."""
    if getattr(_delivering, "core", None) is core:
        raise RuntimeError(message)


#: Set once the interpreter started exiting: no new pools or tasks. Set
#: from the start if this module is first imported after warden's exit step
#: ran (by a later ``atexit`` handler): nothing would stop or drain a pool
#: started then, and its work would be lost without a word.
exiting = bool(getattr(sys.modules.get(__package__ or "warden"), "_exit_step_began", False))
#: Set once an exit step began (the executors' in ``threading``'s exit hooks,
#: or the ``atexit`` one): what it cancels is cut short by the exit.
exit_began = exiting


def park_at_exit() -> None:
    """Blocks for good a daemon thread whose wait the interpreter's exit cut
    short (its pool terminated at exit, its task cancelled), as the standard
    library's pools leave such a thread waiting: the interpreter's end ends
    it, instead of its traceback for a ``CancelledError`` it could do nothing
    about. Returns at once in any other thread (the main thread, a non-daemon
    thread, one not started by ``threading``, warden's own) and before exit."""
    if parks_at_exit():
        threading.Event().wait()


def parks_at_exit() -> bool:
    """Whether :func:`park_at_exit` would block the calling thread: the
    interpreter's exit has begun and this is a daemon thread of the
    program's."""
    if not exit_began:
        return False
    thread = threading.current_thread()
    return not (
        not thread.daemon
        or thread is threading.main_thread()
        or isinstance(thread, threading._DummyThread)
        or thread.name.startswith("warden-")
    )


def is_ctrl_c(error: BaseException | None) -> bool:
    """Whether ``error`` is Ctrl-C's ``KeyboardInterrupt``: bare, or in an
    exception group (as a trio nursery it ended raises it, or an
    ``except*`` clause that re-raised it)."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(KeyboardInterrupt) is not None
    return isinstance(error, KeyboardInterrupt)


#: Set in a worker told to stop (a signal): at its exit, the pools it started
#: are stopped, as after Ctrl-C, instead of running what is pending.
stop_requested = False


def seconds(name: str, value: Any) -> float | None:
    """A duration option as a float, or ``TypeError`` naming the option."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large a number of seconds") from None


def task_timeout(value: Any, name: str = "task_timeout") -> float | None:
    """The ``task_timeout`` option (or another of its kind, ``name``),
    checked: a positive number of seconds."""
    timeout = seconds(name, value)
    if timeout is not None and not timeout > 0:  # NaN too
        raise ValueError(f"{name} must be a positive number of seconds, not {timeout!r}")
    return timeout


def worker_hooks(
    initializer: Callable[..., Any] | None,
    initargs: Any,
    finalizer: Callable[..., Any] | None,
    finalargs: Any,
    worker_context: Callable[[], Any] | None,
) -> dict[str, Any]:
    """The per-worker hooks of a pool, checked: what a worker runs when it
    starts (``initializer``, entering ``worker_context``) and as it retires
    (exiting ``worker_context``, ``finalizer``)."""
    for name, hook in (
        ("initializer", initializer),
        ("finalizer", finalizer),
        ("worker_context", worker_context),
    ):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be a callable")
    return {
        "initializer": initializer,
        "initargs": tuple(initargs),
        "finalizer": finalizer,
        "finalargs": tuple(finalargs),
        "worker_context": worker_context,
    }


#: How a pool starts its workers: forked by its zygote (falling back to exec
#: where a zygote cannot work), or each by exec.
START_METHODS = ("zygote", "exec")


#: What a pool's zygote preloads unless told otherwise: the program's main
#: module, imported as ``__mp_main__`` (as ``multiprocessing``'s forkserver does).
DEFAULT_PRELOAD = "__main__"

#: Environment variable giving the default ``start`` of every pool.
START_ENV = "WARDEN_START"


def _threads_of_others() -> bool:
    """Whether this process runs a thread that neither ``threading`` nor
    warden started: a library's native threads (OpenBLAS's pool, which
    ``import numpy`` starts). False if it cannot tell."""
    try:
        tids = {int(tid) for tid in os.listdir("/proc/self/task")}
        if os.readlink("/proc/self") != str(os.getpid()):
            # Another pid namespace's /proc (``unshare --pid`` without one of
            # its own): the ids there are not this namespace's; each thread's
            # status lists its ids in every namespace, this one's last.
            tids = {_innermost_id(tid) for tid in tids}
    except (OSError, ValueError):
        return False
    tids.difference_update(t.native_id for t in threading.enumerate())
    tids.difference_update(_warden.own_thread_ids())
    return bool(tids)


def _innermost_id(tid: int) -> int:
    """The id, in this process's pid namespace, of its thread ``tid`` in
    ``/proc``'s."""
    with open(f"/proc/self/task/{tid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    raise ValueError(f"no NSpid in the status of thread {tid}")


def start_options(start: str | None, preload: Iterable[str] | None) -> tuple[str, list[str]]:
    """The ``start`` and ``preload`` arguments of a pool, checked. Without a
    ``start``, ``$WARDEN_START`` says, else ``"zygote"``."""
    if start is None:
        start = os.environ.get(START_ENV) or "zygote"
        if start not in START_METHODS:
            raise ValueError(f"${START_ENV} must be one of {START_METHODS}, not {start!r}")
    if start not in START_METHODS:
        raise ValueError(f"start must be one of {START_METHODS}, not {start!r}")
    if preload is None:
        # As the standard library's forkserver: the zygote imports the main
        # module once, so that workers do not each import it again.
        return start, [DEFAULT_PRELOAD]
    if isinstance(preload, (str, bytes)):
        raise TypeError("preload must be a list of module names, not a single string")
    names = list(preload)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload must name modules as non-empty strings, not {name!r}")
    return start, names


#: How many tasks a worker may hold at once: the one it runs and the next ones,
#: so that it goes from one short task to the next without waiting for the
#: pool, and wakes once for many of them. One it has not started is taken
#: back for an idle worker at once (while a long task runs), so no task waits
#: behind another while a worker is idle. 16 rather than 4: 20-25% more small
#: tasks per second (docs/benchmarks.md, "Tasks sent ahead"); 32 gave no more.
PREFETCH = 16

#: After how many outcomes the results thread gives the C heap's free memory
#: back to the kernel (``malloc_trim``), when a burst of tasks is about to
#: end: the last outcomes of a burst, with nothing else pending. A burst
#: leaves free chunks the allocator keeps (docs/benchmarks.md, "Memory of the
#: parent"); ``WARDEN_TRIM_HEAP=0`` keeps them.
TRIM_AFTER = 4096
#: How many outcomes in a row, since the last time nothing was pending, make
#: a burst: tasks waited for one at a time are none, and never pay for a trim.
TRIM_MIN_BURST = 64
TRIM_ENV = "WARDEN_TRIM_HEAP"

#: The restart intensity pools get unless told otherwise: more than 10
#: failures no task explains within 5 seconds fail the pool.
#: What a pool stopped by a Ctrl-C says when it is given more work: the
#: standard library's words for a shut-down executor, and why it is one.
INTERRUPTED_EXECUTOR = (
    "cannot schedule new futures after shutdown: a Ctrl-C (KeyboardInterrupt) while waiting on this "
    "executor stopped it; start a new one"
)
INTERRUPTED_POOL = (
    "Pool not running: a Ctrl-C (KeyboardInterrupt) while waiting on this pool stopped it; start a new one"
)

DEFAULT_RESTART_LIMIT: tuple[int, float] = (10, 5.0)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def memory_size(name: str, value: int | str | None) -> int | None:
    """A memory size in bytes from an ``int`` or a string such as ``"512MiB"``
    or ``"1.5 GB"`` (``kB``/``MB``/``GB``/``TB`` count in powers of 1000,
    ``KiB``/``MiB``/``GiB``/``TiB`` in powers of 1024). ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string like '512MiB', not {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{name}: cannot read {value!r} as a size (a number of bytes, or a number "
                "with one of B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")
    return size


def restart_limit(value: tuple[int, float] | None) -> tuple[int, float] | None:
    """Checks a pool's ``restart_limit``: ``(count, seconds)`` or ``None``."""
    if value is None:
        return None
    try:
        count, window = value
    except (TypeError, ValueError):
        raise TypeError(f"restart_limit must be (count, seconds) or None, not {value!r}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"restart_limit: count must be an int >= 0, not {count!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
        raise ValueError(f"restart_limit: seconds must be a positive number, not {window!r}")
    return (count, float(window))


class WorkerLost:
    """What a pool's ``on_worker_lost`` hook learns about a worker that died
    without running its exit path (SIGKILL, a segfault, ``os._exit``).

    ``pid``: the worker's process id (reaped: the number may be reused);
    ``exitcode``: as ``multiprocessing`` reports it (minus the signal number
    when a signal killed it); ``signal``: that signal, or ``None``; ``task``:
    the ``Future`` (executor) or ``AsyncResult`` (``Pool``) of the task it was
    running (if it crashed the worker, kept for the hook even if the program
    let go of it at its outcome), or ``None``; ``record``: what the worker left with
    :func:`warden.set_cleanup_record`, or ``None``.
    """

    __slots__ = ("exitcode", "pid", "record", "signal", "task")

    def __init__(self, pid: int, exitcode: int | None, signal: int | None, task: Any, record: Any) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.task = task
        self.record = record

    def __repr__(self) -> str:
        return (
            f"<WorkerLost pid={self.pid} exitcode={self.exitcode} "
            f"task={'yes' if self.task is not None else 'none'} record={self.record!r}>"
        )


class _LostTasks:
    """A pool's tasks by core id, for ``on_worker_lost``. Held weakly while
    they run: a future the program has let go of is not kept for the hook.
    But one whose worker crashed in it is held from the moment the results
    thread delivers that outcome until the hook for that worker is called:
    the program may let go of it as soon as it has the outcome
    (``ex.submit(f).result()``), before the hook's thread gets to it."""

    #: Outcomes of a worker that died without its exit path (the hook's
    #: cases; a timed-out task's worker, stopped by SIGTERM, mostly runs it).
    DIED = frozenset(int(kind) for kind in (_warden.ErrorKind.CRASHED, _warden.ErrorKind.PROTOCOL))
    #: At most this many are held, or remembered as taken: a crash the hook
    #: is not called for (a worker that said goodbye all the same) is let
    #: go of as later ones come.
    HELD_MAX = 64

    def __init__(self) -> None:
        self.running: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.held: collections.OrderedDict[int, Any] = collections.OrderedDict()
        #: Tasks the hook has had (before their outcome came): not held then.
        self.taken: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.lock = _native.Lock()

    def __setitem__(self, task: int, owner: Any) -> None:
        self.running[task] = owner

    def hold_if_died(self, task: int, kind: Any) -> None:
        """(The results thread, before delivering an error outcome.)"""
        if int(kind) not in self.DIED:
            return
        owner = self.running.get(task)
        if owner is None:
            return
        dropped: Any = None
        with self.lock:
            if task in self.taken:
                del self.taken[task]  # the hook has had it already
                return
            self.held[task] = owner
            if len(self.held) > self.HELD_MAX:
                dropped = self.held.popitem(last=False)
        del dropped  # (after the lock: what it frees may run code)

    def take(self, task: int) -> Any:
        """(The hook's thread.) The task's owner, if it is still about."""
        with self.lock:
            owner = self.held.pop(task, None)
            if owner is None:
                self.taken[task] = None
                if len(self.taken) > self.HELD_MAX:
                    self.taken.popitem(last=False)
        return owner if owner is not None else self.running.get(task)


def _lost_hook(hook: Callable[[WorkerLost], object], tasks: _LostTasks) -> Callable[[Any], None]:
    """The callable the core calls (on its ``-lost`` thread) for each lost worker."""

    def on_lost(lost: Any) -> None:
        record = None
        if lost.record:
            try:
                record = _loads(lost.record)
            except Exception as e:
                say(f"warden: cannot unpickle the cleanup record of worker {lost.pid}: {text_of(e, repr)}")
        exitcode = -lost.signal if lost.signal is not None else lost.exitcode
        task = tasks.take(lost.task) if lost.task is not None else None
        try:
            hook(WorkerLost(lost.pid, exitcode, lost.signal, task, record))
        except Exception:
            say_exception(f"warden: exception in on_worker_lost for worker {lost.pid}:\n")

    return on_lost


def worker_command() -> tuple[str, list[str]]:
    """The program and arguments that start a worker. Raises
    ``RuntimeError`` in a frozen application, whose executable is the
    application itself: it would start the application again for each
    worker, and each would start workers of its own."""
    if getattr(sys, "frozen", False):
        raise RuntimeError(
            f"warden cannot start workers from a frozen application ({sys.executable!r}, sys.frozen is set): "
            f"its workers run `python -m {WORKER_MODULE}`, which this executable cannot"
        )
    args = [*multiprocessing.util._args_from_interpreter_flags(), "-m", WORKER_MODULE]  # type: ignore[attr-defined]
    return os.fsdecode(multiprocessing.spawn.get_executable()), args


def worker_env() -> list[tuple[str, str]]:
    """What a worker's environment needs beside this process's for its
    interpreter to find warden as it starts: nothing where warden is in
    this interpreter's site directories; otherwise (the program put its
    directory on ``sys.path`` itself, or found it through a relative
    ``PYTHONPATH`` entry and changed directory since, or took
    ``PYTHONPATH`` out of its environment), that directory first on the
    worker's ``PYTHONPATH``, which the worker sets back as it starts
    (:data:`PYTHONPATH_ENV`), before any code of the program's runs.
    Nothing under ``-E`` or ``-I``, where the interpreter does not read it."""
    if sys.flags.ignore_environment or sys.flags.isolated:
        return []
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not sys.flags.no_site:
        import site

        sites = list(site.getsitepackages())
        if site.ENABLE_USER_SITE:
            sites.append(site.getusersitepackages())
        if any(os.path.abspath(s) == home for s in sites):
            return []
    was = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([home, was]) if was else home
    return [("PYTHONPATH", path), (PYTHONPATH_ENV, "-" if was is None else "+" + was)]


def resource_tracker_fd() -> int | None:
    """A new fd of this process's ``multiprocessing`` resource tracker (started
    now if it is not running), for a pool to pass to its workers (the caller
    owns it); ``None`` if it cannot be started (each worker then starts its own).

    As a child the standard library spawns does, every worker and ``Process``
    child uses its parent's tracker instead of starting one: a segment it only
    attaches to (``SharedMemory(name=...)`` registers it on 3.11-3.12, and by
    default later) is registered twice with the same tracker, harmlessly, and
    what a child created and never unlinked is unlinked when this process's
    tracker ends, at the end of the program. A tracker of the worker's own
    would unlink, at the worker's exit, segments the parent still uses."""
    global _tracker_pipe
    tracker = multiprocessing.resource_tracker._resource_tracker
    _forget_a_tracker_fd_reused(tracker)
    was = getattr(tracker, "_pid", None)
    # Starting the tracker unblocks SIGINT and SIGTERM in this thread, what
    # ever the program had: a server that blocks them to take them with
    # sigwait() on a thread of its own would be killed by the next SIGTERM.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        fd = os.dup(multiprocessing.resource_tracker.getfd())  # type: ignore[arg-type]  # an fd once it runs
        own = tracker._fd  # type: ignore[attr-defined]
        st = os.fstat(own)
        _tracker_pipe = (own, st.st_dev, st.st_ino)
    except Exception:
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    started = getattr(tracker, "_pid", None)
    if started is not None and started != was:
        # Started just now: an interpreter that then sleeps on a pipe. At the
        # lowest priority its start-up does not take a core from the pool's
        # first workers (nor from the program).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, started, 19)
    return fd


#: The resource tracker's pipe as last seen here: its fd, device and inode.
_tracker_pipe: tuple[int, int, int] | None = None


def _forget_a_tracker_fd_reused(tracker: Any) -> None:
    """A program that closes every descriptor it did not open (a daemon's
    ``os.closerange``) closes the resource tracker's pipe too, and the
    standard library goes on writing to its number, which the next file
    opened reuses: every worker would write its registrations there (into
    the program's log file, or into one of warden's own pipes). Seen
    through ``fstat`` (not a pipe, or not the pipe it was), the tracker is
    forgotten without closing that number, and the next use starts one."""
    fd = getattr(tracker, "_fd", None)
    if fd is None:
        return
    try:
        st = os.fstat(fd)
        seen = _tracker_pipe
        other = seen is not None and seen[0] == fd and seen[1:] != (st.st_dev, st.st_ino)
        reused = other or not stat.S_ISFIFO(st.st_mode)
    except OSError:
        reused = True  # closed
    if reused:
        tracker._fd = None
        tracker._pid = None


def cpu_count() -> int:
    """The default number of workers, as the standard library of this
    version counts it: the CPUs this process may use on 3.13 and later
    (``os.process_cpu_count``, which honours CPU affinity), all of them
    before."""
    count = getattr(os, "process_cpu_count", os.cpu_count)
    return count() or 1


def preparation_data(name: str) -> dict[str, Any]:
    """What a child needs to look like a spawned child of this process (the
    standard library's own ``get_preparation_data``: ``sys.path``, working
    directory, authkey, and how to import ``__main__`` as ``__mp_main__``)."""
    default = multiprocessing.context._default_context
    chosen = default._actual_context  # type: ignore[attr-defined]
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        # `python -m pdb prog.py` runs the program in main's namespace, cleared
        # of everything a script has but `__name__` and `__file__`: give it the
        # `__spec__` a script has, which the standard library reads.
        with contextlib.suppress(AttributeError, TypeError):
            main.__spec__ = None
    try:
        data = multiprocessing.spawn.get_preparation_data(name)
    except FileNotFoundError as e:
        try:
            os.getcwd()
        except FileNotFoundError:
            # The bare error the standard library's spawn raises here names nothing.
            raise FileNotFoundError(
                e.errno,
                "the program's working directory no longer exists (removed while it runs): "
                "new workers and children start in it, as spawned ones do; os.chdir() to one "
                "that exists first",
            ) from e
        raise
    finally:
        # Asking for the start method fixes it; leave the caller free to choose.
        default._actual_context = chosen  # type: ignore[attr-defined]
    if "init_main_from_name" in data:
        # A str of its own (`python -m pdb -m pkg.mod` names main with a str
        # subclass that pickles a code object along).
        data["init_main_from_name"] = str(data["init_main_from_name"])
    program = _program_run_by_a_tool(main)
    if program is not None:
        # The worker imports the program as its main (or nothing), not the tool.
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        data.update(program)
    elif "init_main_from_name" in data or "init_main_from_path" in data:
        _main_as_mp_main(main)
    # As in a child the standard library spawns (its bootstrap forces the
    # spawn method, whatever the parent chose): a pool a task starts with
    # the default context spawns too, instead of forking a worker, which
    # has threads.
    data["start_method"] = "spawn"
    main_path = data.get("init_main_from_path")
    if main_path is not None and not os.path.isfile(main_path):
        # `python - < file`: there is no __main__ to import; functions defined
        # there are pickled by value instead (see _pickle.dumps).
        del data["init_main_from_path"]
    data["authkey"] = bytes(data["authkey"])
    return data


def _flush_std_streams() -> None:
    """Flushes ``sys.stdout`` and ``sys.stderr``, whatever they are now (a
    stream closed, replaced by ``None`` or by an object without ``flush``
    is left as it is)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _program_run_by_a_tool(main: Any) -> dict[str, str] | None:
    """How a child imports the program, where a tool is ``__main__`` and runs
    the program in a namespace of its own, named ``__main__`` too: ``python
    -m cProfile prog.py``, ``-m profile``, ``-m trace`` (each with ``-m
    pkg.mod`` as well). The program's functions then name ``__main__`` as
    their module but live in that namespace, not the tool's: a worker that
    imported the tool as its main would run them among the tool's globals
    (its ``run``, ``label``, ``io``...) instead of the program's.

    The program is the innermost frame of this thread whose globals are
    named ``__main__``: where those are main's own (a plain run; a tool that
    makes the program ``__main__`` itself, as ``runpy`` does for
    pyinstrument, memray, coverage or IPython's ``%run``), nothing changes.
    Otherwise the program's module (its name under ``-m``, else its file)
    is what children import, and this process's ``__mp_main__`` finds the
    program's classes, as it does for a plain run. A program that is a
    package's ``__main__`` is not imported by children, as under spawn: its
    functions go by value. ``None``: nothing to change."""
    own = getattr(main, "__dict__", None)
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        names = frame.f_globals
        # Not a worker's or child's own entry point (`python -m warden._worker`,
        # run as __main__ before the program became main there): a pool or
        # Process started in a worker or a child.
        if names.get("__name__") == "__main__" and not _is_warden_file(names.get("__file__")):
            break
        frame = frame.f_back
    if frame is None or names is own or not isinstance(names.get("__file__"), str):
        return None
    path = os.path.normpath(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", names["__file__"]))  # type: ignore[attr-defined]
    main_path = getattr(main, "__file__", None)
    if isinstance(main_path, str) and os.path.realpath(main_path) == os.path.realpath(path):
        return None  # a copy of main's functions that came by value
    _program_as_mp_main(names)
    spec_name = getattr(names.get("__spec__"), "name", None)
    if isinstance(spec_name, str):
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return {}
        _pickle.program_namespace = names
        _pickle.program_file = path
        return {"init_main_from_name": str(spec_name)}
    if os.path.basename(path) == "__main__.py" or not os.path.isfile(path):
        return {}
    _pickle.program_namespace = names
    _pickle.program_file = path
    return {"init_main_from_path": path}


def note_program_run_by_a_tool() -> None:
    """Before pickling what a child gets before any pool is made (a
    ``Process``): notes a program a tool runs (see
    :func:`_program_run_by_a_tool`), so that its classes go by reference."""
    _program_run_by_a_tool(sys.modules.get("__main__"))


def _is_warden_file(path: object) -> bool:
    return isinstance(path, str) and os.path.dirname(os.path.abspath(path)) == os.path.dirname(__file__)


class _ProgramModule(types.ModuleType):
    """``__mp_main__`` in a process whose program a tool runs in a namespace
    of its own: what workers send back by reference to their main (a result
    of a class the program defines, its exception) is looked up there."""

    def __init__(self, names: dict[str, Any]) -> None:
        super().__init__("__mp_main__")
        self.__dict__["_program"] = names

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_program"][name]
        except KeyError:
            raise AttributeError(name) from None


def _program_as_mp_main(names: dict[str, Any]) -> None:
    current = sys.modules.get("__mp_main__")
    if not (isinstance(current, _ProgramModule) and current.__dict__["_program"] is names):
        sys.modules["__mp_main__"] = _ProgramModule(names)


def _main_as_mp_main(main: Any) -> None:
    """Binds ``__mp_main__`` to ``main``, the program workers import as
    theirs, where it names another module's file: a launcher that imported
    ``multiprocessing`` (which binds ``__mp_main__`` to the ``__main__`` of
    then) before making the program ``__main__`` (``coverage run``, a
    ``runpy`` launcher). What a worker sends back of the program's own (a
    result of a class it defines, its exception) names ``__mp_main__``, and
    is looked up here. Not in a worker or a child of warden's, whose main is
    warden's own file and whose ``__mp_main__`` is the program."""
    current = sys.modules.get("__mp_main__")
    if current is None or current is main or isinstance(current, _ProgramModule):
        return
    main_file = getattr(main, "__file__", None)
    current_file = getattr(current, "__file__", None)
    if not isinstance(main_file, str) or _is_warden_file(main_file):
        return
    if isinstance(current_file, str) and os.path.realpath(current_file) == os.path.realpath(main_file):
        return
    sys.modules["__mp_main__"] = main


class Runner:
    """A core pool, its pending outcomes and the thread that delivers them.

    ``exit_policy`` says what interpreter exit does to it: ``"drain"`` (run
    every task submitted, then retire the workers; cut short after
    ``exit_timeout`` seconds if given), ``"terminate"`` (a ``Pool``, or a
    daemon process) or ``"join"`` (wait, like a non-daemon process).
    ``segment``: the one of ``pass_fds`` that holds the large buffers of a
    one-off child's task (see ``_pickle.dumps_for_spawn``); a pool's hooks
    make their own.
    """

    def __init__(
        self,
        *,
        mode: str,
        name: str,
        workers: int,
        hooks: Any = None,
        pass_fds: list[int] | None = None,
        segment: int | None = None,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        one_off: bool = False,
        deliver: bool = True,
        exit_policy: str = "drain",
        exit_timeout: float | None = None,
        start: str = "zygote",
        preload: list[str] | None = None,
        restart: tuple[int, float] | None = DEFAULT_RESTART_LIMIT,
        fail_on_init_error: bool = False,
        max_memory_per_child: int | None = None,
        memory_limit: int | None = None,
        on_worker_lost: Callable[[WorkerLost], object] | None = None,
        forward_logging: bool = False,
        forward_interrupts: bool = False,
        interrupts_since: int | None = None,
    ) -> None:
        _forget_finished_runners()
        # What the program printed so far comes before what its workers
        # print, as the standard library flushes before it starts a child.
        _flush_std_streams()
        #: Tasks by core id, for ``on_worker_lost`` (only kept when there is one).
        self._tasks: _LostTasks | None = _LostTasks() if on_worker_lost is not None else None
        # No fd made from here on may take the number of a closed stdio
        # stream (it would be passed as a worker's stdout, or refused).
        _warden.fill_closed_stdio()
        # Records are handled by the results thread's pool: none, no forwarding.
        forward_logging = forward_logging and deliver
        fds = list(pass_fds or [])
        log_to = None
        log_listener: Any = None
        try:
            if exiting:
                raise RuntimeError("cannot start new workers after interpreter shutdown")
            program, args = worker_command()
            # First: where a tool runs the program, the program's classes in
            # the hooks go by reference to the workers' main (see _pickle).
            preparation = preparation_data(name)
            # The numbers of the worker or child this pool is made in, which
            # its workers' numbers follow, as a nested ``multiprocessing``
            # child's do.
            within = list(getattr(multiprocessing.current_process(), "_identity", ()))
            hook_bytes = b""
            if hooks is not None:
                # Their large buffers (initargs' arrays) go in a segment the
                # pool keeps for its life, passed to every worker it starts,
                # not in each worker's init frame.
                hook_bytes, hook_fds, hook_segment = dumps_for_spawn(
                    hooks,
                    parameters=lambda: _named("initargs", hooks.get("initargs", ())),
                    functions=(hooks.get("initializer"), hooks.get("finalizer"), hooks.get("worker_context")),
                    out_of_band=hooks,
                )
                fds.extend(hook_fds)
                if hook_segment is not None:
                    fds.append(hook_segment)
                    segment = hook_segment
            if forward_logging:
                log_fd, log_listener = _logging.sender_fd()
                fds.append(log_fd)
                log_to = {"fd": log_fd, "levels": _logging.parent_levels()}
            tracker = resource_tracker_fd()
            if tracker is not None:
                fds.append(tracker)
            init = {
                "version": 1,
                "mode": mode,
                "name": name,
                "parent_name": multiprocessing.current_process().name,
                "within": within,
                "preparation": preparation,
                "hooks": hook_bytes,
                # The fd (passed to every worker) of the segment that holds
                # the large buffers of the hooks, or of a one-off child's task.
                "segment": segment,
                "logging": log_to,
                "resource_tracker": tracker,
                # Spare buffers' pages would count against a cap as the task's.
                "memory_capped": max_memory_per_child is not None or memory_limit is not None,
            }
            payload = _dumps(init, protocol=5)
            # What the zygote loads before it forks: this process's sys.path
            # and directory (and its __main__, if asked), then the preloads.
            preload = list(preload or [])
            if start == "zygote" and DEFAULT_PRELOAD in preload and _threads_of_others():
                # Main's imports started them, and would in a zygote that
                # imported main, which could then not fork: its workers
                # import main themselves, as under spawn, without first a
                # zygote that imports it only to give up.
                preload = [name for name in preload if name != DEFAULT_PRELOAD]
            zygote = _dumps({"preparation": init["preparation"], "preload": preload}, protocol=5)
            # If importing __main__ starts a thread, the zygote cannot fork: then
            # one more zygote without it, whose workers import __main__ themselves.
            fallback = None
            if DEFAULT_PRELOAD in preload:
                lean = [name for name in preload if name != DEFAULT_PRELOAD]
                fallback = _dumps({"preparation": init["preparation"], "preload": lean}, protocol=5)
        except BaseException:
            _close_fds(fds)
            if log_listener is not None:
                _logging.release(log_listener)
            raise
        # The core takes ownership of the fds, even if this fails.
        try:
            self.core = _warden.CorePool(
                program,
                args,
                workers=workers,
                name=name,
                init_payload=payload,
                pass_fds=fds,
                env=worker_env(),
                max_tasks_per_child=max_tasks_per_child,
                task_timeout=task_timeout,
                # An initializer (or the import of the program's main module)
                # runs as long as it takes, as in the standard library.
                init_timeout=INIT_TIMEOUT,
                unbounded_start_hook=True,
                grace=GRACE,
                max_frame_size=MAX_FRAME,
                prefetch=PREFETCH,
                one_off=one_off,
                forward_interrupts=forward_interrupts,
                interrupts_since=interrupts_since,
                start=start,
                zygote_payload=zygote,
                zygote_fallback_payload=fallback,
                # A one-off child is never replaced: the core's one-off settings stand.
                restart_intensity=None if one_off else restart,
                unlimited_restarts=restart is None and not one_off,
                fail_on_start_error=fail_on_init_error,
                max_memory_per_child=max_memory_per_child,
                memory_limit=memory_limit,
                on_worker_lost=None if self._tasks is None else _lost_hook(on_worker_lost, self._tasks),  # type: ignore[arg-type]
            )
        except BaseException as e:
            if log_listener is not None:
                _logging.release(log_listener)
            # A system call failed (no descriptor left under ``ulimit -n``):
            # the ``OSError`` the standard library's constructor raises.
            if isinstance(e, _warden.CoreError) and e.errno is not None:
                # A one-off child is named, as _start_error names it.
                what = f"process {name}" if one_off else "the pool"
                raise OSError(e.errno, f"cannot start {what}: {e}") from None
            # Settings this system cannot honour (a memory cap without /proc).
            if isinstance(e, _warden.CoreError) and e.kind == _warden.ErrorKind.CONFIG:
                raise ValueError(str(e)) from None
            raise
        self.name = name
        self.within = tuple(within)
        self.exit_policy = exit_policy
        self.exit_timeout = exit_timeout
        self.forward_logging = forward_logging
        #: Where the workers' log records go, if forwarded.
        self.log_listener = log_listener
        #: A terminal's Ctrl-C reaches the (one-off) child too; how many this
        #: process had passed on before the child started (every one since
        #: reached the child).
        self.forward_interrupts = forward_interrupts
        self.interrupts_at_start = (
            _warden.interrupts_forwarded() if interrupts_since is None else interrupts_since
        )
        #: A Ctrl-C while waiting on this pool stopped it (see :meth:`interrupt`).
        self.interrupted = False
        #: What to call with each task's outcome, by the core's task id.
        self.pending: dict[int, OnDone] = {}
        #: The process whose pool this is (a forked copy fails what is pending).
        self.owner = os.getpid()
        #: Held from submitting a task until its callback is in ``pending``,
        #: and by the results thread while it looks callbacks up there.
        self.pending_lock = _native.Lock()
        #: How many outcomes the results thread has delivered (their callbacks run).
        self.delivered = [0]
        #: The callbacks of the batch the results thread is delivering (out
        #: of ``pending`` already), for :meth:`let_go_of_held_futures`.
        self.in_delivery: list[OnDone | None] = []
        #: ``[True]`` once the interpreter's exit stopped the pool
        #: (terminated, or its drain cut short): the cancellations delivered
        #: from then on are the exit's (``ErrorData.by_exit``).
        self.cut_by_exit = [False]
        self.thread: Any = None
        if deliver:
            self.thread = _native.Thread(
                target=_deliver_outcomes,
                args=(
                    self.core,
                    self.pending,
                    self.pending_lock,
                    self._leave_live_set,
                    log_listener,
                    self.delivered,
                    self.in_delivery,
                    self.cut_by_exit,
                    self._tasks,
                ),
                name="warden-results",
            )
        with _live_lock:
            _live.add(self)
        _hook_multiprocessing_exit()
        if self.thread is not None:
            try:
                self.thread.start()
            except BaseException:
                # No thread to deliver outcomes (at interpreter shutdown, or
                # out of threads): no pool either, and nothing left running.
                self._leave_live_set()
                self.thread = None
                self.core.kill()
                if log_listener is not None:
                    _logging.release(log_listener)
                raise

    def worker_name(self, worker: int) -> str:
        """The process name of this pool's worker number ``worker``."""
        return _context.pool_worker_name(self.name, self.within, worker)

    def _leave_live_set(self) -> None:
        """The pool has shut down (or never started)."""
        with _live_lock:
            _live.discard(self)
        self.release_worker_views()

    def release_worker_views(self) -> None:
        """Lets the views of this pool's workers (``active_children()``, an
        executor's ``_processes``) go of their pidfds: the pool keeps the
        exit statuses."""
        children = sys.modules.get("warden._children")
        if children is not None:
            children.release_views(self)

    def submit(
        self,
        payload: bytes,
        on_done: OnDone,
        timeout: float | None = None,
        owner: Any = None,
        segment: int | None = None,
        track_start: bool = False,
    ) -> int:
        """Queues a task; ``on_done(ok, data)`` gets its outcome on the results
        thread (see :data:`OnDone`; with ``track_start``, ``core.has_started``
        tells when a worker has taken it). Returns the task id. Raises ``CoreError``
        if refused. ``owner`` (the future or result) is what
        ``on_worker_lost`` reports as the task. ``segment`` is the fd of the
        call's out-of-band buffers; the core owns it from here on, even if
        this raises. If the buffers are lent, this process lets them go
        when the task has its outcome, before ``on_done`` gets it."""
        # A Ctrl-C (a signal handler's error) may come between any two
        # steps: the lock is always given back (by ``with``, which no signal
        # handler can come between the acquiring and), and the segment is
        # closed here only if the core never had it (``take_fd``: the
        # core's from the call that gives it the fd on). A task submitted and
        # not yet in ``pending`` then runs, its outcome dropped (the caller
        # got the Ctrl-C, not a handle to it).
        try:
            loan = None if segment is None else getattr(segment, "loan", None)
            held = None
            if segment is not None:
                on_done = held = _HoldingFd(loan, on_done)
            with self.pending_lock:
                fd = None if segment is None else _oob.take_fd(segment)
                task = self.core.submit(payload, timeout, fd, track_start)
                self.pending[task] = on_done
                if held is not None:
                    held.hold()
                    if loan is not None:
                        held.key = (self.core, task)
                        _loans[held.key] = loan
        except BaseException:
            close_fd(segment)  # (nothing once the core has it)
            raise
        if self._tasks is not None and owner is not None:
            # (Not under ``pending_lock``: the weak entry it makes is an
            # object the collector may run code for, which could submit.)
            self._tasks[task] = owner
        return task

    def close_nowait(self) -> None:
        """Stops taking tasks; queued tasks still run. Returns at once."""
        self.core.close()

    def terminate_nowait(self) -> None:
        """Cancels everything and stops the workers gracefully. Returns at once."""
        self.core.terminate()

    def got_the_interrupt(self, since: int | None = None) -> bool:
        """Whether the last SIGINT was passed on to this runner's child (a
        terminal's Ctrl-C, or one another program sent), since ``since`` (a count of
        :func:`_warden.interrupts_forwarded`; by default, since the child
        started): it saw the Ctrl-C itself, as a child in the terminal's
        process group would."""
        if not self.forward_interrupts:
            return False
        before = self.interrupts_at_start if since is None else since
        return _warden.interrupts_forwarded() != before and _warden.last_interrupt_forwarded()

    def interrupt(self) -> None:
        """Ctrl-C while waiting on this pool: the first one cancels queued tasks
        and stops the workers gracefully (their finalizers run), another kills them."""
        self.let_go_of_held_futures()
        if self.interrupted:
            self.core.kill()
        else:
            self.interrupted = True
            try:
                self.core.terminate()
            except KeyboardInterrupt:
                # Another Ctrl-C while the first one's stop was being asked
                # for (a busy machine): it kills, as one a moment later would.
                self.core.kill()
                raise

    def let_go_of_held_futures(self) -> None:
        """Gives back the locks of this pool's futures that the calling
        thread holds, after a Ctrl-C. One that cut ``concurrent.futures``'
        ``wait()`` or ``as_completed()`` short while they took or gave back
        their futures' locks (``_AcquireFutures``) leaves some held by this
        thread for good: the results thread would block on the first of
        them (one in ``pending``, or in the batch it is delivering), and no
        outcome of the pool, nor its shutdown, would ever come (the
        standard library's executor hangs so too). The thread holds
        them only by that accident: its own waits on a future give the lock
        back before they raise."""
        with self.pending_lock:
            deliveries = [*self.pending.values(), *self.in_delivery]
        for deliver in deliveries:
            condition = getattr(getattr(deliver, "__self__", None), "_lazy_condition", None)
            if condition is not None and condition._is_owned():
                condition._release_save()  # every level of the RLock

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the pool to shut down and its outcomes to be delivered.
        Ctrl-C while waiting interrupts the pool (see :meth:`interrupt`).
        ``RuntimeError`` without a timeout on the pool's own results thread
        (in a callback): its workers wait, as they exit, for that thread to
        read the results they lent (the standard library's executor raises
        there too, "cannot join current thread"; its ``Pool`` hangs). A
        terminal's Ctrl-C that reached a one-off child too (see
        :meth:`got_the_interrupt`) leaves it to the child."""
        if timeout is None:
            refuse_self_wait(self.core, SELF_JOIN)
        if self.forward_interrupts:
            _warden.chain_interrupt_handler()  # over a handler set since it started
        forwarded = _warden.interrupts_forwarded()
        try:
            done = self.core.join(timeout)
        except KeyboardInterrupt:
            if not self.got_the_interrupt(forwarded):
                self.interrupt()
            raise
        if done and self.thread is not None and not _native.is_current(self.thread):
            self.thread.join(None if timeout is None else max(timeout, 1.0))
        if done:
            _oob.settle()  # what the workers read of ours: let it go with them
            self.release_worker_views()
        if done and self.log_listener is not None:
            _logging.drain(self.log_listener, _logging.STOP_WAIT)  # what the finalizers logged
        return done

    def exitcode(self) -> int | None:
        """A one-off child's exit code as ``multiprocessing`` gives it (``-N``
        if signal ``N`` ended it); ``None`` while it runs."""
        if not self.core.is_shut_down():
            return None
        end = self.core.last_exit()
        if end is None:
            return 1  # it never started (the error was raised to the caller)
        if end.signal is not None:
            return -end.signal
        if end.init_failed:
            return 1  # the child could not even unpickle its target (traceback on stderr)
        return end.exitcode

    # multiprocessing's Popen API, which its bookkeeping of children calls
    # (active_children(), its exit handler) on a Process's _popen.
    poll = exitcode

    def terminate(self) -> None:
        """Stops the workers gracefully (``multiprocessing``'s Popen API)."""
        self.core.terminate()

    def kill(self) -> None:
        """Kills the workers at once (``multiprocessing``'s Popen API, which
        ``multiprocessing.Process.kill`` calls)."""
        self.core.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits, at most ``timeout`` seconds, for a one-off child to end;
        its exit code, or ``None`` (``multiprocessing``'s Popen API)."""
        self.join(timeout)
        return self.exitcode()

    def join_bounded(self, stuck: float = 10.0) -> None:
        """Waits for a terminate to run its course, killing what outlives it:
        the core's shutdown ladder (``CorePool.stop``); then for the results
        thread to deliver the outcomes (and run their callbacks), unless it
        delivers none for ``stuck`` seconds (a callback waiting for something
        the caller holds). Ctrl-C while waiting interrupts the pool (see
        :meth:`interrupt`)."""
        try:
            self.core.stop("terminate")
        except KeyboardInterrupt:
            self.interrupt()
            raise
        thread = self.thread
        if thread is not None and not _native.is_current(thread):
            while True:
                before = self.delivered[0]
                thread.join(stuck)
                if not thread.is_alive() or self.delivered[0] == before:
                    break
        _oob.settle()


def cancel(core: Any, task: int, running: bool) -> bool:
    """Cancels a task of ``core``: only while queued, or also while it runs
    (its worker is then stopped: SIGTERM, finalizer, grace period, SIGKILL,
    and replaced). Returns whether the task was cancelled. Futures and
    results hold this with their core, never the runner. A cancelled task's
    lent buffers are let go now: its future is done from here on (a worker
    stopped while it reads them reads what the memory holds then, into its
    own memory, for an outcome nobody gets)."""
    cancelled = bool(core.cancel(task) if running else core.cancel_queued(task))
    if cancelled:
        loan = _loans.pop((core, task), None)
        if loan is not None:
            loan.release()
    return cancelled


def cancel_nowait(core: Any, task: int) -> None:
    """Asks for a task of ``core`` to be cancelled, queued or running, as
    :func:`cancel` with ``running`` does, without waiting for the pool's
    answer (the coroutine cancelled while it awaited the task has no use
    for it, and an event loop cancelling thousands of calls must not wait
    for each): the task's outcome, which lets go of its lent buffers,
    follows."""
    core.cancel_nowait(task)


def cancel_all_queued(core: Any) -> list[int]:
    """Cancels every task of ``core`` not started yet, in one request (see
    :func:`cancel`); returns their ids."""
    tasks: list[int] = core.cancel_all_queued()
    if _loans:
        for task in tasks:
            loan = _loans.pop((core, task), None)
            if loan is not None:
                loan.release()
    return tasks


#: The lent buffers of tasks without an outcome, by ``(core, task id)``.
_loans: dict[tuple[Any, int], _oob.Loan] = {}


class _HoldingFd:
    """The outcome callback of a task whose call holds a descriptor for its
    buffers (a segment, or a lending pipe): counted while in flight
    (``_oob.call_holds_fd``), and first of all, with its outcome, lets go of
    the buffers its call lent, if it lent them (see ``_oob.Loan``): whoever
    sees the outcome may close what they came from. Nobody reads them any
    more: the worker that ran the task read them when it started it, and no
    other worker gets it now."""

    __slots__ = ("held", "key", "loan", "on_done")

    def __init__(self, loan: _oob.Loan | None, on_done: OnDone) -> None:
        self.loan = loan
        self.on_done = on_done
        self.key: tuple[Any, int] | None = None
        #: The process whose count it is in (a forked copy starts its own at 0).
        self.held: int | None = None

    def hold(self) -> None:
        """The call is queued, and holds its descriptor until its outcome
        (counted and marked in one step: a Ctrl-C between the two would
        leave the count one short once the outcome takes it off)."""
        _oob.call_holds_fd(1, self)

    @property
    def __self__(self) -> Any:
        """The object ``on_done`` is a method of (the executor's shutdown
        finds the futures it cancels this way)."""
        return getattr(self.on_done, "__self__", None)

    def __call__(self, ok: bool, data: Any) -> None:
        if self.loan is not None:
            _loans.pop(self.key, None)  # type: ignore[arg-type]
            self.loan.release()
        if self.held is not None:
            if self.held == os.getpid():
                _oob.call_holds_fd(-1)
            self.held = None
        self.on_done(ok, data)


def _named(name: str, values: Any) -> list[tuple[str, Any]]:
    """``name[i]`` for each item (``name['key']`` for a mapping's items)."""
    if isinstance(values, dict):
        return [(f"{name}[{k!r}]", v) for k, v in values.items()]
    return [(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            _native.close(fd)


def close_fd(fd: int | None) -> None:
    """Closes a segment fd that never reached the core (nothing if it did:
    see ``_oob.CarriedFd``)."""
    _oob.close_fd(fd)


def _forget_finished_runners() -> None:
    """Forgets runners without a results thread whose pool has shut down."""
    with _live_lock:
        done = [r for r in _live if r.thread is None and r.core.is_shut_down()]
        for r in done:
            _live.discard(r)


def _forget_runners_after_fork() -> None:
    """In a copy of this process made by ``os.fork()`` (without exec): its
    pools belong to the original, whose supervisor threads serve them; here
    they are copies of memory that nothing serves. Forgotten, so that this
    process's exit waits for none of them; using one raises ``PoolFailed``
    (the core refuses a forked copy), and dropping one stops nothing of the
    original's. Locks a thread that does not exist here may have held are
    made anew.

    What was pending on them (the futures and ``AsyncResult`` objects the copy inherited)
    would never finish here: it fails with ``PoolFailed``, on a thread of
    its own (a callback may need a lock a thread of the original held at the
    fork, and must not stop the copy in ``fork()``)."""
    global _live_lock
    _live_lock = _native.Lock()
    orphans: list[tuple[int, OnDone]] = []
    for runner in _live:
        runner.pending_lock = _native.Lock()
        orphans.extend((runner.owner, callback) for callback in runner.pending.values())
        runner.pending.clear()
    _live.clear()
    _loans.clear()
    if orphans:
        futures = sys.modules.get(__package__ + "._futures")
        if futures is not None:
            futures.reset_after_fork()
        with contextlib.suppress(Exception):  # out of threads: they wait, as they did
            threading.Thread(target=_fail_orphans_of_fork, args=(orphans,), daemon=True).start()


def _fail_orphans_of_fork(orphans: list[tuple[int, OnDone]]) -> None:
    for owner, callback in orphans:
        call_outcome_callback(
            callback,
            False,
            ErrorData(
                _warden.ErrorKind.POOL_FAILED,
                f"this pool belongs to process {owner}; a forked copy of that process cannot use it "
                "(its task runs there, and its outcome reaches only that process)",
            ),
        )


os.register_at_fork(after_in_child=_forget_runners_after_fork)

#: Objects whose locks a forked copy of this process makes anew, by id (a
#: subclass may make its instances unhashable): a weak reference to each,
#: and the attributes that hold its locks (see :func:`renew_locks_after_fork`).
_fork_locked: dict[int, tuple[weakref.ref[Any], tuple[str, ...]]] = {}


def renew_locks_after_fork(obj: Any, *names: str) -> None:
    """Has a forked copy of this process give ``obj`` its locks (or
    conditions) ``names`` anew, free: a thread of the original (submitting,
    delivering outcomes) may have held one at the fork, and nothing in the
    copy would ever release it, so that a ``shutdown()`` or ``terminate()``
    there would wait for ever."""
    key = id(obj)
    _fork_locked[key] = (weakref.ref(obj, lambda _, key=key: _fork_locked.pop(key, None)), names)  # type: ignore[misc]


def _renew_locks_after_fork() -> None:
    for ref, names in list(_fork_locked.values()):
        obj = ref()
        for name in names:
            renew = getattr(getattr(obj, name, None), "_at_fork_reinit", None)
            if renew is not None:
                renew()


os.register_at_fork(after_in_child=_renew_locks_after_fork)
# Every pool's start takes the tracker's lock (resource_tracker_fd): a fork
# meanwhile, on another thread, left it held in the copy for good, and the
# copy's next pool (or submit) waited for it for ever.
renew_locks_after_fork(multiprocessing.resource_tracker._resource_tracker, "_lock")


def _deliver_outcomes(
    core: _warden.CorePool,
    pending: dict[int, OnDone],
    pending_lock: threading.Lock,
    leave_live_set: Callable[[], None],
    log_listener: Any,
    delivered: list[int],
    in_delivery: list[OnDone | None],
    cut_by_exit: list[bool],
    lost_tasks: _LostTasks | None = None,
) -> None:
    """The results thread: takes outcomes from the core, calls their callbacks.
    With a ``log_listener`` (records forwarded), the workers' log records
    queued before a batch are handled before it (so a task's records come
    before its result)."""
    _delivering.core = core
    _oob.results_thread()
    trim = os.environ.get(TRIM_ENV, "1") != "0"
    since_trim = burst = 0
    try:
        while True:
            batch = core.next_completions(512)
            if batch is None:
                break
            if log_listener is not None:
                # Records a task logged come out before its result (unless
                # the program's handlers hold them up: see DELIVERY_WAIT).
                try:
                    _logging.drain(log_listener, _logging.DELIVERY_WAIT)
                except BaseException:  # the results thread must not die of it
                    say_exception("warden: reading worker log records failed:\n")
            since_trim += len(batch)
            burst += len(batch)
            if len(pending) <= len(batch):  # nothing else pending
                if trim and since_trim >= TRIM_AFTER and burst >= TRIM_MIN_BURST:
                    # The end of a burst: before its last waiters wake (the
                    # GIL is released meanwhile; they wait for these outcomes).
                    since_trim = 0
                    _warden.trim_heap()
                burst = 0
            _deliver_batch(batch, pending, pending_lock, delivered, in_delivery, cut_by_exit, lost_tasks)
            # Hold nothing (no outcome, nor its future) while waiting: a
            # result's mapping lives only as long as what was built on it.
            batch = None
    finally:
        # The pool is gone; anything still waiting never got an outcome.
        with pending_lock:
            orphans = list(pending.values())
            pending.clear()
        for callback in orphans:
            call_outcome_callback(
                callback,
                False,
                ErrorData(_warden.ErrorKind.CLOSED, "the pool shut down before the task finished"),
            )
            delivered[0] += 1
        leave_live_set()
        if log_listener is not None:
            _logging.release(log_listener)  # its workers are gone


def _deliver_batch(
    batch: list[_warden.Completion],
    pending: dict[int, OnDone],
    pending_lock: threading.Lock,
    delivered: list[int],
    in_delivery: list[OnDone | None],
    cut_by_exit: list[bool],
    lost_tasks: _LostTasks | None = None,
) -> None:
    with pending_lock:
        callbacks = [pending.pop(done.task, None) for done in batch]
        in_delivery[:] = callbacks
    try:
        _deliver_each(batch, callbacks, delivered, cut_by_exit[0], lost_tasks)
    finally:
        with pending_lock:
            in_delivery.clear()


def _deliver_each(
    batch: list[_warden.Completion],
    callbacks: list[OnDone | None],
    delivered: list[int],
    by_exit: bool,
    lost_tasks: _LostTasks | None,
) -> None:
    data: ErrorData | bytes | _oob.Received | None
    for done, callback in zip(batch, callbacks, strict=True):
        if callback is None:
            continue  # its segment, if any, is closed with the record
        try:
            if done.error is not None:
                if lost_tasks is not None:
                    lost_tasks.hold_if_died(done.task, done.error.kind)
                ok, data = False, ErrorData.from_core(done.error)
                data.by_exit = by_exit and data.cancelled
            else:
                # A result's segment is mapped (and its fd closed) now.
                segment = done.take_segment()
                ok, data = True, done.value if segment is None else _oob.Received(done.value or b"", segment)
        except Exception as e:  # e.g. MemoryError: this task fails, not the thread
            ok, data = False, ErrorData.local(e, "reading the task's outcome failed")
        call_outcome_callback(callback, ok, data)
        delivered[0] += 1


def call_outcome_callback(callback: OnDone, ok: bool, data: Any) -> None:
    try:
        callback(ok, data)
    except BaseException:  # nothing a callback raises ends the results thread
        say_exception("warden: exception in a task-outcome callback:\n")


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# How interpreter exit stops a pool, by its exit policy (``"join"`` is waited
# for first, so its stop finds it finished).
_EXIT_STOP: dict[str, Literal["terminate", "drain"]] = {
    "drain": "drain",
    "terminate": "terminate",
    "join": "drain",
}


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Holds a Ctrl-C back until the block ends, then raises it: around
    making a pool and handing it to its owner, so that a Ctrl-C cannot leave
    a pool started and out of reach (until interpreter exit), nor interrupt
    its threads' start half done. A second Ctrl-C meanwhile is not held.
    Only where Ctrl-C raises: in the main thread, under Python's own
    handler (a program's own SIGINT handler is left alone). If the block
    fails with a Ctrl-C held, ``KeyboardInterrupt`` is raised from that
    error."""
    import signal

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            signal.default_int_handler(signum, frame)
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    # A Ctrl-C held here still reaches the Process children (the forwarding
    # handler goes back in front of Python's, which signal.signal replaced).
    _warden.chain_interrupt_handler()
    try:
        yield
    except Exception as e:
        if held:  # what failed may be the Ctrl-C's doing (a child it ended)
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # In front of Python's handler again, if Process children get Ctrl-C.
        _warden.chain_interrupt_handler()
    if held:
        raise KeyboardInterrupt


def _ended_by_ctrl_c() -> bool:
    """Whether the program is ending because Ctrl-C's ``KeyboardInterrupt``
    left its main module: the exception the interpreter reported last
    (``sys.last_value``) is one (bare or in an exception group), it came out of ``__main__``'s top-level
    code (run directly, or by ``runpy`` for ``python -m``), and the session
    is not interactive. ``sys.last_value`` outlives what it reports: a
    Ctrl-C at a prompt long before, or one an embedded interpreter
    (``code.interact``, IPython) reported, stays there while the program
    goes on; a program ending then still runs its pending tasks, as the
    standard library's does."""
    value = getattr(sys, "last_value", None)
    if value is None or not is_ctrl_c(value) or hasattr(sys, "ps1") or sys.flags.interactive:
        return False
    main = sys.modules.get("__main__")
    tb = value.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and main is not None and tb.tb_frame.f_globals is vars(main):
            return True
        if not code.co_filename.endswith(("runpy.py", "<frozen runpy>")):
            return False
        tb = tb.tb_next
    return False


def _drain_executors_at_exit() -> None:
    """The executors' step of interpreter exit, where ``concurrent.futures``
    takes it: in ``threading``'s exit hooks, which run before the program's
    non-daemon threads are joined and before any ``atexit`` handler or
    ``weakref.finalize`` callback. So the tasks an executor still holds run
    while what they use is still there (a ``TemporaryDirectory``, state an
    ``atexit`` handler reports), as under the standard library. Pools and
    ``Process`` children are left to :func:`_shut_down_at_exit`, as
    ``multiprocessing`` leaves them to its ``atexit`` handler; except when
    Ctrl-C ended the program: then every pool and child is stopped here
    (see :func:`_shut_down_at_exit`), as the interpreter is about to join
    the program's non-daemon threads, and one waiting on a pool would keep
    it waiting until the pool's task ended. The executors made before refuse
    new work from here on (threading runs its exit hooks last registered
    first, and this one is registered after that flag's)."""
    note_main_thread_done()
    interrupted = stop_requested or _ended_by_ctrl_c()
    _shut_down_at_exit(policies=None if interrupted else ("drain",))


def _shut_down_at_exit(policies: tuple[str, ...] | None = None) -> None:
    """At interpreter exit, for every runner still running (of ``policies``
    only, if given: then new pools may still start after it):

    * an executor (``"drain"``) stops taking tasks, runs every task already
      submitted, then its workers retire through their exit path, as
      ``concurrent.futures`` promises; its ``exit_timeout``, if given, bounds
      that, and what is unfinished then is dropped (terminated) and counted on
      stderr;
    * a ``Pool`` and a daemon process are terminated (``"terminate"``), as
      ``multiprocessing`` does;
    * a non-daemon process is joined (``"join"``).

    If the program is ending because of Ctrl-C (or, in a worker, a stop
    signal), everything is stopped gracefully at once instead (nothing is
    joined: the children, in their own process groups, did not see the
    Ctrl-C), except a non-daemon process that a terminal's Ctrl-C reached
    too: it is joined, as the standard library joins its children, which
    saw it. A Ctrl-C (or a signal handler's ``SystemExit``) while waiting
    stops everything gracefully; another one kills what is left. After a
    terminate, every wait is bounded by the grace periods."""
    global exiting, exit_began
    exit_began = True
    if policies is None:
        exiting = True
    with _live_lock:
        everyone = [r for r in _live if policies is None or r.exit_policy in policies]
    runners = [r for r in everyone if not r.core.is_shut_down()]
    interrupted = stop_requested or _ended_by_ctrl_c()
    if interrupted:
        for r in runners:
            r.let_go_of_held_futures()
    started = time.monotonic()
    try:
        try:
            # (In a worker or child: by its pool or parent, or a stop signal.)
            why = "this process was told to stop" if stop_requested else "the program was interrupted"
            for r in runners:
                if interrupted and not (r.exit_policy == "join" and r.got_the_interrupt()):
                    _cut_short(r, why)
                elif r.exit_policy != "join":
                    r.cut_by_exit[0] = r.exit_policy == "terminate"
                    r.core.stop(_EXIT_STOP[r.exit_policy], wait=False)
            for r in runners:
                if r.exit_policy == "join":
                    if r.forward_interrupts:
                        _warden.chain_interrupt_handler()
                    _join_unless_stopped(r)
                elif r.exit_policy == "drain":
                    limit = None if r.exit_timeout is None else _left(started + r.exit_timeout)
                    if not _join_unless_stopped(r, limit):
                        _cut_short(r, f"exit_timeout={r.exit_timeout:g}s passed")
        except (KeyboardInterrupt, SystemExit) as e:
            # A Ctrl-C, or a signal handler's sys.exit() (a SIGTERM handler
            # of the program's, as it comes again): the program is to end now.
            why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "interrupted (SystemExit)"
            for r in runners:
                _cut_short(r, why)
        # One grace period for all pools, not one each: every pool's shutdown
        # ladder runs against the same deadline, then each is waited for.
        deadline = time.monotonic() + GRACE
        for r in runners:
            r.core.stop(_EXIT_STOP[r.exit_policy], within=_left(deadline), wait=False)
        for r in runners:
            r.core.stop(_EXIT_STOP[r.exit_policy], within=_left(deadline))
    except (KeyboardInterrupt, SystemExit):
        for r in runners:
            r.cut_by_exit[0] = True
            r.core.stop("kill", wait=False)
        for r in runners:
            with contextlib.suppress(KeyboardInterrupt, SystemExit):
                r.core.stop("kill")
    for r in everyone:
        if r.thread is not None:
            with contextlib.suppress(RuntimeError):  # one never started has nothing to join
                r.thread.join(2.0)
    # What the workers logged on their way out, before logging shuts down
    # (not waiting for ever on a handler that is stuck).
    _logging.drain(None, _logging.STOP_WAIT)


def _join_unless_stopped(runner: Runner, limit: float | None = None) -> bool:
    """``runner.core.join(limit)``; in a worker or ``Process`` child, cut
    short (``True``) as soon as it is told to stop meanwhile
    (``stop_requested``: a ``terminate()`` of a child waiting at its exit for
    a child of its own), instead of waiting until its own grace runs out."""
    if "warden._workerloop" not in sys.modules:  # not a worker: nothing sets it
        return bool(runner.core.join(limit))
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        step = _STOP_POLL if deadline is None else min(_STOP_POLL, _left(deadline))
        if runner.core.join(step):
            return True
        if stop_requested:
            _cut_short(runner, "the program was interrupted")
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


#: How often a worker's exit looks for a stop while it waits for a pool.
_STOP_POLL = 0.05


def _cut_short(runner: Runner, why: str) -> None:
    """Ends a runner's wait at interpreter exit now: a draining stop whose
    deadline is now (what is queued or running is cancelled, its workers get
    SIGTERM, run their exit path, SIGKILL after the grace period), else a
    terminate. For an executor whose submitted work is thereby lost, says on
    stderr how many tasks."""
    if runner.core.is_shut_down():
        return
    # (Not a pool a Ctrl-C while waiting has stopped already: what it
    # cancelled is still in ``pending`` until delivered, and was not
    # dropped here.)
    draining = runner.exit_policy == "drain"
    runner.cut_by_exit[0] = True
    with runner.pending_lock:
        # Counted before the cut, so no cancelled outcome is missed.
        dropped = len(runner.pending) if draining and not runner.interrupted else 0
    runner.core.stop("drain" if draining else "terminate", within=0.0, wait=False)
    runner.exit_policy = "terminate"
    if dropped:
        tasks = "task" if dropped == 1 else "tasks"
        say(f"warden: {runner.name}: {dropped} submitted {tasks} dropped at interpreter exit ({why})")


#: The process whose ``multiprocessing`` exit step runs warden's (see
#: :func:`_hook_multiprocessing_exit`).
_mp_exit_hooked: int | None = None


def _hook_multiprocessing_exit() -> None:
    """Makes warden's exit step (:func:`at_interpreter_exit`) one of this
    process's ``multiprocessing`` finalizers, once per process.

    A child that ``multiprocessing`` started (a ``Process``, a ``Pool``
    worker) ends without the interpreter's exit and its ``atexit``
    handlers: its bootstrap calls ``multiprocessing.util._exit_function``,
    which terminates the daemonic children ``active_children()`` lists
    (warden's pool workers among them), then joins them all. A pool the
    child left open would start replacements for the workers terminated,
    and the join would wait for those for ever. That function first runs
    the finalizers of priority 0 and up: there the pools shut down as at
    the end of a program (an executor runs what was submitted, a ``Pool``
    is terminated), and nothing of theirs is left to join. In a process
    that ends through the interpreter, warden's ``atexit`` handler has
    done all of it by then (see :func:`_at_multiprocessing_child_exit`)."""
    global _mp_exit_hooked
    pid = os.getpid()
    if _mp_exit_hooked == pid:
        return
    _mp_exit_hooked = pid
    multiprocessing.util.Finalize(None, _at_multiprocessing_child_exit, exitpriority=0)


#: Where ``multiprocessing`` ends a child it started, by module and
#: function: its bootstrap calls the exit function (up to Python 3.12); from
#: 3.13 a child forked by the ``fork`` start method or by the fork server
#: (in its ``main``) clears the ``atexit`` handlers it inherited (warden's
#: among them) and runs that function as the only one left, once the
#: bootstrap has returned.
_MULTIPROCESSING_CHILD_ENDS = frozenset(
    {
        ("multiprocessing.process", "_bootstrap"),
        ("multiprocessing.popen_fork", "_launch"),
        ("multiprocessing.forkserver", "main"),
    }
)


def _at_multiprocessing_child_exit() -> None:
    """warden's exit step, if ``multiprocessing``'s exit function runs at
    the end of a child it started (see :data:`_MULTIPROCESSING_CHILD_ENDS`).

    Anywhere else it runs among the ``atexit`` handlers, where warden's own
    handler has the step's place. There it runs before warden's handler
    once ``multiprocessing.get_logger()`` or ``log_to_stderr()`` has
    re-registered it (celery's worker calls it): it goes on to terminate the
    daemonic children ``active_children()`` lists and to join them all, so
    the pools still open are terminated here first (a running pool would
    replace the workers it terminates, and the join would wait for those for
    ever). The rest (an executor was drained in ``threading``'s exit hooks;
    exit callbacks) keeps its place, so that a handler registered earlier
    can still start a pool at exit, which warden's handler then stops."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in _MULTIPROCESSING_CHILD_ENDS:
            at_interpreter_exit()
            return
        frame = frame.f_back
    _shut_down_at_exit(policies=("terminate",))


def at_interpreter_exit() -> None:
    """warden's step of interpreter exit (called by the one ``atexit`` handler
    ``warden`` registers when it is imported): first every pool and ``Process`` child still
    running is shut down, then this process's exit callbacks run
    (``warden.at_exit``, and ``warden.finalize`` callbacks of objects still
    alive), then the pickler lets go of the globals it held for versions.
    So an exit callback can rely on every worker and child having
    ended, and cannot use a pool."""
    try:
        _shut_down_at_exit()
    finally:
        try:
            _finalize.run_exit_callbacks()
        finally:
            let_go_at_exit()


# Registered as concurrent.futures.process registers its own: refused once
# the interpreter is shutting down (this module first imported by an atexit
# handler), when the atexit step drains the executors instead.
with contextlib.suppress(AttributeError, RuntimeError):
    threading._register_atexit(_drain_executors_at_exit)  # type: ignore[attr-defined]


#: warden's exit step, in which a ``terminate()`` of a ``Process`` child
#: never raises: it ends the step's waits itself (see
#: :func:`_join_unless_stopped`), and the step must run to its end.
EXIT_STEP_CODES = frozenset(
    f.__code__
    for f in (
        at_interpreter_exit,
        _shut_down_at_exit,
        _join_unless_stopped,
        _cut_short,
        _at_multiprocessing_child_exit,
    )
)
