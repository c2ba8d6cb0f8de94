# Hand-kept stub of the extension module built from crates/warden-py;
# `make stubtest` checks it against the built module.

from collections.abc import Callable, Sequence
from typing import ClassVar, Final, Literal, Protocol, final

__all__ = [
    "DEFAULT_GRACE",
    "LENT_BYTES",
    "LENT_RAW",
    "WORKER_VARIABLES",
    "Completion",
    "CoreError",
    "CorePool",
    "ErrorKind",
    "FinalizerToken",
    "LostWorker",
    "RemoteFailure",
    "RemoteKind",
    "Segment",
    "SegmentBuffer",
    "SharedEvent",
    "TaskError",
    "WorkerEnd",
    "WorkerState",
    "buffer_address",
    "chain_interrupt_handler",
    "contains_any",
    "copy_to_bytearray",
    "copy_to_bytes",
    "fds_scarce",
    "fill_closed_stdio",
    "forked_from",
    "hold_stops",
    "interrupts_forwarded",
    "is_dumpable",
    "keep_no_spares",
    "last_interrupt_forwarded",
    "map_segment",
    "own_thread_ids",
    "prepare_interrupt_forwarding",
    "read_remote",
    "record_stop_signal",
    "register_finalizer",
    "run_exit_finalizers",
    "send_record",
    "setsid",
    "sigint_without_a_signal",
    "stop_thread_again",
    "task_clock",
    "trim_heap",
    "unwind_grace",
    "wait_finalizers_idle",
    "worker_main",
    "zygote_main",
]

DEFAULT_GRACE: Final[float]
WORKER_VARIABLES: Final[list[str]]

class CoreError(RuntimeError):
    """An error from warden's core; ``kind`` says which, and ``errno`` the
    system's error number when a system call failed."""

    kind: ErrorKind
    errno: int | None

@final
class ErrorKind:
    """What kind of error ended a task or refused a call."""

    REMOTE: ClassVar[ErrorKind]
    CRASHED: ClassVar[ErrorKind]
    MEMORY_EXCEEDED: ClassVar[ErrorKind]
    TIMED_OUT: ClassVar[ErrorKind]
    CANCELLED: ClassVar[ErrorKind]
    PROTOCOL: ClassVar[ErrorKind]
    POOL_FAILED: ClassVar[ErrorKind]
    CLOSED: ClassVar[ErrorKind]
    CODEC: ClassVar[ErrorKind]
    REJECTED: ClassVar[ErrorKind]
    WAIT_TIMED_OUT: ClassVar[ErrorKind]
    ALREADY_JOINED: ClassVar[ErrorKind]
    SEGMENT_LOST: ClassVar[ErrorKind]
    IO: ClassVar[ErrorKind]
    CONFIG: ClassVar[ErrorKind]
    OTHER: ClassVar[ErrorKind]
    def __int__(self) -> int: ...

@final
class RemoteKind:
    """How a task failed inside the worker."""

    RAISED: ClassVar[RemoteKind]
    PANICKED: ClassVar[RemoteKind]
    CODEC: ClassVar[RemoteKind]
    INTERRUPTED: ClassVar[RemoteKind]
    SETUP: ClassVar[RemoteKind]
    def __int__(self) -> int: ...

