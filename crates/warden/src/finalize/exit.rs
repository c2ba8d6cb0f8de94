//! The exit drain: runs the pending exit finalizers in priority order on the
//! finalizer thread against a deadline, reports what it did, then closes the
//! process to registrations; and the `atexit(3)` hook that calls it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use crate::panics::lock;

use super::registration::*;
use super::service::*;
use super::*;
/// What [`run_exit_finalizers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitDrainReport {
    /// Callbacks that ran to completion.
    pub ran: u32,
    /// Callbacks that panicked.
    pub failed: u32,
    /// Callbacks that did not run to completion: refused by their [`Host`],
    /// never started before the deadline, or still running at the deadline.
    pub skipped: u32,
    /// Whether the deadline ran out before the drain was over.
    pub timed_out: bool,
}

impl Service {
    /// The exit drain; see [`run_exit_finalizers`].
    pub(super) fn run_exit(&'static self, timeout: Duration) -> ExitDrainReport {
        let deadline = Instant::now().checked_add(timeout);
        let me = std::thread::current().id();
        let mut inner = lock(&self.inner);
        match inner.phase {
            ServicePhase::Closed => return inner.report.unwrap_or_default(),
            ServicePhase::Open => {
                inner.phase = ServicePhase::Draining;
                inner.tally = ExitDrainReport::default();
                if inner.thread.is_none() || inner.thread == Some(me) {
                    return self.drain_here(inner, deadline);
                }
                self.wake.notify_all();
            }
            ServicePhase::Draining => {
                if inner.thread == Some(me) {
                    // A callback of the drain calls this: go on draining here.
                    return self.drain_here(inner, deadline);
                }
            }
        }
        loop {
            if inner.phase == ServicePhase::Closed {
                return inner.report.unwrap_or_default();
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if now >= d => return self.give_up(inner),
                Some(d) => d - now,
                None => Duration::from_secs(3600),
            };
            inner = self.changed.wait_timeout(inner, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The exit drain on the calling thread: when there is no finalizer thread,
    /// or the caller is the finalizer thread.
    pub(super) fn drain_here(
        &'static self,
        mut inner: MutexGuard<'_, ServiceState>,
        deadline: Option<Instant>,
    ) -> ExitDrainReport {
        loop {
            if inner.phase == ServicePhase::Closed {
                return inner.report.unwrap_or_default();
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.give_up(inner);
            }
            let Some(entry) = next_exit_entry(&mut inner) else {
                return self.finish(&mut inner);
            };
            drop(inner);
            let outcome = entry.run();
            drop(entry);
            inner = lock(&self.inner);
            if inner.phase == ServicePhase::Draining {
                tally(&mut inner.tally, &outcome);
            }
        }
    }

    pub(super) fn finish(&self, inner: &mut ServiceState) -> ExitDrainReport {
        inner.phase = ServicePhase::Closed;
        let report = inner.tally;
        inner.report = Some(report);
        self.changed.notify_all();
        self.wake.notify_all();
        report
    }

    /// The deadline ran out: close, and count and report what did not run.
    pub(super) fn give_up(&self, mut inner: MutexGuard<'_, ServiceState>) -> ExitDrainReport {
        inner.phase = ServicePhase::Closed;
        let mut out = inner.tally;
        out.timed_out = true;
        let mut incidents = Vec::new();
        let me = std::thread::current().id();
        if inner.thread != Some(me) {
            if let Some(entry) = inner.current.take() {
                if entry.state.load(Ordering::SeqCst) == RUNNING {
                    out.skipped += 1;
                    incidents.push(Incident::Overran { label: entry.label.clone(), priority: entry.priority() });
                }
                std::mem::forget(entry);
            }
        }
        for (_, entry) in std::mem::take(&mut inner.registry) {
            if entry.at_exit.load(Ordering::SeqCst)
                && entry.state.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            {
                out.skipped += 1;
                incidents.push(Incident::Skipped { label: entry.label.clone(), priority: entry.priority() });
            }
            // Left alone: the process is exiting, and its destructor might block too.
            std::mem::forget(entry);
        }
        // Queued entries may hold the last reference to a finished registration:
        // leak them rather than drop them under the lock (the process is exiting).
        std::mem::forget(std::mem::take(&mut inner.queue));
        inner.report = Some(out);
        self.changed.notify_all();
        self.wake.notify_all();
        drop(inner);
        for incident in incidents {
            report(incident);
        }
        out
    }
}

/// The next callback of the exit drain: highest priority, then last registered.
/// Registrations not marked to run at exit are cancelled and left alone.
pub(super) fn next_exit_entry(inner: &mut ServiceState) -> Option<Arc<Entry>> {
    while let Some((_, entry)) = inner.registry.pop_last() {
        // A scheduled one was asked to run: it runs at exit if it has not yet.
        if entry.at_exit.load(Ordering::SeqCst) || entry.scheduled.load(Ordering::SeqCst) {
            return Some(entry);
        }
        let _ = entry.state.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
        std::mem::forget(entry);
    }
    None
}

pub(super) fn tally(report: &mut ExitDrainReport, outcome: &Outcome) {
    match outcome {
        Outcome::NotPending => {}
        Outcome::Ran => report.ran += 1,
        Outcome::Panicked => report.failed += 1,
        Outcome::Refused => report.skipped += 1,
    }
}

pub(super) fn dispose(host: Option<&Arc<dyn Host>>, callback: Callback) {
    let result = match host {
        Some(host) => catch_unwind(AssertUnwindSafe(|| host.discard(callback))),
        None => catch_unwind(AssertUnwindSafe(move || drop(callback))),
    };
    if let Err(p) = result {
        crate::panics::drop_payload(p);
        tracing::error!("dropping a refused finalizer callback panicked");
    }
}

pub(super) static ATEXIT_INSTALLED: AtomicBool = AtomicBool::new(false);

pub(super) fn install_atexit() {
    if ATEXIT_INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: registers a function that takes nothing and never unwinds.
    if unsafe { libc::atexit(at_exit_hook) } != 0 {
        ATEXIT_INSTALLED.store(false, Ordering::SeqCst);
        tracing::warn!("cannot install the exit hook; exit finalizers run only on a worker's exit path");
    }
}

extern "C" fn at_exit_hook() {
    if let Err(p) = catch_unwind(|| run_exit_finalizers(exit_timeout())) {
        crate::panics::drop_payload(p);
    }
}

/// Runs this process's remaining exit finalizers: higher priority first, last
/// registered first among equals, on the finalizer thread, while this thread
/// waits at most `timeout`. What did not run by then is abandoned, counted as
/// skipped and reported. Afterwards the process is closed to registrations.
///
/// Call it once the process is about to exit: a pool worker's exit path does,
/// and so does an `atexit` hook in any other program. Calling it again returns
/// the first call's report and runs nothing. The caller must not hold anything
/// the callbacks need (a Python caller releases the GIL while it waits). Called
/// from the finalizer thread (a callback that exits the process), it runs the
/// rest of the callbacks on that thread.
pub fn run_exit_finalizers(timeout: Duration) -> ExitDrainReport {
    service().run_exit(timeout)
}
