"""``warden.Process``: a child process with the same lifecycle as a pool worker.

A ``Process`` is a one-off core pool: one worker, one task (the pickled
``Process`` itself, as the standard library's spawn start method sends it),
then the worker retires through its exit path (``atexit`` handlers, garbage
collection, flush) and exits with the code ``multiprocessing`` would give it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import re
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _warden
from ._pickle import dumps_for_spawn, spawning_object

if TYPE_CHECKING:
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing.process import BaseProcess, active_children, parent_process

    from ._runner import Runner
    from .executor import ProcessPoolExecutor

__all__ = [
    "BaseProcess",
    "BrokenProcessPool",
    "Process",
    "ProcessPoolExecutor",
    "active_children",
    "current_process",
    "parent_process",
]

#: The public names of ``concurrent.futures.process`` and
#: ``multiprocessing.process`` that this module stands in for, where a
#: program switched over with ``import warden as cf`` (or ``as
#: multiprocessing``) reaches them as ``cf.process.BrokenProcessPool``:
#: imported on first access, not by the child that imports this module to
#: unpickle its ``Process``.
_STANDING_IN_FOR = {
    "BrokenProcessPool": "concurrent.futures.process",
    "ProcessPoolExecutor": "warden.executor",
    "BaseProcess": "multiprocessing.process",
    "active_children": "multiprocessing.process",
    "parent_process": "multiprocessing.process",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STANDING_IN_FOR))


def __getattr__(name: str) -> Any:
    home = _STANDING_IN_FOR.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


#: How long ``start()`` waits for the child's pid.
START_TIMEOUT = 30.0

# The objects whose start() runs, by id: a second start() of one from another
# thread meanwhile is refused, as is its close(). Its child is not known
# until the first start() returns, so nothing could stop another child; a
# terminate() or kill() meanwhile is kept, by the same id, for start() to
# pass on as it returns.
_starting: set[int] = set()
_stops_asked: dict[int, str] = {}
_starting_lock = threading.RLock()  # a signal handler may close() meanwhile


def _after_fork_in_child() -> None:
    """A copy of this process made by ``os.fork()`` has none of its other
    threads: it would wait for ever on the lock one of them held, and no
    start() of theirs goes on there (a Process is started by the process
    that made it)."""
    global _starting_lock
    _starting_lock = threading.RLock()
    _starting.clear()
    _stops_asked.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def current_process() -> multiprocessing.process.BaseProcess:
    """The ``Process`` object of this process: the ``warden.Process`` in a
    child started by one, the worker in a pool worker, else the main process."""
    return multiprocessing.current_process()


def _ignore_outcome(ok: bool, data: Any) -> None:
    pass


def _start_error(name: str, error: _warden.CoreError | str) -> OSError:
    """The ``OSError`` a ``Process`` that cannot start raises, as the standard
    library's ``start()`` raises ``os.fork``'s: with the system's error
    number when a system call failed (``BlockingIOError`` when processes or
    threads run out under ``ulimit -u``, ``EMFILE`` when descriptors do),
    also when the core reports it only in its text (``os error N``, from a
    child that could not be started)."""
    # The core runs the child as a pool of one: its words for that (the
    # pool, a worker) are the child's here.
    text = str(error).removeprefix("the pool failed: ")
    text = re.sub(r"^cannot start a worker\b", "cannot start its interpreter", text)
    message = f"cannot start process {name}: {text}"
    errno = error.errno if isinstance(error, _warden.CoreError) else None
    if errno is None:
        found = re.search(r"\(os error (\d+)\)", str(error))
        errno = int(found.group(1)) if found else None
    if errno is not None:
        return OSError(errno, message)
    return OSError(message)


class Process(multiprocessing.context.Process):
    """A drop-in for ``multiprocessing.Process`` whose child always cleans up.

    A subclass of ``multiprocessing.Process`` (so code and annotations naming
    that type take it), whose start, join and signalling are warden's own.

    The child is a fresh interpreter (as under the ``"spawn"`` start method);
    ``target`` and ``args`` are pickled for it then (lambdas and closures too).
    When ``run()`` returns or raises, the child runs its ``atexit`` handlers and
    a garbage collection (so ``__del__`` of cyclic garbage runs) and flushes its
    output before ``join()`` returns. ``terminate()`` asks it to stop: the
    running target gets :class:`warden.TaskInterrupted`, ``finally`` blocks and
    the exit path run, and it is killed only if that takes longer than the
    grace period. A target that installed its own SIGTERM handler gets that
    handler instead, and the child runs its exit path once the target
    returns. SIGINT raises ``KeyboardInterrupt`` in the target, as in any
    program. ``exitcode`` follows ``multiprocessing``: 0, 1 after an
    exception (traceback on stderr), ``n`` for ``sys.exit(n)``, ``-15`` after
    ``terminate()`` (or the target's own code if its handler made it return),
    ``-9`` after ``kill()``.

    Pickling a ``Process`` (for instance as part of ``self`` in
    ``Process(target=self.method)``) gives the child an inert handle that
    reports ``name``, ``pid``, ``daemon`` and ``exitcode`` and cannot be
    started, joined or signalled.
    """

    _warden_handle_of: int | None = None
    _warden_handle_exitcode: int | None = None
    _warden_pid: int | None = None
    _warden_started_as: tuple[int, int] | None = None  # see _parent_and_start_time()
    _warden_sentinel_fd: int | None = None
    # Not weakref.finalize[...]: typing.get_type_hints() evaluates it, and
    # finalize cannot be subscripted at run time.
    _warden_sentinel_closer: weakref.finalize | None = None  # type: ignore[type-arg]

    if TYPE_CHECKING:
        # Set by the standard library's __init__ and close(); here the
        # child's Runner stands where the standard library keeps its Popen.
        _popen: Runner | None
        _closed: bool

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] = {},
        *,
        daemon: bool | None = None,
    ) -> None:
        # The standard library's signature: `group` first (always None, kept
        # for compatibility with threading.Thread), so positional calls and
        # subclasses calling super().__init__(group, target, ...) line up.
        super().__init__(group, target, name, args, kwargs, daemon=daemon)

    # -- pickling ----------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        if spawning_object() is self:
            # Being started: the whole object goes to the child, as under spawn.
            state = self.__getstate__()
            if isinstance(state, dict):
                state = dict(state)
                # The parent's handles on the child stay here; in the child
                # the object reads as one not started by it (``exitcode``
                # None), as a spawned child's ``current_process()`` does.
                for key in (
                    "_popen",
                    "_warden_pid",
                    "_warden_started_as",
                    "_warden_sentinel_fd",
                    "_warden_sentinel_closer",
                ):
                    if key in state:
                        state[key] = None
            return (_new_process, (type(self),), state)
        return (
            _process_handle,
            (
                type(self),
                self._name,  # type: ignore[attr-defined]
                self.pid if not self._closed else self._warden_pid,
                bool(self._config.get("daemon")),  # type: ignore[attr-defined]
                None if self._closed else self.exitcode,
                self._warden_handle_of or self._parent_pid,  # type: ignore[attr-defined]
            ),
        )

    def __copy__(self) -> Process:
        # What copy.copy makes of the standard library's: the same attributes
        # (an unstarted copy can be started), not the handle pickling gives.
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Process:
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        # The authkey refuses to be copied, as it does for the standard library's.
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _warden_check_not_handle(self, what: str) -> None:
        if self._warden_handle_of is not None:
            raise RuntimeError(
                f"{self._name} is a handle to a process started by process {self._warden_handle_of}; "  # type: ignore[attr-defined]
                f"only that process can {what} it"
            )

    # -- lifecycle ---------------------------------------------------------

    def _warden_own_attributes(self) -> list[tuple[str, Any]]:
        """What the object keeps (a subclass's ``self.queue = queue`` in its
        ``__init__``), by name, for an error about what cannot go to the
        child; after the target and its arguments, which are named as such."""
        named = ("_target", "_args", "_kwargs")
        return [(f"self.{name}", value) for name, value in vars(self).items() if name not in named]

    def start(self) -> None:
        """Starts the child; returns once its pid is known."""
        # Claimed under a lock: a start() or close() in another thread
        # meanwhile is refused, as the child is not known until this returns.
        with _starting_lock:
            self._check_closed()  # type: ignore[attr-defined]
            self._warden_check_not_handle("start")
            if self._popen is not None or id(self) in _starting:
                raise AssertionError("cannot start a process twice")
            if self._parent_pid != os.getpid():  # type: ignore[attr-defined]
                raise AssertionError("can only start a process object created by current process")
            _starting.add(id(self))
        try:
            self._warden_start()
        finally:
            with _starting_lock:
                _starting.discard(id(self))
                asked = _stops_asked.pop(id(self), None)
            if asked is not None and self._popen is not None:
                getattr(self._popen.core, asked)()

    def _warden_start(self) -> None:
        # Here, not at import: the child imports this module to unpickle its
        # Process, and needs none of what starting one takes.
        from . import _runner

        # As the standard library's start() does: children that have ended,
        # and that nothing joined, are let go (each holds its pool's core).
        _let_go_of_ended_children()
        _runner.note_program_run_by_a_tool()

        payload, fds, segment = dumps_for_spawn(
            self,
            target=self,
            parameters=lambda: [
                *_runner._named("args", self._args),  # type: ignore[attr-defined]
                *_runner._named("kwargs", self._kwargs),  # type: ignore[attr-defined]
                ("target", self._target),  # type: ignore[attr-defined]
                *self._warden_own_attributes(),
            ],
            functions=(type(self), self._target),  # type: ignore[attr-defined]
            # The arguments' large buffers go beside the task, in a segment
            # the child maps, as a pool task's do: no frame limit for them.
            out_of_band=(self._args, self._kwargs),  # type: ignore[attr-defined]
        )
        if segment is not None:
            fds.append(segment)
        # Held back until the child is this object's, running its target
        # (see ctrl_c_held): a Ctrl-C meanwhile leaves a started child that
        # can be joined, not one waiting for a target that never comes. A
        # terminal's Ctrl-C from here on reaches the child too, even one
        # that comes before the child has started.
        since = _warden.prepare_interrupt_forwarding()
        with _runner.ctrl_c_held():
            try:
                runner = _runner.Runner(
                    mode="process",
                    name=self._name,  # type: ignore[attr-defined]
                    workers=1,
                    pass_fds=fds,
                    segment=segment,
                    one_off=True,
                    deliver=False,
                    exit_policy="terminate" if self.daemon else "join",
                    start="exec",  # one child: a zygote would only add a process
                    # A terminal's Ctrl-C reaches it, as it reaches a child in
                    # the terminal's process group.
                    forward_interrupts=True,
                    interrupts_since=since,
                )
            except _warden.CoreError as e:  # the core closed the fds
                raise _start_error(self._name, e) from None  # type: ignore[attr-defined]
            self._popen = runner
            # Where the core says no child was started, this object is left
            # as it was before start() (its exitcode None, not alive), and may
            # be started again, as the standard library's is after os.fork()
            # failed. (An exception of the program's meanwhile, from a signal
            # handler, leaves it started: its child may be running.)
            try:
                runner.submit(payload, _ignore_outcome)
            except _warden.CoreError as e:
                runner.core.kill()
                self._popen = None
                raise _start_error(self._name, e) from None  # type: ignore[attr-defined]
            finally:
                runner.close_nowait()
            pid = runner.core.wait_pid(START_TIMEOUT)
            if pid is None:
                runner.core.kill()
                self._popen = None
                raise _start_error(self._name, runner.core.failure() or "no pid")  # type: ignore[attr-defined]
            self._warden_pid = pid
            self._warden_started_as = _parent_and_start_time(pid)
            # As the standard library does: the child has them, this object need not.
            del self._target, self._args, self._kwargs  # type: ignore[attr-defined]
            multiprocessing.process._children.add(self)  # type: ignore[attr-defined]

    def join(self, timeout: float | None = None) -> None:
        """Waits until the child has exited (and run its exit path), or
        ``timeout`` seconds. A terminal's Ctrl-C meanwhile, or a SIGINT another
        program sends, reaches the child too (it is passed on to it) and
        raises ``KeyboardInterrupt`` here; a SIGINT this process sends itself
        stops the child gracefully (a second one kills it) and raises
        ``KeyboardInterrupt``."""
        self._check_closed()  # type: ignore[attr-defined]
        self._warden_check_not_handle("join")
        if self._parent_pid != os.getpid():  # type: ignore[attr-defined]
            raise AssertionError("can only join a child process")
        if self._popen is None:
            raise AssertionError("can only join a started process")
        if self._popen.join(timeout):
            multiprocessing.process._children.discard(self)  # type: ignore[attr-defined]

    def is_alive(self) -> bool:
        """Whether the child has started and not yet exited."""
        self._check_closed()  # type: ignore[attr-defined]
        if self is multiprocessing.current_process():
            return True
        self._warden_check_not_handle("inspect")
        if self._parent_pid != os.getpid():  # type: ignore[attr-defined]
            raise AssertionError("can only test a child process")
        if self._popen is None:
            return False
        return not self._popen.core.is_shut_down()

    def terminate(self) -> None:
        """Asks the child to stop: SIGTERM (its target is interrupted, or its
        own SIGTERM handler runs, and its exit path runs), SIGKILL after the
        grace period. Returns at once."""
        self._warden_stop("terminate")

    def kill(self) -> None:
        """Kills the child with SIGKILL now. Returns at once."""
        self._warden_stop("kill")

    def _warden_stop(self, how: str) -> None:
        """``terminate()`` (``how`` is its name) or ``kill()``. While another
        thread's ``start()`` runs, that one passes it on as it returns (the
        child is not known before). In a copy of the parent made by
        ``os.fork()``, whose core runs nothing, the child gets the signal
        from here, as the standard library's would."""
        self._check_closed()  # type: ignore[attr-defined]
        self._warden_check_not_handle(how)
        with _starting_lock:
            if id(self) in _starting:
                if _stops_asked.get(id(self)) != "kill":
                    _stops_asked[id(self)] = how
                return
        if self._popen is None:
            return
        if self._parent_pid != os.getpid():  # type: ignore[attr-defined]
            if not self._popen.core.is_shut_down():  # not seen ended when the copy was made
                _signal_from_a_copy(self._warden_pid, self._warden_started_as, how)
            return
        getattr(self._popen.core, how)()

    def close(self) -> None:
        """Releases what the object holds; ``ValueError`` if the child still runs."""
        # Under the lock a start() claims the object with: one meanwhile in
        # another thread either has started its child, or finds it closed.
        with _starting_lock:
            if self._closed:
                return
            if id(self) in _starting or (self._popen is not None and not self._popen.core.is_shut_down()):
                raise ValueError(
                    "Cannot close a process while it is still running. "
                    "You should first call join() or terminate()."
                )
            if self._popen is not None:
                self._warden_handle_exitcode = self.exitcode
                self._popen.core.dispose()
                multiprocessing.process._children.discard(self)  # type: ignore[attr-defined]
            if self._warden_sentinel_closer is not None:
                self._warden_sentinel_closer()
                self._warden_sentinel_fd = None
            self._closed = True

    # -- state -------------------------------------------------------------

    @property
    def exitcode(self) -> int | None:
        """The child's exit code (``-N`` if a signal ``N`` ended it), ``None``
        while it runs or before it starts."""
        self._check_closed()  # type: ignore[attr-defined]
        if self._warden_handle_of is not None:
            return self._warden_handle_exitcode
        if self._popen is None:
            return None
        return self._popen.exitcode()

    @property
    def ident(self) -> int | None:
        """The child's process id (``None`` before ``start()``)."""
        self._check_closed()  # type: ignore[attr-defined]
        if self is multiprocessing.current_process():
            return os.getpid()
        return self._warden_pid

    pid = ident

    @property
    def sentinel(self) -> int:
        """An fd that becomes readable when the child exits (a pidfd), for
        ``multiprocessing.connection.wait``."""
        self._check_closed()  # type: ignore[attr-defined]
        self._warden_check_not_handle("wait for")
        if self._warden_pid is None:
            raise ValueError("process not started")
        if self._warden_sentinel_fd is None:
            fd = _exit_sentinel(self._warden_pid, self._popen)
            self._warden_sentinel_fd = fd
            self._warden_sentinel_closer = weakref.finalize(self, os.close, fd)
        return self._warden_sentinel_fd

    def __repr__(self) -> str:
        if self is multiprocessing.current_process():
            status = "started"
        elif self._closed:
            status = "closed"
        elif self._warden_handle_of is not None:
            status = "handle"
        elif self._popen is None:
            status = "initial"
        elif self._popen.core.is_shut_down():
            status = "stopped"
        else:
            status = "started"
        # The standard library's order and words: pid, parent, status, the
        # exit code by its signal's name (-SIGTERM), daemon.
        parts = [type(self).__name__, f"name={self._name!r}"]  # type: ignore[attr-defined]
        if self._warden_pid is not None and status != "closed":
            parts.append(f"pid={self._warden_pid}")
        parts += [f"parent={self._parent_pid}", status]  # type: ignore[attr-defined]
        if status == "stopped":
            code = self.exitcode
            parts.append(f"exitcode={multiprocessing.process._exitcode_to_name.get(code, code)}")  # type: ignore[attr-defined]
        if self._config.get("daemon"):  # type: ignore[attr-defined]
            parts.append("daemon")
        return "<" + " ".join(parts) + ">"


