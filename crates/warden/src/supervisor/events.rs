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
    /// A worker started running a task (it was sent to an idle worker, or the
    /// task before it in that worker's pipeline finished).
    TaskStarted {
        /// The task's id.
        task: u64,
        /// The worker's process id.
        pid: i32,
    },
    /// A task reported started went back to the queue: its worker said
    /// goodbye before it took the task up (a stop signal came between two
    /// tasks). It starts again, on another worker, with a new `TaskStarted`.
    TaskRequeued {
        /// The task's id.
        task: u64,
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
    /// The pool's zygote is parked, ready to fork workers.
    ZygoteReady {
        /// Its process id.
        pid: i32,
    },
    /// The pool's zygote ended and was reaped. Unless the pool ended it
    /// (`intended`), that counts toward the restart intensity and a new
    /// zygote is started; workers start by exec meanwhile.
    ZygoteExited {
        /// Its process id.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
        /// Whether the pool ended it.
        intended: bool,
    },
    /// The zygote cannot fork (see the zygote's caveats: a thread, clone
    /// refused); the pool starts its workers by exec from now on.
    ZygoteRefused {
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
    /// Its resident memory passed the pool's hard limit while it ran a task.
    MemoryExceeded {
        /// The limit, in bytes.
        limit: u64,
        /// The resident set size seen, in bytes.
        rss: u64,
    },
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
                | StopCause::MemoryExceeded { .. }
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
    /// Whether the pool did not mean to end it (a crash, a failed start).
    pub crashed: bool,
    /// Whether it counted toward the restart intensity: a crash no task
    /// explains (one during a task is that task's outcome instead).
    pub counted: bool,
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
