//! Conversions of plain values from Python.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// Takes ownership of an fd number Python hands over (at least `min`: 0, or 3
/// for fds that must not be stdio). `ValueError` if it is not open.
pub fn take_fd(what: &str, fd: RawFd, min: RawFd) -> PyResult<OwnedFd> {
    if fd < min || !fd_is_open(fd) {
        return Err(PyValueError::new_err(format!(
            "{what}: {fd} is not an open fd{}",
            if min > 0 { " above stdio" } else { "" }
        )));
    }
    // SAFETY: the fd is open (checked above) and the caller hands it over.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is an open fd of this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on a number only reads the fd table; the borrow ends here.
    fd >= 0 && rustix::io::fcntl_getfd(unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) }).is_ok()
}

/// How long a wait may last, from Python: `None` stays `None` (for ever); a
/// negative number is no wait at all, as the standard library's waits
/// (`Process.join(-1)`, `Event.wait(-1)`) take it. NaN is an error.
pub fn wait_seconds(secs: Option<f64>) -> PyResult<Option<Duration>> {
    seconds("timeout", secs.map(|s| if s < 0.0 { 0.0 } else { s }))
}

/// A number of seconds from Python as a duration; `None` stays `None`. One
/// too long for a `Duration` (`float("inf")`, `1e20`) is
/// [`warden::LONGEST_WAIT`], as is anything longer: no limit, in effect.
pub fn seconds(what: &str, secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| {
        if s.is_nan() || s < 0.0 {
            return Err(PyValueError::new_err(format!("{what} must be a non-negative number of seconds, not {s}")));
        }
        Ok(Duration::try_from_secs_f64(s).map_or(warden::LONGEST_WAIT, |d| d.min(warden::LONGEST_WAIT)))
    })
    .transpose()
}

/// Text from Python for the core (a failure's message and traceback, a
/// pool's name), which holds UTF-8: a lone surrogate (`os.fsdecode` of a
/// name that is not UTF-8, a `surrogateescape`d argument) is written as its
/// `\udcXX` escape, as Python prints it, instead of failing the conversion.
pub struct Text(pub String);

impl<'a, 'py> FromPyObject<'a, 'py> for Text {
    type Error = PyErr;

    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let s = ob.cast::<PyString>()?;
        match s.to_str() {
            Ok(text) => Ok(Text(text.to_owned())),
            Err(_) => {
                let escaped = s.call_method1("encode", ("utf-8", "backslashreplace"))?;
                let bytes = escaped.cast::<PyBytes>()?;
                Ok(Text(String::from_utf8_lossy(bytes.as_bytes()).into_owned()))
            }
        }
    }
}
