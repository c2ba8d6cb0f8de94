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
//!   ([`crate::worker`]), after the user's exit hook, and reports the counts to
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
//! * [`run_exit_finalizers`] and [`wait_idle`] wait for the finalizer thread:
//!   the caller must not hold anything the callbacks need (a Python caller must
//!   release the GIL while it waits).
//! * A callback must not call [`std::process::exit`]; if it does, the remaining
//!   exit finalizers run on the finalizer thread inside that call.
//! * The exit drain is not a destructor pass: values still alive at exit are
//!   not dropped; only their registered callbacks run.
//! * Built with `panic = "abort"`, a panicking callback aborts the process.
//! * After `fork()` in a multi-threaded process, POSIX allows the child only
//!   async-signal-safe calls until it `exec`s; registering in such a child
//!   starts a thread and allocates, which is outside that contract.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::worker::panic_text;

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
    /// The finalizer thread could not be started.
    #[error("cannot start the finalizer thread: {0}")]
    Thread(#[source] io::Error),
}

/// What [`run_exit_finalizers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitReport {
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

static SINK: Mutex<Option<Sink>> = Mutex::new(None);
static EXIT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_EXIT_TIMEOUT.as_millis() as u64);

/// Sets the sink that receives [`Incident`]s, besides `tracing`, and returns the
/// previous one. `None` removes it. The sink is called on the thread that saw
/// the incident (usually the finalizer thread); a panic in it is caught.
pub fn set_sink(sink: Option<Sink>) -> Option<Sink> {
    std::mem::replace(&mut *lock(&SINK), sink)
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
    let sink = lock(&SINK).clone();
    if let Some(sink) = sink {
        if catch_unwind(AssertUnwindSafe(|| sink(&incident))).is_err() {
            tracing::error!("the finalizer incident sink panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Registrations

/// The state of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Registered; the callback has not started.
    Pending,
    /// The callback is running.
    Running,
    /// The callback ran (or panicked).
    Done,
    /// The callback will never run: cancelled, refused by its host, or left
    /// over at exit.
    Cancelled,
}

const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
const CANCELLED: u8 = 3;

/// Priority, then registration number: the exit drain runs the largest key first.
type Key = (i32, u64);

struct Entry {
    service: &'static Service,
    key: Key,
    /// The process that registered it; no other process runs it.
    pid: u32,
    state: AtomicU8,
    scheduled: AtomicBool,
    at_exit: AtomicBool,
    callback: Mutex<Option<Callback>>,
    host: Option<Arc<dyn Host>>,
    label: String,
}

enum Outcome {
    /// Someone else got it first, or it belongs to another process.
    NotPending,
    Ran,
    Panicked,
    Refused,
}

impl Entry {
    fn priority(&self) -> i32 {
        self.key.0
    }

    fn ours(&self) -> bool {
        self.pid == std::process::id()
    }

    /// Pending → running, and the callback out of its slot.
    fn claim(&self) -> Option<Callback> {
        if !self.ours() {
            return None;
        }
        self.state.compare_exchange(PENDING, RUNNING, Ordering::SeqCst, Ordering::SeqCst).ok()?;
        let callback = lock(&self.callback).take();
        if callback.is_none() {
            self.state.store(DONE, Ordering::SeqCst);
        }
        callback
    }

    /// Runs the callback here if it is still pending. Holds no lock while the
    /// callback (or its host) runs.
    fn run(&self) -> Outcome {
        let Some(callback) = self.claim() else { return Outcome::NotPending };
        let admitted = match &self.host {
            None => true,
            Some(host) => catch_unwind(AssertUnwindSafe(|| host.admit())).unwrap_or(false),
        };
        let (label, priority) = (|| self.label.clone(), self.priority());
        let (outcome, incident) = if admitted {
            match catch_unwind(AssertUnwindSafe(callback)) {
                Ok(()) => (Outcome::Ran, None),
                Err(payload) => {
                    let message = panic_text(&*payload);
                    // A payload whose destructor panics must not escape either.
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
                    (Outcome::Panicked, Some(Incident::Panicked { label: label(), priority, message }))
                }
            }
        } else {
            self.discard(callback);
            (Outcome::Refused, Some(Incident::Refused { label: label(), priority }))
        };
        let end = if matches!(outcome, Outcome::Refused) { CANCELLED } else { DONE };
        self.state.store(end, Ordering::SeqCst);
        self.service.forget(self.key);
        if let Some(incident) = incident {
            report(incident);
        }
        outcome
    }

    fn discard(&self, callback: Callback) {
        let result = match &self.host {
            Some(host) => catch_unwind(AssertUnwindSafe(|| host.discard(callback))),
            None => catch_unwind(AssertUnwindSafe(move || drop(callback))),
        };
        if result.is_err() {
            tracing::error!(label = %self.label, "dropping a finalizer callback panicked");
        }
    }

    fn state(&self) -> State {
        match self.state.load(Ordering::SeqCst) {
            PENDING => State::Pending,
            RUNNING => State::Running,
            DONE => State::Done,
            _ => State::Cancelled,
        }
    }
}

/// A handle on one registration. Cloning it makes another handle on the same
/// registration; dropping handles changes nothing (a registration with no
/// handle left still runs when its value is dropped or at exit).
///
/// In a process other than the one that made the registration (a `fork()`ed
/// child), [`run_now`](Token::run_now), [`schedule`](Token::schedule),
/// [`cancel`](Token::cancel) and [`is_pending`](Token::is_pending) do nothing
/// and return `false`.
#[derive(Clone)]
pub struct Token {
    entry: Arc<Entry>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.entry.label)
            .field("priority", &self.entry.priority())
            .field("state", &self.state())
            .finish()
    }
}

impl Token {
    /// Runs the callback now, on the calling thread, unless it has already run,
    /// started, or been cancelled. Returns whether this call ran it. Idempotent:
    /// of any number of concurrent calls, the finalizer thread and the exit
    /// drain, at most one runs the callback.
    ///
    /// A panic in the callback is caught and reported like any other (see
    /// [Reports](self#reports)); this call still returns `true`. It does not wait
    /// for a run that another thread has already started.
    pub fn run_now(&self) -> bool {
        matches!(self.entry.run(), Outcome::Ran | Outcome::Panicked)
    }

    /// Asks the finalizer thread to run the callback soon. This is what dropping
    /// a [`Guarded`] value does; a host runtime calls it when the object it
    /// watches dies (e.g. from a Python `weakref` callback). Returns at once,
    /// without running anything on this thread. Returns `false` if the callback
    /// is no longer pending, was already scheduled, or the process is closed.
    pub fn schedule(&self) -> bool {
        let entry = &self.entry;
        if !entry.ours() || entry.state.load(Ordering::SeqCst) != PENDING {
            return false;
        }
        if entry.scheduled.swap(true, Ordering::SeqCst) {
            return false;
        }
        entry.service.enqueue(Arc::clone(entry))
    }

    /// Cancels the callback if it has not started: it will never run, and is
    /// disposed of (dropped, or passed to its host's [`Host::discard`]) on this
    /// thread. Returns whether this call cancelled it.
    pub fn cancel(&self) -> bool {
        let entry = &self.entry;
        if !entry.ours() {
            return false;
        }
        if entry.state.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        let callback = lock(&entry.callback).take();
        entry.service.forget(entry.key);
        if let Some(callback) = callback {
            entry.discard(callback);
        }
        true
    }

    /// Whether the callback has neither started nor been cancelled.
    pub fn is_pending(&self) -> bool {
        self.entry.ours() && self.entry.state.load(Ordering::SeqCst) == PENDING
    }

    /// The registration's state (as seen from the process that made it).
    pub fn state(&self) -> State {
        self.entry.state()
    }

    /// The registration's priority.
    pub fn priority(&self) -> i32 {
        self.entry.priority()
    }

    /// The registration's label, as used in [`Incident`]s.
    pub fn label(&self) -> &str {
        &self.entry.label
    }

    /// Whether the callback runs at exit if it is still pending then.
    pub fn at_exit(&self) -> bool {
        self.entry.at_exit.load(Ordering::SeqCst)
    }

    /// Sets whether the callback runs at exit if it is still pending then
    /// (like `weakref.finalize.atexit`). If not, it is left alone at exit:
    /// neither run nor dropped.
    pub fn set_at_exit(&self, at_exit: bool) {
        self.entry.at_exit.store(at_exit, Ordering::SeqCst);
    }
}

/// A registration being built: a callback with its priority, label, host, and
/// whether it runs at exit. [`register`] and [`guard`] are the short forms.
pub struct Finalizer {
    callback: Callback,
    priority: i32,
    label: Option<String>,
    host: Option<Arc<dyn Host>>,
    at_exit: bool,
}

impl fmt::Debug for Finalizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finalizer")
            .field("priority", &self.priority)
            .field("label", &self.label)
            .field("host", &self.host.is_some())
            .field("at_exit", &self.at_exit)
            .finish()
    }
}

