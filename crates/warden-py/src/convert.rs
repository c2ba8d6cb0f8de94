//! Conversions between core types and the plain tuples and strings the Python
//! package reads. Names here are the vocabulary of `python/warden/_errors.py`.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use warden::{ErrorKind, ExitReason, RetireReason, StopCause};
use warden::{RemoteError, RemoteErrorKind};

use crate::CoreError;

/// A number of seconds from Python as a duration; `None` stays `None`.
pub fn seconds(what: &str, secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| PyValueError::new_err(format!("{what} must be a non-negative number of seconds, not {s}")))
    })
    .transpose()
}

/// The name of an error kind, as Python sees it.
pub fn kind_name(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Remote(_) => "remote",
        ErrorKind::Crashed { .. } => "crashed",
        ErrorKind::TimedOut { .. } => "timeout",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Protocol { .. } => "protocol",
        ErrorKind::PoolFailed { .. } => "pool_failed",
        ErrorKind::PoolClosed => "closed",
        ErrorKind::Codec(_) => "codec",
        ErrorKind::Rejected(_) => "rejected",
        ErrorKind::WaitTimedOut => "wait_timeout",
        ErrorKind::AlreadyJoined => "already_joined",
        ErrorKind::Io(_) => "io",
        ErrorKind::Config(_) => "config",
        _ => "other",
    }
}

/// A core error raised in Python as `CoreError(kind, message)`.
pub fn core_err(e: warden::Error) -> PyErr {
    CoreError::new_err((kind_name(e.kind()), e.to_string()))
}

fn remote_kind_name(kind: RemoteErrorKind) -> &'static str {
    match kind {
        RemoteErrorKind::Raised => "raised",
        RemoteErrorKind::Panicked => "panicked",
        RemoteErrorKind::Codec => "codec",
        RemoteErrorKind::Interrupted => "interrupted",
    }
}

/// Parses the kind of a remote error named by the Python worker.
pub fn remote_kind(name: &str) -> RemoteErrorKind {
    match name {
        "interrupted" => RemoteErrorKind::Interrupted,
        "codec" => RemoteErrorKind::Codec,
        "panicked" => RemoteErrorKind::Panicked,
        _ => RemoteErrorKind::Raised,
    }
}

/// A failed task's outcome as a tuple:
/// `(kind, message, remote, pid, exitcode, signal, timeout)` where `remote` is
/// `None` or `(remote_kind, type_name, message, traceback, data)`.
pub fn error_tuple<'py>(py: Python<'py>, e: &warden::Error) -> PyResult<Bound<'py, PyTuple>> {
    let remote = e.remote().map(|r: &RemoteError| {
        (
            remote_kind_name(r.kind),
            r.type_name.as_str(),
            r.message.as_str(),
            r.traceback.as_str(),
            PyBytes::new(py, &r.data),
        )
    });
    let pid = match e.kind() {
        ErrorKind::Crashed { pid, .. } | ErrorKind::Protocol { pid, .. } => Some(*pid),
        _ => None,
    };
    let status = e.exit_status();
    let timeout = match e.kind() {
        ErrorKind::TimedOut { after } => Some(after.as_secs_f64()),
        _ => None,
    };
    (
        kind_name(e.kind()),
        e.to_string(),
        remote,
        pid,
        status.and_then(|s| s.code()),
        status.and_then(|s| s.signal()),
        timeout,
    )
        .into_pyobject(py)
}

/// Why a worker's life ended, as a short string: `retired:shutdown`,
/// `retired:max_tasks`, `retired:done`, `signal:<n>`, `parent_gone`,
/// `init_failed` or `protocol`.
pub fn exit_reason(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Retired(RetireReason::Shutdown) => "retired:shutdown".into(),
        ExitReason::Retired(RetireReason::MaxTasks) => "retired:max_tasks".into(),
        ExitReason::Retired(RetireReason::Done) => "retired:done".into(),
        ExitReason::Signal(sig) => format!("signal:{sig}"),
        ExitReason::ParentGone => "parent_gone".into(),
        ExitReason::InitFailed => "init_failed".into(),
        ExitReason::ProtocolError => "protocol".into(),
    }
}

/// Why the pool stopped a worker, as a short string.
pub fn stop_cause(cause: &StopCause) -> String {
    match cause {
        StopCause::Retired(RetireReason::Shutdown) => "retired:shutdown".into(),
        StopCause::Retired(RetireReason::MaxTasks) => "retired:max_tasks".into(),
        StopCause::Retired(RetireReason::Done) => "retired:done".into(),
        StopCause::TimedOut => "timed_out".into(),
        StopCause::Cancelled => "cancelled".into(),
        StopCause::Terminated => "terminated".into(),
        StopCause::Killed => "killed".into(),
        StopCause::PoolFailed => "pool_failed".into(),
        StopCause::Protocol(detail) => format!("protocol:{detail}"),
        StopCause::InitFailed(detail) => format!("init_failed:{detail}"),
        StopCause::InitTimeout => "init_timeout".into(),
        _ => "other".into(),
    }
}
