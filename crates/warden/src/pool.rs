//! Pools of worker processes: the builder, the pool, and task handles.
//!
//! ```no_run
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! fn main() -> Result<(), warden::Error> {
//!     warden::init(); // first thing: a worker process stops here and serves tasks
//!     let pool = warden::Pool::builder().workers(2).build()?;
//!     let handle = pool.spawn(square, 7)?;
//!     assert_eq!(handle.join()?, 49);
//!     pool.shutdown();
//!     Ok(())
//! }
//! ```
//!
//! The public API is re-exported at the crate root; [`Pool`]'s docs say how
//! a pool shuts down.

use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::lost::{LostHook, LostThread, LostWorker};
use crate::memory::MemoryLimits;
use crate::panics::lock;
use crate::spawn::WorkerCommand;
use crate::supervisor::{
    self, Command, Config, EventSink, LifecycleEvent, Reply, SupervisorLink, Task, WorkerEnd, WorkerSnapshot,
    KILL_WAIT, WORKER_ANSWER_WAIT,
};
use crate::task::{self, Call, RustInit};
use crate::wire::{ExitReason, DEFAULT_MAX_FRAME};

/// How [`Pool::stop`] (and [`Pool::begin_stop`]) starts the shutdown ladder:
/// what happens to tasks before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// Queued tasks still run, running ones finish, then workers retire
    /// ([`Pool::close`], [`Pool::shutdown`]).
    Drain,
    /// Queued tasks are cancelled, running ones finish, then workers retire
    /// ([`Pool::close_cancel_queued`], dropping the pool).
    CancelQueued,
    /// Every task is cancelled and every worker gets SIGTERM now; SIGKILL one
    /// grace period later ([`Pool::terminate`]).
    Terminate,
    /// Every task is cancelled and every worker gets SIGKILL now ([`Pool::kill`]).
    Kill,
}

/// Margin a waiter adds to the ladder's own deadlines before acting itself.
const STOP_SLACK: Duration = Duration::from_secs(2);

/// How long building a pool waits for its first processes to be started
/// (not ready: started, a fork and an exec each).
const START_WAIT: Duration = Duration::from_secs(5);

/// Default time a worker gets to finish its exit path before it is signalled.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// Default time a worker gets to say hello and run its start hook.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default restart intensity: more than this many crashes …
pub const DEFAULT_RESTART_LIMIT: u32 = 10;
/// … within this window fail the pool.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(5);

/// How a pool starts its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartMethod {
    /// Forked by the pool's zygote: the worker program executed once, parked
    /// after loading what workers share, forking a worker per request (a few
    /// milliseconds instead of a program start). Where a zygote cannot work
    /// (it died, is not ready yet after dying, or refuses to fork: see
    /// [`LifecycleEvent::ZygoteRefused`](crate::LifecycleEvent::ZygoteRefused))
    /// workers start by exec, so the pool keeps serving. One-off children
    /// always start by exec.
    #[default]
    Zygote,
    /// Each worker is the worker program executed afresh.
    Exec,
}
/// Default interval between two samples of a busy worker's memory under
/// [`Builder::memory_limit`].
pub const DEFAULT_MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Builds a [`Pool`].
pub struct Builder {
    cfg: Config,
    on_start: Option<fn()>,
    on_exit: Option<fn(ExitReason)>,
    raw_init: Option<Vec<u8>>,
    on_lost: Option<LostHook>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("name", &self.cfg.name).field("workers", &self.cfg.workers).finish()
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Builder {
    fn new(command: WorkerCommand, identity: Option<u64>) -> Self {
        Builder {
            cfg: Config {
                name: "warden".into(),
                workers: default_workers(),
                command,
                init_payload: Vec::new(),
                pass_fds: Vec::new(),
                max_tasks_per_child: None,
                task_timeout: None,
                init_timeout: DEFAULT_INIT_TIMEOUT,
                hook_timeout: Some(DEFAULT_INIT_TIMEOUT),
                grace: DEFAULT_GRACE,
                restart_limit: DEFAULT_RESTART_LIMIT,
                restart_window: DEFAULT_RESTART_WINDOW,
                fail_on_start_error: false,
                memory: MemoryLimits { soft: None, hard: None, interval: DEFAULT_MEMORY_SAMPLE_INTERVAL },
                lost: None,
                max_frame: DEFAULT_MAX_FRAME,
                prefetch: 1,
                identity,
                on_event: None,
                one_off: false,
                forward_interrupts: false,
                interrupts_since: None,
                start: StartMethod::Zygote,
                zygote_payload: Vec::new(),
                zygote_fallback: None,
            },
            on_start: None,
            on_exit: None,
            raw_init: None,
            on_lost: None,
        }
    }

    /// Number of worker processes (default: the number of CPUs).
    pub fn workers(mut self, n: usize) -> Self {
        self.cfg.workers = n;
        self
    }

    /// A name for logs and the supervisor thread.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// Runs in every worker before it takes tasks. A panic fails that worker's
    /// start (and counts toward the restart intensity). A stop that comes
    /// while it runs (shutdown, `terminate`, a drop, the pool's process dying)
    /// does not cut it short: the worker finishes it, then runs its exit hook
    /// (see [`Builder::on_exit`]) and exits. A drain ([`Pool::shutdown`])
    /// waits for it up to its timeout ([`Builder::start_hook_timeout`]); a
    /// bounded stop ([`Pool::terminate`], [`Pool::shutdown_timeout`] once its
    /// time is up, a drop) gives it the grace period, then SIGTERM and SIGKILL.
    pub fn on_start(mut self, hook: fn()) -> Self {
        self.on_start = Some(hook);
        self
    }

    /// Runs in every worker at the end of its life, whatever ends it through
    /// warden: retirement, shutdown, SIGTERM (task timeout, cancel, terminate),
    /// parent death. It runs on the worker's main thread, or on its monitor thread
    /// when a stop signal arrives while a task runs. A worker that ends on its
    /// own, in a task (`std::process::exit`, an abort, a fatal signal, SIGKILL),
    /// does not run it: see [`Builder::on_worker_lost`] for those. Nor does a
    /// worker whose start hook failed (panicked, or ended the process): the
    /// exit hook undoes what a start hook that finished set up.
    pub fn on_exit(mut self, hook: fn(ExitReason)) -> Self {
        self.on_exit = Some(hook);
        self
    }

    /// Retires a worker (running its exit hook) after this many tasks and
    /// starts a fresh one. At least 1: [`Builder::build`] refuses 0 with a
    /// configuration error.
    pub fn max_tasks_per_child(mut self, n: u64) -> Self {
        self.cfg.max_tasks_per_child = Some(n);
        self
    }

    /// Default timeout for each task, counted from when a worker starts it.
    /// On expiry the task ends as timed out and its worker, if it still runs
    /// that task, is stopped (as SIGTERM stops it: exit hook, grace period,
    /// SIGKILL) and replaced.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.task_timeout = Some(longest(timeout));
        self
    }

