//! The supervisor's record of one worker process: its phase in the lifecycle
//! (see the diagram in [`super`]), the tasks sent to it, its outgoing buffer,
//! and the escalation from retiring to SIGTERM to SIGKILL.
//!
//! # Caveats
//!
//! * The process group is signalled only while the worker is unreaped, so its
//!   id cannot have been reused by then.
//! * A process stuck in uninterruptible sleep cannot be reaped even after
//!   SIGKILL; after [`KILL_WAIT`] the supervisor gives up on it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use rustix::process::Signal;

use crate::error::ExitStatus;
use crate::wire::{self, ExitPathReport, ExitReason, FrameReader, Message, RetireReason};

use super::process::WorkerProcess;
use super::{Config, StopCause, Task};

/// How long the supervisor waits for a SIGKILLed process to be reapable.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long a cancel of a task sent ahead to a worker waits for the worker's
/// answer (a worker reads its channel within a millisecond or so while it
/// runs a task; one stopped by SIGSTOP does not). Past it the cancel says it
/// did not land; if the worker skips the task after all, its outcome is
/// cancelled. Once a worker has left a cancel unanswered this long, further
/// cancels of tasks it holds say so at once (see
/// [`Worker::silent_on_cancel`]): a program cancelling many futures (a `map`
/// cleaning up after its timeout, an event loop cancelling its awaits) waits
/// this long once per frozen worker, not once per task it holds.
pub(crate) const WORKER_ANSWER_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WorkerPhase {
    Starting,
    Initializing,
    Ready,
    Retiring,
    Stopping,
    Killed,
}

impl WorkerPhase {
    pub(super) fn name(self) -> &'static str {
        match self {
            WorkerPhase::Starting => "starting",
            WorkerPhase::Initializing => "initializing",
            WorkerPhase::Ready => "ready",
            WorkerPhase::Retiring => "retiring",
            WorkerPhase::Stopping => "stopping",
            WorkerPhase::Killed => "killed",
        }
    }
}

pub(super) struct InFlight {
    pub(super) task: Task,
    /// Set when the task became the first in line, i.e. the worker started it.
    pub(super) started: Option<Instant>,
    pub(super) deadline: Option<Instant>,
    pub(super) cancel_requested: bool,
    /// When it was asked back (a `Cancel` sent) so that an idle worker can
    /// run it; it comes back `Skipped` unless the worker had started it.
    pub(super) withdrawing: Option<Instant>,
    /// Cancelled unless the worker had started it (`cancel_all_queued`, a
    /// `Cancel` sent): given back, it is cancelled, never queued again, and
    /// it is not asked back to run elsewhere meanwhile.
    pub(super) cancel_on_return: bool,
}

impl InFlight {
    /// Whether it can still be asked back: not asked already, not being
    /// cancelled, no outcome yet.
    pub(super) fn can_ask_back(&self) -> bool {
        self.withdrawing.is_none()
            && !self.cancel_requested
            && !self.cancel_on_return
            && !self.task.delivered()
            && self.task.cancels.is_empty()
    }
}

