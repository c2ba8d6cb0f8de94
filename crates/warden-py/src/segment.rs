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
//!   copy's destination is populated in one call first ([`populate`]).

use std::ffi::c_int;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// The bytes exposed.
    len: usize,
    /// The bytes mapped (at least `len`).
    mapped: usize,
    /// An anonymous mapping that may be kept as a spare when dropped.
    spare: bool,
    /// The size of the largest buffer it holds (0: unknown), against which
    /// [`SegmentBuffer::alone`] weighs one buffer.
    largest: AtomicUsize,
}

// SAFETY: the mapping is private to this process and lives exactly as long as
// this object; Python accesses it through the buffer protocol only.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.spare && spares::keep(self.ptr.as_ptr() as usize, self.mapped) {
            return;
        }
        // SAFETY: `ptr` is a live mapping of `mapped` bytes made by this
        // module; no buffer view refers to it any more (each holds a
        // reference to us).
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.as_ptr().cast(), self.mapped);
        }
    }
}

/// Spare destinations: anonymous mappings of buffers read from another
/// process that were dropped, kept for the next read of about the same size.
///
/// A fresh mapping costs the kernel a zeroed page per 4 KiB (about 35–50 ms
/// per 64 MiB here); a spare's pages are still there, so a program that
/// receives large arrays in a loop copies into memory it already has. A
/// spare is handed to the kernel with `MADV_FREE`: it may take the pages
/// back whenever it needs memory (the next read then faults them in again,
/// zeroed), and until then they cost nothing to reuse. At most
/// `WARDEN_SPARE_BYTES` bytes (default 256 MiB, 0 keeps none) are kept per
/// process; a spare is only used for a read between half its size and its
/// size. A worker of a pool with a memory cap keeps none ([`keep_no_spares`]):
/// until the kernel takes them back, a spare's pages are resident, and would
/// count against the cap as if the task that read them still held them.
mod spares {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock};

    static SPARES: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    static NONE: AtomicBool = AtomicBool::new(false);

    fn limit() -> usize {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        if NONE.load(Ordering::Relaxed) {
            return 0;
        }
        *LIMIT.get_or_init(|| {
            std::env::var("WARDEN_SPARE_BYTES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(256 << 20)
        })
    }

    /// Keeps no spares from now on, and unmaps those kept.
    pub fn keep_none() {
        NONE.store(true, Ordering::Relaxed);
        let held = match SPARES.lock() {
            Ok(mut spares) => std::mem::take(&mut *spares),
            Err(_) => return,
        };
        for (addr, len) in held {
            // SAFETY: a spare is a mapping of ours that nothing refers to.
            let _ = unsafe { rustix::mm::munmap(addr as *mut _, len) };
        }
    }

    /// Keeps the mapping `[addr, addr + len)` as a spare, if there is room.
    pub fn keep(addr: usize, len: usize) -> bool {
        let Ok(mut spares) = SPARES.lock() else { return false };
        let held: usize = spares.iter().map(|&(_, n)| n).sum();
        if held.saturating_add(len) > limit() {
            return false;
        }
        // SAFETY: the caller's own mapping, no longer referred to; MADV_FREE
        // lets the kernel drop its pages (they then read as zeros).
        let _ = unsafe { rustix::mm::madvise(addr as *mut _, len, rustix::mm::Advice::LinuxFree) };
        spares.push((addr, len));
        true
    }

    /// A spare of between `len` and twice `len` bytes (the smallest), taken.
    pub fn take(len: usize) -> Option<(usize, usize)> {
        let mut spares = SPARES.lock().ok()?;
        let best = spares
            .iter()
            .enumerate()
            .filter(|&(_, &(_, n))| n >= len && n / 2 <= len)
            .min_by_key(|&(_, &(_, n))| n)
            .map(|(i, _)| i)?;
        Some(spares.swap_remove(best))
    }
}

/// Keeps no spare destinations in this process from now on (a worker of a
/// pool with `memory_limit` or `max_memory_per_child`), and unmaps those kept.
#[pyfunction]
pub fn keep_no_spares() {
    spares::keep_none();
}

#[pymethods]
impl Segment {
    fn __len__(&self) -> usize {
        self.len
    }