    /// Time a new worker has to start (to say hello), and then again to run
    /// its start hook (see [`Builder::start_hook_timeout`]); default
    /// [`DEFAULT_INIT_TIMEOUT`]. One that takes longer is stopped and
    /// replaced, and counts toward the restart intensity.
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.init_timeout = longest(timeout);
        self.cfg.hook_timeout = Some(self.cfg.init_timeout);
        self
    }

    /// Time a worker's start hook may run, from the worker's hello to its
    /// ready; `None`: as long as it takes (as a `multiprocessing.Pool`
    /// initializer may). Set after [`Builder::init_timeout`], which sets
    /// this too. A drain waits for a start hook as long as this allows.
    pub fn start_hook_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.cfg.hook_timeout = timeout.map(longest);
        self
    }

    /// Grace period of every escalation step: after a retire before SIGTERM,
    /// after SIGTERM before SIGKILL.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.cfg.grace = longest(grace);
        self
    }

    /// Restart intensity, as in an OTP supervisor: more than `max` worker
    /// failures within `window` fail the pool (default: 10 in 5 s), and so do
    /// more than `max` in a row with no worker getting ready in between,
    /// however slowly they come.
    ///
    /// Only failures no task explains count: a worker that cannot start (the
    /// program cannot be run, its start hook fails, it is not ready within
    /// the init timeout), that dies while idle, or that breaks the protocol.
    /// A worker that dies while running a task fails that task
    /// ([`Error::is_crash`]) and is replaced without counting: each such death
    /// consumes a task, so it cannot loop forever. Nor does a start the
    /// system refuses for want of processes, threads, memory or descriptors
    /// (`EAGAIN` under `ulimit -u`, `ENOMEM`, `EMFILE` under `ulimit -n`
    /// once a worker has started; also a worker that started but was
    /// refused its own threads for 250 ms, which ends with exit code
    /// [`EXIT_SHORT_OF_THREADS`](crate::frontend::EXIT_SHORT_OF_THREADS)
    /// before its hello): it is tried again after a delay that
    /// doubles from 10 ms to 1 s, and fails the pool only once no worker has
    /// served for the init timeout since the shortage began. While the
    /// shortage lasts, workers start one at a time.
    pub fn restart_intensity(mut self, max: u32, window: Duration) -> Self {
        self.cfg.restart_limit = max;
        self.cfg.restart_window = window;
        self
    }

    /// A worker whose start hook fails (it panics, or a raw worker answers
    /// that its start failed) fails the pool at once, with that error,
    /// instead of counting toward the restart intensity: every queued task
    /// and every later submit fails with [`Error::is_pool_failed`]. This is
    /// what `concurrent.futures` promises for an executor whose initializer
    /// raises; by default a pool starts another worker, up to the restart
    /// intensity, so that a start that fails now and then does not end it.
    pub fn fail_on_start_error(mut self) -> Self {
        self.cfg.fail_on_start_error = true;
        self
    }

    /// No restart intensity: failures never fail the pool (workers that
    /// cannot start are retried every 100 ms for as long as the pool runs).
    pub fn no_restart_limit(mut self) -> Self {
        self.cfg.restart_limit = u32::MAX;
        self
    }

    /// A soft memory cap: after each task the worker's resident set size
    /// (from `/proc/<pid>/statm`) is read, and a worker above `bytes` retires
    /// (its exit hook runs, [`crate::RetireReason::MaxMemory`]) and is
    /// replaced. The task's result is kept. Tasks sent ahead to it (see
    /// [`Builder::prefetch`]) are asked back and run on its replacement, but
    /// for those it had begun by the time its result was read. Where this
    /// process's `/proc` cannot be read (none mounted, or another PID
    /// namespace's), [`Builder::build`] fails with a configuration error
    /// instead of a cap that holds nothing; and so it does for 0 bytes.
    pub fn max_memory_per_child(mut self, bytes: u64) -> Self {
        self.cfg.memory.soft = Some(bytes);
        self
    }

    /// A hard memory limit: while a task runs, its worker's resident set size
    /// is sampled every [`Builder::memory_sample_interval`]; a worker above
    /// `bytes` is stopped (SIGTERM, exit hook, grace period, SIGKILL) and
    /// replaced, and the task fails with [`ErrorKind::MemoryExceeded`]. A
    /// worker that a task leaves above `bytes` as it ends (memory the task
    /// kept) is retired as under [`Builder::max_memory_per_child`] instead:
    /// that task's result stands, and the next task is not failed for it
    /// (one it had already begun, only if it grows the worker by more than
    /// an eighth of `bytes` beyond that).
    ///
    /// The resident set size is read from `/proc/<pid>/statm`, not enforced
    /// through a cgroup's `memory.max`: that needs a delegated, writable
    /// cgroup subtree most processes do not have, and the kernel answers it
    /// with the OOM killer's SIGKILL, which skips the exit hook. Caveats: a
    /// task that allocates faster than the sampling can pass the limit
    /// briefly; processes a task starts are not counted; shared pages count
    /// in full, as `ps` counts them. Where this process's `/proc` cannot
    /// be read (none mounted, or another PID namespace's), [`Builder::build`]
    /// fails with a configuration error; and so it does for 0 bytes.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.cfg.memory.hard = Some(bytes);
        self
    }

    /// How often a busy worker's memory is sampled under
    /// [`Builder::memory_limit`] (default 100 ms, at least 1 ms, at most
    /// [`LONGEST_WAIT`]).
    pub fn memory_sample_interval(mut self, interval: Duration) -> Self {
        self.cfg.memory.interval = longest(interval).max(Duration::from_millis(1));
        self
    }

    /// Runs `hook` in this process for every worker that ended without
    /// running its exit path (SIGKILL from the OOM killer or `kill -9`, a
    /// segfault, an abort), with what the worker left for it
    /// ([`crate::set_cleanup_record`]): the parent cleans up what the worker
    /// could not (a temporary directory, a lock file, a session).
    ///
    /// The hook runs on a thread of the pool's own (`<name>-lost`), never on
    /// the supervisor thread, one call at a time in the order the workers
    /// were reaped; a panic in it is logged and the next call still runs.
    /// [`Pool::join`] waits for pending calls (within its timeout; without
    /// one, for at most the grace period). A worker that ran its exit path
    /// (retired, stopped by SIGTERM) is not lost, even if its hook failed.
    pub fn on_worker_lost(mut self, hook: impl Fn(&LostWorker) + Send + Sync + 'static) -> Self {
        self.on_lost = Some(Arc::new(hook));
        self
    }

    /// Largest frame (task or result) accepted on the wire; default 256 MiB,
    /// at least [`MIN_FRAME`] (a smaller size is taken as that): a result
    /// too large for the limit is replaced by an error saying so, and that
    /// error must itself fit in a frame.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.cfg.max_frame = bytes.max(MIN_FRAME);
        self
    }

    /// How many tasks a worker may have been sent at once (default 1: a task is
    /// only sent to an idle worker). More hides the round trip for tiny tasks.
    /// At least 1: [`Builder::build`] refuses 0 with a configuration error.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.cfg.prefetch = n;
        self
    }

    /// Sets an environment variable in every worker. A name that is empty or
    /// has an `=`, or a nul byte in either, makes [`Builder::build`] fail
    /// with a configuration error.
    pub fn env(mut self, key: impl Into<std::ffi::OsString>, value: impl Into<std::ffi::OsString>) -> Self {
        self.cfg.command.env.push((key.into(), value.into()));
        self
    }

    /// Receives lifecycle events, on the supervisor thread: it must be quick
    /// and must not block. A panic in it is logged (stderr) and the pool
    /// goes on. A callback that blocks holds the supervisor, and with it
    /// every outcome and the pool's stop: a stop gives up after its bounded
    /// wait ([`Pool::wait_stopped`]) and returns with the workers still
    /// running; the supervisor stops them once the callback returns, or they
    /// end when this process does.
    ///
    /// A callback may stop or drop its own pool (drop the last `Arc<Pool>`,
    /// say one it upgraded from a `Weak`): on this thread [`Pool::stop`],
    /// [`Pool::shutdown`] and the drop start the shutdown and return at
    /// once, and the supervisor carries it out after the callback;
    /// [`Pool::join`] returns `false` at once.
    ///
    /// Calls that wait for the supervisor's answer cannot have it while the
    /// supervisor runs the callback, so on this thread they do not wait:
    /// * [`Pool::workers`] returns an empty list at once (and logs a
    ///   warning): no snapshot can be taken here;
    /// * [`Pool::cancel`], [`Pool::cancel_queued`] and [`Handle::cancel`]
    ///   cancel a task still in the queue at once (`true`); any other task's
    ///   cancel is sent and they return `false` without waiting for the
    ///   answer: the task's outcome says whether it was cancelled;
    /// * [`Pool::cancel_all_queued`] sends its request and returns no ids:
    ///   every task not started yet is cancelled as the supervisor reads the
    ///   request, once the callback has returned;
    /// * [`Handle::join`] and [`Handle::join_timeout`] return an outcome
    ///   that is there already, and otherwise fail at once
    ///   ([`ErrorKind::Config`], [`ErrorKind::WaitTimedOut`]): the outcome
    ///   cannot arrive while this thread runs the callback. (Awaiting the
    ///   handle as a future is fine: its poll never waits.)
    ///
    /// The same holds in a task's reply ([`Pool::submit_raw`]), which runs on
    /// this thread too.
    pub fn on_event(mut self, sink: impl Fn(&LifecycleEvent) + Send + Sync + 'static) -> Self {
        self.cfg.on_event = Some(Arc::new(sink) as EventSink);
        self
    }

    /// Runs another program as the workers (a front end for another language).
    /// Such a pool takes [`Pool::submit_raw`] tasks only.
    pub fn command(mut self, command: WorkerCommand) -> Self {
        self.cfg.command = command;
        self.cfg.identity = None;
        self
    }

    /// The opaque payload of the `Init` message, for a [`Builder::command`] pool.
    pub fn init_payload(mut self, payload: Vec<u8>) -> Self {
        self.raw_init = Some(payload);
        self
    }

    /// Passes an fd to every worker, at the number it has in this process.
    /// The pool keeps it open until it shuts down.
    pub fn pass_fd(mut self, fd: OwnedFd) -> Self {
        self.cfg.pass_fds.push(fd);
        self
    }

    /// How workers start (default: [`StartMethod::Zygote`]).
    pub fn start(mut self, start: StartMethod) -> Self {
        self.cfg.start = start;
        self
    }

    /// The opaque payload a [`Builder::command`] pool's zygote prepares from
    /// before it parks (the Python worker reads its preloads from it).
    pub fn zygote_payload(mut self, payload: Vec<u8>) -> Self {
        self.cfg.zygote_payload = payload;
        self
    }

    /// A second payload for a [`Builder::command`] pool's zygote: if a zygote
    /// prepared from [`Builder::zygote_payload`] cannot fork (its preparation
    /// started a thread or left an fd open), the pool starts one more zygote,
    /// prepared from this, before it falls back to exec for good. The Python
    /// pools pass their preloads without `__main__` here.
    pub fn zygote_fallback_payload(mut self, payload: Vec<u8>) -> Self {
        self.cfg.zygote_fallback = Some(payload);
        self
    }

    /// Makes this a one-off child: one worker that runs one task and retires
    /// ([`crate::RetireReason::Done`]), never replaced. Close the pool right
    /// after submitting the task.
    pub fn one_off(mut self) -> Self {
        self.cfg.one_off = true;
        self.cfg.workers = 1;
        self.cfg.max_tasks_per_child = Some(1);
        self.cfg.restart_limit = 0;
        self
    }

    /// Passes a terminal's Ctrl-C on to a one-off child ([`Builder::one_off`]),
    /// as it would reach a child in the terminal's process group: while the
    /// child runs, a SIGINT the terminal (or another program, with `kill`)
    /// sends this process is sent to the child's process group too (a Rust
    /// worker stops gracefully; Python's
    /// `Process` raises `KeyboardInterrupt` in its target). `build` refuses
    /// it for a pool that is not one-off: its workers are stopped by their
    /// pool, not by the terminal.
    ///
    /// # Caveats
    ///
    /// * It chains a handler in front of this process's SIGINT handler, and
    ///   only over a handler: a program that Ctrl-C kills (`SIG_DFL`), or
    ///   that ignores it, keeps doing so, and passes nothing on.
    /// * A handler installed later replaces it: while such children run, a
    ///   thread (`warden-ctrl-c`) chains it in front again within 50 ms; the
    ///   next child started and
    ///   [`frontend::chain_interrupt_handler`](crate::frontend::chain_interrupt_handler)
    ///   do at once.
    /// * A SIGINT sent with `kill(2)` to this process or to its group (the
    ///   two cannot be told apart) is passed on as the terminal's is, unless
    ///   this process sent it itself or a child it reaches sent it. A child's
    ///   parent passing a Ctrl-C on is another program to it: a nested child
    ///   gets it too.
    /// * At most 4096 children at once are reached (more are logged).
    pub fn forward_interrupts(mut self) -> Self {
        self.cfg.forward_interrupts = true;
        self
    }

    /// [`forward_interrupts`](Builder::forward_interrupts), and a Ctrl-C
    /// passed on after [`interrupts_forwarded`](crate::interrupts_forwarded)
    /// returned `since` reaches the child even if it came before the child
    /// started (by default: after [`build`](Builder::build) began). For a
    /// front end that holds a Ctrl-C back while it starts a child and raises
    /// it once the child is started: the child gets that Ctrl-C too. Take
    /// `since` from
    /// [`frontend::prepare_interrupt_forwarding`](crate::frontend::prepare_interrupt_forwarding),
    /// which also installs the handler, so that such a Ctrl-C is counted.
    pub fn forward_interrupts_since(mut self, since: u64) -> Self {
        self.cfg.forward_interrupts = true;
        self.cfg.interrupts_since = Some(since);
        self
    }

    /// Starts the supervisor thread and the workers. Returns at once; tasks
    /// submitted before the workers are ready wait in the queue.
    pub fn build(mut self) -> Result<Pool> {
        if self.cfg.workers == 0 {
            return Err(Error::config("a pool needs at least one worker"));
        }
        if self.cfg.task_timeout == Some(Duration::ZERO) {
            return Err(Error::config("task_timeout must be longer than zero (leave it unset for no timeout)"));
        }
        if self.cfg.max_tasks_per_child == Some(0) {
            return Err(Error::config("max_tasks_per_child must be at least 1 (leave it unset for no limit)"));
        }
        if self.cfg.prefetch == 0 {
            return Err(Error::config("prefetch must be at least 1 (a worker is sent one task at a time)"));
        }
        if self.cfg.memory.soft == Some(0) || self.cfg.memory.hard == Some(0) {
            return Err(Error::config(
                "max_memory_per_child and memory_limit must be more than zero bytes (leave them unset for no cap)",
            ));
        }
        if let Some(why) = self.cfg.command.invalid() {
            return Err(Error::config(format!("{why}: no process can be started with it")));
        }
        if self.cfg.init_timeout == Duration::ZERO || self.cfg.hook_timeout == Some(Duration::ZERO) {
            return Err(Error::config("init_timeout (and start_hook_timeout) must be longer than zero"));
        }
        if self.cfg.forward_interrupts && !self.cfg.one_off {
            return Err(Error::config("forward_interrupts is for one-off children, not for a pool's workers"));
        }
        if self.cfg.forward_interrupts && self.cfg.interrupts_since.is_none() {
            self.cfg.interrupts_since = crate::interrupts::prepare_interrupt_forwarding();
        }
        // A worker or zygote that got here never ran `init`, which takes
        // these variables and never returns in such a process: its pool
        // would start workers that do the same, without end.
        if std::env::var_os(crate::spawn::ENV_FD).is_some() || std::env::var_os(crate::zygote::ENV_ZYGOTE).is_some() {
            return Err(Error::config(
                "this process was started by a warden pool as its worker, but main() built a pool before \
                 calling warden::init(): call warden::init() first thing in main()",
            ));
        }
        crate::spawn::fill_closed_stdio();
        if self.cfg.identity.is_some() {
            match crate::INIT_SEEN.load(std::sync::atomic::Ordering::SeqCst) {
                crate::INIT_ON_MAIN => {}
                crate::INIT_OFF_MAIN => {
                    return Err(Error::config(format!(
                        "warden::init() was called only on threads other than the main one: {}",
                        crate::OFF_MAIN
                    )));
                }
                _ => {
                    return Err(Error::config(format!(
                        "warden::init() was not called in this program: {}",
                        crate::OFF_MAIN
                    )));
                }
            }
        }
        if self.cfg.memory.soft.is_some() || self.cfg.memory.hard.is_some() {
            // Where /proc cannot tell the workers' sizes, the caps would
            // hold nothing, and say nothing either.
            if let Err(why) = crate::memory::sizes_readable_here() {
                return Err(Error::config(format!(
                    "memory_limit and max_memory_per_child read each worker's resident set size from \
                     /proc/<pid>/statm, which cannot be read here ({why}): mount this namespace's /proc, or \
                     leave them unset"
                )));
            }
        }
        self.cfg.init_payload = match self.raw_init.take() {
            Some(payload) => payload,
            None => postcard::to_allocvec(&RustInit::new(self.on_start, self.on_exit)).map_err(Error::codec)?,
        };
        // Every worker's `Init` message carries it: one over the frame limit
        // could never be sent, and no worker is to blame for that (refused
        // here, it costs no restarts), by the rule `submit` applies to a task.
        if self.cfg.init_payload.len() + 32 > self.cfg.max_frame {
            return Err(Error::config(format!(
                "the init payload of {} bytes exceeds the frame limit of {} bytes (the pool's max_frame_size)",
                self.cfg.init_payload.len(),
                self.cfg.max_frame
            )));
        }
        let grace = self.cfg.grace;
        let name = self.cfg.name.clone();
        let default_timeout = self.cfg.task_timeout;
        let max_frame = self.cfg.max_frame;
        let typed = self.cfg.identity.is_some();
        let lost = match self.on_lost.take() {
            Some(hook) => {
                let (tx, thread) = LostThread::start(&name, hook)?;
                self.cfg.lost = Some(tx);
                Some(thread)
            }
            None => None,
        };
        crate::memory::keep_to_one_arena_under_an_address_space_limit();
        let (mut sup, shared) = supervisor::create(self.cfg)?;
        let started = sup.started();
        let thread = crate::threads::spawn(crate::threads::named(format!("{name}-supervisor")), move || sup.run())?;
        // The first processes start on the supervisor thread (see the
        // caveats), but with this moment's environment and standard
        // streams, as if started here: a caller may change them right after.
        let _ = started.recv_timeout(START_WAIT);
        Ok(Pool {
            shared,
            thread: Mutex::new(Some(thread)),
            lost: Mutex::new(lost),
            lost_wait_began: Mutex::new(None),
            grace,
            default_timeout,
            max_frame,
            typed,
        })
    }
}

