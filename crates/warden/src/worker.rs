//! The worker side: handshake, start hook, tasks, and the one exit path.
//!
//! A worker process runs [`serve`] with a [`Handler`] that knows how to run
//! tasks in its language (Rust functions for [`crate::init`], pickled Python
//! callables for the Python package). The loop is the same for both:
//!
//! ```text
//! hello ─► init (start hook) ─► ready ─► task ⇄ result ─► … ─► exit path
//! ```
//!
//! Every way out of the loop goes through [`exit path`](#the-exit-path), exactly once:
//! a `Retire` from the pool, SIGTERM/SIGHUP/SIGINT, end-of-file on the channel
//! (the parent died), the death signal, a failed start hook, or a frame the
//! worker cannot read.
//!
//! # The exit path
//!
//! 1. the exit hook the handler installed at init (the user's finalizer),
//! 2. the process's exit finalizers ([`crate::finalize`]), in priority order,
//!    within [`crate::finalize::exit_timeout`],
//! 3. stdout and stderr are flushed,
//! 4. `Goodbye` tells the parent what ran,
//! 5. the process exits with a status that says how it ended: code 0 when
//!    retired, [`EXIT_INIT_FAILED`], [`EXIT_PROTOCOL`] or [`EXIT_PARENT_GONE`],
//!    or — after a stop signal — by raising that signal again with its default
//!    action, so the parent sees "killed by SIGTERM" exactly as without warden
//!    (the `Goodbye` tells it the exit path ran first).
//!
//! A task is a panic boundary: a panic becomes an error result and the worker
//! lives on, so its exit hook still runs when it retires.
//!
//! # Stopping while a task runs
//!
//! The task runs on the worker's main thread. A second thread, the monitor,
//! sleeps on a futex until a stop signal arrives. If a task is running then, the
//! monitor asks the handler to interrupt it (Python raises an exception in the
//! task; the main thread unwinds and runs the exit path itself). A handler that
//! cannot interrupt (Rust: a running function cannot be stopped from outside),
//! or a task that does not unwind within half the pool's grace period (at least
//! [`UNWIND_GRACE`]), leaves the exit path
//! to the monitor, which runs it and ends the process while the task is still
//! on the main thread's stack.
//!
//! Code of the task's own may have taken SIGTERM from warden's handler; its
//! handler then decides what the task does. The pool sends each SIGTERM with
//! a `Retire(Stopped)`: the worker takes its exit path as soon as the running
//! task returns, ahead of tasks queued (the grace period bounds a task that
//! does not return). A worker that saw the signal itself ends by it.
//!
//! The main thread reads the channel itself whenever it has nothing to run. A
//! third thread, the watcher, reads it instead while a task runs long, so that
//! a task sent ahead of time can be given back to the pool while another runs
//! (see [`crate::inbox`]).
//!
//! # Caveats
//!
//! * When the monitor runs the exit path, the exit hook runs concurrently with
//!   the abandoned task. That is why exit hooks must be `Send + Sync`: they must
//!   not wait for anything the task may hold. The pool's grace period bounds this;
//!   after it the worker is killed with SIGKILL.
//! * Built with `panic = "abort"`, a panicking task kills the worker; the pool
//!   reports a crash instead of a panic.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::error::ExitStatus;
use crate::inbox::{End, Inbox, Incoming, Until, Withdrawal};
use crate::panics::{drop_payload, lock, panic_text};
use crate::signals;
use crate::spawn::{ENV_FD, ENV_MAX_FRAME, ENV_ONE_OFF, ENV_PARENT};
use crate::wire::{
    self, ExitPathReport, ExitReason, FrameReader, Message, RemoteError, RemoteErrorKind, RetireReason, WireError,
    WireOutcome, DEFAULT_MAX_FRAME,
};

/// Exit code of a worker whose start hook failed.
pub const EXIT_INIT_FAILED: i32 = 3;
/// Exit code of a worker that received something it could not understand,
/// or whose channel to the parent was closed in the worker itself (a task
/// closing descriptors it did not open).
pub const EXIT_PROTOCOL: i32 = 4;
/// Exit code of a worker whose parent died.
pub const EXIT_PARENT_GONE: i32 = 5;
/// Exit code of a worker that could not start its own threads because the
/// system is short of them (`EAGAIN`: `ulimit -u` reached), after waiting
/// for them (250 ms; 10 s for a one-off child): the pool takes it as a start
/// the system refused, not as the worker's failure (a one-off child fails
/// with that reason).
pub const EXIT_SHORT_OF_THREADS: i32 = 6;
/// Exit code of a one-off child whose function panicked (Rust's own for a
/// panicking `main`).
pub const EXIT_PANICKED: i32 = 101;

/// The least time the monitor waits for an interrupted task to unwind (its
/// `finally` blocks) before it runs the exit path itself; the wait is half
/// the pool's grace period when that is longer.
pub const UNWIND_GRACE: Duration = Duration::from_millis(500);

/// How long after a stop the monitor first asks for it again while the
/// interrupted step has not unwound (see [`monitor`]); then at doubling
/// intervals.
const ASK_AGAIN_FIRST: Duration = Duration::from_millis(50);

/// How long the monitor waits for an interrupted task to unwind, in
/// milliseconds (set from the pool's grace period at the start).
static UNWIND_MS: AtomicU64 = AtomicU64::new(500);

/// Half the grace period, and at least [`UNWIND_GRACE`]: the other half is
/// the exit path's, before the pool's SIGKILL.
fn unwind_ms(grace_ms: u64) -> u64 {
    (grace_ms / 2).max(UNWIND_GRACE.as_millis() as u64)
}

/// How long the monitor waits for an interrupted task to unwind (its
/// `finally` blocks) before it runs the exit path beside it: half the pool's
/// grace period, at least [`UNWIND_GRACE`]; [`UNWIND_GRACE`] before the pool's
/// `Init` message has set it.
pub fn unwind_grace() -> Duration {
    Duration::from_millis(UNWIND_MS.load(Ordering::SeqCst))
}

const STARTING: u8 = 0;
const IDLE: u8 = 1;
const BUSY: u8 = 2;
const EXITING: u8 = 3;
/// The main thread runs the start hook.
const INITIALIZING: u8 = 4;

/// Whether the main thread is in a start hook or a task (a step a stop
/// signal must interrupt or wait for).
fn in_a_step(state: u8) -> bool {
    state == BUSY || state == INITIALIZING
}

/// What an exit hook reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitHookOutcome {
    /// The hook's error, if it failed. The exit path goes on regardless.
    pub error: Option<String>,
    /// An exit code the process should end with, instead of the default for the
    /// exit reason (used by one-off children, whose exit code is their task's).
    /// Ignored when the worker stops because of a signal.
    pub exit_code: Option<i32>,
    /// A signal the process should end by instead (its default action), when
    /// it exits for another reason than a signal or its parent's death (then
    /// ignored): a one-off child that a stop signal reached while its exit
    /// path ran ends as that signal would have ended it, so its parent sees
    /// the `terminate()` it asked for.
    pub exit_signal: Option<i32>,
    /// The hook has said its error on stderr itself (a Python traceback):
    /// the exit path does not say it again.
    pub said: bool,
}

/// A worker's exit hook: runs once, on whichever thread runs the exit path.
pub type ExitHook = Arc<dyn Fn(&ExitReason) -> ExitHookOutcome + Send + Sync>;

/// Asks the running task to stop (called on the monitor thread). It is
/// called again now and then while the task has not unwound (a stop the
/// task's code swallowed is asked for once more): each call after the first
/// is the same stop, asked again.
pub type Interrupter = Arc<dyn Fn() + Send + Sync>;

