//! Finalizers without hidden concurrency: a finalizer thread, guardians, and
//! exit finalizers that run in priority order.
//!
//! A finalizer that runs at an arbitrary point of a program (in the middle of an
//! iteration over a registry, inside a signal handler, on whatever thread
//! happened to drop the last reference) is concurrency the program never asked
//! for (Boehm, *Destructors, Finalizers, and Synchronization*). This module makes
//! the timing explicit. There are four ways a cleanup callback runs, and each
//! says on which thread:
//!
//! | made with | runs when | on which thread |
//! |-----------|-----------|-----------------|
//! | [`guard`] → [`Guarded<T>`] | soon after the value is dropped | the finalizer thread |
//! | [`register`] (or a guard whose value is still alive) | at process exit, in priority order | the finalizer thread (see [At exit](#at-exit)) |
//! | [`Token::run_now`] | now | the calling thread |
//! | [`Guardian::register`] → [`Ward<T>`] | never by itself: [`Guardian::drain`] hands the dropped values back | the thread that drains |
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! let log = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&log);
//! // Dropping `file` only enqueues; the callback runs on the finalizer thread.
//! let file = warden::finalize::guard("data.tmp", 0, move || {
//!     sink.lock().unwrap().push("removed data.tmp");
//! })?;
//! drop(file);
//! assert!(warden::finalize::wait_idle(Duration::from_secs(5)));
//! assert_eq!(*log.lock().unwrap(), ["removed data.tmp"]);
//!
//! // An exit finalizer: runs when the process exits, higher priority first.
//! warden::finalize::register(|| println!("bye"), 10)?;
//! # Ok::<(), warden::finalize::FinalizeError>(())
//! ```
//!
//! # The finalizer thread
//!
//! One thread per process, named [`THREAD_NAME`], started by the first
//! registration. It runs callbacks one at a time, in the order their values were
//! dropped ([`Token::schedule`]). No lock of this module is held while a callback
//! runs, so a callback may register, cancel, run or drop other finalizers. A
//! callback that panics is caught and reported (below); the thread goes on.
//!
//! Every callback runs at most once: a registration moves atomically from
//! pending to running to done (or from pending to cancelled), whichever of
//! [`Token::run_now`], the finalizer thread and the exit drain gets there first.
//!
//! # At exit
//!
//! [`run_exit_finalizers`] runs the callbacks still pending, higher priority
//! first and, among equal priorities, the last registered first (the order of
//! `multiprocessing.util.Finalize(exitpriority=…)` and of `atexit`). It hands
//! them to the finalizer thread and waits, at most until its deadline; a
//! callback still running then is abandoned and, with those that never started,
//! counted as skipped and reported. Registrations made while the drain runs are
//! picked up; once it is over the process is *closed*: [`register`] fails with
//! [`FinalizeError::Closed`], and later calls of [`run_exit_finalizers`] return
//! the first call's report without running anything.
//!
//! Who calls it:
//!
//! * a pool worker or one-off child calls it on its one exit path
//!   (see ARCHITECTURE.md, "Worker lifecycle"), after the user's exit hook, and reports the counts to
//!   the parent in its `Goodbye`;
//! * any other program gets it from an `atexit(3)` hook that the first
//!   registration installs, with [`exit_timeout`] as the deadline. It runs when
//!   `main` returns, when [`std::process::exit`] is called, and when `main`
//!   panics (with the default `panic = "unwind"`). It does **not** run when the
//!   process is killed by a signal whose default action is to terminate (use a
//!   pool worker, whose signal handling routes SIGTERM through the exit path),
//!   on `abort` (including any panic under `panic = "abort"`), on
//!   `libc::_exit`, or on `exec`.
//!
//! # Processes
//!
//! A registration belongs to the process that made it. A `fork()`ed child
//! inherits a copy of the parent's registrations but never runs them: not at
//! exit, not through [`Token::run_now`] or [`Token::schedule`] (both return
//! `false` there), and it never drops them either (their destructors might
//! release the parent's resources). The child gets a fresh service of its own,
//! with its own thread, on its first registration. Pool workers are new
//! programs (`exec`), so they start with no registrations at all.
//!
//! # Reports
//!
//! A callback that panics, a callback its [`Host`] refuses to run, and a
//! callback that could not run before the exit deadline are [`Incident`]s: each
//! is logged with `tracing` and passed to the sink set with [`set_sink`], on the
//! thread that saw it. The panic also goes through the process's panic hook
//! first, as any panic does (by default it prints a message on stderr).
//!
//! # Hosts
//!
//! A [`Host`] lets the runtime that owns a callback (the Python interpreter, for
//! the Python package) refuse to run it, e.g. once the interpreter is
//! finalizing, and dispose of callbacks that will never run in a way that is
//! safe for it.
//!
//! # Caveats
//!
//! * A finalizer *is* concurrency: it runs on another thread, at a time the
//!   program does not choose. Whatever state a callback shares with the rest of
//!   the program must be synchronized (a `Mutex`, an atomic, a channel). The
//!   guarantee is only that it never runs *in the middle of* the dropping
//!   thread's code, so a callback that locks a mutex the dropping thread holds
//!   waits for it instead of deadlocking or seeing a half-done update. A program
//!   that wants no concurrency at all uses a [`Guardian`].
//! * Callbacks run one at a time: a slow or blocking callback delays every
//!   other one. At exit, it is abandoned at the deadline.
//! * A process short of threads (`EAGAIN` under `RLIMIT_NPROC` or a cgroup's
//!   `pids.max`) still registers: the thread is started at the next
//!   registration or schedule that can, [`wait_idle`] waits for one (trying
//!   every 10 ms) to run what is scheduled, and the exit drain runs what is
//!   still pending on the thread that calls it.
//! * [`run_exit_finalizers`] and [`wait_idle`] wait for the finalizer thread:
//!   the caller must not hold anything the callbacks need (a Python caller must
//!   release the GIL while it waits).
//! * A callback must not call [`std::process::exit`]. If one does while the
//!   program runs (a guard dropped, a scheduled callback), the remaining exit
//!   finalizers run on the finalizer thread inside that call, and the process
//!   exits with its code. If one does during the exit drain, the process is
//!   exiting already and the call never returns: the drain reports that
//!   callback [`Overran`](Incident::Overran) at its deadline and the ones after
//!   it [`Skipped`](Incident::Skipped), and the process exits with the code it
//!   was exiting with, not the callback's.
//! * The exit drain is not a destructor pass: values still alive at exit are
//!   not dropped; only their registered callbacks run.
//! * Built with `panic = "abort"`, a panicking callback aborts the process.
//! * After `fork()` in a multi-threaded process, POSIX allows the child only
//!   async-signal-safe calls until it `exec`s; registering in such a child
//!   starts a thread and allocates, which is outside that contract.

