//! The callers' side of the supervisor: tasks with their one-shot replies,
//! the commands callers send, and the state they share with the supervisor
//! thread (the command channel and its waker, whether the pool accepts work,
//! why it failed, and whether the supervisor has finished).

use crate::panics::lock;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use mio::Waker;

use crate::error::Error;

use super::WorkerSnapshot;

/// What a task returned: its encoded value, and the shared segment the worker
/// passed with it, if any (the front end's business; see
/// [`crate::frontend::wire::FLAG_SEGMENT`]). The receiver owns the descriptor.
#[derive(Debug)]
pub struct Output {
    /// The encoded value.
    pub bytes: Vec<u8>,
    /// The segment descriptor that came with it.
    pub segment: Option<OwnedFd>,
}

/// Delivers a task's outcome; called exactly once, on the supervisor thread.
pub type Reply = Box<dyn FnOnce(Result<Output, Error>) + Send>;

/// A queued or running task.
pub(crate) struct Task {
    pub id: u64,
    pub payload: Vec<u8>,
    /// The call's shared segment, passed to the worker with the task's frame.
    /// Held until the task is done, so that a task requeued after a crash
    /// can be sent again; dropped (closed) with the task. Shared with the
    /// worker's outgoing buffer until the frame is written, so queueing it
    /// takes no descriptor of its own (a process short of them would fail
    /// the task there).
    pub segment: Option<Arc<OwnedFd>>,
    pub timeout: Option<Duration>,
    pub(super) reply: Option<Reply>,
    /// Callers waiting to learn whether a cancel of this task, sent ahead to
    /// a worker, lands: told `true` if the worker skips it (it never runs),
    /// `false` if it had taken it up. Told with the outcome otherwise.
    pub(super) cancels: Vec<SyncSender<Option<bool>>>,
}

impl Task {
    pub(crate) fn new(
        id: u64,
        payload: Vec<u8>,
        segment: Option<OwnedFd>,
        timeout: Option<Duration>,
        reply: Reply,
    ) -> Self {
        Task { id, payload, segment: segment.map(Arc::new), timeout, reply: Some(reply), cancels: Vec::new() }
    }

    pub(super) fn deliver(&mut self, outcome: Result<Output, Error>) {
        if let Some(reply) = self.reply.take() {
            let cancelled = outcome.as_ref().is_err_and(Error::is_cancelled);
            self.answer_cancels(cancelled);
            if cancelled {
                note_cancelled(self.id);
            }
            reply(outcome);
        }
    }

