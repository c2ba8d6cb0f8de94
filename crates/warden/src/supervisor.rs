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
//!   SIGKILL; after [`KILL_WAIT`] the supervisor logs it and lets it go.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rustix::process::{Pid, Signal};

use crate::error::{Error, ErrorKind, ExitStatus};
use crate::spawn::{spawn_worker, WorkerCommand};
use crate::wire::{self, ExitReason, FrameReader, HookReport, Message, RemoteError, RetireReason, WireOutcome};

/// How long the supervisor waits for a SIGKILLed process to be reapable.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Delay before trying again after a worker could not be spawned at all.
const SPAWN_RETRY: Duration = Duration::from_millis(100);

const WAKER: Token = Token(0);

/// What a task returned: its encoded value, and the shared segment the worker
/// passed with it, if any (the front end's business; see
/// [`crate::wire::FLAG_SEGMENT`]). The receiver owns the descriptor.
#[derive(Debug)]
pub struct Output {
    /// The encoded value.
    pub bytes: Vec<u8>,
    /// The segment descriptor that came with it.
    pub segment: Option<OwnedFd>,
}

/// Delivers a task's outcome; called exactly once, on the supervisor thread.
pub type Reply = Box<dyn FnOnce(Result<Output, Error>) + Send>;

/// Receives lifecycle events on the supervisor thread. Must not block.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Something that happened in a pool, for logging, demos and tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
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
    WorkerExited(WorkerExit),
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
    fn intended(&self) -> bool {
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
pub struct WorkerExit {
    /// The worker's number.
    pub worker: u64,
    /// Its process id.
    pub pid: i32,
    /// How the process ended.
    pub status: ExitStatus,
    /// Why the pool stopped it, if it did.
    pub cause: Option<StopCause>,
    /// What its exit path reported, if it got that far.
    pub goodbye: Option<(ExitReason, HookReport)>,
    /// Whether this counts as a crash (restart intensity).
    pub crashed: bool,
}

impl WorkerExit {
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

/// Pool settings, fixed at build time.
pub(crate) struct Config {
    pub name: String,
    pub workers: usize,
    pub command: WorkerCommand,
    pub init_payload: Vec<u8>,
    pub pass_fds: Vec<OwnedFd>,
    pub max_tasks_per_child: Option<u64>,
    pub task_timeout: Option<Duration>,
    pub init_timeout: Duration,
    pub grace: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub max_frame: usize,
    pub prefetch: usize,
    pub identity: Option<u64>,
    pub on_event: Option<EventSink>,
    /// A one-off child: one worker, one task, no replacement.
    pub one_off: bool,
}

/// A queued or running task.
pub(crate) struct Task {
    pub id: u64,
    pub payload: Vec<u8>,
    /// The call's shared segment, passed to the worker with the task's frame.
    /// Held until the task is done, so that a task requeued after a crash
    /// can be sent again; dropped (closed) with the task.
    pub segment: Option<OwnedFd>,
    pub timeout: Option<Duration>,
    reply: Option<Reply>,
}

impl Task {
    pub(crate) fn new(
        id: u64,
        payload: Vec<u8>,
        segment: Option<OwnedFd>,
        timeout: Option<Duration>,
        reply: Reply,
    ) -> Self {
        Task { id, payload, segment, timeout, reply: Some(reply) }
    }

    fn deliver(&mut self, outcome: Result<Output, Error>) {
        if let Some(reply) = self.reply.take() {
            reply(outcome);
        }
    }

    fn delivered(&self) -> bool {
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
pub(crate) struct Shared {
    tx: Sender<Command>,
    waker: Waker,
    wake_pending: AtomicBool,
    pub accepting: AtomicBool,
    pub failure: Mutex<Option<String>>,
    done: Mutex<bool>,
    done_cv: Condvar,
    pub next_task: AtomicU64,
}

impl Shared {
    /// Sends a command; gives it back if the supervisor is gone.
    pub fn send(&self, cmd: Command) -> Result<(), Command> {
        self.tx.send(cmd).map_err(|e| e.0)?;
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!("cannot wake the supervisor: {e}");
            }
        }
        Ok(())
    }

    /// Waits until the supervisor has finished; `false` if the timeout ran out.
    pub fn wait_done(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
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
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_done(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.done_cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Initializing,
    Ready,
    Retiring,
    Stopping,
    Killed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Initializing => "initializing",
            Phase::Ready => "ready",
            Phase::Retiring => "retiring",
            Phase::Stopping => "stopping",
            Phase::Killed => "killed",
        }
    }
}

struct InFlight {
    task: Task,
    /// Set when the task became the first in line, i.e. the worker started it.
    started: Option<Instant>,
    deadline: Option<Instant>,
    cancel_requested: bool,
}

struct Worker {
    id: u64,
    pid: Pid,
    pidfd: OwnedFd,
    sock: UnixStream,
    reader: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
    /// Segment descriptors to pass with the frames in `out`: the offset of
    /// the frame's first byte, and a duplicate the worker gets its copy of.
    out_fds: VecDeque<(usize, OwnedFd)>,
    phase: Phase,
    deadline: Option<Instant>,
    inflight: VecDeque<InFlight>,
    assigned: u64,
    cause: Option<StopCause>,
    goodbye: Option<(ExitReason, HookReport)>,
    status: Option<ExitStatus>,
    eof: bool,
}

impl Worker {
    fn raw_pid(&self) -> i32 {
        self.pid.as_raw_nonzero().get()
    }

    fn is_serving(&self) -> bool {
        matches!(self.phase, Phase::Starting | Phase::Initializing | Phase::Ready)
    }

    /// Sends a signal to the worker and everything in its process group. The
    /// group is only signalled while the worker is unreaped, so its id cannot
    /// have been reused.
    fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = rustix::process::kill_process_group(self.pid, sig);
        }
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, sig);
    }

    fn stop(&mut self, cause: StopCause, grace: Duration) {
        self.cause.get_or_insert(cause);
        if matches!(self.phase, Phase::Stopping | Phase::Killed) {
            return;
        }
        self.signal(Signal::TERM);
        self.phase = Phase::Stopping;
        self.deadline = Some(Instant::now() + grace);
    }

    fn kill(&mut self, cause: StopCause) {
        self.cause.get_or_insert(cause);
        if self.phase == Phase::Killed {
            return;
        }
        self.signal(Signal::KILL);
        self.phase = Phase::Killed;
        self.deadline = Some(Instant::now() + KILL_WAIT);
    }

    fn queue(&mut self, msg: &Message<'_>, max_frame: usize) -> Result<(), wire::WireError> {
        wire::encode(msg, &mut self.out, max_frame)
    }

    /// Queues a frame with a segment descriptor riding on its first byte.
    fn queue_with_segment(
        &mut self,
        msg: &Message<'_>,
        segment: Option<BorrowedFd<'_>>,
        max_frame: usize,
    ) -> Result<(), wire::WireError> {
        let Some(segment) = segment else { return self.queue(msg, max_frame) };
        let dup = segment
            .try_clone_to_owned()
            .map_err(|e| wire::WireError::Malformed(format!("cannot duplicate the task's segment: {e}")))?;
        let at = self.out.len();
        wire::encode_frame(msg, &mut self.out, max_frame, true)?;
        self.out_fds.push_back((at, dup));
        Ok(())
    }

    /// Writes as much of the outgoing buffer as the socket takes, each
    /// segment descriptor with the first byte of its frame.
    fn flush(&mut self) {
        while self.out_pos < self.out.len() {
            // Stop at the next frame that carries a descriptor, unless it is this one.
            let here = self.out_fds.front().filter(|(at, _)| *at == self.out_pos).map(|(_, fd)| fd.as_fd());
            let next = self.out_fds.iter().map(|(at, _)| *at).find(|at| *at > self.out_pos);
            let end = next.unwrap_or(self.out.len());
            match wire::send_with_fd(&self.sock, &self.out[self.out_pos..end], here) {
                Ok(n) => {
                    if here.is_some() {
                        self.out_fds.pop_front(); // the worker has its copy now
                    }
                    self.out_pos += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // The worker closed its end; its pidfd will tell us the rest.
                    break;
                }
            }
        }
        self.out.clear();
        self.out_fds.clear();
        self.out_pos = 0;
    }

    fn running(&self) -> Option<&InFlight> {
        self.inflight.front()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let task = self.inflight.front().and_then(|f| if f.task.delivered() { None } else { f.deadline });
        match (self.deadline, task) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A message from a worker, copied out of its read buffer.
enum Incoming {
    Hello { pid: u32, identity: u64 },
    Ready,
    InitFailed(RemoteError),
    Result { id: u64, outcome: Result<Output, Error> },
    Goodbye(ExitReason, HookReport),
    Unexpected(&'static str),
}

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
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    workers: HashMap<u64, Worker>,
    next_worker: u64,
    queue: VecDeque<Task>,
    phase: PoolPhase,
    crashes: VecDeque<Instant>,
    close_deadline: Option<Instant>,
    spawn_retry_at: Option<Instant>,
    spawned: u64,
    pass_fds: Vec<RawFd>,
}

/// Creates the channel, waker and poller for a pool; the supervisor runs on
/// the thread that calls [`Supervisor::run`].
pub(crate) fn create(cfg: Config) -> std::io::Result<(Supervisor, Arc<Shared>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        tx,
        waker,
        wake_pending: AtomicBool::new(false),
        accepting: AtomicBool::new(true),
        failure: Mutex::new(None),
        done: Mutex::new(false),
        done_cv: Condvar::new(),
        next_task: AtomicU64::new(1),
    });
    let pass_fds = cfg.pass_fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let sup = Supervisor {
        poll,
        cfg: Arc::new(cfg),
        shared: Arc::clone(&shared),
        rx,
        workers: HashMap::new(),
        next_worker: 1,
        queue: VecDeque::new(),
        phase: PoolPhase::Running,
        crashes: VecDeque::new(),
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
            let msg = crate::worker::panic_text(&*p);
            tracing::error!("warden supervisor panicked: {msg}");
            *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("supervisor panicked: {msg}"));
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

    fn emit(&self, event: Event) {
        if let Some(sink) = &self.cfg.on_event {
            sink(&event);
        }
    }

    // ---- commands ------------------------------------------------------

    fn drain_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    if self.phase == PoolPhase::Running {
                        self.close(false, Some(Instant::now() + self.cfg.grace));
                    }
                    return;
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(mut task) => match self.phase {
                PoolPhase::Running => self.queue.push_back(task),
                PoolPhase::Failed => task.deliver(Err(self.failed_error())),
                _ => task.deliver(Err(Error::closed())),
            },
            Command::Cancel { id, running_too, reply } => {
                let _ = reply.send(self.cancel(id, running_too));
            }
            Command::Close { drain, deadline } => match self.phase {
                PoolPhase::Running => self.close(drain, deadline),
                PoolPhase::Closing { drain: was_draining } => {
                    // A stricter close on top of an earlier one: stop draining
                    // if asked, and keep the earlier deadline if it is sooner.
                    let deadline = match (self.close_deadline, deadline) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.close(was_draining && drain, deadline);
                }
                PoolPhase::Terminating | PoolPhase::Failed => {}
            },
            Command::Terminate => self.terminate(false),
            Command::Kill => self.terminate(true),
            Command::Snapshot { reply } => {
                let mut snap: Vec<WorkerSnapshot> = self
                    .workers
                    .values()
                    .map(|w| WorkerSnapshot {
                        worker: w.id,
                        pid: w.raw_pid(),
                        phase: w.phase.name(),
                        running: w.running().filter(|f| !f.task.delivered()).map(|f| f.task.id),
                    })
                    .collect();
                snap.sort_by_key(|s| s.worker);
                let _ = reply.send(snap);
            }
        }
    }

    fn cancel(&mut self, id: u64, running_too: bool) -> bool {
        if let Some(pos) = self.queue.iter().position(|t| t.id == id) {
            if let Some(mut task) = self.queue.remove(pos) {
                task.deliver(Err(Error::cancelled()));
            }
            return true;
        }
        if !running_too {
            return false;
        }
        let grace = self.cfg.grace;
        let max_frame = self.cfg.max_frame;
        for w in self.workers.values_mut() {
            let Some(pos) = w.inflight.iter().position(|f| f.task.id == id) else { continue };
            if w.inflight[pos].task.delivered() {
                return false;
            }
            w.inflight[pos].task.deliver(Err(Error::cancelled()));
            if pos == 0 {
                // Running: stop the worker; its exit hook runs.
                w.stop(StopCause::Cancelled, grace);
            } else {
                w.inflight[pos].cancel_requested = true;
                if w.queue(&Message::Cancel { id }, max_frame).is_ok() {
                    w.flush();
                }
            }
            return true;
        }
        false
    }

    fn close(&mut self, drain: bool, deadline: Option<Instant>) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        self.phase = PoolPhase::Closing { drain };
        self.close_deadline = deadline;
        if !drain {
            for mut task in self.queue.drain(..) {
                task.deliver(Err(Error::cancelled()));
            }
        }
    }

    fn terminate(&mut self, kill: bool) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        if self.phase != PoolPhase::Failed {
            self.phase = PoolPhase::Terminating;
        }
        for mut task in self.queue.drain(..) {
            task.deliver(Err(Error::cancelled()));
        }
        let grace = self.cfg.grace;
        for w in self.workers.values_mut() {
            for f in w.inflight.iter_mut() {
                f.task.deliver(Err(Error::cancelled()));
            }
            if kill {
                w.kill(StopCause::Killed);
            } else {
                w.stop(StopCause::Terminated, grace);
            }
        }
    }

    fn failed_error(&self) -> Error {
        let reason = self.shared.failure().unwrap_or_else(|| "unknown".into());
        Error::new(ErrorKind::PoolFailed { reason })
    }

    fn fail(&mut self, reason: String) {
        if self.phase == PoolPhase::Failed {
            return;
        }
        tracing::error!(pool = %self.cfg.name, "pool failed: {reason}");
        *self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        self.shared.accepting.store(false, Ordering::SeqCst);
        self.phase = PoolPhase::Failed;
        let err = || Error::new(ErrorKind::PoolFailed { reason: reason.clone() });
        for mut task in self.queue.drain(..) {
            task.deliver(Err(err()));
        }
        let grace = self.cfg.grace;
        for w in self.workers.values_mut() {
            for f in w.inflight.iter_mut() {
                f.task.deliver(Err(err()));
            }
            w.stop(StopCause::PoolFailed, grace);
        }
        self.emit(Event::PoolFailed { reason });
    }

    // ---- workers -------------------------------------------------------

    fn wanted_workers(&self) -> usize {
        if self.cfg.one_off && self.spawned >= 1 {
            return 0;
        }
        match self.phase {
            PoolPhase::Running => self.cfg.workers,
            PoolPhase::Closing { drain: true } if !self.queue.is_empty() => self.cfg.workers.min(self.queue.len()),
            _ => 0,
        }
    }

    fn ensure_workers(&mut self, now: Instant) {
        if self.spawn_retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.spawn_retry_at = None;
        let want = self.wanted_workers();
        let mut serving = self.workers.values().filter(|w| w.is_serving()).count();
        while serving < want && self.phase != PoolPhase::Failed {
            match self.spawn_one() {
                Ok(()) => serving += 1,
                Err(e) => {
                    let error = format!("cannot start a worker ({}): {e}", self.cfg.command.program.display());
                    tracing::warn!(pool = %self.cfg.name, "{error}");
                    self.emit(Event::SpawnFailed { error: error.clone() });
                    self.note_crash(error);
                    self.spawn_retry_at = Some(now + SPAWN_RETRY);
                    return;
                }
            }
        }
    }

    fn spawn_one(&mut self) -> std::io::Result<()> {
        let spawned = spawn_worker(&self.cfg.command, &self.pass_fds, self.cfg.max_frame)?;
        let id = self.next_worker;
        self.next_worker += 1;
        self.spawned += 1;
        spawned.channel.set_nonblocking(true)?;
        let mut sock = UnixStream::from_std(spawned.channel);
        let registry = self.poll.registry();
        let mut worker = Worker {
            id,
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            sock: {
                registry.register(&mut sock, sock_token(id), Interest::READABLE | Interest::WRITABLE)?;
                sock
            },
            reader: FrameReader::new(self.cfg.max_frame),
            out: Vec::new(),
            out_pos: 0,
            out_fds: VecDeque::new(),
            phase: Phase::Starting,
            deadline: Some(Instant::now() + self.cfg.init_timeout),
            inflight: VecDeque::new(),
            assigned: 0,
            cause: None,
            goodbye: None,
            status: None,
            eof: false,
        };
        let pidfd_raw = worker.pidfd.as_raw_fd();
        if let Err(e) = registry.register(&mut SourceFd(&pidfd_raw), pidfd_token(id), Interest::READABLE) {
            worker.kill(StopCause::Killed);
            return Err(e);
        }
        let pid = worker.raw_pid();
        tracing::debug!(pool = %self.cfg.name, worker = id, pid, "worker started");
        self.workers.insert(id, worker);
        self.emit(Event::WorkerStarted { worker: id, pid });
        Ok(())
    }

    /// Records a crash; fails the pool if the restart intensity is exceeded.
    fn note_crash(&mut self, what: String) {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.duration_since(*t) > self.cfg.restart_window) {
            self.crashes.pop_front();
        }
        if self.crashes.len() > self.cfg.restart_limit as usize {
            let n = self.crashes.len();
            let window = self.cfg.restart_window;
            self.fail(format!(
                "{n} worker failures within {window:?} exceed the restart limit of {}; last: {what}",
                self.cfg.restart_limit
            ));
        }
    }

    fn read_worker(&mut self, id: u64) {
        loop {
            let Some(w) = self.workers.get_mut(&id) else { return };
            if w.eof {
                return;
            }
            match w.reader.fill_from_socket(&w.sock) {
                Ok(0) => {
                    w.eof = true;
                    let truncated = w.reader.check_clean_eof().err();
                    self.process_frames(id);
                    if let Some(e) = truncated {
                        self.protocol_error(id, e.to_string());
                    }
                    return;
                }
                Ok(_) => self.process_frames(id),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    w.eof = true;
                    return;
                }
            }
        }
    }

    fn process_frames(&mut self, id: u64) {
        loop {
            let Some(w) = self.workers.get_mut(&id) else { return };
            if w.cause.as_ref().is_some_and(|c| matches!(c, StopCause::Protocol(_))) {
                return; // nothing it says counts any more
            }
            let incoming = match w.reader.next_message_with_segment() {
                Ok(None) => return,
                Ok(Some((msg, segment))) => match msg {
                    Message::Hello { pid, identity } => Incoming::Hello { pid, identity },
                    Message::Ready => Incoming::Ready,
                    Message::InitFailed { error } => Incoming::InitFailed(error),
                    Message::Result { id, outcome } => Incoming::Result {
                        id,
                        outcome: match outcome {
                            WireOutcome::Value(v) => Ok(Output { bytes: v.to_vec(), segment }),
                            WireOutcome::Error(e) => Err(Error::new(ErrorKind::Remote(e))),
                            WireOutcome::Skipped => Err(Error::cancelled()),
                        },
                    },
                    Message::Goodbye { reason, report } => Incoming::Goodbye(reason, report),
                    other => Incoming::Unexpected(other.name()),
                },
                Err(e) => {
                    self.protocol_error(id, format!("malformed frame: {e}"));
                    return;
                }
            };
            self.handle(id, incoming);
        }
    }

    fn handle(&mut self, id: u64, msg: Incoming) {
        let cfg = Arc::clone(&self.cfg);
        let Some(w) = self.workers.get_mut(&id) else { return };
        match (w.phase, msg) {
            (Phase::Starting, Incoming::Hello { pid, identity }) => {
                if pid as i32 != w.raw_pid() {
                    let detail = format!("said hello as pid {pid}");
                    return self.protocol_error(id, detail);
                }
                if let Some(expected) = cfg.identity {
                    if identity != expected {
                        let detail = format!(
                            "runs a different program (identity {identity:#x}, expected {expected:#x}); \
                             call warden::init() first in main"
                        );
                        return self.protocol_error(id, detail);
                    }
                }
                if w.queue(&Message::Init { worker: id, payload: &cfg.init_payload }, cfg.max_frame).is_err() {
                    return self.protocol_error(id, "init payload exceeds the frame limit".into());
                }
                w.flush();
                w.phase = Phase::Initializing;
            }
            (Phase::Initializing, Incoming::Ready) => {
                w.phase = Phase::Ready;
                w.deadline = None;
                let pid = w.raw_pid();
                self.emit(Event::WorkerReady { worker: id, pid });
            }
            (Phase::Initializing, Incoming::InitFailed(error)) => {
                tracing::warn!(pool = %cfg.name, pid = w.raw_pid(), "start hook failed: {error}");
                w.cause.get_or_insert(StopCause::InitFailed(error.to_string()));
                w.phase = Phase::Retiring;
                w.deadline = Some(Instant::now() + cfg.grace);
            }
            (
                Phase::Ready | Phase::Retiring | Phase::Stopping | Phase::Killed,
                Incoming::Result { id: task_id, outcome },
            ) => {
                let Some(front) = w.inflight.front() else {
                    let detail = format!("sent a result for task {task_id} it was not running");
                    return self.protocol_error(id, detail);
                };
                if front.task.id != task_id {
                    let detail = format!("sent a result for task {task_id} while running task {}", front.task.id);
                    return self.protocol_error(id, detail);
                }
                if let Some(mut done) = w.inflight.pop_front() {
                    done.task.deliver(outcome);
                }
                if let Some(next) = w.inflight.front_mut() {
                    let now = Instant::now();
                    next.started = Some(now);
                    next.deadline = next.task.timeout.map(|t| now + t);
                    if next.cancel_requested {
                        // The cancel may have crossed the task: stop to be sure.
                        w.stop(StopCause::Cancelled, cfg.grace);
                    }
                }
                if w.phase == Phase::Ready
                    && w.inflight.is_empty()
                    && cfg.max_tasks_per_child.is_some_and(|max| w.assigned >= max)
                {
                    let reason = if cfg.one_off { RetireReason::Done } else { RetireReason::MaxTasks };
                    retire(w, reason, &cfg);
                }
            }
            (_, Incoming::Goodbye(reason, report)) => {
                if w.phase == Phase::Ready || w.phase == Phase::Initializing || w.phase == Phase::Starting {
                    // Leaving on its own (a signal from outside): take no more tasks.
                    w.phase = Phase::Retiring;
                    w.deadline = Some(Instant::now() + cfg.grace);
                }
                w.goodbye = Some((reason, report));
            }
            // A worker we already told to go may still be saying hello.
            (Phase::Retiring | Phase::Stopping | Phase::Killed, Incoming::Hello { .. } | Incoming::Ready) => {}
            (Phase::Retiring | Phase::Stopping | Phase::Killed, Incoming::InitFailed(error)) => {
                w.cause.get_or_insert(StopCause::InitFailed(error.to_string()));
            }
            (phase, Incoming::Unexpected(name)) => {
                let detail = format!("sent an unexpected {name} message while {}", phase.name());
                self.protocol_error(id, detail);
            }
            (phase, other) => {
                let name = match other {
                    Incoming::Hello { .. } => "hello",
                    Incoming::Ready => "ready",
                    Incoming::InitFailed(_) => "init-failed",
                    Incoming::Result { .. } => "result",
                    Incoming::Goodbye(..) | Incoming::Unexpected(_) => "message",
                };
                let detail = format!("sent {name} while {}", phase.name());
                self.protocol_error(id, detail);
            }
        }
    }

    /// A worker broke the protocol: its task fails saying so, and it is killed.
    fn protocol_error(&mut self, id: u64, detail: String) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let pid = w.raw_pid();
        tracing::warn!(pool = %self.cfg.name, pid, "worker broke the protocol: {detail}");
        if let Some(front) = w.inflight.front_mut() {
            if front.started.is_some() {
                front.task.deliver(Err(Error::new(ErrorKind::Protocol { pid, detail: detail.clone() })));
            }
        }
        if !w.cause.as_ref().is_some_and(|c| c.intended() && !matches!(c, StopCause::Retired(_))) {
            w.cause = Some(StopCause::Protocol(detail));
        }
        w.kill(StopCause::Killed);
    }

    /// The pidfd is readable: the process has exited. Reap it and settle its affairs.
    fn reap(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let status = match rustix::process::waitid(
            rustix::process::WaitId::PidFd(w.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => {
                if let Some(sig) = st.terminating_signal() {
                    ExitStatus::Signal(sig)
                } else {
                    ExitStatus::Code(st.exit_status().unwrap_or(-1))
                }
            }
            Ok(None) => return, // not yet
            Err(e) => {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "waitid failed: {e}");
                ExitStatus::Code(-1)
            }
        };
        w.status = Some(status);
        // Whatever it wrote before exiting is in the socket buffer now.
        w.eof = false;
        self.read_worker(id);
        self.finish(id);
    }

    fn finish(&mut self, id: u64) {
        let Some(mut w) = self.workers.remove(&id) else { return };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut w.sock);
        let _ = registry.deregister(&mut SourceFd(&w.pidfd.as_raw_fd()));
        let pid = w.raw_pid();
        let status = w.status.unwrap_or(ExitStatus::Signal(libc::SIGKILL));

        let mut inflight = std::mem::take(&mut w.inflight);
        if let Some(mut front) = inflight.pop_front() {
            if front.started.is_some() {
                front.task.deliver(Err(Error::new(ErrorKind::Crashed { pid, status })));
            } else {
                inflight.push_front(front);
            }
        }
        // Sent but never started: back to the front of the queue, in order.
        for f in inflight.into_iter().rev() {
            let mut task = f.task;
            if task.delivered() {
                continue;
            }
            match self.phase {
                PoolPhase::Running | PoolPhase::Closing { drain: true } => self.queue.push_front(task),
                PoolPhase::Failed => task.deliver(Err(self.failed_error())),
                _ => task.deliver(Err(Error::cancelled())),
            }
        }

        let retired_itself =
            w.cause.is_none() && matches!(w.goodbye, Some((ExitReason::Retired(_), _))) && status.success();
        let crashed = match &w.cause {
            Some(cause) => !cause.intended(),
            None => !retired_itself,
        };
        let exit = WorkerExit { worker: id, pid, status, cause: w.cause.clone(), goodbye: w.goodbye.clone(), crashed };
        tracing::debug!(pool = %self.cfg.name, worker = id, pid, %status, crashed, "worker reaped");
        drop(w);
        self.emit(Event::WorkerExited(exit.clone()));
        if crashed && self.phase != PoolPhase::Failed {
            let what = match &exit.cause {
                Some(StopCause::InitFailed(e)) => format!("worker {pid}'s start hook failed: {e}"),
                Some(StopCause::InitTimeout) => format!("worker {pid} did not start within the init timeout"),
                Some(StopCause::Protocol(d)) => format!("worker {pid} broke the protocol: {d}"),
                _ => format!("worker {pid} ended with {status}"),
            };
            self.note_crash(what);
        }
    }

    // ---- scheduling ------------------------------------------------------

    fn dispatch(&mut self) {
        if self.queue.is_empty() || !matches!(self.phase, PoolPhase::Running | PoolPhase::Closing { drain: true }) {
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        // Idle workers first, then fill pipelines up to `prefetch`.
        for depth in 0..cfg.prefetch {
            let mut ids: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.phase == Phase::Ready && w.inflight.len() == depth)
                .map(|w| w.id)
                .collect();
            ids.sort_unstable();
            for id in ids {
                let Some(w) = self.workers.get_mut(&id) else { continue };
                if cfg.max_tasks_per_child.is_some_and(|max| w.assigned >= max) {
                    continue;
                }
                let Some(task) = self.queue.pop_front() else { return };
                let msg = Message::Task { id: task.id, payload: &task.payload };
                if let Err(e) = w.queue_with_segment(&msg, task.segment.as_ref().map(|f| f.as_fd()), cfg.max_frame) {
                    let mut task = task;
                    task.deliver(Err(e.into()));
                    continue;
                }
                let now = Instant::now();
                let first = w.inflight.is_empty();
                w.inflight.push_back(InFlight {
                    deadline: if first { task.timeout.map(|t| now + t) } else { None },
                    started: first.then_some(now),
                    task,
                    cancel_requested: false,
                });
                w.assigned += 1;
                w.flush();
            }
        }
    }

    fn retire_idle(&mut self) {
        let PoolPhase::Closing { drain } = self.phase else { return };
        if drain && !self.queue.is_empty() {
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        for w in self.workers.values_mut() {
            if w.inflight.is_empty() && w.is_serving() {
                retire(w, RetireReason::Shutdown, &cfg);
            }
        }
    }

    fn check_timers(&mut self, now: Instant) {
        let cfg = Arc::clone(&self.cfg);
        let bounded_close = self.close_deadline.is_some_and(|d| now >= d);
        let mut timed_out = Vec::new();
        let mut abandoned = Vec::new();
        for w in self.workers.values_mut() {
            if let Some(front) = w.inflight.front_mut() {
                if !front.task.delivered() && front.deadline.is_some_and(|d| now >= d) {
                    let after = front.task.timeout.unwrap_or_default();
                    front.task.deliver(Err(Error::new(ErrorKind::TimedOut { after })));
                    timed_out.push((front.task.id, w.raw_pid()));
                    w.stop(StopCause::TimedOut, cfg.grace);
                }
            }
            if bounded_close && !w.inflight.is_empty() && w.is_serving() {
                for f in w.inflight.iter_mut() {
                    f.task.deliver(Err(Error::cancelled()));
                }
                w.stop(StopCause::Terminated, cfg.grace);
            }
            if w.deadline.is_some_and(|d| now >= d) {
                match w.phase {
                    Phase::Starting | Phase::Initializing => w.stop(StopCause::InitTimeout, cfg.grace),
                    Phase::Ready => w.deadline = None,
                    Phase::Retiring => {
                        let cause = w.cause.clone().unwrap_or(StopCause::Retired(RetireReason::Shutdown));
                        w.phase = Phase::Ready; // let stop() escalate from here
                        w.stop(cause, cfg.grace);
                    }
                    Phase::Stopping => w.kill(StopCause::Killed),
                    Phase::Killed => abandoned.push(w.id),
                }
            }
        }
        if bounded_close {
            self.close_deadline = None;
        }
        for (task, pid) in timed_out {
            self.emit(Event::TaskTimedOut { task, pid });
        }
        for id in abandoned {
            if let Some(w) = self.workers.get_mut(&id) {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "worker did not die after SIGKILL; giving up on it");
                w.status = Some(ExitStatus::Signal(libc::SIGKILL));
            }
            self.finish(id);
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

fn retire(w: &mut Worker, reason: RetireReason, cfg: &Config) {
    w.cause.get_or_insert(StopCause::Retired(reason));
    if w.queue(&Message::Retire { reason }, cfg.max_frame).is_ok() {
        w.flush();
    }
    w.phase = Phase::Retiring;
    w.deadline = Some(Instant::now() + cfg.grace);
}

impl Drop for Worker {
    /// The last line of defence: a worker still unreaped when the supervisor
    /// goes away (it panicked) is killed and reaped here, with its group.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(Signal::KILL);
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            match rustix::process::waitid(
                rustix::process::WaitId::PidFd(self.pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
            ) {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        tracing::error!(pid = self.raw_pid(), "worker did not die after SIGKILL");
    }
}