/// A pool of worker processes.
///
/// # Shutting down
///
/// | call | queued tasks | running tasks | workers |
/// |------|--------------|---------------|---------|
/// | [`Pool::shutdown`] / [`Pool::close`] + [`Pool::join`] | run | finish | retire (exit hooks), then escalate after the grace period |
/// | dropping the pool | cancelled | get one grace period to finish, then are cancelled | retire, then escalate |
/// | [`Pool::terminate`] | cancelled | cancelled | SIGTERM (exit hooks run), SIGKILL after the grace period |
/// | [`Pool::kill`] | cancelled | cancelled | SIGKILL now |
///
/// Each row is [`Pool::stop`] with a [`StopMode`] and a deadline: one
/// shutdown ladder (retire → grace → SIGTERM → grace → SIGKILL → reap), which
/// the Python package also uses for every way it shuts a pool down.
///
/// Every stage that waits on a worker has a deadline; only waiting for tasks
/// the caller asked to drain is as long as those tasks (bound them with
/// [`Builder::task_timeout`] or [`Pool::shutdown_timeout`]). When a shutdown
/// returns, every worker has been reaped and every fd the pool opened is closed.
///
/// # Caveats
///
/// * Lifecycle events ([`Builder::on_event`]) and task outcomes are delivered on
///   the supervisor thread: callbacks must be quick and must not block.
/// * The pool spawns its workers from its supervisor thread, because the
///   parent-death signal is tied to the thread that spawned a process.
/// * In a copy of the process made by `fork()` (without exec), the pool is a
///   copy of memory with no supervisor thread: there it refuses tasks with
///   [`ErrorKind::PoolFailed`] ("belongs to process N"), its handles fail at
///   once, and joining, stopping or dropping it does nothing, so the copy
///   never waits on the original's pool nor stops its workers.
pub struct Pool {
    shared: Arc<SupervisorLink>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The thread running `on_worker_lost`, until it is joined.
    lost: Mutex<Option<LostThread>>,
    /// When a wait for pending `on_worker_lost` calls first began, the pool
    /// shut down: they get one grace period from then, however many waits
    /// (a caller that waits in short steps) there are.
    lost_wait_began: Mutex<Option<Instant>>,
    grace: Duration,
    default_timeout: Option<Duration>,
    max_frame: usize,
    typed: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("done", &self.shared.is_done()).finish()
    }
}

