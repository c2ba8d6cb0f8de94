//! The worker side: `worker_main` runs the core's worker loop with a handler
//! that calls into a Python object (`warden._workerloop.Handler`).
//!
//! The core's loop runs with the GIL released; each call into Python (`init`,
//! `run`, `exit`) attaches for its duration. The Python object's contract:
//!
//! * `init(worker, pid, parent, payload)` returns `None` when the worker is
//!   ready, or a `RemoteFailure` saying why it cannot start;
//! * `run(payload, segment)` returns the result's bytes, or `(bytes, fd)`
//!   when the result's large buffers travel beside it (the fd of a shared
//!   segment, or of a table of lent buffers: see `python/warden/_oob.py`), or a
//!   `RemoteFailure`. `payload` is a read-only `memoryview` of the frame in
//!   the core's buffer (no copy), valid only during the call: it is released
//!   when `run` returns, and a worker whose handler kept it exported aborts
//!   rather than let Python read reused memory. `segment` is the fd that
//!   carries the call's large buffers, or `None`; Python owns it (and the fd it returns
//!   is the core's from then on);
//! * `exit(reason)` runs the exit path of the Python side and returns
//!   `(error or None, exit code or None)`; it is installed as the core's exit
//!   hook once `init` succeeded, and may be called on the monitor thread.
//!
//! # Stopping a running task
//!
//! The Python side installs its own SIGTERM/SIGINT/SIGHUP handler before
//! calling `worker_main`; the core's handlers chain to it, so the interpreter
//! runs it on the main thread and it raises inside the task. The core's
//! monitor also calls the interrupter below, which re-sends SIGTERM to the main
//! thread (by its kernel thread id, which is right in a zygote-forked worker
//! too): a task blocked in a system call there (sleep, read) then returns with
//! `EINTR` and the interpreter gets to run the handler, even if the
//! original signal was delivered to another thread.

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PySystemExit, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use warden::frontend::{ExitHook, ExitHookOutcome, Handler, Interrupter, WorkerEnv, EXIT_PROTOCOL};
use warden::WorkerInfo;
use warden::{ExitReason, RemoteError, RemoteErrorKind};

use crate::convert::{take_fd, Text};
use crate::records::{exit_reason, RemoteFailure};

/// Runs this process as a worker of the pool that started it, with `handler`
/// running the tasks. `variables` holds the worker variables
/// (`warden::frontend::WORKER_VARIABLES`), which the caller has already removed from the
/// environment with the interpreter's own API (`os.environ.pop`): this
/// function never changes the C environment, which is unsafe once the
/// interpreter may have threads. Never returns when started by a pool: the
/// process ends through the core's exit path. Raises `RuntimeError` otherwise.
#[pyfunction]
pub fn worker_main(py: Python<'_>, handler: Py<PyAny>, variables: HashMap<String, String>) -> PyResult<()> {
    let forked = crate::zygote::take_forked().map(Ok);
    let env = match forked.or_else(|| WorkerEnv::from_vars(|key| variables.get(key).cloned())) {
        None => return Err(PyRuntimeError::new_err("this process was not started by a warden pool")),
        Some(Err(msg)) => {
            report!("warden: bad worker environment: {msg}");
            std::process::exit(EXIT_PROTOCOL);
        }
        Some(Ok(env)) => env,
    };
    // The main thread by its kernel id, not its pthread_t: in a worker forked
    // by a zygote, glibc's cached id of this thread is the zygote's.
    let main_thread = rustix::thread::gettid().as_raw_nonzero().get();
    let handler = PyHandler { handler, main_thread, kept: None };
    let exit = py.detach(move || warden::frontend::serve(env, handler));
    flush_python_streams(py);
    exit.exit()
}

/// Sends the parent this worker's cleanup record (bytes for the pool's
/// `on_worker_lost` hook, should the worker die without its exit path).
/// Raises `RuntimeError` outside a worker or if the channel is gone.
#[pyfunction]
pub fn send_record(py: Python<'_>, data: &[u8]) -> PyResult<()> {
    py.detach(|| warden::set_cleanup_record(data))
        .map_err(|e| PyRuntimeError::new_err(format!("cannot send the cleanup record: {e}")))
}

/// Stops (`False`) or restarts (`True`) the pool's clock of the running
/// task, which waits before its work (for the parent to read what the last
/// result lent): its timeout counts from the restart (see
/// `warden::task_clock`). Raises `RuntimeError` outside a worker or if the
/// channel is gone.
#[pyfunction]
pub fn task_clock(py: Python<'_>, running: bool) -> PyResult<()> {
    py.detach(|| warden::task_clock(running))
        .map_err(|e| PyRuntimeError::new_err(format!("cannot tell the pool about the task's clock: {e}")))
}

