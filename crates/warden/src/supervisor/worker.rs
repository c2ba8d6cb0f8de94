//! The supervisor's record of one worker process: its phase in the lifecycle
//! (see the diagram in [`super`]), the tasks sent to it, its outgoing buffer,
//! and the escalation from retiring to SIGTERM to SIGKILL.
//!
//! # Caveats
//!
//! * The process group is signalled only while the worker is unreaped, so its
//!   id cannot have been reused by then.
//! * A process stuck in uninterruptible sleep cannot be reaped even after
//!   SIGKILL; after [`KILL_WAIT`] the supervisor gives up on it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use rustix::process::Signal;

use crate::error::ExitStatus;
use crate::wire::{self, ExitPathReport, ExitReason, FrameReader, Message, RetireReason};

use super::process::WorkerProcess;
use super::{Config, StopCause, Task};

/// How long the supervisor waits for a SIGKILLed process to be reapable.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WorkerPhase {
    Starting,
    Initializing,
    Ready,
    Retiring,
    Stopping,
    Killed,
}

impl WorkerPhase {
    pub(super) fn name(self) -> &'static str {
        match self {
            WorkerPhase::Starting => "starting",
            WorkerPhase::Initializing => "initializing",
            WorkerPhase::Ready => "ready",
            WorkerPhase::Retiring => "retiring",
            WorkerPhase::Stopping => "stopping",
            WorkerPhase::Killed => "killed",
        }
    }
}

pub(super) struct InFlight {
    pub(super) task: Task,
    /// Set when the task became the first in line, i.e. the worker started it.
    pub(super) started: Option<Instant>,
    pub(super) deadline: Option<Instant>,
    pub(super) cancel_requested: bool,
}

pub(super) struct Worker {
    pub(super) id: u64,
    /// The OS process behind it.
    pub(super) process: Box<dyn WorkerProcess>,
    pub(super) sock: UnixStream,
    pub(super) reader: FrameReader,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    pub(super) phase: WorkerPhase,
    pub(super) deadline: Option<Instant>,
    pub(super) inflight: VecDeque<InFlight>,
    pub(super) assigned: u64,
    pub(super) cause: Option<StopCause>,
    pub(super) goodbye: Option<(ExitReason, ExitPathReport)>,
    pub(super) status: Option<ExitStatus>,
    pub(super) eof: bool,
    /// The last cleanup record it sent, for `on_worker_lost`.
    pub(super) record: Option<Vec<u8>>,
    /// Above `max_memory_per_child` after a task: takes no more, retires when idle.
    pub(super) over_memory: bool,
}

impl Worker {
    /// A worker just started: it has until `init_deadline` to say hello and ready.
    pub(super) fn new(
        id: u64,
        process: Box<dyn WorkerProcess>,
        sock: UnixStream,
        max_frame: usize,
        init_deadline: Instant,
    ) -> Self {
        Worker {
            id,
            process,
            sock,
            reader: FrameReader::new(max_frame),
            out: Vec::new(),
            out_pos: 0,
            phase: WorkerPhase::Starting,
            deadline: Some(init_deadline),
            inflight: VecDeque::new(),
            assigned: 0,
            cause: None,
            goodbye: None,
            status: None,
            eof: false,
            record: None,
            over_memory: false,
        }
    }

    pub(super) fn raw_pid(&self) -> i32 {
        self.process.pid()
    }

    pub(super) fn is_serving(&self) -> bool {
        matches!(self.phase, WorkerPhase::Starting | WorkerPhase::Initializing | WorkerPhase::Ready)
    }

    /// Sends a signal to the worker and everything in its process group. The
    /// group is only signalled while the worker is unreaped, so its id cannot
    /// have been reused.
    pub(super) fn signal(&mut self, sig: Signal) {
        let unreaped = self.status.is_none();
        self.process.signal(sig, unreaped);
    }

    pub(super) fn stop(&mut self, cause: StopCause, grace: Duration) {
        self.cause.get_or_insert(cause);
        if matches!(self.phase, WorkerPhase::Stopping | WorkerPhase::Killed) {
            return;
        }
        self.signal(Signal::TERM);
        self.phase = WorkerPhase::Stopping;
        self.deadline = Some(Instant::now() + grace);
    }

    pub(super) fn kill(&mut self, cause: StopCause) {
        self.cause.get_or_insert(cause);
        if self.phase == WorkerPhase::Killed {
            return;
        }
        self.signal(Signal::KILL);
        self.phase = WorkerPhase::Killed;
        self.deadline = Some(Instant::now() + KILL_WAIT);
    }

    pub(super) fn queue(&mut self, msg: &Message<'_>, max_frame: usize) -> Result<(), wire::WireError> {
        wire::encode(msg, &mut self.out, max_frame)
    }

    /// Writes as much of the outgoing buffer as the socket takes.
    pub(super) fn flush(&mut self) {
        while self.out_pos < self.out.len() {
            match rustix::net::send(&self.sock, &self.out[self.out_pos..], rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => self.out_pos += n,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    // The worker closed its end; its pidfd will tell us the rest.
                    self.out.clear();
                    self.out_pos = 0;
                    return;
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
    }

    pub(super) fn running(&self) -> Option<&InFlight> {
        self.inflight.front()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let task = self.inflight.front().and_then(|f| if f.task.delivered() { None } else { f.deadline });
        match (self.deadline, task) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

pub(super) fn retire(w: &mut Worker, reason: RetireReason, cfg: &Config) {
    w.cause.get_or_insert(StopCause::Retired(reason));
    if w.queue(&Message::Retire { reason }, cfg.max_frame).is_ok() {
        w.flush();
    }
    w.phase = WorkerPhase::Retiring;
    w.deadline = Some(Instant::now() + cfg.grace);
}

impl Drop for Worker {
    /// The last line of defence: a worker still unreaped when the supervisor
    /// goes away is killed and reaped here, with its group. (After a panic
    /// the supervisor kills and reaps all workers at once first, see
    /// `Supervisor::kill_all_now`, so this finds them reaped.)
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(Signal::KILL);
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            match self.process.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        tracing::error!(pid = self.raw_pid(), "worker did not die after SIGKILL");
    }
}
