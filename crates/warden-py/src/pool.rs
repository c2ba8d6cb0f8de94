//! `CorePool`: a core pool whose workers are Python interpreters.
//!
//! Task outcomes arrive on the pool's supervisor thread, which must neither
//! block nor take the GIL. They are pushed onto a queue that a Python thread
//! drains in batches through [`CorePool::next_completions`] (which waits with
//! the GIL released); each outcome carries the core's task id, the one id
//! Python knows the task by. Two lifecycle facts are recorded the same way:
//! the first worker's pid and the last worker's end.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use warden::frontend::WorkerCommand;
use warden::{LifecycleEvent, Pool, StartMethod, StopMode, TaskOptions, WorkerEnd};

use crate::convert::{fd_is_open, seconds, take_fd, wait_seconds, Text};
use crate::records::{core_err, core_error, Completion, PyErrorKind, PyWorkerEnd, WorkerState};

/// How long a blocking call waits at a time before it looks for signals
/// (Ctrl-C) with the GIL held again.
const SLICE: Duration = Duration::from_millis(50);
/// How often a drained queue re-checks whether its closing pool has finished.
const DONE_POLL: Duration = Duration::from_millis(20);
/// How often it re-checks a pool nobody asked to stop.
const IDLE_POLL: Duration = Duration::from_secs(1);
type Outcome = Result<warden::Output, warden::Error>;

/// Workers whose exit status [`CorePool::exit_status`] remembers (the last ones to exit).
const EXIT_LOG: usize = 1024;

/// How many outcomes (and watched starts) the queues keep room for once they
/// are empty: a burst of results waiting for the results thread grows them,
/// and the room above this is given back when they drain, so that the high
/// mark of one burst is not held for the pool's life.
const KEEP_ROOM: usize = 1024;

/// `(pid, exitcode, signal)` of a worker that exited.
type ExitRecord = (i32, Option<i32>, Option<i32>);

/// Where a task's id is written once `submit` knows it. An outcome can reach
/// the queue before that (the supervisor runs concurrently, and a refused task
/// answers at once); the queue's reader resolves the id only after every
/// `submit` in progress has finished (see [`Inner::submitting`]).
type TaskId = Arc<OnceLock<u64>>;

/// An entry of the outcome queue: a task's outcome.
type Entry = (TaskId, Outcome);

/// The tasks whose start is tracked (`submit(..., track_start=True)`), by
/// task id: [`CorePool::has_started`] answers from here, so that a start
/// costs the results thread nothing. A start can come before `submit` has
/// the task's id (`early`), and an outcome before `submit` registers it;
/// both are settled under this one lock.
#[derive(Default)]
struct Starts {
    /// Tracked tasks not started yet.
    watched: HashSet<u64>,
    /// Tracked tasks started, until their outcome has been delivered.
    running: HashSet<u64>,
    early: HashSet<u64>,
    /// The highest task id a `submit` has returned: a start of an unwatched
    /// task at or below it is nobody's business.
    returned: u64,
    /// The tasks of the last batch of outcomes `next_completions` returned:
    /// they leave `running` when the results thread asks for the next batch,
    /// having delivered that one (so a future never looks neither running
    /// nor done between the two).
    delivering: Vec<u64>,
}

impl Starts {
    /// Stops watching `task`'s start; whether it was watched.
    fn unwatch(&mut self, task: u64) -> bool {
        let was = self.watched.remove(&task);
        if self.watched.is_empty() && self.watched.capacity() > KEEP_ROOM {
            self.watched.shrink_to(KEEP_ROOM);
        }
        was
    }

