//! # warden: process pools and child processes that always clean up after themselves
//!
//! warden runs work in child processes and guarantees that every process and
//! every resource it starts is cleaned up, on every exit path: finish,
//! retirement, panic, timeout, cancel, signal, parent death, crash. A worker
//! runs its exit hook on each of them but a crash of its own (an abort, a
//! fatal signal, SIGKILL), which no code in it survives: the pool reaps it,
//! stops what it left in its process group, and hands it to
//! [`Builder::on_worker_lost`] in the parent.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! fn fib(n: u64) -> u64 {
//!     if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
//! }
//!
//! fn opened() { eprintln!("worker {} up", std::process::id()); }
//! fn closed(reason: warden::ExitReason) { eprintln!("worker {} down: {reason:?}", std::process::id()); }
//!
//! fn main() -> Result<(), warden::Error> {
//!     warden::init(); // a re-executed copy of this program becomes a worker here
//!
//!     let pool = warden::Pool::builder()
//!         .workers(2)
//!         .on_start(opened)
//!         .on_exit(closed)
//!         .task_timeout(Duration::from_secs(10))
//!         .build()?;
//!     let handles: Vec<_> = (20..30).map(|n| pool.spawn(fib, n)).collect::<Result<_, _>>()?;
//!     for h in handles {
//!         println!("{}", h.join()?);
//!     }
//!     pool.shutdown(); // workers retire and run `closed`
//!     Ok(())
//! }
//! ```
//!
//! ## Public surface
//!
//! * the root: [`init`], [`Pool`] and its [`Builder`], task [`Handle`]s
//!   (joined, or awaited: each is a [`Future`](std::future::Future)),
//!   one-off children ([`spawn()`](fn@spawn), [`Child`]), errors
//!   ([`Error`], [`ErrorKind`], [`ExitStatus`]), what a pool reports about its
//!   workers ([`LifecycleEvent`], [`WorkerEnd`], [`StopCause`],
//!   [`WorkerSnapshot`]) and how a worker ends ([`ExitReason`]);
//! * [`finalize`]: the finalizer thread, guardians and exit finalizers (`docs/finalization.md`);
//! * [`frontend`]: what a binding for another language needs (the Python extension uses it).
//!
//! ## Inside
//!
//! Private modules, each with its own docs: `pool` (the public API above),
//! `supervisor` (the event loop that owns the workers, lifecycle diagram there),
//! `spawn` (how a worker process is started: exec, fds, death signal, group),
//! `zygote` (the fork server a pool starts its workers from),
//! `worker` (the worker-side loop and its single exit path), `wire` (frames and
//! messages), `signals` (worker signal handling: flags only), `task` (Rust
//! functions as tasks), `panics` (a poison-tolerant lock, panic text).
//!
//! ## Caveats
//!
//! * [`init`] must be the first thing `main` does: workers are this executable
//!   run again, and everything before `init` runs in them too. A pool of this
//!   program's functions (and [`spawn()`](fn@spawn)) refuses to build in a
//!   process that never called it. An async runtime's `main` attribute
//!   (`#[tokio::main]`) starts the runtime's threads before the body runs: a
//!   worker then starts those threads too, and pools cannot fork workers from
//!   a zygote (only a single-threaded process can fork; they start each one
//!   by exec, [`LifecycleEvent::ZygoteRefused`] says why). Write a plain
//!   `fn main` that calls [`init`], then builds the runtime.
//! * Under `cargo test`, the default test harness owns `main`, and a worker
//!   (the test binary run again, without the command line's test filter)
//!   would run the whole suite: put the tests that use pools in a test target
//!   with `harness = false` whose `main` calls [`init`] first (this crate's
//!   own `tests/lifecycle.rs` does, with `libtest-mimic` for the test list).
//!   [`init`] called inside a `#[test]` runs on the harness's test thread,
//!   not the main one, and counts for nothing: the pool refuses to build and
//!   says so.
//! * Workers get no command-line arguments (code before [`init`] that parses
//!   them sees none). Workers forked by a pool's zygote have the environment
//!   and working directory the pool had when it was built: a later `set_var`
//!   or `set_current_dir` in the parent does not reach them. Workers started
//!   by exec ([`StartMethod::Exec`], or a pool that fell back to it) take
//!   the parent's as each starts, so a replacement started after such a
//!   change has the new ones: make those changes before building the pool.
//! * Arguments and results go through [postcard](https://docs.rs/postcard),
//!   which is not self-describing: types that need `deserialize_any`
//!   (`#[serde(untagged)]`, `#[serde(flatten)]`) or that skip fields when
//!   serializing (`#[serde(skip_serializing_if)]`) fail with a codec error at
//!   run time, where they are decoded: an argument in the worker (a remote
//!   error, [`RemoteErrorKind::Codec`]), a result in this process as the
//!   handle decodes it ([`ErrorKind::Codec`], not [`Error::is_remote`]).
//!   `#[serde(flatten)]` fails earlier, where it is encoded (postcard needs
//!   a map's length up front): an argument makes [`Pool::spawn`] return
//!   [`ErrorKind::Codec`], a result fails in the worker. The pool goes on
//!   either way. A custom serde error's text is not kept (postcard reports
//!   only its kind). Large byte buffers encode much faster as
//!   `serde_bytes::ByteBuf` than as `Vec<u8>`.
//! * A worker that is stopped (SIGSTOP) when the parent is SIGKILLed cannot
//!   act on its death signal until something resumes it; the kernel does so
//!   (SIGHUP, SIGCONT) when the worker's process group becomes orphaned,
//!   which depends on the session the parent ran in. A pool that stops a
//!   worker itself resumes it first.
//! * Stop signals (SIGTERM, SIGINT, SIGHUP) are warden's in a worker: a task
//!   that installs its own handler for one, or blocks it in every thread
//!   (`pthread_sigmask`), keeps its worker from acting on it while the task
//!   runs; if the task does not return within the pool's grace period, the
//!   worker is ended with SIGKILL, without its exit hook.
//! * Linux 5.11 or later: pidfds with `waitid(P_PIDFD)` (5.4), `close_range` with
//!   `CLOSE_RANGE_CLOEXEC` (5.11), `PR_SET_PDEATHSIG`. A start refused one of them
//!   fails naming the system call (a seccomp filter refuses the same way).