    /// Says how large the largest buffer it holds is.
    fn set_largest_buffer(&self, size: usize) {
        self.largest.store(size, Ordering::Relaxed);
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

/// One buffer of a [`Segment`]: exports exactly its bytes (writable, as the
/// mapping is) through the buffer protocol, and keeps the mapping alive.
///
/// This, not a `memoryview` slice of the segment, is what the unpickler gets
/// for an out-of-band buffer: a reconstructor that looks through its
/// argument to the exporter (`memoryview(buf).obj`, as the `pickle` docs'
/// `ZeroCopyByteArray` does) finds an object of exactly the buffer's size,
/// as it finds the `bytearray` the standard library sends in band, and not
/// the whole segment with its table.
#[pyclass(module = "warden._warden", name = "SegmentBuffer", frozen)]
pub struct SegmentBuffer {
    segment: Py<Segment>,
    offset: usize,
    len: usize,
}

#[pymethods]
impl SegmentBuffer {
    /// Bytes `[offset, offset + length)` of `segment`; `ValueError` if they
    /// do not lie inside it.
    #[new]
    pub fn new(segment: Py<Segment>, offset: usize, length: usize) -> PyResult<Self> {
        let inside = offset.checked_add(length).is_some_and(|end| end <= segment.get().len);
        if !inside {
            return Err(PyValueError::new_err(format!(
                "bytes {offset}..+{length} lie outside a segment of {} bytes",
                segment.get().len
            )));
        }
        Ok(SegmentBuffer { segment, offset, len: length })
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// This buffer, or, if it is small (at most [`ALONE_MAX`], or a
    /// [`ALONE_SHARE`]th of the largest) beside one at least
    /// [`ALONE_BESIDE`] times its size in the same segment, a copy of it on
    /// a mapping of its own ([`Segment::anonymous`]): what an array received
    /// beside a much larger one is built on, so that keeping it (the small
    /// one of `return big, small`) does not keep the large one's memory too.
    /// Buffers of similar sizes (a chunk of a `map`) stay on the segment,
    /// uncopied.
    fn alone(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let py = slf.py();
        let (from, len) = {
            let me = slf.get();
            let largest = me.segment.get().largest.load(Ordering::Relaxed);
            if me.len > ALONE_MAX.max(largest / ALONE_SHARE) || me.len.saturating_mul(ALONE_BESIDE) > largest {
                return Ok(slf);
            }
            // SAFETY: `offset + len` was checked against the segment's
            // length at construction, and the mapping lives as long as `me`.
            (unsafe { me.segment.get().ptr.as_ptr().add(me.offset) } as usize, me.len)
        };
        let copy = Segment::anonymous(len)?;
        let to = copy.as_mut_ptr() as usize;
        py.detach(|| {
            if len >= POPULATE_FROM {
                populate(to as *mut u8, len);
            }
            // SAFETY: `to` is the fresh mapping of at least `len` bytes made
            // above, seen by no one else yet; `from` lies in another mapping,
            // kept alive by `slf`.
            unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
        });
        Bound::new(py, SegmentBuffer::new(Py::new(py, copy)?, 0, len)?)
    }

    /// The segment (the mapping) this buffer lies in, which it keeps alive.
    #[getter]
    fn segment(&self, py: Python<'_>) -> Py<Segment> {
        self.segment.clone_ref(py)
    }

    /// Exposes the buffer's bytes, writable.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            // SAFETY: `offset + len` was checked against the segment's length
            // at construction, and the segment's mapping never changes.
            (unsafe { me.segment.get().ptr.as_ptr().add(me.offset) }, me.len)
        };
        let len = ffi::Py_ssize_t::try_from(len).map_err(|_| PyValueError::new_err("buffer too large"))?;
        // SAFETY: the view points into the segment's live mapping; the view
        // holds a reference to `slf`, which holds the segment.
        let ret = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) };
        if ret == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

impl Segment {
    /// A private anonymous mapping of `len` bytes (at least one): a spare
    /// one if there is one of about that size (see `spares`), else a fresh
    /// one (which the caller populates as it fills it). The destination of
    /// buffers read from another process (`remote::read_remote`).
    pub fn anonymous(len: usize) -> PyResult<Segment> {
        if len >= POPULATE_FROM {
            if let Some((addr, mapped)) = spares::take(len) {
                if let Some(ptr) = NonNull::new(addr as *mut u8) {
                    return Ok(Segment { ptr, len, mapped, spare: true, largest: AtomicUsize::new(0) });
                }
            }
        }
        let mapped = len.max(1);
        // SAFETY: a fresh anonymous private mapping chosen by the kernel.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                mapped,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| pyo3::exceptions::PyMemoryError::new_err(format!("cannot map {len} bytes: {e}")))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| PyValueError::new_err("mmap returned null"))?;
        // Only mappings a later read may take are worth keeping.
        Ok(Segment { ptr, len, mapped, spare: len >= POPULATE_FROM, largest: AtomicUsize::new(0) })
    }

