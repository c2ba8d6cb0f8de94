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

use std::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::memory::resident_bytes;

use super::worker::{Worker, WorkerPhase};
use super::{Config, StopCause, Supervisor};

/// After a result: marks a worker above the soft cap, which then retires,
/// and asks back the tasks it holds beyond the one it has gone on to (sent
/// ahead: they would run there, each growing it further).
pub(super) fn check_after_task(w: &mut Worker, cfg: &Config) {
    let Some(cap) = cfg.memory.soft else { return };
    if w.over_memory || w.status.is_some() {
        return;
    }
    match resident_bytes(w.raw_pid()) {
        Ok(rss) if rss > cap => {
            tracing::debug!(pool = %cfg.name, pid = w.raw_pid(), rss, cap, "over max_memory_per_child; retiring");
            w.over_memory = true;
            let why = "asking a task back from a worker over max_memory_per_child";
            super::schedule::ask_back(w, 0, Instant::now(), cfg, why);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(pool = %cfg.name, pid = w.raw_pid(), "cannot read its memory: {e}"),
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
            if rss <= limit {
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
