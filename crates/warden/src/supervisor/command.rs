//! Carrying out callers' commands: submit, cancel, close (draining or not,
//! with a deadline), terminate, kill, snapshot; and failing the pool as a whole.

use crate::panics::lock;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TryRecvError;
use std::time::Instant;

use rustix::process::Signal;

use crate::error::{Error, ErrorKind};
use crate::wire::Message;

use super::worker::WorkerPhase;
use super::{Command, LifecycleEvent, PoolPhase, StopCause, Supervisor, WorkerSnapshot};

impl Supervisor {
    pub(super) fn drain_commands(&mut self) {
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

    pub(super) fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(mut task) => match self.phase {
                PoolPhase::Running => self.queue.push_back(task),
                PoolPhase::Failed => task.deliver(Err(self.failed_error())),
                _ => task.deliver(Err(Error::closed())),
            },
            Command::Cancel { id, running_too, reply } => {
                let cancelled = self.cancel(id, running_too);
                if let Some(reply) = reply {
                    let _ = reply.send(cancelled);
                }
            }
            Command::CancelQueued { reply } => {
                let _ = reply.send(self.cancel_queued_all());
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

    /// Cancels every task not started, as [`Supervisor::cancel`] without
    /// `running_too` cancels each: the queued ones, and those sent ahead to
    /// a worker that has not started them (asked back; one the worker had
    /// started as the ask crossed it runs to its end, its result dropped).
    /// Returns their ids, in order.
    pub(super) fn cancel_queued_all(&mut self) -> Vec<u64> {
        let mut ids = Vec::with_capacity(self.queue.len());
        for mut task in self.queue.drain(..) {
            ids.push(task.id);
            task.deliver(Err(Error::cancelled()));
        }
        let max_frame = self.cfg.max_frame;
        for w in self.workers.values_mut() {
            let mut ask = Vec::new();
            for f in w.inflight.iter_mut().skip(1) {
                if f.task.delivered() {
                    continue;
                }
                f.task.deliver(Err(Error::cancelled()));
                ids.push(f.task.id);
                if f.withdrawing.is_none() {
                    ask.push(f.task.id);
                }
            }
            if !ask.is_empty() {
                for id in ask {
                    let _ = w.queue(&Message::Cancel { id }, max_frame);
                }
                w.flush();
            }
        }
        ids.sort_unstable();
        ids
    }

    pub(super) fn cancel(&mut self, id: u64, running_too: bool) -> bool {
        if let Some(pos) = self.queue.iter().position(|t| t.id == id) {
            if let Some(mut task) = self.queue.remove(pos) {
                task.deliver(Err(Error::cancelled()));
            }
            return true;
        }
        let grace = self.cfg.grace;
        let max_frame = self.cfg.max_frame;
        for w in self.workers.values_mut() {
            let Some(pos) = w.inflight.iter().position(|f| f.task.id == id) else { continue };
            // A task sent ahead but not started is still queued, for the caller.
            if w.inflight[pos].task.delivered() || (pos == 0 && !running_too) {
                return false;
            }
            w.inflight[pos].task.deliver(Err(Error::cancelled()));
            if pos == 0 {
                // Running: stop the worker if it still runs it; its exit hook runs.
                w.stop_task(id, StopCause::Cancelled, grace);
            } else {
                // The worker gives it back unless it has started it already
                // (done with the one before, while this was on its way).
                // Then it runs to its end, its result dropped: only
                // `running_too` stops the worker for it, since stopping it
                // then might cut off the task after it instead.
                w.inflight[pos].cancel_requested = running_too;
                if w.queue(&Message::Cancel { id }, max_frame).is_ok() {
                    w.flush();
                }
            }
            return true;
        }
        false
    }

    pub(super) fn close(&mut self, drain: bool, deadline: Option<Instant>) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        self.phase = PoolPhase::Closing { drain };
        self.close_deadline = deadline;
        // A worker stopped (SIGSTOP, a debugger) would hold the close: one
        // starting until its init timeout, one with a task for good, since
        // a drain waits for that task. Resume every one, so that it gets
        // ready or ends its task, and is retired. Harmless to a running one.
        for w in self.workers.values_mut() {
            if !matches!(w.phase, WorkerPhase::Killed) {
                w.signal(Signal::CONT);
            }
        }
        if !drain {
            for mut task in self.queue.drain(..) {
                task.deliver(Err(Error::cancelled()));
            }
            // Tasks sent ahead are asked back: each one a worker gives back
            // is cancelled then (a closing pool queues nothing); one it has
            // started already (the cancel may cross it) runs to its end, as
            // a running task does, and nothing is stopped for it.
            let max_frame = self.cfg.max_frame;
            for w in self.workers.values_mut() {
                let mut ask = Vec::new();
                for f in w.inflight.iter_mut().skip(1) {
                    if !f.task.delivered() && f.withdrawing.is_none() && !f.cancel_requested {
                        f.withdrawing = Some(Instant::now());
                        ask.push(f.task.id);
                    }
                }
                if !ask.is_empty() {
                    for id in ask {
                        let _ = w.queue(&Message::Cancel { id }, max_frame);
                    }
                    w.flush();
                }
            }
        }
    }

    pub(super) fn terminate(&mut self, kill: bool) {
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

    pub(super) fn failed_error(&self) -> Error {
        let reason = self.shared.failure().unwrap_or_else(|| "unknown".into());
        Error::new(ErrorKind::PoolFailed { reason })
    }

    pub(super) fn fail(&mut self, reason: String) {
        if self.phase == PoolPhase::Failed {
            return;
        }
        tracing::error!(pool = %self.cfg.name, "pool failed: {reason}");
        *lock(&self.shared.failure) = Some(reason.clone());
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
        self.emit(LifecycleEvent::PoolFailed { reason });
    }
}
