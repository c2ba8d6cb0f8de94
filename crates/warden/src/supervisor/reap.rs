//! The end of a worker: reaping it when its pidfd says it exited, reading
//! what it wrote last, and settling its tasks (the running one gets exactly
//! one outcome; those sent but not started go back to the front of the queue).

use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use rustix::process::Signal;

use crate::error::{Error, ErrorKind, ExitStatus};
use crate::lost::LostWorker;
use crate::wire::ExitReason;

use super::worker::WorkerPhase;
use super::{LifecycleEvent, PoolPhase, StopCause, Supervisor, WorkerEnd, KILL_WAIT};

impl Supervisor {
    pub(super) fn reap(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let status = match w.process.exited() {
            Ok(Some(status)) => status,
            Ok(None) => return, // not yet
            Err(e) => {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "waitid failed: {e}");
                ExitStatus::Code(-1)
            }
        };
        w.status = Some(status);
        // Whatever it wrote before exiting is in the socket buffer now: its
        // goodbye, if it went through its exit path.
        w.eof = false;
        self.read_worker(id, false);
        self.release(id, Instant::now());
        self.finish(id);
    }

    /// Looks for the exits no pidfd will report: of workers watched by pid
    /// (the program closed their pidfds), and, with `idle` (the loop waited
    /// its longest for nothing, or a worker's channel closed), of any whose
    /// pidfd a poll finds closed now.
    pub(super) fn watch_exits_by_pid(&mut self, idle: bool) {
        let ids: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| w.status.is_none())
            .filter(|(_, w)| w.process.watched_by_pid() || (idle && w.exit_fd_found_closed()))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.reap(id);
        }
    }

    /// Whether a worker is watched by pid: the loop then comes round at
    /// least every [`super::BY_PID_CHECK`].
    pub(super) fn any_watched_by_pid(&self) -> bool {
        self.workers.values().any(|w| w.status.is_none() && w.process.watched_by_pid())
    }

    /// After a panic of the loop: SIGKILLs every worker first, then reaps
    /// them all against one deadline ([`KILL_WAIT`] in all, not per worker).
    /// Their tasks are told the pool is gone as the workers are dropped.
    pub(super) fn kill_all_now(&mut self) {
        for w in self.workers.values_mut().filter(|w| w.status.is_none()) {
            w.signal(Signal::KILL);
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            for w in self.workers.values_mut().filter(|w| w.status.is_none()) {
                if let Ok(Some(status)) = w.process.try_wait() {
                    w.status = Some(status);
                }
            }
            if self.workers.values().all(|w| w.status.is_some()) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for w in self.workers.values_mut().filter(|w| w.status.is_none()) {
            tracing::error!(pid = w.raw_pid(), "worker did not die after SIGKILL; giving up on it");
            w.status = Some(ExitStatus::Signal(libc::SIGKILL));
        }
        self.workers.clear();
    }

    pub(super) fn finish(&mut self, id: u64) {
        let Some(mut w) = self.workers.remove(&id) else { return };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut w.sock);
        if let Some(fd) = w.process.exit_fd() {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        let pid = w.raw_pid();
        let status = w.status.unwrap_or(ExitStatus::Signal(libc::SIGKILL));

        let mut inflight = std::mem::take(&mut w.inflight);
        // A worker that said goodbye named the last task it started: one
        // sent to it after that, though first in line here, never ran (a
        // stop signal came before it took it up). Reported started when it
        // came first in line, it is reported back in the queue.
        let mut unstarted = None;
        if let (Some(front), Some(_)) = (inflight.front_mut(), &w.goodbye) {
            if front.started.is_some() && w.last_task != Some(front.task.id) {
                front.started = None;
                unstarted = Some(front.task.id);
            }
        }
        // The task it was running, if any, and whether its death is that
        // task's outcome (the task was still waiting for one).
        let running = inflight.front().filter(|f| f.started.is_some()).map(|f| f.task.id);
        let mut task_explains = false;
        if let Some(mut front) = inflight.pop_front() {
            if front.started.is_some() {
                task_explains = !front.task.delivered();
                front.task.deliver(Err(Error::new(ErrorKind::Crashed { pid, status })));
            } else {
                inflight.push_front(front);
            }
        }
        // Sent but never started: back in the queue, before what came after them.
        for f in inflight {
            let mut task = f.task;
            if task.delivered() {
                continue;
            }
            if f.cancel_on_return {
                // Cancelled unless started (`cancel_all_queued`): it was not.
                task.deliver(Err(Error::cancelled()));
                continue;
            }
            match self.phase {
                PoolPhase::Running | PoolPhase::Closing { drain: true } => {
                    let id = task.id;
                    let queued = task.cancels.is_empty(); // else requeue() cancels it
                    self.requeue(task);
                    if queued && unstarted == Some(id) {
                        self.emit(LifecycleEvent::TaskRequeued { task: id });
                    }
                }
                PoolPhase::Failed => task.deliver(Err(self.failed_error())),
                _ => task.deliver(Err(Error::cancelled())),
            }
        }

        let retired_itself =
            w.cause.is_none() && matches!(w.goodbye, Some((ExitReason::Retired(_), _))) && status.success();
        let crashed = match &w.cause {
            Some(cause) => !cause.intended(),
            None => !retired_itself,
        };
        // A crash during a task is that task's outcome, not the pool's: each
        // such death consumes a task, so it cannot loop forever. A worker the
        // system refused its threads before it said hello is a start refused
        // for want of them, not a failure (see `start_refused_for_shortage`).
        let before_hello = w.phase == WorkerPhase::Starting;
        // Dead while its start hook ran, without being told to stop: the
        // hook crashed it (a segfault in an extension it loads, `os._exit`).
        // Not by SIGKILL, which comes from outside (the OOM killer, or the
        // worker itself once its channel is gone): such a death is the
        // pool's surroundings', counted as any other.
        let died_in_start_hook =
            w.phase == WorkerPhase::Initializing && w.cause.is_none() && status != ExitStatus::Signal(libc::SIGKILL);
        let short_of_threads =
            w.cause.is_none() && before_hello && status == ExitStatus::Code(crate::worker::EXIT_SHORT_OF_THREADS);
        let short_of_threads_what =
            || format!("worker {pid} could not start its threads: the system is short of them (EAGAIN)");
        // A one-off child is started once: refused its threads, it fails
        // with that reason (its task never ran).
        let counted = crashed && !task_explains && (!short_of_threads || self.cfg.one_off);
        let exit =
            WorkerEnd { worker: id, pid, status, cause: w.cause.clone(), goodbye: w.goodbye.clone(), crashed, counted };
        tracing::debug!(pool = %self.cfg.name, worker = id, pid, %status, crashed, counted, "worker reaped");
        if w.goodbye.is_none() {
            // It never ran its exit path: the parent cleans up after it.
            if let Some(lost) = &self.cfg.lost {
                let record = w.record.take();
                let _ = lost.send(LostWorker { worker: id, pid, status, task: running, record });
            }
        }
        drop(w);
        self.emit(LifecycleEvent::WorkerExited(exit.clone()));
        if short_of_threads && self.phase != PoolPhase::Failed && !self.cfg.one_off {
            let serving = self.workers.values().filter(|w| w.is_serving()).count();
            self.emit(LifecycleEvent::SpawnFailed { error: short_of_threads_what() });
            self.start_refused_for_shortage(Instant::now(), serving, short_of_threads_what());
        }
        if counted && died_in_start_hook && self.cfg.fail_on_start_error && self.phase != PoolPhase::Failed {
            // As a start hook that fails: the pool fails at once, not after
            // the restart intensity's worth of crashes in the same hook.
            self.fail(format!("worker {pid} died in its start hook: it ended with {status}"));
        }
        if counted && self.phase != PoolPhase::Failed {
            let what = match &exit.cause {
                Some(StopCause::InitFailed(e)) => format!("worker {pid}'s start hook failed: {e}"),
                Some(StopCause::InitTimeout) => format!("worker {pid} did not start within the init timeout"),
                Some(StopCause::Protocol(d)) => format!("worker {pid} broke the protocol: {d}"),
                _ if short_of_threads => short_of_threads_what(),
                // Killed before it said hello (from outside, or by the OOM
                // killer): no sign of a program that is not a worker.
                _ if before_hello && matches!(status, ExitStatus::Signal(_)) => {
                    format!("worker {pid} was killed by {status} before it said hello")
                }
                // Most likely a program that is not a warden worker: a Rust
                // program that does not call `warden::init()` first runs its
                // own `main` instead; an interpreter that cannot import warden
                // (`multiprocessing.set_executable`) fails on the import.
                _ if before_hello => {
                    format!("worker {pid} ended with {status} before it said hello ({})", self.not_a_worker())
                }
                _ => format!("worker {pid} ended with {status}"),
            };
            self.note_crash(what);
        }
    }

    /// Why a process started as a worker may end before its hello: the
    /// program is not a warden worker.
    pub(super) fn not_a_worker(&self) -> String {
        format!(
            "is {} a warden worker? a Python interpreter must be able to import warden, see its error \
             above; a Rust program calls warden::init() first thing in main, whatever its arguments",
            self.cfg.command.program.display()
        )
    }
}