/// Set while the main thread is in a step a stop must not cut short.
static STOPS_HELD: AtomicBool = AtomicBool::new(false);

/// Holds (`true`) or releases (`false`) the monitor's own exit after a stop
/// signal. While held, the monitor waits for the main thread however long it
/// takes (the pool's grace period still ends the worker with SIGKILL); once
/// released, it gives the main thread its unwinding time again.
///
/// For a binding whose start hook enters something its exit hook must leave
/// (Python's `worker_context`): cut short after it was entered but before the
/// hook returned, it would be left by nobody. The binding's own handler must
/// not interrupt that step either; the stop is taken once the hook returns.
pub fn hold_stops(held: bool) {
    STOPS_HELD.store(held, Ordering::SeqCst);
}

/// Records stop signal `sig` that a binding's own handler received when
/// the core's handlers did not (a task replaced them): the worker then
/// stops as for any stop signal. Nothing if a stop is recorded already.
pub fn record_stop_signal(sig: i32) {
    signals::record(sig);
}

/// Whether a binding's own SIGINT handler runs without a SIGINT having come
/// (Python's `_thread.interrupt_main()` runs it by itself): no stop signal
/// recorded, while SIGINT still reaches the handlers that record it. A
/// SIGINT delivered to another thread runs the binding's handler before
/// ours records it, so a missing record is looked at again after a moment.
pub fn sigint_without_a_signal() -> bool {
    if signals::pending().is_some() || !signals::sigint_watched() {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_millis(2));
    signals::pending().is_none()
}

/// Runs tasks in one language. Implemented by the Rust task runner and by the
/// Python extension; payloads are opaque to everything else.
pub trait Handler {
    /// A fingerprint of this program, checked by pools that expect one; 0 for none.
    fn identity(&self) -> u64 {
        0
    }

    /// Runs the start hook described by `payload`. Returns the exit hook to run
    /// at the end of the worker's life, if any. An error ends the worker
    /// (without running an exit hook: it never started).
    fn init(&mut self, info: &WorkerInfo, payload: &[u8]) -> Result<Option<ExitHook>, RemoteError>;

    /// Runs one task. Panics are caught by the caller.
    fn run(&mut self, payload: &[u8]) -> Result<Vec<u8>, RemoteError>;

    /// Runs one task whose call may have come with a shared segment (a
    /// descriptor the parent passed with the frame, see
    /// [`crate::frontend::wire::FLAG_SEGMENT`]); the result may carry one
    /// back. Both are the front end's business: the core only carries them.
    /// The default closes the segment and calls [`Handler::run`].
    fn run_with_segment(
        &mut self,
        payload: &[u8],
        segment: Option<OwnedFd>,
    ) -> Result<(Vec<u8>, Option<OwnedFd>), RemoteError> {
        drop(segment);
        self.run(payload).map(|value| (value, None))
    }

    /// Called after a task's outcome has been sent (or could not be): what
    /// the handler kept of the task until then may go. The Python handler
    /// keeps the task's return value, so that its `__del__` runs after the
    /// parent has the result, not before. The default does nothing.
    fn outcome_sent(&mut self) {}

    /// How to interrupt a running task, if this handler can.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// Facts about the worker process, available to tasks through [`current_worker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The worker's number within its pool (unique for the pool's lifetime).
    pub worker: u64,
    /// This process's id.
    pub pid: u32,
    /// The parent's process id.
    pub parent: u32,
}

static CURRENT: OnceLock<WorkerInfo> = OnceLock::new();

/// The worker this process is, if it is one.
pub fn current_worker() -> Option<&'static WorkerInfo> {
    CURRENT.get()
}

/// Set once a worker's exit path starts because its parent is gone: nobody
/// will reap it, nor kill what its tasks left running in its process group.
static ORPHANED: AtomicBool = AtomicBool::new(false);

/// How long an orphaned worker's exit path may take (the pool's default
/// grace period: no supervisor is left to enforce the pool's own).
const ORPHAN_GRACE: Duration = crate::pool::DEFAULT_GRACE;

/// Ends an orphaned worker and what its tasks left running: SIGKILL to its
/// process group, which it leads (every worker does; one that left it kills
/// only itself), this process included.
fn end_orphan(code: i32) -> ! {
    let me = rustix::process::getpid();
    if rustix::process::getpgrp() == me {
        let _ = rustix::process::kill_process_group(me, rustix::process::Signal::KILL);
    }
    // SAFETY: ends this process at once, as a killed one would end.
    unsafe { libc::_exit(code) }
}

/// In an orphaned worker: a thread that ends the worker (and its group) if
/// its exit path is not done within [`ORPHAN_GRACE`], as a live pool would.
fn bound_orphan_exit() {
    let spawned = crate::threads::spawn(std::thread::Builder::new().name("warden-orphan".into()), || {
        std::thread::sleep(ORPHAN_GRACE);
        report!(
            "warden worker {}: the pool's process is gone and the exit path is still running after {ORPHAN_GRACE:?}: killed",
            std::process::id()
        );
        end_orphan(EXIT_PARENT_GONE);
    });
    if spawned.is_err() {
        // No thread for the bound: no exit path either, rather than one
        // that may never end.
        end_orphan(EXIT_PARENT_GONE);
    }
}

/// How often an exit path that began for another reason (a retirement, a
/// one-off's function returned) checks whether the pool's process is gone.
const ORPHAN_CHECK_EVERY: Duration = Duration::from_millis(100);

/// In a worker whose exit path began while its pool's process lived: a
/// thread that bounds it as [`bound_orphan_exit`] does if that process dies
/// before it is done (its death signal then finds the stop already taken:
/// nothing else would notice, and an exit path blocked in a finalizer would
/// keep the worker alive for ever). While the pool lives, its grace period
/// bounds the exit path.
fn bound_exit_if_orphaned(parent: u32) {
    let watch = move || loop {
        std::thread::sleep(ORPHAN_CHECK_EVERY);
        let alive = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) == Some(parent);
        if alive {
            continue;
        }
        if !ORPHANED.swap(true, Ordering::SeqCst) {
            std::thread::sleep(ORPHAN_GRACE);
            report!(
                "warden worker {}: its parent process died while its exit path ran, which is still running \
                 {ORPHAN_GRACE:?} later: killed",
                std::process::id()
            );
            end_orphan(EXIT_PARENT_GONE);
        }
        return;
    };
    if let Err(e) = crate::threads::spawn(std::thread::Builder::new().name("warden-exit-watch".into()), watch) {
        tracing::debug!("no thread to watch for the pool's end during the exit path: {e}");
    }
}

/// A worker about to end (its exit path done) SIGKILLs what its tasks left
/// running in its process group, having first moved itself into its
/// parent's group so that the signal spares it and its exit status stays
/// the one its exit path chose. The supervisor does the same as it reaps
/// the worker; this covers a pool's process that dies between the worker's
/// end and that reaping, after which nobody would. A worker that no longer
/// leads its own group (it left it), or cannot join its parent's (a task
/// gave it a session of its own), leaves that to the supervisor.
/// Returns false where it could not (the caller then checks whether that is
/// because the parent is gone).
fn kill_what_its_group_holds() -> bool {
    use rustix::process::{getpgrp, getpid, getppid, kill_process_group, setpgid, Signal};
    let me = getpid();
    if getpgrp() != me {
        return true;
    }
    let Some(parent) = getppid() else { return false };
    // None where the parent's group lies outside this PID namespace (as under
    // `unshare --pid`): no group to move to, so nothing here is killed.
    let Some(parents_group) = process_group_of(parent) else { return false };
    if parents_group == me || setpgid(None, Some(parents_group)).is_err() {
        return false;
    }
    // ESRCH: nothing was left there.
    let _ = kill_process_group(me, Signal::KILL);
    true
}

