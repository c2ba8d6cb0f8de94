//! The end of a worker: reaping it when its pidfd says it exited, reading
//! what it wrote last, and settling its tasks (the running one gets exactly
//! one outcome; those sent but not started go back to the front of the queue).

use mio::unix::SourceFd;

use crate::error::{Error, ErrorKind, ExitStatus};
use crate::wire::ExitReason;

use super::{LifecycleEvent, PoolPhase, StopCause, Supervisor, WorkerEnd};

impl Supervisor {
    pub(super) fn reap(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        let status = match w.process.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return, // not yet
            Err(e) => {
                tracing::error!(pool = %self.cfg.name, pid = w.raw_pid(), "waitid failed: {e}");
                ExitStatus::Code(-1)
            }
        };
        w.status = Some(status);
        // Whatever it wrote before exiting is in the socket buffer now.
        w.eof = false;
        self.read_worker(id);
        self.finish(id);
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
        if let Some(mut front) = inflight.pop_front() {
            if front.started.is_some() {
                front.task.deliver(Err(Error::new(ErrorKind::Crashed { pid, status })));
            } else {
                inflight.push_front(front);
            }
        }
        // Sent but never started: back to the front of the queue, in order.
        for f in inflight.into_iter().rev() {
            let mut task = f.task;
            if task.delivered() {
                continue;
            }
            match self.phase {
                PoolPhase::Running | PoolPhase::Closing { drain: true } => self.queue.push_front(task),
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
        let exit = WorkerEnd { worker: id, pid, status, cause: w.cause.clone(), goodbye: w.goodbye.clone(), crashed };
        tracing::debug!(pool = %self.cfg.name, worker = id, pid, %status, crashed, "worker reaped");
        drop(w);
        self.emit(LifecycleEvent::WorkerExited(exit.clone()));
        if crashed && self.phase != PoolPhase::Failed {
            let what = match &exit.cause {
                Some(StopCause::InitFailed(e)) => format!("worker {pid}'s start hook failed: {e}"),
                Some(StopCause::InitTimeout) => format!("worker {pid} did not start within the init timeout"),
                Some(StopCause::Protocol(d)) => format!("worker {pid} broke the protocol: {d}"),
                _ => format!("worker {pid} ended with {status}"),
            };
            self.note_crash(what);
        }
    }
}
