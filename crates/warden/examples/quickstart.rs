//! The basics: a pool, typed tasks, errors as data, a graceful shutdown.
//!
//! `cargo run --example quickstart`

use std::time::Duration;

fn word_count(text: String) -> usize {
    text.split_whitespace().count()
}

fn explode(code: u32) -> u32 {
    panic!("bad input {code}");
}

fn open_cache() {
    eprintln!("worker {}: cache opened", std::process::id());
}

fn close_cache(reason: warden::ExitReason) {
    eprintln!("worker {}: cache closed ({reason:?})", std::process::id());
}

fn main() -> Result<(), warden::Error> {
    warden::init(); // first thing: a re-executed copy of this program serves tasks here

    let pool = warden::Pool::builder()
        .workers(2)
        .on_start(open_cache)
        .on_exit(close_cache)
        .task_timeout(Duration::from_secs(10))
        .build()?;

    let texts = ["the quick brown fox", "jumps over", "the lazy dog"];
    let handles: Vec<_> = texts.iter().map(|t| pool.spawn(word_count, t.to_string())).collect::<Result<_, _>>()?;
    for (text, h) in texts.iter().zip(handles) {
        println!("{text:?}: {} words", h.join()?);
    }

    // A panic in a task is an error for that task only; the worker lives on.
    let err = pool.spawn(explode, 7)?.join().err();
    if let Some(e) = err {
        println!("explode(7): {e} (panic message: {:?})", e.panic_message());
    }

    pool.shutdown(); // every worker retires and runs close_cache
    Ok(())
}
