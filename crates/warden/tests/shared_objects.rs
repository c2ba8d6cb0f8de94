//! Task functions outside the executable's image: in a shared object the
//! program loads (a plugin), which the dynamic loader places at an address
//! of its own in each process, apart from the executable.
//!
//! The plugin is compiled by this binary with `rustc` (a `cdylib` whose
//! exported function hands out a Rust `fn` of its own). The parent loads it
//! before [`warden::init`], and says where it is in the environment; so
//! each worker, which runs `main` up to `init` again, loads it too, as a
//! program with plugins would.

#[allow(dead_code)] // the helpers this binary does not use
mod common;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{check, TestResult};
use libtest_mimic::{Arguments, Trial};
use warden::{Pool, StartMethod};

/// Where the plugin every process loads is.
const PLUGIN_ENV: &str = "WARDEN_TEST_PLUGIN";

const PLUGIN: &str = r#"
fn triple(x: u64) -> u64 {
    x * 3
}

#[no_mangle]
pub extern "C" fn warden_test_task() -> usize {
    triple as fn(u64) -> u64 as usize
}
"#;

fn main() {
    let plugin = match std::env::var(PLUGIN_ENV) {
        Ok(path) => PathBuf::from(path), // a worker (or the zygote)
        Err(_) => match compile_plugin("loaded-everywhere") {
            Ok(path) => {
                std::env::set_var(PLUGIN_ENV, &path);
                path
            }
            Err(e) => {
                eprintln!("cannot compile the test plugin: {e}");
                std::process::exit(1);
            }
        },
    };
    let task = load_task(&plugin);
    warden::init();
    let args = Arguments::from_args();
    let mut tests = Vec::new();
    for (name, start) in [("zygote", StartMethod::Zygote), ("exec", StartMethod::Exec)] {
        tests.push(Trial::test(
            format!("a_task_function_in_a_loaded_shared_object_runs_in_the_workers::{name}"),
            move || a_task_function_in_a_loaded_shared_object_runs_in_the_workers(start, task),
        ));
        tests.push(Trial::test(
            format!("a_task_function_in_an_object_the_workers_have_not_loaded_is_a_clear_error::{name}"),
            move || a_task_function_in_an_object_the_workers_have_not_loaded_is_a_clear_error(start),
        ));
    }
    let conclusion = libtest_mimic::run(&args, tests);
    // The plugins' directories (workers are gone by now: each test shut its pool down).
    let mine = format!("warden-test-plugin-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&mine) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    conclusion.exit();
}

/// Compiles the plugin into a directory of its own under the system's
/// temporary directory; returns the shared object's path.
fn compile_plugin(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("warden-test-plugin-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let source = dir.join("plugin.rs");
    std::fs::write(&source, PLUGIN).map_err(|e| e.to_string())?;
    let object = dir.join("libplugin.so");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--crate-type", "cdylib", "--edition", "2021", "-C", "panic=abort", "-o"])
        .arg(&object)
        .arg(&source)
        .output()
        .map_err(|e| format!("running rustc: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(object)
}

/// Loads the shared object at `path` and returns the task function it hands out.
fn load_task(path: &Path) -> fn(u64) -> u64 {
    let Ok(name) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        eprintln!("a plugin path with a NUL byte: {}", path.display());
        std::process::exit(1);
    };
    // SAFETY: dlopen and dlsym take NUL-terminated strings; the symbol is
    // the plugin's `extern "C" fn() -> usize`, which returns the address of a
    // `fn(u64) -> u64` of the plugin, compiled by the same rustc.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW);
        let symbol =
            if handle.is_null() { std::ptr::null_mut() } else { libc::dlsym(handle, c"warden_test_task".as_ptr()) };
        if symbol.is_null() {
            let why = libc::dlerror();
            let why = if why.is_null() { "?".into() } else { CStr::from_ptr(why).to_string_lossy() };
            eprintln!("cannot load the test plugin {}: {why}", path.display());
            std::process::exit(1);
        }
        let hand_out = std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> usize>(symbol);
        std::mem::transmute::<usize, fn(u64) -> u64>(hand_out())
    }
}

fn plus_one(x: u64) -> u64 {
    x + 1
}

fn a_task_function_in_a_loaded_shared_object_runs_in_the_workers(
    start: StartMethod,
    task: fn(u64) -> u64,
) -> TestResult {
    // Fresh workers for each task: each its own layout of the two images.
    let pool = Pool::builder().start(start).workers(2).max_tasks_per_child(1).build()?;
    for x in 0..4u64 {
        // Before, the function's place was taken from the executable's: the
        // worker jumped to an address in neither image (SIGSEGV).
        let tripled = pool.spawn(task, x)?.join()?;
        check(tripled == 3 * x, format!("the plugin's function in a worker: {tripled}"))?;
        let here = pool.spawn(plus_one, x)?.join()?;
        check(here == x + 1, format!("and the executable's own function: {here}"))?;
    }
    check(pool.shutdown_timeout(std::time::Duration::from_secs(30)), "the pool shut down")
}

fn a_task_function_in_an_object_the_workers_have_not_loaded_is_a_clear_error(start: StartMethod) -> TestResult {
    // Loaded here only, after the workers' start: no worker has it.
    let late = compile_plugin(&format!("loaded-here-only-{start:?}")).map_err(|e| e.to_string())?;
    let task = load_task(&late);
    let pool = Pool::builder().start(start).workers(1).build()?;
    let err = match pool.spawn(task, 2)?.join() {
        Ok(v) => return Err(format!("ran where the object is not loaded: {v}").into()),
        Err(e) => e,
    };
    check(err.to_string().contains("shared object this worker has not loaded"), format!("the error names it: {err}"))?;
    check(pool.spawn(plus_one, 1)?.join()? == 2, "and the pool goes on")?;
    check(pool.shutdown_timeout(std::time::Duration::from_secs(30)), "the pool shut down")
}
