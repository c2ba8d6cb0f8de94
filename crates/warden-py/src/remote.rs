//! Large buffers read straight out of the sending process's memory.
//!
//! Where the kernel allows it, the large buffers of a call or a result do not
//! go through a shared segment at all: the sender keeps them alive ("lends"
//! them) and sends their addresses; the receiver copies them into its own
//! fresh memory with `process_vm_readv` (one copy, no `memfd` pages to
//! allocate and zero), then tells the sender it is done. The protocol around
//! this (the table of addresses, the release, when it is used) lives in
//! `python/warden/_oob.py`; this module only reads.
//!
//! # Caveats
//!
//! * Reading another process's memory needs ptrace access to it
//!   (`PTRACE_MODE_ATTACH_REALCREDS`): the same user, a dumpable target, and
//!   Yama's `ptrace_scope` at 0 (or at 1 when the reader is an ancestor of the
//!   target). `python/warden/_oob.py` checks these before lending; a read
//!   refused anyway raises `PermissionError`.
//! * The sender must keep every lent buffer alive and unmoved until the
//!   receiver has read it; a buffer freed early would be read as whatever
//!   the sender's memory holds by then (never this process's memory: the
//!   copy only writes into destinations made here).
//! * A `pid` names a process only while it lives: if the sender died and its
//!   pid were reused by another process of the same user between the frame
//!   and the read, that process would be read. The sender is a live worker
//!   holding the buffers, or the parent of this worker, so the window is that
//!   of a crash racing the read.

use std::io::IoSliceMut;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::segment::{Segment, SegmentBuffer};

/// A lent buffer to be rebuilt as a `bytes` object.
pub const KIND_BYTES: u8 = 1;
/// A lent buffer to be rebuilt as a writable `memoryview` of a [`Segment`]
/// (numpy arrays are built on it without a copy).
pub const KIND_RAW: u8 = 0;

/// The address and length of a contiguous buffer `obj` exports. The address
/// stays valid only as long as the caller holds an export of `obj` (a
/// `memoryview`), which keeps it alive and unmoved.
#[pyfunction]
pub fn buffer_address(obj: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let buffer = pyo3::buffer::PyBuffer::<u8>::get(obj)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    Ok((buffer.buf_ptr() as usize, buffer.len_bytes()))
}

/// Whether this process is dumpable (`PR_GET_DUMPABLE`): another process
/// of the same user may read its memory only if it is.
#[pyfunction]
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointers and only reads a flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// Reads the buffers `entries` (address, length, kind) out of process `pid`
/// into new objects of this process: a `bytes` for [`KIND_BYTES`]; for
/// [`KIND_RAW`], a [`SegmentBuffer`] of a [`Segment`] of its own (a mapping
/// that the arrays built on it keep alive: an array kept from a result of
/// several keeps its own memory only, not its siblings'). At most `max`
/// bytes in all. The copies run without the GIL. Raises `OSError` (with the errno, e.g.
/// `PermissionError`, `ProcessLookupError`) if the kernel refuses or the
/// memory is gone.
#[pyfunction]
pub fn read_remote(py: Python<'_>, pid: i32, entries: Vec<(usize, usize, u8)>, max: usize) -> PyResult<Vec<Py<PyAny>>> {
    if pid <= 0 {
        return Err(PyValueError::new_err(format!("{pid} is not a process id")));
    }
    let total = entries.iter().fold(0u128, |sum, &(_, len, _)| sum + len as u128);
    if total > max as u128 {
        return Err(PyValueError::new_err(format!(
            "lent buffers of {total} bytes in all exceed the limit of {max} bytes"
        )));
    }
    let mut objects: Vec<Py<PyAny>> = Vec::with_capacity(entries.len());
    // (remote address, local address, length) of each copy to make.
    let mut copies = Vec::with_capacity(entries.len());
    for &(addr, len, kind) in &entries {
        match kind {
            KIND_BYTES | KIND_RAW if len == 0 => objects.push(pyo3::types::PyBytes::new(py, b"").into_any().unbind()),
            KIND_BYTES => {
                let size = ffi::Py_ssize_t::try_from(len).map_err(|_| PyValueError::new_err("buffer too large"))?;
                // SAFETY: a null source asks for an uninitialised `bytes` of
                // `size` bytes, filled below before anyone else sees it.
                let obj = unsafe {
                    Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), size))?
                };
                // SAFETY: `obj` is the `bytes` just made.
                let data = unsafe { ffi::PyBytes_AsString(obj.as_ptr()) }.cast::<u8>();
                if data.is_null() {
                    return Err(PyErr::fetch(py));
                }
                objects.push(obj.unbind());
                copies.push((addr, data as usize, len));
            }
            KIND_RAW => {
                let segment = Segment::anonymous(len)?;
                copies.push((addr, segment.as_mut_ptr() as usize, len));
                let buffer = SegmentBuffer::new(Py::new(py, segment)?, 0, len)?;
                objects.push(Py::new(py, buffer)?.into_any());
            }
            other => return Err(PyValueError::new_err(format!("unknown kind {other} of a lent buffer"))),
        }
    }
    py.detach(|| copy_all(pid, &copies)).map_err(|e| {
        PyOSError::new_err((
            e.raw_os_error().unwrap_or(0),
            format!("cannot read {} lent buffer(s) out of process {pid}: {e}", entries.len()),
        ))
    })?;
    Ok(objects)
}

