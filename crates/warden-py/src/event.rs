//! `SharedEvent`: a flag shared between processes, for `warden.Event`.
//!
//! The flag is bit 0 of an atomic `u32` in one page of an anonymous, sealed
//! `memfd`, mapped shared; the other bits count the `set()` calls. Waiters
//! sleep on that word with a *shared* futex (keyed by the page, not the
//! address space), so a `set()` in any process that maps the page wakes
//! waiters in every other one. A waiter returns `true` once the count has
//! moved since its wait began, even if a `clear()` came first: as
//! `threading.Event.wait`, which is true "if the internal flag has been set to
//! true, either before the wait call or after the wait starts", and a `set()`
//! with `clear()` right after it wakes every waiter instead of none.
//!
//! Another process reaches the page by getting the fd: inherited at spawn
//! ([`SharedEvent::from_fd`]), or by opening `/proc/<pid>/fd/<n>` of a process
//! that holds it ([`SharedEvent::open`]). The page holds a magic number and a
//! random token, checked on every open, so a stale `(pid, fd)` pair that now
//! names another file is refused instead of mapped. Nothing lives in the file
//! system: when the last process holding the fd or the mapping exits, even by
//! SIGKILL, the kernel frees it.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

use crate::convert::wait_seconds;

const PAGE: usize = 4096;
const TOKEN_OFFSET: usize = 8;
const MAGIC_OFFSET: usize = 16;
const MAGIC: u64 = u64::from_le_bytes(*b"wdnevt02");
/// Bit 0 of the futex word: the flag; the bits above it count `set()` calls.
const FLAG: u32 = 1;
/// How long a wait sleeps at a time before it looks for signals (Ctrl-C).
const SLICE: Duration = Duration::from_millis(50);

/// A process-shared event flag. See the module documentation.
#[pyclass(module = "warden._warden", name = "SharedEvent", frozen)]
pub struct SharedEvent {
    fd: OwnedFd,
    page: NonNull<u8>,
    token: u64,
}

// SAFETY: the mapping is only read and written through atomics, and it lives
// (with the fd) exactly as long as this object.
unsafe impl Send for SharedEvent {}
// SAFETY: as above.
unsafe impl Sync for SharedEvent {}

impl Drop for SharedEvent {
    fn drop(&mut self) {
        // SAFETY: `page` is a live mapping of PAGE bytes made by `map`, used by nothing else.
        unsafe {
            let _ = rustix::mm::munmap(self.page.as_ptr().cast(), PAGE);
        }
    }
}

fn map(fd: &OwnedFd) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared mapping chosen by the kernel; nothing aliases it yet.
    let ptr = unsafe {
        rustix::mm::mmap(std::ptr::null_mut(), PAGE, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, fd, 0)
    }?;
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned a null pointer"))
}

impl SharedEvent {
    /// The futex word: the flag (bit 0) and the count of `set()` calls.
    fn state(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a live, page-aligned mapping of PAGE bytes.
        unsafe { &*(self.page.as_ptr() as *const AtomicU32) }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: an 8-aligned offset within the live mapping.
        unsafe { &*(self.page.as_ptr().add(offset) as *const AtomicU64) }
    }

    /// Maps an fd that should hold an event page, and checks that it does.
    fn adopt(fd: OwnedFd, token: u64) -> PyResult<Self> {
        let seals = rustix::fs::fcntl_get_seals(fd.as_fd()).map_err(std::io::Error::from)?;
        let size = rustix::fs::fstat(fd.as_fd()).map_err(std::io::Error::from)?.st_size;
        if !seals.contains(SealFlags::SHRINK) || size < PAGE as i64 {
            return Err(PyValueError::new_err("the fd does not hold a warden event (not a sealed event page)"));
        }
        let page = map(&fd)?;
        let event = SharedEvent { fd, page, token };
        if event.word(MAGIC_OFFSET).load(Ordering::SeqCst) != MAGIC
            || event.word(TOKEN_OFFSET).load(Ordering::SeqCst) != token
        {
            return Err(PyValueError::new_err("the fd holds another event than the one pickled (stale handle)"));
        }
        Ok(event)
    }
}

