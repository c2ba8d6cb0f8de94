//! Carrying out callers' commands: submit, cancel, close (draining or not,
//! with a deadline), terminate, kill, snapshot; and failing the pool as a whole.

use crate::panics::lock;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TryRecvError};
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
                PoolPhase::Failed => {
                    self.shared.cancels.claim(task.id);
                    task.deliver(Err(self.failed_error()));
                }
                _ => {
                    self.shared.cancels.claim(task.id);
                    task.deliver(Err(Error::closed()));
                }
            },
            Command::Cancel { id, running_too, reply } => self.cancel(id, running_too, reply),
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
    /// `running_too` cancels each: the queued ones now, whose ids it
    /// returns, in order; and those sent ahead to a worker, each asked back
    /// and cancelled when the worker gives it back (one the worker had taken
    /// up as the ask crossed it runs, and its result comes as usual). That
    /// includes a task first in line that was being asked back as the task
    /// before it ended: its start is not known until the worker answers.
    pub(super) fn cancel_queued_all(&mut self) -> Vec<u64> {
        let mut ids = Vec::with_capacity(self.queue.len());
        for mut task in self.queue.drain(&self.shared.cancels) {
            ids.push(task.id);
            task.deliver(Err(Error::cancelled()));
        }
        let max_frame = self.cfg.max_frame;
        for w in self.workers.values_mut() {
            let mut ask = Vec::new();
            for (pos, f) in w.inflight.iter_mut().enumerate() {
                if f.task.delivered() || f.cancel_requested || f.cancel_on_return {
                    continue;
                }
                if pos == 0 && f.withdrawing.is_none() {
                    continue; // started
                }
                // Given back, it is cancelled, not queued again (asked
                // back already, it is not asked twice).
                f.cancel_on_return = true;
                if f.withdrawing.take().is_none() && f.task.cancels.is_empty() {
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

    /// Cancels task `id`, telling `reply` (if any) whether it did: at once,
    /// or, for a plain cancel of a task sent ahead to a worker, once the
    /// worker has answered whether it had taken the task up (`reply` is
    /// told `None` meanwhile), so that a cancel that says it landed always
    /// means the task never ran. A plain cancel nobody waits for (no
    /// `reply`) marks such a task cancelled unless started, as
    /// [`Supervisor::cancel_queued_all`] does.
    pub(super) fn cancel(&mut self, id: u64, running_too: bool, reply: Option<SyncSender<Option<bool>>>) {
        self.cancelling_until = Some(Instant::now() + super::schedule::CANCEL_CALM);
        let answer = |cancelled: bool| {
            if let Some(reply) = &reply {
                let _ = reply.send(Some(cancelled));
            }
        };
        if self.queue.cancel(id, &self.shared.cancels) {
            return answer(true);
        }
        let grace = self.cfg.grace;
        let max_frame = self.cfg.max_frame;
        for w in self.workers.values_mut() {
            let Some(pos) = w.inflight.iter().position(|f| f.task.id == id) else { continue };
            if w.inflight[pos].task.delivered() {
                return answer(super::link::cancelled_lately(id));
            }
            // (First in line but being asked back as the task before it
            // ended: started only if the worker says so, as one sent ahead.)
            let unconfirmed = w.inflight[pos].withdrawing.is_some() || w.inflight[pos].cancel_on_return;
            if pos == 0 && !running_too && !unconfirmed {
                return answer(false);
            }
            if pos == 0 && running_too {
                // Running: stop the worker if it still runs it; its exit hook runs.
                w.inflight[pos].task.deliver(Err(Error::cancelled()));
                w.stop_task(id, StopCause::Cancelled, grace);
                return answer(true);
            }
            let silent = w.silent_on_cancel(Instant::now());
            let f = &mut w.inflight[pos];
            let asked =
                f.withdrawing.is_some() || f.cancel_on_return || f.cancel_requested || !f.task.cancels.is_empty();
            if running_too {
                // It never runs to its end: skipped by the worker, or
                // stopped if the worker had started it (done with the one
                // before while this was on its way).
                f.task.deliver(Err(Error::cancelled()));
                f.cancel_requested = true;
                answer(true);
            } else if let Some(reply) = reply {
                if silent {
                    // The worker has not answered the last cancel it was
                    // sent (stopped, or starved): nothing here can say it
                    // will not take this task up, and it is not asked to.
                    let _ = reply.send(Some(false));
                    return;
                }
                // The worker skips it unless it has taken it up already;
                // then it runs to its end, and this cancel did not land.
                let _ = reply.send(None);
                f.task.cancels.push(reply);
            } else {
                // Nobody waits (a `cancel_queued` on this very thread, in an
                // `on_event` callback): cancelled unless started, as
                // `cancel_queued_all` cancels it. It is not asked back to
                // run elsewhere, and given back (asked back already, or its
                // worker gone) it is not queued again.
                f.cancel_on_return = true;
                f.withdrawing = None;
            }
            if !asked && w.queue(&Message::Cancel { id }, max_frame).is_ok() {
                w.flush();
            }
            return;
        }
        answer(super::link::cancelled_lately(id))
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
            for mut task in self.queue.drain(&self.shared.cancels) {
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
                    if f.can_ask_back() {
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
        for mut task in self.queue.drain(&self.shared.cancels) {
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
        for mut task in self.queue.drain(&self.shared.cancels) {
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
