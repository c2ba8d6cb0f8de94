//! Registrations: a callback with its priority, label, host and exit flag;
//! the [`Token`] that runs, schedules or cancels it; and [`Guarded`], a value
//! whose drop schedules its callback. Each callback runs at most once: its
//! state moves atomically from pending to running to done, or to cancelled.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::panics::{lock, panic_text};

use super::service::*;
use super::*;
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

pub(super) const PENDING: u8 = 0;
pub(super) const RUNNING: u8 = 1;
pub(super) const DONE: u8 = 2;
pub(super) const CANCELLED: u8 = 3;

/// Priority, then registration number: the exit drain runs the largest key first.
pub(super) type Key = (i32, u64);

pub(super) struct Entry {
    pub(super) service: &'static Service,
    pub(super) key: Key,
    /// The process that registered it; no other process runs it.
    pub(super) pid: u32,
    pub(super) state: AtomicU8,
    pub(super) scheduled: AtomicBool,
    pub(super) at_exit: AtomicBool,
    pub(super) callback: Mutex<Option<Callback>>,
    pub(super) host: Option<Arc<dyn Host>>,
    pub(super) label: String,
}

pub(super) enum Outcome {
    /// Someone else got it first, or it belongs to another process.
    NotPending,
    Ran,
    Panicked,
    Refused,
}

impl Entry {
    pub(super) fn priority(&self) -> i32 {
        self.key.0
    }

    pub(super) fn ours(&self) -> bool {
        self.pid == std::process::id()
    }

    /// Pending → running, and the callback out of its slot.
    pub(super) fn claim(&self) -> Option<Callback> {
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
    pub(super) fn run(&self) -> Outcome {
        let Some(callback) = self.claim() else { return Outcome::NotPending };
        let admitted = match &self.host {
            None => true,
            Some(host) => catch_unwind(AssertUnwindSafe(|| host.admit())).unwrap_or_else(|p| {
                crate::panics::drop_payload(p);
                false
            }),
        };
        let (label, priority) = (|| self.label.clone(), self.priority());
        let (outcome, incident) = if admitted {
            match catch_unwind(AssertUnwindSafe(callback)) {
                Ok(()) => (Outcome::Ran, None),
                Err(payload) => {
                    let message = panic_text(&*payload);
                    // A payload whose destructor panics must not escape either.
                    crate::panics::drop_payload(payload);
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

    pub(super) fn discard(&self, callback: Callback) {
        let result = match &self.host {
            Some(host) => catch_unwind(AssertUnwindSafe(|| host.discard(callback))),
            None => catch_unwind(AssertUnwindSafe(move || drop(callback))),
        };
        if let Err(p) = result {
            crate::panics::drop_payload(p);
            tracing::error!(label = %self.label, "dropping a finalizer callback panicked");
        }
    }

    pub(super) fn state(&self) -> State {
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
    pub(super) entry: Arc<Entry>,
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
    /// [Reports](crate::finalize#reports)); this call still returns `true`. It does not wait
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
    pub(super) callback: Callback,
    pub(super) priority: i32,
    pub(super) label: Option<String>,
    pub(super) host: Option<Arc<dyn Host>>,
    pub(super) at_exit: bool,
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

    /// A label for reports (default: `#N`, the registration's number):
    /// an [`Incident`] reads "finalizer {label} panicked: …".
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
    pub(super) value: ManuallyDrop<T>,
    pub(super) token: Token,
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