#![warn(missing_docs)]

/// Declares a process-wide `Mutex` that `fork()` never copies held, and the
/// function that locks it (poison ignored): a `pthread_atfork` handler,
/// registered at the first lock, takes it on the forking thread before the
/// fork and lets it go after, in the parent and in the copy. A copy would
/// otherwise wait for good on a lock another thread held as it was made.
/// Hold it briefly: never fork, start or end a thread, or take another
/// such lock while holding it, and lock it through its function only.
macro_rules! fork_safe_mutex {
    ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr; $(#[$lock_attr:meta])* fn $lock:ident;) => {
        $(#[$attr])*
        static $name: std::sync::Mutex<$t> = std::sync::Mutex::new($init);

        $(#[$lock_attr])*
        fn $lock() -> std::sync::MutexGuard<'static, $t> {
            use std::sync::atomic::{AtomicU8, Ordering};
            /// 0: no handler; 1: one being registered; 2: registered. Not a
            /// `Once` (a fork copying one mid-call leaves the copy waiting
            /// on it), and exactly once: two handlers would each take the lock.
            static REGISTERED: AtomicU8 = AtomicU8::new(0);
            thread_local! {
                static HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, $t>>> =
                    const { std::cell::RefCell::new(None) };
            }
            extern "C" fn before_fork() {
                let guard = crate::panics::lock(&$name);
                let _ = HELD.try_with(move |held| *held.borrow_mut() = Some(guard));
            }
            extern "C" fn after_fork() {
                let _ = HELD.try_with(|held| held.borrow_mut().take());
            }
            if REGISTERED.load(Ordering::Acquire) != 2
                && REGISTERED.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                // SAFETY: the handlers lock and unlock a static mutex on the
                // forking thread, which holds no other lock of this kind.
                let rc = unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
                if rc != 0 {
                    tracing::warn!(
                        "pthread_atfork failed ({rc}): a fork may copy {} held",
                        stringify!($name)
                    );
                }
                REGISTERED.store(2, Ordering::Release);
            }
            crate::panics::lock(&$name)
        }
    };
}

/// `eprintln!` that cannot panic or hang: a line for stderr, dropped if
/// stderr is gone (a closed terminal, a reader that exited) or does not
/// take it within a second (a pipe whose reader stopped reading, a
/// terminal stopped with Ctrl-S). warden's own reports run on the paths that
/// clean up (a worker's exit path, the orphan bound, the supervisor), which
/// must go on whatever became of stderr.
macro_rules! report {
    ($($arg:tt)*) => {{
        // One write: the lines of processes sharing the stream (a burst of
        // children short of threads) do not interleave.
        let mut line = format!($($arg)*);
        line.push('\n');
        $crate::frontend::report_line(line.as_bytes());
    }};
}

