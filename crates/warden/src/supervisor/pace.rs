//! Reading from workers paused while this process is short of file
//! descriptors.
//!
//! A result with large buffers brings one descriptor into this process (its
//! shared segment, or the table of its lent buffers), held until the pool's
//! user takes the result. When results arrive faster than they are taken (a
//! burst of thousands, while the taker waits for the interpreter), those
//! descriptors can use up this process's limit (`RLIMIT_NOFILE`, 1 024 by
//! default on most systems), and the kernel then drops the next one it
//! should deliver.
//!
//! So when a descriptor received from a worker has a number in the top
//! quarter of what the limit allows (see [`fds_scarce`]: a new descriptor
//! gets the lowest free number, so at most that many are left), the
//! supervisor stops reading from workers. They wait, blocked on their
//! channels, until that descriptor is closed (the supervisor checks every
//! [`PAUSE_STEP`]): results are taken in the order they came, so by then
//! those before it are too. Waiting only until *some* descriptor is free
//! would not do: reading would fill the gaps and take one more from the
//! top each time, and the newest are freed last. After [`MAX_PAUSE`] it
//! reads on regardless, so a process that keeps its own descriptors near
//! the limit is slowed down, never stopped.
//!
//! # Caveats
//!
//! * A descriptor the kernel cannot deliver all the same fails only its own
//!   task ([`crate::ErrorKind::SegmentLost`]); its worker goes on.
//! * A task's timeout keeps running while its result waits to be read.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use rustix::process::{getrlimit, Resource};

use super::Supervisor;

/// How often a pause checks whether descriptors were freed.
pub(super) const PAUSE_STEP: Duration = Duration::from_millis(1);
/// The longest pause with no descriptor freed.
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Descriptors kept free for everything else: a quarter of the soft limit,
/// at least this many.
const RESERVE_MIN: u64 = 32;

/// Reads from workers, paused.
pub(super) struct Pause {
    since: Instant,
    check_at: Instant,
    /// The descriptor whose number started the pause.
    mark: RawFd,
    /// Workers whose channels have more to read.
    unread: Vec<u64>,
}

/// Whether `fd`, just made or received, says this process is running out
/// of descriptors: its number is within a quarter of the soft limit of it
/// (a new descriptor gets the lowest free number, so at most that many are
/// left). The pool's callers use the same rule for what they send
/// (`frontend::fds_scarce`).
pub fn fds_scarce(fd: RawFd) -> bool {
    let Some(soft) = getrlimit(Resource::Nofile).current else { return false };
    let reserve = (soft / 4).max(RESERVE_MIN);
    u64::try_from(fd).is_ok_and(|fd| fd >= soft.saturating_sub(reserve))
}

/// Whether descriptor number `fd` is closed (or taken since by something
/// else, which a pause cannot tell: then it lasts [`MAX_PAUSE`]).
fn is_closed(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags, and fails with
    // EBADF if it is not open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
}

impl Supervisor {
    /// Reads what worker `id` sent, unless reading is paused: then later.
    pub(super) fn read_or_defer(&mut self, id: u64) {
        match &mut self.pause {
            Some(pause) => {
                if !pause.unread.contains(&id) {
                    pause.unread.push(id);
                }
            }
            None => self.read_worker(id, true),
        }
    }

    /// A read from worker `id` brought descriptor `fd`, from the top of the
    /// table: pause reading (the worker's channel has more to read).
    pub(super) fn pause_reading(&mut self, id: u64, fd: RawFd) {
        let now = Instant::now();
        let pause =
            self.pause.get_or_insert(Pause { since: now, check_at: now + PAUSE_STEP, mark: fd, unread: Vec::new() });
        if !pause.unread.contains(&id) {
            pause.unread.push(id);
        }
        tracing::debug!(pool = %self.cfg.name, fd, "short of file descriptors: reading from workers paused");
    }

    /// Ends the pause once the descriptor that started it is closed, or it
    /// has lasted [`MAX_PAUSE`]; then reads what waited.
    pub(super) fn check_pause(&mut self, now: Instant) {
        let Some(pause) = &mut self.pause else { return };
        if now < pause.check_at {
            return;
        }
        if !is_closed(pause.mark) && now.saturating_duration_since(pause.since) < MAX_PAUSE {
            pause.check_at = now + PAUSE_STEP;
            return;
        }
        let unread = std::mem::take(&mut pause.unread);
        self.pause = None;
        for id in unread {
            if self.pause.is_some() {
                self.read_or_defer(id);
            } else {
                self.read_worker(id, true);
            }
        }
    }

    /// When the pause is next checked.
    pub(super) fn pause_deadline(&self) -> Option<Instant> {
        self.pause.as_ref().map(|p| p.check_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_descriptor_near_the_soft_limit_is_scarce() {
        let soft = getrlimit(Resource::Nofile).current.expect("a finite limit in tests");
        let top = RawFd::try_from(soft - 1).expect("a limit that fits a descriptor");
        assert!(fds_scarce(top));
        assert!(!fds_scarce(3));
        let reserve = (soft / 4).max(RESERVE_MIN);
        let edge = RawFd::try_from(soft - reserve).expect("fits");
        assert!(fds_scarce(edge) && !fds_scarce(edge - 1));
    }

    #[test]
    fn a_pause_sees_its_descriptor_closed() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let fd: OwnedFd = rustix::io::dup(rustix::stdio::stderr()).expect("dup");
        let raw = fd.as_raw_fd();
        assert!(!is_closed(raw));
        drop(fd);
        assert!(is_closed(raw));
    }
}
