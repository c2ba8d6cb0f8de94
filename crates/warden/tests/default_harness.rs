//! A pool used from a `#[test]` under cargo's default test harness, as a
//! first-time user writes it. The harness runs each test on a thread of its
//! own and owns `main`: the pool's workers (this test binary run again)
//! would run every test here, so `init` off the main thread must not count
//! and the pool must refuse to build, saying why.

use std::time::Duration;

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn a_pool_built_in_a_default_harness_test_is_refused_and_says_why() {
    warden::init();
    match warden::Pool::builder().workers(1).build() {
        Ok(pool) => {
            let ran = pool.spawn(square, 3).map(|h| h.join_timeout(Duration::from_secs(10)));
            pool.kill();
            panic!("the pool was built (a task gave {ran:?}): its workers run this whole test binary again");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("main thread") && msg.contains("harness = false"),
                "the refusal names the main thread and the way out: {msg}"
            );
        }
    }
}

#[test]
fn a_worker_that_reaches_init_off_the_main_thread_ends_saying_why() {
    if std::env::var_os("WARDEN_FD").is_some() {
        // This binary, run below as a worker would be: the test is the worker.
        warden::init();
        println!("init returned");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "a_worker_that_reaches_init_off_the_main_thread_ends_saying_why", "--nocapture"])
        // The variable a pool gives its worker (the fd is never read).
        .env("WARDEN_FD", "1000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the test binary runs");
    // Bounded: a child that did not end at init is killed after 60 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("waitpid").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("the child's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stderr.contains("worker reached warden::init() on a thread other than the main one"),
        "the worker ends at init, saying why: {:?}, stderr {stderr:?}",
        out.status
    );
    assert!(!stdout.contains("init returned") && !stdout.contains("test result"), "nothing ran after init: {stdout:?}");
}
