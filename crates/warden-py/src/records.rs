//! The records that cross the boundary to Python: frozen classes with named
//! fields, and the enums of their kinds. Python reads them by name
//! (`error.kind == ErrorKind.CLOSED`, `end.init_failed`), never by
//! position or by parsing a string.
//!
//! * [`Completion`]: one task's outcome (or the news that it started), under
//!   the core's task id;
//! * [`TaskError`] (of an [`ErrorKind`]) and [`RemoteFailure`] (of a
//!   [`RemoteKind`]): how a task failed, and what the worker said about it;
//! * [`PyWorkerEnd`] (`WorkerEnd` in Python): how a worker's life ended;
//! * [`WorkerState`]: a live worker in a pool's snapshot.
//!
//! `python/warden/_warden.pyi` mirrors these classes; `make stubtest` checks
//! the two against each other.

use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use warden::{ExitReason, RemoteError, RemoteErrorKind, RetireReason, StopCause, WorkerEnd, WorkerSnapshot};

use crate::convert::Text;
use crate::CoreError;

/// What kind of error ended a task or refused a call (the core's error kinds).
#[pyclass(module = "warden._warden", name = "ErrorKind", eq, eq_int, frozen, hash)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PyErrorKind {
    /// The task itself failed in the worker; `TaskError.remote` says how.
    #[pyo3(name = "REMOTE")]
    Remote,
    /// The worker died while running the task.
    #[pyo3(name = "CRASHED")]
    Crashed,
    /// The worker passed the pool's memory limit while running the task; it was stopped.
    #[pyo3(name = "MEMORY_EXCEEDED")]
    MemoryExceeded,
    /// The task ran past its timeout; its worker is stopped.
    #[pyo3(name = "TIMED_OUT")]
    TimedOut,
    /// The task was cancelled.
    #[pyo3(name = "CANCELLED")]
    Cancelled,
    /// The worker sent something the pool could not read; it was killed.
    #[pyo3(name = "PROTOCOL")]
    Protocol,
    /// The pool failed as a whole (workers kept dying).
    #[pyo3(name = "POOL_FAILED")]
    PoolFailed,
    /// The pool is shut down and takes no tasks.
    #[pyo3(name = "CLOSED")]
    Closed,
    /// A payload could not be encoded or decoded.
    #[pyo3(name = "CODEC")]
    Codec,
    /// The task was refused (for instance: larger than a frame may be).
    #[pyo3(name = "REJECTED")]
    Rejected,
    /// A wait ran out of time.
    #[pyo3(name = "WAIT_TIMED_OUT")]
    WaitTimedOut,
    /// The pool was already joined.
    #[pyo3(name = "ALREADY_JOINED")]
    AlreadyJoined,
    /// A result's shared segment could not be received: the caller's
    /// process has too many open files. The worker goes on.
    #[pyo3(name = "SEGMENT_LOST")]
    SegmentLost,
    /// An operating-system call failed.
    #[pyo3(name = "IO")]
    Io,
    /// The pool's settings are invalid.
    #[pyo3(name = "CONFIG")]
    Config,
    /// Anything else (also used by the Python layer for failures in the caller's process).
    #[pyo3(name = "OTHER")]
    Other,
}

impl From<&warden::ErrorKind> for PyErrorKind {
    fn from(kind: &warden::ErrorKind) -> Self {
        use warden::ErrorKind as K;
        match kind {
            K::Remote(_) => Self::Remote,
            K::Crashed { .. } => Self::Crashed,
            K::MemoryExceeded { .. } => Self::MemoryExceeded,
            K::TimedOut { .. } => Self::TimedOut,
            K::Cancelled => Self::Cancelled,
            K::Protocol { .. } => Self::Protocol,
            K::PoolFailed { .. } => Self::PoolFailed,
            K::PoolClosed => Self::Closed,
            K::Codec(_) => Self::Codec,
            K::Rejected(_) => Self::Rejected,
            K::WaitTimedOut => Self::WaitTimedOut,
            K::AlreadyJoined => Self::AlreadyJoined,
            K::SegmentLost => Self::SegmentLost,
            K::Io(_) => Self::Io,
            K::Config(_) => Self::Config,
            _ => Self::Other,
        }
    }
}