/// Whether this worker's pool process is gone (it is no longer the parent).
fn parent_gone() -> bool {
    CURRENT.get().is_some_and(|w| rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(w.parent))
}

/// The process group of `pid`, if this PID namespace can name it. The kernel
/// answers 0 for a group that lies outside the namespace (a program started
/// by `unshare --pid` in its caller's group), which no [`Pid`] may hold; so
/// this asks `getpgid` directly and gives `None` for that, or for an error.
///
/// [`Pid`]: rustix::process::Pid
pub(crate) fn process_group_of(pid: rustix::process::Pid) -> Option<rustix::process::Pid> {
    // SAFETY: getpgid takes a plain pid and touches no memory.
    let group = unsafe { libc::getpgid(pid.as_raw_nonzero().get()) };
    if group > 0 {
        rustix::process::Pid::from_raw(group)
    } else {
        None // 0 outside the namespace, -1 on an error
    }
}

/// `setsid(2)` for code running in a worker or a one-off child: makes this
/// process the leader of a new session (and of a new process group, whose
/// id is its pid), as `setsid` does for a child the standard library spawns.
///
/// Every warden worker leads its own process group, and the kernel refuses
/// `setsid` to a group leader (`EPERM`). So a process that leads its group
/// first moves into another group of its session: its parent's or, where
/// that cannot be named (it lies outside this PID namespace, as under
/// `unshare --pid`), a group made for the move, led by a child that is
/// killed and reaped at once. Then it calls `setsid`. One that leads no
/// group calls `setsid` directly.
///
/// # Caveats
///
/// * The fallback forks: the child runs no code of the program (all signals
///   blocked, it waits to be killed, and dies with this thread).
/// * As `setsid` itself, it fails with `EPERM` while other processes are
///   still in this process's own group (what it started before); the
///   process is then back in its own group.
pub fn setsid() -> io::Result<rustix::process::Pid> {
    use rustix::process::{getpgrp, getpid, getppid, setpgid};
    let refused = match rustix::process::setsid() {
        Ok(session) => return Ok(session),
        Err(e) => e,
    };
    let me = getpid();
    if refused != rustix::io::Errno::PERM || getpgrp() != me {
        return Err(refused.into());
    }
    let parents_group = getppid().and_then(process_group_of).filter(|&group| group != me);
    if !parents_group.is_some_and(|group| setpgid(None, Some(group)).is_ok()) && !join_a_group_made_for_it()? {
        return Err(refused.into());
    }
    rustix::process::setsid().map_err(|_| {
        let _ = setpgid(None, None); // back in its own group
        refused.into()
    })
}

/// Moves this process into a new process group of its session, led by a
/// child forked for it and gone by the time this returns. Returns whether
/// it moved; the error of a fork that failed.
fn join_a_group_made_for_it() -> io::Result<bool> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: plain system calls on local values; between fork and its
    // death the child calls only async-signal-safe functions (prctl,
    // getppid, pause, _exit), as a child of a threaded process must.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
        let child = libc::fork();
        if child == 0 {
            // Signals stay blocked: only the SIGKILL below (or the death
            // signal, if this thread dies first) ends it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(0);
            }
            loop {
                libc::pause();
            }
        }
        let forked = if child < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        forked?;
        let moved = libc::setpgid(child, child) == 0 && libc::setpgid(0, child) == 0;
        libc::kill(child, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
        Ok(moved)
    }
}

impl ExitStatus {
    /// Ends this process the way `self` says: exit with the code, or die by
    /// the signal with its default action (a worker, after its exit path ran).
    /// Flushes stdout and stderr first, then SIGKILLs what is left in the
    /// worker's process group (what its tasks left running; see
    /// `kill_what_its_group_holds`). A worker whose pool's process is gone
    /// takes its process group with it, itself included.
    pub fn exit(self) -> ! {
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        let code = match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        };
        // The pool's process may have died in the last moments of the exit
        // path, before the watch (every ORPHAN_CHECK_EVERY) saw it: then no
        // supervisor is left to kill the group, nor a parent's group to move
        // into first.
        if ORPHANED.load(Ordering::SeqCst) || parent_gone() {
            end_orphan(code);
        }
        if !kill_what_its_group_holds() && parent_gone() {
            end_orphan(code);
        }
        match self {
            ExitStatus::Code(c) => std::process::exit(c),
            ExitStatus::Signal(s) => signals::die_by(s),
        }
    }
}

/// The environment variables a pool sets for its workers.
pub const WORKER_VARIABLES: [&str; 4] = [ENV_FD, ENV_PARENT, ENV_MAX_FRAME, ENV_ONE_OFF];

/// What a worker learns from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    fd: RawFd,
    parent: u32,
    max_frame: usize,
    one_off: bool,
}

impl WorkerEnv {
    /// The environment of a worker forked by a zygote: its channel fd, the
    /// pool's pid and the frame size limit.
    pub(crate) fn new(fd: RawFd, parent: u32, max_frame: usize) -> Self {
        WorkerEnv { fd, parent, max_frame, one_off: false }
    }

    /// Reads the worker variables and removes them from the environment, so
    /// that processes the worker starts are not mistaken for workers.
    /// `None` if this process is not a worker; an error if the variables are
    /// there but malformed.
    ///
    /// Call it before starting threads: it changes the environment, which is
    /// not safe while other threads may read it. A front end that runs inside
    /// an interpreter (which may have threads of its own) removes the
    /// variables through the interpreter's own environment API instead, and
    /// passes what it removed to [`WorkerEnv::from_vars`].
    pub fn take() -> Option<Result<WorkerEnv, String>> {
        let env = Self::from_vars(|key| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned()))?;
        for key in WORKER_VARIABLES {
            std::env::remove_var(key);
        }
        Some(env)
    }

    /// The worker settings from variables looked up with `get` (which sees
    /// the names in [`WORKER_VARIABLES`]); does not touch the environment.
    /// `None` if there is no channel variable (not a worker).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Option<Result<WorkerEnv, String>> {
        let fd = get(ENV_FD)?;
        let parsed = Self::parse(&fd, get(ENV_PARENT).as_deref(), get(ENV_MAX_FRAME).as_deref());
        Some(parsed.map(|env| WorkerEnv { one_off: get(ENV_ONE_OFF).is_some(), ..env }))
    }

    fn parse(fd: &str, parent: Option<&str>, max: Option<&str>) -> Result<WorkerEnv, String> {
        let fd: RawFd = fd.parse().map_err(|_| format!("{ENV_FD}={fd:?} is not an fd number"))?;
        if fd < 3 {
            return Err(format!("{ENV_FD}={fd} {}", if fd < 0 { "is negative" } else { "names a stdio fd" }));
        }
        let parent = parent.ok_or_else(|| format!("{ENV_PARENT} is missing"))?;
        let parent: u32 = parent.parse().map_err(|_| format!("{ENV_PARENT}={parent:?} is not a pid"))?;
        let max_frame = match max {
            None => DEFAULT_MAX_FRAME,
            Some(m) => m.parse().map_err(|_| format!("{ENV_MAX_FRAME}={m:?} is not a size"))?,
        };
        Ok(WorkerEnv { fd, parent, max_frame, one_off: false })
    }
}