//!
//! # Where things are
//!
//! * `registration`: registrations, [`Token`], [`Finalizer`], [`register`],
//!   [`guard`] and [`Guarded`];
//! * `service`: the per-process finalizer service and its thread;
//! * `exit`: the exit drain ([`run_exit_finalizers`]) and the `atexit` hook;
//! * `guardian`: [`Guardian`] and [`Ward`], which run nothing by themselves.

mod exit;
mod guardian;
mod registration;
mod service;
#[cfg(test)]
mod tests;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use exit::{run_exit_finalizers, ExitDrainReport};
pub use guardian::{Guardian, Ward};
pub use registration::{guard, register, Finalizer, Guarded, State, Token};
pub use service::{is_finalizer_thread, wait_idle};

/// The name of the finalizer thread.
pub const THREAD_NAME: &str = "warden-finalizer";

/// Default deadline of the exit drain (see [`exit_timeout`]).
pub const DEFAULT_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

/// A finalizer callback, as the service stores it.
pub type Callback = Box<dyn FnOnce() + Send + 'static>;

/// Receives [`Incident`]s (see [`set_sink`]).
pub type Sink = Arc<dyn Fn(&Incident) + Send + Sync + 'static>;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FinalizeError {
    /// The process's exit finalizers have already run; nothing may be
    /// registered any more.
    #[error("this process's finalizers have already run for the last time; no new registrations")]
    Closed,
}

/// Something about a callback that the program should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incident {
    /// The callback panicked (the panic was caught).
    Panicked {
        /// The registration's label.
        label: String,
        /// Its priority.
        priority: i32,
        /// The panic message.
        message: String,
    },
    /// The callback's [`Host`] refused to run it; it was discarded.
    Refused {
        /// The registration's label.
        label: String,
        /// Its priority.
        priority: i32,
    },
    /// The exit deadline ran out before the callback started.
    Skipped {
        /// The registration's label.
        label: String,
        /// Its priority.
        priority: i32,
    },
    /// The exit deadline ran out while the callback was running; it was abandoned.
    Overran {
        /// The registration's label.
        label: String,
        /// Its priority.
        priority: i32,
    },
}

