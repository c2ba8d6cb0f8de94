//! The threads warden starts, known by their kernel thread ids, so that a
//! front end can tell them from the others in its process: a native thread
//! a library started as the program imported it (OpenBLAS's pool, when
//! numpy is imported) means the program's main module starts threads at
//! import, and a zygote that imported it could not fork.
//!
//! These threads also keep `fork()` from copying a lock of Rust's standard
//! library held. A thread's end, and in a Rust program its start, take a
//! process-wide lock inside the standard library (the table its stack
//! overflow handler reads); a `fork()` that lands while a thread holds it
//! leaves it held for good in the copy, where every Rust thread's end (and,
//! in a Rust program, start) then waits forever: a pool made in a forked
//! child could never be shut down. So a `pthread_atfork` handler holds each
//! `fork()` back until no warden thread is inside its start or end there,
//! and warden threads wait to start or end while a fork is under way.
//!
//! # Caveats
//!
//! * Only threads started through [`spawn`] or [`spawn_scoped`] are known;
//!   a thread that has not yet run its first instruction is not in the
//!   list, and threads other code starts are not held back for forks.
//! * The list has room for [`CAPACITY`] threads at once; a thread started
//!   when it is full runs unlisted, so a front end takes it for someone
//!   else's (the cautious reading).
//! * The list takes no lock, so a `fork()` that copies a thread while it
//!   adds or removes itself leaves nothing held in the copy. In the copy
//!   the list starts empty: the entries name the parent's process id, and
//!   the copy's first use of the list clears them.
//! * A `fork()` waits at most [`FORK_WAIT`] for a thread inside its start or
//!   end (one descheduled for that long), and then goes on. A raw `clone`
//!   (warden's own, `posix_spawn`'s `vfork`) runs no `pthread_atfork`
//!   handler and is not held back: those children exec at once, or (the
//!   zygote's) are copies of a process that has no other thread.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

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

/// Forks under way in this process: `pthread_atfork`'s prepare handler
/// has run and the parent's handler not yet.
static FORKS: AtomicUsize = AtomicUsize::new(0);

/// Warden threads inside the standard library's start or end of a thread,
/// where a fork could copy its lock held: counted from before a thread is
/// created to its first instruction here, and from its last instruction
/// here to the thread-local destructors that run after the standard
/// library's end of the thread.
static IN_STD: AtomicUsize = AtomicUsize::new(0);

/// How long a `fork()` waits for warden threads to be out of the standard
/// library's start or end of a thread, and a thread's start or end for the
/// forks under way to be done, before it goes on regardless.
pub(crate) const FORK_WAIT: Duration = Duration::from_secs(2);

/// Whether this process registered the `pthread_atfork` handlers. Not a
/// `Once`: a fork that copied one mid-call would leave the copy waiting on
/// it for good. Two threads registering at once add the handlers twice,
/// which is harmless: they pair up, and the child's is idempotent; so is a
/// copy made mid-registration registering again.
static ATFORK: AtomicBool = AtomicBool::new(false);

extern "C" fn before_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
    // Allocation-free: a fork's prepare handler runs before the C library
    // takes its allocator's locks, but other handlers may hold theirs.
    wait_until(|| IN_STD.load(Ordering::SeqCst) == 0, &mut None);
}

extern "C" fn after_fork_in_parent() {
    FORKS.fetch_sub(1, Ordering::SeqCst);
}

extern "C" fn after_fork_in_child() {
    // The one thread here is the one that forked, in no start or end.
    FORKS.store(0, Ordering::SeqCst);
    IN_STD.store(0, Ordering::SeqCst);
}