/// The state of the worker this process is serving as, for [`set_cleanup_record`]
/// and [`task_clock`].
static CHANNEL: Mutex<Option<Weak<WorkerState>>> = Mutex::new(None);

/// The worker this process serves as, or `NotConnected`.
fn serving() -> io::Result<Arc<WorkerState>> {
    lock(&CHANNEL)
        .as_ref()
        .and_then(Weak::upgrade)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "this process is not serving as a warden worker"))
}

/// Tells the parent what to clean up after this worker should it die without
/// running its exit path (SIGKILL, a crash): `data` reaches the pool's
/// `on_worker_lost` hook in the parent. A later record replaces an earlier
/// one; an empty one clears it. Any thread of the worker may call it, during
/// its start hook or a task.
///
/// Fails if this process is not serving as a worker, the record is larger
/// than the frame limit, or the channel to the parent is gone.
pub fn set_cleanup_record(data: &[u8]) -> io::Result<()> {
    serving()?.send(&Message::Record { data })
}

/// Stops (`running: false`) or restarts (`running: true`) the pool's clock
/// of the task this worker runs: the task waits before doing its work (for
/// the parent to read what the last result lent, say), and that wait is not
/// the task's time. While stopped, the task cannot time out; from the
/// restart, its timeout and the pool's measure of task times count anew.
/// Call it from the task; with no task started yet it does nothing.
///
/// Fails if this process is not serving as a worker, or the channel to the
/// parent is gone.
pub fn task_clock(running: bool) -> io::Result<()> {
    let core = serving()?;
    match core.last_task.load(Ordering::SeqCst) {
        NO_TASK => Ok(()),
        id => core.send(&Message::TaskClock { id, running }),
    }
}

/// [`WorkerState::last_task`] before any task starts.
const NO_TASK: u64 = u64::MAX;

/// Which file `fd` names (device, inode); `None` if it names none.
#[allow(clippy::unnecessary_cast)] // their types differ between targets
fn file_identity(fd: &impl AsFd) -> Option<(u64, u64)> {
    rustix::fs::fstat(fd).ok().map(|st| (st.st_dev as u64, st.st_ino as u64))
}

/// State shared by the main thread and the monitor.
struct WorkerState {
    stream: UnixStream,
    /// Which file `stream` was (device, inode) when the worker began: a task
    /// that closes it (`os.closerange`), or opens a file on its number, is
    /// told apart from the parent's death.
    channel: Option<(u64, u64)>,
    /// A one-off child (a `Process`): its exit code tells its parent all.
    one_off: bool,
    /// Encoding buffer; holding it also serialises whole frames on the channel.
    out: Mutex<Vec<u8>>,
    max_frame: usize,
    parent: u32,
    /// This worker's pid: a copy of it that the program's code forked and
    /// that came back into the loop or the exit path is told apart by it.
    pid: u32,
    state: AtomicU8,
    /// The pool sent `Retire(Stopped)`: it stopped this worker with SIGTERM,
    /// which code of the worker's own may have taken from warden's handler.
    /// Read as soon as the running task returns, ahead of tasks queued.
    stop_requested: AtomicBool,
    /// The last task started, or [`NO_TASK`]; told to the pool in `Goodbye`.
    last_task: AtomicU64,
    /// The last task finished panicking: a one-off child then exits with
    /// [`EXIT_PANICKED`], as a Rust program whose `main` panics.
    last_panicked: AtomicBool,
    hook: Mutex<Option<ExitHook>>,
    /// Set once the exit path has run; holding it serialises the exit path.
    exit: Mutex<Option<ExitStatus>>,
    /// The task the loop runs, and whether a `StopTask` for it was taken:
    /// one lock, so that a stop meant for a task that has just ended never
    /// reaches the one taken up after it.
    run: Mutex<RunState>,
}

/// See [`WorkerState::run`].
struct RunState {
    /// The task running, or [`NO_TASK`].
    running: u64,
    /// A `StopTask` for the running task was taken: no other task starts.
    stopped: bool,
}

impl WorkerState {
    /// A worker's state on `stream`, its channel to `parent`, in `state`.
    fn new(stream: UnixStream, max_frame: usize, parent: u32, state: u8, one_off: bool) -> Self {
        WorkerState {
            channel: file_identity(&stream),
            one_off,
            stream,
            out: Mutex::new(Vec::with_capacity(4096)),
            max_frame,
            parent,
            pid: crate::supervisor::current_pid(),
            state: AtomicU8::new(state),
            stop_requested: AtomicBool::new(false),
            last_task: AtomicU64::new(NO_TASK),
            last_panicked: AtomicBool::new(false),
            hook: Mutex::new(None),
            exit: Mutex::new(None),
            run: Mutex::new(RunState { running: NO_TASK, stopped: false }),
        }
    }

    /// Ends this process at once if it is a copy of the worker that the
    /// program's code forked and that came back here (see
    /// [`leave_forked_copy`]). The process id is cached, read again only in
    /// a forked child (a `pthread_atfork` handler): no system call per task.
    fn leave_if_forked_copy(&self) {
        if crate::supervisor::current_pid() != self.pid {
            leave_forked_copy();
        }
    }

    /// The loop takes up task `id`, which it took from `inbox`; `false` if a
    /// stop was taken meanwhile, for the task before it or for this one (the
    /// worker leaves instead).
    fn begin_task(&self, id: u64, inbox: &Inbox) -> bool {
        let mut run = lock(&self.run);
        inbox.begun();
        if run.stopped {
            return false;
        }
        run.running = id;
        true
    }

    fn end_task(&self) {
        lock(&self.run).running = NO_TASK;
    }

    /// The pool asks to stop task `id`: `Taken` if it is the one running,
    /// or the one the loop has taken from `inbox` and is about to begin
    /// (then no other task starts here, and that one does not either);
    /// `Withdrawn` if it waited in `inbox` (taken out, `skipped` answered);
    /// `Absent` if it has ended. One look, which neither the loop's taking
    /// nor its beginning a task can cross.
    fn take_stop<T>(&self, id: u64, inbox: &Inbox, skipped: impl FnOnce() -> T) -> Withdrawal<T> {
        let mut run = lock(&self.run);
        let found = match id {
            NO_TASK => Withdrawal::Absent,
            id if run.running == id => Withdrawal::Taken,
            id => inbox.withdraw_unless_taken(id, skipped),
        };
        if matches!(found, Withdrawal::Taken) {
            run.stopped = true;
        }
        found
    }

    fn send(&self, msg: &Message<'_>) -> io::Result<()> {
        self.send_with_segment(msg, None)
    }

