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
//!    │                   │                  │ retire (shutdown, max tasks, max memory)
//!    │                   │                  ▼
//!    │                   │              Retiring ──deadline──► Stopping (SIGTERM)
//!    │                   │                                          │ deadline
//!    └── init timeout ───┴── task timeout / cancel / memory / terminate ►│
//!                                                                   ▼
//!                                                          Killed (SIGKILL) ─► reaped
//! ```
//!
//! Whatever the phase, when the pidfd says the process exited it is reaped,
//! its remaining frames are read, and its in-flight task gets exactly one
//! outcome: the result it sent, or the reason it was stopped (timed out,
//! cancelled, over its memory limit), or a crash with its exit status. Tasks
//! it had been sent but not started go back to the front of the queue. A
//! worker that ended without saying goodbye goes to the pool's
//! `on_worker_lost` thread with the record it left.
//!
//! # Caveats
//!
//! * A task is only ever running on one worker, but with `prefetch > 1` a
//!   worker may have been sent tasks it has not started. Cancelling such a task
//!   sends `Cancel`; if the worker starts it anyway (the cancel crossed it), the
//!   worker is stopped like for any running task that is cancelled.
//! * A process stuck in uninterruptible sleep cannot be reaped even after
//!   SIGKILL; after a few seconds the supervisor logs it and lets it go.
//! * Restart intensity (`restart.rs`) counts only exits no task explains: a
//!   worker that dies while running a task fails that task and is not counted.
//! * If polling itself fails, the pool fails, and the loop finds exits by
//!   asking each worker's pidfd every 20 ms until all are reaped.
//! * After a panic of the loop, every worker is SIGKILLed first and all are
//!   reaped against one deadline.

mod command;
mod config;
mod events;
mod leftovers;
mod link;
mod memory;
mod pace;
mod process;
mod protocol;
mod queue;
mod reap;
mod restart;
mod schedule;
mod timers;
mod worker;
mod zygote;

#[cfg(test)]
mod tests;

use crate::panics::lock;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};

pub(crate) use config::Config;
pub use events::{EventSink, LifecycleEvent, StopCause, WorkerEnd, WorkerSnapshot};
pub(crate) use link::{current_pid, Command, StopPlan, SupervisorLink, Task};
pub use link::{Output, Reply};
pub use pace::fds_scarce;
use restart::RestartIntensity;
use worker::Worker;
pub(crate) use worker::{KILL_WAIT, WORKER_ANSWER_WAIT};
use zygote::{ZygoteSlot, ZYGOTE_CONTROL, ZYGOTE_PIDFD};

const WAKER: Token = Token(0);

/// How long the loop waits before polling again after the poll itself failed.
const POLL_RETRY: Duration = Duration::from_millis(20);

/// The longest the loop waits for an event with nothing due: an idle pool
/// looks at its poller this often.
const POLL_MAX_WAIT: Duration = Duration::from_secs(2);

/// How often the loop looks for the exit of a worker whose pidfd the program
/// closed (nothing wakes it for that exit).
const BY_PID_CHECK: Duration = Duration::from_millis(50);

/// How much later than asked a poll may return before the supervisor takes
/// it that it was not running meanwhile (frozen with its workers by a
/// cgroup freezer, `docker pause`, or stopped): the workers' grace periods
/// and start deadlines are then pushed out by the lateness (see
/// [`Supervisor::not_running_for`]).
pub(crate) const NOT_RUNNING_GAP: Duration = Duration::from_secs(1);