impl Finalizer {
    /// A finalizer that runs `callback`, with priority 0, run at exit.
    pub fn new(callback: impl FnOnce() + Send + 'static) -> Self {
        Self::from_box(Box::new(callback))
    }

    /// Like [`Finalizer::new`], for a callback that is already boxed (as a
    /// host runtime's callbacks are).
    pub fn from_box(callback: Callback) -> Self {
        Finalizer { callback, priority: 0, label: None, host: None, at_exit: true }
    }

    /// Exit priority: at exit, higher runs first (default 0). It does not
    /// affect the order of callbacks run because their values were dropped.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// A label for reports (default: `finalizer #N`).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The runtime that owns the callback; see [`Host`].
    pub fn host(mut self, host: Arc<dyn Host>) -> Self {
        self.host = Some(host);
        self
    }

    /// Whether the callback runs at exit if it is still pending then
    /// (default `true`); see [`Token::set_at_exit`].
    pub fn at_exit(mut self, at_exit: bool) -> Self {
        self.at_exit = at_exit;
        self
    }

    /// Registers the callback with this process's finalizer service, starting
    /// the service (its thread and, outside pool workers too, its `atexit` hook)
    /// if this is the first registration. Fails after the final exit drain; the
    /// callback is then disposed of on this thread.
    pub fn register(self) -> Result<Token, FinalizeError> {
        service().register(self)
    }

