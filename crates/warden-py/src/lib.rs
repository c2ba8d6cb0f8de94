//! `warden._warden`: the glue between warden's Rust core and its Python package.
//!
//! This module is deliberately thin. It converts types, releases the GIL
//! around every wait, and never takes the GIL on a core thread; every decision
//! (what a payload holds, how an error is raised, when a pool shuts down) is
//! made in `python/warden/`.
//!
//! * `pool::CorePool`: a core [`warden::Pool`] whose workers run a Python
//!   interpreter, plus the queue its task outcomes land in;
//! * `records`: what crosses to Python, as frozen classes with named fields
//!   (`Completion`, `TaskError`, `RemoteFailure`, `WorkerEnd`, `WorkerState`)
//!   and enums of kinds (`ErrorKind`, `RemoteKind`);
//! * `worker::worker_main`: the worker side, a [`warden::frontend::Handler`]
//!   that calls into a Python object;
//! * `zygote::zygote_main`: the interpreter as a pool's zygote (fork server),
//!   with the interpreter's own fork protocol around each fork;
//! * `event::SharedEvent`: a process-shared flag in a sealed `memfd` page,
//!   waited on with a shared futex;
//! * `segment::Segment`: a shared segment of large buffers received from
//!   another process, mapped and exposed through the buffer protocol;
//! * `remote`: large buffers read straight out of another process's memory
//!   (`process_vm_readv`), where the kernel allows it;
//! * `finalize`: Python callbacks on the core's finalizer service
//!   (`FinalizerToken`, the exit drain), attached to the interpreter one call
//!   at a time and never once it is finalizing.
//!
//! The Python-facing signatures are mirrored by hand in
//! `python/warden/_warden.pyi`; `make stubtest` checks the two against each
//! other.

use pyo3::prelude::*;

/// `eprintln!` that cannot panic or hang: a line for stderr, dropped if
/// stderr is gone or does not take it within a second
/// (`warden::frontend::report_line`), so that a report on a path that cleans
/// up never stops it.
macro_rules! report {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        warden::frontend::report_line(line.as_bytes());
    }};
}

mod convert;
mod event;
mod finalize;
mod pool;
mod records;
mod remote;
mod scan;
mod segment;
mod worker;
mod zygote;

pyo3::create_exception!(
    _warden,
    CoreError,
    pyo3::exceptions::PyRuntimeError,
    "An error from warden's core; its `kind` attribute is an `ErrorKind`."
);

/// The extension module `warden._warden`.
#[pymodule]
fn _warden(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pool::CorePool>()?;
    m.add_class::<records::PyErrorKind>()?;
    m.add_class::<records::PyRemoteKind>()?;
    m.add_class::<records::RemoteFailure>()?;
    m.add_class::<records::TaskError>()?;
    m.add_class::<records::Completion>()?;
    m.add_class::<records::PyWorkerEnd>()?;
    m.add_class::<records::WorkerState>()?;
    m.add_class::<pool::LostWorker>()?;
    m.add_class::<event::SharedEvent>()?;
    m.add_class::<segment::Segment>()?;
    m.add_class::<segment::SegmentBuffer>()?;
    m.add_function(wrap_pyfunction!(segment::map_segment, m)?)?;
    m.add_function(wrap_pyfunction!(segment::copy_to_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(segment::keep_no_spares, m)?)?;
    m.add_function(wrap_pyfunction!(segment::copy_to_bytearray, m)?)?;
    m.add_function(wrap_pyfunction!(remote::buffer_address, m)?)?;
    m.add_function(wrap_pyfunction!(remote::read_remote, m)?)?;
    m.add_function(wrap_pyfunction!(remote::is_dumpable, m)?)?;
    m.add_function(wrap_pyfunction!(scan::contains_any, m)?)?;
    m.add_function(wrap_pyfunction!(pool::trim_heap, m)?)?;
    m.add_function(wrap_pyfunction!(pool::fill_closed_stdio, m)?)?;
    m.add_function(wrap_pyfunction!(pool::fds_scarce, m)?)?;
    m.add_function(wrap_pyfunction!(pool::interrupts_forwarded, m)?)?;
    m.add_function(wrap_pyfunction!(pool::prepare_interrupt_forwarding, m)?)?;
    m.add_function(wrap_pyfunction!(pool::own_thread_ids, m)?)?;
    m.add_function(wrap_pyfunction!(pool::chain_interrupt_handler, m)?)?;
    m.add_function(wrap_pyfunction!(pool::last_interrupt_forwarded, m)?)?;
    m.add("LENT_BYTES", remote::KIND_BYTES)?;
    m.add("LENT_RAW", remote::KIND_RAW)?;
    m.add_function(wrap_pyfunction!(worker::worker_main, m)?)?;
    m.add_function(wrap_pyfunction!(zygote::zygote_main, m)?)?;
    m.add_function(wrap_pyfunction!(zygote::forked_from, m)?)?;
    m.add_function(wrap_pyfunction!(worker::send_record, m)?)?;
    m.add_function(wrap_pyfunction!(worker::task_clock, m)?)?;
    m.add_function(wrap_pyfunction!(worker::hold_stops, m)?)?;
    m.add_function(wrap_pyfunction!(worker::unwind_grace, m)?)?;
    m.add_function(wrap_pyfunction!(worker::sigint_without_a_signal, m)?)?;
    m.add_function(wrap_pyfunction!(worker::record_stop_signal, m)?)?;
    m.add_function(wrap_pyfunction!(worker::setsid, m)?)?;
    m.add_function(wrap_pyfunction!(worker::stop_thread_again, m)?)?;
    m.add("WORKER_VARIABLES", warden::frontend::WORKER_VARIABLES.to_vec())?;
    m.add_class::<finalize::FinalizerToken>()?;
    m.add_function(wrap_pyfunction!(finalize::register_finalizer, m)?)?;
    m.add_function(wrap_pyfunction!(finalize::run_exit_finalizers, m)?)?;
    m.add_function(wrap_pyfunction!(finalize::wait_finalizers_idle, m)?)?;
    finalize::install_sink();
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add("DEFAULT_GRACE", warden::DEFAULT_GRACE.as_secs_f64())?;
    Ok(())
}
