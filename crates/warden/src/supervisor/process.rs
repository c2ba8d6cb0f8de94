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
//!   (its finalizer) to stop them gracefully, or, when it died without it,
//!   the group had SIGTERM and a grace period first (`leftovers.rs`).
//!   Nothing a worker started outlives it unless it left the group
//!   (`setsid`, `start_new_session`).

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
    /// Reaps the process if it has exited, SIGKILLing what it left in its
    /// process group first; `None` if it is still running.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;
    /// Whether the process has exited, and how, without reaping it.
    fn exited(&mut self) -> io::Result<Option<ExitStatus>>;
    /// Whether any process other than this one (and other than a zombie) is
    /// in its process group; `None` where that cannot be seen.
    fn others_in_group(&self) -> Option<bool>;
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
        if self.exited()?.is_none() {
            return Ok(None);
        }
        self.forwarded = None; // out of the Ctrl-C table before its group id can be reused
        let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
        let status = rustix::process::waitid(self.id(), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)?;
        Ok(status.map(exit_status))
    }

    fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        let exited = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        let seen = match rustix::process::waitid(self.id(), exited) {
            Err(e) if self.lost(e) => rustix::process::waitid(self.id(), exited)?,
            seen => seen?,
        };
        Ok(seen.map(exit_status))
    }

    fn others_in_group(&self) -> Option<bool> {
        others_in_group(self.pid.as_raw_nonzero().get())
    }
}

fn exit_status(st: rustix::process::WaitIdStatus) -> ExitStatus {
    match st.terminating_signal() {
        Some(sig) => ExitStatus::Signal(sig),
        None => ExitStatus::Code(st.exit_status().unwrap_or(-1)),
    }
}

/// Whether a process other than `leader`, and not a zombie, is in process
/// group `leader`, as `/proc` shows; `None` where `/proc` cannot say (not
/// mounted, or another PID namespace's, whose ids are not this one's).
pub(super) fn others_in_group(leader: i32) -> Option<bool> {
    crate::memory::proc_is_this_namespaces().ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == leader {
            continue;
        }
        // Gone meanwhile, or not ours to read: not a member we can see.
        let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else { continue };
        if live_member_of(&stat) == Some(leader) {
            return Some(true);
        }
    }
    Some(false)
}

/// The process group (the fifth field) of a `/proc/<pid>/stat` line, unless
/// the process is a zombie. The second field, the command's name in
/// parentheses, may hold anything: fields are counted from its last `)`.
fn live_member_of(stat: &[u8]) -> Option<i32> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(1)?.parse().ok()
}

/// Stands in a worker's record for its process once that is handed on to be
/// reaped later (see `leftovers.rs`): it has exited, and is no longer the
/// record's to signal or reap.
pub(super) struct HandedOn(pub(super) i32);

impl Kill for HandedOn {
    fn signal(&mut self, _sig: Signal, _group: bool) {}
}

impl Wait for HandedOn {
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        Ok(None)
    }

    fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        Ok(None)
    }

    fn others_in_group(&self) -> Option<bool> {
        None
    }
}

impl WorkerProcess for HandedOn {
    fn pid(&self) -> i32 {
        self.0
    }

    fn exit_fd(&self) -> Option<RawFd> {
        None
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

#[cfg(test)]
mod stat_tests {
    use super::live_member_of;

    #[test]
    fn the_group_is_read_after_the_last_parenthesis_of_the_name() {
        let line = b"4242 (a) b (c)) S 17 4200 4200 0 -1 4194560 0 0";
        assert_eq!(live_member_of(line), Some(4200));
    }

    #[test]
    fn a_zombie_is_no_member() {
        assert_eq!(live_member_of(b"4242 (sleep) Z 17 4200 4200 0"), None);
    }
}
