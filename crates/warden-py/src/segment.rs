//! `Segment`: a shared segment received from another process, mapped.
//!
//! Large buffers of a task's call or result travel in a sealed `memfd` passed
//! over the worker channel (see `python/warden/_oob.py` for the layout).
//! [`map_segment`] checks what arrived and maps it copy-on-write
//! (`MAP_PRIVATE`), closes the fd, and returns a [`Segment`] that exposes the
//! mapping through the buffer protocol: numpy arrays and `memoryview`s built
//! on it keep it alive, and it is unmapped when the last of them goes.
//!
//! Unlike Python's `mmap.mmap`, which keeps a duplicate of the fd open for as
//! long as the mapping lives, a `Segment` holds no fd: a thousand arrays
//! received and kept cost a thousand mappings, not a thousand open files.
//!
//! # Caveats
//!
//! * The segment must be sealed against shrinking (and writing): a file that
//!   shrank under the mapping would make reading it kill this process with
//!   SIGBUS. Unsealed segments are refused.
//! * `bytes` and `bytearray` own their memory in CPython, so they are copied
//!   out of the mapping ([`copy_to_bytes`], [`copy_to_bytearray`]). A large
//!   copy's destination is advised for transparent huge pages
//!   (`MADV_HUGEPAGE`); where THP is off (`never`), the advice does nothing
//!   and the copy costs a page fault per 4 KiB, as before.

use std::ffi::c_int;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};

use crate::convert::take_fd;

/// A private, writable mapping of a received segment. See the module documentation.
#[pyclass(module = "warden._warden", name = "Segment", frozen)]
pub struct Segment {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is private to this process and lives exactly as long as
// this object; Python accesses it through the buffer protocol only.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a live mapping of `len` bytes made by `map_segment`;
        // no buffer view refers to it any more (each holds a reference to us).
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[pymethods]
impl Segment {
    fn __len__(&self) -> usize {
        self.len
    }

    /// Exposes the mapping as a writable buffer of bytes.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            (me.ptr.as_ptr(), me.len)
        };
        let len = ffi::Py_ssize_t::try_from(len).map_err(|_| PyValueError::new_err("segment too large"))?;
        // SAFETY: the view points into our live mapping; PyBuffer_FillInfo
        // takes a reference to `slf`, which keeps the mapping alive until the
        // view is released.
        let ret = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if ret == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Takes ownership of `fd`, a segment received from another process, and
/// maps it. Raises `ValueError` if it is not a sealed memory file of at least
/// `min` and at most `max` bytes; the fd is closed in every case.
#[pyfunction]
pub fn map_segment(fd: RawFd, min: usize, max: usize) -> PyResult<Segment> {
    // Dropped (closed) on return: the mapping does not need it.
    let fd = take_fd("segment", fd, 0)?;
    let seals = rustix::fs::fcntl_get_seals(&fd)
        .map_err(|e| PyValueError::new_err(format!("the shared segment is not a sealable memory file: {e}")))?;
    if !seals.contains(SealFlags::SHRINK | SealFlags::WRITE) {
        return Err(PyValueError::new_err("the shared segment is not sealed against shrinking and writing"));
    }
    let size = rustix::fs::fstat(&fd)
        .map_err(|e| PyValueError::new_err(format!("cannot stat the shared segment: {e}")))?
        .st_size;
    let size = usize::try_from(size).map_err(|_| PyValueError::new_err("the shared segment has a negative size"))?;
    if size > max {
        return Err(PyValueError::new_err(format!(
            "a shared segment of {size} bytes exceeds the limit of {max} bytes"
        )));
    }
    if size < min.max(1) {
        return Err(PyValueError::new_err(format!("a shared segment of {size} bytes is too small")));
    }
    // SAFETY: a fresh private mapping chosen by the kernel; the file is sealed
    // against shrinking, so every mapped page stays backed.
    let ptr = unsafe {
        rustix::mm::mmap(std::ptr::null_mut(), size, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE, &fd, 0)
    }
    .map_err(|e| PyValueError::new_err(format!("cannot map the shared segment: {e}")))?;
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| PyValueError::new_err("mmap returned null"))?;
    Ok(Segment { ptr, len: size })
}

/// Copies of at least this many bytes go into memory advised for
/// transparent huge pages.
const HUGE_COPY: usize = 4 << 20;
/// The size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole huge pages inside `[ptr, ptr + len)`
/// with transparent huge pages when they are first touched: a fresh 64 MiB
/// buffer then costs 32 page faults instead of 16 384, which is most of the
/// time of a copy into it. Advice only: without THP (or with it turned off)
/// nothing changes.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end > start {
        // SAFETY: `[start, end)` lies inside the caller's allocation; the
        // advice changes how pages are backed, never their contents.
        let _ = unsafe { rustix::mm::madvise(start as *mut _, end - start, rustix::mm::Advice::LinuxHugepage) };
    }
}

/// Copies `src` into a new, uninitialised object made by `make` (a `bytes`
/// or `bytearray` constructor taking a null pointer and a size), whose
/// storage `data` returns. Large copies go into huge pages and run without
/// the GIL (the new object is nobody else's yet; `src` stays exported).
fn copy_into(
    src: &Bound<'_, PyAny>,
    make: unsafe extern "C" fn(*const std::ffi::c_char, ffi::Py_ssize_t) -> *mut ffi::PyObject,
    data: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut std::ffi::c_char,
) -> PyResult<Py<PyAny>> {
    let py = src.py();
    let buffer = pyo3::buffer::PyBuffer::<u8>::get(src)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    let len = buffer.len_bytes();
    let size = ffi::Py_ssize_t::try_from(len).map_err(|_| PyValueError::new_err("buffer too large"))?;
    // SAFETY: a null source asks for an uninitialised object of `size` bytes,
    // which is filled below before anyone else can see it.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, make(std::ptr::null(), size))? };
    // SAFETY: `obj` is the object just made; its storage holds `len` bytes.
    let dst = unsafe { data(obj.as_ptr()) }.cast::<u8>();
    if dst.is_null() {
        return Err(PyErr::fetch(py));
    }
    let (from, to) = (buffer.buf_ptr() as usize, dst as usize);
    let copy = move || {
        if len >= HUGE_COPY {
            advise_huge_pages(to as *mut u8, len);
        }
        // SAFETY: `from` is the exported buffer's memory (held by `buffer`
        // until after the copy), `to` the new object's storage; both are
        // `len` bytes and distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
    };
    if len >= HUGE_COPY {
        py.detach(copy);
    } else {
        copy();
    }
    drop(buffer);
    Ok(obj.unbind())
}

/// `bytes(buffer)` for a contiguous buffer of bytes, large copies into
/// memory advised for huge pages (see the module's caveats).
#[pyfunction]
pub fn copy_to_bytes(buffer: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    copy_into(buffer, ffi::PyBytes_FromStringAndSize, ffi::PyBytes_AsString)
}

/// `bytearray(buffer)` for a contiguous buffer of bytes, as [`copy_to_bytes`].
#[pyfunction]
pub fn copy_to_bytearray(buffer: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    copy_into(buffer, ffi::PyByteArray_FromStringAndSize, ffi::PyByteArray_AsString)
}
