//! warden at work: workers start, a crash is survived, a timeout stops a
//! worker (which still runs its exit hook), a worker retires after its task
//! quota, and at shutdown every exit hook runs and no process is left.
//!
//! `cargo run --example demo` (or `make demo`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warden::{ExitReason, LifecycleEvent, Pool, TaskOptions};

fn started() {
    println!("    [worker {}] start hook: opened its resources", std::process::id());
}

fn stopped(reason: ExitReason) {
    println!("    [worker {}] exit hook: closed its resources ({reason:?})", std::process::id());
}

fn work(n: u64) -> (u32, u64) {
    (std::process::id(), (1..=n).product())
}

fn crash(_: ()) -> u32 {
    // Keep the demo from writing a core file.
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    println!("    [worker {}] dereferencing a bad pointer…", std::process::id());
    // SAFETY: none: this deliberately faults, to show a crash being survived.
    unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>().wrapping_add(2), 1) };
    0
}

fn stuck(_: ()) -> u32 {
    std::thread::sleep(Duration::from_secs(3600));
    0
}

fn children() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().map(str::to_string));
            }
        }
    }
    out
}

fn main() -> Result<(), warden::Error> {
    warden::init();
    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);

    println!("== a pool of 2 workers, each retiring after 4 tasks");
    let pool = Pool::builder()
        .name("demo")
        .workers(2)
        .max_tasks_per_child(4)
        .on_start(started)
        .on_exit(stopped)
        .grace(Duration::from_secs(2))
        .on_event(move |e| {
            let line = match e {
                LifecycleEvent::WorkerStarted { pid, .. } => format!("worker {pid} started"),
                LifecycleEvent::WorkerExited(x) => format!(
                    "worker {} exited: {}{}{}",
                    x.pid,
                    x.status,
                    match &x.goodbye {
                        Some(_) if x.hook_ran() => ", exit hook ran",
                        Some(_) => ", retired before its start hook ran: nothing to close",
                        None => ", no exit hook: killed",
                    },
                    if x.crashed { ", a crash (its task failed; the pool goes on)" } else { "" }
                ),
                LifecycleEvent::TaskTimedOut { task, pid } => format!("task {task} timed out on worker {pid}"),
                _ => return,
            };
            println!("  event: {line}");
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        })
        .build()?;

    for n in [5, 10, 15] {
        let (pid, v) = pool.spawn(work, n)?.join()?;
        println!("  {n}! = {v} (worker {pid})");
    }

    println!("\n== a task that segfaults");
    match pool.spawn(crash, ())?.join() {
        Err(e) if e.is_crash() => println!("  caller sees: {e}"),
        other => println!("  unexpected: {other:?}"),
    }
    let (pid, v) = pool.spawn(work, 6)?.join()?;
    println!("  the pool goes on: 6! = {v} (worker {pid})");

    println!("\n== a task that hangs, with a 300 ms timeout");
    let h = pool.spawn_with(stuck, (), TaskOptions { timeout: Some(Duration::from_millis(300)) })?;
    match h.join() {
        Err(e) if e.is_timeout() => println!("  caller sees: {e}"),
        other => println!("  unexpected: {other:?}"),
    }

    println!("\n== a few more tasks (workers retire after 4 tasks each)");
    for n in 1..=6 {
        let (pid, _) = pool.spawn(work, n)?.join()?;
        println!("  task {n} ran on worker {pid}");
    }

    println!("\n== shutdown");
    pool.shutdown();
    let left = children();
    println!("\nchild processes left: {}", if left.is_empty() { "none".to_string() } else { left.join(" ") });
    println!("done in {:.2} s", t0.elapsed().as_secs_f64());
    Ok(())
}