@final
class RemoteFailure:
    """What a worker reports about a task that failed."""

    def __new__(
        cls, kind: RemoteKind, type_name: str, message: str, traceback: str, data: bytes
    ) -> RemoteFailure: ...
    @property
    def kind(self) -> RemoteKind: ...
    @property
    def type_name(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def traceback(self) -> str: ...
    @property
    def data(self) -> bytes: ...

@final
class TaskError:
    """Why a task did not produce a value."""

    @property
    def kind(self) -> ErrorKind: ...
    @property
    def message(self) -> str: ...
    @property
    def remote(self) -> RemoteFailure | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def exitcode(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def memory(self) -> tuple[int, int] | None: ...

@final
class Completion:
    """One task's outcome: exactly one of ``value`` and ``error``."""

    @property
    def task(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def error(self) -> TaskError | None: ...
    def take_segment(self) -> int | None:
        """The fd of the result's shared segment, handed over (the caller closes it)."""

@final
class WorkerEnd:
    """How a worker's life ended."""

    @property
    def worker(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def exitcode(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def stop_cause(self) -> str | None: ...
    @property
    def exit_reason(self) -> str | None: ...
    @property
    def init_failed(self) -> bool: ...
    @property
    def hook_ran(self) -> bool: ...
    @property
    def hook_error(self) -> str | None: ...
    @property
    def crashed(self) -> bool: ...

@final
class WorkerState:
    """A live worker, as a pool's snapshot shows it."""

    @property
    def worker(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def phase(self) -> str: ...
    @property
    def running_task(self) -> int | None: ...

@final
class LostWorker:
    """A worker that died without running its exit path, as the core reports it."""

    @property
    def worker(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def exitcode(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def task(self) -> int | None: ...
    @property
    def record(self) -> bytes | None: ...

@final
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
        unbounded_start_hook: bool = False,
        grace: float | None = None,
        restart_intensity: tuple[int, float] | None = None,
        unlimited_restarts: bool = False,
        fail_on_start_error: bool = False,
        max_frame_size: int | None = None,
        prefetch: int | None = None,
        one_off: bool = False,
        forward_interrupts: bool = False,
        interrupts_since: int | None = None,
        start: str = "zygote",
        zygote_payload: bytes | None = None,
        zygote_fallback_payload: bytes | None = None,
        max_memory_per_child: int | None = None,
        memory_limit: int | None = None,
        on_worker_lost: Callable[[LostWorker], object] | None = None,
    ) -> CorePool: ...
    def submit(
        self,
        payload: bytes,
        timeout: float | None = None,
        segment: int | None = None,
        track_start: bool = False,
    ) -> int: ...
    def has_started(self, task: int) -> bool: ...
    def next_completions(self, max: int = 256, timeout: float | None = None) -> list[Completion] | None: ...
    def cancel(self, task: int) -> bool: ...
    def cancel_nowait(self, task: int) -> None: ...
    def cancel_queued(self, task: int) -> bool: ...
    def cancel_all_queued(self) -> list[int]: ...
    def close(self) -> None: ...
    def close_cancel_queued(self) -> None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> bool: ...
    def stop(
        self,
        mode: Literal["drain", "cancel_queued", "terminate", "kill"],
        within: float | None = None,
        wait: bool = True,
    ) -> bool: ...
    def wait_pid(self, timeout: float) -> int | None: ...
    def last_exit(self) -> WorkerEnd | None: ...
    def exit_status(self, pid: int) -> tuple[int | None, int | None] | None: ...
    def exited(self, count: int) -> list[int]: ...
    def workers(self) -> list[WorkerState]: ...
    def zygote_pid(self) -> int | None: ...
    def zygote_refused(self) -> str | None: ...
    def seconds_since_start_refused(self) -> float | None: ...
    def failure(self) -> str | None: ...
    def is_shut_down(self) -> bool: ...
    def dispose(self) -> None: ...

@final
class Segment:
    """A received shared segment, mapped copy-on-write; supports the buffer protocol."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def set_largest_buffer(self, size: int) -> None: ...

@final
class SegmentBuffer:
    """One buffer of a segment, exactly its bytes (writable); keeps the segment alive."""

    def __new__(cls, segment: Segment, offset: int, length: int) -> SegmentBuffer: ...
    def __len__(self) -> int: ...
    def alone(self) -> SegmentBuffer: ...
    @property
    def segment(self) -> Segment: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def map_segment(fd: int, min: int, max: int) -> Segment: ...
def copy_to_bytes(buffer: bytes | bytearray | memoryview | SegmentBuffer) -> bytes: ...
def copy_to_bytearray(buffer: bytes | bytearray | memoryview | SegmentBuffer) -> bytearray: ...
def buffer_address(obj: object) -> tuple[int, int]: ...
def read_remote(pid: int, entries: list[tuple[int, int, int]], max: int) -> list[bytes | SegmentBuffer]: ...
def is_dumpable() -> bool: ...
def contains_any(data: object, needles: list[bytes]) -> bool: ...
def trim_heap() -> bool: ...
def fill_closed_stdio() -> None: ...
def fds_scarce(fd: int) -> bool: ...
def interrupts_forwarded() -> int: ...
def chain_interrupt_handler() -> bool: ...
def prepare_interrupt_forwarding() -> int | None: ...
def own_thread_ids() -> list[int]: ...
def last_interrupt_forwarded() -> bool: ...

LENT_BYTES: Final[int]
LENT_RAW: Final[int]

@final
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

    def init(self, worker: int, pid: int, parent: int, payload: bytes) -> RemoteFailure | None: ...
    # A result with a value kept until it is sent: (bytes, the segment's fd or None, value).
    def run(
        self, payload: bytes, segment: int | None
    ) -> bytes | tuple[bytes, int | None, object] | RemoteFailure: ...
    def exit(self, reason: str) -> tuple[str | None, int | None, int | None]: ...

def worker_main(handler: WorkerHandler, variables: dict[str, str]) -> None:
    """Runs this process as a worker of the pool that started it; never returns then.
    ``variables`` are the ``WORKER_VARIABLES``, already removed from ``os.environ``."""

def send_record(data: bytes) -> None:
    """Sends the parent this worker's cleanup record (for ``on_worker_lost``)."""

def stop_thread_again(tid: int) -> None:
    """Sends SIGTERM again to this process's thread ``tid`` (a kernel id)."""

def task_clock(running: bool) -> None:
    """Stops (``False``) or restarts (``True``) the pool's clock of the
    running task, which waits before its work: its timeout counts from the
    restart."""

def keep_no_spares() -> None:
    """Keeps no spare destinations of large reads in this process from now
    on (a worker of a pool with a memory cap), and unmaps those kept."""

def setsid() -> int:
    """``os.setsid()`` for a worker or ``Process`` child, which leads its own
    process group; returns the new session's id."""

def hold_stops(held: bool) -> None:
    """Holds (``True``) or releases (``False``) the core's own exit after a
    stop signal, while the worker enters its ``worker_context``."""

def unwind_grace() -> float:
    """How long, in seconds, this worker's core gives an interrupted task to
    unwind before it runs the exit path beside it (half the pool's grace
    period, at least half a second)."""

def record_stop_signal(signum: int) -> None:
    """Records a stop signal the worker's Python handler received when the
    core's handlers did not: the worker stops as for any stop signal."""

def sigint_without_a_signal() -> bool:
    """Whether the worker's SIGINT handler runs without a SIGINT having come
    (``_thread.interrupt_main()``)."""

def zygote_main(prepare: Callable[[bytes], str | None], finish: Callable[[], object] | None = None) -> None:
    """Runs this process as the zygote of the pool that started it: calls
    ``prepare(payload)``, then forks workers on request (unless it returned a
    reason not to: the pool then starts a zygote without main). Returns only
    in a forked worker; the zygote itself exits when its pool is done with it,
    after calling ``finish()`` if it never forked a worker."""

def forked_from() -> int | None:
    """The pid of the zygote this worker was forked from; ``None`` in a
    worker started by exec, and in any other process."""

@final
class FinalizerToken:
    """One registration with the core's finalizer service; see crates/warden-py/src/finalize.rs."""

    def run_now(self) -> bool: ...
    def schedule(self) -> bool: ...
    def cancel(self) -> bool: ...
    def is_pending(self) -> bool: ...
    @property
    def priority(self) -> int: ...
    @property
    def at_exit(self) -> bool: ...
    def set_at_exit(self, at_exit: bool) -> None: ...

def register_finalizer(
    callback: Callable[[], bool], priority: int = 0, label: str | None = None
) -> FinalizerToken:
    """Registers ``callback()`` (which returns whether it succeeded); ``RuntimeError`` once closed."""

def run_exit_finalizers(timeout: float | None = None) -> None:
    """The exit drain, with the GIL released. Idempotent."""

def wait_finalizers_idle(timeout: float | None = None) -> bool:
    """Waits, with the GIL released, until the finalizer thread is idle."""
