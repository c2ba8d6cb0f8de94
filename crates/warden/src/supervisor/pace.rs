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
//! [`PAUSE_STEP`]): results are mostly taken in the order they came, so by
//! then those before it are too. The descriptor is known by its device and
//! inode, not only its number: a number freed and at once taken by another
//! (a new worker's pidfd) ends the pause too. Waiting only until *some*
//! descriptor is free would not do: reading would fill the gaps and take
//! one more from the top each time, and the newest are freed last.
//!
//! A pause is bounded: the user may be waiting for a result still unread
//! (results are taken in the order the user asks for them, not in the order
//! they came), or keep its own descriptors near the limit. So a pause whose
//! descriptor is still open after [`FIRST_PAUSE_CAP`] ends all the same, and
//! the next one may last twice as long, up to [`MAX_PAUSE`]; a pause that
//! ends with its descriptor closed starts the doubling over. A user that
//! takes its results is slowed down by milliseconds; one that takes none
//! lets at most one more descriptor per worker in per [`MAX_PAUSE`], once
//! the doubling has got there.
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
/// How long a pause lasts with its descriptor still open, when the pause
/// before it ended with its own closed.
pub(super) const FIRST_PAUSE_CAP: Duration = Duration::from_millis(20);
/// Descriptors kept free for everything else: a quarter of the soft limit,
/// at least this many.
const RESERVE_MIN: u64 = 32;

/// Reads from workers, paused.
pub(super) struct Pause {
    since: Instant,
    check_at: Instant,
    /// The descriptor whose number started the pause, and what it was
    /// (device and inode), to tell it from another given the same number.
    mark: RawFd,
    mark_id: Option<(u64, u64)>,
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

/// Whether this process is short of descriptors now, by the rule of
/// [`fds_scarce`]: the lowest free number (that of a copy of `any`, closed
/// at once) is within the reserve, or none is free at all.
pub(super) fn fds_scarce_now(any: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    match rustix::io::fcntl_dupfd_cloexec(any, 0) {
        Ok(copy) => fds_scarce(copy.as_raw_fd()),
        Err(e) => e == rustix::io::Errno::MFILE,
    }
}

/// The cap of the pause after one that ended with its descriptor `closed`,
/// or after `cap` with it still open.
fn next_cap(cap: Duration, closed: bool) -> Duration {
    if closed {
        FIRST_PAUSE_CAP
    } else {
        (cap * 2).min(MAX_PAUSE)
    }
}

/// What descriptor number `fd` refers to (device and inode), if it is open.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer given, which is one, and
    // fails with EBADF if `fd` is not open; it reads nothing else.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // their types differ between targets
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// Whether the descriptor that was `id` at number `fd` is closed: the number
/// is free, or refers to something else now.
fn is_closed(fd: RawFd, id: Option<(u64, u64)>) -> bool {
    match identity(fd) {
        None => true,
        Some(now) => id.is_some_and(|then| then != now),
    }
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
        let pause = self.pause.get_or_insert(Pause {
            since: now,
            check_at: now + PAUSE_STEP,
            mark: fd,
            mark_id: identity(fd),
            unread: Vec::new(),
        });
        if !pause.unread.contains(&id) {
            pause.unread.push(id);
        }
        tracing::debug!(pool = %self.cfg.name, fd, "short of file descriptors: reading from workers paused");
    }

    /// Ends the pause once the descriptor that started it is closed, or it
    /// has lasted its cap (see the module's docs); then reads what waited.
    pub(super) fn check_pause(&mut self, now: Instant) {
        let Some(pause) = &mut self.pause else { return };
        if now < pause.check_at {
            return;
        }
        let closed = is_closed(pause.mark, pause.mark_id);
        if !closed && now.saturating_duration_since(pause.since) < self.pause_cap {
            pause.check_at = now + PAUSE_STEP;
            return;
        }
        self.pause_cap = next_cap(self.pause_cap, closed);
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
    fn pauses_that_outlast_their_cap_double_it_up_to_the_maximum_and_a_closed_one_resets_it() {
        let mut cap = FIRST_PAUSE_CAP;
        let mut caps = Vec::new();
        for _ in 0..8 {
            cap = next_cap(cap, false);
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(next_cap(cap, true), FIRST_PAUSE_CAP);
    }

    #[test]
    fn a_pause_sees_its_descriptor_closed() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let fd: OwnedFd = rustix::io::dup(rustix::stdio::stderr()).expect("dup");
        let raw = fd.as_raw_fd();
        let id = identity(raw);
        assert!(id.is_some() && !is_closed(raw, id));
        drop(fd);
        assert!(is_closed(raw, id));
    }

    #[test]
    fn a_pause_sees_its_descriptors_number_taken_by_another_as_closed() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let fd: OwnedFd = rustix::fs::memfd_create("first", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        let raw = fd.as_raw_fd();
        let id = identity(raw);
        drop(fd);
        // The lowest free number: the one just freed (tests run in threads,
        // so another may have taken it; then this one says nothing).
        let other: OwnedFd = rustix::fs::memfd_create("second", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        if other.as_raw_fd() == raw {
            assert!(is_closed(raw, id));
            assert!(!is_closed(raw, identity(raw)));
        }
    }
}
