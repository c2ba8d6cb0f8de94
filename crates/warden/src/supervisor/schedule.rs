//! Scheduling: how many workers the pool wants and starting them; which
//! worker gets the next task (idle workers first, then pipelines up to
//! `prefetch`); retiring idle workers once the pool closes.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::Interest;

use crate::interrupts::prepare_interrupt_forwarding;
use crate::spawn::spawn_worker;
use crate::wire::{Message, RetireReason};

use super::process::Pidfd;
use super::worker::{retire, InFlight, Worker, WorkerPhase};
use super::zygote::NextStart;
use super::{pidfd_token, sock_token, Config, LifecycleEvent, PoolPhase, Supervisor};

/// Delay before trying again after a worker could not be spawned at all.
const SPAWN_RETRY: Duration = Duration::from_millis(100);

/// The first delay before trying again after the system refused a start for
/// want of processes, memory or descriptors (`EAGAIN` under `ulimit -u`,
/// `ENOMEM`, `EMFILE` under `ulimit -n`); it doubles with each refusal in a
/// row, up to [`SHORTAGE_RETRY_MAX`].
const SHORTAGE_RETRY: Duration = Duration::from_millis(10);

/// The longest delay between two starts the system refuses for want of
/// processes, memory or descriptors.
const SHORTAGE_RETRY_MAX: Duration = Duration::from_secs(1);

/// How often, at most, a pool says on stderr that the system refuses its
/// starts: once for a shortage, and not again for one that comes back
/// within this time (a pool whose workers each run one task meets a limit
/// at each start while the limit lasts).
const SHORTAGE_SAID_EVERY: Duration = Duration::from_secs(60);

/// A start the zygote declined: the system's error number there, and its
/// account of the failure.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub(super) struct StartDeclined {
    /// The `errno` the zygote's fork (or its preparation) failed with.
    pub(super) errno: i32,
    /// What the zygote said.
    pub(super) why: String,
}

/// Whether a start failed because the system is short of processes, threads,
/// memory or file descriptors (`EAGAIN`, `ENOMEM`, `EMFILE`, `ENFILE`): a
/// condition of the moment, which another program (or this one's other
/// pools, or its own tasks' buffers) may end, not the worker's failure.
pub(super) fn is_shortage(e: &std::io::Error) -> bool {
    matches!(errno(e), Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE))
        || matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::OutOfMemory)
}

/// Whether a start failed because this process has no descriptor left
/// (`EMFILE`): a limit of the program's own, which only its own files,
/// sockets and buffers in flight use up.
pub(super) fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    errno(e) == Some(libc::EMFILE)
}

/// The system's error number behind `e`, also for a start the zygote declined.
fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        let inner = e.get_ref()?;
        inner
            .downcast_ref::<StartDeclined>()
            .map(|d| d.errno)
            .or_else(|| inner.downcast_ref::<crate::spawn::StartStepFailed>().map(|f| f.errno))
    })
}

/// How long a task runs, at least, before the tasks sent ahead to its worker
/// are asked back (to start, in the order they came, on whichever worker is
/// free first); longer where tasks take longer on average (see
/// [`TaskTime::recall_after`]).
pub(super) const RECALL_AFTER: Duration = Duration::from_millis(10);

/// Tasks shorter than this on average are sent ahead up to the pool's
/// `prefetch`; longer ones (and all until one has been timed) one at most,
/// as the standard library's executor keeps one call queued beyond its
/// workers: the next task is there when the last one ends, and little can
/// wait behind a running one, even behind a worker that is frozen (SIGSTOP,
/// a debugger), which cannot give back what it holds.
const SEND_AHEAD_BELOW: Duration = Duration::from_millis(2);

/// Tasks at least this long on average are not sent ahead at all: each
/// worker gets its next task when it is free, as the standard library's
/// workers take theirs from one queue, so tasks start in the order they
/// came (a task sent ahead behind a long one would wait for it while later
/// ones start elsewhere). The round trip this costs a worker between tasks
/// (a fraction of a millisecond) is lost in tasks this long.
const SEND_NONE_FROM: Duration = Duration::from_millis(20);

/// The pool's average task time: an exponentially weighted mean of the
/// latest tasks' run times (each weighs an eighth).
#[derive(Default)]
pub(super) struct TaskTime {
    mean: Option<Duration>,
}

