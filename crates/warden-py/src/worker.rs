//! The worker side: `worker_main` runs the core's worker loop with a handler
//! that calls into a Python object (`warden._workerloop.Handler`).
//!
//! The core's loop runs with the GIL released; each call into Python (`init`,
//! `run`, `exit`) attaches for its duration. The Python object's contract:
//!
//! * `init(worker, pid, parent, payload)` returns `None` when the worker is
//!   ready, or a `RemoteFailure` saying why it cannot start;
//! * `run(payload)` returns the result's bytes, or a `RemoteFailure`;
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
use std::sync::Arc;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use warden::frontend::{ExitHook, ExitHookOutcome, Handler, Interrupter, WorkerEnv, EXIT_PROTOCOL};
use warden::WorkerInfo;
use warden::{ExitReason, RemoteError, RemoteErrorKind};

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
            eprintln!("warden: bad worker environment: {msg}");
            std::process::exit(EXIT_PROTOCOL);
        }
        Some(Ok(env)) => env,
    };
    // The main thread by its kernel id, not its pthread_t: in a worker forked
    // by a zygote, glibc's cached id of this thread is the zygote's.
    let main_thread = rustix::thread::gettid().as_raw_nonzero().get();
    let handler = PyHandler { handler, main_thread };
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
        Python::attach(|py| {
            let result = self.handler.bind(py).call_method1("run", (PyBytes::new(py, payload),));
            outcome(py, result, |v| Ok(v.cast::<PyBytes>()?.as_bytes().to_vec()))
        })
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

fn run_exit_hook(handler: &Py<PyAny>, reason: &ExitReason) -> ExitHookOutcome {
    Python::attach(|py| match handler.bind(py).call_method1("exit", (exit_reason(reason),)) {
        Ok(v) => match v.extract::<(Option<String>, Option<i32>)>() {
            Ok((error, exit_code)) => ExitHookOutcome { error, exit_code },
            Err(e) => ExitHookOutcome { error: Some(format!("bad exit hook result: {e}")), exit_code: None },
        },
        Err(e) => ExitHookOutcome { error: Some(e.to_string()), exit_code: None },
    })
}
