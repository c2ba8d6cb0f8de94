//! The pool's zygote as its supervisor sees it: started with the pool, asked
//! for each worker once ready, watched through its pidfd, replaced when it
//! dies, given up on when it refuses to fork.
//!
//! ```text
//!  Down ──start──► Up (starting) ──Ready──► Up (ready) ──fork requests…
//!   ▲                  │ init timeout / bad answer: SIGKILL   │ it dies
//!   └── reaped: counts toward the restart intensity ◄─────────┘
//!  Off: exec starts only (configured, a one-off child, or the zygote refused)
//! ```
//!
//! A zygote that refuses to fork is replaced once by one prepared from the
//! fallback payload, when the pool has one (Python: the preloads without
//! `__main__`, whose import may start threads or open files); a second
//! refusal is final.
//!
//! While a zygote is down or starting, replacements start by exec, so the
//! pool keeps serving; only the pool's very first workers wait for the first
//! zygote (that is what makes a cold start of many workers cheap), and at most
//! for the init timeout.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use rustix::process::{Resource, Signal, WaitId, WaitIdOptions};

use crate::error::ExitStatus;
use crate::spawn::{fork_worker, spawn_zygote, Spawned};
use crate::zygote::{ForkError, Zygote};

use super::{LifecycleEvent, PoolPhase, Supervisor};

/// The zygote's pidfd.
pub(super) const ZYGOTE_PIDFD: Token = Token(1);
/// The zygote's control socket.
pub(super) const ZYGOTE_CONTROL: Token = Token(2);

/// Delay before a new zygote replaces one that died.
const ZYGOTE_RETRY: Duration = Duration::from_millis(100);
/// How long a zygote told to go (its control socket closed) gets before SIGKILL.
const ZYGOTE_EXIT_WAIT: Duration = Duration::from_secs(1);

/// What a process started now would inherit from this one, as far as the
/// zygote's forks would get it wrong: credentials (user, group, groups,
/// capabilities, `no_new_privs`, seccomp), the `umask`, the signals ignored
/// (`SIG_IGN` outlives exec), the resource limits and the OOM killer's
/// adjustment (`oom_score_adj`). The zygote was started with what these
/// were then; its forks get that, not what the program has set since (a
/// service that dropped its privileges, tightened its `umask`, lowered a
/// limit or offered itself to the OOM killer first after making the pool).
///
/// The user and groups are also read by system call, so that a change of
/// them is seen where `/proc` cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Inherited {
    status: Option<Vec<u8>>,
    ids: (u32, u32, u32, u32, Option<Vec<u32>>),
    limits: Vec<(Option<u64>, Option<u64>)>,
    oom_score_adj: Option<Vec<u8>>,
}

/// The fields of the thread's `status` in `/proc` that [`Inherited`] compares.
const INHERITED_FIELDS: [&[u8]; 12] = [
    b"Umask:",
    b"SigIgn:",
    b"Uid:",
    b"Gid:",
    b"Groups:",
    b"CapInh:",
    b"CapPrm:",
    b"CapEff:",
    b"CapBnd:",
    b"CapAmb:",
    b"NoNewPrivs:",
    b"Seccomp:",
];

/// The resource limits [`Inherited`] compares: all of Linux's.
const LIMITS: [Resource; 16] = [
    Resource::Cpu,
    Resource::Fsize,
    Resource::Data,
    Resource::Stack,
    Resource::Core,
    Resource::Rss,
    Resource::Nproc,
    Resource::Nofile,
    Resource::Memlock,
    Resource::As,
    Resource::Locks,
    Resource::Sigpending,
    Resource::Msgqueue,
    Resource::Nice,
    Resource::Rtprio,
    Resource::Rttime,
];