    /// Registers the callback and ties it to `value`: when the returned
    /// [`Guarded`] is dropped, the callback is scheduled on the finalizer thread.
    pub fn guard<T>(self, value: T) -> Result<Guarded<T>, FinalizeError> {
        let token = self.register()?;
        Ok(Guarded { value: ManuallyDrop::new(value), token })
    }
}

/// Registers an exit finalizer: `callback` runs once, at process exit, in
/// priority order (higher first, then last registered first), unless it was
/// run or cancelled earlier through the returned [`Token`].
pub fn register(callback: impl FnOnce() + Send + 'static, priority: i32) -> Result<Token, FinalizeError> {
    Finalizer::new(callback).priority(priority).register()
}

/// Ties `callback` to `value`: when the returned [`Guarded`] is dropped, the
/// callback runs on the finalizer thread; if it is still alive at exit, the
/// callback runs then, with the given exit priority.
///
/// The callback must not need the value itself (it is gone by then): give it
/// what it needs to clean up, e.g. a copy of a file descriptor number.
pub fn guard<T>(
    value: T,
    priority: i32,
    callback: impl FnOnce() + Send + 'static,
) -> Result<Guarded<T>, FinalizeError> {
    Finalizer::new(callback).priority(priority).guard(value)
}

/// A value with a finalizer: dropping it drops the value on the dropping thread
/// and then only *schedules* the callback, which runs on the finalizer thread.
/// Dereferences to the value.
pub struct Guarded<T> {
    value: ManuallyDrop<T>,
    token: Token,
}

impl<T> Guarded<T> {
    /// The registration, e.g. to [`Token::run_now`] or [`Token::cancel`] it.
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// Takes the value out without scheduling the callback. The registration
    /// stays as it is: pending until it is run, cancelled, or exit.
    pub fn into_parts(self) -> (T, Token) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so its fields are moved out exactly
        // once, here.
        unsafe { (ManuallyDrop::take(&mut this.value), ptr::read(&this.token)) }
    }
}

impl<T> Deref for Guarded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Guarded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Guarded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded").field("value", &*self.value).field("token", &self.token).finish()
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        // Schedule even if the value's destructor panics.
        struct Schedule<'a>(&'a Token);
        impl Drop for Schedule<'_> {
            fn drop(&mut self) {
                self.0.schedule();
            }
        }
        let _schedule = Schedule(&self.token);
        // SAFETY: the value is dropped once, here; `self` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.value) }
    }
}