    /// Where the mapping starts.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
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
    Ok(Segment { ptr, len: size, mapped: size, spare: false, largest: AtomicUsize::new(0) })
}

/// A buffer of at most [`ALONE_MAX`] bytes (or [`ALONE_SHARE`]th of the largest)
/// beside one this many times its size is copied out of its segment before
/// an array is built on it ([`SegmentBuffer::alone`]).
const ALONE_BESIDE: usize = 4;
/// The largest buffer [`SegmentBuffer::alone`] copies whatever its
/// neighbours' sizes (a millisecond's copy).
const ALONE_MAX: usize = 4 << 20;
/// Or up to this fraction of the largest buffer beside it.
const ALONE_SHARE: usize = 16;

/// Fresh destinations of at least this many bytes are populated before a
/// copy into them (see [`populate`]).
pub const POPULATE_FROM: usize = 4 << 20;

/// Asks the kernel to allocate every page of `[ptr, ptr + len)` now, in one
/// call (`MADV_POPULATE_WRITE`), instead of one page fault per 4 KiB during
/// the copy that follows: on this project's machines a fresh 64 MiB then
/// costs about 35 ms instead of 50. Best effort: before Linux 5.14 the
/// advice is refused and the copy faults the pages in as before.
///
/// Transparent huge pages were tried instead and left: a fresh 64 MiB in
/// huge pages took 13 ms when the kernel handed out recently used memory,
/// but 200–300 ms when it handed out memory the hypervisor had to back
/// first, which on a virtual machine happens about every other time.
pub fn populate(ptr: *mut u8, len: usize) {
    let page = rustix::param::page_size();
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + len) / page * page;
    if end > start {
        // SAFETY: `[start, end)` lies inside the caller's fresh allocation;
        // populating it only allocates pages that a write would allocate.
        let _ = unsafe { rustix::mm::madvise(start as *mut _, end - start, rustix::mm::Advice::LinuxPopulateWrite) };
    }
}

/// Copies `src` into a new, uninitialised object made by `make` (a `bytes`
/// or `bytearray` constructor taking a null pointer and a size), whose
/// storage `data` returns. Large copies go into populated pages and run
/// without the GIL (the new object is nobody else's yet; `src` stays exported).
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
        if len >= POPULATE_FROM {
            populate(to as *mut u8, len);
        }
        // SAFETY: `from` is the exported buffer's memory (held by `buffer`
        // until after the copy), `to` the new object's storage; both are
        // `len` bytes and distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
    };
    if len >= POPULATE_FROM {
        py.detach(copy);
    } else {
        copy();
    }
    drop(buffer);
    Ok(obj.unbind())
}

/// `bytes(buffer)` for a contiguous buffer of bytes, large copies into
/// populated memory (see the module's caveats).
#[pyfunction]
pub fn copy_to_bytes(buffer: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    copy_into(buffer, ffi::PyBytes_FromStringAndSize, ffi::PyBytes_AsString)
}

/// `bytearray(buffer)` for a contiguous buffer of bytes, as [`copy_to_bytes`].
#[pyfunction]
pub fn copy_to_bytearray(buffer: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    copy_into(buffer, new_bytearray, ffi::PyByteArray_AsString)
}

/// `PyByteArray_FromStringAndSize(NULL, size)`, made empty and then grown:
/// where that call cannot allocate (CPython 3.11, `ulimit -v`), it frees
/// the new object before setting its export count, which then reads as
/// garbage and prints a `SystemError` ("deallocated bytearray object has
/// exported buffers") beside the `MemoryError`. Resizing fails cleanly.
unsafe extern "C" fn new_bytearray(src: *const std::ffi::c_char, size: ffi::Py_ssize_t) -> *mut ffi::PyObject {
    debug_assert!(src.is_null(), "only an uninitialised bytearray is made here");
    // SAFETY: an empty bytearray needs no storage; the caller holds the GIL.
    let obj = unsafe { ffi::PyByteArray_FromStringAndSize(std::ptr::null(), 0) };
    // SAFETY: `obj` is the bytearray just made, not shared with anyone yet.
    if !obj.is_null() && unsafe { ffi::PyByteArray_Resize(obj, size) } != 0 {
        // SAFETY: our only reference; its export count is 0.
        unsafe { ffi::Py_DECREF(obj) };
        return std::ptr::null_mut();
    }
    obj
}
