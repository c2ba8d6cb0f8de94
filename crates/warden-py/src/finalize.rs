//! Python callbacks on the core's finalizer service ([`warden::finalize`]).
//!
//! `register_finalizer(callback, priority, label)` registers a
//! zero-argument Python callable and returns a `FinalizerToken`. Everything
//! else (what the callable does, how errors are reported, the `weakref` that
//! schedules it when an object dies) is in `python/warden/_finalize.py`.
//!
//! # The GIL
//!
//! * A callback attaches to the interpreter for exactly one call, on whatever
//!   thread runs it (the finalizer thread, or the caller of `run_now`), and
//!   only if the interpreter is neither uninitialized nor finalizing
//!   ([`Python::try_attach`], and [`interpreter_usable`] as the service's
//!   [`Host`]). A callback refused that way is leaked, never dropped without
//!   the GIL: [`PyCallback`] owns the callable and decides in its `Drop`.
//! * Waits on the finalizer thread (`run_exit_finalizers`, `wait_finalizers_idle`)
//!   release the GIL, so that the callbacks they wait for can take it.
//!
//! # Failures
//!
//! The Python side catches and reports what a callback raises, and returns
//! `False` for it. The callback then ends with [`resume_unwind`], which the
//! service catches and counts as failed (a pool worker's `Goodbye` reports the
//! count) without calling the panic hook, so nothing else is printed.
//!
//! Incidents only the core sees (a callback refused because the interpreter is
//! finalizing, skipped or abandoned at the exit deadline) are written to
//! stderr by the sink installed with [`install_sink`].

use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::panic::resume_unwind;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use warden::finalize::{Callback, Finalizer, Host, Incident, State, Token};

use crate::convert::{seconds, wait_seconds, Text};

/// How long a wait sleeps at a time before it looks for signals (Ctrl-C).
const SLICE: Duration = Duration::from_millis(50);

type IsFinalizing = unsafe extern "C" fn() -> c_int;

/// `Py_IsFinalizing` (3.13+) or `_Py_IsFinalizing` (before), looked up at run
/// time so that one build works with either.
fn is_finalizing_fn() -> Option<IsFinalizing> {
    static FN: OnceLock<Option<IsFinalizing>> = OnceLock::new();
    *FN.get_or_init(|| {
        for name in [c"Py_IsFinalizing", c"_Py_IsFinalizing"] {
            // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the
            // objects already loaded, which include the interpreter.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            if !p.is_null() {
                // SAFETY: both symbols are `int (*)(void)` functions of the C API.
                return Some(unsafe { std::mem::transmute::<*mut c_void, IsFinalizing>(p) });
            }
        }
        None
    })
}

/// Whether a thread may attach to the interpreter: it is initialized and has
/// not begun finalizing. Callable without the GIL.
pub fn interpreter_usable() -> bool {
    // SAFETY: both functions only read the runtime's state; they need no GIL.
    unsafe { pyo3::ffi::Py_IsInitialized() != 0 && is_finalizing_fn().is_none_or(|f| f() == 0) }
}

/// A Python callable owned by the finalizer service. Dropped with the GIL if
/// the interpreter can still be attached to, leaked otherwise.
struct PyCallback(ManuallyDrop<Py<PyAny>>);

impl PyCallback {
    /// Calls it, attached for just this call. `None` if the interpreter could
    /// not be attached to (the callable is leaked); else whether it succeeded.
    fn call(self) -> Option<bool> {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the callable is taken once, here.
        let func = ManuallyDrop::new(unsafe { ManuallyDrop::take(&mut this.0) });
        if !interpreter_usable() {
            return None;
        }
        // If try_attach does not run the closure, `func` is dropped with it:
        // as a ManuallyDrop, that leaks the callable.
        Python::try_attach(move |py| {
            let func = ManuallyDrop::into_inner(func);
            let ok = match func.call0(py) {
                Ok(v) => v.is_truthy(py).unwrap_or(false),
                Err(e) => {
                    e.write_unraisable(py, Some(func.bind(py)));
                    false
                }
            };
            drop(func);
            ok
        })
    }
}

impl Drop for PyCallback {
    fn drop(&mut self) {
        // SAFETY: the callable is taken once, here (`call` never drops `self`).
        let func = ManuallyDrop::new(unsafe { ManuallyDrop::take(&mut self.0) });
        if interpreter_usable() {
            let _ = Python::try_attach(move |_py| drop(ManuallyDrop::into_inner(func)));
        }
    }
}