/// The smallest frame limit a pool takes (see [`Builder::max_frame_size`]).
pub const MIN_FRAME: usize = 4096;

/// The longest duration a pool keeps as a timeout or a grace period (about
/// 30 years): a longer one, such as `Duration::MAX` meant as "no limit", is
/// taken as this, so that adding it to the clock cannot overflow.
pub const LONGEST_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

fn longest(d: Duration) -> Duration {
    d.min(LONGEST_WAIT)
}

/// Options of one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskOptions {
    /// Overrides the pool's task timeout for this task. Longer than zero, as
    /// [`Builder::task_timeout`]: a zero timeout is refused with
    /// [`ErrorKind::Config`] when the task is submitted.
    pub timeout: Option<Duration>,
}

impl Pool {
    /// A builder for a pool whose workers run this executable's Rust functions.
    /// The program must call [`crate::init`] first thing in `main`.
    pub fn builder() -> Builder {
        Builder::new(WorkerCommand::current_exe(), Some(task::identity()))
    }

    /// Runs `f(args)` in a worker.
    ///
    /// `f` is a function of this program (a `fn`, or a closure that captures
    /// nothing): the worker, this executable run again, finds it by its
    /// place in the binary. `args` and the result cross the process boundary
    /// serialized (serde), so they are owned values (`String`, not `&str`);
    /// several arguments go in a tuple. Both must fit in the pool's
    /// [`Builder::max_frame_size`]. A worker's stdin is `/dev/null`; its
    /// stdout and stderr are this process's.
    pub fn spawn<A, R>(&self, f: fn(A) -> R, args: A) -> Result<Handle<R>>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.spawn_with(f, args, TaskOptions::default())
    }

    /// Runs `f(args)` in a worker, with options.
    pub fn spawn_with<A, R>(&self, f: fn(A) -> R, args: A, options: TaskOptions) -> Result<Handle<R>>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        if !self.typed {
            return Err(Error::config("this pool runs another program; use submit_raw"));
        }
        let payload = Call::encode(f, &args).map_err(Error::codec)?;
        let slot = Arc::new(Slot::default());
        let reply_slot = Arc::clone(&slot);
        let reply: Reply = Box::new(move |outcome| reply_slot.fill(outcome.map(|o| o.bytes)));
        let id = self.submit_raw(payload, options, reply)?;
        Ok(Handle { id, slot, shared: Arc::clone(&self.shared), _result: PhantomData })
    }

    /// Queues an opaque payload; `reply` gets its outcome exactly once, on the
    /// supervisor thread. Returns the task's id.
    pub fn submit_raw(&self, payload: Vec<u8>, options: TaskOptions, reply: Reply) -> Result<u64> {
        self.submit_raw_with_segment(payload, None, options, reply)
    }

    /// Like [`Pool::submit_raw`], with a shared segment (any descriptor) that
    /// the worker receives with the task, over the channel (`SCM_RIGHTS`).
    /// The pool owns it until the task is done, then closes it; the worker's
    /// [`Handler::run_with_segment`](crate::worker::Handler::run_with_segment)
    /// gets its own copy.
    pub fn submit_raw_with_segment(
        &self,
        payload: Vec<u8>,
        segment: Option<OwnedFd>,
        options: TaskOptions,
        reply: Reply,
    ) -> Result<u64> {
        if options.timeout == Some(Duration::ZERO) {
            return Err(Error::config(
                "TaskOptions::timeout must be longer than zero (leave it None for the pool's task_timeout)",
            ));
        }
        if !self.shared.accepting.load(Ordering::SeqCst) || self.shared.foreign() {
            return Err(self.closed_error());
        }
        // Frame overhead is a few bytes; refuse what can never be sent.
        if payload.len() + 32 > self.max_frame {
            return Err(Error::new(ErrorKind::Rejected(format!(
                "task of {} bytes exceeds the frame limit of {} bytes (the pool's max_frame_size)",
                payload.len(),
                self.max_frame
            ))));
        }
        let id = self.shared.next_task.fetch_add(1, Ordering::Relaxed);
        let timeout = options.timeout.map(longest).or(self.default_timeout);
        let task = Task::new(id, payload, segment, timeout, reply);
        match self.shared.send(Command::Submit(task)) {
            Ok(()) => Ok(id),
            Err(cmd) => {
                // The supervisor is gone; the task's Drop tells `reply` so.
                drop(cmd);
                Err(self.closed_error())
            }
        }
    }

    fn closed_error(&self) -> Error {
        if self.shared.foreign() {
            return self.shared.foreign_error();
        }
        match self.shared.failure() {
            Some(reason) => Error::new(ErrorKind::PoolFailed { reason }),
            None => Error::closed(),
        }
    }

    /// Cancels a task by id: a queued task is removed, a running one is stopped
    /// with its worker (which runs its exit hook and is replaced). Returns
    /// whether the task was cancelled (false if it had already finished).
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback or a task's reply), which cannot answer while it runs the
    /// caller: a task still in the queue is cancelled at once (`true`);
    /// for any other the cancel is sent, as [`Pool::cancel_nowait`] sends
    /// it, and the call returns `false` without waiting: the task's outcome
    /// says whether it was cancelled.
    pub fn cancel(&self, id: u64) -> bool {
        cancel(&self.shared, id, true)
    }

    /// Asks for a task to be cancelled, queued or running, as
    /// [`Pool::cancel`] does, without waiting to learn whether it was: the
    /// task's outcome says (cancelled, or what it gave had it finished
    /// first). For a caller that cancels many at once (an event loop
    /// cancelling the calls it awaited) and must not wait for each.
    pub fn cancel_nowait(&self, id: u64) {
        let _ = self.shared.send(Command::Cancel { id, running_too: true, reply: None });
    }

    /// Cancels a task only if it is still queued (the semantics of
    /// `concurrent.futures.Future.cancel`), in the pool or sent ahead to a
    /// worker that has not started it. Returns whether it was.
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback or a task's reply), which cannot answer while it runs the
    /// caller: a task still in the queue is cancelled at once (`true`); for
    /// any other the cancel is sent and the call returns `false` without
    /// waiting: a task sent ahead and not started is cancelled once the
    /// callback has returned, and its outcome says whether it was.
    pub fn cancel_queued(&self, id: u64) -> bool {
        cancel(&self.shared, id, false)
    }

    /// Cancels a task the supervisor has not taken out of the queue yet,
    /// without waiting for the supervisor (its outcome, cancelled, follows);
    /// `false` when that cannot be decided here: the task has been sent to
    /// a worker (ahead, or to run), has finished, or is no task of this pool.
    /// [`Pool::cancel_queued`] and [`Pool::cancel`] try this first, then ask
    /// the supervisor; a caller that must not block (a thread holding a
    /// lock the pool's callbacks take) can call this alone.
    pub fn cancel_unclaimed(&self, id: u64) -> bool {
        self.shared.cancel_unclaimed(id)
    }

    /// Cancels every task not started yet, as [`Pool::cancel_queued`] would
    /// each (queued in the pool, or sent ahead to a worker that has not
    /// started it), in one request; returns their ids, in submission order.
    /// The pool stays open. Cheaper than a `cancel_queued` per task when
    /// many wait (an executor's `shutdown(cancel_futures=True)`).
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback or a task's reply), which cannot answer while it runs the
    /// caller: the request is sent and the call returns an empty list at
    /// once. The ids are not known there, but every task not started yet is
    /// cancelled all the same, as the supervisor reads the request once the
    /// callback has returned; each one's outcome says so.
    pub fn cancel_all_queued(&self) -> Vec<u64> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.shared.send(Command::CancelQueued { reply: tx }).is_err() {
            return Vec::new();
        }
        if self.shared.on_supervisor_thread() {
            // The supervisor's answer, sent once the caller has returned,
            // finds no receiver and is dropped (a failed send, no wait).
            tracing::debug!(
                "warden: tasks cancelled on the pool's own supervisor thread: their ids are not known here"
            );
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Stops taking tasks; queued tasks still run, then the workers retire.
    /// Returns at once; see [`Pool::join`]. Same as [`Pool::begin_stop`] with
    /// [`StopMode::Drain`] and no deadline.
    pub fn close(&self) {
        self.begin_stop(StopMode::Drain, None);
    }

    /// Stops taking tasks and cancels the queued ones; running tasks finish,
    /// then the workers retire. Returns at once; see [`Pool::join`].
    pub fn close_cancel_queued(&self) {
        self.begin_stop(StopMode::CancelQueued, None);
    }

    /// Cancels queued and running tasks and stops every worker with SIGTERM
    /// (exit hooks run), then SIGKILL after the grace period. Returns at once.
    pub fn terminate(&self) {
        self.begin_stop(StopMode::Terminate, None);
    }

    /// Cancels everything and kills every worker with SIGKILL now (no exit
    /// hooks). Returns at once.
    pub fn kill(&self) {
        self.begin_stop(StopMode::Kill, None);
    }

    /// Waits until the pool has shut down and every worker is reaped, and
    /// the [`Builder::on_worker_lost`] calls for them have run; `false` if
    /// `timeout` ran out first. Those calls get at most one grace period from
    /// the first wait for them that has time to wait (a hook still running
    /// then finishes on its own); a hook that joins its own pool does not
    /// wait for itself.
    /// Escalates nothing (see [`Pool::stop`]), and starts nothing either: a
    /// pool still open (not closed, stopped or failed) shuts down only once
    /// some caller closes or stops it, so `join(None)` on a pool nothing
    /// closes blocks for good. Call [`Pool::close`] (or
    /// [`Pool::close_cancel_queued`], [`Pool::terminate`]) first, or use
    /// [`Pool::shutdown`]; joining an open pool is for a caller that another
    /// thread's close will release.
    /// In a forked copy of the pool's process, `false` at once (see
    /// [`Pool::is_forked_copy`]). On the pool's own supervisor thread (in a
    /// [`Builder::on_event`] callback), `false` at once too: the supervisor
    /// shuts the pool down only once the callback has returned, so a wait
    /// there could only wait for itself.
    pub fn join(&self, timeout: Option<Duration>) -> bool {
        if self.shared.on_supervisor_thread() {
            tracing::debug!("warden: a pool joined on its own supervisor thread does not wait for itself");
            return false;
        }
        // A timeout too long to add to the clock is no deadline at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if !self.shared.wait_done(timeout) {
            return false;
        }
        self.join_supervisor();
        self.wait_lost_hooks(deadline)
    }

    /// Joins the supervisor's thread, once it is done (the first caller
    /// does); never from that thread itself, which would wait for itself.
    fn join_supervisor(&self) {
        if self.shared.on_supervisor_thread() {
            return;
        }
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// Waits for the pending [`Builder::on_worker_lost`] calls of a pool that
    /// has shut down: until `until` (`false` if it comes first), and for at
    /// most one grace period from the first such wait, after which a call
    /// still running is left to finish on its own (`true`). On the hooks' own
    /// thread (a hook that stops or joins its pool), not at all.
    ///
    /// The wait holds no lock: a hook may join or stop its pool while another
    /// thread waits for it. A wait that is over before it begins (a poll with
    /// no time) does not start the grace period.
    fn wait_lost_hooks(&self, until: Option<Instant>) -> bool {
        let (done, current) = {
            let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            let Some(hooks) = lost.as_ref() else { return true };
            (hooks.done(), hooks.is_current())
        };
        if current {
            return true;
        }
        let now = Instant::now();
        let began = {
            let mut began = lock(&self.lost_wait_began);
            match *began {
                Some(t) => t,
                None if until.is_some_and(|u| u <= now) => return done.is_set(),
                None => *began.insert(now),
            }
        };
        let bound = began.checked_add(self.grace);
        let wake = earliest(bound, until);
        let wait = wake.map_or(LONGEST_WAIT, |w| w.saturating_duration_since(Instant::now()));
        if !done.wait(wait) {
            if !bound.is_some_and(|b| Instant::now() >= b) {
                return false; // `until` came first
            }
            tracing::warn!("warden: an on_worker_lost hook is still running after the pool shut down");
        }
        // Finished (its thread is joined here), or left to finish on its own.
        let finished = self.lost.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut hooks) = finished {
            hooks.wait(Duration::ZERO);
        }
        true
    }

    /// Graceful shutdown: queued tasks run, then workers retire. Blocks until
    /// every worker is reaped (but on the pool's own supervisor thread: see
    /// [`Pool::stop`]). Same as `stop(StopMode::Drain, None)`.
    ///
    /// A drain waits for its tasks as long as they run (as the standard
    /// library's `shutdown(wait=True)` does): give tasks a timeout
    /// ([`Builder::task_timeout`]), or bound the whole stop with
    /// [`Pool::shutdown_timeout`].
    pub fn shutdown(self) {
        self.stop(StopMode::Drain, None);
    }

    /// Like [`Pool::shutdown`], but after `timeout` the rest is terminated.
    /// Returns whether it finished without terminating. Same as
    /// `stop(StopMode::Drain, Some(now + timeout))`.
    pub fn shutdown_timeout(self, timeout: Duration) -> bool {
        self.stop(StopMode::Drain, Instant::now().checked_add(timeout))
    }

    /// The shutdown ladder, from start to end: [`begin_stop`](Pool::begin_stop)
    /// then [`wait_stopped`](Pool::wait_stopped). Every way a pool shuts down
    /// is this call with some mode and deadline: [`Pool::shutdown`],
    /// [`Pool::shutdown_timeout`], dropping the pool, and the Python package
    /// (including at interpreter exit).
    ///
    /// Returns whether the pool finished by `deadline`, so that nothing was
    /// cut off (always `true` without a deadline, always `false` for
    /// [`StopMode::Terminate`] and [`StopMode::Kill`], which cut off at once).
    /// Blocks only as long as the ladder allows: without a deadline, a
    /// draining stop waits for the tasks it drains. On the pool's own
    /// supervisor thread (in a [`Builder::on_event`] callback) it starts the
    /// ladder and returns `false` at once (see [`Pool::wait_stopped`]).
    pub fn stop(&self, mode: StopMode, deadline: Option<Instant>) -> bool {
        self.begin_stop(mode, deadline);
        self.wait_stopped(None).unwrap_or(false)
    }

    /// Starts the shutdown ladder, or makes a started one stricter, and
    /// returns at once. The pool takes no more tasks.
    ///
    /// The ladder, each rung bounded:
    ///
    /// 1. *retire*: per `mode`, queued tasks run ([`StopMode::Drain`]) or are
    ///    cancelled; running tasks finish; idle workers retire and run their
    ///    exit hooks (a retiring worker gets one grace period for that);
    /// 2. at `deadline` (at once for [`StopMode::Terminate`]): queued and
    ///    running tasks are cancelled and their workers get SIGTERM; their exit
    ///    hooks run;
    /// 3. one grace period later, SIGKILL (at once for [`StopMode::Kill`]);
    /// 4. reap, or give up on a process that cannot die after a few seconds.
    ///
    /// The supervisor thread climbs the ladder by itself. A caller waiting in
    /// [`wait_stopped`](Pool::wait_stopped) also kills the pool if it is still
    /// running two grace periods after the deadline, so no wait can hang.
    ///
    /// Calling it again, on this pool or on several pools one after the other,
    /// keeps the earliest deadline and the harshest mode: to give several
    /// pools one grace period between them, begin all with the same absolute
    /// `deadline`, then wait for each.
    pub fn begin_stop(&self, mode: StopMode, deadline: Option<Instant>) {
        if self.shared.foreign() {
            return; // a forked copy stops nothing of the original's
        }
        let now = Instant::now();
        let cutoff = match mode {
            StopMode::Drain | StopMode::CancelQueued => deadline,
            StopMode::Terminate | StopMode::Kill => Some(now),
        };
        {
            let mut plan = lock(&self.shared.stop);
            plan.cutoff = earliest(plan.cutoff, cutoff);
            if mode == StopMode::Kill {
                plan.killed_at = earliest(plan.killed_at, Some(now));
            }
        }
        self.shared.accepting.store(false, Ordering::SeqCst);
        let cmd = match mode {
            StopMode::Drain => Command::Close { drain: true, deadline },
            StopMode::CancelQueued => Command::Close { drain: false, deadline },
            StopMode::Terminate => Command::Terminate,
            StopMode::Kill => Command::Kill,
        };
        let _ = self.shared.send(cmd);
    }

    /// Waits for a ladder started with [`begin_stop`](Pool::begin_stop) to
    /// end, at most until `until`: `Some(in_time)` once the pool has shut down
    /// (`in_time` as [`Pool::stop`] returns it), `None` if `until` came first.
    ///
    /// Two grace periods (plus a little) after the deadline, a pool still
    /// running is killed; a few seconds after that, the wait gives up, logs an
    /// error and returns `Some(false)`. Once every worker is reaped, pending
    /// [`Builder::on_worker_lost`] calls are waited for as [`Pool::join`]
    /// waits for them: one grace period from the first wait for them, however
    /// many calls wait in steps, and not at all on the hooks' own thread.
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback, or where such a callback drops the last `Arc<Pool>`),
    /// `None` at once: the supervisor carries the ladder out once the
    /// callback has returned, by itself (every task gets its outcome, every
    /// worker is reaped), and a wait there could only wait for itself.
    pub fn wait_stopped(&self, until: Option<Instant>) -> Option<bool> {
        if self.shared.foreign() {
            return Some(false);
        }
        if self.shared.on_supervisor_thread() {
            tracing::debug!("warden: a pool stopped on its own supervisor thread does not wait for itself");
            return None;
        }
        loop {
            let plan = *lock(&self.shared.stop);
            // When this waiter must act next: kill, or give up after a kill.
            let act_at = match plan.killed_at {
                Some(killed) => Some(killed + KILL_WAIT + STOP_SLACK),
                // (Nothing to do where the sum overflows: that cutoff never comes.)
                None => plan.cutoff.and_then(|c| c.checked_add(self.grace * 2 + STOP_SLACK)),
            };
            let wake = earliest(act_at, until);
            // In short steps: a freeze is measured by how late a wait
            // comes back (below), to within one step.
            let step = crate::supervisor::FREEZE_STEP;
            let asked = wake.map_or(step, |w| w.saturating_duration_since(Instant::now()).min(step));
            let waited = Instant::now();
            if self.shared.wait_done(Some(asked)) {
                // Every worker is reaped; what may be left are
                // `on_worker_lost` calls, which no kill hurries: they get one
                // grace period from the first wait for them.
                self.join_supervisor();
                return self.wait_lost_hooks(until).then(|| self.shared.finished_by(plan.cutoff));
            }
            let now = Instant::now();
            if now.duration_since(waited).saturating_sub(asked) > crate::supervisor::NOT_RUNNING_GAP {
                // This process was not running for about that long (frozen
                // with its workers by a cgroup freezer, `docker pause`):
                // the workers' grace periods are their own running time,
                // and the ladder's cutoff moves out by the lateness, as the
                // supervisor's deadlines do; the part of that time another
                // waiter counted already counts once. (A caller's own
                // `until` stays.)
                let due = waited + asked;
                let mut stop = lock(&self.shared.stop);
                let from = stop.frozen_to.map_or(due, |f| f.max(due));
                let late = now.saturating_duration_since(from);
                if stop.killed_at.is_none() {
                    stop.cutoff = stop.cutoff.map(|c| c.checked_add(late).unwrap_or(c));
                    stop.frozen_to = Some(now);
                }
                drop(stop);
                if until.is_some_and(|u| now >= u) {
                    return None;
                }
                continue;
            }
            if act_at.is_some_and(|a| now >= a) {
                if plan.killed_at.is_none() {
                    self.begin_stop(StopMode::Kill, None);
                    continue;
                }
                tracing::error!("warden pool did not finish shutting down");
                return Some(false);
            }
            if until.is_some_and(|u| now >= u) {
                return None;
            }
        }
    }

    /// Whether this process is a forked copy of the pool's (`fork()` after
    /// the pool was built): there the pool is a copy of memory no supervisor
    /// serves, whose workers belong to the original; it refuses tasks, its
    /// [`Pool::join`] returns `false` at once, and dropping it stops nothing.
    pub fn is_forked_copy(&self) -> bool {
        self.shared.foreign()
    }

    /// Whether the pool has finished shutting down.
    pub fn is_shut_down(&self) -> bool {
        self.shared.is_done()
    }

    /// Why the pool failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// A snapshot of the live workers. Empty once the pool has shut down.
    ///
    /// Empty, too, on the pool's own supervisor thread (in a
    /// [`Builder::on_event`] callback or a task's reply), at once and with a
    /// warning logged: the supervisor takes the snapshot, and cannot while
    /// it runs the caller.
    pub fn workers(&self) -> Vec<WorkerSnapshot> {
        if self.shared.on_supervisor_thread() {
            tracing::warn!(
                "warden: Pool::workers called on the pool's own supervisor thread (an on_event callback or a \
                 task's reply) returns no workers: the supervisor cannot take a snapshot while it runs the caller"
            );
            return Vec::new();
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.shared.send(Command::Snapshot { reply: tx }).is_err() {
            return Vec::new();
        }
        // Bounded by the supervisor: see `cancel`.
        rx.recv().unwrap_or_default()
    }
}