// ---------------------------------------------------------------------------
// Guardians

type Dead<T> = Mutex<Vec<T>>;

/// Hands values back to the program when their owners drop them, at a point
/// the program chooses: nothing runs by itself (Dybvig's *guardians*).
///
/// [`register`](Guardian::register) wraps a value in a [`Ward`]; dropping the
/// ward does not drop the value but moves it into the guardian, and
/// [`drain`](Guardian::drain) returns the values whose wards were dropped since
/// the last drain. The program then cleans them up on its own thread, when it
/// is ready, with no concurrency.
///
/// ```
/// use warden::finalize::Guardian;
///
/// let guardian = Guardian::new();
/// let a = guardian.register(3);
/// let b = guardian.register(4);
/// drop(a);
/// assert_eq!(guardian.drain(), [3]); // 3 came back; nothing ran
/// assert_eq!(*b, 4);
/// ```
///
/// Clones of a guardian share its values. When the last clone is dropped, the
/// values not yet drained are dropped with it, and wards dropped afterwards
/// drop their values in place.
pub struct Guardian<T> {
    dead: Arc<Dead<T>>,
}

impl<T> Guardian<T> {
    /// A guardian with no values.
    pub fn new() -> Self {
        Guardian { dead: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Puts `value` in this guardian's care.
    pub fn register(&self, value: T) -> Ward<T> {
        Ward { value: ManuallyDrop::new(value), home: Arc::downgrade(&self.dead) }
    }

    /// The values whose wards were dropped since the last drain, in the order
    /// they were dropped.
    pub fn drain(&self) -> Vec<T> {
        std::mem::take(&mut *lock(&self.dead))
    }

    /// Whether a drain would return anything.
    pub fn has_dead(&self) -> bool {
        !lock(&self.dead).is_empty()
    }
}

impl<T> Default for Guardian<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Guardian<T> {
    fn clone(&self) -> Self {
        Guardian { dead: Arc::clone(&self.dead) }
    }
}

impl<T> fmt::Debug for Guardian<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guardian").field("dead", &lock(&self.dead).len()).finish()
    }
}

/// A value in a [`Guardian`]'s care. Dereferences to the value; dropping the
/// ward moves the value into the guardian (or drops it, if the guardian is gone).
pub struct Ward<T> {
    value: ManuallyDrop<T>,
    home: Weak<Dead<T>>,
}

impl<T> Ward<T> {
    /// Takes the value back; it will not go to the guardian.
    pub fn into_inner(self) -> T {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the value is moved out exactly
        // once; the weak reference is dropped here as well.
        unsafe {
            ptr::drop_in_place(&mut this.home);
            ManuallyDrop::take(&mut this.value)
        }
    }
}

impl<T> Deref for Ward<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Ward<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Ward<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Ward").field(&*self.value).finish()
    }
}

impl<T> Drop for Ward<T> {
    fn drop(&mut self) {
        // SAFETY: the value is moved out once, here; `self` is not used after.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        match self.home.upgrade() {
            Some(home) => lock(&home).push(value),
            None => drop(value),
        }
    }
}

// ---------------------------------------------------------------------------
// The service

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking registrations; the thread runs scheduled callbacks.
    Open,
    /// The exit drain is running; registrations are still taken.
    Draining,
    /// The exit drain is over; registrations are refused.
    Closed,
}

struct Inner {
    /// Every pending registration, for the exit drain.
    registry: BTreeMap<Key, Arc<Entry>>,
    /// Registrations whose values were dropped, in that order.
    queue: VecDeque<Arc<Entry>>,
    next_seq: u64,
    phase: Phase,
    thread: Option<ThreadId>,
    /// What the finalizer thread is running.
    current: Option<Arc<Entry>>,
    /// Counts of the exit drain so far.
    tally: ExitReport,
    /// The exit drain's final report.
    report: Option<ExitReport>,
}

/// One process's finalizer service. Services are leaked: a `fork()`ed child
/// makes its own and leaves the parent's untouched.
struct Service {
    pid: u32,
    /// Whether this is the process's service (the one the `atexit` hook drains).
    global: bool,
    inner: Mutex<Inner>,
    /// Wakes the finalizer thread.
    wake: Condvar,
    /// Wakes threads waiting for the thread (exit drain, `wait_idle`).
    changed: Condvar,
}