/// How a task failed inside the worker.
#[pyclass(module = "warden._warden", name = "RemoteKind", eq, eq_int, frozen, hash)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PyRemoteKind {
    /// It raised an exception.
    #[pyo3(name = "RAISED")]
    Raised,
    /// It panicked (Rust tasks).
    #[pyo3(name = "PANICKED")]
    Panicked,
    /// Its arguments or its result could not be (de)serialized.
    #[pyo3(name = "CODEC")]
    Codec,
    /// It was interrupted because its worker was told to stop.
    #[pyo3(name = "INTERRUPTED")]
    Interrupted,
    /// The worker could not load the program (its main module, or what the
    /// start hooks refer to).
    #[pyo3(name = "SETUP")]
    Setup,
}

impl From<RemoteErrorKind> for PyRemoteKind {
    fn from(kind: RemoteErrorKind) -> Self {
        match kind {
            RemoteErrorKind::Raised => Self::Raised,
            RemoteErrorKind::Panicked => Self::Panicked,
            RemoteErrorKind::Codec => Self::Codec,
            RemoteErrorKind::Interrupted => Self::Interrupted,
            RemoteErrorKind::Setup => Self::Setup,
        }
    }
}

impl From<PyRemoteKind> for RemoteErrorKind {
    fn from(kind: PyRemoteKind) -> Self {
        match kind {
            PyRemoteKind::Raised => Self::Raised,
            PyRemoteKind::Panicked => Self::Panicked,
            PyRemoteKind::Codec => Self::Codec,
            PyRemoteKind::Interrupted => Self::Interrupted,
            PyRemoteKind::Setup => Self::Setup,
        }
    }
}

/// What a worker reports about a task that failed: built by the Python worker
/// and by the caller's side for failures it rebuilds locally.
#[pyclass(module = "warden._warden", frozen, get_all)]
pub struct RemoteFailure {
    /// How it failed.
    kind: PyRemoteKind,
    /// The qualified name of the exception's type.
    type_name: String,
    /// The exception's text.
    message: String,
    /// The formatted traceback (may be empty).
    traceback: String,
    /// The pickled exception (may be empty).
    data: Py<PyBytes>,
}

#[pymethods]
impl RemoteFailure {
    #[new]
    #[pyo3(signature = (kind, type_name, message, traceback, data))]
    fn new(kind: &Bound<'_, PyRemoteKind>, type_name: Text, message: Text, traceback: Text, data: Py<PyBytes>) -> Self {
        RemoteFailure { kind: *kind.get(), type_name: type_name.0, message: message.0, traceback: traceback.0, data }
    }
}

impl RemoteFailure {
    fn from_core(py: Python<'_>, r: &RemoteError) -> Self {
        RemoteFailure {
            kind: r.kind.into(),
            type_name: r.type_name.clone(),
            message: r.message.clone(),
            traceback: r.traceback.clone(),
            data: PyBytes::new(py, &r.data).unbind(),
        }
    }

    /// The core's form of this report.
    pub fn to_core(&self, py: Python<'_>) -> RemoteError {
        let mut e = RemoteError::new(self.kind.into(), self.type_name.clone(), self.message.clone());
        e.traceback = self.traceback.clone();
        e.data = self.data.bind(py).as_bytes().to_vec();
        e
    }
}

/// Why a task did not produce a value.
#[pyclass(module = "warden._warden", frozen, get_all)]
pub struct TaskError {
    /// What kind of failure it was.
    kind: PyErrorKind,
    /// A sentence that says what happened.
    message: String,
    /// What the worker reported, when the task itself failed.
    remote: Option<Py<RemoteFailure>>,
    /// The worker's pid, when it crashed or broke the protocol.
    pid: Option<i32>,
    /// The worker's exit status, when it exited.
    exitcode: Option<i32>,
    /// The signal that killed the worker, if one did.
    signal: Option<i32>,
    /// The task's timeout in seconds, when it timed out.
    timeout: Option<f64>,
    /// The memory limit and the resident size seen (bytes), when the worker passed it.
    memory: Option<(u64, u64)>,
}