/// `os.setsid()` for a worker or `Process` child, which leads its own
/// process group (see `warden::setsid`). Returns the new session's id;
/// raises `OSError(errno, strerror)` (`PermissionError` for `EPERM`), as
/// `os.setsid` does, where it fails.
#[pyfunction]
pub fn setsid() -> PyResult<i32> {
    match warden::setsid() {
        Ok(session) => Ok(session.as_raw_nonzero().get()),
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => {
                let text = std::io::Error::from_raw_os_error(code).to_string();
                let strerror = text.split(" (os error").next().unwrap_or(&text).to_string();
                pyo3::exceptions::PyOSError::new_err((code, strerror))
            }
            None => e.into(),
        }),
    }
}

/// Holds (`True`) or releases (`False`) the core's own exit after a stop
/// signal, while the worker's start enters its `worker_context`: an entered
/// context must reach the exit path that leaves it. The pool's grace period
/// still bounds the wait.
#[pyfunction]
pub fn hold_stops(held: bool) {
    warden::frontend::hold_stops(held);
}

/// How long, in seconds, this worker's core gives an interrupted task to
/// unwind before it runs the exit path beside it (half the pool's grace
/// period, at least half a second).
#[pyfunction]
pub fn unwind_grace() -> f64 {
    warden::frontend::unwind_grace().as_secs_f64()
}

/// Records stop signal `signum`, which the worker's Python handler received
/// while the core's handlers did not (a task put the interpreter's handler
/// back in their place): the worker stops as for any stop signal.
#[pyfunction]
pub fn record_stop_signal(signum: i32) {
    warden::frontend::record_stop_signal(signum);
}

/// Whether the worker's SIGINT handler runs without a SIGINT having come:
/// `_thread.interrupt_main()` called by a task.
#[pyfunction]
pub fn sigint_without_a_signal(py: Python<'_>) -> bool {
    py.detach(warden::frontend::sigint_without_a_signal)
}

/// Sends SIGTERM again to this process's thread `tid` (a kernel thread id,
/// `threading.get_native_id()`): the stop the core delivered to the main
/// thread, asked for once more. By kernel id, as the core's own interrupter
/// does: in a worker forked by a zygote, `pthread_kill` would use glibc's
/// cached id of the zygote's thread.
#[pyfunction]
pub fn stop_thread_again(tid: i32) -> PyResult<()> {
    // SAFETY: getpid(2) and tgkill(2) with integers; a tid that is not a
    // thread of this process gets ESRCH, reported as an error.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGTERM) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Flushes `sys.stdout` and `sys.stderr`; errors are ignored (the process is ending).
pub(crate) fn flush_python_streams(py: Python<'_>) {
    if let Ok(sys) = py.import("sys") {
        for name in ["stdout", "stderr"] {
            if let Ok(stream) = sys.getattr(name) {
                if !stream.is_none() {
                    let _ = stream.call_method0("flush");
                }
            }
        }
    }
}

struct PyHandler {
    handler: Py<PyAny>,
    /// The main thread's kernel thread id.
    main_thread: libc::pid_t,
    /// The last task's return value, when `run` handed it over: released
    /// once its result has been sent (see `Handler::outcome_sent`).
    kept: Option<Py<PyAny>>,
}

/// A Python exception that escaped the handler (a bug on the Python side, or
/// an interrupt that arrived at an awkward moment) as a remote error.
fn remote_from_pyerr(py: Python<'_>, err: PyErr) -> RemoteError {
    let type_name = err.get_type(py).qualname().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into());
    let mut e = RemoteError::new(RemoteErrorKind::Raised, type_name, err.value(py).to_string());
    if let Some(tb) = err.traceback(py) {
        e.traceback = tb.format().unwrap_or_default();
    }
    e
}

fn outcome<T>(
    py: Python<'_>,
    result: PyResult<Bound<'_, PyAny>>,
    ok: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
) -> Result<T, RemoteError> {
    let value = result.map_err(|e| remote_from_pyerr(py, e))?;
    if let Ok(failure) = value.cast::<RemoteFailure>() {
        return Err(failure.get().to_core(py));
    }
    ok(&value).map_err(|e| remote_from_pyerr(py, e))
}

