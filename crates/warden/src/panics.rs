//! Living with panics elsewhere: a lock that ignores poisoning, and the text
//! of a caught panic.
//!
//! The supervisor, the worker loop and the finalizer service all catch panics
//! (in user code, hooks and callbacks) and go on; a mutex poisoned by such a
//! panic still holds consistent data here, because no lock is held across
//! user code.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a panicking thread poisoned it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops a caught panic's payload, whose `Drop` may panic too (a payload of
/// the program's own type): that panic is caught as well, and its own
/// payload leaked rather than dropped, so nothing unwinds out of the place
/// that caught the first. (A worker that let it out lost its exit path, and
/// the next task was blamed for the crash.)
pub(crate) fn drop_payload(payload: Box<dyn std::any::Any + Send>) {
    if let Err(again) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// The text of a caught panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}