impl TaskError {
    fn from_core(py: Python<'_>, e: &warden::Error) -> PyResult<Self> {
        let remote = e.remote().map(|r| Py::new(py, RemoteFailure::from_core(py, r))).transpose()?;
        let pid = match e.kind() {
            warden::ErrorKind::Crashed { pid, .. }
            | warden::ErrorKind::Protocol { pid, .. }
            | warden::ErrorKind::MemoryExceeded { pid, .. } => Some(*pid),
            _ => None,
        };
        let memory = match e.kind() {
            warden::ErrorKind::MemoryExceeded { limit, rss, .. } => Some((*limit, *rss)),
            _ => None,
        };
        let timeout = match e.kind() {
            warden::ErrorKind::TimedOut { after } => Some(after.as_secs_f64()),
            _ => None,
        };
        let status = e.exit_status();
        Ok(TaskError {
            kind: e.kind().into(),
            message: e.to_string(),
            remote,
            pid,
            exitcode: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timeout,
            memory,
        })
    }
}

/// One task's outcome: exactly one of `value` (the result's bytes) and
/// `error`; a value may come with the fd of the result's shared segment
/// (see `python/warden/_oob.py`), which [`Completion::take_segment`] hands
/// over. A segment nobody took is closed with the record. Or, with `started`
/// set and neither, the news that a worker started the task.
#[pyclass(module = "warden._warden", frozen)]
pub struct Completion {
    /// The task's id, as `CorePool.submit` returned it.
    #[pyo3(get)]
    task: u64,
    /// The result's bytes, if the task succeeded.
    #[pyo3(get)]
    value: Option<Py<PyBytes>>,
    /// Why it failed, if it did.
    #[pyo3(get)]
    error: Option<Py<TaskError>>,
    /// The result's shared segment, until it is taken.
    segment: Mutex<Option<OwnedFd>>,
}

impl Completion {
    /// The record of `task`'s outcome; it owns the result's segment, if any.
    pub fn new(py: Python<'_>, task: u64, outcome: Result<warden::Output, warden::Error>) -> PyResult<Self> {
        Ok(match outcome {
            Ok(out) => Completion {
                task,
                value: Some(PyBytes::new(py, &out.bytes).unbind()),
                error: None,
                segment: Mutex::new(out.segment),
            },
            Err(e) => Completion {
                task,
                value: None,
                error: Some(Py::new(py, TaskError::from_core(py, &e)?)?),
                segment: Mutex::new(None),
            },
        })
    }
}

#[pymethods]
impl Completion {
    /// The fd of the result's shared segment, handed over: the caller closes
    /// it. `None` if the result has none, or it was taken already.
    fn take_segment(&self) -> Option<RawFd> {
        self.segment.lock().unwrap_or_else(|p| p.into_inner()).take().map(IntoRawFd::into_raw_fd)
    }
}

/// How a worker's life ended (the core's [`WorkerEnd`], for Python).
#[pyclass(module = "warden._warden", name = "WorkerEnd", frozen, get_all)]
pub struct PyWorkerEnd {
    /// The worker's number in its pool.
    worker: u64,
    /// Its process id.
    pid: i32,
    /// Its exit status, if it exited.
    exitcode: Option<i32>,
    /// The signal that killed it, if one did.
    signal: Option<i32>,
    /// Why the pool stopped it, if it did (for logs).
    stop_cause: Option<String>,
    /// How its exit path said it ended, if it got that far (for logs).
    exit_reason: Option<String>,
    /// Whether its start failed (in Python: unpickling the target, the
    /// initializer raised), as its exit path or the pool reported it.
    init_failed: bool,
    /// Whether its exit hook ran.
    hook_ran: bool,
    /// What its exit hook reported as failing, if anything.
    hook_error: Option<String>,
    /// Whether the pool counted it as a crash (an exit nobody asked for).
    crashed: bool,
}