impl Handler for PyHandler {
    fn init(&mut self, info: &WorkerInfo, payload: &[u8]) -> Result<Option<ExitHook>, RemoteError> {
        Python::attach(|py| {
            let args = (info.worker, info.pid, info.parent, PyBytes::new(py, payload));
            let result = self.handler.bind(py).call_method1("init", args);
            outcome(py, result, |_| Ok(()))?;
            let handler = self.handler.clone_ref(py);
            let hook: ExitHook = Arc::new(move |reason: &ExitReason| run_exit_hook(&handler, reason));
            Ok(Some(hook))
        })
    }

    fn run(&mut self, payload: &[u8]) -> Result<Vec<u8>, RemoteError> {
        self.run_with_segment(payload, None).map(|(value, _)| value)
    }

    fn run_with_segment(
        &mut self,
        payload: &[u8],
        segment: Option<OwnedFd>,
    ) -> Result<(Vec<u8>, Option<OwnedFd>), RemoteError> {
        use std::os::fd::IntoRawFd;
        Python::attach(|py| {
            let view = match borrowed_view(py, payload) {
                Ok(view) => view,
                Err(e) => return Err(remote_from_pyerr(py, e)),
            };
            let fd = segment.map(IntoRawFd::into_raw_fd);
            let result = self.handler.bind(py).call_method1(intern!(py, "run"), (&view, fd));
            if view.call_method0(intern!(py, "release")).is_err() {
                report!("warden worker: the task handler kept its payload view exported; aborting");
                std::process::abort();
            }
            let kept = &mut self.kept;
            outcome(py, result, |value| {
                if let Ok(t) = value.cast::<PyTuple>() {
                    if t.len() != 3 {
                        return Err(PyTypeError::new_err(format!(
                            "run() returned a tuple of {} items, not (bytes, fd, value)",
                            t.len()
                        )));
                    }
                    // (bytes, fd or None, value to keep until sent): own the fd
                    // before anything else can fail.
                    let fd = match t.get_item(1)?.extract::<Option<RawFd>>()? {
                        Some(fd) => Some(take_fd("the result's segment", fd, 0)?),
                        None => None,
                    };
                    let data = t.get_item(0)?.cast::<PyBytes>()?.as_bytes().to_vec();
                    *kept = Some(t.get_item(2)?.unbind());
                    return Ok((data, fd));
                }
                Ok((value.cast::<PyBytes>()?.as_bytes().to_vec(), None))
            })
        })
    }

    fn outcome_sent(&mut self) {
        if let Some(value) = self.kept.take() {
            // Its `__del__` (if this was the last reference) runs here, after
            // the parent has the result.
            Python::attach(|_| drop(value));
        }
    }

    fn interrupter(&self) -> Option<Interrupter> {
        let main_thread = self.main_thread;
        Some(Arc::new(move || {
            // SAFETY: tgkill with integers. The main thread lives until the
            // process exits (its id cannot name another thread of ours), and a
            // signal the core and the interpreter both handle is harmless.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), main_thread, libc::SIGTERM);
            }
        }))
    }
}

/// A read-only `memoryview` over `bytes`, which the caller must release
/// before `bytes` goes away.
fn borrowed_view<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let len = pyo3::ffi::Py_ssize_t::try_from(bytes.len())
        .map_err(|_| PyRuntimeError::new_err("payload too large for a memoryview"))?;
    // SAFETY: PyBUF_READ makes the view read-only, so Python never writes
    // through the pointer; the caller releases the view before the borrow ends.
    unsafe {
        let ptr = pyo3::ffi::PyMemoryView_FromMemory(bytes.as_ptr() as *mut _, len, pyo3::ffi::PyBUF_READ);
        Bound::from_owned_ptr_or_err(py, ptr)
    }
}

fn run_exit_hook(handler: &Py<PyAny>, reason: &ExitReason) -> ExitHookOutcome {
    Python::attach(|py| {
        // A signal handler of the task's own (`signal.signal`) whose signal
        // came while the main thread was outside Python runs now, so that
        // what it raises (`sys.exit()`) cannot cut the exit path short.
        if let Err(e) = py.check_signals() {
            if !e.is_instance_of::<PySystemExit>(py) {
                e.print(py);
            }
        }
        match handler.bind(py).call_method1("exit", (exit_reason(reason),)) {
            Ok(v) => match v.extract::<(Option<Text>, Option<i32>, Option<i32>)>() {
                Ok((error, exit_code, exit_signal)) => {
                    // The exit path in Python says each of its errors as it comes.
                    ExitHookOutcome { error: error.map(|Text(e)| e), exit_code, exit_signal, said: true }
                }
                Err(e) => ExitHookOutcome { error: Some(format!("bad exit hook result: {e}")), ..Default::default() },
            },
            Err(e) => ExitHookOutcome { error: Some(e.to_string()), ..Default::default() },
        }
    })
}
