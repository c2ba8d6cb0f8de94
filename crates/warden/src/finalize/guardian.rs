//! Guardians: values handed back to the program when their owners drop them,
//! at a point the program chooses. Nothing here runs a callback.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr;
use std::sync::{Arc, Mutex, Weak};

use crate::panics::lock;

pub(super) type Dead<T> = Mutex<Vec<T>>;

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
    pub(super) dead: Arc<Dead<T>>,
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
    pub(super) value: ManuallyDrop<T>,
    pub(super) home: Weak<Dead<T>>,
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
