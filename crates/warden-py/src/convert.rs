//! Conversions of plain values from Python.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A number of seconds from Python as a duration; `None` stays `None`.
pub fn seconds(what: &str, secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| PyValueError::new_err(format!("{what} must be a non-negative number of seconds, not {s}")))
    })
    .transpose()
}