impl TaskTime {
    /// Counts one task's run time.
    pub(super) fn record(&mut self, took: Duration) {
        self.mean = Some(match self.mean {
            None => took,
            Some(mean) => (mean * 7 + took) / 8,
        });
    }

    /// How many tasks a worker may hold, the running one included.
    pub(super) fn depth(&self, prefetch: usize) -> usize {
        match self.mean {
            Some(mean) if mean < SEND_AHEAD_BELOW => prefetch,
            Some(mean) if mean >= SEND_NONE_FROM => 1,
            _ => prefetch.min(2),
        }
    }

    /// How long a task runs before what was sent ahead of it is asked back:
    /// [`RECALL_AFTER`], or four times the mean task time if that is longer
    /// (a task of the usual length is not waited for in vain).
    pub(super) fn recall_after(&self) -> Duration {
        self.mean.map_or(RECALL_AFTER, |mean| RECALL_AFTER.max(mean.saturating_mul(4)))
    }
}

/// How long after a caller's cancel nothing is sent ahead: a task sent ahead
/// is cancelled only once its worker has answered, and each one it gives
/// back would leave room filled from the queue's front, with the very tasks
/// a program cancelling its futures in a loop cancels next.
pub(super) const CANCEL_CALM: Duration = Duration::from_millis(20);

/// How long an idle worker is kept for a task asked back from another
/// worker, rather than given a later one from the queue: the answer comes
/// within a millisecond or so (the worker's watcher thread reads the
/// channel), but a frozen worker (SIGSTOP, a debugger) never answers.
pub(super) const GIVE_BACK_WAIT: Duration = Duration::from_millis(20);

/// How many tasks the queue keeps room for once it is empty: a burst of
/// submissions grows it, and the room above this is given back when it
/// drains, so that the high mark of one burst is not held for the pool's life.
pub(super) const KEEP_QUEUED: usize = 1024;

impl Supervisor {
    pub(super) fn wanted_workers(&self) -> usize {
        if self.cfg.one_off && self.spawned >= 1 {
            return 0;
        }
        let draining = match self.phase {
            PoolPhase::Running => return self.cfg.workers,
            PoolPhase::Closing { drain: true } if !self.queue.is_empty() => self.cfg.workers.min(self.queue.len()),
            PoolPhase::Closing { .. } => 0,
            _ => return 0,
        };
        // A pool closed before its first workers started (they wait for its
        // zygote) still starts them: each runs its start hook, then retires,
        // as every worker `multiprocessing.Pool` starts runs its initializer.
        let owed = usize::try_from(self.spawned).map_or(0, |spawned| self.cfg.workers.saturating_sub(spawned));
        // Not while the system refuses the pool its workers (processes,
        // threads, descriptors): the drain would wait for starts that do
        // not come, until the init timeout.
        if owed == 0 || self.shortage.is_some() {
            return draining;
        }
        let serving = self.workers.values().filter(|w| w.is_serving()).count();
        draining.max(serving + owed)
    }