impl Inherited {
    /// What a process started by the calling thread (the supervisor's)
    /// would get now: the thread's own status, since capabilities,
    /// `no_new_privs` and seccomp are per thread (`None` where `/proc`
    /// cannot be read).
    pub(super) fn now() -> Inherited {
        // `thread-self`, not `self/task/<gettid()>`: where `/proc` is another
        // pid namespace's (a program started by `unshare --pid` without a
        // `/proc` of its own), the thread's id there is not `gettid()`'s.
        let status = std::fs::read("/proc/thread-self/status").ok().map(|whole| {
            let mut status = Vec::with_capacity(512);
            for line in whole.split(|&b| b == b'\n') {
                if INHERITED_FIELDS.iter().any(|field| line.starts_with(field)) {
                    status.extend_from_slice(line);
                    status.push(b'\n');
                }
            }
            status
        });
        let ids = (
            rustix::process::getuid().as_raw(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getgid().as_raw(),
            rustix::process::getegid().as_raw(),
            rustix::process::getgroups().ok().map(|groups| groups.into_iter().map(|g| g.as_raw()).collect()),
        );
        let limits = LIMITS
            .iter()
            .map(|&resource| {
                let limit = rustix::process::getrlimit(resource);
                (limit.current, limit.maximum)
            })
            .collect();
        // Per process, not per thread; `None` where it cannot be read.
        let oom_score_adj = std::fs::read("/proc/self/oom_score_adj").ok();
        Inherited { status, ids, limits, oom_score_adj }
    }
}

/// Where the pool's zygote is in its life.
pub(super) enum ZygoteSlot {
    /// No zygote: every worker starts by exec.
    Off,
    /// None running; start one at `retry_at`.
    Down { retry_at: Instant },
    /// Running. `deadline`: until it is ready; `stopping`: the pool ended it;
    /// `inherited`: what it was started with.
    Up { zygote: Zygote, deadline: Option<Instant>, stopping: bool, inherited: Inherited },
}

/// How the next worker is to start.
pub(super) enum NextStart {
    /// Forked by the zygote.
    Forked(Spawned),
    /// By exec.
    Exec,
    /// Not yet: the pool's first zygote is getting ready.
    Wait,
    /// The zygote answered that it could not fork this one (the system
    /// refused: no process, memory or descriptor left); the zygote is fine.
    Failed(std::io::Error),
}

impl Supervisor {
    /// Starts a zygote if the pool wants one and none is running.
    pub(super) fn ensure_zygote(&mut self, now: Instant) {
        let ZygoteSlot::Down { retry_at } = self.zygote else { return };
        if now < retry_at || self.phase != PoolPhase::Running {
            return;
        }
        let inherited = Inherited::now();
        match spawn_zygote(&self.cfg.command, &self.pass_fds) {
            Ok(spawned) => {
                let zygote = Zygote {
                    pid: spawned.pid,
                    pidfd: spawned.pidfd,
                    control: spawned.control,
                    ready: false,
                    reaped: false,
                };
                let registry = self.poll.registry();
                let payload = match &self.cfg.zygote_fallback {
                    Some(fallback) if self.zygote_fallback => fallback,
                    _ => &self.cfg.zygote_payload,
                };
                let registered = zygote.start(payload, &self.pass_fds).map_err(|e| e.to_string()).and_then(|()| {
                    registry
                        .register(&mut SourceFd(&zygote.pidfd.as_raw_fd()), ZYGOTE_PIDFD, Interest::READABLE)
                        .and_then(|()| {
                            registry.register(
                                &mut SourceFd(&zygote.control.as_raw_fd()),
                                ZYGOTE_CONTROL,
                                Interest::READABLE,
                            )
                        })
                        .map_err(|e| e.to_string())
                });
                let pid = zygote.pid.as_raw_nonzero().get();
                tracing::debug!(pool = %self.cfg.name, pid, "zygote started");
                self.zygote_killed = None;
                self.zygote =
                    ZygoteSlot::Up { zygote, deadline: Some(now + self.cfg.init_timeout), stopping: false, inherited };
                if let Err(e) = registered {
                    self.zygote_broken(format!("cannot start the zygote {pid}: {e}"));
                }
            }
            Err(e) => {
                self.zygote_first = false;
                self.zygote = ZygoteSlot::Down { retry_at: now + ZYGOTE_RETRY };
                let error = format!("cannot start a zygote ({}): {e}", self.cfg.command.program.display());
                tracing::warn!(pool = %self.cfg.name, "{error}");
                self.emit(LifecycleEvent::SpawnFailed { error: error.clone() });
                // A shortage is not the zygote's failure: workers start by
                // exec meanwhile, and their starts bound the wait.
                if !super::schedule::is_shortage(&e) {
                    self.note_crash(error);
                }
            }
        }
    }

