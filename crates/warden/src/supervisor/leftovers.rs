//! What a worker that died without its exit path left in its process group:
//! a subprocess a task started, another library's pool and that library's
//! resource tracker (loky's, which joblib uses). They get SIGTERM and the
//! pool's grace period to end, as a stopped worker's group does, before the
//! SIGKILL that the reap sends; a resource tracker sees its pipe close as
//! its pool's processes end, and unlinks what it tracked (`/dev/shm`
//! segments, joblib's memmapped folders) before it exits.
//!
//! Meanwhile the worker's outcome is settled and its place filled at once:
//! only its reap waits, so that its pid, its group's id, cannot be taken by
//! another process while the group is signalled.
//!
//! # Caveats
//!
//! * Only where `/proc` is this PID namespace's: elsewhere what a worker
//!   left cannot be seen, and is SIGKILLed as the worker is reaped.
//! * Until its group is empty (or the grace period is over), the dead worker
//!   stays a zombie: a child of this process in state `Z`.
//! * A worker that went through its exit path, or that the pool had already
//!   signalled (a stop, `terminate()`, `kill()`), is reaped at once: its
//!   group has had its chance, or the pool meant to kill it outright. So is
//!   a one-off child (a Python `Process`): its end is the end of its pool,
//!   which `join()` and `exitcode` wait for, and must be seen at once.
//! * Only this process sends the SIGKILL at the end of the grace period: if
//!   it dies meanwhile (SIGKILL, the OOM killer), what in the group ignores
//!   SIGTERM is left running, orphaned (as the standard library leaves all
//!   of it); what obeys SIGTERM has had it.

use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use rustix::process::Signal;

use super::process::{HandedOn, WorkerProcess};
use super::worker::WorkerPhase;
use super::Supervisor;

/// The first look at a signalled group comes this long after the signal
/// (the wait doubles from there), and the longest wait between two.
const FIRST_LOOK: Duration = Duration::from_millis(5);
const LONGEST_LOOK: Duration = Duration::from_millis(100);

/// A dead worker whose group is being given its grace period.
pub(super) struct Lingering {
    process: Box<dyn WorkerProcess>,
    /// When the group is SIGKILLed and the worker reaped, whatever is left.
    until: Instant,
    next_look: Instant,
    step: Duration,
}

impl Drop for Lingering {
    /// SIGKILLs what is left in the group and reaps the worker (exited
    /// already: `try_wait` does not wait); also when the pool goes away
    /// (a panic of its loop).
    fn drop(&mut self) {
        if let Err(e) = self.process.try_wait() {
            tracing::error!(pid = self.process.pid(), "waitid failed: {e}");
        }
    }
}

impl Supervisor {
    /// Reaps an exited worker; or, when it died without its exit path, the
    /// pool had not signalled it, and `/proc` shows processes left in its
    /// group, signals them and hands the worker on, to be reaped later. (A
    /// zombie counts against a `pids` cgroup's limit: one with nothing left
    /// is reaped here, before its replacement is started.)
    pub(super) fn release(&mut self, id: u64, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        // Never a one-off child: its end (`join()`, `exitcode`) is its
        // pool's, which would wait for the group.
        let unwarned =
            w.goodbye.is_none() && !matches!(w.phase, WorkerPhase::Stopping | WorkerPhase::Killed) && !self.cfg.one_off;
        if !unwarned || w.process.others_in_group() != Some(true) {
            if let Err(e) = w.process.try_wait() {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "waitid failed: {e}");
            }
            return;
        }
        let pid = w.raw_pid();
        tracing::debug!(pool = %self.cfg.name, pid, "a dead worker's group gets SIGTERM and a grace period");
        w.process.signal(Signal::TERM, true);
        w.process.signal(Signal::CONT, true);
        if let Some(fd) = w.process.exit_fd() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        let process = std::mem::replace(&mut w.process, Box::new(HandedOn(pid)));
        let next_look = now + FIRST_LOOK;
        self.lingering.push(Lingering { process, until: now + self.cfg.grace, next_look, step: FIRST_LOOK });
    }

    /// Reaps the dead workers whose groups have emptied, or whose grace
    /// period is over.
    pub(super) fn check_lingering(&mut self, now: Instant) {
        if self.lingering.iter().all(|l| l.next_look > now) {
            return;
        }
        for mut l in std::mem::take(&mut self.lingering) {
            if l.next_look > now {
                self.lingering.push(l);
            } else if now >= l.until || l.process.others_in_group() != Some(true) {
                drop(l); // reaps it
            } else {
                l.step = (l.step * 2).min(LONGEST_LOOK);
                l.next_look = (now + l.step).min(l.until);
                self.lingering.push(l);
            }
        }
    }

    /// When a lingering group is next looked at.
    pub(super) fn lingering_deadline(&self) -> Option<Instant> {
        self.lingering.iter().map(|l| l.next_look).min()
    }
}