static SERVICE: AtomicPtr<Service> = AtomicPtr::new(ptr::null_mut());

/// This process's service, made on first use. Lock-free, so that a forked
/// child never waits on a lock its parent's threads held at the fork.
fn service() -> &'static Service {
    let pid = std::process::id();
    loop {
        let current = SERVICE.load(Ordering::Acquire);
        // SAFETY: non-null pointers in SERVICE come from `Box::leak` and are
        // never freed.
        if let Some(s) = unsafe { current.as_ref() } {
            if s.pid == pid {
                return s;
            }
        }
        let fresh: *mut Service = Box::leak(Box::new(Service::new(pid, true)));
        match SERVICE.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // The parent's service, if any, stays leaked: its callbacks are not ours.
            // SAFETY: `fresh` was just leaked and is never freed.
            Ok(_) => return unsafe { &*fresh },
            // SAFETY: `fresh` was never published, so this is its only owner.
            Err(_) => drop(unsafe { Box::from_raw(fresh) }),
        }
    }
}

/// This process's service, if it has one.
fn existing_service() -> Option<&'static Service> {
    // SAFETY: as in `service`.
    let s = unsafe { SERVICE.load(Ordering::Acquire).as_ref() }?;
    (s.pid == std::process::id()).then_some(s)
}

impl Service {
    fn new(pid: u32, global: bool) -> Service {
        Service {
            pid,
            global,
            inner: Mutex::new(Inner {
                registry: BTreeMap::new(),
                queue: VecDeque::new(),
                next_seq: 0,
                phase: Phase::Open,
                thread: None,
                current: None,
                tally: ExitReport::default(),
                report: None,
            }),
            wake: Condvar::new(),
            changed: Condvar::new(),
        }
    }