    /// Tells the callers waiting on a cancel of this task whether it landed.
    pub(super) fn answer_cancels(&mut self, cancelled: bool) {
        for waiter in self.cancels.drain(..) {
            let _ = waiter.send(Some(cancelled));
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

/// How many of the tasks last given their outcome cancelled are remembered
/// (see [`cancelled_lately`]).
const CANCELLED_KEPT: usize = 4096;

thread_local! {
    /// The ids of the tasks this thread last gave their outcome cancelled,
    /// oldest first. Outcomes are delivered on the pool's supervisor thread,
    /// which runs that one pool's supervisor and nothing else, so these are
    /// that pool's task ids.
    static CANCELLED_LATELY: RefCell<VecDeque<u64>> = const { RefCell::new(VecDeque::new()) };
}

fn note_cancelled(id: u64) {
    CANCELLED_LATELY.with_borrow_mut(|ids| {
        if ids.len() == CANCELLED_KEPT {
            ids.pop_front();
        }
        ids.push_back(id);
    });
}

/// Whether task `id` is one of the last [`CANCELLED_KEPT`] this supervisor
/// gave their outcome cancelled. Asked when a cancel finds no task left to
/// cancel: one that another caller's cancel (or a shutdown's) ended a moment
/// before is cancelled, and the cancel says so, as a cancel of a cancelled
/// future does, instead of `false`, which means "it ran".
pub(super) fn cancelled_lately(id: u64) -> bool {
    CANCELLED_LATELY.with_borrow(|ids| ids.iter().rev().any(|&seen| seen == id))
}

/// Requests to the supervisor.
pub(crate) enum Command {
    Submit(Task),
    /// Cancel a task; `reply` (if any) gets whether it was (after `None`
    /// while a worker is asked: see `Supervisor::cancel`).
    Cancel {
        id: u64,
        running_too: bool,
        reply: Option<SyncSender<Option<bool>>>,
    },
    CancelQueued {
        reply: SyncSender<Vec<u64>>,
    },
    Close {
        drain: bool,
        deadline: Option<Instant>,
    },
    Terminate,
    Kill,
    Snapshot {
        reply: SyncSender<Vec<WorkerSnapshot>>,
    },
}

/// This process's id, kept in step across `fork()` by a `pthread_atfork`
/// handler, so that telling a pool's own process from a forked copy of it
/// costs an atomic load instead of a system call on every task.
static PID: AtomicU32 = AtomicU32::new(0);

/// Whether the handler that keeps [`PID`] is registered. Not a `Once`: a
/// fork that copied one mid-call would leave the copy waiting on it for
/// good. Two threads registering at once add the handler twice, which is
/// harmless (it is idempotent); so is a copy made mid-registration
/// registering again.
static PID_KEPT: AtomicBool = AtomicBool::new(false);

extern "C" fn pid_after_fork_in_child() {
    // Async-signal-safe: a system call and an atomic store.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    PID.store(u32::try_from(pid).unwrap_or(0), Ordering::Relaxed);
}

/// This process's id, as [`PID`] keeps it.
///
/// A raw `clone` (the zygote's) runs no `pthread_atfork` handler; the zygote
/// never builds a pool, so a worker it forks finds the id unset here and
/// reads its own.
pub(crate) fn current_pid() -> u32 {
    let pid = PID.load(Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    if !PID_KEPT.load(Ordering::Acquire) {
        // SAFETY: registers a handler that only makes async-signal-safe calls.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(pid_after_fork_in_child)) };
        if rc != 0 {
            tracing::warn!(
                "pthread_atfork failed ({rc}): a forked copy of this process may mistake its pools for its own"
            );
        }
        PID_KEPT.store(true, Ordering::Release);
    }
    // A fork from now on updates the copy's id in the copy; this thread,
    // in this process, stores this process's.
    let pid = std::process::id();
    PID.store(pid, Ordering::Relaxed);
    pid
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
    /// Queued tasks callers cancel without asking the supervisor (see
    /// `queue.rs`).
    pub(super) cancels: super::queue::CancelBook,
    /// The shutdown ladder's progress, as callers drive it.
    pub stop: Mutex<StopPlan>,
    /// The process that built the pool: only its supervisor thread serves it.
    pub owner: u32,
    /// The supervisor's thread, set as it starts: a caller on it (an
    /// `on_event` callback, a task's reply) cannot wait for the pool.
    pub(super) thread: OnceLock<ThreadId>,
}

/// Where a pool's shutdown ladder stands (see [`crate::Pool::stop`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StopPlan {
    /// The earliest deadline asked for: at it, what still runs is terminated.
    pub cutoff: Option<Instant>,
    /// When a caller escalated to SIGKILL.
    pub killed_at: Option<Instant>,
    /// The end of the last freeze the cutoff was moved out for: callers
    /// waiting together each see the same freeze, which counts once.
    pub frozen_to: Option<Instant>,
}

impl SupervisorLink {
    /// Whether this is a forked copy of the pool's process, where the pool is
    /// a copy of memory that no supervisor thread serves: its workers belong
    /// to the original. Checked before any lock, which a thread that does not
    /// exist here may have held when the copy was made.
    pub fn foreign(&self) -> bool {
        current_pid() != self.owner
    }

    /// The error a forked copy of the pool's process gets from the pool.
    pub fn foreign_error(&self) -> Error {
        let reason = format!(
            "this pool belongs to process {}; a forked copy of that process cannot use it (start a pool of its own)",
            self.owner
        );
        Error::new(crate::error::ErrorKind::PoolFailed { reason })
    }

    /// Sends a command; gives it back if the supervisor is gone (or, in a
    /// forked copy of the pool's process, not there).
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        if self.foreign() {
            return Err(cmd);
        }
        self.tx.send(cmd).map_err(|e| e.0)?;
        self.wake();
        Ok(())
    }

    /// Wakes the supervisor, unless a wake-up is on its way already.
    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            if let Some(waker) = lock(&self.waker).as_ref() {
                if let Err(e) = waker.wake() {
                    tracing::error!("cannot wake the supervisor: {e}");
                }
            }
        }
    }

    /// Waits until the supervisor has finished; `false` if the timeout ran out
    /// (at once in a forked copy of the pool's process: it never finishes there).
    pub fn wait_done(&self, timeout: Option<Duration>) -> bool {
        if self.foreign() {
            return false;
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
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

    /// Whether the caller is this pool's supervisor thread (an `on_event`
    /// callback, a task's reply, or what they drop): it cannot wait for the
    /// pool, whose shutdown it carries out only once the caller returns.
    pub fn on_supervisor_thread(&self) -> bool {
        self.thread.get().is_some_and(|id| *id == std::thread::current().id())
    }

    pub fn is_done(&self) -> bool {
        lock(&self.done).is_some()
    }

    /// Whether the supervisor finished no later than `cutoff` (any time, if none).
    pub fn finished_by(&self, cutoff: Option<Instant>) -> bool {
        lock(&self.done).is_some_and(|t| cutoff.map_or(true, |c| t <= c))
    }

    /// Cancels task `id` at once if it has not left the queue (the
    /// supervisor is woken to give it its outcome); `false` if the
    /// supervisor must be asked.
    pub fn cancel_unclaimed(&self, id: u64) -> bool {
        if self.foreign() {
            return false;
        }
        match self.cancels.cancel_unclaimed(id, self.next_task.load(Ordering::Acquire)) {
            None => false,
            Some(wake) => {
                if wake {
                    self.wake();
                }
                true
            }
        }
    }

    pub(super) fn set_done(&self) {
        self.cancels.close();
        // Nothing can wake a finished supervisor: close the eventfd now.
        drop(lock(&self.waker).take());
        *lock(&self.done) = Some(Instant::now());
        self.done_cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

impl Drop for SupervisorLink {
    /// In a forked copy of the pool's process, the waker's eventfd is a copy
    /// made by the fork, whose number the copy may have closed and reused
    /// since (a daemon closes every descriptor it did not open, then opens
    /// its own): it is left as it is, never closed here.
    fn drop(&mut self) {
        if self.foreign() {
            let waker = match self.waker.get_mut() {
                Ok(waker) => waker.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            std::mem::forget(waker);
        }
    }
}
