//! The seam between the supervisor and the operating system for one worker
//! process: signalling it ([`Kill`]) and reaping it ([`Wait`]), in the manner
//! of tokio's `process::Kill`/`Wait`. [`Pidfd`] is the real thing; unit tests
//! put a stand-in behind the same traits, so the supervisor's logic (restart
//! intensity, scheduling, cancelling, escalation) runs without processes.
//!
//! # Caveats
//!
//! * The process group is signalled only while the process is unreaped: once
//!   reaped, its pid (and so its group id) may be reused by anyone.
//! * What a worker leaves in its process group when it exits (a subprocess a
//!   task started and never waited for) is SIGKILLed as the worker is reaped,
//!   between seeing the exit and reaping it: the worker had its exit path
//!   (its finalizer) to stop them gracefully, and nothing a worker started
//!   outlives it unless it left the group (`setsid`, `start_new_session`).

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use crate::error::ExitStatus;
use crate::interrupts::Forwarded;

/// Sends signals to a worker.
pub(super) trait Kill {
    /// Sends `sig` to the process, and to its whole process group if `group`.
    fn signal(&mut self, sig: Signal, group: bool);
}

/// Reaps a worker.
pub(super) trait Wait {
    /// Reaps the process if it has exited; `None` if it is still running.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;
}

/// A worker process as the supervisor drives it.
pub(super) trait WorkerProcess: Kill + Wait + Send {
    /// Its process id.
    fn pid(&self) -> i32;
    /// An fd that becomes readable when the process exits, for the poller;
    /// `None` if there is none (any more): the supervisor then looks for the
    /// exit itself (see [`WorkerProcess::watched_by_pid`]).
    fn exit_fd(&self) -> Option<RawFd>;
    /// The exit fd was found closed behind the supervisor's back (a poll
    /// said `POLLNVAL`): from now on the process is watched by its pid.
    fn exit_fd_closed(&self) {}
    /// Whether the process has no exit fd to wake the poller, so that the
    /// supervisor must look for its exit every so often.
    fn watched_by_pid(&self) -> bool {
        false
    }
}

/// A real child process, held by its pidfd (so signals and `waitid` can never
/// reach another process that reused its pid).
pub(super) struct Pidfd {
    pid: Pid,
    /// Closed on drop unless `by_pid`: its number may be another file's then.
    pidfd: ManuallyDrop<OwnedFd>,
    /// The pidfd was closed behind the supervisor's back (a program that
    /// closes every descriptor it did not open: `os.closerange(3, ...)`):
    /// the pid names the worker instead, which is safe while it is unreaped.
    by_pid: AtomicBool,
    /// A terminal's Ctrl-C reaches its group (until it is reaped).
    forwarded: Option<Forwarded>,
}

impl Pidfd {
    pub(super) fn new(pid: Pid, pidfd: OwnedFd) -> Self {
        Pidfd { pid, pidfd: ManuallyDrop::new(pidfd), by_pid: AtomicBool::new(false), forwarded: None }
    }

    /// Passes a terminal's Ctrl-C on to its process group from now until it
    /// is reaped (see [`crate::interrupts`]); `since`, a count taken before
    /// the start, catches one that came as it started.
    pub(super) fn forward_interrupts(&mut self, since: u64) {
        self.forwarded = Some(Forwarded::start(self.pid.as_raw_nonzero().get(), since));
    }

    /// The worker, for `waitid`: by its pidfd, or by its pid once that is gone.
    fn id(&self) -> WaitId<'_> {
        if self.by_pid() {
            WaitId::Pid(self.pid)
        } else {
            WaitId::PidFd(self.pidfd.as_fd())
        }
    }

    /// Notes an error of a call on the pidfd; true if the pidfd is gone and
    /// the call should be made again by pid.
    fn lost(&self, e: rustix::io::Errno) -> bool {
        if e == rustix::io::Errno::BADF && !self.by_pid() {
            self.exit_fd_closed();
            return true;
        }
        false
    }

    fn by_pid(&self) -> bool {
        self.by_pid.load(Ordering::Relaxed)
    }
}

impl Drop for Pidfd {
    fn drop(&mut self) {
        if !self.by_pid() {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.pidfd) };
        }
    }
}

impl Kill for Pidfd {
    fn signal(&mut self, sig: Signal, group: bool) {
        if group {
            // The worker leads its group unless it left it: then the group's
            // signal is its one signal. Twice would run a handler of its own
            // twice (the standard library's `terminate()` sends one SIGTERM).
            let leads = crate::worker::process_group_of(self.pid) == Some(self.pid);
            if rustix::process::kill_process_group(self.pid, sig).is_ok() && leads {
                return;
            }
        }
        if self.by_pid() {
            let _ = rustix::process::kill_process(self.pid, sig);
        } else if let Err(e) = rustix::process::pidfd_send_signal(&*self.pidfd, sig) {
            if self.lost(e) {
                let _ = rustix::process::kill_process(self.pid, sig);
            }
        }
    }
}

impl Wait for Pidfd {
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        // Exited? Look without reaping: while it is a zombie its pid, its
        // group's id, cannot be reused, so its leftovers can be signalled.
        let exited = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        let seen = match rustix::process::waitid(self.id(), exited) {
            Err(e) if self.lost(e) => rustix::process::waitid(self.id(), exited)?,
            seen => seen?,
        };
        if seen.is_none() {
            return Ok(None);
        }
        self.forwarded = None; // out of the Ctrl-C table before its group id can be reused
        let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
        let status = rustix::process::waitid(self.id(), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)?;
        Ok(status.map(|st| match st.terminating_signal() {
            Some(sig) => ExitStatus::Signal(sig),
            None => ExitStatus::Code(st.exit_status().unwrap_or(-1)),
        }))
    }
}

impl WorkerProcess for Pidfd {
    fn pid(&self) -> i32 {
        self.pid.as_raw_nonzero().get()
    }

    fn exit_fd(&self) -> Option<RawFd> {
        (!self.by_pid()).then(|| self.pidfd.as_raw_fd())
    }

    fn exit_fd_closed(&self) {
        if !self.by_pid.swap(true, Ordering::Relaxed) {
            tracing::warn!(pid = self.pid.as_raw_nonzero().get(), "a worker's pidfd was closed; using its pid");
        }
    }

    fn watched_by_pid(&self) -> bool {
        self.by_pid()
    }
}