    /// How to start the next worker; forks it if the zygote is ready.
    pub(super) fn next_start(&mut self) -> NextStart {
        let ZygoteSlot::Up { zygote, stopping: false, inherited, .. } = &self.zygote else { return NextStart::Exec };
        if !zygote.ready {
            return if self.zygote_first { NextStart::Wait } else { NextStart::Exec };
        }
        if Inherited::now() != *inherited {
            // A fork would start this worker with the credentials, umask,
            // limits or OOM adjustment of when the zygote started: this one starts by
            // exec, with the program's own, and a new zygote is prepared
            // with them for the ones after it. Not a failure.
            let pid = zygote.pid.as_raw_nonzero().get();
            tracing::debug!(pool = %self.cfg.name, pid, "credentials, umask or limits changed: a new zygote");
            self.stop_zygote();
            self.zygote = ZygoteSlot::Down { retry_at: Instant::now() };
            return NextStart::Exec;
        }
        match fork_worker(zygote, self.cfg.max_frame) {
            Ok((spawned, None)) => NextStart::Forked(spawned),
            Ok((spawned, Some(why))) => {
                // It forked this one, then failed to answer: killed already.
                self.zygote_broken(format!("the zygote failed to answer a fork request: {why}"));
                NextStart::Forked(spawned)
            }
            Err(ForkError::Refused(reason)) => {
                self.zygote_refused(reason);
                NextStart::Exec
            }
            Err(ForkError::Failed(why)) => {
                self.zygote_broken(format!("the zygote failed to fork: {why}"));
                NextStart::Exec
            }
            Err(ForkError::Declined(e, why)) => {
                let errno = e.raw_os_error().unwrap_or(0);
                NextStart::Failed(std::io::Error::new(e.kind(), super::schedule::StartDeclined { errno, why }))
            }
        }
    }

    /// The control socket is readable: the answer to the start request.
    pub(super) fn zygote_readable(&mut self) {
        let ZygoteSlot::Up { zygote, deadline, stopping: false, .. } = &mut self.zygote else { return };
        if zygote.ready {
            return; // answers to fork requests are read where they are asked
        }
        match zygote.read_ready() {
            Ok(false) => {}
            Ok(true) => {
                *deadline = None;
                self.zygote_first = false;
                let pid = zygote.pid.as_raw_nonzero().get();
                tracing::debug!(pool = %self.cfg.name, pid, "zygote ready");
                self.emit(LifecycleEvent::ZygoteReady { pid });
            }
            Err(ForkError::Refused(reason)) => self.zygote_refused(reason),
            Err(ForkError::Failed(why)) => self.zygote_broken(why),
            Err(ForkError::Declined(_, why)) => self.zygote_broken(why),
        }
    }

    /// The zygote's start deadline passed without a `Ready`.
    pub(super) fn check_zygote_timer(&mut self, now: Instant) {
        if let ZygoteSlot::Up { deadline: Some(d), stopping: false, .. } = &self.zygote {
            if now >= *d {
                let timeout = self.cfg.init_timeout;
                self.zygote_broken(format!("the zygote was not ready within the init timeout ({timeout:?})"));
            }
        }
    }

    pub(super) fn zygote_deadline(&self) -> Option<Instant> {
        match &self.zygote {
            ZygoteSlot::Up { deadline, .. } => *deadline,
            ZygoteSlot::Down { retry_at } if self.phase == PoolPhase::Running => Some(*retry_at),
            _ => None,
        }
    }

    /// The zygote will never fork: one more zygote from the fallback
    /// payload if there is one, else exec from now on, for good.
    fn zygote_refused(&mut self, reason: String) {
        if self.cfg.zygote_fallback.is_some() && !self.zygote_fallback {
            tracing::debug!(pool = %self.cfg.name, "the zygote cannot fork, trying one from the fallback payload: {reason}");
            self.zygote_fallback = true;
            self.stop_zygote();
            // Not a failure: the first workers keep waiting, for the new one.
            self.zygote = ZygoteSlot::Down { retry_at: Instant::now() };
            return;
        }
        tracing::warn!(pool = %self.cfg.name, "the zygote cannot fork, workers start by exec: {reason}");
        self.emit(LifecycleEvent::ZygoteRefused { reason });
        self.zygote_first = false;
        self.stop_zygote();
        self.zygote = ZygoteSlot::Off;
    }