    /// The outcomes of the last batch have been delivered.
    fn delivered(&mut self) {
        for task in self.delivering.drain(..) {
            self.running.remove(&task);
        }
        if self.running.is_empty() && self.running.capacity() > KEEP_ROOM {
            self.running.shrink_to(KEEP_ROOM);
        }
        if self.delivering.capacity() > KEEP_ROOM {
            self.delivering.shrink_to(KEEP_ROOM);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the supervisor thread shares with Python: plain data behind locks
/// that are held for a moment, never across a wait for Python.
#[derive(Default)]
struct Inner {
    queue: Mutex<VecDeque<Entry>>,
    ready: Condvar,
    /// How many threads wait on `ready` (changed under `queue`): an outcome
    /// pushed while nobody waits wakes nobody, and costs no system call.
    waiting: AtomicUsize,
    /// Held by `submit` from queueing a task until its id is written, and
    /// taken by the queue's reader (never while it holds `queue`) before it
    /// reads ids.
    submitting: Mutex<()>,
    /// Set once the pool was asked to stop (or failed): the queue's reader
    /// then also watches for the pool to finish.
    closing: AtomicBool,
    first_pid: Mutex<Option<i32>>,
    /// The pool's zygote while it is ready to fork.
    zygote: Mutex<Option<i32>>,
    /// Why the pool's zygote refused to fork, if it did.
    zygote_refused: Mutex<Option<String>>,
    /// When a worker of the pool last could not be started.
    start_refused: Mutex<Option<Instant>>,
    pid_known: Condvar,
    last_exit: Mutex<Option<WorkerEnd>>,
    /// The workers that exited, the last [`EXIT_LOG`] of them, for
    /// [`CorePool::exit_status`].
    exits: Mutex<VecDeque<ExitRecord>>,
    starts: Mutex<Starts>,
}

impl Inner {
    fn push(&self, task: TaskId, outcome: Outcome) {
        let mut queue = lock(&self.queue);
        queue.push_back((task, outcome));
        let waiting = self.waiting.load(Ordering::Relaxed) > 0;
        drop(queue);
        if waiting {
            self.ready.notify_one();
        }
    }

    fn started(&self, task: u64) {
        let mut starts = lock(&self.starts);
        if starts.unwatch(task) {
            starts.running.insert(task);
        } else if task > starts.returned {
            starts.early.insert(task);
        }
    }

    /// A task reported started is back in the queue, not started.
    fn requeued(&self, task: u64) {
        let mut starts = lock(&self.starts);
        if starts.running.remove(&task) {
            starts.watched.insert(task);
        } else {
            starts.early.remove(&task);
        }
    }

    fn wake(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _guard = lock(&self.queue);
        self.ready.notify_all();
    }

    fn on_event(&self, event: &LifecycleEvent) {
        match event {
            LifecycleEvent::WorkerStarted { pid, .. } => {
                lock(&self.first_pid).get_or_insert(*pid);
                self.pid_known.notify_all();
            }
            LifecycleEvent::WorkerExited(exit) => {
                let mut exits = lock(&self.exits);
                if exits.len() == EXIT_LOG {
                    exits.pop_front();
                }
                exits.push_back((exit.pid, exit.status.code(), exit.status.signal()));
                drop(exits);
                *lock(&self.last_exit) = Some(exit.clone());
            }
            LifecycleEvent::PoolFailed { .. } => self.wake(),
            LifecycleEvent::TaskStarted { task, .. } => self.started(*task),
            LifecycleEvent::TaskRequeued { task } => self.requeued(*task),
            LifecycleEvent::ZygoteReady { pid } => *lock(&self.zygote) = Some(*pid),
            LifecycleEvent::ZygoteExited { pid, .. } => {
                let mut zygote = lock(&self.zygote);
                if *zygote == Some(*pid) {
                    *zygote = None;
                }
            }
            LifecycleEvent::ZygoteRefused { reason } => *lock(&self.zygote_refused) = Some(reason.clone()),
            LifecycleEvent::SpawnFailed { .. } => *lock(&self.start_refused) = Some(Instant::now()),
            _ => {}
        }
    }
}

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365)))
}

/// A core pool of Python workers, and the queue of its task outcomes.
#[pyclass(module = "warden._warden", name = "CorePool", frozen)]
pub struct CorePool {
    pool: Mutex<Option<Arc<Pool>>>,
    inner: Arc<Inner>,
    /// The process that made it (`warden::frontend::process_id`).
    owner: u32,
}

