//! Signal handling inside a worker: handlers only set flags.
//!
//! A signal handler is concurrency the program never asked for: it interrupts
//! whatever the thread was doing, locks held and data half-updated. So
//! the handlers installed here run no user code and take no locks. On SIGTERM,
//! SIGHUP or SIGINT they:
//!
//! 1. record the signal number in an atomic (the first one wins),
//! 2. shut down the reading side of the worker's channel (`shutdown(2)` is
//!    async-signal-safe), so a worker blocked waiting for its next task wakes up
//!    with end-of-file and goes to its exit path on its own thread,
//! 3. wake the worker's monitor thread with a futex, which decides what to do
//!    if a task is running.
//!
//! No fd is opened for any of this (no self-pipe, no signalfd): a worker's fd
//! table holds only stdio and its channel.
//!
//! # Caveats
//!
//! Handlers are installed with `signal-hook-registry`, which chains to a handler
//! installed earlier (the Python worker relies on that to keep its own). Code that
//! replaces the SIGTERM handler later (a task calling `signal.signal`) takes
//! these flags away. The pool's own stops still reach the worker: each SIGTERM
//! comes with a `Retire(Stopped)` on the channel, taken as soon as the running
//! task returns (see [`crate::worker`]); a task that does not return is
//! SIGKILLed after the grace period, without the exit hook.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};

/// The first stop signal received, or 0.
static PENDING: AtomicU32 = AtomicU32::new(0);
/// The worker the handlers are for: a copy of it made by `fork()` in a task
/// shares its channel, and must not act for it.
static OWNER: AtomicI32 = AtomicI32::new(0);
/// The channel fd whose read side a stop signal shuts down, or -1.
static CHANNEL: AtomicI32 = AtomicI32::new(-1);
/// The SIGINT handler installed here (the registry's), or 0.
static SIGINT_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The signal a worker gets when the thread that spawned it dies (the pool's
/// supervisor, or the whole parent process).
pub(crate) const PARENT_DEATH_SIGNAL: i32 = libc::SIGHUP;

/// The signals that ask a worker to stop.
pub(crate) const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT];

fn on_stop_signal(sig: i32) {
    // SAFETY: getpid(2) is async-signal-safe.
    if unsafe { libc::getpid() } != OWNER.load(Ordering::SeqCst) {
        in_a_forked_copy(sig);
        return;
    }
    let _ = PENDING.compare_exchange(0, sig as u32, Ordering::SeqCst, Ordering::SeqCst);
    let fd = CHANNEL.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown(2) is async-signal-safe and takes integers only.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RD);
        }
    }
    let _ = rustix::thread::futex::wake(&PENDING, rustix::thread::futex::Flags::PRIVATE, u32::MAX);
}

/// Records a stop signal that the binding's own handler saw but these
/// handlers did not (a task put the interpreter's handler back in place of
/// the registry's): as if it had come through them. Nothing if a stop is
/// recorded already, or before these handlers are installed in this
/// process (the worker's start then takes the stop the binding saw).
pub(crate) fn record(sig: i32) {
    // SAFETY: getpid(2) has no preconditions.
    let installed_here = OWNER.load(Ordering::SeqCst) == unsafe { libc::getpid() };
    if installed_here && PENDING.load(Ordering::SeqCst) == 0 {
        on_stop_signal(sig);
    }
}

/// A stop signal in a copy of the worker made by `fork()` in a task: the
/// worker's flags and channel are not the copy's (shutting the shared
/// channel down would end the worker). SIGTERM and SIGHUP end the copy as
/// their default action would, once the handlers chained after this one
/// (Python's, which only sets a flag) have run; SIGINT is left to them.
fn in_a_forked_copy(sig: i32) {
    if sig == libc::SIGINT {
        return;
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe; the signal is
    // blocked while its handler runs, so it ends the copy when this returns.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The parent is gone and its death signal did not stop the worker (code
/// of the worker's own handles, ignores or blocks SIGHUP): the channel's
/// end-of-file says so instead. Acts as that signal would have.
pub(crate) fn parent_gone() {
    let _ = PENDING.compare_exchange(0, PARENT_DEATH_SIGNAL as u32, Ordering::SeqCst, Ordering::SeqCst);
    let _ = rustix::thread::futex::wake(&PENDING, rustix::thread::futex::Flags::PRIVATE, u32::MAX);
}

/// Installs the stop-signal handlers for a worker whose channel is `channel`.
pub(crate) fn install(channel: RawFd) -> io::Result<()> {
    // SAFETY: getpid(2) has no preconditions.
    OWNER.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    CHANNEL.store(channel, Ordering::SeqCst);
    for sig in STOP_SIGNALS {
        // SAFETY: the action only touches atomics and makes the async-signal-safe
        // calls shutdown(2) and futex(2).
        unsafe { signal_hook_registry::register(sig, move || on_stop_signal(sig)) }?;
        interrupt_blocking_calls(sig)?;
    }
    SIGINT_HANDLER.store(current_handler(libc::SIGINT), Ordering::SeqCst);
    ignore_terminal_stops();
    unblock_in_this_thread();
    Ok(())
}

/// The handler `sig` has now (its `sa_sigaction`), or 0.
fn current_handler(sig: i32) -> usize {
    // SAFETY: sigaction(2) reads the current action into a zeroed struct.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut action) != 0 {
            return 0;
        }
        action.sa_sigaction
    }
}