    fn register(&'static self, f: Finalizer) -> Result<Token, FinalizeError> {
        let mut inner = lock(&self.inner);
        let started = match inner.phase {
            Phase::Closed => Err(FinalizeError::Closed),
            Phase::Open | Phase::Draining => self.ensure_thread(&mut inner).map_err(FinalizeError::Thread),
        };
        if let Err(e) = started {
            drop(inner);
            dispose(f.host.as_ref(), f.callback);
            return Err(e);
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let key = (f.priority, seq);
        let entry = Arc::new(Entry {
            service: self,
            key,
            pid: self.pid,
            state: AtomicU8::new(PENDING),
            scheduled: AtomicBool::new(false),
            at_exit: AtomicBool::new(f.at_exit),
            callback: Mutex::new(Some(f.callback)),
            host: f.host,
            label: f.label.unwrap_or_else(|| format!("finalizer #{seq}")),
        });
        inner.registry.insert(key, Arc::clone(&entry));
        Ok(Token { entry })
    }

    fn ensure_thread(&'static self, inner: &mut Inner) -> io::Result<()> {
        if inner.thread.is_some() {
            return Ok(());
        }
        // The new thread's first act is to take the lock we hold: it waits.
        let handle = std::thread::Builder::new().name(THREAD_NAME.into()).spawn(move || self.thread_main())?;
        inner.thread = Some(handle.thread().id());
        if self.global {
            install_atexit();
        }
        Ok(())
    }

    /// Removes a registration that is no longer pending. The entry is dropped
    /// after the lock is released.
    fn forget(&self, key: Key) {
        let removed = lock(&self.inner).registry.remove(&key);
        drop(removed);
    }

    fn enqueue(&self, entry: Arc<Entry>) -> bool {
        let mut inner = lock(&self.inner);
        match inner.phase {
            Phase::Open => {
                inner.queue.push_back(entry);
                self.wake.notify_one();
                true
            }
            // The drain runs it in exit order (it is in the registry).
            Phase::Draining => true,
            Phase::Closed => false,
        }
    }

    fn thread_main(&'static self) {
        let mut inner = lock(&self.inner);
        loop {
            let (entry, exit) = match inner.phase {
                Phase::Closed => {
                    self.changed.notify_all();
                    return;
                }
                Phase::Draining => match next_exit_entry(&mut inner) {
                    Some(entry) => (entry, true),
                    None => {
                        self.finish(&mut inner);
                        return;
                    }
                },
                Phase::Open => match inner.queue.pop_front() {
                    Some(entry) => (entry, false),
                    None => {
                        inner = self.wake.wait(inner).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                },
            };
            inner.current = Some(Arc::clone(&entry));
            drop(inner);
            let outcome = entry.run();
            drop(entry);
            inner = lock(&self.inner);
            let finished = inner.current.take();
            if exit && inner.phase == Phase::Draining {
                tally(&mut inner.tally, &outcome);
            }
            self.changed.notify_all();
            if inner.phase == Phase::Closed {
                // The drain gave up on us; the process is exiting.
                std::mem::forget(finished);
                return;
            }
            // The last reference to an entry may be dropped here: not under the lock.
            drop(inner);
            drop(finished);
            inner = lock(&self.inner);
        }
    }

    /// The exit drain; see [`run_exit_finalizers`].
    fn run_exit(&'static self, timeout: Duration) -> ExitReport {
        let deadline = Instant::now().checked_add(timeout);
        let me = std::thread::current().id();
        let mut inner = lock(&self.inner);
        match inner.phase {
            Phase::Closed => return inner.report.unwrap_or_default(),
            Phase::Open => {
                inner.phase = Phase::Draining;
                inner.tally = ExitReport::default();
                if inner.thread.is_none() || inner.thread == Some(me) {
                    return self.drain_here(inner, deadline);
                }
                self.wake.notify_all();
            }
            Phase::Draining => {
                if inner.thread == Some(me) {
                    // A callback of the drain calls this: go on draining here.
                    return self.drain_here(inner, deadline);
                }
            }
        }
        loop {
            if inner.phase == Phase::Closed {
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
    fn drain_here(&'static self, mut inner: MutexGuard<'_, Inner>, deadline: Option<Instant>) -> ExitReport {
        loop {
            if inner.phase == Phase::Closed {
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
            if inner.phase == Phase::Draining {
                tally(&mut inner.tally, &outcome);
            }
        }
    }

    fn finish(&self, inner: &mut Inner) -> ExitReport {
        inner.phase = Phase::Closed;
        let report = inner.tally;
        inner.report = Some(report);
        self.changed.notify_all();
        self.wake.notify_all();
        report
    }

    /// The deadline ran out: close, and count and report what did not run.
    fn give_up(&self, mut inner: MutexGuard<'_, Inner>) -> ExitReport {
        inner.phase = Phase::Closed;
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

    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let me = std::thread::current().id();
        let mut inner = lock(&self.inner);
        if inner.thread == Some(me) {
            return false;
        }
        loop {
            let idle = match inner.phase {
                Phase::Open => inner.queue.is_empty() && inner.current.is_none(),
                Phase::Draining => false,
                Phase::Closed => true,
            };
            if idle {
                return true;
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if now >= d => return false,
                Some(d) => d - now,
                None => Duration::from_secs(3600),
            };
            inner = self.changed.wait_timeout(inner, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn is_thread(&self) -> bool {
        lock(&self.inner).thread == Some(std::thread::current().id())
    }
}

/// The next callback of the exit drain: highest priority, then last registered.
/// Registrations not marked to run at exit are cancelled and left alone.
fn next_exit_entry(inner: &mut Inner) -> Option<Arc<Entry>> {
    while let Some((_, entry)) = inner.registry.pop_last() {
        if entry.at_exit.load(Ordering::SeqCst) {
            return Some(entry);
        }
        let _ = entry.state.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
        std::mem::forget(entry);
    }
    None
}

fn tally(report: &mut ExitReport, outcome: &Outcome) {
    match outcome {
        Outcome::NotPending => {}
        Outcome::Ran => report.ran += 1,
        Outcome::Panicked => report.failed += 1,
        Outcome::Refused => report.skipped += 1,
    }
}

fn dispose(host: Option<&Arc<dyn Host>>, callback: Callback) {
    let result = match host {
        Some(host) => catch_unwind(AssertUnwindSafe(|| host.discard(callback))),
        None => catch_unwind(AssertUnwindSafe(move || drop(callback))),
    };
    if result.is_err() {
        tracing::error!("dropping a refused finalizer callback panicked");
    }
}

static ATEXIT_INSTALLED: AtomicBool = AtomicBool::new(false);

fn install_atexit() {
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
    let _ = catch_unwind(|| run_exit_finalizers(exit_timeout()));
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
pub fn run_exit_finalizers(timeout: Duration) -> ExitReport {
    service().run_exit(timeout)
}

/// Waits until the finalizer thread has run every callback scheduled so far and
/// is idle, at most `timeout`. Returns whether it is idle; `false` at once when
/// called from the finalizer thread itself (it would wait for itself).
pub fn wait_idle(timeout: Duration) -> bool {
    match existing_service() {
        Some(s) => s.wait_idle(timeout),
        None => true,
    }
}

/// Whether the calling thread is this process's finalizer thread.
pub fn is_finalizer_thread() -> bool {
    existing_service().is_some_and(|s| s.is_thread())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn private_service() -> &'static Service {
        Box::leak(Box::new(Service::new(std::process::id(), false)))
    }

    fn push(log: &Arc<Mutex<Vec<String>>>, s: &str) -> impl FnOnce() + Send + 'static {
        let log = Arc::clone(log);
        let s = s.to_string();
        move || lock(&log).push(s)
    }

    #[test]
    fn handles_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Token>();
        send_sync::<Guarded<u8>>();
        send_sync::<Guardian<u8>>();
        send_sync::<Ward<u8>>();
        send_sync::<FinalizeError>();
    }

    #[test]
    fn exit_drain_runs_higher_priority_first_then_last_registered_first() {
        let svc = private_service();
        let log = Arc::new(Mutex::new(Vec::new()));
        for (name, prio) in [("a0", 0), ("b5", 5), ("c0", 0), ("d-1", -1), ("e5", 5)] {
            svc.register(Finalizer::new(push(&log, name)).priority(prio)).unwrap();
        }
        let report = svc.run_exit(Duration::from_secs(5));
        assert_eq!(*lock(&log), ["e5", "b5", "c0", "a0", "d-1"]);
        assert_eq!(report, ExitReport { ran: 5, failed: 0, skipped: 0, timed_out: false });
    }

    #[test]
    fn registrations_made_while_draining_run_and_later_ones_are_refused() {
        let svc = private_service();
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner_log = Arc::clone(&log);
        svc.register(
            Finalizer::new(move || {
                lock(&inner_log).push("outer".into());
                svc.register(Finalizer::new(push(&inner_log, "added")).priority(-5)).unwrap();
            })
            .priority(1),
        )
        .unwrap();
        svc.register(Finalizer::new(push(&log, "zero"))).unwrap();
        let report = svc.run_exit(Duration::from_secs(5));
        assert_eq!(*lock(&log), ["outer", "zero", "added"]);
        assert_eq!(report.ran, 3);
        assert!(matches!(svc.register(Finalizer::new(|| {})), Err(FinalizeError::Closed)));
        assert_eq!(svc.run_exit(Duration::from_secs(5)), report, "a second drain returns the first report");
    }

    #[test]
    fn exit_deadline_abandons_a_hung_callback_and_skips_the_rest() {
        let svc = private_service();
        let (release, hold) = mpsc::channel::<()>();
        let log = Arc::new(Mutex::new(Vec::new()));
        svc.register(Finalizer::new(push(&log, "low"))).unwrap();
        svc.register(Finalizer::new(push(&log, "low2"))).unwrap();
        svc.register(
            Finalizer::new(move || {
                let _ = hold.recv_timeout(Duration::from_secs(10));
            })
            .priority(9),
        )
        .unwrap();
        let start = Instant::now();
        let report = svc.run_exit(Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(report, ExitReport { ran: 0, failed: 0, skipped: 3, timed_out: true });
        drop(release);
        assert!(svc.wait_idle(Duration::from_secs(5)));
        assert!(lock(&log).is_empty(), "nothing runs after the deadline");
    }

    #[test]
    fn callbacks_not_marked_at_exit_are_left_alone_at_exit() {
        let svc = private_service();
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = svc.register(Finalizer::new(push(&log, "no")).at_exit(false)).unwrap();
        svc.register(Finalizer::new(push(&log, "yes"))).unwrap();
        let report = svc.run_exit(Duration::from_secs(5));
        assert_eq!(*lock(&log), ["yes"]);
        assert_eq!(report.ran, 1);
        assert_eq!(t.state(), State::Cancelled);
    }
}
