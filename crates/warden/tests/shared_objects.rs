//! Task functions outside the executable's image: in a Rust `dylib` the
//! program links (`tests/plugin`), which the dynamic loader places at an
//! address of its own in each process, apart from the executable.
//!
//! The binary is its own worker: `warden::init()` first thing in `main`.

#[allow(dead_code)] // the helpers this binary does not use
mod common;

use common::{check, TestResult};
use libtest_mimic::{Arguments, Trial};
use warden::{Pool, StartMethod};

fn main() {
    warden::init();
    let args = Arguments::from_args();
    let mut tests = Vec::new();
    for (name, start) in [("zygote", StartMethod::Zygote), ("exec", StartMethod::Exec)] {
        tests.push(Trial::test(format!("a_task_function_in_a_dylib_runs_in_the_workers::{name}"), move || {
            a_task_function_in_a_dylib_runs_in_the_workers(start)
        }));
    }
    libtest_mimic::run(&args, tests).exit();
}

fn plus_one(x: u64) -> u64 {
    x + 1
}

fn a_task_function_in_a_dylib_runs_in_the_workers(start: StartMethod) -> TestResult {
    // Fresh workers for each task: each its own layout of the two images.
    let pool = Pool::builder().start(start).workers(2).max_tasks_per_child(1).build()?;
    for x in 0..4u64 {
        // Before, the function's place was taken from the executable's: the
        // worker jumped to an address in neither image (SIGSEGV).
        let tripled = pool.spawn(warden_test_plugin::triple, x)?.join()?;
        check(tripled == 3 * x, format!("triple({x}) in a worker: {tripled}"))?;
        let here = pool.spawn(plus_one, x)?.join()?;
        check(here == x + 1, format!("and the executable's own function: {here}"))?;
    }
    let worker = pool.spawn(warden_test_plugin::pid, ())?.join()?;
    check(worker != std::process::id(), "it ran in a worker")?;
    check(pool.shutdown_timeout(std::time::Duration::from_secs(30)), "the pool shut down")
}