/// The longest wait while a grace period or start deadline runs. The part
/// of a wait before a freeze began is not known, and counts as time run:
/// a deadline moves out by at most this much less than the freeze lasted.
/// Never by more: each wait brings a deadline closer by what it was asked
/// to wait, so a program stopped again and again while its workers run
/// still reaches its deadlines.
pub(crate) const FREEZE_STEP: Duration = Duration::from_millis(500);

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
    queue: queue::TaskQueue,
    phase: PoolPhase,
    crashes: RestartIntensity,
    close_deadline: Option<Instant>,
    spawn_retry_at: Option<Instant>,
    /// Since when the system has refused starts for want of processes or
    /// memory, and the delay before the next try (see `schedule.rs`).
    shortage: Option<(Instant, Duration)>,
    /// When a shortage was last said on stderr (see `schedule.rs`).
    shortage_said: Option<Instant>,
    spawned: u64,
    pass_fds: Vec<RawFd>,
    zygote: ZygoteSlot,
    /// The pool's first workers wait for its first zygote.
    zygote_first: bool,
    /// Zygotes are prepared from the fallback payload (the first refused).
    zygote_fallback: bool,
    /// Why the pool killed its zygote (not ready in time, a broken
    /// answer) and whether it had been ready, for the failure its reaping
    /// records.
    zygote_killed: Option<(String, bool)>,
    /// When busy workers' memory is next sampled (with a hard limit only).
    memory_sample_at: Option<Instant>,
    /// Reading from workers paused: this process is short of descriptors.
    pause: Option<pace::Pause>,
    /// How long the next pause may last with its descriptor still open.
    pause_cap: std::time::Duration,
    /// Told once the pool's first processes are started (see [`Supervisor::started`]).
    started: Option<std::sync::mpsc::Sender<()>>,
    /// How long tasks run, on average (recent ones weigh most): tasks sent
    /// ahead only pay off for short ones (see `schedule.rs`).
    task_time: schedule::TaskTime,
    /// A worker of this pool has been ready (before, `EMFILE` with no worker
    /// started fails the pool: see [`Supervisor::ensure_workers`]).
    served: bool,
    /// Since when starts have failed (other than for a shortage) with no
    /// worker serving; cleared when one is ready.
    unserved_since: Option<Instant>,
    /// Workers that could not load the program, before any was ready: the
    /// second fails the pool (one may be a passing fault).
    setup_failures: u32,
    /// Until when nothing is sent ahead: callers are cancelling tasks (see
    /// [`schedule::CANCEL_CALM`]).
    cancelling_until: Option<Instant>,
    /// Dead workers not yet reaped: their groups' grace period runs (see
    /// `leftovers.rs`).
    lingering: Vec<leftovers::Lingering>,
}

