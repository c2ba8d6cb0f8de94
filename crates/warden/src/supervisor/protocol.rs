//! Reading what workers say and what each message means in each phase: the
//! handshake (hello, init, ready), results in order, goodbye; anything else
//! is a protocol error, and the worker is killed.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, ErrorKind};
use crate::wire::{ExitPathReport, ExitReason, Message, RemoteError, RemoteErrorKind, RetireReason, WireOutcome};

use super::worker::{retire, Worker, WorkerPhase};
use super::{Config, LifecycleEvent, Output, PoolPhase, StopCause, Supervisor};

/// A message from a worker, copied out of its read buffer.
enum Incoming {
    Hello {
        pid: u32,
        identity: u64,
    },
    Ready,
    InitFailed(RemoteError),
    Result {
        id: u64,
        outcome: Result<Output, Error>,
    },
    /// A task the worker will not run: cancelled before it started, or given back.
    Skipped {
        id: u64,
    },
    Goodbye(ExitReason, ExitPathReport, Option<u64>),
    Record(Vec<u8>),
    /// A task it was being stopped for was not running.
    StopMissed {
        id: u64,
    },
    /// A task it was asked to skip had been taken up.
    CancelMissed {
        id: u64,
    },
    /// A task it was being stopped for was running: it stops.
    StopTaken,
    /// The running task's clock stops (it waits before its work) or restarts.
    TaskClock {
        id: u64,
        running: bool,
    },
    Unexpected(&'static str),
}

/// A worker done with its tasks retires if it has run its share
/// (`max_tasks_per_child`) or grew past `max_memory_per_child`.
fn retire_if_due(w: &mut Worker, cfg: &Config) {
    if w.phase == WorkerPhase::Ready && w.inflight.is_empty() {
        if cfg.max_tasks_per_child.is_some_and(|max| w.assigned >= max) {
            let reason = if cfg.one_off { RetireReason::Done } else { RetireReason::MaxTasks };
            retire(w, reason, cfg);
        } else if w.over_memory {
            retire(w, RetireReason::MaxMemory, cfg);
        }
    }
}

impl Supervisor {
    /// Reads what worker `id` sent until its channel has no more for now.
    /// `paced`: stops early, and pauses reading from workers, when a
    /// descriptor it brought says this process is short of them (see
    /// `pace`); a worker being reaped is read to the end.
    pub(super) fn read_worker(&mut self, id: u64, paced: bool) {
        loop {
            let Some(w) = self.workers.get_mut(&id) else { return };
            if w.eof {
                return;
            }
            let got = w.reader.fill_from_socket(&w.sock);
            let scarce = match &got {
                Ok(n) if paced && *n > 0 => {
                    w.reader.newest_fd().map(|fd| fd.as_raw_fd()).filter(|fd| super::pace::fds_scarce(*fd))
                }
                _ => None,
            };
            match got {
                Ok(0) => {
                    w.eof = true;
                    let truncated = w.reader.check_clean_eof().err();
                    self.process_frames(id);
                    if let Some(e) = truncated {
                        self.protocol_error(id, e.to_string());
                    } else {
                        self.channel_ended(id);
                    }
                    return;
                }
                Ok(_) => {
                    // It reads and answers: whatever cancel it was sent, it answers soon.
                    w.cancel_unanswered = None;
                    self.process_frames(id);
                    if let Some(fd) = scarce {
                        return self.pause_reading(id, fd);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    w.eof = true;
                    self.channel_ended(id);
                    return;
                }
            }
        }
    }

    /// A pool worker's channel ended without its goodbye. One that crashed
    /// is reaped in a moment. But one whose task closed its end goes on
    /// through its exit path unseen, and one whose task opened a socket of
    /// its own on that number waits for work there: either gets one grace
    /// period to end, then SIGKILL. (A one-off child runs on to its end,
    /// as a process whose descriptors its own code closed does.)
    fn channel_ended(&mut self, id: u64) {
        if self.cfg.one_off {
            return;
        }
        let grace = self.cfg.grace;
        if let Some(w) = self.workers.get_mut(&id) {
            w.give_grace_without_channel(grace);
        }
    }

    pub(super) fn process_frames(&mut self, id: u64) {
        loop {
            let Some(w) = self.workers.get_mut(&id) else { return };
            if w.cause.as_ref().is_some_and(|c| matches!(c, StopCause::Protocol(_))) {
                return; // nothing it says counts any more
            }
            let incoming = match w.reader.next_message_with_segment() {
                Ok(None) => return,
                Ok(Some((msg, segment))) => match msg {
                    Message::Hello { pid, identity } => Incoming::Hello { pid, identity },
                    Message::Ready => Incoming::Ready,
                    Message::InitFailed { error } => Incoming::InitFailed(error),
                    Message::Result { id, outcome: WireOutcome::Skipped } => Incoming::Skipped { id },
                    Message::Result { id, outcome } => Incoming::Result {
                        id,
                        outcome: match (outcome, segment) {
                            (WireOutcome::Value(_), Err(_)) => Err(Error::new(ErrorKind::SegmentLost)),
                            (WireOutcome::Value(v), Ok(segment)) => Ok(Output { bytes: v.to_vec(), segment }),
                            (WireOutcome::Error(e), _) => Err(Error::new(ErrorKind::Remote(e))),
                            (WireOutcome::Skipped, _) => Err(Error::cancelled()),
                        },
                    },
                    Message::Goodbye { reason, report, last_task } => Incoming::Goodbye(reason, report, last_task),
                    Message::Record { data } => Incoming::Record(data.to_vec()),
                    Message::StopMissed { id } => Incoming::StopMissed { id },
                    Message::CancelMissed { id } => Incoming::CancelMissed { id },
                    Message::StopTaken { .. } => Incoming::StopTaken,
                    Message::TaskClock { id, running } => Incoming::TaskClock { id, running },
                    other => Incoming::Unexpected(other.name()),
                },
                Err(e) => {
                    self.protocol_error(id, format!("malformed frame: {e}"));
                    return;
                }
            };
            self.handle(id, incoming);
        }
    }

    /// A worker answered for one of its tasks: its outcome, or (`None`) that
    /// it will not run it. Only the first in line can have an outcome; a task
    /// behind it can only be skipped (cancelled before it started, or given
    /// back: then it goes back to the front of the queue).
    fn task_answered(&mut self, id: u64, task_id: u64, outcome: Option<Result<Output, Error>>) {
        let cfg = Arc::clone(&self.cfg);
        let Some(w) = self.workers.get_mut(&id) else { return };
        let pos = match w.inflight.iter().position(|f| f.task.id == task_id) {
            Some(0) => 0,
            Some(pos) if outcome.is_none() => pos,
            Some(_) => {
                let running = w.inflight.front().map_or(0, |f| f.task.id);
                let detail = format!("sent a result for task {task_id} while running task {running}");
                return self.protocol_error(id, detail);
            }
            None => {
                let detail = format!("sent a result for task {task_id} it was not running");
                return self.protocol_error(id, detail);
            }
        };
        let Some(entry) = w.inflight.remove(pos) else { return };
        if let (Some(started), Some(_)) = (entry.started, &outcome) {
            self.task_time.record(started.elapsed());
        }
        let mut task = entry.task;
        let mut given_back = None;
        match outcome {
            Some(outcome) => task.deliver(outcome),
            None if entry.withdrawing.is_some() && !entry.cancel_on_return && !task.delivered() => {
                w.assigned = w.assigned.saturating_sub(1);
                given_back = Some(task);
            }
            None => task.deliver(Err(Error::cancelled())),
        }
        let pid = w.raw_pid();
        let mut started = None;
        if pos == 0 {
            if let Some(next) = w.inflight.front_mut() {
                let now = Instant::now();
                next.started = Some(now);
                next.deadline = next.task.timeout.map(|t| now + t);
                if next.cancel_requested {
                    // A cancel(running=True) may have crossed the task: stop
                    // it if it runs.
                    let id = next.task.id;
                    w.stop_task(id, StopCause::Cancelled, cfg.grace);
                } else if next.withdrawing.is_none() && !next.cancel_on_return && !next.task.delivered() {
                    // (One being given back, or cancelled unless started, is
                    // reported started once the worker says it did.)
                    started = Some(next.task.id);
                }
            }
            super::memory::check_after_task(w, &cfg);
            retire_if_due(w, &cfg);
        }
        if let Some(mut task) = given_back {
            match self.phase {
                PoolPhase::Running | PoolPhase::Closing { drain: true } => self.requeue(task),
                PoolPhase::Failed => task.deliver(Err(self.failed_error())),
                _ => task.deliver(Err(Error::cancelled())),
            }
        }
        if let Some(task) = started {
            self.emit(LifecycleEvent::TaskStarted { task, pid });
        }
    }

    fn handle(&mut self, id: u64, msg: Incoming) {
        if let Incoming::StopMissed { id: task_id } = msg {
            if let Some(w) = self.workers.get_mut(&id) {
                if w.stop_missed(task_id) {
                    let cfg = Arc::clone(&self.cfg);
                    retire_if_due(w, &cfg);
                }
            }
            return;
        }
        if let Incoming::TaskClock { id: task_id, running } = msg {
            // Unless the task has an outcome already (it timed out before
            // the worker said it waits, say); late, for a task that has
            // ended: nothing. While stopped, the task is still the one the
            // worker runs (what was sent ahead of it may be asked back).
            let front = self.workers.get_mut(&id).and_then(|w| w.inflight.front_mut());
            if let Some(f) = front.filter(|f| f.task.id == task_id && f.started.is_some() && !f.task.delivered()) {
                let now = Instant::now();
                f.deadline = if running { f.task.timeout.map(|t| now + t) } else { None };
                if running {
                    f.started = Some(now);
                }
            }
            return;
        }
        if let Incoming::StopTaken = msg {
            if let Some(w) = self.workers.get_mut(&id) {
                w.stop_taken();
            }
            return;
        }
        if let Incoming::CancelMissed { id: task_id } = msg {
            // Whoever waits to learn whether the task was skipped: it was not.
            // (Late, for a task that has ended or been given back: nothing.)
            let mut started = None;
            if let Some(w) = self.workers.get_mut(&id) {
                let pid = w.raw_pid();
                let front = w.inflight.front().map(|f| f.task.id);
                if let Some(f) = w.inflight.iter_mut().find(|f| f.task.id == task_id) {
                    f.task.answer_cancels(false);
                    // It runs there: asked back no more. Its start, not
                    // reported while it might come back, is now.
                    let asked = f.withdrawing.take().is_some() | std::mem::take(&mut f.cancel_on_return);
                    if asked && front == Some(task_id) && !f.task.delivered() {
                        started = Some(pid);
                    }
                }
            }
            if let Some(pid) = started {
                self.emit(LifecycleEvent::TaskStarted { task: task_id, pid });
            }
            return;
        }
        let cfg = Arc::clone(&self.cfg);
        let Some(w) = self.workers.get_mut(&id) else { return };
        match (w.phase, msg) {
            (WorkerPhase::Starting, Incoming::Hello { pid, identity }) => {
                if pid as i32 != w.raw_pid() {
                    let detail = format!("said hello as pid {pid}");
                    return self.protocol_error(id, detail);
                }
                if let Some(expected) = cfg.identity {
                    if identity != expected {
                        let detail = format!(
                            "runs a different program (identity {identity:#x}, expected {expected:#x}); \
                             call warden::init() first in main"
                        );
                        return self.protocol_error(id, detail);
                    }
                }
                if w.queue(
                    &Message::Init { worker: id, grace_ms: grace_ms(cfg.grace), payload: &cfg.init_payload },
                    cfg.max_frame,
                )
                .is_err()
                {
                    return self.protocol_error(id, "init payload exceeds the frame limit".into());
                }
                w.flush();
                w.phase = WorkerPhase::Initializing;
                w.deadline = cfg.hook_timeout.map(|t| Instant::now() + t);
            }
            (WorkerPhase::Initializing, Incoming::Ready) => {
                w.phase = WorkerPhase::Ready;
                w.deadline = None;
                let pid = w.raw_pid();
                self.crashes.worker_ready();
                self.shortage = None;
                self.served = true;
                self.unserved_since = None;
                self.emit(LifecycleEvent::WorkerReady { worker: id, pid });
            }
            (WorkerPhase::Initializing, Incoming::InitFailed(error)) => {
                let pid = w.raw_pid();
                tracing::warn!(pool = %cfg.name, pid, "start hook failed: {error}");
                w.cause.get_or_insert(StopCause::InitFailed(error.to_string()));
                w.phase = WorkerPhase::Retiring;
                w.deadline = Some(Instant::now() + cfg.grace);
                let setup = error.kind == RemoteErrorKind::Setup && !self.served;
                if setup {
                    self.setup_failures += 1;
                }
                if setup && (self.setup_failures >= 2 || cfg.fail_on_start_error) {
                    // The program itself cannot be loaded (a main module
                    // that starts a pool as it is imported, without the
                    // `__main__` guard): every worker would fail the same.
                    // Twice, not once: a passing fault (a file being
                    // rewritten) is given one more start.
                    self.fail(format!("worker {pid} could not load the program: {error}"));
                } else if cfg.fail_on_start_error {
                    self.fail(format!("worker {pid}'s start hook failed: {error}"));
                }
            }
            (
                WorkerPhase::Ready | WorkerPhase::Retiring | WorkerPhase::Stopping | WorkerPhase::Killed,
                Incoming::Result { id: task_id, outcome },
            ) => self.task_answered(id, task_id, Some(outcome)),
            (
                WorkerPhase::Ready | WorkerPhase::Retiring | WorkerPhase::Stopping | WorkerPhase::Killed,
                Incoming::Skipped { id: task_id },
            ) => self.task_answered(id, task_id, None),
            (_, Incoming::Record(data)) => {
                w.record = if data.is_empty() { None } else { Some(data) };
            }
            (_, Incoming::Goodbye(reason, report, last_task)) => {
                if w.phase == WorkerPhase::Ready
                    || w.phase == WorkerPhase::Initializing
                    || w.phase == WorkerPhase::Starting
                {
                    // Leaving on its own (a signal from outside): take no more tasks.
                    w.phase = WorkerPhase::Retiring;
                    w.deadline = Some(Instant::now() + cfg.grace);
                }
                w.goodbye = Some((reason, report));
                w.last_task = last_task;
            }
            // A worker we already told to go may still be saying hello.
            (
                WorkerPhase::Retiring | WorkerPhase::Stopping | WorkerPhase::Killed,
                Incoming::Hello { .. } | Incoming::Ready,
            ) => {}
            (WorkerPhase::Retiring | WorkerPhase::Stopping | WorkerPhase::Killed, Incoming::InitFailed(error)) => {
                w.cause.get_or_insert(StopCause::InitFailed(error.to_string()));
            }
            (phase, Incoming::Unexpected(name)) => {
                let detail = format!("sent an unexpected {name} message while {}", phase.name());
                self.protocol_error(id, detail);
            }
            (phase, other) => {
                let name = match other {
                    Incoming::Hello { .. } => "hello",
                    Incoming::Ready => "ready",
                    Incoming::InitFailed(_) => "init-failed",
                    Incoming::Result { .. } | Incoming::Skipped { .. } => "result",
                    Incoming::Goodbye(..)
                    | Incoming::Record(_)
                    | Incoming::StopMissed { .. }
                    | Incoming::StopTaken
                    | Incoming::TaskClock { .. }
                    | Incoming::CancelMissed { .. }
                    | Incoming::Unexpected(_) => "message",
                };
                let detail = format!("sent {name} while {}", phase.name());
                self.protocol_error(id, detail);
            }
        }
    }

    /// A worker broke the protocol: its task fails saying so, and it is killed.
    pub(super) fn protocol_error(&mut self, id: u64, detail: String) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let pid = w.raw_pid();
        tracing::warn!(pool = %self.cfg.name, pid, "worker broke the protocol: {detail}");
        if let Some(front) = w.inflight.front_mut() {
            if front.started.is_some() {
                front.task.deliver(Err(Error::new(ErrorKind::Protocol { pid, detail: detail.clone() })));
            }
        }
        if !w.cause.as_ref().is_some_and(|c| c.intended() && !matches!(c, StopCause::Retired(_))) {
            w.cause = Some(StopCause::Protocol(detail));
        }
        w.kill(StopCause::Killed);
    }
}

/// A grace period in whole milliseconds, as the worker is told it.
fn grace_ms(grace: std::time::Duration) -> u64 {
    u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)
}