/// Reads of at least this many bytes in all are shared between two threads.
const TWO_THREADS_FROM: usize = 8 << 20;
/// The pieces the copies are cut into, to share them between threads.
const PIECE: usize = 4 << 20;

/// Makes `copies` (remote address, local address, length): each piece's
/// destination populated, then read. Most of a large read's time is the
/// kernel allocating and zeroing the fresh destination's pages, which two
/// threads do about twice as fast as one: a large read is cut into pieces
/// that this thread and one more take in turn.
fn copy_all(pid: i32, copies: &[(usize, usize, usize)]) -> std::io::Result<()> {
    let total: usize = copies.iter().map(|&(_, _, len)| len).sum();
    let mut pieces = Vec::new();
    for &(remote, local, len) in copies {
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            pieces.push((remote + done, local + done, n));
            done += n;
        }
    }
    let run = |first: usize, step: usize| -> std::io::Result<()> {
        pieces.iter().skip(first).step_by(step).try_for_each(|&(remote, local, len)| {
            if len >= PIECE {
                crate::segment::populate(local as *mut u8, len);
            }
            // SAFETY: `local` lies in the storage of an object `read_remote`
            // made, owned by it and seen by no one else until it returns;
            // the pieces do not overlap.
            let local = unsafe { std::slice::from_raw_parts_mut(local as *mut u8, len) };
            read_one(pid, remote, local)
        })
    };
    let two = total >= TWO_THREADS_FROM && std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
    if !two {
        return run(0, 1);
    }
    std::thread::scope(|scope| {
        let other =
            warden::frontend::spawn_scoped(scope, std::thread::Builder::new().name("warden-read".into()), || run(1, 2));
        let mine = run(0, 2);
        match other {
            Ok(handle) => {
                let theirs = handle.join().unwrap_or_else(|_| Err(std::io::Error::other("a reading thread panicked")));
                mine.and(theirs)
            }
            // No second thread: this one takes its pieces too.
            Err(_) => mine.and_then(|()| run(1, 2)),
        }
    })
}

/// Copies `local.len()` bytes at `remote` in process `pid` into `local`.
fn read_one(pid: i32, mut remote: usize, mut local: &mut [u8]) -> std::io::Result<()> {
    while !local.is_empty() {
        let len = local.len();
        let mut slices = [IoSliceMut::new(local)];
        let remote_iov = [libc::iovec { iov_base: remote as *mut libc::c_void, iov_len: len }];
        // SAFETY: the local iovec is the writable slice borrowed above (an
        // `IoSliceMut` has the layout of an `iovec`); the remote one is only
        // read by the kernel, in the other process, with its checks.
        let n = unsafe {
            libc::process_vm_readv(pid, slices.as_mut_ptr().cast::<libc::iovec>(), 1, remote_iov.as_ptr(), 1, 0)
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        local = std::mem::take(&mut local).get_mut(n..).unwrap_or_default();
        remote += n;
    }
    Ok(())
}