/// Creates the channel, waker and poller for a pool; the supervisor runs on
/// the thread that calls [`Supervisor::run`].
pub(crate) fn create(mut cfg: Config) -> std::io::Result<(Supervisor, Arc<SupervisorLink>)> {
    if cfg.one_off {
        cfg.command.env.push((crate::spawn::ENV_ONE_OFF.into(), "1".into()));
    }
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(SupervisorLink {
        tx,
        waker: Mutex::new(Some(waker)),
        wake_pending: AtomicBool::new(false),
        accepting: AtomicBool::new(true),
        failure: Mutex::new(None),
        done: Mutex::new(None),
        done_cv: Condvar::new(),
        next_task: AtomicU64::new(1),
        cancels: queue::CancelBook::default(),
        stop: Mutex::new(StopPlan::default()),
        owner: link::current_pid(),
        thread: std::sync::OnceLock::new(),
    });
    let pass_fds = cfg.pass_fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let crashes = RestartIntensity::new(cfg.restart_limit, cfg.restart_window);
    // A one-off child is one worker: a zygote would only add a process.
    let with_zygote = cfg.start == crate::pool::StartMethod::Zygote && !cfg.one_off;
    let zygote = if with_zygote { ZygoteSlot::Down { retry_at: Instant::now() } } else { ZygoteSlot::Off };
    let sup = Supervisor {
        poll,
        cfg: Arc::new(cfg),
        shared: Arc::clone(&shared),
        rx,
        workers: HashMap::new(),
        next_worker: 1,
        queue: queue::TaskQueue::default(),
        phase: PoolPhase::Running,
        crashes,
        close_deadline: None,
        spawn_retry_at: None,
        shortage: None,
        shortage_said: None,
        spawned: 0,
        pass_fds,
        zygote,
        zygote_first: with_zygote,
        zygote_fallback: false,
        zygote_killed: None,
        memory_sample_at: None,
        task_time: schedule::TaskTime::default(),
        served: false,
        unserved_since: None,
        setup_failures: 0,
        cancelling_until: None,
        lingering: Vec::new(),
        pause: None,
        pause_cap: pace::FIRST_PAUSE_CAP,
        started: None,
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
        let _ = shared.thread.set(std::thread::current().id());
        let this = &mut self;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.event_loop()));
        if let Err(p) = result {
            let msg = crate::panics::panic_text(&*p);
            crate::panics::drop_payload(p);
            tracing::error!("warden supervisor panicked: {msg}");
            *lock(&shared.failure) = Some(format!("supervisor panicked: {msg}"));
            shared.accepting.store(false, Ordering::SeqCst);
            self.kill_all_now();
        }
        // Sockets, pidfds, the poller and passed fds close here, before anyone
        // waiting for the pool is told it is done.
        drop(self);
        shared.set_done();
    }

    /// Whoever builds the pool waits on the receiver until its first
    /// processes (its zygote, or its workers) are started: they inherit the
    /// environment and the standard streams the caller had when it asked.
    pub(crate) fn started(&mut self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.started = Some(tx);
        rx
    }

    fn event_loop(&mut self) {
        let mut events = Events::with_capacity(256);
        self.ensure_workers(Instant::now());
        if let Some(started) = self.started.take() {
            let _ = started.send(());
        }
        loop {
            // Never wait without limit: a poller whose descriptors the program
            // closed (`os.closerange`) is never woken again, and only a poll
            // of its own finds that out.
            let mut timeout = self
                .next_deadline()
                .map_or(POLL_MAX_WAIT, |d| d.saturating_duration_since(Instant::now()).min(POLL_MAX_WAIT));
            if self.any_watched_by_pid() {
                timeout = timeout.min(BY_PID_CHECK);
            }
            if self.workers.values().any(|w| w.deadline.is_some() || w.unreachable_until.is_some()) {
                timeout = timeout.min(FREEZE_STEP);
            }
            // Only a wait this long that ends with nothing to do looks at the
            // pidfds for closed ones (one system call per worker): never while
            // the pool is busy.
            let long_wait = timeout == POLL_MAX_WAIT;
            let polled = Instant::now();
            let result = self.poll.poll(&mut events, Some(timeout));
            let late = polled.elapsed().saturating_sub(timeout);
            if late > NOT_RUNNING_GAP {
                self.not_running_for(late);
            }
            if let Err(e) = result {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    // Also after this process was stopped (SIGSTOP, Ctrl-Z)
                    // and continued, with no handler involved; the events are
                    // lost, not the readiness. Poll again before looking at
                    // the timers: a result that arrived meanwhile is read
                    // before its task's deadline, long past, is seen.
                    continue;
                }
                let hint = if e.raw_os_error() == Some(libc::EBADF) {
                    " (the pool's descriptors were closed by the program?)"
                } else {
                    ""
                };
                self.fail(format!("the supervisor's poll failed: {e}{hint}"));
                // Nothing tells us about exits while poll fails: look for
                // them ourselves, and wait a little instead of spinning.
                let ids: Vec<u64> = self.workers.keys().copied().collect();
                for id in ids {
                    self.reap(id);
                }
                std::thread::sleep(timeout.min(POLL_RETRY));
            }
            // A worker's channel closed: it may be exiting, and its pidfd
            // may be one the program closed.
            let mut channel_closed = false;
            for event in events.iter() {
                let token = event.token();
                if token == WAKER {
                    self.shared.wake_pending.store(false, Ordering::Release);
                    continue;
                }
                if token == ZYGOTE_PIDFD {
                    self.reap_zygote();
                    continue;
                }
                if token == ZYGOTE_CONTROL {
                    self.zygote_readable();
                    continue;
                }
                let id = ((token.0 - 2) / 2) as u64;
                if token == sock_token(id) {
                    channel_closed |= event.is_read_closed() || event.is_error();
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.read_or_defer(id);
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
            // A worker whose pidfd the program closed wakes no poll as it
            // exits: looked for here.
            self.watch_exits_by_pid((long_wait && events.is_empty()) || channel_closed);
            self.drain_commands();
            let now = Instant::now();
            if self.queue.cancel_marked(&self.shared.cancels) {
                self.cancelling_until = Some(now + schedule::CANCEL_CALM);
            }
            self.check_pause(now);
            self.check_timers(now);
            self.check_zygote_timer(now);
            self.ensure_workers(now);
            self.recall_from_long_tasks(now);
            // Before dispatch, for a task sent ahead that should start
            // before the queue's next; after it, for a worker left idle once
            // the queue ran dry.
            self.give_back();
            self.dispatch();
            // A task just dispatched starts the memory samples' schedule now,
            // not at whatever wakes the loop next.
            self.check_memory(now);
            self.give_back();
            self.retire_idle();
            self.watch_blocked_writes();
            self.check_lingering(Instant::now());
            if self.phase != PoolPhase::Running
                && self.workers.is_empty()
                && self.lingering.is_empty()
                && self.queue.is_empty()
                && self.wanted_workers() == 0
            {
                break;
            }
        }
        self.stop_zygote();
        tracing::debug!(pool = %self.cfg.name, "supervisor finished");
    }

    /// The supervisor was not running for about `gap` (its poll returned
    /// that much later than asked): most likely frozen together with its
    /// workers (a cgroup freezer, `docker pause`), which did not run either.
    /// The time a worker has to start, or to go through its exit path, is
    /// its own running time: those deadlines are pushed out by the gap, so
    /// that a freeze that outlasts a grace period does not SIGKILL the
    /// workers at the thaw, their finalizers cut short. Task timeouts are
    /// the caller's clock, and stay.
    fn not_running_for(&mut self, gap: Duration) {
        tracing::debug!(pool = %self.cfg.name, ?gap, "the supervisor was not running: worker deadlines pushed out");
        for w in self.workers.values_mut() {
            w.deadline = w.deadline.map(|d| d.checked_add(gap).unwrap_or(d));
            w.unreachable_until = w.unreachable_until.map(|d| d.checked_add(gap).unwrap_or(d));
        }
    }

    /// Registers a worker's socket for writability while its outgoing buffer
    /// waits for room, and only then.
    fn watch_blocked_writes(&mut self) {
        let registry = self.poll.registry();
        for (id, w) in self.workers.iter_mut() {
            let blocked = w.write_blocked();
            if blocked == w.write_interest || w.status.is_some() {
                continue;
            }
            let interest = if blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            match registry.reregister(&mut w.sock, sock_token(*id), interest) {
                Ok(()) => w.write_interest = blocked,
                Err(e) => tracing::warn!(pool = %self.cfg.name, worker = id, "cannot watch the channel: {e}"),
            }
        }
    }

    /// Gives `event` to the pool's `on_event` callback. A panic there is
    /// the callback's, not the pool's: logged, and the pool goes on.
    fn emit(&self, event: LifecycleEvent) {
        if let Some(sink) = &self.cfg.on_event {
            let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(&event)));
            if let Err(p) = delivered {
                let msg = crate::panics::panic_text(&*p);
                crate::panics::drop_payload(p);
                tracing::error!(pool = %self.cfg.name, "the on_event callback panicked: {msg}");
                report!("warden: pool {}: the on_event callback panicked: {msg}", self.cfg.name);
            }
        }
    }
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.workers
            .values()
            .filter_map(Worker::next_deadline)
            .chain(self.close_deadline)
            .chain(self.spawn_retry_at)
            .chain(self.zygote_deadline())
            .chain(self.memory_sample_at)
            .chain(self.lingering_deadline())
            .chain(self.pause_deadline())
            .chain(self.workers.values().filter_map(|w| w.recall_at(self.task_time.recall_after())))
            .chain(self.give_back_wait_ends(now))
            .min()
    }
}
