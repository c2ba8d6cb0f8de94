//! The error type: one opaque [`Error`] with predicates, in the style of
//! `std::io::Error` and rayon's `ThreadPoolBuildError`.
//!
//! A task ends in exactly one outcome; every outcome that is not a value is an
//! `Error` here, and the predicates say which one it is.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::wire::{RemoteError, RemoteErrorKind, WireError};

/// How a process ended, as its parent saw it.
///
/// Caveat: a program that ignores `SIGCHLD` (`SIG_IGN`) has the kernel reap
/// its children itself, keeping no status: the pool still sees each child
/// end, and reports `Code(-1)` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The signal, if it was killed by one.
    pub fn signal(&self) -> Option<i32> {
        match self {
            ExitStatus::Signal(s) => Some(*s),
            ExitStatus::Code(_) => None,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s} ({})", signal_name(*s)),
        }
    }
}

/// The conventional name of a signal number (`SIGKILL` for 9).
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "signal",
    }
}

/// What went wrong. Match on it through [`Error::kind`], or use the predicates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task panicked (Rust) or raised (Python) inside the worker; the worker lives on.
    #[error("{}", describe_remote(.0))]
    Remote(RemoteError),
    /// The worker running the task died: it crashed, aborted, was killed, or exited.
    #[error("worker {pid} died while running the task ({status})")]
    Crashed {
        /// The worker's process id.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
    },
    /// The worker's resident memory passed the pool's hard limit while it ran
    /// the task; the worker was stopped (SIGTERM, grace, SIGKILL), and a pool
    /// starts another.
    #[error("worker {pid} used {rss} bytes of memory, over the limit of {limit} bytes; it was stopped")]
    MemoryExceeded {
        /// The worker's process id.
        pid: i32,
        /// The limit, in bytes.
        limit: u64,
        /// The resident set size seen, in bytes.
        rss: u64,
    },
    /// The task ran past its timeout; its worker is stopped (a pool starts
    /// another).
    #[error("task timed out after {after:?}; its worker is being stopped")]
    TimedOut {
        /// The timeout that was exceeded.
        after: Duration,
    },
    /// The task was cancelled before it finished.
    #[error("task was cancelled")]
    Cancelled,
    /// The worker broke the protocol (sent a malformed frame); it was killed.
    #[error("worker {pid} broke the protocol and was killed: {detail}")]
    Protocol {
        /// The worker's process id.
        pid: i32,
        /// What was wrong.
        detail: String,
    },
    /// The pool failed as a whole (restart intensity exceeded, or it could not start workers).
    #[error("the pool failed: {reason}")]
    PoolFailed {
        /// Why.
        reason: String,
    },
    /// The pool is shut down or shutting down and takes no new tasks.
    #[error("the pool is shut down and takes no new tasks")]
    PoolClosed,
    /// Arguments or a result could not be encoded or decoded.
    #[error("could not encode or decode task data: {0}")]
    Codec(String),
    /// A task was refused before it was queued (e.g. larger than the frame limit).
    #[error("task rejected: {0}")]
    Rejected(String),
    /// A wait with a timeout ran out; the task goes on.
    #[error("timed out waiting for the task (it goes on)")]
    WaitTimedOut,
    /// The outcome was already taken by an earlier join.
    #[error("the task's outcome was already taken")]
    AlreadyJoined,
    /// The task's result came with a shared segment this process could not
    /// receive: it had as many open files as its limit (`RLIMIT_NOFILE`)
    /// allows. The value is lost; the worker and the other tasks go on.
    #[error(
        "the task's result came with a shared segment this process could not receive: it has too many open files \
         (its limit, `ulimit -n`, is reached); the worker goes on"
    )]
    SegmentLost,
    /// An operating-system call failed.
    #[error(transparent)]
    Io(io::Error),
    /// Configuration was invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The error type of warden.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error {
    kind: ErrorKind,
}

fn describe_remote(r: &RemoteError) -> String {
    match r.kind {
        RemoteErrorKind::Panicked => format!("task panicked: {}", r.message),
        RemoteErrorKind::Interrupted => format!("task interrupted: {}", r.message),
        RemoteErrorKind::Codec => format!("task could not decode or encode its data: {}", r.message),
        RemoteErrorKind::Raised => format!("task raised {r}"),
        RemoteErrorKind::Setup => format!("the worker could not load the program: {r}"),
    }
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error { kind }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Takes the kind out of the error.
    pub fn into_kind(self) -> ErrorKind {
        self.kind
    }

    /// The worker running the task died (crash, abort, segfault, kill), or
    /// was stopped for passing the memory limit ([`Error::is_memory_exceeded`]).
    pub fn is_crash(&self) -> bool {
        matches!(self.kind, ErrorKind::Crashed { .. } | ErrorKind::MemoryExceeded { .. })
    }

    /// The worker passed the pool's hard memory limit while running the task.
    pub fn is_memory_exceeded(&self) -> bool {
        matches!(self.kind, ErrorKind::MemoryExceeded { .. })
    }

    /// The task ran past its timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, ErrorKind::TimedOut { .. })
    }

    /// The task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.kind, ErrorKind::Cancelled)
    }

    /// The task panicked in the worker.
    pub fn is_panic(&self) -> bool {
        matches!(&self.kind, ErrorKind::Remote(r) if r.kind == RemoteErrorKind::Panicked)
    }

    /// The task raised or panicked in the worker (the worker lives on).
    pub fn is_remote(&self) -> bool {
        matches!(self.kind, ErrorKind::Remote(_))
    }

    /// The worker broke the protocol.
    pub fn is_protocol(&self) -> bool {
        matches!(self.kind, ErrorKind::Protocol { .. })
    }

    /// The pool failed as a whole.
    pub fn is_pool_failed(&self) -> bool {
        matches!(self.kind, ErrorKind::PoolFailed { .. })
    }

    /// The pool takes no new tasks.
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, ErrorKind::PoolClosed)
    }

    /// A join with a timeout ran out before the task finished.
    pub fn is_wait_timeout(&self) -> bool {
        matches!(self.kind, ErrorKind::WaitTimedOut)
    }

    /// The remote panic message, if the task panicked.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.kind {
            ErrorKind::Remote(r) if r.kind == RemoteErrorKind::Panicked => Some(&r.message),
            _ => None,
        }
    }

    /// The remote error, if the task failed inside the worker.
    pub fn remote(&self) -> Option<&RemoteError> {
        match &self.kind {
            ErrorKind::Remote(r) => Some(r),
            _ => None,
        }
    }

    /// How the worker ended, if it crashed.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match &self.kind {
            ErrorKind::Crashed { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The signal that killed the worker, if it crashed by one.
    pub fn signal(&self) -> Option<i32> {
        self.exit_status().and_then(|s| s.signal())
    }

    pub(crate) fn closed() -> Self {
        Error::new(ErrorKind::PoolClosed)
    }

    pub(crate) fn cancelled() -> Self {
        Error::new(ErrorKind::Cancelled)
    }

    pub(crate) fn codec(e: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Codec(e.to_string()))
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config(msg.into()))
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::new(ErrorKind::Io(e))
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        Error::new(ErrorKind::Rejected(e.to_string()))
    }
}

/// Shorthand for results with warden's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