    /// Sends one frame, with `segment` passed on its first byte if given.
    fn send_with_segment(&self, msg: &Message<'_>, segment: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut out = lock(&self.out);
        out.clear();
        wire::encode_frame(msg, &mut out, self.max_frame, segment.is_some())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut fd = segment;
        let mut rest: &[u8] = &out;
        let sent = loop {
            if rest.is_empty() {
                break Ok(());
            }
            match wire::send_with_fd(&self.stream, rest, fd) {
                Ok(n) => {
                    rest = &rest[n..];
                    fd = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        // The room a large result needed goes back once a smaller one passed.
        if wire::give_back_room(out.capacity(), out.len()) {
            *out = Vec::new();
        }
        sent
    }

    fn parent_alive(&self) -> bool {
        rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) == Some(self.parent)
    }

    /// Why the channel failed this worker (it ended, or a frame could not
    /// be sent): the parent's death, as a rule. But a channel this process
    /// closed itself (a task's `os.closerange`), or whose number it reused,
    /// says nothing of the parent, which still waits for this worker: the
    /// worker then ends as on a broken protocol, through its exit path and
    /// with its own exit code, and does not take itself for an orphan
    /// (which would kill its process group, itself included).
    fn channel_failed(&self) -> ExitReason {
        if self.channel.is_none() || file_identity(&self.stream) == self.channel {
            return ExitReason::ParentGone;
        }
        if !self.one_off {
            report!(
                "warden worker {}: its channel to the pool was closed in this process (by a task closing \
                 descriptors it did not open?): it cannot serve on",
                std::process::id()
            );
        }
        ExitReason::ProtocolError
    }

    /// What a stop signal means: the parent's death if the parent is gone,
    /// else that signal, SIGHUP included (sent by someone else). The death
    /// signal, SIGHUP, comes when the thread that started this worker exits:
    /// while the rest of a dying parent's threads still stand in as this
    /// worker's parent, so after SIGHUP the parent is given
    /// [`PARENT_DEATH_WAIT`] to be seen gone.
    fn stop_reason(&self, sig: i32) -> ExitReason {
        let until = Instant::now() + PARENT_DEATH_WAIT;
        loop {
            if !self.parent_alive() {
                return ExitReason::ParentGone;
            }
            if sig != signals::PARENT_DEATH_SIGNAL || Instant::now() >= until {
                return ExitReason::Signal(sig);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The one exit path. Runs once; a second caller waits for the first and
    /// gets the same answer.
    fn exit_path(&self, reason: ExitReason) -> ExitStatus {
        let mut done = lock(&self.exit);
        if let Some(exit) = *done {
            return exit;
        }
        self.state.store(EXITING, Ordering::SeqCst);
        tracing::debug!(?reason, "worker exit path");
        if reason == ExitReason::ParentGone {
            if !ORPHANED.swap(true, Ordering::SeqCst) {
                bound_orphan_exit();
            }
        } else {
            bound_exit_if_orphaned(self.parent);
        }
        let mut report = ExitPathReport {
            hook_ran: false,
            hook_error: None,
            finalizers_run: 0,
            finalizers_failed: 0,
            finalizers_skipped: 0,
        };
        let mut code = None;
        let mut by_signal = None;
        let mut said = false;
        let hook = lock(&self.hook).take();
        if let Some(hook) = hook {
            report.hook_ran = true;
            let result = catch_unwind(AssertUnwindSafe(|| hook(&reason)));
            self.leave_if_forked_copy(); // the exit hook may have forked
            match result {
                Ok(result) => {
                    report.hook_error = result.error;
                    code = result.exit_code;
                    by_signal = result.exit_signal;
                    said = result.said;
                }
                Err(p) => {
                    report.hook_error = Some(format!("exit hook panicked: {}", panic_text(&*p)));
                    drop_payload(p);
                }
            }
        }
        let fin = crate::finalize::run_exit_finalizers(crate::finalize::exit_timeout());
        report.finalizers_run = fin.ran;
        report.finalizers_failed = fin.failed;
        report.finalizers_skipped = fin.skipped;
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        if let Some(err) = report.hook_error.as_ref().filter(|_| !said) {
            report!("warden worker {}: exit hook failed: {err}", std::process::id());
        }
        if reason != ExitReason::ParentGone {
            let last = self.last_task.load(Ordering::SeqCst);
            let last_task = (last != NO_TASK).then_some(last);
            let _ = self.send(&Message::Goodbye { reason, report, last_task });
        }
        let exit = match (reason, by_signal) {
            (ExitReason::Signal(sig), _) => ExitStatus::Signal(sig),
            (ExitReason::ParentGone, _) => ExitStatus::Code(code.unwrap_or(EXIT_PARENT_GONE)),
            (_, Some(sig)) => ExitStatus::Signal(sig),
            (ExitReason::Retired(RetireReason::Done), None) if self.last_panicked.load(Ordering::SeqCst) => {
                ExitStatus::Code(code.unwrap_or(EXIT_PANICKED))
            }
            (ExitReason::Retired(_), None) => ExitStatus::Code(code.unwrap_or(0)),
            (ExitReason::InitFailed, None) => ExitStatus::Code(code.unwrap_or(EXIT_INIT_FAILED)),
            (ExitReason::ProtocolError, None) => ExitStatus::Code(code.unwrap_or(EXIT_PROTOCOL)),
        };
        *done = Some(exit);
        exit
    }
}

/// The monitor thread: waits for a stop signal; if a task is running, gets the
/// exit path done without waiting for the task.
///
/// A start hook the handler cannot interrupt (a Rust pool's `on_start`) is
/// waited for instead: the main thread finishes it, installs its exit hook,
/// sees the stop and runs the exit path, so what the start hook set up is
/// torn down. The pool's grace period bounds that wait (SIGKILL); when the
/// pool's process is gone, the orphan's own bound does.
fn monitor(core: Arc<WorkerState>, interrupter: Option<Interrupter>) {
    signals::block_in_this_thread();
    let sig = signals::wait_for_stop();
    let state = core.state.load(Ordering::SeqCst);
    if !in_a_step(state) {
        return; // the main thread wakes on end-of-file and runs the exit path
    }
    if state == INITIALIZING && interrupter.is_none() {
        if core.stop_reason(sig) == ExitReason::ParentGone && !ORPHANED.swap(true, Ordering::SeqCst) {
            bound_orphan_exit();
        }
        tracing::debug!(sig, "stop signal while the start hook runs: the main thread takes it once the hook returns");
        return;
    }
    if let Some(interrupt) = interrupter {
        interrupt();
        let mut deadline = Instant::now() + unwind_grace();
        // The stop is asked for again, at doubling intervals, while the step
        // has not unwound: the interrupted code may have swallowed it (the
        // interpreter clears an error raised in the flush of a file freed
        // unclosed), and then runs on as if never stopped.
        let mut again = ASK_AGAIN_FIRST;
        let mut ask_at = Instant::now() + again;
        loop {
            if !in_a_step(core.state.load(Ordering::SeqCst)) {
                return; // unwound: the main thread runs the exit path
            }
            if STOPS_HELD.load(Ordering::SeqCst) {
                deadline = Instant::now() + unwind_grace();
            } else if Instant::now() >= ask_at && Instant::now() < deadline {
                interrupt();
                again *= 2;
                ask_at = Instant::now() + again;
            } else if Instant::now() >= deadline {
                // Said, not left silent: a `finally` block of the task's is
                // cut short when the exit path ends the process.
                report!(
                    "warden: process {}: what it was running when it was stopped was still \
                     running {} ms later; its exit path runs beside it",
                    std::process::id(),
                    unwind_grace().as_millis()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let reason = core.stop_reason(sig);
    tracing::debug!(sig, "stop signal while a task runs: exit path on the monitor thread");
    // The finalizer and the exit hooks run here: the processes they start
    // inherit this thread's mask, which must not keep SIGTERM from them.
    // A stop signal delivered here now only sets what is already set.
    signals::unblock_in_this_thread();
    core.exit_path(reason).exit();
}

/// Runs the worker loop on the calling thread until the worker must exit, and
/// returns how the process should end. The caller then ends the process with
/// [`ExitStatus::exit`] (after any language-level teardown of its own).
pub fn serve<H: Handler>(env: WorkerEnv, mut handler: H) -> ExitStatus {
    // The fd number came from our parent; make sure it is an open socket before
    // taking ownership of it.
    if let Err(e) = check_socket(env.fd) {
        report!("warden worker: {ENV_FD}={} is not a usable channel: {e}", env.fd);
        return ExitStatus::Code(EXIT_PROTOCOL);
    }
    // SAFETY: the fd is an open socket (checked above) that our parent handed to
    // us; nothing else in this process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(env.fd) };
    // Processes the tasks start must not inherit the channel.
    let _ = rustix::io::fcntl_setfd(&stream, rustix::io::FdFlags::CLOEXEC);

    // What its parent passes on may also reach it from its sender.
    crate::interrupts::note_parent(env.parent);

    let core = Arc::new(WorkerState::new(stream, env.max_frame, env.parent, STARTING, env.one_off));
    *lock(&CHANNEL) = Some(Arc::downgrade(&core));

    // Parent death: arm the signal, then check we did not miss it.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::HUP));
    if !core.parent_alive() {
        return core.exit_path(ExitReason::ParentGone);
    }
    if let Err(e) = signals::install(core.stream.as_raw_fd()) {
        report!("warden worker: cannot install signal handlers: {e}");
        return core.exit_path(ExitReason::ProtocolError);
    }
    crate::memory::keep_to_one_arena_under_an_address_space_limit();
    let monitor_core = Arc::clone(&core);
    let interrupter = handler.interrupter();
    let patience = if env.one_off { ONE_OFF_THREAD_START_PATIENCE } else { THREAD_START_PATIENCE };
    if let Err(e) = start_thread("warden-monitor", patience, move || monitor(monitor_core, interrupter)) {
        return thread_refused(&core, &env, "monitor", &e);
    }

    let inbox = Arc::new(Inbox::new(env.max_frame));
    let (watcher_core, watcher_inbox) = (Arc::clone(&core), Arc::clone(&inbox));
    if let Err(e) = start_thread("warden-watcher", patience, move || watch_channel(watcher_core, watcher_inbox)) {
        return thread_refused(&core, &env, "channel's watcher", &e);
    }

    let pid = std::process::id();
    if core.send(&Message::Hello { pid, identity: handler.identity() }).is_err() {
        return core.exit_path(core.stop_reason(signals::pending().unwrap_or(libc::SIGTERM)));
    }

    let reason = run_loop(&core, &mut handler, &inbox);
    core.exit_path(reason)
}

/// How long a worker keeps trying to start one of its threads while the
/// system is short of them (`EAGAIN`: `ulimit -u` reached, which counts
/// threads as processes), before it gives up and exits. Short: what it holds
/// (its main thread, the threads it did get) may be what another starting
/// worker waits for, and the pool tries the start again, one worker at a
/// time, for as long as the shortage lasts (up to its init timeout).
const THREAD_START_PATIENCE: Duration = Duration::from_millis(250);

/// The same for a one-off child, which is started once: it rides out a
/// longer shortage (its parent's own threads starting it may be what it
/// waits for), and fails with that reason after it.
const ONE_OFF_THREAD_START_PATIENCE: Duration = Duration::from_secs(10);

/// A worker that could not start one of its threads, before it said hello
/// (so before any start hook ran): for want of threads, it ends with
/// [`EXIT_SHORT_OF_THREADS`] (its pool says so on stderr, once per
/// shortage; a one-off child, which no one starts again, says itself that
/// it ends without running what it was started for); otherwise it says so
/// on stderr and ends through the exit path, as broken.
fn thread_refused(core: &WorkerState, env: &WorkerEnv, what: &str, e: &io::Error) -> ExitStatus {
    let pid = std::process::id();
    if e.kind() == io::ErrorKind::WouldBlock {
        if env.one_off {
            report!(
                "warden child {pid}: cannot start the {what} thread after {}s: {e}; it ends with exit code \
                 {EXIT_SHORT_OF_THREADS} without running its target (the system's limit on processes and \
                 threads, ulimit -u or a cgroup's pids.max, is reached)",
                ONE_OFF_THREAD_START_PATIENCE.as_secs()
            );
        } else {
            // Its pool says so, once for the whole shortage.
            tracing::debug!(pid, "cannot start the {what} thread: {e}; its pool tries again");
        }
        return ExitStatus::Code(EXIT_SHORT_OF_THREADS);
    }
    report!("warden worker {pid}: cannot start the {what} thread: {e}");
    core.exit_path(ExitReason::ProtocolError)
}

/// Starts a thread of the worker (detached), trying again, with a delay that
/// doubles, while the system refuses it for want of threads: a passing
/// shortage (another program's burst of processes) delays this worker's
/// start instead of failing it, for up to `patience`.
fn start_thread<F: FnOnce() + Send + 'static>(name: &str, patience: Duration, f: F) -> io::Result<()> {
    // The closure is lost with a refused spawn; each try gets a way to it.
    let slot = Arc::new(Mutex::new(Some(f)));
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(5);
    loop {
        let mine = Arc::clone(&slot);
        let started = crate::threads::spawn(std::thread::Builder::new().name(name.into()), move || {
            let f = lock(&mine).take();
            if let Some(f) = f {
                f();
            }
        });
        match started {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() + delay < deadline => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Ends a copy of this worker that a task (or the start or exit hook) made
/// with `fork()` (and no exec) and that came back here from it: it is not
/// the worker. It must not
/// answer on the worker's channel (the worker answers for the task), serve
/// tasks, or run the worker's exit path (its finalizer and exit hooks belong
/// to the worker), so it ends at once, as a forked `multiprocessing` child
/// does. Its parent, the worker, reaps it or leaves it to the pool's teardown.
fn leave_forked_copy() -> ! {
    // SAFETY: _exit ends the process without running anything of this one.
    unsafe { libc::_exit(0) }
}

pub(crate) fn check_socket(fd: RawFd) -> io::Result<()> {
    // SAFETY: fstat fills a plain struct for an fd number.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
    }
    Ok(())
}

/// How much of an error's message and of its traceback is sent when the
/// whole error is over the frame limit.
const ERROR_TEXT_KEPT: usize = 64 * 1024;

/// A task's error too large for a frame (its front end's detail, a pickled
/// exception, carries hundreds of MiB): its kind, type, the start of its
/// message, and the start (the frames) and end (the exception raised) of its
/// traceback, with why the rest is missing.
fn without_detail(error: RemoteError, why: &io::Error) -> RemoteError {
    /// `text` from `start` to `end`, both moved inwards to char boundaries.
    fn part(text: &str, mut start: usize, mut end: usize) -> &str {
        while !text.is_char_boundary(start) {
            start += 1;
        }
        while end > start && !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[start..end.max(start)]
    }
    let message = if error.message.len() > ERROR_TEXT_KEPT {
        let gone = error.message.len() - ERROR_TEXT_KEPT;
        format!("{} [{gone} more bytes not sent]", part(&error.message, 0, ERROR_TEXT_KEPT))
    } else {
        error.message
    };
    let traceback = if error.traceback.len() > ERROR_TEXT_KEPT {
        let (len, half) = (error.traceback.len(), ERROR_TEXT_KEPT / 2);
        let (head, tail) = (part(&error.traceback, 0, half), part(&error.traceback, len - half, len));
        format!("{head} [{} more bytes not sent] {tail}", len - ERROR_TEXT_KEPT)
    } else {
        error.traceback
    };
    RemoteError {
        kind: error.kind,
        message: format!("{message} (the error was not sent whole: {why})"),
        traceback,
        type_name: error.type_name,
        data: Vec::new(),
    }
}

/// Reads frames off the channel into the inbox as `until` says, or until the
/// channel ends; answers a `Cancel` for a task still in the inbox at once
/// (see [`crate::inbox`]). Run by the main thread between tasks, and by the
/// watcher (`watcher`) while a task runs long: the watcher, seeing the
/// channel end, checks whether the parent is gone, to stop the task; the
/// main thread, between tasks, goes to its exit path at once.
fn pump(core: &WorkerState, inbox: &Inbox, reader: &mut FrameReader, until: Until<'_>, watcher: bool) {
    loop {
        let range = match reader.next_frame() {
            Ok(Some(range)) => range,
            Ok(None) => {
                let got = match until {
                    Until::Drained => reader.try_fill_from_socket(&core.stream),
                    Until::Enough(enough) if enough() => return,
                    Until::Enough(_) => {
                        wait_readable(&core.stream).and_then(|()| reader.fill_from_socket(&core.stream))
                    }
                };
                match got {
                    Ok(n) if n > 0 => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    _ => {
                        inbox.end(End::Closed);
                        if watcher {
                            stop_if_the_parent_dies(core);
                        }
                        return;
                    }
                }
            }
            Err(e) => return inbox.end(End::Bad(e.to_string())),
        };
        let (segment, lost) = match reader.take_segment(range) {
            Ok(segment) => (segment, false),
            Err(WireError::SegmentLost) => (None, true),
            Err(e) => return inbox.end(End::Bad(e.to_string())),
        };
        let msg = match wire::decode_body(reader.body(range)) {
            Ok(msg) => msg,
            Err(e) => return inbox.end(End::Bad(e.to_string())),
        };
        let incoming = match msg {
            Message::Init { worker, grace_ms, payload } => {
                Incoming::Init { worker, grace_ms, payload: payload.to_vec() }
            }
            Message::Task { id, payload } => Incoming::Task { id, payload: payload.to_vec(), segment, lost },
            Message::Retire { reason } => {
                if reason == RetireReason::Stopped {
                    core.stop_requested.store(true, Ordering::SeqCst);
                }
                Incoming::Retire(reason)
            }
            // A cancel for a task not taken yet gives it back now; one for a
            // task already taken (running, or done) is answered as missed:
            // the pool sees that task's result.
            Message::Cancel { id } => {
                let skipped = || core.send(&Message::Result { id, outcome: WireOutcome::Skipped });
                let answered = match inbox.withdraw(id, skipped) {
                    Some(sent) => sent,
                    None => core.send(&Message::CancelMissed { id }),
                };
                if answered.is_err() {
                    return inbox.end(End::Closed);
                }
                continue;
            }
            // Stopped as a stop signal from outside would stop it, if that
            // task is the one running; else it is withdrawn if it waits
            // here, and the pool hears that it was missed.
            Message::StopTask { id } => {
                let skipped = || core.send(&Message::Result { id, outcome: WireOutcome::Skipped });
                let found = core.take_stop(id, inbox, skipped);
                if matches!(found, Withdrawal::Taken) {
                    core.stop_requested.store(true, Ordering::SeqCst);
                    // The pool keeps this worker's place until it hears
                    // which way the stop went: told first, before the
                    // task's outcome and the goodbye the stop brings.
                    let told = core.send(&Message::StopTaken { id });
                    signals::stop_this_process_and_group();
                    if told.is_err() {
                        return inbox.end(End::Closed);
                    }
                    continue;
                }
                if let Withdrawal::Withdrawn(Err(_)) = found {
                    return inbox.end(End::Closed);
                }
                if core.send(&Message::StopMissed { id }).is_err() {
                    return inbox.end(End::Closed);
                }
                continue;
            }
            other => return inbox.end(End::Bad(format!("unexpected {} message", other.name()))),
        };
        inbox.push(incoming);
    }
}

/// Waits until the channel has something to read (or has ended).
///
/// A blocking read would wait on the socket's one wait queue with a waker
/// that every event wakes, the parent's reads of this worker's results
/// among them (the room they free is announced there); `poll` for input
/// sleeps through those. An `Interrupted` error lets the caller look again
/// at why it waits.
fn wait_readable(stream: &UnixStream) -> io::Result<()> {
    let mut fds = [rustix::event::PollFd::new(stream, rustix::event::PollFlags::IN)];
    rustix::event::poll(&mut fds, None)?;
    Ok(())
}

/// How long the watcher, having seen the channel end while a task runs,
/// waits for the parent to be seen gone (a dying process closes its fds
/// before its children are given to another parent).
const PARENT_DEATH_WAIT: Duration = Duration::from_secs(2);

/// The channel ended while a task runs: if that is the parent's death, stop
/// the task as its death signal would have. The signal may not have: code
/// of the worker's own may handle, ignore or block SIGHUP.
fn stop_if_the_parent_dies(core: &WorkerState) {
    let until = Instant::now() + PARENT_DEATH_WAIT;
    loop {
        if !core.parent_alive() {
            signals::parent_gone();
            return;
        }
        if Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The watcher thread: reads the channel while a start hook or task runs
/// long (see [`crate::inbox`]).
fn watch_channel(core: Arc<WorkerState>, inbox: Arc<Inbox>) {
    signals::block_in_this_thread();
    let mut read = |reader: &mut FrameReader, until: Until<'_>| pump(&core, &inbox, reader, until, true);
    inbox.watch(&mut read);
}

/// Why the worker must leave now, if it must: a stop signal warden's
/// handler saw, or (the signal taken by a handler of the worker's own code)
/// the pool's `Retire(Stopped)` that came with it.
fn stop_requested(core: &WorkerState) -> Option<ExitReason> {
    if let Some(sig) = signals::pending() {
        return Some(core.stop_reason(sig));
    }
    core.stop_requested.load(Ordering::SeqCst).then_some(ExitReason::Retired(RetireReason::Stopped))
}

fn run_loop<H: Handler>(core: &WorkerState, handler: &mut H, inbox: &Inbox) -> ExitReason {
    let mut initialized = false;
    let mut read = |reader: &mut FrameReader, until: Until<'_>| pump(core, inbox, reader, until, false);
    loop {
        if let Some(reason) = stop_requested(core) {
            return reason;
        }
        let msg = match inbox.next(&mut read) {
            Ok(msg) => msg,
            Err(End::Closed) => {
                return match signals::pending() {
                    Some(sig) => core.stop_reason(sig),
                    None => core.channel_failed(),
                }
            }
            Err(End::Bad(e)) => {
                report!("warden worker {}: bad frame from the parent: {e}", std::process::id());
                return ExitReason::ProtocolError;
            }
        };
        match msg {
            Incoming::Init { worker, grace_ms, payload } if !initialized => {
                UNWIND_MS.store(unwind_ms(grace_ms), Ordering::SeqCst);
                let info = WorkerInfo { worker, pid: std::process::id(), parent: core.parent };
                let _ = CURRENT.set(info.clone());
                core.state.store(INITIALIZING, Ordering::SeqCst);
                inbox.started();
                let result = catch_unwind(AssertUnwindSafe(|| handler.init(&info, &payload)));
                core.leave_if_forked_copy(); // the start hook may have forked
                inbox.finished();
                let result = result.unwrap_or_else(|p| {
                    let error = RemoteError::new(RemoteErrorKind::Panicked, "panic", panic_text(&*p));
                    drop_payload(p);
                    Err(error)
                });
                if core.state.compare_exchange(INITIALIZING, IDLE, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                    // A stop signal came while the start hook ran, and the
                    // monitor, after interrupting the hook, has started the
                    // exit path (which ends the process): the hook's exit
                    // hook is installed for it if it can still be taken.
                    if let Ok(hook) = result {
                        *lock(&core.hook) = hook;
                    }
                    return ExitReason::Signal(signals::pending().unwrap_or(libc::SIGTERM));
                }
                match result {
                    Ok(hook) => {
                        *lock(&core.hook) = hook;
                        initialized = true;
                        if let Some(sig) = signals::pending() {
                            return core.stop_reason(sig);
                        }
                        if core.send(&Message::Ready).is_err() {
                            return core.channel_failed();
                        }
                    }
                    Err(error) => {
                        // A start hook that failed because a stop signal came
                        // (whatever error the interrupted code made of it) is
                        // a stop, not a failure to start.
                        if let Some(sig) = signals::pending() {
                            return core.stop_reason(sig);
                        }
                        let _ = core.send(&Message::InitFailed { error });
                        return ExitReason::InitFailed;
                    }
                }
            }
            Incoming::Task { id, lost: true, .. } if initialized => {
                inbox.begun(); // never begun: it fails at once
                let error = RemoteError::new(RemoteErrorKind::Codec, "OSError", WireError::SegmentLost.to_string());
                if core.send(&Message::Result { id, outcome: WireOutcome::Error(error) }).is_err() {
                    return core.channel_failed();
                }
            }
            Incoming::Task { id, payload, segment, .. } if initialized => {
                core.state.store(BUSY, Ordering::SeqCst);
                if let Some(reason) = stop_requested(core) {
                    // Leaving without starting it: the pool hears so from the
                    // `Goodbye`, whose last task is an earlier one.
                    core.state.store(IDLE, Ordering::SeqCst);
                    return reason;
                }
                if !core.begin_task(id, inbox) {
                    // A stop came for the task before it as that one ended,
                    // or for this one as it was taken from the inbox.
                    core.state.store(IDLE, Ordering::SeqCst);
                    return core.stop_reason(signals::pending().unwrap_or(libc::SIGTERM));
                }
                core.last_task.store(id, Ordering::SeqCst);
                inbox.started();
                let result =
                    catch_unwind(AssertUnwindSafe(|| handler.run_with_segment(&payload, segment))).map_err(|p| {
                        // The payload goes now, in the task's time: its Drop is the task's code.
                        let text = panic_text(&*p);
                        drop_payload(p);
                        text
                    });
                core.leave_if_forked_copy(); // the task may have forked
                core.end_task();
                inbox.finished();
                drop(payload);
                if core.state.compare_exchange(BUSY, IDLE, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                    // The monitor is running the exit path; it ends the process.
                    return ExitReason::Signal(signals::pending().unwrap_or(libc::SIGTERM));
                }
                if let Some(sig) = signals::pending() {
                    return core.stop_reason(sig);
                }
                let panicked = match &result {
                    Ok(Err(error)) => error.kind == RemoteErrorKind::Panicked,
                    Ok(Ok(_)) => false,
                    Err(_) => true,
                };
                core.last_panicked.store(panicked, Ordering::SeqCst);
                let sent = match &result {
                    Ok(Ok((value, out))) => core.send_with_segment(
                        &Message::Result { id, outcome: WireOutcome::Value(value) },
                        out.as_ref().map(|fd| fd.as_fd()),
                    ),
                    Ok(Err(error)) => core.send(&Message::Result { id, outcome: WireOutcome::Error(error.clone()) }),
                    Err(text) => {
                        let error = RemoteError::new(RemoteErrorKind::Panicked, "panic", text.clone());
                        core.send(&Message::Result { id, outcome: WireOutcome::Error(error) })
                    }
                };
                if let Err(e) = sent {
                    if e.kind() == io::ErrorKind::InvalidData {
                        // Larger than the frame limit: an error goes as its
                        // type, message and traceback without its detail; a
                        // value is reported as too large.
                        let error = match result {
                            Ok(Err(error)) => without_detail(error, &e),
                            _ => RemoteError::new(RemoteErrorKind::Codec, "FrameTooLarge", e.to_string()),
                        };
                        let _ = core.send(&Message::Result { id, outcome: WireOutcome::Error(error) });
                    } else {
                        return core.channel_failed();
                    }
                } else {
                    drop(result);
                }
                handler.outcome_sent();
            }
            Incoming::Retire(reason) => {
                return match signals::pending() {
                    Some(sig) => core.stop_reason(sig),
                    None => ExitReason::Retired(reason),
                }
            }
            other => {
                let name = match other {
                    Incoming::Init { .. } => "second init",
                    _ => "task before init",
                };
                report!("warden worker {}: unexpected {name} message from the parent", std::process::id());
                return ExitReason::ProtocolError;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_env_rejects_malformed_variables() {
        assert!(WorkerEnv::parse("x", Some("1"), None).is_err());
        assert_eq!(WorkerEnv::parse("1", Some("1"), None), Err(format!("{ENV_FD}=1 names a stdio fd")));
        assert_eq!(WorkerEnv::parse("-5", Some("1"), None), Err(format!("{ENV_FD}=-5 is negative")));
        assert!(WorkerEnv::parse("7", None, None).is_err());
        assert!(WorkerEnv::parse("7", Some("1"), Some("big")).is_err());
        assert_eq!(
            WorkerEnv::parse("7", Some("12"), Some("100")),
            Ok(WorkerEnv { fd: 7, parent: 12, max_frame: 100, one_off: false })
        );
    }

    #[test]
    fn an_interrupted_task_unwinds_for_half_the_grace_period_and_at_least_the_floor() {
        assert_eq!(unwind_ms(5_000), 2_500);
        assert_eq!(unwind_ms(60_000), 30_000);
        assert_eq!(unwind_ms(200), UNWIND_GRACE.as_millis() as u64);
        assert_eq!(unwind_ms(u64::MAX), u64::MAX / 2);
    }

    fn worker_state() -> WorkerState {
        let (ours, _parent) = UnixStream::pair().expect("a socket pair");
        WorkerState::new(ours, 1 << 20, 1, IDLE, false)
    }

    fn task(id: u64) -> Incoming {
        Incoming::Task { id, payload: vec![1], segment: None, lost: false }
    }

    #[test]
    fn a_stop_for_a_task_taken_from_the_inbox_but_not_yet_begun_is_taken_and_the_task_never_begins() {
        let core = worker_state();
        let inbox = Inbox::new(1 << 20);
        inbox.push(task(2));
        inbox.push(task(3));
        let mut idle = |_: &mut FrameReader, _: Until<'_>| {};
        // The loop takes task 2 out of the inbox; before it begins it, a
        // StopTask for 2 is read (the watcher reads while the task before runs).
        assert!(matches!(inbox.next(&mut idle), Ok(Incoming::Task { id: 2, .. })));
        assert_eq!(core.take_stop(3, &inbox, || "skipped"), Withdrawal::Withdrawn("skipped"), "3 waits: withdrawn");
        assert_eq!(core.take_stop(2, &inbox, || "skipped"), Withdrawal::Taken, "2 is about to run: the stop is taken");
        assert!(!core.begin_task(2, &inbox), "and 2 never begins");
    }

    #[test]
    fn a_stop_for_a_task_that_has_ended_is_missed() {
        let core = worker_state();
        let inbox = Inbox::new(1 << 20);
        inbox.push(task(2));
        let mut idle = |_: &mut FrameReader, _: Until<'_>| {};
        assert!(matches!(inbox.next(&mut idle), Ok(Incoming::Task { id: 2, .. })));
        assert!(core.begin_task(2, &inbox));
        core.end_task();
        assert_eq!(core.take_stop(2, &inbox, || "skipped"), Withdrawal::Absent, "2 has ended: the worker serves on");
        assert!(!lock(&core.run).stopped);
    }
}