impl Incident {
    /// The label of the registration concerned.
    pub fn label(&self) -> &str {
        match self {
            Incident::Panicked { label, .. }
            | Incident::Refused { label, .. }
            | Incident::Skipped { label, .. }
            | Incident::Overran { label, .. } => label,
        }
    }

    /// The priority of the registration concerned.
    pub fn priority(&self) -> i32 {
        match self {
            Incident::Panicked { priority, .. }
            | Incident::Refused { priority, .. }
            | Incident::Skipped { priority, .. }
            | Incident::Overran { priority, .. } => *priority,
        }
    }
}

impl fmt::Display for Incident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Incident::Panicked { label, message, .. } => write!(f, "finalizer {label} panicked: {message}"),
            Incident::Refused { label, .. } => write!(f, "finalizer {label} was refused by its host"),
            Incident::Skipped { label, .. } => write!(f, "finalizer {label} did not run before the exit deadline"),
            Incident::Overran { label, .. } => write!(f, "finalizer {label} was still running at the exit deadline"),
        }
    }
}

/// The runtime that owns some callbacks, and decides whether they may run.
///
/// Both methods are called on the thread about to run (or dispose of) the
/// callback, with no lock of this module held. A panic in either is caught:
/// in [`admit`](Host::admit) it counts as a refusal.
pub trait Host: Send + Sync + 'static {
    /// Whether this host's callbacks may run now. A refused callback is never
    /// run: it is passed to [`discard`](Host::discard) and reported as
    /// [`Incident::Refused`].
    fn admit(&self) -> bool;

    /// Disposes of a callback that will never run: refused, or cancelled with
    /// [`Token::cancel`]. The default drops it. A host whose callbacks must not
    /// be dropped at some point (e.g. they hold objects of an interpreter that
    /// is shutting down) can leak them instead with [`std::mem::forget`].
    fn discard(&self, callback: Callback) {
        drop(callback);
    }
}

// ---------------------------------------------------------------------------
// Configuration

fork_safe_mutex! {
    /// The incident sink [`set_sink`] set.
    static SINK: Option<Sink> = None;
    /// Locks [`SINK`].
    fn sink;
}
static EXIT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_EXIT_TIMEOUT.as_millis() as u64);

/// Sets the sink that receives [`Incident`]s, besides `tracing`, and returns the
/// previous one. `None` removes it. The sink is called on the thread that saw
/// the incident (usually the finalizer thread); a panic in it is caught.
pub fn set_sink(sink: Option<Sink>) -> Option<Sink> {
    std::mem::replace(&mut *self::sink(), sink)
}

/// The deadline the `atexit` hook gives [`run_exit_finalizers`], and the one a
/// pool worker's exit path gives it (default [`DEFAULT_EXIT_TIMEOUT`]).
pub fn exit_timeout() -> Duration {
    Duration::from_millis(EXIT_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Sets [`exit_timeout`] for this process. A pool worker reads it when it
/// exits, so a worker's start hook or a task can set it for that worker. Keep it
/// below the pool's grace period, or the pool may kill the worker first.
pub fn set_exit_timeout(timeout: Duration) {
    EXIT_TIMEOUT_MS.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn report(incident: Incident) {
    match &incident {
        Incident::Panicked { label, priority, message } => {
            tracing::error!(label = %label, priority, message = %message, "finalizer panicked");
        }
        Incident::Refused { label, priority } => {
            tracing::warn!(label = %label, priority, "finalizer refused by its host");
        }
        Incident::Skipped { label, priority } => {
            tracing::warn!(label = %label, priority, "finalizer did not run before the exit deadline");
        }
        Incident::Overran { label, priority } => {
            tracing::warn!(label = %label, priority, "finalizer still running at the exit deadline");
        }
    }
    let sink = self::sink().clone();
    if let Some(sink) = sink {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| sink(&incident))) {
            crate::panics::drop_payload(p);
            tracing::error!("the finalizer incident sink panicked");
        }
    }
}