impl Drop for Pool {
    /// A graceful shutdown with a bounded wait: queued tasks are cancelled,
    /// running ones get one grace period, workers retire and run their exit
    /// hooks. Same as `stop(StopMode::CancelQueued, Some(now + grace))`.
    ///
    /// Dropped on its own supervisor thread (an [`Builder::on_event`]
    /// callback that held the last `Arc<Pool>`), it starts that shutdown and
    /// returns at once; the supervisor carries it out once the callback has
    /// returned.
    fn drop(&mut self) {
        if self.shared.foreign() {
            return; // the original process shuts its pool down, not a forked copy
        }
        if self.shared.is_done() {
            self.join(Some(Duration::ZERO));
            return;
        }
        self.stop(StopMode::CancelQueued, Instant::now().checked_add(self.grace));
    }
}

/// The earlier of two optional instants (`None` is "never").
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Asks the supervisor to cancel a task and waits for its answer; on the
/// supervisor's own thread, which cannot answer while it runs the caller,
/// only asks, and returns `false`.
///
/// The wait has no timeout of its own because it needs none: the supervisor
/// answers a command in the loop turn that reads it (it never blocks on a
/// worker), and if it goes away first, the command and its reply sender are
/// dropped with its channel, which ends the wait with `false`, truthfully,
/// since then nothing will cancel the task. A timeout here could only report
/// `false` for a cancel that still lands.
fn cancel(shared: &SupervisorLink, id: u64, running_too: bool) -> bool {
    if shared.cancel_unclaimed(id) {
        return true;
    }
    if shared.on_supervisor_thread() {
        // Carried out once the caller returns; the task's outcome tells.
        tracing::debug!(task = id, "warden: a cancel on the pool's own supervisor thread does not wait for its answer");
        let _ = shared.send(Command::Cancel { id, running_too, reply: None });
        return false;
    }
    // Room for both answers: the supervisor never waits on this channel.
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    if shared.send(Command::Cancel { id, running_too, reply: Some(tx) }).is_err() {
        return false;
    }
    match rx.recv() {
        Ok(Some(cancelled)) => cancelled,
        // A task sent ahead: its worker is asked whether it has taken it up.
        Ok(None) => rx.recv_timeout(WORKER_ANSWER_WAIT).ok().flatten().unwrap_or(false),
        Err(_) => false,
    }
}

