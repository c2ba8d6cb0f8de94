//! What a pool tells the outside world: lifecycle events, why a worker was
//! stopped, how a worker ended, and snapshots of its workers.

use std::sync::Arc;

use crate::error::ExitStatus;
use crate::wire::{ExitPathReport, ExitReason, RetireReason};

/// Receives lifecycle events on the supervisor thread. Must not block.
pub type EventSink = Arc<dyn Fn(&LifecycleEvent) + Send + Sync>;

/// Something that happened in a pool, for logging, demos and tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LifecycleEvent {
    /// A worker process was started.
    WorkerStarted {
        /// The worker's number.
        worker: u64,
        /// Its process id.
        pid: i32,
    },
    /// A worker ran its start hook and takes tasks.
    WorkerReady {
        /// The worker's number.
        worker: u64,
        /// Its process id.
        pid: i32,
    },
    /// A worker could not be started.
    SpawnFailed {
        /// The error.
        error: String,
    },
    /// A task ran past its timeout; its worker is being stopped.
    TaskTimedOut {
        /// The task's id.
        task: u64,
        /// The worker's process id.
        pid: i32,
    },
    /// A worker process ended and was reaped.
    WorkerExited(WorkerEnd),
    /// The pool failed as a whole.
    PoolFailed {
        /// Why.
        reason: String,
    },
}

/// Why the pool stopped a worker, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// Asked to retire.
    Retired(RetireReason),
    /// Its task timed out.
    TimedOut,
    /// Its task was cancelled.
    Cancelled,
    /// The pool was terminated.
    Terminated,
    /// The pool was killed.
    Killed,
    /// The pool failed.
    PoolFailed,
    /// It broke the protocol.
    Protocol(String),
    /// Its start hook failed.
    InitFailed(String),
    /// It did not say hello and ready within the init timeout.
    InitTimeout,
}

impl StopCause {
    /// Whether the pool meant to end the worker (as opposed to a failure of the worker).
    pub(super) fn intended(&self) -> bool {
        matches!(
            self,
            StopCause::Retired(_)
                | StopCause::TimedOut
                | StopCause::Cancelled
                | StopCause::Terminated
                | StopCause::Killed
                | StopCause::PoolFailed
        )
    }
}

/// The end of one worker's life.
#[derive(Debug, Clone)]
pub struct WorkerEnd {
    /// The worker's number.
    pub worker: u64,
    /// Its process id.
    pub pid: i32,
    /// How the process ended.
    pub status: ExitStatus,
    /// Why the pool stopped it, if it did.
    pub cause: Option<StopCause>,
    /// What its exit path reported, if it got that far.
    pub goodbye: Option<(ExitReason, ExitPathReport)>,
    /// Whether this counts as a crash (restart intensity).
    pub crashed: bool,
}

impl WorkerEnd {
    /// Whether the worker's exit hook ran (as reported by the worker itself).
    pub fn hook_ran(&self) -> bool {
        self.goodbye.as_ref().is_some_and(|(_, r)| r.hook_ran)
    }
}

/// A worker as seen in a [`crate::Pool::workers`] snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// The worker's number.
    pub worker: u64,
    /// Its process id.
    pub pid: i32,
    /// Its lifecycle phase.
    pub phase: &'static str,
    /// The task it is running, if any.
    pub running: Option<u64>,
}