pub(super) struct Worker {
    pub(super) id: u64,
    /// The OS process behind it.
    pub(super) process: Box<dyn WorkerProcess>,
    pub(super) sock: UnixStream,
    pub(super) reader: FrameReader,
    /// The pool's frame limit, for what the worker is sent.
    max_frame: usize,
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    /// Segment descriptors to pass with the frames in `out`: the offset of
    /// the frame's first byte, and the task's descriptor (shared with the
    /// task, not duplicated), of which the worker gets its copy.
    pub(super) out_fds: VecDeque<(usize, Arc<OwnedFd>)>,
    /// The socket is registered for writability too: only while `out` holds
    /// what it would not take. (Registered for it always, every read the
    /// worker makes would wake the supervisor.)
    pub(super) write_interest: bool,
    pub(super) phase: WorkerPhase,
    pub(super) deadline: Option<Instant>,
    pub(super) inflight: VecDeque<InFlight>,
    pub(super) assigned: u64,
    pub(super) cause: Option<StopCause>,
    pub(super) goodbye: Option<(ExitReason, ExitPathReport)>,
    pub(super) status: Option<ExitStatus>,
    pub(super) eof: bool,
    /// The last cleanup record it sent, for `on_worker_lost`.
    pub(super) record: Option<Vec<u8>>,
    /// The last task it started, as its `Goodbye` said.
    pub(super) last_task: Option<u64>,
    /// Above `max_memory_per_child` (or `memory_limit`) after a task: takes
    /// no more, retires when idle.
    pub(super) over_memory: bool,
    /// Above `memory_limit` after a task: its resident size then. The task
    /// it had already begun is failed only if it grows the worker past that
    /// by more than the limit divided by [`super::memory::GROWTH_DIVISOR`].
    pub(super) left_over_limit: Option<u64>,
    /// Stopping for this task only ([`Worker::stop_task`]): the worker may
    /// answer that it had ended, and serve on.
    pub(super) stop_target: Option<u64>,
    /// Asked to stop for [`Worker::stop_target`], and not yet answered
    /// whether it took the stop: until it does, it keeps its place in the
    /// pool, which starts no replacement for a worker that may serve on (a
    /// pool of two would then have three). One that never answers is killed
    /// once the grace period is over, and its place is free then.
    pub(super) stop_unanswered: bool,
    /// It answered that it took a stop for a task: it is leaving, whatever
    /// it answers to a later stop for another task (`StopMissed`: by then
    /// nothing runs there).
    pub(super) stop_took: bool,
    /// When a `Cancel` went to it that it has not answered yet: set by the
    /// first one queued, cleared by anything it sends. A worker answers a
    /// cancel from its channel's reader within a millisecond or so, whatever
    /// its task does; one silent for [`WORKER_ANSWER_WAIT`] is stopped
    /// (SIGSTOP, a debugger) or starved of CPU.
    pub(super) cancel_unanswered: Option<Instant>,
    /// Its channel ended without a goodbye while it served: it is SIGKILLed
    /// at this time if it has not exited by then (see
    /// [`Worker::give_grace_without_channel`]).
    pub(super) unreachable_until: Option<Instant>,
}

impl Worker {
    /// A worker just started: it has until `init_deadline` to say hello and ready.
    pub(super) fn new(
        id: u64,
        process: Box<dyn WorkerProcess>,
        sock: UnixStream,
        max_frame: usize,
        init_deadline: Instant,
    ) -> Self {
        Worker {
            id,
            process,
            sock,
            reader: FrameReader::new(max_frame),
            max_frame,
            out: Vec::new(),
            out_pos: 0,
            out_fds: VecDeque::new(),
            write_interest: false,
            phase: WorkerPhase::Starting,
            deadline: Some(init_deadline),
            inflight: VecDeque::new(),
            assigned: 0,
            cause: None,
            goodbye: None,
            status: None,
            eof: false,
            record: None,
            last_task: None,
            over_memory: false,
            left_over_limit: None,
            stop_target: None,
            stop_unanswered: false,
            stop_took: false,
            cancel_unanswered: None,
            unreachable_until: None,
        }
    }

    pub(super) fn raw_pid(&self) -> i32 {
        self.process.pid()
    }

    /// Whether the process has exited though its exit is not handled yet (its
    /// pidfd is readable): an idle worker killed from outside gets no task.
    pub(super) fn exited_unnoticed(&self) -> bool {
        self.poll_exit_fd().is_some_and(|ready| !ready.contains(rustix::event::PollFlags::NVAL))
    }

    /// Whether its pidfd was found closed behind the supervisor's back now
    /// (then it is watched by pid from now on).
    pub(super) fn exit_fd_found_closed(&self) -> bool {
        self.poll_exit_fd().is_some_and(|ready| ready.contains(rustix::event::PollFlags::NVAL))
    }