#[derive(Default)]
enum SlotState {
    #[default]
    Pending,
    Done(Result<Vec<u8>>),
    Taken,
}

/// Where a task's outcome lands.
#[derive(Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
    /// The waker of the last poll of the [`Handle`] as a `Future`. Set and
    /// read only while `state` is locked, so an outcome landing between a
    /// poll's look and its registration cannot be missed.
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    /// Whether the outcome, not taken yet, is that the task was cancelled.
    fn is_cancelled(&self) -> bool {
        matches!(&*lock(&self.state), SlotState::Done(Err(e)) if e.is_cancelled())
    }

    pub(crate) fn fill(&self, outcome: Result<Vec<u8>>) {
        let waker = {
            let mut state = lock(&self.state);
            if !matches!(*state, SlotState::Pending) {
                return;
            }
            *state = SlotState::Done(outcome);
            self.cv.notify_all();
            lock(&self.waker).take()
        };
        if let Some(waker) = waker {
            // On the supervisor's thread: a runtime's waker that panics must
            // not end the pool.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waker.wake())) {
                crate::panics::drop_payload(p);
                tracing::error!("waking a task's awaiting future panicked");
            }
        }
    }

    /// The outcome if it is there (taken), else `None` with `waker` kept to be
    /// woken when it lands.
    fn poll_take(&self, waker: &Waker) -> Option<Result<Vec<u8>>> {
        let mut state = lock(&self.state);
        match std::mem::replace(&mut *state, SlotState::Taken) {
            SlotState::Done(outcome) => Some(outcome),
            SlotState::Taken => Some(Err(Error::new(ErrorKind::AlreadyJoined))),
            SlotState::Pending => {
                *state = SlotState::Pending;
                let mut registered = lock(&self.waker);
                if !registered.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *registered = Some(waker.clone());
                }
                None
            }
        }
    }

    fn is_done(&self) -> bool {
        !matches!(*lock(&self.state), SlotState::Pending)
    }

    /// The outcome if it is there (taken), else `None`; never waits.
    fn try_take(&self) -> Option<Result<Vec<u8>>> {
        Self::take_from(&mut lock(&self.state))
    }

    fn take_from(state: &mut SlotState) -> Option<Result<Vec<u8>>> {
        match std::mem::replace(state, SlotState::Taken) {
            SlotState::Done(outcome) => Some(outcome),
            SlotState::Taken => Some(Err(Error::new(ErrorKind::AlreadyJoined))),
            SlotState::Pending => {
                *state = SlotState::Pending;
                None
            }
        }
    }

    fn take(&self, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut state = lock(&self.state);
        loop {
            if let Some(outcome) = Self::take_from(&mut state) {
                return outcome;
            }
            match deadline {
                None => state = self.cv.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::new(ErrorKind::WaitTimedOut));
                    }
                    state = self.cv.wait_timeout(state, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        }
    }
}