def _parent_and_start_time(pid: int) -> tuple[int, int] | None:
    """Process ``pid``'s parent and start time (clock ticks since boot), from
    ``/proc/PID/stat``: what tells it from a later process given its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _signal_from_a_copy(pid: int | None, started_as: tuple[int, int] | None, how: str) -> None:
    """``terminate()`` or ``kill()`` of child ``pid``, from a copy of its
    parent made by ``os.fork()``: SIGTERM (and SIGCONT, for a child that was
    stopped) or SIGKILL, through a pidfd, and only to the process with the
    parent and start time the child had (``started_as``), not to one that
    reused its pid once the parent reaped it. The SIGKILL after the grace
    period is the parent's to send, as its core watches the child."""
    if pid is None or started_as is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # ended, and reaped
        return
    try:
        if _parent_and_start_time(pid) != started_as:  # read once the pidfd holds what it names
            return
        if how == "kill":
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
            signal.pidfd_send_signal(fd, signal.SIGCONT)
    except OSError:
        pass  # it ended meanwhile
    finally:
        os.close(fd)


def _exit_sentinel(pid: int, runner: Any) -> int:
    """An fd that is readable once child ``pid`` has exited.

    A pidfd, unless the child may already have been reaped: the core reaps
    before it reports its pool shut down, so a pidfd opened *before* the pool
    was seen running names our child, and one opened after may name a process
    that reused the pid. Then an already-readable fd stands in (a pipe whose
    write end is closed)."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
    if fd is not None and runner is not None and not runner.core.is_shut_down():
        return fd
    if fd is not None:
        os.close(fd)
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _new_process(cls: type[Process]) -> Process:
    return cls.__new__(cls)


def _process_handle(
    cls: type[Process], name: str, pid: int | None, daemon: bool, exitcode: int | None, owner: int
) -> Process:
    handle = cls.__new__(cls)
    handle._name = name  # type: ignore[attr-defined]
    handle._warden_pid = pid
    handle._config = {"daemon": daemon}  # type: ignore[attr-defined]
    handle._parent_pid = owner  # type: ignore[attr-defined]
    handle._warden_handle_of = owner
    handle._warden_handle_exitcode = exitcode
    handle._popen = None
    handle._closed = False
    handle._target = None  # type: ignore[attr-defined]
    handle._args = ()  # type: ignore[attr-defined]
    handle._kwargs = {}  # type: ignore[attr-defined]
    handle._identity = ()
    return handle


def _let_go_of_ended_children() -> None:
    """``multiprocessing.process._cleanup()`` for the processes in
    ``multiprocessing``'s set of children only: iterating the set itself
    (``active_children()``) also looks at every worker of every pool."""
    children = multiprocessing.process._children  # type: ignore[attr-defined]
    for child in list(set.__iter__(children)):
        popen = getattr(child, "_popen", None)
        try:
            ended = popen is not None and popen.poll() is not None
        except Exception:
            continue
        if ended:
            children.discard(child)