/// Waits until `done()`, or `deadline` (set to [`FORK_WAIT`] from the
/// first sleep, and kept across calls) passes; returns whether `done()`.
/// Yields the processor first, then sleeps in short steps: the waits are
/// brief (a thread's start or end, a fork's copy of the address space).
fn wait_until(done: impl Fn() -> bool, deadline: &mut Option<Instant>) -> bool {
    for round in 0u32.. {
        if done() {
            return true;
        }
        if round < 64 && deadline.is_none() {
            std::thread::yield_now();
            continue;
        }
        let now = Instant::now();
        match *deadline {
            None => *deadline = Some(now + FORK_WAIT),
            Some(at) if now >= at => return false,
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    false
}

/// Counts this thread (or the one it is about to create) in [`IN_STD`],
/// once no fork is under way, or [`FORK_WAIT`] has passed.
fn enter_std() {
    if !ATFORK.load(Ordering::Acquire) {
        // SAFETY: the handlers make atomic operations, yield and sleep, no
        // allocation and no lock.
        let rc =
            unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_in_parent), Some(after_fork_in_child)) };
        if rc != 0 {
            tracing::warn!(
                "pthread_atfork failed ({rc}): a fork may copy a lock of a warden thread's start or end held"
            );
        }
        ATFORK.store(true, Ordering::Release);
    }
    let mut deadline = None;
    loop {
        let no_fork = wait_until(|| FORKS.load(Ordering::SeqCst) == 0, &mut deadline);
        IN_STD.fetch_add(1, Ordering::SeqCst);
        if !no_fork || FORKS.load(Ordering::SeqCst) == 0 {
            return;
        }
        // A fork began in between: it must not wait for this thread.
        leave_std();
    }
}

/// Leaves the count; never below zero (a fork's copy starts it at zero, and
/// a thread of the copy may be one its parent counted).
fn leave_std() {
    let _ = IN_STD.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
}

/// The count a thread's creation entered, left here unless the thread was
/// created (it then leaves it itself): when creation fails, and when it
/// panics (a name with a NUL byte).
struct Creating {
    created: bool,
}

impl Drop for Creating {
    fn drop(&mut self) {
        if !self.created {
            leave_std();
        }
    }
}

/// Ends the count a thread's end entered, in a thread-local destructor: the
/// C library runs these after the standard library's end of the thread.
struct EndCount(Cell<bool>);

impl Drop for EndCount {
    fn drop(&mut self) {
        if self.0.get() {
            leave_std();
        }
    }
}

thread_local! {
    static END_COUNT: EndCount = const { EndCount(Cell::new(false)) };
}

/// Enters the count for the thread's end when dropped, last of all.
struct Ending;

impl Drop for Ending {
    fn drop(&mut self) {
        enter_std();
        if END_COUNT.try_with(|counted| counted.0.set(true)).is_err() {
            leave_std();
        }
    }
}

/// A warden thread's body: out of the count its creation entered, into the
/// one of its end when `f` returns or unwinds, listed between.
fn run_listed<T>(f: impl FnOnce() -> T) -> T {
    leave_std();
    // The destructor is registered now, while this thread's locals can be.
    END_COUNT.with(|_| ());
    let _ending = Ending;
    let _listed = Listed::new();
    f()
}

/// Starts a thread as `builder.spawn(f)` does, listed while it runs and
/// held back from forks at its start and end.
pub(crate) fn spawn<F, T>(builder: Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    enter_std();
    let mut creating = Creating { created: false };
    let spawned = builder.spawn(move || run_listed(f));
    creating.created = spawned.is_ok();
    spawned
}

/// Starts a scoped thread as `builder.spawn_scoped(scope, f)` does, listed
/// while it runs and held back from forks at its start and end.
pub fn spawn_scoped<'scope, F, T>(
    scope: &'scope Scope<'scope, '_>,
    builder: Builder,
    f: F,
) -> io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    enter_std();
    let mut creating = Creating { created: false };
    let spawned = builder.spawn_scoped(scope, move || run_listed(f));
    creating.created = spawned.is_ok();
    spawned
}