/// A task running in a pool. Dropping it detaches the task (it still runs).
///
/// Wait for its outcome with [`Handle::join`], or `.await` it: a `Handle` is
/// a [`Future`](std::future::Future) of the same outcome, woken by the
/// pool's supervisor when it lands, so an async program needs no thread per
/// task and no particular runtime. Dropping the future (a `select!` that
/// chose another branch, a timeout) detaches the task as dropping the handle
/// does; [`Handle::cancel`] it first to stop it.
///
/// Caveats for async code: the result is decoded in the `poll` that returns
/// it, on the runtime's thread (a large `Vec<u8>` decodes byte by byte;
/// `serde_bytes::ByteBuf` much faster, or join in `spawn_blocking`); and the
/// wake comes from the pool's own thread, which a runtime whose clock is
/// paused (`tokio::time::pause`, `start_paused`) does not count as work: it
/// advances its clock, and a timeout around the handle fires at once. A
/// one-off [`Child`] is not a future (its `join` also waits for the child to
/// be reaped): join it in `spawn_blocking`.
pub struct Handle<R> {
    id: u64,
    slot: Arc<Slot>,
    shared: Arc<SupervisorLink>,
    _result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for Handle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("id", &self.id).field("finished", &self.slot.is_done()).finish()
    }
}

impl<R: DeserializeOwned> Handle<R> {
    /// The task's id within its pool.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the task's outcome. In a forked copy of the pool's process,
    /// which no supervisor serves, fails at once instead.
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback or a task's reply), which delivers outcomes and cannot while
    /// it runs the caller: an outcome that is there already is returned as
    /// usual; otherwise the call fails at once with [`ErrorKind::Config`],
    /// saying so (the task goes on, detached). Join it on another thread, or
    /// await it.
    pub fn join(self) -> Result<R> {
        decode(self.outcome(None))
    }

    /// Waits at most `timeout`. On [`Error::is_wait_timeout`] the task goes on
    /// and the handle can be joined again; any other outcome is taken, and later
    /// joins return an "already joined" error.
    ///
    /// On the pool's own supervisor thread (in a [`Builder::on_event`]
    /// callback or a task's reply), which cannot deliver the outcome while
    /// it runs the caller: an outcome that is there already is returned as
    /// usual; otherwise [`ErrorKind::WaitTimedOut`] at once, whatever the
    /// timeout, with a warning logged (the handle can be joined again
    /// elsewhere).
    pub fn join_timeout(&self, timeout: Duration) -> Result<R> {
        decode(self.outcome(Some(timeout)))
    }