impl CorePool {
    /// Whether this is a forked copy of the process that made the pool:
    /// there no lock is waited for, which a thread of the original (one
    /// submitting, the results thread) may have held at the fork, and which
    /// nothing in the copy would ever release.
    fn foreign(&self) -> bool {
        warden::frontend::process_id() != self.owner
    }

    /// The slot holding the core pool; in a forked copy, `None` if a
    /// thread of the original held it at the fork.
    fn slot(&self) -> Option<std::sync::MutexGuard<'_, Option<Arc<Pool>>>> {
        if !self.foreign() {
            return Some(lock(&self.pool));
        }
        match self.pool.try_lock() {
            Ok(slot) => Some(slot),
            Err(std::sync::TryLockError::Poisoned(slot)) => Some(slot.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn pool(&self) -> Option<Arc<Pool>> {
        self.slot().and_then(|slot| slot.clone())
    }

    /// Wakes whoever waits for outcomes, to see the pool closing; nobody
    /// does in a forked copy.
    fn wake(&self) {
        if self.foreign() {
            self.inner.closing.store(true, Ordering::SeqCst);
            return;
        }
        self.inner.wake();
    }

    fn is_done(&self) -> bool {
        self.pool().is_none_or(|p| p.is_shut_down())
    }

    /// Waits (GIL released by the caller) for at least one outcome, up to
    /// `deadline`. `None` once the pool has finished and nothing is left.
    fn wait_batch(&self, max: usize, deadline: Option<Instant>) -> Option<Vec<(u64, Outcome)>> {
        let mut queue = lock(&self.inner.queue);
        loop {
            if !queue.is_empty() {
                let n = queue.len().min(max.max(1));
                let batch: Vec<Entry> = queue.drain(..n).collect();
                if queue.is_empty() && queue.capacity() > KEEP_ROOM {
                    queue.shrink_to(KEEP_ROOM);
                }
                drop(queue);
                // Every id is written now, except those of tasks `submit`
                // refused: their caller got the error instead.
                drop(lock(&self.inner.submitting));
                return Some(batch.into_iter().filter_map(|(id, outcome)| Some((*id.get()?, outcome))).collect());
            }
            if self.is_done() {
                return None;
            }
            let now = Instant::now();
            let wait = match deadline {
                Some(d) if now >= d => return Some(Vec::new()),
                Some(d) => d - now,
                None => Duration::MAX,
            };
            // A closing pool is watched closely; a running one only finishes
            // unasked if its supervisor died, which a slow poll still notices.
            let poll = if self.inner.closing.load(Ordering::SeqCst) { DONE_POLL } else { IDLE_POLL };
            self.inner.waiting.fetch_add(1, Ordering::Relaxed);
            queue = self.inner.ready.wait_timeout(queue, wait.min(poll)).unwrap_or_else(|p| p.into_inner()).0;
            self.inner.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[pymethods]
impl CorePool {
    /// Builds the pool and starts its workers: `program args…` with the
    /// worker environment. The pool takes ownership of `pass_fds` (they are
    /// closed when it shuts down, or at once if building fails).
    #[new]
    #[pyo3(signature = (
        program, args, *, workers=1, name=None, init_payload=None, pass_fds=Vec::new(), env=Vec::new(),
        max_tasks_per_child=None, task_timeout=None, init_timeout=None, unbounded_start_hook=false, grace=None,
        restart_intensity=None, unlimited_restarts=false, fail_on_start_error=false, max_frame_size=None, prefetch=None, one_off=false, forward_interrupts=false, interrupts_since=None,
        start="zygote", zygote_payload=None, zygote_fallback_payload=None, max_memory_per_child=None, memory_limit=None, on_worker_lost=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        program: PathBuf,
        args: Vec<OsString>,
        workers: usize,
        name: Option<Text>,
        init_payload: Option<&[u8]>,
        pass_fds: Vec<RawFd>,
        env: Vec<(OsString, OsString)>,
        max_tasks_per_child: Option<u64>,
        task_timeout: Option<f64>,
        init_timeout: Option<f64>,
        unbounded_start_hook: bool,
        grace: Option<f64>,
        restart_intensity: Option<(u32, f64)>,
        unlimited_restarts: bool,
        fail_on_start_error: bool,
        max_frame_size: Option<usize>,
        prefetch: Option<usize>,
        one_off: bool,
        forward_interrupts: bool,
        interrupts_since: Option<u64>,
        start: &str,
        zygote_payload: Option<&[u8]>,
        zygote_fallback_payload: Option<&[u8]>,
        max_memory_per_child: Option<u64>,
        memory_limit: Option<u64>,
        on_worker_lost: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let fds = own_fds(pass_fds)?;
        let inner = Arc::new(Inner::default());
        let sink = Arc::clone(&inner);
        let mut builder = Pool::builder()
            .command(WorkerCommand::new(program, args))
            .workers(workers)
            .init_payload(init_payload.map(<[u8]>::to_vec).unwrap_or_default())
            .on_event(move |e| sink.on_event(e));
        if one_off {
            builder = builder.one_off();
        }
        builder = match (forward_interrupts, interrupts_since) {
            (true, Some(since)) => builder.forward_interrupts_since(since),
            (true, None) => builder.forward_interrupts(),
            (false, _) => builder,
        };
        builder = builder.start(match start {
            "zygote" => StartMethod::Zygote,
            "exec" => StartMethod::Exec,
            other => return Err(PyValueError::new_err(format!("start must be 'zygote' or 'exec', not {other:?}"))),
        });
        if let Some(payload) = zygote_payload {
            builder = builder.zygote_payload(payload.to_vec());
        }
        if let Some(payload) = zygote_fallback_payload {
            builder = builder.zygote_fallback_payload(payload.to_vec());
        }
        if let Some(Text(name)) = name {
            builder = builder.name(name);
        }
        for fd in fds {
            builder = builder.pass_fd(fd);
        }
        for (k, v) in env {
            builder = builder.env(k, v);
        }
        if let Some(n) = max_tasks_per_child {
            builder = builder.max_tasks_per_child(n);
        }
        if let Some(t) = seconds("task_timeout", task_timeout)? {
            builder = builder.task_timeout(t);
        }
        if let Some(t) = seconds("init_timeout", init_timeout)? {
            builder = builder.init_timeout(t);
        }
        if unbounded_start_hook {
            builder = builder.start_hook_timeout(None);
        }
        if let Some(t) = seconds("grace", grace)? {
            builder = builder.grace(t);
        }
        if let Some((max, window)) = restart_intensity {
            let window = seconds("restart window", Some(window))?.unwrap_or_default();
            builder = builder.restart_intensity(max, window);
        }
        if unlimited_restarts {
            builder = builder.no_restart_limit();
        }
        if fail_on_start_error {
            builder = builder.fail_on_start_error();
        }
        if let Some(bytes) = max_memory_per_child {
            builder = builder.max_memory_per_child(bytes);
        }
        if let Some(bytes) = memory_limit {
            builder = builder.memory_limit(bytes);
        }
        if let Some(hook) = on_worker_lost {
            builder = builder.on_worker_lost(move |lost| call_lost_hook(&hook, lost));
        }
        if let Some(b) = max_frame_size {
            builder = builder.max_frame_size(b);
        }
        if let Some(n) = prefetch {
            builder = builder.prefetch(n);
        }
        let pool = py.detach(|| builder.build()).map_err(core_err)?;
        Ok(CorePool { pool: Mutex::new(Some(Arc::new(pool))), inner, owner: warden::frontend::process_id() })
    }

    /// Queues a task and returns its id; its outcome comes out of
    /// `next_completions` under that id. With `track_start`, `has_started`
    /// tells when a worker has taken it. `segment` is
    /// the fd of the call's shared segment (see `warden._oob`): the pool owns
    /// it from this call on, even if the call fails, and passes it to the
    /// worker with the task. Raises `CoreError` if the pool takes no tasks.
    #[pyo3(signature = (payload, timeout=None, segment=None, track_start=false))]
    fn submit(&self, payload: &[u8], timeout: Option<f64>, segment: Option<RawFd>, track_start: bool) -> PyResult<u64> {
        // Own the fd first, so that it is closed on any error below.
        let segment = segment.map(|fd| take_fd("segment", fd, 0)).transpose()?;
        let pool = self.pool().ok_or_else(core_closed)?;
        let options = TaskOptions { timeout: seconds("timeout", timeout)? };
        if self.foreign() {
            // The core refuses it ("belongs to process N"), before any lock.
            let reply: Box<dyn FnOnce(Outcome) + Send> = Box::new(|_| {});
            return pool.submit_raw_with_segment(payload.to_vec(), segment, options, reply).map_err(core_err);
        }
        let inner = Arc::clone(&self.inner);
        let id: TaskId = Arc::default();
        let slot = Arc::clone(&id);
        let _submitting = lock(&self.inner.submitting);
        // With `track_start`, the outcome may come before the id is known:
        // `done` tells the code below, under the `starts` lock, not to watch it.
        let done = track_start.then(|| Arc::new(AtomicBool::new(false)));
        let seen = done.clone();
        let reply: Box<dyn FnOnce(Outcome) + Send> = Box::new(move |outcome| {
            if let Some(seen) = seen {
                let mut starts = lock(&inner.starts);
                seen.store(true, Ordering::SeqCst);
                if let Some(task) = slot.get() {
                    starts.unwatch(*task);
                }
            }
            inner.push(slot, outcome);
        });
        // The one copy of the inline part at this boundary: the core's queue
        // owns its payload (large buffers travel in the segment instead).
        let task = pool.submit_raw_with_segment(payload.to_vec(), segment, options, reply).map_err(core_err)?;
        // Written once, here: `set` cannot fail.
        let _ = id.set(task);
        let mut starts = lock(&self.inner.starts);
        starts.returned = starts.returned.max(task);
        let early = starts.early.remove(&task);
        if done.is_some_and(|done| !done.load(Ordering::SeqCst)) {
            if early {
                starts.running.insert(task);
            } else {
                starts.watched.insert(task);
            }
        }
        Ok(task)
    }

    /// Whether a worker has taken task `task` (submitted with `track_start`)
    /// and its outcome has not been delivered yet. `False` in a forked copy.
    fn has_started(&self, task: u64) -> bool {
        !self.foreign() && lock(&self.inner.starts).running.contains(&task)
    }

    /// Waits up to `timeout` seconds (forever if `None`) for task outcomes and
    /// returns up to `max` of them as `Completion` records (an empty list on
    /// timeout); a result's shared segment comes with its record
    /// (`Completion.take_segment`). Returns `None` once the pool has shut
    /// down and every outcome was taken. Called again, it takes the
    /// outcomes it returned before as delivered (see `has_started`).
    #[pyo3(signature = (max=256, timeout=None))]
    fn next_completions<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let deadline = deadline(wait_seconds(timeout)?);
        lock(&self.inner.starts).delivered();
        let Some(batch) = py.detach(|| self.wait_batch(max, deadline)) else { return Ok(None) };
        lock(&self.inner.starts).delivering.extend(batch.iter().map(|(task, _)| *task));
        let list = PyList::empty(py);
        for (task, outcome) in batch {
            list.append(Completion::new(py, task, outcome)?)?;
        }
        Ok(Some(list))
    }

    /// Cancels a task: a queued one is removed, a running one is stopped with
    /// its worker (SIGTERM, exit hook, grace period, SIGKILL; replaced).
    /// Returns whether it was cancelled. `Future.cancel(running=True)` and
    /// `AsyncResult.cancel(running=True)` are its one Python path (asyncio's
    /// cancellation goes through them).
    fn cancel(&self, py: Python<'_>, task: u64) -> bool {
        // A task still queued is cancelled at once, holding the GIL: only
        // one that has left the queue waits for the supervisor's answer.
        self.pool().is_some_and(|p| p.cancel_unclaimed(task) || py.detach(|| p.cancel(task)))
    }

    /// Asks for a task to be cancelled, queued or running, without waiting
    /// for the answer: its outcome tells.
    fn cancel_nowait(&self, task: u64) {
        if let Some(p) = self.pool() {
            p.cancel_nowait(task);
        }
    }

    /// Cancels a task only if it is still queued.
    fn cancel_queued(&self, py: Python<'_>, task: u64) -> bool {
        self.pool().is_some_and(|p| p.cancel_unclaimed(task) || py.detach(|| p.cancel_queued(task)))
    }

    /// Cancels every task not started yet (queued, or sent ahead and not
    /// started); returns their ids. The pool stays open.
    fn cancel_all_queued(&self, py: Python<'_>) -> Vec<u64> {
        self.pool().map(|p| py.detach(|| p.cancel_all_queued())).unwrap_or_default()
    }

    /// Takes no more tasks; queued ones run, then the workers retire. Returns at once.
    fn close(&self) {
        if let Some(p) = self.pool() {
            p.close();
        }
        self.wake();
    }

    /// Takes no more tasks and cancels the queued ones; running ones finish,
    /// then the workers retire. Returns at once.
    fn close_cancel_queued(&self) {
        if let Some(p) = self.pool() {
            p.close_cancel_queued();
        }
        self.wake();
    }

    /// Cancels every task and stops every worker: SIGTERM (exit hooks run),
    /// SIGKILL after the grace period. Returns at once.
    fn terminate(&self) {
        if let Some(p) = self.pool() {
            p.terminate();
        }
        self.wake();
    }

    /// Cancels every task and kills every worker with SIGKILL. Returns at once.
    fn kill(&self) {
        if let Some(p) = self.pool() {
            p.kill();
        }
        self.wake();
    }

    /// Waits until the pool has shut down and every worker is reaped, up to
    /// `timeout` seconds (forever if `None`). Returns whether it has. Raises
    /// `KeyboardInterrupt` (or what a signal handler raises) while waiting.
    /// In a forked copy of the pool's process, `True` at once: nothing there
    /// is this process's to wait for (the core would answer "not yet"
    /// forever, and this loop would spin).
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let Some(pool) = self.pool() else { return Ok(true) };
        if pool.is_forked_copy() {
            return Ok(true);
        }
        let deadline = deadline(wait_seconds(timeout)?);
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
                None => SLICE,
            };
            if py.detach(|| pool.join(Some(slice))) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// The core's shutdown ladder (`warden::Pool::stop`): starts it with
    /// `mode` ("drain", "cancel_queued", "terminate" or "kill") and a deadline
    /// `within` seconds from now (none if `None`), or makes a started one
    /// stricter (the earliest deadline and the harshest mode win). With
    /// `wait`, waits for the ladder to end (bounded by the ladder itself, the
    /// GIL released; raises `KeyboardInterrupt` or what a signal handler
    /// raises) and returns whether the pool finished by the deadline; without,
    /// returns at once whether it has finished.
    #[pyo3(signature = (mode, within=None, wait=true))]
    fn stop(&self, py: Python<'_>, mode: &str, within: Option<f64>, wait: bool) -> PyResult<bool> {
        let mode = match mode {
            "drain" => StopMode::Drain,
            "cancel_queued" => StopMode::CancelQueued,
            "terminate" => StopMode::Terminate,
            "kill" => StopMode::Kill,
            other => return Err(PyValueError::new_err(format!("unknown stop mode {other:?}"))),
        };
        let deadline = deadline(seconds("within", within)?);
        let Some(pool) = self.pool() else { return Ok(true) };
        pool.begin_stop(mode, deadline);
        self.wake();
        if !wait {
            return Ok(pool.is_shut_down());
        }
        loop {
            let until = Instant::now() + SLICE;
            if let Some(in_time) = py.detach(|| pool.wait_stopped(Some(until))) {
                return Ok(in_time);
            }
            py.check_signals()?;
        }
    }

    /// Waits up to `timeout` seconds for the first worker's pid; `None` if
    /// the pool finished (or the time ran out) without one.
    fn wait_pid(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<i32>> {
        let deadline = deadline(wait_seconds(Some(timeout))?);
        loop {
            let slice = deadline.map_or(SLICE, |d| d.saturating_duration_since(Instant::now()).min(SLICE));
            let pid = py.detach(|| {
                let guard = lock(&self.inner.first_pid);
                let (guard, _) = self
                    .inner
                    .pid_known
                    .wait_timeout_while(guard, slice, |p| p.is_none())
                    .unwrap_or_else(|p| p.into_inner());
                *guard
            });
            if pid.is_some() {
                return Ok(pid);
            }
            py.check_signals()?;
            if self.is_done() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(*lock(&self.inner.first_pid));
            }
        }
    }

    /// How the last worker to exit ended, if one has.
    fn last_exit(&self) -> Option<PyWorkerEnd> {
        lock(&self.inner.last_exit).as_ref().map(PyWorkerEnd::from)
    }

    /// `(exitcode, signal)` of worker `pid` once it has exited and was
    /// reaped (among the last 1024 to exit); `None` otherwise.
    fn exit_status(&self, pid: i32) -> Option<(Option<i32>, Option<i32>)> {
        lock(&self.inner.exits).iter().rev().find(|e| e.0 == pid).map(|e| (e.1, e.2))
    }

    /// The pids of the last `count` workers to exit and be reaped (among the
    /// last 1024), the earliest first.
    fn exited(&self, count: usize) -> Vec<i32> {
        let exits = lock(&self.inner.exits);
        exits.iter().skip(exits.len().saturating_sub(count)).map(|e| e.0).collect()
    }

    /// The live workers.
    fn workers(&self, py: Python<'_>) -> Vec<WorkerState> {
        let Some(pool) = self.pool() else { return Vec::new() };
        py.detach(|| pool.workers().into_iter().map(WorkerState::from).collect())
    }

    /// The pid of the pool's zygote while it is ready to fork workers.
    fn zygote_pid(&self) -> Option<i32> {
        *lock(&self.inner.zygote)
    }

    /// Why the pool's zygote refused to fork (the pool starts workers by
    /// exec since), if it did.
    fn zygote_refused(&self) -> Option<String> {
        lock(&self.inner.zygote_refused).clone()
    }

    /// How many seconds ago a worker of the pool last could not be started
    /// (the system refused it, or it failed), if one ever was.
    fn seconds_since_start_refused(&self) -> Option<f64> {
        lock(&self.inner.start_refused).map(|at| at.elapsed().as_secs_f64())
    }

    /// Why the pool failed, if it did.
    fn failure(&self) -> Option<String> {
        self.pool().and_then(|p| p.failure())
    }

    /// Whether the pool has finished shutting down.
    fn is_shut_down(&self) -> bool {
        self.is_done()
    }

    /// Shuts the pool down the way dropping it does (queued tasks cancelled,
    /// running ones get one grace period, workers retire, then escalation),
    /// waiting with the GIL released, and releases it. Idempotent.
    fn dispose(&self, py: Python<'_>) {
        let pool = self.slot().and_then(|mut slot| slot.take());
        self.wake();
        if let Some(pool) = pool {
            py.detach(move || drop(pool));
        }
    }
}

/// Takes ownership of the fds handed over as `pass_fds`: each distinct fd
/// gets exactly one owner (a repeated number is the same fd, passed once).
/// If any is not an open fd above stdio, every valid one is closed, since the
/// caller handed them all over, and the error names the first bad one.
fn own_fds(pass_fds: Vec<RawFd>) -> PyResult<Vec<OwnedFd>> {
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(pass_fds.len());
    let mut taken = std::collections::HashSet::with_capacity(pass_fds.len());
    let mut bad = None;
    for fd in pass_fds {
        if !taken.insert(fd) {
            continue;
        }
        if fd < 3 || !fd_is_open(fd) {
            bad.get_or_insert(fd);
            continue;
        }
        // SAFETY: the fd is open (checked above), the caller hands it over, and
        // it is taken once (repeats are skipped above).
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    match bad {
        // Dropping `fds` closes every valid one.
        Some(fd) => Err(PyValueError::new_err(format!("pass_fds: {fd} is not an open fd above stdio"))),
        None => Ok(fds),
    }
}

/// A worker that died without running its exit path, as `on_worker_lost`
/// receives it: `worker`, `pid`, `exitcode` or `signal`, the core's `task`
/// id, and the `record` it left (bytes), each `None` when unknown.
#[pyclass(module = "warden._warden", name = "LostWorker", frozen, get_all)]
pub struct LostWorker {
    worker: u64,
    pid: i32,
    exitcode: Option<i32>,
    signal: Option<i32>,
    task: Option<u64>,
    record: Option<Py<PyBytes>>,
}

/// Calls the Python `on_worker_lost` hook, on the pool's `-lost` thread, if
/// the interpreter can still run it. Errors are the Python side's to report;
/// one that escapes is printed here.
fn call_lost_hook(hook: &Py<PyAny>, lost: &warden::LostWorker) {
    if !crate::finalize::interpreter_usable() {
        return;
    }
    let _ = Python::try_attach(|py| {
        let record = lost.record.as_deref().map(|r| PyBytes::new(py, r).unbind());
        let info = LostWorker {
            worker: lost.worker,
            pid: lost.pid,
            exitcode: lost.status.code(),
            signal: lost.status.signal(),
            task: lost.task,
            record,
        };
        if let Err(e) = hook.bind(py).call1((info,)) {
            e.print(py);
        }
    });
}

fn core_closed() -> PyErr {
    core_error(PyErrorKind::Closed, "the pool is shut down and takes no new tasks".into())
}

/// Gives the C heap's free memory back to the kernel (`malloc_trim(0)`,
/// with the GIL released); whether any was. A burst of tasks leaves the
/// parent's heap with free chunks the allocator keeps (the glue's buffers,
/// dict tables of pending tasks); the results thread calls this when a burst
/// ends, so the process's RSS goes back down with its load. Does nothing but
/// with glibc.
#[pyfunction]
pub fn trim_heap(py: Python<'_>) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; glibc makes it thread-safe.
        py.detach(|| unsafe { libc::malloc_trim(0) } == 1)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = py;
        false
    }
}

/// Whether `fd`, just made, says this process is short of descriptors (the
/// core's `fds_scarce`: within a quarter of the soft limit of it), the
/// rule the pool also reads results by.
#[pyfunction]
pub fn fds_scarce(fd: RawFd) -> bool {
    warden::frontend::fds_scarce(fd)
}

/// How many times this process has passed a SIGINT (a terminal's Ctrl-C,
/// or one another program sent) on to its one-off children (the core's
/// `interrupts_forwarded`).
#[pyfunction]
pub fn interrupts_forwarded() -> u64 {
    warden::interrupts_forwarded()
}

/// Whether the last SIGINT this process got was passed on to its one-off
/// children (the core's `last_interrupt_forwarded`).
#[pyfunction]
pub fn last_interrupt_forwarded() -> bool {
    warden::last_interrupt_forwarded()
}

/// The kernel thread ids of the threads the core runs in this process (the
/// core's `own_thread_ids`): the others are Python's or a library's.
#[pyfunction]
pub fn own_thread_ids() -> Vec<i32> {
    warden::frontend::own_thread_ids()
}

/// Makes this process pass a terminal's Ctrl-C on to its `Process`
/// children and chains the handler in front of the current one (the core's
/// `prepare_interrupt_forwarding`): the count of Ctrl-Cs passed on so far,
/// for `CorePool(interrupts_since=...)`, or `None` if SIGINT is not handled.
#[pyfunction]
pub fn prepare_interrupt_forwarding() -> Option<u64> {
    warden::frontend::prepare_interrupt_forwarding()
}

/// Chains the core's Ctrl-C forwarding over the SIGINT handler installed
/// now (the core's `chain_interrupt_handler`): after `signal.signal`
/// replaced it, before a wait on a `Process`. Whether it is in place.
#[pyfunction]
pub fn chain_interrupt_handler() -> bool {
    warden::frontend::chain_interrupt_handler()
}

/// Opens `/dev/null` on whichever of fds 0, 1 and 2 is closed in this
/// process (the core's `fill_closed_stdio`), so that no descriptor a pool
/// makes takes their place. Called before a pool or process makes its first
/// descriptor.
#[pyfunction]
pub fn fill_closed_stdio() {
    warden::frontend::fill_closed_stdio();
}
