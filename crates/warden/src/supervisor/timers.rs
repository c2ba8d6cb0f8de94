//! Deadlines: task timeouts, a bounded close, init timeouts, the grace
//! periods of the retire → SIGTERM → SIGKILL escalation, and the memory
//! samples of a pool with a hard limit (`memory.rs`).

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, ErrorKind, ExitStatus};
use crate::wire::RetireReason;

use super::worker::WorkerPhase;
use super::{LifecycleEvent, PoolPhase, StopCause, Supervisor};

impl Supervisor {
    pub(super) fn check_timers(&mut self, now: Instant) {
        // A result may be waiting unread on the channel of a worker whose
        // task is past its deadline: it came while this thread was not
        // running (the program stopped, SIGSTOP or Ctrl-Z, or this thread
        // descheduled on a loaded machine) between its poll and here. It is
        // read first: a task that ended keeps its result.
        let overdue: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.inflight.front().is_some_and(|f| !f.task.delivered() && f.deadline.is_some_and(|d| now >= d)))
            .map(|w| w.id)
            .collect();
        for id in overdue {
            self.read_or_defer(id);
        }
        let cfg = Arc::clone(&self.cfg);
        let bounded_close = self.close_deadline.is_some_and(|d| now >= d);
        let mut timed_out = Vec::new();
        let mut abandoned = Vec::new();
        for w in self.workers.values_mut() {
            if let Some(front) = w.inflight.front_mut() {
                if !front.task.delivered() && front.deadline.is_some_and(|d| now >= d) {
                    let after = front.task.timeout.unwrap_or_default();
                    front.task.deliver(Err(Error::new(ErrorKind::TimedOut { after })));
                    let id = front.task.id;
                    timed_out.push((id, w.raw_pid()));
                    w.stop_task(id, StopCause::TimedOut, cfg.grace);
                }
            }
            // (And one stopping for its task only, which could answer that
            // the task had ended and serve on, running what was sent ahead;
            // one that took that stop is leaving already: what it holds is
            // cancelled, and its grace period stands.)
            let targeted = w.stop_target.is_some();
            if bounded_close && (!w.inflight.is_empty() && w.is_serving() || targeted) {
                for f in w.inflight.iter_mut() {
                    f.task.deliver(Err(Error::cancelled()));
                }
                if !(targeted && w.stop_took) {
                    w.stop(StopCause::Terminated, cfg.grace);
                }
            }
            // One still starting (its start hook running) is stopped at the
            // deadline too, not left to its init timeout; so is a one-off
            // child still on its way out, which has no deadline of its own.
            if bounded_close && matches!(w.phase, WorkerPhase::Starting | WorkerPhase::Initializing) {
                w.stop(StopCause::Terminated, cfg.grace);
            }
            if bounded_close && w.phase == WorkerPhase::Retiring && w.deadline.is_none() {
                let cause = w.cause.clone().unwrap_or(StopCause::Terminated);
                w.stop(cause, cfg.grace);
            }
            if w.phase != WorkerPhase::Killed && w.unreachable_until.is_some_and(|d| now >= d) {
                // Its channel ended without a goodbye a grace period ago.
                w.kill(StopCause::Killed);
            }
            if w.deadline.is_some_and(|d| now >= d) {
                match w.phase {
                    WorkerPhase::Starting | WorkerPhase::Initializing => w.stop(StopCause::InitTimeout, cfg.grace),
                    WorkerPhase::Ready => w.deadline = None,
                    WorkerPhase::Retiring => {
                        let cause = w.cause.clone().unwrap_or(StopCause::Retired(RetireReason::Shutdown));
                        w.phase = WorkerPhase::Ready; // let stop() escalate from here
                        w.stop(cause, cfg.grace);
                    }
                    WorkerPhase::Stopping => w.kill(StopCause::Killed),
                    WorkerPhase::Killed => abandoned.push(w.id),
                }
            }
        }
        if bounded_close {
            self.close_deadline = None;
            // Queued tasks the close was draining are cancelled too.
            if self.phase == (PoolPhase::Closing { drain: true }) {
                self.close(false, None);
            }
        }
        self.check_memory(now);
        for (task, pid) in timed_out {
            self.emit(LifecycleEvent::TaskTimedOut { task, pid });
        }
        for id in abandoned {
            if let Some(w) = self.workers.get_mut(&id) {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "worker did not die after SIGKILL; giving up on it");
                w.status = Some(ExitStatus::Signal(libc::SIGKILL));
            }
            self.finish(id);
        }
    }
}
