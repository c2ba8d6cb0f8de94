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
//! * The list has room for [`CAPACITY`] threads at once; a thread started
//!   when it is full runs unlisted, so a front end takes it for someone
//!   else's (the cautious reading).
//! * The list takes no lock, so a `fork()` that copies a thread while it
//!   adds or removes itself leaves nothing held in the copy. In the copy
//!   the list starts empty: the entries name the parent's process id, and
//!   the copy's first use of the list clears them.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::{Builder, JoinHandle};

/// How many warden threads the list holds at once.
pub(crate) const CAPACITY: usize = 512;

/// The live warden threads: each slot is empty (0) or holds a process id
/// (high half) and a kernel thread id (low half). A slot naming another
/// process (a `fork()`ed copy's parent) counts as empty.
static IDS: [AtomicU64; CAPACITY] = [const { AtomicU64::new(0) }; CAPACITY];

/// The process that last used the list: a fork's copy that finds its
/// parent's id here empties the slots its parent left, so that a later
/// process given a dead ancestor's id cannot take them for its own.
static LIST_PID: AtomicI32 = AtomicI32::new(0);

/// This process's id, the list emptied of other processes' threads the
/// first time it is used here.
fn pid() -> i32 {
    // SAFETY: getpid(2) has no preconditions.
    let me = unsafe { libc::getpid() };
    if LIST_PID.swap(me, Ordering::AcqRel) != me {
        for slot in &IDS {
            let held = slot.load(Ordering::Acquire);
            if held != 0 && entry_pid(held) != me {
                let _ = slot.compare_exchange(held, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
    me
}

fn entry(pid: i32, tid: i32) -> u64 {
    (u64::from(pid as u32) << 32) | u64::from(tid as u32)
}

fn entry_pid(entry: u64) -> i32 {
    (entry >> 32) as u32 as i32
}

/// Removes the thread from the list when it ends, however it ends.
struct Listed(Option<(usize, u64)>);

impl Listed {
    fn new() -> Listed {
        let me = pid();
        // SAFETY: gettid(2) has no preconditions.
        let mine = entry(me, unsafe { libc::gettid() });
        for (i, slot) in IDS.iter().enumerate() {
            let held = slot.load(Ordering::Acquire);
            if held != 0 && entry_pid(held) == me {
                continue;
            }
            if slot.compare_exchange(held, mine, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Listed(Some((i, mine)));
            }
        }
        tracing::debug!(capacity = CAPACITY, "the list of warden threads is full; this one runs unlisted");
        Listed(None)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        if let Some((i, mine)) = self.0 {
            let _ = IDS[i].compare_exchange(mine, 0, Ordering::AcqRel, Ordering::Acquire);
        }
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
    let me = pid();
    IDS.iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .filter(|&held| held != 0 && entry_pid(held) == me)
        .map(|held| held as u32 as i32)
        .collect()
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

    /// Child exit codes of the fork test.
    const LISTED: i32 = 0;
    const NOT_LISTED: i32 = 1;
    const NEVER_STARTED: i32 = 2;

    /// In a fork's copy: starts a warden thread and says whether it runs and
    /// is the only one listed. Exits; never returns.
    fn in_the_copy() -> ! {
        // SAFETY: a signal that ends this copy if anything below hangs.
        unsafe { libc::alarm(10) };
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let started = spawn(Builder::new(), move || {
            // SAFETY: gettid(2) has no preconditions.
            let _ = tx.send(unsafe { libc::gettid() });
            let _ = done_rx.recv();
        });
        let code = match (started, rx.recv_timeout(std::time::Duration::from_secs(5))) {
            (Ok(_), Ok(tid)) if own_thread_ids() == [tid] => LISTED,
            (Ok(_), Ok(_)) => NOT_LISTED,
            _ => NEVER_STARTED,
        };
        drop(done_tx);
        // SAFETY: ends the copy without running the test harness's exit path.
        unsafe { libc::_exit(code) }
    }

    /// Set in the test binary run again for the fork test alone.
    const ALONE_ENV: &str = "WARDEN_THREADS_FORK_TEST_ALONE";

    #[test]
    fn a_fork_while_warden_threads_start_and_end_leaves_the_copy_able_to_start_its_own() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        if std::env::var_os(ALONE_ENV).is_none() {
            // In a process of its own: the other tests' threads, running
            // beside it here, may hold locks of the allocator or the runtime
            // as a fork copies them, which says nothing of warden's list.
            let name =
                "threads::tests::a_fork_while_warden_threads_start_and_end_leaves_the_copy_able_to_start_its_own";
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args([name, "--exact", "--test-threads=1", "--nocapture"])
                .env(ALONE_ENV, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        // Threads come and go, and another reads the list, without pause, so
        // that forks land while the list is being changed or read.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(t) = spawn(Builder::new(), || ()) {
                        let _ = t.join();
                    }
                }
            })
        };
        let reader = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(own_thread_ids());
                }
            })
        };
        let mut outcomes = Vec::new();
        for _ in 0..200 {
            // SAFETY: the copy runs `in_the_copy` only, which ends in `_exit`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                in_the_copy();
            }
            assert!(pid > 0, "fork: {}", io::Error::last_os_error());
            let mut status = 0;
            // SAFETY: reaping our own child, which ends within its alarm.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                let error = io::Error::last_os_error();
                assert_eq!(error.kind(), io::ErrorKind::Interrupted, "waitpid: {error}");
            }
            outcomes.push(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -libc::WTERMSIG(status) });
            if outcomes.last() != Some(&LISTED) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        reader.join().unwrap();
        assert!(
            outcomes.iter().all(|&c| c == LISTED),
            "copy {} of 200 could not start a listed thread (exit {:?}; {NOT_LISTED}: not listed, {NEVER_STARTED}: never \
             started, negative: signal)",
            outcomes.len(),
            outcomes.last()
        );
    }
}