    pub(super) fn ensure_workers(&mut self, now: Instant) {
        let want = self.wanted_workers();
        if want > 0 {
            // Due or not, a zygote's own retry time is its deadline: start it
            // here even while exec starts wait for theirs.
            self.ensure_zygote(now);
        }
        if self.spawn_retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.spawn_retry_at = None;
        // A worker asked to stop for its task keeps its place until it
        // answers: it may serve on.
        let mut serving = self.workers.values().filter(|w| w.holds_its_place()).count();
        // Workers on their way out (retiring, stopped, killed and not yet
        // reaped) leave their places to replacements at once, unless the
        // pool of n has 2n worker processes already: a slow exit path (a
        // finalizer closing connections) with every task recycling its
        // worker, or timing out, would otherwise pile up processes without
        // bound.
        let leaving = self.workers.len() - serving;
        let most = want.max(self.cfg.workers) + self.cfg.workers;
        // While the system is short of processes or threads, workers start
        // one at a time: two started together could each get part of the
        // threads they need and wait for the rest, which the other holds.
        let mut starting = self.workers.values().filter(|w| w.phase == WorkerPhase::Starting).count();
        while serving < want && serving + leaving < most && self.phase != PoolPhase::Failed {
            if self.shortage.is_some() && starting > 0 {
                return;
            }
            // Each worker holds descriptors here (its channel, its pidfd), and
            // so does each result with large buffers until it is taken: past
            // the first worker, one more is started only while a quarter of
            // what `ulimit -n` allows stays free, or the workers would fill
            // the table and the results they send could not be received.
            let any = self.workers.values().next().map(|w| w.sock.as_fd());
            if any.is_some_and(super::pace::fds_scarce_now) {
                let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
                let limit = limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
                let error = format!(
                    "{serving} of {want} workers serving: another would leave fewer than a quarter of the \
                     descriptors this process may open (ulimit -n: {limit}) free"
                );
                self.emit(LifecycleEvent::SpawnFailed { error: error.clone() });
                self.start_refused_for_shortage(now, serving, error);
                return;
            }
            match self.spawn_one() {
                // The shortage ends when a worker is ready, not when one
                // starts: the system may still refuse it its threads.
                Ok(true) => {
                    serving += 1;
                    starting += 1;
                }
                Ok(false) => return, // waiting for the zygote
                Err(e) => {
                    let error = format!("cannot start a worker ({}): {e}", self.cfg.command.program.display());
                    tracing::warn!(pool = %self.cfg.name, "{error}");
                    self.emit(LifecycleEvent::SpawnFailed { error: error.clone() });
                    if !self.served && self.workers.is_empty() && is_out_of_descriptors(&e) {
                        // Out of descriptors before any worker of the pool
                        // ever started, the limit is too low for it: it fails
                        // at once (whatever its restart limit), as the
                        // standard library's constructor does. Otherwise the
                        // program's own files, the buffers of tasks in flight
                        // and the workers starting hold them for a while: a
                        // shortage.
                        let what = if self.cfg.one_off { "to start it" } else { "before the first worker" };
                        self.fail(format!("{error}: no descriptor to spare {what}"));
                    } else if is_shortage(&e) && !self.cfg.one_off {
                        self.start_refused_for_shortage(now, serving, error);
                    } else {
                        self.note_crash(error.clone());
                        self.spawn_retry_at = Some(now + SPAWN_RETRY);
                        // Bounded even without a restart limit: starts that
                        // keep failing with no worker serving fail the pool
                        // after the init timeout, as a shortage does.
                        if serving == 0 && self.phase != PoolPhase::Failed {
                            let since = *self.unserved_since.get_or_insert(now);
                            let timeout = self.cfg.init_timeout;
                            if now.duration_since(since) >= timeout {
                                let why = format!("no worker could be started for {timeout:?}, the init timeout");
                                self.fail(format!("{why}; last: {error}"));
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    /// The system refused a start for want of processes or memory: not a
    /// worker's failure (it does not count toward the restart intensity),
    /// but tried again after a delay that doubles while it lasts. Bounded
    /// all the same: the pool fails if it has had no serving worker for the
    /// init timeout since the shortage began.
    pub(super) fn start_refused_for_shortage(&mut self, now: Instant, serving: usize, error: String) {
        let (since, delay) = match self.shortage {
            Some((since, delay)) => (since, (delay * 2).min(SHORTAGE_RETRY_MAX)),
            None => {
                tracing::warn!(pool = %self.cfg.name, "{error}; trying again, one worker at a time, while it lasts");
                // Said here, once a minute at most (a worker refused its
                // threads says nothing itself: one line per start, for as
                // long as the shortage lasted).
                if !self.shortage_said.is_some_and(|said| now.duration_since(said) < SHORTAGE_SAID_EVERY) {
                    self.shortage_said = Some(now);
                    report!(
                        "warden: pool {}: {error}; it tries again, one worker at a time, while the shortage lasts",
                        self.cfg.name
                    );
                }
                (now, SHORTAGE_RETRY)
            }
        };
        self.shortage = Some((since, delay));
        self.spawn_retry_at = Some(now + delay);
        let timeout = self.cfg.init_timeout;
        if serving == 0 && now.duration_since(since) >= timeout {
            self.fail(format!("no worker could be started for {timeout:?}, the init timeout; last: {error}"));
        }
    }

    /// Starts one worker, forked by the zygote or by exec; `Ok(false)` if it
    /// must wait for the pool's first zygote.
    pub(super) fn spawn_one(&mut self) -> std::io::Result<bool> {
        // In front of the SIGINT handler again (a handler set since the
        // pool was built replaced it); a Ctrl-C since the count taken then
        // reaches the child too.
        let interrupts = match self.cfg.forward_interrupts {
            true => {
                prepare_interrupt_forwarding().map(|now| self.cfg.interrupts_since.map_or(now, |since| since.min(now)))
            }
            false => None,
        };
        let spawned = match self.next_start() {
            NextStart::Forked(spawned) => spawned,
            NextStart::Exec => spawn_worker(&self.cfg.command, &self.pass_fds, self.cfg.max_frame)?,
            NextStart::Wait => return Ok(false),
            NextStart::Failed(e) => return Err(e),
        };
        let id = self.next_worker;
        self.next_worker += 1;
        self.spawned += 1;
        let mut process = Pidfd::new(spawned.pid, spawned.pidfd);
        if let Some(since) = interrupts {
            process.forward_interrupts(since);
        }
        let nonblocking = spawned.channel.set_nonblocking(true);
        let sock = UnixStream::from_std(spawned.channel);
        let init_deadline = Instant::now() + self.cfg.init_timeout;
        // From here a failure drops the worker, which kills and reaps it.
        let mut worker = Worker::new(id, Box::new(process), sock, self.cfg.max_frame, init_deadline);
        nonblocking?;
        let registry = self.poll.registry();
        registry.register(&mut worker.sock, sock_token(id), Interest::READABLE)?;
        if let Some(exit_fd) = worker.process.exit_fd() {
            if let Err(e) = registry.register(&mut SourceFd(&exit_fd), pidfd_token(id), Interest::READABLE) {
                let _ = registry.deregister(&mut worker.sock);
                return Err(e);
            }
        }
        let pid = worker.raw_pid();
        tracing::debug!(pool = %self.cfg.name, worker = id, pid, "worker started");
        self.workers.insert(id, worker);
        self.emit(LifecycleEvent::WorkerStarted { worker: id, pid });
        Ok(true)
    }

    pub(super) fn dispatch(&mut self) {
        if self.queue.is_empty() || !matches!(self.phase, PoolPhase::Running | PoolPhase::Closing { drain: true }) {
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        let mut started = Vec::new();
        // Workers given tasks in this pass: each gets its frames in one write
        // at the end (one system call for a worker's whole refill).
        let mut sent_to = Vec::new();
        // Each task given: (worker, task, where its frame ends in the
        // worker's outgoing buffer).
        let mut given = Vec::new();
        // Idle workers first, then fill pipelines up to `prefetch`: while
        // tasks are short, never behind a task that has run long, and not
        // while callers cancel tasks.
        let now = Instant::now();
        let depth_limit = match self.cancelling_until {
            Some(until) if now < until => 1,
            _ => self.task_time.depth(cfg.prefetch),
        };
        let recall_after = self.task_time.recall_after();
        'fill: for depth in 0..depth_limit {
            let mut ids: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.phase == WorkerPhase::Ready && !w.over_memory && w.inflight.len() == depth)
                .filter(|w| {
                    depth == 0 || w.inflight.front().and_then(|f| f.started).map_or(true, |s| now < s + recall_after)
                })
                // A task sent to a worker that died idle would fail as crashed
                // without having run; one sent ahead to a busy worker goes
                // back to the queue if that worker dies.
                .filter(|w| depth > 0 || !w.exited_unnoticed())
                .map(|w| w.id)
                .collect();
            ids.sort_unstable();
            if depth == 0 && !ids.is_empty() {
                // An idle worker waits for a task on its way back to the
                // queue that came before the queue's next: given a later one
                // now, it would start that first.
                let before = self.queue.front_id().unwrap_or(0);
                let coming = self.workers.values().map(|w| w.coming_back_before(before, now)).sum::<usize>();
                ids.truncate(ids.len().saturating_sub(coming));
            }
            for id in ids {
                let Some(w) = self.workers.get_mut(&id) else { continue };
                if cfg.max_tasks_per_child.is_some_and(|max| w.assigned >= max) {
                    continue;
                }
                let Some(task) = self.queue.pop_front(&self.shared.cancels) else { break 'fill };
                let task_id = task.id;
                let msg = Message::Task { id: task.id, payload: &task.payload };
                if let Err(e) = w.queue_with_segment(&msg, task.segment.as_ref(), cfg.max_frame) {
                    let mut task = task;
                    task.deliver(Err(e.into()));
                    continue;
                }
                let now = Instant::now();
                let first = w.inflight.is_empty();
                if first {
                    started.push((task.id, w.raw_pid()));
                }
                w.inflight.push_back(InFlight {
                    deadline: if first { task.timeout.map(|t| now + t) } else { None },
                    started: first.then_some(now),
                    task,
                    cancel_requested: false,
                    withdrawing: None,
                    cancel_on_return: false,
                });
                w.assigned += 1;
                given.push((id, task_id, w.out.len()));
                if !sent_to.contains(&id) {
                    sent_to.push(id);
                }
            }
        }
        for id in sent_to {
            let Some(w) = self.workers.get_mut(&id) else { continue };
            let Some(reached) = w.flush() else { continue };
            // It stopped reading (a stop signal from outside, between the
            // pool's look at it and this write): the tasks whose frames did
            // not reach it whole never started there, and go back to the
            // queue when it is reaped. It takes no more.
            for &(_, task, _) in given.iter().filter(|&&(to, _, end)| to == id && end > reached) {
                if let Some(entry) = w.inflight.iter_mut().find(|f| f.task.id == task) {
                    entry.started = None;
                    entry.deadline = None;
                    w.assigned = w.assigned.saturating_sub(1);
                }
                started.retain(|&(t, _)| t != task);
            }
            if w.phase == WorkerPhase::Ready {
                tracing::debug!(pool = %cfg.name, worker = id, "worker stopped reading its channel");
                w.phase = WorkerPhase::Retiring;
                w.deadline = Some(now + cfg.grace);
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > KEEP_QUEUED {
            self.queue.shrink_to(KEEP_QUEUED);
        }
        for (task, pid) in started {
            self.emit(LifecycleEvent::TaskStarted { task, pid });
        }
    }

    /// Gives an idle worker the task that should start next when another
    /// worker holds it, sent ahead (prefetch) and not started: with the
    /// queue empty, or with tasks queued that came after it. It is asked
    /// back (`Cancel`), and comes back to the queue, before every task that
    /// came after it, when the worker answers `Skipped` (before it takes
    /// another task, or within a millisecond of a long one's start, when its
    /// watcher thread reads the channel); meanwhile [`Supervisor::dispatch`]
    /// keeps an idle worker for it. So a short task never waits behind a
    /// long one while a worker is idle, and tasks start in the order they
    /// were submitted, even on a worker that comes up after others took
    /// tasks ahead. One ask per idle worker, the earliest tasks first.
    ///
    /// With tasks queued it asks only while tasks are not short (they are
    /// then sent one ahead, or none): where they are, a worker that is free takes
    /// the queue's next at once rather than wait for an answer. Except a
    /// worker that has not had a task yet (one that came up after a burst
    /// was sent ahead to the others): it waits for the earliest, once, so
    /// that tasks measured short before the burst, which turn out long,
    /// still start in the order they came.
    pub(super) fn give_back(&mut self) {
        let serving = matches!(self.phase, PoolPhase::Running | PoolPhase::Closing { drain: true });
        if self.cfg.prefetch < 2 || !serving {
            return;
        }
        let short = self.task_time.depth(self.cfg.prefetch) > 2;
        let before = self.queue.front_id();
        let max_tasks = self.cfg.max_tasks_per_child;
        let idle = self
            .workers
            .values()
            .filter(|w| {
                w.phase == WorkerPhase::Ready
                    && w.inflight.is_empty()
                    && !w.over_memory
                    && !max_tasks.is_some_and(|max| w.assigned >= max)
                    && (before.is_none() || !short || w.assigned == 0)
            })
            .count();
        let before = before.unwrap_or(u64::MAX);
        if idle == 0 {
            return;
        }
        let asked = self.workers.values().flat_map(|w| w.inflight.iter()).filter(|f| f.withdrawing.is_some()).count();
        let wanted = idle.saturating_sub(asked);
        if wanted == 0 {
            return;
        }
        // Never the first in line of a worker (it has started it).
        let mut held: Vec<(u64, u64)> = self
            .workers
            .values()
            .filter(|w| w.phase == WorkerPhase::Ready)
            .flat_map(|w| {
                w.inflight.iter().skip(1).filter(|f| f.task.id < before && f.can_ask_back()).map(|f| (f.task.id, w.id))
            })
            .collect();
        held.sort_unstable();
        held.truncate(wanted);
        let max_frame = self.cfg.max_frame;
        let now = Instant::now();
        let mut asked_of = Vec::new();
        for (task, id) in held {
            let Some(w) = self.workers.get_mut(&id) else { continue };
            let Some(entry) = w.inflight.iter_mut().find(|f| f.task.id == task) else { continue };
            entry.withdrawing = Some(now);
            if w.queue(&Message::Cancel { id: task }, max_frame).is_err() {
                continue;
            }
            tracing::trace!(pool = %self.cfg.name, worker = id, task, "asking for a task back");
            if !asked_of.contains(&id) {
                asked_of.push(id);
            }
        }
        for id in asked_of {
            if let Some(w) = self.workers.get_mut(&id) {
                w.flush();
            }
        }
    }

    /// Asks back every task sent ahead to a worker whose running task has
    /// run for [`TaskTime::recall_after`], and every task sent ahead anywhere that came
    /// after the first of them: they go back to the queue, in the order they
    /// came, and start in that order on whichever worker is free first,
    /// instead of waiting for the long task while later ones start
    /// elsewhere. (A worker reads its channel while a task runs: its answer
    /// does not wait for the task.)
    pub(super) fn recall_from_long_tasks(&mut self, now: Instant) {
        if !matches!(self.phase, PoolPhase::Running | PoolPhase::Closing { drain: true }) {
            return;
        }
        let after = self.task_time.recall_after();
        let Some(first) = self
            .workers
            .values()
            .filter(|w| w.recall_at(after).is_some_and(|at| at <= now))
            .flat_map(|w| w.inflight.iter().skip(1).filter(|f| f.can_ask_back()).map(|f| f.task.id))
            .min()
        else {
            return;
        };
        let cfg = Arc::clone(&self.cfg);
        for w in self.workers.values_mut() {
            ask_back(w, first, now, &cfg, "asking a task back to start it in turn");
        }
    }

    /// When an idle worker kept for a task on its way back is released to
    /// take the queue's next, if one is waiting.
    pub(super) fn give_back_wait_ends(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        self.workers.values().filter_map(|w| w.give_back_wait_ends(now)).min()
    }

    /// Puts a task that was sent but not started back in the queue, before
    /// every task that came after it.
    pub(super) fn requeue(&mut self, mut task: super::link::Task) {
        if !task.cancels.is_empty() {
            // A caller asked to cancel it while it was away, and it never ran.
            return task.deliver(Err(crate::error::Error::cancelled()));
        }
        self.queue.requeue(task);
    }

    pub(super) fn retire_idle(&mut self) {
        let PoolPhase::Closing { drain } = self.phase else { return };
        // While a task asked back is on its way, an idle worker stays for it.
        let asked_back = || self.workers.values().any(|w| w.inflight.iter().any(|f| f.withdrawing.is_some()));
        if drain && (!self.queue.is_empty() || asked_back()) {
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        for w in self.workers.values_mut() {
            // A worker still starting finishes its start (its start hook runs,
            // bounded by its timeout, if it has one) and retires once ready, so every
            // worker a pool started runs its start and exit hooks, as
            // `multiprocessing.Pool`'s workers run their initializer.
            if w.inflight.is_empty() && w.phase == WorkerPhase::Ready {
                retire(w, RetireReason::Shutdown, &cfg);
            }
        }
    }
}

/// Asks worker `w` (if ready) for every task it holds behind the one it
/// runs, from task id `first` on, that can still be asked back: each it has
/// not taken up comes back (and goes back to the queue, in order); one it
/// has taken up runs there (it answers that it missed it).
pub(super) fn ask_back(w: &mut Worker, first: u64, now: Instant, cfg: &Config, why: &'static str) {
    if w.phase != WorkerPhase::Ready {
        return;
    }
    let mut asked = Vec::new();
    for entry in w.inflight.iter_mut().skip(1) {
        if entry.task.id >= first && entry.can_ask_back() {
            entry.withdrawing = Some(now);
            asked.push(entry.task.id);
        }
    }
    for &task in &asked {
        if w.queue(&Message::Cancel { id: task }, cfg.max_frame).is_err() {
            break;
        }
        tracing::trace!(pool = %cfg.name, worker = w.id, task, "{why}");
    }
    if !asked.is_empty() {
        w.flush();
    }
}
