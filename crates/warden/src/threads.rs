//! The threads warden starts, known by their kernel thread ids, so that a
//! front end can tell them from the others in its process: a native thread
//! a library started as the program imported it (OpenBLAS's pool, when
//! numpy is imported) means the program's main module starts threads at
//! import, and a zygote that imported it could not fork.
//!
//! # Caveats
//!
//! * Only threads started through [`spawn`] are known; a thread that has
//!   not yet run its first instruction is not in the list.
//! * In a copy of the process made by `fork()` the list starts empty.

use std::io;
use std::sync::Mutex;
use std::thread::{Builder, JoinHandle};

use crate::panics::lock;

/// The process the list is for, and the ids of its live warden threads.
static IDS: Mutex<(i32, Vec<i32>)> = Mutex::new((0, Vec::new()));

fn ids_here<R>(f: impl FnOnce(&mut Vec<i32>) -> R) -> R {
    // SAFETY: getpid(2) has no preconditions.
    let me = unsafe { libc::getpid() };
    let mut ids = lock(&IDS);
    if ids.0 != me {
        *ids = (me, Vec::new()); // a fork's copy names its parent's threads
    }
    f(&mut ids.1)
}

/// Removes the thread from the list when it ends, however it ends.
struct Listed(i32);

impl Listed {
    fn new() -> Listed {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        ids_here(|ids| ids.push(tid));
        Listed(tid)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        ids_here(|ids| ids.retain(|&tid| tid != self.0));
    }
}

/// Starts a thread as `builder.spawn(f)` does, listed while it runs.
pub(crate) fn spawn<F, T>(builder: Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    builder.spawn(move || {
        let _listed = Listed::new();
        f()
    })
}

/// The kernel thread ids of the threads warden runs in this process now
/// (supervisors, finalizer and lost-worker threads, a worker's own).
pub fn own_thread_ids() -> Vec<i32> {
    ids_here(|ids| ids.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_listed_while_it_runs_and_not_after() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = spawn(Builder::new(), move || {
            // SAFETY: gettid(2) has no preconditions.
            let _ = tx.send(unsafe { libc::gettid() });
            let _ = done_rx.recv();
        })
        .unwrap();
        let tid = rx.recv().unwrap();
        assert!(own_thread_ids().contains(&tid));
        // SAFETY: as above.
        assert!(!own_thread_ids().contains(&unsafe { libc::gettid() }), "the caller is not listed");
        drop(done_tx);
        thread.join().unwrap();
        assert!(!own_thread_ids().contains(&tid));
    }
}
