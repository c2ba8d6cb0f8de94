//! Core benchmark: what the pool costs over a bare socketpair between two
//! processes, measured in the same run.
//!
//! `cargo bench -p warden --bench core` (or `make bench`). Prints a Markdown
//! table; `docs/benchmarks.md` holds a copy with the machine it ran on.
//!
//! * raw ping-pong: 8 bytes there and back over a socketpair to a child
//!   process (this binary re-executed), the floor for any round trip;
//! * pool round trip: `pool.spawn(noop, ()).join()` on a one-worker pool;
//! * pipelined throughput: many no-op tasks in flight on two workers
//!   (prefetch 1 and 4);
//! * start-up: `build()` until every worker has run its start hook, with
//!   workers forked by the pool's zygote (the default) and exec'd;
//! * respawn: one worker with `max_tasks_per_child(1)`, one task at a time, so
//!   each task is a whole replacement (retire, start, hello, task), zygote and exec.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use warden::{LifecycleEvent, Pool, StartMethod};

const ECHO_ENV: &str = "WARDEN_BENCH_ECHO_FD";

fn noop(_: ()) {}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    warden::init();
    if let Ok(fd) = std::env::var(ECHO_ENV) {
        echo(fd.parse()?);
        return Ok(());
    }
    // `cargo bench` passes --bench; a name filter is not supported. Without it
    // (`cargo test --all-targets` runs this binary too), a smoke run: each
    // measurement once, at a hundredth of the work, to show the benchmark runs.
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let scale = if smoke {
        100
    } else if quick {
        10
    } else {
        1
    };

    let rounds = if smoke { 1 } else { 5 };
    let starts = if smoke { 1 } else { 10 };
    let n_rt = 20_000 / scale;
    let raw = median((0..rounds).map(|_| raw_ping_pong(n_rt)).collect::<Result<Vec<_>, _>>()?);
    let pool_rt = median((0..rounds).map(|_| pool_round_trip(n_rt)).collect::<Result<Vec<_>, _>>()?);
    let n_pipe = 200_000 / scale;
    let pipe1 = median((0..rounds).map(|_| pipelined(n_pipe, 1)).collect::<Result<Vec<_>, _>>()?);
    let pipe4 = median((0..rounds).map(|_| pipelined(n_pipe, 4)).collect::<Result<Vec<_>, _>>()?);
    let start = median((0..starts).map(|_| startup(2, StartMethod::Zygote)).collect::<Result<Vec<_>, _>>()?);
    let start_exec = median((0..starts).map(|_| startup(2, StartMethod::Exec)).collect::<Result<Vec<_>, _>>()?);
    let n_respawn = 1000 / scale;
    let respawn_z = respawn(n_respawn, StartMethod::Zygote)?;
    let respawn_e = respawn(n_respawn, StartMethod::Exec)?;

    println!("| measurement | result | per operation |");
    println!("|---|---|---|");
    println!("| raw socketpair ping-pong (2 processes) | {:.0} round trips/s | {:.1} µs |", 1.0 / raw, raw * 1e6);
    println!("| pool no-op round trip (1 worker) | {:.0} tasks/s | {:.1} µs |", 1.0 / pool_rt, pool_rt * 1e6);
    println!("| pool round trip / raw ping-pong | **{:.2}×** | |", pool_rt / raw);
    println!("| pipelined no-op, 2 workers, prefetch 1 | {:.0} tasks/s | {:.2} µs |", 1.0 / pipe1, pipe1 * 1e6);
    println!("| pipelined no-op, 2 workers, prefetch 4 | {:.0} tasks/s | {:.2} µs |", 1.0 / pipe4, pipe4 * 1e6);
    println!("| pool start-up, 2 workers ready (zygote) | {:.1} ms | |", start * 1e3);
    println!("| pool start-up, 2 workers ready (exec) | {:.1} ms | |", start_exec * 1e3);
    println!("| respawn: new worker per task (zygote) | {:.0} tasks/s | {:.2} ms |", 1.0 / respawn_z, respawn_z * 1e3);
    println!("| respawn: new worker per task (exec) | {:.0} tasks/s | {:.2} ms |", 1.0 / respawn_e, respawn_e * 1e3);
    println!("| respawn, exec / zygote | **{:.2}×** | |", respawn_e / respawn_z);
    println!();
    println!(
        "medians of {rounds} rounds; {n_rt} round trips, {n_pipe} pipelined tasks per round; start-up: median of \
         {starts}; respawn: {n_respawn} tasks"
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The child side of the raw ping-pong: echo 8-byte messages until EOF.
fn echo(fd: i32) {
    // SAFETY: the parent passed us this socket fd, and nothing else owns it.
    let mut s = unsafe { UnixStream::from_raw_fd(fd) };
    let mut buf = [0u8; 8];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

/// Seconds per round trip over a bare socketpair to another process.
fn raw_ping_pong(n: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let (mut ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let mut child = Command::new(std::env::current_exe()?).env(ECHO_ENV, fd.to_string()).spawn()?;
    drop(theirs);
    let mut buf = [0u8; 8];
    // Warm up.
    for i in 0..100u64 {
        ours.write_all(&i.to_le_bytes())?;
        ours.read_exact(&mut buf)?;
    }
    let t = Instant::now();
    for i in 0..n as u64 {
        ours.write_all(&i.to_le_bytes())?;
        ours.read_exact(&mut buf)?;
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    drop(ours);
    child.wait()?;
    Ok(per)
}

/// Seconds per sequential no-op task on a one-worker pool.
fn pool_round_trip(n: usize) -> Result<f64, Box<dyn std::error::Error>> {
    one_at_a_time(Pool::builder().workers(1).build()?, 100, n)
}

/// Seconds per task of `n` no-op tasks run one after the other on `pool`,
/// after `warm` unmeasured ones; shuts the pool down.
fn one_at_a_time(pool: Pool, warm: usize, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
    for _ in 0..warm {
        pool.spawn(noop, ())?.join()?;
    }
    let t = Instant::now();
    for _ in 0..n {
        pool.spawn(noop, ())?.join()?;
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    pool.shutdown();
    Ok(per)
}

/// Seconds per task with `n` no-op tasks in flight on two workers.
fn pipelined(n: usize, prefetch: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let pool = Pool::builder().workers(2).prefetch(prefetch).build()?;
    for _ in 0..100 {
        pool.spawn(noop, ())?.join()?;
    }
    let t = Instant::now();
    let handles = (0..n).map(|_| pool.spawn(noop, ())).collect::<Result<Vec<_>, _>>()?;
    for h in handles {
        h.join()?;
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    pool.shutdown();
    Ok(per)
}

/// Seconds per task on one worker that retires after every task.
fn respawn(n: usize, start: StartMethod) -> Result<f64, Box<dyn std::error::Error>> {
    one_at_a_time(Pool::builder().workers(1).max_tasks_per_child(1).start(start).build()?, 1, n)
}

/// Seconds from `build()` until `workers` workers are ready.
fn startup(workers: usize, start: StartMethod) -> Result<f64, Box<dyn std::error::Error>> {
    let (tx, rx) = mpsc::channel();
    let t = Instant::now();
    let pool = Pool::builder()
        .start(start)
        .workers(workers)
        .on_event(move |e| {
            if let LifecycleEvent::WorkerReady { .. } = e {
                let _ = tx.send(());
            }
        })
        .build()?;
    for _ in 0..workers {
        rx.recv_timeout(Duration::from_secs(30))?;
    }
    let took = t.elapsed().as_secs_f64();
    pool.shutdown();
    Ok(took)
}
