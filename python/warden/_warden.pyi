# Hand-kept stub of the extension module built from crates/warden-py.
# Keep it in step with the #[pymethods] there.

from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

UNWIND_GRACE: Final[float]
DEFAULT_GRACE: Final[float]
EXIT_INIT_FAILED: Final[int]
EXIT_PROTOCOL: Final[int]
EXIT_PARENT_GONE: Final[int]

class CoreError(RuntimeError):
    """An error from warden's core; ``args`` are ``(kind, message)``."""

# (kind, message, remote, pid, exitcode, signal, timeout), where remote is
# None or (remote_kind, type_name, message, traceback, data).
ErrorTuple = tuple[
    str,
    str,
    tuple[str, str, str, str, bytes] | None,
    int | None,
    int | None,
    int | None,
    float | None,
]
# (kind, type_name, message, traceback, pickled exception)
RemoteTuple = tuple[str, str, str, str, bytes]
Completion = tuple[int, bool, bytes | ErrorTuple]
# ("exited", worker, pid, exitcode, signal, cause, reason, hook_ran, hook_error, crashed)
ExitTuple = tuple[str, int, int, int | None, int | None, str | None, str | None, bool, str | None, bool]

class CorePool:
    """A core pool whose workers run ``program args...``; see crates/warden-py/src/pool.rs."""

    def __new__(
        cls,
        program: str,
        args: Sequence[str],
        *,
        workers: int = 1,
        name: str | None = None,
        init_payload: bytes | None = None,
        pass_fds: Sequence[int] = ...,
        env: Sequence[tuple[str, str]] = ...,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        init_timeout: float | None = None,
        grace: float | None = None,
        restart_intensity: tuple[int, float] | None = None,
        max_frame_size: int | None = None,
        prefetch: int | None = None,
        one_off: bool = False,
        start: str = "zygote",
        zygote_payload: bytes | None = None,
    ) -> CorePool: ...
    def submit(self, payload: bytes, tag: int, timeout: float | None = None) -> int: ...
    def next_completions(self, max: int = 256, timeout: float | None = None) -> list[Completion] | None: ...
    def cancel(self, task: int) -> bool: ...
    def cancel_queued(self, task: int) -> bool: ...
    def close(self) -> None: ...
    def close_cancel_queued(self) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> bool: ...
    def wait_pid(self, timeout: float) -> int | None: ...
    def last_exit(self) -> ExitTuple | None: ...
    def events(self) -> list[tuple[Any, ...]]: ...
    def workers(self) -> list[tuple[int, int, str, int | None]]: ...
    def zygote_pid(self) -> int | None: ...
    def failure(self) -> str | None: ...
    def is_shut_down(self) -> bool: ...
    def dispose(self) -> None: ...

class SharedEvent:
    """A process-shared event flag in a sealed memfd page."""

    def __new__(cls) -> SharedEvent: ...
    @staticmethod
    def from_fd(fd: int, token: int) -> SharedEvent: ...
    @staticmethod
    def open(pid: int, fd: int, token: int) -> SharedEvent: ...
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def fileno(self) -> int: ...
    @property
    def token(self) -> int: ...

class WorkerHandler(Protocol):
    """What ``worker_main`` calls; see python/warden/_workerloop.py."""

    def init(self, worker: int, pid: int, parent: int, payload: bytes) -> RemoteTuple | None: ...
    def run(self, payload: bytes) -> bytes | RemoteTuple: ...
    def exit(self, reason: str) -> tuple[str | None, int | None]: ...

def worker_main(handler: WorkerHandler) -> None:
    """Runs this process as a worker of the pool that started it; never returns then."""

def zygote_main(prepare: Callable[[bytes], object]) -> None:
    """Runs this process as the zygote of the pool that started it: calls
    ``prepare(payload)``, then forks workers on request. Returns only in a
    forked worker; the zygote itself exits when its pool is done with it."""

def forked_from() -> int | None:
    """The pid of the zygote this worker was forked from; ``None`` in a
    worker started by exec, and in any other process."""

class FinalizerToken:
    """One registration with the core's finalizer service; see crates/warden-py/src/finalize.rs."""

    def run_now(self) -> bool: ...
    def schedule(self) -> bool: ...
    def cancel(self) -> bool: ...
    def is_pending(self) -> bool: ...
    def state(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def at_exit(self) -> bool: ...
    def set_at_exit(self, at_exit: bool) -> None: ...

def register_finalizer(
    callback: Callable[[], bool], priority: int = 0, label: str | None = None, at_exit: bool = True
) -> FinalizerToken:
    """Registers ``callback()`` (which returns whether it succeeded); ``RuntimeError`` once closed."""

def run_exit_finalizers(timeout: float | None = None) -> tuple[int, int, int, bool]:
    """The exit drain, with the GIL released: ``(ran, failed, skipped, timed_out)``. Idempotent."""

def wait_finalizers_idle(timeout: float | None = None) -> bool:
    """Waits, with the GIL released, until the finalizer thread is idle."""

def is_finalizer_thread() -> bool: ...
def finalizer_exit_timeout() -> float: ...
