//! The memory caps, as the supervisor applies them (how a worker's memory is
//! read, and why that way: `crate::memory`).
//!
//! * Soft (`max_memory_per_child`): after each result, the worker's resident
//!   size is read; above the cap it takes no more tasks, gives back the ones
//!   sent ahead that it has not taken up (so at most the one it went on to
//!   runs there), and retires once idle (`RetireReason::MaxMemory`: its exit
//!   hook runs). The task's result stands.
//! * Hard (`memory_limit`): while any worker is busy, every busy worker is
//!   sampled each interval; one above the limit has its task failed with
//!   `MemoryExceeded` and is stopped (SIGTERM, grace, SIGKILL). The schedule
//!   stops while no worker is busy, so an idle pool never wakes for it.
//!   A worker that a task left above the limit as it ended (memory it kept:
//!   a cache, a module global) is retired as under the soft cap, and the
//!   task's result stands: the next task is not blamed for it. The one task
//!   it may already have begun is failed only if that task grows it further
//!   (past where the last one left it, by more than the limit divided by
//!   [`GROWTH_DIVISOR`]).

use std::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::memory::resident_bytes;

use super::worker::{Worker, WorkerPhase};
use super::{Config, StopCause, Supervisor};

/// A task begun in a worker that the previous task left above
/// `memory_limit` may grow it by the limit divided by this before it is
/// failed (an eighth): a task allocates a little as it runs, and is not to
/// be blamed for what the one before it kept.
pub(super) const GROWTH_DIVISOR: u64 = 8;

/// After a result: marks a worker above the soft cap or the hard limit,
/// which then retires, and asks back the tasks it holds beyond the one it
/// has gone on to (sent ahead: they would run there, each growing it
/// further, or be failed for what this one kept).
pub(super) fn check_after_task(w: &mut Worker, cfg: &Config) {
    let (soft, hard) = (cfg.memory.soft, cfg.memory.hard);
    if (soft.is_none() && hard.is_none()) || w.over_memory || w.status.is_some() {
        return;
    }
    match resident_bytes(w.raw_pid()) {
        Ok(rss) if soft.is_some_and(|cap| rss > cap) || hard.is_some_and(|limit| rss > limit) => {
            tracing::debug!(pool = %cfg.name, pid = w.raw_pid(), rss, ?soft, ?hard, "over a memory cap after a task; retiring");
            w.over_memory = true;
            if hard.is_some_and(|limit| rss > limit) {
                w.left_over_limit = Some(rss);
            }
            let why = "asking a task back from a worker over a memory cap";
            super::schedule::ask_back(w, 0, Instant::now(), cfg, why);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(pool = %cfg.name, pid = w.raw_pid(), "cannot read its memory: {e}"),
    }
}

/// The resident size above which worker `w`'s running task is failed.
fn threshold(w: &Worker, limit: u64) -> u64 {
    match w.left_over_limit {
        Some(left) => left.max(limit).saturating_add(limit / GROWTH_DIVISOR),
        None => limit,
    }
}

/// Whether the worker runs a task still waiting for its outcome.
fn busy(w: &Worker) -> bool {
    w.phase == WorkerPhase::Ready && w.status.is_none() && w.running().is_some_and(|f| !f.task.delivered())
}

impl Supervisor {
    /// With a hard limit: samples the busy workers on schedule and stops the
    /// ones above it.
    pub(super) fn check_memory(&mut self, now: Instant) {
        let Some(limit) = self.cfg.memory.hard else { return };
        if !self.workers.values().any(busy) {
            self.memory_sample_at = None;
            return;
        }
        let interval = self.cfg.memory.interval;
        match self.memory_sample_at {
            Some(at) if now < at => return,
            // The first busy worker since the pool was idle: one interval from now.
            None => {
                self.memory_sample_at = Some(now + interval);
                return;
            }
            Some(_) => self.memory_sample_at = Some(now + interval),
        }
        let grace = self.cfg.grace;
        for w in self.workers.values_mut().filter(|w| busy(w)) {
            let pid = w.raw_pid();
            let rss = match resident_bytes(pid) {
                Ok(rss) => rss,
                Err(e) => {
                    tracing::debug!(pool = %self.cfg.name, pid, "cannot read its memory: {e}");
                    continue;
                }
            };
            if rss <= threshold(w, limit) {
                continue;
            }
            tracing::warn!(pool = %self.cfg.name, pid, rss, limit, "worker over its memory limit; stopping it");
            if let Some(front) = w.inflight.front_mut() {
                front.task.deliver(Err(Error::new(ErrorKind::MemoryExceeded { pid, limit, rss })));
            }
            w.stop(StopCause::MemoryExceeded { limit, rss }, grace);
        }
    }
}
