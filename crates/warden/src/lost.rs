//! Cleanup in the parent for workers that could not clean up themselves.
//!
//! A worker killed by SIGKILL (the kernel's OOM killer, `kill -9`) or that
//! crashed (a segfault, an abort, an `_exit` inside a task) never ran its exit
//! path: its exit hook and finalizers did not run, and whatever it created
//! outside itself (a temporary directory, a lock file, a session on a server)
//! is still there. Its parent can clean up: a pool's
//! [`crate::Builder::on_worker_lost`] hook is called with a [`LostWorker`] for
//! every worker that ended without saying goodbye, carrying the record the
//! worker left for this purpose ([`crate::set_cleanup_record`]).
//!
//! The hook runs on a thread of its own (`<pool name>-lost`), never on the
//! supervisor thread: a slow hook (removing a large directory, a network
//! call) delays neither the other workers nor any task's outcome.
//!
//! # Caveats
//!
//! * Hooks run one at a time, in the order the workers were reaped.
//! * A hook that panics is logged; the hooks after it still run.
//! * [`crate::Pool::join`] waits for pending hooks after the last worker is
//!   reaped, within its timeout; without one, for at most the pool's grace
//!   period, after which a hook still running is left to finish on its own.
//! * A worker that ended through its exit path (retired, stopped by SIGTERM)
//!   is not lost, even if its exit hook failed: it had its chance.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::ExitStatus;

/// A worker that ended without running its exit path.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LostWorker {
    /// The worker's number within its pool.
    pub worker: u64,
    /// Its process id (already reaped: the number may be reused).
    pub pid: i32,
    /// How it ended.
    pub status: ExitStatus,
    /// The id of the task it was running, if any.
    pub task: Option<u64>,
    /// The last record it sent with [`crate::set_cleanup_record`], if any.
    pub record: Option<Vec<u8>>,
}

/// The hook a pool calls for each lost worker.
pub type LostHook = Arc<dyn Fn(&LostWorker) + Send + Sync>;

/// The thread that runs a pool's `on_worker_lost` hook, and a way to wait for
/// it to finish once the pool's supervisor (the only sender) is gone.
pub(crate) struct LostThread {
    done: Done,
    thread: Option<JoinHandle<()>>,
}

/// Set once the hook thread has handled every lost worker and ends.
#[derive(Clone)]
pub(crate) struct Done(Arc<(Mutex<bool>, Condvar)>);

impl Done {
    /// Whether it is set.
    pub(crate) fn is_set(&self) -> bool {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for it; `false` if it is not set by then.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout.min(crate::pool::LONGEST_WAIT);
        let (lock, cv) = &*self.0;
        let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = cv.wait_timeout(done, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

impl LostThread {
    /// Starts the thread; it ends once every sender is dropped and every
    /// lost worker sent before that was handled.
    pub(crate) fn start(name: &str, hook: LostHook) -> std::io::Result<(Sender<LostWorker>, LostThread)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&done);
        let thread = crate::threads::spawn(crate::threads::named(format!("{name}-lost")), move || {
            run(&rx, &hook);
            *flag.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            flag.1.notify_all();
        })?;
        Ok((tx, LostThread { done: Done(done), thread: Some(thread) }))
    }

    /// Whether the caller is this thread (a hook that stops its own pool).
    pub(crate) fn is_current(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.thread().id() == std::thread::current().id())
    }

    /// A handle on its end, to wait for without holding this.
    pub(crate) fn done(&self) -> Done {
        self.done.clone()
    }

    /// Waits up to `timeout` for the thread to finish, and joins it; `false`
    /// if it has not finished.
    pub(crate) fn wait(&mut self, timeout: Duration) -> bool {
        if !self.done.wait(timeout) {
            return false;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        true
    }
}

fn run(rx: &Receiver<LostWorker>, hook: &LostHook) {
    for lost in rx {
        let pid = lost.pid;
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&lost))) {
            let msg = crate::panics::panic_text(&*p);
            crate::panics::drop_payload(p);
            tracing::error!(pid, "on_worker_lost hook panicked: {msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(pid: i32) -> LostWorker {
        LostWorker { worker: 1, pid, status: ExitStatus::Signal(9), task: None, record: None }
    }

    #[test]
    fn hooks_run_in_order_and_a_panic_does_not_stop_the_next() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let hook: LostHook = Arc::new(move |l: &LostWorker| {
            sink.lock().unwrap().push(l.pid);
            assert_ne!(l.pid, 2, "a failing hook");
        });
        let (tx, mut thread) = LostThread::start("test", hook).unwrap();
        for pid in 1..=3 {
            tx.send(lost(pid)).unwrap();
        }
        drop(tx);
        assert!(thread.wait(Duration::from_secs(10)));
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_hook_that_hangs_bounds_the_wait() {
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let hook: LostHook = Arc::new(move |_: &LostWorker| {
            let _ = release_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        });
        let (tx, mut thread) = LostThread::start("test", hook).unwrap();
        tx.send(lost(1)).unwrap();
        drop(tx);
        let start = Instant::now();
        assert!(!thread.wait(Duration::from_millis(100)));
        assert!(start.elapsed() < Duration::from_secs(5));
        release_tx.send(()).unwrap();
        assert!(thread.wait(Duration::from_secs(10)));
    }
}