/// Whether SIGINT still reaches the handler installed here: a task that set
/// a handler of its own and put "the old one" back with Python's
/// `signal.signal` left the interpreter's alone in its place.
pub(crate) fn sigint_watched() -> bool {
    let ours = SIGINT_HANDLER.load(Ordering::SeqCst);
    ours != 0 && current_handler(libc::SIGINT) == ours
}

/// Unblocks the stop signals in the calling thread, now that their handlers
/// are in place. A front end that installs handlers of its own first blocks
/// the signals until then (the Python worker does), so that a stop signal
/// arriving between the two waits for both instead of reaching only the
/// first: it is delivered here, and the worker sees a stop, not a start
/// hook that failed. The monitor thread unblocks them too before it runs
/// the exit path: what the exit path's code starts inherits the thread's
/// mask, and a helper started with the stop signals blocked could not be
/// stopped by them (not even by `timeout(1)`).
pub(crate) fn unblock_in_this_thread() {
    mask_in_this_thread(libc::SIG_UNBLOCK);
}

/// Ignores SIGTTIN and SIGTTOU. A worker has a process group of its own,
/// never the terminal's foreground group: a task that reads the controlling
/// terminal (`/dev/tty`, as a password prompt does) would be stopped by
/// SIGTTIN with nothing to resume it, and its caller would wait for ever.
/// Ignored, the read fails with `EIO`, an error the task sees; writing to
/// the terminal and setting its modes go through. What a task starts
/// inherits this (an ignored signal stays ignored across `exec`), and gets
/// the same error instead of stopping.
fn ignore_terminal_stops() {
    for sig in [libc::SIGTTIN, libc::SIGTTOU] {
        // SAFETY: signal(2) with SIG_IGN and an integer signal number.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// Clears `SA_RESTART` from the action installed for `sig` (the registry
/// installs its handler with it). With it, a task blocked in a call the
/// kernel restarts after a handler (a futex wait: `Lock.acquire()`,
/// `Event.wait()`, `queue.get()`; a read) would go on waiting through a stop
/// signal, and the interpreter's handler would never get to raise in it;
/// without it the call fails with `EINTR`, the interpreter runs its handler,
/// and the task sees `TaskInterrupted`, as it does in `time.sleep()`.
/// (Python installs its own handlers without `SA_RESTART` for this reason.)
fn interrupt_blocking_calls(sig: i32) -> io::Result<()> {
    // SAFETY: sigaction(2) reads the current action into a zeroed struct of
    // the right type, then installs the same action with one flag cleared.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut action) != 0 {
            return Err(io::Error::last_os_error());
        }
        if action.sa_flags & libc::SA_RESTART != 0 {
            action.sa_flags &= !libc::SA_RESTART;
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Sends SIGTERM to this process and its process group, as a stop from
/// the pool comes: the handlers record it, a running task is interrupted,
/// and the processes the task started in the group (a `multiprocessing`
/// child, a library's pool) are told to stop too, instead of being waited
/// for by the exit path and then killed with the group.
pub(crate) fn stop_this_process_and_group() {
    // SAFETY: getpid(2), getpgid(2) and kill(2) with this process's own ids
    // and a signal number. The group named by this process's id is the one
    // it was started to lead (a group's id is never another's while its
    // leader lives); a task may have moved this process out of it.
    unsafe {
        let pid = libc::getpid();
        if libc::getpgid(0) != pid {
            libc::kill(pid, libc::SIGTERM);
        }
        libc::kill(-pid, libc::SIGTERM);
    }
}

/// The stop signal received so far, if any.
pub(crate) fn pending() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s as i32),
    }
}

/// Blocks the stop signals in the calling thread, so the kernel delivers them
/// to a thread that runs tasks (where they can interrupt a blocking call).
pub(crate) fn block_in_this_thread() {
    mask_in_this_thread(libc::SIG_BLOCK);
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) the stop signals in the
/// calling thread.
fn mask_in_this_thread(how: libc::c_int) {
    // SAFETY: plain libc calls on a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Blocks the calling thread until a stop signal has been received.
pub(crate) fn wait_for_stop() -> i32 {
    loop {
        if let Some(sig) = pending() {
            return sig;
        }
        // Spurious wake-ups and EINTR just loop.
        let _ = rustix::thread::futex::wait(&PENDING, rustix::thread::futex::Flags::PRIVATE, 0, None);
    }
}

/// Ends the process the way `sig` would, after the exit path ran: restores the
/// default action and raises it, so the parent sees "killed by SIGTERM" as it
/// would without warden. Falls back to exit code 128+sig.
pub(crate) fn die_by(sig: i32) -> ! {
    // SAFETY: plain libc calls with integer arguments.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
        libc::_exit(128 + sig)
    }
}