    /// The zygote misbehaved: kill it; its reaping counts the failure and
    /// schedules a new one.
    fn zygote_broken(&mut self, why: String) {
        tracing::warn!(pool = %self.cfg.name, "{why}");
        self.zygote_first = false;
        if let ZygoteSlot::Up { zygote, deadline, .. } = &mut self.zygote {
            *deadline = None;
            // Asked for nothing more until it is reaped: exec meanwhile.
            let was_ready = std::mem::replace(&mut zygote.ready, false);
            let _ = rustix::process::pidfd_send_signal(&zygote.pidfd, Signal::KILL);
            self.zygote_killed = Some((why, was_ready));
        }
    }

    /// The zygote's pidfd is readable: it exited. Reap it, and unless the
    /// pool ended it, count a failure and schedule a new one.
    pub(super) fn reap_zygote(&mut self) {
        let ZygoteSlot::Up { zygote, stopping, .. } = &mut self.zygote else { return };
        let status = match rustix::process::waitid(
            WaitId::PidFd(zygote.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => match st.terminating_signal() {
                Some(sig) => ExitStatus::Signal(sig),
                None => ExitStatus::Code(st.exit_status().unwrap_or(-1)),
            },
            Ok(None) => return,
            Err(e) => {
                tracing::error!(pool = %self.cfg.name, "waitid on the zygote failed: {e}");
                ExitStatus::Code(-1)
            }
        };
        zygote.reaped = true;
        let intended = *stopping;
        // (A zygote the pool gave up on was marked not ready then.)
        let was_ready = self.zygote_killed.as_ref().map_or(zygote.ready, |&(_, ready)| ready);
        let pid = zygote.pid.as_raw_nonzero().get();
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&zygote.pidfd.as_raw_fd()));
        let _ = registry.deregister(&mut SourceFd(&zygote.control.as_raw_fd()));
        self.zygote = ZygoteSlot::Down { retry_at: Instant::now() + ZYGOTE_RETRY };
        self.zygote_first = false;
        tracing::debug!(pool = %self.cfg.name, pid, %status, intended, "zygote reaped");
        self.emit(LifecycleEvent::ZygoteExited { pid, status, intended });
        if !intended && self.phase != PoolPhase::Failed {
            // One that ended on its own before it was ready is, most likely,
            // not a warden worker's program (the same program as the workers').
            // The pool's SIGKILL, if that is what ended it: a zygote whose
            // control socket closed first ended on its own.
            let killed = self.zygote_killed.take().filter(|_| matches!(status, ExitStatus::Signal(libc::SIGKILL)));
            let what = match killed {
                Some((why, true)) => format!("the zygote {pid} ended with {status}: the pool killed it ({why})"),
                // Most likely not a warden worker's program, as below.
                Some((why, false)) => format!(
                    "the zygote {pid} ended with {status}: the pool killed it before it was ready ({why}; {})",
                    self.not_a_worker()
                ),
                None if !was_ready && matches!(status, ExitStatus::Code(_)) => {
                    format!("the zygote {pid} ended with {status} before it was ready ({})", self.not_a_worker())
                }
                None => format!("the zygote {pid} ended with {status}"),
            };
            self.note_crash(what);
        }
    }

    /// Ends the zygote (the pool is done, or it refused): closing its control
    /// socket tells it to exit; SIGKILL after a second; reaped either way.
    /// Bounded: at most [`ZYGOTE_EXIT_WAIT`] plus the kill wait.
    pub(super) fn stop_zygote(&mut self) {
        let slot = std::mem::replace(&mut self.zygote, ZygoteSlot::Off);
        let ZygoteSlot::Up { mut zygote, .. } = slot else {
            self.zygote = slot;
            return;
        };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut SourceFd(&zygote.pidfd.as_raw_fd()));
        let _ = registry.deregister(&mut SourceFd(&zygote.control.as_raw_fd()));
        let pid = zygote.pid.as_raw_nonzero().get();
        let _ = rustix::net::shutdown(&zygote.control, rustix::net::Shutdown::Both);
        let status = zygote.wait_exit(ZYGOTE_EXIT_WAIT);
        if let Some(status) = status {
            self.emit(LifecycleEvent::ZygoteExited { pid, status, intended: true });
        }
    }
}
