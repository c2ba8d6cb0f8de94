//! Substring search over a buffer, for the receiver's check whether a pickle
//! may name something that needs a custom unpickler (see `unpickle` in
//! `python/warden/_oob.py`).
//!
//! `re` and `bytes.find` scan a large pickle (a long `str` argument, say) at
//! about 1.5 GB/s for each literal; `memchr::memmem` runs the same search
//! with SIMD at several times that, and without the GIL for a large buffer.

use memchr::memmem;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Above this many bytes the search runs without the GIL.
const DETACH_AT: usize = 1 << 20;

/// Whether the contiguous buffer `data` (`bytes`, `memoryview`, ...) holds
/// any of `needles` as a substring.
#[pyfunction]
pub fn contains_any(py: Python<'_>, data: &Bound<'_, PyAny>, needles: Vec<Vec<u8>>) -> PyResult<bool> {
    let buffer = pyo3::buffer::PyBuffer::<u8>::get(data)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    let len = buffer.len_bytes();
    if len == 0 {
        return Ok(needles.iter().any(Vec::is_empty));
    }
    // SAFETY: `buffer` holds an export of `data` for as long as it lives,
    // which keeps the memory alive and unmoved; it is C-contiguous of `len`
    // bytes (checked above), and only read here.
    let bytes = unsafe { std::slice::from_raw_parts(buffer.buf_ptr().cast::<u8>(), len) };
    let search = || needles.iter().any(|needle| memmem::find(bytes, needle).is_some());
    if len >= DETACH_AT {
        // The export pins the memory; a writer elsewhere could change what
        // is read meanwhile, which only changes the answer, as it would
        // with the GIL held between two calls.
        Ok(py.detach(search))
    } else {
        Ok(search())
    }
}