impl From<&WorkerEnd> for PyWorkerEnd {
    fn from(exit: &WorkerEnd) -> Self {
        let (reason, hook_ran, hook_error) = match &exit.goodbye {
            Some((reason, report)) => (Some(reason), report.hook_ran, report.hook_error.clone()),
            None => (None, false, None),
        };
        let init_failed =
            matches!(reason, Some(ExitReason::InitFailed)) || matches!(exit.cause, Some(StopCause::InitFailed(_)));
        PyWorkerEnd {
            worker: exit.worker,
            pid: exit.pid,
            exitcode: exit.status.code(),
            signal: exit.status.signal(),
            stop_cause: exit.cause.as_ref().map(stop_cause),
            exit_reason: reason.map(exit_reason),
            init_failed,
            hook_ran,
            hook_error,
            crashed: exit.crashed,
        }
    }
}

/// A live worker, as a pool's snapshot shows it.
#[pyclass(module = "warden._warden", frozen, get_all)]
pub struct WorkerState {
    /// The worker's number in its pool.
    worker: u64,
    /// Its process id.
    pid: i32,
    /// Its lifecycle phase ("starting", "ready", ...).
    phase: String,
    /// The id of the task it is running, if any.
    running_task: Option<u64>,
}

impl From<WorkerSnapshot> for WorkerState {
    fn from(w: WorkerSnapshot) -> Self {
        WorkerState { worker: w.worker, pid: w.pid, phase: w.phase.to_string(), running_task: w.running }
    }
}

/// A core error raised in Python as `CoreError(message)` whose `kind`
/// attribute is its [`PyErrorKind`], and whose `errno` is the system's error
/// number when a system call failed (`None` otherwise), so that a caller
/// standing in for the standard library can raise the `OSError` it would.
pub fn core_err(e: warden::Error) -> PyErr {
    let errno = match e.kind() {
        warden::ErrorKind::Io(io) => io.raw_os_error(),
        _ => None,
    };
    let err = core_error(PyErrorKind::from(e.kind()), e.to_string());
    Python::attach(|py| match err.value(py).setattr("errno", errno) {
        Ok(()) => err,
        Err(e) => e,
    })
}

/// `CoreError(message)` with `kind` set.
pub fn core_error(kind: PyErrorKind, message: String) -> PyErr {
    Python::attach(|py| {
        let err = CoreError::new_err(message);
        if let Err(e) = err.value(py).setattr("kind", kind) {
            return e;
        }
        err
    })
}

/// How a worker's exit path said it ended, in a few words: `retired:shutdown`,
/// `retired:max_tasks`, `retired:done`, `signal:<n>`, `parent_gone`,
/// `init_failed` or `protocol`.
pub fn exit_reason(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Retired(r) => format!("retired:{}", retire_reason(r)),
        ExitReason::Signal(sig) => format!("signal:{sig}"),
        ExitReason::ParentGone => "parent_gone".into(),
        ExitReason::InitFailed => "init_failed".into(),
        ExitReason::ProtocolError => "protocol".into(),
    }
}

fn retire_reason(reason: &RetireReason) -> &'static str {
    match reason {
        RetireReason::Shutdown => "shutdown",
        RetireReason::MaxTasks => "max_tasks",
        RetireReason::Done => "done",
        RetireReason::MaxMemory => "max_memory",
        RetireReason::Stopped => "stopped",
    }
}

/// Why the pool stopped a worker, in a few words.
fn stop_cause(cause: &StopCause) -> String {
    match cause {
        StopCause::Retired(r) => format!("retired:{}", retire_reason(r)),
        StopCause::TimedOut => "timed_out".into(),
        StopCause::Cancelled => "cancelled".into(),
        StopCause::Terminated => "terminated".into(),
        StopCause::Killed => "killed".into(),
        StopCause::PoolFailed => "pool_failed".into(),
        StopCause::Protocol(detail) => format!("protocol:{detail}"),
        StopCause::InitFailed(detail) => format!("init_failed:{detail}"),
        StopCause::InitTimeout => "init_timeout".into(),
        StopCause::MemoryExceeded { .. } => "memory_exceeded".into(),
        _ => "other".into(),
    }
}
