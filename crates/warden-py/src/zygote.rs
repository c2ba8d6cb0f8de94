//! `zygote_main`: this interpreter as a pool's zygote (see `warden::frontend::zygote`).
//!
//! `python -m warden._worker`, started by a pool as its zygote, imports the
//! worker runtime and the pool's preloads (through the `prepare` callable the
//! Python side passes), then calls `zygote_main`, which parks in the core's
//! fork loop holding the GIL (the zygote is single-threaded: nothing else
//! wants it). Around each fork it runs the interpreter's own fork protocol —
//! `PyOS_BeforeFork`, `PyOS_AfterFork_Parent`, `PyOS_AfterFork_Child` — so the
//! child's interpreter is consistent and the `os.register_at_fork` hooks run
//! (`random` reseeds itself there, `threading` and `logging` reset their
//! locks). `zygote_main` returns only in a forked worker, which then goes on to
//! `worker_main` with the channel the zygote received for it.

use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use warden::frontend::zygote::{ForkHooks, Parked, ZygoteEnv, ENV_ZYGOTE, EXIT_ZYGOTE_PROTOCOL};
use warden::frontend::{WorkerEnv, ENV_PARENT};

/// The environment of the worker this process was forked to be, if it was.
static FORKED: Mutex<Option<WorkerEnv>> = Mutex::new(None);

/// Takes the environment a zygote left for this forked worker.
pub fn take_forked() -> Option<WorkerEnv> {
    FORKED.lock().unwrap_or_else(|p| p.into_inner()).take()
}

struct PyForkHooks<'py> {
    prepare: Bound<'py, PyAny>,
    /// Whether this zygote has forked a worker.
    forked: bool,
}

impl ForkHooks for PyForkHooks<'_> {
    fn prepare(&mut self, payload: &[u8]) -> Result<(), String> {
        let py = self.prepare.py();
        let done = self.prepare.call1((PyBytes::new(py, payload),)).map_err(|e| {
            e.print(py);
            format!("the zygote's preparation raised {e}")
        })?;
        // A reason not to fork (main made per-process state at import): the
        // pool starts a zygote without main instead. Not an error to print.
        match done.extract::<Option<String>>() {
            Ok(None) => Ok(()),
            Ok(Some(reason)) => Err(reason),
            Err(e) => Err(format!("the zygote's preparation returned something else than a reason: {e}")),
        }
    }

    fn before_fork(&mut self) {
        // SAFETY: called with the GIL held (this thread holds it throughout).
        unsafe { pyo3::ffi::PyOS_BeforeFork() }
    }

    fn after_fork_parent(&mut self) {
        // SAFETY: as above, after PyOS_BeforeFork in this process.
        unsafe { pyo3::ffi::PyOS_AfterFork_Parent() }
        self.forked = true;
    }

    fn after_fork_child(&mut self) {
        // SAFETY: as above, in the child of a fork made after PyOS_BeforeFork.
        unsafe { pyo3::ffi::PyOS_AfterFork_Child() }
    }
}

/// Runs this process as the zygote of the pool that started it: calls
/// `prepare(payload)` with the pool's start payload, then forks workers on
/// request. Returns only in a forked worker; the zygote itself exits when the
/// pool is done with it (without running Python's exit handlers: it is a
/// template, not a worker), after calling `finish()` if it never forked one
/// (what its preparation made is then no worker's to clean up). Raises
/// `RuntimeError` if not started as a zygote.
#[pyfunction]
#[pyo3(signature = (prepare, finish = None))]
pub fn zygote_main(py: Python<'_>, prepare: Bound<'_, PyAny>, finish: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    let env = match ZygoteEnv::take() {
        None => return Err(PyRuntimeError::new_err("this process was not started as a warden zygote")),
        Some(Err(msg)) => {
            report!("warden: bad zygote environment: {msg}");
            std::process::exit(EXIT_ZYGOTE_PROTOCOL);
        }
        Some(Ok(env)) => env,
    };
    let environ = py.import("os")?.getattr("environ")?;
    for key in [ENV_ZYGOTE, ENV_PARENT] {
        environ.call_method1("pop", (key, py.None()))?;
    }
    let mut hooks = PyForkHooks { prepare, forked: false };
    match warden::frontend::zygote::serve(env, &mut hooks) {
        Parked::Worker(env) => {
            *FORKED.lock().unwrap_or_else(|p| p.into_inner()) = Some(env);
            Ok(())
        }
        Parked::Exit(code) => {
            if let Some(finish) = finish.filter(|_| !hooks.forked) {
                if let Err(e) = finish.call0() {
                    e.print(py);
                }
            }
            crate::worker::flush_python_streams(py);
            std::process::exit(code)
        }
    }
}

/// The pid of the zygote this worker was forked from; `None` in a worker
/// started by exec, and in any other process.
#[pyfunction]
pub fn forked_from() -> Option<u32> {
    warden::forked_from()
}