    /// What a poll of its exit fd says now, if anything. A closed one
    /// (`POLLNVAL`) is not an exit: the process is watched by pid from then on.
    fn poll_exit_fd(&self) -> Option<rustix::event::PollFlags> {
        let fd = self.process.exit_fd()?;
        // SAFETY: the fd belongs to `self.process`, alive for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        if !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0) {
            return None;
        }
        let ready = fds[0].revents();
        if ready.contains(rustix::event::PollFlags::NVAL) {
            self.process.exit_fd_closed();
        }
        Some(ready)
    }

    pub(super) fn is_serving(&self) -> bool {
        matches!(self.phase, WorkerPhase::Starting | WorkerPhase::Initializing | WorkerPhase::Ready)
    }

    /// Whether it counts against the pool's size: serving, or asked to stop
    /// for its task and not yet answered (see [`Worker::stop_unanswered`]).
    pub(super) fn holds_its_place(&self) -> bool {
        self.is_serving() || self.stop_unanswered
    }

    /// Sends a signal to the worker and everything in its process group,
    /// while it is unreaped, so that its id cannot have been reused. A
    /// reaped one is sent nothing (by pid, where there is no pidfd, the
    /// signal would reach whatever process has its id now).
    pub(super) fn signal(&mut self, sig: Signal) {
        if self.status.is_none() {
            self.process.signal(sig, true);
        }
    }

    pub(super) fn stop(&mut self, cause: StopCause, grace: Duration) {
        self.cause.get_or_insert(cause);
        self.stop_unanswered = false;
        if self.phase == WorkerPhase::Stopping && self.stop_target.take().is_some() {
            // Stopping for one task, unanswered: now the whole worker stops.
            self.phase = WorkerPhase::Ready;
        }
        if matches!(self.phase, WorkerPhase::Stopping | WorkerPhase::Killed) {
            return;
        }
        self.signal(Signal::TERM);
        // A stopped worker (SIGSTOP, a debugger, a terminal's Ctrl-Z) takes
        // its SIGTERM only once it runs again: resume it, so that it ends
        // through its exit path now instead of dying by SIGKILL without it
        // once the grace is over. Harmless to a running one.
        self.signal(Signal::CONT);
        // The same request on the channel, for a worker whose own code took
        // SIGTERM from warden's handler (a task's `signal.signal`): it
        // leaves as soon as its running task returns, instead of waiting
        // for work until the grace is over. One that saw the signal ignores it.
        if self.queue(&Message::Retire { reason: RetireReason::Stopped }, self.max_frame).is_ok() {
            self.flush();
        }
        self.phase = WorkerPhase::Stopping;
        self.deadline = Some(Instant::now() + grace);
    }

    /// Stops the worker for task `id` (its timeout, a cancel of it while
    /// it runs) if that task is still the one it runs. Asked on the
    /// channel, not with a signal: the task may have ended, its result not
    /// yet read, and the worker taken up the next one sent ahead, which a
    /// signal would cut off. The worker decides: it stops as a stop signal
    /// stops it (and the grace bounds it as for [`Worker::stop`]), or
    /// answers `StopMissed` and serves on ([`Worker::stop_missed`]).
    pub(super) fn stop_task(&mut self, id: u64, cause: StopCause, grace: Duration) {
        let targeted = self.stop_target.is_some();
        if self.phase != WorkerPhase::Ready && !(self.phase == WorkerPhase::Stopping && targeted) {
            return self.stop(cause, grace);
        }
        if self.queue(&Message::StopTask { id }, self.max_frame).is_err() {
            return self.stop(cause, grace);
        }
        self.flush();
        // A stopped worker (SIGSTOP) reads the request only once it runs again.
        self.signal(Signal::CONT);
        if !targeted {
            self.cause = Some(cause);
            self.phase = WorkerPhase::Stopping;
            self.deadline = Some(Instant::now() + grace);
            self.stop_unanswered = true;
        }
        self.stop_target = Some(id);
    }

    /// The worker answered that it took a stop for its task: it leaves, and
    /// its place is free for a replacement. (Whichever task the answer names:
    /// asked meanwhile to stop for a later one too, it leaves all the same.)
    pub(super) fn stop_taken(&mut self) {
        if self.phase == WorkerPhase::Stopping {
            self.stop_took = true;
            self.stop_unanswered = false;
        }
    }

    /// The worker answered that task `id`, for which it was being stopped,
    /// was not running: it serves on.
    pub(super) fn stop_missed(&mut self, id: u64) -> bool {
        if self.phase != WorkerPhase::Stopping || self.stop_target != Some(id) || self.stop_took {
            return false;
        }
        self.stop_target = None;
        self.stop_unanswered = false;
        self.phase = WorkerPhase::Ready;
        self.deadline = None;
        self.cause = None;
        true
    }

    /// Its channel ended without a goodbye (see `channel_ended`) while it
    /// served: it has one grace period to exit, then SIGKILL. Nothing else
    /// changes (it may be on its exit path already, and a crashed one is
    /// reaped in a moment, as it always was); one still starting, or on its
    /// way out, is bounded by its deadline already.
    pub(super) fn give_grace_without_channel(&mut self, grace: Duration) {
        if self.goodbye.is_none() && self.status.is_none() && self.phase == WorkerPhase::Ready {
            self.unreachable_until.get_or_insert(Instant::now() + grace);
        }
    }

    pub(super) fn kill(&mut self, cause: StopCause) {
        self.cause.get_or_insert(cause);
        self.stop_unanswered = false;
        if self.phase == WorkerPhase::Killed {
            return;
        }
        self.signal(Signal::KILL);
        self.phase = WorkerPhase::Killed;
        self.deadline = Some(Instant::now() + KILL_WAIT);
    }

    pub(super) fn queue(&mut self, msg: &Message<'_>, max_frame: usize) -> Result<(), wire::WireError> {
        if matches!(msg, Message::Cancel { .. }) && self.cancel_unanswered.is_none() {
            self.cancel_unanswered = Some(Instant::now());
        }
        wire::encode(msg, &mut self.out, max_frame)
    }

    /// Whether it has left a `Cancel` unanswered for [`WORKER_ANSWER_WAIT`]
    /// or longer: a caller asking it whether it took a task up would only
    /// wait that long in vain.
    pub(super) fn silent_on_cancel(&self, now: Instant) -> bool {
        self.cancel_unanswered.is_some_and(|asked| now.saturating_duration_since(asked) >= WORKER_ANSWER_WAIT)
    }

    /// Queues a frame with a segment descriptor riding on its first byte.
    pub(super) fn queue_with_segment(
        &mut self,
        msg: &Message<'_>,
        segment: Option<&Arc<OwnedFd>>,
        max_frame: usize,
    ) -> Result<(), wire::WireError> {
        let Some(segment) = segment else { return self.queue(msg, max_frame) };
        let at = self.out.len();
        wire::encode_frame(msg, &mut self.out, max_frame, true)?;
        self.out_fds.push_back((at, Arc::clone(segment)));
        Ok(())
    }

    /// Whether part of the outgoing buffer waits for the socket to take it.
    pub(super) fn write_blocked(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Writes as much of the outgoing buffer as the socket takes, each
    /// segment descriptor with the first byte of its frame. If the worker
    /// no longer reads its channel (a stop signal shut its reading side, or
    /// it exited), returns how much of the buffer had gone out: nothing
    /// from there on reached it. Offsets count from the start of the buffer
    /// as it was before this call.
    pub(super) fn flush(&mut self) -> Option<usize> {
        let mut refused = None;
        while self.out_pos < self.out.len() {
            // Stop at the next frame that carries a descriptor, unless it is this one.
            let here = self.out_fds.front().filter(|(at, _)| *at == self.out_pos).map(|(_, fd)| fd.as_fd());
            let next = self.out_fds.iter().map(|(at, _)| *at).find(|at| *at > self.out_pos);
            let end = next.unwrap_or(self.out.len());
            match wire::send_with_fd(&self.sock, &self.out[self.out_pos..end], here) {
                Ok(n) => {
                    if here.is_some() {
                        self.out_fds.pop_front(); // the worker has its copy now
                    }
                    self.out_pos += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The worker closed its end; its pidfd will tell us the rest.
                Err(_) => {
                    refused = Some(self.out_pos);
                    break;
                }
            }
        }
        if wire::give_back_room(self.out.capacity(), self.out.len()) {
            self.out = Vec::new();
        }
        self.out.clear();
        self.out_fds.clear();
        self.out_pos = 0;
        refused
    }

    /// When the tasks this worker holds unstarted are to be asked back (its
    /// running task having run `after`), if it still runs then (see
    /// `recall_from_long_tasks`).
    pub(super) fn recall_at(&self, after: Duration) -> Option<Instant> {
        if self.phase != WorkerPhase::Ready {
            return None;
        }
        let started = self.inflight.front()?.started?;
        self.inflight.iter().skip(1).any(InFlight::can_ask_back).then_some(started + after)
    }

    /// How many tasks sent ahead to it, and asked back less than
    /// [`GIVE_BACK_WAIT`](super::schedule::GIVE_BACK_WAIT) ago, came before
    /// task `id`: an idle worker is kept for each.
    pub(super) fn coming_back_before(&self, id: u64, now: Instant) -> usize {
        self.inflight
            .iter()
            .skip(1)
            .filter(|f| f.task.id < id && f.withdrawing.is_some_and(|at| now < at + super::schedule::GIVE_BACK_WAIT))
            .count()
    }

    /// When the next idle worker kept for a task asked back from it is
    /// released, if one is (see [`Worker::coming_back_before`]).
    pub(super) fn give_back_wait_ends(&self, now: Instant) -> Option<Instant> {
        self.inflight
            .iter()
            .skip(1)
            .filter_map(|f| f.withdrawing.map(|at| at + super::schedule::GIVE_BACK_WAIT))
            .filter(|&end| now < end)
            .min()
    }

    pub(super) fn running(&self) -> Option<&InFlight> {
        self.inflight.front()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let task = self.inflight.front().and_then(|f| if f.task.delivered() { None } else { f.deadline });
        [self.deadline, task, self.unreachable_until.filter(|_| self.phase != WorkerPhase::Killed)]
            .into_iter()
            .flatten()
            .min()
    }
}

pub(super) fn retire(w: &mut Worker, reason: RetireReason, cfg: &Config) {
    w.cause.get_or_insert(StopCause::Retired(reason));
    if w.queue(&Message::Retire { reason }, cfg.max_frame).is_ok() {
        w.flush();
    }
    w.phase = WorkerPhase::Retiring;
    w.deadline = match reason {
        // A one-off child whose function returned: what its program does on
        // its way out (exit hooks, `atexit` handlers, a queue flushing what
        // was put in it, its own children joined) is its own, as a process's
        // is under `std::process` or Python's `multiprocessing`: no grace
        // period ends it. A stop of the pool (terminate, a deadline) still does.
        RetireReason::Done => None,
        _ => Some(Instant::now() + cfg.grace),
    };
}

impl Drop for Worker {
    /// The last line of defence: a worker still unreaped when the supervisor
    /// goes away is killed and reaped here, with its group. (After a panic
    /// the supervisor kills and reaps all workers at once first, see
    /// `Supervisor::kill_all_now`, so this finds them reaped.)
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(Signal::KILL);
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            match self.process.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        tracing::error!(pid = self.raw_pid(), "worker did not die after SIGKILL");
    }
}