#[pymethods]
impl SharedEvent {
    /// A new event, not set.
    #[new]
    fn new() -> PyResult<Self> {
        let fd =
            rustix::fs::memfd_create("warden-event", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).map_err(|e| {
                // A sandbox's seccomp filter, or a kernel without it: say what was refused.
                pyo3::exceptions::PyOSError::new_err((
                    e.raw_os_error(),
                    format!("cannot make a warden.Event: memfd_create refused: {}", std::io::Error::from(e)),
                ))
            })?;
        rustix::fs::ftruncate(&fd, PAGE as u64).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(std::io::Error::from)?;
        let mut bytes = [0u8; 8];
        rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).map_err(std::io::Error::from)?;
        let token = u64::from_le_bytes(bytes) | 1;
        let page = map(&fd)?;
        let event = SharedEvent { fd, page, token };
        event.word(TOKEN_OFFSET).store(token, Ordering::SeqCst);
        event.word(MAGIC_OFFSET).store(MAGIC, Ordering::SeqCst);
        Ok(event)
    }

    /// The event whose page is held by `fd` (inherited at spawn); takes
    /// ownership of `fd`. Raises `ValueError` if it holds another event.
    #[staticmethod]
    fn from_fd(fd: RawFd, token: u64) -> PyResult<Self> {
        if fd < 0 {
            return Err(PyValueError::new_err(format!("{fd} is not an fd")));
        }
        // SAFETY: the caller hands over an fd it owns (a `DupFd.detach()` result).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::adopt(fd, token)
    }

    /// Opens the event held as fd `fd` by process `pid`. Raises `OSError` if
    /// that process or fd is gone, `ValueError` if the fd holds something else.
    #[staticmethod]
    fn open(pid: i32, fd: RawFd, token: u64) -> PyResult<Self> {
        // Process ids in `/proc` are those of the pid namespace it was mounted
        // for: where that is not this process's (`unshare --pid` without a
        // `/proc` of its own), `pid` there is another process.
        let own = rustix::process::getpid().as_raw_nonzero().get().to_string();
        match rustix::fs::readlink("/proc/self", Vec::new()) {
            Ok(link) if link.as_bytes() == own.as_bytes() => {}
            Ok(_) => {
                return Err(PyOSError::new_err(format!(
                    "cannot open the event shared by process {pid}: /proc belongs to another pid namespace \
                     (mount one for this namespace, or pass the event in the pool's initargs or a \
                     Process's args, which need no /proc)"
                )))
            }
            Err(e) => {
                return Err(PyOSError::new_err(format!(
                    "cannot open the event shared by process {pid}: /proc cannot be read ({}); \
                     pass the event in the pool's initargs or a Process's args, which need no /proc",
                    std::io::Error::from(e)
                )))
            }
        }
        let path = format!("/proc/{pid}/fd/{fd}");
        // Not blocking, not made a controlling terminal: until `adopt` has
        // checked it, whatever the fd holds is not known to be the event.
        let flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let file = rustix::fs::open(path.as_str(), flags, Mode::empty()).map_err(|e| {
            PyOSError::new_err(format!(
                "cannot open the event shared by process {pid} ({path}: {}); \
                 the process that created it must still hold it",
                std::io::Error::from(e)
            ))
        })?;
        Self::adopt(file, token)
    }

    /// Sets the flag and wakes every waiter, in every process.
    fn set(&self) {
        // The flag, and one more set() counted (wrapping).
        let _ = self.state().fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some((v | FLAG).wrapping_add(2)));
        let _ = futex::wake(self.state(), futex::Flags::empty(), u32::MAX);
    }

    /// Clears the flag.
    fn clear(&self) {
        self.state().fetch_and(!FLAG, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    fn is_set(&self) -> bool {
        self.state().load(Ordering::SeqCst) & FLAG != 0
    }

    /// Waits until the flag is set, up to `timeout` seconds (forever if
    /// `None`); returns `true` if it was set before the wait or is set during
    /// it (though cleared again since), `false` if the time ran out. Raises
    /// `KeyboardInterrupt` (or what a signal handler raises) while waiting.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let deadline = wait_seconds(timeout)?.and_then(|t| Instant::now().checked_add(t));
        let began = self.state().load(Ordering::SeqCst);
        let mut seen = began;
        loop {
            if seen & FLAG != 0 || (seen >> 1) != (began >> 1) {
                return Ok(true);
            }
            let slice = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    left.min(SLICE)
                }
                None => SLICE,
            };
            let ts = futex::Timespec { tv_sec: 0, tv_nsec: slice.as_nanos() as _ };
            // EAGAIN (the word moved), ETIMEDOUT and EINTR all just loop.
            py.detach(|| futex::wait(self.state(), futex::Flags::empty(), seen, Some(&ts)).ok());
            py.check_signals()?;
            seen = self.state().load(Ordering::SeqCst);
        }
    }

    /// The fd holding the event's page in this process.
    fn fileno(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// The event's random token (checked when it is opened elsewhere).
    #[getter]
    fn token(&self) -> u64 {
        self.token
    }
}