mod error;
pub mod finalize;
pub mod frontend;
mod inbox;
mod interrupts;
mod lost;
mod memory;
mod panics;
mod pool;
mod signals;
mod spawn;
mod supervisor;
mod task;
mod threads;
mod wire;
mod worker;
mod zygote;

/// The README's examples, compiled as doctests so they stay true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use error::{signal_name, Error, ErrorKind, ExitStatus, Result};
pub use interrupts::{interrupts_forwarded, last_interrupt_forwarded};
pub use lost::LostWorker;
pub use pool::{
    spawn, spawn_with, Builder, Child, ChildOptions, Handle, Pool, StartMethod, StopMode, TaskOptions, DEFAULT_GRACE,
    DEFAULT_INIT_TIMEOUT, DEFAULT_MEMORY_SAMPLE_INTERVAL, DEFAULT_RESTART_LIMIT, DEFAULT_RESTART_WINDOW, LONGEST_WAIT,
    MIN_FRAME,
};
pub use supervisor::{LifecycleEvent, Output, StopCause, WorkerEnd, WorkerSnapshot};
pub use wire::{ExitPathReport, ExitReason, RemoteError, RemoteErrorKind, RetireReason};

pub use worker::{current_worker, set_cleanup_record, setsid, task_clock, WorkerInfo};
pub use zygote::forked_from;

/// What [`init`] saw, for a pool of this executable's own functions, which
/// refuses to build without it (its workers would run `main` from the top):
/// [`INIT_NOT_CALLED`], [`INIT_OFF_MAIN`] or [`INIT_ON_MAIN`]. Only grows.
pub(crate) static INIT_SEEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(INIT_NOT_CALLED);
/// [`init`] was never called.
pub(crate) const INIT_NOT_CALLED: u8 = 0;
/// [`init`] was called, but only on threads other than the main one.
pub(crate) const INIT_OFF_MAIN: u8 = 1;
/// [`init`] was called on the main thread.
pub(crate) const INIT_ON_MAIN: u8 = 2;

/// Turns this process into a worker if it was started as one, and never
/// returns in that case; otherwise returns at once.
///
/// Call it first thing in `main` of any program that uses [`Pool::builder`] or
/// [`spawn()`](fn@spawn): their workers run this same executable, and serve tasks from here.
///
/// It must run on the main thread. A call from another thread (a `#[test]`
/// under the default test harness, which runs each test on a thread of its
/// own) counts for nothing: pools then refuse to build and say why, since
/// their workers, the same executable run again, would run whatever the
/// main thread runs (under the harness, every test of the binary). In a
/// worker, such a call ends the process with that message.
pub fn init() {
    let on_main = rustix::thread::gettid() == rustix::process::getpid();
    let seen = if on_main { INIT_ON_MAIN } else { INIT_OFF_MAIN };
    INIT_SEEN.fetch_max(seen, std::sync::atomic::Ordering::SeqCst);
    let starting_as = if std::env::var_os(zygote::ENV_ZYGOTE).is_some() {
        Some("zygote")
    } else if std::env::var_os(spawn::ENV_FD).is_some() {
        Some("worker")
    } else {
        None
    };
    if let (false, Some(role)) = (on_main, starting_as) {
        report!("warden: this {role} reached warden::init() on a thread other than the main one: {OFF_MAIN}");
        std::process::exit(worker::EXIT_PROTOCOL);
    }
    if let Some(zygote) = zygote::ZygoteEnv::take() {
        match zygote {
            Ok(env) => match zygote::serve(env, &mut zygote::NoHooks) {
                zygote::Parked::Worker(env) => worker::serve(env, task::RustHandler).exit(),
                zygote::Parked::Exit(code) => std::process::exit(code),
            },
            Err(msg) => {
                report!("warden: bad zygote environment: {msg}");
                std::process::exit(zygote::EXIT_ZYGOTE_PROTOCOL);
            }
        }
    }
    let Some(env) = worker::WorkerEnv::take() else { return };
    match env {
        Ok(env) => worker::serve(env, task::RustHandler).exit(),
        Err(msg) => {
            report!("warden: bad worker environment: {msg}");
            std::process::exit(worker::EXIT_PROTOCOL);
        }
    }
}

/// Why a call of [`init`] off the main thread counts for nothing.
pub(crate) const OFF_MAIN: &str = "workers run this same executable again, and serve tasks from \
     warden::init() called first thing in main(), on the main thread. Under `cargo test`, the default \
     harness runs each test on a thread of its own (and a worker would run the whole suite): use a test \
     target with `harness = false` whose main() calls warden::init() first";