/// A thread builder named `name`, with any NUL byte (which the standard
/// library's thread start refuses with a panic) replaced: warden's thread
/// names carry pool names, which a program chooses.
pub(crate) fn named(name: impl Into<String>) -> Builder {
    Builder::new().name(name.into().replace('\0', "?"))
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

    /// Set while a thread's end is held in [`Held`]'s destructor, and to let
    /// it go.
    static HELD: AtomicBool = AtomicBool::new(false);
    static LET_GO: AtomicBool = AtomicBool::new(false);

    /// A thread-local whose destructor, registered after warden's own,
    /// runs before it: the thread is then past its body but inside its end.
    struct Held;

    impl Drop for Held {
        fn drop(&mut self) {
            HELD.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !LET_GO.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    thread_local! {
        static HOLD: Held = const { Held };
    }

    #[test]
    fn a_fork_waits_for_a_warden_thread_inside_its_end() {
        let thread = spawn(Builder::new(), || HOLD.with(|_| ())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !HELD.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the thread never reached its end");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Lets the thread end once the fork below is held back for it.
        let releaser = std::thread::spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while FORKS.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            LET_GO.store(true, Ordering::SeqCst);
        });
        // SAFETY: the copy calls only _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the copy at once.
            unsafe { libc::_exit(0) }
        }
        let let_go_before_the_fork_returned = LET_GO.load(Ordering::SeqCst);
        assert!(pid > 0, "fork: {}", io::Error::last_os_error());
        let mut status = 0;
        // SAFETY: reaping our own child, which exits at once.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        releaser.join().unwrap();
        thread.join().unwrap();
        assert!(
            let_go_before_the_fork_returned,
            "fork() returned while a warden thread was inside its end, where it may hold the standard library's lock"
        );
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
        let (code, thread) = match (started, rx.recv_timeout(std::time::Duration::from_secs(5))) {
            (Ok(thread), Ok(tid)) if own_thread_ids() == [tid] => (LISTED, Some(thread)),
            (Ok(thread), Ok(_)) => (NOT_LISTED, Some(thread)),
            _ => (NEVER_STARTED, None),
        };
        drop(done_tx);
        // The thread's end must come too: a join that hangs ends in SIGALRM.
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        // SAFETY: ends the copy without running the test harness's exit path.
        unsafe { libc::_exit(code) }
    }

    /// Threads started and ended without pause while the test forks, and
    /// the forks it makes.
    const CHURNERS: usize = 3;
    const COPIES: usize = 400;

    /// Set in the test binary run again for one test alone.
    const ALONE_ENV: &str = "WARDEN_THREADS_FORK_TEST_ALONE";

    /// Whether this is the test binary run again for the test `name` alone;
    /// if not, runs it so, and asserts that it passed.
    fn alone(name: &str) -> bool {
        if std::env::var_os(ALONE_ENV).is_some() {
            return true;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(ALONE_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        false
    }

    #[test]
    fn a_thread_whose_start_panics_leaves_forks_nothing_to_wait_for() {
        // Alone: other tests' threads in this process move the count.
        if !alone("threads::tests::a_thread_whose_start_panics_leaves_forks_nothing_to_wait_for") {
            return;
        }
        assert_eq!(IN_STD.load(Ordering::SeqCst), 0);
        // The standard library refuses a name with a NUL byte with a panic.
        let started = std::panic::catch_unwind(|| spawn(Builder::new().name("a\0b".into()), || ()));
        assert!(started.is_err(), "the standard library panics at a NUL in a thread's name");
        assert_eq!(IN_STD.load(Ordering::SeqCst), 0, "every fork from now on would wait for a thread that never was");
        // A name warden builds from a program's choice has it replaced.
        spawn(named("a\0b"), || ()).unwrap().join().unwrap();
    }

    #[test]
    fn a_fork_while_warden_threads_start_and_end_leaves_the_copy_able_to_start_its_own() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        // In a process of its own: the other tests' threads, running beside
        // it here, may hold locks of the allocator or the runtime as a fork
        // copies them, which says nothing of warden's list.
        if !alone("threads::tests::a_fork_while_warden_threads_start_and_end_leaves_the_copy_able_to_start_its_own") {
            return;
        }
        // Threads come and go, and another reads the list, without pause, so
        // that forks land while the list is being changed or read.
        let stop = Arc::new(AtomicBool::new(false));
        let churn: Vec<_> = (0..CHURNERS)
            .map(|_| {
                let stop = Arc::clone(&stop);
                // Through the gate too: their own start takes the lock.
                spawn(Builder::new(), move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(t) = spawn(Builder::new(), || ()) {
                            let _ = t.join();
                        }
                    }
                })
                .unwrap()
            })
            .collect();
        let reader = {
            let stop = Arc::clone(&stop);
            spawn(Builder::new(), move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(own_thread_ids());
                }
            })
            .unwrap()
        };
        let mut outcomes = Vec::new();
        for _ in 0..COPIES {
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
        for thread in churn {
            thread.join().unwrap();
        }
        reader.join().unwrap();
        assert!(
            outcomes.iter().all(|&c| c == LISTED),
            "copy {} of {COPIES} could not start a listed thread (exit {:?}; {NOT_LISTED}: not listed, {NEVER_STARTED}: never \
             started, negative: signal)",
            outcomes.len(),
            outcomes.last()
        );
    }
}