/// The interpreter, as the [`Host`] of every Python callback.
struct Interpreter;

impl Host for Interpreter {
    fn admit(&self) -> bool {
        interpreter_usable()
    }

    fn discard(&self, callback: Callback) {
        if interpreter_usable() {
            drop(callback);
        } else {
            std::mem::forget(callback);
        }
    }
}

fn host() -> Arc<dyn Host> {
    static HOST: OnceLock<Arc<dyn Host>> = OnceLock::new();
    Arc::clone(HOST.get_or_init(|| Arc::new(Interpreter)))
}

/// Payload of the unwind that marks a callback that raised (see module docs).
struct Raised;

/// Writes the incidents the Python side cannot see to stderr. Panics are not
/// written: a Python callback's error was already reported with its traceback.
pub fn install_sink() {
    warden::finalize::set_sink(Some(Arc::new(|incident: &Incident| {
        if !matches!(incident, Incident::Panicked { .. }) {
            report!("warden: {incident}");
        }
    })));
}

/// One registration with the finalizer service; see `warden::finalize::Token`.
#[pyclass(module = "warden._warden", name = "FinalizerToken", frozen)]
pub struct FinalizerToken {
    token: Token,
}

#[pymethods]
impl FinalizerToken {
    /// Runs the callback now, on this thread, unless it already ran, started
    /// or was cancelled. Returns whether this call ran it.
    fn run_now(&self) -> bool {
        self.token.run_now()
    }

    /// Asks the finalizer thread to run the callback soon; returns at once.
    fn schedule(&self) -> bool {
        self.token.schedule()
    }

    /// Cancels the callback if it has not started.
    fn cancel(&self) -> bool {
        self.token.cancel()
    }

    fn is_pending(&self) -> bool {
        self.token.is_pending()
    }

    #[getter]
    fn priority(&self) -> i32 {
        self.token.priority()
    }

    #[getter]
    fn at_exit(&self) -> bool {
        self.token.at_exit()
    }

    fn set_at_exit(&self, at_exit: bool) {
        self.token.set_at_exit(at_exit);
    }

    fn __repr__(&self) -> String {
        format!(
            "<FinalizerToken {} priority={} {}>",
            self.token.label(),
            self.token.priority(),
            state_name(&self.token)
        )
    }
}

/// Registers `callback()` with this process's finalizer service. Raises
/// `RuntimeError` once the process's exit finalizers have run.
#[pyfunction]
#[pyo3(signature = (callback, priority = 0, label = None))]
pub fn register_finalizer(callback: Py<PyAny>, priority: i32, label: Option<Text>) -> PyResult<FinalizerToken> {
    let func = PyCallback(ManuallyDrop::new(callback));
    let run: Callback = Box::new(move || {
        if func.call() == Some(false) {
            resume_unwind(Box::new(Raised));
        }
    });
    let mut f = Finalizer::from_box(run).priority(priority).host(host());
    if let Some(Text(label)) = label {
        f = f.label(label);
    }
    let token = f.register().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    Ok(FinalizerToken { token })
}

/// Runs the process's remaining exit finalizers on the finalizer thread, with
/// the GIL released. The
/// deadline defaults to the service's exit timeout. Idempotent.
#[pyfunction]
#[pyo3(signature = (timeout = None))]
pub fn run_exit_finalizers(py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
    let timeout = seconds("timeout", timeout)?.unwrap_or_else(warden::finalize::exit_timeout);
    py.detach(|| warden::finalize::run_exit_finalizers(timeout));
    Ok(())
}

/// Waits, with the GIL released, until the finalizer thread has run every
/// callback scheduled so far. Returns whether it did within `timeout` (`False`
/// at once on the finalizer thread). Ctrl-C interrupts the wait.
#[pyfunction]
#[pyo3(signature = (timeout = None))]
pub fn wait_finalizers_idle(py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
    let deadline = wait_seconds(timeout)?.and_then(|t| Instant::now().checked_add(t));
    if warden::finalize::is_finalizer_thread() {
        return Ok(false);
    }
    loop {
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            None => SLICE,
        };
        if py.detach(|| warden::finalize::wait_idle(slice)) {
            return Ok(true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        py.check_signals()?;
    }
}

/// "pending", "running", "done" or "cancelled".
fn state_name(token: &Token) -> &'static str {
    match token.state() {
        State::Pending => "pending",
        State::Running => "running",
        State::Done => "done",
        _ => "cancelled",
    }
}
