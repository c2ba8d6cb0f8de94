//! The supervisor: one event-loop thread per pool that alone touches processes.
//!
//! It owns every worker's socket and pidfd, the task queue and all timers;
//! callers talk to it through a channel and a [`mio::Waker`]. Nothing else
//! reads or writes a worker's channel, signals a worker or reaps one, and no
//! lock is held across I/O (the only locks are the callers' result slots, taken
//! for a moment to deliver an outcome).
//!
//! # Worker lifecycle (parent's view)
//!
//! ```text
//! Starting ─hello─► Initializing ─ready─► Ready (idle ⇄ busy)
//!    │                   │                  │ retire (shutdown, max tasks)
//!    │                   │                  ▼
//!    │                   │              Retiring ──deadline──► Stopping (SIGTERM)
//!    │                   │                                          │ deadline
//!    └── init timeout ───┴── task timeout / cancel / terminate ────►│
//!                                                                   ▼
//!                                                          Killed (SIGKILL) ─► reaped
//! ```
//!
//! Whatever the phase, when the pidfd says the process exited it is reaped,
//! its remaining frames are read, and its in-flight task gets exactly one
//! outcome: the result it sent, or the reason it was stopped (timed out,
//! cancelled), or a crash with its exit status. Tasks it had been sent but not
//! started go back to the front of the queue.
//!
//! # Caveats
//!
//! * A task is only ever running on one worker, but with `prefetch > 1` a
//!   worker may have been sent tasks it has not started. Cancelling such a task
//!   sends `Cancel`; if the worker starts it anyway (the cancel crossed it), the
//!   worker is stopped like for any running task that is cancelled.
//! * A process stuck in uninterruptible sleep cannot be reaped even after
//!   SIGKILL; after a few seconds the supervisor logs it and lets it go.

mod command;
mod config;
mod events;
mod link;
mod process;
mod protocol;
mod reap;
mod restart;
mod schedule;
mod timers;
mod worker;

#[cfg(test)]
mod tests;

use crate::panics::lock;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use mio::{Events, Poll, Token, Waker};

pub(crate) use config::Config;
pub use events::{EventSink, LifecycleEvent, StopCause, WorkerEnd, WorkerSnapshot};
pub use link::Reply;
pub(crate) use link::{Command, StopPlan, SupervisorLink, Task};
use restart::RestartIntensity;
use worker::Worker;
pub(crate) use worker::KILL_WAIT;

const WAKER: Token = Token(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolPhase {
    Running,
    Closing { drain: bool },
    Terminating,
    Failed,
}

pub(crate) struct Supervisor {
    poll: Poll,
    cfg: Arc<Config>,
    shared: Arc<SupervisorLink>,
    rx: Receiver<Command>,
    workers: HashMap<u64, Worker>,
    next_worker: u64,
    queue: VecDeque<Task>,
    phase: PoolPhase,
    crashes: RestartIntensity,
    close_deadline: Option<Instant>,
    spawn_retry_at: Option<Instant>,
    spawned: u64,
    pass_fds: Vec<RawFd>,
}

/// Creates the channel, waker and poller for a pool; the supervisor runs on
/// the thread that calls [`Supervisor::run`].
pub(crate) fn create(cfg: Config) -> std::io::Result<(Supervisor, Arc<SupervisorLink>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(SupervisorLink {
        tx,
        waker,
        wake_pending: AtomicBool::new(false),
        accepting: AtomicBool::new(true),
        failure: Mutex::new(None),
        done: Mutex::new(None),
        done_cv: Condvar::new(),
        next_task: AtomicU64::new(1),
        stop: Mutex::new(StopPlan::default()),
    });
    let pass_fds = cfg.pass_fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let crashes = RestartIntensity::new(cfg.restart_limit, cfg.restart_window);
    let sup = Supervisor {
        poll,
        cfg: Arc::new(cfg),
        shared: Arc::clone(&shared),
        rx,
        workers: HashMap::new(),
        next_worker: 1,
        queue: VecDeque::new(),
        phase: PoolPhase::Running,
        crashes,
        close_deadline: None,
        spawn_retry_at: None,
        spawned: 0,
        pass_fds,
    };
    Ok((sup, shared))
}

fn sock_token(id: u64) -> Token {
    Token((id as usize) * 2 + 2)
}

fn pidfd_token(id: u64) -> Token {
    Token((id as usize) * 2 + 3)
}

impl Supervisor {
    /// Runs the event loop until the pool has shut down and every worker is reaped.
    pub(crate) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.event_loop()));
        if let Err(p) = result {
            let msg = crate::panics::panic_text(&*p);
            tracing::error!("warden supervisor panicked: {msg}");
            *lock(&shared.failure) = Some(format!("supervisor panicked: {msg}"));
            shared.accepting.store(false, Ordering::SeqCst);
            // `self` was moved into the closure and dropped during unwinding:
            // every Worker's Drop killed and reaped its process.
        }
        shared.set_done();
    }

    fn event_loop(&mut self) {
        let mut events = Events::with_capacity(256);
        self.ensure_workers(Instant::now());
        loop {
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.fail(format!("the supervisor's poll failed: {e}"));
                }
            }
            for event in events.iter() {
                let token = event.token();
                if token == WAKER {
                    self.shared.wake_pending.store(false, Ordering::Release);
                    continue;
                }
                let id = ((token.0 - 2) / 2) as u64;
                if token == sock_token(id) {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.read_worker(id);
                    }
                    if event.is_writable() {
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.flush();
                        }
                    }
                } else {
                    self.reap(id);
                }
            }
            self.drain_commands();
            let now = Instant::now();
            self.check_timers(now);
            self.ensure_workers(now);
            self.dispatch();
            self.retire_idle();
            if self.phase != PoolPhase::Running && self.workers.is_empty() && self.queue.is_empty() {
                break;
            }
        }
        tracing::debug!(pool = %self.cfg.name, "supervisor finished");
    }

    fn emit(&self, event: LifecycleEvent) {
        if let Some(sink) = &self.cfg.on_event {
            sink(&event);
        }
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.workers
            .values()
            .filter_map(Worker::next_deadline)
            .chain(self.close_deadline)
            .chain(self.spawn_retry_at)
            .min()
    }
}
