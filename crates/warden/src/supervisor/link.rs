//! The callers' side of the supervisor: tasks with their one-shot replies,
//! the commands callers send, and the state they share with the supervisor
//! thread (the command channel and its waker, whether the pool accepts work,
//! why it failed, and whether the supervisor has finished).

use crate::panics::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::Waker;

use crate::error::Error;

use super::WorkerSnapshot;

/// Delivers a task's outcome; called exactly once, on the supervisor thread.
pub type Reply = Box<dyn FnOnce(Result<Vec<u8>, Error>) + Send>;

/// A queued or running task.
pub(crate) struct Task {
    pub id: u64,
    pub payload: Vec<u8>,
    pub timeout: Option<Duration>,
    pub(super) reply: Option<Reply>,
}

impl Task {
    pub(crate) fn new(id: u64, payload: Vec<u8>, timeout: Option<Duration>, reply: Reply) -> Self {
        Task { id, payload, timeout, reply: Some(reply) }
    }

    pub(super) fn deliver(&mut self, outcome: Result<Vec<u8>, Error>) {
        if let Some(reply) = self.reply.take() {
            reply(outcome);
        }
    }

    pub(super) fn delivered(&self) -> bool {
        self.reply.is_none()
    }
}

impl Drop for Task {
    /// The last line of defence for "exactly one outcome": a task dropped
    /// without one (the pool went away) is told so.
    fn drop(&mut self) {
        self.deliver(Err(Error::closed()));
    }
}

/// Requests to the supervisor.
pub(crate) enum Command {
    Submit(Task),
    Cancel { id: u64, running_too: bool, reply: SyncSender<bool> },
    Close { drain: bool, deadline: Option<Instant> },
    Terminate,
    Kill,
    Snapshot { reply: SyncSender<Vec<WorkerSnapshot>> },
}

/// What callers share with the supervisor.
pub(crate) struct SupervisorLink {
    pub(super) tx: Sender<Command>,
    /// Dropped (its eventfd closed) by the supervisor as it finishes, so that
    /// a joined pool holds no fd even while its handle lives on.
    pub(super) waker: Mutex<Option<Waker>>,
    pub(super) wake_pending: AtomicBool,
    pub accepting: AtomicBool,
    pub failure: Mutex<Option<String>>,
    /// When the supervisor finished (every worker reaped), once it has.
    pub(super) done: Mutex<Option<Instant>>,
    pub(super) done_cv: Condvar,
    pub next_task: AtomicU64,
    /// The shutdown ladder's progress, as callers drive it.
    pub stop: Mutex<StopPlan>,
}

/// Where a pool's shutdown ladder stands (see [`crate::Pool::stop`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StopPlan {
    /// The earliest deadline asked for: at it, what still runs is terminated.
    pub cutoff: Option<Instant>,
    /// When a caller escalated to SIGKILL.
    pub killed_at: Option<Instant>,
}

impl SupervisorLink {
    /// Sends a command; gives it back if the supervisor is gone.
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        self.tx.send(cmd).map_err(|e| e.0)?;
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            if let Some(waker) = lock(&self.waker).as_ref() {
                if let Err(e) = waker.wake() {
                    tracing::error!("cannot wake the supervisor: {e}");
                }
            }
        }
        Ok(())
    }

    /// Waits until the supervisor has finished; `false` if the timeout ran out.
    pub fn wait_done(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut done = lock(&self.done);
        while done.is_none() {
            match deadline {
                None => done = self.done_cv.wait(done).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    done = self.done_cv.wait_timeout(done, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        }
        true
    }

    pub fn is_done(&self) -> bool {
        lock(&self.done).is_some()
    }

    /// Whether the supervisor finished no later than `cutoff` (any time, if none).
    pub fn finished_by(&self, cutoff: Option<Instant>) -> bool {
        lock(&self.done).is_some_and(|t| cutoff.map_or(true, |c| t <= c))
    }

    pub(super) fn set_done(&self) {
        // Nothing can wake a finished supervisor: close the eventfd now.
        drop(lock(&self.waker).take());
        *lock(&self.done) = Some(Instant::now());
        self.done_cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}
