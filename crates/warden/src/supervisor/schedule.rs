//! Scheduling: how many workers the pool wants and starting them; which
//! worker gets the next task (idle workers first, then pipelines up to
//! `prefetch`); retiring idle workers once the pool closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::Interest;

use crate::spawn::spawn_worker;
use crate::wire::{Message, RetireReason};

use super::process::Pidfd;
use super::worker::{retire, InFlight, Worker, WorkerPhase};
use super::zygote::NextStart;
use super::{pidfd_token, sock_token, LifecycleEvent, PoolPhase, StopCause, Supervisor};

/// Delay before trying again after a worker could not be spawned at all.
const SPAWN_RETRY: Duration = Duration::from_millis(100);

impl Supervisor {
    pub(super) fn wanted_workers(&self) -> usize {
        if self.cfg.one_off && self.spawned >= 1 {
            return 0;
        }
        match self.phase {
            PoolPhase::Running => self.cfg.workers,
            PoolPhase::Closing { drain: true } if !self.queue.is_empty() => self.cfg.workers.min(self.queue.len()),
            _ => 0,
        }
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
        let mut serving = self.workers.values().filter(|w| w.is_serving()).count();
        while serving < want && self.phase != PoolPhase::Failed {
            match self.spawn_one() {
                Ok(true) => serving += 1,
                Ok(false) => return, // waiting for the zygote
                Err(e) => {
                    let error = format!("cannot start a worker ({}): {e}", self.cfg.command.program.display());
                    tracing::warn!(pool = %self.cfg.name, "{error}");
                    self.emit(LifecycleEvent::SpawnFailed { error: error.clone() });
                    self.note_crash(error);
                    self.spawn_retry_at = Some(now + SPAWN_RETRY);
                    return;
                }
            }
        }
    }

    /// Starts one worker, forked by the zygote or by exec; `Ok(false)` if it
    /// must wait for the pool's first zygote.
    pub(super) fn spawn_one(&mut self) -> std::io::Result<bool> {
        let spawned = match self.next_start() {
            NextStart::Forked(spawned) => spawned,
            NextStart::Exec => spawn_worker(&self.cfg.command, &self.pass_fds, self.cfg.max_frame)?,
            NextStart::Wait => return Ok(false),
        };
        let id = self.next_worker;
        self.next_worker += 1;
        self.spawned += 1;
        spawned.channel.set_nonblocking(true)?;
        let mut sock = UnixStream::from_std(spawned.channel);
        let registry = self.poll.registry();
        registry.register(&mut sock, sock_token(id), Interest::READABLE | Interest::WRITABLE)?;
        let process = Box::new(Pidfd::new(spawned.pid, spawned.pidfd));
        let init_deadline = Instant::now() + self.cfg.init_timeout;
        let mut worker = Worker::new(id, process, sock, self.cfg.max_frame, init_deadline);
        if let Some(exit_fd) = worker.process.exit_fd() {
            if let Err(e) = registry.register(&mut SourceFd(&exit_fd), pidfd_token(id), Interest::READABLE) {
                worker.kill(StopCause::Killed);
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
        // Idle workers first, then fill pipelines up to `prefetch`.
        for depth in 0..cfg.prefetch {
            let mut ids: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.phase == WorkerPhase::Ready && !w.over_memory && w.inflight.len() == depth)
                .map(|w| w.id)
                .collect();
            ids.sort_unstable();
            for id in ids {
                let Some(w) = self.workers.get_mut(&id) else { continue };
                if cfg.max_tasks_per_child.is_some_and(|max| w.assigned >= max) {
                    continue;
                }
                let Some(task) = self.queue.pop_front() else { return };
                if let Err(e) = w.queue(&Message::Task { id: task.id, payload: &task.payload }, cfg.max_frame) {
                    let mut task = task;
                    task.deliver(Err(e.into()));
                    continue;
                }
                let now = Instant::now();
                let first = w.inflight.is_empty();
                w.inflight.push_back(InFlight {
                    deadline: if first { task.timeout.map(|t| now + t) } else { None },
                    started: first.then_some(now),
                    task,
                    cancel_requested: false,
                });
                w.assigned += 1;
                w.flush();
            }
        }
    }

    pub(super) fn retire_idle(&mut self) {
        let PoolPhase::Closing { drain } = self.phase else { return };
        if drain && !self.queue.is_empty() {
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        for w in self.workers.values_mut() {
            if w.inflight.is_empty() && w.is_serving() {
                retire(w, RetireReason::Shutdown, &cfg);
            }
        }
    }
}