    /// The task's encoded outcome, waited for at most `timeout` (`None`: as
    /// long as it takes); never waited for where it cannot arrive: in a
    /// forked copy of the pool's process, or on the pool's supervisor thread.
    fn outcome(&self, timeout: Option<Duration>) -> Result<Vec<u8>> {
        if self.shared.foreign() {
            return Err(self.shared.foreign_error());
        }
        if !self.shared.on_supervisor_thread() {
            return self.slot.take(timeout);
        }
        if let Some(outcome) = self.slot.try_take() {
            return outcome;
        }
        let why = "the task's outcome cannot arrive while the pool's own supervisor thread (an on_event \
                   callback, a task's reply) runs the caller";
        match timeout {
            None => Err(Error::config(format!(
                "Handle::join of task {} cannot wait: {why}; join it on another thread, or await it",
                self.id
            ))),
            Some(_) => {
                tracing::warn!(task = self.id, "warden: Handle::join_timeout returns at once: {why}");
                Err(Error::new(ErrorKind::WaitTimedOut))
            }
        }
    }

    /// Whether the outcome is there.
    pub fn is_finished(&self) -> bool {
        self.slot.is_done()
    }

    /// Cancels the task: removed if queued, stopped with its worker if running.
    /// Returns whether it was cancelled (by this call or an earlier one);
    /// `false` if it had already finished. On the pool's own supervisor
    /// thread, does not wait for the supervisor's answer: see [`Pool::cancel`].
    pub fn cancel(&self) -> bool {
        self.slot.is_cancelled() || cancel(&self.shared, self.id, true)
    }
}

impl<R> Drop for Handle<R> {
    /// Lets go of the waker of the last poll (a handle dropped by a `select!`
    /// that chose another branch would otherwise keep the runtime's task
    /// alive as long as the detached task runs).
    fn drop(&mut self) {
        lock(&self.slot.waker).take();
    }
}

impl<R: DeserializeOwned> std::future::Future for Handle<R> {
    type Output = Result<R>;

    /// Ready with what [`Handle::join`] returns; polled again after that, an
    /// "already joined" error.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        if self.shared.foreign() {
            return Poll::Ready(Err(self.shared.foreign_error()));
        }
        match self.slot.poll_take(cx.waker()) {
            Some(outcome) => Poll::Ready(decode(outcome)),
            None => Poll::Pending,
        }
    }
}

fn decode<R: DeserializeOwned>(outcome: Result<Vec<u8>>) -> Result<R> {
    let bytes = outcome?;
    postcard::from_bytes(&bytes).map_err(|e| Error::codec(format!("cannot decode the task's result: {e}")))
}

/// A one-off child process running one function, with the same lifecycle as a
/// pool worker: start hook, exit path, supervision, bounded shutdown.
///
/// Dropping a `Child` that still runs does not detach it (a `JoinHandle`
/// would): the caller waits up to the grace period for the function to
/// return (a function the child has not started yet still starts), then the
/// child is stopped (SIGTERM, its exit path runs; SIGKILL after the grace
/// period), as a [`Pool`] is when dropped. Join it to wait for its result.
///
/// Once the function has returned, the child's exit hook and exit path take
/// the time they take, as a process's own way out does: no grace period
/// ends them; [`Child::terminate`], [`Child::kill`] or a drop do.
///
/// The child exits with code 0 once its function has returned, or 101 if it
/// panicked (as a Rust program whose `main` panics), after its exit hook.
pub struct Child<R> {
    pool: Pool,
    handle: Handle<R>,
    pid: Arc<(Mutex<Option<i32>>, Condvar)>,
    exit: Arc<Mutex<Option<WorkerEnd>>>,
}

impl<R> std::fmt::Debug for Child<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child").field("task", &self.handle).finish()
    }
}

/// Options for [`spawn_with`].
#[derive(Debug, Clone)]
pub struct ChildOptions {
    /// Start hook.
    pub on_start: Option<fn()>,
    /// Exit hook.
    pub on_exit: Option<fn(ExitReason)>,
    /// Timeout for the function. Longer than zero, as
    /// [`Builder::task_timeout`]: a zero timeout is refused with
    /// [`ErrorKind::Config`] before the child is started.
    pub timeout: Option<Duration>,
    /// Grace period of each escalation step.
    pub grace: Duration,
    /// Extra environment variables for the child.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// A terminal's Ctrl-C reaches the child as it reaches this process
    /// (the child then stops gracefully: its exit hook runs), when this
    /// process handles SIGINT; see [`Builder::forward_interrupts`]. On by
    /// default, as for a child in the terminal's process group.
    pub forward_interrupts: bool,
}

impl Default for ChildOptions {
    fn default() -> Self {
        ChildOptions {
            on_start: None,
            on_exit: None,
            timeout: None,
            grace: DEFAULT_GRACE,
            env: Vec::new(),
            forward_interrupts: true,
        }
    }
}

/// Runs `f(args)` in a new child process of this executable.
///
/// What `f`, `args` and the result may be is as for [`Pool::spawn`]: a
/// function of this program, and owned, serializable values. The child's
/// stdin is `/dev/null` (unlike [`std::process::Command`]'s default); its
/// stdout and stderr are this process's.
pub fn spawn<A, R>(f: fn(A) -> R, args: A) -> Result<Child<R>>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    spawn_with(f, args, ChildOptions::default())
}

/// Runs `f(args)` in a new child process of this executable, with options.
pub fn spawn_with<A, R>(f: fn(A) -> R, args: A, options: ChildOptions) -> Result<Child<R>>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    if options.timeout == Some(Duration::ZERO) {
        return Err(Error::config("ChildOptions::timeout must be longer than zero (leave it None for no timeout)"));
    }
    let pid = Arc::new((Mutex::new(None), Condvar::new()));
    let exit = Arc::new(Mutex::new(None));
    let (pid_sink, exit_sink) = (Arc::clone(&pid), Arc::clone(&exit));
    let mut builder =
        Pool::builder().name("warden-child").one_off().grace(options.grace).on_event(move |event| match event {
            LifecycleEvent::WorkerStarted { pid, .. } => {
                *lock(&pid_sink.0) = Some(*pid);
                pid_sink.1.notify_all();
            }
            LifecycleEvent::WorkerExited(e) => *lock(&exit_sink) = Some(e.clone()),
            _ => {}
        });
    if let Some(h) = options.on_start {
        builder = builder.on_start(h);
    }
    if let Some(h) = options.on_exit {
        builder = builder.on_exit(h);
    }
    for (k, v) in options.env {
        builder = builder.env(k, v);
    }
    if options.forward_interrupts {
        builder = builder.forward_interrupts();
    }
    let pool = builder.build()?;
    let handle = pool.spawn_with(f, args, TaskOptions { timeout: options.timeout })?;
    pool.close();
    Ok(Child { pool, handle, pid, exit })
}

impl<R> Drop for Child<R> {
    /// Lets the function run, even if the child has not started it yet, for
    /// up to one grace period; then stops it as a dropped [`Pool`] stops its
    /// workers. (The pool's own drop would cancel a function not yet started.)
    fn drop(&mut self) {
        if self.pool.shared.foreign() || self.pool.shared.is_done() {
            return;
        }
        self.pool.stop(StopMode::Drain, Instant::now().checked_add(self.pool.grace));
    }
}

impl<R: DeserializeOwned> Child<R> {
    /// The child's process id, once it has started (waits up to 10 s for that).
    pub fn pid(&self) -> Option<i32> {
        let (slot, cv) = &*self.pid;
        let guard = lock(slot);
        let (guard, _) =
            cv.wait_timeout_while(guard, Duration::from_secs(10), |p| p.is_none()).unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Waits for the function's result and for the child to exit and be reaped.
    pub fn join(self) -> Result<R> {
        if self.handle.shared.foreign() {
            return Err(self.handle.shared.foreign_error());
        }
        let outcome = self.handle.outcome(None);
        self.pool.join(None);
        decode(outcome)
    }

    /// Waits at most `timeout` for the result; see [`Handle::join_timeout`].
    pub fn join_timeout(&self, timeout: Duration) -> Result<R> {
        self.handle.join_timeout(timeout)
    }

    /// Stops the child: SIGTERM (its exit hook runs), SIGKILL after the grace period.
    pub fn terminate(&self) {
        self.pool.terminate();
    }

    /// Kills the child with SIGKILL.
    pub fn kill(&self) {
        self.pool.kill();
    }

    /// Waits for the child process to be reaped; `false` if `timeout` ran out.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.pool.join(timeout)
    }

    /// How the child ended, once it has been reaped.
    pub fn exit(&self) -> Option<WorkerEnd> {
        lock(&self.exit).clone()
    }
}
